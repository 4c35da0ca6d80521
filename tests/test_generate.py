"""minphi3.generate against transformers' generate, token for token, on tiny random checkpoints."""

import json
import re

import numpy as np
import pytest
import torch
from tiny_checkpoints import (
    left_padded_batch,
    load_oracle,
    longrope_scaling,
    random_ids,
    save_tiny,
    save_tiny_tokenizer,
)

import minphi3
from minphi3.generate import GenerationStats, infer_attention_mask, prompt_positions, resolve_eos_ids, resolve_pad_id

CASES = {
    "plain": {},
    "gqa": dict(num_key_value_heads=2),
    # prompt 12 + 20 new tokens runs far past the window of 5: the rolling cache must hold.
    "window": dict(sliding_window=5, max_position_embeddings=128),
    # original_max 20: the prompt (12) is short, generation crosses the switch at token 21.
    "longrope": dict(max_position_embeddings=128, original_max_position_embeddings=20, rope_scaling=longrope_scaling(8)),
    "partial_tied_longrope": dict(
        partial_rotary_factor=0.75, tie_word_embeddings=True, num_key_value_heads=2, max_position_embeddings=128,
        original_max_position_embeddings=16, rope_scaling=longrope_scaling(6),
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folders = {}
    for name, overrides in CASES.items():
        folders[name] = save_tiny(tmp_path_factory.mktemp(name), seed=len(name), **overrides)
    return folders


def oracle_generate(hf, ids, mask=None, **kwargs):
    with torch.no_grad():
        out = hf.generate(
            torch.as_tensor(ids),
            attention_mask=None if mask is None else torch.as_tensor(mask),
            do_sample=False,
            **kwargs,
        )
    return out.numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_matches_transformers(checkpoints, name):
    hf = load_oracle(checkpoints[name])
    model = minphi3.load(checkpoints[name])
    ids = random_ids(1, 12, seed=3)
    expected = oracle_generate(hf, ids, max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    ours = minphi3.generate(model, ids, max_new_tokens=20, eos_token_id=[])
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("name", ["plain", "window", "longrope"])
def test_left_padded_batch_matches_transformers(checkpoints, name):
    hf = load_oracle(checkpoints[name])
    model = minphi3.load(checkpoints[name])
    ids, mask = left_padded_batch()
    expected = oracle_generate(hf, ids, mask, max_new_tokens=15, eos_token_id=None, pad_token_id=0)
    ours = minphi3.generate(model, ids, attention_mask=mask, max_new_tokens=15, eos_token_id=[])
    np.testing.assert_array_equal(ours, expected)


def test_padded_row_generates_what_it_generates_alone(checkpoints):
    model = minphi3.load(checkpoints["plain"])
    short = random_ids(1, 5, seed=9)
    alone = minphi3.generate(model, short, max_new_tokens=10, eos_token_id=[])
    batch = np.concatenate([random_ids(1, 9, seed=1), np.concatenate([np.zeros((1, 4), int), short], axis=1)])
    mask = (np.arange(9)[None, :] >= np.array([[0], [4]])).astype(int)
    together = minphi3.generate(model, batch, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    np.testing.assert_array_equal(together[1, 9:], alone[0, 5:])


def test_eos_stops_rows_and_pads_them_like_transformers(checkpoints):
    hf = load_oracle(checkpoints["plain"])
    model = minphi3.load(checkpoints["plain"])
    ids = random_ids(2, 6, seed=11)
    free = minphi3.generate(model, ids, max_new_tokens=12, eos_token_id=[])
    eos = int(free[0, 8])  # a token row 0 produces early: it must stop there
    expected = oracle_generate(hf, ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=7)
    ours = minphi3.generate(model, ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=7)
    np.testing.assert_array_equal(ours, expected)
    assert ours[0, 8] == eos
    assert (ours[0, 9:] == 7).all() or ours.shape[1] == 9


def test_eos_list_comes_from_generation_config(tmp_path):
    folder = save_tiny(tmp_path / "m")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5, 9]}))
    model = minphi3.load(folder)
    assert resolve_eos_ids(model) == [2, 5, 9]
    assert resolve_eos_ids(model, 4) == [4]


