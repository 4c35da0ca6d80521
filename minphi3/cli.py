"""The command line: `python -m minphi3 {generate, chat, parity, convert} ...`.

Errors a user can act on (a wrong path, a bad flag, an over-long prompt, a broken checkpoint) are
printed as one line on stderr with exit status 2; anything unexpected exits with status 1 and a
hint to report it. `--debug`, before or after the command, shows the traceback instead.

`generate` and `chat` refuse what cannot run before reading any weight: the flags, then the
config (do the weights fit in memory?), the tokenizer and the prompt's ids (does the prompt plus
max_new_tokens fit the context?), then the weights plus the KV cache together. Only then are the
weights read, which for a large model takes a while.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import GenerationError, MinPhi3Error, ResourceError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a tool killed by the signal would return


class UsageError(MinPhi3Error):
    """A command line that cannot be run as written."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr, not a usage screen."""

    def error(self, message):
        raise UsageError(f"{message} (see `python -m minphi3 {self.prog.split()[-1]} --help`)"
                         if " " in self.prog else f"{message} (see `python -m minphi3 --help`)")


def build_parser() -> argparse.ArgumentParser:
    # Every parser shares --debug, so that it works before or after the command. It has no default
    # (args.debug exists only when given): the command's parser runs after the top-level one, and a
    # default there would reset a --debug given before the command.
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    parser = _Parser(prog="minphi3", description="Phi-3 family language models in NumPy.", parents=[shared])
    commands = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:  # noqa: A002 - argparse's name
        return commands.add_parser(name, help=help, parents=[shared])

    generate = command("generate", "continue a prompt, streaming the text")
    _model_flags(generate)
    _sampling_flags(generate)
    generate.add_argument("prompt", help="the text to continue")
    generate.add_argument("--chat-template", action="store_true", help="wrap the prompt as one user turn of the chat template")

    chat = command("chat", "chat with a model through its chat template")
    _model_flags(chat)
    _sampling_flags(chat, default_max_new_tokens=256)
    chat.add_argument("--prompt", help="answer this one message and exit (for scripts)")
    chat.add_argument("--system", help="a system message for the conversation")

    parity = command("parity", "compare every stage with transformers")
    parity.add_argument("path", help="checkpoint folder")
    parity.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parity.add_argument("--lift", action="store_true",
                        help="with --dtype float64: run transformers' float32 steps (RMSNorm statistics, softmax, "
                             "rope tables) in float64 too, the golden comparison (differences ~1e-14)")
    parity.add_argument("--save", metavar="TRACE.npz",
                        help="write every intermediate array to this file (names and shapes: the docstring of "
                             "minphi3/parity.py, `python -c 'import minphi3.parity; help(minphi3.parity)'`)")
    parity.add_argument("--length", type=int, default=16, help="tokens in the probe input (default 16)")
    parity.add_argument("--seed", type=int, default=0, help="seed of the probe input")

    convert = command("convert", "convert a GGUF file to a Hugging Face folder")
    convert.add_argument("input", help="the .gguf file")
    convert.add_argument("output", help="the folder to write")
    convert.add_argument("--force", action="store_true", help="write into a non-empty output folder: replace the checkpoint's files there, and remove "
                         "the ones that would shadow them (a sharded index and its shards, template files)")
    return parser


def _model_flags(parser):
    parser.add_argument("--model", help="checkpoint folder, .gguf file or hub id (default: the demo model, fetched once)")
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16"])


def _sampling_flags(parser, default_max_new_tokens: int = 64):
    parser.add_argument("--max-new-tokens", type=int, default=default_max_new_tokens)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=None, help="implies --do-sample (0 means greedy)")
    parser.add_argument("--top-k", type=int, default=None, help="implies --do-sample")
    parser.add_argument("--top-p", type=float, default=None, help="implies --do-sample")
    parser.add_argument("--min-p", type=float, default=None, help="implies --do-sample")
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--min-new-tokens", type=int, default=None, help="no end of turn before this many new tokens")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (runs repeat exactly)")


