"""Tokenizer, chat template and streaming parity with transformers 5.23's AutoTokenizer.

Tokenizers are built here, with the `tokenizers` library, and trained on a small generated corpus
(no network, no downloaded files):

- "phi3": a Phi-3-style SentencePiece-like BPE (byte fallback, the `<0xXX>` byte tokens, the
  Prepend/Replace normalizer and Replace/ByteFallback/Fuse/Strip decoder of Phi-3's tokenizer.json,
  a post-processor adding `<s>`, and Phi-3's added tokens with their rstrip flags), the Phi-3-mini
  chat template, and a config.json with model_type "phi3", as a real checkpoint folder has.
- "llama-class": the same files without config.json. tokenizer_config.json names LlamaTokenizer, so
  transformers rebuilds the pipeline (Metaspace pre-tokenizer) instead of reading tokenizer.json.
- "chatml": a GPT-2/CodeGen-style byte-level BPE with `<|endoftext|>` (phi-2, SmolLM2) and
  SmolLM2's ChatML template, saved as chat_template.jinja the way transformers 5 saves it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RustTokenizer
from transformers import AutoTokenizer

import minphi3.tokenizer
from minphi3.errors import TokenizerError
from minphi3.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer, panic_output_hidden

PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TEXTS = [
    "Hello world",
    " leading space and  double  spaces",
    "\ttabs\tand\nnewlines\n\n\nend  ",
    "def f(x):\n    return x ** 2  # square\n",
    "12345 + 67.89 = 3.14159; 007",
    "café naïve résumé über straße Ærøskøbing",
    "東京 日本語 中文的是 한국어",
    "emoji 🙂🚀👍🏽 and a family 👨\u200d👩\u200d👧",
    "<|user|>\nHi there<|end|>\n<|assistant|>\nHello<|end|>",
    "text<|endoftext|>more",
    "<s> literal bos</s>",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
    "   ",
    "\u00a0nbsp and \u200b zero width",
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi! 東京 🙂"},
    {"role": "assistant", "content": " Hello, how can I help?"},
    {"role": "user", "content": "code:\n  x = 1\t# ok"},
]


# ------------------------------------------------------------------------------------------------
# Building the tokenizers
# ------------------------------------------------------------------------------------------------


def _corpus() -> list[str]:
    """A few hundred deterministic lines of words, code, digits, accents and a little CJK."""
    rng = random.Random(0)
    words = (
        "the quick brown fox jumps over lazy dog model token cache attention layer weight numpy "
        "array value return print import def class self data hello world café naïve résumé über "
        "straße 東京 日本語 中文 的 是 price 123 4567 89 x y z i j k"
    ).split()
    lines = []
    for i in range(400):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
        if i % 5 == 0:
            line = f"def f{i}(x):\n    return x * {i} + {rng.randint(0, 999)}"
        if i % 7 == 0:
            line = line.capitalize() + "."
        lines.append(line)
    return lines


def _build_phi3_tokenizer() -> RustTokenizer:
    """Phi-3's tokenizer.json layout on a small trained vocabulary.

    Training uses a Metaspace pre-tokenizer so that merges never cross a word boundary (as in
    SentencePiece); the saved file then gets Phi-3's own normalizer and decoder. Ids 0-2 are
    <unk> <s> </s>, 3-258 the byte tokens, then the trained pieces, then the added tokens.
    """
    trainer_tok = RustTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    # limit_alphabet keeps CJK and emoji out of the vocabulary, so they need byte fallback.
    trainer = trainers.BpeTrainer(vocab_size=600, limit_alphabet=60, show_progress=False)
    trainer_tok.train_from_iterator(_corpus(), trainer)
    data = json.loads(trainer_tok.to_str())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for token, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    data["model"].update(vocab=vocab, byte_fallback=True, fuse_unk=True, unk_token="<unk>")
    data["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    data["pre_tokenizer"] = None
    data["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    tok = RustTokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    # Phi-3 marks the chat tokens rstrip (they swallow the "\n" after them); <|endoftext|> is not.
    for token, rstrip in (
        ("<|endoftext|>", False),
        ("<|assistant|>", True),
        ("<|system|>", True),
        ("<|end|>", True),
        ("<|user|>", True),
    ):
        tok.add_special_tokens([AddedToken(token, special=True, normalized=False, rstrip=rstrip)])
    return tok


def _build_chatml_tokenizer() -> RustTokenizer:
    """A byte-level BPE like GPT-2/CodeGen (phi-2) and SmolLM2, with the ChatML tokens."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    return tok


def _write_json(path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _write_phi3_folder(folder, with_model_config: bool) -> None:
    folder.mkdir()
    tok = _build_phi3_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "unk_token": "<unk>",
            "chat_template": PHI3_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "legacy": False,
            "model_max_length": 4096,
            "padding_side": "left",
            "tokenizer_class": "LlamaTokenizer",
        },
    )
    # Like Phi-3-instruct's [32000, 32001, 32007]: <|endoftext|>, <|assistant|>, <|end|>.
    stops = [tok.token_to_id(t) for t in ("<|endoftext|>", "<|assistant|>", "<|end|>")]
    _write_json(folder / "generation_config.json", {"eos_token_id": stops})
    if with_model_config:
        _write_json(folder / "config.json", {"model_type": "phi3", "eos_token_id": stops[0]})


