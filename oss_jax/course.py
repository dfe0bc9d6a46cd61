"""The notebooks' shared setup: where figures go, the course's colours and figure style.

A notebook's setup cell imports the colours it uses, applies the style and makes its ``save``::

    from oss_jax.course import BLUE, ORANGE, saver, style

    style()
    save = saver("01")  # save(fig, "params") writes figures/01-params.png

The colours are Okabe and Ito's palette (https://jfly.uni-koeln.de/color/), distinguishable under the
common colour-vision deficiencies, plus a neutral grey. (:mod:`oss_jax.plots` colours expert ids with
Paul Tol's "muted" palette instead: it has more colours.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from oss_jax import data

BLUE = "#0072B2"
ORANGE = "#E69F00"
GREEN = "#009E73"  # Okabe-Ito's "bluish green"
VERMILLION = "#D55E00"
PURPLE = "#CC79A7"  # "reddish purple"
SKY = "#56B4E9"  # "sky blue"
YELLOW = "#F0E442"
BLACK = "#000000"
GREY = "#7F7F7F"  # not Okabe-Ito's: for baselines and the "other" category

LAYER_COLOURS = (BLUE, ORANGE, GREEN, VERMILLION, PURPLE, SKY, BLACK, GREY)  # one per layer of the tiny model
FAMILY_COLOURS = dict(zip(data.FAMILIES, (BLUE, ORANGE, GREEN, VERMILLION, PURPLE), strict=True))
CHANNEL_COLOURS = {"analysis": BLUE, "final": ORANGE, "structure": GREY}  # harmony channels, and the tokens around

DPI = 150  # of the saved PNGs; the notebook shows figures at 100


def repo_root() -> Path:
    """The checkout holding the notebooks: the first folder, going up from the working directory
    (``notebooks/`` under JupyterLab and the tests) or else from this package, that has both
    ``pyproject.toml`` and ``oss_jax/``; else the working directory."""
    for start in (Path.cwd().resolve(), Path(__file__).resolve().parent):
        for d in (start, *start.parents):
            if (d / "pyproject.toml").is_file() and (d / "oss_jax").is_dir():
                return d
    return Path.cwd()


ROOT = repo_root()
FIGURES = ROOT / "figures"


def style(*, grid: bool = True) -> None:
    """Apply the course's figure style to matplotlib's rcParams: no top or right spines, and a faint grid
    unless ``grid=False``."""
    rc: dict[str, object] = {"figure.dpi": 100, "axes.spines.top": False, "axes.spines.right": False,
                             "axes.grid": grid}
    if grid:
        rc["grid.alpha"] = 0.3
    matplotlib.rcParams.update(rc)


def saver(prefix: str) -> Callable[[Figure, str], Path]:
    """``save(fig, name)`` for one notebook: writes ``FIGURES / f"{prefix}-{name}.png"`` (150 dpi, cropped
    to the drawing), prints ``saved figures/<prefix>-<name>.png`` and returns the path."""

    def save(fig: Figure, name: str) -> Path:
        FIGURES.mkdir(parents=True, exist_ok=True)
        path = FIGURES / f"{prefix}-{name}.png"
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
        print("saved", path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
        return path

    return save
