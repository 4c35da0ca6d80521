"""Every case of the bad-input corpus (tests/bad_inputs), through the API and through the CLI.

API: the call raises exactly the case's minphi3 exception class, with a one-line message holding
every fragment the case names, within API_SECONDS, with at most API_PEAK_BYTES allocated on the
way (tracemalloc sees NumPy's buffers), and without creating a pickle payload's marker file.

CLI: `python -m minphi3 ...` in a subprocess whose address space is capped at CLI_MEMORY_LIMIT
(RLIMIT_AS) exits with status 2 and exactly one line on stderr ("minphi3: error: ..."), holding the
same fragments, with no traceback, within CLI_TIMEOUT seconds (a guard against hangs, not a speed
test: each case fails within a second or two).

The suite prints "bad inputs: N cases tried, M handled" at the end (tests/conftest.py); a case
counts as handled only when both its API and its CLI test ran and passed.
"""

from __future__ import annotations

import io
import os
import pickle
import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
from bad_inputs import CASES, tally
from bad_inputs import corpus as bad

import minphi3
from minphi3 import cli
from minphi3.cache import cache_nbytes
from minphi3.config import config_from_dict
from minphi3.errors import MinPhi3Error, ResourceError
from minphi3.loading import weights_nbytes

API_SECONDS = 5.0
API_PEAK_BYTES = 64 * 1024**2
CLI_MEMORY_LIMIT = 4 * 1024**3
CLI_TIMEOUT = 10.0
IDS = [c.id for c in CASES]


