"""Tests of minphi3/cache.py through the model: logits with the KV cache equal logits without it, at
every step (prefill, then token by token, or in uneven chunks), for plain and grouped-query
attention, a rolling sliding-window buffer, a left-padded batch and partial rotary; the LongRoPE
switch cannot be crossed with a stale cache; reset starts afresh."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_checkpoints import assert_logits_close, random_ids

import minphi3
from minphi3 import GenerationError


def _np(x):
    return minphi3.to_numpy(x)


def _close(ours, full, dtype="float32"):
    """Cached and uncached logits: the same arithmetic up to summation order."""
    ours, full = np.asarray(ours, np.float64), np.asarray(full, np.float64)
    assert ours.shape == full.shape
    scale = max(1.0, float(np.abs(full).max()))
    tolerance = (1e-5 if dtype == "float32" else 1e-12) * scale
    assert float(np.abs(ours - full).max()) <= tolerance


def run_in_chunks(model, ids, chunks, mask=None, capacity=4, check_cache=None):
    """Feed ids through one cache in chunks of the given sizes; -> the logits of every position."""
    cache = model.new_cache(ids.shape[0], capacity)
    start, pieces = 0, []
    for size in chunks:
        stop = start + size
        kwargs = {} if mask is None else {"attention_mask": mask[:, :stop]}
        out = model(ids[:, start:stop], cache=cache, **kwargs)
        assert out.cache is cache
        assert cache.length == stop
        pieces.append(_np(out.logits))
        if check_cache is not None:
            check_cache(cache, stop)
        start = stop
    assert start == ids.shape[1]
    return np.concatenate(pieces, axis=1), cache


def _left_padded_mask(batch, seq, pads):
    mask = np.ones((batch, seq), dtype=np.int64)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return mask


CASES = {
    "mha": dict(name="mha", seq=20, prefill=6),
    "gqa": dict(name="gqa", seq=20, prefill=1),
    "window": dict(name="window", seq=24, prefill=8),  # W = 5: 24 > 3 W
    "window_gqa": dict(name="window_gqa", seq=19, prefill=3),  # W = 4
    "partial_tied": dict(name="partial_tied", seq=30, prefill=7),  # stays below LongRoPE's switch (32)
    "padded": dict(name="gqa", seq=16, prefill=7, pads=(0, 3, 6)),
    "padded_window": dict(name="window", seq=20, prefill=9, pads=(0, 7)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_then_token_by_token_equals_the_full_forward(zoo, case):
    spec = CASES[case]
    model = zoo.model(spec["name"])
    pads = spec.get("pads", (0, 0))
    ids = random_ids(len(pads), spec["seq"], seed=len(case))
    mask = _left_padded_mask(len(pads), spec["seq"], pads) if "pads" in spec else None
    full = _np(model(ids, attention_mask=mask).logits)
    chunks = [spec["prefill"]] + [1] * (spec["seq"] - spec["prefill"])
    cached, _ = run_in_chunks(model, ids, chunks, mask)
    real = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    _close(cached[real], full[real])
    assert np.isfinite(cached).all()


def test_float64_cache_is_exact_to_rounding(zoo):
    model = zoo.model("window_gqa", "float64")
    ids = random_ids(2, 15, seed=1)
    full = _np(model(ids).logits)
    cached, _ = run_in_chunks(model, ids, [4] + [1] * 11)
    _close(cached, full, "float64")


def test_sliding_window_buffer_rolls_and_stays_bounded(zoo):
    model = zoo.model("window")
    window = model.config.sliding_window
    assert window == 5
    ids = random_ids(1, 4 * window + 3, seed=2)
    sizes = []

    def check(cache, length):
        assert cache.capacity == window  # after every step, whatever the step's size
        sizes.append(cache.nbytes)
        held = sorted(int(i) for i in _np(cache.slot_index) if i >= 0)
        assert held == list(range(max(0, length - window), length))  # exactly the newest W tokens

    full = _np(model(ids).logits)
    cached, cache = run_in_chunks(model, ids, [8] + [1] * (ids.shape[1] - 8), capacity=64, check_cache=check)
    _close(cached, full)
    assert len(set(sizes)) == 1  # memory flat from the prefill on
    layers, kv_heads, head_dim = model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim
    assert sizes[0] >= 2 * layers * kv_heads * window * head_dim * 4
    assert sizes[0] < 2 * layers * kv_heads * (window + 1) * head_dim * 4 + 1024


def test_cache_without_window_grows_to_hold_everything(zoo):
    model = zoo.model("mha")
    ids = random_ids(1, 21, seed=3)
    _, cache = run_in_chunks(model, ids, [2] + [1] * 19, capacity=2)
    assert cache.capacity >= 21
    assert sorted(int(i) for i in _np(cache.slot_index) if i >= 0) == list(range(21))


@pytest.mark.parametrize("name", ["mha", "gqa", "window", "window_gqa"])
@pytest.mark.parametrize("chunks", [[3, 5, 1, 4, 2, 6, 1], [1, 1, 7, 3, 10], [11, 11]])
def test_chunked_prefill_equals_the_full_forward(zoo, name, chunks):
    model = zoo.model(name)
    ids = random_ids(2, sum(chunks), seed=sum(chunks[:2]))
    full = _np(model(ids).logits)
    window = model.config.sliding_window

    def check(cache, length):
        if window is not None:  # never more than W slots kept between steps; W once W tokens are in
            assert cache.capacity == window if length >= window else cache.capacity <= window

    cached, _ = run_in_chunks(model, ids, chunks, check_cache=check)
    _close(cached, full)


def test_chunked_prefill_with_padding(zoo):
    model = zoo.model("window_gqa")
    mask = _left_padded_mask(3, 17, (0, 2, 9))
    ids = random_ids(3, 17, seed=4)
    full = _np(model(ids, attention_mask=mask).logits)
    cached, _ = run_in_chunks(model, ids, [3, 5, 1, 8], mask)
    real = mask.astype(bool)
    _close(cached[real], full[real])


def test_mask_for_the_new_tokens_only_is_accepted(zoo):
    """With a cache the attention mask may cover [past + seq] or only the new [seq] tokens."""
    model = zoo.model("gqa")
    mask = _left_padded_mask(2, 9, (0, 4))
    ids = random_ids(2, 9, seed=5)
    cache_a, cache_b = model.new_cache(2, 16), model.new_cache(2, 16)
    model(ids[:, :6], attention_mask=mask[:, :6], cache=cache_a)
    model(ids[:, :6], attention_mask=mask[:, :6], cache=cache_b)
    a = _np(model(ids[:, 6:], attention_mask=mask, cache=cache_a).logits)
    b = _np(model(ids[:, 6:], attention_mask=mask[:, 6:], cache=cache_b).logits)
    np.testing.assert_array_equal(a, b)


def test_crossing_longrope_switch_with_a_cache_raises(zoo):
    model = zoo.model("longrope")
    original = model.config.original_max_position_embeddings
    ids = random_ids(1, original + 4, seed=6)
    cache = model.new_cache(1, 64)
    model(ids[:, : original - 2], cache=cache)
    with pytest.raises(GenerationError, match="LongRoPE"):
        model(ids[:, original - 2 : original + 2], cache=cache)  # positions 30..33 cross 32
    # Up to position original - 1 the short factors still hold; position original needs the long ones.
    cache = model.new_cache(1, 64)
    short, _ = run_in_chunks(model, ids[:, :original], [original - 2, 1, 1])
    _close(short, _np(model(ids[:, :original]).logits))
    model(ids[:, :original], cache=cache)
    with pytest.raises(GenerationError, match="original_max_position_embeddings=32"):
        model(ids[:, original : original + 1], cache=cache)


def test_reset_then_reprefill_past_the_switch(zoo):
    """What generation does on crossing: reset, feed everything again with the long factors, go on."""
    model = zoo.model("longrope")
    original = model.config.original_max_position_embeddings
    ids = random_ids(2, original + 4, seed=7)
    cache = model.new_cache(2, 8)
    model(ids[:, :original], cache=cache)
    cache.reset()
    assert cache.length == 0
    assert (_np(cache.slot_index) == -1).all()
    long = _np(model(ids[:, : original + 1], cache=cache).logits)
    _close(long, _np(model(ids[:, : original + 1]).logits))
    for t in range(original + 1, original + 4):
        step = _np(model(ids[:, t : t + 1], cache=cache).logits)
        _close(step, _np(model(ids[:, : t + 1]).logits)[:, -1:])


def test_reset_forgets_the_previous_text(zoo):
    model = zoo.model("window_gqa")
    first, second = random_ids(2, 9, seed=8), random_ids(2, 9, seed=9)
    cache = model.new_cache(2, 4)
    run = lambda ids: _np(model(ids, cache=cache).logits)  # noqa: E731
    run(first)
    run(first[:, :3])
    cache.reset()
    assert cache.length == 0
    again = run(second)
    _close(again, _np(model(second).logits))
    fresh = _np(model(second, cache=model.new_cache(2, 4)).logits)
    np.testing.assert_array_equal(again, fresh)


def test_cache_batch_size_must_match(zoo):
    model = zoo.model("mha")
    cache = model.new_cache(2, 8)
    with pytest.raises(GenerationError, match="2 rows"):
        model(random_ids(3, 2), cache=cache)


def test_cached_logits_match_transformers_too(zoo):
    """The last step of a cached window run against transformers' full forward on the same text."""
    model, oracle = zoo.model("window"), zoo.oracle("window")
    from tiny_checkpoints import oracle_forward

    ids = random_ids(2, 18, seed=10)
    cached, _ = run_in_chunks(model, ids, [6] + [1] * 12)
    assert_logits_close(cached, oracle_forward(oracle, ids).logits.numpy())


