"""MXFP4 decode and encode (SPEC.md §3), against transformers and against numpy written here.

The references in this file are deliberately independent of ``oss_jax.mxfp4``: the E2M1 table is
typed in from the spec, scales and nearest-value rounding are computed in float64 numpy.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from oss_jax import mxfp4

# E2M1 by code 0..15, from SPEC.md §3 (bit 3 is the sign).
TABLE = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                  -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float64)
MAGS = TABLE[:8]  # magnitude of codes 0..7
BF16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_BITS = {np.dtype(np.float32): np.uint32, BF16: np.uint16}
TINY_NORMAL = float(np.finfo(np.float32).tiny)  # 2**-126, smallest normal of fp32 and bf16


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bit patterns (so that -0.0 != +0.0 and NaN == NaN)."""
    return np.ascontiguousarray(a).view(FLOAT_BITS[a.dtype])


def torch_to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(BF16)
    return t.numpy()


def hf_decode(blocks: np.ndarray, scales: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """transformers' dequantizer, brought back to our ``[E, out, in]`` layout."""
    w = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=dtype)
    return torch_to_numpy(w.transpose(1, 2).contiguous())  # transformers returns [E, in, out]


def codes_of(blocks: np.ndarray) -> np.ndarray:
    """Unpack ``[..., nb, 16]`` bytes into codes ``[..., nb*32]``, even element in the low nibble."""
    blocks = np.asarray(blocks)
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1)
    return codes.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


def np_decode(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Reference decode in float64."""
    values = TABLE[codes_of(blocks)]
    factor = np.repeat(np.ldexp(1.0, np.asarray(scales, np.int64) - 127), 32, axis=-1)
    return values * factor


def np_encode_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exponent ``e [..., nb]`` and codes ``[..., n]`` from the spec's rules, in float64.

    e: the smallest integer with ``max|x| / 2**e <= 6`` (clamped to the E8M0 range);
    code: the nearest grid value of ``x / 2**e``, ties to the even code; sign bit for negatives.
    """
    xb = np.asarray(x, np.float64).reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = np.abs(xb).max(axis=-1)
    e = np.zeros(amax.shape, np.int64)
    for i in np.ndindex(amax.shape):
        a = amax[i]
        if a == 0:
            e[i] = -127
            continue
        k = int(np.ceil(np.log2(a / 6.0)))
        while a > 6.0 * 2.0 ** k:  # exact comparisons in float64
            k += 1
        while a <= 6.0 * 2.0 ** (k - 1):
            k -= 1
        e[i] = max(k, -127)
    q = np.abs(xb) / np.ldexp(1.0, e)[..., None]
    dist = np.abs(q[..., None] - MAGS)  # [..., 32, 8]
    best = dist.min(axis=-1, keepdims=True)
    tied = dist == best
    even_tied = tied & (np.arange(8) % 2 == 0)
    # among the (at most two) nearest, the even code if there is one
    code = np.where(even_tied.any(-1), np.argmax(even_tied, -1), np.argmax(tied, -1))
    code = np.where((xb < 0) & (code > 0), code | 8, code)
    return e, code.reshape(x.shape)


# -- decode ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_decode_matches_transformers_realistic_scales(dtype):
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 40, 4, 16), dtype=np.uint8)
    scales = rng.integers(100, 151, (3, 40, 4), dtype=np.uint8)
    ref = hf_decode(blocks, scales, dtype)
    ours = np.asarray(mxfp4.decode(blocks, scales, jnp.float32 if dtype == torch.float32 else jnp.bfloat16))
    assert ours.shape == ref.shape == (3, 40, 128) and ours.dtype == ref.dtype
    assert np.array_equal(bits(ours), bits(ref))  # bit-exact, including the sign of zero
    assert (bits(ours) == bits(np.array(-0.0, ours.dtype))).any()  # code 8 (-0) was exercised


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_decode_matches_transformers_full_scale_range(dtype):
    """Every E8M0 scale 0..254. Bit-exact wherever the true value is normal, zero or infinite.

    Known deviation: XLA on CPU flushes subnormal results to zero. With scale 0 or 1 the
    magnitudes 0.5, 1 and 1.5 times ``2**-127`` (or 0.5 times ``2**-126``) are subnormal;
    transformers (torch) keeps them, we return a zero of the same sign. No real checkpoint
    has such scales (a weight of 1e-38 is zero for every practical purpose).
    """
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (2, 255, 2, 16), dtype=np.uint8)
    scales = np.broadcast_to(np.arange(255, dtype=np.uint8)[None, :, None], (2, 255, 2)).copy()
    ref = hf_decode(blocks, scales, dtype)
    ours = np.asarray(mxfp4.decode(blocks, scales, jnp.float32 if dtype == torch.float32 else jnp.bfloat16))
    ref64 = np_decode(blocks, scales)
    # Both agree with the exact values where those are representable and normal.
    normal = (ref64 == 0) | (np.abs(ref64) >= TINY_NORMAL)
    assert np.isinf(ref[normal]).sum() > 0  # 6 * 2**127 overflows: inf in both
    assert np.array_equal(bits(ours)[normal], bits(ref)[normal])
    finite = normal & np.isfinite(ref64) & (np.abs(ref64) <= float(ml_dtypes.finfo(ours.dtype).max))
    assert np.array_equal(ours[finite].astype(np.float64), ref64[finite])
    # The subnormal ones: only scales 0 and 1, transformers exact, ours a zero of the same sign.
    sub = ~normal
    assert sub.any() and set(np.unique(np.repeat(scales, 32, axis=-1)[sub])) <= {0, 1}
    assert np.array_equal(ref[sub].astype(np.float64), ref64[sub])
    assert np.all((ours[sub] == 0) | (bits(ours)[sub] == bits(ref)[sub]))
    assert np.array_equal(np.signbit(ours[sub]), np.signbit(ref64[sub]))


