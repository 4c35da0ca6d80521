"""Parity of minphi3/model.py with transformers 5.23 on tiny random checkpoints.

Every checkpoint is written by transformers' own `save_pretrained` (tests/conftest.py builds each
once per session) and read back by both sides: transformers in float32 (or float64) with eager
attention, minphi3 with `minphi3.load`. Tolerances (issue 2): float32 max |delta logits| <=
1e-4 * max(1, max |logits|); float64 against transformers made float64 throughout <= 1e-9 absolute.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from tiny_checkpoints import (
    FLOAT64_TOLERANCE,
    assert_logits_close,
    load_oracle,
    longrope_scaling,
    oracle_forward,
    random_ids,
    save_tiny,
    spy_on_attention_blocks,
)

import minphi3
from minphi3.attention import QUERY_BLOCK
from minphi3.parity import lifted_float32_steps
from minphi3.rope import use_long_factors


def _logits(output):
    return minphi3.to_numpy(output.logits)


def _close(ours, theirs, tolerance):
    ours = np.asarray(ours, dtype=np.float64)
    theirs = np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    difference = float(np.abs(ours - theirs).max())
    assert difference <= tolerance, f"max |delta| = {difference:.3e} > {tolerance:.1e}"


# ---- plain parity -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, seq",
    [
        ("mha", 9),
        ("gqa", 11),
        ("window", 24),  # W = 5, far shorter than the sequence
        ("window_gqa", 17),
        ("partial_tied", 20),
        ("sharded_bf16", 13),
        ("float16_stored", 10),
    ],
)
def test_logits_match_transformers(zoo, name, seq):
    ids = random_ids(2, seq, seed=seq)
    ours = _logits(zoo.model(name)(ids))
    theirs = oracle_forward(zoo.oracle(name), ids).logits.numpy()
    assert ours.shape == (2, seq, 96)
    assert ours.dtype == np.float32
    assert_logits_close(ours, theirs)


@pytest.mark.parametrize("name", ["mha", "gqa", "window", "partial_tied"])
def test_hidden_states_and_attentions_match_transformers(zoo, name):
    ids = random_ids(2, 12, seed=3)
    model, oracle = zoo.model(name), zoo.oracle(name)
    ours = model(ids, output_hidden_states=True, output_attentions=True)
    theirs = oracle_forward(oracle, ids, output_hidden_states=True, output_attentions=True)
    config = model.config
    assert len(ours.hidden_states) == config.num_hidden_layers + 1 == len(theirs.hidden_states)
    for mine, reference in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        reference = reference.numpy()
        assert mine.shape == (2, 12, config.hidden_size)
        _close(mine, reference, 1e-5 * max(1.0, np.abs(reference).max()))
    # The last entry is the final *normed* state, the one the head reads.
    normed = oracle.model(torch.as_tensor(ids)).last_hidden_state.detach().numpy()
    _close(ours.hidden_states[-1], normed, 1e-5 * max(1.0, np.abs(normed).max()))
    head = model.params.get("lm_head.weight", model.params["model.embed_tokens.weight"])
    _close(ours.hidden_states[-1] @ head.T, _logits(ours), 1e-5 * np.abs(_logits(ours)).max())
    assert len(ours.attentions) == config.num_hidden_layers == len(theirs.attentions)
    for mine, reference in zip(ours.attentions, theirs.attentions, strict=True):
        assert mine.shape == (2, config.num_attention_heads, 12, 12)
        _close(mine, reference.numpy(), 1e-5)
        np.testing.assert_allclose(mine.sum(-1), 1.0, rtol=1e-5)
        assert np.all(np.triu(mine, k=1) == 0)  # causal: nothing above the diagonal
    if config.sliding_window is not None:
        window = config.sliding_window
        query, key = np.indices((12, 12))
        outside = key <= query - window
        for mine in ours.attentions:
            assert np.all(mine[..., outside] == 0)
            assert np.all(mine[..., ~outside & (key <= query)] > 0)


# ---- LongRoPE ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["longrope", "partial_tied"])
def test_longrope_below_and_above_the_switch(zoo, name):
    model, oracle = zoo.model(name), zoo.oracle(name)
    assert model.config.original_max_position_embeddings == 32
    short_ids = random_ids(2, 20, seed=4)
    long_ids = np.concatenate([short_ids, random_ids(2, 20, seed=5)], axis=1)  # T = 40 > 32
    short = _logits(model(short_ids))
    long = _logits(model(long_ids))
    assert_logits_close(short, oracle_forward(oracle, short_ids).logits.numpy())
    assert_logits_close(long, oracle_forward(oracle, long_ids).logits.numpy())
    # The long call rotates *every* position with the long factors, the first 20 included.
    assert np.abs(long[:, :20] - short).max() > 1e-2


@pytest.mark.parametrize("name", ["longrope", "partial_tied"])
def test_longrope_switch_at_exactly_original_max(zoo, name):
    """32 tokens (positions 0..31) stay short; 33 switch to long (max position + 1 > 32, strict)."""
    model, oracle = zoo.model(name), zoo.oracle(name)
    ids = random_ids(1, 33, seed=6)
    at_limit = _logits(model(ids[:, :32]))
    past_limit = _logits(model(ids))
    assert_logits_close(at_limit, oracle_forward(oracle, ids[:, :32]).logits.numpy())
    assert_logits_close(past_limit, oracle_forward(oracle, ids).logits.numpy())
    assert np.abs(past_limit[:, :32] - at_limit).max() > 1e-2


def test_longrope_switch_is_batch_wide(zoo):
    """Row 0 sits at positions 0..19 and row 1 at 20..39: the whole batch uses the long factors."""
    model, oracle = zoo.model("longrope"), zoo.oracle("longrope")
    ids = random_ids(2, 20, seed=7)
    positions = np.stack([np.arange(20), np.arange(20, 40)])
    ours = _logits(model(ids, position_ids=positions))
    theirs = oracle_forward(oracle, ids, position_ids=positions).logits.numpy()
    assert_logits_close(ours, theirs)
    alone = _logits(model(ids[:1], position_ids=positions[:1]))  # max position 19: short factors
    assert_logits_close(alone, oracle_forward(oracle, ids[:1], position_ids=positions[:1]).logits.numpy())
    assert np.abs(alone[0] - ours[0]).max() > 1e-2


def _write_legacy_su(source, destination):
    """The saved transformers-5 folder rewritten in the April-2024 spelling: `rope_scaling` with
    `"type": "su"`, and rope_theta / partial_rotary_factor / original_max at the top level."""
    destination.mkdir()
    for path in source.glob("*.safetensors"):
        shutil.copy(path, destination / path.name)
    data = json.loads((source / "config.json").read_text())
    rope = data.pop("rope_parameters")
    data["rope_scaling"] = {"type": "su", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]}
    if "attention_factor" in rope:
        data["rope_scaling"]["attention_factor"] = rope["attention_factor"]
    data["rope_theta"] = rope["rope_theta"]
    data["partial_rotary_factor"] = rope["partial_rotary_factor"]
    data["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    data["torch_dtype"] = data.pop("dtype")
    (destination / "config.json").write_text(json.dumps(data, indent=2))
    return destination


@pytest.mark.parametrize("name", ["longrope", "partial_tied"])
def test_legacy_su_spelling_loads_and_matches_the_longrope_original(zoo, tmp_path, name):
    legacy = _write_legacy_su(zoo.folder(name), tmp_path / "su")
    # transformers 5.23 itself cannot read this spelling ...
    with pytest.raises(KeyError, match="original_max_position_embeddings"):
        transformers.Phi3ForCausalLM.from_pretrained(legacy)
    # ... minphi3 reads it as the same model.
    model = minphi3.load(legacy)
    original = zoo.model(name)
    assert model.config.rope_scaling == original.config.rope_scaling
    assert model.config.rope_theta == original.config.rope_theta == (5000.0 if name == "partial_tied" else 10000.0)
    assert model.config.partial_rotary_factor == original.config.partial_rotary_factor
    assert model.config.original_max_position_embeddings == 32
    assert model.config.attention_factor == original.config.attention_factor
    oracle = zoo.oracle(name)
    for seq in (20, 40):
        ids = random_ids(2, seq, seed=seq)
        assert_logits_close(_logits(model(ids)), oracle_forward(oracle, ids).logits.numpy())


def test_explicit_attention_factor(zoo):
    model = zoo.model("longrope_attention_factor")
    oracle = zoo.oracle("longrope_attention_factor")
    assert model.config.attention_factor == 1.37
    assert oracle.model.rotary_emb.attention_scaling == 1.37
    for seq in (20, 40):
        ids = random_ids(2, seq, seed=seq)
        assert_logits_close(_logits(model(ids)), oracle_forward(oracle, ids).logits.numpy())


def test_attention_factor_one_differs_from_the_default(zoo):
    """Same weights and factors; only the attention factor differs (1.0 vs sqrt(1 + ln 4 / ln 32))."""
    default, one = zoo.model("longrope"), zoo.model("longrope_attention_factor_one")
    assert default.config.attention_factor == pytest.approx(np.sqrt(1 + np.log(4) / np.log(32)), abs=1e-15)
    assert one.config.attention_factor == 1.0
    for name, seq in [(n, s) for n in ("longrope", "longrope_attention_factor_one") for s in (12, 40)]:
        ids = random_ids(2, seq, seed=seq)
        assert_logits_close(_logits(zoo.model(name)(ids)), oracle_forward(zoo.oracle(name), ids).logits.numpy())
    ids = random_ids(2, 12, seed=12)
    assert np.abs(_logits(default(ids)) - _logits(one(ids))).max() > 1e-2


# ---- prefill in query blocks (seq > QUERY_BLOCK) -----------------------------------------------------
# The zoo's checkpoints allow at most 128 positions; these allow 256, so 150 tokens are a legal
# context. 150 = 64 + 64 + 22 queries: three blocks, the last one short.
LONG_SEQ = 150
LONG_CONTEXT = {
    "window_gqa": dict(seed=41, sliding_window=24, num_key_value_heads=2, max_position_embeddings=256),
    "longrope": dict(seed=42, rope_scaling=longrope_scaling(8, seed=3), max_position_embeddings=256,
                     original_max_position_embeddings=64),
    "gqa": dict(seed=43, num_key_value_heads=1, max_position_embeddings=256),
}


@pytest.fixture(scope="module")
def long_zoo(tmp_path_factory):
    """name -> (folder, {dtype: minphi3 model}, {dtype: transformers model}), built on first use."""
    root, built = tmp_path_factory.mktemp("long_context"), {}

    def get(name, dtype="float32"):
        if name not in built:
            built[name] = (save_tiny(root / name, **LONG_CONTEXT[name]), {}, {})
        folder, models, oracles = built[name]
        if dtype not in models:
            models[dtype] = minphi3.load(folder, dtype=dtype)
            oracles[dtype] = load_oracle(folder, "Phi3ForCausalLM", dtype)
        return models[dtype], oracles[dtype]

    return get


def _long_inputs(name):
    """ids, attention_mask (None: no padding) for the long-prompt cases.

    window_gqa: rows of 150, 131 and 100 real tokens, left-padded: block 0 holds pad queries that
    see no key at all (every key is kept for it), blocks 1 and 2 see only a window's run of keys.
    """
    if name != "window_gqa":
        return random_ids(2, LONG_SEQ, seed=150), None
    return _left_padded([random_ids(1, n, seed=n)[0] for n in (150, 131, 100)])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(LONG_CONTEXT))
def test_prefill_in_query_blocks_matches_transformers(long_zoo, monkeypatch, name, dtype):
    """150 tokens take `attention_in_query_blocks`' blocked route; logits still match transformers
    (float64: against the oracle with its float32 steps lifted, 1e-9)."""
    model, oracle = long_zoo(name, dtype)
    config = model.config
    assert config.max_position_embeddings >= LONG_SEQ and oracle.config.max_position_embeddings >= LONG_SEQ
    if name == "longrope":  # positions past original_max: the long factors are in use
        assert use_long_factors(LONG_SEQ - 1, config.original_max_position_embeddings)
    ids, mask = _long_inputs(name)
    blocks = spy_on_attention_blocks(monkeypatch)
    ours = _logits(model(ids, attention_mask=mask))
    monkeypatch.undo()
    # The blocked route really ran: 64 + 64 + 22 queries in every layer.
    assert [rows for rows, _ in blocks] == [QUERY_BLOCK, QUERY_BLOCK, LONG_SEQ - 2 * QUERY_BLOCK] * config.num_hidden_layers
    keys = [kv for _, kv in blocks[:3]]
    if name == "window_gqa":  # block 0 keeps every key (pad queries); then W = 24 runs: keys 41..127, 105..149
        assert keys == [LONG_SEQ, 127 - (64 - 23) + 1, 149 - (128 - 23) + 1]
    else:  # causal: each block sees the keys up to its last query
        assert keys == [QUERY_BLOCK, 2 * QUERY_BLOCK, LONG_SEQ]
    real = np.ones(ids.shape, dtype=bool) if mask is None else mask.astype(bool)
    kwargs = {} if mask is None else {"attention_mask": mask}
    if dtype == "float32":
        theirs = oracle_forward(oracle, ids, **kwargs).logits.numpy()
    else:
        with lifted_float32_steps(oracle):
            theirs = oracle_forward(oracle, ids, **kwargs).logits.numpy()
    assert ours.dtype == np.dtype(dtype)
    assert_logits_close(ours[real], theirs[real], dtype)
    assert np.isfinite(ours).all()


# ---- partial rotary + tied embeddings ------------------------------------------------------------
def test_partial_rotary_tied_checkpoint(zoo):
    folder = zoo.folder("partial_tied")
    with safe_open(folder / "model.safetensors", "np") as handle:
        names = set(handle.keys())
    assert "lm_head.weight" not in names
    assert "model.embed_tokens.weight" in names
    model = zoo.model("partial_tied")
    config = model.config
    assert (config.head_dim, config.rotary_dim, config.kv_groups) == (16, 12, 3)
    assert config.tie_word_embeddings
    assert "lm_head.weight" not in model.params
    ids = random_ids(2, 9, seed=9)
    ours = model(ids, output_hidden_states=True)
    # The head is the embedding matrix itself.
    expected = ours.hidden_states[-1] @ model.params["model.embed_tokens.weight"].T
    _close(_logits(ours), expected, 1e-5 * np.abs(expected).max())


# ---- padding ------------------------------------------------------------------------------------
def _left_padded(batch_rows, pad_id=0):
    """Rows of different lengths, left-padded with pad_id -> (ids, attention_mask)."""
    width = max(len(row) for row in batch_rows)
    ids = np.full((len(batch_rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch_rows), width), dtype=np.int64)
    for i, row in enumerate(batch_rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


@pytest.mark.parametrize("name", ["gqa", "window", "partial_tied"])
@pytest.mark.parametrize("positions", ["arange", "cumsum"])
def test_left_padded_batch_with_attention_mask(zoo, name, positions):
    model, oracle = zoo.model(name), zoo.oracle(name)
    rows = [random_ids(1, n, seed=n)[0] for n in (12, 9, 4)]
    ids, mask = _left_padded(rows)
    kwargs = {"attention_mask": mask}
    if positions == "cumsum":
        kwargs["position_ids"] = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ours = _logits(model(ids, **kwargs))
    theirs = oracle_forward(oracle, ids, **kwargs).logits.numpy()
    real = mask.astype(bool)
    assert_logits_close(ours[real], theirs[real])
    assert np.isfinite(ours).all()  # pad-query rows (every key masked) are uniform, not NaN
    # Each real row equals that row run alone, without padding (RoPE is relative).
    for i, row in enumerate(rows):
        alone = _logits(model(row[None, :]))[0]
        assert_logits_close(ours[i][real[i]], alone)


def test_padding_changes_nothing_only_when_masked(zoo):
    """Without the attention mask the pad tokens are attended to: the mask must matter."""
    model = zoo.model("gqa")
    ids, mask = _left_padded([random_ids(1, 10, seed=1)[0], random_ids(1, 6, seed=2)[0]])
    masked = _logits(model(ids, attention_mask=mask))
    unmasked = _logits(model(ids))
    assert np.abs(masked[1, 4:] - unmasked[1, 4:]).max() > 1e-2
    assert np.abs(masked[0] - unmasked[0]).max() == 0  # row 0 has no padding


# ---- sharded bf16 ---------------------------------------------------------------------------------
def test_sharded_bf16_checkpoint(zoo):
    folder = zoo.folder("sharded_bf16")
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) >= 2
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {path.name for path in shards}
    with safe_open(shards[0], "pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.bfloat16
    model, oracle = zoo.model("sharded_bf16"), zoo.oracle("sharded_bf16")
    # bf16 -> float32 widening is exact: the same numbers transformers holds.
    for name, tensor in oracle.state_dict().items():
        if name in model.params:
            np.testing.assert_array_equal(model.params[name], tensor.numpy())
    assert set(model.params) <= set(oracle.state_dict())
    ids = random_ids(3, 10, seed=10)
    assert_logits_close(_logits(model(ids)), oracle_forward(oracle, ids).logits.numpy())


# ---- loss and heads -------------------------------------------------------------------------------
def test_labels_and_loss(zoo):
    model, oracle = zoo.model("gqa"), zoo.oracle("gqa")
    ids = random_ids(2, 10, seed=11)
    labels = ids.copy()
    labels[0, :3] = -100
    labels[1, 7] = -100
    ours = model(ids, labels=labels)
    theirs = oracle_forward(oracle, ids, labels=labels)
    assert float(ours.loss) == pytest.approx(float(theirs.loss), rel=1e-5)
    # By hand: position t predicts labels[t + 1], -100 skipped, mean over counted targets.
    logits = _logits(ours).astype(np.float64)
    terms = []
    for b in range(2):
        for t in range(9):
            target = labels[b, t + 1]
            if target != -100:
                row = logits[b, t]
                terms.append(np.log(np.exp(row - row.max()).sum()) + row.max() - row[target])
    assert len(terms) == 18 - 2 - 1
    assert float(ours.loss) == pytest.approx(np.mean(terms), rel=1e-5)
    assert model(ids).loss is None


def test_labels_that_transformers_refuses_are_refused_by_name(zoo):
    """A wrong shape would broadcast and -5 would index from the end: both a silent wrong loss."""
    model, oracle = zoo.model("gqa"), zoo.oracle("gqa")
    ids = random_ids(2, 4, seed=11)
    vocab = model.config.vocab_size
    for labels, message in (
        ([[1, 2], [3, 4]], r"shape \[2, 4\], found \[2, 2\]"),
        ([[1, 2, -5, 3], [1, 2, 3, 4]], rf"-100 \(ignored\) or in \[0, {vocab}\), found -5"),
        ([[1, 2, vocab, 3], [1, 2, 3, 4]], f"found {vocab}"),
        (np.ones((2, 4)), "integers"),
    ):
        with pytest.raises(minphi3.GenerationError, match=message):
            model(ids, labels=labels)
        with pytest.raises((ValueError, IndexError, RuntimeError)):  # transformers refuses each too
            oracle_forward(oracle, ids, labels=np.asarray(labels).astype(np.int64) if message != "integers"
                           else np.asarray(labels))  # fmt: skip
    one = ids[:1]  # one row: labels [seq] read as [1, seq], as transformers reads them
    assert float(model(one, labels=one[0]).loss) == pytest.approx(float(model(one, labels=one).loss))
    tokens, sequences = zoo.model("token_classification"), zoo.model("sequence_classification")
    with pytest.raises(minphi3.GenerationError, match=r"in \[0, 5\), found 5"):
        tokens(ids, labels=np.full(ids.shape, 5))
    with pytest.raises(minphi3.GenerationError, match=r"shape \[2\] or \[2, 1\], found \[3\]"):
        sequences(ids, labels=[0, 1, 2])
    with pytest.raises(minphi3.GenerationError, match=r"in \[0, 3\), found 3"):
        sequences(ids, labels=[0, 3])


def _padded_at_the_end(pad_id=0):
    ids = random_ids(3, 8, seed=12)
    ids[1, 5:] = pad_id  # three trailing pads
    ids[2, 7:] = pad_id  # one trailing pad
    return ids


def test_sequence_classification(zoo):
    model, oracle = zoo.model("sequence_classification"), zoo.oracle("sequence_classification")
    ids = _padded_at_the_end()
    labels = np.array([0, 2, 1])
    ours = model(ids, labels=labels)
    theirs = oracle_forward(oracle, ids, labels=labels)
    assert _logits(ours).shape == (3, 3)
    assert_logits_close(_logits(ours), theirs.logits.numpy())
    assert float(ours.loss) == pytest.approx(float(theirs.loss), rel=1e-5)
    # The pooled score is the one at each row's last non-pad token (positions 7, 4, 6).
    full = oracle.score(oracle.model(torch.as_tensor(ids)).last_hidden_state).detach().numpy()
    pooled = full[np.arange(3), [7, 4, 6]]
    assert_logits_close(_logits(ours), pooled)
    assert np.abs(_logits(ours)[1] - full[1, 7]).max() > 1e-3


def test_sequence_classification_left_padded_with_attention_mask(zoo):
    """Left padding: transformers pools the rightmost non-pad token, the last position of every row,
    and the attention mask keeps the pads out of it."""
    model, oracle = zoo.model("sequence_classification"), zoo.oracle("sequence_classification")
    ids, mask = _left_padded([random_ids(1, n, seed=20 + n)[0] for n in (9, 6, 2)])
    labels = np.array([2, 0, 1])
    ours = model(ids, attention_mask=mask, labels=labels)
    theirs = oracle_forward(oracle, ids, attention_mask=mask, labels=labels)
    assert _logits(ours).shape == (3, 3)
    assert_logits_close(_logits(ours), theirs.logits.numpy())
    assert float(ours.loss) == pytest.approx(float(theirs.loss), rel=1e-5)
    # Each row's score is its tokens' alone: the padding is invisible.
    for row, length in enumerate((9, 6, 2)):
        alone = _logits(model(ids[row:row + 1, -length:]))
        assert_logits_close(_logits(ours)[row:row + 1], alone)
    # Without the mask the pads are attended to and the padded rows change.
    unmasked = _logits(model(ids))
    assert np.abs(unmasked[1:] - _logits(ours)[1:]).max() > 1e-3
    assert np.abs(unmasked[0] - _logits(ours)[0]).max() == 0  # row 0 has no padding


def test_sequence_classification_without_pad_token(zoo, tmp_path):
    """No pad_token_id: transformers pools the last position and refuses batches of more than one."""
    folder = tmp_path / "nopad"
    shutil.copytree(zoo.folder("sequence_classification"), folder)
    data = json.loads((folder / "config.json").read_text())
    data["pad_token_id"] = None
    (folder / "config.json").write_text(json.dumps(data))
    model = minphi3.load(folder)
    oracle = transformers.Phi3ForSequenceClassification.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = _padded_at_the_end()
    with pytest.raises(ValueError):
        oracle_forward(oracle, ids)
    with pytest.raises(minphi3.GenerationError, match="pad_token_id"):
        model(ids)
    ours = _logits(model(ids[1:2]))  # row 1 ends in pads, which are now ordinary tokens
    assert_logits_close(ours, oracle_forward(oracle, ids[1:2]).logits.numpy())
    assert np.abs(ours - _logits(zoo.model("sequence_classification")(ids[1:2]))).max() > 1e-3


def test_sequence_classification_multi_label_loss(zoo):
    model, oracle = zoo.model("sequence_classification"), zoo.oracle("sequence_classification")
    ids = _padded_at_the_end()
    labels = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=np.float32)
    ours = model(ids, labels=labels)
    theirs = oracle_forward(oracle, ids, labels=labels)
    assert float(ours.loss) == pytest.approx(float(theirs.loss), rel=1e-5)


def test_sequence_regression(zoo):
    model, oracle = zoo.model("regression"), zoo.oracle("regression")
    ids = _padded_at_the_end()
    labels = np.array([0.5, -1.25, 2.0], dtype=np.float32)
    ours = model(ids, labels=labels)
    theirs = oracle_forward(oracle, ids, labels=labels)
    assert _logits(ours).shape == (3, 1)
    assert_logits_close(_logits(ours), theirs.logits.numpy())
    assert float(ours.loss) == pytest.approx(float(theirs.loss), rel=1e-5)
    expected = np.mean((_logits(ours)[:, 0].astype(np.float64) - labels) ** 2)
    assert float(ours.loss) == pytest.approx(expected, rel=1e-5)


def test_token_classification(zoo):
    model, oracle = zoo.model("token_classification"), zoo.oracle("token_classification")
    ids = random_ids(2, 7, seed=13)
    labels = np.array([[0, 1, 2, 3, 4, -100, 0], [-100, -100, 4, 4, 1, 2, 3]])
    ours = model(ids, labels=labels)
    theirs = oracle_forward(oracle, ids, labels=labels)
    assert _logits(ours).shape == (2, 7, 5)
    assert_logits_close(_logits(ours), theirs.logits.numpy())
    assert float(ours.loss) == pytest.approx(float(theirs.loss), rel=1e-5)


# ---- float64 -------------------------------------------------------------------------------------
FLOAT64_CASES = [
    ("mha", dict(seq=9)),
    ("gqa", dict(seq=11)),
    ("window", dict(seq=24)),
    ("longrope", dict(seq=20)),
    ("longrope", dict(seq=40)),
    ("partial_tied", dict(seq=40)),
    ("gqa", dict(seq=12, padded=True)),
]


@pytest.mark.parametrize("name, case", FLOAT64_CASES)
def test_float64_against_the_lifted_oracle(zoo, name, case):
    seq = case["seq"]
    ids = random_ids(2, seq, seed=seq)
    kwargs = {}
    if case.get("padded"):
        kwargs["attention_mask"] = np.ones_like(ids)
        kwargs["attention_mask"][1, :5] = 0
    real = np.ones(ids.shape, dtype=bool) if not kwargs else kwargs["attention_mask"].astype(bool)
    model64 = zoo.model(name, "float64")
    ours = _logits(model64(ids, **kwargs))
    assert ours.dtype == np.float64
    oracle64 = zoo.oracle(name, "float64")
    with lifted_float32_steps(oracle64):
        lifted = oracle_forward(oracle64, ids, **kwargs).logits.numpy()
    difference = assert_logits_close(ours[real], lifted[real], "float64")
    if not case.get("padded"):
        # Against stock transformers (float32 islands) the float32 tolerance holds. (Not with
        # padding: stock float64 transformers casts finfo(float64).min to float32 in its softmax,
        # which gives -inf, NaN pad rows, and NaN everywhere after the next layer's matmul.)
        stock = oracle_forward(oracle64, ids, **kwargs).logits.numpy()
        assert_logits_close(ours, stock, "float32")
    # ... and float64 mode really is float64: float32 mode is much further from the lifted oracle.
    ours32 = _logits(zoo.model(name)(ids, **kwargs)).astype(np.float64)
    assert np.abs(ours32[real] - lifted[real]).max() > 100 * max(difference, 1e-14)


def test_float64_loss_is_the_float64_cross_entropy_of_the_lifted_logits(zoo):
    """transformers casts the logits to float32 for its loss even in a float64 model
    (loss_utils.py), so its loss is off by ~1e-7; minphi3's float64 loss is the float64
    cross-entropy of the lifted oracle's logits."""
    ids = random_ids(2, 12, seed=4)
    labels = ids.copy()
    labels[0, :2] = -100
    ours = zoo.model("gqa", "float64")(ids, labels=labels).loss
    oracle64 = zoo.oracle("gqa", "float64")
    with lifted_float32_steps(oracle64):
        lifted = oracle_forward(oracle64, ids, labels=labels)
    golden = torch.nn.functional.cross_entropy(
        lifted.logits[:, :-1].reshape(-1, lifted.logits.shape[-1]), torch.as_tensor(labels[:, 1:]).reshape(-1),
        ignore_index=-100,
    )  # fmt: skip
    assert golden.dtype == torch.float64
    assert abs(float(ours) - float(golden)) <= FLOAT64_TOLERANCE
    assert abs(float(ours) - float(lifted.loss)) > 10 * abs(float(ours) - float(golden))  # the float32 cast


