"""Text in, token ids out, and back: the tokenizer, the chat template and streaming detokenization.

What this module does, and why each part exists:

- `load_tokenizer(path)` reads a Hugging Face folder (`tokenizer.json`, plus the optional
  `tokenizer_config.json`, `special_tokens_map.json`, `chat_template.jinja`, `config.json` and
  `generation_config.json`) or hands a `.gguf` file to `minphi3.gguf`. The heavy lifting (BPE,
  byte fallback, added tokens) is done by the Rust `tokenizers` library, so that the ids are the ones
  the model was trained with. Every call into that library is guarded: it raises Rust panics as
  `BaseException` subclasses, which minphi3 turns into `TokenizerError`; `panic_output_hidden`
  keeps the message the panic prints below Python off stderr (the CLI uses it).
- `Tokenizer` reproduces what transformers 5.23's `AutoTokenizer` does on top of `tokenizer.json`:
  which special tokens exist, the BOS rule (the post-processor of `tokenizer.json` decides;
  `add_bos_token` in `tokenizer_config.json` is ignored, as transformers ignores it when a
  `tokenizer.json` is present), and, for a few tokenizer classes, the pipeline that transformers
  rebuilds instead of reading the file (see `_rebuild_like_transformers`).
- `Tokenizer.apply_chat_template` renders the checkpoint's own Jinja template in the same sandbox,
  with the same options and globals as transformers, so the prompt string and its ids are equal.
- `Tokenizer.stop_token_ids` is the union of every end-of-turn id: a model that
  ends its turn with `<|end|>` must stop there even when the config names only `<|endoftext|>`.
- `IncrementalDetokenizer` turns ids into text one token at a time for streaming without splitting
  a UTF-8 character (byte-fallback tokens such as `<0xE2>`) and without losing the leading space of
  SentencePiece-style tokens.

What it does not do: slow (Python) tokenizers, `tokenizer.model` SentencePiece files without a
`tokenizer.json`, batched chat rendering, `continue_final_message` and the other options of
`RENDERING_OPTIONS` and `TOKENIZING_OPTIONS` (refused when set), and tools given as Python
functions (refused: pass their JSON schemas).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.compiler
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, pre_tokenizers

from .errors import TokenizerError

# The named special tokens of transformers (`SPECIAL_TOKENS_ATTRIBUTES`), in its order.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Tokens that end a turn in the chat formats minphi3 knows, looked up by string (never by id:
# Phi-3, Phi-4-mini and ChatML models put them at different ids).
END_OF_TURN_TOKENS = ("<|end|>", "<|endoftext|>", "<|im_end|>")

# The fields of a serialized `AddedToken` that its constructor accepts.
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


# ------------------------------------------------------------------------------------------------
# Guarded calls into the tokenizers library, and reading files
# ------------------------------------------------------------------------------------------------


def _guarded(source, what, fn, *args, **kwargs):
    """Call `fn` and turn any failure of the Rust library into a TokenizerError.

    tokenizers raises Rust panics as `pyo3_runtime.PanicException`, a `BaseException` subclass that
    `except Exception` does not catch, so we catch `BaseException` and only let the two exceptions
    through that must stop the program (Ctrl-C and `sys.exit`).
    """
    try:
        return fn(*args, **kwargs)
    except (KeyboardInterrupt, SystemExit):
        raise
    except TokenizerError:
        raise
    except BaseException as exc:  # noqa: BLE001 - Rust panics are BaseExceptions
        where = f"{source}: " if source else ""
        raise TokenizerError(f"{where}{what} failed in the tokenizers library: {type(exc).__name__}: {exc}") from None


@contextlib.contextmanager
def panic_output_hidden():
    """Keep what a Rust panic prints off stderr while the block runs (the CLI's one-line promise).

    `_guarded` catches a panic, but the panic hook of the Rust runtime has already written
    "thread '<unnamed>' panicked at ...", and a backtrace under RUST_BACKTRACE=1, to file
    descriptor 2, below Python: replacing `sys.stderr` cannot catch it, only pointing the
    descriptor elsewhere can. Inside the block fd 2 writes to a temporary file (not a pipe, whose
    writer would block once it is full). On the way out fd 2 is restored; what was captured is
    dropped when the block raised a TokenizerError (whose message already holds the panic's) and
    written back to stderr otherwise, so warnings are not lost. Where fd 2 cannot be duplicated
    (closed, say) the block runs unchanged.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    failed = False
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except TokenizerError:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = b"" if failed else captured.read()
            while kept:
                kept = kept[os.write(2, kept) :]


def _read_text(path: Path) -> str:
    """Read a UTF-8 text file, with a TokenizerError naming it on failure."""
    try:
        if path.exists() and not path.is_file():  # a FIFO would block the read until written to
            raise TokenizerError(f"{path}: not a regular file (a FIFO, socket, device or folder); expected a text file")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read the file: {exc}") from None


def _read_json_text(path: Path, required: bool):
    """Return (text, parsed) of one JSON file, or (None, None) when an optional file is absent."""
    if not path.is_file():
        if required:
            raise TokenizerError(f"{path}: file not found (a Hugging Face tokenizer folder must hold it)")
        return None, None
    text = _read_text(path)
    try:
        return text, json.loads(text)
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # nested too deep, or a number of 5000 digits
        raise TokenizerError(f"{path}: not valid JSON ({exc})") from None


def _read_json_object(path: Path, required: bool = False) -> dict | None:
    """Parse a JSON file that must hold an object (a dict); None when an optional file is absent."""
    return _read_json_object_text(path, required)[1]


def _read_json_object_text(path: Path, required: bool = False):
    """(text, dict) of a JSON file that must hold an object."""
    text, data = _read_json_text(path, required)
    if data is not None and not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return text, data


# ------------------------------------------------------------------------------------------------
# Loading a folder
# ------------------------------------------------------------------------------------------------


def load_tokenizer(path) -> Tokenizer:
    """Load the tokenizer of a Hugging Face model folder, or of a `.gguf` file.

    path: a folder holding `tokenizer.json` (a path to that file also works), or a `.gguf` file.
    Raises TokenizerError naming the file and the problem when something is missing or malformed.
    """
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        from .gguf import load_gguf_tokenizer  # noqa: PLC0415 - the GGUF reader is an optional path

        return load_gguf_tokenizer(path)
    if p.is_file() and p.suffix == ".json":
        p = p.parent
    return Tokenizer.from_folder(p)


def _read_chat_templates(folder: Path, config: dict):
    """The chat template(s) as transformers finds them: `chat_template.jinja` and
    `additional_chat_templates/*.jinja` (transformers' CHAT_TEMPLATE_DIR) take priority over
    `tokenizer_config.json`'s `chat_template` entry.

    Returns a str, a {name: template} dict, or None.
    """
    templates = {}
    single = folder / "chat_template.jinja"
    if single.is_file():
        templates["default"] = _read_text(single)
    extra_dir = folder / "additional_chat_templates"
    if extra_dir.is_dir():
        for file in sorted(extra_dir.glob("*.jinja")):
            templates[file.name.removesuffix(".jinja")] = _read_text(file)
    if list(templates) == ["default"]:
        return templates["default"]
    if templates:
        return templates
    return config.get("chat_template")


def _merge_special_tokens_map(config: dict, special_map: dict | None) -> dict:
    """Apply `special_tokens_map.json` the way transformers does: only for configs without an
    `added_tokens_decoder` (older checkpoints), and then its values win over the config's."""
    if not special_map or "added_tokens_decoder" in config:
        return config
    merged = dict(config)
    for key, value in special_map.items():
        if key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
            existing = list(merged.get("extra_special_tokens") or merged.get("additional_special_tokens") or [])
            merged["extra_special_tokens"] = existing + [v for v in value if v not in existing]
        else:
            merged[key] = value
    return merged


def _from_folder(folder, cls) -> Tokenizer:
    """Read every tokenizer file of a folder and build a `cls` (see `Tokenizer.from_folder`)."""
    folder = Path(folder)
    if not folder.exists():
        raise TokenizerError(f"{folder}: no such folder (expected a Hugging Face model folder holding tokenizer.json)")
    if not folder.is_dir():
        raise TokenizerError(f"{folder}: not a folder (expected a folder holding tokenizer.json, or a .gguf file)")
    tokenizer_file = folder / "tokenizer.json"
    spec_text, spec = _read_json_object_text(tokenizer_file, required=True)
    config = _read_json_object(folder / "tokenizer_config.json") or {}
    config = _merge_special_tokens_map(config, _read_json_object(folder / "special_tokens_map.json"))
    config["chat_template"] = _read_chat_templates(folder, config)
    model_config = _read_json_object(folder / "config.json") or {}
    generation_config = _read_json_object(folder / "generation_config.json") or {}

    class_name = transformers_tokenizer_class(config, model_config, spec_text)
    for name, token in CLASS_DEFAULT_TOKENS.get(class_name, {}).items():
        config.setdefault(name, token)  # the class's __init__ defaults; an explicit null stays null
    if class_name in _REBUILT_CLASSES and isinstance(spec.get("model"), dict) and spec["model"].get("type") == "BPE":
        spec = _rebuild_like_transformers(spec, class_name, config)
        spec_text = json.dumps(spec)
    check_bpe_merges(spec.get("model"), tokenizer_file)
    backend = _guarded(str(tokenizer_file), "loading tokenizer.json", tokenizers.Tokenizer.from_str, spec_text)
    return cls(
        backend,
        config,
        source=str(folder),
        generation_config=generation_config,
        model_eos_token_id=model_config.get("eos_token_id"),
    )


def check_bpe_merges(model, source) -> None:
    """Refuse a BPE merge rule the tokenizers library would panic on, before handing it the file.

    model: the "model" object of tokenizer.json (or the same fields rebuilt from GGUF). Each merge (a, b) must name two vocabulary tokens
    whose concatenation a + b (b without `continuing_subword_prefix`) is a vocabulary token too.
    The library checks the same, but only after copying the concatenation into a buffer sized for
    the longest vocabulary token: a crafted merge such as ("hi", "hi") over the vocabulary
    {h, i, hi} overruns it and the Rust code panics (tokenizers#2094), printing a backtrace on
    stderr, instead of returning an error. Malformed entries are left to the library to report.
    """
    if not isinstance(model, dict) or model.get("type") != "BPE":
        return
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        return
    prefix = model.get("continuing_subword_prefix") or ""
    for number, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(part, str) for part in pair):
            continue
        left, right = pair
        for part in pair:
            if part not in vocab:
                raise TokenizerError(f"{source}: merge {number} ({left!r}, {right!r}) names {part!r}, which is not in the vocabulary")
        if prefix and not right.startswith(prefix):
            raise TokenizerError(
                f"{source}: merge {number} ({left!r}, {right!r}): {right!r} lacks the continuing_subword_prefix {prefix!r}"
            )
        merged = left + right[len(prefix):]
        if merged not in vocab:
            raise TokenizerError(f"{source}: merge {number} ({left!r}, {right!r}) makes {merged!r}, which is not in the vocabulary")


# ------------------------------------------------------------------------------------------------
# transformers 5.23's choice of tokenizer class
# ------------------------------------------------------------------------------------------------

# Model types for which transformers ignores the tokenizer class named on the Hub and reads
# tokenizer.json as it is (the Phi entries of `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`).
_FILE_AS_IS_MODEL_TYPES = frozenset({"phi3", "phi3_v", "phimoe"})

# The class transformers picks for a model type when neither tokenizer_config.json nor config.json
# names one (the types minphi3 meets; "llama" and the rest get tokenizer.json as it is).
_REGISTERED_CLASSES = {"phi": "GPT2Tokenizer", "gpt2": "GPT2Tokenizer", "codegen": "GPT2Tokenizer"}

# Classes whose `__init__` rebuilds the pipeline from the vocabulary instead of reading tokenizer.json.
_REBUILT_CLASSES = frozenset({"LlamaTokenizer", "GPT2Tokenizer", "CodeGenTokenizer"})

# The special tokens those classes' `__init__` name when tokenizer_config.json does not.
_GPT2_DEFAULTS = {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
CLASS_DEFAULT_TOKENS = {
    "LlamaTokenizer": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    "GPT2Tokenizer": _GPT2_DEFAULTS,
    "CodeGenTokenizer": _GPT2_DEFAULTS,
}


def transformers_tokenizer_class(config: dict, model_config: dict, spec_text: str) -> str:
    """Name the class transformers 5.23's AutoTokenizer would load (`"TokenizersBackend"` = the file as is).

    config: tokenizer_config.json; model_config: config.json; spec_text: tokenizer.json's text.
    A Phi-3 checkpoint (model_type "phi3") always gets tokenizer.json as it is, whatever its
    tokenizer_config says. A folder without config.json that names `LlamaTokenizer` gets the class,
    and the class rebuilds a different pipeline (see `_rebuild_like_transformers`).
    """
    model_type = _str_or_none(model_config.get("model_type"))
    declared = _str_or_none(config.get("tokenizer_class")) or _str_or_none(model_config.get("tokenizer_class"))
    declared = declared.removesuffix("Fast") if declared else None
    if model_type in _FILE_AS_IS_MODEL_TYPES:
        return "TokenizersBackend"
    if declared == "LlamaTokenizer" and '"ByteLevel"' in spec_text:
        return "TokenizersBackend"  # transformers' guard against byte-level files mislabelled as Llama
    chosen = declared or _REGISTERED_CLASSES.get(model_type)
    return chosen if chosen in _REBUILT_CLASSES else "TokenizersBackend"


def _str_or_none(value) -> str | None:
    """A config value that must be a string; anything else counts as absent."""
    return value if isinstance(value, str) else None


def _rebuild_like_transformers(spec: dict, class_name: str, config: dict) -> dict:
    """Return tokenizer.json as transformers' `class_name.__init__` rebuilds it.

    These classes keep only the vocabulary, the merges, the post-processor and the added tokens of
    the file, and install their own BPE options, normalizer, pre-tokenizer and decoder:
    - LlamaTokenizer: no normalizer, a Metaspace pre-tokenizer whose prepend scheme is "first"
      (or "always" for `legacy: true`, "never" for `add_prefix_space: false`), and a decoder that
      strips one leading space. This differs from Phi-3's own file (Prepend + Replace normalizer),
      for example after a special token: "<|user|>Hi" gets no "▁" before "Hi".
    - GPT2Tokenizer and CodeGenTokenizer: a plain ByteLevel pre-tokenizer and decoder.
    """
    rebuilt = dict(spec)
    model = dict(spec["model"])
    model.update(dropout=None, unk_token=None, ignore_merges=False)
    if class_name == "LlamaTokenizer":
        model.update(fuse_unk=True, byte_fallback=True, continuing_subword_prefix=None, end_of_word_suffix=None)
    else:
        model.update(fuse_unk=False, byte_fallback=False, continuing_subword_prefix="", end_of_word_suffix="")
    rebuilt["model"] = model
    rebuilt["normalizer"] = None
    if "added_tokens_decoder" in config:
        rebuilt["added_tokens"] = []  # transformers then adds only the config's added tokens
    pre_tokenizer, decoder = _rebuilt_pipeline(class_name, config)
    rebuilt["pre_tokenizer"] = json.loads(pre_tokenizer.__getstate__())
    rebuilt["decoder"] = json.loads(decoder.__getstate__())
    return rebuilt


def _rebuilt_pipeline(class_name: str, config: dict):
    """The (pre_tokenizer, decoder) pair that transformers' `class_name.__init__` installs."""
    if class_name == "LlamaTokenizer":
        add_prefix_space = config.get("add_prefix_space")
        add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
        if add_prefix_space:
            scheme = "always" if config.get("legacy", False) else "first"
        else:
            scheme = "never"
        pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix_space:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        return pre_tokenizer, decoders.Sequence(steps)
    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space") or False))
    return pre_tokenizer, decoders.ByteLevel()


# ------------------------------------------------------------------------------------------------
# Special tokens, as transformers resolves them
# ------------------------------------------------------------------------------------------------


def _token_content(value):
    """The string of a special-token entry: a str, or a dict with "content" (an AddedToken dump)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_added_token(value, source: str, special: bool | None = None) -> AddedToken | None:
    """Build an AddedToken from a str or an AddedToken dump; a bare string is a special token."""
    content = _token_content(value)
    if content is None:
        return None
    if isinstance(value, str):
        return AddedToken(content, special=True)
    fields = {k: value[k] for k in _ADDED_TOKEN_FIELDS if k in value and k != "content"}
    if special is not None:
        fields["special"] = special
    bad = {k: v for k, v in fields.items() if not isinstance(v, bool)}
    if bad:
        raise TokenizerError(f"{source}: token {content!r}: flags must be true or false, found {bad}")
    return AddedToken(content, **fields)


def named_special_tokens(config: dict) -> dict:
    """{name: value} of the named special tokens, in transformers' order: the seven standard names,
    then model-specific `*_token` keys (such as `image_token`), which transformers also passes to
    the chat template. Values stay as found (str or dict)."""
    named = {name: config[name] for name in SPECIAL_TOKEN_NAMES if _token_content(config.get(name)) is not None}
    for key, value in config.items():
        if key.endswith("_token") and key not in named and key not in SPECIAL_TOKEN_NAMES:
            if isinstance(value, str) or (isinstance(value, dict) and value.get("__type") == "AddedToken"):
                named[key] = value
    return named


def _add_config_tokens(backend, config: dict, named: dict, source: str) -> None:
    """Add the tokens that transformers' TokenizersBackend.__init__ adds on top of tokenizer.json.

    In the same order and in one `add_tokens` call, as transformers does: first every entry of the
    config's `added_tokens_decoder` (sorted by id; its flags, such as rstrip, then replace those of
    tokenizer.json), then each named or extra special token that is not an added token yet (a named
    token inside the model vocabulary becomes an added special token; one outside it gets a new id).
    """
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict) or not all(k.lstrip("-").isdigit() for k in decoder):
        raise TokenizerError(f"{source}: tokenizer_config.json: added_tokens_decoder must map ids to tokens")
    to_add = [_as_added_token(decoder[k], source) for k in sorted(decoder, key=int)]
    to_add = [t for t in to_add if t is not None]
    present = {t.content for t in backend.get_added_tokens_decoder().values()} | {t.content for t in to_add}
    named_contents = {_token_content(v) for v in named.values()}
    for token in to_add:
        if not token.special and token.content in named_contents:
            token.special = True
    extras = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    extras = list(extras.values()) if isinstance(extras, dict) else extras
    extras = extras if isinstance(extras, list) else []
    for value in list(named.values()) + extras:
        token = _as_added_token(value, source, special=True if _token_content(value) in named_contents else None)
        if token is not None and token.content not in present:
            to_add.append(token)
            present.add(token.content)
    if to_add:
        _guarded(source, "adding the special tokens of tokenizer_config.json", backend.add_tokens, to_add)


# ------------------------------------------------------------------------------------------------
# The Tokenizer
# ------------------------------------------------------------------------------------------------


def id_bound(backend) -> int:
    """One past the highest id a `tokenizers.Tokenizer` knows, added tokens included (0 if none).

    Not the number of tokens: a vocabulary may skip ids (tiktoken-derived ones leave unused ids
    below their special tokens), and then the highest ids, the end-of-turn tokens among them,
    lie above the count. `generate` masks the logits from here up.
    """
    vocab = backend.get_vocab(with_added_tokens=True)
    return max(vocab.values()) + 1 if vocab else 0


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what transformers adds: special tokens, chat template, stop ids.

    backend: the Rust tokenizer (it is modified in place: padding and truncation are switched off,
      as transformers' default encode does, and the config's special tokens are added).
    config: the content of tokenizer_config.json, with "chat_template" possibly inlined.
    source: a path used in error messages.
    """

    def __init__(
        self,
        backend,
        config: dict | None = None,
        source: str = "",
        *,
        generation_config: dict | None = None,
        model_eos_token_id=None,
    ):
        if not isinstance(backend, tokenizers.Tokenizer):
            raise TokenizerError(f"{source}: expected a tokenizers.Tokenizer, got {type(backend).__name__}")
        self.source = str(source)
        self.config = dict(config or {})
        self.generation_config = dict(generation_config or {})
        self._model_eos_token_id = model_eos_token_id
        self._backend = backend
        # The pad token falls back to tokenizer.json's padding settings, as in transformers.
        padding = backend.padding
        if padding and _token_content(self.config.get("pad_token")) is None:
            self.config["pad_token"] = padding.get("pad_token")
        backend.no_padding()
        backend.no_truncation()
        backend.encode_special_tokens = bool(self.config.get("split_special_tokens", False))
        self._named = named_special_tokens(self.config)
        _add_config_tokens(backend, self.config, self._named, self.source)
        self.clean_up_tokenization_spaces = bool(self.config.get("clean_up_tokenization_spaces", False))
        # transformers skips the clean-up for BPE, which it corrupts, unless the config insists.
        self._cleans_bpe = bool(self.config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))
        self._is_bpe = type(backend.model).__name__ == "BPE"
        self.chat_template = self.config.get("chat_template") or None

    @classmethod
    def from_folder(cls, path) -> Tokenizer:
        """Load a Hugging Face folder: tokenizer.json (required) and the optional tokenizer_config.json,
        special_tokens_map.json, chat_template.jinja, config.json and generation_config.json."""
        return _from_folder(path, cls)

    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, {len(self)} tokens, eos={self.eos_token!r})"

    # --- vocabulary -------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included (`len(hf_tokenizer)`)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Same as len(): Phi-3 has 32011 tokens for 32064 logits; the extra logits must be masked."""
        return len(self)

    @property
    def id_bound(self) -> int:
        """One past the highest id, added tokens included: the logits at and above it belong to no
        token (`id_bound`). Usually len(self); more when the vocabulary skips ids."""
        return id_bound(self._backend)

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string, or None when it is not in the vocabulary."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of an id, or None when the id is out of range."""
        if int(token_id) < 0:
            return None
        return _guarded(self.source, "id_to_token", self._backend.id_to_token, int(token_id))

    # --- special tokens --------------------------------------------------------------------------

    def _special(self, name: str) -> str | None:
        return _token_content(self._named.get(name))

    def _special_id(self, name: str) -> int | None:
        token = self._special(name)
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self._special("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self._special("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self._special("unk_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """{name: string} of the named special tokens, as the chat template sees them."""
        return {name: _token_content(value) for name, value in self._named.items()}

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of the special added tokens and of the named special tokens (hidden when streaming)."""
        ids = {i for i, token in self._backend.get_added_tokens_decoder().items() if token.special}
        ids |= {self.token_to_id(t) for t in self.special_tokens_map.values()}
        return frozenset(i for i in ids if i is not None)

    def stop_token_ids(self, generation_config: dict | None = None) -> list[int]:
        """Every id that ends a turn, in a fixed order without repeats.

        The tokenizer's eos, config.json's eos_token_id, generation_config's eos_token_id (an int or
        a list; the folder's generation_config.json when none is given), then `<|end|>`,
        `<|endoftext|>` and `<|im_end|>` looked up by string where the vocabulary has them.
        """
        gen = self.generation_config if generation_config is None else generation_config
        ids: list[int] = []
        candidates = [self.eos_token_id, self._model_eos_token_id, (gen or {}).get("eos_token_id")]
        candidates += [self.token_to_id(token) for token in END_OF_TURN_TOKENS]
        for value in candidates:
            for token_id in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(token_id, int) and not isinstance(token_id, bool) and token_id not in ids:
                    ids.append(token_id)
        return ids

    # --- encode / decode -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, equal to transformers' `tokenizer(text)["input_ids"]`.

        add_special_tokens: run tokenizer.json's post-processor (which adds `<s>` where the file
        says so); the chat template path passes False, as transformers does.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"{self.source}: encode expects a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates: what Python makes of invalid UTF-8 in argv
            raise TokenizerError(f"the text is not valid UTF-8 (character {exc.start} is a lone surrogate "
                                 f"{text[exc.start]!r}); give UTF-8 text") from None
        encoding = _guarded(self.source, "encode", self._backend.encode, text, add_special_tokens=add_special_tokens)
        return list(encoding.ids)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`, equal to transformers' `tokenizer.decode(ids, skip_special_tokens=...)`.

        Ids the vocabulary lacks are dropped, as the library does; negative ids are an error.
        """
        ids = _as_id_list(ids, self.source)
        text = _guarded(self.source, "decode", self._backend.decode, ids, skip_special_tokens=skip_special_tokens)
        # transformers' clean-up of " ." and friends: on only when the config asks, never for BPE.
        if self.clean_up_tokenization_spaces and (self._cleans_bpe or not self._is_bpe):
            text = _clean_up_tokenization(text)
        return text

    # --- chat ------------------------------------------------------------------------------------

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False,
                            chat_template: str | None = None, **extra):  # fmt: skip
        """Render `messages` with the checkpoint's chat template, exactly as transformers 5.23 does.

        messages: a list of {"role": ..., "content": ...} dicts.
        add_generation_prompt: append the assistant header. Defaults to True here (transformers
          defaults to False) because minphi3 renders prompts to generate from.
        tokenize: False -> the string; True -> its ids, encoded with add_special_tokens=False
          (transformers' tokenize=True, return_dict=False: a list of ids).
        chat_template: a template to use instead, or the name of one of the checkpoint's templates.
        extra: more template variables (tools=, documents=, or anything the template reads); they
          override the special-token strings of the same name. transformers' options that change
          the output rather than feed the template are refused when set (`RENDERING_OPTIONS`,
          and `TOKENIZING_OPTIONS` with tokenize=True): as variables they would render another
          prompt silently.
        """
        refused = [name for name in RENDERING_OPTIONS if extra.get(name)]
        if tokenize:  # transformers reads these only when it tokenizes, and ignores them otherwise
            refused += [name for name in TOKENIZING_OPTIONS if not _leaves_one_conversation_alone(name, extra.get(name))]
        if refused:
            raise TokenizerError(
                f"apply_chat_template option {refused[0]}={extra[refused[0]]!r} is not supported (minphi3 renders "
                "one conversation to a string, or with tokenize=True to a list of its ids)"
            )
        extra = {name: value for name, value in extra.items() if name not in RENDERING_OPTIONS + TOKENIZING_OPTIONS}
        if any(callable(tool) for tool in extra.get("tools") or ()):
            raise TokenizerError("tools given as Python functions are not supported: pass their JSON schemas "
                                 "(transformers.utils.get_json_schema(function) writes one)")  # fmt: skip
        template = _select_template(self.chat_template, extra.get("tools"), self.source, chat_template)
        text = render_chat_template(
            template, messages, add_generation_prompt, self.special_tokens_map, source=self.source, **extra
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _as_id_list(ids, source: str) -> list[int]:
    """Accept an int, a list, a tuple or a 1-D array of ids; return a list of Python ints >= 0."""
    if isinstance(ids, int) or (hasattr(ids, "ndim") and ids.ndim == 0):
        ids = [ids]
    try:
        out = [int(i) for i in ids]
    except (TypeError, ValueError) as exc:
        raise TokenizerError(f"{source}: decode expects a sequence of integer ids ({exc})") from None
    bad = [i for i in out if i < 0 or i >= 2**32]
    if bad:
        raise TokenizerError(f"{source}: decode got id {bad[0]}, outside 0..2**32-1")
    return out


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: glue punctuation and English contractions back on."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


# ------------------------------------------------------------------------------------------------
# Chat template: the same Jinja sandbox as transformers/utils/chat_template_utils.py
# ------------------------------------------------------------------------------------------------


# transformers' apply_chat_template options that change what it returns, not what the template
# reads, so that passing them on as template variables would be wrong. Those that change the
# rendering are refused when set; those of the tokenization when set with tokenize=True to a value
# that would change the ids (`_leaves_one_conversation_alone`); with tokenize=False transformers
# ignores them, and so does minphi3.
RENDERING_OPTIONS = ("continue_final_message", "sanitize_control_tokens", "return_assistant_tokens_mask")
TOKENIZING_OPTIONS = ("padding", "truncation", "max_length", "return_tensors", "return_dict", "tokenizer_kwargs")


def _leaves_one_conversation_alone(name: str, value) -> bool:
    """Whether a tokenizing option, so set, changes nothing in the ids of one conversation: unset
    (None, False, {}), transformers' "do_not_*" spellings, or padding to the longest of one."""
    if not value or value in ("do_not_pad", "do_not_truncate"):
        return True
    return name == "padding" and value in (True, "longest")


def _select_template(chat_template, tools, source: str, requested: str | None = None) -> str:
    """Pick the template to use, as transformers' `get_chat_template` does: `requested` when given
    (the name of one of the checkpoint's templates, else a template itself); else the only one, or
    from named templates "tool_use" (when tools are given) or "default"."""
    if isinstance(chat_template, list):  # tokenizer_config.json may store [{"name": ..., "template": ...}]
        chat_template = {
            t["name"]: t.get("template")
            for t in chat_template
            if isinstance(t, dict) and isinstance(t.get("name"), str)
        }
    if requested is not None:
        if not isinstance(requested, str):
            raise TokenizerError(f"chat_template must be a template string or a template's name, found {type(requested).__name__}")
        if isinstance(chat_template, dict) and requested in chat_template:
            requested = chat_template[requested]
        return _select_template(requested, None, source)
    if chat_template is None:
        raise TokenizerError(
            f"{source}: the tokenizer has no chat template (no chat_template.jinja and no "
            "chat_template in tokenizer_config.json); format the prompt yourself"
        )
    if isinstance(chat_template, dict):
        name = "tool_use" if tools is not None and "tool_use" in chat_template else "default"
        if name not in chat_template:
            raise TokenizerError(f"{source}: several chat templates ({sorted(chat_template)}) and none is 'default'")
        chat_template = chat_template[name]
    if not isinstance(chat_template, str):
        raise TokenizerError(f"{source}: chat_template must be a string, found {type(chat_template).__name__}")
    return chat_template


def render_chat_template(
    template: str, messages, add_generation_prompt: bool, special_tokens: dict, source: str = "", **extra
) -> str:
    """Render a chat template like transformers' `apply_chat_template(..., tokenize=False)`.

    Messages lose their None-valued keys and are rebuilt from plain JSON types; the template sees
    `messages`, `tools` and `documents` (None unless given), `add_generation_prompt`, the special
    token strings (`bos_token`, `eos_token`, ...) and `extra`, which wins over those strings.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError(f"{source}: the chat template needs a non-empty list of messages")
    if not all(isinstance(m, Mapping) for m in messages):
        raise TokenizerError(f"{source}: each chat message must be a dict with 'role' and 'content'")
    chat = _alias_reasoning_fields(_plain([{k: v for k, v in m.items() if v is not None} for m in messages]))
    tools, documents = _plain(extra.pop("tools", None)), _plain(extra.pop("documents", None))
    variables = {**special_tokens, **_plain(extra)}
    try:
        compiled = _compile_template(template)
        return render_bounded(
            compiled, messages=chat, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
            **variables,
        )  # fmt: skip
    except jinja2.TemplateError as exc:
        raise TokenizerError(f"{source}: chat template: {type(exc).__name__}: {exc}") from None
    except MemoryError:
        raise TokenizerError(f"{source}: chat template: rendering it ran out of memory") from None
    except Exception as exc:  # the template is a stranger's program: 1/0, 'a' + 1, 10.0 ** 400 ...
        raise TokenizerError(f"{source}: chat template failed: {type(exc).__name__}: {exc}") from None


# Bounds on what a chat template (a stranger's program) may build. Real templates stay far below:
# a conversation of a few thousand characters, loops of a few hundred turns. The bounds are on
# sizes and widths only, never on the numbers a template prints (ids, timestamps).
MAX_TEMPLATE_ITEMS = 1 << 24  # characters (or items) one value may hold: 16 Mi
MAX_TEMPLATE_OUTPUT = 1 << 26  # characters of the whole rendered prompt: 64 Mi
MAX_TEMPLATE_POWER_BITS = 1 << 16  # bits of an integer a `**` may build
_FORMAT_WIDTHS = re.compile(r"%[-+ #0]*(\d+|\*)?(?:\.(\d+|\*))?|\{[^{}]*?:[^{}\d]*(\d+)")


MAX_TEMPLATE_VISITS = 1 << 20  # list items `_template_size` looks at before it gives up


def _template_size(value) -> int:
    """How many characters (or items) `value` holds: a string its length, a list the sizes of its
    items (each at least 1) at any depth, anything else 1. Past MAX_TEMPLATE_VISITS items it stops
    and answers more than MAX_TEMPLATE_ITEMS (no chat template holds a million-item list), so the
    check itself stays cheap."""
    size, visits, stack = 0, 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            size += max(1, len(item))
        elif isinstance(item, (list, tuple)):
            visits += len(item)
            if visits > MAX_TEMPLATE_VISITS:
                return MAX_TEMPLATE_ITEMS + 1
            size += 0 if item else 1
            stack.extend(item)
        else:
            size += 1
        if size > MAX_TEMPLATE_ITEMS:
            return size
    return size


def _check_template_size(size: int, what: str) -> None:
    if size > MAX_TEMPLATE_ITEMS:
        raise jinja2.exceptions.SecurityError(f"the template {what} {size} items (more than {MAX_TEMPLATE_ITEMS})")


def _check_width(width, what: str) -> None:
    if isinstance(width, int) and not isinstance(width, bool) and abs(width) > MAX_TEMPLATE_ITEMS:
        raise jinja2.exceptions.SecurityError(f"the template asks {what} for a width of {width} (at most {MAX_TEMPLATE_ITEMS})")


def _check_format(template: str, arguments, what: str) -> None:
    """`template % arguments`, `template.format(...)`, `template|format(...)`: every width the
    format string writes (`%1000000000s`, `{:>1000000000}`), every `*` width taken from the
    arguments, and the arguments' own sizes."""
    arguments = list(arguments)
    for match in _FORMAT_WIDTHS.finditer(template):
        for width in match.groups():
            if width == "*":
                for argument in arguments:
                    _check_width(argument, what)
            elif width:
                _check_width(int(width), what)
    _check_template_size(len(template) + sum(_template_size(a) for a in arguments if isinstance(a, (str, list, tuple))),
                         f"formats with {what}")  # fmt: skip


def _check_str_method(text: str, name: str, args, kwargs) -> None:
    """The str methods that can widen a string: padding widths, tab sizes, replace and join
    results, format strings."""
    values = [*args, *kwargs.values()]
    if name in ("ljust", "rjust", "center", "zfill") and values:
        _check_width(values[0], f"str.{name}")
    elif name == "expandtabs" and values and isinstance(values[0], int):
        _check_template_size(len(text) + text.count("\t") * values[0], "expands tabs into")
    elif name == "replace" and len(values) >= 2 and isinstance(values[0], str) and isinstance(values[1], str):
        _check_template_size(len(text) + text.count(values[0]) * max(0, len(values[1]) - len(values[0])), "replaces into")
    elif name == "join" and values:
        items = values[0] if isinstance(values[0], (list, tuple)) else []
        _check_template_size(_template_size(items) + len(text) * max(0, len(items) - 1), "joins")


class _BoundedCodeGenerator(jinja2.compiler.CodeGenerator):
    """Jinja's code generator, with `a ~ b` going through `environment.bounded_concat`."""

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _ChatTemplateEnvironment(ImmutableSandboxedEnvironment):
    """transformers' sandbox, plus bounds on what a template may build, so that a template from a
    stranger cannot ask for gigabytes (`'x' * 10**10`) or minutes of work (`(2**1000)**1000000`):
    the results of `*`, `+`, `~` and `**`, the widening str methods (padding, replace, join,
    format) and filters (center, indent, format, join, replace), `%` formats, values kept on a
    namespace across a loop (`_TemplateNamespace`), and the whole output (`render_bounded`).
    Best effort: a template is still code from a stranger, and the output bound catches the rest
    once a piece is built."""

    intercepted_binops = frozenset(["*", "+", "**", "%"])
    code_generator_class = _BoundedCodeGenerator

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
                    _check_template_size(_template_size(sequence) * count, f"repeats a sequence {count} times:")
        elif operator == "+" and isinstance(left, (str, list, tuple)):
            _check_template_size(_template_size(left) + _template_size(right), "concatenates")
        elif operator == "%" and isinstance(left, str):
            _check_format(left, right if isinstance(right, (tuple, list)) else [right], "a % format")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if max(left.bit_length(), 1) * right > MAX_TEMPLATE_POWER_BITS:
                raise jinja2.exceptions.SecurityError(
                    f"the template raises a {left.bit_length()}-bit integer to the power {right} "
                    f"(more than {MAX_TEMPLATE_POWER_BITS} bits)"
                )
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            _check_str_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
        return ImmutableSandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs)

    def wrap_str_format(self, value):
        """The sandbox's own str.format / str.format_map (which never passes through `call`),
        after `_check_format` of its format string and arguments."""
        sandboxed = super().wrap_str_format(value)
        if sandboxed is None:
            return None
        text = value.__self__

        def checked(*args, **kwargs):
            mapping = args[0] if value.__name__ == "format_map" and args and isinstance(args[0], Mapping) else {}
            _check_format(text, [*args, *kwargs.values(), *mapping.values()], f"str.{value.__name__}")
            return sandboxed(*args, **kwargs)

        return functools.update_wrapper(checked, sandboxed)

    @staticmethod
    def bounded_concat(pieces) -> str:
        texts = [str(piece) for piece in pieces]
        _check_template_size(sum(len(text) for text in texts), "concatenates (~)")
        return "".join(texts)


def _bounded_filter(original, check):
    """`original` (a Jinja filter, its pass_eval_context mark kept by functools.wraps) after
    `check(value, *args, **kwargs)`; a generator value (`... | map(...) | join`) is listed first,
    so that the check and the filter both see its items."""

    @functools.wraps(original)
    def bounded(*args, **kwargs):
        offset = 1 if getattr(original, "jinja_pass_arg", None) is not None else 0
        args = list(args)
        if len(args) > offset and isinstance(args[offset], Iterator):
            args[offset] = list(args[offset])
        check(*args[offset:], **kwargs)
        return original(*args, **kwargs)

    return bounded


def _check_center(value, width=80, *_, **__):
    _check_width(width, "the center filter")


def _check_indent(value, width=4, *_, **__):
    lines = str(value).count("\n")
    if isinstance(width, str):
        _check_template_size(len(str(value)) + lines * len(width), "indents into")
    else:
        _check_width(width, "the indent filter")


def _check_format_filter(value, *args, **kwargs):
    _check_format(str(value), [*args, *kwargs.values()], "the format filter")


def _check_join(value, d="", attribute=None):
    items = list(value) if isinstance(value, str) else value if isinstance(value, (list, tuple)) else []
    _check_template_size(_template_size(items) + len(str(d)) * max(0, len(items) - 1), "joins")


def _check_replace(value, old="", new="", count=None):
    text = str(value)
    _check_template_size(len(text) + text.count(str(old)) * max(0, len(str(new)) - len(str(old))), "replaces into")


_FILTER_CHECKS = {
    "center": _check_center, "indent": _check_indent, "format": _check_format_filter,
    "join": _check_join, "replace": _check_replace,
}  # fmt: skip


def render_bounded(compiled: jinja2.Template, **variables) -> str:
    """compiled.render(**variables), stopped with a SecurityError once the output passes
    MAX_TEMPLATE_OUTPUT characters (a loop printing a large value many times)."""
    pieces, size = [], 0
    for piece in compiled.generate(**variables):
        size += len(piece)
        if size > MAX_TEMPLATE_OUTPUT:
            raise jinja2.exceptions.SecurityError(f"the rendered template passes {MAX_TEMPLATE_OUTPUT} characters")
        pieces.append(piece)
    return "".join(pieces)


@lru_cache(maxsize=16)
def _compile_template(template: str) -> jinja2.Template:
    """Compile a template in transformers' sandbox: ImmutableSandboxedEnvironment (templates come
    from strangers and must not reach Python internals; here also bounded in what they build,
    `_ChatTemplateEnvironment`) with trim_blocks, lstrip_blocks, loop
    controls and the `{% generation %}` tag, the `tojson` filter without HTML escaping, and the
    globals raise_exception, strftime_now, dict and namespace."""
    env = _ChatTemplateEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    for name, check in _FILTER_CHECKS.items():
        env.filters[name] = _bounded_filter(env.filters[name], check)
    env.globals.pop("lipsum", None)  # lorem ipsum of any length: no chat template needs it
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(template)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' tojson: plain json.dumps, non-ASCII kept, no HTML escaping."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    """The `raise_exception(...)` templates call to reject a conversation."""
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    """`strftime_now(...)`, which templates use to print today's date."""
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` inside templates, without the attributes of the real type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _check_namespace_name(name) -> None:
    """Underscore names on a namespace could reach CPython internals: refuse them."""
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates cannot store {name!r} on a namespace")


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, as transformers' sandbox does."""

    def __init__(*args, **kwargs):  # noqa: N805 - the signature trick of Jinja's own Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _check_namespace_name(name)
        _check_template_size(_template_size(value), f"keeps on namespace attribute {name!r}")
        jinja2.utils.Namespace.__setitem__(self, name, value)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it): the
    body renders as is, since minphi3 has no assistant-token mask to fill."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _plain(value):
    """Rebuild template inputs from plain JSON types (transformers' `_plain_template_data`): objects
    with methods never reach the sandbox; anything else becomes a placeholder like "<ndarray>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):  # np.bool_(False) must stay falsy
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning_fields(chat: list) -> list:
    """Copy a message's reasoning under the names templates read (`reasoning_content`, `thinking`)."""
    out = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# ------------------------------------------------------------------------------------------------