def _sampling_options(args) -> dict:
    """generate's sampling arguments from the flags. A flag not given is None, so the checkpoint's
    generation_config.json decides it, as in transformers (greedy when it says nothing)."""
    chosen = [args.temperature, args.top_k, args.top_p, args.min_p]
    sample_flags = args.do_sample or any(value is not None for value in chosen)
    return dict(
        do_sample=True if sample_flags else None,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        min_new_tokens=args.min_new_tokens,
        seed=args.seed,
    )


def _check_generation_flags(args) -> None:
    """Refuse impossible generation flags before loading anything (a large model loads for a while)."""
    from .sampling import check_seed, validate_sampling_parameters  # noqa: PLC0415

    check_seed(args.seed)
    if args.max_new_tokens <= 0:
        raise GenerationError(f"max_new_tokens must be a positive integer, found {args.max_new_tokens}")
    if args.min_new_tokens is not None and args.min_new_tokens < 0:
        raise GenerationError(f"min_new_tokens must be a non-negative integer, found {args.min_new_tokens}")
    options = _sampling_options(args)
    validate_sampling_parameters(
        options["temperature"], options["top_k"], options["top_p"], options["min_p"], options["repetition_penalty"]
    )


def _open_checkpoint(args):
    """Everything about --model that reads no weight. -> (path, config, tokenizer)

    In this order: the flags, the path (the demo model when none is given), the config, the
    memory the weights alone need, and the tokenizer (a Rust panic inside it stays off stderr).
    """
    from .backend import get_array_module, resolve_dtype  # noqa: PLC0415
    from .loading import check_memory, read_model_config, resolve_model_path  # noqa: PLC0415
    from .tokenizer import load_tokenizer, panic_output_hidden  # noqa: PLC0415

    _check_generation_flags(args)
    xp, dtype = get_array_module(args.backend), resolve_dtype(args.dtype)
    path = args.model
    if path is None:
        from .demo import DEMO_MODEL_NOTE, demo_model_path  # noqa: PLC0415

        print(DEMO_MODEL_NOTE, file=sys.stderr, flush=True)  # stderr, like the figures: stdout is the answer
        path = demo_model_path()
    path = resolve_model_path(path)
    if not path.exists():
        raise UsageError(f"--model {path}: no such file or folder")
    config = read_model_config(path)
    check_memory(config, dtype, xp)
    with panic_output_hidden():
        tokenizer = load_tokenizer(path)
    return path, config, tokenizer


def _load_weights(args, path: Path, config, tokenizer, tokens: int):
    """The model, once its weights plus a KV cache of `tokens` tokens (one row) are known to fit."""
    from .backend import get_array_module, resolve_dtype  # noqa: PLC0415
    from .cache import cache_nbytes  # noqa: PLC0415
    from .loading import check_cache_memory, check_memory, load  # noqa: PLC0415

    xp, dtype = get_array_module(args.backend), resolve_dtype(args.dtype)
    check_cache_memory(config, 1, tokens, dtype, xp)  # the cache alone: its message says to ask for fewer tokens
    try:
        check_memory(config, dtype, xp, extra_bytes=cache_nbytes(config, 1, tokens, dtype))
    except ResourceError as exc:
        raise ResourceError(f"{exc}, or ask for fewer new tokens (this counts the KV cache for {tokens} tokens "
                            "on top of the weights)") from None
    model = load(path, backend=args.backend, dtype=args.dtype, progress=sys.stderr.isatty())
    if model.tokenizer_size is None:
        model.tokenizer_size = tokenizer.id_bound
    return model


