"""GGUF files (llama.cpp, ollama, LM Studio) read into the Phi-3 or the Phi layout.

A GGUF file is one self-describing blob: metadata (the config and the tokenizer, under llama.cpp's
key names), a table of tensors (name, shape, storage type, offset), then the tensor data, often
quantized in blocks. This module turns one into exactly what a Hugging Face `Phi3ForCausalLM` (or,
for phi-1, phi-1.5 and phi-2, `PhiForCausalLM`) checkpoint would hold, so the rest of minphi3 never
knows where the weights came from:

- `read_gguf_checkpoint(path)` -> (config dict as in `config.json`, {Hugging Face name: float array}).
  Architectures:
  * `phi3` (Phi-3, Phi-3.5, Phi-4-mini, phi-4): llama.cpp keeps the fused `attn_qkv` and `ffn_up`
    (= gate_up) tensors, and stores LongRoPE's factor lists as two small tensors
    (`rope_factors_long.weight`, `rope_factors_short.weight`).
  * `llama` (Llama, SmolLM, Mistral-7B...): separate q/k/v and gate/up, fused here into qkv_proj and
    gate_up_proj. llama.cpp's converter permutes the rows of q and k (it rotates adjacent pairs, the
    Hugging Face models rotate halves); `unpermute_rows` undoes it. The two architectures compute the
    same function once this is done: Phi-3 *is* Llama with fused projections (and optional
    LongRoPE, partial rotary and sliding window, none of which a `llama` file uses).
  * `phi2` (phi-1, phi-1.5, phi-2): mapped onto `PhiForCausalLM`, not Phi-3. Every projection and
    norm has a bias; q/k/v come fused (`attn_qkv`, from the original phi-2 `Wqkv`, rows q | k | v)
    or separate (`attn_q`, `attn_k`, `attn_v`, from the Hugging Face `q_proj`...), and are split
    or kept as `q_proj`, `k_proj`, `v_proj`. llama.cpp rotates halves for phi2, as Hugging Face
    does, so nothing is permuted. See `PHI2_NAMES` for the whole name map.
- `load_gguf_tokenizer(path)` -> `minphi3.tokenizer.Tokenizer`, rebuilt from `tokenizer.ggml.*`:
  byte-level BPE (`gpt2`) and SentencePiece-style BPE with byte fallback (`llama`), their special
  tokens and chat template. The pipeline mirrors transformers' GGUF tokenizer (see the tokenizer
  section for the one place where minphi3 follows llama.cpp instead).

Every tensor is dequantized with `gguf.quants.dequantize` (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, the K-quants, the IQ types, ...). Before the `gguf` package is trusted with any offset,
`check_structure` walks the header and checks every length, count and tensor extent against the file
size, so a truncated or corrupt file gives a `CheckpointError` that names the file and what is wrong
instead of an exception from deep inside NumPy, an out-of-bounds read or a hang.
"""

from __future__ import annotations

import functools
import math
import struct
from pathlib import Path

import numpy as np

from .checkpoint import refuse_special_file
from .errors import CheckpointError, ConfigError, TokenizerError

SUPPORTED_ARCHITECTURES = ("phi3", "llama", "phi2")


