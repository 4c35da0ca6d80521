"""Tests of the older Phi family (phi-1, phi-1.5, phi-2: `PhiForCausalLM`) against transformers 5.23.

Every tiny random checkpoint is written once per module by transformers' own `save_pretrained`
(`tiny_checkpoints.save_tiny`) and read back by both sides. What is checked (phi-spec.md section 3,
pitfalls P15-P18):

- parity of logits, every hidden state and every attention map: partial rotary 0.4 (phi-2) and
  0.5 (phi-1/1.5), qk_layernorm, grouped-query attention, tied embeddings (lm_head.bias stays),
  linear rope scaling (the one rope type PhiForCausalLM runs here; others are refused);
  a left-padded batch (real positions only); labels and loss; float64 (1e-9 against the oracle
  with its float32 steps lifted, float32 tolerance against the stock one); the sequence- and
  token-classification heads;
- the KV cache against the uncached forward at every step;
- config: the published configs and their derived values, partial_rotary_factor's 0.5 default;
- gelu_new: the tanh formula of transformers' NewGELUActivation, not the exact erf GELU;
- greedy generation token for token against transformers' `generate`, and the CLI on a Phi folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from tiny_checkpoints import (
    assert_logits_close,
    load_oracle,
    oracle_forward,
    random_ids,
    save_tiny,
)

import minphi3
from minphi3.config import config_from_dict
from minphi3.errors import ConfigError
from minphi3.mlp import gelu_mlp
from minphi3.model import parameter_shapes
from minphi3.ops import gelu_new
from minphi3.parity import lifted_float32_steps

# name -> keyword arguments of save_tiny (TINY_PHI: vocab 96, 2 layers, 4 heads, pad 0, bos 1, eos 2)
CHECKPOINTS = {
    # phi-2 in tiny form: head_dim 16 of which int(16 * 0.4) = 6 rotate (phi-2: 32 of 80)
    "phi2_like": dict(seed=21, hidden_size=64, intermediate_size=96, partial_rotary_factor=0.4),
    # phi-1 / phi-1.5 in tiny form: half of each head rotates (8 of 16)
    "half_rotary": dict(seed=22, hidden_size=64, intermediate_size=96, partial_rotary_factor=0.5),
    "qk_layernorm": dict(seed=23, hidden_size=64, intermediate_size=96, qk_layernorm=True, partial_rotary_factor=0.4),
    "gqa": dict(seed=24, hidden_size=64, intermediate_size=96, num_key_value_heads=2, partial_rotary_factor=0.4),
    # no published Phi is tied, but PhiForCausalLM allows it: the head keeps its own bias
    "tied": dict(seed=25, hidden_size=64, intermediate_size=96, tie_word_embeddings=True),
    # linear rope scaling (transformers' PhiRotaryEmbedding with rope_type "linear"): inv_freq / 2.5
    "linear_rope": dict(seed=29, hidden_size=64, intermediate_size=96, partial_rotary_factor=0.5,
                        rope_scaling={"type": "linear", "factor": 2.5}),
    "sequence_classification": dict(seed=26, architecture="PhiForSequenceClassification", num_labels=3),
    "token_classification": dict(seed=27, architecture="PhiForTokenClassification", num_labels=5),
}
CAUSAL = ["phi2_like", "half_rotary", "qk_layernorm", "gqa", "tied", "linear_rope"]


class PhiZoo:
    """The tiny Phi checkpoints, their transformers oracles and minphi3 models, each made once."""

    def __init__(self, root: Path):
        self.root = root
        self._folders, self._oracles, self._models = {}, {}, {}

    @staticmethod
    def architecture(name: str) -> str:
        return CHECKPOINTS[name].get("architecture", "PhiForCausalLM")

    def folder(self, name: str) -> Path:
        if name not in self._folders:
            settings = dict(CHECKPOINTS[name])
            save_tiny(self.root / name, architecture=settings.pop("architecture", "PhiForCausalLM"), **settings)
            self._folders[name] = self.root / name
        return self._folders[name]

    def oracle(self, name: str, dtype: str = "float32"):
        if (name, dtype) not in self._oracles:
            self._oracles[name, dtype] = load_oracle(self.folder(name), self.architecture(name), dtype)
        oracle = self._oracles[name, dtype]
        oracle.config.problem_type = None  # transformers sets it on the first loss it computes
        return oracle

    def model(self, name: str, dtype: str = "float32"):
        if (name, dtype) not in self._models:
            self._models[name, dtype] = minphi3.load(self.folder(name), dtype=dtype)
        return self._models[name, dtype]


@pytest.fixture(scope="module")
def phi(tmp_path_factory) -> PhiZoo:
    return PhiZoo(tmp_path_factory.mktemp("tiny_phi"))


def left_padded(batch_lengths, seq: int, seed: int = 0):
    """ids and attention_mask for rows of the given real lengths, padded on the left with id 0."""
    ids = random_ids(len(batch_lengths), seq, seed=seed)
    mask = np.zeros_like(ids)
    for row, length in enumerate(batch_lengths):
        mask[row, seq - length:] = 1
    return np.where(mask == 1, ids, 0), mask


def cumsum_positions(mask):
    """Generation's position ids for a left-padded batch: cumsum(mask) - 1, padding at 0."""
    return np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 0)


