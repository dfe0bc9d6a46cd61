"""Every course notebook runs top to bottom, and is stored without outputs.

Notebooks execute with nbclient in the ``python3`` kernel, with ``notebooks/`` as the working
directory (as under ``make lab``) and JAX on the CPU. The ``python3`` kernelspec that ipykernel
installs into the venv launches ``python``, which jupyter_client replaces by ``sys.executable``:
the kernel runs in the interpreter running pytest, with no kernelspec to install by hand.
``test_kernel_is_this_python`` checks that.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "python3"
CELL_TIMEOUT_S = 300


def _run(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Execute ``nb`` in place; nbclient raises ``CellExecutionError`` on the first failing cell."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute(env=env)
    return nb


def test_notebooks_exist():
    # An empty parametrization below would skip silently; the course has notebooks.
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"
    assert NOTEBOOK_DIR / "06-mxfp4.ipynb" in NOTEBOOKS


def test_kernel_is_this_python():
    code = "import os, sys; print(sys.executable); print(os.path.realpath(sys.prefix))"
    nb = _run(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)]))
    executable, prefix = nb.cells[0].outputs[0]["text"].split()
    assert prefix == os.path.realpath(sys.prefix), (
        f"the {KERNEL!r} kernel runs {executable}, not this interpreter {sys.executable}: another "
        f"{KERNEL!r} kernelspec (see `jupyter kernelspec list`) shadows the one in this venv")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_stored_clean(path: Path):
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    assert nb.nbformat == 4
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == KERNEL
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts; clear them"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path):
    _run(nbformat.read(path, as_version=4))