# ================================================================================================
# The file: structure check, metadata, tensor table
# ================================================================================================

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
# Metadata value types (gguf.GGUFValueType): fixed sizes; 8 is a string, 9 an array.
_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Reads little-endian values from an open file, refusing any read past its end."""

    def __init__(self, handle, size: int, path: Path):
        self.handle, self.size, self.path, self.pos = handle, size, path, 0

    def need(self, nbytes: int, what: str) -> None:
        if nbytes < 0 or self.pos + nbytes > self.size:
            raise CheckpointError(
                f"{self.path}: GGUF file is truncated or corrupt: {what} needs {nbytes} bytes at offset "
                f"{self.pos}, but the file has {self.size} bytes"
            )

    def skip(self, nbytes: int, what: str) -> None:
        self.need(nbytes, what)
        self.pos += nbytes

    def unpack(self, fmt: str, what: str):
        nbytes = struct.calcsize(fmt)
        self.need(nbytes, what)
        self.handle.seek(self.pos)
        self.pos += nbytes
        return struct.unpack(fmt, self.handle.read(nbytes))

    def string(self, what: str) -> bytes:
        (length,) = self.unpack("<Q", f"the length of {what}")
        self.need(length, what)
        self.handle.seek(self.pos)
        self.pos += length
        return self.handle.read(length)


def _skip_value(cur: _Cursor, value_type: int, key: str, depth: int = 0) -> None:
    """Move past one metadata value of `value_type`, checking every length against the file size."""
    if value_type in _VALUE_SIZES:
        cur.skip(_VALUE_SIZES[value_type], f"the value of {key!r}")
    elif value_type == _STRING:
        (length,) = cur.unpack("<Q", f"the length of {key!r}")
        cur.skip(length, f"the string value of {key!r}")
    elif value_type == _ARRAY and depth == 0:
        item_type, count = cur.unpack("<IQ", f"the array header of {key!r}")
        if item_type in _VALUE_SIZES:
            cur.skip(count * _VALUE_SIZES[item_type], f"the {count} array items of {key!r}")
        elif item_type == _STRING:
            cur.need(count * 8, f"the {count} strings of {key!r}")  # each is at least its length field
            for _ in range(count):
                (length,) = cur.unpack("<Q", f"a string length in {key!r}")
                cur.skip(length, f"a string in {key!r}")
        else:
            raise CheckpointError(f"{cur.path}: GGUF metadata {key!r} holds an array of unsupported type {item_type}")
    else:
        raise CheckpointError(f"{cur.path}: GGUF metadata {key!r} has unknown value type {value_type}")


def check_structure(path) -> None:
    """Walk a GGUF file's header and tensor table; raise CheckpointError on anything inconsistent.

    Checks: the magic bytes and version, that every key, string and array fits in the file, that the
    tensor table is well formed (at most 4 dims, known storage types, rows a whole number of blocks),
    and that every tensor's data lies inside the file. Reads only the header, never the tensor data.
    """
    import gguf  # noqa: PLC0415 - heavy import, only when a GGUF file is opened

    path = Path(path)
    refuse_special_file(path)
    try:
        size = path.stat().st_size
        handle = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open the GGUF file ({exc.strerror or exc})") from None
    with handle:
        cur = _Cursor(handle, size, path)
        cur.need(4, "the magic bytes")
        magic = handle.read(4)
        if magic != GGUF_MAGIC:
            raise CheckpointError(
                f"{path}: not a GGUF file: it starts with {magic!r}, a GGUF file starts with {GGUF_MAGIC!r}"
            )
        cur.pos = 4
        (version,) = cur.unpack("<I", "the version")
        if version not in GGUF_VERSIONS:
            raise CheckpointError(
                f"{path}: GGUF version {version} is not supported (expected one of {GGUF_VERSIONS}; "
                "big-endian files are not supported either)"
            )
        tensor_count, kv_count = cur.unpack("<QQ", "the tensor and metadata counts")
        # Each metadata entry needs at least 12 bytes, each tensor entry at least 28: a cheap bound
        # that stops a corrupt count from looping for ever.
        cur.need(kv_count * 12 + tensor_count * 28, f"{kv_count} metadata entries and {tensor_count} tensors")
        alignment = 32
        for _ in range(kv_count):
            key = cur.string("a metadata key").decode("utf-8", errors="replace")
            (value_type,) = cur.unpack("<I", f"the type of {key!r}")
            if key == "general.alignment" and value_type == 4:
                (alignment,) = cur.unpack("<I", "general.alignment")
                if alignment == 0 or alignment & (alignment - 1):
                    raise CheckpointError(f"{path}: general.alignment is {alignment}, not a power of two")
            else:
                _skip_value(cur, value_type, key)
        tensors = []
        for _ in range(tensor_count):
            name = cur.string("a tensor name").decode("utf-8", errors="replace")
            (n_dims,) = cur.unpack("<I", f"the rank of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise CheckpointError(f"{path}: tensor {name!r} has {n_dims} dimensions (expected 1 to {MAX_DIMS})")
            dims = cur.unpack(f"<{n_dims}Q", f"the shape of tensor {name!r}")
            ggml_type, offset = cur.unpack("<IQ", f"the type and offset of tensor {name!r}")
            tensors.append((name, dims, ggml_type, offset))
        data_start = -(-cur.pos // alignment) * alignment
    for name, dims, ggml_type, offset in tensors:
        try:
            qtype = gguf.GGMLQuantizationType(ggml_type)
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise CheckpointError(f"{path}: tensor {name!r} has unknown ggml storage type {ggml_type}") from None
        if dims[0] % block_size:
            raise CheckpointError(
                f"{path}: tensor {name!r} has rows of {dims[0]} values, not a whole number of "
                f"{qtype.name} blocks of {block_size}"
            )
        nbytes = math.prod(dims) // block_size * type_size
        if data_start + offset + nbytes > size:
            raise CheckpointError(
                f"{path}: GGUF file is truncated: tensor {name!r} ({qtype.name}, shape {list(reversed(dims))}) "
                f"needs bytes {data_start + offset}..{data_start + offset + nbytes}, but the file has {size} bytes"
            )


@functools.cache
def plain_bytes_reader():
    """`gguf.GGUFReader`, reading its memory map through a plain ndarray view of it.

    The reader slices its `data` (an `np.memmap`) once per string and per value, and a memmap's
    slicing runs Python code (`memmap.__getitem__`, `__array_finalize__`) each time: two thirds
    of the time to parse a 49k-token vocabulary (3.1 s against 1.0 s for the demo file) and a
    good part of dequantizing. A plain view of the same mapping slices in C; the file is mapped
    once all the same (the view keeps the map alive), and every value read is the same.
    """
    import gguf  # noqa: PLC0415

    class PlainBytesReader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain_bytes

        @data.setter
        def data(self, mapped):
            self._plain_bytes = mapped.view(np.ndarray)

    return PlainBytesReader


def open_gguf(path):
    """A `gguf.GGUFReader` over `path`, after `check_structure`; every failure is a CheckpointError."""
    path = Path(path)
    check_structure(path)
    try:
        return plain_bytes_reader()(path)
    except Exception as exc:  # the reader raises ValueError, KeyError, IndexError... on bad input
        raise CheckpointError(f"{path}: cannot read the GGUF file: {type(exc).__name__}: {exc}") from None


def read_gguf(path) -> tuple[object, dict]:
    """(reader, metadata) for `path`. Parsing a vocabulary of 50k strings takes the gguf reader
    about a second, so the last two files read are kept (keyed by path, size and modification time):
    loading a model and then its tokenizer from one file parses it once."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open the GGUF file ({exc.strerror or exc})") from None
    return _read_gguf_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _read_gguf_cached(path: str, size: int, mtime_ns: int) -> tuple[object, dict]:
    reader = open_gguf(path)
    return reader, read_metadata(reader, path)