# ---- the checkpoint layout ----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_parameter_shapes_and_count_match_the_saved_checkpoint(phi, name):
    """parameter_shapes names every tensor transformers saved (tied: no lm_head.weight, but lm_head.bias);
    num_parameters counts them; rotary_dim is PhiAttention.rotary_ndims."""
    folder = phi.folder(name)
    with safe_open(str(folder / "model.safetensors"), framework="np") as f:
        saved = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    config = minphi3.load_config(folder)
    assert parameter_shapes(config) == saved
    assert config.num_parameters() == sum(int(np.prod(shape)) for shape in saved.values())
    assert config.rotary_dim == phi.oracle(name).model.layers[0].self_attn.rotary_ndims


# ---- parity with PhiForCausalLM ------------------------------------------------------------------
@pytest.mark.parametrize("name", CAUSAL)
def test_logits_hidden_states_and_attentions_match(phi, name):
    """P15-P17 end to end: the parallel block, LayerNorms with bias, partial rotary, biases everywhere."""
    ids = random_ids(2, 11, seed=1)
    ours = phi.model(name)(ids, output_hidden_states=True, output_attentions=True)
    theirs = oracle_forward(phi.oracle(name), ids, output_hidden_states=True, output_attentions=True)
    assert_logits_close(ours.logits, theirs.logits)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    for mine, reference in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        assert_logits_close(mine, reference)
    assert len(ours.attentions) == len(theirs.attentions) == 2
    for mine, reference in zip(ours.attentions, theirs.attentions, strict=True):
        assert mine.shape == (2, 4, 11, 11)
        assert_logits_close(mine, reference)


