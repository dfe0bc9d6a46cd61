"""MXFP4, the OCP microscaling 4-bit float format of gpt-oss expert weights (SPEC.md §3).

A block of 32 consecutive values along the input (contraction) dimension shares one E8M0 scale
byte ``s`` (value ``2**(s - 127)``); each value is an E2M1 code of 4 bits, two codes per byte with
the even element in the low nibble. Stored shapes, for a weight used as ``y = W x`` with
``W [..., out, in]``:

    blocks  uint8 [..., out, in/32, 16]
    scales  uint8 [..., out, in/32]

``decode`` turns them back into ``[..., out, in]`` by the table ``FP4_VALUES``; ``encode`` goes the
other way; ``nbytes`` counts the bytes. ``oss_jax.kernels.mxfp4`` decodes to the same bits, faster.

Edge cases, none of which real weights reach: scale byte 255 (NaN in the OCP spec) decodes to
infinity; decoded values below 2**-126 (scale bytes near 0) are flushed to zero by XLA on CPU.
``encode`` picks the smallest scale at which the block fits without clipping, which can differ
from the OCP reference rule (``floor(log2 amax) - 2``, clipping above 6); decoding is the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 32  # values per scale
SCALE_BIAS = 127
# E2M1 value of each 4-bit code; bit 3 is the sign.
FP4_VALUES = np.array([+0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)
FP4_MAX = 6.0
# Midpoints between neighbouring magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6, and whether the upper
# neighbour's code is odd: a tie rounds to the even code (round half to even, as IEEE does).
_MIDPOINTS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=np.float32)
_UPPER_IS_ODD = np.array([True, False, True, False, True, False, True])


def decode(blocks: jax.Array, scales: jax.Array, dtype: jnp.dtype = jnp.bfloat16) -> jax.Array:
    """Dequantize MXFP4: ``FP4_VALUES[code] * 2**(scale - 127)``, the low nibble first.

    Args:
      blocks: uint8 ``[..., nb, 16]`` packed codes.
      scales: uint8 ``[..., nb]`` E8M0 exponents.
      dtype: output float dtype. Every value is exactly representable in bf16 and fp32.

    Returns:
      ``[..., nb * 32]`` values (``kernels.mxfp4.decode`` gives the same bits, faster).
    """
    blocks, scales = checked(blocks, scales, "mxfp4.decode")
    codes = jnp.stack([blocks & 0x0F, blocks >> 4], axis=-1)  # byte i holds elements 2i (low), 2i+1 (high)
    codes = codes.reshape(*scales.shape, BLOCK)  # [..., nb, 32]: one scale per row of 32 codes
    exponent = scales.astype(jnp.int32)[..., None] - SCALE_BIAS
    values = jnp.ldexp(jnp.asarray(FP4_VALUES)[codes], exponent)  # ldexp(v, e) = v * 2**e, exactly
    return values.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK).astype(dtype)


def matmul(x_RI: jax.Array, blocks: jax.Array, scales: jax.Array, dtype: jnp.dtype = jnp.bfloat16) -> jax.Array:
    """``x @ decode(blocks, scales).T`` for a weight stored ``[O, I]``: ``[R, I]`` -> ``[R, O]``."""
    blocks, scales = checked(blocks, scales, "mxfp4.matmul")
    return x_RI @ decode(blocks, scales, dtype).T


def checked(blocks, scales, fn: str) -> tuple[jax.Array, jax.Array]:
    """``blocks`` and ``scales`` as arrays, or a one-line error (naming ``fn``) when they cannot be MXFP4."""
    blocks, scales = jnp.asarray(blocks), jnp.asarray(scales)
    if blocks.dtype != jnp.uint8 or scales.dtype != jnp.uint8:
        raise TypeError(f"{fn}: blocks and scales must be uint8, got {blocks.dtype}, {scales.dtype}")
    if blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"{fn}: blocks {blocks.shape} and scales {scales.shape} do not match "
                         f"(expected blocks [..., nb, 16] and scales [..., nb])")
    return blocks, scales


def encode(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Quantize floats to MXFP4, rounding to the nearest representable value (ties to even).

    Each block's scale is the smallest power of two for which the block's largest magnitude fits
    in the E2M1 range (``max|x| / 2**e <= 6``), so nothing is clipped; the error of every value is
    at most half the grid spacing at its magnitude, ``|x - q| <= 2**e`` (spacing 2 between 4 and 6).

    Args:
      x: float ``[..., n]`` with ``n`` a multiple of 32, finite.

    Returns:
      ``(blocks uint8 [..., n/32, 16], scales uint8 [..., n/32])``.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"mxfp4.encode: expected floats, got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] % BLOCK:
        raise ValueError(f"mxfp4.encode: last dimension must be a multiple of {BLOCK}, got shape {x.shape}")
    if not isinstance(x, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError("mxfp4.encode: input contains NaN or infinity")
    return _encode(x)


@jax.jit
def _encode(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    xb = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    amax = jnp.max(jnp.abs(xb), axis=-1)
    # Smallest e with amax / 2**e <= 6, i.e. ceil(log2(amax / 6)), done exactly with frexp:
    # amax/6 = m * 2**p with m in [0.5, 1); it is a power of two exactly when m == 0.5.
    m, p = jnp.frexp(amax / FP4_MAX)
    e = jnp.where(m == 0.5, p - 1, p)
    e = jnp.where(amax > 0, e, -SCALE_BIAS)
    e = jnp.clip(e, -SCALE_BIAS, SCALE_BIAS)
    q = jnp.ldexp(xb, -e[..., None])
    mag = jnp.minimum(jnp.abs(q), FP4_MAX)
    above = jnp.where(_UPPER_IS_ODD, mag[..., None] > _MIDPOINTS, mag[..., None] >= _MIDPOINTS)
    code = jnp.sum(above, axis=-1).astype(jnp.uint8)
    code = code | jnp.where((q < 0) & (code > 0), 8, 0).astype(jnp.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    scales = (e + SCALE_BIAS).astype(jnp.uint8)
    return blocks, scales


def nbytes(shape_out_in: tuple[int, ...]) -> int:
    """Bytes of an MXFP4 tensor holding ``prod(shape)`` values (4.25 bits per value)."""
    n = int(np.prod(shape_out_in))
    return n // 2 + n // BLOCK