def test_repetition_penalty_matches_transformers(checkpoints):
    hf = load_oracle(checkpoints["plain"])
    model = minphi3.load(checkpoints["plain"])
    ids = random_ids(2, 8, seed=2)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    expected = oracle_generate(hf, ids, mask, max_new_tokens=12, repetition_penalty=1.8, eos_token_id=None, pad_token_id=0)
    ours = minphi3.generate(model, ids, attention_mask=mask, max_new_tokens=12, repetition_penalty=1.8, eos_token_id=[])
    np.testing.assert_array_equal(ours, expected)
    plain = minphi3.generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    assert not np.array_equal(plain, ours)  # the penalty changed something, so the test is not vacuous


def test_seeded_sampling_repeats_exactly(checkpoints):
    model = minphi3.load(checkpoints["plain"])
    ids = random_ids(2, 4)
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=40, top_p=0.95, eos_token_id=[])
    first = minphi3.generate(model, ids, seed=123, **kwargs)
    second = minphi3.generate(model, ids, seed=123, **kwargs)
    other = minphi3.generate(model, ids, seed=124, **kwargs)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_temperature_zero_is_greedy(checkpoints):
    model = minphi3.load(checkpoints["plain"])
    ids = random_ids(1, 4)
    greedy = minphi3.generate(model, ids, max_new_tokens=8, eos_token_id=[])
    cold = minphi3.generate(model, ids, max_new_tokens=8, do_sample=True, temperature=0, seed=1, eos_token_id=[])
    np.testing.assert_array_equal(greedy, cold)


def test_unproducible_ids_are_never_generated(checkpoints):
    model = minphi3.load(checkpoints["plain"])
    model.tokenizer_size = 40  # pretend the tokenizer knows only ids 0..39
    out = minphi3.generate(model, random_ids(2, 4), max_new_tokens=30, do_sample=True, temperature=5.0, seed=0,
                           eos_token_id=[])
    assert out[:, 4:].max() < 40


def test_streamer_receives_every_new_token(checkpoints):
    model = minphi3.load(checkpoints["plain"])
    received = []
    out = minphi3.generate(model, random_ids(1, 4), max_new_tokens=6, eos_token_id=[], streamer=received.append)
    assert [int(r[0]) for r in received] == list(out[0, 4:])


def test_text_streamer_equals_full_decode(tmp_path):
    folder = save_tiny(tmp_path / "m", vocab_size=300)
    save_tiny_tokenizer(folder, 300)
    model = minphi3.load(folder)
    tokenizer = minphi3.load_tokenizer(folder)
    pieces = []
    streamer = minphi3.TextStreamer(tokenizer, callback=pieces.append)
    prompt = tokenizer.encode("Café 東京 🙂 capital")
    out = minphi3.generate(model, [prompt], max_new_tokens=25, eos_token_id=[], streamer=streamer)
    assert "".join(pieces) == tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)


def test_stats_count_tokens(checkpoints):
    model = minphi3.load(checkpoints["plain"])
    stats = GenerationStats()
    minphi3.generate(model, random_ids(1, 5), max_new_tokens=7, eos_token_id=[], stats=stats)
    assert (stats.prompt_tokens, stats.new_tokens, len(stats.step_seconds)) == (5, 7, 7)
    assert stats.tokens_per_second > 0