def test_float64_tolerance_is_absolute():
    """1e-9 absolute for float64 (issue 2), not scaled by large logits; float32 stays relative."""
    theirs = np.array([1e4, -3.0, 0.5])
    assert assert_logits_close(theirs + 5e-10, theirs, "float64") == pytest.approx(5e-10, rel=1e-3)
    assert FLOAT64_TOLERANCE == 1e-9
    with pytest.raises(AssertionError, match="max .delta."):
        assert_logits_close(theirs + np.array([0.0, 0.0, 2e-9]), theirs, "float64")
    with pytest.raises(AssertionError):
        assert_logits_close(theirs + np.array([1e-8, 0.0, 0.0]), theirs, "float64")  # 1e-12 relative: still too far
    assert_logits_close(theirs + 0.5, theirs, "float32")  # 0.5 <= 1e-4 * 1e4
    with pytest.raises(AssertionError):
        assert_logits_close(theirs + 1.5, theirs, "float32")


# ---- call interface -------------------------------------------------------------------------------
KEEP_ARRAYS = {
    "per-row positions": np.array([[1, 8], [0, -2]]),
    "one bool mask for every row": np.arange(9) % 3 == 0,
    "a bool mask per row (flattened)": np.arange(18).reshape(2, 9) % 4 == 1,
}