def test_attentions_past_the_window_are_in_text_order_as_in_transformers(zoo):
    """A rolling buffer holds keys in slot order, which wraps; the attentions it returns are
    ordered oldest key first, as transformers' sliding-window cache returns them."""
    import torch
    from transformers import DynamicCache

    model, oracle = zoo.model("window"), zoo.oracle("window")
    ids = random_ids(2, 10, seed=3)
    cache, theirs_cache = model.new_cache(2, 16), DynamicCache(config=oracle.config)
    model(ids[:, :7], cache=cache)
    with torch.no_grad():
        oracle(torch.as_tensor(ids[:, :7]), past_key_values=theirs_cache, use_cache=True)
    for step in (7, 8, 9):
        ours = model(ids[:, step : step + 1], cache=cache, output_attentions=True)
        with torch.no_grad():
            theirs = oracle(torch.as_tensor(ids[:, step : step + 1]), past_key_values=theirs_cache,
                            use_cache=True, output_attentions=True)  # fmt: skip
        assert_logits_close(minphi3.to_numpy(ours.logits), theirs.logits.numpy())
        for mine, reference in zip(ours.attentions, theirs.attentions, strict=True):
            assert mine.shape == tuple(reference.shape)
            np.testing.assert_allclose(minphi3.to_numpy(mine), reference.numpy(), atol=1e-5)


