"""oss-jax against transformers on this CPU: prefill, decode, compile time, memory, MoE dispatch.

    .venv/bin/python benchmarks/suite.py                 # full suite, writes results/suite.md
    .venv/bin/python benchmarks/suite.py --quick         # smoke version, writes results/suite-quick.md
    .venv/bin/python benchmarks/suite.py --models 100m --no-dispatch

Models (``--models``, default all three; ``--quick`` leaves out 20b-layer):

* ``tiny``: the bundled trained model (``oss_jax.load("tiny")``, as shipped: fp32, MXFP4 experts
  kept packed; transformers dequantizes them to fp32 at load). Skipped, with a printed note, when
  it is not installed. Benchmarked in its own token ids (no o200k map).
* ``100m``: a random gpt-oss of 114M parameters (8 layers, d=512, 8 heads of 64, 2 KV heads,
  16 experts of 512 top-4, vocabulary 8000, alternating sliding/full attention).
* ``20b-layer``: ONE layer of gpt-oss-20b's shape (d=2880, 64 heads, 8 KV heads, 32 experts of
  2880 top-4; full attention) with the vocabulary reduced to 8000: 871M parameters.

Random models are written once by transformers itself (``GptOssForCausalLM`` with its own
initialisation, ``save_pretrained``, fp32 safetensors) into a temporary directory, and both sides
load that directory: ``oss_jax.load(dir, dtype)`` and ``GptOssForCausalLM.from_pretrained(dir,
dtype, attn_implementation="eager")`` (gpt-oss's sinks rule out SDPA in transformers).

Each side runs in its own worker process, both alive at once, driven by this script one call at
a time and alternating between the two (ours, theirs, ours, ...), so that a background job slows
both alike. Every measurement is one first call (compilation for JAX; warm-up for torch) and then
``--reps`` steady calls; tables report medians of the steady calls. Both processes are pinned to
the same ``--threads`` cores (default: every core this process may use); torch gets
``torch.set_num_threads`` of that, XLA sizes its thread pool from the affinity mask.

* prefill T: one sequence of T random tokens through the model into an empty KV cache, logits of
  the last position. oss-jax: ``compiled_apply`` in chunks of ``--chunk`` (512, as ``generate``
  does); transformers: one ``model(ids, use_cache=True, logits_to_keep=1)``.
* decode batch B: ``generate`` of N new tokens, greedy, KV cache on both sides (transformers:
  ``generate(do_sample=False, use_cache=True)``), from B prompts of 16 random tokens. Decode
  tokens/s = B * (N - 1) / (t(generate) - t(prefill of the same prompts)): the prefill, timed on
  its own through the very function ``generate`` calls first, is taken out.
* compile: the first ``generate`` call at batch 1 minus its steady time (prefill and decode loop),
  wall time and the worker's CPU time (``time.process_time``; less inflated by other jobs).
* peak RSS: the kernel's high-water mark of each worker process (``VmHWM`` in
  ``/proc/<pid>/status``) at the end: weights, runtime, compiled code, activations; RSS after
  load from ``psutil``.
* greedy agreement: how many of the N greedy tokens at batch 1 both sides generate identically.

The MoE dispatch section times ``Experts.dispatch`` = gather / scan / dense / sorted / auto on the
100m model (``--dispatch-models``: also 20b-layer; oss-jax only): one compiled forward for a
prefill of 512 tokens, and one decode step at batch 1 and 32 (see ``bench_dispatch``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_name, save

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
PROMPT = 16  # prompt tokens per row for the decode measurements

# transformers GptOssConfig arguments of the random models (everything else: gpt-oss defaults).
SPECS = {
    "100m": dict(vocab_size=8000, hidden_size=512, intermediate_size=512, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=16,
                 num_experts_per_tok=4, sliding_window=128),
    "20b-layer": dict(vocab_size=8000, hidden_size=2880, intermediate_size=2880, num_hidden_layers=1,
                      num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                      num_experts_per_tok=4, sliding_window=128, layer_types=["full_attention"]),
}
DESCRIPTION = {
    "tiny": "bundled tiny model (MXFP4 experts: packed in oss-jax, dequantized by transformers)",
    "100m": "random gpt-oss, 8 layers, d=512, 16 experts top-4, vocab 8000",
    "20b-layer": "one full-attention layer of gpt-oss-20b shape, vocab reduced to 8000",
}
MODES = ("gather", "scan", "dense", "sorted", "auto")


# -- workers: one process per side ---------------------------------------------------------------
def vm_kib(key: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def random_tokens(seed: int, vocab: int, B: int, T: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, (B, T)).astype(np.int32)


class Ours:
    """oss-jax: ``oss_jax.load`` then ``compiled_apply`` / ``oss_jax.generate``."""

    def __init__(self, ckpt: str, dtype: str, chunk: int):
        import oss_jax

        self.model = oss_jax.load(ckpt, dtype=dtype)
        self.model.token_map = None  # model ids in and out, as transformers sees them
        self.chunk = chunk
        self.vocab = self.model.config.vocab_size
        self.compiled: dict = {}

    def params(self) -> int:
        return self.model.config.param_counts()[0]  # packed MXFP4 bytes hold two values each

    def prefill(self, T: int, seed: int, B: int = 1, room: int = 1) -> None:
        """``generate``'s prefill: chunks of ``T`` tokens into a cache of ``T + room`` positions."""
        C = min(self.chunk, T)
        assert T % C == 0, (T, C)
        self.step(B, T, 0, T + room, seed, chunk=C)

    def step(self, B: int, T: int, start: int, S: int, seed: int, chunk: int | None = None) -> None:
        """Forward of ``[B, T]`` tokens at positions ``start...`` into an empty cache of ``S`` positions."""
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx

        from oss_jax.cache import KVCache
        from oss_jax.model import compiled_apply

        m = self.model
        toks = jnp.asarray(random_tokens(seed, self.vocab, B, T))
        pos = jnp.broadcast_to(jnp.arange(start, start + T, dtype=jnp.int32), (B, T))
        cache = KVCache.create(m.config, B, S, m.embed_VD[...].dtype)
        C = chunk or T
        for s in range(0, T, C):
            logits, cache = compiled_apply(*nnx.split(m), toks[:, s:s + C], pos[:, s:s + C], cache, last_only=True)
        np.asarray(logits)

    def compiled_step(self, B: int, T: int, start: int, S: int, seed: int) -> int:
        """``step`` in one chunk, compiled ahead of time (once per dispatch mode and shape) so that
        XLA's memory analysis comes with it; returns its temporaries in bytes."""
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx

        from oss_jax.cache import KVCache
        from oss_jax.model import compiled_apply

        m = self.model
        toks = jnp.asarray(random_tokens(seed, self.vocab, B, T))
        key = (m.layers[0].mlp.experts.dispatch, B, T, start, S)
        if key not in self.compiled:
            # Split and cache made once: per call they would add ~15 ms of Python and small
            # dispatches (100m) to a decode step that takes about as long.
            pos = jnp.broadcast_to(jnp.arange(start, start + T, dtype=jnp.int32), (B, T))
            cache = KVCache.create(m.config, B, S, m.embed_VD[...].dtype)
            graphdef, state = nnx.split(m)
            c = compiled_apply.lower(graphdef, state, toks, pos, cache, last_only=True).compile()
            self.compiled[key] = c, int(c.memory_analysis().temp_size_in_bytes), (state, pos, cache)
        c, temp, (state, pos, cache) = self.compiled[key]
        logits, _ = c(state, toks, pos, cache)
        np.asarray(logits)
        return temp

    def generate(self, B: int, N: int, seed: int) -> list[int]:
        import oss_jax

        out = oss_jax.generate(self.model, random_tokens(seed, self.vocab, B, PROMPT), max_new_tokens=N)
        return [int(t) for t in out[0]]

    def dispatch(self, mode: str) -> None:
        for layer in self.model.layers:
            layer.mlp.experts.dispatch = mode


