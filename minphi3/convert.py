"""GGUF -> Hugging Face checkpoint: `python -m minphi3 convert IN.gguf OUT_DIR`.

The folder written is a plain `Phi3ForCausalLM` checkpoint (a `PhiForCausalLM` one for a `phi2`
file: phi-1, phi-1.5, phi-2) that transformers (`Phi3ForCausalLM` / `PhiForCausalLM`
`.from_pretrained`, `AutoTokenizer.from_pretrained`) and `minphi3.load` read:

    config.json              Phi3ForCausalLM or PhiForCausalLM, from the GGUF metadata (`minphi3.gguf.gguf_config`)
    model.safetensors        every tensor dequantized to float32, in the Phi-3 (or Phi) layout
    tokenizer.json           the `tokenizers` pipeline rebuilt from tokenizer.ggml.* metadata
    tokenizer_config.json    bos/eos/unk/pad tokens, add_bos_token, the chat template
    generation_config.json   bos, pad and the eos ids generation stops at (eos and chat-end tokens)

Why float32: a quantized weight is `scale * q (+ min)` with 16-bit scales, computed in float32;
those products are generally not representable in float16 or bfloat16, so float32 is the only
storage that keeps the dequantized values exact (and the logits equal to loading the .gguf itself).
The price is size: four bytes per parameter (540 MB for the 135M-parameter demo model).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import CheckpointError, ResourceError
from .gguf import gguf_generation_config, gguf_tokenizer_parts, read_gguf_checkpoint, read_gguf_config

OUTPUT_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _readable_by_all(folder: Path) -> None:
    """Give the folder and its files the usual modes (mkdtemp makes them private), minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for file in folder.iterdir():
        os.chmod(file, 0o666 & ~umask)


def checkpoint_config(config: dict) -> dict:
    """config.json as written: the GGUF config plus the storage dtype."""
    return {**config, "torch_dtype": "float32"}


def tokenizer_config(config: dict, model_max_length: int) -> dict:
    """tokenizer_config.json: the special tokens, BOS/EOS flags and chat template."""
    out = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        **{key: value for key, value in config.items() if value is not None},
    }
    return out


