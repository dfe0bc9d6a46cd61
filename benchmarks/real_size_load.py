"""Real-size load, forward and conversion: wall time and peak resident memory, phase by phase.

Each phase runs in its own subprocess, so the peak RSS it reports (``VmHWM`` of
``/proc/self/status``, or ``getrusage(RUSAGE_CHILDREN)`` for the converter's process) belongs to
that phase alone:

  a. ``oss_jax.load(ckpt)`` (bf16, MXFP4 experts kept packed);
  b. load, then a forward pass of 16 tokens (batch 1); the first call includes compilation, the
     second is timed too; the logits are saved for (d);
  c. ``oss-jax convert ckpt dst``;
  d. ``oss_jax.load(dst)`` from the converted orbax checkpoint, the same forward, and a check that
     its logits equal (b)'s exactly.

Before those, XLA's own memory analysis of the compiled forward (arguments, outputs,
temporaries) is taken from abstract shapes (no weights in memory), for the forward as the model
defines it and for the forward jitted with ``nnx.jit(..., graph_updates=False)``, with the XLA
flags of the run and with ``--xla_cpu_enable_concurrency_optimized_scheduler=false``: it predicts
the forward's peak and shows where the memory goes.

Without ``--ckpt`` a random gpt-oss-20b-shaped checkpoint is written first with
``scripts/make_random_checkpoint.py`` (13 GB) under ``--workdir``; everything written under
``--workdir`` (checkpoint, converted copy, logits) is deleted at the end unless ``--keep``.
The goals of the issue: forward of 16 tokens under 16 GiB peak, conversion under 6 GiB.

Run (needs about 30 GB of disk and 16 GB of free memory; run nothing else big meanwhile)::

    .venv/bin/python benchmarks/real_size_load.py                      # random 20b, then clean up
    .venv/bin/python benchmarks/real_size_load.py --ckpt ~/gpt-oss-20b  # a real checkpoint
    .venv/bin/python benchmarks/real_size_load.py --patch-nnx-jit \\
        --xla-flags=--xla_cpu_enable_concurrency_optimized_scheduler=false

``--patch-nnx-jit`` re-jits ``GptOss.forward`` with ``nnx.jit(graph_updates=False)`` inside the
phase processes. It was how the recorded results were measured while ``GptOss.forward`` was still
an ``nnx.jit`` method that returned (copied) every parameter; ``forward`` now jits a pure function
of ``nnx.split(model)`` and copies nothing, so the option is no longer needed. ``--xla-flags``
sets ``XLA_FLAGS`` for the phases. Both are recorded in the report.

The table is printed and written, with a description of the machine, to
``benchmarks/results/real_size_load.md`` (raw numbers in ``real_size_load.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import cpu_name

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
N_TOKENS = 16
RESULT = "RESULT "
PATCH_ENV = "OSS_JAX_BENCH_PATCH_NNX_JIT"
LOW_MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


# -- measurements inside a phase's process ------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def peak_gib() -> float:
    """Peak resident memory of this process so far."""
    return _status_kib("VmHWM") * 1024 / GIB


def rss_gib() -> float:
    return _status_kib("VmRSS") * 1024 / GIB


def tokens(vocab_size: int):
    """The same batch-1 sequence of random token ids in every phase."""
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab_size, (1, N_TOKENS)).astype(np.int32)


def patch_forward() -> None:
    """Re-jit ``GptOss.forward`` with ``graph_updates=False`` (its outputs are then only its results)."""
    import inspect

    from flax import nnx

    from oss_jax.model import GptOss

    fn = GptOss.forward
    fn = getattr(fn, "__wrapped__", fn)
    static = tuple(p for p in ("last_only",) if p in inspect.signature(fn).parameters)
    GptOss.forward = nnx.jit(fn, static_argnames=static, graph_updates=False)


def phase_load(ckpt: str, logits_path: str | None) -> dict:
    """Load (and, with ``logits_path``, run two forwards and save or compare the logits)."""
    import jax
    import numpy as np
    from flax import nnx

    import oss_jax

    if os.environ.get(PATCH_ENV):
        patch_forward()
    t0 = time.perf_counter()
    model = oss_jax.load(ckpt)
    jax.block_until_ready(nnx.state(model))
    r = {"load_s": time.perf_counter() - t0, "load_peak_gib": peak_gib(), "load_rss_gib": rss_gib(),
         "param_gib": sum(x.nbytes for x in jax.tree.leaves(nnx.state(model))) / GIB}
    if logits_path is None:
        r["peak_gib"] = r["load_peak_gib"]
        return r
    toks = tokens(model.config.vocab_size)
    t0 = time.perf_counter()
    logits = np.asarray(model(toks))
    r["forward1_s"] = time.perf_counter() - t0
    r["forward1_peak_gib"] = peak_gib()
    t0 = time.perf_counter()
    again = np.asarray(model(toks))
    r["forward2_s"] = time.perf_counter() - t0
    r["peak_gib"] = peak_gib()
    r["finite"] = bool(np.isfinite(logits).all())
    r["logits_std"] = float(logits.std())
    r["repeatable"] = bool(np.array_equal(logits, again))
    ref = Path(logits_path)
    if ref.exists():  # phase d: compare with phase b
        direct = np.load(ref)
        r["max_abs_diff"] = float(np.max(np.abs(logits - direct)))
        r["equal"] = bool(np.array_equal(logits, direct))
    else:
        np.save(ref, logits)
    return r


def phase_xla(ckpt: str) -> dict:
    """XLA's memory analysis of the compiled forward, from abstract shapes (no weights)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from oss_jax.config import Config
    from oss_jax.model import GptOss

    cfg = Config.from_json(ckpt)
    model = nnx.eval_shape(lambda: GptOss(cfg, packed=cfg.quant_method == "mxfp4", dtype=jnp.bfloat16))
    toks = jax.ShapeDtypeStruct((1, N_TOKENS), jnp.int32)
    out = {}
    for variant in ("as_is", "graph_updates_false"):
        if variant == "graph_updates_false":
            patch_forward()
        t0 = time.perf_counter()
        ma = GptOss.forward.lower(model, toks, toks).compile().memory_analysis()
        out[variant] = {"args_gib": ma.argument_size_in_bytes / GIB, "out_gib": ma.output_size_in_bytes / GIB,
                        "temp_gib": ma.temp_size_in_bytes / GIB, "alias_gib": ma.alias_size_in_bytes / GIB,
                        "compile_s": time.perf_counter() - t0}
    out["peak_gib"] = peak_gib()
    return out


