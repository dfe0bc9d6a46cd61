"""Expert pruning: remove experts from a model, or mask them out of its router.

    from oss_jax import prune, saliency
    reap = saliency.reap_saliency(t.expert_ids, t.gates, t.expert_norms, t.num_experts)   # [L, E]
    small = prune.prune_experts(model, prune.lowest(reap, 4))     # E - 4 experts in every layer
    oss_jax.save(small, "pruned/")                                # a gpt-oss checkpoint

:func:`prune_experts` slices the router (rows and bias) and every expert tensor (dense, or MXFP4
blocks and scales, and the biases) and sets ``num_experts = E - n``. The router then takes its top-k
and softmax over the experts that remain, which is REAP's renormalisation (arXiv:2510.13999).
:func:`mask_experts` keeps all E experts but sets the dropped ones' router bias to ``-inf``, so no
token picks them (top-k and the softmax then run over the rest): its logits equal the pruned model's.
A masked model is for experiments: ``oss_jax.save`` refuses it (``oss_jax.load`` would refuse the
``-inf`` router bias); save a pruned one.

``drop`` names the experts to remove per layer: ``{layer: [experts]}`` (every layer must appear) or
a list of L lists. The configuration has one ``num_experts``, so pruning drops the same number in
every layer; masking may drop different numbers (e.g. the super experts, where they are).

On a model sharded over a mesh (``load(mesh=...)``, ``sharding.shard``), the pruned model is laid out
for its new expert count on the same mesh (experts split over ``expert`` where they divide) and runs
expert-parallel.

:func:`sweep` is REAP's experiment: accuracy against the fraction of experts removed per layer, by
saliency, by frequency and at random, and with the super experts masked (``benchmarks/pruning.py``,
``notebooks/12-routing-research.ipynb``)::

    stats = saliency.calibrate(model, [p + c for p, c in map(data.tokens, conversations)])
    rows = prune.sweep(model, stats, functools.partial(prune.accuracy, per_cell=50))
    print(prune.table(rows))

Shape letters: the legend in ``oss_jax/model.py``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from oss_jax.model import GptOss
from oss_jax.saliency import SaliencyStats

__all__ = ["CRITERIA", "FRACTIONS", "SweepRow", "accuracy", "aggregate", "choose", "lowest", "mask_experts",
           "prune_experts", "super_drop", "sweep", "table"]

# Every expert tensor of ``Experts`` (whichever exist), E first.
_EXPERT_TENSORS = ("gate_up_EDF2", "down_EFD", "gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales",
                   "gate_up_bias_EF2", "down_bias_ED")


def lowest(scores_LE, n: int) -> list[list[int]]:
    """The ``n`` experts of each layer with the lowest score (``[L, E]``, e.g. REAP saliency), ascending."""
    scores = np.asarray(scores_LE)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [L, E], got shape {scores.shape}")
    if not 0 <= n <= scores.shape[1]:
        raise ValueError(f"n must be in [0, {scores.shape[1]}] (experts per layer), got {n}")
    return [sorted(int(e) for e in np.argsort(row, kind="stable")[:n]) for row in scores]


def _drop_lists(model: GptOss, drop: Mapping[int, Sequence[int]] | Sequence[Sequence[int]],
                same: bool = True) -> list[list[int]]:
    """``drop`` checked: one sorted list of distinct expert ids per layer, all of the same length if ``same``,
    each leaving at least k experts."""
    cfg = model.config
    L, E, k = cfg.num_hidden_layers, cfg.num_experts, cfg.experts_per_token
    if isinstance(drop, Mapping):
        extra = sorted(set(drop) - set(range(L)))
        if extra:
            raise ValueError(f"drop names layers {extra} outside [0, {L})")
        missing = sorted(set(range(L)) - set(drop))
        if missing:
            raise ValueError(f"drop must name every layer (num_experts is one number for all layers); "
                             f"missing layers {missing}")
        lists = [drop[i] for i in range(L)]
    else:
        lists = list(drop)
        if len(lists) != L:
            raise ValueError(f"drop must hold one list per layer ({L}), got {len(lists)}")
    out = []
    for i, experts in enumerate(lists):
        ids = [int(e) for e in experts]
        if len(set(ids)) != len(ids):
            raise ValueError(f"drop[{i}] names an expert twice: {ids}")
        bad = [e for e in ids if not 0 <= e < E]
        if bad:
            raise ValueError(f"drop[{i}] names experts {bad} outside [0, {E})")
        out.append(sorted(ids))
    counts = sorted({len(d) for d in out})
    if same and len(counts) > 1:
        raise ValueError(f"every layer must drop the same number of experts (one num_experts), got counts "
                         f"{[len(d) for d in out]}")
    if E - counts[-1] < k:
        raise ValueError(f"dropping {counts[-1]} of {E} experts leaves {E - counts[-1]}, fewer than "
                         f"experts_per_token ({k})")
    return out


def _copy(model: GptOss) -> GptOss:
    """A new model sharing the parameter arrays (replacing a variable in it leaves ``model`` alone)."""
    return nnx.merge(*nnx.split(model))


def prune_experts(model: GptOss, drop: Mapping[int, Sequence[int]] | Sequence[Sequence[int]]) -> GptOss:
    """A new model without the experts ``drop`` names (per layer); ``model`` is not modified.

    Slices the router's rows and bias and every expert tensor along E; the new config has
    ``num_experts = E - n``. Keeps ``token_map``, ``impl`` and ``dispatch``, and the mesh of a sharded
    model (re-laid out for E - n experts). Raises a one-line ``ValueError`` for layers dropping different
    numbers of experts, or fewer than k experts left.
    """
    lists = _drop_lists(model, drop)
    cfg = model.config
    new = _copy(model)
    for block, dropped in zip(new.layers, lists, strict=True):
        keep = jnp.asarray(np.setdiff1d(np.arange(cfg.num_experts), dropped), jnp.int32)
        mlp = block.mlp
        for owner, name in [(mlp, "router_ED"), (mlp, "router_bias_E")] + [(mlp.experts, n) for n in _EXPERT_TENSORS]:
            var = getattr(owner, name, None)
            if var is None:
                continue
            setattr(owner, name, type(var)(var[...][keep]))
    new.config = cfg.replace(num_experts=cfg.num_experts - len(lists[0]))
    from oss_jax import sharding

    mesh = sharding.mesh_of(new)
    return new if mesh is None else sharding.shard(new, mesh)  # E - n may split where E did not, or not


def mask_experts(model: GptOss, drop: Mapping[int, Sequence[int]] | Sequence[Sequence[int]]) -> GptOss:
    """A new model whose router never picks the experts ``drop`` names: their router bias is ``-inf``.

    Keeps all E experts (and the config); its logits equal those of ``prune_experts(model, drop)``.
    Layers may drop different numbers of experts (none, too); each must keep at least k. The other checks
    of :func:`prune_experts`. ``model`` is not modified.
    """
    lists = _drop_lists(model, drop, same=False)
    new = _copy(model)
    for block, dropped in zip(new.layers, lists, strict=True):
        if not dropped:
            continue
        var = block.mlp.router_bias_E
        bias = var[...].at[jnp.asarray(dropped, jnp.int32)].set(-jnp.inf)
        block.mlp.router_bias_E = type(var)(bias)
    return new


# -- REAP's experiment: accuracy against the experts removed ------------------------------------------------------
CRITERIA = ("reap", "frequency", "random")  # which experts go first: least salient, least used, any
FRACTIONS = (0.0, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4)  # of the experts of every layer


@dataclasses.dataclass
class SweepRow:
    """One evaluated model of :func:`sweep`: ``criterion`` (``"none"``: the full model, one of
    :data:`CRITERIA`, or ``"super"``: the super experts masked), ``removed`` experts per layer (for
    ``"super"``: in all layers together) of ``experts``, the random ``seed`` (random only),
    ``accuracy`` per family, the experts removed, and the seconds the evaluation took."""

    criterion: str
    removed: int
    experts: int
    seed: int | None
    accuracy: dict[str, float]
    drop: list[list[int]] = dataclasses.field(repr=False, default_factory=list)
    seconds: float = 0.0

    @property
    def fraction(self) -> float:
        """Share of each layer's experts removed (for ``"super"``: of all the model's experts)."""
        return self.removed / self.experts

    @property
    def mean(self) -> float:
        """Mean accuracy over the families (each family counts the same)."""
        return float(np.mean(list(self.accuracy.values())))


def choose(stats: SaliencyStats, criterion: str, n: int, seed: int = 0) -> list[list[int]]:
    """The ``n`` experts per layer to remove by ``criterion``: ``"reap"`` the lowest REAP saliency,
    ``"frequency"`` the least often routed to, ``"random"`` drawn uniformly (by ``seed`` and ``n``)."""
    if criterion == "reap":
        return lowest(stats.reap(), n)
    if criterion == "frequency":
        return lowest(stats.frequency(), n)
    if criterion == "random":
        L, E = stats.reap().shape
        if not 0 <= n <= E:
            raise ValueError(f"n must be in [0, {E}] (experts per layer), got {n}")
        rng = np.random.default_rng([seed, n])
        return [sorted(int(e) for e in rng.choice(E, n, replace=False)) for _ in range(L)]
    raise ValueError(f"unknown criterion {criterion!r}: use {', '.join(CRITERIA)}")


def super_drop(stats: SaliencyStats, layers_fraction: float = 0.75) -> list[list[int]]:
    """The super experts of ``stats`` (``SaliencyStats.super_experts``) as a ``drop`` for :func:`mask_experts`:
    one list per layer, empty where there is none."""
    L = stats.reap().shape[0]
    out: list[list[int]] = [[] for _ in range(L)]
    for layer, expert, _ in stats.super_experts(layers_fraction):
        out[layer].append(expert)
    return out


def accuracy(model: GptOss, *, per_cell: int = 50, effort: str = "high", families: Sequence[str] | None = None,
             seed: int = 1234) -> dict[str, float]:
    """Held-out exact-match accuracy per task family at one effort (``oss_jax.evaluate``, greedy)."""
    from oss_jax import data, evaluate

    cells = evaluate.evaluate(model, per_cell=per_cell, seed=seed, efforts=(effort,),
                              families=data.FAMILIES if families is None else families, keep_examples=0)
    return {c.family: c.accuracy for c in cells}


def _counts(model: GptOss, fractions: Sequence[float]) -> list[int]:
    """``fractions`` of E as expert counts (rounded), checked, without repeats, in the order given."""
    E, k = model.config.num_experts, model.config.experts_per_token
    out: list[int] = []
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 <= f < 1:
            raise ValueError(f"fractions must be numbers in [0, 1), got {f!r}")
        n = round(f * E)
        if E - n < k:
            raise ValueError(f"fraction {f:g} removes {n} of {E} experts per layer, leaving fewer than "
                             f"experts_per_token ({k})")
        if n not in out:
            out.append(n)
    return out


def sweep(model: GptOss, stats: SaliencyStats, score: Callable[[GptOss], dict[str, float]], *,
          fractions: Sequence[float] = FRACTIONS, criteria: Sequence[str] = CRITERIA, seeds: int = 3,
          super_experts: bool = True, log: Callable[[str], None] | None = None) -> list[SweepRow]:
    """REAP's comparison: ``score`` (e.g. :func:`accuracy`) of the model with a fraction of every layer's
    experts removed (:func:`prune_experts`), for each fraction and criterion; ``seeds`` draws for
    ``"random"``. The full model is scored once (``criterion="none"``), and with ``super_experts`` the model
    with the super experts of ``stats`` masked (:func:`mask_experts`; no row when none is detected).
    ``log`` receives one line per evaluated model.
    """
    for c in criteria:
        if c not in CRITERIA:
            raise ValueError(f"unknown criterion {c!r}: use {', '.join(CRITERIA)}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
    counts = _counts(model, fractions)
    E = model.config.num_experts
    if stats.reap().shape != (model.config.num_hidden_layers, E):
        raise ValueError(f"stats hold {stats.reap().shape} (layers, experts), the model "
                         f"{(model.config.num_hidden_layers, E)}")
    jobs: list[tuple[str, int, int | None]] = [("none", 0, None)] if 0 in counts else []
    for n in (n for n in counts if n):
        for c in criteria:
            jobs += [(c, n, s) for s in range(seeds)] if c == "random" else [(c, n, None)]
    rows = []
    for criterion, n, seed in jobs:
        drop = [[] for _ in model.layers] if criterion == "none" else choose(stats, criterion, n, seed or 0)
        t0 = time.perf_counter()
        acc = score(model if criterion == "none" else prune_experts(model, drop))
        rows.append(SweepRow(criterion, n, E, seed, acc, drop, time.perf_counter() - t0))
        if log is not None:
            log(_line(rows[-1]))
    if super_experts:
        drop = super_drop(stats)
        n = sum(map(len, drop))
        if n:
            t0 = time.perf_counter()
            acc = score(mask_experts(model, drop))
            rows.append(SweepRow("super", n, E * len(drop), None, acc, drop, time.perf_counter() - t0))
            if log is not None:
                log(_line(rows[-1]))
        elif log is not None:
            log("super: none detected, no row")
    return rows


def _line(row: SweepRow) -> str:
    seed = "" if row.seed is None else f" seed {row.seed}"
    return (f"{row.criterion}{seed}: {row.removed} removed, mean {row.mean:.1%} "
            f"({', '.join(f'{f} {a:.0%}' for f, a in row.accuracy.items())}) in {row.seconds:.1f} s")


def aggregate(rows: Sequence[SweepRow]) -> list[dict]:
    """One dict per (criterion, removed), in the order of ``rows``: ``accuracy`` per family (mean over
    seeds), ``low`` and ``high`` (min and max over seeds), ``mean`` (over families) with ``mean_low`` and
    ``mean_high``, ``fraction``, ``removed``, ``experts`` and the number of ``seeds``."""
    groups: dict[tuple[str, int], list[SweepRow]] = {}
    for r in rows:
        groups.setdefault((r.criterion, r.removed), []).append(r)
    out = []
    for (criterion, removed), rs in groups.items():
        fams = list(rs[0].accuracy)
        acc = np.array([[r.accuracy[f] for f in fams] for r in rs])  # [seeds, families]
        means = acc.mean(1)
        out.append({"criterion": criterion, "removed": removed, "experts": rs[0].experts,
                    "fraction": rs[0].fraction, "seeds": len(rs),
                    "accuracy": dict(zip(fams, acc.mean(0).tolist(), strict=True)),
                    "low": dict(zip(fams, acc.min(0).tolist(), strict=True)),
                    "high": dict(zip(fams, acc.max(0).tolist(), strict=True)),
                    "mean": float(means.mean()), "mean_low": float(means.min()), "mean_high": float(means.max())})
    return out


def table(rows: Sequence[SweepRow]) -> str:
    """A markdown table of :func:`sweep`'s rows: one line per fraction and criterion, accuracy per family and
    their mean; random draws as ``mean (min-max)`` over the seeds."""
    agg = aggregate(rows)
    if not agg:
        raise ValueError("table needs at least one row")
    fams = list(agg[0]["accuracy"])
    names = {"none": "none (full model)", "reap": "REAP saliency", "frequency": "frequency", "random": "random",
             "super": "super experts (masked)"}
    lines = ["| removed per layer | criterion | " + " | ".join(fams) + " | mean |",
             "|---|---|" + "---|" * (len(fams) + 1)]

    def cell(mean: float, low: float, high: float, seeds: int) -> str:
        return f"{mean:.1%}" if seeds == 1 else f"{mean:.1%} ({low:.0%}-{high:.0%})"

    for a in sorted(agg, key=lambda a: (a["criterion"] == "super", a["removed"])):
        if a["criterion"] == "super":
            removed = f"{a['removed']} in all (of {a['experts']})"
        else:
            removed = f"{a['removed']}/{a['experts']} ({a['fraction']:.1%})"
        name = names[a["criterion"]] + (f", {a['seeds']} seeds" if a["seeds"] > 1 else "")
        accs = [cell(a["accuracy"][f], a["low"][f], a["high"][f], a["seeds"]) for f in fams]
        mean = cell(a["mean"], a["mean_low"], a["mean_high"], a["seeds"])
        lines.append(f"| {removed} | {name} | " + " | ".join(accs) + f" | **{mean}** |")
    return "\n".join(lines)