@pytest.mark.parametrize("form", sorted(KEEP_ARRAYS))
def test_logits_to_keep_arrays_as_transformers(zoo, form):
    # transformers' slice_logits_to_keep: 2-D integers pick positions per row; a bool mask keeps
    # the marked positions, and a 2-D one flattens them to [count, vocab].
    keep = KEEP_ARRAYS[form]
    model, oracle = zoo.model("mha"), zoo.oracle("mha")
    ids = random_ids(2, 9, seed=14)
    ours = _logits(model(ids, logits_to_keep=keep))
    with torch.no_grad():
        theirs = oracle(torch.as_tensor(ids), logits_to_keep=torch.as_tensor(keep)).logits.numpy()
    assert ours.shape == theirs.shape
    assert_logits_close(ours, theirs)


@pytest.mark.parametrize("keep, message", [
    (np.ones(8, dtype=bool), "shape"),
    (np.ones((3, 9), dtype=bool), "shape"),
    ([0, 9], "outside"),
    (np.array([[0], [-10]]), "outside"),
    (np.array([[0, 1]]), "one row per batch row"),
    (np.zeros((2, 9, 1), dtype=np.int64), "3 dimensions"),
    (np.array([0.5]), "float64"),
    ("last", "logits_to_keep must be"),
    (-1, ">= 0"),
])  # fmt: skip
def test_bad_logits_to_keep_is_refused(zoo, keep, message):
    with pytest.raises(minphi3.GenerationError, match=message):
        zoo.model("mha")(random_ids(2, 9), logits_to_keep=keep)


