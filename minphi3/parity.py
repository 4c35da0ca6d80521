"""The parity report: minphi3 and transformers on the same input, stage by stage.

`python -m minphi3 parity PATH` prints the largest absolute and relative difference after the
embedding, after every layer, after the final norm and in the logits, so that the first stage
where two implementations part ways is plain to see. `--save trace.npz` writes every
intermediate array: golden vectors for checking another port.

The names in the trace (in the .npz file each is prefixed `minphi3.`; transformers' stages, when
it ran, are prefixed `transformers.`; `input_ids` is stored as is):

    input_ids                      [batch, seq] the probe input
    embedding                      [batch, seq, hidden]
    rope.cos, rope.sin             [batch, seq, rotary_dim] the tables every layer rotates with
    layer.N.input_norm             [batch, seq, hidden] input_layernorm(x), x the layer's input
    layer.N.attn.q                 [batch, heads, seq, head_dim] queries before the rotation
    layer.N.attn.k, layer.N.attn.v [batch, kv_heads, seq, head_dim] keys before the rotation, values
    layer.N.attn.q_rotated         [batch, heads, seq, head_dim] queries after the rotation
    layer.N.attn.k_rotated         [batch, kv_heads, seq, head_dim] keys after the rotation
    layer.N.attn.weights           [batch, heads, seq, seq] softmax probabilities
    layer.N.attn.output            [batch, seq, hidden] after o_proj (Phi: dense)
    layer.N.residual               [batch, seq, hidden] x + attn.output (Phi-3 only)
    layer.N.post_attention_norm    [batch, seq, hidden] post_attention_layernorm(residual) (Phi-3 only)
    layer.N.mlp.output             [batch, seq, hidden] the MLP's output, before its residual add
    layer.N                        [batch, seq, hidden] the layer's output
    final_norm                     [batch, seq, hidden]
    logits                         [batch, seq, vocab]

Phi-3 layers are x + attn, then + mlp, so `layer.N = residual + mlp.output`. Phi (phi-1/1.5/2)
layers are parallel: `layer.N = x + attn.output + mlp.output`, with the MLP reading input_norm; they
have no residual or post_attention_norm, and with qk_layernorm `attn.q`/`attn.k` are taken after
that norm (the rotation's input, as in transformers). Arrays are in the model's dtype.

The per-layer arrays are recorded by the decoder layers themselves (`StepContext.keep` in
minphi3/model.py) during the one forward pass, so they are exactly what the model computed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .backend import to_numpy


def probe_ids(vocab_size: int, length: int = 16, seed: int = 0) -> np.ndarray:
    """A fixed, reproducible input: [1, length] ids drawn from the vocabulary."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=(1, length), dtype=np.int64)


def minphi3_trace(model, input_ids) -> dict[str, np.ndarray]:
    """Every array of minphi3's forward pass as host arrays, named as in the module docstring.

    The forward pass itself records them (`model(..., trace=...)`): the trace is what the model
    computed, not a second computation of it. Attention weights are asked for, so attention runs
    unblocked (`grouped_query_attention`).
    """
    arrays: dict = {}
    out = model(input_ids, output_hidden_states=True, output_attentions=True, trace=arrays)
    trace = {"input_ids": np.asarray(input_ids), "embedding": to_numpy(out.hidden_states[0])}
    trace.update({name: to_numpy(array) for name, array in arrays.items() if name.startswith("rope.")})
    for index, output in enumerate(out.layer_outputs):
        prefix = f"layer.{index}."
        trace.update({name: to_numpy(array) for name, array in arrays.items() if name.startswith(prefix)})
        trace[f"layer.{index}"] = to_numpy(output)
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


STAGE_NAME = re.compile(r"embedding|layer\.\d+|final_norm|logits")  # the report's rows


def difference_rows(ours: dict, theirs: dict, every_array: bool = False) -> list[tuple[str, float, float]]:
    """(name, max |a - b|, max |a - b| / max |b|) for every stage both traces hold, in order: the
    embedding, each layer's output, the final norm, the logits. every_array: every array both
    hold (the layers' intermediates too, when both traces are minphi3's)."""
    rows = []
    for name in ours:
        if name == "input_ids" or name not in theirs or not (every_array or STAGE_NAME.fullmatch(name)):
            continue
        a, b = np.asarray(ours[name], np.float64), np.asarray(theirs[name], np.float64)
        absolute = float(np.abs(a - b).max())
        relative = absolute / max(float(np.abs(b).max()), 1e-30)
        rows.append((name, absolute, relative))
    return rows


def format_table(rows) -> str:
    """The report: one line per stage, `stage  max |delta|  max rel`."""
    lines = [f"{'stage':<14}{'max |delta|':>14}{'max rel':>14}", "-" * 42]
    lines += [f"{name:<14}{absolute:>14.3e}{relative:>14.3e}" for name, absolute, relative in rows]
    return "\n".join(lines)


def save_trace(path, trace: dict, reference: dict | None = None) -> None:
    """Write minphi3's trace (every name of the module docstring, prefixed `minphi3.`) and
    transformers' stages (prefixed `transformers.`) to an .npz file."""
    arrays = {f"minphi3.{k}" if k != "input_ids" else k: v for k, v in trace.items()}
    if reference:
        arrays.update({f"transformers.{k}": v for k, v in reference.items()})
    np.savez_compressed(path, **arrays)
