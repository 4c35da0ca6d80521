"""Choosing the next token: logits processors, greedy selection and seeded sampling.

This module turns the last position's logits into the next token id the way transformers 5.23's
`generate` does (`transformers/generation/utils.py`, `_get_logits_processor`), in four steps:

1. `process_scores` casts `scores: [batch, vocab]` to float32 and runs the enabled processors in
   transformers' order: (minphi3's own mask of ids the tokenizer cannot produce), repetition
   penalty (greedy decoding too), then only when sampling: temperature, top-k, top-p, min-p.
2. Each processor is a small pure function with transformers' exact rule: it returns a new array
   and never writes into its input. Filtered entries become -inf, as in transformers, so the
   survivors keep their relative probabilities (pitfall 29: filter logits, never truncated
   probabilities, and in this order).
3. `probabilities` is a float32 softmax that tolerates -inf.
4. `select_next_tokens` takes the argmax (greedy) or draws one id per row by inverse CDF with a
   uniform number from a host `numpy.random.Generator` (`make_rng(seed)`), so that a seeded run
   repeats exactly and NumPy and CuPy runs draw the same ids from the same distribution.

Every function asks its array for its module (`xp = array_module(scores)`), so the same code runs
on NumPy and CuPy arrays; only the `batch` uniform numbers of a draw cross from host to device.

Where minphi3 differs from transformers, on purpose:
- `mask_unproducible_ids`: Phi-3's lm_head has 32064 rows but its tokenizer 32011 tokens; the
  extra ids are masked before anything else (transformers leaves them to the softmax).
- Ties: transformers' top-p sorts with `torch.sort`, which is not stable on the CPU, so when the
  top-p boundary falls inside a group of equal scores, which of the equal ids survive is
  unspecified there. Here it is fixed: among equal scores the lower id ranks higher (as `argmax`
  prefers it). The number of survivors, and so the distribution up to a permutation of ids with
  equal scores, is the same as transformers'.
- Sampling draws by inverse CDF instead of `torch.multinomial`; the distribution is the same,
  the random stream is not (pitfall 29: compare distributions, not sampled ids).
- `temperature=0` means greedy decoding (transformers refuses it): see `sampling_enabled`.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .backend import array_module
from .errors import GenerationError

# ----------------------------------------------------------------------------------------------
# Parameter validation
# ----------------------------------------------------------------------------------------------


def _is_real(value) -> bool:
    """A real number that is not a bool (True would otherwise pass as 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_temperature(temperature) -> None:
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise GenerationError(
            f"temperature must be a finite number >= 0 (0 means greedy decoding), got {temperature!r}"
        )


def _check_top_k(top_k) -> None:
    if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 0:
        raise GenerationError(f"top_k must be an integer >= 0 (0 disables top-k), got {top_k!r}")


def _check_top_p(top_p) -> None:
    # `not (0 < p <= 1)` rather than `p <= 0 or p > 1` so that NaN is refused too.
    if not _is_real(top_p) or not (0 < top_p <= 1):
        raise GenerationError(f"top_p must be a number with 0 < top_p <= 1 (1 disables top-p), got {top_p!r}")


def _check_min_p(min_p) -> None:
    if not _is_real(min_p) or not (0 <= min_p <= 1):
        raise GenerationError(f"min_p must be a number in [0, 1] (0 disables min-p), got {min_p!r}")


def _check_repetition_penalty(penalty) -> None:
    if not _is_real(penalty) or not math.isfinite(penalty) or not penalty > 0:
        raise GenerationError(
            f"repetition_penalty must be a finite number > 0 (1 disables it; > 1 discourages repeats), got {penalty!r}"
        )


def _check_min_tokens_to_keep(min_tokens_to_keep) -> None:
    if (
        not isinstance(min_tokens_to_keep, numbers.Integral)
        or isinstance(min_tokens_to_keep, bool)
        or min_tokens_to_keep < 1
    ):
        raise GenerationError(f"min_tokens_to_keep must be an integer >= 1, got {min_tokens_to_keep!r}")


def validate_sampling_parameters(temperature=None, top_k=None, top_p=None, min_p=None, repetition_penalty=None) -> None:
    """Raise GenerationError, naming the parameter and its valid range, for any value out of range.

    None means "not set" and is always valid. Valid ranges (issue 8):
    temperature >= 0 (0 = greedy), top_k >= 0 integer (0 = off), 0 < top_p <= 1 (1 = off),
    0 <= min_p <= 1 (0 = off), repetition_penalty > 0 (1 = off). NaN and infinities are refused.
    """
    if temperature is not None:
        _check_temperature(temperature)
    if top_k is not None:
        _check_top_k(top_k)
    if top_p is not None:
        _check_top_p(top_p)
    if min_p is not None:
        _check_min_p(min_p)
    if repetition_penalty is not None:
        _check_repetition_penalty(repetition_penalty)


def sampling_enabled(do_sample: bool, temperature=None) -> bool:
    """Whether the next token is drawn at random: do_sample, unless temperature is 0 (greedy).

    transformers raises on temperature=0 with do_sample=True; minphi3 reads it, as most
    runtimes do, as "no randomness". `generate` passes this to `select_next_tokens`.
    """
    return bool(do_sample) and not (temperature is not None and temperature == 0)


# ----------------------------------------------------------------------------------------------
# Logits processors: scores [batch, vocab] float32 -> new scores [batch, vocab] float32
# ----------------------------------------------------------------------------------------------


def _softmax(scores):
    """softmax over the last axis in the scores' dtype; rows of -inf give NaN (nothing to choose)."""
    xp = array_module(scores)
    row_max = xp.max(scores, axis=-1, keepdims=True)
    # An all -inf row would give -inf - -inf = NaN in every entry; subtract 0 there instead.
    row_max = xp.where(xp.isfinite(row_max), row_max, xp.zeros_like(row_max))
    e = xp.exp(scores - row_max)
    return e / xp.sum(e, axis=-1, keepdims=True)


def _rank_order(values):
    """Indices that sort each row of values: [batch, vocab] -> [batch, vocab], largest first.

    Stable on the negated values, so among equal values the lower id comes first (ranks higher).
    """
    xp = array_module(values)
    return xp.argsort(-values, axis=-1, kind="stable")


def mask_unproducible_ids(scores, producible_vocab_size: int):
    """Set the logits of ids the tokenizer cannot produce to -inf.

    scores: [batch, vocab] -> [batch, vocab]; s[:, i] = -inf for i >= producible_vocab_size.
    Phi-3's lm_head is padded to 32064 rows for 32011 tokens; an id in the padding would decode to
    nothing. transformers does not do this: it is minphi3's first processor.
    """
    if (
        not isinstance(producible_vocab_size, numbers.Integral)
        or isinstance(producible_vocab_size, bool)
        or producible_vocab_size < 1
    ):
        raise GenerationError(
            f"producible_vocab_size must be an integer >= 1 (the tokenizer's size), got {producible_vocab_size!r}"
        )
    xp = array_module(scores)
    ids = xp.arange(scores.shape[-1])
    return xp.where(ids < producible_vocab_size, scores, xp.asarray(-xp.inf, dtype=scores.dtype))


def suppress_ids(scores, ids):
    """Set the scores of `ids` to -inf: scores [batch, vocab], ids: a list of ids -> [batch, vocab].

    transformers' MinLength and MinNewTokensLength processors do this to the eos ids while the
    text is shorter than min_length (prompt included) or min_new_tokens.
    """
    xp = array_module(scores)
    banned = xp.zeros(scores.shape[-1], dtype=bool)
    banned[xp.asarray(list(ids), dtype=np.int64)] = True
    return xp.where(banned, xp.asarray(-xp.inf, dtype=scores.dtype), scores)


def apply_repetition_penalty(scores, context_ids, penalty: float, context_mask=None):
    """Penalize every id already present in the context, once per id (CTRL, Keskar et al. 2019).

    scores: [batch, vocab], context_ids: [batch, ctx] ints (prompt + generated so far),
    context_mask: [batch, m] with m <= ctx (the prompt's attention mask, or the mask of the whole
    context) or None -> [batch, vocab].

        s_i <- s_i * penalty   if s_i < 0
        s_i <- s_i / penalty   otherwise,   for each distinct id i in the row's context

    so penalty > 1 lowers a repeated id's probability and 0 < penalty < 1 raises it. Ids outside
    [0, vocab) are ignored (transformers clamps ids >= vocab to a dropped extra column).

    Left padding, as transformers 5.23 does it: `generate` does not drop the positions where the
    mask is 0; it computes one number per row, `prompt_ignore_length = argmax(mask != 0)`, the
    index of the row's first real token (`generation/utils.py` `_get_logits_processor`), and
    `RepetitionPenaltyLogitsProcessor` ignores the positions before it. Consequences reproduced
    here: only *leading* zeros count (a 0 after the first 1, a hole or right padding, is still
    penalized); a row whose mask is all zeros ignores nothing (argmax of all-False is 0); and
    the pad id itself is penalized if it also occurs among the real tokens. When the mask is all
    ones transformers drops it before building the processor: nothing is ignored, same result.
    """
    _check_repetition_penalty(penalty)
    xp = array_module(scores)
    batch, vocab = scores.shape
    ids = xp.asarray(context_ids)
    if ids.ndim != 2 or ids.shape[0] != batch:
        raise GenerationError(f"context_ids must have shape [batch={batch}, ctx], got shape {tuple(ids.shape)}")
    ids = ids.astype(xp.int64)
    # Every ignored or out-of-range position is sent to an extra column `vocab`, dropped below.
    dropped = xp.asarray(vocab, dtype=xp.int64)
    if context_mask is not None:
        mask = xp.asarray(context_mask)
        if mask.ndim != 2 or mask.shape[0] != batch or mask.shape[1] > ids.shape[1]:
            raise GenerationError(
                f"context_mask must have shape [batch={batch}, m] with m <= ctx={ids.shape[1]}, "
                f"got shape {tuple(mask.shape)}"
            )
        if mask.shape[1] > 0:
            first_real = xp.argmax(mask != 0, axis=1)  # [batch]: transformers' prompt_ignore_length
            positions = xp.arange(ids.shape[1])
            ids = xp.where(positions[None, :] < first_real[:, None], dropped, ids)
    ids = xp.where((ids < 0) | (ids >= vocab), dropped, ids)
    present = xp.zeros((batch, vocab + 1), dtype=bool)
    present[xp.arange(batch)[:, None], ids] = True  # a scatter of True: repeated ids count once
    penalized = xp.where(scores < 0, scores * penalty, scores / penalty)
    return xp.where(present[:, :vocab], penalized, scores)


def apply_temperature(scores, temperature: float):
    """Divide the logits by the temperature: scores: [batch, vocab] -> [batch, vocab], s / T.

    T < 1 sharpens the distribution, T > 1 flattens it. T must be > 0 here; T = 0 (greedy) is
    handled by `sampling_enabled`, before any division.
    """
    _check_temperature(temperature)
    if temperature == 0:
        raise GenerationError("temperature=0 means greedy decoding: it cannot divide the logits")
    return scores / temperature


def top_k_filter(scores, top_k: int, min_tokens_to_keep: int = 1):
    """Keep the k largest logits of each row: scores: [batch, vocab] -> [batch, vocab].

    k = min(max(top_k, min_tokens_to_keep), vocab); s_i <- -inf where s_i < (k-th largest s).
    Entries equal to the k-th largest all survive, so ties can keep more than k ids (as in
    transformers, which compares with `torch.topk(scores, k)[0][..., -1]`). top_k = 0 means
    "off" (as in `generate`) and returns the scores unchanged.
    """
    _check_top_k(top_k)
    _check_min_tokens_to_keep(min_tokens_to_keep)
    xp = array_module(scores)
    if top_k == 0:
        return scores.copy()
    vocab = scores.shape[-1]
    k = min(max(int(top_k), int(min_tokens_to_keep)), vocab)
    kth_largest = xp.sort(scores, axis=-1)[:, vocab - k : vocab - k + 1]  # [batch, 1]
    return xp.where(scores < kth_largest, xp.asarray(-xp.inf, dtype=scores.dtype), scores)


def top_p_filter(scores, top_p: float, min_tokens_to_keep: int = 1):
    """Nucleus filtering: keep the most probable ids whose mass reaches top_p.

    scores: [batch, vocab] -> [batch, vocab]. transformers' rule: sort ascending, take
    c_j = cumsum(softmax(sorted s))_j, drop every sorted position with c_j <= 1 - top_p, but never
    the last (largest) `min_tokens_to_keep`. The survivors are the smallest top set whose mass is
    >= top_p (up to float32 rounding of c). Among equal scores the lower id ranks higher (see the
    module docstring on ties).
    """
    _check_top_p(top_p)
    _check_min_tokens_to_keep(min_tokens_to_keep)
    xp = array_module(scores)
    batch, vocab = scores.shape
    # Descending with lower ids first among ties, then reversed: an ascending order in which,
    # among ties, the higher id comes first and so is dropped first.
    order = _rank_order(scores)[:, ::-1]
    sorted_scores = xp.take_along_axis(scores, order, axis=-1)
    cumulative = xp.cumsum(_softmax(sorted_scores), axis=-1)  # float32, as transformers
    drop_sorted = cumulative <= (1 - top_p)
    keep = min(int(min_tokens_to_keep), vocab)
    drop_sorted[:, vocab - keep :] = False
    # Back to id order: a scatter with distinct indices per row.
    drop = xp.empty_like(drop_sorted)
    drop[xp.arange(batch)[:, None], order] = drop_sorted
    return xp.where(drop, xp.asarray(-xp.inf, dtype=scores.dtype), scores)


def min_p_filter(scores, min_p: float, min_tokens_to_keep: int = 1):
    """Keep the ids whose probability is at least min_p times the row's largest probability.

    scores: [batch, vocab] -> [batch, vocab]. p = softmax(s); s_i <- -inf where
    p_i < min_p * max(p), except the `min_tokens_to_keep` most probable ids (lower id first among
    ties). Equivalent to s_i < max(s) + log(min_p), but computed on probabilities as transformers
    does so that the boundary rounds the same way.
    """
    _check_min_p(min_p)
    _check_min_tokens_to_keep(min_tokens_to_keep)
    xp = array_module(scores)
    batch, vocab = scores.shape
    probs = _softmax(scores)
    drop = probs < min_p * xp.max(probs, axis=-1, keepdims=True)
    keep = min(int(min_tokens_to_keep), vocab)
    if keep > 1:  # with keep = 1 the most probable id always passes, as min_p <= 1
        top = _rank_order(probs)[:, :keep]
        drop[xp.arange(batch)[:, None], top] = False
    return xp.where(drop, xp.asarray(-xp.inf, dtype=scores.dtype), scores)


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


def process_scores(
    scores,
    context_ids,
    *,
    do_sample: bool,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
    repetition_penalty=None,
    context_mask=None,
    producible_vocab_size=None,
    suppressed_ids=None,
):
    """The next-token scores that `generate` selects from: [batch, vocab] -> float32 [batch, vocab].

    context_ids: [batch, ctx] (prompt + generated so far; only read for the repetition penalty),
    context_mask: [batch, m] or None (see `apply_repetition_penalty` for the left-padding rule).

    Order (transformers 5.23 `_get_logits_processor`), each step only when enabled:
      0. mask_unproducible_ids          if producible_vocab_size is given (minphi3 only)
      1. apply_repetition_penalty       if repetition_penalty not in (None, 1.0); greedy too
      1b. suppress_ids                  if suppressed_ids (the eos ids before min_length /
                                        min_new_tokens is reached); greedy too
      -- only when sampling (do_sample and temperature != 0, see `sampling_enabled`): --
      2. apply_temperature              if temperature not in (None, 1.0)
      3. top_k_filter                   if top_k not in (None, 0)
      4. top_p_filter                   if top_p not in (None, 1.0)
      5. min_p_filter                   if min_p is not None (0 is a no-op)

    Defaults: transformers' `generate` fills an unset top_k with 50 when sampling. This function
    applies no default: the caller passes top_k explicitly (top_k=50 reproduces transformers'
    `generate(do_sample=True)`). `minphi3.generate` follows the issue's signature, top_k=None,
    so by default it does not truncate to 50 ids.
    """
    validate_sampling_parameters(temperature, top_k, top_p, min_p, repetition_penalty)
    xp = array_module(scores)
    scores = scores.astype(xp.float32)  # a copy: nothing below can write into the caller's array
    if scores.ndim != 2:
        raise GenerationError(f"scores must have shape [batch, vocab], got shape {tuple(scores.shape)}")
    if producible_vocab_size is not None:
        scores = mask_unproducible_ids(scores, producible_vocab_size)
    if repetition_penalty is not None and repetition_penalty != 1.0:
        if context_ids is None:
            raise GenerationError("repetition_penalty needs context_ids (the prompt and the tokens so far)")
        scores = apply_repetition_penalty(scores, context_ids, repetition_penalty, context_mask)
    if suppressed_ids:
        scores = suppress_ids(scores, suppressed_ids)
    if not sampling_enabled(do_sample, temperature):
        return scores
    if temperature is not None and temperature != 1.0:
        scores = apply_temperature(scores, temperature)
    if top_k is not None and top_k != 0:
        scores = top_k_filter(scores, top_k)
    if top_p is not None and top_p < 1.0:
        scores = top_p_filter(scores, top_p)
    if min_p is not None:
        scores = min_p_filter(scores, min_p)
    return scores


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------


def probabilities(scores):
    """softmax in float32: scores: [batch, vocab] -> probs: [batch, vocab], each row sums to 1.

    p_i = exp(s_i - max s) / sum_j exp(s_j - max s); -inf scores get probability exactly 0.
    A row with no finite score has no distribution and gives NaN.
    """
    xp = array_module(scores)
    return _softmax(scores.astype(xp.float32))


def make_rng(seed=None) -> np.random.Generator:
    """The host random generator for sampling: `numpy.random.default_rng(seed)`.

    seed: None (fresh entropy) or an integer >= 0. It stays on the host whatever the backend: a
    draw takes `batch` floats from it, so a seeded run repeats exactly, on NumPy and on CuPy.
    """
    check_seed(seed)
    return np.random.default_rng(seed)


def check_seed(seed) -> None:
    """seed must be None or an integer >= 0 (NumPy's SeedSequence takes no negative entropy)."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise GenerationError(f"seed must be a non-negative integer, found {seed!r}")


def select_next_tokens(scores, do_sample: bool, rng: np.random.Generator | None = None):
    """The next id of each row: scores: [batch, vocab] -> int64 [batch], on the scores' module.

    Greedy (do_sample False): argmax, the lowest id among equal maxima (as torch.argmax).
    Sampling: p = probabilities(scores), c = cumsum(p) in float64, u = rng.random(batch) on the
    host, and the id is the first position where c > u * c[-1] (inverse CDF; scaling u by the
    total makes it exact for rows whose float32 probabilities do not sum to exactly 1). That
    position always has p > 0, since c only grows where p > 0. It is clipped to the row's last
    id with p > 0 for the case u * c[-1] rounds up to c[-1], so an id of probability zero is
    never drawn. The generator's state advances by exactly `batch` floats per call. When sampling,
    a row whose distribution is not finite (NaN logits, or scores that overflowed) is a
    GenerationError, as torch.multinomial refuses it in transformers; greedy decoding takes the
    argmax as torch does (an overflow to +inf is still the maximum).
    """
    xp = array_module(scores)
    if not do_sample:
        return xp.argmax(scores, axis=-1).astype(xp.int64)
    if rng is None:
        raise GenerationError("sampling needs a random generator: pass rng=make_rng(seed)")
    batch, vocab = scores.shape
    probs = probabilities(scores)
    cdf = xp.cumsum(probs.astype(xp.float64), axis=-1)  # float64: the running sum loses nothing
    if not bool(xp.isfinite(cdf[:, -1]).all()):
        raise GenerationError(
            "the sampling distribution is not finite: the logits hold NaN, or the scores overflowed float32 "
            "(a temperature so small that logits / temperature is infinite; temperature=0 means greedy)"
        )
    u = xp.asarray(rng.random(batch))  # the only host -> device transfer: batch floats
    target = u[:, None] * cdf[:, -1:]
    # cdf is non-decreasing, so (number of entries <= target) is the first index with cdf > target.
    index = xp.sum(cdf <= target, axis=-1)
    ids = xp.arange(vocab)
    last_nonzero = xp.max(xp.where(probs > 0, ids, -1), axis=-1)
    return xp.minimum(index, last_nonzero).astype(xp.int64)
