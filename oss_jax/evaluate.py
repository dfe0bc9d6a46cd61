"""Exact-match evaluation on held-out questions, per task family and reasoning effort.

    oss-jax eval                       # the bundled model: packed MXFP4 experts vs decoded to bf16
    oss-jax eval --model runs/tiny/model --per-cell 100 --json

Questions come from the held-out split of ``oss_jax.data`` (keys the training stream never
draws). Each is asked through ``chat``'s path exactly (harmony prompt, greedy generation until
``<|return|>``, harmony parse), and counts as correct when the parsed final answer equals the
expected one exactly.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence

import numpy as np

from oss_jax import boundary, data, harmony
from oss_jax.generate import PAD, generate
from oss_jax.model import GptOss

MAX_NEW = {"low": 32, "medium": 64, "high": 160}  # tokens; the longest completions are 14, 43, 103


@dataclasses.dataclass
class Cell:
    """Results for one (family, effort): ``correct`` of ``n``, mean analysis length in tokens."""

    family: str
    effort: str
    n: int
    correct: int
    analysis_tokens: float
    examples: list[dict] = dataclasses.field(default_factory=list, repr=False)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")


def evaluate(model: GptOss, *, per_cell: int = 50, seed: int = 1234, families: Sequence[str] = data.FAMILIES,
             efforts: Sequence[str] = data.EFFORTS, keep_examples: int = 3, style: str | None = None) -> list[Cell]:
    """Ask ``per_cell`` held-out questions of every family at every effort (greedy). ``families`` may name
    ``data.NEW_FAMILIES`` too (``("sub",)``: the fine-tuning experiment's family). ``style``: how the
    questions are written (``data.STYLES``); default the style the model was trained in (``trained_style``).

    Returns one :class:`Cell` per (family, effort), with up to ``keep_examples`` transcripts.
    """
    vocab = model.config.vocab_size
    if not boundary.reads_harmony(model):  # ids up to harmony.CALL, the largest special id a conversation uses
        raise ValueError(f"this model cannot read harmony conversations (vocabulary of {vocab} ids, no token map): "
                         "eval needs an o200k_harmony model or one trained on oss_jax.data")
    if isinstance(per_cell, bool) or not isinstance(per_cell, numbers.Integral) or per_cell < 1:
        raise ValueError(f"per_cell must be an integer >= 1, got {per_cell!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    for name, given, known in (("family", families, data.ALL_FAMILIES), ("effort", efforts, data.EFFORTS)):
        if unknown := [x for x in given if x not in known]:
            raise ValueError(f"unknown {name} {unknown[0]!r}: use {', '.join(known)}")
    style = trained_style(model) if style is None else style
    if style not in data.STYLES:
        raise ValueError(f"unknown trace style {style!r}: use {', '.join(data.STYLES)}")
    cells = []
    for family in families:
        for effort in efforts:
            rng = np.random.default_rng([seed, data.ALL_FAMILIES.index(family), data.EFFORTS.index(effort)])
            exs = [data.make(family, effort, rng, heldout=True, style=style) for _ in range(per_cell)]
            out = generate(model, [harmony.render(ex.question, effort) for ex in exs], max_new_tokens=MAX_NEW[effort],
                           temperature=0.0, stop_tokens=harmony.STOP_TOKENS)
            correct, lengths, kept = 0, [], []
            for ex, row in zip(exs, out, strict=True):
                reply = harmony.Reply.from_tokens([int(t) for t in row if t != PAD])
                ok = reply.final.strip() == ex.final
                correct += ok
                lengths.append(len(data.assistant_tokens(reply.analysis, family, style)) if reply.analysis else 0)
                if len(kept) < keep_examples:
                    kept.append({"question": ex.question, "expected": ex.final, "final": reply.final,
                                 "analysis": reply.analysis, "correct": bool(ok)})
            cells.append(Cell(family, effort, per_cell, correct, float(np.mean(lengths)), kept))
    return cells


def trained_style(model: GptOss) -> str:
    """The trace style (``data.STYLES``) of the questions ``model`` was trained on: the one its token map
    records; ``"v1"`` for a small model saved before styles were recorded; ``data.STYLE`` for a model with
    o200k's whole vocabulary (gpt-oss reads any of them)."""
    tmap = model.token_map
    return data.STYLE if tmap is None else tmap.style or "v1"


def table(results: dict[str, list[Cell]]) -> str:
    """A markdown table: one row per family and effort, one accuracy column per evaluated variant,
    then the mean analysis length (tokens) of the first variant."""
    names = list(results)
    first = results[names[0]]
    lines = ["| family | effort | " + " | ".join(f"{n} accuracy" for n in names) + " | analysis tokens |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for i, cell in enumerate(first):
        accs = " | ".join(f"{results[n][i].accuracy:.1%} ({results[n][i].correct}/{results[n][i].n})" for n in names)
        lines.append(f"| {cell.family} | {cell.effort} | {accs} | {cell.analysis_tokens:.1f} |")
    for effort in dict.fromkeys(c.effort for c in first):
        sel = [i for i, c in enumerate(first) if c.effort == effort]
        accs = " | ".join(f"{np.mean([results[n][i].accuracy for i in sel]):.1%}" for n in names)
        length = np.mean([first[i].analysis_tokens for i in sel])
        lines.append(f"| **all** | {effort} | {accs} | {length:.1f} |")
    return "\n".join(lines)


def as_json(results: dict[str, list[Cell]]) -> dict:
    """``{variant: [cell dicts]}`` for ``--json`` and the shipped ``eval.json``."""
    return {name: [{**dataclasses.asdict(c), "accuracy": c.accuracy} for c in cells]
            for name, cells in results.items()}
