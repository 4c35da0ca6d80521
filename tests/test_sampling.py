"""Tests of minphi3/sampling.py: each logits processor and the whole pipeline against transformers
5.23 (its processor classes, and the scores `model.generate` itself reports), seeded sampling,
parameter validation, and hypothesis properties of the filtered distribution.

Sampling is compared through the filtered distributions, never through sampled ids: torch's
multinomial and minphi3's inverse CDF use different random streams (pitfalls.md item 29).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    Phi3Config,
    Phi3ForCausalLM,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from minphi3.errors import GenerationError
from minphi3.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    make_rng,
    mask_unproducible_ids,
    min_p_filter,
    probabilities,
    process_scores,
    sampling_enabled,
    select_next_tokens,
    top_k_filter,
    top_p_filter,
    validate_sampling_parameters,
)

BATCH, VOCAB = 3, 500


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def random_logits(seed, batch=BATCH, vocab=VOCAB, ties=True, neg_inf=True):
    """float32 logits [batch, vocab] ~ N(0, 3), with groups of equal values and some -inf."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 3.0, (batch, vocab)).astype(np.float32)
    if ties:
        # Ties at the top (two ids share the maximum), in the middle and low down.
        for row in range(batch):
            order = np.argsort(-x[row])
            x[row, order[1]] = x[row, order[0]]
            x[row, order[10:14]] = x[row, order[10]]
            x[row, order[200:260]] = x[row, order[200]]
    if neg_inf:
        top_two = np.argsort(-x, axis=-1, kind="stable")[:, :2]
        masked = rng.random((batch, vocab)) < 0.1
        masked[np.arange(batch)[:, None], top_two] = False  # keep the tied maximum
        masked[:, 0] = (top_two != 0).all(axis=1)  # id 0 masked, unless it holds a maximum
        x[masked] = -np.inf
    return x


def grid_logits(seed, batch=BATCH, vocab=VOCAB):
    """Logits on a coarse grid (many large groups of ties) with some -inf."""
    rng = np.random.default_rng(seed)
    x = (np.round(rng.normal(0.0, 2.0, (batch, vocab)) * 2) / 2).astype(np.float32)
    x[rng.random((batch, vocab)) < 0.1] = -np.inf
    return x


def hf(processor, scores, input_ids=None):
    """Run one transformers processor on NumPy scores; returns NumPy."""
    ids = torch.zeros((scores.shape[0], 1), dtype=torch.long) if input_ids is None else torch.as_tensor(input_ids)
    return processor(ids, torch.from_numpy(scores.copy())).numpy()


def assert_scores_equal(ours, theirs):
    """Same shape, float32, the same -inf pattern, finite values allclose 1e-6."""
    assert ours.dtype == np.float32
    assert ours.shape == theirs.shape
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_array_equal(np.isfinite(ours), finite)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)


def assert_same_up_to_boundary_ties(ours, theirs, inputs):
    """Equal, except that ids with the same input score may swap between kept and dropped.

    transformers' top-p uses torch.sort, which is not stable on the CPU: when the cut falls
    inside a group of equal scores, which of them it keeps is unspecified. The number kept must
    match, and every id kept by one side and not the other must share one input score.
    """
    kept_ours, kept_theirs = np.isfinite(ours), np.isfinite(theirs)
    np.testing.assert_array_equal(kept_ours.sum(-1), kept_theirs.sum(-1))
    for row in range(inputs.shape[0]):
        differ = kept_ours[row] != kept_theirs[row]
        assert len(np.unique(inputs[row, differ])) <= 1, f"row {row}: differs beyond one tie group"
    np.testing.assert_array_equal(ours[kept_ours], inputs[kept_ours])


# ----------------------------------------------------------------------------------------------
# each processor against transformers' class
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    scores = random_logits(1)
    rng = np.random.default_rng(2)
    context = rng.integers(0, VOCAB, (BATCH, 40))
    context[:, :5] = context[:, 5:10]  # repeated ids must be penalized once, not twice
    context[0, 3] = VOCAB + 7  # transformers ignores ids beyond the scores' width
    expected = hf(RepetitionPenaltyLogitsProcessor(penalty), scores, context)
    ours = apply_repetition_penalty(scores, context, penalty)
    assert_scores_equal(ours, expected)
    assert not np.array_equal(ours, scores)


