"""Tests of minphi3/rope.py: inverse frequencies and cos/sin tables against transformers'
Phi3RotaryEmbedding (float32, to the ulp), the rotation's geometry (norms, relative positions,
rotate-half pairs, the untouched tail), the LongRoPE switch and the attention factor.

Precision note, found while writing these tests: torch's float32 `pow` is not correctly rounded.
For rotary_dim 96 (Phi-3-mini, Phi-3.5, Phi-4-mini) theta**(40/96) comes out 0.52 ulp from the
true value, so inv_freq[20] differs from minphi3's (correctly rounded) value by 1 ulp; the other
entries are bit-identical (a few other theta/dim pairs have one such entry too; the tiny parity
checkpoints have none). At position ~4095 that one ulp moves the pair's angle by ~1e-4 rad, so the
cos/sin tables are compared to the ulp given the same inverse frequencies, and the pair whose
inv_freq differs to its angle-error bound.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from minphi3.config import config_from_dict
from minphi3.rope import (
    apply_rope,
    default_inverse_frequencies,
    inverse_frequencies_for,
    linear_inverse_frequencies,
    longrope_inverse_frequencies,
    rope_cos_sin,
    rotate_half,
    table_dtype,
    use_long_factors,
)

REFERENCE = Path("/work/shared/reference/checkpoints")
ROPE_CONFIGS = [
    "Phi-3-mini-4k-instruct.json",
    "Phi-3-mini-128k-instruct.json",
    "Phi-3-mini-128k-instruct.2024-04-su.json",
    "Phi-3-medium-128k-instruct.2024-04-su.json",
    "Phi-3.5-mini-instruct.json",
    "Phi-4-mini-instruct.json",
    "phi-4.json",
]


def _configs(name):
    """(minphi3 config, transformers Phi3Config) for a reference file; `su` given to transformers as
    `longrope` with original_max inside, since transformers 5.23 cannot read `su` itself."""
    data = json.loads((REFERENCE / name).read_text())
    data.pop("_provenance")
    ours = config_from_dict(data)
    if data.get("rope_scaling") and data["rope_scaling"].get("type") == "su":
        data["rope_scaling"] = {**data["rope_scaling"], "type": "longrope"}
    return ours, transformers.Phi3Config(**data)


def _ulps(a, b):
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    assert a.shape == b.shape
    # Map float32 bit patterns to a monotonic integer line, so the difference counts ulps across 0.
    def line(x):
        bits = x.view(np.int32).astype(np.int64)
        return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
    return np.abs(line(a) - line(b))


def _rotary(theirs):
    return Phi3RotaryEmbedding(theirs)


# ---- inverse frequencies --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ROPE_CONFIGS)
def test_inverse_frequencies_match_transformers(name):
    ours, theirs = _configs(name)
    rotary = _rotary(theirs)
    short = rotary.inv_freq.numpy().copy()
    mine_short = inverse_frequencies_for(ours, 0, np.float32)
    assert mine_short.dtype == np.float32 and mine_short.shape == (ours.rotary_dim // 2,)
    assert _ulps(mine_short, short).max() <= 1
    if ours.rotary_dim != 96:
        np.testing.assert_array_equal(mine_short, short)
    else:
        assert np.count_nonzero(mine_short != short) <= 1
    if not ours.uses_longrope:
        return
    # A call reaching position original_max switches transformers' buffer to the long set.
    position = ours.original_max_position_embeddings
    rotary(torch.zeros(1), torch.tensor([[position]]))
    long = rotary.inv_freq.numpy().copy()
    assert np.abs(long - short).max() > 0 or ours.rope_scaling.long_factor == ours.rope_scaling.short_factor
    mine_long = inverse_frequencies_for(ours, position, np.float32)
    assert _ulps(mine_long, long).max() <= 1
    if ours.rotary_dim != 96:
        np.testing.assert_array_equal(mine_long, long)
    # ... and one back at original_max - 1 switches it back to the short set.
    rotary(torch.zeros(1), torch.tensor([[position - 1]]))
    np.testing.assert_array_equal(rotary.inv_freq.numpy(), short)
    np.testing.assert_array_equal(inverse_frequencies_for(ours, position - 1, np.float32), mine_short)


@pytest.mark.parametrize("rotary_dim", [8, 12, 16, 32, 64, 96, 128])
@pytest.mark.parametrize("theta", [10000.0, 5000.0, 250000.0])
def test_default_inverse_frequencies_within_one_ulp(rotary_dim, theta):
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim
    theirs = (1.0 / (theta**exponents)).numpy()
    mine = default_inverse_frequencies(theta, rotary_dim, np.float32)
    assert _ulps(mine, theirs).max() <= 1
    assert np.count_nonzero(mine != theirs) <= 1
    if rotary_dim <= 16:  # the tiny parity checkpoints: bit-identical
        np.testing.assert_array_equal(mine, theirs)


def test_longrope_inverse_frequencies_formula_in_float64():
    factors = np.array([1.0, 2.5, 4.0, 60.0])
    inv = longrope_inverse_frequencies(10000.0, 8, factors, np.float64)
    expected = [1.0 / (f * 10000.0 ** (2 * i / 8)) for i, f in enumerate(factors)]
    np.testing.assert_allclose(inv, expected, rtol=1e-15)
    assert inv.dtype == np.float64


def test_table_dtype():
    assert table_dtype(np.float64) == np.float64
    assert table_dtype(np.float32) == np.float32
    assert table_dtype(np.float16) == np.float32  # positions above 2048 do not fit float16


# ---- cos / sin tables ---------------------------------------------------------------------------
POSITION_RANGES = [(0, 16), (4080, 4096), (4096, 4112), (131056, 131072)]


@pytest.mark.parametrize("name", ROPE_CONFIGS)
@pytest.mark.parametrize("low, high", POSITION_RANGES)
def test_cos_sin_tables_match_transformers_to_the_ulp(name, low, high):
    ours, theirs = _configs(name)
    rotary = _rotary(theirs)
    positions = np.stack([np.arange(low, high), np.arange(high - 2 * 16, high - 16)])
    x = torch.zeros(1, dtype=torch.float32)
    # Unscaled tables first (attention factor 1), from transformers' own inverse frequencies.
    factor = rotary.attention_scaling
    assert factor == ours.attention_factor
    rotary.attention_scaling = 1.0
    cos, sin = (t.numpy() for t in rotary(x, torch.as_tensor(positions)))
    inv = rotary.inv_freq.numpy()
    my_cos, my_sin = rope_cos_sin(inv, positions, 1.0, np.float32)
    assert my_cos.shape == (2, 16, ours.rotary_dim) and my_cos.dtype == np.float32
    assert _ulps(my_cos, cos).max() <= 1
    assert _ulps(my_sin, sin).max() <= 1
    # Scaled: one more rounding (the product) on top of torch's own 1-ulp cos and sin.
    rotary.attention_scaling = factor
    cos, sin = (t.numpy() for t in rotary(x, torch.as_tensor(positions)))
    my_cos, my_sin = rope_cos_sin(inv, positions, factor, np.float32)
    assert _ulps(my_cos, cos).max() <= (1 if factor == 1.0 else 2)
    assert _ulps(my_sin, sin).max() <= (1 if factor == 1.0 else 2)
    # End to end, from minphi3's own inverse frequencies: to the ulp except where inv_freq differs
    # by its one ulp (pair 20 of 96), whose angle then differs by at most position * ulp(inv_freq).
    mine = inverse_frequencies_for(ours, int(positions.max()), np.float32)
    my_cos, my_sin = rope_cos_sin(mine, positions, factor, np.float32)
    same = np.concatenate([mine == inv, mine == inv])
    assert _ulps(my_cos[..., same], cos[..., same]).max() <= 2
    assert _ulps(my_sin[..., same], sin[..., same]).max() <= 2
    bound = factor * (high * np.spacing(inv.max()) + 1e-6)
    assert np.abs(my_cos - cos).max() <= bound
    assert np.abs(my_sin - sin).max() <= bound


def test_float64_tables_are_float64_and_accurate():
    inv = default_inverse_frequencies(10000.0, 96, np.float64)
    positions = np.array([[4095, 131071]])
    cos, sin = rope_cos_sin(inv, positions, 1.0, np.float64)
    assert cos.dtype == np.float64
    exact = [[[math.cos(p / 10000.0 ** (2 * (i % 48) / 96)) for i in range(96)] for p in positions[0]]]
    np.testing.assert_allclose(cos, exact, atol=1e-9)


def test_attention_factor_multiplies_cos_and_sin():
    inv = default_inverse_frequencies(10000.0, 16, np.float64)
    positions = np.arange(20)[None, :]
    cos1, sin1 = rope_cos_sin(inv, positions, 1.0, np.float64)
    cos2, sin2 = rope_cos_sin(inv, positions, 1.19, np.float64)
    np.testing.assert_allclose(cos2, 1.19 * cos1, rtol=1e-15)
    np.testing.assert_allclose(sin2, 1.19 * sin1, rtol=1e-15, atol=1e-300)
    np.testing.assert_allclose(cos2[0, 0], 1.19)  # cos(0) = the attention factor
    np.testing.assert_array_equal(sin2[0, 0], 0.0)
    # The rotated part of every q.k product is scaled by factor**2; pass-through dims are not.
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 1, 1, 24))
    position = np.array([[7]])
    c1, s1 = rope_cos_sin(inv, position, 1.0, np.float64)
    c2, s2 = rope_cos_sin(inv, position, 1.19, np.float64)
    rot1 = apply_rope(q, c1, s1, 16)[..., :16] @ apply_rope(k, c1, s1, 16)[..., :16].swapaxes(-1, -2)
    rot2 = apply_rope(q, c2, s2, 16)[..., :16] @ apply_rope(k, c2, s2, 16)[..., :16].swapaxes(-1, -2)
    np.testing.assert_allclose(rot2, 1.19**2 * rot1, rtol=1e-12)
    np.testing.assert_array_equal(apply_rope(q, c2, s2, 16)[..., 16:], q[..., 16:])


def test_tables_layout_repeats_the_angles():
    inv = default_inverse_frequencies(10000.0, 8, np.float64)
    cos, sin = rope_cos_sin(inv, np.array([[3, 5]]), 1.0, np.float64)
    np.testing.assert_array_equal(cos[..., :4], cos[..., 4:])
    np.testing.assert_allclose(cos[0, 1, :4], np.cos(5 * inv), rtol=1e-15)
    np.testing.assert_allclose(sin[0, 0, :4], np.sin(3 * inv), rtol=1e-15)


# ---- the rotation -------------------------------------------------------------------------------
def _tables(positions, rotary_dim, theta=10000.0):
    inv = default_inverse_frequencies(theta, rotary_dim, np.float64)
    return rope_cos_sin(inv, np.asarray(positions)[None, :], 1.0, np.float64)


def test_rotate_half_pairs_j_with_j_plus_half():
    x = np.arange(1.0, 9.0)
    np.testing.assert_array_equal(rotate_half(x), [-5, -6, -7, -8, 1, 2, 3, 4])


def test_apply_rope_against_per_pair_rotation():
    """Each pair (j, j + d/2) turns by position * inv_freq[j]: a 2x2 rotation, written out."""
    rng = np.random.default_rng(1)
    head_dim, rotary_dim = 16, 12
    x = rng.standard_normal((1, 2, 3, head_dim))
    positions = np.array([0, 5, 1000])
    inv = default_inverse_frequencies(10000.0, rotary_dim, np.float64)
    cos, sin = rope_cos_sin(inv, positions[None, :], 1.0, np.float64)
    out = apply_rope(x, cos, sin, rotary_dim)
    expected = x.copy()
    half = rotary_dim // 2
    for h in range(2):
        for t, position in enumerate(positions):
            for j in range(half):
                angle = position * inv[j]
                a, b = x[0, h, t, j], x[0, h, t, j + half]
                expected[0, h, t, j] = a * math.cos(angle) - b * math.sin(angle)
                expected[0, h, t, j + half] = b * math.cos(angle) + a * math.sin(angle)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    # The adjacent-pair (GPT-J, interleaved) layout gives something else.
    interleaved = x.copy()
    for t, position in enumerate(positions):
        for j in range(half):
            angle = position * inv[j]
            a, b = x[0, :, t, 2 * j], x[0, :, t, 2 * j + 1]
            interleaved[0, :, t, 2 * j] = a * math.cos(angle) - b * math.sin(angle)
            interleaved[0, :, t, 2 * j + 1] = b * math.cos(angle) + a * math.sin(angle)
    assert np.abs(out - interleaved).max() > 1e-3


@settings(max_examples=60, deadline=None)
@given(
    position=st.integers(0, 200_000),
    rotary_fraction=st.sampled_from([1.0, 0.75, 0.5, 0.4]),
    seed=st.integers(0, 2**16),
)
def test_rotation_preserves_norms(position, rotary_fraction, seed):
    head_dim = 80 if rotary_fraction == 0.4 else 16
    rotary_dim = int(head_dim * rotary_fraction)
    x = np.random.default_rng(seed).standard_normal((2, 3, 1, head_dim))
    cos, sin = _tables([position], rotary_dim)
    out = apply_rope(x, np.broadcast_to(cos, (2, 1, rotary_dim)), np.broadcast_to(sin, (2, 1, rotary_dim)), rotary_dim)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
    # ... pair by pair, since each pair turns by its own angle.
    half = rotary_dim // 2
    pair_norm = lambda y: np.hypot(y[..., :half], y[..., half:rotary_dim])  # noqa: E731
    np.testing.assert_allclose(pair_norm(out), pair_norm(x), rtol=1e-12)


@settings(max_examples=80, deadline=None)
@given(
    m=st.integers(0, 5000),
    n=st.integers(0, 5000),
    shift=st.integers(-5000, 100_000),
    seed=st.integers(0, 2**16),
)
def test_scores_depend_only_on_the_distance(m, n, shift, seed):
    """q.k with q at m and k at n equals q.k with both moved by the same shift (float64 tables)."""
    if min(m, n) + shift < 0:
        shift = -min(m, n)
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 1, 1, 1, 16))

    def score(qm, kn):
        cos, sin = _tables([qm, kn], 16)
        return float(apply_rope(q, cos[:, :1], sin[:, :1], 16).ravel() @ apply_rope(k, cos[:, 1:], sin[:, 1:], 16).ravel())

    assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-9)
    if m != n:  # and it does depend on the distance
        assert abs(score(m, n) - score(m, m)) > 0


@pytest.mark.parametrize("head_dim, rotary_dim", [(16, 12), (80, 32), (128, 96), (16, 16)])
def test_partial_rotary_leaves_the_tail_untouched(head_dim, rotary_dim):
    x = np.random.default_rng(2).standard_normal((2, 3, 5, head_dim)).astype(np.float32)
    inv = default_inverse_frequencies(10000.0, rotary_dim, np.float32)
    cos, sin = rope_cos_sin(inv, np.arange(5, 10)[None, :].repeat(2, 0), 1.19, np.float32)
    out = apply_rope(x, cos, sin, rotary_dim)
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out[..., rotary_dim:], x[..., rotary_dim:])
    assert np.abs(out[..., :rotary_dim] - x[..., :rotary_dim]).max() > 1e-2
    # The rotated slice is the full-rotary rule applied to the slice alone.
    np.testing.assert_array_equal(out[..., :rotary_dim], apply_rope(x[..., :rotary_dim], cos, sin, rotary_dim))


# ---- the LongRoPE switch --------------------------------------------------------------------------
@pytest.mark.parametrize("original", [32, 4096])
def test_use_long_factors_switch_is_strict(original):
    assert use_long_factors(original - 2, original) is False
    assert use_long_factors(original - 1, original) is False  # original tokens: positions 0..original-1
    assert use_long_factors(original, original) is True
    assert use_long_factors(original + 1000, original) is True


def test_inverse_frequencies_for_picks_the_factor_set():
    ours, _ = _configs("Phi-3-mini-128k-instruct.json")
    short = longrope_inverse_frequencies(ours.rope_theta, 96, ours.rope_scaling.short_factor, np.float32)
    long = longrope_inverse_frequencies(ours.rope_theta, 96, ours.rope_scaling.long_factor, np.float32)
    np.testing.assert_array_equal(inverse_frequencies_for(ours, 4095, np.float32), short)
    np.testing.assert_array_equal(inverse_frequencies_for(ours, 4096, np.float32), long)
    assert np.abs(short - long).max() > 0
    plain, _ = _configs("Phi-3-mini-4k-instruct.json")  # no LongRoPE: one set at every position
    np.testing.assert_array_equal(
        inverse_frequencies_for(plain, 10**6, np.float32), default_inverse_frequencies(10000.0, 96, np.float32)
    )


# ---- linear scaling (Phi) --------------------------------------------------------------------------
def _phi_linear(rotary_fraction, hidden, theta, factor):
    """(minphi3 config, transformers PhiConfig) of a Phi config with linear rope scaling."""
    data = dict(model_type="phi", architectures=["PhiForCausalLM"], vocab_size=96, hidden_size=hidden,
                intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64,
                partial_rotary_factor=rotary_fraction, rope_theta=theta, rope_scaling={"type": "linear", "factor": factor})
    return config_from_dict(data), transformers.PhiConfig(**{k: v for k, v in data.items() if k != "architectures"})


@pytest.mark.parametrize("rotary_fraction, hidden, theta, factor", [
    (0.5, 64, 10000.0, 2.0), (0.4, 320, 10000.0, 2.5), (1.0, 128, 5e5, 4.0), (0.5, 256, 1e4, 1.37), (1.0, 32, 1e4, 0.5),
])
def test_linear_inverse_frequencies_match_transformers_bit_for_bit(rotary_fraction, hidden, theta, factor):
    """transformers' `_compute_linear_scaling_rope_parameters` (via PhiRotaryEmbedding): the plain
    float32 frequencies, then `inv_freq /= factor`."""
    from transformers.models.phi.modeling_phi import PhiRotaryEmbedding

    ours, theirs = _phi_linear(rotary_fraction, hidden, theta, factor)
    rotary = PhiRotaryEmbedding(theirs)
    assert rotary.rope_type == "linear" and rotary.attention_scaling == 1.0 == ours.attention_factor
    expected = rotary.inv_freq.numpy()
    for max_position in (0, 10**5):  # no switch: one set at every position
        got = inverse_frequencies_for(ours, max_position, np.float32)
        assert got.dtype == np.float32 and got.shape == (ours.rotary_dim // 2,)
        np.testing.assert_array_equal(got, expected)
    # ... and so are the tables a forward call rotates with.
    positions = np.arange(0, 3000, 7)[None, :]
    cos, sin = rope_cos_sin(inverse_frequencies_for(ours, 2999, np.float32), positions)
    their_cos, their_sin = rotary(torch.zeros(1, dtype=torch.float32), torch.as_tensor(positions))
    np.testing.assert_allclose(cos, their_cos.numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(sin, their_sin.numpy(), rtol=0, atol=2e-6)


def test_linear_inverse_frequencies_formula_in_float64():
    theta, rotary_dim, factor = 10000.0, 32, 2.5
    got = linear_inverse_frequencies(theta, rotary_dim, factor, np.float64)
    expected = [(1.0 / theta ** (2 * i / rotary_dim)) / factor for i in range(rotary_dim // 2)]
    np.testing.assert_allclose(got, expected, rtol=1e-15)
    assert got.dtype == np.float64
    # Dividing every frequency by the factor is dividing every position by it.
    np.testing.assert_allclose(got * 5.0, default_inverse_frequencies(theta, rotary_dim, np.float64) * 2.0, rtol=1e-15)
