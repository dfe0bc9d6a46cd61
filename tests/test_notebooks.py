"""Every course notebook runs top to bottom, and is stored without outputs.

Notebooks execute with nbclient in the ``python3`` kernel, with ``notebooks/`` as the working
directory (as under ``make lab``) and JAX on the CPU. The ``python3`` kernelspec that ipykernel
installs into the venv launches ``python``, which jupyter_client replaces by ``sys.executable``:
the kernel runs in the interpreter running pytest, with no kernelspec to install by hand.
``test_kernel_is_this_python`` checks that.

A notebook that reads its ``MODEL`` with ``oss_jax.course.notebook_model`` runs twice: on its default
(the bundled model, offline) and, through ``$OSS_JAX_MODEL``, on a small random checkpoint written by
``scripts/make_random_checkpoint.py`` with the real config layout, MXFP4 experts and the whole o200k
vocabulary (201,088 ids), hidden size 64 and 2 layers so that the 201k-row tables stay cheap. That runs
each notebook's branch for a real gpt-oss (natural text rendered with harmony, no tiny-task evaluation),
so that it cannot rot.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from oss_jax import harmony
from oss_jax.config import GPT_OSS_20B
from oss_jax.course import FIGURES_VARIABLE, MODEL_VARIABLE

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "python3"
CELL_TIMEOUT_S = 300
# The notebooks whose MODEL may name a real gpt-oss, read with oss_jax.course.notebook_model.
TAKES_MODEL = [p for p in NOTEBOOKS if "notebook_model(" in p.read_text()]
# gpt-oss-20b's config layout (every key, MXFP4 experts, 32 experts of which 4 per token, the 128-token
# window, the whole o200k vocabulary), shrunk where the cost is: hidden size, heads, layers.
REAL_LAYOUT = GPT_OSS_20B.replace(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16)


def _run(nb: nbformat.NotebookNode, **env_vars: str) -> nbformat.NotebookNode:
    """Execute ``nb`` in place; nbclient raises ``CellExecutionError`` on the first failing cell."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **env_vars}
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


@pytest.fixture(scope="module")
def real_layout_dir(tmp_path_factory) -> Path:
    """A random checkpoint of the real layout with the whole o200k vocabulary (about 52 MB)."""
    write = runpy.run_path(str(ROOT / "scripts" / "make_random_checkpoint.py"))["write_random_checkpoint"]
    return write(tmp_path_factory.mktemp("real-layout") / "gpt-oss-small", REAL_LAYOUT, seed=0)


def test_concept_notebooks_take_model():
    # Notebooks 01 to 11 all accept a real checkpoint, so all of them run the second time below.
    concept = {p.name for p in NOTEBOOKS if p.name[:2].isdigit() and p.name[2] == "-" and "01" <= p.name[:2] <= "11"}
    assert concept <= {p.name for p in TAKES_MODEL}, sorted(concept - {p.name for p in TAKES_MODEL})
    assert REAL_LAYOUT.vocab_size == harmony.VOCAB_SIZE and REAL_LAYOUT.quant_method == "mxfp4"


@pytest.mark.parametrize("path", TAKES_MODEL, ids=lambda p: p.name)
def test_notebook_runs_on_real_layout(path: Path, real_layout_dir: Path, tmp_path: Path):
    # Its figures (of a random model) go to tmp_path, not over the course's figures/.
    nb = _run(nbformat.read(path, as_version=4), **{MODEL_VARIABLE: str(real_layout_dir),
                                                    FIGURES_VARIABLE: str(tmp_path)})
    # The MODEL cell really took the checkpoint: its path appears in what the notebook printed.
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert real_layout_dir.name in printed, f"{path.name} never printed {real_layout_dir.name}: MODEL not taken"
    saved = sorted(line.split()[1] for line in printed.splitlines() if line.startswith("saved "))
    assert saved == sorted(str(p) for p in tmp_path.glob("*.png")), "figures not redirected to $OSS_JAX_FIGURES"