def test_a_window_cache_grows_geometrically_up_to_the_window(tmp_path):
    """One-token steps into a window cache smaller than W move it O(log W) times, not once per
    token, and never past W slots."""
    from tiny_checkpoints import save_tiny

    model = minphi3.load(save_tiny(tmp_path / "w", sliding_window=40, max_position_embeddings=256))
    cache = model.new_cache(1, 3)
    capacities = []
    for token in random_ids(1, 60, seed=2)[0]:
        model(np.array([[token]]), cache=cache)
        capacities.append(cache.capacity)
    moves = sorted(set(capacities))
    assert moves == [3, 6, 12, 24, 40]
    assert cache.length == 60


def test_reserve_caps_a_window_cache_at_the_window(zoo):
    model = zoo.model("window")
    cache = model.new_cache(1, 2)
    cache.reserve(100)
    assert cache.capacity == model.config.sliding_window == 5
    plain = zoo.model("mha").new_cache(1, 2)
    plain.reserve(100)
    assert plain.capacity == 100


@pytest.mark.parametrize("back", [1, 2, 4])
def test_rewind_of_a_rolled_window_keeps_it_only_while_the_window_is_held(zoo, back):
    """After 12 tokens a 5-slot buffer holds tokens 7..11. Re-feeding from token 11 needs keys
    7..10, all held: rewind keeps the cache. From token 10 or 8 it needs keys 6.., overwritten:
    rewind resets. Either way the logits that follow equal the full forward's."""
    model = zoo.model("window")
    ids = random_ids(1, 12, seed=6)
    cache = model.new_cache(1, 16)
    model(ids, cache=cache)
    assert cache.capacity == 5 and cache.length == 12
    kept = cache.rewind(12 - back)
    assert kept is (back == 1)
    start = cache.length
    logits = _np(model(ids[:, start:], cache=cache).logits)
    _close(logits[:, -back:], _np(model(ids).logits)[:, -back:])