def left_padded_batch():
    """A left-padded prompt batch with pad id 7 and its mask, and ids generated after it."""
    pad = 7
    prompt = np.array(
        [
            [pad, pad, pad, 11, 12, 13, 14, 15],  # pad id only in the padding: not penalized
            [pad, pad, 21, 22, pad, 23, 24, 25],  # pad id also a real token: penalized
            [31, 32, 33, 34, 35, 36, 37, 38],  # no padding
        ]
    )
    mask = np.array(
        [
            [0, 0, 0, 1, 1, 1, 1, 1],
            [0, 0, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1, 1, 1],
        ]
    )
    generated = np.array([[40, 41], [42, 43], [44, 44]])
    return pad, prompt, mask, np.concatenate([prompt, generated], axis=1)


def test_repetition_penalty_ignores_left_padding_like_generate():
    pad, prompt, mask, context = left_padded_batch()
    scores = np.abs(random_logits(3, neg_inf=False)) + 1.0  # all positive: s / p changes them
    # What `_get_logits_processor` builds from the prompt's attention mask.
    prompt_ignore_length = (torch.from_numpy(mask) != 0).int().argmax(dim=1)
    processor = RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=prompt_ignore_length)
    expected = hf(processor, scores, context)
    # The mask may cover the prompt only, or the whole context (ones for generated ids).
    full_mask = np.concatenate([mask, np.ones((3, 2), dtype=mask.dtype)], axis=1)
    for context_mask in (mask, full_mask):
        ours = apply_repetition_penalty(scores, context, 1.5, context_mask=context_mask)
        assert_scores_equal(ours, expected)
    assert ours[0, pad] == scores[0, pad]  # pad only in the ignored positions
    assert ours[1, pad] == pytest.approx(scores[1, pad] / 1.5)  # pad id as a real token
    # Without the mask the pad id of row 0 would be penalized: the mask matters here.
    assert apply_repetition_penalty(scores, context, 1.5)[0, pad] != scores[0, pad]


def test_repetition_penalty_only_leading_zeros_count():
    """transformers ignores positions before the first 1 only: holes and all-zero rows are not ignored."""
    scores = np.abs(random_logits(4, batch=2, neg_inf=False)) + 1.0
    context = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask = np.array([[0, 1, 0, 1], [0, 0, 0, 0]])
    prompt_ignore_length = (torch.from_numpy(mask) != 0).int().argmax(dim=1)
    expected = hf(RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=prompt_ignore_length), scores, context)
    ours = apply_repetition_penalty(scores, context, 1.5, context_mask=mask)
    assert_scores_equal(ours, expected)
    assert ours[0, 5] == scores[0, 5] and ours[0, 7] != scores[0, 7]
    assert np.all(ours[1, 9:13] != scores[1, 9:13])


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.6])
def test_temperature_matches_transformers(temperature):
    scores = random_logits(5)
    assert_scores_equal(apply_temperature(scores, temperature), hf(TemperatureLogitsWarper(temperature), scores))


@pytest.mark.parametrize("top_k, min_keep", [(1, 1), (2, 1), (11, 1), (12, 1), (50, 1), (250, 1), (600, 1), (1, 5)])
def test_top_k_matches_transformers(top_k, min_keep):
    for scores in (random_logits(6), grid_logits(7)):
        expected = hf(TopKLogitsWarper(top_k, min_tokens_to_keep=min_keep), scores)
        assert_scores_equal(top_k_filter(scores, top_k, min_tokens_to_keep=min_keep), expected)


def test_top_k_keeps_ties_and_zero_is_off():
    scores = random_logits(8)
    kept = np.isfinite(top_k_filter(scores, 1)).sum(-1)
    assert np.all(kept == 2)  # the two ids sharing the maximum both survive
    np.testing.assert_array_equal(top_k_filter(scores, 0), scores)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.8, 0.95, 0.999])
