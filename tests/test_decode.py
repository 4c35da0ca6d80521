"""The fixed-shape decode step (minphi3/decode.py) against the ordinary model call, on the CPU.

On the GPU this step is what a CUDA graph records; here it runs unrecorded, so every rule it
computes on the device (slot, mask, rope lookup, attending over the whole cache) is checked
against `model(...)` with a cache, and `generate(cuda_graph=True)` against transformers.
"""

import numpy as np
import pytest
import torch
from tiny_checkpoints import left_padded_batch, load_oracle, longrope_scaling, random_ids, save_tiny

import minphi3
from minphi3.backend import StepReplay
from minphi3.decode import FixedDecodeStep, fixed_decode_logits
from minphi3.errors import GenerationError
from minphi3.generate import GenerationStats, prompt_positions

CASES = {
    "plain": {},
    "gqa": dict(num_key_value_heads=2),
    # prompt 12 + 20 new tokens runs far past the window of 5: the rolling buffer wraps around
    "window": dict(sliding_window=5, max_position_embeddings=128),
    # decoding past original_max 16 with the long factors
    "longrope": dict(max_position_embeddings=128, original_max_position_embeddings=16, rope_scaling=longrope_scaling(8)),
    "partial_tied": dict(partial_rotary_factor=0.75, tie_word_embeddings=True, num_key_value_heads=2),
    "phi": dict(architecture="PhiForCausalLM", qk_layernorm=True, num_key_value_heads=2),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folders = {}
    for name, overrides in CASES.items():
        settings = dict(overrides)
        architecture = settings.pop("architecture", "Phi3ForCausalLM")
        folders[name] = save_tiny(tmp_path_factory.mktemp(name), architecture=architecture, seed=len(name), **settings)
    return folders


def decode_both_ways(model, ids, mask, steps):
    """Prefill two caches alike, then feed the same tokens `steps` times: once by model(...),
    once by the fixed step. -> (ordinary logits, fixed logits), each [steps, batch, vocab]."""
    batch, prompt = ids.shape
    capacity = prompt + steps
    ordinary, fixed = model.new_cache(batch, capacity), model.new_cache(batch, capacity)
    positions = prompt_positions(mask)
    model(ids, attention_mask=mask, position_ids=positions, cache=ordinary)
    model(ids, attention_mask=mask, position_ids=positions, cache=fixed)
    rng = np.random.default_rng(1)
    full_mask = mask
    last = positions[:, -1]
    step = None
    ours, theirs = [], []
    for _ in range(steps):
        token = rng.integers(3, model.config.vocab_size, size=batch)
        last = last + 1
        full_mask = np.concatenate([full_mask, np.ones((batch, 1), int)], axis=1)
        out = model(token[:, None], attention_mask=full_mask, position_ids=last[:, None], cache=ordinary)
        theirs.append(out.logits[:, -1])
        if step is None or not step.fits(fixed, int(last.max())):
            step = FixedDecodeStep(model, fixed, capacity, int(last.max()))
        ours.append(np.array(step(token, last, fixed.length)))
    return np.stack(theirs), np.stack(ours)


@pytest.mark.parametrize("name", list(CASES))
def test_fixed_step_logits_equal_the_model_call(checkpoints, name):
    model = minphi3.load(checkpoints[name])
    ids = random_ids(2, 18 if name == "longrope" else 12, seed=4)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    theirs, ours = decode_both_ways(model, ids, mask, steps=10)
    scale = max(1.0, float(np.abs(theirs).max()))
    assert float(np.abs(ours - theirs).max()) <= 1e-5 * scale


def test_fixed_step_in_float64_is_exact_to_rounding(checkpoints):
    model = minphi3.load(checkpoints["gqa"], dtype="float64")
    ids = random_ids(1, 9, seed=6)
    theirs, ours = decode_both_ways(model, ids, np.ones_like(ids), steps=6)
    assert float(np.abs(ours - theirs).max()) <= 1e-12 * max(1.0, float(np.abs(theirs).max()))


@pytest.mark.parametrize("name", list(CASES))
def test_generate_with_the_fixed_step_matches_transformers(checkpoints, name):
    architecture = CASES[name].get("architecture", "Phi3ForCausalLM")
    hf = load_oracle(checkpoints[name], architecture=architecture)
    model = minphi3.load(checkpoints[name])
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = hf.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                               max_new_tokens=20, eos_token_id=None, pad_token_id=0).numpy()  # fmt: skip
    stats = GenerationStats()
    ours = minphi3.generate(model, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[], cuda_graph=True,
                            stats=stats)  # fmt: skip
    np.testing.assert_array_equal(ours, expected)
    assert stats.fixed_steps >= 18  # the one-token steps ran through the fixed step (a LongRoPE switch refeeds one)


