"""Fast MXFP4 decoding, bit for bit the reference ``oss_jax.mxfp4.decode``.

The reference looks each 4-bit code up in ``FP4_VALUES`` and multiplies by ``2**(scale - 127)``.
On XLA's CPU backend a table gather and ``ldexp`` are both slow; building the float32 bit pattern
of each value directly is about 3x faster (a 20b expert pair on these CPUs). The matmul never
builds the interleaved weight at all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from oss_jax.mxfp4 import BLOCK, checked


def decode(blocks: jax.Array, scales: jax.Array, dtype: jnp.dtype = jnp.bfloat16) -> jax.Array:
    """``mxfp4.decode``: blocks ``[..., nb, 16]``, scales ``[..., nb]`` -> ``[..., nb * 32]`` in ``dtype``."""
    blocks, scales = checked(blocks, scales, "kernels.mxfp4.decode")
    codes = jnp.stack([blocks & 0x0F, blocks >> 4], axis=-1)  # even element (low nibble) first
    out = _values(codes.reshape(*scales.shape, BLOCK), scales)
    return out.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK).astype(dtype)


def matmul(x_RI: jax.Array, blocks: jax.Array, scales: jax.Array, dtype: jnp.dtype = jnp.bfloat16) -> jax.Array:
    """``mxfp4.matmul``: ``x @ decode(blocks, scales).T`` for a weight stored ``[O, I]``: ``[R, I]`` -> ``[R, O]``.

    Even inputs meet the low nibbles and odd inputs the high ones:
    ``x[:, 0::2] @ lo.T + x[:, 1::2] @ hi.T``. Interleaving the two nibble planes is a strided copy
    that XLA's CPU backend runs several times slower than both matmuls together.
    """
    blocks, scales = checked(blocks, scales, "kernels.mxfp4.matmul")
    lo = _values(blocks & 0x0F, scales).reshape(*scales.shape[:-1], -1).astype(dtype)
    hi = _values(blocks >> 4, scales).reshape(*scales.shape[:-1], -1).astype(dtype)
    return x_RI[:, 0::2] @ lo.T + x_RI[:, 1::2] @ hi.T


def _values(codes: jax.Array, scales: jax.Array) -> jax.Array:
    """float32 values of 4-bit codes ``[..., nb, n]`` (integers 0..15) under scales ``[..., nb]``.

    A code is sign | e (2 bits) | m; its value is (1 + m/2) * 2**(e - 1) for e > 0, and m/2 for
    e = 0. Times 2**(s - 127), the float32 exponent field is e + s - 1 (the mantissa's top bit is
    m); for code 1 (0.5) it is s - 1 with no mantissa. Fields >= 255 overflow to infinity; fields
    <= 0 would be subnormal and are flushed to zero, as XLA's CPU arithmetic does anyway.
    """
    codes = codes.astype(jnp.int32)
    sign, mag = (codes >> 3) << 31, codes & 7
    normal = mag >= 2
    field = jnp.where(normal, mag >> 1, 0) + scales.astype(jnp.int32)[..., None] - 1
    bits = jnp.where(field >= 255, 0x7F800000, (field << 23) | jnp.where(normal, (mag & 1) << 22, 0))
    bits = jnp.where((mag == 0) | (field <= 0), 0, bits)
    return jax.lax.bitcast_convert_type(bits | sign, jnp.float32)
