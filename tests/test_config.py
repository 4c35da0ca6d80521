"""Tests of minphi3/config.py: every published config loads with the right derived values, both
rotary spellings give the same config, and every malformed config is a ConfigError naming the field."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from minphi3 import ConfigError, load_config
from minphi3.config import ModelConfig, config_from_dict

REFERENCE = Path("/work/shared/reference/checkpoints")
CONFIG_FILES = sorted(p.name for p in REFERENCE.glob("*.json") if p.name != "generation-eos.json")
PHI3_128K_ATTENTION_FACTOR = 1.1902380714238083  # sqrt(1 + ln 32 / ln 4096)

# name -> (head_dim, rotary_dim, kv_groups, attention_factor, sliding_window, tie, partial, theta, longrope)
EXPECTED = {
    "Phi-3-mini-4k-instruct.json": (96, 96, 1, 1.0, 2047, False, 1.0, 1e4, False),
    "Phi-3-mini-128k-instruct.json": (96, 96, 1, PHI3_128K_ATTENTION_FACTOR, 262144, False, 1.0, 1e4, True),
    "Phi-3-mini-128k-instruct.2024-04-su.json": (96, 96, 1, PHI3_128K_ATTENTION_FACTOR, 262144, False, 1.0, 1e4, True),
    "Phi-3-medium-4k-instruct.json": (128, 128, 4, 1.0, 2047, False, 1.0, 1e4, False),
    "Phi-3-medium-128k-instruct.2024-04-su.json": (128, 128, 4, PHI3_128K_ATTENTION_FACTOR, 131072, False, 1.0, 1e4, True),
    "Phi-3.5-mini-instruct.json": (96, 96, 1, PHI3_128K_ATTENTION_FACTOR, 262144, False, 1.0, 1e4, True),
    "Phi-4-mini-instruct.json": (128, 96, 3, PHI3_128K_ATTENTION_FACTOR, 262144, True, 0.75, 1e4, True),
    "phi-4.json": (128, 128, 4, 1.0, None, False, 1.0, 2.5e5, False),
    "phi-1.json": (64, 32, 1, 1.0, None, False, 0.5, 1e4, False),
    "phi-1_5.json": (64, 32, 1, 1.0, None, False, 0.5, 1e4, False),
    "phi-2.json": (80, 32, 1, 1.0, None, False, 0.4, 1e4, False),
}


def _reference(name: str) -> dict:
    data = json.loads((REFERENCE / name).read_text())
    data.pop("_provenance", None)
    return data


def _fields(config: ModelConfig) -> dict:
    return {name: getattr(config, name) for name in ModelConfig.__dataclass_fields__}


def test_every_reference_file_is_covered():
    assert sorted(EXPECTED) == CONFIG_FILES
    assert "Phi-3-mini-128k-instruct.2024-04-su.json" in CONFIG_FILES
    assert "Phi-3-medium-128k-instruct.2024-04-su.json" in CONFIG_FILES


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_reference_config_loads_with_its_derived_values(name):
    config = load_config(REFERENCE / name)
    data = _reference(name)
    head_dim, rotary_dim, groups, factor, window, tie, partial, theta, longrope = EXPECTED[name]
    assert config.head_dim == head_dim
    assert config.rotary_dim == rotary_dim
    assert config.kv_groups == groups
    assert config.attention_factor == factor
    assert config.sliding_window == window
    assert config.tie_word_embeddings is tie
    assert config.partial_rotary_factor == partial
    assert config.rope_theta == theta
    assert config.uses_longrope is longrope
    assert config.vocab_size == data["vocab_size"]
    assert config.num_hidden_layers == data["num_hidden_layers"]
    assert config.hidden_size == data["hidden_size"]
    assert config.num_key_value_heads == (data.get("num_key_value_heads") or data["num_attention_heads"])
    if longrope:
        assert config.original_max_position_embeddings == 4096
        assert config.rope_scaling.short_factor == tuple(data["rope_scaling"]["short_factor"])
        assert config.rope_scaling.long_factor == tuple(data["rope_scaling"]["long_factor"])
        assert len(config.rope_scaling.long_factor) == rotary_dim // 2
        assert config.rope_scaling["long_factor"] == config.rope_scaling.long_factor  # dict-style access
        # the published files' spelling of the type ("longrope", or "su" for the 2024 files) reads too
        assert data["rope_scaling"]["type"] in ("longrope", "su")
        assert config.rope_scaling["type"] == config.rope_scaling["rope_type"] == "longrope"
        assert config.rope_scaling.get("type") == "longrope" and config.rope_scaling.get("nothing", 0) == 0
        with pytest.raises(KeyError):
            config.rope_scaling["nothing"]
    assert config.model_type == data["model_type"]
    assert config.is_phi3 is (data["model_type"] == "phi3")


def test_su_files_have_the_legacy_spelling():
    for name in ("Phi-3-mini-128k-instruct.2024-04-su.json", "Phi-3-medium-128k-instruct.2024-04-su.json"):
        data = _reference(name)
        assert data["rope_scaling"]["type"] == "su"
        assert "original_max_position_embeddings" not in data["rope_scaling"]
        with pytest.raises(KeyError, match="original_max_position_embeddings"):
            transformers.Phi3Config(**data)
        assert load_config(REFERENCE / name).rope_scaling.rope_type == "longrope"


def test_attention_factor_formula():
    assert PHI3_128K_ATTENTION_FACTOR == math.sqrt(1 + math.log(32) / math.log(4096))
    assert PHI3_128K_ATTENTION_FACTOR == math.sqrt(17 / 12)
    data = _reference("Phi-3-mini-128k-instruct.json")
    data["max_position_embeddings"] = 4096  # s = 1: no scaling
    assert config_from_dict(data).attention_factor == 1.0
    data["max_position_embeddings"] = 2048  # s < 1: no scaling either
    assert config_from_dict(data).attention_factor == 1.0
    data = _reference("Phi-3-mini-128k-instruct.json")
    data["original_max_position_embeddings"] = 16
    data["rope_scaling"]["factor"] = 8.0  # `factor` overrides max / original
    assert config_from_dict(data).attention_factor == math.sqrt(1 + math.log(8) / math.log(16))
    data["rope_scaling"]["attention_factor"] = 1.0  # `attention_factor` overrides everything
    assert config_from_dict(data).attention_factor == 1.0


@pytest.mark.parametrize("name", [n for n in CONFIG_FILES if "su" not in n])
def test_derived_values_agree_with_transformers(name):
    data = _reference(name)
    config = load_config(REFERENCE / name)
    if data["model_type"] == "phi":
        theirs = transformers.PhiConfig(**data)
        from transformers.models.phi.modeling_phi import PhiRotaryEmbedding as Rotary
    else:
        theirs = transformers.Phi3Config(**data)
        from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding as Rotary
    rotary = Rotary(theirs)
    assert config.rotary_dim == 2 * rotary.inv_freq.shape[0]
    assert config.attention_factor == rotary.attention_scaling
    assert config.head_dim == theirs.hidden_size // theirs.num_attention_heads
    assert config.num_key_value_heads == theirs.num_key_value_heads
    assert config.sliding_window == getattr(theirs, "sliding_window", None)
    assert config.tie_word_embeddings == theirs.tie_word_embeddings
    assert config.rope_theta == theirs.rope_parameters["rope_theta"]
    assert config.partial_rotary_factor == theirs.rope_parameters["partial_rotary_factor"]
    if config.uses_longrope:
        _, factor = ROPE_INIT_FUNCTIONS["longrope"](theirs)
        assert config.attention_factor == factor
        assert config.original_max_position_embeddings == theirs.rope_parameters["original_max_position_embeddings"]


# ---- both spellings ------------------------------------------------------------------------------
def _to_v5_spelling(data: dict) -> dict:
    """transformers 5's spelling by hand: everything rotary inside `rope_parameters`, nothing at the
    top but `original_max_position_embeddings`, which transformers writes in both places (and reads
    from the top: see test_original_max_inside_rope_parameters_only_is_overridden_as_in_transformers)."""
    data = copy.deepcopy(data)
    rope = dict(data.pop("rope_scaling", None) or {})
    kind = rope.pop("type", None) or rope.pop("rope_type", None) or "default"
    rope["rope_type"] = "longrope" if kind in ("su", "longrope", "yarn") else kind
    if rope["rope_type"] == "longrope":
        rope["original_max_position_embeddings"] = data["original_max_position_embeddings"]
    rope["rope_theta"] = data.pop("rope_theta", 10000.0)
    if "partial_rotary_factor" in data:
        rope["partial_rotary_factor"] = data.pop("partial_rotary_factor")
    data["rope_parameters"] = rope
    return data


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_both_spellings_give_the_same_config(name):
    legacy = _reference(name)
    v5 = _to_v5_spelling(legacy)
    assert "rope_scaling" not in v5 and "rope_theta" not in v5 and "partial_rotary_factor" not in v5
    assert _fields(config_from_dict(v5)) == _fields(config_from_dict(legacy))


def test_original_max_inside_rope_parameters_only_is_overridden_as_in_transformers():
    # transformers' `standardize_rope_params` replaces the value inside `rope_parameters` by the
    # top-level field, whose Phi3Config default is 4096: the inner 2048 is never used.
    data = _to_v5_spelling(_reference("Phi-3-mini-128k-instruct.json"))
    data["rope_parameters"]["original_max_position_embeddings"] = 2048
    del data["original_max_position_embeddings"]
    theirs = transformers.Phi3Config(**copy.deepcopy(data))
    ours = config_from_dict(data)
    assert theirs.rope_parameters["original_max_position_embeddings"] == 4096
    assert ours.original_max_position_embeddings == 4096
    data["original_max_position_embeddings"] = 1024
    assert transformers.Phi3Config(**copy.deepcopy(data)).rope_parameters["original_max_position_embeddings"] == 1024
    assert config_from_dict(data).original_max_position_embeddings == 1024


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("spelling", ["rope_type", "type"])
@pytest.mark.parametrize("name", ["Phi-3-mini-4k-instruct.json", "phi-2.json"])
def test_rope_type_default_is_plain_rope(name, key, spelling):
    # transformers accepts {"rope_type": "default"} under either key and runs plain RoPE.
    data = _reference(name)
    data.pop("rope_scaling", None)
    data[key] = {spelling: "default"}
    config_class = transformers.PhiConfig if data["model_type"] == "phi" else transformers.Phi3Config
    assert config_class(**copy.deepcopy(data)).rope_parameters["rope_type"] == "default"
    config = config_from_dict(data)
    assert config.rope_scaling is None
    assert _fields(config) == _fields(load_config(REFERENCE / name))


@pytest.mark.parametrize("name", [n for n in CONFIG_FILES if "su" not in n])
def test_config_saved_by_transformers_reads_the_same(name, tmp_path):
    data = _reference(name)
    config_class = transformers.PhiConfig if data["model_type"] == "phi" else transformers.Phi3Config
    config_class(**data).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in saved and "rope_scaling" not in saved
    assert _fields(load_config(tmp_path)) == _fields(load_config(REFERENCE / name))


@pytest.mark.parametrize("spelling", [("type", "su"), ("type", "longrope"), ("rope_type", "su"),
                                      ("rope_type", "longrope"), ("type", "yarn"), ("rope_type", "yarn")])
def test_longrope_spellings(spelling):
    data = _reference("Phi-3-mini-128k-instruct.json")
    data["rope_scaling"].pop("type")
    key, value = spelling
    data["rope_scaling"][key] = value
    config = config_from_dict(data)
    assert config.rope_scaling.rope_type == "longrope"
    assert config.rope_scaling.short_factor == tuple(data["rope_scaling"]["short_factor"])


def test_defaults():
    data = _reference("Phi-3-mini-4k-instruct.json")
    for key in ("num_key_value_heads", "rope_theta", "original_max_position_embeddings", "sliding_window",
                "rms_norm_eps", "tie_word_embeddings", "rope_scaling"):
        data.pop(key)
    config = config_from_dict(data)
    assert config.num_key_value_heads == config.num_attention_heads
    assert config.rope_theta == 10000.0
    assert config.rms_norm_eps == 1e-5
    assert config.sliding_window is None
    assert config.tie_word_embeddings is False
    assert config.original_max_position_embeddings == 4096
    phi = _reference("phi-2.json")
    phi.pop("partial_rotary_factor")
    assert config_from_dict(phi).partial_rotary_factor == 0.5  # PhiConfig's default, not 1.0


def test_config_is_frozen():
    config = load_config(REFERENCE / "Phi-3-mini-4k-instruct.json")
    with pytest.raises(AttributeError):
        config.hidden_size = 1


# ---- transformers 5 spellings: rope_parameters and dtype ----------------------------------------------
def _their_rope_parameters(data: dict) -> dict:
    """transformers' own `config.rope_parameters` for a config.json, factor lists as tuples; the
    legacy `type` key it keeps beside `rope_type` is dropped."""
    config_class = transformers.PhiConfig if data["model_type"] == "phi" else transformers.Phi3Config
    theirs = dict(config_class(**copy.deepcopy(data)).rope_parameters)
    theirs.pop("type", None)
    return {key: tuple(value) if isinstance(value, list) else value for key, value in theirs.items()}


@pytest.mark.parametrize("name", [n for n in CONFIG_FILES if "su" not in n])
def test_rope_parameters_alias_equals_transformers(name):
    config = load_config(REFERENCE / name)
    assert dict(config.rope_parameters) == _their_rope_parameters(_reference(name))
    assert config.rope_parameters["rope_type"] == ("longrope" if config.uses_longrope else "default")
    assert config.rope_parameters["rope_theta"] == config.rope_theta
    # The same mapping from the transformers 5 spelling of the same file.
    assert dict(config_from_dict(_to_v5_spelling(_reference(name))).rope_parameters) == dict(config.rope_parameters)


def test_rope_parameters_of_the_2024_su_spelling_reads_as_longrope():
    config = load_config(REFERENCE / "Phi-3-mini-128k-instruct.2024-04-su.json")
    rope = config.rope_parameters
    assert rope["rope_type"] == "longrope"
    assert rope["original_max_position_embeddings"] == 4096
    assert rope["long_factor"] == tuple(_reference("Phi-3-mini-128k-instruct.2024-04-su.json")["rope_scaling"]["long_factor"])
    # The June file has other factor values but the same layout.
    june = load_config(REFERENCE / "Phi-3-mini-128k-instruct.json").rope_parameters
    assert set(rope) == set(june)
    assert {k: v for k, v in rope.items() if not k.endswith("_factor")} == {
        k: v for k, v in june.items() if not k.endswith("_factor")
    }


def test_rope_parameters_carries_factor_and_attention_factor_when_set():
    data = _reference("Phi-3-mini-128k-instruct.json")
    assert "factor" not in load_config(REFERENCE / "Phi-3-mini-128k-instruct.json").rope_parameters
    data["rope_scaling"].update(factor=8.0, attention_factor=1.25)
    rope = config_from_dict(data).rope_parameters
    assert (rope["factor"], rope["attention_factor"]) == (8.0, 1.25)
    assert dict(rope) == _their_rope_parameters(data)


@pytest.mark.parametrize("key", ["torch_dtype", "dtype"])
def test_dtype_alias_reads_either_spelling(key):
    data = _reference("Phi-3-mini-4k-instruct.json")
    data.pop("torch_dtype")
    assert config_from_dict(data).dtype is None
    data[key] = "float16"
    config = config_from_dict(data)
    assert config.dtype == config.torch_dtype == "float16"
    assert load_config(REFERENCE / "phi-2.json").dtype == "float16"


def test_aliases_are_read_only_and_not_stored_twice():
    config = load_config(REFERENCE / "Phi-4-mini-instruct.json")
    assert "rope_parameters" not in ModelConfig.__dataclass_fields__
    assert "dtype" not in ModelConfig.__dataclass_fields__
    with pytest.raises(AttributeError):
        config.dtype = "float32"
    with pytest.raises(AttributeError):
        config.rope_parameters = {}
    with pytest.raises(TypeError):
        config.rope_parameters["rope_theta"] = 1.0
    assert config.rope_parameters["rope_theta"] == 10000.0 and config.dtype == "bfloat16"


# ---- errors ---------------------------------------------------------------------------------------
def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "config.json"
    path.write_text(text)
    return path


def test_not_json(tmp_path):
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(_write(tmp_path, '{"vocab_size": 32064,'))


def test_empty_file(tmp_path):
    with pytest.raises(ConfigError, match="empty"):
        load_config(_write(tmp_path, ""))
    with pytest.raises(ConfigError, match="empty"):
        load_config(_write(tmp_path, "  \n"))


def test_not_an_object(tmp_path):
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(_write(tmp_path, "[1, 2]"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        load_config(tmp_path)


def test_folder_or_file(tmp_path):
    _write(tmp_path, (REFERENCE / "phi-2.json").read_text())
    assert _fields(load_config(tmp_path)) == _fields(load_config(tmp_path / "config.json"))


def _broken(name="Phi-3-mini-4k-instruct.json", **changes) -> dict:
    data = _reference(name)
    for key, value in changes.items():
        if value is _DELETE:
            data.pop(key)
        else:
            data[key] = value
    return data


_DELETE = object()
REQUIRED = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings"]


@pytest.mark.parametrize("field", REQUIRED)
def test_missing_required_field(field):
    with pytest.raises(ConfigError, match=f"'{field}'.*missing|missing.*'{field}'"):
        config_from_dict(_broken(**{field: _DELETE}))


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_size", "3072"),
        ("num_hidden_layers", 32.0),
        ("vocab_size", True),
        ("num_key_value_heads", "32"),
        ("tie_word_embeddings", "yes"),
        ("rope_theta", "10000"),
        ("rms_norm_eps", "1e-5"),
        ("sliding_window", "2047"),
        ("eos_token_id", "32000"),
        ("eos_token_id", [32000, "32007"]),
        ("pad_token_id", 1.5),
        ("architectures", "Phi3ForCausalLM"),
        ("architectures", []),
        ("rope_scaling", "su"),
        ("partial_rotary_factor", "0.75"),
        ("hidden_act", 3),
        ("num_labels", "2"),
        ("id2label", ["a", "b"]),
    ],
)
def test_wrong_type(field, value):
    with pytest.raises(ConfigError, match=field):
        config_from_dict(_broken(**{field: value}))


@pytest.mark.parametrize(
    "field, value",
    [
        ("vocab_size", 0),
        ("hidden_size", -3072),
        ("intermediate_size", 0),
        ("num_hidden_layers", 0),
        ("num_attention_heads", -1),
        ("num_key_value_heads", 0),
        ("max_position_embeddings", 0),
        ("sliding_window", 0),
        ("sliding_window", -5),
        ("rms_norm_eps", 0.0),
        ("rms_norm_eps", -1e-5),
        ("rope_theta", 0),
        ("rope_theta", -10000.0),
        ("partial_rotary_factor", 0.0),
        ("partial_rotary_factor", 1.5),
        ("original_max_position_embeddings", 0),
        ("pad_token_id", -1),
        ("num_labels", 0),
    ],
)
def test_zero_or_negative(field, value):
    with pytest.raises(ConfigError, match=field):
        config_from_dict(_broken(**{field: value}))


def test_hidden_not_divisible_by_heads():
    with pytest.raises(ConfigError, match="hidden_size.*3000.*num_attention_heads"):
        config_from_dict(_broken(hidden_size=3000))


def test_heads_not_divisible_by_kv_heads():
    with pytest.raises(ConfigError, match="num_key_value_heads.*5"):
        config_from_dict(_broken(num_key_value_heads=5))


@pytest.mark.parametrize("which", ["short_factor", "long_factor"])
@pytest.mark.parametrize("delta", [-1, 1])
def test_factor_list_of_wrong_length(which, delta):
    data = _reference("Phi-3-mini-128k-instruct.json")
    factors = data["rope_scaling"][which]
    data["rope_scaling"][which] = factors[:-1] if delta < 0 else factors + [1.0]
    with pytest.raises(ConfigError, match=f"{which}.*{len(factors) + delta} entries.*48"):
        config_from_dict(data)


def test_factor_list_sized_for_head_dim_instead_of_rotary_dim():
    """Phi-4-mini: 48 factors (rotary_dim 96 / 2), not 64 (head_dim 128 / 2)."""
    data = _reference("Phi-4-mini-instruct.json")
    data["rope_scaling"]["short_factor"] = [1.0] * 64
    with pytest.raises(ConfigError, match="short_factor.*64 entries.*48"):
        config_from_dict(data)


@pytest.mark.parametrize("bad", [["1.0"] * 48, [0.0] * 48, [-1.0] * 48, "1.0", None, [True] * 48])
def test_factor_list_of_bad_values(bad):
    data = _reference("Phi-3-mini-128k-instruct.json")
    data["rope_scaling"]["long_factor"] = bad
    with pytest.raises(ConfigError, match="long_factor"):
        config_from_dict(data)


@pytest.mark.parametrize(
    "key, rope",
    [
        ("rope_scaling", {"type": "dynamic", "factor": 2.0}),
        ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 10000.0}),
        ("rope_scaling", {"type": "ntk"}),
    ],
)
def test_unknown_rope_type(key, rope):
    data = _broken()
    data.pop("rope_scaling")
    data[key] = rope
    kind = rope.get("type", rope.get("rope_type"))
    with pytest.raises(ConfigError, match=f"rope_type.*{kind}"):
        config_from_dict(data)


@pytest.mark.parametrize("name", ["attention_factor", "factor"])
@pytest.mark.parametrize("value", [-1.0, 0.0, float("inf"), float("nan"), "2"])
def test_attention_factor_and_factor_must_be_positive_and_finite(name, value):
    data = _reference("Phi-3-mini-128k-instruct.json")
    data["rope_scaling"][name] = value
    with pytest.raises(ConfigError, match=f"rope_scaling.{name}"):
        config_from_dict(data)


@pytest.mark.parametrize("text", ["Infinity", "NaN", "-Infinity"])
def test_non_finite_rope_theta_from_json(tmp_path, text):
    """Python's json reads Infinity and NaN; a theta of either would silently zero every frequency."""
    body = (REFERENCE / "Phi-3-mini-4k-instruct.json").read_text().replace('"rope_theta": 10000.0', f'"rope_theta": {text}')
    assert text in body
    with pytest.raises(ConfigError, match="rope_theta"):
        load_config(_write(tmp_path, body))


