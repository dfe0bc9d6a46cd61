"""The routes report on a gpt-oss-20b-shaped checkpoint: wall time, tokens/s and peak memory.

    .venv/bin/python benchmarks/routes_20b.py --ckpt /work/tmp-20b/random-20b     # writes it first if missing
    .venv/bin/python benchmarks/routes_20b.py --ckpt /tmp/small --preset small   # the script end to end, small

``--ckpt`` is written, when it does not exist, by ``scripts/make_random_checkpoint.py`` (random weights of the
real shapes, MXFP4 experts: 13 GB for ``gpt-oss-20b``; ``--preset small`` keeps the real layout and o200k
vocabulary with hidden size 64 and 2 layers, for checking this script). Then, in this process:
``oss_jax.load`` (bf16, MXFP4 experts packed), and ``oss_jax.routes.routes`` over the shipped prompts
(``oss_jax/prompts/routes.jsonl``, about 3,200 tokens; ``--min-tokens`` refuses fewer) with the expert outputs
recorded, every metric streamed, ``metrics.json``, the figures and ``report.md`` written to a temporary
directory (``--out`` keeps them).

Memory: a thread samples the process's resident set (psutil) every 50 ms; the table gives the RSS after
loading, the peak while routes runs and their difference (what a chunk's records and the sums cost on top
of the model), and the kernel's own high-water mark (``VmHWM``, the whole process). The issue's claim to
check: memory bounded by the model plus a chunk.

The table is printed and written to ``benchmarks/results/routes_20b.md`` (``routes_20b-small.md`` for
``--preset small``) with the command and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import runpy
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
from common import PeakRss, cpu_name, save, vm_hwm

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


def preset(name: str):
    """The model shape: gpt-oss-20b's config, or ``small`` (the same layout, hidden 64, 2 layers)."""
    from oss_jax.config import GPT_OSS_20B

    if name == "gpt-oss-20b":
        return GPT_OSS_20B
    return GPT_OSS_20B.replace(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (a random one is written there if missing)")
    parser.add_argument("--preset", choices=("gpt-oss-20b", "small"), default="gpt-oss-20b",
                        help="shape of the random checkpoint written when --ckpt is missing (default gpt-oss-20b)")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per forward pass (default 256)")
    parser.add_argument("--min-tokens", type=int, default=2000, help="refuse a corpus shorter than this (2000)")
    parser.add_argument("--out", help="keep the report here (default: a temporary directory, deleted)")
    args = parser.parse_args(argv)

    import jax
    from flax import nnx

    import oss_jax
    from oss_jax import routes

    load0 = os.getloadavg()[0]
    ckpt = Path(args.ckpt).expanduser().absolute()
    wrote_s = None
    if not ckpt.exists():
        write = runpy.run_path(str(ROOT / "scripts" / "make_random_checkpoint.py"))["write_random_checkpoint"]
        print(f"writing a random {args.preset} checkpoint to {ckpt} ...", flush=True)
        t0 = time.perf_counter()
        write(ckpt, preset(args.preset), seed=0, progress=True)
        wrote_s = time.perf_counter() - t0
    prompts = routes.read_prompts(routes.DEFAULT_PROMPTS, max_tokens=2048)
    n_tokens = sum(len(p.tokens) for p in prompts)
    if n_tokens < args.min_tokens:
        print(f"routes_20b.py: error: the shipped prompts hold {n_tokens} tokens, fewer than --min-tokens "
              f"{args.min_tokens}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="routes-20b-")) / "report"
    with PeakRss(interval_s=0.05) as rss:
        start_rss = rss.reset()
        t0 = time.perf_counter()
        model = oss_jax.load(ckpt, progress=True)
        load_s = time.perf_counter() - t0
        params = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
        load_peak = rss.peak
        after_load = rss.reset()
        t0 = time.perf_counter()
        result = routes.routes(model, None, out, name=str(ckpt), chunk=args.chunk, progress=True)
        routes_s = time.perf_counter() - t0
        routes_peak = rss.peak
    hwm = vm_hwm()
    cfg = model.config
    m = result.metrics
    supers = m["saliency"]["super_experts"]
    if not args.out:
        shutil.rmtree(out.parent, ignore_errors=True)

    cmd = " ".join(["benchmarks/routes_20b.py", *(argv if argv is not None else sys.argv[1:])])

    def gib(b: int) -> str:
        return f"{b / GIB:.2f} GiB"

    found = ", ".join(f"layer {s['layer']} expert {s['expert']}" for s in supers) or "none"
    rows = [
        "| measurement | value |", "|---|---|",
        f"| checkpoint | `{ckpt}` ({'written now in ' + f'{wrote_s:.0f} s' if wrote_s else 'existing'}): "
        f"{cfg.num_hidden_layers} layers, {cfg.num_experts} experts top-{cfg.experts_per_token}, hidden "
        f"{cfg.hidden_size}, vocabulary {cfg.vocab_size} |",
        f"| parameters in memory (bf16, MXFP4 experts packed) | {gib(params)} |",
        f"| load | {load_s:.1f} s; RSS {gib(start_rss)} before, {gib(after_load)} after, peak {gib(load_peak)} |",
        f"| corpus | the shipped prompts: {result.prompts} prompts, {result.tokens} tokens "
        f"({result.unknown_tokens} unknown to the model), chunks of {args.chunk} |",
        f"| routes wall time (trace with expert outputs, every metric, metrics.json, figures, report.md) | "
        f"{routes_s:.1f} s |",
        f"| tokens/s | {result.tokens / routes_s:.1f} |",
        f"| peak RSS while routes ran | {gib(routes_peak)} (RSS after load + {gib(routes_peak - after_load)}) |",
        f"| peak RSS of the process (VmHWM, loading included) | {gib(hwm)} |",
        f"| super experts found (random weights: meaningless) | {found} |",
    ]
    text = (f"# The routes report on a {'gpt-oss-20b' if cfg.num_hidden_layers == 24 else args.preset}-shaped "
            f"checkpoint\n\n"
            f"Machine: {cpu_name()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / GIB:.1f} GiB RAM, "
            f"Python {platform.python_version()}, jax {jax.__version__}, {jax.default_backend()} backend, "
            f"{time.strftime('%Y-%m-%d %H:%M')}; load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at "
            f"the end.\n\nCommand: `.venv/bin/python {cmd}`\n\n"
            "Random weights: the timings and memory are those of the real shapes; the metrics' values mean nothing. "
            "RSS sampled every 50 ms (psutil).\n\n" + "\n".join(rows) + "\n")
    save("routes_20b.md" if args.preset == "gpt-oss-20b" else f"routes_20b-{args.preset}.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
