"""The notebooks' shared setup: where figures go, the course's colours and figure style.

A notebook's setup cell imports the colours it uses, applies the style and makes its ``save``::

    from oss_jax.course import BLUE, ORANGE, saver, style

    style()
    save = saver("01")  # save(fig, "params") writes figures/01-params.png

The colours are Okabe and Ito's palette (https://jfly.uni-koeln.de/color/), distinguishable under the
common colour-vision deficiencies, plus a neutral grey. (:mod:`oss_jax.plots` colours expert ids with
Paul Tol's "muted" palette instead: it has more colours.)

A notebook that runs a model reads its ``MODEL`` with :func:`notebook_model` (``$OSS_JAX_MODEL`` when set,
which the tests use to run every notebook on a random checkpoint of the real layout too) and asks
:func:`conversations` for something to read: the bundled model's own synthetic conversations, or natural
text rendered with harmony (:data:`NATURAL_TEXT`) for a model that reads all of o200k, as a real gpt-oss
does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from oss_jax import data, harmony

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


FIGURES_VARIABLE = "OSS_JAX_FIGURES"  # when set, figures go there instead (the tests' runs on a random checkpoint)


def saver(prefix: str) -> Callable[[Figure, str], Path]:
    """``save(fig, name)`` for one notebook: writes ``FIGURES / f"{prefix}-{name}.png"`` (150 dpi, cropped
    to the drawing; the folder ``$OSS_JAX_FIGURES`` instead when that is set), prints
    ``saved figures/<prefix>-<name>.png`` and returns the path."""

    def save(fig: Figure, name: str) -> Path:
        folder = Path(os.environ[FIGURES_VARIABLE]) if os.environ.get(FIGURES_VARIABLE) else FIGURES
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{prefix}-{name}.png"
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
        print("saved", path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
        return path

    return save


# -- which model, and what it reads ---------------------------------------------------------------------
MODEL_VARIABLE = "OSS_JAX_MODEL"


def notebook_model(default: str | None = "tiny") -> str | None:
    """A notebook's ``MODEL``: the environment variable ``OSS_JAX_MODEL`` when it is set and not empty,
    else ``default``. The tests set it to a small random checkpoint with the real layout and the whole
    o200k vocabulary, so that each notebook's branch for a real gpt-oss runs too; a student simply
    writes ``MODEL = "openai/gpt-oss-20b"`` instead."""
    value = os.environ.get(MODEL_VARIABLE, "").strip()
    return value or default


def reads_o200k(model: Any) -> bool:
    """True for a model whose ids are o200k ids (a real gpt-oss, or a random checkpoint of its layout),
    False for one with a vocabulary of its own (``model.token_map``: the bundled model, which knows only
    the tokens of ``oss_jax.data``'s conversations)."""
    return getattr(model, "token_map", None) is None


@dataclass
class Conversation:
    """One conversation for a model to read whole (teacher forcing): the harmony prompt, ending with
    ``<|start|>assistant``, and the reference completion after it, both as o200k ids."""

    label: str  # the task family (oss_jax.data) or the domain of a natural conversation
    effort: str
    question: str
    analysis: str  # empty: no analysis message
    final: str
    prompt: list[int]
    completion: list[int]

    @property
    def tokens(self) -> list[int]:
        """``prompt + completion``."""
        return self.prompt + self.completion


# Natural conversations (domain, question, analysis, final) for a model that reads all of o200k. The
# numbers and words are tokenized by o200k as gpt-oss reads them: unlike oss_jax.data, no digit is split
# off. The first history question is long, so that its prompt outlasts gpt-oss's 128-token window.
NATURAL_TEXT: tuple[tuple[str, str, str, str], ...] = (
    ("science", "Why is the sky blue?",
     "The user asks why the sky is blue. Explain Rayleigh scattering: molecules of air scatter short "
     "wavelengths much more strongly than long ones, roughly as the inverse fourth power of the wavelength. "
     "Mention sunsets as the contrast. Keep it short.",
     "Sunlight contains every colour. The molecules of the air scatter short, blue wavelengths far more "
     "than long, red ones, so blue light is scattered across the whole sky and reaches your eyes from "
     "every direction. At sunset the light crosses much more air, most of the blue is scattered away "
     "before it arrives, and the sky near the sun turns orange and red."),
    ("science", "What causes the seasons on Earth?",
     "Common misconception: distance from the sun. The real cause is the tilt of Earth's axis, about 23.4 "
     "degrees, which changes the angle of sunlight and the length of the day over the year.",
     "The seasons come from the tilt of Earth's axis, about 23.4 degrees. When your hemisphere leans "
     "towards the sun, sunlight arrives more steeply and days are longer, so it is summer; half a year "
     "later it leans away and it is winter. The distance to the sun changes by only about 3% and is not "
     "the reason."),
    ("science", "How do vaccines train the immune system?",
     "Explain antigens, the adaptive immune response, memory B and T cells, and why a second exposure is "
     "met faster. Avoid medical advice.",
     "A vaccine shows the immune system a harmless piece or copy of a germ, its antigen. B cells learn to "
     "make antibodies that fit it and T cells learn to recognise infected cells. Some of them stay as "
     "memory cells for years, so when the real germ arrives the body responds within days instead of "
     "weeks."),
    ("history", "Summarise this paragraph in one sentence: The printing press that Johannes Gutenberg "
     "built in Mainz around 1440 combined movable metal type, an oil-based ink and a screw press adapted "
     "from wine making. Before it, books in Europe were copied by hand, mostly in monasteries, and a "
     "single Bible could take a scribe more than a year. Within fifty years presses were working in more "
     "than two hundred cities and had printed millions of copies. Cheaper books spread literacy, helped "
     "the ideas of the Reformation and of the scientific revolution travel quickly, and made it possible "
     "for scholars in different countries to read exactly the same text.",
     "Need one sentence covering Gutenberg, movable type around 1440, the speed of its spread and its "
     "effects on literacy, religion and science.",
     "Gutenberg's movable-type press of about 1440 replaced hand copying, spread to hundreds of cities "
     "within fifty years and, by making books cheap and identical, fuelled literacy, the Reformation and "
     "the scientific revolution."),
    ("history", "Who built the first practical steam engine?",
     "Thomas Newcomen, 1712, atmospheric engine for pumping water from mines. Thomas Savery's 1698 pump "
     "came earlier but was impractical. James Watt's separate condenser (1769) made it efficient.",
     "Thomas Newcomen built the first practical steam engine in 1712, to pump water out of mines. Thomas "
     "Savery had patented a steam pump in 1698, but it was unreliable, and James Watt's separate condenser "
     "of 1769 later made steam engines efficient enough to power factories."),
    ("history", "Why did the Roman Empire split into an eastern and a western half?",
     "Mention the size of the empire, Diocletian's tetrarchy in 285, Constantinople founded by "
     "Constantine in 330, and the final division between the sons of Theodosius in 395.",
     "The empire had grown too large for one ruler to defend and govern. Diocletian divided the "
     "administration in 285, Constantine founded Constantinople in 330 as a second capital, and after "
     "Theodosius I died in 395 his two sons ruled the eastern and western halves separately for good."),
    ("cooking", "How do I make a simple vinaigrette?",
     "Classic ratio three parts oil to one part vinegar, salt, pepper, optional mustard as emulsifier. "
     "Give steps.",
     "Whisk one tablespoon of vinegar with a pinch of salt, some pepper and half a teaspoon of mustard, "
     "then slowly whisk in three tablespoons of olive oil until it thickens. Taste and adjust the salt or "
     "acidity; shake it again before serving, since it separates as it stands."),
    ("cooking", "Why does bread dough need to rise?",
     "Yeast ferments sugars into carbon dioxide and alcohol; gluten traps the gas; flavour develops. "
     "Explain the purpose of proofing.",
     "While dough rises, yeast eats sugars and releases carbon dioxide, which the stretchy gluten network "
     "traps as bubbles. Those bubbles give bread its light, open crumb, and the slow fermentation also "
     "builds flavour. Without rising you would bake a dense, flat loaf."),
    ("cooking", "How long should I boil an egg for a soft yolk?",
     "Large egg from the fridge into boiling water: about 6 to 7 minutes for a set white and runny yolk. "
     "Then cold water.",
     "Lower a large egg straight from the fridge into boiling water and cook it for 6 to 7 minutes, then "
     "put it in cold water for a minute. The white will be set and the yolk soft and runny."),
    ("code", "Write a Python function that reverses a string.",
     "Slicing with a step of -1 is the idiomatic way. Provide the function and a short example.",
     "```python\ndef reverse(text: str) -> str:\n    return text[::-1]\n```\n\n"
     "`reverse(\"hello\")` returns `\"olleh\"`: the slice `[::-1]` walks the string backwards."),
    ("code", "What does git rebase do?",
     "Explain that rebase replays commits on top of another base, producing a linear history, and warn "
     "about rewriting shared history.",
     "`git rebase main` takes the commits of your branch that are not on `main` and replays them one by "
     "one on top of the latest `main`, as if you had started your work there. The history becomes a "
     "straight line, but the commits get new ids, so avoid rebasing commits that others have already "
     "pulled."),
    ("code", "How do I read a file line by line in Python?",
     "Use a with statement and iterate over the file object; mention strip for newlines and the encoding.",
     "```python\nwith open(\"notes.txt\", encoding=\"utf-8\") as f:\n    for line in f:\n"
     "        print(line.rstrip(\"\\n\"))\n```\n\nIterating over the file reads one line at a time, so "
     "even a very large file never has to fit in memory."),
    ("math", "What is the derivative of x squared times sine of x?",
     "Product rule: (x^2)' sin x + x^2 (sin x)' = 2x sin x + x^2 cos x.",
     "By the product rule, d/dx (x^2 sin x) = 2x sin x + x^2 cos x."),
    ("math", "Is 221 a prime number?",
     "Check small primes up to sqrt(221) ~ 14.9: not divisible by 2, 3, 5, 7, 11; 13 x 17 = 221. Not prime.",
     "No: 221 = 13 x 17, so it is not prime."),
    ("math", "What is the sum of the integers from 1 to 100?",
     "Gauss pairing: 50 pairs summing to 101, so 5050. Or n(n+1)/2 with n = 100.",
     "5050. Pair 1 with 100, 2 with 99, and so on: 50 pairs of 101 each, which is n(n + 1)/2 for n = 100."),
)
DOMAINS = tuple(dict.fromkeys(domain for domain, *_ in NATURAL_TEXT))
DOMAIN_COLOURS = dict(zip(DOMAINS, (BLUE, ORANGE, GREEN, VERMILLION, PURPLE), strict=True))
LABEL_COLOURS = {**FAMILY_COLOURS, **DOMAIN_COLOURS}  # a task family or a natural domain -> its colour


def completion_tokens(analysis: str, final: str) -> list[int]:
    """What gpt-oss writes after ``<|start|>assistant``: an analysis message (when ``analysis`` is not
    empty), then the final answer ended by ``<|return|>``, in o200k's own tokens."""
    out: list[int] = []
    if analysis:
        out += [harmony.CHANNEL, *harmony.encode("analysis"), harmony.MESSAGE, *harmony.encode(analysis),
                harmony.END, harmony.START, *harmony.encode("assistant")]
    return out + [harmony.CHANNEL, *harmony.encode("final"), harmony.MESSAGE, *harmony.encode(final), harmony.RETURN]


def natural_conversations(effort: str = "high") -> list[Conversation]:
    """Every conversation of :data:`NATURAL_TEXT`, its prompt rendered by ``harmony.render`` at ``effort``."""
    return [Conversation(domain, effort, question, analysis, final, harmony.render(question, effort),
                         completion_tokens(analysis, final))
            for domain, question, analysis, final in NATURAL_TEXT]


def _synthetic(family: str, effort: str, rng: np.random.Generator) -> Conversation:
    ex = data.make(family, effort, rng, heldout=True)
    prompt, completion = data.tokens(ex)
    return Conversation(family, effort, ex.question, ex.analysis, ex.final, prompt, completion)


def conversations(model: Any, per_label: int = 1, *, efforts: tuple[str, ...] = ("high",), seed: int = 0
                  ) -> dict[str, list[Conversation]]:
    """Conversations for ``model`` to read, grouped by label, the efforts taken in turn.

    A model with a vocabulary of its own (the bundled one) gets ``per_label`` held-out questions of every
    task family of ``oss_jax.data`` (drawn with ``seed``), which its vocabulary covers. A model that reads
    all of o200k gets the natural conversations of :data:`NATURAL_TEXT` by domain (at most the three of
    each domain, whatever ``per_label``).
    """
    if per_label < 1 or not efforts:
        raise ValueError(f"conversations: per_label must be >= 1 and efforts not empty, got {per_label}, {efforts}")
    if reads_o200k(model):
        out: dict[str, list[Conversation]] = {}
        for domain, question, analysis, final in NATURAL_TEXT:
            group = out.setdefault(domain, [])
            if len(group) < per_label:
                effort = efforts[len(group) % len(efforts)]
                group.append(Conversation(domain, effort, question, analysis, final, harmony.render(question, effort),
                                          completion_tokens(analysis, final)))
        return out
    return {family: [_synthetic(family, efforts[i % len(efforts)], np.random.default_rng([seed, f, i]))
                     for i in range(per_label)]
            for f, family in enumerate(data.FAMILIES)}


def conversation(model: Any, family: str = "add", effort: str = "high", *, seed: int = 4, min_prompt: int = 0
                 ) -> Conversation:
    """One conversation for ``model`` to read: a held-out ``family`` question of ``oss_jax.data`` for a
    model with a vocabulary of its own, the first natural one otherwise; with a prompt of more than
    ``min_prompt`` tokens (the first such question from seed ``seed`` on, or the longest natural prompt)."""
    if reads_o200k(model):
        natural = natural_conversations(effort)
        return next((c for c in natural if len(c.prompt) > min_prompt), max(natural, key=lambda c: len(c.prompt)))
    for s in range(seed, seed + 200):
        c = _synthetic(family, effort, np.random.default_rng(s))
        if len(c.prompt) > min_prompt:
            return c
    raise ValueError(f"conversation: no {family!r} question of oss_jax.data has a prompt of more than {min_prompt} "
                     "tokens")
