"""The decoder: embedding, layers, final norm and head, for Phi-3 and for the older Phi.

Reading order: `parameter_shapes` (what the checkpoint holds), the two decoder layers side by
side (`phi3_decoder_layer`: two pre-norm residual steps with RMSNorm and a gated SiLU MLP;
`phi_decoder_layer`: one LayerNorm feeding attention and a GELU MLP in parallel), the shared
`self_attention` step they both call, then `Model.__call__`, the forward pass top to bottom.

Parameters are a plain dict keyed by the checkpoint's own tensor names
(`model.layers.0.self_attn.qkv_proj.weight`), so the safetensors index can sit next to the code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .attention import (
    attention_in_query_blocks,
    attention_mask,
    grouped_query_attention,
    keys_oldest_first,
    merge_heads,
    split_heads,
    split_qkv,
)
from .backend import array_module, backend_name, compute_dtype, to_device, to_numpy
from .cache import KVCache
from .errors import GenerationError
from .mlp import gated_mlp, gelu_mlp
from .ops import layer_norm, linear, log_softmax, rms_norm
from .rope import apply_rope, inverse_frequencies_for, rope_cos_sin, table_dtype, use_long_factors

IGNORE_INDEX = -100


# ---- what the checkpoint holds ------------------------------------------------------------------
def parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint must hold, by name, with its shape ([out, in] for projections)."""
    h, inter, d = config.hidden_size, config.intermediate_size, config.head_dim
    q_width, kv_width = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        if config.is_phi3:
            shapes.update({
                p + "input_layernorm.weight": (h,),
                p + "self_attn.qkv_proj.weight": (q_width + 2 * kv_width, h),
                p + "self_attn.o_proj.weight": (h, q_width),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_up_proj.weight": (2 * inter, h),
                p + "mlp.down_proj.weight": (h, inter),
            })
        else:
            shapes.update({
                p + "input_layernorm.weight": (h,), p + "input_layernorm.bias": (h,),
                p + "self_attn.q_proj.weight": (q_width, h), p + "self_attn.q_proj.bias": (q_width,),
                p + "self_attn.k_proj.weight": (kv_width, h), p + "self_attn.k_proj.bias": (kv_width,),
                p + "self_attn.v_proj.weight": (kv_width, h), p + "self_attn.v_proj.bias": (kv_width,),
                p + "self_attn.dense.weight": (h, q_width), p + "self_attn.dense.bias": (h,),
                p + "mlp.fc1.weight": (inter, h), p + "mlp.fc1.bias": (inter,),
                p + "mlp.fc2.weight": (h, inter), p + "mlp.fc2.bias": (h,),
            })
            if config.qk_layernorm:
                for name in ("q_layernorm", "k_layernorm"):
                    shapes[p + f"self_attn.{name}.weight"] = (d,)
                    shapes[p + f"self_attn.{name}.bias"] = (d,)
    if config.is_phi3:
        shapes["model.norm.weight"] = (h,)
    else:
        shapes["model.final_layernorm.weight"] = (h,)
        shapes["model.final_layernorm.bias"] = (h,)
    shapes.update(_head_shapes(config))
    return shapes


def _head_shapes(config) -> dict[str, tuple[int, ...]]:
    h = config.hidden_size
    if config.head_kind == "sequence_classification":
        return {"score.weight": (config.num_labels, h)}
    if config.head_kind == "token_classification":
        return {"score.weight": (config.num_labels, h), "score.bias": (config.num_labels,)}
    shapes = {}
    if not config.tie_word_embeddings:  # tied: the head *is* the embedding matrix, not stored twice
        shapes["lm_head.weight"] = (config.vocab_size, h)
    if not config.is_phi3:
        shapes["lm_head.bias"] = (config.vocab_size,)  # Phi's head has a bias, tied or not
    return shapes


def layer_parameters(params: dict, index: int) -> dict:
    """One layer's tensors with the `model.layers.{index}.` prefix removed (the same arrays, no copy)."""
    prefix = f"model.layers.{index}."
    return {name[len(prefix):]: array for name, array in params.items() if name.startswith(prefix)}


# ---- the steps ----------------------------------------------------------------------------------
_NOT_BUILT = object()