def read_metadata(reader, path) -> dict:
    """All metadata as plain Python values: {key: int | float | bool | str | list}.

    float32 scalars come back as the shortest decimal that rounds to them (1e-05, not
    9.999999747378752e-06), as the config.json they were written from said.
    """
    import gguf  # noqa: PLC0415

    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            value = field.contents()
            if field.types == [gguf.GGUFValueType.FLOAT32]:
                # The shortest decimal that is this float32: llama.cpp stored 1e-5 as float32, and
                # config.json should read 1e-05 again, not 9.999999747378752e-06.
                value = float(str(np.float32(value)))
            metadata[key] = value
        except Exception as exc:  # invalid UTF-8 in a string, an unreadable array
            raise CheckpointError(f"{path}: cannot decode GGUF metadata {key!r}: {type(exc).__name__}: {exc}") from None
    return metadata


def tensor_table(reader) -> dict:
    """{GGUF tensor name: reader tensor}; `.shape` is ggml order (fastest dim first), `.data` raw."""
    return {tensor.name: tensor for tensor in reader.tensors}


def dequantize(tensor, path, dtype=np.float32) -> np.ndarray:
    """One GGUF tensor as an array of `dtype` in PyTorch order ([out, in] for a matrix).

    GGUF lists dims fastest-first (ne0 = in_features); the reader's `.data` already has them
    reversed, and `gguf.quants.dequantize` expands each row of blocks into its values.
    """
    from gguf.quants import dequantize as gguf_dequantize  # noqa: PLC0415

    try:
        if tensor.tensor_type.name == "F64":  # stored as values; gguf.quants has no entry for it
            values = tensor.data
        else:
            values = gguf_dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:  # what gguf.quants raises for a type it has no dequantizer for
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which the gguf package "
            "cannot dequantize; re-quantize the model with another type (Q8_0, Q4_K, Q6_K, F16...)"
        ) from None
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot dequantize tensor {tensor.name!r}: {type(exc).__name__}: {exc}"
        ) from None
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    # A copy in every case: an F32 tensor comes back as a view of the memory-mapped file.
    return np.array(values, dtype=dtype, copy=True).reshape(shape)


# ================================================================================================
# The config: GGUF metadata -> a config.json dict (Phi3ForCausalLM, or PhiForCausalLM for phi2)
# ================================================================================================


def _key(metadata: dict, key: str, path, required: bool = True, default=None):
    """metadata[key], or a ConfigError naming the file and the key when it is required and absent."""
    if key in metadata:
        return metadata[key]
    if required:
        raise ConfigError(f"{path}: GGUF metadata is missing the required key {key!r}")
    return default


def _positive_int(metadata: dict, key: str, path, default=None) -> int:
    value = _key(metadata, key, path, required=default is None, default=default)
    if isinstance(value, list):  # some files give a per-layer list; minphi3 needs one value
        if not value or len(set(value)) != 1:
            raise ConfigError(
                f"{path}: GGUF metadata {key!r} varies per layer ({value[:8]}...), which minphi3 cannot express"
            )
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{path}: GGUF metadata {key!r} should be a positive integer, found {value!r}")
    return value


