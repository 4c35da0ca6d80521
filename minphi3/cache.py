"""The KV cache: each layer's keys and values, preallocated, written in place.

Layout per layer: values `[batch, kv_heads, capacity, head_dim]`, keys stored transposed
`[batch, kv_heads, head_dim, capacity]` (see `LayerCache`); `write` hands both back in the
`[batch, kv_heads, kv_seq, head_dim]` shape attention expects. The token with absolute
index i (0 for the first token ever fed) lives in slot `i % capacity`, and `slot_index[slot]`
remembers which i that is (-1 for an empty slot). For a model without a sliding window the
capacity covers the whole text, so slot == index. For a sliding-window model the buffer rolls:
a query only ever needs the W - 1 keys before it, so `capacity = W` is enough for one new token
per step and memory stays bounded however long the text. A step that feeds T tokens at once
needs W - 1 + T slots; the buffer grows for that step and shrinks back after it.

The attention mask is built from `slot_index` (absolute indices) and `key_padding` (per slot,
from the attention mask), so the rule in `attention.attention_mask` is the same with or without
a cache.
"""

from __future__ import annotations

import numpy as np


class LayerCache:
    """Keys and values of one decoder layer.

    keys: [batch, kv_heads, head_dim, capacity] (transposed), values: [batch, kv_heads, capacity, head_dim].
    Keys are stored transposed because attention multiplies by k^T: q @ k^T then reads a matrix
    whose rows are contiguous. OpenBLAS computes a few-row product against a transposed view about
    5x slower (50 us instead of 10 us per layer at the demo model's shapes), which at one token per
    step is a sizeable part of the layer's time.
    """

    def __init__(self, keys, values):
        self.keys = keys
        self.values = values


