"""Tests of minphi3/attention.py: the mask against explicit loops (causal, sliding window, padding,
cache slots), the fused qkv split with GQA widths, grouped-query attention against a brute-force
per-head loop (fixed cases and a hypothesis property over batch, heads, kv_heads, seq, kv_seq and
window) and against transformers' eager kernel, fully masked rows, and attention in query blocks
against the unblocked computation."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tiny_checkpoints import spy_on_attention_blocks
from transformers.models.phi3 import modeling_phi3

from minphi3.attention import (
    QUERY_BLOCK,
    attention_in_query_blocks,
    attention_mask,
    grouped_query_attention,
    key_visible,
    keys_oldest_first,
    merge_heads,
    split_heads,
    split_qkv,
)


# ---- the mask -------------------------------------------------------------------------------------
def mask_by_loops(query_index, key_index, key_padding, window):
    """The rule written out: key k visible to query q iff the slot is filled (k >= 0), k <= q,
    k > q - W (with a window), and the key is a real token in that row."""
    batch = 1 if key_padding is None else len(key_padding)
    out = np.zeros((batch, 1, len(query_index), len(key_index)), dtype=bool)
    for b in range(batch):
        for i, q in enumerate(query_index):
            for j, k in enumerate(key_index):
                visible = k >= 0 and k <= q
                if window is not None and not k > q - window:
                    visible = False
                if key_padding is not None and not key_padding[b][j]:
                    visible = False
                out[b, 0, i, j] = visible
    return out


def _mask(query_index, key_index, key_padding=None, window=None):
    return attention_mask(
        np.asarray(query_index, dtype=np.int64),
        np.asarray(key_index, dtype=np.int64),
        None if key_padding is None else np.asarray(key_padding, dtype=bool),
        window,
    )


def test_causal_mask():
    mask = _mask(np.arange(6), np.arange(6))
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == bool
    np.testing.assert_array_equal(mask[0, 0], np.tril(np.ones((6, 6), dtype=bool)))


def test_sliding_window_sees_w_keys_including_itself():
    mask = _mask(np.arange(10), np.arange(10), window=4)
    np.testing.assert_array_equal(mask, mask_by_loops(range(10), range(10), None, 4))
    assert list(np.nonzero(mask[0, 0, 9])[0]) == [6, 7, 8, 9]  # transformers: query 9 sees keys 6..9
    assert mask[0, 0].sum(-1).tolist() == [1, 2, 3, 4, 4, 4, 4, 4, 4, 4]
    np.testing.assert_array_equal(_mask(np.arange(5), np.arange(5), window=1)[0, 0], np.eye(5, dtype=bool))


def test_padding_masks_keys_not_queries():
    padding = [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    mask = _mask(np.arange(5), np.arange(5), padding)
    assert mask.shape == (2, 1, 5, 5)
    np.testing.assert_array_equal(mask, mask_by_loops(range(5), range(5), padding, None))
    assert not mask[0, 0, :, :2].any()  # pad keys: never visible
    assert not mask[0, 0, 0].any()  # a pad query sees nothing at all (fully masked row)
    assert mask[0, 0, 4, 2:].all()


def test_cache_indices_with_empty_slots_and_a_rolled_buffer():
    # A rolling buffer of 6 slots after 9 tokens: slot i % 6 holds index i; slot 5 still empty.
    key_index = [6, 7, 8, 3, 4, -1]
    padding = [[1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 0]]
    for window in (None, 3, 5):
        mask = _mask([8], key_index, padding, window)
        np.testing.assert_array_equal(mask, mask_by_loops([8], key_index, padding, window))
    assert _mask([8], key_index, padding, None)[1, 0, 0].tolist() == [True] * 5 + [False]
    assert _mask([8], key_index, padding, 3)[1, 0, 0].tolist() == [True, True, True, False, False, False]


def test_key_visible_is_the_one_rule():
    q = np.arange(8)[:, None]
    k = np.arange(8)[None, :]
    np.testing.assert_array_equal(key_visible(q, k, None), k <= q)
    np.testing.assert_array_equal(key_visible(q, k, 3), (k <= q) & (k > q - 3))


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    seq=st.integers(1, 10),
    past=st.integers(0, 12),
    window=st.one_of(st.none(), st.integers(1, 14)),
    batch=st.integers(1, 3),
    empty=st.integers(0, 3),
)
def test_mask_matches_loops(data, seq, past, window, batch, empty):
    total = past + seq
    query_index = np.arange(past, total)
    # The keys in some slot order (a rolled cache), plus empty slots (-1).
    order = data.draw(st.permutations(list(range(total))))
    key_index = np.array(list(order) + [-1] * empty, dtype=np.int64)
    padding = np.array(
        data.draw(st.lists(st.lists(st.booleans(), min_size=len(key_index), max_size=len(key_index)),
                           min_size=batch, max_size=batch))
    )
    mask = _mask(query_index, key_index, padding, window)
    np.testing.assert_array_equal(mask, mask_by_loops(query_index, key_index, padding, window))
    if padding.all():  # without padding, each query sees min(q + 1, W) keys
        expected = [min(q + 1, window or q + 1) for q in query_index]
        assert mask[0, 0].sum(-1).tolist() == expected


# ---- the qkv split --------------------------------------------------------------------------------
def test_split_qkv_uses_head_counts_not_thirds():
    batch, seq, heads, kv_heads, head_dim = 2, 3, 4, 2, 5
    width = (heads + 2 * kv_heads) * head_dim
    qkv = np.arange(batch * seq * width, dtype=np.float32).reshape(batch, seq, width)
    q, k, v = split_qkv(qkv, heads, kv_heads, head_dim)
    assert q.shape == (batch, heads, seq, head_dim)
    assert k.shape == v.shape == (batch, kv_heads, seq, head_dim)
    # Blocks: Q is columns 0..19, K 20..29, V 30..39; head h of a block is its h-th run of head_dim.
    for h in range(heads):
        np.testing.assert_array_equal(q[:, h], qkv[..., h * head_dim:(h + 1) * head_dim])
    for h in range(kv_heads):
        np.testing.assert_array_equal(k[:, h], qkv[..., 20 + h * head_dim:20 + (h + 1) * head_dim])
        np.testing.assert_array_equal(v[:, h], qkv[..., 30 + h * head_dim:30 + (h + 1) * head_dim])


def test_split_qkv_by_head_counts_when_the_width_divides_by_three():
    """heads 4, kv_heads 1, head_dim 6: width 36 = 3 x 12, so a thirds split would run without error
    and be wrong. The blocks are Q = columns 0..23, K = 24..29, V = 30..35."""
    batch, seq, heads, kv_heads, head_dim = 2, 3, 4, 1, 6
    width = (heads + 2 * kv_heads) * head_dim
    assert width == 36 and width % 3 == 0
    qkv = np.arange(batch * seq * width, dtype=np.float32).reshape(batch, seq, width)
    q, k, v = split_qkv(qkv, heads, kv_heads, head_dim)
    assert q.shape == (batch, heads, seq, head_dim) and k.shape == v.shape == (batch, kv_heads, seq, head_dim)
    np.testing.assert_array_equal(merge_heads(q), qkv[..., 0:24])
    np.testing.assert_array_equal(merge_heads(k), qkv[..., 24:30])
    np.testing.assert_array_equal(merge_heads(v), qkv[..., 30:36])
    # The thirds split ([0:12], [12:24], [24:36]) gives other keys and values.
    assert not np.array_equal(merge_heads(k), qkv[..., 12:24][..., :6])
    assert not np.array_equal(merge_heads(v), qkv[..., 24:36][..., :6])


def test_split_qkv_like_transformers():
    """The reference: q = qkv[..., :H*D].view(B, T, H, D).transpose(1, 2), likewise K and V."""
    heads, kv_heads, head_dim = 6, 2, 4
    qkv = torch.randn(2, 5, (heads + 2 * kv_heads) * head_dim)
    q_pos, kv_pos = heads * head_dim, heads * head_dim + kv_heads * head_dim
    expected = (
        qkv[..., :q_pos].view(2, 5, heads, head_dim).transpose(1, 2),
        qkv[..., q_pos:kv_pos].view(2, 5, kv_heads, head_dim).transpose(1, 2),
        qkv[..., kv_pos:].view(2, 5, kv_heads, head_dim).transpose(1, 2),
    )
    for mine, theirs in zip(split_qkv(qkv.numpy(), heads, kv_heads, head_dim), expected, strict=True):
        np.testing.assert_array_equal(mine, theirs.numpy())


def test_split_and_merge_heads_round_trip():
    x = np.random.default_rng(0).standard_normal((2, 3, 12))
    heads = split_heads(x, 4)
    assert heads.shape == (2, 4, 3, 3)
    np.testing.assert_array_equal(heads[:, 1], x[..., 3:6])
    np.testing.assert_array_equal(merge_heads(heads), x)


# ---- grouped-query attention ----------------------------------------------------------------------
def brute_force_attention(q, k, v, mask, scale, mapping="repeat"):
    """Per head, per query: softmax over visible keys of q.k * scale, then the weighted sum of v.

    kv head of query head h: h // groups ("repeat", transformers' repeat_kv) or h % kv_heads ("tile").
    """
    batch, heads, seq, _ = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    if mapping == "repeat":
        k_full, v_full = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    else:
        k_full, v_full = np.tile(k, (1, groups, 1, 1)), np.tile(v, (1, groups, 1, 1))
    out = np.zeros(q.shape, dtype=np.float64)
    weights = np.zeros((batch, heads, seq, k.shape[2]))
    for b in range(batch):
        for h in range(heads):
            for i in range(seq):
                visible = mask[min(b, mask.shape[0] - 1), 0, i]
                scores = np.array([q[b, h, i] @ k_full[b, h, j] * scale for j in range(k.shape[2])])
                if not visible.any():
                    p = np.full(len(scores), 1.0 / len(scores))
                else:
                    scores = np.where(visible, scores, -np.inf)
                    p = np.exp(scores - scores.max())
                    p /= p.sum()
                weights[b, h, i] = p
                out[b, h, i] = p @ v_full[b, h]
    return out, weights


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 2), (8, 1)])
@pytest.mark.parametrize("window", [None, 3])
def test_grouped_query_attention_against_brute_force(heads, kv_heads, window):
    rng = np.random.default_rng(heads * 10 + kv_heads)
    batch, seq, past, head_dim = 2, 5, 3, 8
    q = rng.standard_normal((batch, heads, seq, head_dim))
    k = rng.standard_normal((batch, kv_heads, past + seq, head_dim))
    v = rng.standard_normal((batch, kv_heads, past + seq, head_dim))
    padding = np.ones((batch, past + seq), dtype=bool)
    padding[1, :4] = False
    mask = _mask(np.arange(past, past + seq), np.arange(past + seq), padding, window)
    out, weights = grouped_query_attention(q, k, v, mask, head_dim**-0.5, return_weights=True)
    expected, expected_weights = brute_force_attention(q, k, v, mask, head_dim**-0.5)
    assert out.shape == (batch, heads, seq, head_dim) and weights.shape == (batch, heads, seq, past + seq)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(weights, expected_weights, rtol=1e-12, atol=1e-15)
    if kv_heads not in (1, heads):  # with real groups the np.tile mapping is a different model
        tiled, _ = brute_force_attention(q, k, v, mask, head_dim**-0.5, mapping="tile")
        assert np.abs(out - tiled).max() > 1e-3
    assert grouped_query_attention(q, k, v, mask, 0.5)[1] is None


def test_grouped_query_attention_like_transformers_eager():
    """transformers' eager kernel (repeat_kv, additive finfo.min mask, float32 softmax) on the same inputs."""
    rng = np.random.default_rng(7)
    heads, kv_heads, seq, head_dim = 6, 2, 7, 4
    q = rng.standard_normal((2, heads, seq, head_dim)).astype(np.float32)
    k = rng.standard_normal((2, kv_heads, seq, head_dim)).astype(np.float32)
    v = rng.standard_normal((2, kv_heads, seq, head_dim)).astype(np.float32)
    padding = np.ones((2, seq), dtype=bool)
    padding[0, :2] = False
    mask = _mask(np.arange(seq), np.arange(seq), padding, 4)
    additive = torch.where(torch.as_tensor(mask), 0.0, torch.finfo(torch.float32).min)
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False)
    theirs, their_weights = modeling_phi3.eager_attention_forward(
        module, torch.as_tensor(q), torch.as_tensor(k), torch.as_tensor(v), additive, scaling=head_dim**-0.5
    )
    out, weights = grouped_query_attention(q, k, v, mask, head_dim**-0.5, return_weights=True)
    assert out.dtype == np.float32
    np.testing.assert_allclose(merge_heads(out), theirs.reshape(2, seq, -1).numpy(), atol=2e-6)
    np.testing.assert_allclose(weights, their_weights.numpy(), atol=2e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_fully_masked_rows_are_uniform_not_nan(dtype):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 2, 3, 4)).astype(dtype)
    k = rng.standard_normal((1, 2, 5, 4)).astype(dtype)
    v = rng.standard_normal((1, 2, 5, 4)).astype(dtype)
    mask = np.ones((1, 1, 3, 5), dtype=bool)
    mask[0, 0, 0] = False  # query 0 sees no key at all (a left-padding query)
    out, weights = grouped_query_attention(q, k, v, mask, 0.5, return_weights=True)
    assert np.isfinite(out).all() and np.isfinite(weights).all()
    np.testing.assert_allclose(weights[0, :, 0], np.full((2, 5), 0.2), rtol=1e-3)
    np.testing.assert_allclose(out[0, :, 0], v[0].astype(np.float64).mean(axis=1), rtol=1e-2, atol=1e-3)
    assert weights.dtype == dtype and out.dtype == dtype