def run_generate(args) -> int:
    from .generate import TextStreamer, check_length, generate  # noqa: PLC0415
    from .model import check_token_ids  # noqa: PLC0415

    path, config, tokenizer = _open_checkpoint(args)
    if args.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True)
    else:
        ids = tokenizer.encode(args.prompt)
    if not ids:
        raise GenerationError("the prompt is empty after tokenization: give at least one token of text")
    check_token_ids([ids], config.vocab_size)
    check_length(config, len(ids), args.max_new_tokens)
    model = _load_weights(args, path, config, tokenizer, len(ids) + args.max_new_tokens)
    stop_ids = tokenizer.stop_token_ids(model.generation_config)
    streamer = TextStreamer(tokenizer, stop_ids=stop_ids, prompt_ids=() if args.chat_template else ids)
    if not args.chat_template:
        print(args.prompt, end="", flush=True)
    generate(model, [ids], max_new_tokens=args.max_new_tokens, eos_token_id=stop_ids, streamer=streamer,
             **_sampling_options(args))
    print(flush=True)
    return 0


def _first_turn_tokens(args, config, tokenizer) -> int:
    """Tokens the KV cache of a chat's first turn holds, as `ChatSession.ask` sizes it: the prompt
    plus max_new_tokens, clipped to the context. Without --prompt the turns come later, so the
    budget alone (clipped to the context) is checked. A --prompt that fills the context is refused."""
    from .model import check_token_ids  # noqa: PLC0415

    context = config.max_position_embeddings
    if args.prompt is None:
        return min(args.max_new_tokens, context)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    ids = tokenizer.apply_chat_template(messages + [{"role": "user", "content": args.prompt}],
                                        add_generation_prompt=True, tokenize=True)
    check_token_ids([ids], config.vocab_size)
    if len(ids) >= context:
        raise GenerationError(f"the prompt ({len(ids)} tokens with the chat template) fills the model's context of "
                              f"{context} tokens (max_position_embeddings); shorten it")
    return len(ids) + min(args.max_new_tokens, context - len(ids))


def run_chat(args) -> int:
    from .chat import ChatSession  # noqa: PLC0415

    path, config, tokenizer = _open_checkpoint(args)
    model = _load_weights(args, path, config, tokenizer, _first_turn_tokens(args, config, tokenizer))
    session = ChatSession(model, tokenizer, system_prompt=args.system, max_new_tokens=args.max_new_tokens,
                          **_sampling_options(args))

    def answer(text: str) -> None:
        _, stats = session.ask(text, on_text=lambda piece: print(piece, end="", flush=True))
        print(flush=True)
        print(f"[{stats.prompt_tokens} prompt tokens ({session.last_reused_tokens} reused from the cache), "
              f"{stats.new_tokens} new tokens, {stats.tokens_per_second:.1f} tokens/s]", file=sys.stderr, flush=True)

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message; /reset starts over, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            text = input("> " if interactive else "").removesuffix("\r")  # a CRLF file piped in
        except EOFError:
            return 0
        command = text.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            session.reset()
            continue
        if not command:
            continue
        try:
            answer(text)
        except MinPhi3Error as exc:
            # One bad turn (too long, say) should not end the conversation in a terminal.
            if not interactive:
                raise
            print(f"minphi3: error: {one_line(exc)}", file=sys.stderr)


