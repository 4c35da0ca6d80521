"""Tests of minphi3/parity.py, the report behind `python -m minphi3 parity PATH [--dtype] [--save]`.

- the saved .npz file holds every array the module docstring names, with its shape;
- each per-layer array equals transformers' own intermediate, captured from inside its forward
  pass (forward hooks on the modules, and wrappers around `apply_rotary_pos_emb` and
  `eager_attention_forward` for what no module returns), on Phi-3 and Phi checkpoints;
- the per-layer arrays compose back into the layer output the forward pass produced;
- the table runs and stays small for --dtype float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_checkpoints import load_oracle, save_tiny
from transformers.models.phi import modeling_phi
from transformers.models.phi3 import modeling_phi3

import minphi3
from minphi3.cli import main
from minphi3.parity import STAGE_NAME, minphi3_trace, probe_ids

PHI3_LAYER = ["input_norm", "attn.q", "attn.k", "attn.v", "attn.q_rotated", "attn.k_rotated", "attn.weights",
              "attn.output", "residual", "post_attention_norm", "mlp.output"]
PHI_LAYER = [name for name in PHI3_LAYER if name not in ("residual", "post_attention_norm")]
SEQ = 10


@pytest.fixture(scope="module")
def phi_folder(tmp_path_factory):
    """A phi-2-like Phi checkpoint with qk_layernorm and grouped-query attention: 6 of 16 dims rotate."""
    return save_tiny(tmp_path_factory.mktemp("phi_trace"), "PhiForCausalLM", seed=31, hidden_size=64,
                     intermediate_size=96, num_key_value_heads=2, partial_rotary_factor=0.4, qk_layernorm=True)


def expected_shapes(config, batch: int, seq: int) -> dict[str, tuple[int, ...]]:
    """Every trace name with its shape, written out from the module docstring's table."""
    h, heads, kv_heads, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    shapes = {"input_ids": (batch, seq), "embedding": (batch, seq, h),
              "rope.cos": (batch, seq, config.rotary_dim), "rope.sin": (batch, seq, config.rotary_dim)}
    per_layer = {
        "input_norm": (batch, seq, h), "attn.q": (batch, heads, seq, d), "attn.k": (batch, kv_heads, seq, d),
        "attn.v": (batch, kv_heads, seq, d), "attn.q_rotated": (batch, heads, seq, d),
        "attn.k_rotated": (batch, kv_heads, seq, d), "attn.weights": (batch, heads, seq, seq),
        "attn.output": (batch, seq, h), "residual": (batch, seq, h), "post_attention_norm": (batch, seq, h),
        "mlp.output": (batch, seq, h),
    }
    for layer in range(config.num_hidden_layers):
        for name in PHI3_LAYER if config.is_phi3 else PHI_LAYER:
            shapes[f"layer.{layer}.{name}"] = per_layer[name]
        shapes[f"layer.{layer}"] = (batch, seq, h)
    shapes.update({"final_norm": (batch, seq, h), "logits": (batch, seq, config.vocab_size)})
    return shapes


