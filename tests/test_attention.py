"""The reference attention (``oss_jax.attention.attention``, also named ``naive``).

Checked against an independent numpy implementation (explicit sink column) and on the
sliding-window edge (the reference and ``blockwise``). The fast kernels are checked against the
reference in tests/test_kernels.py, which uses the helpers of this file.
"""

from __future__ import annotations

from functools import partial

import jax
import numpy as np

from oss_jax import attention as A

N, K, H = 4, 2, 8  # GQA: G = 2 query heads per KV head
TOL = 1e-5  # max abs error relative to the output's scale (fp32)


def rand_qkvs(rng, B, T, S, n=N, k=K):
    q = 2.0 * rng.standard_normal((B, T, n, H), np.float32)
    kk = rng.standard_normal((B, S, k, H), np.float32)
    v = rng.standard_normal((B, S, k, H), np.float32)
    sinks = 2.0 * rng.standard_normal((n,), np.float32)
    return q, kk, v, sinks


def assert_close(got, ref):
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert np.isfinite(got).all()
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    assert err <= TOL * scale, f"max abs error {err:.3g} (output scale {scale:.3g})"


# -- naive against numpy --------------------------------------------------------------------------
def numpy_attention(q, k, v, sinks, q_pos, k_pos, window):
    """Independent loop version: append the sink as an extra logit column, softmax, drop it."""
    B, T, n, h = q.shape
    kv_heads = k.shape[2]
    out = np.zeros(q.shape, np.float64)
    for b in range(B):
        for t in range(T):
            for hd in range(n):
                kh = hd // (n // kv_heads)
                cols, vals = [], []
                for s in range(k.shape[1]):
                    d = q_pos[b, t] - k_pos[b, s]
                    if k_pos[b, s] >= 0 and d >= 0 and (window is None or d < window):
                        cols.append(np.dot(q[b, t, hd], k[b, s, kh]) / np.sqrt(h))
                        vals.append(v[b, s, kh])
                logits = np.array([*cols, sinks[hd]], np.float64)
                p = np.exp(logits - logits.max())
                p = p / p.sum()
                p = p[:-1]  # drop the sink column: it takes mass, contributes no value
                if vals:
                    out[b, t, hd] = p @ np.array(vals, np.float64)
    return out.astype(np.float32)


@partial(jax.jit, static_argnames="window")
def naive_jit(q, k, v, sinks, q_pos, k_pos, window):
    return A.attention(q, k, v, sinks, q_pos, k_pos, window)


def test_naive_matches_numpy_with_explicit_sink_column():
    rng = np.random.default_rng(0)
    q, k, v, sinks = rand_qkvs(rng, 2, 5, 7)
    q_pos = np.array([[3, 4, 5, 6, 7], [-1, 0, 1, 2, 9]], np.int32)
    k_pos = np.array([[6, -1, 0, 2, 3, 1, 5], [0, 1, 2, 3, 4, -1, -1]], np.int32)  # unsorted, empty
    for window in (None, 3):
        ref = numpy_attention(q, k, v, sinks, q_pos, k_pos, window)
        got = np.asarray(naive_jit(q, k, v, sinks, q_pos, k_pos, window))
        np.testing.assert_allclose(got, ref, atol=2e-6, rtol=1e-5)
        assert np.all(got[1, 0] == 0)  # the query at position -1 sees nothing: output 0


@jax.jit
def edge_both(q, k, v, sinks, q_pos, k_pos):
    return (A.attention(q, k, v, sinks, q_pos, k_pos, 4),
            A.blockwise(q, k, v, sinks, q_pos, k_pos, 4, block_q=16, block_k=2))


def test_window_edge():
    """A key at distance window - 1 is visible, one at distance window is not (SPEC.md §2).

    Row 0 is the base case; row r >= 1 adds 1 to the value of key r - 1 only: the output of
    row r differs from row 0 exactly when key r - 1 is visible.
    """
    window = 4
    keys = [10, 10 - (window - 1), 10 - window, 11, -1]  # query at position 10
    visible = [True, True, False, False, False]
    rng = np.random.default_rng(1)
    q, k, v, sinks = rand_qkvs(rng, 1, 1, len(keys))
    B = 1 + len(keys)
    q, k, v = (np.repeat(x, B, axis=0) for x in (q, k, v))
    for s in range(len(keys)):
        v[1 + s, s] += 1.0
    q_pos = np.full((B, 1), 10, np.int32)
    k_pos = np.tile(np.array(keys, np.int32), (B, 1))
    for out in edge_both(q, k, v, sinks, q_pos, k_pos):
        out = np.asarray(out)
        changed = [not np.allclose(out[1 + s], out[0]) for s in range(len(keys))]
        assert changed == visible