def test_labels_need_every_position(zoo):
    ids = random_ids(2, 9)
    with pytest.raises(minphi3.GenerationError, match="labels need the logits of every position"):
        zoo.model("mha")(ids, labels=ids, logits_to_keep=1)
    assert zoo.model("mha")(ids, labels=ids, logits_to_keep=9).loss is not None


@pytest.mark.parametrize("keep", [1, 3, 0, [0, 5, 7], np.array([8, 2])])
def test_logits_to_keep(zoo, keep):
    model, oracle = zoo.model("mha"), zoo.oracle("mha")
    ids = random_ids(2, 9, seed=14)
    ours = _logits(model(ids, logits_to_keep=keep))
    theirs_keep = keep if isinstance(keep, int) else torch.as_tensor(np.asarray(keep))
    with torch.no_grad():
        theirs = oracle(torch.as_tensor(ids), logits_to_keep=theirs_keep).logits.numpy()
    kept = 9 if isinstance(keep, int) and keep == 0 else (keep if isinstance(keep, int) else len(keep))
    assert ours.shape == (2, kept, 96)
    assert_logits_close(ours, theirs)
    full = _logits(model(ids))
    indices = np.arange(9)[-kept:] if isinstance(keep, int) else np.asarray(keep)
    np.testing.assert_allclose(ours, full[:, indices], rtol=1e-6, atol=1e-6)