def test_generate_crosses_the_longrope_switch_with_the_fixed_step(checkpoints):
    """The prompt (12) is below original_max 16; generation crosses it, the cache is refilled
    with the long factors, and the fixed step is rebuilt with long-factor tables."""
    model = minphi3.load(checkpoints["longrope"])
    ids = random_ids(1, 12, seed=3)
    ordinary = minphi3.generate(model, ids, max_new_tokens=20, eos_token_id=[], cuda_graph=False)
    fixed = minphi3.generate(model, ids, max_new_tokens=20, eos_token_id=[], cuda_graph=True)
    np.testing.assert_array_equal(fixed, ordinary)


def test_sampling_and_stopping_are_the_same_with_the_fixed_step(checkpoints):
    model = minphi3.load(checkpoints["plain"])
    ids = random_ids(2, 6, seed=2)
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.9, seed=7, repetition_penalty=1.3)
    free = minphi3.generate(model, ids, eos_token_id=[], **kwargs)
    eos = int(free[0, 9])
    for eos_ids in ([], eos):
        np.testing.assert_array_equal(
            minphi3.generate(model, ids, eos_token_id=eos_ids, cuda_graph=True, **kwargs),
            minphi3.generate(model, ids, eos_token_id=eos_ids, cuda_graph=False, **kwargs),
        )


def test_a_chat_cache_too_small_for_the_answer_is_enlarged_first(checkpoints):
    """A cache from an earlier turn may be full: the fixed step writes slot index % capacity, so
    generate reserves room for the whole answer before the first one-token step."""
    model = minphi3.load(checkpoints["plain"])
    ids = random_ids(1, 8, seed=8)
    cache = model.new_cache(1, 8)
    model(ids, cache=cache)
    assert cache.capacity == 8
    longer = np.concatenate([ids, random_ids(1, 3, seed=9)], axis=1)
    out = minphi3.generate(model, longer, max_new_tokens=10, eos_token_id=[], cache=cache, cuda_graph=True)
    assert cache.capacity >= 21
    np.testing.assert_array_equal(out, minphi3.generate(model, longer, max_new_tokens=10, eos_token_id=[]))


def test_a_window_chat_cache_smaller_than_the_window_is_enlarged_first(tmp_path):
    """A window cache from an earlier, shorter turn holds fewer slots than the window: one-token
    steps writing slot index % capacity would overwrite keys the window still sees. generate
    reserves up to W slots first, and the answer equals transformers' (no cache given)."""
    folder = save_tiny(tmp_path / "window200", seed=5, sliding_window=200, max_position_embeddings=512)
    model, hf = minphi3.load(folder), load_oracle(folder)
    ids = random_ids(1, 30, seed=1)
    with torch.no_grad():
        expected = hf.generate(torch.as_tensor(ids), do_sample=False, max_new_tokens=40, eos_token_id=None,
                               pad_token_id=0).numpy()  # fmt: skip
    for cuda_graph in (True, False):
        cache = model.new_cache(1, 12)
        model(ids[:, :10], cache=cache)
        assert cache.capacity == 12
        ours = minphi3.generate(model, ids, max_new_tokens=40, eos_token_id=[], cache=cache, cuda_graph=cuda_graph)
        np.testing.assert_array_equal(ours, expected)
        assert cache.capacity <= 200


def test_a_full_window_has_room_for_the_next_token(checkpoints):
    model = minphi3.load(checkpoints["window"])
    cache = model.new_cache(1, 64)
    model(random_ids(1, 9), cache=cache)
    assert cache.capacity == 5 and cache.length == 9 and cache.has_room_for_one()
    small = model.new_cache(1, 3)
    model(random_ids(1, 3), cache=small)
    assert small.capacity == 3 and not small.has_room_for_one()  # 3 slots under a window of 5: full


def test_the_fixed_step_refuses_a_wrong_index_or_a_full_cache(checkpoints):
    model = minphi3.load(checkpoints["plain"])
    cache = model.new_cache(1, 4)
    model(random_ids(1, 4), cache=cache)
    step = FixedDecodeStep(model, cache, 8, 4)
    with pytest.raises(GenerationError, match="token 4 of the cache, not 3"):
        step(np.array([5]), np.array([3]), 3)
    with pytest.raises(GenerationError, match="the cache is full"):
        step(np.array([5]), np.array([4]), 4)


def test_fits_says_when_the_step_must_be_rebuilt(checkpoints):
    model = minphi3.load(checkpoints["longrope"])
    cache = model.new_cache(1, 40)
    model(random_ids(1, 10), cache=cache)
    step = FixedDecodeStep(model, cache, 30, 10)
    assert step.fits(cache, 10) and step.fits(cache, 14)
    assert not step.fits(cache, 30)  # beyond the rope table
    assert not step.fits(cache, 16)  # LongRoPE's long factors from position 16 on (original_max 16)
    assert not step.fits(model.new_cache(1, 40), 10)  # another cache
    cache.reserve(80)  # new buffers
    assert not step.fits(cache, 10)


