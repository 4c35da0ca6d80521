"""Tests of minphi3/ops.py against their textbook formulas, written out in float64 Python."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from transformers.activations import NewGELUActivation
from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm

from minphi3.ops import gelu_new, layer_norm, linear, log_softmax, rms_norm, silu, softmax

FINITE = st.floats(-30, 30, allow_nan=False, allow_infinity=False, width=64)


def _rows(shape=(3, 7), seed=0, scale=3.0):
    return np.random.default_rng(seed).standard_normal(shape) * scale


def test_linear_uses_the_out_in_layout():
    x = _rows((2, 3, 5))
    weight = _rows((4, 5), seed=1)
    bias = _rows((4,), seed=2)
    expected = np.einsum("bti,oi->bto", x, weight) + bias
    np.testing.assert_allclose(linear(x, weight, bias), expected, rtol=1e-13)
    np.testing.assert_allclose(linear(x, weight), expected - bias, rtol=1e-12, atol=1e-12)


def test_rms_norm_against_formula():
    x = _rows((4, 6))
    weight = _rows((6,), seed=1)
    out = rms_norm(x, weight, 1e-5)
    for row, got in zip(x, out, strict=True):
        rms = math.sqrt(sum(v * v for v in row) / len(row) + 1e-5)
        np.testing.assert_allclose(got, [v / rms * w for v, w in zip(row, weight, strict=True)], rtol=1e-13)


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=7),
    dtype=st.sampled_from([np.float32, np.float64]),
    eps=st.sampled_from([1e-6, 1e-5, 1e-2, 0.5]) | st.floats(1e-8, 1.0),
)
def test_rms_norm_property_against_its_formula(data, shape, dtype, eps):
    """y[..., i] = x[..., i] / sqrt(sum_j x[..., j]**2 / hidden + eps) * weight[i], in float64 Python,
    over shapes, float32 / float64 and eps; the result keeps x's dtype."""
    values = st.floats(-100, 100, allow_nan=False, width=32)
    x = data.draw(hnp.arrays(dtype, shape, elements=values))
    weight = data.draw(hnp.arrays(dtype, shape[-1:], elements=st.floats(-3, 3, allow_nan=False, width=32)))
    out = rms_norm(x, weight, eps)
    assert out.shape == x.shape and out.dtype == dtype
    rows = x.reshape(-1, shape[-1]).astype(np.float64)
    expected = []
    for row in rows:
        rms = math.sqrt(sum(float(v) * float(v) for v in row) / len(row) + eps)
        expected.append([float(v) / rms * float(w) for v, w in zip(row, weight, strict=True)])
    expected = np.array(expected).reshape(shape)
    # Elementwise relative error: the sum of squares has no cancellation and the rest is a handful
    # of roundings (float32: about hidden / 2 + 6 of 6e-8 each); atol only for float32 subnormals.
    rtol, atol = (1e-13, 1e-300) if dtype == np.float64 else (2e-6, 1e-35)
    np.testing.assert_allclose(out.astype(np.float64), expected, rtol=rtol, atol=atol)


def test_rms_norm_eps_inside_the_root_and_plain_gain():
    x = np.zeros((1, 4))
    x[0, 0] = 1e-3
    out = rms_norm(x, np.full(4, 2.0), 1e-5)
    expected = 1e-3 / math.sqrt((1e-6) / 4 + 1e-5) * 2.0  # gain w, not 1 + w
    assert out[0, 0] == pytest.approx(expected, rel=1e-13)


def test_rms_norm_like_transformers():
    x = torch.randn(2, 5, 16)
    module = Phi3RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(torch.randn(16))
        theirs = module(x).numpy()
    ours = rms_norm(x.numpy(), module.weight.detach().numpy(), 1e-5)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_rms_norm_float16_keeps_float32_statistics():
    """Squares of 300 overflow float16 (max 65504): statistics must be taken in float32."""
    x = np.full((2, 8), 300.0, dtype=np.float16)
    x[1] = [1e-3, -2e-3, 3e-3, 0, 0, 0, 0, 1e-3]
    weight = np.ones(8, dtype=np.float16)
    out = rms_norm(x, weight, 1e-5)
    assert out.dtype == np.float16
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0].astype(np.float64), 1.0, rtol=1e-3)
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out.astype(np.float64), expected, rtol=2e-3, atol=1e-4)
    # A float16-statistics version overflows on the first row.
    with np.errstate(over="ignore"):
        naive = x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float16(1e-5))
    assert not np.isfinite(naive[0]).all() or np.abs(naive[0] - 1).max() > 1e-2


