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
that norm (the rotation's input, as in transformers). minphi3's arrays are in the model's dtype;
transformers' are stored as float64 whatever dtype it ran in. A float64 run compares with
transformers as shipped (its RMSNorm statistics, softmax and rope tables stay float32, so stages
differ at float32 rounding) unless `--lift` runs those steps in float64 too (`lifted_float32_steps`).

The per-layer arrays are recorded by the decoder layers themselves (`StepContext.keep` in
minphi3/model.py) during the one forward pass, so they are exactly what the model computed.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import numpy as np

from .backend import to_numpy
from .errors import BackendError, ConfigError


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


def transformers_trace(folder, input_ids, dtype: str = "float32", lift: bool = False) -> dict[str, np.ndarray]:
    """The same stages from transformers (eager attention), captured with forward hooks, as
    float64 arrays whatever `dtype` ran. lift: with dtype float64, run transformers' three float32
    steps in float64 too (`lifted_float32_steps`): the golden comparison."""
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
    if lift and dtype != "float64":
        raise BackendError(f"lifting transformers' float32 steps needs dtype float64, not {dtype}")
    with torch.no_grad(), (lifted_float32_steps(model) if lift else contextlib.nullcontext()):
        logits = model(torch.as_tensor(np.asarray(input_ids))).logits
    for handle in handles:
        handle.remove()
    captured["logits"] = logits.to(torch.float64).numpy()
    return captured


class lifted_float32_steps:
    """Context manager: transformers' float64 model with its three float32 steps done in float64.

    Even in a float64 model transformers computes RMSNorm statistics, the attention softmax and the
    rope tables (inv_freq, angles, cos, sin) in float32. Inside this context those three steps run
    in float64 (the same formulas with the dtype changed), so the oracle is float64 throughout and
    minphi3's float64 mode can be held to 1e-9 (`parity --dtype float64 --lift`, and the tests).
    Works for the Phi3 and Phi models (causal LM and classification heads); it patches
    transformers' Phi3RMSNorm and eager attention for as long as the context lasts.
    """

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        import math  # noqa: PLC0415

        import torch  # noqa: PLC0415
        from transformers.models.phi import modeling_phi  # noqa: PLC0415
        from transformers.models.phi3 import modeling_phi3  # noqa: PLC0415

        self.saved = [
            (modeling_phi3.Phi3RMSNorm, "forward", modeling_phi3.Phi3RMSNorm.forward),
            (modeling_phi3, "eager_attention_forward", modeling_phi3.eager_attention_forward),
            (modeling_phi, "eager_attention_forward", modeling_phi.eager_attention_forward),
        ]

        def rms_forward(module, hidden_states):
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            return module.weight * (hidden_states * torch.rsqrt(variance + module.variance_epsilon))

        def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
            key = modeling_phi3.repeat_kv(key, module.num_key_value_groups)
            value = modeling_phi3.repeat_kv(value, module.num_key_value_groups)
            weights = torch.matmul(query, key.transpose(2, 3)) * scaling
            if attention_mask is not None:
                weights = weights + attention_mask
            weights = torch.nn.functional.softmax(weights, dim=-1, dtype=query.dtype)
            return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights

        config = self.model.config
        rope = dict(config.rope_parameters)
        if rope.get("rope_type", "default") not in ("default", "linear", "longrope"):  # checked before patching
            raise ConfigError(
                f"lifted_float32_steps knows the rope types default, linear and longrope, not {rope['rope_type']!r}"
            )
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        rotary = self.model.model.rotary_emb
        scaling = float(getattr(rotary, "attention_scaling", 1.0))

        # transformers' rotary rule written again, in float64, on purpose: an oracle built from
        # minphi3's own rope.py would compare minphi3 with itself.
        def rotary_forward(x, position_ids):
            exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
            factors = torch.ones(dim // 2, dtype=torch.float64)
            if rope.get("rope_type") == "longrope":
                long = int(position_ids.max()) + 1 > rope["original_max_position_embeddings"]
                factors = torch.tensor(rope["long_factor" if long else "short_factor"], dtype=torch.float64)
            elif rope.get("rope_type") == "linear":
                factors = torch.full((dim // 2,), float(rope["factor"]), dtype=torch.float64)
            inv_freq = 1.0 / (factors * rope["rope_theta"] ** exponents)
            freqs = position_ids[..., None].to(torch.float64) * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)

        assert not math.isnan(scaling)
        modeling_phi3.Phi3RMSNorm.forward = rms_forward
        modeling_phi3.eager_attention_forward = eager
        modeling_phi.eager_attention_forward = eager
        self.saved.append((rotary, "forward", None))
        rotary.forward = rotary_forward
        return self.model

    def __exit__(self, *exc):
        for owner, name, value in self.saved:
            if value is None:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
        return False


STAGE_NAME = re.compile(r"embedding|layer\.\d+|final_norm|logits")  # the report's rows


def difference_rows(ours: dict, theirs: dict, every_array: bool = False) -> list[tuple[str, float, float]]:
    """(name, max |a - b|, max |a - b| / max |b|) for every stage both traces hold, in order: the
    second figure is relative to the stage's largest value, not an element-wise relative error
    (which near-zero entries would blow up); the
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
    """The report: one line per stage, `stage  max |delta|  max |delta| / max |ref|`."""
    lines = [f"{'stage':<14}{'max |delta|':>14}{'/ max |ref|':>14}", "-" * 42]
    lines += [f"{name:<14}{absolute:>14.3e}{relative:>14.3e}" for name, absolute, relative in rows]
    return "\n".join(lines)


def save_trace(path, trace: dict, reference: dict | None = None) -> None:
    """Write minphi3's trace (every name of the module docstring, prefixed `minphi3.`) and
    transformers' stages (prefixed `transformers.`) to an .npz file."""
    arrays = {f"minphi3.{k}" if k != "input_ids" else k: v for k, v in trace.items()}
    if reference:
        arrays.update({f"transformers.{k}": v for k, v in reference.items()})
    np.savez_compressed(path, **arrays)