class Theirs:
    """transformers ``GptOssForCausalLM`` (eager attention), ``torch.inference_mode``."""

    def __init__(self, ckpt: str, dtype: str, threads: int):
        import torch
        from transformers import GptOssForCausalLM

        torch.set_num_threads(threads)
        kw = {}
        cfg = json.loads((Path(ckpt) / "config.json").read_text())
        if not 0 <= (cfg.get("pad_token_id") or 0) < cfg["vocab_size"]:
            kw["pad_token_id"] = None  # an o200k id in a small vocabulary: nn.Embedding refuses it
        if "quantization_config" in cfg:
            from transformers import Mxfp4Config

            kw["quantization_config"] = Mxfp4Config(dequantize=True)
        self.torch = torch
        self.model = GptOssForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype),
                                                       attn_implementation="eager", **kw).eval()
        gc = self.model.generation_config
        gc.eos_token_id, gc.pad_token_id = None, 0  # never stop early: exactly N new tokens
        self.vocab = self.model.config.vocab_size

    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def prefill(self, T: int, seed: int, B: int = 1, room: int = 1) -> None:
        """What ``generate`` runs first: the prompt through the model into a fresh cache."""
        ids = self.torch.as_tensor(random_tokens(seed, self.vocab, B, T), dtype=self.torch.long)
        with self.torch.inference_mode():
            self.model(input_ids=ids, use_cache=True, logits_to_keep=1).logits.float().numpy()

    def generate(self, B: int, N: int, seed: int) -> list[int]:
        ids = self.torch.as_tensor(random_tokens(seed, self.vocab, B, PROMPT), dtype=self.torch.long)
        with self.torch.inference_mode():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=N,
                                      do_sample=False, use_cache=True)
        assert out.shape == (B, PROMPT + N), out.shape
        return [int(t) for t in out[0, PROMPT:]]


