"""Tests of minphi3/checkpoint.py (and the checks `minphi3.load` runs on a folder): safetensors
written by the official writers read back exactly, bf16 widened exactly, and every malformed or
unsafe file refused with a CheckpointError that names the file and the tensor."""

from __future__ import annotations

import json
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

import minphi3
from minphi3 import CheckpointError
from minphi3 import checkpoint as ckpt
from minphi3.config import config_from_dict
from minphi3.model import parameter_shapes

TINY_CONFIG = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "vocab_size": 16,
    "hidden_size": 8,
    "intermediate_size": 12,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 32,
    "rms_norm_eps": 1e-5,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def write_checkpoint(folder: Path, tensors: dict | None = None, config: dict | None = None) -> Path:
    """A tiny Phi-3 folder: config.json + model.safetensors written with safetensors.numpy."""
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(TINY_CONFIG, **(config or {}))
    (folder / "config.json").write_text(json.dumps(config))
    if tensors is None:
        tensors = tiny_tensors(config)
    save_numpy(tensors, str(folder / "model.safetensors"))
    return folder


def tiny_tensors(config: dict | None = None, seed: int = 0) -> dict:
    shapes = parameter_shapes(config_from_dict(dict(TINY_CONFIG, **(config or {}))))
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def raw_safetensors(path: Path, header, data: bytes = b"", header_length: int | None = None) -> Path:
    """A safetensors file written by hand: 8-byte length, header (dict or raw bytes), data."""
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(header_bytes) if header_length is None else header_length
    path.write_bytes(struct.pack("<Q", length) + header_bytes + data)
    return path


def entry(dtype: str, shape, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def refused(path: Path, *fragments: str):
    """Reading the header of `path` raises CheckpointError naming the file and every fragment."""
    with pytest.raises(CheckpointError) as caught:
        ckpt.read_safetensors_header(path)
    message = str(caught.value)
    assert path.name in message, message
    for fragment in fragments:
        assert re.search(fragment, message), (fragment, message)
    return message


# ---- reading what the official writers write -----------------------------------------------------
def test_float32_and_float16_read_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.standard_normal((7,)).astype(np.float16),
        "c": np.array(3.5, dtype=np.float32),  # rank 0
        "d": np.zeros((0, 4), dtype=np.float32),  # zero-size
        "e": rng.standard_normal((2, 2)).astype(np.float64),
    }
    path = tmp_path / "x.safetensors"
    save_numpy(tensors, str(path), metadata={"format": "pt"})
    infos = ckpt.read_safetensors_header(path)
    assert set(infos) == set(tensors)
    assert infos["b"].dtype == "F16" and infos["b"].shape == (7,)
    for name, array in tensors.items():
        assert infos[name].shape == array.shape
        same = ckpt.read_tensor(infos[name], array.dtype)
        assert same.dtype == array.dtype and same.flags.c_contiguous
        np.testing.assert_array_equal(same, array)
        for dtype in (np.float32, np.float64):  # widening is exact
            np.testing.assert_array_equal(ckpt.read_tensor(infos[name], dtype), array.astype(dtype))


def test_bfloat16_widening_is_exact(tmp_path):
    values = torch.randn(6, 9).to(torch.bfloat16)
    special = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, 1e-40, float("inf"), -float("inf")]).to(torch.bfloat16)
    path = tmp_path / "bf16.safetensors"
    save_torch({"w": values, "s": special}, str(path))
    infos = ckpt.read_safetensors_header(path)
    assert infos["w"].dtype == "BF16"
    for name, tensor in (("w", values), ("s", special)):
        exact = tensor.float().numpy()
        widened = ckpt.read_tensor(infos[name], np.float32)
        assert widened.dtype == np.float32
        np.testing.assert_array_equal(widened.view(np.uint32), exact.view(np.uint32))  # bit for bit
        np.testing.assert_array_equal(ckpt.read_tensor(infos[name], np.float64), exact.astype(np.float64))
        with np.errstate(over="ignore"):  # 3e38 becomes inf in float16, as astype does
            np.testing.assert_array_equal(ckpt.read_tensor(infos[name], np.float16), exact.astype(np.float16))


def test_chunked_reading_gives_the_same_tensor(tmp_path, monkeypatch):
    array = np.random.default_rng(1).standard_normal((13, 7)).astype(np.float32)
    bf16 = torch.randn(5, 11).to(torch.bfloat16)
    path = tmp_path / "c.safetensors"
    save_torch({"a": torch.as_tensor(array), "b": bf16}, str(path))
    monkeypatch.setattr(ckpt, "READ_CHUNK_ELEMENTS", 4)
    infos = ckpt.read_safetensors_header(path)
    np.testing.assert_array_equal(ckpt.read_tensor(infos["a"], np.float32), array)
    np.testing.assert_array_equal(ckpt.read_tensor(infos["b"], np.float32), bf16.float().numpy())


