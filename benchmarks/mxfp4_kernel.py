"""The native MXFP4 kernel against XLA's decode + matmul, on one gpt-oss-20b-shaped layer of experts.

One expert's matrices at the 20b shape (gate_up: O=5760, I=2880; down: O=2880, I=2880) times R rows,
each call on another of the 32 experts (so the weights come from memory, not cache, as in a decode
step), through ``kernels.experts.expert_matmul`` as the model calls it: ``native=False`` (XLA decodes
the expert, float32 or bfloat16) and ``native=True`` (``oss_jax.kernels.native``). Then a whole
layer's experts at batch 1: ``Experts`` mixing one token's top-4 (gather dispatch: four gate_up +
SwiGLU + down), float32 and bfloat16. Then a prefill's: T tokens' top-4 by ``"sorted"`` tiles against the
native grouped kernel (``"ragged"``). Random codes, scale bytes 118..122; about 0.45 GB of memory.

    .venv/bin/python benchmarks/mxfp4_kernel.py             # about 1-2 min
    .venv/bin/python benchmarks/mxfp4_kernel.py --reps 5 --rows 1 8
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from common import cpu_name, save


def timed(fn, args_list, reps: int) -> tuple[float, float]:
    """``(median, best)`` ms of ``fn(*args)`` over ``reps`` calls (after one warm-up call), cycling through
    ``args_list``. On a shared machine the best call is the one least disturbed by other jobs."""
    fn(*args_list[0]).block_until_ready()
    times = []
    for i in range(reps):
        args = args_list[(i + 1) % len(args_list)]
        t = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times), 1e3 * min(times)


def cell(t: tuple[float, float]) -> str:
    """``median (best)`` for a table cell."""
    return f"{t[0]:.2f} ({t[1]:.2f})" if t[0] < 100 else f"{t[0]:.0f} ({t[1]:.0f})"


def time_matmul(blocks, scales, xs, dtype, use: bool, reps: int) -> tuple[float, float]:
    """Median ms of ``expert_matmul`` (jitted, the expert a traced index) on ``xs``'s (x, e) pairs."""
    import jax

    from oss_jax.kernels import experts

    fn = jax.jit(lambda x, e, b, s: experts.expert_matmul(x.astype(dtype), (b, s), e, dtype, native=use))
    return timed(lambda x, e: fn(x, e, blocks, scales), xs, reps)


def time_layer(ex, calls, use: bool, reps: int, dispatch: str = "auto") -> tuple[float, float]:
    """Median ms of the ``Experts`` module ``ex`` (jitted, ``native=use``, ``dispatch``) on ``calls``' (x, idx,
    gates)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(ex)

    @jax.jit
    def mix(state, x, idx, gates):
        m = nnx.merge(graphdef, state)
        m.native, m.dispatch = use, dispatch
        return m(x, idx, gates)

    return timed(lambda x, idx, gates: mix(state, x, idx, gates), calls, reps)


def kernel_args(doc: str, rows: list[int], out: str) -> argparse.Namespace:
    """The kernel benchmarks' command line (``--reps``, ``--rows``, ``--out``), on the CPU; exits with one line
    when the native kernels are unavailable."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--reps", type=int, default=15, help="calls per measurement (median)")
    p.add_argument("--rows", type=int, nargs="+", default=rows, help="rows R of x")
    p.add_argument("--out", default=out)
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 512],
                   help="tokens of the prefill table (mxfp4_kernel.py)")
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from oss_jax.kernels import native

    if not native.available():
        sys.exit(f"{Path(sys.argv[0]).name}: the native kernels are unavailable ({native.reason()})")
    return args