def worker(side: str, ckpt: str, dtype: str, threads: int, chunk: int) -> None:
    """Serve JSON commands from stdin; one JSON line per answer on the original stdout."""
    answer = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    t0 = time.perf_counter()
    impl = Ours(ckpt, dtype, chunk) if side == "ours" else Theirs(ckpt, dtype, threads)
    import psutil

    answer.write(json.dumps({"load_s": time.perf_counter() - t0, "params": impl.params(),
                             "rss_gib": psutil.Process().memory_info().rss / GIB}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "quit":
            break
        if op == "mem":
            answer.write(json.dumps({"peak_gib": vm_kib("VmHWM") * 1024 / GIB}) + "\n")
            continue
        t, cpu = time.perf_counter(), time.process_time()
        try:
            res = getattr(impl, op)(**cmd)
            answer.write(json.dumps({"s": time.perf_counter() - t, "cpu": time.process_time() - cpu,
                                     "out": res}) + "\n")
        except Exception as e:  # report and go on: one failed measurement is a table cell
            answer.write(json.dumps({"error": f"{type(e).__name__}: {e}"[:300]}) + "\n")


class Worker:
    """The parent's handle on a worker process."""

    def __init__(self, side: str, ckpt: str, args):
        cmd = [sys.executable, __file__, "--worker", side, "--ckpt", ckpt, "--dtype", args.dtype,
               "--threads", str(args.threads), "--chunk", str(args.chunk)]
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     stderr=subprocess.DEVNULL if not args.verbose else None,
                                     env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                                          "TRANSFORMERS_VERBOSITY": "error", "JAX_PLATFORMS": "cpu"})
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.side} worker died (exit {self.proc.wait()}); rerun with --verbose")
        return json.loads(line)

    def call(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> float:
        peak = self.call("mem")["peak_gib"]
        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.proc.stdin.flush()
        self.proc.wait()
        return peak


# -- measurements ----------------------------------------------------------------------------------
class Timing:
    """A first call and the steady calls of one measurement on one side."""

    def __init__(self):
        self.first: float | None = None
        self.first_cpu: float | None = None
        self.steady: list[float] = []
        self.steady_cpu: list[float] = []
        self.out = None
        self.error: str | None = None

    def add(self, r: dict) -> None:
        if "error" in r:
            self.error = self.error or r["error"]
            return
        if self.first is None:
            self.first, self.first_cpu, self.out = r["s"], r["cpu"], r["out"]
        else:
            self.steady.append(r["s"])
            self.steady_cpu.append(r["cpu"])

    @property
    def median(self) -> float | None:
        return statistics.median(self.steady) if self.steady else None

    def overhead(self) -> tuple[float, float] | None:
        """First call minus the steady median: (wall seconds, CPU seconds of the process)."""
        if self.median is None:
            return None
        return self.first - self.median, self.first_cpu - statistics.median(self.steady_cpu)


def measure(workers: list[Worker], op: str, reps: int, log: str, **kw) -> list[Timing]:
    """First call on each worker, then ``reps`` steady calls alternating between them."""
    timings = [Timing() for _ in workers]
    for _ in range(1 + reps):
        for w, t in zip(workers, timings, strict=True):
            if t.error is None:
                t.add(w.call(op, **kw))
    parts = []
    for w, t in zip(workers, timings, strict=True):
        parts.append(f"{w.side} {t.error}" if t.error else
                     f"{w.side} first {t.first:.2f}s steady {fmt_list(t.steady)}")
    print(f"  {log}: " + "; ".join(parts), flush=True)
    return timings


def fmt_list(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"


def decode_rate(t_gen: Timing, t_prefill: Timing, B: int, N: int) -> float | None:
    """Tokens/s of the N - 1 decode steps: generate minus its prefill."""
    if t_gen.median is None or t_prefill.median is None or t_gen.median <= t_prefill.median:
        return None
    return B * (N - 1) / (t_gen.median - t_prefill.median)


def loadavg() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def available_gib() -> float:
    import psutil

    return psutil.virtual_memory().available / GIB


# -- checkpoints -----------------------------------------------------------------------------------
MAKE = """
import sys, json, torch
from transformers import GptOssConfig, GptOssForCausalLM
torch.manual_seed(0)
cfg = GptOssConfig(**json.loads(sys.argv[2]))
model = GptOssForCausalLM(cfg)  # transformers' own initialisation (weights N(0, 0.02))
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("sinks") or name.endswith("bias"):
            p.normal_(0.0, 0.02)  # non-zero biases and sinks: every term of the forward pass used
model.save_pretrained(sys.argv[1])
"""


def make_checkpoint(name: str, workdir: Path) -> Path:
    out = workdir / name
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", MAKE, str(out), json.dumps(SPECS[name])], check=True,
                   env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    print(f"  wrote the random {name} checkpoint with transformers in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def checkpoint_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / GIB


# -- the suite -------------------------------------------------------------------------------------
def fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def bench_model(name: str, ckpt: Path, args, notes: list[str]) -> dict:
    plan = args.plan
    print(f"\n== {name}: {ckpt}", flush=True)
    workers = [Worker("ours", str(ckpt), args), Worker("theirs", str(ckpt), args)]
    ours = workers[0]
    row: dict = {"name": name, "params": ours.info["params"], "load": [w.info["load_s"] for w in workers],
                 "rss": [w.info["rss_gib"] for w in workers]}
    print(f"  loaded: {row['params'] / 1e6:.0f}M parameters; load {row['load'][0]:.1f} s / {row['load'][1]:.1f} s; "
          f"RSS {row['rss'][0]:.2f} / {row['rss'][1]:.2f} GiB (ours / theirs)", flush=True)
    N = plan["new_tokens"][name]
    reps = plan["reps"]
    try:
        # Batch 1 first: its first call is the compile time of a fresh generate.
        for B in plan["batches"]:
            t_n = measure(workers, "generate", reps, f"generate B={B} N={N}", B=B, N=N, seed=B)
            # The same prompts through the same compiled prefill (a cache of PROMPT + N positions).
            t_p = measure(workers, "prefill", reps, f"its prefill B={B}", T=PROMPT, B=B, room=N, seed=B)
            row[f"decode{B}"] = [decode_rate(a, b, B, N) for a, b in zip(t_n, t_p, strict=True)]
            if B == 1:
                row["compile"] = [t.overhead() for t in t_n]
                a, b = (t.out for t in t_n)
                row["agree"] = None if a is None or b is None else (sum(x == y for x, y in zip(a, b, strict=True)), N)
        for T in plan["prefill"]:
            cfg = json.loads((ckpt / "config.json").read_text())
            if T + 1 > cfg.get("max_position_embeddings", 1 << 30):
                notes.append(f"{name}: prefill {T} not run: past the model's context")
                row[f"prefill{T}"] = [None, None]
                continue
            active = list(workers)
            # transformers' eager attention holds a few [heads, T, T] float32 tensors at once.
            need = 3 * cfg["num_attention_heads"] * T * T * 4 / GIB
            if need > 0.5 * available_gib():
                notes.append(f"{name}: transformers prefill {T} not run: its eager attention needs about "
                             f"{need:.0f} GiB ({cfg['num_attention_heads']} heads x {T}^2 x fp32 x 3), "
                             f"{available_gib():.0f} GiB available")
                active = [ours]
            ts = measure(active, "prefill", plan["prefill_reps"].get(T, reps), f"prefill T={T}", T=T, seed=T)
            rates = [None if t.median is None else T / t.median for t in ts]
            row[f"prefill{T}"] = rates + [None] * (2 - len(rates))
    finally:
        row["peak"] = [w.close() for w in workers]
    return row


def bench_dispatch(name: str, ckpt: Path, args) -> dict:
    """Every ``Experts.dispatch`` mode on one model (oss-jax only), modes alternating call by call.

    Each regime is one compiled forward (``compiled_apply``, as ``generate`` calls it): a prefill
    of T tokens (batch 1, empty cache of T + 1), and a decode step (batch B, one token at position
    16 into a cache of 32 positions). Tokens/s = B * T / time of one call. Also XLA's temporaries
    of each compiled forward (``memory_analysis``): the working memory a mode needs.
    """
    plan = args.plan
    print(f"\n== MoE dispatch on {name}: {ckpt}", flush=True)
    w = Worker("ours", str(ckpt), args)
    T = plan["dispatch_prefill"]
    reps = plan["dispatch_reps"][name]
    results: dict = {}
    try:
        regimes = [("prefill", 1, dict(B=1, T=T, start=0, S=T + 1))]
        regimes += [("decode", B, dict(B=B, T=1, start=PROMPT, S=2 * PROMPT)) for B in plan["dispatch_batches"]]
        for kind, B, kw in regimes:
            modes = list(MODES)
            timings = {mode: Timing() for mode in modes}
            for _ in range(1 + reps):
                for mode in modes:
                    w.call("dispatch", mode=mode)
                    if timings[mode].error is None:
                        timings[mode].add(w.call("compiled_step", seed=B, **kw))
            for mode, t in timings.items():
                rate = None if t.median is None else B * kw["T"] / t.median
                temp = t.out
                results[(kind, B, mode)] = (rate, t.error, temp)
                print(f"  {kind} B={B} {mode}: {fmt(rate)} tok/s" + (f" ({t.error})" if t.error else "") +
                      f"; first {fmt(t.first, 2)} s, steady {fmt_list(t.steady)}; "
                      f"XLA temporaries {fmt(None if temp is None else temp / 2**20)} MiB", flush=True)
    finally:
        w.close()
    return results


PLANS = {
    "full": dict(prefill=(512, 4096), batches=(1, 8, 32), new_tokens={"tiny": 32, "100m": 32, "20b-layer": 16},
                 reps=3, prefill_reps={4096: 2}, dispatch_prefill=512, dispatch_batches=(1, 32),
                 dispatch_reps={"100m": 5, "20b-layer": 2}),
    "quick": dict(prefill=(512,), batches=(1, 8), new_tokens={"tiny": 8, "100m": 8, "20b-layer": 4},
                  reps=2, prefill_reps={}, dispatch_prefill=256, dispatch_batches=(1, 32),
                  dispatch_reps={"100m": 3, "20b-layer": 1}),
}


def report(rows: list[dict], dispatch: dict[str, dict], args, notes: list[str], started: str,
           load_before: str, load_after: str, elapsed: float) -> str:
    import jax
    import torch
    import transformers

    plan = args.plan
    mem = available_gib()
    lines = [
        "# oss-jax vs transformers on CPU" + (" (quick smoke run)" if args.quick else ""),
        "",
        f"Measured by `benchmarks/suite.py` ({'`--quick`' if args.quick else 'full'}); command: "
        f"`{' '.join(['.venv/bin/python', 'benchmarks/suite.py', *sys.argv[1:]])}`",
        "",
        f"- Date: {started}; suite wall time {elapsed / 60:.1f} min",
        f"- Machine: {cpu_name()}, {os.cpu_count()} cores, "
        f"{__import__('psutil').virtual_memory().total / GIB:.1f} GiB RAM ({mem:.1f} GiB available at the end); "
        f"{platform.platform()}; no accelerator",
        f"- Threads: both sides pinned to {args.threads} core(s) (`sched_setaffinity`); "
        f"`torch.set_num_threads({args.threads})`; XLA's pool sized by the affinity mask",
        f"- Load average (1/5/15 min): {load_before} at the start, {load_after} at the end"
        + (f". {args.shared_note}" if args.shared_note else ""),
        f"- Software: Python {platform.python_version()}, jax {jax.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        f"- Precision: {args.dtype} on both sides, same weights (one checkpoint read by both)",
        f"- Each number: median of {plan['reps']} steady calls after a first call"
        + (", 2 for prefill 4096" if 4096 in plan["prefill_reps"] else "")
        + f"; the two sides alternate call by call. Decode: {PROMPT}-token prompts, N new tokens "
        "(N per model below), tokens/s = B*(N-1) / (t(generate) - t(its prefill of the prompts)). "
        "Prefill: tokens / time, batch 1, "
        f"oss-jax in chunks of {args.chunk} as `generate` does.",
        "- Peak RSS: `VmHWM` of each side's worker process at the end (weights + runtime + compiled code + "
        "activations of every measurement); compile = first `generate` call at batch 1 minus its steady time.",
        "",
        "Models: " + "; ".join(f"**{r['name']}**: {DESCRIPTION[r['name']]}, {r['params'] / 1e6:.0f}M parameters, "
                               f"N = {plan['new_tokens'][r['name']]}" for r in rows),
        "",
    ]
    head = "| model | measurement | oss-jax | transformers | ours / theirs |"
    lines += [head, "|---|---|---|---|---|"]
    for r in rows:
        n = r["name"]
        for T in plan["prefill"]:
            a, b = r.get(f"prefill{T}", [None, None])
            lines.append(f"| {n} | prefill {T} tokens (tok/s) | {fmt(a)} | {fmt(b)} | {ratio(a, b)} |")
        for B in plan["batches"]:
            a, b = r.get(f"decode{B}", [None, None])
            lines.append(f"| {n} | decode batch {B} (tok/s) | {fmt(a)} | {fmt(b)} | {ratio(a, b)} |")
        a, b = (f"{c[0]:.2f} ({c[1]:.2f} CPU)" if c else "n/a" for c in r.get("compile", [None, None]))
        lines.append(f"| {n} | compile / warm-up of generate, batch 1: wall s (CPU s) | {a} | {b} | |")
        lines.append(f"| {n} | load (s) | {fmt(r['load'][0], 1)} | {fmt(r['load'][1], 1)} | |")
        a, b = r["peak"]
        lines.append(f"| {n} | peak RSS (GiB) | {fmt(a, 2)} | {fmt(b, 2)} | {ratio(a, b)} |")
        if r.get("agree"):
            lines.append(f"| {n} | greedy tokens identical, batch 1 | {r['agree'][0]} of {r['agree'][1]} | | |")
    for name, res in (dispatch or {}).items():
        lines += ["", f"## MoE dispatch on {name} (oss-jax only, {args.dtype})", "",
                  f"Tokens/s per `Experts.dispatch` mode, and in brackets XLA's temporaries of the compiled forward "
                  f"(`memory_analysis().temp_size_in_bytes`, MiB): the working memory the mode adds. Prefill: one "
                  f"sequence of {plan['dispatch_prefill']} tokens, one compiled forward; decode: one compiled decode "
                  f"step (one token per row at position {PROMPT}, cache of {2 * PROMPT}), tokens/s = batch / time. "
                  f"Median of {plan['dispatch_reps'][name]} calls after a first; modes alternate call by call. `auto` "
                  "is the policy in `oss_jax/kernels/experts.py` at the time of the run.", ""]
        regimes = [("prefill", 1)] + [("decode", B) for B in plan["dispatch_batches"]]
        names = [f"prefill {plan['dispatch_prefill']} tokens" if k == "prefill" else f"decode batch {B}"
                 for k, B in regimes]
        lines.append("| mode | " + " | ".join(names) + " |")
        lines.append("|---" * (len(regimes) + 1) + "|")
        for mode in MODES:
            cells = []
            for k, B in regimes:
                rate, err, temp = res.get((k, B, mode), (None, "not run", None))
                mib = "" if temp is None else f" [{temp / 2**20:,.0f}]"
                cells.append(f"{fmt(rate)}{mib}" if err is None else f"{fmt(rate)} ({err[:60]})")
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke version (minutes): fewer sizes and calls")
    p.add_argument("--models", nargs="+", choices=("tiny", "100m", "20b-layer"), help="default: all")
    p.add_argument("--no-dispatch", action="store_true", help="skip the MoE dispatch section")
    p.add_argument("--dispatch-models", nargs="+", choices=("100m", "20b-layer"), default=["100m"],
                   help="models of the dispatch section (default 100m; each must be among --models)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="cores for each side (default: all this process may use)")
    p.add_argument("--chunk", type=int, default=512, help="oss-jax prefill chunk (default 512, as generate)")
    p.add_argument("--tiny", default=None, help="checkpoint directory for the tiny row (default: the bundled one)")
    p.add_argument("--workdir", default=None, help="where the random checkpoints go (default: a temp dir)")
    p.add_argument("--shared-note", default="", help="a sentence on other jobs sharing the machine")
    p.add_argument("--out", default=None, help="results file name (default suite.md, suite-quick.md)")
    p.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    p.add_argument("--worker", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.ckpt, args.dtype, args.threads, args.chunk)
        return 0
    args.plan = PLANS["quick" if args.quick else "full"]
    models = args.models or (["tiny", "100m"] if args.quick else ["tiny", "100m", "20b-layer"])
    started = time.strftime("%Y-%m-%d %H:%M")
    load_before = loadavg()
    t_start = time.perf_counter()
    print(f"suite: models {models}, load average {load_before}, {available_gib():.1f} GiB available", flush=True)
    notes: list[str] = []
    rows: list[dict] = []
    dispatch: dict[str, dict] = {}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="oss-jax-suite-"))
    try:
        for name in models:
            if name == "tiny":
                from oss_jax.load import TINY_DIR

                ckpt = Path(args.tiny) if args.tiny else TINY_DIR / "model"
                if not (ckpt / "config.json").exists():
                    msg = (f"tiny: SKIPPED: the bundled tiny model is not installed ({ckpt} has no config.json; "
                           "build it with `oss-jax train --ship`)")
                    print(msg, flush=True)
                    notes.append(msg)
                    continue
            else:
                if name == "20b-layer":
                    need = 2 * 0.87e9 * (4 if args.dtype == "float32" else 2) / GIB
                    if 2.5 * need > available_gib():
                        notes.append(f"20b-layer skipped: two copies need {need:.1f} GiB, "
                                     f"{available_gib():.1f} GiB available (try --dtype bfloat16)")
                        continue
                ckpt = workdir / name
                if not (ckpt / "config.json").exists():
                    ckpt = make_checkpoint(name, workdir)
            rows.append(bench_model(name, ckpt, args, notes))
            if name in args.dispatch_models and not args.no_dispatch:
                dispatch[name] = bench_dispatch(name, ckpt, args)
            if name != "tiny" and not args.workdir:
                shutil.rmtree(ckpt, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    text = report(rows, dispatch, args, notes, started, load_before, loadavg(), time.perf_counter() - t_start)
    out = save(args.out or ("suite-quick.md" if args.quick else "suite.md"), text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