def _write_chatml_folder(folder) -> None:
    folder.mkdir()
    _build_chatml_tokenizer().save(str(folder / "tokenizer.json"))
    _write_json(
        folder / "tokenizer_config.json",
        {
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|im_end|>",
            "unk_token": "<|endoftext|>",
            "clean_up_tokenization_spaces": False,
            "model_max_length": 8192,
            "tokenizer_class": "GPT2Tokenizer",
        },
    )
    (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE, encoding="utf-8")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{name: folder} of the three tokenizer folders described in the module docstring."""
    root = tmp_path_factory.mktemp("tokenizers")
    _write_phi3_folder(root / "phi3", with_model_config=True)
    _write_phi3_folder(root / "llama-class", with_model_config=False)
    _write_chatml_folder(root / "chatml")
    return {name: root / name for name in ("phi3", "llama-class", "chatml")}


@pytest.fixture(scope="module")
def pairs(folders):
    """{name: (minphi3 Tokenizer, transformers tokenizer)}, each loaded once."""
    return {
        name: (load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))) for name, folder in folders.items()
    }


NAMES = ("phi3", "llama-class", "chatml")


def _backend_json(rust_tokenizer) -> dict:
    """The serialized pipeline, without the padding/truncation settings that encode switches off."""
    data = json.loads(rust_tokenizer.to_str())
    data.pop("padding", None)
    data.pop("truncation", None)
    return data


# ------------------------------------------------------------------------------------------------
# Encode / decode parity
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_transformers_loads_the_expected_class(pairs, name):
    """The fixtures cover both of transformers' paths: the file as is, and a rebuilt pipeline."""
    expected = {"phi3": "TokenizersBackend", "llama-class": "LlamaTokenizer", "chatml": "GPT2Tokenizer"}
    assert type(pairs[name][1]).__name__ == expected[name]


