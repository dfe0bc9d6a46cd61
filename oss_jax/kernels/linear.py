"""bf16 weight products at a decode step: the same numbers as the einsums of ``attention.py`` (and of the
unembedding, ``kernels.logits``), without XLA's float32 copy of the weight.

gpt-oss keeps every weight but the experts' in bf16. XLA's CPU backend multiplies a bf16 matrix by first
writing a float32 copy of all of it and then reading that back. For a decode step (one row of ``x`` per
sequence) each weight is used once, so the copy is most of the work: at the 20b shape, one token's q
projection (24 MB of bf16) takes 14.7 ms with XLA and 1.0 ms on the native kernel; all the bf16 products
of a token, 1,047 ms and 120 ms (``benchmarks/results/bf16_kernel.md``). The native kernel
(``kernels.native.bf16_matmul``, ``native/bf16_cpu.cc``) reads the bf16 weight in place and widens it in
registers.

:func:`native_rows` is the rule: the native kernel for bf16 weights and at most ``MAX_ROWS`` rows of ``x``,
on the CPU where it builds, with one device (XLA cannot split a custom call across devices); everything
else is the einsum the reference writes (a larger batch shares one float32 copy among its rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from oss_jax.kernels import native

MAX_ROWS = 16  # rows of x (batch x tokens) up to which the native kernel runs; measured in bf16_kernel.md


def native_rows(rows: int, w: jax.Array) -> bool:
    """Whether a product of ``rows`` rows of ``x`` with the weight ``w`` runs on the native bf16 kernel."""
    return (w.dtype == jnp.bfloat16 and rows <= MAX_ROWS and jax.device_count() == 1
            and native.enabled("auto"))


def project(x_BTI: jax.Array, w_I: jax.Array) -> jax.Array:
    """``x`` contracted with the first axis of ``w``: ``[B, T, I] x [I, ...] -> [B, T, ...]``, in ``x``'s dtype.

    Equals ``jnp.einsum("bti,i...->bt...", x, w)`` (the q, k, v and o projections of ``attention.py``) up
    to float32 rounding; on the native kernel when :func:`native_rows` says so.
    """
    B, T, I = x_BTI.shape
    if x_BTI.dtype != w_I.dtype or not native_rows(B * T, w_I):
        return jnp.tensordot(x_BTI, w_I, axes=1)
    y_RO = native.bf16_matmul(x_BTI.reshape(B * T, I), w_I.reshape(I, -1))
    return y_RO.astype(x_BTI.dtype).reshape(B, T, *w_I.shape[1:])
