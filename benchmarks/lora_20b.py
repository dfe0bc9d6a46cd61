"""One LoRA training step on gpt-oss-20b with its MXFP4 experts packed: peak memory and time on this CPU.

    .venv/bin/python benchmarks/lora_20b.py --ckpt /work/ckpt/20b                   # the step, measured
    .venv/bin/python benchmarks/lora_20b.py --analyze gpt-oss-20b gpt-oss-120b       # XLA's estimate only
    .venv/bin/python benchmarks/lora_20b.py --ckpt /tmp/small --tokens 32            # smoke

The step is ``oss_jax.finetune.train_step`` exactly as ``oss-jax finetune`` runs it: the checkpoint loaded
in bf16 with its experts packed (``oss_jax.load``), adapters of rank ``--rank`` on ``--targets`` (default
attention and every expert's gate_up and down projections: ``lora.add``), AdamW, batch 1 of a
``--tokens``-token conversation (the shipped routes prompts' tokens), loss on its second half. The frozen
weights are inputs of the compiled step, never outputs: nothing of the 13 GB is copied or decoded whole.

Measured: load time and RSS after it, the first step (compile + run) and a second step (run), each with
its peak RSS (sampled every 20 ms), the kernel's high-water mark (``VmHWM``) and XLA's memory analysis of
the compiled step (arguments, temporaries). ``--analyze`` compiles the same step on abstract shapes (no
weights in memory) for the named presets and prints XLA's analysis only: on this CPU backend, an estimate
of what one device needs (a GPU compiler lays memory out differently, so it is a guide, not a proof).

The table is printed and written to ``benchmarks/results/lora_20b.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import psutil
from common import PeakRss, cpu_name, save, vm_hwm
from laptop_20b import conversation

GIB = 1024**3
CARD_80GB = 81_559 * 1024**2  # what nvidia-smi reports for an H100 / A100 80 GB
CUDA_CONTEXT = 1 * GIB  # the CUDA context and XLA's own reservations, roughly


def step_inputs(model, args: argparse.Namespace):
    """``(graphdef, adapters, frozen, opt, opt_state, batch)`` for ``finetune.train_step``."""
    import jax.numpy as jnp
    import numpy as np

    from oss_jax import finetune, lora

    fc = finetune.FinetuneConfig(rank=args.rank, targets=lora.parse_targets(args.targets), batch=1, steps=10,
                                  warmup=0)
    lora.add(model, fc.lora)
    graphdef, adapters, frozen = finetune.split_for_training(model)
    opt = finetune.optimizer(fc)
    opt_state = opt.init(adapters)
    ids = np.asarray(conversation(args.tokens + 1), np.int32)[None]
    mask = np.zeros((1, args.tokens), np.float32)
    mask[:, args.tokens // 2:] = 1.0
    batch = {"tokens": jnp.asarray(ids), "positions": jnp.arange(args.tokens, dtype=jnp.int32)[None],
             "mask": jnp.asarray(mask)}
    return graphdef, adapters, frozen, opt, opt_state, batch


def analysis(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"args": m.argument_size_in_bytes, "temp": m.temp_size_in_bytes, "out": m.output_size_in_bytes,
            "alias": m.alias_size_in_bytes}


def measure(args: argparse.Namespace) -> list[tuple[str, str]]:
    import jax

    import oss_jax
    from oss_jax import finetune

    rss = PeakRss()
    t = time.perf_counter()
    model = oss_jax.load(args.ckpt, experts="packed")
    load_s, load_peak = time.perf_counter() - t, rss.take()
    after_load = psutil.Process().memory_info().rss
    graphdef, adapters, frozen, opt, opt_state, batch = step_inputs(model, args)
    n_adapter = sum(a.size for a in jax.tree.leaves(adapters))
    del model
    t = time.perf_counter()
    compiled = finetune.train_step.lower(graphdef, opt, adapters, frozen, opt_state, batch).compile()
    mem = analysis(compiled)
    adapters, opt_state, metrics = finetune.train_step(graphdef, opt, adapters, frozen, opt_state, batch)
    loss1 = float(metrics["loss"])
    first_s, first_peak = time.perf_counter() - t, rss.take()
    t = time.perf_counter()
    adapters, opt_state, metrics = finetune.train_step(graphdef, opt, adapters, frozen, opt_state, batch)
    loss2 = float(metrics["loss"])
    second_s, second_peak = time.perf_counter() - t, rss.take()
    if not (math.isfinite(loss1) and math.isfinite(loss2)):
        raise SystemExit(f"the loss is not finite: {loss1}, {loss2}")
    g = lambda b: f"{b / GIB:.2f} GiB"
    return [
        ("load (bf16, experts packed)", f"{load_s:.0f} s, peak {g(load_peak)}, then {g(after_load)}"),
        ("adapters", f"{n_adapter:,} parameters (rank {args.rank}, {args.targets})"),
        ("first step (compile + run)", f"{first_s:.0f} s, peak {g(first_peak)}"),
        ("second step", f"{second_s:.1f} s, peak {g(second_peak)}"),
        ("loss, step 1 -> step 2", f"{loss1:.4f} -> {loss2:.4f}"),
        ("peak RSS of the process (VmHWM)", g(vm_hwm())),
        ("XLA's analysis of the step", f"arguments {g(mem['args'])}, temporaries {g(mem['temp'])}, "
                                       f"outputs {g(mem['out'])} ({g(mem['alias'])} aliased)"),
    ]


def analyze(args: argparse.Namespace) -> list[tuple[str, str]]:
    import jax.numpy as jnp
    from flax import nnx

    from oss_jax import finetune
    from oss_jax.config import PRESETS
    from oss_jax.model import GptOss

    rows = []
    for name in args.analyze:
        cfg = PRESETS[name].replace(quant_method="mxfp4")
        model = nnx.eval_shape(lambda cfg=cfg: GptOss(cfg, packed=True, dtype=jnp.bfloat16))
        graphdef, adapters, frozen, opt, opt_state, batch = step_inputs(model, args)
        t = time.perf_counter()
        mem = analysis(finetune.train_step.lower(graphdef, opt, adapters, frozen, opt_state, batch).compile())
        total = mem["args"] + mem["temp"] + mem["out"] - mem["alias"]
        rows.append((f"{name}: XLA's analysis of one step ({time.perf_counter() - t:.0f} s to compile)",
                     f"arguments {mem['args'] / GIB:.1f} GiB + temporaries {mem['temp'] / GIB:.2f} GiB + "
                     f"outputs {(mem['out'] - mem['alias']) / GIB:.2f} GiB = {total / GIB:.1f} GiB "
                     f"({'fits' if total < CARD_80GB - CUDA_CONTEXT else 'does not fit'} one 80 GB card)"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", help="a Hugging Face gpt-oss checkpoint with MXFP4 experts")
    p.add_argument("--analyze", nargs="+", choices=["gpt-oss-20b", "gpt-oss-120b"], help="abstract shapes only")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="attn,experts")
    p.add_argument("--out", default="lora_20b.md", help="file name under benchmarks/results/")
    args = p.parse_args()
    if not (args.ckpt or args.analyze):
        p.error("give --ckpt or --analyze")
    rows = measure(args) if args.ckpt else analyze(args)
    cmd = " ".join(["python", "benchmarks/lora_20b.py", *sys.argv[1:]])
    text = "\n".join([
        "# One LoRA step on gpt-oss with packed MXFP4 experts", "",
        f"`{cmd}` — {cpu_name()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / GIB:.0f} GiB RAM, "
        f"{platform.system()}; XLA_FLAGS `{os.environ.get('XLA_FLAGS', '')}`; batch 1 of {args.tokens} tokens, "
        f"loss on the last {args.tokens - args.tokens // 2}.", "", "| | |", "|---|---|",
        *(f"| {a} | {b} |" for a, b in rows), ""])
    save(args.out, text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
