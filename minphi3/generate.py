"""Text generation: prefill, then one token at a time with the KV cache, as transformers does.

`generate` follows transformers' `generate` token for token in greedy mode:
- left-padded batches: positions are cumsum(attention_mask) - 1 (pads at 0), each step appends
  the last position + 1;
- scores are the last position's logits in float32, processed in transformers' order
  (`sampling.process_scores`), then argmax or a seeded draw;
- a row stops at any id of the eos list (generation_config.json's list when present: Phi-3
  instruct stops on 32000, 32001 and 32007); finished rows receive the pad id (the first eos id
  when the generation config names no pad) until every row is done or max_new_tokens is reached;
- an argument not passed takes generation_config.json's value, as in transformers (sampling
  settings, a repetition penalty, max_new_tokens or max_length: `resolve_generation_settings`);
- without attention_mask, the mask is input_ids != pad when that is possible (`infer_attention_mask`);
- LongRoPE: the first time the sequence crosses original_max_position_embeddings, every cached key
  was rotated with the short factors, so the cache is dropped and the whole sequence fed again
  with the long factors (transformers' `prepare_inputs_for_generation` rule). The crossing is
  the highest position id passing the limit, the same test that picks the factors. transformers
  tests the padded length instead; the two agree whenever some row has no padding (the usual
  left-padded batch). When every row is padded, transformers re-feeds too early, with the short
  factors, and later mixes keys of both factors; minphi3 re-feeds when the factors change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .backend import records_graphs, to_device, to_numpy
from .cache import KVCache
from .decode import FixedDecodeStep
from .errors import GenerationError
from .loading import check_cache_memory
from .model import check_token_ids
from .rope import use_long_factors
from .sampling import make_rng, process_scores, sampling_enabled, select_next_tokens, validate_sampling_parameters


@dataclass
class GenerationStats:
    """Figures of one generate call: token counts and wall-clock seconds of each phase."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    step_seconds: list = field(default_factory=list)
    fixed_steps: int = 0  # one-token steps run by the fixed-shape step (minphi3/decode.py)
    graph_launches: int = 0  # of those, how many a recorded CUDA graph ran
    graph_error: str | None = None  # why recording a CUDA graph failed, if it did

    @property
    def tokens_per_second(self) -> float:
        """New tokens per second of decoding (the prefill's first token excluded).

        With a single new token there is no decoding step; the figure is then that token's rate,
        1 / prefill_seconds, so it is always a finite number (0.0 before any step ran).
        """
        decoded = self.new_tokens - 1
        if decoded > 0 and self.decode_seconds > 0:
            return decoded / self.decode_seconds
        return self.new_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


def resolve_eos_ids(model, eos_token_id=None) -> list[int]:
    """The ids that end a row: the argument, else the model's generation config's, else none.

    `model.generation_config` is generation_config.json alone when the checkpoint has one, so
    config.json's eos does not count then, as in transformers (`minphi3.loading.generation_settings`).
    """
    if eos_token_id is None:
        eos_token_id = model.generation_config.get("eos_token_id")
    if eos_token_id is None:
        return []
    refused = GenerationError(f"eos_token_id must be a token id or a list of them, found {eos_token_id!r}")
    listed = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    if isinstance(eos_token_id, (dict, set, str, bytes)) or any(isinstance(v, (bool, np.bool_)) for v in listed):
        raise refused
    if isinstance(eos_token_id, (list, tuple)) and not eos_token_id:
        return []  # an empty list: nothing ends a row
    try:  # an int, a list, or an array of any backend (a torch or CuPy tensor)
        ids = np.asarray(to_numpy(eos_token_id))
    except (TypeError, ValueError):
        raise refused from None
    if ids.ndim > 1 or not np.issubdtype(ids.dtype, np.integer):
        raise refused
    for value in ids.reshape(-1).tolist():
        if not 0 <= value < model.config.vocab_size:
            raise GenerationError(f"eos_token_id {value!r} is not a token id below vocab_size {model.config.vocab_size}")
    return [int(v) for v in ids.reshape(-1)]


