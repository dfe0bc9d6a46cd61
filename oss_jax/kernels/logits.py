"""The unembedding a slice of the vocabulary at a time: the same logits, without a float32 copy of the matrix.

gpt-oss's unembedding ``W [V, D]`` is 201,088 x 2,880 in bf16 (1.1 GiB). XLA's CPU backend multiplies a
bf16 matrix by converting it to float32 first, so ``x @ W.T`` in one piece holds a 2.2 GiB float32 copy
of ``W`` while it runs: for one decode step of gpt-oss-20b that is all of XLA's working memory, and the
difference between fitting in 16 GB and not. Here ``W`` is multiplied ``rows`` rows at a time; each
slice's copy is freed before the next one is made (XLA's low-memory CPU scheduler, ``oss_jax.xla_flags``),
so the working memory is one slice. Each logit is still one dot product over all of D, as in the
reference ``einsum`` (``oss_jax.model.GptOss.apply`` with ``impl="reference"``), equal up to float32 rounding
(XLA may block the sum differently).

A decode step (at most ``kernels.linear.MAX_ROWS`` rows of ``x``) skips the float32 copy altogether: the
native bf16 kernel reads ``W`` in place where it builds (``kernels.linear``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from oss_jax.kernels import linear, native

SLICE_BYTES = 128 << 20  # float32 bytes of one slice of W (about 12,000 rows of gpt-oss's 2,880)


def unembed(x_BTD: jax.Array, w_VD: jax.Array, slice_bytes: int | None = None) -> jax.Array:
    """Logits ``x @ w.T``, ``[B, T, D] x [V, D] -> [B, T, V]`` float32, ``w`` read in row slices of at most
    ``slice_bytes`` (as float32; default ``SLICE_BYTES``): one piece when ``w`` is small."""
    V, D = w_VD.shape
    B, T, _ = x_BTD.shape
    if linear.native_rows(B * T, w_VD):  # a decode step: the bf16 rows read in place (kernels.linear)
        return native.bf16_matmul(x_BTD.reshape(B * T, D), w_VD, transposed=True).reshape(B, T, V)
    slice_bytes = SLICE_BYTES if slice_bytes is None else slice_bytes
    rows = max(1, min(V, slice_bytes // (4 * D)))
    pieces = [jnp.einsum("btd,vd->btv", x_BTD, w_VD[start:start + rows], preferred_element_type=jnp.float32)
              for start in range(0, V, rows)]
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)