def phase_convert(ckpt: str, dst: str) -> dict:
    """``oss-jax convert`` in a child process; its peak RSS is this process's RUSAGE_CHILDREN."""
    cli = Path(sys.executable).with_name("oss-jax")
    cmd = [str(cli), "convert", ckpt, dst, "--no-progress"] if cli.exists() else \
          [sys.executable, "-m", "oss_jax.cli", "convert", ckpt, dst, "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"convert failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    size = sum(p.stat().st_size for p in Path(dst).rglob("*") if p.is_file())
    return {"convert_s": wall, "peak_gib": usage.ru_maxrss * 1024 / GIB, "dst_gb": size / 1e9}


# -- the driver -----------------------------------------------------------------------------------
def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    return float("inf")


def wait_for_memory(need_gib: float, timeout_s: float) -> None:
    """Be considerate on a shared machine: start a big phase only when memory is free."""
    t0 = time.time()
    while (avail := mem_available_gib()) < need_gib:
        if time.time() - t0 > timeout_s:
            print(f"  warning: only {avail:.1f} GiB available (wanted {need_gib:.0f}); going ahead",
                  flush=True)
            return
        print(f"  waiting for memory: {avail:.1f} GiB available, want {need_gib:.0f}", flush=True)
        time.sleep(20)


def run_phase(name: str, *args: str, need_gib: float, wait_s: float, env: dict) -> dict:
    wait_for_memory(need_gib, wait_s)
    print(f"phase {name} ...", flush=True)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--phase", name, *args], capture_output=True,
                          text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode or not lines:
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        raise RuntimeError(f"phase {name} failed ({how}):\n{proc.stderr[-3000:]}")
    r = json.loads(lines[-1][len(RESULT):])
    r["process_s"] = time.perf_counter() - t0
    r["loadavg"] = [round(load0, 1), round(os.getloadavg()[0], 1)]
    print("  " + json.dumps(r), flush=True)
    return r


def machine() -> dict:
    import jax

    cpu = cpu_name()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    versions = {"jax": jax.__version__}
    for mod in ("jaxlib", "flax", "orbax.checkpoint", "numpy"):
        try:
            versions[mod] = __import__(mod, fromlist=["__version__"]).__version__
        except (ImportError, AttributeError):
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": mem, "python": platform.python_version(),
            "platform": platform.platform(), **versions}


def _why(r: dict) -> str:
    return r.get("error", "not run").strip().splitlines()[0][:200].replace("|", "/")