# ---- the saved file ---------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["gqa", "partial_tied", "phi"])
def test_saved_trace_holds_every_intermediate_with_its_shape(zoo, phi_folder, tmp_path, capsys, which):
    folder = phi_folder if which == "phi" else zoo.folder(which)
    path = tmp_path / "trace.npz"
    assert main(["parity", str(folder), "--save", str(path), "--length", str(SEQ)]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    config = minphi3.load_config(folder)
    shapes = expected_shapes(config, 1, SEQ)
    saved = np.load(path)
    ours = {name.removeprefix("minphi3."): saved[name] for name in saved.files if not name.startswith("transformers.")}
    assert {name: array.shape for name, array in ours.items()} == shapes
    assert {name for name in saved.files if name.startswith("transformers.")} == {
        f"transformers.{name}" for name in ["embedding", "final_norm", "logits"]
        + [f"layer.{i}" for i in range(config.num_hidden_layers)]
    }
    assert all(ours[name].dtype == np.float32 for name in shapes if name != "input_ids")
    np.testing.assert_array_equal(ours["input_ids"], probe_ids(config.vocab_size, SEQ))
    # The rows of the attention weights are distributions; cos^2 + sin^2 = attention_factor^2.
    np.testing.assert_allclose(ours["layer.1.attn.weights"].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(ours["rope.cos"] ** 2 + ours["rope.sin"] ** 2, config.attention_factor**2, rtol=1e-5)


@pytest.mark.parametrize("which", ["gqa", "window", "phi"])
def test_intermediates_compose_into_the_layer_output(zoo, phi_folder, which):
    """The recorded steps are the forward pass's own: they add up to its layer outputs, bit for bit."""
    model = minphi3.load(phi_folder) if which == "phi" else zoo.model(which)
    trace = minphi3_trace(model, probe_ids(model.config.vocab_size, 12, seed=1))
    layer_input = trace["embedding"]
    for layer in range(model.config.num_hidden_layers):
        p = f"layer.{layer}."
        if model.config.is_phi3:
            np.testing.assert_array_equal(trace[p + "residual"], layer_input + trace[p + "attn.output"])
            np.testing.assert_array_equal(trace[f"layer.{layer}"], trace[p + "residual"] + trace[p + "mlp.output"])
        else:
            composed = trace[p + "attn.output"] + trace[p + "mlp.output"] + layer_input
            np.testing.assert_array_equal(trace[f"layer.{layer}"], composed)
        # The rotation changed the queries and keys (position 0 is the identity, later ones are not).
        assert np.abs(trace[p + "attn.q_rotated"][:, :, 1:] - trace[p + "attn.q"][:, :, 1:]).max() > 1e-3
        np.testing.assert_array_equal(trace[p + "attn.k_rotated"][:, :, 0], trace[p + "attn.k"][:, :, 0])
        layer_input = trace[f"layer.{layer}"]


# ---- against transformers' own intermediates ------------------------------------------------------------
class TransformersIntermediates:
    """Context manager: records transformers' per-layer intermediates during one forward pass.

    Module outputs come from forward hooks; the rotation's input and output, and the attention
    kernel's inputs (rotated q and k, v) and weights, from wrappers around the module-level
    functions `apply_rotary_pos_emb` and `eager_attention_forward` that the attention calls.
    """

    def __init__(self, oracle, monkeypatch):
        self.oracle, self.monkeypatch = oracle, monkeypatch
        self.module = modeling_phi3 if oracle.config.model_type == "phi3" else modeling_phi
        self.layers: list[dict] = [{} for _ in oracle.model.layers]
        self.rope: dict = {}
        self._rope_calls: list = []
        self._attention_calls: list = []

    def __enter__(self):
        base = self.oracle.model
        self.handles = [base.rotary_emb.register_forward_hook(self._keep_rope)]
        for index, layer in enumerate(base.layers):
            record = self.layers[index]
            self.handles.append(layer.input_layernorm.register_forward_hook(self._output_into(record, "input_norm")))
            self.handles.append(layer.mlp.register_forward_hook(self._output_into(record, "mlp.output")))
            self.handles.append(layer.self_attn.register_forward_hook(self._output_into(record, "attn.output")))
            if hasattr(layer, "post_attention_layernorm"):
                self.handles.append(layer.post_attention_layernorm.register_forward_hook(self._residual_into(record)))
        rotate, attend = self.module.apply_rotary_pos_emb, self.module.eager_attention_forward

        def rotate_and_keep(q, k, cos, sin, *args, **kwargs):
            q_out, k_out = rotate(q, k, cos, sin, *args, **kwargs)
            self._rope_calls.append((q, k, q_out, k_out))
            return q_out, k_out

        def attend_and_keep(module, query, key, value, *args, **kwargs):
            out, weights = attend(module, query, key, value, *args, **kwargs)
            self._attention_calls.append((query, key, value, weights))
            return out, weights

        self.monkeypatch.setattr(self.module, "apply_rotary_pos_emb", rotate_and_keep)
        self.monkeypatch.setattr(self.module, "eager_attention_forward", attend_and_keep)
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.monkeypatch.undo()
        for record, rope_call, attention_call in zip(self.layers, self._rope_calls, self._attention_calls, strict=True):
            q_in, k_in, _, _ = rope_call
            query, key, value, weights = attention_call
            rotary = q_in.shape[-1]  # Phi rotates only the first dims; the rest pass through
            record["attn.q"] = torch.cat([q_in, query[..., rotary:]], dim=-1)
            record["attn.k"] = torch.cat([k_in, key[..., rotary:]], dim=-1)
            record.update({"attn.q_rotated": query, "attn.k_rotated": key, "attn.v": value, "attn.weights": weights})
        for record in self.layers:
            for name, tensor in record.items():
                record[name] = tensor.detach().to(torch.float64).numpy()
        return False

    def _keep_rope(self, _module, _inputs, output):
        self.rope["rope.cos"], self.rope["rope.sin"] = (t.detach().to(torch.float64).numpy() for t in output)

    @staticmethod
    def _output_into(record, name):
        def hook(_module, _inputs, output):
            record[name] = output[0] if isinstance(output, tuple) else output
        return hook

    @staticmethod
    def _residual_into(record):
        def hook(_module, inputs, output):
            record["residual"] = inputs[0]  # post_attention_layernorm reads x + attention
            record["post_attention_norm"] = output
        return hook


def _relative_close(ours, theirs, tolerance, name):
    """max |ours - theirs| <= tolerance * max(1, max |theirs|), shapes equal."""
    assert np.shape(ours) == np.shape(theirs), (name, np.shape(ours), np.shape(theirs))
    difference = float(np.abs(np.asarray(ours, np.float64) - theirs).max())
    assert difference <= tolerance * max(1.0, float(np.abs(theirs).max())), f"{name}: max |delta| = {difference:.3e}"


@pytest.mark.parametrize("which", ["gqa", "window", "partial_tied", "longrope", "phi"])
def test_per_layer_arrays_match_transformers_intermediates(zoo, phi_folder, monkeypatch, which):
    """Every per-layer array against the same tensor inside transformers' forward (float32)."""
    if which == "phi":
        model, oracle = minphi3.load(phi_folder), load_oracle(phi_folder, "PhiForCausalLM")
    else:
        model, oracle = zoo.model(which), zoo.oracle(which)
    ids = np.random.default_rng(3).integers(3, model.config.vocab_size, size=(2, 40 if which == "longrope" else 12))
    trace = minphi3_trace(model, ids)
    with TransformersIntermediates(oracle, monkeypatch) as theirs, torch.no_grad():
        oracle(torch.as_tensor(ids))
    names = PHI3_LAYER if model.config.is_phi3 else PHI_LAYER
    for layer, record in enumerate(theirs.layers):
        assert set(record) == set(names)
        for name in names:
            ours = trace[f"layer.{layer}.{name}"]
            assert ours.shape == record[name].shape, (name, ours.shape, record[name].shape)
            _relative_close(ours, record[name], 1e-5, f"layer.{layer}.{name}")
    for name in ("rope.cos", "rope.sin"):  # transformers builds one [1, seq, rotary_dim] table for the batch
        assert theirs.rope[name].shape == (1, ids.shape[1], model.config.rotary_dim)
        _relative_close(trace[name], np.broadcast_to(theirs.rope[name], trace[name].shape), 1e-6, name)


def test_per_layer_arrays_really_differ_between_layers(zoo):
    """A trace that repeated one layer's arrays would pass a shape check, not this one."""
    trace = minphi3_trace(zoo.model("gqa"), probe_ids(96, SEQ))
    for name in PHI3_LAYER:
        assert np.abs(trace[f"layer.0.{name}"] - trace[f"layer.1.{name}"]).max() > 1e-3, name


# ---- the table in float64 -----------------------------------------------------------------------------
def test_parity_table_runs_for_float64(zoo, tmp_path, capsys):
    path = tmp_path / "trace64.npz"
    assert main(["parity", str(zoo.folder("partial_tied")), "--dtype", "float64", "--save", str(path)]) == 0
    out = capsys.readouterr().out
    assert "float64" in out.splitlines()[0]
    stages = ["embedding", "layer.0", "layer.1", "final_norm", "logits"]
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in out.splitlines()
            if line.split() and line.split()[0] in stages}
    assert list(rows) == stages
    # float64 minphi3 against stock float64 transformers (whose rope tables and softmax stay float32)
    assert all(0 <= relative < 1e-5 for _absolute, relative in rows.values()), rows
    assert rows["embedding"] == [0.0, 0.0]  # a row lookup of the same stored float32 weights
    saved = np.load(path)
    assert saved["minphi3.layer.0.attn.q_rotated"].dtype == np.float64
    assert saved["minphi3.rope.cos"].dtype == np.float64
    assert saved["transformers.logits"].dtype == np.float64


@pytest.mark.parametrize("name", ["partial_tied", "window", "longrope"])
def test_parity_lift_shows_the_golden_float64_agreement(zoo, capsys, name):
    """With --lift the oracle is transformers float64 throughout: every stage within 1e-9 (the
    golden claim), where the stock comparison sits at float32 rounding."""
    folder = str(zoo.folder(name))

    def rows(*extra):
        assert main(["parity", folder, "--dtype", "float64", "--length", "40", *extra]) == 0
        out = capsys.readouterr().out
        return out.splitlines()[0], {line.split()[0]: float(line.split()[1]) for line in out.splitlines()
                                     if line.split() and STAGE_NAME.fullmatch(line.split()[0])}  # fmt: skip

    header, lifted = rows("--lift")
    assert "float32 steps lifted" in header and len(lifted) == 5
    assert max(lifted.values()) <= 1e-9, lifted
    _, stock = rows()
    assert stock["logits"] > 1e3 * max(lifted["logits"], 1e-16)


def test_parity_lift_needs_float64(zoo):
    assert main(["parity", str(zoo.folder("mha")), "--lift"]) == 2


def test_parity_refuses_a_save_path_it_cannot_write_before_comparing(zoo, tmp_path, capsys, monkeypatch):
    import minphi3.loading

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the --save path was checked")

    monkeypatch.setattr(minphi3.loading, "load", never)
    for target, reason in ((tmp_path / "missing" / "trace.npz", "no such folder"), (tmp_path, "is a folder")):
        assert main(["parity", str(zoo.folder("mha")), "--save", str(target)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and reason in lines[0], lines


def test_lifted_float32_steps_restores_transformers_even_after_an_error(zoo):
    """The context patches transformers' modules for its duration only: an exception inside it
    leaves RMSNorm, eager attention and the rotary embedding as they were."""
    from minphi3.parity import lifted_float32_steps

    oracle = load_oracle(zoo.folder("mha"), dtype="float64")
    originals = (modeling_phi3.Phi3RMSNorm.forward, modeling_phi3.eager_attention_forward,
                 modeling_phi.eager_attention_forward)  # fmt: skip
    with pytest.raises(RuntimeError, match="inside"), lifted_float32_steps(oracle):
        assert modeling_phi3.Phi3RMSNorm.forward is not originals[0]
        assert "forward" in vars(oracle.model.rotary_emb)
        raise RuntimeError("inside")
    assert (modeling_phi3.Phi3RMSNorm.forward, modeling_phi3.eager_attention_forward,
            modeling_phi.eager_attention_forward) == originals  # fmt: skip
    assert "forward" not in vars(oracle.model.rotary_emb)


def test_lifted_float32_steps_reads_an_explicit_head_dim(tmp_path):
    """A config may set head_dim apart from hidden / heads (12 here, not 8): the lifted rotary
    must rotate head_dim * partial_rotary_factor dims, as transformers does."""
    from minphi3.parity import lifted_float32_steps

    folder = save_tiny(tmp_path / "head_dim", head_dim=12, partial_rotary_factor=0.5)
    oracle, model = load_oracle(folder, dtype="float64"), minphi3.load(folder, dtype="float64")
    ids = probe_ids(model.config.vocab_size, 20)
    with torch.no_grad(), lifted_float32_steps(oracle):
        theirs = oracle(torch.as_tensor(ids)).logits.numpy()
    assert model.config.head_dim == 12
    assert np.abs(minphi3.to_numpy(model(ids).logits) - theirs).max() <= 1e-9