def test_layer_norm_against_formula():
    x = _rows((3, 9)) + 5.0
    weight, bias = _rows((9,), seed=1), _rows((9,), seed=2)
    out = layer_norm(x, weight, bias, 1e-5)
    for row, got in zip(x, out, strict=True):
        mean = sum(row) / len(row)
        variance = sum((v - mean) ** 2 for v in row) / len(row)  # biased
        expected = [(v - mean) / math.sqrt(variance + 1e-5) * w + b for v, w, b in zip(row, weight, bias, strict=True)]
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    theirs = torch.nn.functional.layer_norm(torch.as_tensor(x), (9,), torch.as_tensor(weight), torch.as_tensor(bias), 1e-5)
    np.testing.assert_allclose(out, theirs.numpy(), rtol=1e-12, atol=1e-12)


def test_layer_norm_float16_keeps_float32_statistics():
    x = np.linspace(200, 400, 8, dtype=np.float16)[None, :]
    out = layer_norm(x, np.ones(8, dtype=np.float16), np.zeros(8, dtype=np.float16), 1e-5)
    assert out.dtype == np.float16 and np.isfinite(out).all()
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean()) / np.sqrt(x64.var() + 1e-5)
    np.testing.assert_allclose(out.astype(np.float64), expected, atol=2e-3)


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=6), elements=FINITE))
def test_silu_against_formula(x):
    expected = np.vectorize(lambda v: v / (1.0 + math.exp(-v)))(x)
    np.testing.assert_allclose(silu(x), expected, rtol=1e-13, atol=1e-300)


def test_silu_like_torch():
    x = torch.linspace(-20, 20, 101)
    np.testing.assert_allclose(silu(x.numpy()), torch.nn.functional.silu(x).numpy(), rtol=2e-6, atol=1e-7)


def test_float16_silu_is_rounded_once_like_torch():
    """PyTorch computes a float16 silu in float32: no overflow of exp(-x) below x = -11."""
    x = torch.linspace(-30, 30, 1201, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float16's exp(-x) overflowing would warn
        ours = silu(x.numpy())
    assert ours.dtype == np.float16
    theirs = torch.nn.functional.silu(x).numpy()
    np.testing.assert_allclose(ours.astype(np.float32), theirs.astype(np.float32), rtol=1e-3, atol=0)
    assert silu(np.float16([-20.0]))[0] < 0  # -4e-8: float16 arithmetic gives -0 (exp(20) overflows)


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=6), elements=FINITE))
def test_gelu_new_against_formula(x):
    c = math.sqrt(2 / math.pi)
    expected = np.vectorize(lambda v: 0.5 * v * (1 + math.tanh(c * (v + 0.044715 * v**3))))(x)
    np.testing.assert_allclose(gelu_new(x), expected, rtol=1e-12, atol=1e-14)  # 1 + tanh cancels for x < 0


def test_gelu_new_is_the_tanh_form_not_erf():
    x = np.linspace(-4, 4, 81)
    np.testing.assert_allclose(gelu_new(x), NewGELUActivation()(torch.as_tensor(x)).numpy(), rtol=1e-12, atol=1e-15)
    erf_gelu = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    assert np.abs(gelu_new(x) - erf_gelu).max() > 1e-4


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
                  elements=st.floats(-1e4, 1e4, allow_nan=False, width=64)))
def test_softmax_and_log_softmax_against_formula(x):
    p = softmax(x)
    logp = log_softmax(x)
    flat = x.reshape(-1, x.shape[-1])
    for row, got, got_log in zip(flat, p.reshape(flat.shape), logp.reshape(flat.shape), strict=True):
        top = max(row)
        total = sum(math.exp(v - top) for v in row)
        np.testing.assert_allclose(got, [math.exp(v - top) / total for v in row], rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(got_log, [v - top - math.log(total) for v in row], rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)


def test_softmax_other_axis():
    x = _rows((3, 4))
    np.testing.assert_allclose(softmax(x, axis=0), softmax(x.T).T, rtol=1e-15)


@pytest.mark.parametrize("fn", [softmax, log_softmax])
def test_softmax_of_float16_is_float32(fn):
    x = np.array([[11.0, 0.0, -11.0]], dtype=np.float16)  # exp(11) > float16 max
    out = fn(x)
    assert out.dtype == np.float32
    expected = torch.as_tensor(x.astype(np.float32))
    expected = (torch.softmax if fn is softmax else torch.log_softmax)(expected, -1).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert fn(x.astype(np.float64)).dtype == np.float64


def test_softmax_of_equal_large_negative_values_is_uniform():
    x = np.full((2, 5), np.finfo(np.float32).min, dtype=np.float32)
    np.testing.assert_allclose(softmax(x), 0.2, rtol=1e-6)
    assert np.isfinite(log_softmax(x)).all()