def table(res: dict) -> str:
    def row(key: str, name: str, goal: float | None, timing, notes) -> str:
        r = res.get(key) or {}
        if "peak_gib" not in r:
            return f"| {name} | failed | | {f'< {goal:g} GiB' if goal else ''} | {_why(r)} |"
        met = "" if goal is None else f"< {goal:g} GiB " + ("(met)" if r["peak_gib"] < goal else "(**missed**)")
        load = f"; load avg {r['loadavg'][0]}-{r['loadavg'][1]}" if "loadavg" in r else ""
        return f"| {name} | {timing(r)} | {r['peak_gib']:.2f} | {met} | {notes(r)}{load} |"

    def fwd(r: dict) -> str:
        return (f"load {r['load_s']:.0f} s; forward {r['forward1_s']:.0f} s (1st, compiles), "
                f"{r['forward2_s']:.0f} s (2nd)")

    return "\n".join([
        "| phase | wall time | peak RSS (GiB) | goal | notes |", "|---|---|---|---|---|",
        row("load", "(a) load safetensors (bf16, packed experts)", None,
            lambda r: f"{r['load_s']:.0f} s", lambda r: f"RSS after load {r['load_rss_gib']:.2f} GiB"),
        row("forward", "(b) load + forward 16 tokens", 16, fwd,
            lambda r: f"peak after load {r['load_peak_gib']:.2f} GiB; finite logits: {r['finite']}, "
                      f"std {r['logits_std']:.2f}; 2nd call identical: {r['repeatable']}"),
        row("convert", "(c) `oss-jax convert`", 6, lambda r: f"{r['convert_s']:.0f} s",
            lambda r: f"orbax output {r['dst_gb']:.1f} GB"),
        row("orbax", "(d) load orbax + forward 16 tokens", None, fwd,
            lambda r: f"peak after load {r['load_peak_gib']:.2f} GiB; logits equal to (b): {r['equal']} "
                      f"(max abs diff {r['max_abs_diff']:.3g})"),
    ])


def xla_table(res: dict) -> str:
    lines = ["| forward jitted | XLA flags | arguments | outputs | temporaries | predicted peak |",
             "|---|---|---|---|---|---|"]
    base = res.get("baseline_gib", 0.7)
    other = res.get("xla_other_flags", "")
    for key, flags in (("xla", other or "(none)"), ("xla_low_mem", f"{other} {LOW_MEMORY_SCHEDULER}".strip())):
        r = res.get(key) or {}
        if "as_is" not in r:
            lines.append(f"| | {flags} | failed: {_why(r)} | | | |")
            continue
        for variant, label in (("as_is", "as in `oss_jax.model` (`nnx.jit`)"),
                               ("graph_updates_false", "`nnx.jit(graph_updates=False)`")):
            v = r[variant]
            pred = v["args_gib"] + v["out_gib"] + v["temp_gib"] + base
            lines.append(f"| {label} | {flags} | {v['args_gib']:.2f} | {v['out_gib']:.2f} | "
                         f"{v['temp_gib']:.2f} | {pred:.2f} |")
    return "\n".join(lines)


