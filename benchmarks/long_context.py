"""Long context: peak memory of a long chunked prefill, and KV-cache sizes at 128k.

    .venv/bin/python benchmarks/long_context.py [--tokens 32768] [--chunk 1024]

Part 1 runs ``generate`` on a random small gpt-oss (fp32, 4 layers, 8 heads of 64, window 128)
with a prompt of ``--tokens`` tokens, in a child process, and reports its peak RSS and time next
to what the naive path would need for one layer's attention logits (``N x T x T`` floats).
Part 2 prints the KV-cache bytes of gpt-oss-20b and -120b at 128k tokens: ring buffers for the
sliding layers versus full-length caches for every layer, from the cache's own shapes.
Writes ``benchmarks/results/long_context.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import cpu_name, save

CHILD = """
import json, resource, sys, time
import jax, numpy as np
from flax import nnx
import oss_jax
T, chunk = int(sys.argv[1]), int(sys.argv[2])
cfg = oss_jax.Config(vocab_size=1000, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=8,
                     experts_per_token=2, sliding_window=128, max_position_embeddings=131072)
model = oss_jax.GptOss(cfg, dtype=np.float32, rngs=nnx.Rngs(0))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tokens = np.random.default_rng(0).integers(0, 1000, (1, T)).astype(np.int32)
t0 = time.perf_counter()
out = oss_jax.generate(model, tokens, max_new_tokens=2, prefill_chunk=chunk)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "peak_kib": peak, "before_kib": base, "heads": cfg.num_attention_heads}))
"""


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def cache_bytes(cfg, T: int) -> tuple[int, int]:
    """(ring for sliding layers, full length everywhere) bytes of a bf16 cache for one sequence."""
    import jax
    import jax.numpy as jnp

    from oss_jax.cache import KVCache

    ring = jax.eval_shape(lambda: KVCache.create(cfg, 1, T, jnp.bfloat16))
    full = jax.eval_shape(lambda: KVCache.create(cfg.replace(layer_types=("full_attention",) * cfg.num_hidden_layers),
                                                 1, T, jnp.bfloat16))
    size = lambda c: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(c))
    return size(ring), size(full)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=1024)
    args = ap.parse_args()
    import oss_jax

    rows = ["| measurement | value |", "|---|---|"]
    r = subprocess.run([sys.executable, "-c", CHILD, str(args.tokens), str(args.chunk)], capture_output=True,
                       text=True)
    if r.returncode:
        sys.exit(r.stderr)
    m = json.loads(r.stdout.strip().splitlines()[-1])
    naive_layer = m["heads"] * args.tokens * args.tokens * 4
    what = f"prefill of {args.tokens} tokens (chunks of {args.chunk}) + 2 new tokens"
    rows += [f"| {what}: time | {m['seconds']:.1f} s |",
             f"| peak RSS of that process (model, cache, compiled code, JAX runtime) | {human(m['peak_kib'] * 1024)} |",
             f"| RSS before generating (model built, JAX loaded) | {human(m['before_kib'] * 1024)} |",
             f"| naive attention logits for ONE layer at {args.tokens} tokens ({m['heads']} heads x T x T x fp32) "
             f"| {human(naive_layer)} |"]
    for name, cfg in oss_jax.PRESETS.items():
        ring, full = cache_bytes(cfg, 131072)
        rows.append(f"| {name} KV cache at 131072 tokens, bf16, ring buffers on sliding layers | {human(ring)} |")
        rows.append(f"| {name} KV cache at 131072 tokens, bf16, full length on every layer | {human(full)} |")
    import jax

    head = (f"Machine: {cpu_name()}, {os.cpu_count()} cores, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}\n\n"
            f"Command: `.venv/bin/python benchmarks/long_context.py --tokens {args.tokens} --chunk {args.chunk}`\n")
    save("long_context.md", head + "\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