def _positive_float(metadata: dict, key: str, path, default=None) -> float:
    value = _key(metadata, key, path, required=default is None, default=default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ConfigError(f"{path}: GGUF metadata {key!r} should be a positive number, found {value!r}")
    return float(value)


def gguf_architecture(metadata: dict, path) -> str:
    """`general.architecture`, checked against what minphi3 can map onto Phi-3 or Phi."""
    arch = _key(metadata, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{path}: GGUF architecture {arch!r} is not supported: minphi3 reads phi3 and llama "
            "(mapped onto the Phi-3 layout) and phi2 (the Phi layout of phi-1, phi-1.5 and phi-2)"
        )
    return arch


def _token_id(metadata: dict, name: str, error=ConfigError):
    """tokenizer.ggml.{name}_token_id, or None when absent or not an integer; a negative id
    (which Python's indexing would read from the end of the token list) is an `error`."""
    value = metadata.get(f"tokenizer.ggml.{name}_token_id")
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    if value < 0:
        raise error(f"GGUF key 'tokenizer.ggml.{name}_token_id' is {value}: a token id must be >= 0")
    return int(value)


def rotary_factor(rotary_dim: int, head_dim: int) -> float:
    """partial_rotary_factor for `rotary_dim` rotating dims of `head_dim`.

    Readers recover the dims as int(head_dim * factor); for a few sizes (12 of 47, 30 of 176)
    rotary_dim / head_dim times head_dim lands one ulp below rotary_dim and would truncate to one
    dim less. The factor is then nudged up by one ulp, so that the product is rotary_dim again.
    """
    factor = rotary_dim / head_dim
    if int(head_dim * factor) < rotary_dim:
        factor = float(np.nextafter(factor, 2.0))
    return factor


def gguf_config(metadata: dict, tensors: dict, path) -> dict:
    """The `config.json` of the model this file describes.

    `phi3` and `llama` files give a Phi3ForCausalLM, `phi2` files a PhiForCausalLM. Sizes come from
    `{arch}.*` metadata; the vocabulary size from the embedding's rows; tied embeddings when the
    file has no `output.weight`; `partial_rotary_factor = rope.dimension_count / head_dim`
    (phi-2: 32 / 80 = 0.4); rope base `rope.freq_base`, 10000 where absent (llama.cpp writes
    none for phi2); LongRoPE from the `rope_factors_*` tensors (phi3 only).
    """
    arch = gguf_architecture(metadata, path)
    k = f"{arch}."
    hidden = _positive_int(metadata, k + "embedding_length", path)
    heads = _positive_int(metadata, k + "attention.head_count", path)
    kv_heads = _positive_int(metadata, k + "attention.head_count_kv", path, default=heads)
    context = _positive_int(metadata, k + "context_length", path)
    if hidden % heads:
        raise ConfigError(f"{path}: {k}embedding_length {hidden} is not divisible by {k}attention.head_count {heads}")
    if heads % kv_heads:
        raise ConfigError(
            f"{path}: {k}attention.head_count {heads} is not a multiple of {k}attention.head_count_kv {kv_heads}"
        )
    head_dim = hidden // heads
    key_length = metadata.get(k + "attention.key_length", head_dim)
    if key_length != head_dim:
        raise ConfigError(
            f"{path}: {k}attention.key_length is {key_length!r} but embedding_length / head_count is {head_dim}; "
            "minphi3 needs head_dim = hidden / heads"
        )
    rotary_dim = _positive_int(metadata, k + "rope.dimension_count", path, default=head_dim)
    if rotary_dim > head_dim or rotary_dim % 2:
        raise ConfigError(
            f"{path}: {k}rope.dimension_count {rotary_dim} should be even and at most head_dim {head_dim}"
        )
    if arch == "llama" and rotary_dim != head_dim:
        # llama.cpp rotates adjacent pairs of the first n_rot rows of each head, as its converter
        # interleaved them; undoing that interleave over whole heads moves other dims into place.
        raise ConfigError(
            f"{path}: llama.rope.dimension_count {rotary_dim} is less than head_dim {head_dim}: partial "
            "rotary in a llama file is not supported (llama.cpp's llama converter always writes full rotary)"
        )
    scaling_type = metadata.get(k + "rope.scaling.type", "none")
    if scaling_type not in ("none", None) or "rope_freqs.weight" in tensors:
        raise ConfigError(
            f"{path}: rope scaling {scaling_type!r}{' (rope_freqs.weight)' if 'rope_freqs.weight' in tensors else ''} "
            "is not supported: minphi3 knows plain RoPE and (for phi3 files) LongRoPE only"
        )
    if metadata.get(k + "expert_count"):
        raise ConfigError(f"{path}: a mixture-of-experts model ({k}expert_count) is not supported by minphi3")
    embedding = tensors.get("token_embd.weight")
    if embedding is None or len(embedding.shape) != 2:
        raise CheckpointError(f"{path}: GGUF file has no 2-d tensor 'token_embd.weight' (the token embedding)")

    sizes = {
        "vocab_size": int(embedding.shape[1]),
        "hidden_size": hidden,
        "intermediate_size": _positive_int(metadata, k + "feed_forward_length", path),
        "num_hidden_layers": _positive_int(metadata, k + "block_count", path),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
    }
    rope = {
        "rope_theta": _positive_float(metadata, k + "rope.freq_base", path, default=10000.0),
        "partial_rotary_factor": rotary_factor(rotary_dim, head_dim),
        "max_position_embeddings": context,
    }
    rest = {
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _token_id(metadata, "bos"),
        "eos_token_id": _token_id(metadata, "eos"),
        "pad_token_id": _token_id(metadata, "padding"),
        "attention_dropout": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "use_cache": True,
    }
    if arch == "phi2":  # LayerNorm with bias, a GELU MLP, no rope scaling, no window
        return {
            "architectures": ["PhiForCausalLM"],
            "model_type": "phi",
            **sizes,
            "hidden_act": "gelu_new",
            "layer_norm_eps": _positive_float(metadata, k + "attention.layer_norm_epsilon", path),
            "qk_layernorm": False,  # llama.cpp's phi2 has no q/k norm tensors
            **rope,
            "rope_scaling": None,
            **rest,
        }
    window = metadata.get(k + "attention.sliding_window") if arch == "phi3" else None
    config = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        **sizes,
        "hidden_act": "silu",
        "rms_norm_eps": _positive_float(metadata, k + "attention.layer_norm_rms_epsilon", path),
        **rope,
        "original_max_position_embeddings": context,
        "rope_scaling": None,
        # llama.cpp writes 0 for "no window" (phi-4); a llama file never has one.
        "sliding_window": int(window) if isinstance(window, int) and window > 0 else None,
        **rest,
    }
    if arch == "phi3" and ("rope_factors_long.weight" in tensors or "rope_factors_short.weight" in tensors):
        config.update(_longrope(metadata, tensors, config, path))
    return config