@pytest.mark.parametrize("name", NAMES)
def test_pipeline_equals_transformers(pairs, name):
    """Normalizer, pre-tokenizer, model, decoder, post-processor and added tokens (with their
    flags) are exactly those of transformers' backend."""
    ours, theirs = pairs[name]
    assert _backend_json(ours.backend) == _backend_json(theirs.backend_tokenizer)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_equals_transformers(pairs, name, add_special_tokens):
    ours, theirs = pairs[name]
    for text in TEXTS:
        expected = theirs(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, text
        if add_special_tokens:
            assert ours.encode(text) == theirs.encode(text), text


def test_llama_class_rebuild_changes_ids(pairs):
    """Without config.json, transformers' LlamaTokenizer puts no "▁" after a special token, unlike
    Phi-3's own tokenizer.json: minphi3 follows each path (this guards the emulation)."""
    text = "<|user|>\nHi there<|end|>\n"
    assert pairs["phi3"][0].encode(text) != pairs["llama-class"][0].encode(text)


def test_bos_comes_from_the_post_processor(pairs):
    """add_bos_token: false in tokenizer_config.json does not stop tokenizer.json's post-processor:
    transformers 5 ignores add_bos_token/add_eos_token when tokenizer.json exists."""
    ours, theirs = pairs["phi3"]
    assert ours.encode("Hi")[0] == theirs("Hi")["input_ids"][0] == ours.bos_token_id == 1
    assert ours.bos_token_id not in ours.encode("Hi", add_special_tokens=False)
    assert ours.encode("Hi", add_special_tokens=False)[0] != 1
    assert pairs["chatml"][0].encode("Hi") == pairs["chatml"][1]("Hi")["input_ids"]  # no BOS there


def test_byte_fallback_is_exercised(pairs):
    """Hangul, rare CJK and emoji go through `<0xXX>` tokens, so streaming tests split characters."""
    ours = pairs["phi3"][0]
    for text in ("한국어 字", "emoji 🚀"):
        tokens = [ours.id_to_token(i) for i in ours.encode(text)]
        assert any(t.startswith("<0x") for t in tokens), tokens


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("skip", [True, False])
def test_decode_equals_transformers(pairs, name, skip):
    ours, theirs = pairs[name]
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text
    every_id = list(range(len(theirs)))
    assert ours.decode(every_id, skip_special_tokens=skip) == theirs.decode(every_id, skip_special_tokens=skip)


@pytest.mark.parametrize("name", NAMES)
def test_special_tokens_equal_transformers(pairs, name):
    ours, theirs = pairs[name]
    assert ours.special_tokens_map == theirs.special_tokens_map
    for attr in ("bos_token", "eos_token", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert len(ours) == ours.vocab_size == len(theirs)
    assert set(theirs.all_special_ids) <= ours.special_token_ids
    assert ours.token_to_id("<|endoftext|>") == theirs.convert_tokens_to_ids("<|endoftext|>")
    assert ours.id_to_token(5) == theirs.convert_ids_to_tokens(5)
    assert ours.token_to_id("no such token") is None and ours.id_to_token(10**6) is None


def test_phi3_token_table(pairs):
    """The Phi-3 fixture's added tokens sit after the trained pieces, in Phi-3's order."""
    ours = pairs["phi3"][0]
    base = ours.token_to_id("<|endoftext|>")
    assert [ours.token_to_id(t) for t in ("<|assistant|>", "<|system|>", "<|end|>", "<|user|>")] == [
        base + 1,
        base + 2,
        base + 3,
        base + 4,
    ]
    assert len(ours) == base + 5
    assert {base, base + 1, base + 3, base + 4} <= ours.special_token_ids


# ------------------------------------------------------------------------------------------------
# Variants of the config files
# ------------------------------------------------------------------------------------------------


def _variant(tmp_path, folders, base, config=None, files=None, model_config=None, spec=None):
    """Copy a fixture folder and edit it: tokenizer_config.json keys (None deletes one), top-level
    tokenizer.json keys, extra JSON files, config.json."""
    folder = tmp_path / "variant"
    shutil.copytree(folders[base], folder)
    for name, update in (("tokenizer_config.json", config), ("tokenizer.json", spec)):
        data = json.loads((folder / name).read_text(encoding="utf-8"))
        for key, value in (update or {}).items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        _write_json(folder / name, data)
    for name, data in (files or {}).items():
        _write_json(folder / name, data)
    if model_config is not None:
        _write_json(folder / "config.json", model_config)
    return folder


_PHI3_FLAGS_OFF = {
    str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    for i, t in ((0, "<unk>"), (1, "<s>"), (2, "</s>"))
}

VARIANTS = {
    # A named token outside the vocabulary gets a new id; extra special tokens are added too.
    "new-special-tokens": dict(
        base="chatml", config={"mask_token": "<mask>", "additional_special_tokens": ["<|extra|>"]}
    ),
    # legacy: true makes LlamaTokenizer prepend "▁" to every segment again.
    "llama-legacy": dict(base="llama-class", config={"legacy": True}),
    "llama-no-prefix-space": dict(base="llama-class", config={"add_prefix_space": False}),
    # Older checkpoints: special tokens in special_tokens_map.json, as AddedToken dicts.
    "special-tokens-map": dict(
        base="phi3",
        config={"bos_token": None, "eos_token": None},
        files={
            "special_tokens_map.json": {
                "bos_token": {
                    "content": "<s>",
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                },
                "eos_token": {
                    "content": "<|end|>",
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                },
                "additional_special_tokens": ["<|extra|>"],
            }
        },
    ),
    # tokenizer_config.json's added_tokens_decoder flags replace tokenizer.json's (rstrip off here);
    # a model-specific *_token key reaches the template like bos_token does.
    "added-tokens-decoder": dict(
        base="phi3",
        config={
            "image_token": "<|end|>",
            "added_tokens_decoder": {
                **_PHI3_FLAGS_OFF,
                "1000": {
                    "content": "<|user|>",
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                },
            },
        },
    ),
    # phi-2 declares CodeGenTokenizer, which transformers rebuilds as a plain byte-level BPE.
    "codegen": dict(
        base="chatml",
        config={"tokenizer_class": "CodeGenTokenizer", "add_prefix_space": True},
        model_config={"model_type": "phi"},
    ),
    # A byte-level file mislabelled LlamaTokenizerFast is read as it is.
    "bytelevel-labelled-llama": dict(
        base="chatml", config={"tokenizer_class": "LlamaTokenizerFast"}, model_config={"model_type": "llama"}
    ),
    # Padding and truncation saved in tokenizer.json are off in a plain encode; the pad token
    # falls back to the padding settings.
    "padding-in-file": dict(
        base="phi3",
        config={"pad_token": None},
        spec={
            "truncation": {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0},
            "padding": {
                "strategy": {"Fixed": 64},
                "direction": "Right",
                "pad_to_multiple_of": None,
                "pad_id": 2,
                "pad_type_id": 0,
                "pad_token": "</s>",
            },
        },
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants_equal_transformers(tmp_path, folders, variant):
    folder = _variant(tmp_path, folders, **VARIANTS[variant])
    ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    assert _backend_json(ours.backend) == _backend_json(theirs.backend_tokenizer)
    assert len(ours) == len(theirs)
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert ours.pad_token_id == theirs.pad_token_id
    for text in TEXTS + ["<mask> x<|extra|>y"]:
        assert ours.encode(text) == theirs(text)["input_ids"], text


# ------------------------------------------------------------------------------------------------
# Chat template
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("turns", [1, 2, 4])
def test_chat_template_equals_transformers(pairs, name, add_generation_prompt, turns):
    ours, theirs = pairs[name]
    messages = CONVERSATION[-turns:]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == theirs.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    # transformers 5 returns a BatchEncoding from tokenize=True unless return_dict=False.
    expected = theirs.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)["input_ids"]
    assert ids == expected
    assert ids == ours.encode(text, add_special_tokens=False)


def test_chat_template_renders_phi3_format(pairs):
    ours = pairs["phi3"][0]
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(messages) == "<|user|>\nHi<|end|>\n<|assistant|>\n"  # prompt by default
    assert ours.apply_chat_template(messages, add_generation_prompt=False) == "<|user|>\nHi<|end|>\n<|endoftext|>"
    ids = ours.apply_chat_template(messages, tokenize=True)
    assert ids[0] == ours.token_to_id("<|user|>")  # no <s>: the template path adds no special tokens
    assert ids[-1] == ours.token_to_id("<|assistant|>")  # rstrip swallowed the final "\n"


FEATURE_TEMPLATE = """\
{%- set ns = namespace(n=0) -%}
{% for m in messages %}
  {% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}
  {% set ns.n = ns.n + 1 %}
  {% if loop.index > 3 %}{% break %}{% endif %}
  {{ ns.n }}:{{ m | tojson }}
  {% if m.thinking is defined %}[{{ m.thinking }}]{% endif %}
{% endfor %}
{% generation %}{{ bos_token }}|{{ tools is none }}|{{ documents is none }}|{{ custom | default('-') }}{% endgeneration %}
{{ dict(a=1) | tojson }}{% if add_generation_prompt %}<|assistant|>{% endif %}
"""


@pytest.mark.parametrize("extra", [{}, {"custom": "ü", "bos_token": "OVERRIDE"}])
def test_chat_template_sandbox_features_equal_transformers(pairs, extra):
    """namespace, loop controls, the `{% generation %}` tag, tojson without ASCII escaping, tools and
    documents defined as None, reasoning aliases, extra variables overriding special tokens."""
    ours, theirs = pairs["phi3"]
    custom = Tokenizer(ours.backend, {**ours.config, "chat_template": FEATURE_TEMPLATE}, source="custom")
    messages = [
        {"role": "user", "content": 'é <b>"q"</b>', "name": None},
        {"role": "assistant", "content": "ok", "reasoning_content": "think"},
        {"role": "user", "content": "x"},
        {"role": "user", "content": "y"},
    ]
    expected = theirs.apply_chat_template(
        messages, chat_template=FEATURE_TEMPLATE, add_generation_prompt=True, tokenize=False, **extra
    )
    assert custom.apply_chat_template(messages, **extra) == expected
    with pytest.raises(TokenizerError, match="no tools here"):
        custom.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_errors(pairs, folders, tmp_path):
    ours = pairs["phi3"][0]
    bare = Tokenizer(ours.backend, {"eos_token": "<|endoftext|>"}, source="bare-folder")
    with pytest.raises(TokenizerError, match="no chat template") as info:
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "bare-folder" in str(info.value)
    with pytest.raises(TokenizerError, match="non-empty list"):
        ours.apply_chat_template([])
    with pytest.raises(TokenizerError, match="dict"):
        ours.apply_chat_template(["hello"])
    broken = Tokenizer(ours.backend, {"chat_template": "{% for %}"}, source="broken")
    with pytest.raises(TokenizerError, match="chat template"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])
    escape = Tokenizer(ours.backend, {"chat_template": "{{ messages.__class__.__mro__ }}"}, source="escape")
    with pytest.raises(TokenizerError, match="chat template"):
        escape.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("template, message", [
    ("{{ 'x' * 10**10 }}", "repeats a sequence 10000000000 times"),
    ("{{ ['a', 'b'] * 10**9 }}", "repeats a sequence 1000000000 times"),
    ("{{ (['x' * 16777216] * 8) | join }}", "repeats a sequence 8 times: 134217728 items"),
    ("{% for i in range(100) %}{{ 'x' * 16777216 }}{% endfor %}", "rendered template passes 67108864 characters"),
    ("{% set ns = namespace(s='') %}{% for i in range(100000) %}{% set ns.s = ns.s ~ ('x' * 1000000) %}"
     "{% endfor %}{{ ns.s }}", "concatenates (~) 17000000 items"),
    ("{% set ns = namespace(s='') %}{% for i in range(100000) %}{% set ns.s = ns.s + ('x' * 1000000) %}"
     "{% endfor %}", "concatenates"),
    ("{{ 'x'.ljust(10**10) }}", "asks str.ljust for a width of 10000000000"),
    ("{{ '%*s' % (10**10, 'x') }}", "asks a % format for a width of 10000000000"),
    ("{{ 'x' | center(10**10) }}", "the center filter"),
    ("{{ '%*s' | format(10**10, 'x') }}", "the format filter"),
    ("{{ 'a\nb' | indent(10**10) }}", "the indent filter"),
    ("{% set a = 'x' * 16000000 %}{% set b = a ~ a %}{{ b }}", "concatenates (~)"),
    ("{% set a = 'x' * 16000000 %}{{ [a, a, a, a] | join }}", "joins"),
    ("{{ ('x' * 1024) | join('y' * 1048576) }}", "joins"),
    ("{{ range(100000) | map('string') | map('center', 1000) | join }}", "joins"),
    ("{{ '{:>1000000000}'.format('x') }}", "asks str.format for a width"),
    ("{{ '%1000000000s' % 'x' }}", "asks a % format for a width"),
    ("{{ ('x' * 100000).replace('x', 'x' * 1000) }}", "replaces into"),
    ("{{ ('x' * 100000) | replace('x', 'x' * 1000) }}", "replaces into"),
    ("{{ ('y\n' * 1000000) | indent('x' * 1000) }}", "indents into"),
    ("{{ [''] * 125000000 }}", "repeats a sequence 125000000 times"),
    ("{{ [['x' * 16000000]] * 64 }}", "repeats a sequence 64 times"),
    ("{{ lipsum(n=400000) }}", "'lipsum' is undefined"),
    ("{% set ns = namespace(s='') %}{% for i in range(100000) %}{% set ns.s = [ns.s, 'x' * 1000000] %}"
     "{% endfor %}", "keeps on namespace attribute 's'"),
    ("{{ (2**1000)**1000000 }}", "raises a 1001-bit integer to the power 1000000"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ 10.0 ** 400 }}", "OverflowError"),
    ("{{ messages[0]['content'] + 1 }}", "TypeError"),
])  # fmt: skip
def test_hostile_chat_templates_are_tokenizer_errors(pairs, template, message):
    """A template is a stranger's program: what it builds is bounded, and whatever Python error it
    raises comes out as a TokenizerError naming the template, never as a raw exception."""
    hostile = Tokenizer(pairs["phi3"][0].backend, {"chat_template": template}, source="hostile")
    with pytest.raises(TokenizerError, match="hostile: chat template") as info:
        hostile.apply_chat_template([{"role": "user", "content": "hi"}])
    assert message in str(info.value)


def test_template_arithmetic_within_bounds_equals_transformers(pairs):
    template = ("{{ '-' * 3 }}{{ ['a'] * 2 }}{{ 2 ** 64 }}{{ 3 * 4 }}{{ 7 ** -2 }}{{ messages[0]['content'] * 2 }}"
                "{{ 'a' + 'b' }}{{ [1] + [2] }}{{ 1 + 2 }}{{ '%d-%s' % (3, 'x') }}{{ 'hi' | center(8) }}"
                "{{ 'a\nb' | indent(2) }}{{ '%s!' | format('x') }}{{ 'x'.ljust(4) }}|"
                "{% set ns = namespace(s='') %}{% for m in messages %}{% set ns.s = ns.s ~ m['content'] %}{% endfor %}"
                "{{ ns.s }}|{{ '%d' % 1700000000 }}{% set ids = namespace(seed=1700000000) %}{{ ids.seed }}"
                "{{ '{}-{}'.format(1700000000123, 'x') }}{{ dict(id=123456789).id }}{{ '{:>6}'.format('r') }}"
                "{% for k, v in {'request_id': 1700000000123, 'q': 'x'} | items %}{{ '  %s=%s' % (k, v) }}{% endfor %}"
                "{{ ['a', 'b'] | join(', ') }}{{ 'ab' | replace('a', 'xy') }}{{ 'a' ~ 1 ~ 'b' }}{{ '%5.2f' % 3.14159 }}"
                "[{{ missing | center(5) }}]{{ 5 | center(5) }}{{ range(3) | map('string') | join(',') }}")
    ours = Tokenizer(pairs["phi3"][0].backend, {"chat_template": template}, source="arithmetic")
    theirs = pairs["phi3"][1]
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages, chat_template=template, tokenize=False)


