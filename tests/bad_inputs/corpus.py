"""The corpus of hostile and broken inputs, each one built by code in a temporary folder.

A `Case` says what it builds, which minphi3 exception it must raise (the exact class) and which
fragments its message must hold (the file, the field or the tensor, and the problem). Apart from
that one defect each input is complete: a checkpoint comes with its tokenizer, since the CLI reads
the tokenizer (to size the prompt and the KV cache) before it reads any weight. Its
`build(root)` writes the input under `root` and returns an `Attempt`: the library call that must
raise (`api`), the command line that must exit with status 2 and one line on stderr (`cli`, the
arguments after `python -m minphi3`), and, for pickle payloads, a `marker` file whose appearance
would prove that code from the checkpoint ran.

Groups, in the order of the issue:
- config: config.json that is not JSON, empty, incomplete, mistyped, inconsistent, of an
  unsupported architecture, or describing a model that needs terabytes;
- safetensors: the checklist of pitfalls.md section 2.2, one file per item, then tensors that do
  not match config.json and sharded indexes that point at absent or outside files;
- pickle: `pytorch_model.bin` next to config.json, alone, given as the path, and renamed
  `model.safetensors`; each one a pickle whose unpickling would create the marker file;
- gguf: a tiny phi3 file written with `gguf.GGUFWriter`, then cut, re-labelled or stripped;
- tokenizer: a valid model next to a tokenizer.json that is not JSON, has a merge naming unknown
  tokens, a merge that panics the Rust library, or is missing;
- generation: a valid model and tokenizer, asked for something impossible (empty prompt, ids
  outside the vocabulary, more tokens than the context, a KV cache of terabytes, bad sampling
  parameters, max_new_tokens <= 0).
"""

from __future__ import annotations

import json
import pickle
import struct
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import minphi3
from minphi3.config import config_from_dict
from minphi3.errors import CheckpointError, ConfigError, GenerationError, ResourceError, TokenizerError
from minphi3.model import parameter_shapes

# ================================================================================================
# Cases and the tally the suite prints
# ================================================================================================


@dataclass(frozen=True)
class Attempt:
    """What one built case runs: the API call, the CLI arguments, and a marker that must not appear."""

    api: Callable[[], object]
    cli: tuple[str, ...]
    marker: Path | None = None


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    error: type
    fragments: tuple[str, ...]
    build: Callable[[Path], Attempt] = field(repr=False)

    @property
    def id(self) -> str:
        return f"{self.group}-{self.name}"


CASES: list[Case] = []


def case(group: str, name: str, error: type, *fragments: str):
    """Register `build` as a case: it must raise exactly `error`, its message holding every fragment."""

    def register(build):
        CASES.append(Case(name, group, error, fragments, build))
        return build

    return register


def cases_in(group: str) -> list[Case]:
    return [c for c in CASES if c.group == group]


# case id -> {"api": bool, "cli": bool}: False when tried and not (yet) handled; a path that did
# not run in this session (deselected with -k, say) has no entry.
tally: dict[str, dict[str, bool]] = defaultdict(dict)
PATHS = {"api": "API", "cli": "CLI"}


def summary_line(results: dict[str, dict[str, bool]] | None = None) -> str | None:
    """'bad inputs: N cases tried, M handled' for `results` (the session's `tally` by default), or
    None when no case ran.

    A case is handled only when both paths, the API and the CLI, ran and gave the expected error.
    A case whose path did not run is not handled, and the line says how many missed each path:
    'bad inputs: 86 cases tried, 80 handled, 6 not run through the CLI'.
    """
    results = tally if results is None else results
    if not results:
        return None
    handled = sum(all(paths.get(path) is True for path in PATHS) for paths in results.values())
    line = f"bad inputs: {len(results)} cases tried, {handled} handled"
    for path, name in PATHS.items():
        missing = sum(path not in paths for paths in results.values())
        if missing:
            line += f", {missing} not run through the {name}"
    return line


# ================================================================================================
# Building blocks: a tiny valid model, its tokenizer, raw safetensors
# ================================================================================================

TINY_CONFIG = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "vocab_size": 272,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "pad_token_id": 260,
    "eos_token_id": 262,
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 260, 261, 262
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("h", "i")]  # ids 256..259: "hi" is 259
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def gpt2_byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte value 0..255 (byte b has token id b here)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tokenizer_spec() -> dict:
    """tokenizer.json of a tiny byte-level BPE: 256 bytes, 4 merges, 3 ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in enumerate(gpt2_byte_alphabet())}
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(MERGES)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return json.loads(backend.to_str())


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def write_tokenizer(folder: Path, spec: dict | None = None) -> Path:
    write_json(folder / "tokenizer.json", tokenizer_spec() if spec is None else spec)
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": CHATML,
    })  # fmt: skip
    return folder


def tiny_tensors(config: dict | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights of the shapes config.json asks for (norm gains around 1)."""
    rng = np.random.default_rng(seed)
    shapes = parameter_shapes(config_from_dict(dict(config or TINY_CONFIG)))
    tensors = {}
    for name, shape in shapes.items():
        values = rng.normal(0.0, 0.3, size=shape).astype(np.float32)
        tensors[name] = values + 1.0 if "norm" in name else values
    return tensors