@pytest.mark.parametrize("min_keep", [1, 3])
def test_top_p_matches_transformers_without_ties(top_p, min_keep):
    scores = random_logits(9, ties=False)
    expected = hf(TopPLogitsWarper(top_p, min_tokens_to_keep=min_keep), scores)
    assert_scores_equal(top_p_filter(scores, top_p, min_tokens_to_keep=min_keep), expected)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.8, 0.95, 1.0])
def test_top_p_matches_transformers_with_ties(top_p):
    for scores in (random_logits(10), grid_logits(11)):
        expected = hf(TopPLogitsWarper(top_p), scores)
        assert_same_up_to_boundary_ties(top_p_filter(scores, top_p), expected, scores)


@pytest.mark.parametrize("top_p, kept", [(0.75, 3), (0.5, 2), (0.25, 1), (0.7, 3), (0.8, 4)])
def test_top_p_drops_cumulative_mass_equal_to_one_minus_top_p(top_p, kept):
    scores = np.zeros((1, 4), dtype=np.float32)  # probabilities exactly 0.25: cumsum 0.25, 0.5, 0.75, 1
    ours = top_p_filter(scores, top_p)
    assert np.isfinite(ours).sum() == kept
    assert np.isfinite(hf(TopPLogitsWarper(top_p), scores)).sum() == kept


def test_top_p_breaks_ties_toward_lower_ids():
    scores = np.log(np.array([[0.1, 0.3, 0.3, 0.3]], dtype=np.float32))
    # 0.3 of mass: one of the three equal ids; the lowest one, as argmax would choose.
    kept = np.isfinite(top_p_filter(scores, 0.3))
    np.testing.assert_array_equal(kept, [[False, True, False, False]])


@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("min_keep", [1, 4])
def test_min_p_matches_transformers(min_p, min_keep):
    for scores in (random_logits(12), grid_logits(13)):
        expected = hf(MinPLogitsWarper(min_p, min_tokens_to_keep=min_keep), scores)
        ours = min_p_filter(scores, min_p, min_tokens_to_keep=min_keep)
        if min_keep == 1:
            assert_scores_equal(ours, expected)
        else:  # torch.topk's order among equal probabilities is unspecified
            assert_same_up_to_boundary_ties(ours, expected, scores)


def test_mask_unproducible_ids():
    scores = random_logits(14, neg_inf=False)
    masked = mask_unproducible_ids(scores, 450)
    assert np.all(np.isneginf(masked[:, 450:]))
    np.testing.assert_array_equal(masked[:, :450], scores[:, :450])
    np.testing.assert_array_equal(mask_unproducible_ids(scores, VOCAB), scores)
    # In the pipeline it comes first: a filter never lets a masked id survive.
    scores[:, 480] = 100.0
    out = process_scores(scores, None, do_sample=True, top_k=5, producible_vocab_size=450)
    assert np.all(np.isneginf(out[:, 450:]))
    assert np.all(np.isfinite(out).sum(-1) == 5)


def test_processors_do_not_modify_their_input():
    scores = random_logits(15)
    before = scores.copy()
    context = np.arange(30).reshape(BATCH, 10)
    apply_repetition_penalty(scores, context, 1.3)
    apply_temperature(scores, 0.5)
    top_k_filter(scores, 5)
    top_p_filter(scores, 0.5)
    min_p_filter(scores, 0.2)
    mask_unproducible_ids(scores, 100)
    probabilities(scores)
    out = process_scores(scores, context, do_sample=False)
    out[:] = 0.0  # even with nothing enabled the result is a new array
    np.testing.assert_array_equal(scores, before)


# ----------------------------------------------------------------------------------------------
# the pipeline against transformers
# ----------------------------------------------------------------------------------------------