def _longrope(metadata: dict, tensors: dict, config: dict, path) -> dict:
    """rope_scaling and original_max_position_embeddings from a phi3 file's LongRoPE tensors."""
    for name in ("rope_factors_long.weight", "rope_factors_short.weight"):
        if name not in tensors:
            raise CheckpointError(f"{path}: GGUF file has LongRoPE factors but no tensor {name!r}")
    original = _positive_int(metadata, "phi3.rope.scaling.original_context_length", path)
    if original < 2:  # the attention factor below divides by log(original)
        raise ConfigError(f"{path}: GGUF key 'phi3.rope.scaling.original_context_length' must be at least 2, found {original}")
    # Stored as float32: each written back as the shortest decimal of that float32 (1.08, not
    # 1.0800000429153442); rope tables cast the factors to float32, so nothing changes numerically.
    scaling = {
        "type": "longrope",
        "short_factor": [float(str(x)) for x in dequantize(tensors["rope_factors_short.weight"], path).ravel()],
        "long_factor": [float(str(x)) for x in dequantize(tensors["rope_factors_long.weight"], path).ravel()],
    }
    # llama.cpp stores the attention factor it computed with the usual formula; keep it only when
    # it says something else, so the config reads like the published one.
    stored = metadata.get("phi3.rope.scaling.attn_factor")
    scale = config["max_position_embeddings"] / original
    default = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
    if isinstance(stored, (int, float)) and not isinstance(stored, bool) and abs(stored - default) > 1e-6:
        scaling["attention_factor"] = float(stored)
    return {"rope_scaling": scaling, "original_max_position_embeddings": original}


# ================================================================================================
# The tensors: llama.cpp names -> Hugging Face Phi-3 (or Phi) names
# ================================================================================================


def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a q or k projection of a `llama` file.

    weight: [n_heads * head_dim, hidden] -> [n_heads * head_dim, hidden]
    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3)...; Hugging Face rotates halves
    (x_j, x_{j + head_dim/2}). Its converter therefore reorders each head's rows from
    [first half | second half] to interleaved [h0, s0, h1, s1, ...]; this puts them back.
    """
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _layer_tensors(arch: str, layer: int, take, config: dict) -> dict:
    """One decoder layer's Phi-3 tensors from a file's `blk.{layer}.*` tensors (`take` dequantizes)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    blk, hf = f"blk.{layer}.", f"model.layers.{layer}."
    out = {
        hf + "input_layernorm.weight": take(blk + "attn_norm.weight", (hidden,)),
        hf + "post_attention_layernorm.weight": take(blk + "ffn_norm.weight", (hidden,)),
        hf + "self_attn.o_proj.weight": take(blk + "attn_output.weight", (hidden, heads * head_dim)),
        hf + "mlp.down_proj.weight": take(blk + "ffn_down.weight", (hidden, inter)),
    }
    if take.has(blk + "attn_qkv.weight"):  # phi3: already fused, rows q | k | v
        qkv = take(blk + "attn_qkv.weight", ((heads + 2 * kv_heads) * head_dim, hidden))
    else:
        q = take(blk + "attn_q.weight", (heads * head_dim, hidden))
        k = take(blk + "attn_k.weight", (kv_heads * head_dim, hidden))
        if arch == "llama":  # phi3 files use the rotate-half layout and are not permuted
            q, k = unpermute_rows(q, heads), unpermute_rows(k, kv_heads)
        qkv = np.concatenate([q, k, take(blk + "attn_v.weight", (kv_heads * head_dim, hidden))])
    out[hf + "self_attn.qkv_proj.weight"] = qkv
    if take.has(blk + "ffn_gate.weight"):  # llama: separate gate and up
        gate = take(blk + "ffn_gate.weight", (inter, hidden))
        out[hf + "mlp.gate_up_proj.weight"] = np.concatenate([gate, take(blk + "ffn_up.weight", (inter, hidden))])
    else:  # phi3: ffn_up is the fused gate_up, rows gate | up
        out[hf + "mlp.gate_up_proj.weight"] = take(blk + "ffn_up.weight", (2 * inter, hidden))
    return out


# llama.cpp's phi2 names (gguf-py MODEL_TENSORS[PHI2]) -> PhiForCausalLM's; each has .weight and .bias.
PHI2_NAMES = {
    "token_embd": "model.embed_tokens",  # weight only
    "blk.N.attn_norm": "model.layers.N.input_layernorm",
    "blk.N.attn_qkv": "model.layers.N.self_attn.{q,k,v}_proj",  # fused, rows q | k | v; or:
    "blk.N.attn_q": "model.layers.N.self_attn.q_proj",
    "blk.N.attn_k": "model.layers.N.self_attn.k_proj",
    "blk.N.attn_v": "model.layers.N.self_attn.v_proj",
    "blk.N.attn_output": "model.layers.N.self_attn.dense",
    "blk.N.ffn_up": "model.layers.N.mlp.fc1",
    "blk.N.ffn_down": "model.layers.N.mlp.fc2",
    "output_norm": "model.final_layernorm",
    "output": "lm_head",  # the bias always; the weight unless tied to token_embd
}


