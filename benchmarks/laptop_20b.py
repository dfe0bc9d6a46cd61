"""gpt-oss-20b as a student runs it on a laptop CPU: oss-jax beside llama.cpp, same weights, one run.

    .venv/bin/python benchmarks/laptop_20b.py --ckpt /work/ckpt/20b                      # oss-jax only
    .venv/bin/python benchmarks/laptop_20b.py --ckpt /work/ckpt/20b --llama-cpp ~/.cache/llamacpp
    .venv/bin/python benchmarks/laptop_20b.py --ckpt /tmp/small --prompt-tokens 100 --new-tokens 8   # smoke

``--ckpt`` is a Hugging Face gpt-oss checkpoint (``scripts/make_random_checkpoint.py --out DIR`` writes a
random one of the 20b shapes, 13 GB, MXFP4 experts). The chat the issue asks for: a conversation of
``--prompt-tokens`` tokens (1,000) and ``--new-tokens`` new ones (200), batch 1, greedy, no stop token (a
random model would stop anywhere), with XLA's settings as ``import oss_jax`` leaves them.

oss-jax runs in a subprocess of its own. A thread samples its resident set (psutil, every 20 ms) and the
table gives the peak of each phase:

  1. ``oss_jax.load`` (bf16, MXFP4 experts packed);
  2. the first ``generate`` (compiles the prefill and the token loop, then runs them): what a student waits
     for the first time;
  3. prefill of the conversation (``generate.prefill``, compiled, chunks of 512) and
  4. the token loop (``generate.decode``, compiled, the device loop ``generate`` uses by default), timed
     separately on the same cache, so prefill and decode tokens/s are each their own;
  5. the whole ``generate`` again (one call, as the notebooks make it).

and the kernel's high-water mark (``VmHWM``) for the whole subprocess.

llama.cpp (``--llama-cpp DIR``: the directory given to ``../shared/anchors/llamacpp/build.sh``, which
builds it there on first use, about 10 minutes): the GGUF of the same checkpoint is written beside it
(``write_gguf.py``, MXFP4 experts, bf16 rest) unless ``--gguf`` exists, then ``llama-bench -t THREADS -p
PROMPT -n NEW -r 2 -lm none`` (no memory map, so its RSS is its memory, as for oss-jax), its peak RSS
sampled the same way. They run one after the other, never together.

The table is printed and written to ``benchmarks/results/laptop_20b.md`` with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil
from common import PeakRss, cpu_name, save, vm_hwm

ROOT = Path(__file__).resolve().parents[1]
ANCHOR = ROOT.parent / "shared" / "anchors" / "llamacpp"
GIB = 1024**3


def conversation(tokens: int) -> list[int]:
    """``tokens`` o200k ids of real conversations: the shipped routes prompts, one after another."""
    from oss_jax import routes

    ids: list[int] = []
    for prompt in routes.read_prompts(routes.DEFAULT_PROMPTS):
        ids += prompt.tokens
        if len(ids) >= tokens:
            return ids[:tokens]
    raise SystemExit(f"--prompt-tokens {tokens}: the shipped prompts hold only {len(ids)} tokens")


def ossjax_phase(args: argparse.Namespace) -> dict:
    """The oss-jax side, in this (sub)process: returns its numbers."""
    import importlib

    import jax
    import numpy as np

    import oss_jax

    G = importlib.import_module("oss_jax.generate")
    rss, out = PeakRss(), {"xla_flags": os.environ.get("XLA_FLAGS", "")}
    t = time.perf_counter()
    model = oss_jax.load(args.ckpt, progress=False)
    out["load_s"], out["load_peak"] = time.perf_counter() - t, rss.take()
    out["after_load"] = psutil.Process().memory_info().rss
    prompt = np.asarray([conversation(args.prompt_tokens)], np.int32)

    def run() -> np.ndarray:
        return oss_jax.generate(model, prompt, max_new_tokens=args.new_tokens)

    t = time.perf_counter()
    first = run()
    out["first_s"], out["first_peak"] = time.perf_counter() - t, rss.take()

    # prefill and the token loop, each compiled already, timed on their own
    from flax import nnx

    plan = G._prepare(model, prompt, args.new_tokens, 0.0, 0, 1.0, (), None, None, 512, None)
    graphdef, state = nnx.split(model)
    cache = G._new_cache(model.config, plan)
    t = time.perf_counter()
    logits, cache = G.prefill(graphdef, state, plan.tokens_BT, plan.positions_BT, cache, plan.chunk)
    jax.block_until_ready(logits)
    out["prefill_s"], out["prefill_peak"] = time.perf_counter() - t, rss.take()
    t = time.perf_counter()
    tokens, cache = G.decode(graphdef, state, cache, logits, plan)
    out["decode_s"], out["decode_peak"] = time.perf_counter() - t, rss.take()
    del cache
    out["new_tokens"] = int((np.asarray(tokens) != G.PAD).sum())
    t = time.perf_counter()
    again = run()
    out["generate_s"], out["generate_peak"] = time.perf_counter() - t, rss.take()
    assert np.array_equal(first, again) and np.array_equal(np.asarray(tokens), first), \
        "generate and prefill + decode disagree"  # full vocabulary: model ids are o200k ids
    out["vmhwm"] = vm_hwm()
    rss.stop()
    return out


def llamacpp(args: argparse.Namespace) -> dict:
    """Build llama.cpp (first use), write the GGUF (if missing), run llama-bench; its numbers and peak RSS."""
    src = subprocess.run(["bash", str(ANCHOR / "build.sh"), args.llama_cpp], check=True, capture_output=True,
                         text=True).stdout.strip().splitlines()[-1]
    gguf = Path(args.gguf or Path(args.llama_cpp) / f"{Path(args.ckpt).resolve().name}.gguf")
    if not gguf.exists():
        tmp = gguf.with_name(gguf.name + ".tmp")
        subprocess.run([sys.executable, str(ANCHOR / "write_gguf.py"), args.ckpt, str(tmp)], check=True,
                       env=dict(os.environ, LLAMA_CPP_DIR=src))
        os.replace(tmp, gguf)
    cmd = [f"{src}/build/bin/llama-bench", "-m", str(gguf), "-t", str(args.threads), "-p", str(args.prompt_tokens),
           "-n", str(args.new_tokens), "-r", "2", "-lm", "none", "-o", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    rss = PeakRss(proc.pid)
    stdout, _ = proc.communicate()
    peak = rss.take()
    rss.stop()
    if proc.returncode:
        raise SystemExit(f"llama-bench failed ({proc.returncode}): {' '.join(cmd)}")
    rows = json.loads(stdout)
    out = {"peak": peak, "command": " ".join(cmd), "gguf_bytes": gguf.stat().st_size,
           "commit": rows[0].get("build_commit", "?")}
    for r in rows:
        kind = "prefill" if r["n_prompt"] and not r["n_gen"] else "decode"
        out[f"{kind}_tok_s"], out[f"{kind}_sd"] = r["avg_ts"], r["stddev_ts"]
    return out


def table(args: argparse.Namespace, o: dict, ll: dict | None) -> str:
    g = lambda b: f"{b / GIB:.1f} GiB"
    P, N = args.prompt_tokens, o["new_tokens"]
    rows = [
        ("load", f"{o['load_s']:.0f} s, peak {g(o['load_peak'])} (then {g(o['after_load'])})",
         f"— ({ll['gguf_bytes'] / GIB:.2f} GiB GGUF)" if ll else "not run"),
        (f"first `generate` ({P} + {N} tokens, compiles)", f"{o['first_s']:.0f} s, peak {g(o['first_peak'])}", "—"),
        (f"prefill {P} tokens", f"{P / o['prefill_s']:.1f} tok/s, peak {g(o['prefill_peak'])}",
         f"{ll['prefill_tok_s']:.1f} ± {ll['prefill_sd']:.1f} tok/s" if ll else "not run"),
        (f"decode {N} tokens, batch 1", f"{N / o['decode_s']:.2f} tok/s, peak {g(o['decode_peak'])}",
         f"{ll['decode_tok_s']:.2f} ± {ll['decode_sd']:.2f} tok/s" if ll else "not run"),
        (f"`generate` ({P} + {N} tokens, compiled)", f"{o['generate_s']:.0f} s, peak {g(o['generate_peak'])}", "—"),
        ("peak RSS of the process", f"{g(o['vmhwm'])} (VmHWM)", f"{g(ll['peak'])} (sampled)" if ll else "not run"),
    ]
    if ll:
        rows.append(("oss-jax / llama.cpp", f"prefill {P / o['prefill_s'] / ll['prefill_tok_s']:.2f}x, "
                     f"decode {N / o['decode_s'] / ll['decode_tok_s']:.2f}x", ""))
    head = ["| | oss-jax | llama.cpp |", "|---|---|---|"]
    body = [f"| {a} | {b} | {c} |" for a, b, c in rows]
    cmd = " ".join(["python", "benchmarks/laptop_20b.py", *sys.argv[1:]])
    return "\n".join([
        "# gpt-oss-20b on a laptop-class CPU: oss-jax and llama.cpp, same weights, one run", "",
        f"`{cmd}` — checkpoint `{args.ckpt}`; {cpu_name()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / GIB:.0f} GiB RAM, {platform.system()} {platform.release()}; "
        f"XLA_FLAGS as oss-jax set them: `{o['xla_flags']}`; llama.cpp {ll['commit'] if ll else '-'}, "
        f"{args.threads} threads, `-lm none`.", "", *head, *body, "",
        "Peaks are the resident set sampled every 20 ms during each phase (after the phases before it). "
        "Prefill and decode of oss-jax are timed on compiled programs; decode runs the device loop that "
        "`generate` uses by default. llama.cpp: `llama-bench`, mean ± sd of 2 repetitions.", ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="a Hugging Face gpt-oss checkpoint directory")
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--llama-cpp", help="llama.cpp build directory (built there by the anchor's build.sh if needed)")
    p.add_argument("--gguf", help="the GGUF to run (default: written into --llama-cpp)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default="laptop_20b.md", help="file name under benchmarks/results/")
    p.add_argument("--phase", choices=["ossjax"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase == "ossjax":
        print(json.dumps(ossjax_phase(args)))
        return
    if not Path(args.ckpt, "config.json").is_file():
        raise SystemExit(f"{args.ckpt}: not a checkpoint directory (no config.json)")
    ll = llamacpp(args) if args.llama_cpp else None
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # XLA's settings as oss-jax leaves them
    res = subprocess.run([sys.executable, __file__, "--phase", "ossjax", *sys.argv[1:]], env=env, check=True,
                         stdout=subprocess.PIPE, text=True)
    o = json.loads(res.stdout.strip().splitlines()[-1])
    save(args.out, table(args, o, ll))


if __name__ == "__main__":
    main()
