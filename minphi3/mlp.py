"""The feed-forward blocks: Phi-3's gated SiLU MLP and the Phi family's GELU MLP."""

from __future__ import annotations

from .ops import gelu_new, linear, silu


def split_gate_up(gate_up):
    """Split the fused gate_up projection's output: the FIRST half is the gate.

    gate_up: [..., 2 * intermediate] -> gate, up: [..., intermediate]
    """
    intermediate = gate_up.shape[-1] // 2
    return gate_up[..., :intermediate], gate_up[..., intermediate:]


def gated_mlp(x, gate_up_weight, down_weight):
    """Phi-3's MLP: down(silu(gate) * up), with gate and up from one fused projection.

    x: [batch, seq, hidden], gate_up_weight: [2 * intermediate, hidden],
    down_weight: [hidden, intermediate] -> [batch, seq, hidden]
    """
    gate, up = split_gate_up(linear(x, gate_up_weight))
    return linear(up * silu(gate), down_weight)


def gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    """The Phi family's MLP: fc2(gelu_new(fc1(x))), both projections with bias.

    x: [batch, seq, hidden], fc1_weight: [intermediate, hidden], fc2_weight: [hidden, intermediate]
    -> [batch, seq, hidden]
    """
    return linear(gelu_new(linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
