"""The parity report: minphi3 and transformers on the same input, stage by stage.

`python -m minphi3 parity PATH` prints the largest absolute and relative difference after the
embedding, after every layer, after the final norm and in the logits, so that the first stage
where two implementations part ways is plain to see. `--save trace.npz` writes every
intermediate array: golden vectors for checking another port.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .backend import to_numpy


def probe_ids(vocab_size: int, length: int = 16, seed: int = 0) -> np.ndarray:
    """A fixed, reproducible input: [1, length] ids drawn from the vocabulary."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=(1, length), dtype=np.int64)


def minphi3_trace(model, input_ids) -> dict[str, np.ndarray]:
    """Every stage of minphi3's forward pass as host arrays: embedding, layer.N, final_norm, logits."""
    out = model(input_ids, output_hidden_states=True)
    trace = {"input_ids": np.asarray(input_ids), "embedding": to_numpy(out.hidden_states[0])}
    for index, hidden in enumerate(out.layer_outputs):
        trace[f"layer.{index}"] = to_numpy(hidden)
    trace["final_norm"] = to_numpy(out.hidden_states[-1])
    trace["logits"] = to_numpy(out.logits)
    return trace


def transformers_trace(folder, input_ids, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The same stages from transformers (eager attention), captured with forward hooks."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    architecture = json.loads((Path(folder) / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, architecture).from_pretrained(
        folder, dtype=getattr(torch, dtype), attn_implementation="eager"
    ).eval()
    captured: dict[str, np.ndarray] = {}

    def keep(name):
        def hook(_module, _inputs, output):
            tensor = output[0] if isinstance(output, tuple) else output
            captured[name] = tensor.detach().to(torch.float64).numpy()
        return hook

    base = model.model
    handles = [base.embed_tokens.register_forward_hook(keep("embedding"))]
    handles += [layer.register_forward_hook(keep(f"layer.{i}")) for i, layer in enumerate(base.layers)]
    norm = base.norm if hasattr(base, "norm") else base.final_layernorm
    handles.append(norm.register_forward_hook(keep("final_norm")))
    with torch.no_grad():
        logits = model(torch.as_tensor(np.asarray(input_ids))).logits
    for handle in handles:
        handle.remove()
    captured["logits"] = logits.to(torch.float64).numpy()
    return captured


def difference_rows(ours: dict, theirs: dict) -> list[tuple[str, float, float]]:
    """(stage, max |a - b|, max |a - b| / max |b|) for every stage both traces hold, in order."""
    rows = []
    for name in ours:
        if name == "input_ids" or name not in theirs:
            continue
        a, b = np.asarray(ours[name], np.float64), np.asarray(theirs[name], np.float64)
        absolute = float(np.abs(a - b).max())
        relative = absolute / max(float(np.abs(b).max()), 1e-30)
        rows.append((name, absolute, relative))
    return rows


def format_table(rows) -> str:
    lines = [f"{'stage':<14}{'max |delta|':>14}{'max rel':>14}", "-" * 42]
    lines += [f"{name:<14}{absolute:>14.3e}{relative:>14.3e}" for name, absolute, relative in rows]
    return "\n".join(lines)


def save_trace(path, trace: dict, reference: dict | None = None) -> None:
    """Write minphi3's stages (and transformers', prefixed `transformers.`) to an .npz file."""
    arrays = {f"minphi3.{k}" if k != "input_ids" else k: v for k, v in trace.items()}
    if reference:
        arrays.update({f"transformers.{k}": v for k, v in reference.items()})
    np.savez_compressed(path, **arrays)