PIPELINES = [
    dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9),
    dict(do_sample=True, temperature=1.3, top_k=0, top_p=0.8, min_p=0.05, repetition_penalty=1.2),
    dict(do_sample=True, temperature=0.5, top_k=20, min_p=0.1, repetition_penalty=0.8),
    dict(do_sample=True, temperature=1.0, top_k=5),
    dict(do_sample=True, temperature=2.0, top_p=0.5, repetition_penalty=1.5),
    dict(do_sample=False, temperature=0.5, top_k=3, top_p=0.5, repetition_penalty=1.3),
]


def hf_processor_list(
    do_sample, temperature=1.0, top_k=None, top_p=None, min_p=None, repetition_penalty=None, prompt_ignore_length=None
):
    """transformers' list in `_get_logits_processor`'s order, with its enabling conditions."""
    processors = LogitsProcessorList()
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty, prompt_ignore_length))
    if do_sample:
        if temperature is not None and temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k is not None and top_k != 0:
            processors.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        if min_p is not None:
            processors.append(MinPLogitsWarper(min_p))
    return processors


@pytest.mark.parametrize("params", PIPELINES)
def test_pipeline_matches_logits_processor_list(params):
    scores = random_logits(16, ties=False)
    pad, prompt, mask, context = left_padded_batch()
    prompt_ignore_length = (torch.from_numpy(mask) != 0).int().argmax(dim=1)
    expected = hf(hf_processor_list(prompt_ignore_length=prompt_ignore_length, **params), scores, context)
    ours = process_scores(scores.astype(np.float64), context, context_mask=mask, **params)
    assert_scores_equal(ours, expected)


