"""Routing metrics at scale, and generation speed with tracing off.

    .venv/bin/python benchmarks/routing_metrics.py [--tokens 100000] [--chunk 4096]
        [--compare NAME=DIR ...] [--rounds 3]

Part 1 (child process): every routing metric of ``oss_jax.routing`` / ``oss_jax.metrics`` over
``--tokens`` tokens of a gpt-oss-20b-shaped routing (24 layers, 32 experts, top-4, 64 heads),
synthetic router logits drawn chunk by chunk (tokens from a Zipf law over the 201088-id
vocabulary; two label groups for the JS divergence; a second "checkpoint" for router saturation).
Reports the time spent in the metrics (synthesis excluded), the process's peak RSS and the size
the one-shot arrays would have had.

Part 2 (child processes): ``oss_jax.generate`` on a small random model (fp32, 4 layers, 256
hidden, 8 experts top-2), batch 1, a 16-token prompt, 64 new tokens, timed after a warm-up call;
median of 15 calls. Also hashes the StableHLO of the forward pass and of a decode step (source
locations stripped): equal hashes mean tracing-off compiles exactly the same program. With
``--compare NAME=DIR`` (repeatable; DIR holds another ``oss_jax`` package, e.g. from
``git archive <commit> oss_jax | tar -x -C DIR``) the same measurement runs on that code too,
the versions alternating for ``--rounds`` rounds, because this machine's timings drift.

Writes ``benchmarks/results/routing_metrics.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import cpu_name, save

METRICS_CHILD = r"""
import json, resource, sys, time, tracemalloc
import numpy as np
from oss_jax import metrics as M
from oss_jax.routing import RoutingStats, SinkStats

T_total, C = int(sys.argv[1]), int(sys.argv[2])
L, E, k, N, V = 24, 32, 4, 64, 201088
rng = np.random.default_rng(0)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = rss()
stats = RoutingStats(L, E, k)
sinks = SinkStats(L, N)
kept = np.zeros(L)
bias = rng.standard_normal((L, E))  # uneven load, as a trained router has
t_metrics = t_synth = 0.0
tracemalloc.start()
metrics_peak = 0  # bytes numpy allocated inside the metric calls (their temporaries), max over chunks
for start in range(0, T_total, C):
    n = min(C, T_total - start)
    t0 = time.perf_counter()
    logits = (bias[:, None] + 1.5 * rng.standard_normal((L, n, E))).astype(np.float32)
    ids = np.argsort(-logits, axis=-1)[..., :k].astype(np.int32)
    top = np.take_along_axis(logits, ids, -1)
    gates = np.exp(top - top.max(-1, keepdims=True)); gates /= gates.sum(-1, keepdims=True)
    tokens = np.minimum(rng.zipf(1.3, n) - 1, V - 1)
    labels = np.where(np.arange(start, start + n) < 0.6 * T_total, "analysis", "final")
    other = np.argsort(-(logits + 0.5 * rng.standard_normal(logits.shape)), axis=-1)[..., :k]
    mass = rng.beta(2, 5, (L, n, N)).astype(np.float32)
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    t1 = time.perf_counter()
    stats.update(ids, logits, gates_LTk=gates, tokens_T=tokens, labels=labels)
    kept += M.router_saturation(ids, other) * n
    sinks.update(mass, np.arange(start, start + n))
    t_metrics += time.perf_counter() - t1
    t_synth += t1 - t0
    metrics_peak = max(metrics_peak, tracemalloc.get_traced_memory()[1] - before)
t0 = time.perf_counter()
summary = stats.summary()
js = stats.js_divergence("analysis", "final")
saturation = kept / T_total
by_head, by_type, by_pos = sinks.by_head(), sinks.by_layer_type(np.arange(L) % 2 == 0), sinks.by_position()
t_metrics += time.perf_counter() - t0
arrays = [*vars(stats).values(), *stats.group_load.values(), *vars(sinks).values()]
state = sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))
print(json.dumps({"metrics_s": t_metrics, "synth_s": t_synth, "peak": rss(), "base": base,
                  "metrics_peak": metrics_peak, "state": state,
                  "distinct_tokens": int(len(stats.token_ids)), "cv_mean": float(summary["cv"].mean()),
                  "entropy_mean": float(summary["entropy"].mean()),
                  "consecutive_any": float(summary["consecutive_any"].mean()),
                  "saturation": float(saturation.mean()), "js": float(js.mean()),
                  "vocab_spec": float(summary["vocab_specialization"].mean())}))
"""

GEN_CHILD = r"""
import hashlib, json, re, statistics, sys, time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
import oss_jax
from oss_jax.cache import KVCache
from oss_jax.generate import generate
cfg = oss_jax.Config(vocab_size=1000, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=8,
                     experts_per_token=2, sliding_window=128, max_position_embeddings=4096)
model = oss_jax.GptOss(cfg, dtype=np.float32, rngs=nnx.Rngs(0))
prompt = np.random.default_rng(0).integers(0, 1000, (1, 16)).astype(np.int32)
t0 = time.perf_counter(); first = generate(model, prompt, max_new_tokens=64); warm = time.perf_counter() - t0
times = []
for _ in range(int(sys.argv[1])):
    t0 = time.perf_counter(); out = generate(model, prompt, max_new_tokens=64); times.append(time.perf_counter() - t0)
