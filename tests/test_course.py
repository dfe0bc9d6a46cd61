"""``oss_jax.course``: the notebooks' shared setup (figure style, ``save``), and that every notebook uses it."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import nbformat
import pytest
from matplotlib.figure import Figure
from PIL import Image

from oss_jax import course

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_saver_writes_numbered_png(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(course, "ROOT", tmp_path)
    monkeypatch.setattr(course, "FIGURES", tmp_path / "figures")  # not there yet: save creates it
    fig = Figure(figsize=(2, 1))
    fig.add_subplot().plot([0, 1])
    path = course.saver("07")(fig, "parity")
    assert path == tmp_path / "figures" / "07-parity.png"
    assert capsys.readouterr().out == "saved figures/07-parity.png\n"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.info["dpi"] == pytest.approx((150, 150), abs=0.1)  # as the notebooks saved before


def test_style_sets_grid_or_not():
    with matplotlib.rc_context():
        course.style()
        assert matplotlib.rcParams["axes.grid"] and matplotlib.rcParams["grid.alpha"] == 0.3
        assert not matplotlib.rcParams["axes.spines.top"] and not matplotlib.rcParams["axes.spines.right"]
        course.style(grid=False)
        assert not matplotlib.rcParams["axes.grid"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_saves_under_its_number(path: Path):
    # The setup is imported, not copied, and each notebook's figures carry its own number ("01b" included).
    code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    assert "from oss_jax.course import" in code and "def repo_root" not in code and "def save(" not in code
    assert re.findall(r"\bsave = saver\(\"(\d\d[a-z]?)\"\)", code) == [path.name.split("-")[0]]