def test_prompt_positions_of_left_padding():
    mask = np.array([[1, 1, 1], [0, 0, 1], [0, 1, 1]])
    np.testing.assert_array_equal(prompt_positions(mask), [[0, 1, 2], [0, 0, 0], [0, 0, 1]])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=[[]]), "empty"),
        (dict(input_ids=[[5, 200]]), "out of range"),
        (dict(input_ids=[[-1, 3]]), "out of range"),
        (dict(input_ids=[[3] * 60], max_new_tokens=10), "context"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=-3), "max_new_tokens"),
        (dict(do_sample=True, temperature=-1.0), "temperature"),
        (dict(do_sample=True, top_p=0.0), "top_p"),
        (dict(do_sample=True, top_p=1.5), "top_p"),
        (dict(do_sample=True, top_k=-2), "top_k"),
        (dict(do_sample=True, min_p=2.0), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(attention_mask=[[0, 0, 0]]), "padding"),
        (dict(eos_token_id=500), "eos_token_id"),
        (dict(pad_token_id=96), "pad_token_id"),
        (dict(pad_token_id="0"), "pad_token_id"),
        (dict(eos_token_id=2.0), "eos_token_id"),
        (dict(do_sample=True, seed=-1), "seed"),
        (dict(do_sample=True, seed=1.5), "seed"),
        (dict(seed="7"), "seed"),
        (dict(do_sample=True, temperature=1e-45), "not finite"),
        (dict(do_sample="yes"), "do_sample must be True or False"),
        (dict(streamer=5), "streamer must be"),
        (dict(cache="x"), "cache must be a KVCache"),
        (dict(stats=5), "stats must be a GenerationStats"),
        (dict(cuda_graph="x"), "cuda_graph must be"),
        (dict(eos_token_id={2: 1}), "eos_token_id must be"),
        (dict(eos_token_id=[2, True]), "eos_token_id must be"),
        (dict(eos_token_id=[[2]]), "eos_token_id must be"),
    ],
)
def test_bad_generation_requests_raise_generation_error(checkpoints, kwargs, message):
    model = minphi3.load(checkpoints["plain"])
    arguments = dict(input_ids=[[3, 4, 5]], max_new_tokens=4)
    arguments.update(kwargs)
    with pytest.raises(minphi3.GenerationError, match=message):
        minphi3.generate(model, **arguments)


# ---- special ids: the generation config comes from generation_config.json alone ---------------


def oracle_generate_defaults(folder, ids, max_new_tokens):
    """transformers' greedy generate with no pad, eos or mask passed: its own defaults decide."""
    hf = load_oracle(folder)
    with torch.no_grad():
        return hf.generate(torch.as_tensor(ids), do_sample=False, max_new_tokens=max_new_tokens).numpy()


@pytest.fixture(scope="module")
def early_stop(tmp_path_factory):
    """A tiny checkpoint, a 2-row prompt and two ids: `stop`, which row 0 generates third, and
    `first`, which row 1 generates later; neither appears earlier in either row."""
    folder = save_tiny(tmp_path_factory.mktemp("early_stop"), seed=3)
    ids = random_ids(2, 6, seed=11)
    free = minphi3.generate(minphi3.load(folder), ids, max_new_tokens=12, eos_token_id=[])[:, 6:]
    stop = int(free[0, 2])
    later = [j for j in range(4, 12) if free[1, j] not in free[0, :3] and free[1, j] not in free[1, :j]]
    later = [j for j in later if stop not in free[1, : j + 1]]
    assert later, "the tiny model's free run gives no id to stop row 1 on: pick other seeds"
    return folder, ids, stop, int(free[1, later[0]])


def checkpoint_with_special_ids(early_stop, folder, generation_config):
    """The early_stop checkpoint copied to `folder` with config.json's eos = stop (pad stays 0) and
    generation_config.json replaced by `generation_config` (None: no such file)."""
    import shutil

    source, _, stop, _ = early_stop
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, eos_token_id=stop, pad_token_id=0)))
    (folder / "generation_config.json").unlink()
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    return folder


