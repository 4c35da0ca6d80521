"""Shared fixtures: a zoo of tiny random checkpoints, each written once per test session.

`zoo.folder(name)` writes the checkpoint `name` (see CHECKPOINTS) with transformers'
`save_pretrained` the first time it is asked for and returns its folder afterwards;
`zoo.oracle(name, dtype)` is the transformers model loaded back from that folder (eager, float32 or
float64); `zoo.model(name, dtype)` is minphi3's model loaded from the same folder. Building each
checkpoint once keeps the parity suites fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_checkpoints import longrope_scaling  # noqa: E402

# A Phi-3-mini-128k-like LongRoPE in tiny form: head_dim 8, original context 32, max 128.
LONGROPE = dict(
    rope_scaling=longrope_scaling(8, seed=1),
    max_position_embeddings=128,
    original_max_position_embeddings=32,
)

# name -> keyword arguments of tiny_checkpoints.save_tiny
CHECKPOINTS = {
    "mha": dict(seed=1),
    "gqa": dict(seed=2, num_key_value_heads=2),
    "window": dict(seed=3, sliding_window=5),
    "window_gqa": dict(seed=4, sliding_window=4, num_key_value_heads=2),
    "longrope": dict(seed=5, **LONGROPE),
    "longrope_attention_factor": dict(
        seed=5, **{**LONGROPE, "rope_scaling": longrope_scaling(8, seed=1, attention_factor=1.37)}
    ),
    "longrope_attention_factor_one": dict(
        seed=5, **{**LONGROPE, "rope_scaling": longrope_scaling(8, seed=1, attention_factor=1.0)}
    ),
    # Phi-4-mini in tiny form: 6 query heads over 2 kv heads (24/8), head_dim 16 of which 12
    # rotate (partial_rotary_factor 0.75), LongRoPE, tied embeddings, a theta other than 10000.
    "partial_tied": dict(
        seed=6,
        hidden_size=96,
        intermediate_size=64,
        num_attention_heads=6,
        num_key_value_heads=2,
        partial_rotary_factor=0.75,
        tie_word_embeddings=True,
        rope_theta=5000.0,
        rope_scaling=longrope_scaling(12, seed=2),
        max_position_embeddings=128,
        original_max_position_embeddings=32,
    ),
    "sharded_bf16": dict(seed=7, num_key_value_heads=2, storage_dtype="bfloat16", max_shard_size="20KB"),
    "float16_stored": dict(seed=8, storage_dtype="float16"),
    "sequence_classification": dict(seed=9, architecture="Phi3ForSequenceClassification", num_labels=3),
    "regression": dict(seed=10, architecture="Phi3ForSequenceClassification", num_labels=1),
    "token_classification": dict(seed=11, architecture="Phi3ForTokenClassification", num_labels=5),
}


class Zoo:
    """Tiny checkpoints, their transformers oracles and minphi3 models, each made once."""

    def __init__(self, root: Path):
        self.root = root
        self._folders: dict[str, Path] = {}
        self._oracles: dict[tuple[str, str], object] = {}
        self._models: dict[tuple[str, str], object] = {}

    def architecture(self, name: str) -> str:
        return CHECKPOINTS[name].get("architecture", "Phi3ForCausalLM")

    def folder(self, name: str) -> Path:
        if name not in self._folders:
            from tiny_checkpoints import save_tiny

            folder = self.root / name
            save_tiny(folder, **CHECKPOINTS[name])
            self._folders[name] = folder
        return self._folders[name]

    def oracle(self, name: str, dtype: str = "float32"):
        key = (name, dtype)
        if key not in self._oracles:
            from tiny_checkpoints import load_oracle

            self._oracles[key] = load_oracle(self.folder(name), self.architecture(name), dtype)
        oracle = self._oracles[key]
        if hasattr(oracle.config, "problem_type"):
            oracle.config.problem_type = None  # transformers sets it on the first loss computed
        return oracle

    def model(self, name: str, dtype: str = "float32"):
        key = (name, dtype)
        if key not in self._models:
            import minphi3

            self._models[key] = minphi3.load(self.folder(name), dtype=dtype)
        return self._models[key]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("tiny"))


def pytest_terminal_summary(terminalreporter):
    """The bad-input corpus's tally (tests/test_bad_inputs.py), when any of its cases ran."""
    bad_inputs = sys.modules.get("bad_inputs")
    line = bad_inputs.summary_line() if bad_inputs is not None else None
    if line:
        terminalreporter.write_line(line)
