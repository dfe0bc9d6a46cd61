"""REAP's pruning comparison at small scale: held-out accuracy against the experts removed per layer.

    .venv/bin/python benchmarks/pruning.py                       # the bundled model, about 30-60 min on 2 cores
    .venv/bin/python benchmarks/pruning.py --per-cell 4 --fractions 0,0.5 --seeds 1   # a smoke run

Calibration (as REAP, arXiv:2510.13999): ``--calibration`` training-split conversations of all task
families at high effort (``oss_jax.data.example``), traced whole with the expert outputs recorded
(``oss_jax.saliency.calibrate``). Then, for every fraction of the experts of each layer (``--fractions``),
the experts to remove are chosen by REAP saliency (lowest first), by activation frequency (least used
first) and at random (``--seeds`` draws: mean, min and max), removed (``oss_jax.prune.prune_experts``: a
smaller model), and the model is asked ``--per-cell`` held-out questions of every family at high effort
(``oss_jax.evaluate``, greedy, exact match). One more row masks the detected super experts
(``oss_jax.prune.mask_experts``), or says that none was detected. Once, for the REAP choice at the
largest fraction, the masked model is evaluated too, to check that masking gives the same answers as pruning.

The experiment itself is ``oss_jax.prune.sweep`` (the notebook ``12-routing-research`` runs the same).
The table is printed and written to ``benchmarks/results/pruning.md`` with the command and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
from common import cpu_name, save

import oss_jax
from oss_jax import data, evaluate, prune, saliency


def fractions_arg(text: str) -> list[float]:
    """``0,1/8,0.25``: fractions, each a decimal or a ratio."""
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            num, _, den = part.partition("/")
            out.append(float(num) / float(den) if den else float(num))
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"not a fraction: {part!r} (use e.g. 0,1/8,0.25)") from None
    return out


def calibration_set(n: int, seed: int = 0) -> list[list[int]]:
    """``n`` training-split conversations at high effort, all families (``data.MIX``), as o200k token lists."""
    return [p + c for p, c in (data.tokens(data.example(seed, i, effort="high")) for i in range(n))]


def mask_check(model, stats, per_cell: int, fraction: float) -> str:
    """Evaluate the REAP choice at ``fraction`` pruned and masked; say whether every answer is the same."""
    drop = prune.choose(stats, "reap", round(fraction * model.config.num_experts))
    answers = []
    for m in (prune.prune_experts(model, drop), prune.mask_experts(model, drop)):
        cells = evaluate.evaluate(m, per_cell=per_cell, efforts=("high",), keep_examples=per_cell)
        answers.append([(c.family, e["final"]) for c in cells for e in c.examples])
    same = sum(a == b for a, b in zip(*answers, strict=True))
    verdict = "the same" if same == len(answers[0]) else "DIFFERENT"
    return (f"Masking check (REAP, {len(drop[0])} experts removed per layer): the pruned and the masked model "
            f"give {verdict} final answers on {same} of {len(answers[0])} questions.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="what oss_jax.load takes (default: the bundled model)")
    parser.add_argument("--per-cell", type=int, default=50, help="held-out questions per family (default 50)")
    parser.add_argument("--seeds", type=int, default=3, help="random draws per fraction (default 3)")
    parser.add_argument("--fractions", type=fractions_arg, default=list(prune.FRACTIONS),
                        help="fractions of each layer's experts to remove (default 0,1/8,...,3/4)")
    parser.add_argument("--calibration", type=int, default=256,
                        help="training conversations for saliency and frequency (default 256)")
    parser.add_argument("--out", default="pruning.md", help="file name under benchmarks/results/")
    args = parser.parse_args(argv)
    if args.per_cell < 1 or args.seeds < 1 or args.calibration < 1:
        parser.error("--per-cell, --seeds and --calibration must be >= 1")

    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    model = oss_jax.load(args.model)
    cfg = model.config
    print(f"{args.model}: {cfg.num_hidden_layers} layers, {cfg.num_experts} experts, top-{cfg.experts_per_token}",
          flush=True)
    t0 = time.perf_counter()
    convs = calibration_set(args.calibration)
    stats = saliency.calibrate(model, convs)
    t_cal = time.perf_counter() - t0
    supers = stats.super_experts()
    peaks = stats.max_LE[: max(1, int(cfg.num_hidden_layers * 0.75))]
    print(f"calibration: {len(convs)} conversations, {stats.tokens} tokens, {t_cal:.1f} s; super experts: "
          f"{supers or 'none'}", flush=True)
    try:
        rows = prune.sweep(model, stats, lambda m: prune.accuracy(m, per_cell=args.per_cell),
                           fractions=args.fractions, seeds=args.seeds, log=lambda s: print(s, flush=True))
    except ValueError as e:
        print(f"pruning.py: error: {e}", file=sys.stderr)
        return 2
    largest = max(args.fractions)
    check = (mask_check(model, stats, args.per_cell, largest) if round(largest * cfg.num_experts) else
             "Masking check: not run (no fraction removes an expert).")
    print(check, flush=True)

    if supers:
        median = float(np.median(peaks[peaks > 0]))
        super_text = ("Super experts detected (peak |output| > max(P99.5, max / 10) over the first 75% of layers; "
                      "the median peak of the experts there is "
                      f"{median:.3g}): " + ", ".join(f"layer {a} expert {b} (peak {c:.3g}, {c / median:.1f}x the "
                                                    f"median)" for a, b, c in supers) + ".")
        if peaks.size <= 200:  # P99.5 of <= 200 values interpolates below the largest: the top one always passes
            super_text += (f" With only {peaks.size} (layer, expert) peaks the 99.5th percentile lies below the "
                           f"largest, so the rule flags at least one expert on any model this small: judge it by "
                           f"its ratio to the median (the super experts of arXiv:2507.23279 are orders of "
                           f"magnitude above).")
    else:
        super_text = "Super experts: none detected, so there is no super-expert row."
    import jax

    cmd = " ".join(["benchmarks/pruning.py", *(argv if argv is not None else sys.argv[1:])])
    elapsed = time.perf_counter() - t_start
    text = (f"# Expert pruning: held-out accuracy against the experts removed\n\n"
            f"Machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, jax "
            f"{jax.__version__}, {jax.default_backend()} backend, {time.strftime('%Y-%m-%d %H:%M')}; load average "
            f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; {elapsed:.0f} s in all.\n\n"
            f"Command: `.venv/bin/python {cmd}`\n\n"
            f"Model `{args.model}`: {cfg.num_hidden_layers} layers of {cfg.num_experts} experts, top-"
            f"{cfg.experts_per_token}. Calibration: {len(convs)} training-split conversations (all families, high "
            f"effort), {stats.tokens} tokens, {t_cal:.0f} s. Accuracy: {args.per_cell} held-out questions per "
            f"family at high effort, greedy, exact match (`oss_jax.evaluate`). Experts removed per layer by REAP "
            f"saliency (lowest first), by activation frequency (least routed first) and at random ("
            + (f"{args.seeds} seeds: mean (min-max)" if args.seeds > 1 else "1 seed") + "); `oss_jax.prune.sweep`.\n\n"
            + prune.table(rows) + "\n\n" + super_text + "\n\n" + check + "\n")
    save(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