def test_phi3_small_is_refused_by_name():
    data = _broken(architectures=["Phi3SmallForCausalLM"], model_type="phi3small")
    with pytest.raises(ConfigError, match="Phi3SmallForCausalLM.*not supported"):
        config_from_dict(data)
    data = _broken(architectures=["Phi3SmallForCausalLM"])
    with pytest.raises(ConfigError, match="Phi3SmallForCausalLM.*not supported"):
        config_from_dict(data)


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "PhiMoEForCausalLM", "Phi3VForCausalLM"])
def test_other_architectures_are_refused(architecture):
    with pytest.raises(ConfigError, match=f"{architecture}.*not supported"):
        config_from_dict(_broken(architectures=[architecture]))


def test_unknown_model_type_is_refused():
    with pytest.raises(ConfigError, match="model_type.*llama"):
        config_from_dict(_broken(model_type="llama"))


def test_phi3_needs_silu():
    with pytest.raises(ConfigError, match="hidden_act"):
        config_from_dict(_broken(hidden_act="gelu_new"))


def test_special_ids_inside_the_vocabulary():
    with pytest.raises(ConfigError, match="pad_token_id"):
        config_from_dict(_broken(pad_token_id=32064))
    with pytest.raises(ConfigError, match="bos_token_id"):
        config_from_dict(_broken(bos_token_id=40000))


