"""Attention: the fused qkv split, the one mask rule, and grouped-query attention.

The mask rule lives in `key_visible`: key k is visible to query q iff k <= q (causal),
k > q - W (sliding window of W keys including the query itself, transformers' rule) and the key
is not padding. Indices are absolute indices into the sequence (cache plus current tokens), not
position ids: with left padding the two differ, and transformers masks by index.
"""

from __future__ import annotations

import numpy as np

from .backend import array_module, compute_dtype, matmul, query_block_size
from .ops import softmax


def split_qkv(qkv, num_heads: int, num_kv_heads: int, head_dim: int):
    """Split the fused qkv projection into heads: three contiguous blocks Q | K | V, not thirds.

    qkv: [batch, seq, (heads + 2 * kv_heads) * head_dim]
    -> q: [batch, heads, seq, head_dim], k, v: [batch, kv_heads, seq, head_dim]
    With grouped-query attention the K and V blocks are narrower than Q.
    """
    q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[..., :q_width]
    k = qkv[..., q_width : q_width + kv_width]
    v = qkv[..., q_width + kv_width :]
    return split_heads(q, num_heads), split_heads(k, num_kv_heads), split_heads(v, num_kv_heads)


def split_heads(x, num_heads: int):
    """[batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim]."""
    batch, seq, width = x.shape
    return x.reshape(batch, seq, num_heads, width // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """[batch, heads, seq, head_dim] -> [batch, seq, heads * head_dim]."""
    batch, heads, seq, head_dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, seq, heads * head_dim)


def key_visible(query_index, key_index, sliding_window: int | None):
    """The causal and sliding-window rule: may query q see key k?

    query_index: [..., seq, 1], key_index: [..., 1, kv_seq] (broadcastable integer arrays)
    -> bool [..., seq, kv_seq]
    visible = k <= q, and with a window W also k > q - W (W keys including the query itself).
    """
    visible = key_index <= query_index
    if sliding_window is not None:
        visible &= key_index > query_index - sliding_window
    return visible


def attention_mask(query_index, key_index, key_padding=None, sliding_window: int | None = None):
    """The one boolean mask: causal AND sliding window AND not padding.

    query_index: [seq] absolute indices of the queries,
    key_index: [kv_seq] absolute indices of the keys (negative for an empty cache slot),
    key_padding: [batch, kv_seq] bool, True for real tokens (None: all real)
    -> bool [batch or 1, 1, seq, kv_seq]
    """
    visible = key_visible(query_index[:, None], key_index[None, :], sliding_window) & (key_index >= 0)[None, :]
    visible = visible[None, None, :, :]
    if key_padding is not None:
        visible = visible & key_padding[:, None, None, :]
    return visible


def grouped_query_attention(q, k, v, mask, scale: float, return_weights: bool = False):
    """softmax(q k^T * scale, masked) v, with each key/value head serving a group of query heads.

    q: [batch, heads, seq, head_dim], k, v: [batch, kv_heads, kv_seq, head_dim],
    mask: bool [batch or 1, 1, seq, kv_seq], or None when every key is visible to every query
    -> out: [batch, heads, seq, head_dim], weights: [batch, heads, seq, kv_seq] or None
    Query head h uses key/value head h // (heads / kv_heads) (transformers' `repeat_kv`, the same
    as np.repeat on the head axis). The grouping is done by a reshape, so keys are never copied.
    Masked scores are set to the dtype's lowest finite value (not -inf), so a row with every key
    masked (a left-padding query) gets a uniform distribution rather than NaN, as in transformers.
    Scores are softmaxed in at least float32. The scores are the largest arrays of a prefill
    ([batch, heads, seq, kv_seq]), so they are scaled and masked in place, not copied.
    """
    xp = array_module(q)
    batch, heads, seq, head_dim = q.shape
    kv_heads, kv_seq = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    q_grouped = q.reshape(batch, kv_heads, groups * seq, head_dim)
    scores = matmul(q_grouped, k.transpose(0, 1, 3, 2)).reshape(batch, heads, seq, kv_seq)
    scores *= scale
    lowest = np.finfo(scores.dtype).min
    scores = scores.astype(compute_dtype(scores.dtype), copy=False)
    if mask is not None:
        xp.copyto(scores, lowest, where=~mask)
    weights = softmax(scores).astype(v.dtype, copy=False)
    out = matmul(weights.reshape(batch, kv_heads, groups * seq, kv_seq), v).reshape(batch, heads, seq, head_dim)
    return out, (weights if return_weights else None)


def keys_oldest_first(weights, key_index):
    """Attention weights with the key axis in text order, oldest key first, as transformers lays
    them out. A rolling cache holds its keys in slot order, which wraps around once the text is
    longer than the window (slot = index % capacity).

    weights: [batch, heads, seq, kv_seq], key_index: [kv_seq] absolute index of each key
    -> [batch, heads, seq, kv_seq]
    """
    xp = array_module(weights)
    return weights[..., xp.argsort(key_index)]


QUERY_BLOCK = 64  # queries per block in `attention_in_query_blocks` on the CPU


def attention_in_query_blocks(q, k, v, mask, scale: float, block: int | None = None):
    """`grouped_query_attention` taken `block` queries at a time, each block against only the
    run of keys that some query of the block may see. -> out: [batch, heads, seq, head_dim]

    Shapes as in `grouped_query_attention`. The result is the same (up to the order of float
    additions): a key hidden from every query of a block has weight exactly 0 in each of its
    rows, so leaving it out changes nothing. Under the causal rule the first queries of a prompt
    see few keys, so a prompt of n tokens computes about half of the n x n scores instead of all
    of them, and never holds them all at once (32 heads x 4096^2 float32 scores are 2 GiB).
    block: None picks the backend's size (`backend.query_block_size`): QUERY_BLOCK on the CPU,
    on the GPU as many queries as keep a block's scores under 1 GiB.
    """
    xp = array_module(q)
    batch, heads, seq, _ = q.shape
    if block is None:
        block = query_block_size(xp, batch * heads * k.shape[2], QUERY_BLOCK)
    if mask is None or seq <= block:
        return grouped_query_attention(q, k, v, mask, scale)[0]
    out = xp.empty(q.shape, dtype=q.dtype)
    for start in range(0, seq, block):
        rows = slice(start, start + block)
        keys = visible_key_run(mask[:, :, rows])
        out[:, :, rows] = grouped_query_attention(q[:, :, rows], k[:, :, keys], v[:, :, keys], mask[:, :, rows, keys], scale)[0]
    return out


def visible_key_run(mask) -> slice:
    """The shortest run of key columns that holds every key some query of `mask` may see.

    mask: bool [..., seq, kv_seq] -> a slice of kv_seq. When some query sees no key at all (a
    left-padding query), all keys are kept: such a query attends uniformly over every key, as in
    transformers.
    """
    xp = array_module(mask)
    if not bool(mask.any(axis=-1).all()):
        return slice(None)
    seen = xp.nonzero(mask.any(axis=tuple(range(mask.ndim - 1))))[0]
    return slice(int(seen[0]), int(seen[-1]) + 1)
