"""Tiny random checkpoints written by transformers itself, the oracle every parity test runs against.

Weights are redrawn from N(0, 0.3) (transformers' init is too flat to make sharp logits), saved
with `save_pretrained` (safetensors), and the torch model is returned loaded back in float32 (or
float64) with eager attention: transformers 5 otherwise keeps the stored dtype and uses sdpa.
"""

from __future__ import annotations

import numpy as np

TINY_PHI3 = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    original_max_position_embeddings=64,
    rms_norm_eps=1e-5,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

TINY_PHI = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    layer_norm_eps=1e-5,
    partial_rotary_factor=0.5,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def longrope_scaling(rotary_dim: int, seed: int = 0, **extra) -> dict:
    """A LongRoPE `rope_scaling` dict with distinct short and long factor lists."""
    rng = np.random.default_rng(seed)
    half = rotary_dim // 2
    return {
        "type": "longrope",
        "short_factor": [float(x) for x in 1.0 + rng.random(half)],
        "long_factor": [float(x) for x in 1.0 + 8 * np.sort(rng.random(half))],
        **extra,
    }


def randomize(model, seed: int = 0, std: float = 0.3):
    """Redraw every parameter from N(0, std) (norm gains around 1) so that logits are sharp."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * std
            if "norm" in name and name.endswith("weight"):
                noise = 1.0 + noise
            parameter.copy_(noise.to(parameter.dtype))
    return model


def save_tiny(folder, architecture: str = "Phi3ForCausalLM", seed: int = 0, storage_dtype="float32",
              max_shard_size=None, **config_overrides):
    """Write a tiny random checkpoint with transformers; -> the folder.

    architecture: a transformers class name (Phi3ForCausalLM, Phi3ForSequenceClassification,
    Phi3ForTokenClassification, PhiForCausalLM, ...). storage_dtype: float32 | bfloat16 | float16.
    """
    import torch
    import transformers

    is_phi = architecture.startswith("Phi") and not architecture.startswith("Phi3")
    config_class = transformers.PhiConfig if is_phi else transformers.Phi3Config
    settings = dict(TINY_PHI if is_phi else TINY_PHI3)
    settings.update(config_overrides)
    config = config_class(**settings)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config)
    randomize(model, seed)
    model = model.to(getattr(torch, storage_dtype))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kwargs)
    return folder


def load_oracle(folder, architecture: str = "Phi3ForCausalLM", dtype: str = "float32"):
    """The transformers model for a folder, in float32/float64 with eager attention, eval mode."""
    import torch
    import transformers

    model = getattr(transformers, architecture).from_pretrained(
        folder, dtype=getattr(torch, dtype), attn_implementation="eager"
    )
    return model.eval()


def oracle_forward(model, input_ids, **kwargs):
    """Run the transformers model without gradients; arrays in, torch output out."""
    import torch

    tensors = {k: (torch.as_tensor(np.asarray(v)) if v is not None and not isinstance(v, (bool, int)) else v)
               for k, v in kwargs.items()}
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(input_ids)), **tensors)


def left_padded_batch(seq: int = 12, pads=(0, 4, 9), seed: int = 5, pad_id: int = 0):
    """A batch of random prompts where row b has pads[b] left-padding tokens (id pad_id).
    -> ids, attention_mask: [len(pads), seq]"""
    ids = random_ids(len(pads), seq, seed=seed)
    mask = (np.arange(seq)[None, :] >= np.asarray(pads)[:, None]).astype(ids.dtype)
    ids[mask == 0] = pad_id
    return ids, mask


def random_ids(batch: int, seq: int, vocab: int = 96, seed: int = 0, low: int = 3) -> np.ndarray:
    """Token ids avoiding the special ids 0..low-1 (pad, bos, eos)."""
    return np.random.default_rng(seed).integers(low, vocab, size=(batch, seq))


FLOAT64_TOLERANCE = 1e-9  # absolute: float64 against torch float64 with its float32 steps lifted


def assert_logits_close(ours, theirs, dtype: str = "float32"):
    """The project's tolerance (issue 2): float32 max |delta| <= 1e-4 * max(1, max |logits|);
    float64 max |delta| <= 1e-9 absolute, not scaled by the logits (measured: about 1e-13)."""
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', found {dtype!r}")
    ours = np.asarray(ours, dtype=np.float64)
    theirs = np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    if dtype == "float32":
        tolerance = 1e-4 * max(1.0, float(np.abs(theirs).max()))
    else:
        tolerance = FLOAT64_TOLERANCE
    difference = float(np.abs(ours - theirs).max())
    assert difference <= tolerance, f"max |delta| = {difference:.3e} > {tolerance:.1e}"
    return difference


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "Café, naïve, résumé, 東京, 🙂 — unicode text.",
] * 20


def save_tiny_tokenizer(folder, vocab_size: int = 300):
    """A GPT-2-style byte-level BPE with ChatML special tokens, trained here, saved as
    tokenizer.json + tokenizer_config.json + generation_config.json; -> the folder.

    Ids: the 256 bytes first, merges up to vocab_size - 3, then <|endoftext|>, <|im_start|>,
    <|im_end|> (so a model needs vocab_size >= this vocab_size).
    """
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    tokenizer.add_special_tokens(specials)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    end_id = tokenizer.token_to_id("<|im_end|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [end_id]}))
    return folder


def spy_on_attention_blocks(monkeypatch) -> list:
    """Record each call of `minphi3.attention.grouped_query_attention` as (queries, keys) it got:
    how `attention_in_query_blocks` cut a prefill. -> the list the calls are appended to (undo
    with monkeypatch.undo())."""
    import minphi3.attention  # noqa: PLC0415

    calls = []
    original = minphi3.attention.grouped_query_attention

    def spy(q, k, v, mask, scale, return_weights=False):
        calls.append((q.shape[2], k.shape[2]))
        return original(q, k, v, mask, scale, return_weights)

    monkeypatch.setattr(minphi3.attention, "grouped_query_attention", spy)
    return calls


def matmul_layouts(rng, xp=np, dtype="float64"):
    """(name, a, b) for the products minphi3 makes (linear with W.T, q k^T against the transposed
    key cache, weights @ values, prefill and decode shapes) and awkward views besides, as views
    of arrays of module `xp` (the views are taken there, so a GPU test gets the same layouts)."""
    def normal(*shape):
        return xp.asarray(rng.normal(size=shape).astype(dtype))

    x, weight = normal(2, 5, 8), normal(12, 8)
    yield "linear", x, weight.T
    yield "linear decode", x[:, -1:], weight.T
    keys = normal(2, 3, 4, 10)  # [batch, kv_heads, head_dim, capacity], as the cache stores them
    q = normal(2, 3, 6, 4)
    yield "q k^T, used slots", q, keys[..., :7]
    yield "q k^T, whole cache", q[:, :, :1], keys
    values, weights = normal(2, 3, 10, 4), normal(2, 3, 6, 7)
    yield "weights v", weights, values[:, :, :7]
    yield "transposed both", normal(3, 6, 5).transpose(0, 2, 1), normal(3, 4, 6).transpose(0, 2, 1)
    yield "strided rows", normal(4, 9)[::2], normal(9, 6)
    yield "strided columns", normal(4, 18)[:, ::2], normal(9, 6)
    yield "broadcast batch", normal(1, 4, 3), normal(5, 3, 2)
    yield "permuted batch", normal(3, 2, 4, 5).transpose(1, 0, 2, 3), normal(2, 3, 5, 6)
    yield "one row", normal(1, 6), normal(6, 1)