def test_classification_fields():
    data = _broken(architectures=["Phi3ForSequenceClassification"], id2label={"0": "neg", "1": "neu", "2": "pos"})
    config = config_from_dict(data)
    assert config.head_kind == "sequence_classification"
    assert config.num_labels == 3
    assert dict(config.id2label) == {0: "neg", 1: "neu", 2: "pos"}
    assert config_from_dict(_broken(architectures=["Phi3ForTokenClassification"], num_labels=7)).num_labels == 7
    assert config_from_dict(_broken()).head_kind == "causal_lm"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(["Phi-3-mini-128k-instruct.json", "Phi-4-mini-instruct.json", "phi-2.json"]),
    field=st.sampled_from(
        REQUIRED + ["num_key_value_heads", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
                    "original_max_position_embeddings", "sliding_window", "rms_norm_eps", "layer_norm_eps",
                    "tie_word_embeddings", "eos_token_id", "pad_token_id", "architectures", "model_type",
                    "num_labels", "id2label", "head_dim", "hidden_act", "qk_layernorm"]
    ),
    value=JSON_VALUES,
)
def test_any_single_field_corruption_loads_or_raises_config_error(name, field, value):
    data = _reference(name)
    data[field] = value
    try:
        config = config_from_dict(data)
    except ConfigError as error:
        assert str(error)
        return
    # Whatever loaded is self-consistent.
    assert config.hidden_size % config.num_attention_heads == 0 or config.head_dim_override
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert config.rotary_dim >= 2 and config.rotary_dim % 2 == 0
    assert math.isfinite(config.attention_factor) and config.attention_factor > 0