def _phi2_layer_tensors(layer: int, take, config: dict) -> dict:
    """One PhiForCausalLM layer from a phi2 file's `blk.{layer}.*` tensors (`take` dequantizes).

    Every tensor comes with its bias. A fused attn_qkv ([q_width + 2 kv_width, hidden]) is cut
    into q_proj, k_proj and v_proj rows; dequantization works row by row, so the cut is exact.
    """
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    q_width, kv_width = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    blk, hf = f"blk.{layer}.", f"model.layers.{layer}."
    out = {}

    def with_bias(gguf_leaf: str, hf_leaf: str, shape: tuple) -> None:
        out[hf + hf_leaf + ".weight"] = take(blk + gguf_leaf + ".weight", shape)
        out[hf + hf_leaf + ".bias"] = take(blk + gguf_leaf + ".bias", shape[:1])

    with_bias("attn_norm", "input_layernorm", (hidden,))
    if take.has(blk + "attn_qkv.weight"):  # converted from the original phi-2 (`mixer.Wqkv`)
        weight = take(blk + "attn_qkv.weight", (q_width + 2 * kv_width, hidden))
        bias = take(blk + "attn_qkv.bias", (q_width + 2 * kv_width,))
        cuts = [q_width, q_width + kv_width]
        parts = zip(np.split(weight, cuts), np.split(bias, cuts), strict=True)
        for name, (w, b) in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
            out[hf + f"self_attn.{name}.weight"], out[hf + f"self_attn.{name}.bias"] = w, b
    else:  # converted from the Hugging Face PhiForCausalLM
        with_bias("attn_q", "self_attn.q_proj", (q_width, hidden))
        with_bias("attn_k", "self_attn.k_proj", (kv_width, hidden))
        with_bias("attn_v", "self_attn.v_proj", (kv_width, hidden))
    with_bias("attn_output", "self_attn.dense", (hidden, q_width))
    with_bias("ffn_up", "mlp.fc1", (inter, hidden))
    with_bias("ffn_down", "mlp.fc2", (hidden, inter))
    return out


class _Taker:
    """Dequantizes named GGUF tensors on demand, checks their shapes and remembers which were used."""

    def __init__(self, tensors: dict, path, dtype):
        self.tensors, self.path, self.dtype, self.used = tensors, path, dtype, set()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def __call__(self, name: str, shape: tuple) -> np.ndarray:
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: GGUF file has no tensor {name!r} (expected shape {list(shape)})")
        self.used.add(name)
        tensor = self.tensors[name]
        stored = [int(d) for d in reversed(tensor.shape.tolist())]  # checked before any dequantizing
        if stored != list(shape):
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {stored}, expected {list(shape)}")
        return dequantize(tensor, self.path, self.dtype)


def read_gguf_config(path) -> dict:
    """The config.json dict of a GGUF file, without reading any tensor data (for memory checks)."""
    path = Path(path)
    reader, metadata = read_gguf(path)
    return gguf_config(metadata, tensor_table(reader), path)


def read_gguf_checkpoint(path, dtype="float32", progress: bool = False) -> tuple[dict, dict]:
    """Read a GGUF file as a Hugging Face checkpoint: (config dict, {name: array}).

    config: as `config.json` of Phi3ForCausalLM (phi3, llama) or PhiForCausalLM (phi2). tensors:
    Hugging Face names in PyTorch Linear layout [out, in], as arrays of `dtype` (float32 by default;
    dequantization happens in float32): model.embed_tokens.weight [vocab, hidden],
    model.layers.N.self_attn.qkv_proj.weight [(heads + 2 kv_heads) head_dim, hidden] (Phi-3) or
    model.layers.N.self_attn.q_proj.weight [heads head_dim, hidden] and .bias (Phi), ...,
    lm_head.weight [vocab, hidden] unless tied. Tensors are dequantized one at a time (shapes
    checked first), so the peak memory is the output plus one layer's separate q/k/v or gate/up parts.
    """
    path = Path(path)
    dtype = np.dtype(dtype)
    reader, metadata = read_gguf(path)
    tensors = tensor_table(reader)
    config = gguf_config(metadata, tensors, path)
    arch = metadata["general.architecture"]
    take = _Taker(tensors, path, dtype)
    take.used.update(name for name in ("rope_factors_long.weight", "rope_factors_short.weight") if name in tensors)
    hidden, vocab = config["hidden_size"], config["vocab_size"]

    layers = range(config["num_hidden_layers"])
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        layers = tqdm(layers, desc=f"reading {path.name}", unit="layer")
    out = {"model.embed_tokens.weight": take("token_embd.weight", (vocab, hidden))}
    for layer in layers:
        if arch == "phi2":
            out.update(_phi2_layer_tensors(layer, take, config))
        else:
            out.update(_layer_tensors(arch, layer, take, config))
    if arch == "phi2":  # a LayerNorm with bias, and a head with a bias even when its weight is tied
        out["model.final_layernorm.weight"] = take("output_norm.weight", (hidden,))
        out["model.final_layernorm.bias"] = take("output_norm.bias", (hidden,))
    else:
        out["model.norm.weight"] = take("output_norm.weight", (hidden,))
    if not config["tie_word_embeddings"]:
        out["lm_head.weight"] = take("output.weight", (vocab, hidden))
    if arch == "phi2":
        out["lm_head.bias"] = take("output.bias", (vocab,))
    unused = sorted(set(tensors) - take.used)
    if unused:
        layout, unsupported = (
            ("Phi (PhiForCausalLM)", "q/k norms, extra norms or experts")
            if arch == "phi2"
            else ("Phi-3", "biases, extra norms or experts")
        )
        raise CheckpointError(
            f"{path}: GGUF file has tensors that have no place in the {layout} layout: {', '.join(unused[:8])}"
            f"{' ...' if len(unused) > 8 else ''} ({unsupported} are not supported)"
        )
    return config, out


