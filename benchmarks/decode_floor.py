"""How close batch-1 decode on CPU is to the memory-bandwidth floor.

A batch-1 decode step reads every weight matrix it uses once: per layer the attention
projections, the router and k of the E experts, then the unembedding. On a CPU those reads, not
the arithmetic, set the pace. This script times numpy matrix-vector products over arrays of
exactly those shapes (the k experts drawn at random from stacked arrays, so that they come from
memory, not cache) as the floor, and oss-jax's compiled decode step (`compiled_apply` with a KV
cache, as `generate` runs it) on a random model of the same shape, both float32, in one run.

    .venv/bin/python benchmarks/decode_floor.py            # 100m and the 20b-shaped layer
    .venv/bin/python benchmarks/decode_floor.py --models 100m
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
from common import cpu_name, save
from suite import SPECS  # the same model shapes as the suite

MB = 1e6


def floor(cfg, reps: int, seed: int = 0) -> tuple[float, float]:
    """numpy's time for one token's matrix-vector products: ``(median ms, MB read per token)``."""
    rng = np.random.default_rng(seed)
    D, F, E, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.experts_per_token
    NH, KH = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim

    def w(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    layers = [dict(q=w(D, NH), k=w(D, KH), v=w(D, KH), o=w(NH, D), router=w(D, E), up=w(E, D, 2 * F),
                   down=w(E, F, D)) for _ in range(cfg.num_hidden_layers)]
    unembed = w(cfg.vocab_size, D)
    x, a = w(D), w(NH)
    per_layer = 4 * (2 * D * NH + 2 * D * KH + D * E + k * (3 * D * F))
    read = (cfg.num_hidden_layers * per_layer + 4 * cfg.vocab_size * D) / MB

    def token(experts):
        for L, chosen in zip(layers, experts, strict=True):
            x @ L["q"], x @ L["k"], x @ L["v"], a @ L["o"], x @ L["router"]
            for e in chosen:
                (x @ L["up"][e])[:F] @ L["down"][e]
        return unembed @ x

    times = []
    for _ in range(reps + 1):
        experts = [rng.choice(E, k, replace=False) for _ in layers]
        t = time.perf_counter()
        token(experts)
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]) * 1e3), read


def ours(cfg, reps: int, slice_mib: float | None = None) -> float:
    """Median ms of oss-jax's compiled batch-1 decode step (one token at position 16, cache of 256).

    ``slice_mib``: overrides ``oss_jax.kernels.experts.SLICE_BYTES`` (0: experts are never sliced).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from oss_jax.cache import KVCache
    from oss_jax.kernels import experts as expert_kernels
    from oss_jax.model import GptOss, compiled_apply

    if slice_mib is not None:
        expert_kernels.SLICE_BYTES = int(slice_mib * 2**20) if slice_mib > 0 else 1 << 62

    model = GptOss(cfg, packed=False, dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    cache = KVCache.create(cfg, 1, 256, jnp.float32)
    tok, pos = jnp.array([[7]], jnp.int32), jnp.array([[16]], jnp.int32)
    step = compiled_apply.lower(graphdef, state, tok, pos, cache, last_only=True).compile()
    times = []
    for i in range(reps + 2):
        tok = jnp.array([[(7 + 31 * i) % cfg.vocab_size]], jnp.int32)  # other tokens: other experts
        t = time.perf_counter()
        jax.block_until_ready(step(state, tok, pos, cache))
        times.append(time.perf_counter() - t)
    return float(np.median(times[2:]) * 1e3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(SPECS), default=sorted(SPECS))
    p.add_argument("--slice-mib", type=float, default=None,
                   help="oss-jax's expert slice size in MiB (default: kernels.experts.SLICE_BYTES; 0: no slicing)")
    p.add_argument("--out", default="decode_floor.md", help="file name under benchmarks/results/")
    args = p.parse_args()
    from oss_jax.config import Config

    rows = []
    for name in args.models:
        cfg = Config.from_dict(SPECS[name])
        reps = 30 if name == "100m" else 6
        f_ms, read = floor(cfg, reps)
        o_ms = ours(cfg, reps, args.slice_mib)
        rows.append(f"| {name} | {read:,.0f} | {f_ms:.1f} ({1e3 / f_ms:.0f} tok/s, {read / f_ms:.1f} GB/s) | "
                    f"{o_ms:.1f} ({1e3 / o_ms:.0f} tok/s, {read / o_ms:.1f} GB/s) | {f_ms / o_ms:.2f} |")
        print(rows[-1], flush=True)
    load = os.getloadavg()
    text = "\n".join([
        "# Batch-1 decode against the memory-bandwidth floor (CPU, float32)",
        "",
        "Measured by `benchmarks/decode_floor.py`; command: `"
        + " ".join([".venv/bin/python benchmarks/decode_floor.py", *sys.argv[1:]]) + "`",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {cpu_name()}, {os.cpu_count()} cores; "
        f"{platform.platform()}; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}",
        "- Floor: numpy matrix-vector products over arrays of the shapes one token reads (attention "
        "projections, router, k random experts of the stacked E per layer, unembedding); median of the "
        "tokens. oss-jax: its compiled decode step, one token with a KV cache of 256, random weights.",
        "",
        "| model | MB read per token | numpy floor, ms | oss-jax step, ms | floor / oss-jax |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])
    save(args.out, text)


if __name__ == "__main__":
    main()
