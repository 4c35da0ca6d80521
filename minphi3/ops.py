"""Elementwise and row-wise building blocks: linear maps, norms, activations, softmax.

Each function takes arrays of either backend and asks them for their module (`array_module`).
Reductions (the norms, softmax) run in at least float32 whatever the model dtype, as transformers
does, so that float16 models do not overflow and float64 models stay float64.
"""

from __future__ import annotations

import math

from .backend import array_module, compute_dtype, matmul


def linear(x, weight, bias=None):
    """y = x W^T + b, with W in PyTorch's [out, in] layout (the checkpoint's own).

    x: [..., in], weight: [out, in], bias: [out] or None -> [..., out]
    `weight.T` is a view: the BLAS call reads the stored rows directly, no copy is made.
    (`matmul` is `@`, in a form a CUDA graph can record: see minphi3/backend.py.)
    """
    y = matmul(x, weight.T)
    if bias is not None:
        y += bias
    return y


def rms_norm(x, weight, eps):
    """Scale each vector to unit root-mean-square, then by a learned gain (Phi-3's RMSNorm).

    x: [..., hidden], weight: [hidden] -> [..., hidden]
    y = (x / sqrt(mean(x**2) + eps)) * weight; statistics in at least float32, the result cast
    back to x's dtype *before* the gain is applied, in transformers' order.
    The mean is written as sum / hidden (the same float32 result as `xp.mean`): `mean` goes
    through a Python wrapper that costs more than the sum itself on one decoding token's vector.
    """
    xp = array_module(x)
    wide = x.astype(compute_dtype(x.dtype), copy=False)
    mean_square = (wide * wide).sum(axis=-1, keepdims=True) / x.shape[-1]
    inverse_rms = 1.0 / xp.sqrt(mean_square + eps)
    return weight * (wide * inverse_rms).astype(x.dtype, copy=False)


def layer_norm(x, weight, bias, eps):
    """LayerNorm with a gain and a bias (the Phi family's norm).

    x: [..., hidden], weight, bias: [hidden] -> [..., hidden]
    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, with the biased variance,
    statistics in at least float32.
    """
    xp = array_module(x)
    wide = x.astype(compute_dtype(x.dtype), copy=False)
    centered = wide - xp.mean(wide, axis=-1, keepdims=True)
    variance = xp.mean(centered * centered, axis=-1, keepdims=True)
    normalized = (centered / xp.sqrt(variance + eps)).astype(x.dtype, copy=False)
    return normalized * weight + bias


def silu(x):
    """silu(x) = x * sigmoid(x) = x / (1 + exp(-x)). x: any shape, the result in x's dtype.

    float16 is computed in float32 and rounded once, as PyTorch's kernel does: in float16 itself
    exp(-x) overflows below x = -11 (silu would be a flat 0 there, with a warning) and each of
    the three steps would round.
    """
    xp = array_module(x)
    wide = x.astype(compute_dtype(x.dtype), copy=False)
    return (wide / (1 + xp.exp(-wide))).astype(x.dtype, copy=False)


def gelu_new(x):
    """The tanh approximation of GELU used by phi-1/1.5/2 (`gelu_new`), not the exact erf form.

    gelu_new(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). x: any shape.
    """
    xp = array_module(x)
    return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


def softmax(scores, axis=-1):
    """Softmax along `axis`, computed in at least float32, returned in that wide dtype.

    scores: any shape. p_i = exp(s_i - max s) / sum_j exp(s_j - max s).
    Rows of equal entries (for example every key masked with the same large negative value)
    give a uniform distribution, never NaN.
    The exponentials are taken and normalized in place in one new array: attention's scores
    are the largest arrays of a prefill, and each extra temporary is one more pass over memory.
    """
    xp = array_module(scores)
    wide = scores.astype(compute_dtype(scores.dtype), copy=False)
    exp = wide - wide.max(axis=axis, keepdims=True)
    xp.exp(exp, out=exp)
    exp /= exp.sum(axis=axis, keepdims=True)
    return exp


def log_softmax(scores, axis=-1):
    """log(softmax(scores)) computed stably in at least float32. scores: any shape."""
    xp = array_module(scores)
    wide = scores.astype(compute_dtype(scores.dtype), copy=False)
    shifted = wide - xp.max(wide, axis=axis, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=axis, keepdims=True))