# ================================================================================================
# The tokenizer: tokenizer.ggml.* -> a `tokenizers.Tokenizer`
# ================================================================================================
#
# transformers' GGUF tokenizer (`integrations/gguf/gguf_tokenizer_mapping.py`) is the reference:
# the pipelines below are the ones it builds (compared as tokenizer.json in tests/test_gguf.py),
# without importing transformers. transformers is the oracle here even where llama.cpp differs:
# for `tokenizer.ggml.pre` values it does not know (SmolLM2's "smollm", "starcoder", ...) it uses
# plain GPT-2 splitting, while llama.cpp and SmolLM2's own tokenizer.json isolate every digit
# first. The two differ only on whitespace runs right before a digit ("a  1", "\n\n1." of a
# list); minphi3 gives transformers' ids (tests/test_gguf.py shows both).

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the regex that splits text before byte-level BPE, as transformers 5.23's
# GGUF_PRE_TOKENIZER_SPLITS has them (tests/test_gguf.py compares the two). Others use GPT-2's.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano",
         "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters ("Ġ" is the space)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges recovered from a SentencePiece vocabulary: every split of a token into two tokens,
    best score first (as transformers' `generate_merges`), for files that store scores, not merges."""
    merges = []
    for token, score in scores.items():
        local = [
            (token[:i], token[i:], score) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _file_merges(metadata: dict, path) -> list[tuple[str, str]] | None:
    """tokenizer.ggml.merges as pairs: each entry is two tokens joined by a space, split at the
    first space after its first character, as llama.cpp splits it (`word.find(' ', 1)`)."""
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is None:
        return None
    pairs = []
    for index, merge in enumerate(merges):
        split = merge.find(" ", 1) if isinstance(merge, str) else -1
        if split < 0 or split == len(merge) - 1:
            raise TokenizerError(
                f"{path}: tokenizer.ggml.merges entry {index} is {merge!r}; expected two tokens joined by a space"
            )
        pairs.append((merge[:split], merge[split + 1 :]))
    return pairs


def _byte_level_backend(metadata: dict, path):
    """Byte-level BPE (`tokenizer.ggml.model = gpt2`): GPT-2, SmolLM, Llama 3, Qwen, phi-4..."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415

    from .tokenizer import check_bpe_merges  # noqa: PLC0415 - tokenizer.py imports this module lazily too

    tokens = metadata["tokenizer.ggml.tokens"]
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        (token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))): index
        for index, token in enumerate(tokens)
    }
    merges = _file_merges(metadata, path)
    if merges is None:
        raise TokenizerError(f"{path}: a byte-level BPE tokenizer needs 'tokenizer.ggml.merges', which the file lacks")
    check_bpe_merges({"type": "BPE", "vocab": vocab, "merges": merges}, path)  # before the Rust builder can panic
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    pre = metadata.get("tokenizer.ggml.pre")
    if pre in PRE_TOKENIZER_SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(metadata: dict, path, arch: str):
    """SentencePiece-style BPE with byte fallback (`tokenizer.ggml.model = llama`): Llama 2, Phi-3..."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers  # noqa: PLC0415

    from .tokenizer import check_bpe_merges  # noqa: PLC0415 - tokenizer.py imports this module lazily too

    tokens = metadata["tokenizer.ggml.tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = _file_merges(metadata, path)
    if merges is None:
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise TokenizerError(
                f"{path}: a SentencePiece tokenizer needs 'tokenizer.ggml.merges' or one score per token"
            )
        merges = generate_merges(vocab, dict(zip(tokens, scores, strict=True)))
    # No unk_token in the model (as transformers builds it): every byte has a <0xXX> token to fall back on.
    check_bpe_merges({"type": "BPE", "vocab": vocab, "merges": merges}, path)  # before the Rust builder can panic
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    # llama.cpp prefixes a space unless the file says not to (tokenizer.ggml.add_space_prefix).
    # One exception to "transformers is the oracle": transformers 5.23 ignores that flag and
    # always prefixes; a file that sets it false was converted from a tokenizer that does not
    # prefix, so the file's own rule is kept (the ids then differ from transformers' GGUF reading).
    prefix_space = metadata.get("tokenizer.ggml.add_space_prefix", True) is not False
    if arch == "phi3" and prefix_space:
        # Phi-3's own tokenizer.json: the prefix comes from a normalizer, so "  hi" keeps every space.
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if prefix_space else "never", split=False
        )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _add_special_tokens(backend, metadata: dict, config: dict, byte_level: bool) -> None:
    """CONTROL tokens and the named ones (bos, eos, unk, pad) become special added tokens,
    USER_DEFINED ones plain added tokens: all are matched whole before the text is split.

    In a byte-level vocabulary a "control" token spelled outside the byte alphabet is a llama.cpp
    mislabel and is skipped, as transformers does.
    """
    from tokenizers import AddedToken  # noqa: PLC0415

    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or []
    alphabet = set(_bytes_to_unicode().values()) if byte_level else None
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, types, strict=False)
        if kind == TOKEN_CONTROL and (alphabet is None or set(token) <= alphabet)
    ]
    if control:
        backend.add_special_tokens(control)
    named = [config[name] for name in ("bos_token", "eos_token", "unk_token", "pad_token") if config[name] is not None]
    backend.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in dict.fromkeys(named)])
    vocab = backend.get_vocab()
    user = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, types, strict=False)
        if kind == TOKEN_USER_DEFINED and token in vocab
    ]
    if user:
        backend.add_tokens(user)