def test_named_chat_templates(pairs):
    ours = pairs["chatml"][0]
    templates = [
        {"name": "default", "template": "D{{ messages[0].content }}"},
        {"name": "tool_use", "template": "T{{ tools | length }}"},
    ]
    tok = Tokenizer(ours.backend, {"chat_template": templates})
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == "Dhi"
    assert tok.apply_chat_template(messages, tools=[{"name": "f"}]) == "T1"


def test_chat_template_argument_as_transformers_reads_it(pairs, folders, tmp_path):
    """chat_template= is a template, or the name of one of the checkpoint's templates."""
    import shutil

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    ours, theirs = pairs["phi3"]
    template = "CUSTOM {{ messages[0].content }}"
    assert ours.apply_chat_template(messages, chat_template=template) == theirs.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True) == "CUSTOM Hi"  # fmt: skip
    folder = tmp_path / "named"
    shutil.copytree(folders["chatml"], folder)
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "brief.jinja").write_text("B{{ messages | length }}", encoding="utf-8")
    ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    assert ours.apply_chat_template(messages, chat_template="brief") == theirs.apply_chat_template(
        messages, chat_template="brief", tokenize=False) == "B2"  # fmt: skip


@pytest.mark.parametrize("option, value, tokenizing", [
    ("continue_final_message", True, False), ("return_assistant_tokens_mask", True, False),
    ("return_dict", True, True), ("return_tensors", "np", True), ("padding", "max_length", True),
    ("tokenizer_kwargs", {"add_special_tokens": True}, True), ("max_length", 4, True),
])
def test_options_that_change_the_output_are_refused_not_rendered(pairs, option, value, tokenizing):
    """Passed on as template variables they would render another prompt than transformers'
    silently. Those of the tokenization transformers ignores without tokenize=True: so does minphi3."""
    ours, theirs = pairs["phi3"]
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(TokenizerError, match=f"option {option}=.* is not supported"):
        ours.apply_chat_template(messages, tokenize=True, **{option: value})
    if tokenizing:
        assert ours.apply_chat_template(messages, **{option: value}) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **{option: value})  # fmt: skip
    else:
        with pytest.raises(TokenizerError, match=f"option {option}=.* is not supported"):
            ours.apply_chat_template(messages, **{option: value})
    assert ours.apply_chat_template(messages, **{option: None}) == ours.apply_chat_template(messages)  # unset: fine
    ids = ours.apply_chat_template(messages, tokenize=True)
    assert ids == theirs.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=True)
    for unchanged in ({"padding": "do_not_pad"}, {"padding": True}, {"truncation": "do_not_truncate"},
                      {"tokenizer_kwargs": {}}, {"return_dict": False}):  # fmt: skip
        assert ours.apply_chat_template(messages, tokenize=True, **unchanged) == ids