def test_a_dropped_fixed_step_is_freed_without_the_collector(checkpoints):
    """No reference cycle runs from the step through its replayer back to it: the last
    reference gone, it is freed at once, and on the GPU its graph's private memory with it
    (a cycle would leave that to a later collection, which could land inside a recording)."""
    import gc
    import weakref

    model = minphi3.load(checkpoints["plain"])
    cache = model.new_cache(1, 8)
    model(random_ids(1, 4), cache=cache)
    step = FixedDecodeStep(model, cache, 8, 4)
    step(np.array([5]), np.array([4]), 4)
    freed = weakref.ref(step)
    gc.disable()
    try:
        del step
        assert freed() is None
    finally:
        gc.enable()


def test_the_fixed_step_reads_nothing_from_the_host_length(checkpoints):
    """Everything the step needs comes from its device buffers: run directly with an index
    buffer, it writes the slot that index names, whatever cache.length says."""
    model = minphi3.load(checkpoints["window"])
    cache = model.new_cache(1, 5)
    model(random_ids(1, 7), cache=cache)  # 7 tokens through a window of 5: slots hold 2..6
    step = FixedDecodeStep(model, cache, 16, 7)
    logits = fixed_decode_logits(model, cache, np.array([[4]]), np.array([[7]]), np.array([7]), step.cos_table,
                                 step.sin_table)  # fmt: skip
    assert logits.shape == (1, model.config.vocab_size)
    assert sorted(cache.slot_index.tolist()) == [3, 4, 5, 6, 7]
    assert int(cache.slot_index[7 % 5]) == 7


def test_step_replay_on_numpy_calls_the_step_every_time():
    calls = []

    def step():
        calls.append(1)
        return np.full(3, len(calls))

    replay = StepReplay(step, np)
    assert [int(replay()[0]) for _ in range(4)] == [1, 2, 3, 4]
    assert not replay.replaying and replay.graph_error is None


def test_generation_stats_count_the_fixed_steps(checkpoints):
    model = minphi3.load(checkpoints["longrope"])
    stats = GenerationStats()
    minphi3.generate(model, random_ids(1, 12, seed=3), max_new_tokens=20, eos_token_id=[], cuda_graph=True, stats=stats)
    # 20 tokens: the prefill, the step that crosses LongRoPE's switch (a whole new prefill), 18 fixed steps
    assert stats.fixed_steps == 18
    assert stats.graph_launches == 0 and stats.graph_error is None  # no graph on the CPU
    plain = GenerationStats()
    minphi3.generate(model, random_ids(1, 12, seed=3), max_new_tokens=20, eos_token_id=[], stats=plain)
    assert plain.fixed_steps == 0


class NoHostReads(np.ndarray):
    """An array that refuses to hand a value to Python: on a GPU each of these is a read back to
    the host, which stops a CUDA graph from recording (and syncs the device every step)."""

    def _refuse(self, *args, **kwargs):
        raise AssertionError("a value was read back to the host")

    __bool__ = __int__ = __float__ = __index__ = item = tolist = _refuse


def no_host_reads(x):
    return x.view(NoHostReads)


@pytest.mark.parametrize("name", list(CASES))
def test_the_fixed_step_reads_no_value_back_to_the_host(checkpoints, name):
    """Run with every input and parameter made an array that refuses host reads, the step
    completes and gives the same logits: nothing in it depends on a device value on the host,
    which is what lets CuPy record it as a CUDA graph."""
    plain = minphi3.load(checkpoints[name])
    ids = random_ids(2, 9, seed=1)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    reference, cache = plain.new_cache(2, 12), plain.new_cache(2, 12)
    for filled in (reference, cache):
        plain(ids, attention_mask=mask, position_ids=prompt_positions(mask), cache=filled)
    step = FixedDecodeStep(plain, reference, 16, 9)
    inputs = dict(token_ids=np.array([[5], [6]]), positions=np.array([[9], [7]]), index=np.array([9]))
    expected = fixed_decode_logits(plain, reference, **inputs, cos_table=step.cos_table, sin_table=step.sin_table)

    for layer in cache.layers:  # the same cache, every array guarded
        layer.keys, layer.values = no_host_reads(layer.keys), no_host_reads(layer.values)
    cache.slot_index, cache.key_padding = no_host_reads(cache.slot_index), no_host_reads(cache.key_padding)
    guarded = minphi3.Model(plain.config, {name: no_host_reads(a) for name, a in plain.params.items()})
    logits = fixed_decode_logits(
        guarded, cache, **{name: no_host_reads(a) for name, a in inputs.items()},
        cos_table=no_host_reads(step.cos_table), sin_table=no_host_reads(step.sin_table),
    )  # fmt: skip
    assert isinstance(logits, NoHostReads)  # the guard reached the end of the step
    np.testing.assert_array_equal(np.asarray(logits), expected)
    with pytest.raises(AssertionError, match="read back to the host"):  # and it does catch a read
        guarded(ids[:, :1], cache=cache)