STORED = {"F32": (np.float32, np.uint32), "F16": (np.float16, np.uint16), "BF16": (None, np.uint16)}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    specs=st.dictionaries(
        st.text(alphabet="abcdefghij._0123456789", min_size=1, max_size=12),
        st.tuples(st.sampled_from(sorted(STORED)), st.lists(st.integers(0, 5), max_size=3), st.integers(0, 2**32 - 1)),
        min_size=1,
        max_size=5,
    )
)
def test_round_trip_of_random_tensors(tmp_path, specs):
    """Random names, dtypes, shapes (rank 0 and zero-size included) and bit patterns (NaN, inf and
    subnormals included), written by safetensors.torch, read back bit for bit."""
    tensors, bits = {}, {}
    for name, (dtype, shape, seed) in specs.items():
        raw = np.random.default_rng(seed).integers(0, 2 ** (8 * np.dtype(STORED[dtype][1]).itemsize),
                                                   size=shape, dtype=np.uint64).astype(STORED[dtype][1])
        bits[name] = (dtype, raw)
        if dtype == "BF16":
            tensors[name] = torch.from_numpy(raw.astype(np.int16)).view(torch.bfloat16)
        else:
            tensors[name] = torch.from_numpy(raw.view(STORED[dtype][0]).copy())
    path = tmp_path / "round.safetensors"
    save_torch(tensors, str(path))
    infos = ckpt.read_safetensors_header(path)
    assert set(infos) == set(specs)
    for name, (dtype, raw) in bits.items():
        assert infos[name].dtype == dtype and infos[name].shape == raw.shape
        if dtype == "BF16":
            out = ckpt.read_tensor(infos[name], np.float32)
            np.testing.assert_array_equal(out.view(np.uint32), raw.astype(np.uint32) << 16)
        else:
            out = ckpt.read_tensor(infos[name], STORED[dtype][0])
            np.testing.assert_array_equal(out.view(STORED[dtype][1]), raw)


# ---- malformed files -----------------------------------------------------------------------------
def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    refused(path, "too short")


def test_shorter_than_the_length_prefix(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    refused(path, "too short")


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_numpy({"a": np.ones((4, 4), np.float32), "b": np.ones(10, np.float32)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-12])
    refused(path, "'b'", "truncated|outside")


def test_header_length_beyond_the_file(tmp_path):
    path = raw_safetensors(tmp_path / "long.safetensors", {"a": entry("F32", [1], 0, 4)}, b"\0" * 4, header_length=10_000)
    refused(path, "10000", "past the end")


@pytest.mark.parametrize("length", [0, 100 * 1024 * 1024 + 1, 2**63])
def test_header_length_out_of_range(tmp_path, length):
    path = raw_safetensors(tmp_path / "len.safetensors", b"{}", header_length=length)
    refused(path, str(length))


@pytest.mark.parametrize("header", [b"not json at all", b'{"a": {"dtype": "F32",', b"\xff\xfe{}", b"[1, 2]", b"  7"])
def test_header_not_json(tmp_path, header):
    path = raw_safetensors(tmp_path / "bad.safetensors", header)
    refused(path, "JSON|UTF-8")


def test_duplicate_key(tmp_path):
    header = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    path = raw_safetensors(tmp_path / "dup.safetensors", header, b"\0" * 8)
    refused(path, "'w'", "twice")


def test_overlapping_offsets(tmp_path):
    header = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}
    path = raw_safetensors(tmp_path / "overlap.safetensors", header, b"\0" * 12)
    refused(path, "'b'", "overlap")


def test_offsets_past_the_end(tmp_path):
    header = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 8, 16)}
    path = raw_safetensors(tmp_path / "past.safetensors", header, b"\0" * 12)
    refused(path, "'b'", "outside the 12-byte data")


def test_gap_between_tensors(tmp_path):
    header = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 12, 20)}
    path = raw_safetensors(tmp_path / "gap.safetensors", header, b"\0" * 20)
    refused(path, "'b'", "gap")


def test_trailing_bytes(tmp_path):
    header = {"a": entry("F32", [2], 0, 8)}
    path = raw_safetensors(tmp_path / "trail.safetensors", header, b"\0" * 8 + b"#!/bin/sh")
    refused(path, "9 trailing bytes")


def test_unsupported_dtype(tmp_path):
    header = {"ids": entry("I64", [2], 0, 16)}
    path = raw_safetensors(tmp_path / "i64.safetensors", header, b"\0" * 16)
    refused(path, "'ids'", "I64")


def test_wrong_byte_count(tmp_path):
    header = {"a": entry("F32", [3], 0, 8)}
    path = raw_safetensors(tmp_path / "count.safetensors", header, b"\0" * 8)
    refused(path, "'a'", "12 bytes", "8")


