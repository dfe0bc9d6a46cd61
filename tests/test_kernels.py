"""Every fast path (``oss_jax.kernels``) equals the reference it speeds up.

(a) attention: ``materialized``, ``blockwise`` and ``blockwise_causal`` against
    ``attention.attention`` on causal prefill longer than the window (left padding, position
    offsets), on a chunk attending to a shuffled cache with empty slots, and on a decode step; a
    jaxpr walk shows the blockwise kernels never hold a T x S array.
(b) experts: every dispatch of ``kernels.experts`` against ``Experts.reference``, dense and packed
    weights, with ``SLICE_BYTES`` small enough that each expert is read in several slices.
(c) MXFP4: ``kernels.mxfp4.decode`` bit-identical to ``mxfp4.decode`` for all 16 codes in both
    nibbles and every scale 0..254 (float32 and bf16); the nibble-plane matmul equals
    ``x @ mxfp4.decode(...).T``.
(d) the whole model: ``set_attributes(impl="reference")`` against the default ``"fast"``: logits
    for short and long inputs (blockwise paths), and greedy generation through the KV cache.

XLA CPU compiles each distinct configuration in a few seconds, so each is compiled once (one jit
computing all paths) and fed several data cases.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.extend
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from test_attention import H, K, N, assert_close, rand_qkvs
from test_dispatch import CFG, TOL, randomize, routings

import oss_jax
from oss_jax import attention as A
from oss_jax import mxfp4
from oss_jax.attention import Attention
from oss_jax.kernels import attention as fast
from oss_jax.kernels import experts as expert_kernels
from oss_jax.kernels import logits as fast_logits
from oss_jax.kernels import mxfp4 as fast_mxfp4
from oss_jax.model import GptOss
from oss_jax.moe import Experts


# -- (a) attention: causal prefill ----------------------------------------------------------------
@partial(jax.jit, static_argnames=("window", "block_q", "block_k"))
def causal_ways(q, k, v, sinks, pos, *, window, block_q, block_k):
    """(reference, materialized, blockwise, blockwise_causal) of self-attention."""
    blocks = dict(block_q=block_q, block_k=block_k)
    return (A.attention(q, k, v, sinks, pos, pos, window),
            fast.materialized(q, k, v, sinks, pos, pos, window),
            fast.blockwise(q, k, v, sinks, pos, pos, window, **blocks),
            fast.blockwise_causal(q, k, v, sinks, pos, window, **blocks))


@pytest.mark.parametrize(("T", "block_q", "block_k", "window"), [
    (7, 16, 32, None),     # shorter than a block
    (130, 64, 32, 16),     # band path, T not a multiple of either block
    (300, 32, 64, 128),    # band path, gpt-oss window
    (300, 16, 16, None),   # full causal, many blocks
])
def test_causal_kernels_match_reference(T, block_q, block_k, window):
    rng = np.random.default_rng(T)
    q, k, v, sinks = rand_qkvs(rng, 3, T, T)
    pad = min(5, T - 1)
    pos = np.stack([np.arange(T),                              # plain
                    np.maximum(np.arange(T) - pad, -1),        # left padding (-1)
                    np.arange(T) + 1000]).astype(np.int32)     # chunk starting at position 1000
    ref, *kernels = causal_ways(q, k, v, sinks, pos, window=window, block_q=block_q, block_k=block_k)
    for got in kernels:
        assert_close(got, ref)
        assert np.all(np.asarray(got)[1, :pad] == 0)  # padding queries see nothing
    # Attention without sinks (sinks = -inf) also goes through the online softmax unharmed.
    ref, *kernels = causal_ways(q, k, v, np.full_like(sinks, -np.inf), pos, window=window,
                                block_q=block_q, block_k=block_k)
    # (Row 1's padding queries see nothing: the reference gives 0/0 there without a sink; skip that row.)
    for got in kernels:
        assert_close(got[0::2], ref[0::2])


# -- (a) attention: cached keys in ring-buffer slot order -----------------------------------------
@partial(jax.jit, static_argnames=("block_q", "block_k"))
def cached_ways(q, k, v, sinks, q_pos, k_pos, *, block_q, block_k):
    """For window 16 and for None: (reference, materialized, blockwise), in one compilation."""
    out = []
    for window in (16, None):
        out.append((A.attention(q, k, v, sinks, q_pos, k_pos, window),
                    fast.materialized(q, k, v, sinks, q_pos, k_pos, window),
                    fast.blockwise(q, k, v, sinks, q_pos, k_pos, window, block_q=block_q, block_k=block_k)))
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
def test_cached_chunk_kernels_match_reference(T, slots, block_q, block_k):
    rng = np.random.default_rng(T)
    B = 3
    q, k, v, sinks = rand_qkvs(rng, B, T, slots + T)
    starts, pad = [50, 10, 250], [0, min(3, T - 1), 0]  # row 1: few cached keys, empty slots
    q_pos, k_pos = cached_chunk(rng, starts, slots, T, pad)
    outs = cached_ways(q, k, v, sinks, q_pos, k_pos, block_q=block_q, block_k=block_k)
    for ref, *kernels in outs:
        for got in kernels:
            assert_close(got, ref)
            assert np.all(np.asarray(got)[1, :pad[1]] == 0)
    # Same data, keys in another slot order: the same answer.
    perm = rng.permutation(slots + T)
    outs2 = cached_ways(q, k[:, perm], v[:, perm], sinks, q_pos, k_pos[:, perm], block_q=block_q, block_k=block_k)
    for ways, ways2 in zip(outs, outs2, strict=True):
        for a, b in zip(ways, ways2, strict=True):
            assert_close(b, a)


@pytest.mark.parametrize("self_attention", [True, False])
def test_attend_picks_a_kernel_by_size(self_attention, monkeypatch):
    """``attend`` (what ``Attention`` calls) equals the reference on both sides of ``NAIVE_MAX``."""
    rng = np.random.default_rng(3)
    T = 40
    q, k, v, sinks = rand_qkvs(rng, 2, T, T)
    pos = np.tile(np.arange(T, dtype=np.int32), (2, 1))
    ref = A.attention(q, k, v, sinks, pos, pos, 8)
    order = slice(None) if self_attention else slice(None, None, -1)  # cache-like: keys in another order
    for naive_max in (T * T, T * T - 1):  # materialized, then blockwise(_causal)
        monkeypatch.setattr(fast, "NAIVE_MAX", naive_max)
        got = fast.attend(q, k[:, order], v[:, order], sinks, pos, pos[:, order], 8,
                          self_attention=self_attention)  # eager: reads NAIVE_MAX now
        assert_close(got, ref)


# -- (a) attention: never a T x S intermediate ----------------------------------------------------
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


@pytest.mark.parametrize("path", ["reference", "materialized", "blockwise", "causal_full", "causal_sliding"])
def test_no_T_by_S_intermediate(path):
    T = 4096
    sd = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    args = (sd(1, T, N, H), sd(1, T, K, H), sd(1, T, K, H), sd(N), jax.ShapeDtypeStruct((1, T), jnp.int32))
    fn = {
        "reference": lambda q, k, v, s, p: A.attention(q, k, v, s, p, p, 128),
        "materialized": lambda q, k, v, s, p: fast.materialized(q, k, v, s, p, p, 128),
        "blockwise": lambda q, k, v, s, p: fast.blockwise(q, k, v, s, p, p, 128),
        "causal_full": lambda q, k, v, s, p: fast.blockwise_causal(q, k, v, s, p, None),
        "causal_sliding": lambda q, k, v, s, p: fast.blockwise_causal(q, k, v, s, p, 128),
    }[path]
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    big = [s for s in _all_shapes(jaxpr) if sum(d >= T for d in s) >= 2]
    if path in ("reference", "materialized"):
        assert big  # the checker does see the materialised logits
    else:
        assert not big, big[:3]
        largest = max(int(np.prod(s)) for s in _all_shapes(jaxpr))
        assert largest <= T * N * H * 2  # nothing beyond a few copies of q/k/v/output


# -- (b) experts ----------------------------------------------------------------------------------
FAST_MODES = ("gather", "sorted", "scan", "auto", "dense")


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_every_dispatch_matches_the_reference_mixture(packed, monkeypatch):
    """Each fast dispatch against ``Experts.reference`` (``impl="reference"``), with every expert
    read in several slices; 1 token (a decode step: auto is gather) and 40 (auto is sorted)."""
    ex = Experts(CFG, packed=packed, dtype=jnp.float32)
    randomize(ex, 7)
    monkeypatch.setattr(expert_kernels, "SLICE_BYTES", 2048)
    w1, w2 = (ex.gate_up_blocks, ex.down_blocks) if packed else (ex.gate_up_EDF2, ex.down_EFD)
    for w in (w1, w2):  # both matrices really are cut into several slices
        shape = w[...].shape
        rows, row_bytes = (shape[1], shape[2] * shape[3] * 4) if packed else (shape[1], shape[2] * 4)
        assert expert_kernels._slice_rows(rows, row_bytes) < rows
    graphdef, state = nnx.split(ex)

    @jax.jit  # traced here, after the monkeypatch: it reads the small SLICE_BYTES
    def every_way(state, x, idx, gates):
        out = {}
        for impl, mode in [("reference", "auto")] + [("fast", m) for m in FAST_MODES]:
            m = nnx.merge(graphdef, state)
            m.impl, m.dispatch = impl, mode
            out[mode if impl == "fast" else impl] = m(x, idx, gates)
            if packed and impl == "fast":  # also XLA's sliced decode (the native kernel, where built, is the default)
                m.native = False
                out[f"{mode}, XLA"] = m(x, idx, gates)
        return out

    for X in (1, 40):
        x = jnp.asarray(np.random.default_rng(X).normal(0, 3.0, (X, CFG.hidden_size)).astype(np.float32))
        for name, (idx, gates) in routings(X).items():
            outs = every_way(state, x, jnp.asarray(idx), jnp.asarray(gates))
            ref = np.asarray(outs.pop("reference"))
            assert ref.shape == x.shape and np.abs(ref).max() > 0
            for mode, out in outs.items():
                err = np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref))
                assert err < TOL, f"{name}, {X} tokens, {mode}: relative error {err:.2e}"


def test_unknown_impl_is_an_error():
    ex = Experts(CFG, packed=False, dtype=jnp.float32)
    ex.impl = "quick"
    with pytest.raises(ValueError, match="unknown impl 'quick'"):
        ex(jnp.zeros((2, CFG.hidden_size)), jnp.zeros((2, CFG.experts_per_token), jnp.int32),
           jnp.ones((2, CFG.experts_per_token)) / CFG.experts_per_token)
    attn = Attention(CFG, 0, dtype=jnp.float32)
    attn.impl = "quick"
    with pytest.raises(ValueError, match="unknown impl 'quick'"):
        attn(jnp.zeros((1, 3, CFG.hidden_size)), jnp.arange(3)[None])


# -- (c) MXFP4 ------------------------------------------------------------------------------------
BITS = {np.dtype(np.float32): np.uint32, np.dtype(ml_dtypes.bfloat16): np.uint16}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_fast_decode_is_bit_identical(dtype):
    """Every byte (so every code in both nibbles) under every scale 0..254 (255 is NaN in the OCP
    spec): the same bits, -0.0, the flushed tiny values and the largest values included."""
    blocks = np.tile(np.arange(256, dtype=np.uint8).reshape(16, 16), (255, 1, 1))  # [255, nb = 16, 16]
    scales = np.repeat(np.arange(255, dtype=np.uint8)[:, None], 16, axis=1)  # row s: scale s
    ref = np.asarray(jax.jit(mxfp4.decode, static_argnums=2)(blocks, scales, dtype))
    got = np.asarray(jax.jit(fast_mxfp4.decode, static_argnums=2)(blocks, scales, dtype))
    assert got.shape == ref.shape == (255, 512) and got.dtype == ref.dtype
    assert np.array_equal(got.view(BITS[got.dtype]), ref.view(BITS[ref.dtype]))
    assert np.isinf(ref).any()  # the top scales overflow
    assert np.signbit(ref[127, 16]) and ref[127, 16] == 0  # element 16: byte 8's low nibble, code 8 = -0
    assert ref[127, 254] == -6.0 and ref[128, 255] == 12.0  # byte 0xFF: low nibble code 15, high code 7


@pytest.mark.parametrize("rows", [1, 5])  # a decode step, and a tile of rows
def test_fast_matmul_is_x_times_the_reference_decode(rows):
    rng = np.random.default_rng(rows)
    blocks = rng.integers(0, 256, (24, 3, 16), dtype=np.uint8)  # a weight [O = 24, I = 96]
    scales = rng.integers(118, 131, (24, 3), dtype=np.uint8)
    x = jnp.asarray(rng.normal(0, 1, (rows, 96)).astype(np.float32))
    got = np.asarray(fast_mxfp4.matmul(x, blocks, scales, jnp.float32))
    ref = np.asarray(x @ mxfp4.decode(blocks, scales, jnp.float32).T)
    assert got.shape == (rows, 24)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    with pytest.raises(TypeError, match=r"kernels\.mxfp4\.matmul: .*uint8"):
        fast_mxfp4.matmul(x, blocks.astype(np.int32), scales)


# -- (d) the whole model --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model() -> GptOss:
    """A random 2-layer model (a sliding layer of window 8, a full one): packed MXFP4 experts in
    layer 0, dense ones in layer 1."""
    m = GptOss(CFG, packed=True, dtype=jnp.float32)
    m.layers[1].mlp.experts = Experts(CFG, packed=False, dtype=jnp.float32)
    randomize(m, 11)
    return m


# -- (d') the unembedding a vocabulary slice at a time ------------------------------------------
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("slice_bytes", [4 * 24 * 7, 4 * 24 * 50, 1 << 30])  # rows 7 (101 = 14*7 + 3), 50, all
def test_sliced_unembedding_equals_the_einsum(dtype, slice_bytes):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 5, 24)), dtype)
    w = jnp.asarray(rng.standard_normal((101, 24)), dtype)
    want = jnp.einsum("btd,vd->btv", x, w, preferred_element_type=jnp.float32)
    got = jax.jit(partial(fast_logits.unembed, slice_bytes=slice_bytes))(x, w)
    assert got.shape == (2, 5, 101) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)  # |logits| ~ 5


def impls(model: GptOss) -> set[str]:
    return {n.impl for _, n in nnx.iter_graph(model) if isinstance(n, Attention | Experts | GptOss)}


def test_reference_and_fast_models_agree(model, monkeypatch):
    """Logits of a short input (materialized attention, sorted experts) and of a long one
    (``NAIVE_MAX`` lowered: blockwise attention, sliding layers on their band); then greedy
    generation, whose prefill chunks attend to the KV cache blockwise."""
    assert impls(model) == {"fast"}
    rng = np.random.default_rng(5)
    short = rng.integers(0, CFG.vocab_size, (2, 13)).astype(np.int32)
    long = rng.integers(0, CFG.vocab_size, (1, 37)).astype(np.int32)  # shapes no other test compiles
    prompts = [rng.integers(0, CFG.vocab_size, 19), rng.integers(0, CFG.vocab_size, 11)]
    out, traced = {}, []

    def spy(kernel):  # records which blockwise kernels the fast model traces
        def run(*args, **kwargs):
            traced.append(kernel.__name__)
            return kernel(*args, **kwargs)
        return run

    for impl in ("fast", "reference"):
        model.set_attributes(impl=impl)
        assert impls(model) == {impl}
        out[impl, "short"] = np.asarray(model(short))
        with monkeypatch.context() as mp:
            mp.setattr(fast, "NAIVE_MAX", 64)  # 37 x 37 keys, 8-token chunks x 16 or more keys: past it
            mp.setattr(fast_logits, "SLICE_BYTES", 4 * CFG.hidden_size * 10)  # the unembedding in slices
            for kernel in (fast.blockwise, fast.blockwise_causal):
                mp.setattr(fast, kernel.__name__, spy(kernel))
            out[impl, "long"] = np.asarray(model(long))
            out[impl, "generate"] = oss_jax.generate(model, prompts, max_new_tokens=5, prefill_chunk=8)
        assert set(traced) == ({"blockwise", "blockwise_causal"} if impl == "fast" else set()), impl
        traced.clear()
    model.set_attributes(impl="fast")
    for case in ("short", "long"):
        ref, got = out["reference", case], out["fast", case]
        assert got.shape == ref.shape and np.isfinite(ref).all()
        err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
        assert err < TOL, f"{case}: relative error {err:.2e}"
    np.testing.assert_array_equal(out["fast", "generate"], out["reference", "generate"])