assert (out == first).all()
g, s = nnx.split(model)
fwd = lambda s, t, p: nnx.merge(g, s).apply(t, p)[0]
step = lambda s, c, t, p: nnx.merge(g, s).apply(t, p, c, last_only=True)
text = jax.jit(fwd).lower(s, jnp.asarray(prompt), jnp.arange(16, dtype=jnp.int32)[None]).as_text()
text += jax.jit(step).lower(s, KVCache.create(cfg, 1, 80, jnp.float32), jnp.asarray(prompt[:, :1]),
                            jnp.zeros((1, 1), jnp.int32)).as_text()
text = re.sub(r"loc\(.*?\)", "", text)
print(json.dumps({"src": oss_jax.__file__, "warmup_s": warm, "times": times,
                  "hlo": hashlib.sha256(text.encode()).hexdigest()[:16]}))
"""


def child(code: str, *args: str, src: str | None = None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cwd = None
    if src:  # import oss_jax from src (PYTHONPATH comes before the editable install's finder)
        env["PYTHONPATH"] = str(Path(src).resolve())
        cwd = "/"
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd)
    if r.returncode:
        sys.exit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--compare", action="append", default=[], metavar="NAME=DIR",
                    help="also time generation with the oss_jax package in DIR (repeatable)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=15)
    args = ap.parse_args()
    import jax

    m = child(METRICS_CHILD, str(args.tokens), str(args.chunk))
    L, E, N = 24, 32, 64
    T = args.tokens
    rows = ["| measurement | value |", "|---|---|",
            f"| time in the metrics (all updates + summary), {T} tokens in chunks of {args.chunk} "
            f"| {m['metrics_s']:.1f} s ({T / m['metrics_s']:,.0f} tokens/s) |",
            f"| time synthesising the routings (not part of the metrics) | {m['synth_s']:.1f} s |",
            f"| peak RSS of the process (incl. the synthetic chunks) | {mib(m['peak'])} |",
            f"| peak memory allocated inside the metric calls for one chunk (tracemalloc) | {mib(m['metrics_peak'])} |",
            f"| accumulated state at the end (all counts and sums) | {mib(m['state'])} |",
            f"| RSS after importing numpy + oss_jax, before any data | {mib(m['base'])} |",
            f"| one-shot router logits, {L} x {T} x {E} float32 (never held) | {mib(L * T * E * 4)} |",
            f"| one-shot sink mass, {L} x {T} x {N} float32 (never held) | {mib(L * T * N * 4)} |",
            f"| distinct token ids counted (per-token-id table {L} x n x {E} int32) | {m['distinct_tokens']} "
            f"({mib(m['distinct_tokens'] * L * E * 4)}) |",
            f"| sanity (the synthetic router is biased, so not at the random baselines): mean CV / routing "
            f"entropy (ln 32 = 3.47) / consecutive any-of-top-4 (random 0.431) "
            f"| {m['cv_mean']:.3f} / {m['entropy_mean']:.3f} / {m['consecutive_any']:.3f} |"]

    sources = [tuple(c.split("=", 1)) for c in args.compare] + [("this working tree", None)]
    runs: dict[str, list[dict]] = {name: [] for name, _ in sources}
    for _ in range(args.rounds):
        for name, src in sources:
            runs[name].append(child(GEN_CHILD, str(args.calls), src=src))
    gen_rows = ["| code | tokens/s (median of all calls) | median per round (s) | best call (s) | first call incl. "
                "compile (s) | StableHLO hash (forward + decode step) |", "|---|---|---|---|---|---|"]
    for name, _ in sources:
        times = [t for r in runs[name] for t in r["times"]]
        per_round = ", ".join(f"{statistics.median(r['times']):.3f}" for r in runs[name])
        hashes = sorted({r["hlo"] for r in runs[name]})
        gen_rows.append(f"| {name} | {64 / statistics.median(times):.0f} | {per_round} | {min(times):.3f} "
                        f"| {statistics.median(r['warmup_s'] for r in runs[name]):.1f} | {', '.join(hashes)} |")

    cmd = " ".join(["benchmarks/routing_metrics.py", *sys.argv[1:]])
    text = (f"Machine: {cpu_name()}, {os.cpu_count()} cores (shared with other jobs: timings drift), "
            f"Python {platform.python_version()}, jax {jax.__version__}, CPU backend, {time.strftime('%Y-%m-%d')}\n\n"
            f"Command: `.venv/bin/python {cmd}`\n\n"
            f"## Metrics over {T} tokens of a gpt-oss-20b-shaped routing\n\n"
            "Streaming (`RoutingStats`, `SinkStats`, router saturation per chunk): load, CV, MaxVio, Switch loss, "
            "routing and gate entropy, co-activation, cross-layer co-occurrence, vocabulary and domain "
            "specialization, consecutive-token rates, JS divergence between two label groups, router "
            "saturation against a second routing, sink mass by head / layer type / position.\n\n"
            + "\n".join(rows) + "\n\n"
            "## Generation with tracing off\n\n"
            f"`oss_jax.generate`, small random model (fp32, 4 layers, hidden 256, 8 experts top-2, vocab 1000), "
            f"batch 1, 16-token prompt, 64 new tokens, {args.calls} timed calls after a warm-up, "
            f"{args.rounds} alternating rounds per code version.\n\n" + "\n".join(gen_rows) + "\n")
    save("routing_metrics.md", text)


if __name__ == "__main__":
    main()