@pytest.mark.parametrize("case", ["absent", "eos_list_no_pad", "pad_no_eos", "empty"])
def test_pad_and_eos_defaults_match_transformers(early_stop, tmp_path, case):
    """No pad, eos or mask passed. generation_config.json absent: config.json's pad (0) and eos
    (stop). Present: that file alone, config.json's ids ignored: pad = the file's first eos, and
    no eos at all when the file names none."""
    _, ids, stop, first = early_stop
    generation_config = {
        "absent": None, "eos_list_no_pad": {"eos_token_id": [first, stop]}, "pad_no_eos": {"pad_token_id": 0},
        "empty": {},
    }[case]  # fmt: skip
    folder = checkpoint_with_special_ids(early_stop, tmp_path / "m", generation_config)
    model = minphi3.load(folder)
    expected = oracle_generate_defaults(folder, ids, max_new_tokens=12)
    ours = minphi3.generate(model, ids, max_new_tokens=12)
    np.testing.assert_array_equal(ours, expected)
    if case in ("absent", "eos_list_no_pad"):
        pad = 0 if case == "absent" else first
        assert ours[0, 8] == stop and ours.shape[1] > 9  # row 0 stopped on stop, row 1 went on
        assert (ours[0, 9:] == pad).all()
    else:  # config.json's eos (stop) does not count: nothing stops, as with no eos at all
        assert ours[0, 8] == stop
        np.testing.assert_array_equal(ours, minphi3.generate(model, ids, max_new_tokens=12, eos_token_id=[]))


def test_row_stops_on_a_later_id_of_the_eos_list(early_stop, tmp_path):
    """Row 0 stops on the list's second id and is padded with the first; row 1 stops on the first."""
    _, ids, stop, first = early_stop
    folder = checkpoint_with_special_ids(early_stop, tmp_path / "m", {"eos_token_id": [first, stop]})
    model = minphi3.load(folder)
    assert (resolve_eos_ids(model), resolve_pad_id(model, None, [first, stop])) == ([first, stop], first)
    ours = minphi3.generate(model, ids, max_new_tokens=12)
    row0, row1 = ours[0, 6:].tolist(), ours[1, 6:].tolist()
    assert row0[2] == stop and set(row0[3:]) == {first}
    assert row1[-1] == first and stop not in row1


# ---- the attention mask inferred from pad tokens -----------------------------------------------


def test_left_padded_batch_without_mask_matches_transformers(checkpoints):
    """pad 0, eos 2 (pad is no eos id) and 0s in input_ids: transformers infers the mask ids != 0."""
    folder = checkpoints["plain"]
    ids = random_ids(2, 10, seed=5)
    ids[1, :4] = 0
    expected = oracle_generate_defaults(folder, ids, max_new_tokens=10)
    model = minphi3.load(folder)
    ours = minphi3.generate(model, ids, max_new_tokens=10)
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(ours, minphi3.generate(model, ids, attention_mask=(ids != 0).astype(int),
                                                         max_new_tokens=10))  # fmt: skip
    all_real = minphi3.generate(model, ids, attention_mask=np.ones_like(ids), max_new_tokens=10)
    assert not np.array_equal(all_real[1], ours[1])  # the inferred mask changed row 1


@pytest.mark.parametrize(
    "pad, eos, inferred",
    [(0, [2], True), (None, [2], False), (2, [2], False), (0, [5, 0], False), (7, [2], False)],
    ids=["pad_not_eos", "no_pad", "pad_is_eos", "pad_in_eos_list", "pad_absent_from_ids"],
)
def test_infer_attention_mask_rule(pad, eos, inferred):
    ids = np.array([[0, 0, 3, 4], [5, 6, 2, 8]])
    expected = (ids != 0).astype(int) if inferred else np.ones_like(ids)
    np.testing.assert_array_equal(infer_attention_mask(ids, pad, eos), expected)


def test_inferred_mask_of_an_all_pad_row_is_refused(checkpoints):
    model = minphi3.load(checkpoints["plain"])
    with pytest.raises(minphi3.GenerationError, match="all pad_token_id 0"):
        minphi3.generate(model, [[0, 0, 0], [3, 4, 5]], max_new_tokens=2)


# ---- figures ----------------------------------------------------------------------------------


