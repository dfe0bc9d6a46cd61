"""RMSNorm as gpt-oss uses it (SPEC.md §2): ``x * rsqrt(mean(x^2) + eps) * scale`` in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

f32 = jnp.float32


class RMSNorm(nnx.Module):
    """``x * rsqrt(mean(x^2) + eps) * scale`` over the last axis, in float32, cast back to ``x``'s
    dtype. The scale multiplies as is (no ``1 + scale``)."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.bfloat16):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(f32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(f32)).astype(x.dtype)
