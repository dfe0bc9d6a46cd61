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


def test_saver_follows_figures_variable(tmp_path, monkeypatch, capsys):
    # The tests' runs on a random checkpoint send figures elsewhere, never over figures/.
    monkeypatch.setattr(course, "FIGURES", tmp_path / "figures")
    monkeypatch.setenv(course.FIGURES_VARIABLE, str(tmp_path / "elsewhere"))
    fig = Figure(figsize=(2, 1))
    path = course.saver("04")(fig, "sink-mass")
    assert path == tmp_path / "elsewhere" / "04-sink-mass.png" and path.is_file()
    assert not (tmp_path / "figures").exists()
    assert capsys.readouterr().out == f"saved {path}\n"


def test_notebook_model_reads_the_variable(monkeypatch):
    monkeypatch.delenv(course.MODEL_VARIABLE, raising=False)
    assert course.notebook_model("tiny") == "tiny" and course.notebook_model(None) is None
    monkeypatch.setenv(course.MODEL_VARIABLE, "  ")  # blank: as if unset
    assert course.notebook_model("tiny") == "tiny"
    monkeypatch.setenv(course.MODEL_VARIABLE, "/data/gpt-oss-20b")
    assert course.notebook_model("tiny") == "/data/gpt-oss-20b" and course.notebook_model(None) == "/data/gpt-oss-20b"


class _Model:
    def __init__(self, token_map):
        self.token_map = token_map


def test_natural_conversations_are_harmony_in_o200k_tokens():
    from oss_jax import data, harmony

    convs = course.natural_conversations("medium")
    assert [c.label for c in convs] == [d for d, *_ in course.NATURAL_TEXT] and set(course.DOMAINS) <= set(
        course.DOMAIN_COLOURS)
    for c in convs:
        assert c.prompt == harmony.render(c.question, "medium")
        assert [m.channel for m in harmony.parse(c.completion, strict=True)] == ["analysis", "final"]
        reply = harmony.Reply.from_tokens(c.completion)
        assert (reply.analysis, reply.final) == (c.analysis, c.final)
        assert c.completion[-1] == harmony.RETURN and c.tokens == c.prompt + c.completion
    # Numbers as o200k writes them, not digit by digit as the bundled model's data does.
    prime = next(c for c in convs if c.question == "Is 221 a prime number?")
    final = harmony.encode(prime.final)
    assert final == prime.completion[-1 - len(final):-1] and data.assistant_tokens(prime.final) != final


def test_conversations_follow_the_model():
    from oss_jax import data
    from oss_jax.load import TINY_DIR
    from oss_jax.vocab import TokenMap

    natural = course.conversations(_Model(None), 2, efforts=("low", "high"))
    assert list(natural) == list(course.DOMAINS)
    assert all([c.effort for c in group] == ["low", "high"] for group in natural.values())
    assert sum(map(len, course.conversations(_Model(None), 10).values())) == len(course.NATURAL_TEXT)
    tmap = TokenMap.load(TINY_DIR / "model")
    synthetic = course.conversations(_Model(tmap), 3, efforts=data.EFFORTS, seed=1)
    assert list(synthetic) == list(data.FAMILIES)
    for family, group in synthetic.items():
        assert [c.effort for c in group] == list(data.EFFORTS) and all(c.label == family for c in group)
        assert all(t in tmap for c in group for t in c.tokens), "a synthetic conversation the bundled model cannot read"
    again = course.conversations(_Model(tmap), 2, efforts=data.EFFORTS, seed=1)["add"]
    assert [c.tokens for c in again] == [c.tokens for c in synthetic["add"][:2]]  # the seed decides
    other = course.conversations(_Model(tmap), 2, efforts=data.EFFORTS, seed=2)["add"]
    assert [c.tokens for c in other] != [c.tokens for c in again]


def test_conversation_with_a_long_prompt():
    from oss_jax.load import TINY_DIR
    from oss_jax.vocab import TokenMap

    tmap = TokenMap.load(TINY_DIR / "model")
    long_lookup = course.conversation(_Model(tmap), "lookup", min_prompt=80)
    assert long_lookup.label == "lookup" and len(long_lookup.prompt) > 80
    assert len(course.conversation(_Model(None), min_prompt=128).prompt) > 128  # outlasts gpt-oss's window
    assert course.conversation(_Model(None)).question == course.NATURAL_TEXT[0][1]
    with pytest.raises(ValueError) as e:
        course.conversation(_Model(tmap), "add", min_prompt=500)
    assert str(e.value) == "conversation: no 'add' question of oss_jax.data has a prompt of more than 500 tokens"
    with pytest.raises(ValueError, match=r"per_label must be >= 1"):
        course.conversations(_Model(None), 0)
