"""Tests of minphi3/mlp.py: Phi-3's gated MLP (gate is the FIRST half of gate_up_proj) against
transformers' Phi3MLP with the same weights, and the Phi family's GELU MLP against PhiMLP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.models.phi.modeling_phi import PhiMLP
from transformers.models.phi3.modeling_phi3 import Phi3MLP

from minphi3.mlp import gated_mlp, gelu_mlp, split_gate_up
from minphi3.ops import linear, silu


def _phi3_mlp(hidden=16, intermediate=24, seed=0):
    torch.manual_seed(seed)
    config = transformers.Phi3Config(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=4)
    module = Phi3MLP(config).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape) * 0.5)
    return module


def test_split_gate_up_first_half_is_the_gate():
    gate_up = np.arange(12).reshape(1, 12)
    gate, up = split_gate_up(gate_up)
    np.testing.assert_array_equal(gate, [[0, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(up, [[6, 7, 8, 9, 10, 11]])


def test_gated_mlp_matches_transformers_phi3mlp():
    module = _phi3_mlp()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        theirs = module(x).numpy()
    gate_up = module.gate_up_proj.weight.detach().numpy()
    down = module.down_proj.weight.detach().numpy()
    ours = gated_mlp(x.numpy(), gate_up, down)
    assert ours.shape == (2, 5, 16) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    # Float64 against the formula written out: down(silu(gate) * up).
    x64 = x.numpy().astype(np.float64)
    gate_up64, down64 = gate_up.astype(np.float64), down.astype(np.float64)
    gate = x64 @ gate_up64[:24].T
    up = x64 @ gate_up64[24:].T
    expected = (gate / (1 + np.exp(-gate)) * up) @ down64.T
    np.testing.assert_allclose(gated_mlp(x64, gate_up64, down64), expected, rtol=1e-12, atol=1e-12)


def test_swapping_gate_and_up_fails():
    module = _phi3_mlp(seed=1)
    x = torch.randn(1, 4, 16)
    with torch.no_grad():
        theirs = module(x).numpy()
    gate_up = module.gate_up_proj.weight.detach().numpy()
    swapped = np.concatenate([gate_up[24:], gate_up[:24]])
    wrong = gated_mlp(x.numpy(), swapped, module.down_proj.weight.detach().numpy())
    assert np.abs(wrong - theirs).max() > 1e-2
    # And silu on the up half instead of the gate half is a different function too.
    gate, up = split_gate_up(linear(x.numpy(), gate_up))
    other = linear(gate * silu(up), module.down_proj.weight.detach().numpy())
    assert np.abs(other - theirs).max() > 1e-2


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_gated_mlp_keeps_dtype(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 8)).astype(dtype)
    out = gated_mlp(x, rng.standard_normal((12, 8)).astype(dtype), rng.standard_normal((8, 6)).astype(dtype))
    assert out.dtype == dtype and out.shape == (1, 3, 8)


def test_gelu_mlp_matches_transformers_phimlp():
    torch.manual_seed(3)
    config = transformers.PhiConfig(hidden_size=16, intermediate_size=40, num_attention_heads=4)
    module = PhiMLP(config).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape) * 0.5)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        theirs = module(x).numpy()
    weights = [t.detach().numpy() for t in (module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias)]
    ours = gelu_mlp(x.numpy(), *weights)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