def test_tokens_per_second_of_a_single_token_is_finite(checkpoints):
    """One new token means no decoding step: the rate is that token's, 1 / prefill_seconds."""
    assert GenerationStats(new_tokens=1, prefill_seconds=0.25).tokens_per_second == 4.0
    assert GenerationStats().tokens_per_second == 0.0
    stats = GenerationStats()
    minphi3.generate(minphi3.load(checkpoints["plain"]), random_ids(1, 5), max_new_tokens=1, eos_token_id=[],
                     stats=stats)  # fmt: skip
    assert stats.new_tokens == 1 and np.isfinite(stats.tokens_per_second) and stats.tokens_per_second > 0


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_a_cache_holding_the_whole_prompt_refeeds_its_last_token(checkpoints, cuda_graph):
    """The first new token needs the last prompt token's logits, which a cache does not keep:
    generate feeds that token again rather than nothing."""
    model = minphi3.load(checkpoints["plain"])
    ids = random_ids(1, 9, seed=4)
    cache = model.new_cache(1, 9)
    model(ids, cache=cache)
    out = minphi3.generate(model, ids, max_new_tokens=6, eos_token_id=[], cache=cache, cuda_graph=cuda_graph)
    np.testing.assert_array_equal(out, minphi3.generate(model, ids, max_new_tokens=6, eos_token_id=[]))


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_a_long_factor_cache_rewound_below_the_switch_is_refed(tmp_path, cuda_graph):
    """A chat turn that re-renders shorter can rewind a cache whose keys were rotated with the long
    factors to below the switch: generate drops it and feeds the prompt with the short ones."""
    folder = save_tiny(tmp_path / "longrope", max_position_embeddings=64, original_max_position_embeddings=16,
                       rope_scaling=longrope_scaling(8))  # fmt: skip
    model = minphi3.load(folder)
    ids = random_ids(1, 30, seed=1)
    cache = model.new_cache(1, 64)
    model(ids, cache=cache)
    assert cache.long_rope and cache.rewind(5)
    out = minphi3.generate(model, ids[:, :10], max_new_tokens=4, eos_token_id=[], cache=cache, cuda_graph=cuda_graph)
    np.testing.assert_array_equal(out, minphi3.generate(model, ids[:, :10], max_new_tokens=4, eos_token_id=[]))
    assert not cache.long_rope


@pytest.mark.parametrize("architecture", ["Phi3ForSequenceClassification", "Phi3ForTokenClassification"])
def test_generate_refuses_a_classification_head_by_name(tmp_path, architecture):
    """Their logits score labels: generating from them would crash (sequence) or emit label ids
    as tokens (token classification)."""
    folder = save_tiny_tokenizer(save_tiny(tmp_path / "m", architecture=architecture, num_labels=3,
                                           vocab_size=300), 300)  # fmt: skip
    with pytest.raises(minphi3.GenerationError, match="needs a causal LM; this checkpoint has a .*_classification head"):
        minphi3.generate(minphi3.load(folder), [[5, 6, 7]], max_new_tokens=4)
    from minphi3 import cli

    assert cli.main(["generate", "--model", str(folder), "hi", "--max-new-tokens", "4"]) == 2


def test_eos_ids_may_be_an_array_of_any_kind(checkpoints):
    model = minphi3.load(checkpoints["plain"])
    for given in (torch.tensor([2, 5]), np.array([2, 5]), (2, 5), [np.int64(2), 5]):
        assert resolve_eos_ids(model, given) == [2, 5]
    assert resolve_eos_ids(model, torch.tensor(7)) == [7]


# ---- generation_config.json's other settings: the defaults of an argument not passed ---------


def checkpoint_with_generation_config(source, folder, generation_config):
    import shutil

    shutil.copytree(source, folder)
    (folder / "generation_config.json").write_text(json.dumps(generation_config))
    return folder