@dataclass
class StepContext:
    """What every layer of one forward call shares: rope tables, mask inputs and the cache.

    cos, sin: [batch, seq, rotary_dim]; query_index: [seq]; key_index: [kv_seq] (with a cache: the
    slots in use, `cache.slot_index[:used]`); key_padding: [batch, kv_seq] bool or None; slots:
    cache slots of the new tokens (with cache); trace: a dict that `keep` fills with every layer's
    intermediate arrays, or None (the usual case: nothing is kept).
    """

    cos: Any
    sin: Any
    query_index: Any
    key_index: Any
    key_padding: Any
    cache: KVCache | None
    slots: Any
    output_attentions: bool
    trace: dict | None = None
    _mask: Any = field(default=_NOT_BUILT, repr=False)

    def keep(self, layer: int, arrays: dict) -> None:
        """Record a layer's intermediate arrays in `trace` as `layer.{layer}.{name}`
        (`Model.__call__(trace=...)`, used by the parity report). Callers test `trace is not None`
        first, so that an ordinary forward pass builds none of these dicts."""
        self.trace.update({f"layer.{layer}.{name}": array for name, array in arrays.items()})

    def mask(self, sliding_window: int | None):
        """The step's attention mask, bool [batch or 1, 1, seq, kv_seq], or None when every query
        may see every key (a decode step without padding), so attention skips the masking.

        Built on first use and shared by every layer: it depends only on indices and padding,
        which are the same in all layers, so it is not rebuilt once per layer.
        """
        if self._mask is _NOT_BUILT:
            mask = attention_mask(self.query_index, self.key_index, self.key_padding, sliding_window)
            self._mask = None if bool(mask.all()) else mask
        return self._mask


def self_attention(q, k, v, weights_out, bias_out, config, layer: int, step: StepContext):
    """The attention step both families share: rotate, cache, attend, project out.

    q: [batch, heads, seq, head_dim], k, v: [batch, kv_heads, seq, head_dim]
    -> out: [batch, seq, hidden], attention weights [batch, heads, seq, kv_seq] or None
    """
    if step.trace is not None:
        step.keep(layer, {"attn.q": q, "attn.k": k, "attn.v": v})
    q = apply_rope(q, step.cos, step.sin, config.rotary_dim)
    k = apply_rope(k, step.cos, step.sin, config.rotary_dim)
    if step.trace is not None:
        step.keep(layer, {"attn.q_rotated": q, "attn.k_rotated": k})
    key_index = None
    if step.cache is not None:
        k, v, key_index, _key_padding = step.cache.write(layer, step.slots, k, v)
    mask, scale = step.mask(config.sliding_window), config.head_dim**-0.5
    if step.output_attentions:
        out, weights = grouped_query_attention(q, k, v, mask, scale, return_weights=True)
        if key_index is not None:
            weights = keys_oldest_first(weights, key_index)
        if step.trace is not None:
            step.keep(layer, {"attn.weights": weights})
    else:
        out, weights = attention_in_query_blocks(q, k, v, mask, scale), None
    return linear(merge_heads(out), weights_out, bias_out), weights