@pytest.fixture(scope="module")
def tiny_phi3():
    """A tiny random Phi-3 with sharp logits (initializer_range 0.5), pad 0, eos 2."""
    config = Phi3Config(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    return Phi3ForCausalLM(config).eval()


GENERATE_CASES = [
    # (kwargs to model.generate, the same request to process_scores)
    (dict(do_sample=True, temperature=0.7), dict(do_sample=True, temperature=0.7, top_k=50)),  # default top_k 50
    (
        dict(do_sample=True, top_k=None, top_p=0.9, repetition_penalty=1.3),
        dict(do_sample=True, top_p=0.9, repetition_penalty=1.3),
    ),  # an explicit None turns top-k off
    (
        dict(do_sample=True, temperature=1.5, top_k=30, min_p=0.05, repetition_penalty=0.7),
        dict(do_sample=True, temperature=1.5, top_k=30, min_p=0.05, repetition_penalty=0.7),
    ),
    (dict(do_sample=False, repetition_penalty=1.8), dict(do_sample=False, repetition_penalty=1.8)),
]


@pytest.mark.parametrize("generate_kwargs, ours_kwargs", GENERATE_CASES)
def test_pipeline_matches_model_generate(tiny_phi3, generate_kwargs, ours_kwargs):
    """The processed scores `generate` reports at every step, from its raw logits and context."""
    prompt = torch.tensor([[0, 0, 5, 6, 7, 5], [3, 4, 0, 9, 9, 9], [0, 0, 0, 0, 8, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    torch.manual_seed(1)
    out = tiny_phi3.generate(
        prompt,
        attention_mask=mask,
        max_new_tokens=5,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
        **generate_kwargs,
    )
    sequences = out.sequences.numpy()
    assert len(out.scores) >= 3  # several steps, so generated ids enter the context
    for step, (raw, processed) in enumerate(zip(out.logits, out.scores, strict=True)):
        context = sequences[:, : prompt.shape[1] + step]
        ours = process_scores(raw.numpy(), context, context_mask=mask.numpy(), **ours_kwargs)
        assert_scores_equal(ours, processed.numpy())
    if "repetition_penalty" in ours_kwargs:  # the left-padding rule is exercised: pad id 0
        raw, context, penalty = (
            out.logits[0].numpy(),
            sequences[:, : prompt.shape[1]],
            ours_kwargs["repetition_penalty"],
        )
        with_mask = apply_repetition_penalty(raw, context, penalty, context_mask=mask.numpy())
        assert apply_repetition_penalty(raw, context, penalty)[0, 0] != with_mask[0, 0]


# ----------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------


def test_greedy_is_argmax_lowest_id_among_ties():
    scores = random_logits(17)  # two ids share each row's maximum
    ids = select_next_tokens(scores, do_sample=False)
    assert ids.dtype == np.int64 and ids.shape == (BATCH,)
    np.testing.assert_array_equal(ids, np.argmax(scores, axis=-1))
    np.testing.assert_array_equal(ids, torch.argmax(torch.from_numpy(scores), dim=-1).numpy())


def test_seeded_sampling_repeats_exactly():
    scores = process_scores(random_logits(18), None, do_sample=True, temperature=1.5)

    def run(seed):
        rng = make_rng(seed)
        return np.stack([select_next_tokens(scores, True, rng) for _ in range(50)])

    first, again, other = run(1234), run(1234), run(4321)
    assert first.dtype == np.int64 and first.shape == (50, BATCH)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_sampling_takes_exactly_batch_floats():
    scores = random_logits(19)
    a, b = make_rng(7), make_rng(7)
    select_next_tokens(scores, True, a)
    b.random(BATCH)
    assert a.random() == b.random()


def test_sampled_frequencies_match_probabilities():
    probs = np.array([0.4, 0.0, 0.25, 0.15, 0.1, 0.06, 0.04, 0.0], dtype=np.float64)
    with np.errstate(divide="ignore"):
        row = np.log(probs).astype(np.float32) + 3.0  # any shift: softmax is invariant
    draws = 60_000
    ids = select_next_tokens(np.tile(row, (draws, 1)), True, make_rng(0))
    counts = np.bincount(ids, minlength=len(probs))
    assert counts[probs == 0].sum() == 0
    expected = draws * probs[probs > 0]
    chi2 = float(((counts[probs > 0] - expected) ** 2 / expected).sum())
    # 5 degrees of freedom: mean 5, and chi2 > 30 has probability below 2e-5.
    assert chi2 < 30, (counts, expected)


def test_zero_probability_ids_are_never_drawn():
    scores = random_logits(20)
    scores[:, -1] = -np.inf  # the last id has probability 0: the clip must not land on it
    scores = process_scores(scores, None, do_sample=True, top_k=40, top_p=0.9)
    ids = select_next_tokens(np.repeat(scores, 5000, axis=0), True, make_rng(3))
    assert np.all(np.isfinite(np.repeat(scores, 5000, axis=0)[np.arange(len(ids)), ids]))


class FixedRng:
    """A stand-in for numpy.random.Generator that returns chosen uniform numbers."""

    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.float64)

    def random(self, n):
        assert n == len(self.values)
        return self.values


def test_extreme_uniforms_land_on_nonzero_ids():
    row = np.array([-np.inf, 1.0, -np.inf, 2.0, 0.5, -np.inf, -np.inf], dtype=np.float32)
    largest_below_one = np.nextafter(1.0, 0.0)
    # u = 1.0 never comes from a Generator; it forces the clip to the last id with p > 0.
    ids = select_next_tokens(np.tile(row, (5, 1)), True, FixedRng([0.0, largest_below_one, 0.5, 1e-300, 1.0]))
    np.testing.assert_array_equal(ids, [1, 4, 3, 1, 4])


def test_temperature_zero_means_greedy():
    assert sampling_enabled(True, 1.0) and not sampling_enabled(True, 0) and not sampling_enabled(False, 0.7)
    scores = random_logits(21)
    out = process_scores(scores, None, do_sample=True, temperature=0.0, top_k=3)
    np.testing.assert_array_equal(out, scores)  # no warper applies when greedy


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------

INVALID = [
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "1"),
    ("temperature", True),
    ("top_k", -1),
    ("top_k", 2.5),
    ("top_k", True),
    ("top_k", "5"),
    ("top_p", 0.0),
    ("top_p", -0.2),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("min_p", math.nan),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.nan),
    ("repetition_penalty", math.inf),
]


@pytest.mark.parametrize("name, value", INVALID)
def test_invalid_parameter_names_itself(name, value):
    with pytest.raises(GenerationError, match=name):
        validate_sampling_parameters(**{name: value})
    with pytest.raises(GenerationError, match=name):
        process_scores(random_logits(22), np.zeros((BATCH, 1), dtype=np.int64), do_sample=True, **{name: value})


def test_valid_boundaries_pass():
    validate_sampling_parameters()
    validate_sampling_parameters(temperature=0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1e-3)
    validate_sampling_parameters(temperature=2.5, top_k=np.int64(40), top_p=1e-6, min_p=1.0, repetition_penalty=9)


def test_processors_refuse_bad_parameters():
    scores = random_logits(23)
    with pytest.raises(GenerationError, match="top_k"):
        top_k_filter(scores, -3)
    with pytest.raises(GenerationError, match="top_p"):
        top_p_filter(scores, 0.0)
    with pytest.raises(GenerationError, match="min_p"):
        min_p_filter(scores, 2.0)
    with pytest.raises(GenerationError, match="min_tokens_to_keep"):
        top_p_filter(scores, 0.5, min_tokens_to_keep=0)
    with pytest.raises(GenerationError, match="temperature"):
        apply_temperature(scores, 0.0)
    with pytest.raises(GenerationError, match="context_ids"):
        apply_repetition_penalty(scores, np.zeros((BATCH + 1, 4), dtype=np.int64), 1.2)
    with pytest.raises(GenerationError, match="producible_vocab_size"):
        mask_unproducible_ids(scores, 0)


# ----------------------------------------------------------------------------------------------
# hypothesis: properties of the filtered distribution
# ----------------------------------------------------------------------------------------------


@st.composite
def pipeline_cases(draw):
    batch = draw(st.integers(1, 3))
    vocab = draw(st.integers(2, 40))
    # A few fixed values make ties common; -inf entries appear too.
    element = st.one_of(st.floats(-30, 30, width=32), st.sampled_from([0.0, 1.0, 2.5, -4.0]), st.just(-np.inf))
    scores = draw(hnp.arrays(np.float32, (batch, vocab), elements=element))
    finite_id = draw(st.integers(0, vocab - 1))
    scores[:, finite_id] = np.where(np.isfinite(scores[:, finite_id]), scores[:, finite_id], 0.0)
    context = draw(hnp.arrays(np.int64, (batch, draw(st.integers(0, 8))), elements=st.integers(0, vocab - 1)))
    params = dict(
        temperature=draw(st.one_of(st.none(), st.floats(0.05, 5.0))),
        top_k=draw(st.one_of(st.none(), st.integers(0, vocab + 2))),
        top_p=draw(st.one_of(st.none(), st.floats(0.01, 1.0))),
        min_p=draw(st.one_of(st.none(), st.floats(0.0, 1.0))),
        repetition_penalty=draw(st.one_of(st.none(), st.floats(0.2, 5.0))),
    )
    return scores, context, params


def softmax64(x):
    """Brute-force float64 softmax of float32 scores, for the property checks."""
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pipeline_cases())
def test_filtered_distribution_properties(case):
    scores, context, params = case
    final = process_scores(scores, context, do_sample=True, **params)
    probs = probabilities(final)
    kept = np.isfinite(final)

    # A distribution: finite, sums to one, at least one id, support within the kept ids.
    assert probs.dtype == np.float32
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert np.all(kept.sum(-1) >= 1)
    assert not np.any((probs > 0) & ~kept)

    # Rebuild the stages' inputs to state each filter's rule on the scores it saw.
    x = scores
    if params["repetition_penalty"] not in (None, 1.0) and context.shape[1] > 0:
        x = apply_repetition_penalty(x, context, params["repetition_penalty"])
    if params["temperature"] not in (None, 1.0):
        x = apply_temperature(x, params["temperature"])
    top_k, top_p, min_p = params["top_k"], params["top_p"], params["min_p"]

    if top_k:  # at most k ids, more only through ties with the k-th largest score
        kth = np.sort(x, axis=-1)[:, -min(top_k, x.shape[1])][:, None]
        assert np.all(x[kept] >= np.broadcast_to(kth, x.shape)[kept])
        at_or_above = (x >= kth).sum(-1)
        assert np.all(kept.sum(-1) <= at_or_above)
        x = np.where(x >= kth, x, -np.inf).astype(np.float32)

    if top_p is not None and top_p < 1.0:
        # transformers' rule: the smallest top set whose mass reaches top_p (float32 slack 1e-5).
        nucleus = np.isfinite(top_p_filter(x, top_p))
        assert not np.any(kept & ~nucleus)
        q = softmax64(x)
        for row in range(x.shape[0]):
            inside, outside = nucleus[row], np.isfinite(x[row]) & ~nucleus[row]
            mass = q[row, inside].sum()
            assert mass >= top_p - 1e-5
            if inside.sum() > 1:
                assert mass - q[row, inside].min() < top_p + 1e-5  # dropping one more falls short
            if outside.any():
                assert x[row, inside].min() >= x[row, outside].max()  # it is a top set
        x = np.where(nucleus, x, -np.inf).astype(np.float32)

    if min_p is not None:
        # Every kept id has at least min_p times the largest probability; renormalization keeps
        # the ratios, so this holds on the final distribution as it does on min-p's input.
        p = softmax64(x)
        top = p.max(axis=-1, keepdims=True)
        assert np.all(p[kept] >= (min_p * np.broadcast_to(top, p.shape)[kept]) * (1 - 1e-5))
        dropped = np.isfinite(x) & ~kept
        assert np.all(p[dropped] < (min_p * np.broadcast_to(top, p.shape)[dropped]) * (1 + 1e-5))


