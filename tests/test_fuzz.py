"""Property-based tests (hypothesis) of minphi3 against hostile files, and of generation with the cache.

1. Random byte strings and random JSON as config.json, and as model.safetensors, never raise
   anything but a MinPhi3Error subclass (never a raw exception, never a hang).
2. Headers mutated from a valid safetensors file (a dtype, a shape, offsets, names, the metadata,
   the header length, the data length) either load the right tensors or raise a CheckpointError.
3. Generation with the KV cache equals a greedy loop that recomputes the full forward at every
   step, for random tiny Phi-3 configs (GQA, partial rotary, sliding windows, LongRoPE switching
   mid-generation, left padding, repetition penalty) and random prompts.

Properties that live next to the code they test, not repeated here: the mask builder against its
brute-force definition (test_attention.py::test_mask_matches_loops), rope's norms and relative
positions (test_rope.py::test_rotation_preserves_norms, ::test_scores_depend_only_on_the_distance),
the sampling distribution after any processors (test_sampling.py::test_filtered_distribution_properties),
single-field config corruptions (test_config.py), random GGUF corruptions (test_gguf.py) and
broken tokenizer.json files (test_tokenizer.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import struct

import numpy as np
import pytest
from bad_inputs import corpus as bad
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minphi3
from minphi3.checkpoint import read_safetensors_header
from minphi3.config import config_from_dict, load_config
from minphi3.errors import CheckpointError, ConfigError, MinPhi3Error
from minphi3.generate import prompt_positions
from minphi3.loading import model_from_parameters
from minphi3.model import parameter_shapes
from minphi3.sampling import process_scores

SECONDS_PER_EXAMPLE = 10
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])  # fmt: skip


class Hang(Exception):
    """An example ran past SECONDS_PER_EXAMPLE."""


@contextlib.contextmanager
def no_hang(seconds: float = SECONDS_PER_EXAMPLE):
    """Fail (instead of waiting for ever) when the body runs longer than `seconds`."""

    def expire(signum, frame):
        raise Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def minphi3_error_or_value(call):
    """Run `call`; -> its value, or the MinPhi3Error it raised. Anything else fails the test."""
    with no_hang(), np.errstate(all="ignore"):
        try:
            return call()
        except MinPhi3Error as error:
            assert str(error) and "\n" not in str(error), repr(str(error))
            return error


# ================================================================================================
# Strategies: JSON values, with the numbers that break naive readers
# ================================================================================================

NUMBERS = (
    st.integers(-(2**70), 2**70)
    | st.integers(-3, 300)
    | st.sampled_from([0, 1, 2, 4, 8, 32, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**400])
    | st.floats(allow_nan=True, allow_infinity=True)
)
SCALARS = st.none() | st.booleans() | NUMBERS | st.text(max_size=8)
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
CONFIG_FIELDS = list(bad.TINY_CONFIG) + [
    "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "original_max_position_embeddings",
    "sliding_window", "head_dim", "hidden_act", "tie_word_embeddings", "bos_token_id", "num_labels", "id2label",
    "layer_norm_eps", "qk_layernorm", "torch_dtype",
]  # fmt: skip
CONFIG_OBJECTS = st.dictionaries(st.sampled_from(CONFIG_FIELDS) | st.text(max_size=6), JSON, max_size=12)


def json_text(value) -> str:
    """JSON as Python writes it (NaN and Infinity included, as config.json files in the wild have)."""
    return json.dumps(value)


# ================================================================================================
# 1. Random bytes and random JSON as config.json
# ================================================================================================


@FUZZ
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_random_bytes_as_config_json(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "config.json").write_bytes(data)
    result = minphi3_error_or_value(lambda: load_config(folder))
    assert isinstance(result, (ConfigError, minphi3.ModelConfig)), result
    assert isinstance(minphi3_error_or_value(lambda: minphi3.load(folder)), MinPhi3Error)  # no weights


@FUZZ
@given(value=JSON | CONFIG_OBJECTS)
def test_random_json_as_config_json(tmp_path_factory, value):
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "config.json").write_text(json_text(value), encoding="utf-8")
    result = minphi3_error_or_value(lambda: load_config(folder))
    assert isinstance(result, (ConfigError, minphi3.ModelConfig)), result
    assert isinstance(minphi3_error_or_value(lambda: minphi3.load(folder)), MinPhi3Error)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(CONFIG_FIELDS), JSON, min_size=1, max_size=4))
def test_valid_config_with_random_fields(tmp_path_factory, changes):
    """Several fields at once (test_config.py changes one): a consistent config, or a ConfigError."""
    result = minphi3_error_or_value(lambda: config_from_dict(dict(bad.TINY_CONFIG, **changes)))
    assert isinstance(result, (ConfigError, minphi3.ModelConfig)), result
    if isinstance(result, minphi3.ModelConfig):
        assert result.num_attention_heads % result.num_key_value_heads == 0
        assert result.rotary_dim >= 2 and result.rotary_dim % 2 == 0
        assert math.isfinite(result.attention_factor) and result.attention_factor > 0
        assert all(0 < size < 2**63 for size in (result.vocab_size, result.hidden_size, result.num_hidden_layers))


# ================================================================================================
# 1b. Random bytes and random JSON as model.safetensors (next to a valid config.json)
# ================================================================================================


@pytest.fixture(scope="module")
def weights_folder(tmp_path_factory):
    """A valid tiny folder whose model.safetensors each example overwrites."""
    return bad.write_model(tmp_path_factory.mktemp("weights") / "model", tokenizer=False)


def load_weights(folder, data: bytes):
    (folder / "model.safetensors").write_bytes(data)
    header = minphi3_error_or_value(lambda: read_safetensors_header(folder / "model.safetensors"))
    assert isinstance(header, (CheckpointError, dict)), header
    return minphi3_error_or_value(lambda: minphi3.load(folder))


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes_as_safetensors(weights_folder, data):
    assert isinstance(load_weights(weights_folder, data), MinPhi3Error)


@FUZZ
@given(header=JSON | st.dictionaries(st.text(max_size=6), JSON, max_size=4), data=st.binary(max_size=64),
       length_error=st.sampled_from([0, 0, 0, -1, 1, 7, -(2**20), 2**62]))  # fmt: skip
def test_random_json_as_safetensors_header(weights_folder, header, data, length_error):
    header_bytes = json_text(header).encode("utf-8")
    length = max(len(header_bytes) + length_error, 0)
    result = load_weights(weights_folder, struct.pack("<Q", length % 2**64) + header_bytes + data)
    assert isinstance(result, MinPhi3Error)


# ================================================================================================
# 2. Headers mutated from a valid file
# ================================================================================================

FIELD_VALUES = {
    "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "F8_E4M3", "f32", ""]) | JSON,
    "shape": st.lists(st.integers(-2, 70) | st.sampled_from([2**40, 2**64, 10**30]), max_size=3) | JSON,
    "data_offsets": st.lists(st.integers(-(2**20), 2**20) | st.sampled_from([0, 128, 2**63, 2**64 + 5]), max_size=3)
    | JSON,
}


@st.composite
def header_mutations(draw):
    """A list of edits to apply to a valid header: (kind, tensor index, value)."""
    kinds = st.sampled_from(["field", "delete_field", "rename", "delete", "add", "metadata", "shift", "swap"])
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(kinds)
        field = draw(st.sampled_from(sorted(FIELD_VALUES)))
        value = draw(FIELD_VALUES[field]) if kind == "field" else draw(JSON)
        edits.append((kind, draw(st.integers(0, 100)), field, value, draw(st.integers(-300, 300))))
    return edits


def mutate(header: dict, edits) -> dict:
    header = json.loads(json.dumps(header))
    for kind, index, field, value, delta in edits:
        names = sorted(n for n in header if n != "__metadata__")
        if not names:
            break
        name = names[index % len(names)]
        entry = header[name]
        if not isinstance(entry, dict) and kind in ("field", "delete_field", "shift", "swap"):
            continue  # an entry an earlier edit replaced by a non-object
        if kind == "field":
            entry[field] = value
        elif kind == "delete_field":
            entry.pop(field, None)
        elif kind == "rename":
            header[f"{name}.renamed"] = header.pop(name)
        elif kind == "delete":
            del header[name]
        elif kind == "add":
            header[f"extra.{index}"] = value if not isinstance(value, dict) else dict(value, dtype="F32")
        elif kind == "metadata":
            header["__metadata__"] = value
        elif kind == "shift" and isinstance(entry.get("data_offsets"), list):
            entry["data_offsets"] = [o + delta if isinstance(o, int) else o for o in entry["data_offsets"]]
        elif kind == "swap":
            other = header[names[(index + 1) % len(names)]]
            if not isinstance(other, dict):
                continue
            entry["data_offsets"], other["data_offsets"] = other.get("data_offsets"), entry.get("data_offsets")
    return header


@FUZZ
@given(edits=header_mutations(), data_change=st.integers(-200, 200), length_error=st.sampled_from([0, 0, 0, -3, 5]))
def test_mutated_header_loads_correctly_or_raises_checkpoint_error(weights_folder, edits, data_change, length_error):
    tensors = bad.tiny_tensors()
    header, data = bad.safetensors_parts(tensors)
    header = mutate(header, edits)
    data = data[:data_change] if data_change < 0 else data + bytes(data_change)
    header_bytes = json_text(header).encode("utf-8")
    result = load_weights(weights_folder, struct.pack("<Q", len(header_bytes) + length_error) + header_bytes + data)
    assert isinstance(result, (CheckpointError, minphi3.Model)), result
    if isinstance(result, minphi3.Model):  # a harmless edit (new __metadata__, a swap of equal sizes...)
        for name, array in result.params.items():
            assert array.shape == tensors[name].shape


@FUZZ
@given(positions=st.lists(st.integers(0, 10_000), min_size=1, max_size=6), values=st.binary(min_size=6, max_size=6))
def test_header_bytes_flipped_load_correctly_or_raise(weights_folder, positions, values):
    """Random bytes overwritten in the 8-byte length and the JSON header of a valid file."""
    data = bytearray(bad.pack_safetensors(*bad.safetensors_parts(bad.tiny_tensors())))
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    for position, value in zip(positions, values, strict=False):
        data[position % header_end] = value
    result = load_weights(weights_folder, bytes(data))
    assert isinstance(result, (CheckpointError, minphi3.Model)), result


# ================================================================================================
# 3. Generation with the cache equals generation without it
# ================================================================================================


@st.composite
def tiny_phi3_configs(draw):
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([4, 8]))
    partial = draw(st.sampled_from([1.0, 0.5]))
    rotary_half = int(head_dim * partial) // 2
    config = {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": draw(st.integers(8, 48)),
        "hidden_size": heads * head_dim, "intermediate_size": draw(st.integers(2, 24)),
        "num_hidden_layers": draw(st.integers(1, 2)), "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "partial_rotary_factor": partial,
        "sliding_window": draw(st.none() | st.integers(1, 6)), "rope_theta": draw(st.sampled_from([100.0, 10000.0])),
        "tie_word_embeddings": draw(st.booleans()), "pad_token_id": 0,
    }  # fmt: skip
    if draw(st.booleans()):  # LongRoPE, with the switch to the long factors crossed while generating
        factors = st.lists(st.floats(1.0, 8.0), min_size=rotary_half, max_size=rotary_half)
        config["rope_scaling"] = {"type": "longrope", "short_factor": draw(factors), "long_factor": draw(factors)}
        config["original_max_position_embeddings"] = draw(st.integers(2, 12))
    return config


def random_parameters(config: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    shapes = parameter_shapes(config_from_dict(config))
    return {
        name: (1.0 if "norm" in name else 0.0) + rng.normal(0.0, 0.5, size=shape) for name, shape in shapes.items()
    }


def greedy_without_cache(model, ids, mask, max_new_tokens, repetition_penalty):
    """The definition: recompute the whole forward at every step and take the argmax."""
    for _ in range(max_new_tokens):
        logits = model(ids, attention_mask=mask, position_ids=prompt_positions(mask)).logits[:, -1, :]
        scores = process_scores(logits, ids, do_sample=False, repetition_penalty=repetition_penalty, context_mask=mask)
        ids = np.concatenate([ids, np.argmax(scores, axis=-1)[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
    return ids


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=tiny_phi3_configs(),
    seed=st.integers(0, 2**16),
    lengths=st.lists(st.integers(1, 8), min_size=1, max_size=2),
    max_new_tokens=st.integers(1, 8),
    repetition_penalty=st.none() | st.floats(0.5, 2.0),
)
def test_generation_with_cache_equals_generation_without(config, seed, lengths, max_new_tokens, repetition_penalty):
    model = model_from_parameters(config_from_dict(config), random_parameters(config, seed), dtype="float64")
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), dtype=np.int64)  # left-padded with the pad id 0
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = rng.integers(1, config["vocab_size"], size=length)
        mask[row, width - length :] = 1
    with no_hang():
        expected = greedy_without_cache(model, ids, mask, max_new_tokens, repetition_penalty)
        generated = minphi3.generate(
            model, ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=[],
            repetition_penalty=repetition_penalty,
        )  # fmt: skip
    assert generated.shape == expected.shape
    np.testing.assert_array_equal(generated, expected)