def test_tools_given_as_functions_are_refused(pairs):
    def get_weather(city: str) -> str:
        """Get the weather.

        Args:
            city: The city.
        """

    with pytest.raises(TokenizerError, match="JSON schemas"):
        pairs["phi3"][0].apply_chat_template([{"role": "user", "content": "Hi"}], tools=[get_weather])


@pytest.mark.parametrize("base, class_name, model_config", [
    ("llama-class", None, None), ("chatml", "CodeGenTokenizer", {"model_type": "phi"}),
    ("chatml", "GPT2Tokenizer", None),
])
def test_class_default_special_tokens_when_the_config_names_none(folders, tmp_path, base, class_name, model_config):
    """LlamaTokenizer's __init__ names <s>, </s>, <unk>; GPT2Tokenizer's and CodeGenTokenizer's
    <|endoftext|> for all three: transformers uses them when tokenizer_config.json names none."""
    import shutil

    folder = tmp_path / "f"
    shutil.copytree(folders[base], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        config.pop(name, None)
    if class_name:
        config["tokenizer_class"] = class_name
    config["chat_template"] = "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in ("chat_template.jinja",):
        (folder / extra).unlink(missing_ok=True)
    if model_config:
        (folder / "config.json").write_text(json.dumps(model_config))
    ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert ours.special_tokens_map["eos_token"] in ("</s>", "<|endoftext|>")
    assert len(ours) == len(theirs)
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(messages, add_generation_prompt=False) == theirs.apply_chat_template(
        messages, tokenize=False)  # fmt: skip
    text = "a</s> b<|endoftext|><s>"
    assert ours.encode(text) == theirs(text)["input_ids"]


@pytest.mark.parametrize("forced", [False, True])
def test_clean_up_of_bpe_spaces_only_when_the_config_insists(folders, tmp_path, forced):
    import shutil

    folder = tmp_path / "f"
    shutil.copytree(folders["chatml"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["clean_up_tokenization_spaces"] = True
    config["clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"] = forced
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    ids = ours.encode("Hello , world . It 's fine")
    assert ours.decode(ids) == theirs.decode(ids)
    assert ("Hello," in ours.decode(ids)) == forced


def test_additional_chat_templates_folder_as_transformers_reads_it(folders, tmp_path):
    """transformers 5 saves named templates as additional_chat_templates/NAME.jinja next to
    chat_template.jinja; both sides must find and pick them alike."""
    import shutil

    folder = tmp_path / "named"
    shutil.copytree(folders["chatml"], folder)
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text("T{{ tools | length }}", encoding="utf-8")
    ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    assert isinstance(theirs.chat_template, dict) and set(theirs.chat_template) == {"default", "tool_use"}
    messages = [{"role": "user", "content": "hi"}]
    for tools in (None, [{"name": "f"}]):
        assert ours.apply_chat_template(messages, tools=tools) == theirs.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True
        )
    assert ours.apply_chat_template(messages, tools=[{"name": "f"}]) == "T1"


# ------------------------------------------------------------------------------------------------
# Stop tokens
# ------------------------------------------------------------------------------------------------


def test_stop_token_ids(pairs):
    ours = pairs["phi3"][0]
    eos, assistant, end = (ours.token_to_id(t) for t in ("<|endoftext|>", "<|assistant|>", "<|end|>"))
    # The tokenizer's eos, then generation_config.json's list, without repeats.
    assert ours.stop_token_ids() == [eos, assistant, end]
    # A generation config that names only eos still gets <|end|>, looked up by string.
    assert ours.stop_token_ids({"eos_token_id": eos}) == [eos, end]
    assert ours.stop_token_ids({"eos_token_id": [7, eos]}) == [eos, 7, end]
    bare = Tokenizer(ours.backend, {"eos_token": "<|endoftext|>"})
    assert bare.stop_token_ids() == [eos, end]
    chatml = pairs["chatml"][0]
    assert chatml.stop_token_ids() == [chatml.token_to_id("<|im_end|>"), chatml.token_to_id("<|endoftext|>")]


# ------------------------------------------------------------------------------------------------
# Streaming
# ------------------------------------------------------------------------------------------------


def _stream(tokenizer, ids, skip_special_tokens):
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    return [detokenizer.push(i) for i in ids] + [detokenizer.flush()]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("skip", [True, False])
def test_stream_equals_full_decode(pairs, name, skip):
    ours = pairs[name][0]
    for text in TEXTS + [" ".join(TEXTS)]:
        ids = ours.encode(text)
        pieces = _stream(ours, ids, skip)
        assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip), text
        assert not any("\ufffd" in piece for piece in pieces), (text, pieces)


def test_stream_keeps_spaces_and_whole_characters(pairs):
    ours = pairs["phi3"][0]
    ids = ours.encode("the 東京 model 🚀 ok")
    assert sum(ours.id_to_token(i).startswith("<0x") for i in ids) == 4
    pieces = [p for p in _stream(ours, ids, True) if p]
    assert "".join(pieces) == "the 東京 model 🚀 ok"
    assert " 東京" in pieces  # the space travels with the word after it
    assert "🚀" in pieces  # four byte tokens, one piece: the character is sent once complete
    # The naive way (one decode per token) loses the spaces and breaks the characters.
    naive = "".join(ours.decode([i], skip_special_tokens=True) for i in ids)
    assert naive != ours.decode(ids, skip_special_tokens=True)


def test_stream_flush_releases_an_unfinished_character(pairs):
    ours = pairs["phi3"][0]
    first_byte = ours.token_to_id("<0xE2>")
    detokenizer = IncrementalDetokenizer(ours)
    assert detokenizer.push(ours.token_to_id("▁the")) == "the"
    assert detokenizer.push(first_byte) == ""  # held back: not a character yet
    assert detokenizer.flush() == ours.decode([ours.token_to_id("▁the"), first_byte])[len("the") :]


@pytest.mark.parametrize("name", NAMES)
def test_stream_after_a_shown_prompt_keeps_the_first_space(pairs, name):
    """The CLI's `generate` prints the prompt, then streams: seeded with the prompt's ids, the
    stream is exactly what the continuation adds to the decoded prompt, leading space included
    (alone, a Metaspace/Strip decoder would drop the first new token's space)."""
    ours = pairs[name][0]
    prompt, whole_ids = ours.encode("The quick brown fox"), ours.encode("The quick brown fox jumps over 東京 🚀")
    assert whole_ids[: len(prompt)] == prompt
    continuation = whole_ids[len(prompt) :]
    detokenizer = IncrementalDetokenizer(ours, context_ids=prompt)
    streamed = "".join([detokenizer.push(i) for i in continuation] + [detokenizer.flush()])
    whole, shown = ours.decode(prompt + continuation), ours.decode(prompt)
    assert streamed == whole[len(shown):]
    assert streamed.startswith(" jumps")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prompt_text, whole_text", [
    ("한국어", "한국어한국"), ("ok 🚀🚀", "ok 🚀🚀🚀 go"), ("한한한한", "한한한한국한국"), ("hello한한한한", "hello한한한한국"),
])
def test_stream_after_a_prompt_that_ends_in_byte_tokens(pairs, name, prompt_text, whole_text):
    """The prompt's last 8 tokens start inside a character (Phi-3's byte fallback spells 한 as
    three byte tokens): the window must open before it, or the byte run decodes as U+FFFD."""
    ours = pairs[name][0]
    prompt, whole_ids = ours.encode(prompt_text), ours.encode(whole_text)
    assert whole_ids[: len(prompt)] == prompt
    detokenizer = IncrementalDetokenizer(ours, context_ids=prompt)
    streamed = "".join([detokenizer.push(i) for i in whole_ids[len(prompt) :]] + [detokenizer.flush()])
    assert streamed == ours.decode(whole_ids)[len(ours.decode(prompt)) :]
    assert "\ufffd" not in streamed