def safetensors_parts(tensors: dict[str, np.ndarray]) -> tuple[dict, bytes]:
    """(header, data) of a safetensors file, tensors laid out in name order."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        raw = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    return header, b"".join(chunks)


def pack_safetensors(header, data: bytes = b"", header_length: int | None = None) -> bytes:
    """8-byte little-endian header length, the header (a dict, or raw bytes as they are), the data."""
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    length = len(header_bytes) if header_length is None else header_length
    return struct.pack("<Q", length) + header_bytes + data


def write_model(folder: Path, config: dict | None = None, tensors: dict | None = None, tokenizer: bool = True,
                weights: bytes | None = None) -> Path:
    """A checkpoint folder: config.json, model.safetensors (from `tensors`, or the raw `weights`
    bytes) and, unless told not to, the tiny tokenizer."""
    config = dict(TINY_CONFIG if config is None else config)
    write_json(folder / "config.json", config)
    if weights is None:
        weights = pack_safetensors(*safetensors_parts(tiny_tensors(config) if tensors is None else tensors))
    (folder / "model.safetensors").write_bytes(weights)
    if tokenizer:
        write_tokenizer(folder)
    return folder


def load_args(path: Path) -> tuple[str, ...]:
    """The CLI arguments that load `path` and would generate two tokens after "hi"."""
    return ("generate", "--model", str(path), "hi", "--max-new-tokens", "2")


def loading(path: Path, marker: Path | None = None) -> Attempt:
    """The API and the CLI both load the checkpoint at `path`."""
    return Attempt(api=lambda: minphi3.load(path), cli=load_args(path), marker=marker)


# ================================================================================================
# config.json
# ================================================================================================


def config_folder(root: Path, text: str | bytes | None = None, **changes) -> Attempt:
    """A folder whose config.json is `text` (raw) or TINY_CONFIG with `changes` (None deletes a
    field), next to valid weights for TINY_CONFIG."""
    folder = write_model(root / "model")
    path = folder / "config.json"
    if text is not None:
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    else:
        config = dict(TINY_CONFIG, **changes)
        write_json(path, {k: v for k, v in config.items() if v is not None})
    return loading(folder)


@case("config", "not_json", ConfigError, "config.json", "not valid JSON")
def _(root):
    return config_folder(root, '{"vocab_size": 272, "hidden_size": ')


@case("config", "empty", ConfigError, "config.json", "empty")
def _(root):
    return config_folder(root, "")


@case("config", "not_an_object", ConfigError, "config.json", "expected a JSON object", "list")
def _(root):
    return config_folder(root, "[1, 2, 3]")


@case("config", "deeply_nested", ConfigError, "config.json", "not valid JSON")
def _(root):
    return config_folder(root, "[" * 200_000 + "]" * 200_000)


@case("config", "number_of_5000_digits", ConfigError, "config.json", "not valid JSON", "digits")
def _(root):
    return config_folder(root, '{"vocab_size": 1' + "0" * 5000 + "}")


@case("config", "not_utf8", ConfigError, "config.json", "cannot read")
def _(root):
    return config_folder(root, b'{"model_type": "\xff\xfe"}')


@case("config", "missing_file", ConfigError, "config.json", "not found")
def _(root):
    folder = write_model(root / "model")
    (folder / "config.json").unlink()
    return loading(folder)


@case("config", "missing_vocab_size", ConfigError, "config.json", "'vocab_size'", "missing")
def _(root):
    return config_folder(root, vocab_size=None)


@case("config", "missing_num_attention_heads", ConfigError, "config.json", "'num_attention_heads'", "missing")
def _(root):
    return config_folder(root, num_attention_heads=None)


@case("config", "string_hidden_size", ConfigError, "config.json", "'hidden_size'", "positive integer", "'32'")
def _(root):
    return config_folder(root, hidden_size="32")


@case("config", "float_layers", ConfigError, "'num_hidden_layers'", "positive integer", "1.5")
def _(root):
    return config_folder(root, num_hidden_layers=1.5)


@case("config", "string_tie_word_embeddings", ConfigError, "'tie_word_embeddings'", "true or false")
def _(root):
    return config_folder(root, tie_word_embeddings="yes")


@case("config", "zero_layers", ConfigError, "'num_hidden_layers'", "positive integer", "0")
def _(root):
    return config_folder(root, num_hidden_layers=0)


@case("config", "negative_intermediate_size", ConfigError, "'intermediate_size'", "positive integer", "-48")
def _(root):
    return config_folder(root, intermediate_size=-48)


@case("config", "nan_rms_norm_eps", ConfigError, "'rms_norm_eps'", "positive number")
def _(root):
    return config_folder(root, '{"vocab_size": 272, "hidden_size": 32, "intermediate_size": 48, '
                               '"num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 64, '
                               '"rms_norm_eps": NaN}')


@case("config", "hidden_not_divisible_by_heads", ConfigError, "'hidden_size' (30)", "divisible", "'num_attention_heads' (4)")
def _(root):
    return config_folder(root, hidden_size=30)


@case("config", "heads_not_divisible_by_kv_heads", ConfigError, "'num_attention_heads' (4)", "divisible",
      "'num_key_value_heads' (3)")
def _(root):
    return config_folder(root, num_key_value_heads=3)


@case("config", "factor_list_wrong_length", ConfigError, "'rope_scaling.short_factor'", "3 entries", "expected")
def _(root):
    # head_dim 8 -> rotary_dim 8 -> 4 factors expected
    scaling = {"type": "longrope", "short_factor": [1.0, 1.0, 1.0], "long_factor": [2.0, 2.0, 2.0, 2.0]}
    return config_folder(root, rope_scaling=scaling, original_max_position_embeddings=32)


@case("config", "unknown_rope_type", ConfigError, "rope_type", "'dynamic'")
def _(root):
    return config_folder(root, rope_scaling={"type": "dynamic", "factor": 2.0})


@case("config", "longrope_original_context_of_one", ConfigError, "'original_max_position_embeddings'", "at least 2",
      "found 1")
def _(root):
    # The attention factor sqrt(1 + log(s) / log(original_max)) divides by log(1) = 0.
    scaling = {"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}
    return config_folder(root, rope_scaling=scaling, original_max_position_embeddings=1)


@case("config", "eos_beyond_vocab", ConfigError, "config.json", "'eos_token_id' (1000000)", "vocab_size (272)")
def _(root):
    return config_folder(root, eos_token_id=[2, 1000000])


@case("config", "tiny_rope_theta", ConfigError, "config.json", "'rope_theta'", "above 1", "1e-300")
def _(root):
    return config_folder(root, rope_theta=1e-300)  # theta ** (-2i/d) overflows: NaN logits


@case("config", "generation_config_bad_temperature", GenerationError, "generation_config.json", "temperature", "-1")
def _(root):
    folder = write_model(root / "model")
    write_json(folder / "generation_config.json", {"do_sample": True, "temperature": -1.0})
    return Attempt(api=lambda: minphi3.generate(minphi3.load(folder), [[65, 66]], max_new_tokens=2),
                   cli=load_args(folder))


@case("config", "generation_config_asks_for_beams", GenerationError, "generation_config.json", "num_beams=4",
      "does not implement")
def _(root):
    folder = write_model(root / "model")
    write_json(folder / "generation_config.json", {"num_beams": 4})
    return Attempt(api=lambda: minphi3.generate(minphi3.load(folder), [[65, 66]], max_new_tokens=2),
                   cli=load_args(folder))


@case("config", "path_name_too_long", CheckpointError, "cannot read it", "File name too long")
def _(root):
    return loading(root / ("m" * 300))


@case("config", "phi3_small", ConfigError, "Phi3SmallForCausalLM", "not supported")
def _(root):
    return config_folder(root, architectures=["Phi3SmallForCausalLM"], model_type="phi3small")


@case("config", "unknown_model_type", ConfigError, "'llama'", "not supported")
def _(root):
    return config_folder(root, architectures=None, model_type="llama")


@case("config", "size_beyond_int64", ConfigError, "'vocab_size'", "1329 bits", "64 bits")
def _(root):
    return config_folder(root, vocab_size=10**400)


@case("config", "generation_config_not_json", ConfigError, "generation_config.json", "not valid JSON")
def _(root):
    attempt = config_folder(root)
    (root / "model" / "generation_config.json").write_text('{"eos_token_id": [1, 2', encoding="utf-8")
    return attempt


@case("config", "needs_terabytes", ResourceError, "needs", "TiB", "available")
def _(root):
    # ~17e12 parameters (70 TiB in float32). The weights file is garbage: reading its header before
    # the memory check would raise a CheckpointError instead, so this also proves the order.
    folder = config_folder(
        root, vocab_size=32064, hidden_size=65536, intermediate_size=262144, num_hidden_layers=256,
        num_attention_heads=512, num_key_value_heads=512,
    )  # fmt: skip
    (root / "model" / "model.safetensors").write_bytes(b"not a safetensors file")
    return folder


# ================================================================================================
# safetensors
# ================================================================================================


def weights_folder(root: Path, weights: bytes) -> Attempt:
    """A valid config.json next to `weights` as model.safetensors."""
    return loading(write_model(root / "model", weights=weights))


def edited_header(edit) -> bytes:
    """A valid tiny model.safetensors whose header (and data) `edit(header, data) -> data` changed."""
    header, data = safetensors_parts(tiny_tensors())
    data = edit(header, data) or data
    return pack_safetensors(header, data)


NORM = "model.norm.weight"
INPUT_NORM = "model.layers.0.input_layernorm.weight"
POST_NORM = "model.layers.0.post_attention_layernorm.weight"
QKV = "model.layers.0.self_attn.qkv_proj.weight"


@case("safetensors", "empty_file", CheckpointError, "model.safetensors", "0 bytes", "too short")
def _(root):
    return weights_folder(root, b"")


@case("safetensors", "truncated", CheckpointError, "model.safetensors", "truncated")
def _(root):
    whole = pack_safetensors(*safetensors_parts(tiny_tensors()))
    return weights_folder(root, whole[: len(whole) * 2 // 3])


@case("safetensors", "truncated_in_header", CheckpointError, "model.safetensors", "runs past the end", "truncated")
def _(root):
    whole = pack_safetensors(*safetensors_parts(tiny_tensors()))
    return weights_folder(root, whole[:100])


@case("safetensors", "header_length_beyond_file", CheckpointError, "model.safetensors", "header length 1000000",
      "runs past the end")
def _(root):
    return weights_folder(root, pack_safetensors({}, b"", header_length=1_000_000))


@case("safetensors", "header_length_huge", CheckpointError, "model.safetensors", "header length", "outside 1..")
def _(root):
    return weights_folder(root, pack_safetensors(b"{}", b"", header_length=2**64 - 1))


@case("safetensors", "header_not_json", CheckpointError, "model.safetensors", "not valid JSON")
def _(root):
    return weights_folder(root, pack_safetensors(b'{"model.norm.weight": {"dtype": "F32", '))


@case("safetensors", "header_number_of_5000_digits", CheckpointError, "model.safetensors", "not valid JSON",
      "digits")
def _(root):
    entry = '{"dtype": "F32", "shape": [1' + "0" * 5000 + '], "data_offsets": [0, 128]}'
    return weights_folder(root, pack_safetensors(f'{{"{NORM}": {entry}}}'.encode(), b"\0" * 128))


@case("safetensors", "header_not_an_object", CheckpointError, "model.safetensors", "not a JSON object")
def _(root):
    return weights_folder(root, pack_safetensors(b"[1, 2, 3]"))


@case("safetensors", "header_not_utf8", CheckpointError, "model.safetensors", "not UTF-8")
def _(root):
    return weights_folder(root, pack_safetensors(b'{"\xff\xfe": 1}'))


@case("safetensors", "duplicate_tensor_name", CheckpointError, "model.safetensors", f"'{NORM}' twice")
def _(root):
    entry = json.dumps({"dtype": "F32", "shape": [32], "data_offsets": [0, 128]})
    header = f'{{"{NORM}": {entry}, "{NORM}": {entry}}}'.encode()
    return weights_folder(root, pack_safetensors(header, b"\0" * 128))


@case("safetensors", "offsets_overlapping", CheckpointError, "model.safetensors", f"'{POST_NORM}'", "overlaps")
def _(root):
    def edit(header, data):
        header[POST_NORM]["data_offsets"] = list(header[INPUT_NORM]["data_offsets"])  # the same 128 bytes

    return weights_folder(root, edited_header(edit))


@case("safetensors", "offsets_past_the_end", CheckpointError, "model.safetensors", "data_offsets", "outside the")
def _(root):
    def edit(header, data):
        last = max(header, key=lambda n: header[n]["data_offsets"][1])
        begin, end = header[last]["data_offsets"]
        header[last]["data_offsets"] = [begin + 64, end + 64]

    return weights_folder(root, edited_header(edit))


@case("safetensors", "offsets_negative", CheckpointError, "model.safetensors", f"'{NORM}'", "[-128, 0]", "outside")
def _(root):
    def edit(header, data):
        header[NORM]["data_offsets"] = [-128, 0]

    return weights_folder(root, edited_header(edit))


@case("safetensors", "offsets_inverted", CheckpointError, "model.safetensors", f"'{NORM}'", "outside")
def _(root):
    def edit(header, data):
        begin, end = header[NORM]["data_offsets"]
        header[NORM]["data_offsets"] = [end, begin]

    return weights_folder(root, edited_header(edit))


@case("safetensors", "offsets_not_integers", CheckpointError, "model.safetensors", f"'{NORM}'", "data_offsets")
def _(root):
    def edit(header, data):
        header[NORM]["data_offsets"] = ["0", 128.0]

    return weights_folder(root, edited_header(edit))


@case("safetensors", "trailing_bytes", CheckpointError, "model.safetensors", "trailing bytes")
def _(root):
    return weights_folder(root, edited_header(lambda header, data: data + b"#!/bin/sh\nrm -rf /\n"))


@case("safetensors", "unsupported_dtype", CheckpointError, "model.safetensors", f"'{NORM}'", "dtype 'I8'",
      "supported")
def _(root):
    def edit(header, data):
        header[NORM]["dtype"] = "I8"
        header[NORM]["shape"] = [128]  # the same bytes, as int8

    return weights_folder(root, edited_header(edit))


@case("safetensors", "dtype_not_a_string", CheckpointError, "model.safetensors", f"'{NORM}'", "dtype")
def _(root):
    def edit(header, data):
        header[NORM]["dtype"] = ["F32"]

    return weights_folder(root, edited_header(edit))


@case("safetensors", "shape_needs_exabytes", CheckpointError, "model.safetensors", f"'{NORM}'", "needs",
      "data_offsets span")
def _(root):
    def edit(header, data):
        header[NORM]["shape"] = [2**40, 2**40]

    return weights_folder(root, edited_header(edit))


@case("safetensors", "metadata_not_strings", CheckpointError, "model.safetensors", "__metadata__")
def _(root):
    def edit(header, data):
        header["__metadata__"] = {"format": {"nested": True}}

    return weights_folder(root, edited_header(edit))


@case("safetensors", "tensor_missing", CheckpointError, "missing tensor", NORM)
def _(root):
    tensors = tiny_tensors()
    del tensors[NORM]
    return loading(write_model(root / "model", tensors=tensors))


@case("safetensors", "tensor_extra", CheckpointError, "unexpected tensor", "model.layers.1.mlp.down_proj.weight")
def _(root):
    tensors = tiny_tensors()
    tensors["model.layers.1.mlp.down_proj.weight"] = np.zeros((32, 48), np.float32)
    return loading(write_model(root / "model", tensors=tensors))


@case("safetensors", "tensor_wrong_shape", CheckpointError, f"'{QKV}'", "[24, 32]", "expected [64, 32]")
def _(root):
    tensors = tiny_tensors()
    tensors[QKV] = np.zeros((24, 32), np.float32)  # thirds of 3 x 8, not (4 + 2 x 2) heads x 8
    return loading(write_model(root / "model", tensors=tensors))


def sharded_folder(root: Path, shard_of_norm: str) -> Path:
    """Every tensor in model-00001-of-00002.safetensors, except that the index puts model.norm.weight
    in `shard_of_norm`."""
    folder = root / "model"
    tensors = tiny_tensors()
    write_json(folder / "config.json", TINY_CONFIG)
    (folder / "model-00001-of-00002.safetensors").write_bytes(pack_safetensors(*safetensors_parts(tensors)))
    weight_map = {name: "model-00001-of-00002.safetensors" for name in tensors}
    weight_map[NORM] = shard_of_norm
    write_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    return write_tokenizer(folder)


@case("safetensors", "index_names_absent_shard", CheckpointError, "model.safetensors.index.json",
      "model-00002-of-00002.safetensors", "missing")
def _(root):
    return loading(sharded_folder(root, "model-00002-of-00002.safetensors"))


@case("safetensors", "index_names_file_outside", CheckpointError, "model.safetensors.index.json", f"'{NORM}'",
      "not a file in this folder")
def _(root):
    (root / "outside.safetensors").write_bytes(pack_safetensors(*safetensors_parts({NORM: np.ones(32, np.float32)})))
    return loading(sharded_folder(root, "../outside.safetensors"))


@case("safetensors", "index_not_json", CheckpointError, "model.safetensors.index.json", "not a valid JSON index")
def _(root):
    folder = sharded_folder(root, "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {', encoding="utf-8")
    return loading(folder)


@case("safetensors", "weights_are_a_fifo", CheckpointError, "model.safetensors", "not a regular file")
def _(root):
    # Opening a FIFO for reading blocks until a writer comes: minphi3 must refuse it, not wait.
    import os

    folder = root / "model"
    write_json(folder / "config.json", TINY_CONFIG)
    os.mkfifo(folder / "model.safetensors")
    return loading(write_tokenizer(folder))


@case("safetensors", "no_weights", CheckpointError, "no model.safetensors")
def _(root):
    folder = root / "model"
    write_json(folder / "config.json", TINY_CONFIG)
    return loading(write_tokenizer(folder))


# ================================================================================================
# pickle: refused, never unpickled
# ================================================================================================


class MarkerPayload:
    """Unpickling this object calls Path.touch(marker): the proof that code from a checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def pickle_bomb(marker: Path) -> bytes:
    """A pickle that looks like a state dict and creates `marker` when unpickled."""
    return pickle.dumps({"model.embed_tokens.weight": MarkerPayload(marker), "model.norm.weight": [1.0] * 32})