def report(res: dict, ckpt_desc: str) -> str:
    m = res["machine"]
    vers = ", ".join(f"{k} {m[k]}" for k in ("jax", "jaxlib", "flax", "orbax.checkpoint", "numpy") if k in m)
    a = res.get("load") or {}
    base = a.get("load_peak_gib", 0) - a.get("param_gib", 0) if "param_gib" in a else 0.7
    res["baseline_gib"] = base
    lines = [
        "# Real-size load, forward and conversion", "",
        "Measured by `benchmarks/real_size_load.py`: each phase in its own process; peak RSS is that "
        "process's `VmHWM` (for `oss-jax convert`, the CLI process's `ru_maxrss`).", "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M')}; command: `{res['command']}`",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.1f} GiB RAM, no accelerator "
        f"(JAX CPU backend); {m['platform']}. Shared with other jobs: the load average (1 min) at "
        "the start and end of each phase is in the notes; on 2 cores, timings above a load of 2 are slowed.",
        f"- Software: Python {m['python']}, {vers}",
        f"- Checkpoint: {ckpt_desc}",
        f"- Parameters in memory after load: {a['param_gib']:.2f} GiB" if "param_gib" in a else None,
        f"- Forward: batch 1, {N_TOKENS} tokens, bf16 parameters, MXFP4 experts packed (decoded on the fly)",
        f"- `XLA_FLAGS` for the phases: `{res['xla_flags'] or '(none)'}`; `GptOss.forward` "
        + ("re-jitted with `nnx.jit(graph_updates=False)` (`--patch-nnx-jit`)" if res["patch"]
           else "as in `oss_jax.model`"), "",
    ]
    if res.get("create"):
        lines += [f"Writing the random checkpoint took {res['create']['create_s']:.0f} s.", ""]
    lines += [table(res), "",
              "XLA's memory analysis of the compiled forward (GiB; from abstract shapes, no weights "
              f"loaded). Predicted peak = arguments + outputs + temporaries + {base:.2f} GiB (the "
              "load phase's peak minus its parameters: runtime, code, Python).", "",
              xla_table(res), ""]
    as_is = (res.get("xla") or {}).get("as_is")
    if as_is and as_is["out_gib"] > 1:
        lines += [f"The forward as the model jits it returns {as_is['out_gib']:.1f} GiB of outputs: flax's "
                  "graph-mode `nnx.jit` (default `graph_updates=True`) returns the state of every module "
                  "argument from the compiled function, so XLA writes a copy of every parameter on "
                  "each call.", ""]
    return "\n".join(ln for ln in lines if ln is not None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="checkpoint directory (default: write a random 20b under --workdir)")
    p.add_argument("--workdir", default="/work/tmp-20b", help="scratch directory (default /work/tmp-20b)")
    p.add_argument("--keep", action="store_true", help="keep what was written under --workdir")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "real_size_load.md"))
    p.add_argument("--wait", type=float, default=600, help="seconds to wait for free memory per phase")
    p.add_argument("--patch-nnx-jit", action="store_true",
                   help="re-jit GptOss.forward with nnx.jit(graph_updates=False) in the phases")
    p.add_argument("--xla-flags", default=os.environ.get("XLA_FLAGS", ""), help="XLA_FLAGS for the phases")
    p.add_argument("--phase", choices=["load", "forward", "convert", "orbax", "xla"], help=argparse.SUPPRESS)
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.phase:  # inside a phase's subprocess
        if a.phase == "load":
            r = phase_load(a.args[0], None)
        elif a.phase in ("forward", "orbax"):
            r = phase_load(a.args[0], a.args[1])
        elif a.phase == "xla":
            r = phase_xla(a.args[0])
        else:
            r = phase_convert(a.args[0], a.args[1])
        print(RESULT + json.dumps(r), flush=True)
        return 0

    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), XLA_FLAGS=a.xla_flags)
    if a.patch_nnx_jit:
        env[PATCH_ENV] = "1"
    else:
        env.pop(PATCH_ENV, None)
    work = Path(a.workdir)
    created = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    scratch = work / f"bench-{os.getpid()}"
    scratch.mkdir()
    res: dict = {"machine": machine(), "xla_flags": a.xla_flags, "patch": a.patch_nnx_jit,
                 "command": " ".join([".venv/bin/python", "benchmarks/real_size_load.py", *sys.argv[1:]])}
    try:
        if a.ckpt:
            ckpt = Path(a.ckpt).expanduser().absolute()
            desc = str(ckpt)
        else:
            import oss_jax

            writer = runpy.run_path(str(ROOT / "scripts" / "make_random_checkpoint.py"))
            ckpt = scratch / "random-20b"
            t0 = time.perf_counter()
            writer["write_random_checkpoint"](ckpt, oss_jax.GPT_OSS_20B, seed=0, shards=3, progress=True)
            res["create"] = {"create_s": time.perf_counter() - t0}
            size = sum(f.stat().st_size for f in ckpt.iterdir())
            desc = (f"random gpt-oss-20b shape from `scripts/make_random_checkpoint.py` "
                    f"({size / 1e9:.1f} GB in 3 shards)")
        logits = str(scratch / "logits_direct.npy")
        dst = str(scratch / "converted")
        other_flags = " ".join(f for f in a.xla_flags.split() if f != LOW_MEMORY_SCHEDULER)
        default_env = dict(env, XLA_FLAGS=other_flags)
        low_mem_env = dict(env, XLA_FLAGS=f"{other_flags} {LOW_MEMORY_SCHEDULER}".strip())
        res["xla_other_flags"] = other_flags
        phases = (("xla", [str(ckpt)], 4, default_env), ("xla_low_mem", [str(ckpt)], 4, low_mem_env),
                  ("load", [str(ckpt)], 16, env), ("forward", [str(ckpt), logits], 17, env),
                  ("convert", [str(ckpt), dst], 7, env), ("orbax", [dst, logits], 17, env))
        for key, args, need, phase_env in phases:
            if key == "orbax" and not (Path(dst).exists() and Path(logits).exists()):
                res[key] = {"error": "needs (b) and (c)"}
                continue
            try:
                res[key] = run_phase(key.removesuffix("_low_mem"), *args, need_gib=need, wait_s=a.wait,
                                     env=phase_env)
            except RuntimeError as e:  # an out-of-memory kill, say: report it, go on
                print(f"  {e}", flush=True)
                res[key] = {"error": str(e)}
    finally:
        if not a.keep:
            shutil.rmtree(scratch, ignore_errors=True)
            if created:
                shutil.rmtree(work, ignore_errors=True)
    text = report(res, desc)
    print("\n" + text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