def run_parity(args) -> int:
    from .loading import load  # noqa: PLC0415
    from .parity import (  # noqa: PLC0415
        STAGE_NAME,
        difference_rows,
        format_table,
        minphi3_trace,
        probe_ids,
        save_trace,
        transformers_trace,
    )

    path = Path(args.path)
    if not path.exists():
        raise UsageError(f"{path}: no such folder")
    if not path.is_dir():
        raise UsageError(f"{path}: expected a Hugging Face checkpoint folder (for a .gguf file, `convert` it first)")
    if args.length <= 0:
        raise UsageError("--length must be positive")
    if args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, found {args.seed}")
    if args.lift and args.dtype != "float64":
        raise UsageError("--lift compares float64 runs: give --dtype float64")
    if args.save is not None and not args.save.strip():
        raise UsageError("--save needs a file name (TRACE.npz)")
    if args.save:
        _check_writable_output(Path(args.save))  # before the comparison, which takes a while
    model = load(path, dtype=args.dtype)
    ids = probe_ids(model.config.vocab_size, min(args.length, model.config.max_position_embeddings), args.seed)
    ours = minphi3_trace(model, ids)
    try:
        import transformers  # noqa: PLC0415
    except ImportError:
        print("transformers is not installed: showing minphi3's trace only.")
        theirs = None
    else:
        transformers.logging.disable_progress_bar()  # its "Loading weights" bar would fill stderr
        try:
            theirs = transformers_trace(path, ids, args.dtype, lift=args.lift)
        except Exception as exc:  # transformers refuses some valid configs (the 2024 "su" spelling)
            print(f"transformers could not run this checkpoint ({type(exc).__name__}: {str(exc)[:200]})")
            theirs = None
    oracle = "transformers with its float32 steps lifted" if args.lift else "transformers as shipped"
    against = f"; against {oracle}" if theirs is not None else ""
    print(f"{path} ({model.config.architectures[0]}, {args.dtype}, {ids.shape[1]} tokens{against})")
    if theirs is not None:
        print(format_table(difference_rows(ours, theirs)))
    else:
        for name, value in ours.items():
            if STAGE_NAME.fullmatch(name):  # the stages; --save writes every intermediate as well
                print(f"{name:<14} shape {list(value.shape)}  max |x| {abs(value).max():.4e}")
    if args.save:
        try:
            save_trace(args.save, ours, theirs)
        except OSError as exc:
            raise UsageError(f"--save {args.save}: cannot write it ({exc.strerror or exc})") from None
        print(f"wrote {args.save}")
    return 0


def _check_writable_output(target: Path) -> None:
    """Refuse an output file whose folder is missing or read-only, or that is a folder."""
    folder = target.parent
    if target.is_dir():
        raise UsageError(f"--save {target}: is a folder; expected a file name (trace.npz)")
    if not folder.is_dir():
        raise UsageError(f"--save {target}: no such folder {folder}")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--save {target}: folder {folder} is not writable")


def run_convert(args) -> int:
    from .convert import convert_gguf  # noqa: PLC0415

    source = Path(args.input)
    if source.is_dir():
        raise UsageError(f"{source}: a folder; convert reads a .gguf file (a Hugging Face folder loads as it is)")
    if not source.is_file():
        raise UsageError(f"{source}: no such file")
    out = convert_gguf(source, args.output, progress=sys.stderr.isatty(), overwrite=args.force)
    print(f"wrote {out}")
    return 0


def one_line(exc: BaseException) -> str:
    """An error message folded onto one line (library messages can span several)."""
    return " ".join(str(exc).split())


COMMANDS = {"generate": run_generate, "chat": run_chat, "parity": run_parity, "convert": run_convert}


def _open_closed_streams() -> None:
    """Started with stdin or stderr closed (`<&-`, `2>&-`), Python sets them to None, and print
    would then write errors to stdout: read nothing from, and write nothing to, a closed stream."""
    if sys.stdin is None:
        sys.stdin = open(os.devnull)  # noqa: SIM115 (lives as long as the process)
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # until the command line is parsed: a bad one is reported with it too
    _open_closed_streams()
    if sys.stdout is None:  # `>&-`: print would drop the answer silently and the run would look fine
        print("minphi3: standard output is closed: there is nowhere to write the output", file=sys.stderr)
        return 2
    try:
        args = build_parser().parse_args(argv)
        debug = getattr(args, "debug", False)
        if args.command is None:
            raise UsageError("missing command: one of generate, chat, parity, convert (see `python -m minphi3 --help`)")
        return COMMANDS[args.command](args)
    except MinPhi3Error as exc:
        if debug:
            raise
        print(f"minphi3: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as Unix tools do, and keep Python's
        # final flush of stdout from raising again (the recipe of Python's signal docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:  # the system refused: a path denied or too long, a full disk, ...
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"minphi3: error: {where}{exc.strerror or one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:
        if debug:
            raise
        print(f"minphi3: internal error: {type(exc).__name__}: {one_line(exc)} "
              "(this is a bug: please report it; --debug shows the traceback)", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