def test_settings_of_generation_config_apply_as_in_transformers(checkpoints, tmp_path):
    """transformers fills every generate argument not passed from generation_config.json: here a
    repetition penalty (which changes greedy tokens) and max_new_tokens."""
    file = {"eos_token_id": 2, "pad_token_id": 0, "repetition_penalty": 1.5, "max_new_tokens": 10}
    folder = checkpoint_with_generation_config(checkpoints["plain"], tmp_path / "m", file)
    model, hf = minphi3.load(folder), load_oracle(folder)
    ids = random_ids(1, 8, seed=2)
    ids[0, 4:] = ids[0, :4]
    with torch.no_grad():
        expected = hf.generate(torch.as_tensor(ids)).numpy()
    ours = minphi3.generate(model, ids)
    np.testing.assert_array_equal(ours, expected)
    assert ours.shape[1] == 8 + 10
    unpenalized = minphi3.generate(model, ids, repetition_penalty=1.0, max_new_tokens=10)
    assert not np.array_equal(unpenalized, ours)  # the file's penalty mattered; an argument beats it
    with torch.no_grad():
        np.testing.assert_array_equal(unpenalized, hf.generate(torch.as_tensor(ids), repetition_penalty=1.0).numpy())


def test_sampling_settings_of_generation_config(checkpoints, tmp_path):
    """do_sample, temperature and top_k from the file: the same draws as passing them."""
    file = {"do_sample": True, "temperature": 0.5, "top_k": 5, "top_p": 0.9}
    folder = checkpoint_with_generation_config(checkpoints["plain"], tmp_path / "m", file)
    model, ids = minphi3.load(folder), random_ids(2, 5, seed=4)
    ours = minphi3.generate(model, ids, max_new_tokens=12, eos_token_id=[], seed=3)
    passed = minphi3.generate(minphi3.load(checkpoints["plain"]), ids, max_new_tokens=12, eos_token_id=[], seed=3,
                              do_sample=True, temperature=0.5, top_k=5, top_p=0.9)  # fmt: skip
    np.testing.assert_array_equal(ours, passed)
    greedy = minphi3.generate(model, ids, max_new_tokens=12, eos_token_id=[], do_sample=False)
    assert not np.array_equal(greedy, ours)


def test_max_length_of_generation_config_counts_the_prompt(checkpoints, tmp_path):
    folder = checkpoint_with_generation_config(checkpoints["plain"], tmp_path / "m", {"max_length": 15})
    model, hf = minphi3.load(folder), load_oracle(folder)
    ids = random_ids(1, 12, seed=1)
    with torch.no_grad():
        expected = hf.generate(torch.as_tensor(ids), eos_token_id=None, pad_token_id=0).numpy()
    np.testing.assert_array_equal(minphi3.generate(model, ids, eos_token_id=[]), expected)
    assert expected.shape[1] == 15
    with pytest.raises(minphi3.GenerationError, match="max_length .15. leaves no room after the prompt .15 tokens"):
        minphi3.generate(model, random_ids(1, 15))


def test_a_default_length_is_capped_to_the_context(checkpoints):
    """64 new tokens by default, fewer when the context ends first; a length passed is checked."""
    model = minphi3.load(checkpoints["plain"])
    context = model.config.max_position_embeddings
    ids = random_ids(1, context - 3)
    assert minphi3.generate(model, ids, eos_token_id=[]).shape[1] == context
    assert minphi3.generate(model, ids[:, :4], eos_token_id=[]).shape[1] == 4 + min(64, context - 4)
    with pytest.raises(minphi3.GenerationError, match="context"):
        minphi3.generate(model, ids, max_new_tokens=4)
    with pytest.raises(minphi3.GenerationError, match="context"):
        minphi3.generate(model, random_ids(1, context))