def test_rewind_of_a_window_cache_that_has_not_rolled_keeps_it(zoo):
    model = zoo.model("window")
    ids = random_ids(1, 4, seed=7)
    cache = model.new_cache(1, 16)
    model(ids, cache=cache)
    assert cache.rewind(1) and cache.length == 1
    _close(_np(model(ids[:, 1:], cache=cache).logits), _np(model(ids).logits)[:, 1:])


@pytest.mark.parametrize("new", [1, 3])
def test_rewind_after_a_step_that_stopped_half_way(zoo, new):
    """An exception inside a layer leaves the new tokens' slots written but `length` unchanged:
    the buffer no longer holds what `length` says. rewind must judge by the slots themselves and
    reset here (key 7 is gone), so the logits that follow are still the full forward's."""
    model = zoo.model("window")
    ids = random_ids(1, 12, seed=6)
    cache = model.new_cache(1, 16)
    model(ids, cache=cache)

    class Interrupted(Exception):
        pass

    def interrupted(*args, **kwargs):
        raise Interrupted

    layer, model.decoder_layer = model.decoder_layer, interrupted
    try:
        with pytest.raises(Interrupted):
            model(random_ids(1, new, seed=8), cache=cache)
    finally:
        model.decoder_layer = layer
    assert cache.length == 12
    assert not cache.rewind(11)
    _close(_np(model(ids, cache=cache).logits), _np(model(ids).logits))


@pytest.mark.parametrize("name", ["mha", "window"])
def test_a_whole_mask_decides_the_padding_of_cached_keys_as_in_transformers(zoo, name):
    """A [batch, cached + seq] mask covers the cached keys too: here it marks as padding four
    keys that an earlier call fed as real, and transformers masks them. The window cache (W = 5)
    has rolled: it holds two of them, in slots that are not their indices."""
    import torch
    from transformers import DynamicCache

    model, oracle = zoo.model(name), zoo.oracle(name)
    ids = random_ids(2, 9, seed=3)
    whole = np.ones_like(ids)
    whole[1, 1:5] = 0
    cache, theirs_cache = model.new_cache(2, 9), DynamicCache(config=oracle.config)
    model(ids[:, :7], attention_mask=np.ones((2, 7), np.int64), cache=cache)
    with torch.no_grad():
        oracle(torch.as_tensor(ids[:, :7]), attention_mask=torch.ones(2, 7, dtype=torch.long),
               past_key_values=theirs_cache, use_cache=True)  # fmt: skip
    ours = _np(model(ids[:, 7:], attention_mask=whole, cache=cache).logits)
    with torch.no_grad():
        theirs = oracle(torch.as_tensor(ids[:, 7:]), attention_mask=torch.as_tensor(whole),
                        past_key_values=theirs_cache, use_cache=True).logits.numpy()  # fmt: skip
    assert_logits_close(ours, theirs)
    # Row 1 differs from the run whose mask covers only the new tokens (the cache's record wins).
    recorded = model.new_cache(2, 9)
    model(ids[:, :7], cache=recorded)
    unchanged = _np(model(ids[:, 7:], attention_mask=np.ones((2, 2), np.int64), cache=recorded).logits)
    _close(ours[0], unchanged[0])
    assert float(np.abs(ours[1] - unchanged[1]).max()) > 1e-2


@pytest.mark.parametrize("name", ["mha", "window"])
def test_a_whole_mask_after_a_step_that_stopped_half_way(zoo, name):
    """A step that raised after reserving its slots (Ctrl-C mid-forward) leaves slots past the
    cache's length; the next call, with a mask over every token, writes them again."""
    model = zoo.model(name)
    ids, whole = random_ids(2, 9, seed=3), np.ones((2, 7), np.int64)
    clean, interrupted = model.new_cache(2, 9), model.new_cache(2, 9)
    model(ids[:, :5], cache=clean)
    model(ids[:, :5], cache=interrupted)
    interrupted.begin_step(2)  # what the raising call had done
    expected = _np(model(ids[:, 5:7], attention_mask=whole, cache=clean).logits)
    _close(_np(model(ids[:, 5:7], attention_mask=whole, cache=interrupted).logits), expected)


