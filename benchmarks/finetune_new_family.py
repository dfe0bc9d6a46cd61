"""Teach the bundled tiny model a task family it never saw, with LoRA: three-digit subtraction.

    .venv/bin/python benchmarks/finetune_new_family.py                      # about 12 min on 2 idle cores
    .venv/bin/python benchmarks/finetune_new_family.py --steps 5 --per-cell 2 --out finetune_smoke.md   # smoke

The bundled model (``oss_jax.load("tiny")``) was trained on five families (``oss_jax.data.FAMILIES``); the
``sub`` family (``What is 885-347?``, column by column with borrows at high effort) is not among them, and
the model answers it by adding. The experiment:

1. Write ``--conversations`` training-split conversations as JSONL (the format of ``oss-jax finetune``):
   ``sub`` questions, plus a ``--replay`` share of the old families (drawn by ``data.MIX``, the original
   recipe's mix) against forgetting; efforts drawn by ``--effort-mix`` (mostly high).
2. Fine-tune LoRA adapters on them (``oss_jax.finetune.finetune``: the base frozen, the MXFP4 experts
   packed; the replies one token per digit, as the model was trained), the rate decaying along a cosine
   to 0 at the last step (``--decay``; on the first bundled model a constant rate left ``sub`` at 62.5% and cost
   ``add`` 37.5 points).
3. Held-out exact-match accuracy (``oss_jax.evaluate``, greedy, ``--per-cell`` questions per cell) before
   and after: every family at high effort, ``sub`` at every effort.
4. Routing drift (``oss_jax.routing.routing_drift``) on the reply tokens of held-out conversations, ``sub``
   and the old families apart: per layer the JS divergence of the expert loads before and after, the
   share of tokens whose top-k experts changed, and the experts whose share grew most.

The issue's goal: ``sub`` from about 0% to at least 90% at high effort in at most 15 minutes of training
on this CPU, the old families losing at most 5 points each. The table, the command and the machine are
printed and written to ``benchmarks/results/<--out>`` (default ``finetune_new_family.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import cpu_name, save

import oss_jax
from oss_jax import data, evaluate, finetune, routing


def training_examples(n: int, replay: float, effort_mix: tuple[float, float, float], seed: int = 0
                      ) -> list[data.Example]:
    """``n`` training-split conversations: ``sub`` with probability ``1 - replay``, else an old family drawn
    by ``data.MIX``; the effort drawn by ``effort_mix`` (low, medium, high)."""
    mix = {"sub": 1.0 - replay, **{f: replay * share for f, share in data.MIX.items()}}
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 99])
        effort = data.EFFORTS[int(rng.choice(len(data.EFFORTS), p=effort_mix))]
        out.append(data.example(seed, i, effort=effort, mix=mix))
    return out


def write_jsonl(path: Path, examples: list[data.Example]) -> Path:
    """One ``{"messages": [...], "effort": ..., "family": ...}`` line per conversation (what ``oss-jax finetune``
    reads; the family says how the reply's numbers are tokenized)."""
    with path.open("w") as f:
        for ex in examples:
            f.write(json.dumps({"messages": ex.messages, "effort": ex.effort, "family": ex.family}) + "\n")
    return path


def heldout_conversations(families: tuple[str, ...], per_family: int, seed: int = 7) -> tuple[list, list]:
    """``(token sequences, reply masks)``: ``per_family`` held-out conversations of each family at high effort."""
    seqs, masks = [], []
    for f, family in enumerate(families):
        rng = np.random.default_rng([seed, f])
        for _ in range(per_family):
            prompt, completion = data.tokens(data.make(family, "high", rng, heldout=True))
            seqs.append(prompt + completion)
            masks.append(np.arange(len(prompt) + len(completion)) >= len(prompt))
    return seqs, masks


def accuracy_table(before: list[evaluate.Cell], after: list[evaluate.Cell]) -> str:
    lines = ["| family | effort | before | after | change |", "|---|---|---|---|---|"]
    for b, a in zip(before, after, strict=True):
        new = " (new)" if b.family in data.NEW_FAMILIES else ""
        lines.append(f"| {b.family}{new} | {b.effort} | {b.accuracy:.1%} ({b.correct}/{b.n}) | "
                     f"{a.accuracy:.1%} ({a.correct}/{a.n}) | {100 * (a.accuracy - b.accuracy):+.1f} points |")
    return "\n".join(lines)


def effort_mix_arg(text: str) -> tuple[float, float, float]:
    try:
        mix = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not three numbers: {text!r} (use e.g. 0.1,0.1,0.8)") from None
    if len(mix) != 3 or min(mix) < 0 or abs(sum(mix) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"--effort-mix: three shares (low, medium, high) summing to 1, got {text!r}")
    return mix  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps (default 1500)")
    parser.add_argument("--batch", type=int, default=8, help="conversations per step (default 8)")
    parser.add_argument("--conversations", type=int, default=None,
                        help="training conversations (default steps x batch: each seen once)")
    parser.add_argument("--replay", type=float, default=0.2,
                        help="share of old-family conversations in the training data (default 0.2)")
    parser.add_argument("--effort-mix", type=effort_mix_arg, default=(0.05, 0.05, 0.9),
                        help="shares of low, medium, high effort in the training data (default 0.05,0.05,0.9)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (default 32)")
    parser.add_argument("--targets", default="attn,experts", help="LoRA targets (default attn,experts)")
    parser.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (default 1.5e-3)")
    parser.add_argument("--warmup", type=int, default=30, help="warmup steps (default 30)")
    parser.add_argument("--decay", choices=finetune.DECAYS, default="cosine",
                        help="the rate after the warmup: cosine down to 0 at the last step (default), or constant")
    parser.add_argument("--seed", type=int, default=0, help="data and adapter seed (default 0)")
    parser.add_argument("--per-cell", type=int, default=40,
                        help="held-out questions per family and effort (default 40)")
    parser.add_argument("--drift", type=int, default=16,
                        help="held-out conversations per family for the routing drift (default 16)")
    parser.add_argument("--run", default=None, help="the fine-tuning run directory (default: a temporary one)")
    parser.add_argument("--out", default="finetune_new_family.md", help="file name under benchmarks/results/")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch, args.rank, args.per_cell, args.drift) < 1 or not 0 <= args.replay < 1:
        parser.error("--steps, --batch, --rank, --per-cell and --drift must be >= 1, --replay in [0, 1)")
    import jax

    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    base = oss_jax.load("tiny")
    families = data.ALL_FAMILIES
    t0 = time.perf_counter()
    before = evaluate.evaluate(base, per_cell=args.per_cell, families=families, efforts=("high",))
    before += evaluate.evaluate(base, per_cell=args.per_cell, families=data.NEW_FAMILIES, efforts=("low", "medium"))
    print(f"before: {', '.join(f'{c.family}/{c.effort} {c.accuracy:.0%}' for c in before)} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)

    run = Path(args.run) if args.run else Path(tempfile.mkdtemp(prefix="finetune-new-family-")) / "run"
    n = args.conversations or args.steps * args.batch
    examples = training_examples(n, args.replay, args.effort_mix, args.seed)
    run.parent.mkdir(parents=True, exist_ok=True)
    jsonl = write_jsonl(run.parent / f"{run.name}-train.jsonl", examples)
    counts = {f: sum(e.family == f for e in examples) for f in families}
    fc = finetune.FinetuneConfig(steps=args.steps, batch=args.batch, rank=args.rank, alpha=args.alpha,
                                 targets=args.targets, lr=args.lr, warmup=args.warmup, decay=args.decay, seed=args.seed,
                                 checkpoint_every=max(args.steps // 4, 1), log_every=10)

    def log(row: dict) -> None:
        if row["step"] % 50 == 0 or row["step"] == args.steps:
            print(f"step {row['step']}: loss {row['loss']:.3f}, token accuracy {row['accuracy']:.3f}, "
                  f"{row['seconds']:.0f} s", flush=True)

    t0 = time.perf_counter()
    tuned = finetune.finetune(base, jsonl, run, fc, progress=False, on_metrics=log)
    t_train = time.perf_counter() - t0
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    print(f"fine-tuned in {t_train:.0f} s", flush=True)

    after = evaluate.evaluate(tuned, per_cell=args.per_cell, families=families, efforts=("high",))
    after += evaluate.evaluate(tuned, per_cell=args.per_cell, families=data.NEW_FAMILIES, efforts=("low", "medium"))
    plain = oss_jax.load("tiny")  # `base` carries the adapters now: finetune adds them in place
    drifts = {}
    for name, fams in (("sub", data.NEW_FAMILIES), ("old families", data.FAMILIES)):
        seqs, masks = heldout_conversations(fams, args.drift)
        drifts[name] = routing.routing_drift(plain, tuned, seqs, select=masks)

    sub_high = next(a for a in after if a.family == "sub" and a.effort == "high")
    drops = {b.family: 100 * (b.accuracy - a.accuracy) for b, a in zip(before, after, strict=True)
             if b.family in data.FAMILIES}
    worst = max(drops, key=drops.get)
    verdict = (f"- `sub` at high effort: {sub_high.accuracy:.1%} after (goal >= 90%): "
               f"**{'met' if sub_high.accuracy >= 0.9 else 'not met'}**\n"
               f"- training wall time: {t_train / 60:.1f} min (goal <= 15 min): "
               f"**{'met' if t_train <= 900 else 'not met'}**\n"
               f"- largest loss on an old family: {drops[worst]:+.1f} points ({worst}; goal <= 5): "
               f"**{'met' if drops[worst] <= 5 else 'not met'}**")
    drift_text = "\n\n".join(
        f"**{name}** ({d.tokens} reply tokens of {args.drift * (1 if name == 'sub' else len(data.FAMILIES))} held-out "
        f"conversations at high effort; {d.changed_overall:.1%} of (token, layer) top-k choices changed):\n\n"
        + d.table() for name, d in drifts.items())
    cmd = " ".join(["benchmarks/finetune_new_family.py", *(argv if argv is not None else sys.argv[1:])])
    mix = ", ".join(f"{f} {c}" for f, c in counts.items() if c)
    text = (f"# Teaching the bundled model a new family with LoRA: subtraction\n\n"
            f"Machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, jax "
            f"{jax.__version__}, {jax.default_backend()} backend, {time.strftime('%Y-%m-%d %H:%M')}; load average "
            f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; {time.perf_counter() - t_start:.0f} s "
            f"in all.\n\n"
            f"Command: `.venv/bin/python {cmd}`\n\n"
            f"Data: {n} training-split conversations ({mix}; efforts low/medium/high "
            f"{'/'.join(f'{x:g}' for x in args.effort_mix)}). LoRA rank {fc.rank}, alpha {fc.alpha:g}, targets "
            f"{','.join(fc.targets)}; {fc.steps} steps of {fc.batch} conversations, AdamW lr {fc.lr:g} "
            f"({fc.warmup} warmup steps, then {fc.decay}), replies one token per digit. Training: {t_train:.0f} s "
            f"(loading, compiling and checkpoints included); last logged loss {last['loss']:.3f}, reply-token accuracy "
            f"{last['accuracy']:.3f}.\n\n"
            f"Held-out accuracy, {args.per_cell} questions per cell, greedy, exact match (`oss_jax.evaluate`):\n\n"
            + accuracy_table(before, after) + "\n\n" + verdict + "\n\n"
            "Routing drift (`oss_jax.routing.routing_drift`, base model vs fine-tuned, the same tokens read whole): "
            "JS divergence of each layer's expert load, the share of tokens whose top-k set changed, the mean "
            "share of a token's experts kept, and the experts whose share grew most.\n\n" + drift_text + "\n")
    save(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
