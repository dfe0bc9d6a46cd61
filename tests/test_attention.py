"""Attention math (``oss_jax.attention``): the blockwise paths equal the naive reference.

``naive`` is checked against an independent numpy implementation (explicit sink column) and on
the sliding-window edge; ``blockwise`` and ``blockwise_causal`` are checked against ``naive`` on
causal prefill (left padding, position offsets), on a chunk attending to a shuffled cache with
empty slots, and on a decode step; a jaxpr walk shows the blockwise paths never hold a T x S array.

XLA CPU compiles each distinct (shape, window, block) configuration in a few seconds, so every
configuration below is compiled once (one jit computing all paths) and fed several data cases.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

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
    return A.naive(q, k, v, sinks, q_pos, k_pos, window)


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
    return (A.naive(q, k, v, sinks, q_pos, k_pos, 4),
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


# -- causal prefill: blockwise and blockwise_causal against naive ---------------------------------
@partial(jax.jit, static_argnames=("window", "block_q", "block_k"))
def three_ways(q, k, v, sinks, pos, *, window, block_q, block_k):
    blocks = dict(block_q=block_q, block_k=block_k)
    return (A.naive(q, k, v, sinks, pos, pos, window),
            A.blockwise(q, k, v, sinks, pos, pos, window, **blocks),
            A.blockwise_causal(q, k, v, sinks, pos, window, **blocks))


@pytest.mark.parametrize(("T", "block_q", "block_k", "window"), [
    (7, 16, 32, None),     # shorter than a block
    (130, 64, 32, 16),     # band path, T not a multiple of either block
    (300, 32, 64, 128),    # band path, gpt-oss window
    (300, 16, 16, None),   # full causal, many blocks
])
def test_causal_paths_match_naive(T, block_q, block_k, window):
    rng = np.random.default_rng(T)
    q, k, v, sinks = rand_qkvs(rng, 3, T, T)
    pad = min(5, T - 1)
    pos = np.stack([np.arange(T),                              # plain
                    np.maximum(np.arange(T) - pad, -1),        # left padding (-1)
                    np.arange(T) + 1000]).astype(np.int32)     # chunk starting at position 1000
    ref, bw, bwc = three_ways(q, k, v, sinks, pos, window=window, block_q=block_q, block_k=block_k)
    assert_close(bw, ref)
    assert_close(bwc, ref)
    assert np.all(np.asarray(bwc)[1, :pad] == 0)  # padding queries see nothing
    # Attention without sinks (sinks = -inf) also goes through the online softmax unharmed.
    ref, bw, bwc = three_ways(q, k, v, np.full_like(sinks, -np.inf), pos, window=window,
                              block_q=block_q, block_k=block_k)
    # (Row 1's padding queries see nothing: naive gives 0/0 there without a sink; skip that row.)
    assert_close(bw[0::2], ref[0::2])
    assert_close(bwc[0::2], ref[0::2])


# -- generic blockwise: cached keys in ring-buffer slot order -------------------------------------
@partial(jax.jit, static_argnames=("block_q", "block_k"))
def naive_and_blockwise(q, k, v, sinks, q_pos, k_pos, *, block_q, block_k):
    """Both windows in one compilation: (naive, blockwise) for window 16 and for None."""
    out = []
    for window in (16, None):
        out += [A.naive(q, k, v, sinks, q_pos, k_pos, window),
                A.blockwise(q, k, v, sinks, q_pos, k_pos, window, block_q=block_q, block_k=block_k)]
    return out


def cached_chunk(rng, starts, slots, T, pad):
    """Keys = ``slots`` cache slots (positions < start, shuffled, the rest empty) ++ the chunk.

    Row b's chunk holds positions ``starts[b] ..`` after ``pad[b]`` padding queries (position -1).
    """
    q_pos, k_pos = [], []
    for start, p in zip(starts, pad, strict=True):
        cache = np.full(slots, -1)
        held = np.arange(max(0, start - slots), start)  # a ring buffer keeps the last `slots`
        cache[rng.permutation(slots)[:len(held)]] = held
        chunk = np.concatenate([np.full(p, -1), start + np.arange(T - p)])
        q_pos.append(chunk)
        k_pos.append(np.concatenate([cache, chunk]))
    return np.array(q_pos, np.int32), np.array(k_pos, np.int32)


@pytest.mark.parametrize(("T", "slots", "block_q", "block_k"), [
    (37, 64, 16, 32),  # prefill chunk against a cache
    (1, 100, 16, 32),  # decode step
])
def test_blockwise_cached_chunk_matches_naive(T, slots, block_q, block_k):
    rng = np.random.default_rng(T)
    B = 3
    q, k, v, sinks = rand_qkvs(rng, B, T, slots + T)
    starts, pad = [50, 10, 250], [0, min(3, T - 1), 0]  # row 1: few cached keys, empty slots
    q_pos, k_pos = cached_chunk(rng, starts, slots, T, pad)
    outs = naive_and_blockwise(q, k, v, sinks, q_pos, k_pos, block_q=block_q, block_k=block_k)
    for ref, got in zip(outs[0::2], outs[1::2], strict=True):
        assert_close(got, ref)
        assert np.all(np.asarray(got)[1, :pad[1]] == 0)
    # Same data, keys in another slot order: the same answer.
    perm = rng.permutation(slots + T)
    outs2 = naive_and_blockwise(q, k[:, perm], v[:, perm], sinks, q_pos, k_pos[:, perm],
                                block_q=block_q, block_k=block_k)
    for a, b in zip(outs[1::2], outs2[1::2], strict=True):
        assert_close(b, a)


# -- never a T x S intermediate -------------------------------------------------------------------
def _all_shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(getattr(var.aval, "shape", ()))
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _all_shapes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _all_shapes(sub)


@pytest.mark.parametrize("path", ["naive", "blockwise", "causal_full", "causal_sliding"])
def test_no_T_by_S_intermediate(path):
    T = 4096
    sd = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    args = (sd(1, T, N, H), sd(1, T, K, H), sd(1, T, K, H), sd(N), jax.ShapeDtypeStruct((1, T), jnp.int32))
    fn = {
        "naive": lambda q, k, v, s, p: A.naive(q, k, v, s, p, p, 128),
        "blockwise": lambda q, k, v, s, p: A.blockwise(q, k, v, s, p, p, 128),
        "causal_full": lambda q, k, v, s, p: A.blockwise_causal(q, k, v, s, p, None),
        "causal_sliding": lambda q, k, v, s, p: A.blockwise_causal(q, k, v, s, p, 128),
    }[path]
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    big = [s for s in _all_shapes(jaxpr) if sum(d >= T for d in s) >= 2]
    if path == "naive":
        assert big  # the checker does see the reference's [B, K, G, T, S] logits
    else:
        assert not big, big[:3]
        largest = max(int(np.prod(s)) for s in _all_shapes(jaxpr))
        assert largest <= T * N * H * 2  # nothing beyond a few copies of q/k/v/output