@pytest.mark.parametrize("name", ["phi2_like", "gqa"])
@pytest.mark.parametrize("explicit_positions", [True, False], ids=["cumsum_positions", "default_positions"])
def test_left_padded_batch_matches_on_real_positions(phi, name, explicit_positions):
    ids, mask = left_padded([10, 7, 3], 10, seed=2)
    positions = cumsum_positions(mask) if explicit_positions else None
    ours = phi.model(name)(ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    theirs = oracle_forward(phi.oracle(name), ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    real = mask.astype(bool)
    assert_logits_close(ours.logits[real], theirs.logits.numpy()[real])
    assert_logits_close(ours.hidden_states[1][real], theirs.hidden_states[1].numpy()[real])


def test_left_padding_is_invisible_to_the_real_tokens(phi):
    """A left-padded row equals the same tokens alone; without the mask the pads leak in.
    (Rotary is relative, so positions shifted by the padding give the same logits as cumsum ones.)"""
    ids, mask = left_padded([4], 9, seed=3)
    model = phi.model("phi2_like")
    alone = model(ids[:, -4:]).logits[0]
    padded = model(ids, attention_mask=mask, position_ids=cumsum_positions(mask)).logits[0, -4:]
    np.testing.assert_allclose(padded, alone, atol=1e-5)
    shifted = model(ids, attention_mask=mask).logits[0, -4:]  # positions 5..8 instead of 0..3
    np.testing.assert_allclose(shifted, alone, atol=1e-5)
    unmasked = model(ids).logits[0, -4:]
    assert np.abs(unmasked - alone).max() > 1e-2


@pytest.mark.parametrize("name", ["phi2_like", "qk_layernorm"])
def test_labels_and_loss_match(phi, name):
    ids = random_ids(2, 12, seed=4)
    labels = ids.copy()
    labels[0, :5] = -100
    labels[1, 7:] = -100
    ours = phi.model(name)(ids, labels=labels)
    theirs = oracle_forward(phi.oracle(name), ids, labels=labels)
    assert float(ours.loss) == pytest.approx(float(theirs.loss), rel=1e-5)
    unmasked = oracle_forward(phi.oracle(name), ids, labels=ids)
    assert abs(float(unmasked.loss) - float(ours.loss)) > 1e-3  # the ignored labels mattered


@pytest.mark.parametrize("name", ["phi2_like", "qk_layernorm", "gqa", "linear_rope"])
def test_float64_matches_the_lifted_oracle_to_1e9(phi, name):
    """float64 against transformers' float64 model with its float32 islands (softmax, rope tables)
    lifted to float64: 1e-9. Against the stock float64 model: float32 tolerance only."""
    ids = random_ids(2, 11, seed=5)
    oracle = phi.oracle(name, "float64")
    ours = phi.model(name, "float64")(ids, output_hidden_states=True, output_attentions=True)
    assert ours.logits.dtype == np.float64
    stock = oracle_forward(oracle, ids)
    with lifted_float32_steps(oracle):
        lifted = oracle_forward(oracle, ids, output_hidden_states=True, output_attentions=True)
    restored = oracle_forward(oracle, ids)
    assert_logits_close(ours.logits, lifted.logits, dtype="float64")
    for mine, reference in zip(ours.hidden_states, lifted.hidden_states, strict=True):
        assert_logits_close(mine, reference, dtype="float64")
    for mine, reference in zip(ours.attentions, lifted.attentions, strict=True):
        assert_logits_close(mine, reference, dtype="float64")
    assert_logits_close(ours.logits, stock.logits)
    # the context manager really changes the Phi oracle, and puts everything back on exit
    assert np.abs(stock.logits.numpy() - lifted.logits.numpy()).max() > 1e-10
    assert torch.equal(restored.logits, stock.logits)


def test_sequence_classification_head_matches(phi):
    """score.weight without bias, pooled at the rightmost non-pad token (pad id 0)."""
    ids = random_ids(3, 9, seed=6)
    ids[1, 6:] = 0
    ids[2, 2:] = 0
    labels = np.array([0, 2, 1])
    ours = phi.model("sequence_classification")(ids, labels=labels)
    theirs = oracle_forward(phi.oracle("sequence_classification"), ids, labels=labels)
    assert ours.logits.shape == (3, 3)
    assert_logits_close(ours.logits, theirs.logits)
    assert float(ours.loss) == pytest.approx(float(theirs.loss), rel=1e-5)


def test_token_classification_head_matches(phi):
    """score.weight and score.bias on every position; cross-entropy ignoring -100."""
    ids = random_ids(2, 9, seed=7)
    labels = np.random.default_rng(7).integers(0, 5, size=(2, 9))
    labels[0, :2] = -100
    ours = phi.model("token_classification")(ids, labels=labels, output_hidden_states=True)
    theirs = oracle_forward(phi.oracle("token_classification"), ids, labels=labels, output_hidden_states=True)
    assert ours.logits.shape == (2, 9, 5)
    assert_logits_close(ours.logits, theirs.logits)
    assert_logits_close(ours.hidden_states[-1], theirs.hidden_states[-1])
    assert float(ours.loss) == pytest.approx(float(theirs.loss), rel=1e-5)


def test_mlp_is_fc2_gelu_new_fc1(phi):
    """P16: the MLP output of one layer equals transformers' PhiMLP; an exact-GELU MLP does not."""
    oracle = phi.oracle("phi2_like")
    weights = phi.model("phi2_like").layers[0]
    x = np.random.default_rng(8).normal(0, 2, size=(2, 5, 64)).astype(np.float32)
    with torch.no_grad():
        theirs = oracle.model.layers[0].mlp(torch.from_numpy(x)).numpy()
    args = (weights["mlp.fc1.weight"], weights["mlp.fc1.bias"], weights["mlp.fc2.weight"], weights["mlp.fc2.bias"])
    np.testing.assert_allclose(gelu_mlp(x, *args), theirs, atol=2e-5)
    with torch.no_grad():
        exact = oracle.model.layers[0].mlp.fc2(
            torch.nn.functional.gelu(oracle.model.layers[0].mlp.fc1(torch.from_numpy(x)))
        ).numpy()
    assert np.abs(gelu_mlp(x, *args) - exact).max() > 1e-4


# ---- the KV cache --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["phi2_like", "qk_layernorm", "gqa", "tied", "linear_rope"])
def test_cache_matches_no_cache_at_every_step(phi, name):
    model = phi.model(name)
    ids = random_ids(2, 10, seed=9)
    full = model(ids).logits
    cache = model.new_cache(2, 10)
    for t in range(10):
        step = model(ids[:, t:t + 1], cache=cache)
        assert step.logits.shape == (2, 1, 96)
        assert_logits_close(step.logits[:, 0], full[:, t])
    assert cache.length == 10


def test_cache_with_a_prefilled_left_padded_batch(phi):
    """Prefill a left-padded prompt in one call, then decode token by token with the growing mask
    and cumsum positions; every step equals the uncached forward at the real positions."""
    model = phi.model("gqa")
    ids, mask = left_padded([9, 4], 9, seed=10)
    full_ids = np.concatenate([ids, random_ids(2, 5, seed=11)], axis=1)
    full_mask = np.concatenate([mask, np.ones((2, 5), dtype=mask.dtype)], axis=1)
    positions = cumsum_positions(full_mask)
    full = model(full_ids, attention_mask=full_mask, position_ids=positions).logits
    cache = model.new_cache(2, 14)
    prefill = model(ids, attention_mask=mask, position_ids=positions[:, :9], cache=cache)
    real = mask.astype(bool)
    assert_logits_close(prefill.logits[real], full[:, :9][real])
    for t in range(9, 14):
        step = model(full_ids[:, t:t + 1], attention_mask=full_mask[:, :t + 1],
                     position_ids=positions[:, t:t + 1], cache=cache)
        assert_logits_close(step.logits[:, 0], full[:, t])


# ---- config ---------------------------------------------------------------------------------------
# The published config.json files (../shared/reference/checkpoints/: phi-2 verbatim from the hub,
# phi-1 and phi-1.5 reconstructed from the published figures), held here so the suite runs anywhere.
PHI_1 = {
    "architectures": ["PhiForCausalLM"],
    "model_type": "phi",
    "hidden_act": "gelu_new",
    "layer_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "vocab_size": 51200,
    "attention_dropout": 0.0,
    "embd_pdrop": 0.0,
    "resid_pdrop": 0.0,
    "qk_layernorm": False,
    "tie_word_embeddings": False,
    "use_cache": True,
    "initializer_range": 0.02,
    "partial_rotary_factor": 0.5,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "torch_dtype": "float32",
    "bos_token_id": None,
    "eos_token_id": None,
}
PHI_1_5 = {**PHI_1, "torch_dtype": "float16"}
PHI_2 = {
    "architectures": ["PhiForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 50256,
    "embd_pdrop": 0.0,
    "eos_token_id": 50256,
    "hidden_act": "gelu_new",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 10240,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "phi",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "partial_rotary_factor": 0.4,
    "qk_layernorm": False,
    "resid_pdrop": 0.1,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.37.0",
    "use_cache": True,
    "vocab_size": 51200,
}
PUBLISHED = {
    # name: (config.json, head_dim, rotary_dim, kv_heads, partial_rotary_factor, parameters of PhiForCausalLM)
    "phi-1": (PHI_1, 64, 32, 32, 0.5, 1_418_270_720),
    "phi-1_5": (PHI_1_5, 64, 32, 32, 0.5, 1_418_270_720),
    "phi-2": (PHI_2, 80, 32, 32, 0.4, 2_779_683_840),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_load_with_the_right_derived_values(name, tmp_path):
    data, head_dim, rotary_dim, kv_heads, factor, parameters = PUBLISHED[name]
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = minphi3.load_config(tmp_path)
    assert config.model_type == "phi" and not config.is_phi3
    assert config.architectures == ("PhiForCausalLM",)
    assert (config.head_dim, config.rotary_dim, config.num_key_value_heads) == (head_dim, rotary_dim, kv_heads)
    assert config.kv_groups == 1
    assert config.partial_rotary_factor == factor
    assert config.hidden_act == "gelu_new"
    assert config.layer_norm_eps == 1e-5 and config.rms_norm_eps is None
    assert config.qk_layernorm is False and config.tie_word_embeddings is False
    assert config.rope_scaling is None and config.sliding_window is None
    assert config.num_parameters() == parameters
    assert config.head_kind == "causal_lm"


def test_phi1_null_kv_heads_becomes_num_attention_heads():
    data = dict(PHI_1)
    assert data["num_key_value_heads"] is None
    assert config_from_dict(data).num_key_value_heads == 32
    del data["num_key_value_heads"]
    assert config_from_dict(data).num_key_value_heads == 32


def minimal_phi_dict(**extra) -> dict:
    """A PhiConfig as an old config.json may hold it: no partial_rotary_factor, no rope_parameters."""
    return dict(model_type="phi", architectures=["PhiForCausalLM"], vocab_size=96, hidden_size=64,
                intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                **extra)


def test_partial_rotary_factor_defaults_to_half_like_phiconfig():
    """P18: PhiConfig assigns 0.5 when the key is missing (Phi3Config would mean 1.0)."""
    data = minimal_phi_dict()
    config = config_from_dict(data)
    reference = transformers.PhiConfig(**{k: v for k, v in data.items() if k != "architectures"})
    assert config.partial_rotary_factor == reference.rope_parameters["partial_rotary_factor"] == 0.5
    assert config.rotary_dim == 8
    assert config.hidden_act == "gelu_new" and config.layer_norm_eps == 1e-5
    assert config.num_key_value_heads == reference.num_key_value_heads == 4


@pytest.mark.parametrize("spelling", ["top_level", "rope_parameters", "rope_parameters_null_top_level"])
def test_partial_rotary_factor_is_read_from_either_spelling(spelling):
    extra = {
        "top_level": dict(partial_rotary_factor=0.4),
        "rope_parameters": dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.4}),
        "rope_parameters_null_top_level": dict(
            partial_rotary_factor=None, rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.4}
        ),
    }[spelling]
    config = config_from_dict(minimal_phi_dict(**extra))
    assert (config.partial_rotary_factor, config.rotary_dim) == (0.4, 6)
    if spelling == "rope_parameters":
        assert config.rope_theta == 500.0


@pytest.mark.parametrize("bad", [
    dict(hidden_act="silu"),
    dict(hidden_act="gelu"),
    dict(partial_rotary_factor=0.05),  # int(16 * 0.05) = 0 rotary dims
    dict(partial_rotary_factor=0.3125),  # 16 * 0.3125 = 5 rotary dims: odd
    dict(rope_scaling={"type": "linear"}),  # linear needs its factor
    dict(rope_scaling={"type": "linear", "factor": 0.0}),
    dict(rope_parameters={"rope_type": "linear", "factor": "2"}),
    dict(num_key_value_heads=3),
])
def test_invalid_phi_configs_are_refused_naming_the_field(bad):
    field = next(iter(bad))
    with pytest.raises(ConfigError, match=field):
        config_from_dict(minimal_phi_dict(**bad))


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("rope_type", ["dynamic", "yarn", "longrope", "su", "llama3"])
def test_other_phi_rope_types_are_refused_naming_the_family_and_the_supported_types(key, rope_type):
    spelling = "type" if key == "rope_scaling" else "rope_type"
    with pytest.raises(ConfigError) as error:
        config_from_dict(minimal_phi_dict(**{key: {spelling: rope_type, "factor": 2.0}}))
    message = str(error.value)
    assert f"{key}.rope_type" in message and repr(rope_type) in message
    assert "Phi models" in message and "phi-2" in message and "'linear'" in message
    assert "Phi-3" not in message


# ---- linear rope scaling -----------------------------------------------------------------------------
def test_linear_rope_config_reads_both_spellings_like_transformers(phi, tmp_path):
    folder = phi.folder("linear_rope")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "linear" and "rope_scaling" not in saved
    config = minphi3.load_config(folder)
    assert config.rope_scaling.rope_type == "linear" and config.rope_scaling.factor == 2.5
    assert not config.uses_longrope and config.attention_factor == 1.0
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 2.5
    rotary = phi.oracle("linear_rope").model.rotary_emb
    assert rotary.rope_type == "linear" and rotary.attention_scaling == 1.0
    # The published (transformers 4) spelling: rope_scaling beside a top-level rope_theta.
    legacy = minimal_phi_dict(rope_scaling={"type": "linear", "factor": 2.5}, rope_theta=10000.0)
    assert config_from_dict(legacy).rope_scaling == config.rope_scaling
    assert config_from_dict(minimal_phi_dict(rope_scaling={"rope_type": "default"})).rope_scaling is None


def test_linear_rope_logits_differ_from_unscaled_rope(phi, tmp_path):
    """Same weights, factor 2.5 vs none: the scaling is applied (and transformers agrees on both)."""
    folder = tmp_path / "unscaled"
    folder.mkdir()
    for path in phi.folder("linear_rope").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    data = json.loads((folder / "config.json").read_text())
    data["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    (folder / "config.json").write_text(json.dumps(data))
    ids = random_ids(2, 12, seed=30)
    scaled = phi.model("linear_rope")(ids).logits
    unscaled = minphi3.load(folder)(ids).logits
    assert_logits_close(unscaled, oracle_forward(load_oracle(folder, "PhiForCausalLM"), ids).logits)
    assert_logits_close(scaled, oracle_forward(phi.oracle("linear_rope"), ids).logits)
    assert np.abs(scaled - unscaled).max() > 1e-2
    # Linear scaling is position / factor: positions 0, 2.5, 5, ... cannot be fed as integers, but
    # positions 0, 5, 10, ... under factor 2.5 equal positions 0, 2, 4, ... unscaled.
    positions = np.broadcast_to(np.arange(12) * 5, (2, 12))
    np.testing.assert_allclose(phi.model("linear_rope")(ids, position_ids=positions).logits,
                               minphi3.load(folder)(ids, position_ids=positions // 5 * 2).logits, atol=2e-4)


# ---- gelu_new --------------------------------------------------------------------------------------
def test_gelu_new_is_the_tanh_formula_and_transformers_newgelu():
    x = np.linspace(-8, 8, 4001)
    formula = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(gelu_new(x), formula, rtol=1e-14, atol=1e-15)
    newgelu = transformers.activations.ACT2FN["gelu_new"]
    assert isinstance(newgelu, transformers.activations.NewGELUActivation)
    np.testing.assert_allclose(gelu_new(x), newgelu(torch.from_numpy(x)).numpy(), rtol=1e-13, atol=1e-15)
    x32 = x.astype(np.float32)
    assert gelu_new(x32).dtype == np.float32
    np.testing.assert_allclose(gelu_new(x32), newgelu(torch.from_numpy(x32)).numpy(), rtol=2e-6, atol=2e-7)


def test_gelu_new_is_not_exact_gelu():
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    exact = torch.nn.functional.gelu(x).numpy()
    difference = np.abs(gelu_new(x.numpy()) - exact).max()
    assert 1e-4 < difference < 1e-3


# ---- generation and the CLI --------------------------------------------------------------------
def hf_greedy(oracle, ids, mask=None, max_new_tokens=12):
    kwargs = {} if mask is None else {"attention_mask": torch.as_tensor(mask)}
    with torch.no_grad():
        out = oracle.generate(torch.as_tensor(ids), do_sample=False, max_new_tokens=max_new_tokens, **kwargs)
    return out.numpy()


@pytest.mark.parametrize("name", ["phi2_like", "qk_layernorm", "gqa"])
def test_greedy_generation_matches_transformers_single_prompt(phi, name):
    ids = random_ids(1, 7, seed=12)
    expected = hf_greedy(phi.oracle(name), ids)
    ours = minphi3.generate(phi.model(name), ids, max_new_tokens=12, do_sample=False)
    np.testing.assert_array_equal(np.asarray(minphi3.to_numpy(ours)), expected)


def test_greedy_generation_matches_transformers_left_padded_batch(phi):
    ids, mask = left_padded([8, 5, 2], 8, seed=13)
    expected = hf_greedy(phi.oracle("phi2_like"), ids, mask)
    ours = minphi3.generate(phi.model("phi2_like"), ids, max_new_tokens=12, do_sample=False, attention_mask=mask)
    np.testing.assert_array_equal(np.asarray(minphi3.to_numpy(ours)), expected)


CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a phi model reads the text and writes more text",
    "numpy arrays hold the weights of the tiny model",
    "def add(a, b): return a + b",
] * 4


@pytest.fixture(scope="module")
def phi_folder_with_tokenizer(tmp_path_factory):
    """A phi-2-like checkpoint with a tiny GPT-2/CodeGen-style byte-level BPE tokenizer.

    The BPE is trained on ASCII text without the full byte alphabet, so every id decodes to ASCII,
    and the model's vocab_size equals the tokenizer's size (<|endoftext|> is bos, eos and id 0).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = tmp_path_factory.mktemp("phi_cli")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    save_tiny(folder, "PhiForCausalLM", seed=28, vocab_size=size, hidden_size=64, intermediate_size=96,
              partial_rotary_factor=0.4, bos_token_id=0, eos_token_id=0, pad_token_id=None)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CodeGenTokenizer",
        "add_prefix_space": False,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 64,
    }))
    return folder


def test_load_and_generate_on_a_phi_folder_with_a_tokenizer(phi_folder_with_tokenizer):
    folder = phi_folder_with_tokenizer
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = np.asarray([hf_tokenizer.encode("the lazy fox")])
    expected = hf_greedy(load_oracle(folder, "PhiForCausalLM"), ids, max_new_tokens=8)
    ours = minphi3.generate(minphi3.load(folder), ids, max_new_tokens=8, do_sample=False)
    np.testing.assert_array_equal(np.asarray(minphi3.to_numpy(ours)), expected)


def test_cli_generate_on_a_phi_folder(phi_folder_with_tokenizer):
    """`python -m minphi3 generate --model FOLDER "text"` prints transformers' greedy continuation."""
    folder = phi_folder_with_tokenizer
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = "the quick"
    ids = np.asarray([hf_tokenizer.encode(prompt)])
    sequence = hf_greedy(load_oracle(folder, "PhiForCausalLM"), ids, max_new_tokens=8)[0]
    continuation = hf_tokenizer.decode(sequence[ids.shape[1]:], skip_special_tokens=True)
    assert continuation.strip()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-m", "minphi3", "generate", "--model", str(folder), "--max-new-tokens", "8", prompt],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert continuation in result.stdout, (continuation, result.stdout)


def test_cli_parity_report_on_a_phi_folder(phi_folder_with_tokenizer):
    """`python -m minphi3 parity FOLDER` runs PhiForCausalLM beside minphi3 and reports small deltas."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-m", "minphi3", "parity", str(phi_folder_with_tokenizer)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "PhiForCausalLM" in result.stdout
    rows = {line.split()[0]: float(line.split()[1]) for line in result.stdout.splitlines()
            if line.split() and line.split()[0] in ("layer.0", "layer.1", "final_norm", "logits")}
    assert set(rows) == {"layer.0", "layer.1", "final_norm", "logits"}
    assert max(rows.values()) < 1e-3