def test_float16_mode_runs_close_to_float32(zoo):
    model16 = zoo.model("gqa", "float16")
    assert model16.params["model.embed_tokens.weight"].dtype == np.float16
    ids = random_ids(2, 10, seed=15)
    out16 = _logits(model16(ids))
    out32 = _logits(zoo.model("gqa")(ids))
    assert out16.dtype == np.float16
    assert np.isfinite(out16).all()
    scale = np.abs(out32).max()
    _close(out16, out32, 2e-2 * scale)
    assert (out16.argmax(-1) == out32.argmax(-1)).mean() > 0.9


def test_nested_list_input_ids(zoo):
    model = zoo.model("mha")
    ids = random_ids(2, 6, seed=16)
    from_lists = _logits(model(ids.tolist()))
    np.testing.assert_array_equal(from_lists, _logits(model(ids)))
    single_row = _logits(model(ids[0].tolist()))  # a flat list is one row
    np.testing.assert_array_equal(single_row, from_lists[:1])


def test_to_numpy_returns_ndarray(zoo):
    out = zoo.model("mha")(random_ids(1, 4), output_hidden_states=True)
    logits = minphi3.to_numpy(out.logits)
    assert type(logits) is np.ndarray
    assert logits.shape == (1, 4, 96)
    hidden = minphi3.to_numpy(out.hidden_states)
    assert isinstance(hidden, tuple) and all(type(h) is np.ndarray for h in hidden)
    assert minphi3.to_numpy(None) is None


