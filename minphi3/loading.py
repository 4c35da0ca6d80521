"""`minphi3.load`: a checkpoint folder (config.json + safetensors) or a GGUF file -> a Model.

Loading reads one tensor at a time into its final dtype and, for the GPU, uploads it at once, so
host memory never holds a second full copy of the weights. Before anything is read, the memory
the weights need is compared with what the machine has.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .backend import available_memory, get_array_module, is_host_array, resolve_dtype, to_device
from .cache import cache_nbytes
from .checkpoint import (
    PICKLE_SUFFIXES,
    check_tensor_names,
    checkpoint_files,
    read_all_headers,
    read_tensor,
    refuse_pickle_only,
    stored_tensors_equal,
)
from .config import ModelConfig, config_from_dict, load_config
from .errors import CheckpointError, ConfigError, ResourceError
from .model import Model, parameter_shapes


def load(path, backend: str = "numpy", dtype: str = "float32", progress: bool = False) -> Model:
    """Load a Phi-3-family (or Phi) checkpoint.

    path: a Hugging Face folder (config.json + model.safetensors or a sharded index) or a .gguf file.
    backend: "numpy" (CPU) or "cupy" (GPU). dtype: "float32" | "float64" | "float16".
    progress: show a progress bar (tqdm) while reading tensors.
    """
    xp = get_array_module(backend)
    dtype = resolve_dtype(dtype)
    path = resolve_model_path(path)
    config = read_model_config(path)
    check_memory(config, dtype, xp)
    try:
        if is_gguf_path(path):
            return _load_gguf(path, xp, dtype, progress)
        return _load_safetensors(path, config, xp, dtype, progress)
    except MemoryError:  # the check above passed, but the memory went elsewhere meanwhile
        pass  # raised below, outside this block: the MemoryError's frames (and the tensors read) are freed
    raise ResourceError(
        f"{path}: ran out of memory loading {human_bytes(weights_nbytes(config, dtype))} of weights at "
        f"{np.dtype(dtype).name}; use a smaller dtype or free memory"
    )


def _load_safetensors(path: Path, config: ModelConfig, xp, dtype, progress: bool) -> Model:
    files = checkpoint_files(path)
    infos = read_all_headers(files)
    tied = config.tie_word_embeddings
    config, infos = resolve_tied_head(config, infos)
    if tied and not config.tie_word_embeddings:
        check_memory(config, dtype, xp)  # one matrix more than `load` checked for
    expected = parameter_shapes(config)
    check_tensor_names({name: info.shape for name, info in infos.items()}, expected, path)
    params = read_parameters(infos, expected, dtype, xp, progress, path.name)
    model = Model(config, params, xp=xp, dtype=dtype)
    model.source = path
    model.generation_config = generation_settings(read_generation_config(path), config)
    model.tokenizer_size = tokenizer_size(path)
    return model


def resolve_tied_head(config: ModelConfig, infos: dict) -> tuple[ModelConfig, dict]:
    """What a tied config (tie_word_embeddings) means for the tensors stored, as transformers 5.23
    reads it (`PreTrainedModel.tie_weights` during from_pretrained). -> (config, infos)

    - only the embedding stored: the head is the embedding (the usual case);
    - only lm_head.weight stored: the embedding is the head, read from lm_head.weight;
    - both stored and equal: tied, the copy is not read;
    - both stored and different: the config is wrong about the file, so they are not tied and the
      stored head is used (transformers warns; minphi3 answers the same numbers).
    """
    head, embedding = "lm_head.weight", "model.embed_tokens.weight"
    if not config.tie_word_embeddings or head not in infos:
        return config, infos
    infos = dict(infos)
    if embedding not in infos:
        infos[embedding] = infos.pop(head)
        return config, infos
    if stored_tensors_equal(infos[head], infos[embedding]):
        del infos[head]
        return config, infos
    return dataclasses.replace(config, tie_word_embeddings=False), infos


def read_model_config(path: Path) -> ModelConfig:
    """The config of a checkpoint folder or .gguf file, read and checked without opening a weight
    file (the CLI checks memory and context with it before loading anything).

    Refuses, in this order: a pickle file; a path that does not exist or is neither a folder nor a
    .gguf file; a folder holding only pickle checkpoints (before config.json, so that it is refused
    for what it is); then whatever `load_config` finds wrong.
    """
    try:
        if path.suffix in PICKLE_SUFFIXES and path.is_file():
            raise CheckpointError(
                f"{path}: pickle checkpoints are refused: unpickling can run arbitrary code. "
                "Convert it to safetensors on a trusted machine first"
            )
        if is_gguf_path(path):
            from .gguf import read_gguf_config  # noqa: PLC0415

            return config_from_dict(read_gguf_config(path), source=str(path))
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder")
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a checkpoint folder (config.json + *.safetensors) or a .gguf file")
        refuse_pickle_only(path)
        return load_config(path)
    except OSError as exc:  # stat or listing refused: a folder without permission, a name too long
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def is_gguf_path(path: Path) -> bool:
    """A .gguf file by its name, in any case (llama.cpp's tools accept "model.GGUF" too)."""
    return path.suffix.lower() == ".gguf"


READ_THREADS = 4  # most threads reading tensors at once (`read_parameters`)


def read_parameters(infos: dict, shapes: dict, dtype, xp, progress: bool = False, label: str = "") -> dict:
    """Read every tensor named in `shapes` into one buffer. -> {name: array}

    Each parameter is a view into a single allocation, not an allocation of its own: Linux backs
    a large allocation with 2 MB pages (NumPy asks for them above 4 MB), and weights read through
    fewer, larger pages decode faster: about 10% for the demo model, whose 1-7 MB matrices would
    otherwise each sit on 4 KB pages. Each tensor starts at a multiple of 64 bytes from the
    buffer's start.

    On the host, tensors are read straight into their place by one thread per core (at most
    READ_THREADS, each holding one chunk of a file): reading and the bf16 widening release the
    GIL, and the page faults of the new memory, most of the loading time, then run on every core
    at once. On a GPU each tensor is read on the host and uploaded, one at a time, so no second
    full copy of the weights is held.
    """
    dtype = np.dtype(dtype)
    step = max(1, 64 // dtype.itemsize)
    offsets, total = {}, 0
    for name, shape in shapes.items():
        offsets[name] = total
        total += -(-math.prod(shape) // step) * step  # rounded up to 64 bytes
    buffer = xp.empty(total, dtype=dtype)
    params = {name: buffer[offsets[name] : offsets[name] + math.prod(shape)].reshape(shape) for name, shape in shapes.items()}

    def read_one(name: str) -> None:
        if is_host_array(params[name]):
            read_tensor(infos[name], dtype, out=params[name])
        else:
            params[name][...] = to_device(read_tensor(infos[name], dtype), xp)

    threads = min(os.cpu_count() or 1, READ_THREADS) if is_host_array(buffer) else 1
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(read_one, name) for name in params]
        for future in _progress(futures, progress, f"loading {label}"):
            future.result()
    return params


def read_generation_config(folder: Path) -> dict | None:
    """generation_config.json as a dict, or None when the folder has none (an empty file is `{}`,
    which is not the same thing: see `generation_settings`)."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, bad UTF-8, 5000-digit numbers
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def generation_settings(file_content: dict | None, config: ModelConfig) -> dict:
    """The generation config transformers 5.23 builds for a checkpoint, as `model.generation_config`.

    generation_config.json present: its content alone. config.json's pad and eos do not fill
    its gaps (no pad_token_id: generate pads with the first eos; no eos_token_id: nothing stops a
    row). Absent: the special ids of config.json (`generation_config_from_model_config`).
    transformers: `GenerationMixin.adjust_generation_fn`, then `_prepare_special_tokens`.
    """
    if file_content is not None:
        return file_content
    return generation_config_from_model_config(config)


def generation_config_from_model_config(config: ModelConfig) -> dict:
    """config.json's bos, eos and pad ids (those set), marked as transformers marks a generation
    config made from the model config (`GenerationConfig.from_model_config`)."""
    eos = config.eos_token_id
    ids = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
        "pad_token_id": config.pad_token_id,
    }
    return {"_from_model_config": True, **{key: value for key, value in ids.items() if value is not None}}


def tokenizer_size(folder: Path) -> int | None:
    """One past the highest id the checkpoint's tokenizer can produce (`Tokenizer.id_bound`): the
    tokens of tokenizer.json and those tokenizer_config.json adds on top, as `load_tokenizer`
    builds them; tokenizer.json's alone when a side file is broken (the tokenizer loader reports
    that where a tokenizer is needed). None when tokenizer.json is absent or unreadable."""
    if not (folder / "tokenizer.json").is_file():
        return None
    import tokenizers  # noqa: PLC0415

    from .tokenizer import check_bpe_merges, id_bound, load_tokenizer  # noqa: PLC0415

    def whole() -> int:
        return load_tokenizer(folder).id_bound

    def file_alone() -> int:
        text = (folder / "tokenizer.json").read_text(encoding="utf-8")
        spec = json.loads(text)
        # A merge the Rust builder would panic on (printing a backtrace on stderr): skip the library.
        check_bpe_merges(spec.get("model") if isinstance(spec, dict) else None, folder / "tokenizer.json")
        return id_bound(tokenizers.Tokenizer.from_str(text))

    for bound in (whole, file_alone):
        try:
            return bound() or None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # noqa: BLE001, S112 - a TokenizerError, or a Rust panic (a BaseException)
            continue
    return None


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


def resolve_model_path(path) -> Path:
    """A local path as given; a hub id ("microsoft/Phi-3-mini-4k-instruct") that is not a local
    path is fetched with huggingface_hub (safetensors and JSON files only, never pickles)."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"the checkpoint path must be a str or a path (a folder or a .gguf file), found {type(path).__name__}")
    local = Path(path)
    try:
        exists = local.exists()
    except OSError as exc:  # a parent folder without permission, a name too long
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if exists or not HUB_ID.fullmatch(str(path)):
        return local
    try:
        import huggingface_hub  # noqa: PLC0415
    except ImportError:
        raise CheckpointError(
            f"{path}: not a local file or folder; to fetch it as a hub id install the hub extra "
            "(pip install 'minphi3[hub]') on a machine with a network"
        ) from None
    try:
        return Path(huggingface_hub.snapshot_download(str(path), allow_patterns=HUB_FILES))
    except Exception as exc:  # no network, unknown repository, gated model, ...
        if type(exc).__name__ == "LocalEntryNotFoundError":  # offline, and nothing cached
            reason = "the hub could not be reached (no network?) and no copy is cached"
        else:
            words = " ".join(str(exc).split())
            reason = f"{type(exc).__name__}: {words[:200]}{'...' if len(words) > 200 else ''}"
        raise CheckpointError(f"{path}: not a local file or folder, and fetching it from the hub failed ({reason})") from None


def _load_gguf(path: Path, xp, dtype, progress: bool) -> Model:
    from .gguf import gguf_generation_config, read_gguf, read_gguf_checkpoint  # noqa: PLC0415

    config_dict, tensors = read_gguf_checkpoint(path, dtype=dtype, progress=progress)  # cast tensor by tensor: no float32 copy of the whole model
    config = config_from_dict(config_dict, source=str(path))
    expected = parameter_shapes(config)
    check_tensor_names({name: tuple(t.shape) for name, t in tensors.items()}, expected, path)
    _, metadata = read_gguf(path)  # cached: the file was parsed once, above
    params = {}
    for name in _progress(list(expected), progress, f"loading {path.name}"):
        params[name] = to_device(np.ascontiguousarray(tensors.pop(name), dtype=dtype), xp)
    model = Model(config, params, xp=xp, dtype=dtype)
    model.source = path
    # What `minphi3 convert` writes as generation_config.json, so the file and its conversion agree.
    model.generation_config = gguf_generation_config(path)
    model.tokenizer_size = gguf_tokenizer_size(metadata)
    return model


def gguf_tokenizer_size(metadata: dict) -> int | None:
    """How many ids a GGUF file's tokenizer can produce: its tokens, less the UNUSED-type entries
    at the end (llama.cpp's converters pad the list to the embedding's rows with "[PAD<i>]"
    tokens no text encodes to). None when the file has no token list, or only padding."""
    from .gguf import TOKEN_UNUSED  # noqa: PLC0415

    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        return None
    types = metadata.get("tokenizer.ggml.token_type") or []
    size = len(tokens)
    while size > 0 and size <= len(types) and types[size - 1] == TOKEN_UNUSED:
        size -= 1
    return size or None


def model_from_parameters(config: ModelConfig, params: dict, backend: str = "numpy", dtype: str = "float32") -> Model:
    """A Model from a config and a {name: array} dict already in memory (tests, converters)."""
    xp = get_array_module(backend)
    dtype = resolve_dtype(dtype)
    expected = parameter_shapes(config)
    check_tensor_names({name: tuple(np.shape(a)) for name, a in params.items()}, expected, "parameters")
    arrays = {name: to_device(np.asarray(params[name], dtype=dtype), xp) for name in expected}
    model = Model(config, arrays, xp=xp, dtype=dtype)
    # As a transformers model built from a config: generation stops at config.json's eos.
    model.generation_config = generation_config_from_model_config(config)
    return model


def weights_nbytes(config: ModelConfig, dtype) -> int:
    """Bytes the weights take at `dtype`."""
    return config.num_parameters() * np.dtype(dtype).itemsize


def check_memory(config: ModelConfig, dtype, xp, extra_bytes: int = 0) -> None:
    """Refuse clearly, before allocating, a model whose weights (plus `extra_bytes`) cannot fit."""
    needed = weights_nbytes(config, dtype) + extra_bytes
    available, where = available_memory(xp)
    if available is not None and needed > available:
        raise ResourceError(
            f"the model needs {human_bytes(needed)} at {np.dtype(dtype).name} ({config.num_parameters():,} parameters) "
            f"but {where} {human_bytes(available)} available; use a smaller dtype or a smaller model"
        )


def check_cache_memory(config: ModelConfig, batch_size: int, capacity: int, dtype, xp) -> None:
    """Refuse clearly, before allocating, a KV cache for `batch_size` rows of `capacity` tokens that
    cannot fit (the weights are already loaded, so what is available excludes them)."""
    needed = cache_nbytes(config, batch_size, capacity, dtype)
    available, where = available_memory(xp)
    if available is not None and needed > available:
        raise ResourceError(
            f"the KV cache for {batch_size} x {capacity} tokens needs {human_bytes(needed)} at {np.dtype(dtype).name} "
            f"but {where} {human_bytes(available)} available; ask for fewer new tokens (max_new_tokens) or a smaller batch"
        )


def human_bytes(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes} B"


def _progress(items: list, enabled: bool, description: str):
    if not enabled:
        return items
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(items, desc=description, unit="tensor", leave=False)
