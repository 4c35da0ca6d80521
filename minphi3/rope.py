"""Rotary position embeddings (RoPE), with Phi-3's LongRoPE and partial rotary.

Each query and key head is rotated in the "rotate-half" layout: dims j and j + rotary_dim/2 form
a pair turned by the angle position * inv_freq[j]. Only the first `rotary_dim` dims of a head
rotate; the rest pass through (Phi-4-mini: 96 of 128; phi-2: 32 of 80).

LongRoPE divides each pair's frequency by a factor (short_factor for contexts up to
original_max_position_embeddings, long_factor beyond) and scales cos and sin by the attention
factor. The switch is decided once per forward call, for the whole batch, from the highest
position in it: that is what transformers does, and `use_long_factors` is the one place the rule
lives.

Linear scaling (a Phi config's `rope_scaling: {"type": "linear", "factor": s}`) divides every
frequency by s, which is the same as dividing every position by s. `inverse_frequencies_for` is
the one place that picks the frequencies for a config.

Precision: for float32 and float16 models the tables are built in float32 exactly as transformers
builds them (float32 exponent, power, reciprocal, float32 angle = position * inv_freq), then cast.
A float64 model gets float64 tables: transformers keeps float32 tables even there, which costs
1.5e-4 rad of angle at position 4095 (see tests/test_rope.py).
"""

from __future__ import annotations

import numpy as np

from .backend import array_module


def table_dtype(model_dtype) -> np.dtype:
    """The precision of the rope tables: float64 for a float64 model (the golden mode), else
    float32 exactly as transformers builds them (never float16: positions above 2048 would round)."""
    return np.dtype(np.float64) if np.dtype(model_dtype) == np.float64 else np.dtype(np.float32)


def default_inverse_frequencies(theta: float, rotary_dim: int, dtype=np.float32) -> np.ndarray:
    """Plain RoPE frequencies: inv_freq[i] = 1 / theta**(2i / rotary_dim).

    -> [rotary_dim / 2] in `dtype` (float32 | float64)
    """
    return longrope_inverse_frequencies(theta, rotary_dim, np.ones(rotary_dim // 2), dtype)


def longrope_inverse_frequencies(theta: float, rotary_dim: int, factors, dtype=np.float32) -> np.ndarray:
    """LongRoPE frequencies: inv_freq[i] = 1 / (factor[i] * theta**(2i / rotary_dim)).

    factors: [rotary_dim / 2] -> [rotary_dim / 2] in `dtype` (float32 | float64)
    A factor above 1 stretches pair i's wavelength. The product is formed before the reciprocal,
    in transformers' order (not (1 / theta**e) / factor). In float32 the power is taken in
    float64 and rounded, which reproduces torch's float32 `pow` to within 1 ulp (NumPy's own
    float32 pow is off by up to 2 ulp).
    """
    dtype = np.dtype(dtype)
    exponents = np.arange(0, rotary_dim, 2, dtype=dtype) / dtype.type(rotary_dim)
    powers = np.power(np.float64(theta), exponents.astype(np.float64)).astype(dtype)
    return (dtype.type(1.0) / (np.asarray(factors, dtype=dtype) * powers)).astype(dtype)


def linear_inverse_frequencies(theta: float, rotary_dim: int, factor: float, dtype=np.float32) -> np.ndarray:
    """Linearly scaled frequencies: inv_freq[i] = (1 / theta**(2i / rotary_dim)) / factor.

    -> [rotary_dim / 2] in `dtype` (float32 | float64)
    The reciprocal comes first and the division by `factor` after, in `dtype`: transformers'
    order (`_compute_linear_scaling_rope_parameters`: `inv_freq /= factor`), unlike LongRoPE's.
    """
    dtype = np.dtype(dtype)
    return (default_inverse_frequencies(theta, rotary_dim, dtype) / dtype.type(factor)).astype(dtype)


def use_long_factors(max_position: int, original_max_position_embeddings: int) -> bool:
    """The LongRoPE switch: long factors iff max(position) + 1 > original_max_position_embeddings.

    Decided for a whole forward call (every row of the batch), from its highest position id.
    """
    return int(max_position) + 1 > int(original_max_position_embeddings)


def inverse_frequencies_for(config, max_position: int, dtype=np.float32) -> np.ndarray:
    """The inverse frequencies a forward call with this highest position uses. -> [rotary_dim / 2]

    No scaling: plain RoPE; "linear": divided by rope_scaling.factor; "longrope": short or long
    factors by `use_long_factors`.
    """
    if config.rope_scaling is None:
        return default_inverse_frequencies(config.rope_theta, config.rotary_dim, dtype)
    if config.rope_scaling.rope_type == "linear":
        return linear_inverse_frequencies(config.rope_theta, config.rotary_dim, config.rope_scaling.factor, dtype)
    long = use_long_factors(max_position, config.original_max_position_embeddings)
    factors = config.rope_scaling.long_factor if long else config.rope_scaling.short_factor
    return longrope_inverse_frequencies(config.rope_theta, config.rotary_dim, factors, dtype)


def rope_cos_sin(inv_freq, position_ids, attention_factor: float = 1.0, dtype=np.float32):
    """The cos and sin tables for the given positions.

    inv_freq: [rotary_dim / 2], position_ids: [batch, seq] -> cos, sin: [batch, seq, rotary_dim]
    angle = position * inv_freq in inv_freq's precision; both halves of a pair share an angle
    (rotate-half layout); cos and sin are scaled by `attention_factor` (LongRoPE's mscale, 1
    otherwise), then cast to `dtype`. float32 tables are correctly rounded (cos taken in float64).
    """
    xp = array_module(position_ids)
    precision = np.dtype(inv_freq.dtype)
    inv_freq = xp.asarray(inv_freq)
    angles = position_ids.astype(precision)[..., None] * inv_freq
    angles = xp.concatenate([angles, angles], axis=-1).astype(np.float64)
    scale = precision.type(attention_factor)
    cos = xp.cos(angles).astype(precision) * scale
    sin = xp.sin(angles).astype(precision) * scale
    return cos.astype(dtype, copy=False), sin.astype(dtype, copy=False)


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) over the last axis split in two halves.

    x: [..., d] -> [..., d]. Pairs are (j, j + d/2), the GPT-NeoX layout, not adjacent dims.
    """
    xp = array_module(x)
    half = x.shape[-1] // 2
    return xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, cos, sin, rotary_dim: int):
    """Rotate the first `rotary_dim` dims of every head; the remaining dims pass through.

    x: [batch, heads, seq, head_dim], cos, sin: [batch, seq, rotary_dim] -> [batch, heads, seq, head_dim]
    x_rot' = x_rot * cos + rotate_half(x_rot) * sin
    """
    xp = array_module(x)
    cos = cos[:, None, :, :]
    sin = sin[:, None, :, :]
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rotated = x[..., :rotary_dim]
    rotated = rotated * cos + rotate_half(rotated) * sin
    return xp.concatenate([rotated, x[..., rotary_dim:]], axis=-1)