def test_bad_input_ids_are_refused(zoo):
    model = zoo.model("mha")
    with pytest.raises(minphi3.GenerationError, match="out of range"):
        model([[1, 2, 96]])
    with pytest.raises(minphi3.GenerationError, match="out of range"):
        model([[-1, 2]])
    with pytest.raises(minphi3.GenerationError, match="empty"):
        model(np.zeros((1, 0), dtype=np.int64))
    with pytest.raises(minphi3.GenerationError, match="integers"):
        model(np.array([[1.0, 2.0]]))


def test_loss_over_no_counted_token_is_nan_like_transformers(tmp_path):
    from tiny_checkpoints import load_oracle, oracle_forward, random_ids, save_tiny

    folder = save_tiny(tmp_path / "m")
    ids = random_ids(1, 6)
    labels = np.full_like(ids, -100)
    theirs = oracle_forward(load_oracle(folder), ids, labels=labels).loss
    ours = minphi3.load(folder)(ids, labels=labels).loss
    assert np.isnan(float(theirs)) and np.isnan(float(ours))


def test_negative_position_ids_run_as_in_transformers(zoo):
    """cumsum(mask) - 1 without the clamp puts -1 on left pads; transformers rotates by it."""
    model, oracle = zoo.model("gqa"), zoo.oracle("gqa")
    ids, mask = _left_padded([random_ids(1, 8, seed=1)[0], random_ids(1, 5, seed=2)[0]])
    positions = np.cumsum(mask, axis=1) - 1
    assert positions.min() < 0
    ours = _logits(model(ids, attention_mask=mask, position_ids=positions))
    theirs = oracle_forward(oracle, ids, attention_mask=mask, position_ids=positions).logits.numpy()
    assert_logits_close(ours, theirs)


@pytest.mark.parametrize("name", ["gqa", "longrope", "partial_tied"])
def test_layers_run_one_by_one_on_step_context_reproduce_the_model(zoo, name):
    """model.step_context(seq) is what a plain call shares between its layers (the lessons run
    the layers one at a time on it); LongRoPE's long factors included past the switch."""
    model = zoo.model(name)
    for seq in (9, 40):
        ids = random_ids(1, seq, seed=seq)
        out = model(ids, output_hidden_states=True)
        step = model.step_context(seq)
        x = out.hidden_states[0]
        for layer, weights in enumerate(model.layers):
            x, _ = model.decoder_layer(x, weights, model.config, layer, step)
            np.testing.assert_array_equal(minphi3.to_numpy(x), minphi3.to_numpy(out.layer_outputs[layer]))