_unicode = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
_pieces = st.sampled_from(["<|end|>", "<|im_end|>", " ", "  ", "\n", "▁", "🙂", "é", "東京", "<0xE2>", "\t"])


@pytest.mark.parametrize("name", ["phi3", "chatml"])
@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.one_of(_unicode, _pieces), max_size=6), skip=st.booleans(), bos=st.booleans())
def test_stream_property(pairs, name, parts, skip, bos):
    """For any text, the streamed pieces concatenate to the full decode."""
    ours = pairs[name][0]
    ids = ours.encode("".join(parts), add_special_tokens=bos)
    assert "".join(_stream(ours, ids, skip)) == ours.decode(ids, skip_special_tokens=skip)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(TokenizerError, match="no such folder") as info:
        load_tokenizer(tmp_path / "nowhere")
    assert "nowhere" in str(info.value)


def test_missing_tokenizer_json(tmp_path):
    _write_json(tmp_path / "tokenizer_config.json", {})
    with pytest.raises(TokenizerError, match="tokenizer.json: file not found"):
        load_tokenizer(tmp_path)


def test_tokenizer_json_not_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": ', encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not valid JSON"):
        load_tokenizer(tmp_path)


def test_tokenizer_config_not_json(tmp_path, folders):
    folder = tmp_path / "f"
    shutil.copytree(folders["chatml"], folder)
    (folder / "tokenizer_config.json").write_text("not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: not valid JSON"):
        load_tokenizer(folder)