@pytest.mark.parametrize("file, message", [
    ({"do_sample": True, "temperature": -1.0}, "generation_config.json: temperature"),
    ({"top_k": "many"}, "generation_config.json: top_k"),
    ({"do_sample": "true"}, "generation_config.json's do_sample must be True or False"),
    ({"max_new_tokens": 0}, "generation_config.json's max_new_tokens must be a positive integer"),
    ({"max_length": 2.5}, "generation_config.json's max_length"),
])
def test_bad_settings_of_generation_config_are_named(checkpoints, tmp_path, file, message):
    folder = checkpoint_with_generation_config(checkpoints["plain"], tmp_path / "m", file)
    with pytest.raises(minphi3.GenerationError, match=message):
        minphi3.generate(minphi3.load(folder), [[3, 4, 5]])


def test_an_end_token_above_a_gap_in_the_ids_can_end_a_row(tmp_path):
    """Vocabularies may skip ids (tiktoken-derived ones do, below their special tokens): the
    highest id, not the token count, bounds what may be generated. Here <|im_end|> is 299 in a
    vocabulary of 273 tokens, and the model prefers it after the prompt."""
    import shutil

    from tokenizers import Tokenizer

    source = save_tiny_tokenizer(save_tiny(tmp_path / "source", vocab_size=300, seed=11), 300)
    folder = tmp_path / "gap"
    shutil.copytree(source, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    for token in [token for token, i in vocab.items() if i >= 270]:
        del vocab[token]
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if "".join(m if isinstance(m, list) else m.split(" ")) in vocab]
    for added, new_id in zip(spec["added_tokens"], (280, 290, 299), strict=True):
        added["id"] = vocab[added["content"]] = new_id
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [299], "pad_token_id": 280}))
    assert Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True) == 273
    prompt = [[10, 11, 12]]
    hf = load_oracle(folder)
    with torch.no_grad():
        favourite = int(hf(torch.tensor(prompt)).logits[0, -1].argmax())
        hf.lm_head.weight[299] = 3 * hf.lm_head.weight[favourite]
    hf.save_pretrained(folder)
    model = minphi3.load(folder)
    assert model.tokenizer_size == 300 == minphi3.load_tokenizer(folder).id_bound
    with torch.no_grad():
        expected = load_oracle(folder).generate(torch.tensor(prompt), do_sample=False, max_new_tokens=6).numpy()
    ours = minphi3.generate(model, prompt, max_new_tokens=6)
    np.testing.assert_array_equal(ours, expected)
    assert ours[0, -1] == 299


def test_tokens_that_tokenizer_config_adds_may_be_generated(tmp_path):
    """A token that only tokenizer_config.json's added_tokens_decoder defines (id 300, past the
    300 of tokenizer.json) is a real token: its logit is not masked."""
    from transformers import AutoTokenizer

    folder = save_tiny_tokenizer(save_tiny(tmp_path / "m", vocab_size=310, seed=2), 300)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"300": {"content": "<|extra|>", "special": True, "lstrip": False,
                                              "rstrip": False, "normalized": False, "single_word": False}}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    model = minphi3.load(folder)
    assert model.tokenizer_size == 301 == minphi3.load_tokenizer(folder).id_bound
    assert AutoTokenizer.from_pretrained(str(folder)).convert_tokens_to_ids("<|extra|>") == 300
    model.params["lm_head.weight"][300] = 10 * model.params["lm_head.weight"][5]  # make it likely
    out = minphi3.generate(model, [[5, 6, 7]], max_new_tokens=8, eos_token_id=[], do_sample=True, seed=0)
    assert 300 in out[0, 3:]


@pytest.mark.parametrize("setting", [{"min_new_tokens": 5}, {"min_length": 10}, {"min_new_tokens": 4, "min_length": 12}])
@pytest.mark.parametrize("where", ["argument", "generation_config.json"])
def test_no_eos_before_the_minimum_length_as_in_transformers(early_stop, tmp_path, setting, where):
    """Row 0 would stop on its third new token; min_new_tokens / min_length hold the eos ids off
    (with both, min_new_tokens wins, as transformers' _prepare_generated_length has it)."""
    _, ids, stop, first = early_stop
    file = {"eos_token_id": [first, stop], **(setting if where != "argument" else {})}
    folder = checkpoint_with_special_ids(early_stop, tmp_path / "m", file)
    model, hf = minphi3.load(folder), load_oracle(folder)
    passed = setting if where == "argument" else {}
    with torch.no_grad():
        expected = hf.generate(torch.as_tensor(ids), do_sample=False, max_new_tokens=12, **passed).numpy()
    ours = minphi3.generate(model, ids, max_new_tokens=12, **passed)
    np.testing.assert_array_equal(ours, expected)
    free = minphi3.generate(model, ids, max_new_tokens=12, min_new_tokens=0)
    assert free[0, 8] == stop and ours[0, 8] != stop  # the minimum changed row 0


