"""The native bf16 kernel against XLA, on gpt-oss-20b's bf16 products of a decode step.

The attention projections of one layer (q: 2880 -> 4096, k and v: 2880 -> 512, o: 4096 -> 2880; ``x @ w``)
and the unembedding (201,088 x 2880; ``x @ w.T``) at R rows of ``x``, as the model calls them:
``kernels.linear.project`` and ``kernels.logits.unembed``, with the native kernel (``kernels.native``,
``bf16_cpu.cc``) and without it (``kernels.linear.MAX_ROWS = 0``: XLA converts the weight to float32 in
memory, then multiplies). Each projection call takes the weights of another of 8 layers, so that they come
from memory, not cache, as in a decode step. Random weights; about 2.5 GB of memory.

    .venv/bin/python benchmarks/bf16_kernel.py             # about 2 min
    .venv/bin/python benchmarks/bf16_kernel.py --reps 5 --rows 1 8
"""

from __future__ import annotations

import os
import platform
import sys

import numpy as np
from common import cpu_name, save
from mxfp4_kernel import cell, kernel_args, timed


def main() -> None:
    args = kernel_args(__doc__, [1, 4, 8, 16], "bf16_kernel.md")
    import jax
    import jax.numpy as jnp

    from oss_jax.config import PRESETS
    from oss_jax.kernels import linear, logits

    load_before = os.getloadavg()
    cfg = PRESETS["gpt-oss-20b"]
    D, NH, KH, V = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
        cfg.vocab_size
    key = jax.random.key(0)

    def weights(shape, copies):
        return [(0.02 * jax.random.normal(jax.random.fold_in(key, i), shape)).astype(jnp.bfloat16)
                for i in range(copies)]

    cases = [("q", weights((D, NH), 8), False), ("k", weights((D, KH), 8), False), ("v", weights((D, KH), 8), False),
             ("o", weights((NH, D), 8), False), ("unembedding", weights((V, D), 1), True)]
    max_rows = linear.MAX_ROWS
    rows = ["| product | R | XLA, ms | native, ms | native GB/s | speed-up |", "|---|---|---|---|---|---|"]
    total = {}
    for name, ws, transposed in cases:
        I = ws[0].shape[1] if transposed else ws[0].shape[0]
        gb = ws[0].size * 2 / 1e9
        for R in args.rows:
            x = jnp.asarray(np.random.default_rng(R).normal(0, 1, (1, R, I)), jnp.bfloat16)
            ms = {}
            for label, limit in (("xla", 0), ("native", max_rows + R)):
                linear.MAX_ROWS = limit  # read when the function is traced: each setting compiles its own
                f = logits.unembed if transposed else linear.project
                fn = jax.jit(lambda x, w, f=f: f(x, w))  # a new function: jit's cache is keyed by the function
                ms[label] = timed(fn, [(x, w) for w in ws], args.reps)
                per_token = ms[label][0] * (1 if transposed else cfg.num_hidden_layers)
                total[label, R] = total.get((label, R), 0.0) + per_token
            linear.MAX_ROWS = max_rows
            shape = f"[{R} x {I}] @ [{ws[0].shape[0]} x {ws[0].shape[1]}]{'.T' if transposed else ''}"
            rows.append(f"| {name} {shape} | {R} | {cell(ms['xla'])} | {cell(ms['native'])} | "
                        f"{gb / ms['native'][0] * 1e3:.1f} | {ms['xla'][0] / ms['native'][0]:.1f}x |")
            print(rows[-1], flush=True)
    summary = ["| R | XLA, ms per token | native, ms per token |", "|---|---|---|"]
    summary += [f"| {R} | {total['xla', R]:.0f} | {total['native', R]:.0f} |" for R in args.rows]

    load_after = os.getloadavg()
    text = "\n".join([
        "# The native bf16 kernel against XLA: gpt-oss-20b's attention projections and unembedding",
        "",
        f"`{' '.join(['.venv/bin/python', *sys.argv])}` — {cpu_name()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, jax {jax.__version__}; load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after.",
        "",
        "Times: median (best) of the calls, ms; the projections cycle through 8 layers' weights. "
        f"`kernels.linear.MAX_ROWS` = {max_rows}: the model uses the kernel up to that many rows.",
        "",
        *rows,
        "",
        f"Per token of gpt-oss-20b ({cfg.num_hidden_layers} layers of q, k, v and o, one unembedding; medians):",
        "",
        *summary,
        "",
    ])
    print("\n".join(summary))
    print(f"wrote {save(args.out, text)}")


if __name__ == "__main__":
    main()