class KVCache:
    """Preallocated keys and values for every layer, plus the bookkeeping the mask needs.

    length: how many tokens (per row, padding included) have been written.
    slot_index: [capacity] absolute index held by each slot, -1 when empty.
    key_padding: [batch, capacity] True where the slot holds a real (non-padding) token.
    """

    def __init__(self, config, batch_size: int, capacity: int, xp=np, dtype=np.float32):
        window = config.sliding_window  # None for every model without a window (all Phi models)
        self.sliding_window = window
        self.max_positions = config.max_position_embeddings  # no text is longer: growth stops here
        self.batch_size = batch_size
        self.num_layers = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.xp = xp
        self.dtype = np.dtype(dtype)
        if window is not None:
            capacity = min(capacity, window)
        self.length = 0
        self.long_rope = False  # whether the cached keys were rotated with LongRoPE's long factors
        self._run = None  # (start, stop) of this step's slots when they do not wrap around
        self._attended = 0  # how many leading slots this step's attention reads
        self._allocate(max(int(capacity), 1))

    # ---- storage ----------------------------------------------------------------------------
    def _allocate(self, capacity: int):
        keys_shape = (self.batch_size, self.kv_heads, self.head_dim, capacity)
        values_shape = (self.batch_size, self.kv_heads, capacity, self.head_dim)
        self.layers = [
            LayerCache(self.xp.zeros(keys_shape, dtype=self.dtype), self.xp.zeros(values_shape, dtype=self.dtype))
            for _ in range(self.num_layers)
        ]
        self.slot_index = self.xp.full((capacity,), -1, dtype=np.int64)
        self.key_padding = self.xp.zeros((self.batch_size, capacity), dtype=bool)

    @property
    def capacity(self) -> int:
        return int(self.slot_index.shape[0])

    @property
    def nbytes(self) -> int:
        """Memory held by the cache, in bytes (keys, values and bookkeeping)."""
        tensors = sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers)
        return int(tensors + self.slot_index.nbytes + self.key_padding.nbytes)

    def reset(self):
        """Forget everything (used when LongRoPE switches to its long factors: every cached key
        was rotated with the short ones and must be computed again)."""
        self.length = 0
        self.long_rope = False
        self.slot_index[:] = -1
        self.key_padding[:] = False

    def rewind(self, length: int) -> bool:
        """Forget every token from index `length` on, keeping the ones before it.

        -> True when done; False when the cache no longer holds every key token `length` will
        see (indices length - W + 1 .. length - 1 with a window W, all before it without one),
        in which case the cache is reset instead. Decided from `slot_index` itself, so it also
        holds after a step that stopped half-way (an exception between `begin_step` and
        `end_step` may already have overwritten a slot). A full window's buffer can always drop
        its newest token: it then holds exactly the W - 1 keys the re-fed token needs. Used by
        chat to reuse the cached conversation when a re-rendered prompt differs late, and by
        generate to re-feed a prompt's last token.
        """
        length = max(0, min(int(length), self.length))
        first_seen = 0 if self.sliding_window is None else max(0, length - self.sliding_window + 1)
        held = int(((self.slot_index >= first_seen) & (self.slot_index < length)).sum())
        if held != length - first_seen:
            self.reset()
            return False
        dropped = self.slot_index >= length
        self.slot_index[dropped] = -1
        self.key_padding[:, dropped] = False
        self.length = length
        return True

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` tokens (one move, if smaller), so that one-token steps never
        resize the cache: the fixed decode step writes slot index % capacity, which must not
        overwrite a key that is still needed. A window W needs at most W slots: slot index % W
        then holds the key W tokens back, the first one the window hides."""
        if self.sliding_window is not None:
            capacity = min(capacity, self.sliding_window)
        if capacity > self.capacity:
            self._resize(int(capacity))

    def has_room_for_one(self) -> bool:
        """Whether one more token fits without a resize: a free slot, or a full window (whose
        oldest key is hidden from the new token, so its slot can take it)."""
        return self.length < self.capacity or (
            self.sliding_window is not None and self.capacity >= self.sliding_window
        )

    def _resize(self, capacity: int):
        """Move to a buffer of another capacity, keeping the newest tokens at slot = index % capacity."""
        xp = self.xp
        old_layers, old_slot_index, old_padding = self.layers, self.slot_index, self.key_padding
        self._allocate(capacity)
        # The newest `capacity` tokens before `length`: not the slots past it that a step which
        # stopped half-way filled, which would land on the same slots as tokens still needed.
        kept = xp.nonzero((old_slot_index >= self.length - capacity) & (old_slot_index < self.length))[0]
        new_slots = old_slot_index[kept] % capacity
        self.slot_index[new_slots] = old_slot_index[kept]
        self.key_padding[:, new_slots] = old_padding[:, kept]
        for new, old in zip(self.layers, old_layers, strict=True):
            new.keys[..., new_slots] = old.keys[..., kept]
            new.values[:, :, new_slots] = old.values[:, :, kept]

    def overwrite_padding(self, padding) -> None:
        """Set the padding of every cached token from a mask over all of them.

        padding: [batch, length] bool on the cache's backend, column i for the token of absolute
        index i (True = real). Slots a window dropped or never filled keep their entry, and so do
        slots past `length` that a step which stopped half-way filled (`rewind` explains those).
        """
        xp = self.xp
        held = (self.slot_index >= 0) & (self.slot_index < padding.shape[1])
        recorded = padding[:, xp.clip(self.slot_index, 0, padding.shape[1] - 1)]  # [batch, capacity]
        self.key_padding[...] = xp.where(held[None, :], recorded, self.key_padding)

    # ---- one forward step ---------------------------------------------------------------------
    def begin_step(self, num_new: int, new_padding=None):
        """Reserve slots for `num_new` tokens and record their padding.

        new_padding: [batch, num_new] bool (True = real token) or None.
        -> slots: [num_new] slot of each new token, query_index: [num_new] their absolute indices
        """
        xp = self.xp
        needed = self.length + num_new
        if self.sliding_window is not None:
            needed = min(needed, self.sliding_window - 1 + num_new)
        if needed > self.capacity:
            # Grow geometrically, so that one-token steps move the cache O(log n) times, not once
            # per token, up to the context (max_position_embeddings); a window caps the growth at
            # W slots (a chunk of T tokens borrows W - 1 + T).
            doubled = 2 * self.capacity
            if self.capacity < self.max_positions:  # past it (direct calls may go on), double again
                doubled = min(doubled, self.max_positions)
            if self.sliding_window is not None:
                doubled = min(doubled, self.sliding_window)
            self._resize(max(needed, doubled))
        query_index = self.length + xp.arange(num_new, dtype=np.int64)
        slots = query_index % self.capacity
        # Decided here, with host integers: `write` then needs no value from the device.
        first = self.length % self.capacity
        self._run = (first, first + num_new) if first + num_new <= self.capacity else None
        self._attended = self.used_slots(num_new)
        self.slot_index[slots] = query_index
        self.key_padding[:, slots] = True if new_padding is None else new_padding
        return slots, query_index

    def begin_fixed_step(self, index):
        """Reserve the slot of one new token per row, from device values alone, and attend over
        every slot: the form of a decode step whose shapes and addresses never change, so that a
        CUDA graph can replay it (`minphi3.decode`).

        index: [1] int64 array on the cache's backend, the new token's absolute index (the
        host's `length`, kept on the device). -> slots: [1] its slot (index % capacity).
        Empty slots (slot_index -1) and slots a window hides are masked, not skipped, so the
        step attends over `capacity` keys whatever the length. The caller advances `length`
        (`end_step(1)`), since a replayed graph runs no Python.
        """
        slots = index % self.capacity
        self._run = None
        self._attended = self.capacity
        self.slot_index[slots] = index
        self.key_padding[:, slots] = True
        return slots

    def write(self, layer: int, slots, keys, values):
        """Store one layer's new keys and values. keys, values: [batch, kv_heads, num_new, head_dim].

        -> (keys, values, key_index, key_padding) to attend over: the slots in use so far.
        """
        cache = self.layers[layer]
        if slots.shape[0] > 1:
            # Many tokens (a prompt): gather each head's keys into one block first, so that the
            # transposed copy below reads within a head instead of striding across all of them.
            keys = self.xp.ascontiguousarray(keys)
        keys_t = keys.transpose(0, 1, 3, 2)  # [batch, kv_heads, head_dim, num_new], as stored
        if self._run is not None:  # no wrap-around: a plain slice
            start, stop = self._run
            cache.keys[..., start:stop] = keys_t
            cache.values[:, :, start:stop] = values
        else:
            cache.keys[..., slots] = keys_t
            cache.values[:, :, slots] = values
        used = self._attended
        keys_used = cache.keys[..., :used].transpose(0, 1, 3, 2)  # a view: [batch, kv_heads, used, head_dim]
        return keys_used, cache.values[:, :, :used], self.slot_index[:used], self.key_padding[:, :used]

    def used_slots(self, num_new: int) -> int:
        """How many leading slots hold tokens once this step's tokens are written."""
        return min(self.length + num_new, self.capacity)

    def end_step(self, num_new: int):
        """Advance past the step's tokens; give back memory a long chunk borrowed from a window."""
        self.length += num_new
        if self.sliding_window is not None and self.capacity > self.sliding_window:
            self._resize(self.sliding_window)


def cache_nbytes(config, batch_size: int, capacity: int, dtype=np.float32) -> int:
    """Bytes the keys and values of a KVCache(config, batch_size, capacity) take, before allocating it.

    2 (keys, values) x layers x batch x kv_heads x slots x head_dim x itemsize, where
    slots = min(capacity, sliding_window) as in `KVCache.__init__`.
    """
    slots = capacity if config.sliding_window is None else min(capacity, config.sliding_window)
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * np.dtype(dtype).itemsize
    return per_token * batch_size * max(int(slots), 1)


def new_cache(config, batch_size: int, capacity: int, xp=np, dtype=np.float32) -> KVCache:
    """A KV cache for `batch_size` rows and up to `capacity` tokens (a window model keeps at most W)."""
    return KVCache(config, batch_size, capacity, xp=xp, dtype=dtype)