@pytest.mark.parametrize("file", [
    {"num_beams": 3}, {"no_repeat_ngram_size": 2}, {"suppress_tokens": [5]}, {"typical_p": 0.5, "do_sample": True},
    {"forced_eos_token_id": 2}, {"guidance_scale": 1.5}, {"num_return_sequences": 2}, {"bad_words_ids": []},
    {"penalty_alpha": 0.6}, {"num_beams": "3"},
])
def test_settings_minphi3_does_not_implement_are_refused_by_name(checkpoints, tmp_path, file):
    folder = checkpoint_with_generation_config(checkpoints["plain"], tmp_path / "m", file)
    name, value = next(iter(file.items()))
    with pytest.raises(minphi3.GenerationError, match=re.escape(f"generation_config.json sets {name}={value!r}, which")):
        minphi3.generate(minphi3.load(folder), [[3, 4, 5]], max_new_tokens=2)


@pytest.mark.parametrize("file", [
    {"num_beams": 1, "no_repeat_ngram_size": 0, "suppress_tokens": None, "typical_p": 1.0, "guidance_scale": None,
     "min_length": 0, "bad_words_ids": None, "forced_decoder_ids": None, "top_h": None, "num_return_sequences": 1},
    {"typical_p": 0.5, "epsilon_cutoff": 0.5, "top_h": 0.5},  # sampling-only: transformers ignores them when greedy
    {"diversity_penalty": 0.5, "num_beam_groups": 2},  # beam-only
    {"penalty_alpha": 0.6, "top_k": 1},  # contrastive search needs top_k > 1
])  # fmt: skip
def test_settings_transformers_ignores_for_the_call_are_fine(checkpoints, tmp_path, file):
    """Off values, or settings transformers does not act on for a greedy call: its tokens."""
    folder = checkpoint_with_generation_config(checkpoints["plain"], tmp_path / "m", {**file, "pad_token_id": 0})
    hf = load_oracle(folder)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=4, eos_token_id=None).numpy()
    ours = minphi3.generate(minphi3.load(folder), [[3, 4, 5]], max_new_tokens=4, eos_token_id=[])
    np.testing.assert_array_equal(ours, expected)


def test_a_broken_side_file_keeps_tokenizer_json_bound(tmp_path):
    """A tokenizer_config.json that is not JSON: the tokenizer loader refuses it where a
    tokenizer is needed, and the mask of unproducible ids falls back to tokenizer.json's tokens
    instead of turning off."""
    folder = save_tiny_tokenizer(save_tiny(tmp_path / "m", vocab_size=310), 300)
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(minphi3.TokenizerError):
        minphi3.load_tokenizer(folder)
    assert minphi3.load(folder).tokenizer_size == 300


def test_decode_steps_do_not_rewrite_the_cached_padding(checkpoints, monkeypatch):
    """generate gives each step the fed tokens' mask columns only: the cache recorded the others'
    padding when it took them, and rewriting it every token would be work for nothing."""
    from minphi3.cache import KVCache

    calls = []
    real = KVCache.overwrite_padding
    monkeypatch.setattr(KVCache, "overwrite_padding", lambda self, padding: calls.append(1) or real(self, padding))
    ids, mask = left_padded_batch(pads=(0, 3))
    minphi3.generate(minphi3.load(checkpoints["plain"]), ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    assert calls == []
