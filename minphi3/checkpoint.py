"""Reading weights: safetensors files (single or sharded), checked before a byte is trusted.

The safetensors format is an 8-byte little-endian header length N, N bytes of JSON
(`name -> {dtype, shape, data_offsets}`), then the raw little-endian tensor bytes. This module
parses it itself, because NumPy has no bfloat16 (Phi checkpoints are stored in bf16) and because
files from strangers must be checked: header size, JSON, dtypes, shapes, offsets that tile the
data exactly with no overlap and no trailing bytes. Tensors are read one at a time straight from
the file into their final dtype, so loading never holds a second full copy of the weights.

Pickle checkpoints (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`) are refused and never opened:
unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference limit, against JSON bombs
# Stored dtype -> (NumPy dtype of the raw words, bytes per element). BF16 is read as uint16 words.
STORED_DTYPES = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "F64": (np.dtype("<f8"), 8),
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
READ_CHUNK_ELEMENTS = 16 * 1024 * 1024  # convert 16M elements at a time: bounded temporary memory


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int
    path: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# ---- finding the files ------------------------------------------------------------------------
def checkpoint_files(folder) -> list[Path]:
    """The safetensors files of a checkpoint folder: the shards named by
    `model.safetensors.index.json`, or the single `model.safetensors` (or the only *.safetensors)."""
    folder = Path(folder)
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        return _files_from_index(index_path)
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates
    refuse_pickle_only(folder)
    if len(candidates) > 1:
        raise CheckpointError(
            f"{folder}: {len(candidates)} *.safetensors files but no model.safetensors.index.json to say which tensor is where"
        )
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json found")


def refuse_special_file(path: Path) -> None:
    """Raise CheckpointError when `path` exists but is not a regular file: reading a FIFO blocks
    until something writes to it, and a device never ends."""
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a FIFO, socket or device)"
        raise CheckpointError(f"{path}: {kind}; expected a weight file")


def refuse_pickle_only(folder) -> None:
    """Raise CheckpointError when the only weights in `folder` are pickles (`pytorch_model.bin`...).

    The files are only listed by name, never opened. `minphi3.load` calls this before reading
    config.json, so a folder holding nothing but a pickle is refused for what it is.
    """
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickle weights found ({', '.join(pickles)}); minphi3 never unpickles a "
            "checkpoint because unpickling can run arbitrary code. Convert it to safetensors on a trusted "
            "machine (for example `model.save_pretrained(out_dir, safe_serialization=True)` in transformers)"
        )


def _files_from_index(index_path: Path) -> list[Path]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, bad UTF-8, 5000-digit numbers
        raise CheckpointError(f"{index_path}: not a valid JSON index ({exc})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: expected an object with a non-empty 'weight_map'")
    files = []
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard:
            # A shard outside the folder ("../x", "/etc/x") is never opened.
            raise CheckpointError(f"{index_path}: tensor {name!r} names shard {shard!r}, which is not a file in this folder")
        if shard not in files:
            files.append(shard)
    paths = [index_path.parent / shard for shard in files]
    for path in paths:
        if not path.is_file():
            raise CheckpointError(f"{index_path}: shard {path.name} is named in the index but missing from {index_path.parent}")
    return paths


# ---- the header ---------------------------------------------------------------------------------
def read_safetensors_header(path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header; -> name -> TensorInfo (absolute byte offsets).

    Checks: file at least 8 bytes; 0 < N <= 100 MiB and 8 + N <= file size; the header is a JSON
    object without duplicate keys; every dtype supported; shapes non-negative integers; offsets
    two integers with begin <= end inside the data; end - begin == numel * itemsize; the ranges
    tile the data exactly (no gap, no overlap, no trailing bytes).
    """
    path = Path(path)
    refuse_special_file(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: {file_size} bytes is too short for a safetensors file (8-byte header length expected)")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size == 0 or header_size > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header length {header_size} is outside 1..{MAX_HEADER_BYTES} bytes")
            if 8 + header_size > file_size:
                raise CheckpointError(
                    f"{path}: header length {header_size} runs past the end of the {file_size}-byte file (truncated download?)"
                )
            header_bytes = handle.read(header_size)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from None
    header = _parse_header_json(path, header_bytes)
    data_start = 8 + header_size
    return _tensor_infos(path, header, data_start, file_size - data_start)


def _parse_header_json(path: Path, header_bytes: bytes) -> dict:
    def no_duplicates(pairs):
        keys = [key for key, _ in pairs]
        if len(keys) != len(set(keys)):
            duplicate = next(key for key in keys if keys.count(key) > 1)
            raise CheckpointError(f"{path}: the header names {duplicate!r} twice")
        return dict(pairs)

    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: the header is not UTF-8 text") from None
    if not text.lstrip().startswith("{"):
        raise CheckpointError(f"{path}: the header is not a JSON object (not a safetensors file?)")
    try:
        header = json.loads(text, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, or a number of 5000 digits
        raise CheckpointError(f"{path}: the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object")
    return header


def _tensor_infos(path: Path, header: dict, data_start: int, data_size: int) -> dict[str, TensorInfo]:
    infos = {}
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: '__metadata__' must map strings to strings")
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path}: tensor {name!r}: expected an object with dtype, shape, data_offsets")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in STORED_DTYPES:  # a list is unhashable: check the type first
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {dtype!r}; supported: {', '.join(STORED_DTYPES)}"
            )
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {shape!r}; expected a list of non-negative integers")
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise CheckpointError(f"{path}: tensor {name!r} has data_offsets {offsets!r}; expected [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise CheckpointError(
                f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] outside the {data_size}-byte data section (truncated file?)"
            )
        expected = math.prod(shape) * STORED_DTYPES[dtype][1]
        if end - begin != expected:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({dtype} {shape}) needs {expected} bytes but its data_offsets span {end - begin}"
            )
        infos[name] = TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end, path)
    _check_tiling(path, infos, data_start, data_size)
    return infos


