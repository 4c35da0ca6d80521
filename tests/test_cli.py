"""The command line, run as a user runs it: `python -m minphi3 ...` in a subprocess."""

import os
import subprocess
import sys

import numpy as np
import pytest
from bad_inputs import CASES
from tiny_checkpoints import save_tiny, save_tiny_tokenizer

import minphi3
from minphi3 import cli
from minphi3.chat import ChatSession, common_prefix_length


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Phi-3 checkpoint with a ChatML byte-level tokenizer in its folder."""
    folder = save_tiny(tmp_path_factory.mktemp("chat"), vocab_size=300, max_position_embeddings=256)
    return save_tiny_tokenizer(folder, 300)


def run_cli(*arguments, stdin: str | None = None, timeout: int = 120):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "minphi3", *arguments],
        input=stdin, capture_output=True, text=True, timeout=timeout, env=env,
    )


def test_one_shot_chat_prints_answer_and_figures(chat_model):
    result = run_cli("chat", "--model", str(chat_model), "--prompt", "What is the capital of France?", "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    tokenizer = minphi3.load_tokenizer(chat_model)
    model = minphi3.load(chat_model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=True)
    ids = minphi3.generate(model, [prompt], max_new_tokens=12, eos_token_id=tokenizer.stop_token_ids())
    new = [t for t in ids[0, len(prompt):] if t not in tokenizer.stop_token_ids()]
    assert result.stdout.strip() == tokenizer.decode(new, skip_special_tokens=True).strip()
    figures = result.stderr.strip().splitlines()[-1]
    assert "prompt tokens" in figures and "new tokens" in figures and "tokens/s" in figures


def test_chat_reads_turns_from_a_pipe_and_reuses_the_cache(chat_model):
    result = run_cli("chat", "--model", str(chat_model), "--max-new-tokens", "6",
                     stdin="Hello there\nAnd again\n/exit\n")
    assert result.returncode == 0, result.stderr
    figures = [line for line in result.stderr.splitlines() if "tokens/s" in line]
    assert len(figures) == 2
    assert "(0 reused" in figures[0]
    assert "(0 reused" not in figures[1]  # the second turn starts from the cached first one


def test_generate_streams_the_continuation(chat_model):
    result = run_cli("generate", "--model", str(chat_model), "The quick brown", "--max-new-tokens", "8", "--seed", "1",
                     "--temperature", "0.8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The quick brown")
    again = run_cli("generate", "--model", str(chat_model), "The quick brown", "--max-new-tokens", "8", "--seed", "1",
                    "--temperature", "0.8")
    assert again.stdout == result.stdout  # seeded sampling repeats


def test_generate_keeps_the_space_before_the_first_new_token(tmp_path):
    """With Phi-3's SentencePiece-style decoder (Metaspace, then Strip of the first space), the
    printed prompt plus the stream must read as the decode of prompt + new tokens."""
    from test_tokenizer import _write_phi3_folder  # the Phi-3-style tokenizer those tests build

    _write_phi3_folder(tmp_path / "tokenizer", with_model_config=False)
    folder = save_tiny(tmp_path / "model", seed=11, vocab_size=860, max_position_embeddings=256)
    for path in (tmp_path / "tokenizer").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    tokenizer, model = minphi3.load_tokenizer(folder), minphi3.load(folder)
    prompt = "The quick brown fox"
    ids = tokenizer.encode(prompt)
    stops = tokenizer.stop_token_ids(model.generation_config)
    new = [int(t) for t in minphi3.generate(model, [ids], max_new_tokens=12, eos_token_id=stops)[0, len(ids):]]
    new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
    assert tokenizer.id_to_token(new[0]).startswith("▁")  # the case this test is about
    result = run_cli("generate", "--model", str(folder), prompt, "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == tokenizer.decode(ids + new, skip_special_tokens=True)


@pytest.mark.parametrize("seed", ["-1", "-5"])
def test_a_negative_seed_is_refused_before_loading(tmp_path, seed):
    result = run_cli("generate", "--model", str(tmp_path / "not-read"), "hi", "--seed", seed)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "seed must be a non-negative integer" in lines[0], result.stderr


def test_chat_lines_piped_with_crlf_are_read_as_lf(chat_model):
    unix = run_cli("chat", "--model", str(chat_model), "--max-new-tokens", "4", stdin="Hello there\n")
    windows = run_cli("chat", "--model", str(chat_model), "--max-new-tokens", "4", stdin="Hello there\r\n")
    assert unix.returncode == windows.returncode == 0, windows.stderr
    assert windows.stdout == unix.stdout
    assert windows.stderr.splitlines()[-1].split(",")[0] == unix.stderr.splitlines()[-1].split(",")[0]  # prompt tokens


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["generate", "--model", "/no/such/folder", "hi"], "no such file"),
        (["generate", "--bogus-flag", "hi"], "unrecognized arguments"),
        (["chat", "--max-new-tokens", "many"], "invalid int value"),
        ([], "missing command"),
        (["parity", ".", "--seed", "-1"], "--seed must be a non-negative integer"),
        (["parity", ".", "--save", ""], "--save needs a file name"),
    ],
)
def test_bad_command_lines_give_one_line_and_exit_2(arguments, message):
    result = run_cli(*arguments)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_over_long_prompt_is_refused_in_one_line(chat_model):
    result = run_cli("generate", "--model", str(chat_model), "word " * 400, "--max-new-tokens", "4")
    assert result.returncode == 2
    assert "context" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_broken_checkpoint_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    result = run_cli("generate", "--model", str(tmp_path), "hi")
    assert result.returncode == 2
    assert "config.json" in result.stderr and "JSON" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    result = run_cli("--debug", "generate", "--model", str(tmp_path), "hi")
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.parametrize("where", [0, 1, 4], ids=["before_the_command", "after_the_command", "at_the_end"])
def test_debug_works_before_or_after_the_command(where):
    arguments = ["generate", "--model", "/nonexistent", "hi"]
    arguments.insert(where, "--debug")
    result = run_cli(*arguments)
    assert result.returncode == 1, result.stderr
    assert "Traceback" in result.stderr and "UsageError: --model /nonexistent: no such file" in result.stderr
    assert "unrecognized arguments" not in result.stderr


def test_unexpected_errors_exit_1_with_a_hint(monkeypatch, capsys):
    """A bug (here a ZeroDivisionError inside the command) is one line asking for a report, exit 1."""

    def broken_command(args):
        return 1 / 0

    monkeypatch.setitem(cli.COMMANDS, "generate", broken_command)
    assert cli.main(["generate", "hi"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("minphi3: internal error: ZeroDivisionError: division by zero"), lines[0]
    assert "this is a bug: please report it" in lines[0] and "--debug shows the traceback" in lines[0]
    for arguments in (["--debug", "generate", "hi"], ["generate", "hi", "--debug"]):
        with pytest.raises(ZeroDivisionError) as caught:
            cli.main(arguments)  # raised out of main: Python prints its traceback
        assert caught.traceback[-1].name == "broken_command"
    assert capsys.readouterr().err == ""


# The bad-input corpus's folder whose tokenizer.json has a merge that panics the Rust library.
PANIC_CASE = next(c for c in CASES if c.id == "tokenizer-merge_that_panics_the_library")
# `python -c`: the CLI with minphi3's merge pre-check switched off, so that the real panic happens.
PANICKING_CLI = (
    "import sys, contextlib, minphi3.tokenizer as t\n"
    "t.check_bpe_merges = lambda model, source: None\n"
    "if sys.argv[1] == 'unhidden': t.panic_output_hidden = contextlib.nullcontext\n"
    "from minphi3.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


@pytest.mark.parametrize("hidden", [True, False], ids=["hidden", "control_unhidden"])
def test_a_real_rust_panic_is_one_line_on_stderr(tmp_path, hidden):
    """The Rust panic hook writes to fd 2 even when the panic is caught; the CLI keeps it off stderr.
    Control: without `panic_output_hidden` the hook's text does reach stderr."""
    arguments = PANIC_CASE.build(tmp_path).cli
    env = dict(os.environ, PYTHONUNBUFFERED="1", RUST_BACKTRACE="1")
    result = subprocess.run(
        [sys.executable, "-c", PANICKING_CLI, "hidden" if hidden else "unhidden", *arguments],
        capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    error = [line for line in lines if line.startswith("minphi3: error: ")]
    assert len(error) == 1 and "tokenizer.json" in error[0], result.stderr[-3000:]
    assert "failed in the tokenizers library: PanicException" in error[0], error[0]
    if hidden:
        assert lines == error, result.stderr[-3000:]
    else:
        assert "panicked at" in result.stderr and len(lines) > 1


def test_parity_command_prints_every_stage_and_saves_the_trace(tmp_path):
    folder = save_tiny(tmp_path / "m")
    trace = tmp_path / "trace.npz"
    result = run_cli("parity", str(folder), "--save", str(trace), timeout=300)
    assert result.returncode == 0, result.stderr
    stages = ["embedding", "layer.0", "layer.1", "final_norm", "logits"]
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.split() and line.split()[0] in stages}
    assert set(rows) == set(stages)
    assert all(float(values[0]) < 1e-4 for values in rows.values())
    saved = np.load(trace)
    assert {"minphi3.logits", "transformers.logits", "minphi3.layer.1", "input_ids"} <= set(saved.files)
    assert np.abs(saved["minphi3.logits"] - saved["transformers.logits"]).max() < 1e-4


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([1, 2], [1, 2]) == 2


