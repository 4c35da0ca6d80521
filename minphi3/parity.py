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

The per-layer arrays are computed by calling the same functions, in the same order, as
`phi3_decoder_layer` / `phi_decoder_layer` in minphi3/model.py (which return only their output),
on each layer's own input from the forward pass; attention is taken unblocked
(`grouped_query_attention`), which is what the forward pass does for prompts of up to
`attention.QUERY_BLOCK` tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .attention import split_heads, split_qkv
from .backend import to_numpy
from .mlp import gated_mlp, gelu_mlp
from .model import _positions, check_token_ids, self_attention
from .ops import layer_norm, linear, rms_norm
from .rope import apply_rope


def probe_ids(vocab_size: int, length: int = 16, seed: int = 0) -> np.ndarray:
    """A fixed, reproducible input: [1, length] ids drawn from the vocabulary."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=(1, length), dtype=np.int64)


def minphi3_trace(model, input_ids) -> dict[str, np.ndarray]:
    """Every array of minphi3's forward pass as host arrays, named as in the module docstring."""
    out = model(input_ids, output_hidden_states=True)
    ids = check_token_ids(input_ids, model.config.vocab_size)
    step = _probe_step(model, ids)
    trace = {"input_ids": np.asarray(input_ids), "embedding": to_numpy(out.hidden_states[0])}
    trace["rope.cos"], trace["rope.sin"] = to_numpy(step.cos), to_numpy(step.sin)
    layer_trace = phi3_layer_trace if model.config.is_phi3 else phi_layer_trace
    layer_inputs = (out.hidden_states[0],) + out.layer_outputs[:-1]
    for index, (x, weights) in enumerate(zip(layer_inputs, model.layers, strict=True)):
        for name, array in layer_trace(x, weights, model.config, index, step).items():
            trace[f"layer.{index}.{name}"] = to_numpy(array)
        trace[f"layer.{index}"] = to_numpy(out.layer_outputs[index])
    trace["final_norm"] = to_numpy(out.hidden_states[-1])
    trace["logits"] = to_numpy(out.logits)
    return trace


def _probe_step(model, ids):
    """The StepContext the forward pass builds for `ids` (no cache, no padding), with attention
    weights asked for so that `self_attention` returns them."""
    batch, seq = ids.shape
    return model._step_context(_positions(None, batch, seq, 0), None, None, batch, seq, output_attentions=True)


def phi3_layer_trace(x, w: dict, config, layer: int, step) -> dict:
    """`phi3_decoder_layer`'s steps, each kept. x: [batch, seq, hidden] -> {name: array}"""
    normed = rms_norm(x, w["input_layernorm.weight"], config.rms_norm_eps)
    qkv = linear(normed, w["self_attn.qkv_proj.weight"])
    q, k, v = split_qkv(qkv, config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    attended, weights = self_attention(q, k, v, w["self_attn.o_proj.weight"], None, config, layer, step)
    residual = x + attended
    post_normed = rms_norm(residual, w["post_attention_layernorm.weight"], config.rms_norm_eps)
    mlp_output = gated_mlp(post_normed, w["mlp.gate_up_proj.weight"], w["mlp.down_proj.weight"])
    return {
        "input_norm": normed, **_attention_arrays(q, k, v, step, config), "attn.weights": weights,
        "attn.output": attended, "residual": residual, "post_attention_norm": post_normed, "mlp.output": mlp_output,
    }


def phi_layer_trace(x, w: dict, config, layer: int, step) -> dict:
    """`phi_decoder_layer`'s steps, each kept. x: [batch, seq, hidden] -> {name: array}"""
    eps = config.layer_norm_eps
    normed = layer_norm(x, w["input_layernorm.weight"], w["input_layernorm.bias"], eps)
    q = split_heads(linear(normed, w["self_attn.q_proj.weight"], w["self_attn.q_proj.bias"]), config.num_attention_heads)
    k = split_heads(linear(normed, w["self_attn.k_proj.weight"], w["self_attn.k_proj.bias"]), config.num_key_value_heads)
    v = split_heads(linear(normed, w["self_attn.v_proj.weight"], w["self_attn.v_proj.bias"]), config.num_key_value_heads)
    if config.qk_layernorm:
        q = layer_norm(q, w["self_attn.q_layernorm.weight"], w["self_attn.q_layernorm.bias"], eps)
        k = layer_norm(k, w["self_attn.k_layernorm.weight"], w["self_attn.k_layernorm.bias"], eps)
    attended, weights = self_attention(
        q, k, v, w["self_attn.dense.weight"], w["self_attn.dense.bias"], config, layer, step
    )
    mlp_output = gelu_mlp(normed, w["mlp.fc1.weight"], w["mlp.fc1.bias"], w["mlp.fc2.weight"], w["mlp.fc2.bias"])
    return {
        "input_norm": normed, **_attention_arrays(q, k, v, step, config), "attn.weights": weights,
        "attn.output": attended, "mlp.output": mlp_output,
    }


def _attention_arrays(q, k, v, step, config) -> dict:
    """q, k, v as split, and q, k rotated with the step's tables exactly as `self_attention` rotates them."""
    return {
        "attn.q": q, "attn.k": k, "attn.v": v,
        "attn.q_rotated": apply_rope(q, step.cos, step.sin, config.rotary_dim),
        "attn.k_rotated": apply_rope(k, step.cos, step.sin, config.rotary_dim),
    }



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