def test_decode_nibble_order_and_scale_bias():
    blocks = np.zeros((1, 16), np.uint8)
    blocks[0, 0] = 0x72  # low nibble 2 (1.0) is element 0, high nibble 7 (6.0) is element 1
    blocks[0, 1] = 0x8F  # low nibble 15 (-6.0) is element 2, high nibble 8 (-0.0) is element 3
    for scale, factor in ((127, 1.0), (128, 2.0), (126, 0.5), (137, 1024.0)):
        out = np.asarray(mxfp4.decode(blocks, np.array([scale], np.uint8), jnp.float32))
        assert out.shape == (32,)
        assert out[:4].tolist() == [1.0 * factor, 6.0 * factor, -6.0 * factor, 0.0]
        assert np.signbit(out[3]) and not np.signbit(out[4:]).any() and not out[4:].any()


def test_decode_every_byte():
    """All 256 bytes: element 2i is TABLE[byte & 15], element 2i+1 is TABLE[byte >> 4]."""
    blocks = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = np.asarray(mxfp4.decode(blocks, np.full(16, 127, np.uint8), jnp.float32)).reshape(256, 2)
    b = np.arange(256)
    assert np.array_equal(bits(out[:, 0]), bits(TABLE[b & 15].astype(np.float32)))
    assert np.array_equal(bits(out[:, 1]), bits(TABLE[b >> 4].astype(np.float32)))


@pytest.mark.parametrize("rows", [1, 5])  # a decode step, and a tile of rows
def test_matmul_is_x_times_the_decoded_weight_transposed(rows):
    """``mxfp4.matmul(x, blocks, scales)`` against float64 numpy ``x @ np_decode(...).T``."""
    rng = np.random.default_rng(rows)
    blocks = rng.integers(0, 256, (24, 3, 16), dtype=np.uint8)  # a weight [out = 24, in = 96]
    scales = rng.integers(118, 131, (24, 3), dtype=np.uint8)
    x = rng.normal(0, 1, (rows, 96)).astype(np.float32)
    ours = np.asarray(mxfp4.matmul(jnp.asarray(x), blocks, scales, jnp.float32))
    ref = x.astype(np.float64) @ np_decode(blocks, scales).reshape(24, 96).T
    assert ours.shape == (rows, 24)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_decode_rejects_bad_inputs():
    blocks, scales = np.zeros((4, 2, 16), np.uint8), np.full((4, 2), 127, np.uint8)
    with pytest.raises(TypeError, match="uint8"):
        mxfp4.decode(blocks.astype(np.int32), scales)
    with pytest.raises(ValueError, match="do not match"):
        mxfp4.decode(blocks, scales[:, :1])
    with pytest.raises(ValueError, match="do not match"):
        mxfp4.decode(blocks[..., :8], scales)
    with pytest.raises(TypeError, match=r"mxfp4\.matmul: .*uint8"):
        mxfp4.matmul(np.zeros((1, 64), np.float32), blocks.astype(np.int32), scales)


# -- encode ---------------------------------------------------------------------------------------
def test_encode_representable_values_round_trip_exactly():
    rng = np.random.default_rng(2)
    blocks = rng.integers(0, 256, (5, 8, 16), dtype=np.uint8)
    blocks[..., 0] = (blocks[..., 0] & 0xF0) | rng.choice([0x07, 0x0F], (5, 8))  # one +-6 per block
    scales = rng.integers(2, 250, (5, 8), dtype=np.uint8)  # normal, finite values
    scales[0, :4] = [2, 127, 200, 249]
    x = np_decode(blocks, scales).astype(np.float32)
    assert np.array_equal(x.astype(np.float64), np_decode(blocks, scales))  # exact in fp32
    b2, s2 = (np.asarray(a) for a in mxfp4.encode(x))
    # With a +-6 in every block the encoding is unique, except that -0 may come back as +0.
    assert np.array_equal(s2, scales)
    c, c2 = codes_of(blocks), codes_of(b2)
    assert np.array_equal(np.where(c == 8, 0, c), np.where(c2 == 8, 0, c2))
    assert np.array_equal(np_decode(b2, s2), x.astype(np.float64))