def run_cli(arguments, cwd, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m minphi3 *arguments` with at most CLI_MEMORY_LIMIT of address space."""

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (CLI_MEMORY_LIMIT, CLI_MEMORY_LIMIT))

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        return subprocess.run(
            [sys.executable, "-m", "minphi3", *arguments],
            capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env, preexec_fn=limit_memory,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"`python -m minphi3 {' '.join(arguments)[:200]}` did not finish in {timeout} s (a hang?)")


# ================================================================================================
# The corpus, case by case
# ================================================================================================


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_api(case, tmp_path):
    tally[case.id]["api"] = False
    attempt = case.build(tmp_path)
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.perf_counter()
    try:
        with pytest.raises(MinPhi3Error) as caught:
            attempt.api()
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        if not tracing:
            tracemalloc.stop()
    error, message = caught.value, str(caught.value)
    assert type(error) is case.error, f"expected {case.error.__name__}, got {type(error).__name__}: {message}"
    missing = [fragment for fragment in case.fragments if fragment not in message]
    assert not missing, f"message lacks {missing}: {message}"
    assert "\n" not in message, message
    assert elapsed < API_SECONDS, f"took {elapsed:.1f} s"
    assert peak < API_PEAK_BYTES, f"allocated {peak / 2**20:.0f} MiB on the way to the error"
    if attempt.marker is not None:
        assert not attempt.marker.exists(), "the pickle payload ran"
    tally[case.id]["api"] = True


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cli(case, tmp_path):
    tally[case.id]["cli"] = False
    attempt = case.build(tmp_path)
    result = run_cli(attempt.cli, cwd=tmp_path)
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("minphi3: error: "), lines[0]
    missing = [fragment for fragment in case.fragments if fragment not in lines[0]]
    assert not missing, f"stderr lacks {missing}: {lines[0]}"
    if attempt.marker is not None:
        assert not attempt.marker.exists(), "the pickle payload ran"
    tally[case.id]["cli"] = True


# ================================================================================================
# The corpus itself: complete, and broken only where each case says
# ================================================================================================


def test_corpus_covers_every_group_of_the_issue():
    groups = {c.group for c in CASES}
    assert groups == {"config", "safetensors", "pickle", "gguf", "tokenizer", "generation"}
    assert len(IDS) == len(set(IDS))
    assert all(c.fragments for c in CASES)


def test_a_case_is_handled_only_when_both_paths_ran_and_passed():
    results = {
        "both": {"api": True, "cli": True},
        "api_only": {"api": True},
        "cli_failed": {"api": True, "cli": False},
        "cli_only": {"cli": True},
        "api_only_too": {"api": True},
    }
    assert bad.summary_line(results) == (
        "bad inputs: 5 cases tried, 1 handled, 1 not run through the API, 2 not run through the CLI"
    )
    assert bad.summary_line({"a": {"api": True, "cli": True}}) == "bad inputs: 1 cases tried, 1 handled"
    assert bad.summary_line({}) is None


def test_the_summary_of_an_api_only_run_says_the_cli_did_not_run(tmp_path):
    """`pytest -k api`: the API test passes, the CLI never runs, so the case is not handled."""
    case_id = "config-not_json"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={tmp_path}",
         os.path.abspath(__file__), "-k", f"test_api and {case_id}"],
        capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    assert "bad inputs: 1 cases tried, 0 handled, 1 not run through the CLI" in result.stdout.splitlines(), result.stdout[-3000:]


def test_the_base_inputs_are_valid(tmp_path):
    """The model, tokenizer and GGUF file the cases start from load and generate: each case fails
    for the one reason it names."""
    folder = bad.write_model(tmp_path / "model")
    model = minphi3.load(folder)
    tokenizer = minphi3.load_tokenizer(folder)
    assert tokenizer.encode("hi") == [259] and len(tokenizer) == 263
    assert minphi3.generate(model, [[65, 66]], max_new_tokens=3).shape == (1, 5)
    gguf_path = bad.write_gguf(tmp_path / "tiny.gguf")
    gguf_model = minphi3.load(gguf_path)
    assert minphi3.load_tokenizer(gguf_path).encode("hi") == [259]
    ids = np.array([[65, 66, 259]])
    np.testing.assert_allclose(gguf_model(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    result = run_cli(bad.load_args(folder), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("hi")


def test_the_pickle_payload_is_live(tmp_path):
    """Control: the corpus's payload does run code when unpickled, so 'no marker' proves something."""
    marker = tmp_path / "UNPICKLED"
    pickle.loads(bad.pickle_bomb(marker))  # noqa: S301 - the point of the test
    assert marker.exists()


# ================================================================================================
# Memory checks happen before any allocation or read
# ================================================================================================


def test_huge_config_is_refused_before_any_weight_file_is_opened(tmp_path, monkeypatch):
    case = next(c for c in CASES if c.id == "config-needs_terabytes")
    attempt = case.build(tmp_path)

    def must_not_run(*args, **kwargs):
        raise AssertionError("weights were looked at before the memory check")

    monkeypatch.setattr(minphi3.loading, "checkpoint_files", must_not_run)
    monkeypatch.setattr(minphi3.loading, "read_all_headers", must_not_run)
    with pytest.raises(ResourceError, match="needs .* TiB"):
        attempt.api()


def test_gguf_memory_is_checked_before_dequantizing(tmp_path, monkeypatch):
    from minphi3 import gguf as mgguf

    path = bad.write_gguf(tmp_path / "tiny.gguf")
    minphi3.load(path)  # fits

    def must_not_run(*args, **kwargs):
        raise AssertionError("a tensor was dequantized before the memory check")

    monkeypatch.setattr(minphi3.loading, "available_memory", lambda xp: (1024, "this machine has"))
    monkeypatch.setattr(mgguf, "dequantize", must_not_run)
    with pytest.raises(ResourceError, match="needs .* but this machine has 1.0 KiB available"):
        minphi3.load(path)


def test_kv_cache_memory_is_checked_before_allocating(tmp_path, monkeypatch):
    model = minphi3.load(bad.write_model(tmp_path / "model"))
    minphi3.generate(model, [[65, 66]], max_new_tokens=4)  # fits
    monkeypatch.setattr(minphi3.loading, "available_memory", lambda xp: (1000, "this machine has"))
    # 2 (keys, values) x 1 layer x 1 row x 2 kv heads x 6 tokens x 8 dims x 4 bytes = 768 bytes fit
    assert minphi3.generate(model, [[65, 66]], max_new_tokens=4).shape == (1, 6)
    with pytest.raises(ResourceError, match=r"KV cache .* 1\.5 KiB"):  # 12 tokens: 1536 bytes
        minphi3.generate(model, [[65, 66]], max_new_tokens=10)
    with pytest.raises(ResourceError, match="KV cache"):
        minphi3.generate(model, [[65, 66], [67, 68]], max_new_tokens=4)  # two rows: 1536 bytes


def test_cli_checks_sampling_flags_before_loading(tmp_path):
    """A bad flag is reported at once, not after loading gigabytes of weights."""
    folder = bad.write_model(tmp_path / "model", weights=b"garbage")
    result = run_cli(["generate", "--model", str(folder), "hi", "--top-p", "2"], cwd=tmp_path)
    assert result.returncode == 2 and "top_p" in result.stderr and "model.safetensors" not in result.stderr
    result = run_cli(["generate", "--model", str(folder), "hi", "--max-new-tokens", "0"], cwd=tmp_path)
    assert result.returncode == 2 and "max_new_tokens" in result.stderr


def forbid_reading_weights(monkeypatch) -> None:
    """Make any read of a weight file (safetensors headers or tensors, GGUF tensors) fail loudly."""
    from minphi3 import gguf as mgguf

    def must_not_run(*args, **kwargs):
        raise AssertionError("weights were read before the checks that need none")

    monkeypatch.setattr(minphi3.loading, "read_all_headers", must_not_run)
    monkeypatch.setattr(minphi3.loading, "read_parameters", must_not_run)
    monkeypatch.setattr(mgguf, "read_gguf_checkpoint", must_not_run)


def run_cli_in_process(arguments, capsys) -> tuple[int, list[str]]:
    """cli.main(arguments) in this process (so that monkeypatches apply): (exit status, stderr lines)."""
    capsys.readouterr()
    status = cli.main(list(arguments))
    return status, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("command", ["generate", "chat --prompt", "chat"])
def test_cli_checks_weights_plus_kv_cache_before_reading_weights(tmp_path, monkeypatch, capsys, command):
    """Weights that fit and a KV cache that fits alone, but not both: refused before any weight is
    read, with the cache named. A context of 4096 positions lets the cache be the limit."""
    config = dict(bad.TINY_CONFIG, max_position_embeddings=4096)
    folder = str(bad.write_model(tmp_path / "model", config=config))
    parsed = config_from_dict(config)
    tokens = 512  # 128 bytes a token: 64 KiB of cache, beside about 100 KiB of weights
    room = weights_nbytes(parsed, np.float32) + cache_nbytes(parsed, 1, tokens) - 1
    monkeypatch.setattr(minphi3.loading, "available_memory", lambda xp: (room, "this machine has"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))  # chat without --prompt reads its turns
    tokenizer = minphi3.load_tokenizer(folder)
    words = command.split()
    if command == "generate":
        prompt, prompt_tokens = ["hi"], len(tokenizer.encode("hi"))
    elif command == "chat --prompt":
        prompt = ["--prompt", "hi"]
        prompt_tokens = len(tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True))
    else:
        prompt, prompt_tokens = [], 0  # the turns come later: the budget alone is checked

    def arguments(max_new_tokens: int) -> list[str]:
        return [words[0], "--model", folder, *prompt, "--max-new-tokens", str(max_new_tokens)]

    status, lines = run_cli_in_process(arguments(tokens - prompt_tokens - 1), capsys)  # one token less fits
    assert status == 0, lines
    forbid_reading_weights(monkeypatch)
    status, lines = run_cli_in_process(arguments(tokens - prompt_tokens), capsys)
    assert status == 2, lines
    assert len(lines) == 1 and lines[0].startswith("minphi3: error: the model needs"), lines
    assert f"KV cache for {tokens} tokens" in lines[0] and "fewer new tokens" in lines[0], lines[0]


def test_cli_checks_a_kv_cache_beyond_memory_before_reading_weights(tmp_path, monkeypatch, capsys):
    config = dict(bad.TINY_CONFIG, max_position_embeddings=2**41)
    folder = str(bad.write_model(tmp_path / "model", config=config))
    forbid_reading_weights(monkeypatch)
    status, lines = run_cli_in_process(["generate", "--model", folder, "hi", "--max-new-tokens", str(2**40)], capsys)
    assert status == 2 and len(lines) == 1, lines
    assert "KV cache for 1 x 1099511627777 tokens needs 128.0 TiB" in lines[0], lines[0]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["generate", "{folder}", "x" * 100, "--max-new-tokens", "1"], "context of 64 tokens"),
        (["generate", "{folder}", "hi", "--max-new-tokens", "64"], "context of 64 tokens"),
        (["generate", "{folder}", "hi", "--chat-template", "--max-new-tokens", "60"], "context of 64 tokens"),
        (["chat", "{folder}", "--prompt", "x" * 100], "context of 64 tokens"),
        (["generate", "{folder}", ""], "the prompt is empty"),
    ],
    ids=["long_prompt", "long_answer", "chat_template", "chat_prompt", "empty_prompt"],
)
def test_cli_checks_the_prompt_before_reading_weights(tmp_path, monkeypatch, capsys, arguments, message):
    folder = str(bad.write_model(tmp_path / "model"))
    forbid_reading_weights(monkeypatch)
    command, _, *rest = arguments
    status, lines = run_cli_in_process([command, "--model", folder, *rest], capsys)
    assert status == 2 and len(lines) == 1, lines
    assert message in lines[0], lines[0]


def test_cli_checks_the_prompt_of_a_gguf_file_before_reading_weights(tmp_path, monkeypatch, capsys):
    path = str(bad.write_gguf(tmp_path / "tiny.gguf"))
    status, lines = run_cli_in_process(["generate", "--model", path, "hi", "--max-new-tokens", "2"], capsys)
    assert status == 0, lines
    forbid_reading_weights(monkeypatch)
    status, lines = run_cli_in_process(["generate", "--model", path, "hi", "--max-new-tokens", "64"], capsys)
    assert status == 2 and len(lines) == 1 and "context of 64 tokens" in lines[0], lines


def test_cli_refuses_a_model_beyond_its_address_space_limit(tmp_path):
    """6 GiB of weights fit this machine but not a process capped at CLI_MEMORY_LIMIT (`ulimit -v`):
    refused before the (garbage) weights file is opened, instead of a MemoryError halfway."""
    config = dict(bad.TINY_CONFIG, vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=8,
                  num_attention_heads=32, num_key_value_heads=32)  # fmt: skip
    folder = bad.write_model(tmp_path / "model", config=config, weights=b"garbage", tokenizer=False)
    result = run_cli(bad.load_args(folder), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "GiB" in result.stderr and "this process's memory limit leaves" in result.stderr, result.stderr
    assert "model.safetensors" not in result.stderr


def test_address_space_limit_lowers_available_memory(monkeypatch):
    from minphi3 import backend

    assert backend._address_space_room() is None or backend._address_space_room() >= 0
    mapped = backend._proc_field("/proc/self/status", "VmSize:")
    monkeypatch.setattr(resource, "getrlimit", lambda which: (mapped + 2**30, resource.RLIM_INFINITY))
    room = backend._address_space_room()
    assert 0 < room <= 2**30 + 2**20  # what is left of the limit (the process grew a little since)
    assert backend.available_memory(np) == (room, "this process's memory limit leaves")


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_cgroup_limit_lowers_available_memory(tmp_path, version):
    from minphi3.backend import _cgroup_room

    own = tmp_path / "self_cgroup"
    if version == "v2":
        own.write_text("0::/box/job\n")
        job, box = tmp_path / "box" / "job", tmp_path / "box"
        job.mkdir(parents=True)
        (job / "memory.max").write_text("max\n")  # no limit of its own...
        (job / "memory.current").write_text("100\n")
        (box / "memory.max").write_text(f"{8 * 2**30}\n")  # ...but its parent has one
        (box / "memory.current").write_text(f"{3 * 2**30}\n")
        (box / "memory.stat").write_text(f"anon 1\ninactive_file {2**30}\n")
    else:
        own.write_text("4:memory:/box\n3:cpu,cpuacct:/box\n")
        box = tmp_path / "memory" / "box"
        box.mkdir(parents=True)
        (box / "memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")
        (box / "memory.usage_in_bytes").write_text(f"{3 * 2**30}\n")
        (box / "memory.stat").write_text(f"hierarchical_memory_limit {8 * 2**30}\ntotal_inactive_file {2**30}\n")
    # 8 GiB limit - (3 GiB used - 1 GiB of reclaimable page cache) = 6 GiB
    assert _cgroup_room(str(tmp_path), str(own)) == 6 * 2**30
    (tmp_path / "empty").write_text("")
    assert _cgroup_room(str(tmp_path), str(tmp_path / "empty")) is None
    assert _cgroup_room(str(tmp_path), str(tmp_path / "absent")) is None