def prompt_positions(attention_mask: np.ndarray) -> np.ndarray:
    """Positions of a (left-)padded prompt: cumsum(mask) - 1, padding at 0.

    attention_mask: [batch, seq] of 0/1 -> [batch, seq] int64
    """
    positions = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 0, positions).astype(np.int64)


def check_length(config, prompt_length: int, max_new_tokens) -> int:
    """max_new_tokens must be a positive integer and prompt + new tokens must fit the context
    (config.max_position_embeddings)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise GenerationError(f"max_new_tokens must be a positive integer, found {max_new_tokens!r}")
    limit = config.max_position_embeddings
    if prompt_length + max_new_tokens > limit:
        raise GenerationError(
            f"the prompt ({prompt_length} token{'' if prompt_length == 1 else 's'}) plus max_new_tokens ({max_new_tokens}) is longer than the "
            f"model's context of {limit} tokens (max_position_embeddings); shorten the prompt or ask for fewer tokens"
        )
    return int(max_new_tokens)


def generate(
    model,
    input_ids,
    max_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    attention_mask=None,
    eos_token_id=None,
    streamer=None,
    pad_token_id: int | None = None,
    cache: KVCache | None = None,
    stats: GenerationStats | None = None,
    cuda_graph: bool | None = None,
    min_new_tokens: int | None = None,
    min_length: int | None = None,
) -> np.ndarray:
    """Continue each row of `input_ids`; -> host int64 [batch, prompt + new] like transformers.

    input_ids: [batch, seq] (nested lists accepted), left-padded when rows differ in length, with
    attention_mask [batch, seq] (1 real, 0 pad; when omitted, inferred by transformers' rule,
    `infer_attention_mask`). eos_token_id / pad_token_id: default to the model's generation
    config (`resolve_eos_ids`, `resolve_pad_id`). max_new_tokens, do_sample, temperature, top_k,
    top_p, min_p, repetition_penalty: None (not passed) takes generation_config.json's value, as
    transformers does, else 64 new tokens (capped to the context), greedy, and no processor
    (`resolve_generation_settings`). temperature == 0 means greedy. seed makes
    sampling repeat exactly. streamer: a `TextStreamer`, or any callable given the [batch] array
    of new ids at each step. cache: an existing KVCache holding the first `cache.length` tokens of
    input_ids (a chat's earlier turns): only the rest is fed, and at least the last prompt token
    (its logits pick the first new one); the cache is left holding every token but the last
    generated one. stats: a GenerationStats to fill with counts and timings.
    min_new_tokens / min_length: no eos id is generated before this many new tokens / before
    the row (padded prompt included) is this long (transformers' MinNewTokensLength and MinLength
    processors; min_new_tokens, when set, replaces min_length); None: generation_config.json's,
    else no minimum.
    cuda_graph: how one-token steps run. None (default): on the GPU as a recorded CUDA graph,
    on the CPU as ordinary model calls. True: through the fixed-shape step of minphi3/decode.py
    (recorded on the GPU; on the CPU the same step, unrecorded). False: ordinary model calls.
    """
    if model.config.head_kind != "causal_lm":  # its logits score labels, not next tokens
        raise GenerationError(
            f"generate needs a causal LM; this checkpoint has a {model.config.head_kind} head "
            f"({', '.join(model.config.architectures) or model.config.model_type})"
        )
    ids = check_token_ids(input_ids, model.config.vocab_size)
    batch, prompt_length = ids.shape
    _check_argument_types(streamer, cache, stats, cuda_graph)
    settings = resolve_generation_settings(
        model, prompt_length, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
        min_new_tokens=min_new_tokens, min_length=min_length,
    )  # fmt: skip
    max_new_tokens, do_sample, temperature = settings["max_new_tokens"], settings["do_sample"], settings["temperature"]
    top_k, top_p, min_p = settings["top_k"], settings["top_p"], settings["min_p"]
    repetition_penalty = settings["repetition_penalty"]
    # transformers' `_prepare_generated_length`: min_new_tokens, when set, replaces min_length.
    if settings["min_new_tokens"] is not None:
        min_length = prompt_length + settings["min_new_tokens"]
    else:
        min_length = settings["min_length"] or 0
    if do_sample and temperature == 0:
        do_sample = False  # temperature 0 is the limit of sharpening: greedy
    eos_ids = resolve_eos_ids(model, eos_token_id)
    pad_id = resolve_pad_id(model, pad_token_id, eos_ids)
    mask = _attention_mask(attention_mask, ids, pad_id, eos_ids)
    rng = make_rng(seed)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = int(mask.sum())

    if cache is not None:
        model.check_cache_fits(cache)  # here: the fixed decode step may run without a model call to check it
    if cache is None:
        check_cache_memory(model.config, batch, prompt_length + max_new_tokens, model.dtype, model.xp)
        cache = model.new_cache(batch, prompt_length + max_new_tokens)
    elif cache.batch_size != batch or cache.length > prompt_length:
        raise GenerationError("the cache given to generate must hold a prefix of input_ids for the same batch size")
    elif cache.length == prompt_length:
        cache.rewind(prompt_length - 1)  # the last prompt token is fed again: its logits pick the first new token

    sequences = np.empty((batch, prompt_length + max_new_tokens), dtype=np.int64)
    sequences[:, :prompt_length] = ids
    full_mask = np.ones((batch, prompt_length + max_new_tokens), dtype=np.int64)
    full_mask[:, :prompt_length] = mask
    positions = np.zeros((batch, prompt_length + max_new_tokens), dtype=np.int64)
    positions[:, :prompt_length] = prompt_positions(mask)
    unfinished = np.ones(batch, dtype=bool)
    length = prompt_length
    fixed_steps = records_graphs(model.xp) if cuda_graph is None else bool(cuda_graph)
    if fixed_steps:
        cache.reserve(prompt_length + max_new_tokens)
    fixed: FixedDecodeStep | None = None
    penalized = repetition_penalty is not None and repetition_penalty != 1.0

    for _ in range(max_new_tokens):
        step_start = time.perf_counter()
        fed_from = _first_uncached(model, cache, positions[:, :length], length)
        if fixed_steps and fed_from == length - 1:
            last_positions = positions[:, length - 1]
            highest = int(last_positions.max())
            if fixed is None or not fixed.fits(cache, highest):
                _count_fixed_steps(stats, fixed)
                fixed = FixedDecodeStep(model, cache, prompt_length + max_new_tokens, highest)
            scores = fixed(sequences[:, length - 1], last_positions, cache.length)
        else:
            out = model(
                sequences[:, fed_from:length],
                # The fed tokens' columns only: the cache recorded the others' padding when it
                # took them, so the whole-mask form would rewrite it each token for nothing.
                attention_mask=full_mask[:, fed_from:length],
                position_ids=positions[:, fed_from:length],
                logits_to_keep=1,
                cache=cache,
            )
            scores = out.logits[:, -1, :]
        # Extreme but valid settings (temperature 1e-30, a penalty of 1e-300) overflow float32
        # scores. The outcome is checked (select_next_tokens refuses a distribution that is not
        # finite; greedy takes +inf as the maximum it is), so NumPy's warnings would be noise.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            scores = process_scores(
                scores,
                to_device(sequences[:, :length], model.xp) if penalized else None,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                min_p=min_p,
                repetition_penalty=repetition_penalty,
                context_mask=to_device(full_mask[:, :length], model.xp) if penalized else None,
                producible_vocab_size=model.tokenizer_size,
                suppressed_ids=eos_ids if length < min_length else None,
            )
            next_ids = to_numpy(select_next_tokens(scores, do_sample, rng)).astype(np.int64)
        if not unfinished.all():  # a row finished at an eos id, so pad_id is set
            next_ids = np.where(unfinished, next_ids, pad_id)
        sequences[:, length] = next_ids
        positions[:, length] = positions[:, length - 1] + 1
        length += 1
        _stream(streamer, next_ids)
        unfinished &= ~np.isin(next_ids, eos_ids)
        stats.step_seconds.append(time.perf_counter() - step_start)
        if not unfinished.any():
            break
    _count_fixed_steps(stats, fixed)
    stats.new_tokens = length - prompt_length
    stats.prefill_seconds = stats.step_seconds[0]
    stats.decode_seconds = sum(stats.step_seconds[1:])
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    return sequences[:, :length]


# What `generate` uses for a setting neither its caller nor generation_config.json gives: the
# issue's signature (greedy, no processor, 64 new tokens). transformers' own fallbacks differ in
# two places (top_k=50 when sampling, 20 new tokens); pass those explicitly to reproduce them.
GENERATION_DEFAULTS = {
    "max_new_tokens": 64,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": None,
    "top_p": None,
    "min_p": None,
    "repetition_penalty": None,
    "min_new_tokens": None,
    "min_length": None,
}
SAMPLING_PARAMETERS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")

# Settings of generation_config.json that minphi3's generate does not implement, each with the
# condition under which transformers 5.23 acts on it (`_get_logits_processor`,
# `get_generation_mode`; `s` holds the resolved settings). A file that meets one is refused:
# answering as if the setting were not there would differ from transformers without a word.
# Settings transformers ignores for such a call (typical_p when greedy, diversity_penalty
# without beams, the encoder-decoder ones) pass.
UNIMPLEMENTED_SETTINGS = {
    "num_beams": lambda v, s: v > 1,
    "num_return_sequences": lambda v, s: v > 1,
    "penalty_alpha": lambda v, s: v > 0 and not s["sampling"] and (50 if s["top_k"] is None else s["top_k"]) > 1,
    "no_repeat_ngram_size": lambda v, s: v > 0,
    "suppress_tokens": lambda v, s: len(v) > 0,
    "begin_suppress_tokens": lambda v, s: len(v) > 0,
    "guidance_scale": lambda v, s: v != 1,
    "typical_p": lambda v, s: s["sampling"] and v < 1,
    "top_h": lambda v, s: s["sampling"],
    "epsilon_cutoff": lambda v, s: s["sampling"] and 0 < v < 1,
    "eta_cutoff": lambda v, s: s["sampling"] and 0 < v < 1,
    **{name: lambda v, s: True for name in (  # any value: a processor, or an error in transformers
        "bad_words_ids", "sequence_bias", "constraints", "force_words_ids", "forced_bos_token_id",
        "forced_eos_token_id", "exponential_decay_length_penalty", "watermarking_config", "dola_layers", "stop_strings",
    )},
}  # fmt: skip


def resolve_generation_settings(model, prompt_length: int, **given) -> dict:
    """The settings of one `generate` call: each argument as given; where it is None, the model's
    generation config's value (generation_config.json); else `GENERATION_DEFAULTS`.

    transformers' precedence (`GenerationMixin._prepare_generation_config`): kwargs >
    model.generation_config > global defaults. The length follows `_prepare_generated_length`:
    max_new_tokens, else the file's max_length less the prompt, else the default; a length the
    caller did not pass is capped to the context (max_position_embeddings), one the caller passed
    is checked against it (`check_length`). -> {name: value} for every key of GENERATION_DEFAULTS.
    """
    file_config = model.generation_config or {}
    settings, from_file = {}, []
    for name, default in GENERATION_DEFAULTS.items():
        value = given.get(name)
        if value is None and file_config.get(name) is not None:
            value = file_config[name]
            from_file.append(name)
        settings[name] = default if value is None else value
    if not isinstance(settings["do_sample"], (bool, np.bool_)):
        where = "generation_config.json's " if "do_sample" in from_file else ""
        raise GenerationError(f"{where}do_sample must be True or False, found {settings['do_sample']!r}")
    settings["do_sample"] = bool(settings["do_sample"])
    try:  # the file's values first, so that a bad one is reported as the file's
        validate_sampling_parameters(**{name: settings[name] for name in from_file if name in SAMPLING_PARAMETERS})
    except GenerationError as exc:
        raise GenerationError(f"generation_config.json: {exc}") from None
    validate_sampling_parameters(**{name: settings[name] for name in SAMPLING_PARAMETERS})
    for name in ("min_new_tokens", "min_length"):
        value = settings[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0):
            where = "generation_config.json's " if name in from_file else ""
            raise GenerationError(f"{where}{name} must be a non-negative integer, found {value!r}")
    _refuse_unimplemented(file_config, settings)
    settings["max_new_tokens"] = _new_token_budget(model.config, prompt_length, given.get("max_new_tokens"), file_config)
    return settings


def _refuse_unimplemented(file_config: dict, settings: dict) -> None:
    resolved = {"sampling": sampling_enabled(settings["do_sample"], settings["temperature"]), "top_k": settings["top_k"]}
    for name, acts in UNIMPLEMENTED_SETTINGS.items():
        value = file_config.get(name)
        if value is None:
            continue
        try:
            refused = bool(acts(value, resolved))
        except TypeError:  # a value of the wrong type: transformers would refuse it too
            refused = True
        if refused:
            raise GenerationError(
                f"generation_config.json sets {name}={value!r}, which minphi3's generate does not implement "
                "(transformers' tokens would differ); remove it from the file to generate without it"
            )


def _new_token_budget(config, prompt_length: int, max_new_tokens, file_config: dict) -> int:
    if max_new_tokens is not None:
        return check_length(config, prompt_length, max_new_tokens)
    context = config.max_position_embeddings
    budget, source = GENERATION_DEFAULTS["max_new_tokens"], "the default"
    if file_config.get("max_new_tokens") is not None:
        budget, source = file_config["max_new_tokens"], "generation_config.json's max_new_tokens"
    elif file_config.get("max_length") is not None:
        max_length = file_config["max_length"]
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length <= prompt_length:
            raise GenerationError(
                f"generation_config.json's max_length ({max_length!r}) leaves no room after the prompt "
                f"({prompt_length} tokens): pass max_new_tokens"
            )
        budget, source = max_length - prompt_length, "generation_config.json's max_length"
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise GenerationError(f"{source} must be a positive integer of new tokens, found {budget!r}")
    if prompt_length >= context:
        check_length(config, prompt_length, 1)  # its message: the prompt alone fills the context
    return int(min(budget, context - prompt_length))


def _check_argument_types(streamer, cache, stats, cuda_graph) -> None:
    """Refuse, before any step runs, the arguments `generate` would otherwise trip over mid-way."""
    if streamer is not None and not (hasattr(streamer, "put") or callable(streamer)):
        raise GenerationError(f"streamer must be a TextStreamer (an object with put) or a callable, found {streamer!r}")
    if cache is not None and not isinstance(cache, KVCache):
        raise GenerationError(f"cache must be a KVCache (model.new_cache), found {type(cache).__name__}")
    if stats is not None and not isinstance(stats, GenerationStats):
        raise GenerationError(f"stats must be a GenerationStats, found {type(stats).__name__}")
    if cuda_graph is not None and not isinstance(cuda_graph, (bool, np.bool_)):
        raise GenerationError(f"cuda_graph must be None, True or False, found {cuda_graph!r}")


def _count_fixed_steps(stats: GenerationStats, fixed: FixedDecodeStep | None) -> None:
    if fixed is not None:
        stats.fixed_steps += fixed.replay.calls
        stats.graph_launches += fixed.replay.launches
        stats.graph_error = stats.graph_error or fixed.replay.graph_error


def _first_uncached(model, cache: KVCache, positions: np.ndarray, length: int) -> int:
    """Where this step's input starts: after the cached tokens, or at 0 when the cached keys were
    rotated with the other LongRoPE factors than this step needs: the switch crossed for the first
    time (short-factor keys), or a cache rewound below the switch (long-factor keys, a chat turn
    that re-renders shorter). The cache is dropped and the whole sequence fed again."""
    config = model.config
    if config.uses_longrope and cache.length > 0:
        if use_long_factors(int(positions.max()), config.original_max_position_embeddings) != cache.long_rope:
            cache.reset()
    return cache.length


def resolve_pad_id(model, pad_token_id, eos_ids: list[int]) -> int | None:
    """The id finished rows receive: the argument, else the generation config's pad_token_id,
    else the first eos id, else None (with no eos id no row ever finishes).

    transformers' `_prepare_special_tokens`: config.json's pad does not count when
    generation_config.json exists and names none.
    """
    if pad_token_id is None:
        pad_token_id = model.generation_config.get("pad_token_id")
    if pad_token_id is None:
        return eos_ids[0] if eos_ids else None
    vocab = model.config.vocab_size
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, (int, np.integer)) or not 0 <= pad_token_id < vocab:
        raise GenerationError(f"pad_token_id {pad_token_id!r} is not a token id below vocab_size {vocab}")
    return int(pad_token_id)


def infer_attention_mask(ids: np.ndarray, pad_id: int | None, eos_ids: list[int]) -> np.ndarray:
    """The mask of a prompt given without one, by transformers' rule
    (`_prepare_attention_mask_for_generation`): input_ids != pad when a pad id is set, occurs in
    input_ids and is not an eos id; otherwise every token is real. Phi-3's pad is an eos id, so
    there a left-padded batch needs its attention_mask.

    ids: [batch, seq] -> [batch, seq] int64 of 0 (pad) / 1 (real)
    """
    if pad_id is None or pad_id in eos_ids or not (ids == pad_id).any():
        return np.ones_like(ids)
    mask = (ids != pad_id).astype(np.int64)
    if (mask.sum(axis=1) == 0).any():
        raise GenerationError(
            f"a row of input_ids is all pad_token_id {pad_id}, so the attention_mask inferred from it "
            "is all padding: pass attention_mask, or give every prompt at least one real token"
        )
    return mask


def _attention_mask(attention_mask, ids: np.ndarray, pad_id: int | None, eos_ids: list[int]) -> np.ndarray:
    if attention_mask is None:
        return infer_attention_mask(ids, pad_id, eos_ids)
    mask = np.asarray(to_numpy(attention_mask))
    if mask.shape != ids.shape:
        raise GenerationError(f"attention_mask has shape {list(mask.shape)}, input_ids {list(ids.shape)}")
    if not np.isin(mask, (0, 1)).all():
        raise GenerationError("attention_mask must hold only 0 (padding) and 1 (real token)")
    if (mask.sum(axis=1) == 0).any():
        raise GenerationError("a row of attention_mask is all padding: every prompt needs at least one real token")
    return mask.astype(np.int64)


def _stream(streamer, next_ids: np.ndarray) -> None:
    if streamer is None:
        return
    if hasattr(streamer, "put"):
        streamer.put(next_ids)
    else:
        streamer(next_ids)


class TextStreamer:
    """Streams the text of batch row 0 as it is generated, never splitting a UTF-8 character.

    callback(text) receives each new piece (default: print it to stdout at once). prompt_ids: the
    ids of text already shown before the continuation (`generate` on the CLI prints the prompt),
    so that the first new token keeps its leading space (`IncrementalDetokenizer`).
    """

    def __init__(self, tokenizer, callback=None, skip_special_tokens: bool = True, stop_ids=(), prompt_ids=()):
        from .tokenizer import IncrementalDetokenizer  # noqa: PLC0415

        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens,
                                                  context_ids=prompt_ids)  # fmt: skip
        self.callback = callback or (lambda text: print(text, end="", flush=True))
        self.stop_ids = set(stop_ids)
        self.done = False
        self.pieces: list[str] = []

    def put(self, token_ids) -> None:
        if self.done:
            return
        token = int(np.asarray(token_ids).reshape(-1)[0])
        if token in self.stop_ids:
            self.done = True
            return
        self._emit(self.detokenizer.push(token))

    def end(self) -> None:
        self._emit(self.detokenizer.flush())

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def _emit(self, piece: str) -> None:
        if piece:
            self.pieces.append(piece)
            self.callback(piece)
