"""The native kernels (``oss_jax.kernels.native``) against the reference, and their fallback.

(a) the kernel: both decoders (the register look-up and the portable arithmetic one) equal
``oss_jax.mxfp4.matmul`` on random codes, several experts, odd row counts and ragged tiles, the
extreme scale bytes 0, 127 and 254; its gradient with respect to ``x`` equals XLA's.
(b) the model: logits with ``native`` on and off, greedy ``generate``, packed MXFP4 checkpoint.
(c) no compiler, a failing one, ``OSS_JAX_NATIVE=0``: the XLA path, one notice line (none when
turned off on purpose), the same logits; ``native=True`` then a one-line error.
(d) the bf16 kernel (``bf16_cpu.cc``: ``x @ w`` and ``x @ w.T``) against float64 products, every tile and
tail; its gradients; ``kernels.linear``'s rule for when it runs; a bf16 model's decode steps with it
(``impl="fast"``) against the reference einsums.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oss_jax
from oss_jax import mxfp4
from oss_jax.kernels import experts as expert_kernels
from oss_jax.kernels import linear, native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernel unavailable: {native.reason()}")
TARGETS = [native.TARGET, native.PORTABLE_TARGET]
E, O, I = 3, 38, 96  # O = 38: nine tiles of 4 output rows and two single rows


def weights(seed: int, low: int = 100, high: int = 141) -> tuple[np.ndarray, np.ndarray]:
    """Random blocks ``[E, O, I/32, 16]`` and scale bytes in ``[low, high)`` ``[E, O, I/32]``."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (E, O, I // 32, 16), dtype=np.uint8)
    return blocks, rng.integers(low, high, (E, O, I // 32), dtype=np.uint8)


def check(got, x, blocks, scales, e) -> None:
    """``got`` equals ``mxfp4.matmul`` (XLA, float32) within float32 summation error: per output, 1e-5 of
    ``sum |x| |w|`` (the sum of the magnitudes of the products it adds)."""
    w = mxfp4.decode(blocks[e], scales[e], jnp.float32)
    want = np.asarray(mxfp4.matmul(jnp.asarray(x), blocks[e], scales[e], jnp.float32))
    bound = 1e-5 * np.asarray(jnp.abs(jnp.asarray(x)) @ jnp.abs(w).T)
    got = np.asarray(got)
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.all(np.isfinite(want)) and np.abs(want).max() > 0
    bad = np.abs(got - want) > bound
    assert not bad.any(), f"expert {e}: {bad.sum()} outputs differ, first at {np.argwhere(bad)[0]}"


@pytest.mark.parametrize("R", [1, 3, 4, 13])  # tiles of up to 4 input rows: 13 = 3 full + 1
@pytest.mark.parametrize("target", TARGETS, ids=["lut", "portable"])
def test_kernel_equals_the_reference(target, R):
    """Every expert, and the extreme scales: a row all at 127 (weights = E2M1 values), blocks at 0
    (2^-127) and at 254 (2^127: codes of magnitude <= 1.5 and small inputs, so nothing overflows)."""
    blocks, scales = weights(R)
    scales[:, 0] = 127
    scales[:, 1, 0] = 0
    scales[:, 2, 1] = 254
    blocks[:, 2, 1] &= 0xBB  # clear bit 2 of both codes: magnitudes 0..1.5, at most 1.5 * 2^127
    x = np.random.default_rng(R).normal(0, 1e-3, (R, I)).astype(np.float32)
    f = jax.jit(lambda x, e: native.expert_matmul(x, blocks, scales, e, target=target))
    for e in range(E):
        got = f(x, jnp.int32(e))
        check(got, x, blocks, scales, e)
    assert np.abs(np.asarray(got)[:, 2]).max() > 1e30  # the 2^127 block is really in the sum
    # An index out of range clamps, as dynamic_slice does (the XLA path's behaviour).
    np.testing.assert_array_equal(f(x, jnp.int32(E)), got)
    np.testing.assert_array_equal(f(x, jnp.int32(-1)), f(x, jnp.int32(0)))


@pytest.mark.parametrize("R", [1, 2])  # one input row scales each block's sum, more scale the weights
@pytest.mark.parametrize("target", TARGETS, ids=["lut", "portable"])
def test_smallest_scale_flushes_like_xla(target, R):
    """Scale byte 0 (2^-127) and 1: weights below 2^-126 are flushed to zero as XLA's decode does,
    the larger ones kept (inputs of 2^100 make the products normal floats)."""
    blocks, _ = weights(5)
    scales = np.random.default_rng(5).integers(0, 2, (E, O, I // 32), dtype=np.uint8)
    x = (np.random.default_rng(6).normal(0, 1, (R, I)) * 2.0 ** 100).astype(np.float32)
    got = native.expert_matmul(x, blocks, scales, 1, target=target)
    check(got, x, blocks, scales, 1)


@pytest.mark.parametrize("target", TARGETS, ids=["lut", "portable"])
def test_one_row_special_blocks(target):
    """One input row over 19 blocks (two groups of 8 and a tail of 3: the integer one-row path of
    ``mxfp4_cpu.cc``, point 8, sorts its blocks 8 at a time). Blocks it must hand to the exact path: scale
    bytes 0 and 1 inside a group of 8, and an output row whose scales are so small that its blocks' combined
    scales (with x) are below float32's normal range while the products are not; and blocks it keeps: an input block
    of zeros, one spanning 12 orders of magnitude. Then an inf input, and a scale byte of 255: inf and NaN
    wherever the reference has them, the other outputs as before."""
    I1 = 19 * 32
    rng = np.random.default_rng(11)
    blocks = rng.integers(0, 256, (1, O, I1 // 32, 16), dtype=np.uint8)
    scales = rng.integers(110, 130, (1, O, I1 // 32), dtype=np.uint8)
    x = rng.normal(0, 1, (I1,)).astype(np.float32)
    scales[0, 3:6, 2] = [0, 1, 254]
    blocks[0, 5, 2] &= 0xBB  # magnitudes <= 1.5 under the 2^127 scale: no overflow
    scales[0, 6] = 10  # weights ~2^-117, products ~2^-117; combined scales ~2^-13 * 2^-118
    x[4 * 32:5 * 32] = 0.0
    x[17 * 32:18 * 32] *= np.logspace(-6, 6, 32, dtype=np.float32)
    x[2 * 32:3 * 32] *= 1e-3  # keeps the 2^127 block's products finite
    got = native.expert_matmul(x[None], blocks, scales, 0, target=target)
    check(got, x[None], blocks, scales, 0)
    # Not finite: an inf input, then a weight block of scale byte 255 (infinity, as mxfp4.decode has it).
    bad_x, bad_scales = x.copy(), scales.copy()
    bad_x[7 * 32 + 5] = np.inf
    bad_scales[0, 7, 12] = 255
    quiet = x.copy()
    quiet[12 * 32:13 * 32] *= 1e-20  # so that a finite 2^127 in place of infinity would not overflow
    for xs, ss in ((bad_x, scales), (quiet, bad_scales)):
        got = np.asarray(native.expert_matmul(xs[None], blocks, ss, 0, target=target))
        want = np.asarray(mxfp4.matmul(jnp.asarray(xs[None]), blocks[0], ss[0], jnp.float32))
        assert not np.isfinite(want).all()
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(got[np.isinf(want)], want[np.isinf(want)])
        finite = np.isfinite(want)[0]  # every output with the inf input; all rows but row 7 with the 255 byte
        if finite.any():
            check(got[:, finite], xs[None], blocks[:, finite], ss[:, finite], 0)


def test_large_tile_and_threads():
    """A 20b-like row count: 2 threads over 1152 output rows, 64 input rows (16 tiles of 4)."""
    rng = np.random.default_rng(9)
    blocks = rng.integers(0, 256, (2, 1152, 4, 16), dtype=np.uint8)
    scales = rng.integers(110, 130, (2, 1152, 4), dtype=np.uint8)
    x = rng.normal(0, 1, (64, 128)).astype(np.float32)
    check(native.expert_matmul(x, blocks, scales, 1), x, blocks, scales, 1)


def test_gradient_with_respect_to_x_equals_xla():
    """``d/dx sum(c * (x @ W.T))`` (LoRA trains through it); the weights are constants."""
    blocks, scales = weights(3, 118, 123)  # weights ~0.01-0.1, outputs ~1: cos(y) well conditioned
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(0, 1, (5, I)).astype(np.float32))
    c = jnp.asarray(rng.normal(0, 1, (5, O)).astype(np.float32))

    def loss(x, use):
        y = expert_kernels.expert_matmul(x, (jnp.asarray(blocks), jnp.asarray(scales)), jnp.int32(2), jnp.float32,
                                         native=use)
        return jnp.sum(c * y * jnp.cos(y))

    got, want = jax.grad(loss)(x, True), jax.grad(loss)(x, False)
    assert np.abs(np.asarray(want)).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def grouped_case(seed: int, I: int, O: int, sizes: list[int], P: int):
    """Random packed experts ``[len(sizes), O, I/32, 16]``, scales 100..140 with bytes 0, 1 and 254 in expert 0,
    and ``P`` rows of x (``sizes`` of them in groups)."""
    rng = np.random.default_rng(seed)
    E_ = len(sizes)
    blocks = rng.integers(0, 256, (E_, O, I // 32, 16), dtype=np.uint8)
    scales = rng.integers(100, 141, (E_, O, I // 32), dtype=np.uint8)
    scales[0, 1:4, 0] = [0, 1, 254]
    blocks[0, 3, 0] &= 0xBB  # magnitudes <= 1.5 under 2^127: finite products with the small inputs below
    x = rng.normal(0, 1, (P, I)).astype(np.float32)
    x[:, :32] *= 1e-30  # the inputs of block 0: products of the 2^127 block stay finite
    return x, blocks, scales, np.asarray(sizes, np.int32)


@pytest.mark.parametrize("I, O, sizes, P", [
    (96, 38, [7, 0, 13, 1, 6], 30),      # O not a multiple of the 16-column panel; an expert without rows
    (608, 40, [2, 9, 0], 14),           # 19 blocks: three 256-step panels (the last 96); 3 rows in no group
    (64, 300, [20, 5], 25),             # the gradient's panels run over O = 300: 256 + 44
])
def test_grouped_kernel_equals_the_reference(I, O, sizes, P):
    """``native.grouped_matmul``: each row times its expert's decoded weight, within float32 summation
    error (:func:`check`); rows in no group are 0; and its gradient (the same kernel, ``dy @ W``) likewise."""
    x, blocks, scales, sizes_E = grouped_case(P + I, I, O, sizes, P)
    got = np.asarray(jax.jit(native.grouped_matmul)(x, blocks, scales, sizes_E))
    assert got.shape == (P, O)
    expert = np.repeat(np.arange(len(sizes)), sizes)
    for e in range(len(sizes)):
        mine = expert == e
        if mine.any():
            check(got[:len(expert)][mine], x[:len(expert)][mine], blocks, scales, e)
    np.testing.assert_array_equal(got[len(expert):], 0.0)
    c = np.random.default_rng(1).normal(0, 1, (P, O)).astype(np.float32)
    c[:, 3] *= 1e-30  # the outputs of the 2^127 block: finite products in the gradient too
    dx = np.asarray(jax.grad(lambda x: jnp.sum(c * native.grouped_matmul(x, blocks, scales, sizes_E)))(x))
    for p, e in enumerate(expert):
        w = np.asarray(mxfp4.decode(blocks[e], scales[e], jnp.float32), np.float64)
        want = c[p].astype(np.float64) @ w
        bound = 1e-5 * (np.abs(c[p]).astype(np.float64) @ np.abs(w))
        assert np.all(np.abs(dx[p] - want) <= bound), f"row {p} (expert {e}): gradient differs"
    np.testing.assert_array_equal(dx[len(expert):], 0.0)


# -- (b) the model ---------------------------------------------------------------------------------
def logits_and_hlo(model, tokens, target=native.TARGET):
    """Logits of ``tokens`` and whether the compiled forward pass calls the native kernel ``target``."""
    fn = jax.jit(lambda t: model.apply(t, jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape))[0])
    return np.asarray(fn(tokens)), target in fn.lower(tokens).as_text()


@pytest.mark.parametrize("kernel", ["grouped", "tiles"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_logits_native_on_equal_off(mxfp4_dir, tokens, dtype, kernel, monkeypatch):
    """The tiny MXFP4 checkpoint with packed experts, 48 tokens: the default (``"auto"``) takes the grouped kernel
    (144 pairs of 7 experts, above ``GROUPED_MIN_ROWS`` per expert); with that rule off, sorted tiles on the
    one-row kernel (here allowed every tile size). Either way its logits equal XLA's (``native=False``);
    float32 tightly, bfloat16 within its rounding."""
    monkeypatch.setattr(native, "max_rows", lambda: 1 << 20)
    if kernel == "tiles":
        monkeypatch.setattr(expert_kernels, "GROUPED_MIN_ROWS", 1 << 20)
    model = oss_jax.load(mxfp4_dir, dtype=dtype, experts="packed")
    t = jnp.asarray(tokens[:, :24])
    target = native.GROUPED_NT if kernel == "grouped" else native.TARGET
    on, uses = logits_and_hlo(model, t, target)
    assert uses
    model.set_attributes(native=False)
    off, uses = logits_and_hlo(model, t, target)
    assert not uses
    tol = 1e-5 if dtype == "float32" else 0.05
    assert np.abs(off).max() > 1
    np.testing.assert_allclose(on, off, rtol=tol, atol=tol * np.abs(off).max())


def test_auto_uses_the_kernel_up_to_max_rows():
    """``"auto"`` runs the kernel for at most ``native.max_rows()`` rows (decode steps), XLA above it (its
    matrix product is faster for a prefill's tiles); ``native=True`` runs it at any size. The rule is
    measured per SIMD width: 8 rows for AVX2 and narrower, 64 for AVX-512."""
    assert native.max_rows() in (8, 64)
    blocks, scales = (jnp.asarray(a) for a in weights(4))
    for R in (1, native.max_rows(), native.max_rows() + 1):
        x = jnp.zeros((R, I), jnp.float32)
        for setting, want in (("auto", R <= native.max_rows()), (True, True), (False, False)):
            fn = jax.jit(lambda x, s=setting: expert_kernels.expert_matmul(x, (blocks, scales), jnp.int32(1),
                                                                           jnp.float32, native=s))
            assert (native.TARGET in fn.lower(x).as_text()) == want, (R, setting)


def test_generate_greedy_is_the_same(mxfp4_dir, tokens):
    model = oss_jax.load(mxfp4_dir, dtype="float32", experts="packed")
    prompt = tokens[:, :10]
    on = oss_jax.generate(model, prompt, max_new_tokens=12)
    model.set_attributes(native=False)
    off = oss_jax.generate(model, prompt, max_new_tokens=12)
    np.testing.assert_array_equal(on, off)


def test_unknown_setting_is_an_error(mxfp4_dir):
    model = oss_jax.load(mxfp4_dir, experts="packed")
    model.set_attributes(native="yes")
    with pytest.raises(ValueError, match="unknown native setting 'yes'"):
        model(np.zeros((1, 3), np.int32))


# -- (c) without the kernel ------------------------------------------------------------------------
@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """The module as in a new process (nothing built or decided yet), with an empty cache."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("OSS_JAX_CACHE", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("cxx, why", [("/nonexistent/c++", "CXX=/nonexistent/c++ is not a command"),
                                      ("false", "false could not query its target")])
def test_no_compiler_one_notice(fresh, monkeypatch, caplog, cxx, why):
    """A missing or failing compiler: ``available()`` is False, one notice (once), ``auto`` falls back,
    ``native=True`` is a one-line error."""
    monkeypatch.setenv("CXX", cxx)
    with caplog.at_level(logging.WARNING, logger="oss_jax"):
        assert not native.available() and not native.available()
        assert not native.enabled("auto")
    (record,) = caplog.records
    msg = record.getMessage()
    assert why in msg and "XLA path" in msg and "\n" not in msg
    with pytest.raises(ValueError, match=re.escape(f"native=True: the native MXFP4 kernel is unavailable ({why}")):
        native.enabled(True)
    assert not list(fresh.rglob("*.tmp"))


def test_turned_off_is_silent(fresh, monkeypatch, caplog):
    monkeypatch.setenv("OSS_JAX_NATIVE", "0")
    with caplog.at_level(logging.DEBUG, logger="oss_jax"):
        assert not native.available()
    assert not caplog.records
    assert native.reason() == "turned off by OSS_JAX_NATIVE=0"


def test_model_runs_without_a_compiler(mxfp4_dir, tokens, tmp_path):
    """A new process whose CXX is missing (and an empty cache): one notice line on stderr, no traceback,
    and the logits of the XLA path."""
    out = tmp_path / "logits.npy"
    code = ("import sys, numpy as np, oss_jax; m = oss_jax.load(sys.argv[1], dtype='float32', experts='packed'); "
            "np.save(sys.argv[2], np.asarray(m(np.load(sys.argv[3]))))")
    np.save(tmp_path / "tokens.npy", tokens[:, :24])
    env = {**os.environ, "CXX": "/nonexistent/c++", "OSS_JAX_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", code, str(mxfp4_dir), str(out), str(tmp_path / "tokens.npy")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == ["oss_jax: the native CPU kernels are unavailable (CXX=/nonexistent/c++ is not a command); "
                     "packed experts and bf16 decode steps use the slower XLA path (OSS_JAX_NATIVE=0 silences this)"
                     ], r.stderr
    model = oss_jax.load(mxfp4_dir, dtype="float32", experts="packed")
    model.set_attributes(native=False)
    want = np.asarray(model(tokens[:, :24]))
    np.testing.assert_allclose(np.load(out), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


# -- (d) the bf16 kernel: attention projections and the unembedding at a decode step ----------------------------
@pytest.mark.parametrize("transposed", [False, True], ids=["nn", "nt"])
@pytest.mark.parametrize("R, I, O", [(1, 96, 38), (3, 70, 517), (5, 4099, 7), (9, 33, 1030), (2, 601, 1030)])
def test_bf16_kernel_equals_the_product(transposed, R, I, O):
    """``x @ w`` (nn, ``w [I, O]``) and ``x @ w.T`` (nt, ``w [O, I]``) for bf16 ``w``, against float64: I not a
    multiple of the SIMD width or of 4 (scalar tails), nor of nn's 256-row blocks (601: two blocks and 89 rows),
    O not of the 4-row tiles, R past the 4-row tiles; the larger ones use a second thread."""
    rng = np.random.default_rng(R * 10_000 + I)
    x = rng.normal(0, 1, (R, I)).astype(np.float32)
    w = jnp.asarray(rng.normal(0, 1, (O, I) if transposed else (I, O)), jnp.bfloat16)
    w_IO = np.asarray(w.astype(jnp.float32), np.float64)
    w_IO = w_IO.T if transposed else w_IO
    want = x.astype(np.float64) @ w_IO
    got = np.asarray(jax.jit(native.bf16_matmul, static_argnums=2)(x, w, transposed))
    assert got.shape == (R, O) and got.dtype == np.float32
    bound = 1e-6 * np.sqrt(I) * (np.abs(x) @ np.abs(w_IO))  # float32 sums of I products
    bad = np.abs(got - want) > bound
    assert not bad.any(), f"{bad.sum()} outputs differ, first at {np.argwhere(bad)[0]}"


@pytest.mark.parametrize("transposed", [False, True], ids=["nn", "nt"])
def test_bf16_kernel_gradients_equal_xla(transposed):
    """Gradients with respect to ``x`` and ``w`` (full training and LoRA go through a decode-sized batch)."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(0, 1, (3, 40)), jnp.float32)
    w = jnp.asarray(rng.normal(0, 0.2, (24, 40) if transposed else (40, 24)), jnp.bfloat16)
    c = jnp.asarray(rng.normal(0, 1, (3, 24)), jnp.float32)

    def loss(x, w, use):
        w32 = w.astype(jnp.float32)
        y = native.bf16_matmul(x, w, transposed) if use else x @ (w32.T if transposed else w32)
        return jnp.sum(c * y * jnp.cos(y))

    got, want = jax.grad(loss, (0, 1))(x, w, True), jax.grad(loss, (0, 1))(x, w, False)
    for g, v in zip(got, want, strict=True):
        assert g.dtype == v.dtype and np.abs(np.asarray(v, np.float32)).max() > 0
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(v, np.float32), rtol=1e-2,
                                   atol=1e-2 * float(jnp.max(jnp.abs(v.astype(jnp.float32)))))


def test_project_runs_the_kernel_for_a_decode_step_only(monkeypatch):
    """``kernels.linear.project``: the kernel for bf16 weights and at most ``MAX_ROWS`` rows of ``x`` (the same
    numbers as the einsum up to bf16 rounding); the einsum itself for more rows, for float32, and when the
    kernels are turned off."""
    calls = []
    kernel = native.bf16_matmul
    monkeypatch.setattr(native, "bf16_matmul", lambda *a, **k: calls.append(a[1].shape) or kernel(*a, **k))
    rng = np.random.default_rng(8)
    w = jnp.asarray(rng.normal(0, 1, (40, 5, 6)), jnp.bfloat16)
    for shape in [(1, 1, 40), (2, 8, 40), (3, 6, 40)]:  # 1 and 16 rows: the kernel; 18 rows: XLA
        x = jnp.asarray(rng.normal(0, 1, shape), jnp.bfloat16)
        calls.clear()
        got = linear.project(x, w)
        want = jnp.einsum("btd,dnh->btnh", x, w)
        assert got.shape == want.shape and got.dtype == jnp.bfloat16
        assert calls == ([(40, 30)] if shape[0] * shape[1] <= linear.MAX_ROWS else []), shape
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=0.05)
    calls.clear()
    linear.project(jnp.ones((1, 1, 40), jnp.float32), w.astype(jnp.float32))
    monkeypatch.setattr(native, "_state", {"error": "turned off by OSS_JAX_NATIVE=0"})
    linear.project(jnp.ones((1, 1, 40), jnp.bfloat16), w)
    assert calls == []


def test_bf16_model_decode_steps_equal_the_reference(mxfp4_dir, tokens):
    """A bf16 model's decode-sized passes (2 sequences x 1 token) and greedy ``generate`` (whose steps use
    the kernel for q, k, v, o and the unembedding) equal the reference einsums (``impl="reference"``)."""
    model = oss_jax.load(mxfp4_dir, dtype="bfloat16", experts="packed")
    step = tokens[:2, 5:6]

    def logits(model):
        fn = jax.jit(lambda t: model.apply(t, jnp.full(t.shape, 5, jnp.int32))[0])
        return np.asarray(fn(step)), fn.lower(step).as_text()

    fast, hlo = logits(model)
    assert native.BF16_NN in hlo and native.BF16_NT in hlo
    prompt = tokens[:2, :10]
    out = {"fast": oss_jax.generate(model, prompt, max_new_tokens=12)}
    model.set_attributes(impl="reference")
    ref, hlo = logits(model)
    assert native.BF16_NN not in hlo and native.BF16_NT not in hlo
    out["reference"] = oss_jax.generate(model, prompt, max_new_tokens=12)
    assert np.abs(ref).max() > 1
    np.testing.assert_allclose(fast, ref, rtol=0.05, atol=0.05 * np.abs(ref).max())
    np.testing.assert_array_equal(out["fast"], out["reference"])