def test_chat_session_answers_equal_a_fresh_generation_each_turn(chat_model):
    """The cache carried across turns must give exactly what recomputing the whole prompt gives."""
    model = minphi3.load(chat_model)
    tokenizer = minphi3.load_tokenizer(chat_model)
    session = ChatSession(model, tokenizer, max_new_tokens=8)
    for text in ["Hello", "What is the capital of France?", "Thanks"]:
        history = list(session.messages)
        answer, _ = session.ask(text)
        prompt = tokenizer.apply_chat_template(history + [{"role": "user", "content": text}], tokenize=True)
        fresh = minphi3.generate(model, [prompt], max_new_tokens=8, eos_token_id=session.stop_ids)[0, len(prompt):]
        expected = tokenizer.decode([t for t in fresh if t not in session.stop_ids], skip_special_tokens=True).strip()
        assert answer == expected
    assert session.last_reused_tokens > 0


def test_a_reader_that_goes_away_ends_the_stream_quietly(chat_model):
    """`generate ... | head -c 3`: the broken pipe ends the run with 141 (SIGPIPE's status) and
    nothing on stderr, as Unix tools do; not an 'internal error'."""
    process = subprocess.Popen(
        [sys.executable, "-m", "minphi3", "generate", "--model", str(chat_model), "Once upon a time",
         "--max-new-tokens", "200", "--temperature", "1.0", "--seed", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    assert process.stdout.read(3) == b"Onc"
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == cli.EXIT_BROKEN_PIPE, stderr
    assert stderr.decode().strip() == ""


def test_a_full_disk_on_stdout_is_one_line(chat_model):
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "minphi3", "generate", "--model", str(chat_model), "hi",
                                 "--max-new-tokens", "4"], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], result.stderr