def phi3_decoder_layer(x, w: dict, config, layer: int, step: StepContext):
    """One Phi-3 layer: two pre-norm residual steps.

    x: [batch, seq, hidden] -> ([batch, seq, hidden], attention weights or None)
    a = x + Attention(RMSNorm(x));  y = a + MLP(RMSNorm(a))
    """
    normed = rms_norm(x, w["input_layernorm.weight"], config.rms_norm_eps)
    qkv = linear(normed, w["self_attn.qkv_proj.weight"])
    q, k, v = split_qkv(qkv, config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    attended, weights = self_attention(q, k, v, w["self_attn.o_proj.weight"], None, config, layer, step)
    residual = x + attended
    post_normed = rms_norm(residual, w["post_attention_layernorm.weight"], config.rms_norm_eps)
    feed_forward = gated_mlp(post_normed, w["mlp.gate_up_proj.weight"], w["mlp.down_proj.weight"])
    if step.trace is not None:
        step.keep(layer, {"input_norm": normed, "attn.output": attended, "residual": residual,
                          "post_attention_norm": post_normed, "mlp.output": feed_forward})
    return residual + feed_forward, weights


def phi_decoder_layer(x, w: dict, config, layer: int, step: StepContext):
    """One Phi (phi-1/1.5/2) layer: one LayerNorm feeds attention and MLP in parallel.

    x: [batch, seq, hidden] -> ([batch, seq, hidden], attention weights or None)
    n = LayerNorm(x);  y = Attention(n) + MLP(n) + x
    q, k, v come from separate projections with biases; with qk_layernorm, q and k are
    layer-normed per head before the rotation.
    """
    eps = config.layer_norm_eps
    normed = layer_norm(x, w["input_layernorm.weight"], w["input_layernorm.bias"], eps)
    q = split_heads(linear(normed, w["self_attn.q_proj.weight"], w["self_attn.q_proj.bias"]), config.num_attention_heads)
    k = split_heads(linear(normed, w["self_attn.k_proj.weight"], w["self_attn.k_proj.bias"]), config.num_key_value_heads)
    v = split_heads(linear(normed, w["self_attn.v_proj.weight"], w["self_attn.v_proj.bias"]), config.num_key_value_heads)
    if config.qk_layernorm:
        q = layer_norm(q, w["self_attn.q_layernorm.weight"], w["self_attn.q_layernorm.bias"], eps)
        k = layer_norm(k, w["self_attn.k_layernorm.weight"], w["self_attn.k_layernorm.bias"], eps)
    attended, weights = self_attention(
        q, k, v, w["self_attn.dense.weight"], w["self_attn.dense.bias"], config, layer, step
    )
    feed_forward = gelu_mlp(normed, w["mlp.fc1.weight"], w["mlp.fc1.bias"], w["mlp.fc2.weight"], w["mlp.fc2.bias"])
    if step.trace is not None:
        step.keep(layer, {"input_norm": normed, "attn.output": attended, "mlp.output": feed_forward})
    return attended + feed_forward + x, weights


def final_norm(x, params: dict, config):
    """The norm after the last layer. x: [batch, seq, hidden] -> [batch, seq, hidden]"""
    if config.is_phi3:
        return rms_norm(x, params["model.norm.weight"], config.rms_norm_eps)
    return layer_norm(x, params["model.final_layernorm.weight"], params["model.final_layernorm.bias"], config.layer_norm_eps)


def lm_head(x, params: dict, config):
    """Logits over the vocabulary. x: [batch, seq, hidden] -> [batch, seq, vocab]

    A tied model (Phi-4-mini) multiplies by the embedding matrix itself; a Phi model adds
    lm_head.bias [vocab] whether tied or not.
    """
    weight = params["model.embed_tokens.weight"] if config.tie_word_embeddings else params["lm_head.weight"]
    return linear(x, weight, params.get("lm_head.bias"))


def keep_positions(x, logits_to_keep):
    """transformers' `logits_to_keep` (`slice_logits_to_keep`), applied to x: [batch, seq, ...].

    - an int n >= 0: the last n positions (0 keeps all) -> [batch, n, ...];
    - 1-D integer indices, the same for every row -> [batch, len, ...];
    - 1-D bool [seq]: the positions marked True -> [batch, count, ...];
    - 2-D integer [batch, n]: n positions per row -> [batch, n, ...];
    - 2-D bool [batch, seq]: the marked positions of all rows, flattened -> [count, ...].
    """
    if isinstance(logits_to_keep, (int, np.integer)) and not isinstance(logits_to_keep, bool):
        if logits_to_keep < 0:
            raise GenerationError(f"logits_to_keep must be >= 0, found {logits_to_keep}")
        return x if logits_to_keep == 0 else x[:, -int(logits_to_keep):]
    batch, seq = x.shape[:2]
    keep = _keep_array(logits_to_keep)
    xp = array_module(x)
    if keep.dtype == bool:
        expected = (seq,) if keep.ndim == 1 else (batch, seq)
        if keep.shape != expected:
            raise GenerationError(f"a boolean logits_to_keep must have shape {expected}, found {keep.shape}")
        return x[:, xp.asarray(keep)] if keep.ndim == 1 else x[xp.asarray(keep)]
    if keep.size and not (-seq <= keep.min() and keep.max() < seq):
        raise GenerationError(f"logits_to_keep holds positions outside [-{seq}, {seq}): {keep.min()} .. {keep.max()}")
    if keep.ndim == 1:
        return x[:, xp.asarray(keep)]
    if keep.shape[0] != batch:
        raise GenerationError(f"a 2-D logits_to_keep must have one row per batch row ({batch}), found {keep.shape[0]}")
    rows = xp.arange(batch)[:, None]
    return x[rows, xp.asarray(keep % seq)]


def _keep_array(logits_to_keep) -> np.ndarray:
    """logits_to_keep as a host integer or bool array of 1 or 2 dims, or a GenerationError."""
    message = "logits_to_keep must be an int, 1-D or 2-D integer positions, or a 1-D or 2-D boolean mask"
    try:
        keep = np.asarray(to_numpy(logits_to_keep))
    except (TypeError, ValueError):
        raise GenerationError(message) from None
    if keep.ndim not in (1, 2) or not (keep.dtype == bool or np.issubdtype(keep.dtype, np.integer)):
        raise GenerationError(f"{message}; found {keep.ndim} dimensions of {keep.dtype}")
    return keep


def host_labels(labels, shapes, integer: bool, classes: int | None = None) -> np.ndarray:
    """`labels` checked on the host before a loss reads them: one of `shapes`, integers when
    `integer` (each -100, ignored, or a class in [0, classes)), else real numbers.

    Broadcasting or NumPy's negative indexing would otherwise turn a wrong shape or a label of
    -5 into a silent loss. -> a host NumPy copy; GenerationError names what is wrong.
    """
    host = np.asarray(labels) if isinstance(labels, (list, tuple)) else to_numpy(labels)
    expected = " or ".join(str(list(shape)) for shape in shapes)
    if host.shape not in [tuple(shape) for shape in shapes]:
        raise GenerationError(f"labels must have shape {expected}, found {list(host.shape)}")
    if integer:
        if host.dtype.kind not in "iu":
            raise GenerationError(f"labels must be integers (class ids, -100 to ignore), found dtype {host.dtype}")
        wrong = (host != IGNORE_INDEX) & ((host < 0) | (host >= classes))
        if wrong.any():
            raise GenerationError(f"labels must be -100 (ignored) or in [0, {classes}), found {host[wrong].flat[0]}")
    elif host.dtype.kind not in "iuf" or not np.isfinite(host).all():
        raise GenerationError(f"labels must be finite real numbers, found dtype {host.dtype}")
    return host


def causal_lm_loss(logits, labels):
    """Mean next-token cross-entropy: position t predicts labels[t + 1]; label -100 is ignored.

    logits: [batch, seq, vocab], labels: [batch, seq] (unshifted, as transformers takes them) -> scalar
    """
    xp = array_module(logits)
    return cross_entropy(logits[:, :-1], xp.asarray(labels)[:, 1:])


def cross_entropy(logits, targets):
    """Mean of -log softmax(logits)[target] over targets that are not -100; in at least float32.

    logits: [..., classes], targets: [...] integers -> scalar
    """
    xp = array_module(logits)
    log_probs = log_softmax(logits)
    counted = targets != IGNORE_INDEX
    safe_targets = xp.where(counted, targets, 0)
    picked = xp.take_along_axis(log_probs, safe_targets[..., None].astype(np.int64), axis=-1)[..., 0]
    count = counted.sum()
    if int(count) == 0:
        return xp.asarray(np.nan, dtype=log_probs.dtype)  # a mean over no tokens, as in transformers
    return -(picked * counted).sum() / count


def last_non_pad_index(input_ids, pad_token_id):
    """Per row, the rightmost position whose token is not the pad token (transformers' pooling rule).

    input_ids: [batch, seq] -> [batch]. Rows made only of pad tokens pool position 0.
    """
    if pad_token_id is None:
        return np.full(input_ids.shape[0], input_ids.shape[1] - 1)
    positions = np.arange(input_ids.shape[1])
    return np.argmax(positions * (input_ids != pad_token_id), axis=-1)


def sequence_classification_loss(pooled, labels, config):
    """transformers' rule: 1 label -> mean squared error; integer labels -> cross-entropy;
    otherwise (multi-hot floats) -> binary cross-entropy with logits. pooled: [batch, num_labels]"""
    xp = array_module(pooled)
    batch, classes = pooled.shape
    host = np.asarray(labels) if isinstance(labels, (list, tuple)) else to_numpy(labels)
    wide = pooled.astype(compute_dtype(pooled.dtype), copy=False)
    problem = config.problem_type
    if problem is None:
        if config.num_labels == 1:
            problem = "regression"
        elif host.dtype.kind in "iu":
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        shapes = [(batch,), (batch, 1)] if classes == 1 else [(batch, classes)]
        labels = xp.asarray(host_labels(host, shapes, integer=False))
    elif problem == "single_label_classification":
        labels = xp.asarray(host_labels(host, [(batch,), (batch, 1)], integer=True, classes=classes))
    else:
        labels = xp.asarray(host_labels(host, [(batch, classes)], integer=False))
    if problem == "regression":
        return xp.mean((wide.reshape(labels.shape) - labels.astype(wide.dtype)) ** 2)
    if problem == "single_label_classification":
        return cross_entropy(wide, labels.reshape(-1))
    labels = labels.astype(wide.dtype)
    # log(1 + exp(-|x|)) form keeps BCE finite for large logits.
    losses = xp.maximum(wide, 0) - wide * labels + xp.log1p(xp.exp(-xp.abs(wide)))
    return xp.mean(losses)


DECODER_LAYERS = {"phi3": phi3_decoder_layer, "phi": phi_decoder_layer}


# ---- the model ---------------------------------------------------------------------------------
@dataclass
class ModelOutput:
    """What a forward call returns, laid out as transformers lays it out.

    logits: [batch, kept, vocab] (causal LM), [batch, num_labels] (sequence classification) or
    [batch, seq, num_labels] (token classification). hidden_states: num_layers + 1 arrays
    [batch, seq, hidden]: the embeddings, the output of every layer but the last, and the final
    normed state. attentions: one [batch, heads, seq, kv_seq] per layer. loss: a scalar or None.
    """

    logits: Any
    loss: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    cache: KVCache | None = None
    layer_outputs: tuple | None = None  # every layer's raw output (the last one before the final norm)


class Model:
    """A loaded checkpoint: config, parameters and the backend they live on. Call it to run it.

    model.config: ModelConfig; model.params: {checkpoint tensor name: array}; model.xp: numpy or
    cupy; model.dtype: the compute dtype.
    """

    def __init__(self, config, params: dict, xp=np, dtype=np.float32):
        self.config = config
        self.params = params
        self.xp = xp
        self.dtype = np.dtype(dtype)
        self.layers = [layer_parameters(params, i) for i in range(config.num_hidden_layers)]
        self.decoder_layer = DECODER_LAYERS[config.model_type]
        # Filled in by `minphi3.load`: the generation defaults (generation_config.json alone when
        # the checkpoint has one, else built from config.json, as transformers does), the folder
        # or file it came from, and one past the highest id the tokenizer can produce.
        self.generation_config: dict = {}
        self.source = None
        self.tokenizer_size: int | None = None

    @property
    def backend(self) -> str:
        return backend_name(self.xp)

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        """An empty KV cache for `batch_size` rows and up to `capacity` tokens, on this model's backend."""
        return KVCache(self.config, batch_size, capacity, xp=self.xp, dtype=self.dtype)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        labels=None,
        logits_to_keep=0,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        cache: KVCache | None = None,
        trace: dict | None = None,
    ) -> ModelOutput:
        """Run the model.

        input_ids: [batch, seq] integers (nested lists accepted); attention_mask: [batch, seq] (or
        [batch, cached + seq] with a cache), 1 for real tokens, 0 for padding. With a cache, the
        [batch, cached + seq] form (transformers') decides for every key, the cached ones too; the
        [batch, seq] form covers the new tokens only, and the cached keys keep the padding of the
        calls that fed them (transformers would read it from key 0). position_ids: [batch, seq]
        integers, negative ones too (default: cached + arange(seq)); labels: [batch, seq] unshifted, -100 ignored;
        cache: a KVCache from `new_cache`, read and extended in place; trace: a dict to fill with
        the rope tables (`rope.cos`, `rope.sin`) and every layer's intermediate arrays
        (`layer.N.attn.q`, ...: the names are listed in minphi3/parity.py). `layer.N.attn.weights`
        only with output_attentions=True (otherwise attention runs in query blocks and never holds
        them whole); with a cache its key axis is the cached tokens plus the new ones,
        [batch, heads, seq, cached + seq], oldest first.
        """
        config, xp = self.config, self.xp
        ids = check_token_ids(input_ids, config.vocab_size)
        batch, seq = ids.shape
        self._check_head_inputs(ids, labels, logits_to_keep)
        past = cache.length if cache is not None else 0
        positions = _positions(position_ids, batch, seq, past)
        padding = _padding(attention_mask, batch, seq, past)
        step = self._step_context(positions, padding, cache, batch, seq, output_attentions)
        if trace is not None:
            step.trace = trace
            trace.update({"rope.cos": step.cos, "rope.sin": step.sin})

        x = self.params["model.embed_tokens.weight"][to_device(ids, xp)]
        hidden_states = [x] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for index, weights in enumerate(self.layers):
            x, attention = self.decoder_layer(x, weights, config, index, step)
            if output_hidden_states:
                hidden_states.append(x)
            if output_attentions:
                attentions.append(attention)
        if cache is not None:
            cache.end_step(seq)
        x = final_norm(x, self.params, config)
        layer_outputs = None
        if output_hidden_states:
            layer_outputs = tuple(hidden_states[1:])
            hidden_states[-1] = x  # transformers reports the final *normed* state last
        out = self._head(x, ids, labels, logits_to_keep, hidden_states, attentions, cache)
        out.layer_outputs = layer_outputs
        return out

    def step_context(self, seq: int, batch: int = 1, output_attentions: bool = False) -> StepContext:
        """The StepContext of a plain call over `seq` tokens (positions 0..seq-1, no padding, no
        cache), built as `__call__` builds it: for running the decoder layers one at a time."""
        return self._step_context(_positions(None, batch, seq, 0), None, None, batch, seq, output_attentions)

    def _step_context(self, positions, padding, cache, batch, seq, output_attentions) -> StepContext:
        config, xp = self.config, self.xp
        max_position = int(positions.max()) if positions.size else 0
        if cache is not None and config.uses_longrope and cache.length > 0:
            if use_long_factors(max_position, config.original_max_position_embeddings) != cache.long_rope:
                raise GenerationError(
                    "this call crosses LongRoPE's switch at original_max_position_embeddings="
                    f"{config.original_max_position_embeddings}: the cached keys were rotated with the other "
                    "factors; reset the cache and feed the whole sequence again (minphi3.generate does this)"
                )
        if cache is not None:
            if cache.batch_size != batch:
                raise GenerationError(f"the cache holds {cache.batch_size} rows but input_ids has {batch}")
            self.check_cache_fits(cache)
            cache.long_rope = config.uses_longrope and use_long_factors(max_position, config.original_max_position_embeddings)
        inv_freq = inverse_frequencies_for(config, max_position, table_dtype(self.dtype))
        cos, sin = rope_cos_sin(inv_freq, to_device(positions, xp), config.attention_factor, self.dtype)
        new_padding = None if padding is None else to_device(padding[:, -seq:], xp)
        if cache is not None:
            if padding is not None and cache.length > 0 and padding.shape[1] == cache.length + seq:
                # A mask over every token: its past columns decide which cached keys are padding,
                # as in transformers, even where they differ from the masks of earlier calls.
                cache.overwrite_padding(to_device(padding[:, :-seq], xp))
            slots, query_index = cache.begin_step(seq, new_padding)
            used = cache.used_slots(seq)
            key_index, key_padding = cache.slot_index[:used], cache.key_padding[:, :used]
            return StepContext(cos, sin, query_index, key_index, key_padding, cache, slots, output_attentions)
        index = xp.arange(seq, dtype=np.int64)
        return StepContext(cos, sin, index, index, new_padding, None, None, output_attentions)

    def check_cache_fits(self, cache: KVCache) -> None:
        """A cache made by another model (other layers, heads or window) or at another dtype is
        refused: it would fail deep in a write, or silently change the precision."""
        config = self.config
        pairs = {
            "layers": (cache.num_layers, config.num_hidden_layers),
            "kv heads": (cache.kv_heads, config.num_key_value_heads),
            "head_dim": (cache.head_dim, config.head_dim),
            "sliding window": (cache.sliding_window, config.sliding_window),
            "dtype": (cache.dtype, self.dtype),
        }
        differ = [f"{name} {theirs}, not {ours}" for name, (theirs, ours) in pairs.items() if theirs != ours]
        if differ:
            raise GenerationError(f"the cache was made for another model: {'; '.join(differ)}; make it with model.new_cache")

    def _check_head_inputs(self, ids, labels, logits_to_keep) -> None:
        """The head's checks of labels and logits_to_keep, run on empty host stand-ins before the
        layers write the cache: a call they refuse leaves the cache as it was, ready for a retry."""
        config = self.config
        batch, seq = ids.shape
        if config.head_kind == "causal_lm":
            kept = keep_positions(np.empty((batch, seq, 0), np.float32), logits_to_keep)
            if labels is not None:
                self._causal_labels(labels, ids, kept.shape[:2])
        elif config.head_kind == "token_classification" and labels is not None:
            host_labels(labels, [ids.shape], integer=True, classes=config.num_labels)
        elif config.head_kind == "sequence_classification":
            if config.pad_token_id is None and batch != 1:
                raise GenerationError("sequence classification of a batch needs pad_token_id in config.json")
            if labels is not None:
                sequence_classification_loss(np.zeros((batch, config.num_labels), np.float32), labels, config)

    def _causal_labels(self, labels, ids, kept_shape) -> np.ndarray:
        """Causal-LM labels checked on the host: [batch, seq] ([seq] for one row, as transformers)."""
        if tuple(kept_shape) != ids.shape:
            raise GenerationError(
                f"labels need the logits of every position: logits_to_keep kept {tuple(kept_shape)} "
                f"of input_ids {ids.shape} (give logits_to_keep=0)"
            )
        shapes = [ids.shape, ids.shape[1:]] if ids.shape[0] == 1 else [ids.shape]
        return host_labels(labels, shapes, integer=True, classes=self.config.vocab_size).reshape(ids.shape)

    def _head(self, x, ids, labels, logits_to_keep, hidden_states, attentions, cache) -> ModelOutput:
        config, xp = self.config, self.xp
        loss = None
        if config.head_kind == "sequence_classification":
            scores = linear(x, self.params["score.weight"])  # pad_token_id checked in _check_head_inputs
            rows = xp.arange(ids.shape[0])
            logits = scores[rows, to_device(last_non_pad_index(ids, config.pad_token_id), xp)]
            if labels is not None:
                loss = sequence_classification_loss(logits, labels, config)
        elif config.head_kind == "token_classification":
            logits = linear(x, self.params["score.weight"], self.params["score.bias"])
            if labels is not None:
                checked = host_labels(labels, [ids.shape], integer=True, classes=config.num_labels)
                loss = cross_entropy(logits, xp.asarray(checked))
        else:
            logits = lm_head(keep_positions(x, logits_to_keep), self.params, config)
            if labels is not None:
                loss = causal_lm_loss(logits, self._causal_labels(labels, ids, logits.shape[:2]))
        return ModelOutput(
            logits=logits,
            loss=loss,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            attentions=tuple(attentions) if attentions is not None else None,
            cache=cache,
        )