def _post_processor(backend, config: dict) -> None:
    """Add BOS / EOS around each encoded text when the file asks for it (add_bos_token, add_eos_token)."""
    from tokenizers import processors  # noqa: PLC0415

    bos, eos = config["bos_token"], config["eos_token"]
    add_bos = bool(config["add_bos_token"]) and bos is not None
    add_eos = bool(config["add_eos_token"]) and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special = ([(bos, backend.token_to_id(bos))] if add_bos else []) + (
        [(eos, backend.token_to_id(eos))] if add_eos else []
    )
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def gguf_tokenizer_parts(path) -> tuple[object, dict]:
    """(tokenizers.Tokenizer, tokenizer_config.json-style dict) rebuilt from a GGUF file's metadata.

    The dict holds bos_token, eos_token, unk_token, pad_token (strings or None), add_bos_token,
    add_eos_token, chat_template (or None) and clean_up_tokenization_spaces.
    """
    path = Path(path)
    _, metadata = read_gguf(path)
    return tokenizer_from_metadata(metadata, path)


def tokenizer_from_metadata(metadata: dict, path) -> tuple[object, dict]:
    """`gguf_tokenizer_parts` on metadata already read."""
    model = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise TokenizerError(
            f"{path}: GGUF file has no tokenizer (missing 'tokenizer.ggml.model' or 'tokenizer.ggml.tokens')"
        )
    arch = metadata.get("general.architecture")

    def token(name):
        index = _token_id(metadata, name, TokenizerError)
        if index is not None and index >= len(tokens):
            raise TokenizerError(f"{path}: tokenizer.ggml.{name}_token_id is {index}, beyond the {len(tokens)} tokens")
        return tokens[index] if index is not None else None

    config = {
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", model == "llama")),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": metadata.get("tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
    }
    try:
        if model == "gpt2":
            backend = _byte_level_backend(metadata, path)
        elif model == "llama":
            backend = _sentencepiece_backend(metadata, path, arch)
        else:
            raise TokenizerError(
                f"{path}: GGUF tokenizer model {model!r} is not supported (minphi3 rebuilds 'gpt2' byte-level BPE "
                "and 'llama' SentencePiece-style BPE)"
            )
        _add_special_tokens(backend, metadata, config, byte_level=model == "gpt2")
        _post_processor(backend, config)
    except TokenizerError:
        raise
    except BaseException as exc:  # tokenizers raises Rust panics as BaseException subclasses
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise TokenizerError(
            f"{path}: cannot rebuild the tokenizer from GGUF metadata: {type(exc).__name__}: {exc}"
        ) from None
    return backend, config


def load_gguf_tokenizer(path):
    """A `minphi3.tokenizer.Tokenizer` rebuilt from a GGUF file's `tokenizer.ggml.*` metadata."""
    from .tokenizer import Tokenizer  # noqa: PLC0415 - tokenizer.py imports this module for .gguf paths

    backend, config = gguf_tokenizer_parts(path)
    return Tokenizer(backend, config, source=str(path), generation_config=gguf_generation_config(path))


# ================================================================================================
# Generation settings
# ================================================================================================

# Turn-end markers of common chat formats; generation stops at whichever the vocabulary has.
CHAT_END_TOKENS = ("<|endoftext|>", "<|end|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>")


def generation_eos_ids(metadata: dict) -> list[int]:
    """The ids generation should stop at: the file's eos (and eot / eom) ids, then its control tokens
    that end a chat turn. Phi-3's chat format also stops at <|assistant|>, as its generation_config.json."""
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    types = metadata.get("tokenizer.ggml.token_type") or []
    ids = [_token_id(metadata, name) for name in ("eos", "eot", "eom")]
    index = {
        token: i for i, token in enumerate(tokens) if i < len(types) and types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    }
    ends = list(CHAT_END_TOKENS) + (["<|assistant|>"] if "<|end|>" in index else [])
    ids += [index.get(token) for token in ends]
    return list(dict.fromkeys(i for i in ids if i is not None))


def gguf_generation_config(path) -> dict:
    """generation_config.json of a GGUF file: bos, pad, and the eos ids generation stops at."""
    _, metadata = read_gguf(path)
    eos = generation_eos_ids(metadata)
    out = {"bos_token_id": _token_id(metadata, "bos"), "pad_token_id": _token_id(metadata, "padding")}
    if eos:
        out["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    return {key: value for key, value in out.items() if value is not None}
