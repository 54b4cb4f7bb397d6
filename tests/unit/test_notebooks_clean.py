"""The notebooks are committed clean: valid, no outputs, and on the package's public API only.

Executing them is ``tests/integration/test_notebooks.py``'s job. After running a notebook, clear
its outputs before committing: Jupyter's *Edit > Clear Outputs of All Cells*, or

    .venv/bin/python tests/unit/test_notebooks_clean.py notebooks/*.ipynb
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
EXPECTED = {"quickstart.ipynb", "benchmark_report.ipynb"}
HOW = "clear outputs with `.venv/bin/python tests/unit/test_notebooks_clean.py notebooks/*.ipynb`"


def strip(path: Path) -> None:
    """Remove outputs and execution counts from a notebook, in place."""
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
    nbformat.write(notebook, path)


def _paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_the_notebooks_exist() -> None:
    assert {p.name for p in _paths()} >= EXPECTED


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p.name)
def test_notebook_is_valid_and_has_no_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], f"{path.name} cell {index} has outputs: {HOW}"
        assert cell.execution_count is None, f"{path.name} cell {index} was run: {HOW}"


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p.name)
def test_notebook_uses_public_names_only(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    private = re.findall(r"from ray_worker[\w.]* import [^\n]*\b_\w+|ray_worker[\w.]*\._\w+", code)
    assert not private, f"{path.name} reaches into private names: {private}"


if __name__ == "__main__":
    import sys

    for arg in sys.argv[1:]:
        strip(Path(arg))
