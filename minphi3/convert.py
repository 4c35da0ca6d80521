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

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import CheckpointError
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


def convert_gguf(in_path, out_dir, progress: bool = False, overwrite: bool = False) -> Path:
    """Write the Hugging Face checkpoint of GGUF file `in_path` into folder `out_dir`; return it.

    The files are written into a temporary folder beside `out_dir` and moved into place at the
    end, so an interrupted conversion never leaves a half-written checkpoint; that folder is made
    first, so an output that cannot be written is refused before the tensors are read. An
    `out_dir` that already holds files is refused unless `overwrite`: then the five files are
    replaced, and the files that would shadow them (`SHADOWING_FILES`, other *.safetensors, the
    `additional_chat_templates` folder) are removed; any other file is left alone. A symlink to
    a folder is followed.
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
    read_gguf_config(in_path)  # the header alone: a broken input is refused before any folder is made
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as exc:
        raise CheckpointError(f"{out_dir}: cannot create the output folder ({exc.strerror or exc})") from None
    try:
        config, tensors = read_gguf_checkpoint(in_path, dtype="float32", progress=progress)
        backend, tok_config = gguf_tokenizer_parts(in_path)
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
            _remove_shadowing_files(out_dir)
            for name in OUTPUT_FILES:
                os.replace(staging / name, out_dir / name)
        else:
            os.replace(staging, out_dir)
    except OSError as exc:
        raise CheckpointError(f"{out_dir}: cannot write the converted checkpoint ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _remove_shadowing_files(folder: Path) -> None:
    """Remove what would make a loader read another checkpoint than the one written (see
    `SHADOWING_FILES`): those files, every *.safetensors but model.safetensors, and the
    `additional_chat_templates` folder."""
    stale = [folder / name for name in SHADOWING_FILES]
    stale += [path for path in folder.glob("*.safetensors") if path.name != "model.safetensors"]
    for path in stale:
        if path.is_file() or path.is_symlink():
            path.unlink()
    templates = folder / "additional_chat_templates"
    if templates.is_dir() and not templates.is_symlink():
        shutil.rmtree(templates)