def test_closed_stdin_reads_as_the_end_and_closed_stderr_keeps_errors_off_stdout(chat_model, tmp_path):
    chat = subprocess.run(f'"{sys.executable}" -m minphi3 chat --model "{chat_model}" <&-', shell=True,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    missing = subprocess.run(f'"{sys.executable}" -m minphi3 generate --model "{tmp_path / "none"}" hi 2>&-',
                             shell=True, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode == 2
    assert missing.stdout == ""


def test_a_closed_stdout_is_one_line_and_status_2(chat_model):
    result = subprocess.run(f'"{sys.executable}" -m minphi3 generate --model "{chat_model}" hi --max-new-tokens 2 >&-',
                            shell=True, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "standard output is closed" in result.stderr


def test_a_prompt_of_invalid_utf8_is_named(chat_model):
    result = subprocess.run([sys.executable.encode(), b"-m", b"minphi3", b"generate", b"--model", str(chat_model).encode(),
                             b"caf\xe9", b"--max-new-tokens", b"2"], capture_output=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "not valid UTF-8" in lines[0], lines



def test_min_new_tokens_on_the_command_line_is_the_api_s(chat_model):
    tokenizer, model = minphi3.load_tokenizer(chat_model), minphi3.load(chat_model)
    ids = tokenizer.encode("The quick brown")
    stops = tokenizer.stop_token_ids(model.generation_config)
    new = minphi3.generate(model, [ids], max_new_tokens=12, eos_token_id=stops, min_new_tokens=10)[0, len(ids):]
    result = run_cli("generate", "--model", str(chat_model), "The quick brown", "--max-new-tokens", "12",
                     "--min-new-tokens", "10")  # fmt: skip
    assert result.returncode == 0, result.stderr
    shown = tokenizer.decode(ids + [int(t) for t in new if t not in stops], skip_special_tokens=True)
    assert result.stdout.rstrip("\n") == shown
