"""The README's "Logits in five lines" example runs as written, on a tiny checkpoint.

The block is taken from README.md itself (the first ```python block after that heading), so an
edit to the README that breaks the example breaks this test. Only the checkpoint path and the
token ids are substituted: the README's ids belong to Phi-3's 32064-token vocabulary.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from tiny_checkpoints import save_tiny

import minphi3

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "Logits in five lines"
README_PATH = "path/to/Phi-3-mini-4k-instruct"
TINY_IDS = [[1, 45, 74, 31, 34, 33]]  # six ids, as in the README, below the tiny vocab_size of 96


def five_lines_block() -> str:
    """The first ```python block after the heading "Logits in five lines"."""
    text = README.read_text(encoding="utf-8")
    heading = re.search(rf"^#+ {re.escape(HEADING)}\s*$", text, flags=re.MULTILINE)
    assert heading, f"README.md has no heading {HEADING!r}"
    block = re.search(r"^```python\n(.*?)^```", text[heading.end():], flags=re.MULTILINE | re.DOTALL)
    assert block, f"no ```python block after {HEADING!r}"
    return block.group(1)


def substituted(code: str, folder: Path) -> str:
    """The block with the tiny checkpoint's folder and ids in place of the README's."""
    assert code.count(README_PATH) == 1, "the example no longer loads the path this test substitutes"
    code = code.replace(README_PATH, str(folder))
    ids = re.findall(r"model\((\[\[[\d,\s]+\]\])", code)
    assert len(ids) == 1, "the example no longer calls model([[ids]]) once"
    return code.replace(ids[0], repr(TINY_IDS))


def test_the_block_is_the_five_line_example():
    code = five_lines_block()
    assert "import minphi3" in code and "minphi3.load(" in code and "print(" in code
    assert len([line for line in code.splitlines() if line.strip()]) == 5


def test_logits_in_five_lines_runs_and_prints_the_logits_shape(tmp_path, capsys):
    folder = save_tiny(tmp_path / "tiny", seed=50)
    namespace: dict = {}
    exec(compile(substituted(five_lines_block(), folder), str(README), "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out.strip()
    config = minphi3.load_config(folder)
    # logits [batch, seq, vocab]; hidden states: the embeddings and one per layer
    assert printed == f"(1, {len(TINY_IDS[0])}, {config.vocab_size}) {config.num_hidden_layers + 1}"
    expected = minphi3.load(folder)(TINY_IDS).logits
    np.testing.assert_array_equal(namespace["logits"], expected)
    assert type(namespace["logits"]) is np.ndarray