@pytest.mark.parametrize("bad", ["nan", "all_masked", "overflowed"])
def test_a_distribution_that_is_not_finite_is_refused_when_sampling(bad):
    scores = np.zeros((2, 8), dtype=np.float32)
    if bad == "nan":
        scores[1, 3] = np.nan
    elif bad == "all_masked":
        scores[1] = -np.inf
    else:  # what a temperature of 1e-45 makes of ordinary logits
        with np.errstate(over="ignore"):
            scores[1] = np.float32(np.arange(8)) / np.float32(1e-45)
    with pytest.raises(GenerationError, match="not finite"), np.errstate(invalid="ignore"):
        select_next_tokens(scores, True, make_rng(0))
    assert select_next_tokens(scores[:1], True, make_rng(0)).shape == (1,)  # the healthy row alone draws


@pytest.mark.parametrize("seed", [-1, 1.5, "7", True])
def test_make_rng_refuses_seeds_numpy_cannot_take(seed):
    with pytest.raises(GenerationError, match="seed must be a non-negative integer"):
        make_rng(seed)


def test_suppress_ids_sets_exactly_those_scores_to_minus_infinity():
    from minphi3.sampling import suppress_ids

    scores = np.random.default_rng(0).standard_normal((2, 9)).astype(np.float32)
    out = suppress_ids(scores, [2, 7, 2])
    for b in range(2):
        for i in range(9):
            assert out[b, i] == (-np.inf if i in (2, 7) else scores[b, i])
    assert np.isfinite(scores).all()  # the input is not written


def test_suppressed_ids_apply_before_the_warpers_as_transformers_min_length():
    """transformers' MinNewTokensLength processor runs after the repetition penalty and before
    temperature / top-p: the nucleus is taken without the suppressed ids."""
    import torch
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )  # fmt: skip

    rng = np.random.default_rng(3)
    scores = rng.standard_normal((2, 40)).astype(np.float32) * 3
    context = rng.integers(0, 40, size=(2, 6))
    eos = [int(np.argmax(scores[0])), int(np.argmax(scores[1]))]
    ours = process_scores(scores, context, do_sample=True, temperature=0.7, top_p=0.8, repetition_penalty=1.3,
                          suppressed_ids=eos)  # fmt: skip
    processors = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(1.3), MinNewTokensLengthLogitsProcessor(6, 3, torch.tensor(eos)),
        TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.8),
    ])  # fmt: skip
    theirs = processors(torch.as_tensor(context), torch.as_tensor(scores)).numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    np.testing.assert_allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)], rtol=1e-6)