# ---- input checks -------------------------------------------------------------------------------
def check_token_ids(input_ids, vocab_size: int) -> np.ndarray:
    """input_ids as a host int64 array [batch, seq], every id in [0, vocab_size)."""
    try:
        ids = np.asarray(to_numpy(input_ids))
    except (ValueError, TypeError) as exc:
        raise GenerationError(f"input_ids must be a [batch, seq] array of integers ({exc})") from None
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2:
        raise GenerationError(f"input_ids must be [batch, seq]; found {ids.ndim} dimensions")
    if ids.size == 0:
        raise GenerationError("input_ids is empty: give at least one token")
    if not np.issubdtype(ids.dtype, np.integer):
        raise GenerationError(f"input_ids must hold integers, found {ids.dtype}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise GenerationError(f"token id {bad} is out of range: the model has vocab_size {vocab_size} (ids 0..{vocab_size - 1})")
    return ids.astype(np.int64, copy=False)


def _positions(position_ids, batch: int, seq: int, past: int) -> np.ndarray:
    if position_ids is None:
        return np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq))
    positions = np.asarray(to_numpy(position_ids))
    if positions.ndim == 1:
        positions = positions[None, :]
    if positions.shape[-1] != seq or positions.shape[0] not in (1, batch) or not np.issubdtype(positions.dtype, np.integer):
        raise GenerationError(f"position_ids must be integers of shape [batch, {seq}], found {positions.dtype} {list(positions.shape)}")
    return np.broadcast_to(positions.astype(np.int64), (batch, seq))


def _padding(attention_mask, batch: int, seq: int, past: int) -> np.ndarray | None:
    """The attention mask as bool [batch, past + seq] (or [batch, seq]); None when absent."""
    if attention_mask is None:
        return None
    mask = np.asarray(to_numpy(attention_mask))
    if mask.ndim != 2 or mask.shape[0] != batch or mask.shape[1] not in (seq, past + seq):
        raise GenerationError(
            f"attention_mask must be [batch, seq] = [{batch}, {seq}] (or [{batch}, {past + seq}] with a cache), "
            f"found {list(mask.shape)}"
        )
    return mask.astype(bool)