def test_merge_naming_unknown_tokens(tmp_path, folders):
    data = json.loads((folders["chatml"] / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"].append(["zzqq", "qqzz"])
    _write_json(tmp_path / "tokenizer.json", data)
    with pytest.raises(TokenizerError, match="tokenizer.json") as info:
        load_tokenizer(tmp_path)
    assert "zzqq" in str(info.value)


def test_tokenizer_json_of_the_wrong_shape(tmp_path):
    _write_json(tmp_path / "tokenizer.json", {"model": {"type": "BPE", "vocab": [1, 2]}})
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    _write_json(tmp_path / "tokenizer.json", [1, 2, 3])
    with pytest.raises(TokenizerError, match="expected a JSON object"):
        load_tokenizer(tmp_path)


def test_path_is_a_file(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(TokenizerError, match="not a folder"):
        load_tokenizer(tmp_path / "weights.bin")


def test_tokenizer_json_path_loads_its_folder(folders):
    assert len(load_tokenizer(folders["chatml"] / "tokenizer.json")) == len(load_tokenizer(folders["chatml"]))


def test_bad_calls(pairs):
    ours = pairs["phi3"][0]
    with pytest.raises(TokenizerError, match="expects a str"):
        ours.encode(b"bytes")
    with pytest.raises(TokenizerError, match="-1"):
        ours.decode([5, -1])
    with pytest.raises(TokenizerError, match="integer ids"):
        ours.decode(["a"])
    assert ours.decode(5) == ours.decode([5])


def test_rust_panics_become_tokenizer_errors():
    """tokenizers raises Rust panics as a BaseException subclass (pyo3_runtime.PanicException)."""
    from minphi3.tokenizer import _guarded

    class PanicException(BaseException):
        pass

    def panic():
        raise PanicException("called `Option::unwrap()` on a `None` value")

    with pytest.raises(TokenizerError, match="some/file: decode failed .*PanicException"):
        _guarded("some/file", "decode", panic)

    def interrupt():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _guarded("some/file", "decode", interrupt)


def panicking_tokenizer_folder(folder):
    """A folder whose tokenizer.json has the merge ("hi", "hi") over the vocabulary {h, i, hi}: the
    merged token "hihi" is longer than every vocabulary entry, and the Rust BPE builder panics
    (tokenizers#2094) instead of returning an error."""
    spec = json.loads(RustTokenizer(models.BPE(vocab={"h": 0, "i": 1, "hi": 2}, merges=[("h", "i")])).to_str())
    spec["model"]["merges"].append(["hi", "hi"])
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return folder


def test_a_real_rust_panic_becomes_a_tokenizer_error(tmp_path, monkeypatch, capfd):
    folder = panicking_tokenizer_folder(tmp_path)
    with pytest.raises(TokenizerError, match="'hihi', which is not in the vocabulary"):
        load_tokenizer(folder)  # minphi3's pre-check refuses the merge before the library sees it
    monkeypatch.setattr(minphi3.tokenizer, "check_bpe_merges", lambda model, source: None)
    capfd.readouterr()
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: loading tokenizer\.json failed in the tokenizers library: PanicException"):
        load_tokenizer(folder)
    assert "panicked at" in capfd.readouterr().err  # a real panic: the Rust hook wrote on fd 2
    with pytest.raises(TokenizerError, match="PanicException"), panic_output_hidden():
        load_tokenizer(folder)
    assert capfd.readouterr().err == ""


def test_panic_output_hidden_passes_other_output_through(capfd):
    with panic_output_hidden():
        os.write(2, b"a warning from below Python\n")
    assert capfd.readouterr().err == "a warning from below Python\n"
    with pytest.raises(ValueError), panic_output_hidden():
        os.write(2, b"kept\n")
        raise ValueError("not a tokenizer error")
    assert capfd.readouterr().err == "kept\n"
    with pytest.raises(TokenizerError), panic_output_hidden():
        os.write(2, b"dropped\n")
        raise TokenizerError("the message already says it")
    assert capfd.readouterr().err == ""
    os.write(2, b"fd 2 is back\n")
    assert capfd.readouterr().err == "fd 2 is back\n"


def test_gguf_files_go_to_the_gguf_reader(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("minphi3.gguf")
    fake.load_gguf_tokenizer = lambda path: calls.append(path) or "from-gguf"
    monkeypatch.setitem(sys.modules, "minphi3.gguf", fake)
    path = tmp_path / "model.gguf"
    assert load_tokenizer(path) == "from-gguf"
    assert calls == [path]


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 10**6)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["<s>", "<|end|>", "<0xE2>", "LlamaTokenizer", "GPT2TokenizerFast", "phi3", "llama"]),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                ["content", "rstrip", "lstrip", "special", "normalized", "single_word", "__type", "1", "x"]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=8,
)
_config_keys = st.sampled_from(
    [
        "bos_token",
        "eos_token",
        "pad_token",
        "unk_token",
        "mask_token",
        "image_token",
        "added_tokens_decoder",
        "additional_special_tokens",
        "extra_special_tokens",
        "chat_template",
        "tokenizer_class",
        "legacy",
        "add_prefix_space",
        "split_special_tokens",
        "clean_up_tokenization_spaces",
    ]
)


@settings(max_examples=60, deadline=None)
@given(
    config=st.dictionaries(_config_keys, _json_values, max_size=4),
    model_config=st.dictionaries(
        st.sampled_from(["model_type", "tokenizer_class", "eos_token_id"]), _json_values, max_size=2
    ),
)
def test_random_configs_give_a_tokenizer_or_a_tokenizer_error(tmp_path_factory, folders, config, model_config):
    """Whatever tokenizer_config.json and config.json hold, loading and using the tokenizer either
    works or raises TokenizerError: never a TypeError from deep inside."""
    folder = tmp_path_factory.mktemp("random")
    shutil.copy(folders["phi3"] / "tokenizer.json", folder / "tokenizer.json")
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "config.json", model_config)
    try:
        tok = load_tokenizer(folder)
        tok.decode(tok.encode("Hi <|end|> 🙂"))
        tok.stop_token_ids()
        _ = (tok.bos_token_id, tok.eos_token_id, tok.special_token_ids, tok.special_tokens_map)
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    except TokenizerError:
        pass


