"""The decode step with fixed shapes: one token per row, every array at a fixed address.

After the prompt, `generate` feeds one token per row per step. On the CPU that step is an
ordinary `model(...)` call. On the GPU the same call is 57 small kernels per layer in float16
(1845 for Phi-3-mini, counted on tests/emulated_cupy.py), and at batch 1 launching them one by
one from Python takes longer than running them. This module writes
the step so that a CUDA graph can record it once and replay it (`backend.StepReplay`):

- the step's inputs (token ids, position ids, the new token's absolute index) sit in one
  preallocated device buffer, written from the host once per step;
- rope's cos and sin are rows of a table built once, looked up by position on the device;
- the cache slot and the attention mask are computed on the device from the index, and
  attention reads every slot of the cache, masking the empty ones, so no shape depends on how
  many tokens came before (`KVCache.begin_fixed_step`);
- then the very same decoder layers, final norm and head as `Model.__call__`.

Nothing here reads a value back to the host, which is what lets the graph replay it. The
logits equal those of `model(...)` up to the order of float additions: masked slots add exact
zeros to the softmax and to the weighted sum of values.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from .attention import attention_mask
from .backend import StepReplay, copy_from_host
from .errors import GenerationError
from .model import StepContext, final_norm, lm_head
from .rope import inverse_frequencies_for, rope_cos_sin, table_dtype, use_long_factors


def fixed_decode_logits(model, cache, token_ids, positions, index, cos_table, sin_table):
    """One decode step whose shapes do not depend on the length so far.

    token_ids, positions: [batch, 1] int64 arrays on the model's backend; index: [1] int64, the
    new tokens' absolute index (cache.length); cos_table, sin_table: [table_length, rotary_dim]
    -> logits: [batch, vocab]. Writes the new keys and values into `cache`.
    """
    config, params = model.config, model.params
    slots = cache.begin_fixed_step(index)
    mask = attention_mask(index, cache.slot_index, cache.key_padding, config.sliding_window)
    step = StepContext(
        cos=cos_table[positions], sin=sin_table[positions], query_index=index,
        key_index=cache.slot_index, key_padding=cache.key_padding, cache=cache, slots=slots,
        output_attentions=False, _mask=mask,
    )  # fmt: skip
    x = params["model.embed_tokens.weight"][token_ids]
    for layer, weights in enumerate(model.layers):
        x, _ = model.decoder_layer(x, weights, config, layer, step)
    return lm_head(final_norm(x, params, config), params, config)[:, 0]


class FixedDecodeStep:
    """The buffers, rope tables and replayer of `fixed_decode_logits` for one cache.

    step = FixedDecodeStep(model, cache, table_length, max_position); logits = step(ids,
    positions, index) runs one step (host [batch] ids and positions, host int index) and
    advances the cache. table_length: positions the rope table covers (prompt + new tokens);
    max_position: the highest position of the first step, which picks LongRoPE's factors.
    capture: record a CUDA graph on the GPU (no effect on the CPU).
    """

    def __init__(self, model, cache, table_length: int, max_position: int, capture: bool = True):
        config, xp = model.config, model.xp
        if config.head_kind != "causal_lm":
            raise GenerationError(f"the decode step needs a causal LM head, this model has {config.head_kind!r}")
        self.model, self.cache = model, cache
        batch = cache.batch_size
        self.inputs = xp.zeros(2 * batch + 1, dtype=np.int64)  # ids | positions | index, one copy per step
        self.token_ids = self.inputs[:batch].reshape(batch, 1)
        self.positions = self.inputs[batch : 2 * batch].reshape(batch, 1)
        self.index = self.inputs[2 * batch :]
        self.long_rope = self._long_rope(max_position)
        inv_freq = inverse_frequencies_for(config, max_position, table_dtype(model.dtype))
        table_positions = xp.arange(table_length, dtype=np.int64)[None, :]
        cos, sin = rope_cos_sin(inv_freq, table_positions, config.attention_factor, model.dtype)
        self.cos_table, self.sin_table = cos[0], sin[0]
        self.table_length = int(table_length)
        self._layers = cache.layers  # replaced when the cache moves to new buffers (`KVCache._resize`)
        # A partial over the arrays, not the bound method `self._step`: no reference cycle, so a
        # dropped step frees its graph's memory at once instead of whenever the collector runs.
        self.replay = StepReplay(
            partial(
                fixed_decode_logits, model, cache, self.token_ids, self.positions, self.index,
                self.cos_table, self.sin_table,
            ),
            xp, capture=capture,
        )  # fmt: skip

    def _long_rope(self, max_position: int) -> bool:
        config = self.model.config
        return config.uses_longrope and use_long_factors(max_position, config.original_max_position_embeddings)

    def fits(self, cache, max_position: int) -> bool:
        """Whether this step can serve a step of `cache` whose highest position is `max_position`:
        the same cache buffers, a table that covers the position, the same LongRoPE factors."""
        return (
            cache is self.cache
            and cache.layers is self._layers
            and max_position < self.table_length
            and self._long_rope(max_position) == self.long_rope == cache.long_rope
        )

    def __call__(self, token_ids: np.ndarray, positions: np.ndarray, index: int):
        """token_ids, positions: host [batch] int64; index: the new tokens' absolute index, which
        must be cache.length. -> logits [batch, vocab] on the model's backend, valid until the next call."""
        cache = self.cache
        if index != cache.length:
            raise GenerationError(f"the decode step is for token {cache.length} of the cache, not {index}")
        if not cache.has_room_for_one():
            raise GenerationError(f"the cache is full ({cache.capacity} tokens): reserve room before decoding")
        host = np.concatenate([token_ids, positions, [index]]).astype(np.int64)
        copy_from_host(self.inputs, host)
        logits = self.replay()
        cache.end_step(1)
        return logits