def test_float16_scores_softmax_in_float32():
    """Scores far beyond float16's exp range still give a proper distribution."""
    q = np.full((1, 1, 1, 4), 60.0, dtype=np.float16)
    k = np.array([[[[1.0] * 4, [0.5] * 4, [-1.0] * 4]]], dtype=np.float16)
    v = np.eye(3, 4, dtype=np.float16)[None, None]
    mask = np.ones((1, 1, 1, 3), dtype=bool)
    out, weights = grouped_query_attention(q, k, v, mask, 0.05, return_weights=True)
    assert np.isfinite(weights).all()
    scores = np.array([12.0, 6.0, -12.0])
    expected = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
    np.testing.assert_allclose(weights[0, 0, 0].astype(np.float64), expected, atol=1e-3)


# ---- grouped-query attention: a property against loops ------------------------------------------------
def attention_by_loops(q, k, v, padding, window, scale, causal=True):
    """The definition, one scalar at a time. Queries sit at indices kv_seq - seq .. kv_seq - 1 of the
    sequence, keys at 0 .. kv_seq - 1. Key j is visible to query i iff the key is real
    (padding[b][j]), and with `causal`, j <= i and (with a window W) j > i - W. Query head h reads
    key/value head h // (heads / kv_heads). A query that sees no key averages every value
    (transformers' uniform row)."""
    batch, heads, seq, head_dim = q.shape
    kv_heads, kv_seq = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    out = np.zeros(q.shape)
    for b in range(batch):
        for h in range(heads):
            kv = h // groups
            for i in range(seq):
                position = kv_seq - seq + i
                visible = [bool(padding[b][j]) and (not causal or (j <= position and (window is None or j > position - window)))
                           for j in range(kv_seq)]
                scores = [sum(q[b, h, i, d] * k[b, kv, j, d] for d in range(head_dim)) * scale for j in range(kv_seq)]
                if any(visible):
                    top = max(s for s, seen in zip(scores, visible, strict=True) if seen)
                    p = [math.exp(s - top) if seen else 0.0 for s, seen in zip(scores, visible, strict=True)]
                else:
                    p = [1.0] * kv_seq
                total = sum(p)
                for d in range(head_dim):
                    out[b, h, i, d] = sum(p[j] / total * v[b, kv, j, d] for j in range(kv_seq))
    return out


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    groups=st.integers(1, 3),
    seq=st.integers(1, 7),
    past=st.integers(0, 6),
    head_dim=st.integers(1, 4),
    window=st.one_of(st.none(), st.integers(1, 9)),
    causal=st.booleans(),
    block=st.integers(1, 4),
)
def test_grouped_query_attention_matches_the_loop_definition(
    data, batch, kv_heads, groups, seq, past, head_dim, window, causal, block
):
    heads, kv_seq = kv_heads * groups, past + seq
    values = st.floats(-3, 3, allow_nan=False, width=64)
    q = data.draw(hnp.arrays(np.float64, (batch, heads, seq, head_dim), elements=values))
    k = data.draw(hnp.arrays(np.float64, (batch, kv_heads, kv_seq, head_dim), elements=values))
    v = data.draw(hnp.arrays(np.float64, (batch, kv_heads, kv_seq, head_dim), elements=values))
    padding = data.draw(hnp.arrays(np.bool_, (batch, kv_seq)))
    if causal:
        mask = mask_by_loops(range(past, kv_seq), range(kv_seq), padding, window)
    else:  # no causal rule: only padding masks; all real means no mask at all (a decode step)
        mask = None if padding.all() else np.broadcast_to(padding[:, None, None, :], (batch, 1, seq, kv_seq))
    scale = head_dim**-0.5
    expected = attention_by_loops(q, k, v, padding, window if causal else None, scale, causal)
    out, weights = grouped_query_attention(q, k, v, mask, scale, return_weights=True)
    assert out.shape == q.shape and weights.shape == (batch, heads, seq, kv_seq)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-12)
    # The same attention taken `block` queries at a time.
    blocked = attention_in_query_blocks(q, k, v, mask, scale, block=block)
    np.testing.assert_allclose(blocked, expected, rtol=1e-10, atol=1e-12)