def pickle_folder(root: Path, with_config: bool) -> tuple[Path, Path]:
    folder, marker = root / "model", root / "UNPICKLED"
    folder.mkdir(parents=True)
    if with_config:
        write_json(folder / "config.json", TINY_CONFIG)
    (folder / "pytorch_model.bin").write_bytes(pickle_bomb(marker))
    return folder, marker


@case("pickle", "bin_next_to_config", CheckpointError, "pytorch_model.bin", "never unpickles", "safetensors")
def _(root):
    folder, marker = pickle_folder(root, with_config=True)
    return loading(folder, marker)


@case("pickle", "bin_alone", CheckpointError, "pytorch_model.bin", "never unpickles", "safetensors")
def _(root):
    folder, marker = pickle_folder(root, with_config=False)
    return loading(folder, marker)


@case("pickle", "bin_as_the_path", CheckpointError, "pytorch_model.bin", "pickle checkpoints are refused")
def _(root):
    folder, marker = pickle_folder(root, with_config=True)
    return loading(folder / "pytorch_model.bin", marker)


@case("pickle", "renamed_model_safetensors", CheckpointError, "model.safetensors", "header length")
def _(root):
    marker = root / "UNPICKLED"
    attempt = weights_folder(root, pickle_bomb(marker))
    return Attempt(attempt.api, attempt.cli, marker)