def test_encode_representable_values_other_scales_round_trip():
    """Blocks whose largest value is not +-6 times the scale: values still come back exactly."""
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (5, 8, 16), dtype=np.uint8) & 0x55  # codes 0,1,4,5 (+0, .5, 2, 3)
    scales = rng.integers(100, 151, (5, 8), dtype=np.uint8)
    x = np_decode(blocks, scales).astype(np.float32)
    b2, s2 = mxfp4.encode(x)
    assert np.array_equal(np_decode(np.asarray(b2), np.asarray(s2)), x.astype(np.float64))


@pytest.mark.parametrize("in_dtype", [np.float32, BF16], ids=["f32", "bf16"])
def test_encode_random_blocks_against_reference(in_dtype):
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(7, 9, 64)) * 10.0 ** rng.uniform(-3, 3, (7, 9, 1))).astype(in_dtype)
    # block maxima exactly at and one ulp around 6 * 2**k: the scale boundary
    for j, k in enumerate((-3, 0, 5)):
        top = np.float32(6.0 * 2.0 ** k).astype(in_dtype)
        x[0, j, 0] = top
        x[1, j, 0] = np.nextafter(top, np.array(np.inf, in_dtype))
        x[2, j, 0] = -np.nextafter(top, np.array(0, in_dtype))
        x[[0, 1, 2], j, 1:32] = x[[0, 1, 2], j, 1:32] * 0 + top / 7  # all else smaller
    blocks, scales = (np.asarray(a) for a in mxfp4.encode(jnp.asarray(x)))
    assert blocks.shape == (7, 9, 2, 16) and blocks.dtype == np.uint8
    assert scales.shape == (7, 9, 2) and scales.dtype == np.uint8

    e, code = np_encode_reference(x)
    assert np.array_equal(scales.astype(np.int64) - 127, e)
    amax = np.abs(x.astype(np.float64)).reshape(7, 9, 2, 32).max(-1)
    assert np.all(amax <= 6 * np.ldexp(1.0, e)) and np.all(amax > 6 * np.ldexp(1.0, e - 1))
    ours = codes_of(blocks)
    assert np.array_equal(ours & 7, code & 7)  # nearest magnitude, ties to even
    nonzero = (code & 7) > 0
    assert np.array_equal((ours & 8)[nonzero], (code & 8)[nonzero])  # sign

    xq = np_decode(blocks, scales)
    err = np.abs(x.astype(np.float64) - xq)
    step = np.repeat(np.ldexp(1.0, e), 32, axis=-1)
    assert np.all(err <= step)  # half the largest gap (4 -> 6)
    # and no grid value is closer than the chosen one
    grid = MAGS[None, None, None, :] * step[..., None]
    assert np.all(err <= np.abs(np.abs(x.astype(np.float64))[..., None] - grid).min(-1))


def test_encode_ties_go_to_even_code():
    mid = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]  # halfway between neighbouring magnitudes
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # codes 0, 2, 2, 4, 4, 6, 6
    xs = np.zeros((3, 32), np.float32)  # (3, 32) like the next test: one compilation for both
    x = xs[0]
    x[0] = 6.0  # scale 2**0
    x[1:8], x[8:15] = mid, -np.array(mid)
    above = np.nextafter(np.array(mid, np.float32), np.float32(np.inf))
    below = np.nextafter(np.array(mid, np.float32), np.float32(0))
    x[15:22], x[22:29] = above, below
    b, s = mxfp4.encode(xs)
    out = np_decode(np.asarray(b), np.asarray(s))[0]
    assert int(np.asarray(s)[0, 0]) == 127
    assert out[1:8].tolist() == want and out[8:15].tolist() == [-w for w in want]
    assert out[15:22].tolist() == [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert out[22:29].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]


def test_encode_zero_and_negative_blocks():
    x = np.zeros((3, 32), np.float32)
    x[1] = -np.linspace(0.4, 3.0, 32)  # scale 2**-1: 0.4 -> -0.5, nothing rounds to 0
    x[2, 5] = -1e-3  # a lone negative in a zero block
    b, s = (np.asarray(a) for a in mxfp4.encode(x))
    out = np_decode(b, s)
    assert not out[0].any() and np.all(codes_of(b)[0] & 7 == 0)
    assert np.all(out[1] < 0) and np.all(codes_of(b)[1] >= 8)
    assert np.all(np.abs(out[1] - x[1]) <= 2.0 ** (int(s[1, 0]) - 127))
    assert out[2, 5] == -4.0 * 2.0**-12  # 1e-3 / 2**-12 = 4.096 -> 4
    assert np.count_nonzero(out[2]) == 1


def test_encode_rejects_bad_inputs():
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.encode(np.ones((2, 33), np.float32))
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.encode(np.float32(1.0))
    x = np.ones((2, 32), np.float32)
    x[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mxfp4.encode(x)
    x[1, 3] = -np.inf
    with pytest.raises(ValueError, match="infinity"):
        mxfp4.encode(x)
    with pytest.raises(TypeError, match="floats"):
        mxfp4.encode(np.ones((2, 32), np.int32))