# Streaming
# ------------------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turn ids into text one token at a time, for streaming.

    The concatenation of every `push` result and the final `flush` equals
    `tokenizer.decode(all_ids, skip_special_tokens=...)`, except where the ids spell bytes that are
    not valid UTF-8 (a model can generate any byte token): a piece already sent is not taken back
    when a later byte makes its run invalid, and the full decode replaces the run.

    Decoding one token at a time does not: the Metaspace/Strip decoder drops the leading space of
    whatever it decodes first, and a byte-fallback token like `<0xE2>` is not valid UTF-8 alone. So we decode a short window twice:
    ids[prefix:read] (text already sent) and ids[prefix:] (that text plus the new tokens), both
    starting at the same token so that the decoder treats their start alike, and send the
    difference once it no longer ends in U+FFFD (an incomplete character is held back).

    context_ids: text already shown (a prompt printed before the continuation). Its last tokens
    open the first window, so the first new token is decoded as it reads after them, leading
    space included: the texts streamed then add up to decode(context + new)[len(decode(context)):].
    """

    CONTEXT_TOKENS = 8  # enough for the decoder to treat the first new token as mid-text

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, context_ids=()):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = [int(i) for i in context_ids]
        start = max(0, len(context) - self.CONTEXT_TOKENS)
        # A window that opens inside a character (on a token holding its later bytes, such as
        # <0x9C>) decodes that character's bytes as U+FFFD, and a continuation of the same byte
        # run with them: open it before the character (at most 3 bytes precede its last one).
        for _ in range(3):
            if start == 0 or not self._decode(context[start:]).startswith("\ufffd"):
                break
            start -= 1
        self.ids: list[int] = context[start:]
        self._prefix = 0  # start of the window: first token of the chunk sent last
        self._read = len(self.ids)  # tokens before this index have been sent as text

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (often "", for example inside a character)."""
        self.ids.append(int(token_id))
        sent = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) <= len(sent) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(sent) :]

    def flush(self) -> str:
        """Return whatever is still held back (an unfinished character comes out as U+FFFD)."""
        sent = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(sent) :]
