"""Rotary position embeddings with YaRN scaling to 128k positions (SPEC.md §2).

YaRN's "NTK-by-parts": dimensions whose wavelength is short compared with the original context
(``L0 = 4096``) keep their frequency (extrapolate); long-wavelength ones are divided by ``factor``
(interpolate); a linear ramp between ``low`` and ``high`` blends the two. Cos and sin are then
scaled by the "concentration" ``0.1 ln(factor) + 1``, which sharpens attention logits.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def correction_range(head_dim: int, theta: float, original_max: int, beta_fast: float,
                     beta_slow: float, truncate: bool = False) -> tuple[float, float]:
    """The (low, high) dimension indices of the YaRN ramp; 8.0928, 17.3980 for gpt-oss."""
    def dim_for(rotations: float) -> float:
        return (head_dim / 2) * math.log(original_max / (rotations * 2 * math.pi)) / math.log(theta)

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if truncate:  # HF's default for other YaRN models; gpt-oss sets truncate=false
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0.0), min(high, head_dim - 1.0)


@functools.lru_cache(maxsize=32)
def yarn_inv_freq(head_dim: int, theta: float, factor: float = 1.0, original_max: int = 4096,
                  beta_fast: float = 32.0, beta_slow: float = 1.0,
                  truncate: bool = False) -> tuple[np.ndarray, float]:
    """Inverse frequencies and the concentration factor.

    Returns:
      ``(inv_freq float32 [head_dim/2], concentration)``. With ``factor == 1`` this is plain RoPE
      (``inv_freq_j = theta**(-2j/d)``, concentration 1). Computed in float64, rounded once.
    """
    j = np.arange(head_dim // 2, dtype=np.float64)
    freq = theta ** (2 * j / head_dim)
    if factor == 1.0:
        return (1.0 / freq).astype(np.float32), 1.0
    low, high = correction_range(head_dim, theta, original_max, beta_fast, beta_slow, truncate)
    if high == low:
        high += 0.001  # as HF does, to avoid a division by zero
    ramp = np.clip((j - low) / (high - low), 0.0, 1.0)
    inv_freq = (1.0 / freq) * (1.0 - ramp) + (1.0 / (factor * freq)) * ramp
    concentration = 0.1 * math.log(factor) + 1.0
    return inv_freq.astype(np.float32), concentration


def cos_sin(positions: jax.Array, inv_freq: np.ndarray, concentration: float) -> tuple[jax.Array, jax.Array]:
    """Rotation tables for integer positions.

    Args:
      positions: int ``[..., T]``.
      inv_freq: float32 ``[H/2]``.

    Returns:
      ``(cos, sin)`` float32 ``[..., T, H/2]``, already multiplied by the concentration.
      Angles are float32 products ``pos * inv_freq`` (never bf16: position 257 would become 256).
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles) * concentration, jnp.sin(angles) * concentration


def apply(x_BTNH: jax.Array, cos_BTh: jax.Array, sin_BTh: jax.Array) -> jax.Array:
    """Rotate query or key heads, half-split (NeoX) layout, in float32.

    Args:
      x_BTNH: ``[B, T, N, H]``.
      cos_BTh, sin_BTh: ``[B, T, H/2]`` from ``cos_sin``.
    """
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    c, s = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(x_BTNH.dtype)