# ================================================================================================
# GGUF: a tiny phi3 file, then broken
# ================================================================================================

GGUF_METADATA = dict(
    block_count=1, context_length=64, embedding_length=32, feed_forward_length=48, head_count=4,
    head_count_kv=2, layer_norm_rms_eps=1e-5, rope_freq_base=10000.0, rope_dimension_count=8,
)  # fmt: skip


def gguf_tensors() -> dict:
    """{llama.cpp name: (float32 array [out, in], storage type)} of TINY_CONFIG (vocab 272)."""
    import gguf

    hf = tiny_tensors()
    layer = "model.layers.0."
    names = {
        "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": NORM, "output.weight": "lm_head.weight",
        "blk.0.attn_norm.weight": layer + "input_layernorm.weight", "blk.0.attn_qkv.weight": QKV,
        "blk.0.attn_output.weight": layer + "self_attn.o_proj.weight",
        "blk.0.ffn_norm.weight": layer + "post_attention_layernorm.weight",
        "blk.0.ffn_up.weight": layer + "mlp.gate_up_proj.weight", "blk.0.ffn_down.weight": layer + "mlp.down_proj.weight",
    }  # fmt: skip
    return {name: (hf[source], gguf.GGMLQuantizationType.F32) for name, source in names.items()}


def write_gguf(path: Path, skip_metadata=(), tensors: dict | None = None, merges=None, tokenizer: bool = True) -> Path:
    """Write a tiny phi3 GGUF with `gguf.GGUFWriter` (metadata keys in `skip_metadata` left out),
    with, unless told not to, the byte-level tokenizer of `tokenizer_spec` in GGUF metadata, its
    merges replaced by `merges` ("left right" strings) when given."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "phi3")
    for key, value in GGUF_METADATA.items():
        if key not in skip_metadata:
            getattr(writer, f"add_{key}")(value)
    if tokenizer:
        merges = [f"{left} {right}" for left, right in MERGES] if merges is None else merges
        tokens = gpt2_byte_alphabet() + [left + right for left, right in MERGES] + SPECIAL_TOKENS
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types([1] * (len(tokens) - 3) + [3, 3, 3])
        writer.add_token_merges(list(merges))
        writer.add_eos_token_id(len(tokens) - 1)
    for name, (data, qtype) in (gguf_tensors() if tensors is None else tensors).items():
        raw = None if qtype == gguf.GGMLQuantizationType.F32 else qtype
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_bytes(root: Path) -> bytes:
    return write_gguf(root / "valid.gguf").read_bytes()


@case("gguf", "truncated", CheckpointError, "tiny.gguf", "truncated")
def _(root):
    data = gguf_bytes(root)
    (root / "tiny.gguf").write_bytes(data[: len(data) * 3 // 4])
    return loading(root / "tiny.gguf")


@case("gguf", "truncated_in_header", CheckpointError, "tiny.gguf", "truncated")
def _(root):
    (root / "tiny.gguf").write_bytes(gguf_bytes(root)[:40])
    return loading(root / "tiny.gguf")


@case("gguf", "empty_file", CheckpointError, "tiny.gguf", "truncated")
def _(root):
    (root / "tiny.gguf").write_bytes(b"")
    return loading(root / "tiny.gguf")


@case("gguf", "wrong_magic", CheckpointError, "tiny.gguf", "not a GGUF file", "GGUX")
def _(root):
    (root / "tiny.gguf").write_bytes(b"GGUX" + gguf_bytes(root)[4:])
    return loading(root / "tiny.gguf")


@case("gguf", "file_is_a_fifo", CheckpointError, "tiny.gguf", "not a regular file")
def _(root):
    import os

    os.mkfifo(root / "tiny.gguf")
    return loading(root / "tiny.gguf")


@case("gguf", "huge_tensor_count", CheckpointError, "tiny.gguf", "truncated or corrupt")
def _(root):
    data = gguf_bytes(root)  # magic, version, then the u64 tensor count at byte 8
    (root / "tiny.gguf").write_bytes(data[:8] + struct.pack("<Q", 1 << 60) + data[16:])
    return loading(root / "tiny.gguf")


@case("gguf", "unsupported_tensor_type", CheckpointError, "tiny.gguf", "blk.0.attn_output.weight", "Q8_1")
def _(root):
    import gguf

    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    tensors = gguf_tensors()
    blocks = np.zeros((32, 32 // block_size * type_size), np.uint8)  # [32, 32] in Q8_1 blocks
    tensors["blk.0.attn_output.weight"] = (blocks, gguf.GGMLQuantizationType.Q8_1)
    return loading(write_gguf(root / "tiny.gguf", tensors=tensors))


@case("gguf", "unknown_tensor_type_number", CheckpointError, "tiny.gguf", "blk.0.attn_output.weight",
      "unknown ggml storage type 99")
def _(root):
    data = gguf_bytes(root)
    name = b"blk.0.attn_output.weight"
    at = data.index(name) + len(name) + 4 + 2 * 8  # past the name, the rank (2) and two dims
    (root / "tiny.gguf").write_bytes(data[:at] + struct.pack("<I", 99) + data[at + 4 :])
    return loading(root / "tiny.gguf")


@case("gguf", "missing_embedding_length", ConfigError, "tiny.gguf", "'phi3.embedding_length'", "missing")
def _(root):
    return loading(write_gguf(root / "tiny.gguf", skip_metadata={"embedding_length"}))


@case("gguf", "missing_block_count", ConfigError, "tiny.gguf", "'phi3.block_count'", "missing")
def _(root):
    return loading(write_gguf(root / "tiny.gguf", skip_metadata={"block_count"}))


@case("gguf", "tokenizer_merge_that_panics_the_library", TokenizerError, "tiny.gguf",
      "'<|endoftext|><|endoftext|>'", "not in the vocabulary")
def _(root):
    # tokenizers#2094 again, from GGUF metadata: the merge makes a 26-byte token, longer than any.
    merges = [f"{left} {right}" for left, right in MERGES] + ["<|endoftext|> <|endoftext|>"]
    path = write_gguf(root / "tiny.gguf", merges=merges)
    return Attempt(api=lambda: minphi3.load_tokenizer(path), cli=load_args(path))


# ================================================================================================
# tokenizer.json (next to a valid model)
# ================================================================================================


def tokenizer_folder(root: Path, text: str | None = None, spec: dict | None = None, missing: bool = False) -> Attempt:
    folder = write_model(root / "model")
    path = folder / "tokenizer.json"
    if missing:
        path.unlink()
    elif text is not None:
        path.write_text(text, encoding="utf-8")
    elif spec is not None:
        write_json(path, spec)
    return Attempt(api=lambda: minphi3.load_tokenizer(folder), cli=load_args(folder))


@case("tokenizer", "not_json", TokenizerError, "tokenizer.json", "not valid JSON")
def _(root):
    return tokenizer_folder(root, text='{"model": {"type": "BPE", "vocab": ')


@case("tokenizer", "empty_file", TokenizerError, "tokenizer.json", "not valid JSON")
def _(root):
    return tokenizer_folder(root, text="")


@case("tokenizer", "deeply_nested", TokenizerError, "tokenizer.json", "not valid JSON", "recursion")
def _(root):
    return tokenizer_folder(root, text='{"model": ' + "[" * 200_000 + "]" * 200_000 + "}")


@case("tokenizer", "not_an_object", TokenizerError, "tokenizer.json", "expected a JSON object")
def _(root):
    return tokenizer_folder(root, text='["BPE"]')


@case("tokenizer", "merge_of_unknown_tokens", TokenizerError, "tokenizer.json", "zzqq")
def _(root):
    spec = tokenizer_spec()
    spec["model"]["merges"].append(["zzqq", "qqzz"])
    return tokenizer_folder(root, spec=spec)


@case("tokenizer", "merge_that_panics_the_library", TokenizerError, "tokenizer.json", "'hihi'", "not in the vocabulary")
def _(root):
    # tokenizers#2094: "hi" + "hi" is longer than any vocabulary entry and not in it; the Rust
    # builder writes it past its scratch buffer and panics (a BaseException, and a backtrace).
    spec = tokenizer_spec()
    vocab = {"h": 0, "i": 1, "hi": 2}
    spec["model"].update(vocab=vocab, merges=[["h", "i"], ["hi", "hi"]])
    spec["added_tokens"] = []
    return tokenizer_folder(root, spec=spec)


@case("tokenizer", "chat_template_is_a_fifo", TokenizerError, "x.jinja", "not a regular file")
def _(root):
    # Reading a FIFO blocks until something writes to it: refused unread, not waited on.
    import os

    attempt = tokenizer_folder(root)
    folder = Path(attempt.cli[2])
    (folder / "additional_chat_templates").mkdir()
    os.mkfifo(folder / "additional_chat_templates" / "x.jinja")
    return attempt


@case("tokenizer", "missing_file", TokenizerError, "tokenizer.json", "file not found")
def _(root):
    return tokenizer_folder(root, missing=True)


# ================================================================================================
# generation (a valid model and tokenizer, an impossible request)
# ================================================================================================


def generation(root: Path, ids, cli_extra=(), prompt: str = "hi", config: dict | None = None, **kwargs) -> Attempt:
    """API: minphi3.generate(load(folder), ids, **kwargs); CLI: generate --model folder prompt cli_extra."""
    folder = write_model(root / "model", config=config)

    def api():
        return minphi3.generate(minphi3.load(folder), ids, **kwargs)

    return Attempt(api=api, cli=("generate", "--model", str(folder), prompt, *cli_extra))


@case("generation", "empty_prompt", GenerationError, "empty")
def _(root):
    return generation(root, [[]], prompt="")


@case("generation", "id_out_of_range", GenerationError, "token id", "out of range", "vocab_size 64")
def _(root):
    # The CLI: a tokenizer with 263 tokens next to a model of 64 ("hi" is id 259).
    config = dict(TINY_CONFIG, vocab_size=64, pad_token_id=0, eos_token_id=1)
    return generation(root, [[5, 300]], config=config)


@case("generation", "prompt_longer_than_context", GenerationError, "context of 64 tokens", "max_position_embeddings")
def _(root):
    return generation(root, [[65] * 70], max_new_tokens=1, prompt="x" * 100, cli_extra=("--max-new-tokens", "1"))


@case("generation", "prompt_plus_new_tokens_past_context", GenerationError, "context of 64 tokens")
def _(root):
    return generation(root, [[65] * 10], max_new_tokens=60, cli_extra=("--max-new-tokens", "64"))  # "hi" is 1 token


@case("generation", "cache_needs_terabytes", ResourceError, "KV cache", "TiB", "available")
def _(root):
    # A context of 2^40 positions is legal; filling 2^40 of them needs 2 x 1 layer x 2 kv heads x 8
    # x 4 bytes = 128 bytes per token: 128 TiB, refused before anything is allocated.
    config = dict(TINY_CONFIG, max_position_embeddings=2**41)
    return generation(root, [[65, 66]], max_new_tokens=2**40, config=config,
                      cli_extra=("--max-new-tokens", str(2**40)))


def sampling_case(name: str, flag: str, value: str, kwargs: dict, *fragments: str):
    @case("generation", name, GenerationError, *fragments)
    def _(root):
        cli_extra = (flag, value, "--max-new-tokens", "4")
        return generation(root, [[65, 66]], do_sample=True, max_new_tokens=4, cli_extra=cli_extra, **kwargs)


sampling_case("negative_temperature", "--temperature", "-1", {"temperature": -1.0}, "temperature", "-1")
sampling_case("nan_temperature", "--temperature", "nan", {"temperature": float("nan")}, "temperature", "nan")
sampling_case("top_p_above_one", "--top-p", "1.5", {"top_p": 1.5}, "top_p", "1.5")
sampling_case("top_p_zero", "--top-p", "0", {"top_p": 0.0}, "top_p", "0")
sampling_case("negative_top_k", "--top-k", "-3", {"top_k": -3}, "top_k", "-3")
sampling_case("min_p_above_one", "--min-p", "2", {"min_p": 2.0}, "min_p", "2")
sampling_case("zero_repetition_penalty", "--repetition-penalty", "0", {"repetition_penalty": 0.0},
              "repetition_penalty", "0")
sampling_case("negative_min_new_tokens", "--min-new-tokens", "-1", {"min_new_tokens": -1}, "min_new_tokens",
              "non-negative integer", "-1")


@case("generation", "zero_max_new_tokens", GenerationError, "max_new_tokens", "positive integer", "0")
def _(root):
    return generation(root, [[65, 66]], max_new_tokens=0, cli_extra=("--max-new-tokens", "0"))


@case("generation", "negative_max_new_tokens", GenerationError, "max_new_tokens", "positive integer", "-5")
def _(root):
    return generation(root, [[65, 66]], max_new_tokens=-5, cli_extra=("--max-new-tokens", "-5"))