@settings(max_examples=30, deadline=None)
@given(
    edits=st.dictionaries(
        st.sampled_from(["model", "normalizer", "pre_tokenizer", "decoder", "post_processor", "added_tokens"]),
        _json_values,
        max_size=2,
    ),
    cut=st.one_of(st.none(), st.integers(0, 3000)),
    tokenizer_class=st.sampled_from([None, "LlamaTokenizer", "GPT2Tokenizer"]),
)
def test_broken_tokenizer_json_gives_a_tokenizer_error(tmp_path_factory, folders, edits, cut, tokenizer_class):
    """Sections replaced by random JSON, or a file cut short: a TokenizerError naming the file, or a
    tokenizer that works; never a Rust panic or a TypeError."""
    spec = json.loads((folders["phi3"] / "tokenizer.json").read_text(encoding="utf-8"))
    spec.update(edits)
    text = json.dumps(spec)[:cut]
    folder = tmp_path_factory.mktemp("broken")
    (folder / "tokenizer.json").write_text(text, encoding="utf-8")
    _write_json(folder / "tokenizer_config.json", {"tokenizer_class": tokenizer_class} if tokenizer_class else {})
    try:
        tok = load_tokenizer(folder)
        tok.decode(tok.encode("Hi <|end|> 🙂 東京"), skip_special_tokens=True)
    except TokenizerError as exc:
        assert str(folder) in str(exc)