def main() -> None:
    args = kernel_args(__doc__, [1, 8, 64], "mxfp4_kernel.md")
    import jax
    import jax.numpy as jnp

    from oss_jax.config import PRESETS
    from oss_jax.moe import Experts

    load_before = os.getloadavg()
    cfg = PRESETS["gpt-oss-20b"]
    E, D, F = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    rng = np.random.default_rng(0)
    weights = {}
    for name, O, I in (("gate_up", 2 * F, D), ("down", D, F)):
        blocks = jnp.asarray(rng.integers(0, 256, (E, O, I // 32, 16), dtype=np.uint8))
        scales = jnp.asarray(rng.integers(118, 123, (E, O, I // 32), dtype=np.uint8))
        weights[name] = (blocks, scales)

    rows = ["| matrix | R | XLA float32, ms | XLA bfloat16, ms | native, ms | native GB/s | speed-up vs faster XLA |",
            "|---|---|---|---|---|---|---|"]
    for name, (blocks, scales) in weights.items():
        _, O, nb, _ = blocks.shape
        packed_gb = O * nb * 17 / 1e9
        for R in args.rows:
            xs = [(jnp.asarray(rng.normal(0, 1, (R, nb * 32)).astype(np.float32)), jnp.int32(e))
                  for e in rng.permutation(E)]
            ms = {label: time_matmul(blocks, scales, xs, dtype, use, args.reps)
                  for label, dtype, use in (("xla32", jnp.float32, False), ("xla16", jnp.bfloat16, False),
                                            ("native", jnp.float32, True))}
            xla = min(ms["xla32"][0], ms["xla16"][0])
            rows.append(f"| {name} [{O} x {nb * 32}] | {R} | {cell(ms['xla32'])} | {cell(ms['xla16'])} | "
                        f"{cell(ms['native'])} | {packed_gb / ms['native'][0] * 1e3:.1f} | "
                        f"{xla / ms['native'][0]:.1f}x |")
            print(rows[-1], flush=True)

    layer = ["| experts of one layer, 1 token (4 x gate_up + down) | XLA, ms | native, ms | native GB/s | "
             "speed-up |", "|---|---|---|---|---|"]
    layer_gb = 4 * sum(b.shape[1] * b.shape[2] * 17 for b, _ in weights.values()) / 1e9

    def experts(dtype):
        ex = Experts(cfg, packed=True, dtype=dtype)
        ex.gate_up_blocks.set_value(weights["gate_up"][0])
        ex.gate_up_scales.set_value(weights["gate_up"][1])
        ex.down_blocks.set_value(weights["down"][0])
        ex.down_scales.set_value(weights["down"][1])
        ex.gate_up_bias_EF2.set_value(jnp.asarray(rng.normal(0, 0.1, (E, 2 * F)), dtype))
        ex.down_bias_ED.set_value(jnp.asarray(rng.normal(0, 0.1, (E, D)), dtype))
        return ex

    for dtype in (jnp.float32, jnp.bfloat16):
        ex = experts(dtype)
        calls = [(jnp.asarray(rng.normal(0, 1, (1, D)), dtype), jnp.asarray(rng.choice(E, (1, 4), replace=False),
                  jnp.int32), jnp.full((1, 4), 0.25, jnp.float32)) for _ in range(8)]
        ms = {use: time_layer(ex, calls, use, args.reps) for use in (False, True)}
        layer.append(f"| {jnp.dtype(dtype).name} | {cell(ms[False])} | {cell(ms[True])} | "
                     f"{layer_gb / ms[True][0] * 1e3:.1f} | {ms[False][0] / ms[True][0]:.1f}x |")
        print(layer[-1], flush=True)

    # A prefill: T tokens, 4T pairs, routed uniformly at random; bf16 activations as the model runs them.
    prefill = ["| experts of one layer, T tokens (bfloat16) | sorted tiles, ms | native grouped, ms | "
               "grouped GFLOP/s | speed-up |", "|---|---|---|---|---|"]
    ex = experts(jnp.bfloat16)
    flop = 2 * 4 * sum(b.shape[1] * b.shape[2] * 32 for b, _ in weights.values())  # per token
    for T in args.tokens:
        calls = [(jnp.asarray(rng.normal(0, 1, (T, D)), jnp.bfloat16),
                  jnp.asarray(np.stack([rng.choice(E, 4, replace=False) for _ in range(T)]), jnp.int32),
                  jnp.full((T, 4), 0.25, jnp.float32)) for _ in range(2)]
        ms = {d: time_layer(ex, calls, "auto", max(3, args.reps // 5), d) for d in ("sorted", "ragged")}
        prefill.append(f"| T = {T} ({4 * T} pairs) | {cell(ms['sorted'])} | {cell(ms['ragged'])} | "
                       f"{T * flop / ms['ragged'][0] / 1e6:.0f} | {ms['sorted'][0] / ms['ragged'][0]:.1f}x |")
        print(prefill[-1], flush=True)

    load = os.getloadavg()
    text = "\n".join([
        "# Native MXFP4 kernel vs XLA decode + matmul (CPU, gpt-oss-20b shapes)", "",
        "Measured by `benchmarks/mxfp4_kernel.py`; command: `"
        + " ".join([".venv/bin/python benchmarks/mxfp4_kernel.py", *sys.argv[1:]]) + "`", "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {cpu_name()}, {os.cpu_count()} cores; "
        f"{platform.platform()}; jax {jax.__version__}; load average at the start "
        f"{load_before[0]:.1f} / {load_before[1]:.1f} / {load_before[2]:.1f}, at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}",
        "- Times: median (best) of the calls, each on another of the 32 experts (weights from memory). GB/s: "
        "packed bytes (codes and scales) read per second, and speed-ups, from the medians. The XLA columns are "
        "`expert_matmul(..., native=False)`, decoding to that dtype; native sums in float32 whatever the dtype.",
        "",
        *rows, "", *layer, "",
        "A prefill's experts: `Experts` with `dispatch=\"sorted\"` (tiles of one expert's rows: XLA decodes the "
        "expert per tile and multiplies, or the one-row kernel for tiles of at most `native.max_rows()` rows) and "
        "`dispatch=\"ragged\"` (`native.grouped_matmul`, what `\"auto\"` takes on the CPU from "
        "`GROUPED_MIN_ROWS` pairs per expert). GFLOP/s: the products' multiply-adds x 2 per second.", "",
        *prefill, ""])
    save(args.out, text)


if __name__ == "__main__":
    main()