def _check_tiling(path: Path, infos: dict[str, TensorInfo], data_start: int, data_size: int) -> None:
    """The byte ranges must cover the data section exactly: sorted, each starting where the last ended."""
    position = data_start
    for info in sorted(infos.values(), key=lambda i: (i.begin, i.end)):
        if info.begin != position:
            problem = "overlaps the previous tensor" if info.begin < position else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {info.name!r} {problem} (byte {info.begin - data_start})")
        position = info.end
    if position != data_start + data_size:
        raise CheckpointError(f"{path}: {data_start + data_size - position} trailing bytes after the last tensor")


# ---- the data -----------------------------------------------------------------------------------
def stored_tensors_equal(a: TensorInfo, b: TensorInfo) -> bool:
    """Whether two stored tensors hold the same values (`torch.equal` after loading).

    Stored alike: compared byte for byte, a chunk at a time, so a large embedding needs no copy
    in memory. Stored in different dtypes: compared as float64 values.
    """
    if tuple(a.shape) != tuple(b.shape):
        return False
    if a.dtype != b.dtype:
        return bool(np.array_equal(read_tensor(a, np.float64), read_tensor(b, np.float64)))
    with open(a.path, "rb") as first, open(b.path, "rb") as second:
        first.seek(a.begin)
        second.seek(b.begin)
        remaining = a.end - a.begin
        while remaining > 0:
            size = min(remaining, 1 << 24)
            if first.read(size) != second.read(size):
                return False
            remaining -= size
    return True


def read_tensor(info: TensorInfo, dtype, handle=None, out=None) -> np.ndarray:
    """One tensor from its file, converted to `dtype` (float32 | float64 | float16), C-contiguous.

    -> [*info.shape]: `out` when given (a C-contiguous host array of that shape and dtype, for
    example a view into the model's one weight buffer), else a new array.
    BF16 words are widened exactly: a bfloat16 is the top 16 bits of a float32, so a word shifted
    left by 16 bits is the float32's bit pattern. The file is read in chunks into one reused
    buffer (`readinto`, no new bytes object per chunk) and each chunk is widened in one pass, so
    the temporary memory is bounded whatever the tensor size.
    """
    dtype = np.dtype(dtype)
    raw_dtype, _itemsize = STORED_DTYPES[info.dtype]
    if out is None:
        out = np.empty(info.shape, dtype=dtype)
    elif out.shape != info.shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {dtype} array of shape {info.shape}")
    flat = out.reshape(-1)  # a view: out is contiguous
    chunk = np.empty(min(READ_CHUNK_ELEMENTS, info.numel), dtype=raw_dtype)
    own_handle = handle is None
    handle = open(info.path, "rb") if own_handle else handle
    try:
        handle.seek(info.begin)
        for start in range(0, info.numel, READ_CHUNK_ELEMENTS):
            words = chunk[: min(READ_CHUNK_ELEMENTS, info.numel - start)]
            _read_exact_into(handle, words, info)
            _convert_into(flat[start : start + words.shape[0]], words, info.dtype)
    finally:
        if own_handle:
            handle.close()
    return out


def _read_exact_into(handle, words: np.ndarray, info: TensorInfo) -> None:
    """Fill `words` with the next bytes of the file."""
    if handle.readinto(memoryview(words).cast("B")) != words.nbytes:
        raise CheckpointError(f"{info.path}: tensor {info.name!r} is cut short (file truncated while reading?)")


def _convert_into(out: np.ndarray, words: np.ndarray, stored: str) -> None:
    """Write stored words into `out` (any float dtype)."""
    if stored != "BF16":
        out[...] = words
        return
    if out.dtype == np.float32:
        np.left_shift(words, 16, out=out.view(np.uint32), dtype=np.uint32)
        return
    widened = np.empty(words.shape, dtype=np.float32)
    _convert_into(widened, words, "BF16")
    out[...] = widened


def read_all_headers(files: list[Path]) -> dict[str, TensorInfo]:
    """Headers of every shard merged; a tensor named in two shards is an error."""
    merged: dict[str, TensorInfo] = {}
    for path in files:
        for name, info in read_safetensors_header(path).items():
            if name in merged:
                raise CheckpointError(f"{path}: tensor {name!r} also appears in {merged[name].path.name}")
            merged[name] = info
    return merged


def check_tensor_names(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], source, ignored=()) -> None:
    """Every expected tensor present with its shape, nothing unexpected.

    found, expected: name -> shape. `ignored` names may be present or not (a tied lm_head).
    """
    missing = [name for name in expected if name not in found]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{source}: missing tensor {', '.join(missing[:3])}{more} (does config.json match these weights?)")
    unexpected = [name for name in found if name not in expected and name not in ignored]
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise CheckpointError(f"{source}: unexpected tensor {', '.join(unexpected[:3])}{more} (does config.json match these weights?)")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {list(found[name])}, expected {list(shape)} from config.json")


def file_size_total(files: list[Path]) -> int:
    return sum(os.path.getsize(p) for p in files)