@pytest.mark.parametrize(
    "bad_entry, fragment",
    [
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}, "shape"),
        ({"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}, "shape"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, "data_offsets"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "data_offsets"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}, "data_offsets"),
        ({"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}, "data_offsets"),
        ({"dtype": "F32", "shape": [1]}, "data_offsets"),
        ("F32", "expected an object"),
    ],
)
def test_malformed_entries(tmp_path, bad_entry, fragment):
    path = raw_safetensors(tmp_path / "entry.safetensors", {"t": bad_entry}, b"\0" * 4)
    refused(path, "'t'", fragment)


def test_metadata_must_be_strings(tmp_path):
    path = raw_safetensors(tmp_path / "meta.safetensors", {"__metadata__": {"format": 1}, "a": entry("F32", [1], 0, 4)},
                           b"\0" * 4)
    refused(path, "__metadata__")


def test_huge_shape_does_not_allocate(tmp_path):
    header = {"a": entry("F32", [2**40, 2**40], 0, 4)}
    path = raw_safetensors(tmp_path / "huge.safetensors", header, b"\0" * 4)
    refused(path, "'a'", "bytes")


# ---- the folder: names, shapes, shards -----------------------------------------------------------
def test_a_valid_tiny_folder_loads(tmp_path):
    tensors = tiny_tensors()
    model = minphi3.load(write_checkpoint(tmp_path / "ok", tensors))
    assert set(model.params) == set(tensors)
    for name, array in tensors.items():
        np.testing.assert_array_equal(model.params[name], array)


def test_missing_tensor(tmp_path):
    tensors = tiny_tensors()
    del tensors["model.layers.0.mlp.down_proj.weight"]
    folder = write_checkpoint(tmp_path / "missing", tensors)
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.0\.mlp\.down_proj\.weight"):
        minphi3.load(folder)


def test_unexpected_tensor(tmp_path):
    tensors = tiny_tensors()
    tensors["model.layers.1.mlp.down_proj.weight"] = np.zeros((8, 12), np.float32)
    folder = write_checkpoint(tmp_path / "extra", tensors)
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.1\.mlp\.down_proj\.weight"):
        minphi3.load(folder)


def test_wrong_shape(tmp_path):
    tensors = tiny_tensors()
    tensors["model.layers.0.self_attn.qkv_proj.weight"] = np.zeros((24, 8), np.float32)  # thirds, not (2+2*1)*4
    folder = write_checkpoint(tmp_path / "shape", tensors)
    with pytest.raises(CheckpointError, match=r"qkv_proj\.weight.*\[24, 8\].*\[16, 8\]"):
        minphi3.load(folder)


@pytest.mark.parametrize("stored", ["embedding", "both_equal", "both_different", "head_only"])
def test_a_tied_config_reads_the_stored_head_as_transformers_does(tmp_path, stored):
    """tie_word_embeddings with: the embedding alone (the head is it); both, equal (tied, as torch
    .bin files store them); both, different (the config is wrong: transformers does not tie them
    and uses lm_head); lm_head alone (the embedding is read from it). Logits as transformers'."""
    import transformers

    tied = {"tie_word_embeddings": True}
    tensors = tiny_tensors(tied)
    embedding = tensors["model.embed_tokens.weight"]
    if stored == "both_equal":
        tensors["lm_head.weight"] = embedding.copy()
    elif stored == "both_different":
        tensors["lm_head.weight"] = np.random.default_rng(5).standard_normal(embedding.shape).astype(np.float32)
    elif stored == "head_only":
        tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    folder = write_checkpoint(tmp_path / stored, tensors, tied)
    model = minphi3.load(folder)
    assert model.config.tie_word_embeddings == (stored != "both_different")
    assert ("lm_head.weight" in model.params) == (stored == "both_different")
    oracle = transformers.Phi3ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ids = [[3, 4, 5, 9]]
    with torch.no_grad():
        theirs = oracle(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(minphi3.to_numpy(model(ids).logits), theirs, rtol=1e-5, atol=1e-5)


def test_a_tied_head_of_another_shape_is_named(tmp_path):
    tied = {"tie_word_embeddings": True}
    tensors = dict(tiny_tensors(tied), **{"lm_head.weight": np.zeros((16, 4), np.float32)})
    with pytest.raises(CheckpointError, match="'lm_head.weight' has shape \\[16, 4\\], expected \\[16, 8\\]"):
        minphi3.load(write_checkpoint(tmp_path / "m", tensors, tied))


def test_stored_tensors_equal_compares_values(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensors = {"a": a, "same": a.copy(), "other": a + 1, "wide": a.astype(np.float64), "flat": a.reshape(12)}
    save_numpy(tensors, str(tmp_path / "t.safetensors"))
    infos = ckpt.read_all_headers([tmp_path / "t.safetensors"])
    assert ckpt.stored_tensors_equal(infos["a"], infos["same"])
    assert ckpt.stored_tensors_equal(infos["a"], infos["wide"])  # another dtype, the same values
    assert not ckpt.stored_tensors_equal(infos["a"], infos["other"])
    assert not ckpt.stored_tensors_equal(infos["a"], infos["flat"])


def _sharded(folder: Path, weight_map_edit=None) -> Path:
    """A tiny folder split into two shards with an index."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    tensors = tiny_tensors()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in halves.items():
        save_numpy({n: tensors[n] for n in shard_names}, str(folder / shard))
        weight_map.update({n: shard for n in shard_names})
    if weight_map_edit:
        weight_map_edit(weight_map)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_sharded_folder_loads(tmp_path):
    model = minphi3.load(_sharded(tmp_path / "sharded"))
    for name, array in tiny_tensors().items():
        np.testing.assert_array_equal(model.params[name], array)


def test_index_naming_an_absent_shard(tmp_path):
    def edit(weight_map):
        weight_map["model.norm.weight"] = "model-00003-of-00003.safetensors"

    folder = _sharded(tmp_path / "absent", edit)
    with pytest.raises(CheckpointError, match=r"model-00003-of-00003\.safetensors.*missing"):
        minphi3.load(folder)


@pytest.mark.parametrize("shard", ["../model-00001-of-00002.safetensors", "/etc/passwd", "sub/../../x.safetensors", ""])
def test_shard_path_outside_the_folder(tmp_path, shard):
    outside = tmp_path / "model-00001-of-00002.safetensors"
    save_numpy({"model.norm.weight": np.ones(8, np.float32)}, str(outside))

    def edit(weight_map):
        weight_map["model.norm.weight"] = shard

    folder = _sharded(tmp_path / "escape", edit)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*not a file in this folder"):
        minphi3.load(folder)


def test_tensor_in_two_shards(tmp_path):
    folder = _sharded(tmp_path / "twice")
    first = ckpt.read_safetensors_header(folder / "model-00001-of-00002.safetensors")
    second = folder / "model-00002-of-00002.safetensors"
    tensors = {name: ckpt.read_tensor(info, np.float32) for name, info in ckpt.read_safetensors_header(second).items()}
    stolen = next(iter(first))
    tensors[stolen] = ckpt.read_tensor(first[stolen], np.float32)
    save_numpy(tensors, str(second))
    with pytest.raises(CheckpointError, match=re.escape(f"'{stolen}' also appears in model-00001-of-00002")):
        minphi3.load(folder)


def test_index_not_json(tmp_path):
    folder = _sharded(tmp_path / "badindex")
    (folder / "model.safetensors.index.json").write_text("{weight_map")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        minphi3.load(folder)


def test_no_weights_at_all(tmp_path):
    folder = tmp_path / "none"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        minphi3.load(folder)
    with pytest.raises(CheckpointError, match="no such file"):
        minphi3.load(tmp_path / "does-not-exist")


# ---- pickle is never opened ----------------------------------------------------------------------
class _Payload:
    """Unpickling this object creates a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_bomb(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload(marker)}))
    return path


def test_the_pickle_payload_really_runs_code(tmp_path):
    marker = tmp_path / "control-marker"
    pickle.loads(_pickle_bomb(tmp_path / "control.bin", marker).read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "model.pt", "model.pth", "model.ckpt"])
def test_pickle_checkpoint_alone_is_refused_and_never_unpickled(tmp_path, filename):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    marker = tmp_path / "unpickled-marker"
    _pickle_bomb(folder / filename, marker)
    with pytest.raises(CheckpointError, match=f"{re.escape(filename)}.*(never unpickles|arbitrary code)") as caught:
        minphi3.load(folder)
    assert "safetensors" in str(caught.value)  # says what to do
    with pytest.raises(CheckpointError, match="pickle"):
        minphi3.load(folder / filename)
    assert not marker.exists()


def test_pickle_next_to_safetensors_is_ignored(tmp_path):
    folder = write_checkpoint(tmp_path / "both")
    marker = tmp_path / "unpickled-marker"
    _pickle_bomb(folder / "pytorch_model.bin", marker)
    minphi3.load(folder)
    assert not marker.exists()


def test_running_out_of_memory_while_loading_is_a_resource_error(zoo, monkeypatch):
    """The memory check passed, then the memory went elsewhere: a ResourceError naming the
    checkpoint, not a raw MemoryError (which the CLI would report as an internal error)."""
    from minphi3 import ResourceError, loading

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(loading, "read_parameters", exhausted)
    with pytest.raises(ResourceError, match="ran out of memory loading .* of weights at float32"):
        minphi3.load(zoo.folder("mha"))