def test_a_window_cache_after_a_long_step_that_stopped_half_way(zoo):
    """A chunk of 6 tokens that raised after reserving its slots borrowed W - 1 + 6 slots; the
    next steps give the borrowed slots back, and the half-written ones must not land on keys
    still needed (logits were off by 6.6)."""
    model = zoo.model("window")
    ids = random_ids(2, 14, seed=4)
    clean, interrupted = model.new_cache(2, 4), model.new_cache(2, 4)
    for cache in (clean, interrupted):
        model(ids[:, :6], cache=cache)
    interrupted.begin_step(6)  # what the raising call had done
    for step in range(6, 10):
        expected = _np(model(ids[:, step : step + 1], cache=clean).logits)
        _close(_np(model(ids[:, step : step + 1], cache=interrupted).logits), expected)


@pytest.mark.parametrize("kwargs", [
    dict(labels=np.zeros((2, 3), np.int64)), dict(labels=np.full((2, 4), 999)), dict(logits_to_keep=-1),
    dict(logits_to_keep="x"), dict(logits_to_keep=1, labels=np.zeros((2, 4), np.int64)),
])  # fmt: skip
def test_a_call_refused_for_its_labels_or_logits_to_keep_leaves_the_cache_as_it_was(zoo, kwargs):
    model = zoo.model("mha")
    ids = random_ids(2, 10, seed=6)
    cache = model.new_cache(2, 10)
    model(ids[:, :6], cache=cache)
    with pytest.raises(GenerationError):
        model(ids[:, 6:], cache=cache, **kwargs)
    assert cache.length == 6
    _close(_np(model(ids[:, 6:], cache=cache).logits), _np(model(ids).logits)[:, 6:])  # the retry


def test_the_cache_grows_no_further_than_the_context_then_doubles_again(zoo):
    """Capped at max_position_embeddings; a direct call past it (transformers allows one) grows
    geometrically again, not by one slot per token."""
    model = zoo.model("mha")
    context = model.config.max_position_embeddings
    cache = model.new_cache(1, context // 2 + 1)
    model(random_ids(1, context // 2 + 1), cache=cache)
    model(random_ids(1, context // 2 - 1), cache=cache)  # doubling would give context + 2 slots
    assert cache.capacity == context
    model(random_ids(1, 1), cache=cache)
    assert cache.capacity == 2 * context
    moves = 0
    for _ in range(8):
        before = cache.capacity
        model(random_ids(1, 1), cache=cache)
        moves += cache.capacity != before
    assert moves == 0


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_generate_refuses_a_cache_of_another_dtype_on_either_step(zoo, cuda_graph):
    """A cache holding the whole prompt goes straight to the fixed decode step, which runs no
    model call to check it: generate checks it itself."""
    ids = random_ids(1, 6)
    cache = zoo.model("mha", "float64").new_cache(1, 12)
    zoo.model("mha", "float64")(ids, cache=cache)
    with pytest.raises(GenerationError, match="another model: dtype float64, not float32"):
        minphi3.generate(zoo.model("mha"), ids, max_new_tokens=3, eos_token_id=[], cache=cache, cuda_graph=cuda_graph)


def test_a_cache_made_for_another_model_or_dtype_is_refused(zoo):
    ids = random_ids(2, 4)
    gqa, mha = zoo.model("gqa"), zoo.model("mha")
    with pytest.raises(GenerationError, match=f"made for another model: kv heads {mha.config.num_key_value_heads}, not 2"):
        gqa(ids, cache=mha.new_cache(2, 8))
    with pytest.raises(GenerationError, match="another model: dtype float64, not float32"):
        mha(ids, cache=zoo.model("mha", "float64").new_cache(2, 8))
    with pytest.raises(GenerationError, match="another model: sliding window 5, not None"):
        mha(ids, cache=zoo.model("window").new_cache(2, 8))