# ---- attention in query blocks ----------------------------------------------------------------------
def _blocked_case(seq, past, pads, window, heads=4, kv_heads=2, head_dim=8, seed=0, dtype=np.float64):
    """Random q, k, v and the mask of a prompt of `seq` tokens after `past` cached ones; row b has
    pads[b] left-padding tokens, so its first queries see no key at all."""
    rng = np.random.default_rng(seed)
    kv_seq, batch = past + seq, len(pads)
    q = rng.standard_normal((batch, heads, seq, head_dim)).astype(dtype)
    k = rng.standard_normal((batch, kv_heads, kv_seq, head_dim)).astype(dtype)
    v = rng.standard_normal((batch, kv_heads, kv_seq, head_dim)).astype(dtype)
    padding = np.arange(kv_seq)[None, :] >= np.asarray(pads)[:, None]
    mask = attention_mask(np.arange(past, kv_seq), np.arange(kv_seq), padding, window)
    return q, k, v, mask


@pytest.mark.parametrize(
    "seq, past, pads, window, block",
    [
        (150, 0, (0, 30, 100), None, QUERY_BLOCK),  # the prefill shape of test_model's long prompts
        (150, 0, (0, 30, 100), 24, QUERY_BLOCK),
        (150, 0, (0, 0), 24, QUERY_BLOCK),  # no padding: blocks 1 and 2 see only a window of keys
        (90, 20, (0, 50), 32, 16),  # after a cache of 20 keys, small blocks
        (65, 0, (0, 70), None, QUERY_BLOCK),  # one block and one query; row 1 is padding to the end
    ],
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_blocked_attention_equals_unblocked(monkeypatch, seq, past, pads, window, block, dtype):
    q, k, v, mask = _blocked_case(seq, past, pads, window, seed=seq + past, dtype=dtype)
    unseen = ~mask.any(axis=-1)  # [batch, 1, seq]: queries that see no key
    assert unseen.any() == any(p > past for p in pads)
    whole, _ = grouped_query_attention(q, k, v, mask, 0.35)
    calls = spy_on_attention_blocks(monkeypatch)
    blocked = attention_in_query_blocks(q, k, v, mask, 0.35, block=block)
    monkeypatch.undo()
    assert [rows for rows, _ in calls] == [min(block, seq - start) for start in range(0, seq, block)]
    if window is not None and not unseen.any():
        assert min(keys for _, keys in calls) < past + seq  # some block left keys out
    assert blocked.shape == q.shape and blocked.dtype == dtype
    tolerance = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(blocked, whole, rtol=tolerance, atol=tolerance)
    # A query that sees no key averages every value, blocked or not (transformers' uniform row).
    b, _, i = np.nonzero(unseen)
    if len(b):
        groups = q.shape[1] // k.shape[1]
        mean = np.repeat(v.astype(np.float64).mean(axis=2), groups, axis=1)  # [batch, heads, head_dim]
        np.testing.assert_allclose(blocked[b, :, i], mean[b], rtol=10 * tolerance, atol=10 * tolerance)


def test_short_or_unmasked_attention_is_not_blocked(monkeypatch):
    """seq <= block, or no mask at all (every key visible): one call, the whole thing."""
    q, k, v, mask = _blocked_case(64, 0, (0, 10), None)
    whole_short = grouped_query_attention(q, k, v, mask, 0.5)[0]
    q_long, k_long, v_long, _ = _blocked_case(100, 0, (0,), None)
    whole_long = grouped_query_attention(q_long, k_long, v_long, None, 0.5)[0]
    calls = spy_on_attention_blocks(monkeypatch)
    np.testing.assert_array_equal(attention_in_query_blocks(q, k, v, mask, 0.5), whole_short)
    np.testing.assert_array_equal(attention_in_query_blocks(q_long, k_long, v_long, None, 0.5), whole_long)
    assert [queries for queries, _ in calls] == [64, 100]


def test_keys_oldest_first_sorts_the_key_axis_by_index():
    # A rolling buffer of 5 slots after 8 tokens holds indices 5, 6, 7, 3, 4.
    key_index = np.array([5, 6, 7, 3, 4])
    weights = np.random.default_rng(0).random((2, 3, 1, 5))
    ordered = keys_oldest_first(weights, key_index)
    for position, slot in enumerate([3, 4, 0, 1, 2]):
        np.testing.assert_array_equal(ordered[..., position], weights[..., slot])
    np.testing.assert_array_equal(keys_oldest_first(weights, np.arange(5)), weights)