# Files a checkpoint folder may hold that the loaders would read instead of (or on top of) the
# ones written here: a sharded index and its shards win over model.safetensors, a template file
# over the template in tokenizer_config.json, special_tokens_map.json over its special tokens.
SHADOWING_FILES = (
    "model.safetensors.index.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def check_conversion_memory(in_path) -> None:
    """Refuse, before reading a tensor, a conversion the host cannot hold: the float32 weights,
    which are all dequantized before safetensors writes them (from their own memory, no copy:
    converting the demo peaks at 812 MB resident for its 538 MB of weights)."""
    import numpy as np  # noqa: PLC0415

    from .backend import available_memory  # noqa: PLC0415
    from .config import config_from_dict  # noqa: PLC0415
    from .loading import human_bytes, weights_nbytes  # noqa: PLC0415

    config = config_from_dict(read_gguf_config(in_path), source=str(in_path))
    needed = weights_nbytes(config, np.float32)
    available, where = available_memory(np)
    if available is not None and needed > available:
        raise ResourceError(
            f"{in_path}: converting needs {human_bytes(needed)} (the float32 weights) "
            f"but {where} {human_bytes(available)} available"
        )


def convert_gguf(in_path, out_dir, progress: bool = False, overwrite: bool = False) -> Path:
    """Write the Hugging Face checkpoint of GGUF file `in_path` into folder `out_dir`; return it.

    The files are written into a temporary folder beside `out_dir` and moved into place at the
    end, so an interrupted conversion never leaves a half-written checkpoint; that folder is made
    first, so an output that cannot be written is refused before the tensors are read. An
    `out_dir` that already holds files is refused unless `overwrite`: then the five files are
    replaced, and the files that would shadow them (`shadowing_files`: an old index and the
    shards it names, template files, the `additional_chat_templates` folder) are removed, all or
    none; any other file is left alone. A symlink to a folder is followed.
    """
    from safetensors.numpy import save_file  # noqa: PLC0415

    in_path, out_dir = Path(in_path), Path(out_dir)
    if out_dir.is_symlink() and out_dir.is_dir():
        out_dir = out_dir.resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: the output path exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(
            f"{out_dir}: the output folder is not empty (choose a new folder, or pass --force "
            "(overwrite=True) to replace its checkpoint files)"
        )
    check_conversion_memory(in_path)  # the header alone: a broken input is refused before any folder is made
    backend, tok_config = gguf_tokenizer_parts(in_path)  # a broken tokenizer too, before the tensors
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as exc:
        raise CheckpointError(f"{out_dir}: cannot create the output folder ({exc.strerror or exc})") from None
    keep_staging = False  # True when old files that could not be put back wait in it
    try:
        try:
            config, tensors = read_gguf_checkpoint(in_path, dtype="float32", progress=progress)
        except MemoryError:  # the check passed, but the memory went elsewhere meanwhile
            raise ResourceError(f"{in_path}: ran out of memory dequantizing the tensors to float32") from None
        _write_json(staging / "config.json", checkpoint_config(config))
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        backend.save(str(staging / "tokenizer.json"))
        _write_json(staging / "tokenizer_config.json", tokenizer_config(tok_config, config["max_position_embeddings"]))
        _write_json(staging / "generation_config.json", gguf_generation_config(in_path))
        _readable_by_all(staging)
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        if out_dir.exists():  # overwrite: replace our files one by one
            _replace_checkpoint_files(staging, out_dir, in_path)
        else:
            os.replace(staging, out_dir)
    except _OldFilesKept as exc:
        keep_staging = True
        raise CheckpointError(
            f"{out_dir}: cannot write the converted checkpoint ({exc.strerror or exc.cause}), and some of its old "
            f"files could not be put back: they are in {exc.aside}"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"{out_dir}: cannot write the converted checkpoint ({exc.strerror or exc})") from None
    finally:
        if not keep_staging:
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def shadowing_files(folder: Path, in_path=None) -> list[Path]:
    """What in `folder` would make a loader read another checkpoint than the one written: the
    `SHADOWING_FILES` present, the shards the old index names, the `additional_chat_templates`
    folder. Other files, other *.safetensors among them (an adapter), are not touched."""
    found = [folder / name for name in SHADOWING_FILES if (folder / name).is_file() or (folder / name).is_symlink()]
    index = folder / "model.safetensors.index.json"
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}) if index.is_file() else {}
    except (OSError, ValueError, AttributeError):
        weight_map = {}  # an unreadable index goes; the shards it may name stay
    # Only what can be a shard: a plain *.safetensors name in this folder that this conversion does
    # not write and that is not the input itself (a hostile index must not delete a user's file).
    keep = {*OUTPUT_FILES, *SHADOWING_FILES}
    shards = {
        shard for shard in weight_map.values()
        if isinstance(shard, str) and Path(shard).name == shard and shard.endswith(".safetensors") and shard not in keep
    }  # fmt: skip
    found += [
        folder / shard for shard in sorted(shards)
        if (folder / shard).is_file() and (in_path is None or (folder / shard).resolve() != Path(in_path).resolve())
    ]  # fmt: skip
    templates = folder / "additional_chat_templates"
    if templates.is_dir() or templates.is_symlink():
        found.append(templates)
    return found


class _OldFilesKept(OSError):
    """A failed replacement whose old files could not all be put back: they stay in `aside`."""

    def __init__(self, cause: OSError, aside: Path):
        super().__init__(cause.errno, cause.strerror)
        self.cause, self.aside = cause, aside


def _replace_checkpoint_files(staging: Path, folder: Path, in_path) -> None:
    """Move the written files from `staging` into `folder`, replacing its old ones and removing
    the `shadowing_files`. The old files are first moved aside into `staging` (the same file
    system), so a failure part-way puts them all back; `staging` is deleted afterwards, unless an
    old file could not be put back (`_OldFilesKept`: the error names where it is)."""
    aside = staging / ".replaced"
    aside.mkdir()
    moved: list[tuple[Path, Path]] = []
    try:
        old = [folder / name for name in OUTPUT_FILES if (folder / name).exists() or (folder / name).is_symlink()]
        for number, path in enumerate(dict.fromkeys(old + shadowing_files(folder, in_path))):
            target = aside / f"{number}-{path.name}"
            os.replace(path, target)
            moved.append((target, path))
        for name in OUTPUT_FILES:
            os.replace(staging / name, folder / name)
    except OSError as exc:
        undo = [(folder / name, staging / name) for name in OUTPUT_FILES if not (staging / name).exists()]
        for source, target in undo + [(target, path) for target, path in reversed(moved)]:
            with contextlib.suppress(OSError):  # put back all that can be, then report the first failure
                os.replace(source, target)
        if any(aside.iterdir()):
            raise _OldFilesKept(exc, aside) from None
        raise
