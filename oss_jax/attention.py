"""The attention math of gpt-oss (SPEC.md §2): grouped-query attention with learned sinks.

Three functions, one semantics. A key at position ``s`` is visible to a query at position ``t``
when ``0 <= t - s`` (and ``t - s < window`` for sliding layers) and ``s >= 0``: negative key
positions are padding or empty cache slots. Visibility depends on positions only, never on the
order of the keys, so keys may sit in a ring buffer in slot order.

* :func:`naive`: the reference. Materialises the ``[B, K, G, T, S]`` logits.
* :func:`blockwise`: the same result, computed one ``block_q x block_k`` tile at a time with an
  online (flash-style) softmax; key blocks in which no key is visible to any query of the block
  are skipped (``lax.cond``), so sorted causal attention does about half the work of ``naive``.
  Any positions, any key order (prefill, chunked prefill against a cache, decode).
* :func:`weights`: the attention probabilities and the sink's share, for tracing (``naive``'s
  logits, materialised; never called by the forward pass unless recording is on).
* :func:`blockwise_causal`: self-attention over one sequence (keys are the queries' own tokens,
  ``positions`` contiguous): with a window, each query block reads only the
  ``block_q + window - 1`` keys that can be visible to it, so cost is ``O(T * window)``.

Shapes in names: B batch, T query positions, S key positions, N query heads, K key/value heads,
G = N/K query heads per KV head, H head dim. Query head ``h`` uses KV head ``h // G``.

The online softmax with a sink (per query row, in float32): the running max starts at the sink
logit ``m = s_h`` and the denominator at ``l = exp(s_h - m) = 1``; for each key block with logits
``x`` (masked keys excluded), ``m' = max(m, max x)``, ``l' = l exp(m - m') + sum exp(x - m')``,
``acc' = acc exp(m - m') + exp(x - m') @ v``; the output is ``acc / l``. The sink takes probability
mass and contributes no value. Because ``m`` starts at a finite sink, a row with no visible key
ends with ``acc = 0`` and ``l = 1``: output 0, no NaN. Masked logits use a large finite negative
value and masked probabilities are zeroed explicitly, so ``-inf - -inf`` never occurs (even with
``sinks = -inf``, which gives attention without a sink).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

f32 = jnp.float32
_MASKED = -1e30  # finite stand-in for -inf on masked logits


def naive(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, sinks_N: jax.Array,
          q_pos_BT: jax.Array, k_pos_BS: jax.Array, window: int | None) -> jax.Array:
    """Grouped-query attention with learned sinks, causal, optionally sliding.

    A key at position ``s`` is visible to a query at ``t`` when ``0 <= t - s < window``
    (the window counts the query itself). The sink ``s_h`` is an extra logit column that takes
    probability mass and contributes no value: ``p = exp(l) / (exp(s_h) + sum exp(l))``.
    Keys with negative positions are treated as padding and never visible.

    Returns ``[B, T, N, H]`` in the dtype of ``v``.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    probs_BKTGS, _ = _probs(q_BTNH, k_BSKH, sinks_N, q_pos_BT, k_pos_BS, window)
    v_BKSH = v_BSKH.transpose(0, 2, 1, 3)
    probs_BKMS = probs_BKTGS.reshape(B, K, T * (N // K), -1).astype(v_BSKH.dtype)
    out = jnp.einsum("bkms,bksh->bkmh", probs_BKMS, v_BKSH, preferred_element_type=f32)
    return out.reshape(B, K, T, N // K, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H).astype(v_BSKH.dtype)


def weights(q_BTNH: jax.Array, k_BSKH: jax.Array, sinks_N: jax.Array, q_pos_BT: jax.Array,
            k_pos_BS: jax.Array, window: int | None) -> tuple[jax.Array, jax.Array]:
    """The probabilities of :func:`naive`, and the probability mass the sink takes (float32).

    With logits ``l_qk`` over the visible keys, sink logit ``s_h`` and ``m = max(s_h, max_k l_qk)``::

        p_qk = exp(l_qk - m) / D,   sink_q = exp(s_h - m) / D,   D = exp(s_h - m) + sum_k exp(l_qk - m)

    so ``sink_q + sum_k p_qk = 1``. Same logits, mask and max as :func:`naive`.

    Returns ``(probs [B, T, N, S], sink_mass [B, T, N])``; invisible keys get probability 0.
    """
    B, T, N, _ = q_BTNH.shape
    probs_BKTGS, sink_BKTG = _probs(q_BTNH, k_BSKH, sinks_N, q_pos_BT, k_pos_BS, window)
    probs_BTNS = probs_BKTGS.transpose(0, 2, 1, 3, 4).reshape(B, T, N, -1)
    sink_BTN = sink_BKTG.transpose(0, 2, 1, 3).reshape(B, T, N)
    return probs_BTNS, sink_BTN


def _probs(q_BTNH: jax.Array, k_BSKH: jax.Array, sinks_N: jax.Array, q_pos_BT: jax.Array,
           k_pos_BS: jax.Array, window: int | None) -> tuple[jax.Array, jax.Array]:
    """Attention probabilities ``[B, K, T, G, S]`` and the sink's ``[B, K, T, G]``, float32.

    Heads are grouped by KV head and the logits computed as one ``[G*T, H] @ [H, S]`` matmul
    per (batch, KV head), operands in that order: written as one einsum over the model's
    ``[B, T, N, H]`` layout, XLA's CPU backend computes the transposed product and then spends
    longer transposing the ``T x S`` logits than multiplying.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    G = N // K
    q_BKMH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)
    logits = jnp.einsum("bkmh,bksh->bkms", q_BKMH, k_BSKH.transpose(0, 2, 1, 3), preferred_element_type=f32)
    logits = logits.reshape(B, K, T, G, -1) * (H ** -0.5)
    visible = _visible(q_pos_BT, k_pos_BS, window)  # [B, T, S]
    logits = jnp.where(visible[:, None, :, None], logits, -jnp.inf)
    sink = sinks_N.astype(f32).reshape(1, K, 1, G, 1)
    m = jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), sink)
    p = jnp.exp(logits - m)
    sink_p = jnp.exp(sink - m)
    denom = jnp.sum(p, axis=-1, keepdims=True) + sink_p
    return p / denom, (sink_p / denom)[..., 0]


# -- blockwise (flash-style) ----------------------------------------------------------------------
def _pad_axis(x: jax.Array, axis: int, before: int, after: int, value=0) -> jax.Array:
    if before == 0 and after == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (before, after)
    return jnp.pad(x, widths, constant_values=value)


def _visible(q_pos_Bq: jax.Array, k_pos_Bk: jax.Array, window: int | None) -> jax.Array:
    """``[B, q, k]`` bool: which keys each query may see (same rule as :func:`naive`)."""
    delta = q_pos_Bq[:, :, None] - k_pos_Bk[:, None, :]
    visible = (delta >= 0) & (k_pos_Bk[:, None, :] >= 0)
    if window is not None:
        visible &= delta < window
    return visible


def _query_blocks(q_BTNH: jax.Array, q_pos_BT: jax.Array, K: int, bq: int):
    """Pad T to a multiple of ``bq`` (dummy queries at position -1, which see nothing) and split.

    Returns ``q [nq, B, K, G*bq, H]`` (row ``g*bq + t``) and ``q_pos [nq, B, bq]``.
    """
    B, T, N, H = q_BTNH.shape
    nq = -(-T // bq)
    q = _pad_axis(q_BTNH, 1, 0, nq * bq - T)
    q = q.reshape(B, nq, bq, K, N // K, H).transpose(1, 0, 3, 4, 2, 5).reshape(nq, B, K, N // K * bq, H)
    q_pos = _pad_axis(q_pos_BT, 1, 0, nq * bq - T, -1).reshape(B, nq, bq).transpose(1, 0, 2)
    return q, q_pos


def _merge_query_blocks(o_nBKGqH: jax.Array, T: int) -> jax.Array:
    """``[nq, B, K, G, bq, H]`` -> ``[B, T, N, H]`` (dropping the padded queries)."""
    nq, B, K, G, bq, H = o_nBKGqH.shape
    return o_nBKGqH.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, K * G, H)[:, :T]


def _attend_block(q_BKMH: jax.Array, q_pos_Bq: jax.Array, k_nBKkH: jax.Array, v_nBKkH: jax.Array,
                  k_pos_nBk: jax.Array, sink_KG: jax.Array, window: int | None) -> jax.Array:
    """One query block against a sequence of key blocks: online softmax with a sink.

    ``q [B, K, G*bq, H]``, ``q_pos [B, bq]``; key blocks ``k, v [n, B, K, bk, H]``,
    ``k_pos [n, B, bk]``; ``sink [K, G]`` float32. Returns ``[B, K, G, bq, H]`` in ``v``'s dtype.
    Live memory per step: the ``[B, K, G, bq, bk]`` float32 tile.
    """
    B, K, M, H = q_BKMH.shape
    bq = q_pos_Bq.shape[1]
    G = M // bq
    scale = H ** -0.5
    m0 = jnp.broadcast_to(sink_KG[None, :, :, None], (B, K, G, bq))  # running max starts at the sink
    l0 = jnp.ones((B, K, G, bq), f32)  # exp(s_h - m0) = 1: the sink's share of the denominator
    acc0 = jnp.zeros((B, K, M, H), f32)

    def update(carry, k_BKkH, v_BKkH, visible_B11qk):
        m, l, acc = carry
        bk = k_BKkH.shape[2]
        x = jnp.einsum("bkmh,bksh->bkms", q_BKMH, k_BKkH, preferred_element_type=f32) * scale
        x = jnp.where(visible_B11qk, x.reshape(B, K, G, bq, bk), _MASKED)
        m_new = jnp.maximum(m, jnp.max(x, axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(visible_B11qk, jnp.exp(x - m_new[..., None]), 0.0)
        l = alpha * l + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bkms,bksh->bkmh", p.reshape(B, K, M, bk).astype(v_BKkH.dtype), v_BKkH,
                        preferred_element_type=f32)
        acc = alpha.reshape(B, K, M, 1) * acc + pv
        return m_new, l, acc

    def step(carry, kv):
        k_BKkH, v_BKkH, k_pos_Bk = kv
        visible = _visible(q_pos_Bq, k_pos_Bk, window)[:, None, None]  # [B, 1, 1, bq, bk]
        # Skip key blocks no query of this block can see (above the causal diagonal, outside the
        # window, empty cache slots): XLA executes only the branch taken.
        carry = jax.lax.cond(jnp.any(visible), lambda c: update(c, k_BKkH, v_BKkH, visible),
                             lambda c: c, carry)
        return carry, None

    (_, l, acc), _ = jax.lax.scan(step, (m0, l0, acc0), (k_nBKkH, v_nBKkH, k_pos_nBk))
    # l >= exp(s_h - m) > 0 with a finite sink; the guard only matters for sinks = -inf.
    l = jnp.where(l > 0, l, 1.0)
    out = acc.reshape(B, K, G, bq, H) / l[..., None]
    return out.astype(v_nBKkH.dtype)


def blockwise(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, sinks_N: jax.Array,
              q_pos_BT: jax.Array, k_pos_BS: jax.Array, window: int | None, *,
              block_q: int = 128, block_k: int = 128) -> jax.Array:
    """:func:`naive` computed tile by tile, never materialising a ``T x S`` matrix.

    Args:
      q_BTNH: queries ``[B, T, N, H]``.
      k_BSKH, v_BSKH: keys and values ``[B, S, K, H]``, in any order (e.g. cache slots followed
        by the chunk's own keys).
      sinks_N: sink logits ``[N]``.
      q_pos_BT, k_pos_BS: integer positions; negative key positions are never visible.
      window: sliding window (the query counts), or ``None`` for full causal attention.
      block_q, block_k: tile sizes (clamped to T and S; T and S need not be multiples).

    Returns ``[B, T, N, H]`` in ``v``'s dtype.

    Loops over query blocks (``lax.map``) and, for each, scans the key blocks with an online
    softmax in float32; peak extra memory is ``O(B * N * block_q * block_k)`` plus the output.
    Key blocks with no visible (query, key) pair are skipped, so for keys sorted by position the
    work is about the causal half of ``T x S`` (and ``O(T * window)`` heavy work with a window,
    although every block's visibility is still tested: see :func:`blockwise_causal`).
    Probabilities are cast to ``v``'s dtype before the value product, as in :func:`naive`.
    (Under ``vmap`` the skip's ``lax.cond`` becomes a select and every block is computed.)
    For a single decode query (T = 1) :func:`naive` is as cheap in memory and faster on CPU.
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    bq, bk = max(1, min(block_q, T)), max(1, min(block_k, S))
    nk = -(-S // bk)
    q_blocks, q_pos_blocks = _query_blocks(q_BTNH, q_pos_BT, K, bq)

    def key_blocks(x_BSKH):
        x = _pad_axis(x_BSKH, 1, 0, nk * bk - S)
        return x.reshape(B, nk, bk, K, H).transpose(1, 0, 3, 2, 4)  # [nk, B, K, bk, H]

    k_blocks, v_blocks = key_blocks(k_BSKH), key_blocks(v_BSKH)
    k_pos_blocks = _pad_axis(k_pos_BS, 1, 0, nk * bk - S, -1).reshape(B, nk, bk).transpose(1, 0, 2)
    sink_KG = sinks_N.astype(f32).reshape(K, N // K)

    def one_query_block(args):
        q, q_pos = args
        return _attend_block(q, q_pos, k_blocks, v_blocks, k_pos_blocks, sink_KG, window)

    out = jax.lax.map(one_query_block, (q_blocks, q_pos_blocks))  # [nq, B, K, G, bq, H]
    return _merge_query_blocks(out, T)


def blockwise_causal(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, sinks_N: jax.Array,
                     positions_BT: jax.Array, window: int | None, *,
                     block_q: int = 128, block_k: int = 128) -> jax.Array:
    """Self-attention over one sequence: the non-cached forward pass.

    Keys and values are the queries' own tokens (``S == T``) and ``positions_BT`` are contiguous
    along T: ``positions[b, t] = t - offset[b]`` for every non-negative entry (left or right
    padding marked by negative positions is fine). Under that assumption a query at index ``i``
    can only see keys at indices ``i - window + 1 .. i``, and this function reads only those.
    The position rule of :func:`naive` is still applied exactly inside the band, so a padding
    pattern that breaks the assumption gives missing keys, never extra ones.

    Cost (per batch row and head, ``W = window``):

    * sliding (``W`` set and the band ``block_q + W - 1`` shorter than T): each query block
      ``dynamic_slice``-s ``ceil((block_q + W - 1) / block_k)`` key blocks, so the work is
      ``T * round_up(block_q + W - 1, block_k)`` logits, ``O(T * W)`` and not ``O(T^2)``;
      visibility tests are also ``O(T * W)``. E.g. ``W = 128``, blocks 128: 256 keys per query.
    * full causal: as :func:`blockwise` with ``k_pos = q_pos``: key blocks above the diagonal
      are skipped, ``~T^2 / 2`` logits plus the diagonal blocks.

    Memory per step ``O(B * N * block_q * block_k)``. Returns ``[B, T, N, H]`` in ``v``'s dtype.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    bq = max(1, min(block_q, T))
    if window is None or bq + window - 1 >= T:
        return blockwise(q_BTNH, k_BTKH, v_BTKH, sinks_N, positions_BT, positions_BT, window,
                         block_q=block_q, block_k=block_k)
    band = bq + window - 1  # key indices i*bq - window + 1 .. i*bq + bq - 1 serve query block i
    bk = max(1, min(block_k, band))
    nkb = math.ceil(band / bk)
    L = nkb * bk
    q_blocks, q_pos_blocks = _query_blocks(q_BTNH, positions_BT, K, bq)
    nq = q_blocks.shape[0]
    # Left-pad keys by window - 1 so that query block i's band starts at padded index i * bq.
    before = window - 1
    after = (nq - 1) * bq + L - before - T  # >= 0 since L >= bq + window - 1
    k_BKSH = _pad_axis(k_BTKH, 1, before, after).transpose(0, 2, 1, 3)
    v_BKSH = _pad_axis(v_BTKH, 1, before, after).transpose(0, 2, 1, 3)
    k_pos_BS = _pad_axis(positions_BT, 1, before, after, -1)
    sink_KG = sinks_N.astype(f32).reshape(K, N // K)

    def one_query_block(args):
        q, q_pos, i = args
        start = i * bq

        def band_blocks(x_BKSH):
            x = jax.lax.dynamic_slice_in_dim(x_BKSH, start, L, axis=2)  # [B, K, L, H]
            return x.reshape(B, K, nkb, bk, H).transpose(2, 0, 1, 3, 4)  # [nkb, B, K, bk, H]

        k_pos = jax.lax.dynamic_slice_in_dim(k_pos_BS, start, L, axis=1).reshape(B, nkb, bk)
        return _attend_block(q, q_pos, band_blocks(k_BKSH), band_blocks(v_BKSH),
                             k_pos.transpose(1, 0, 2), sink_KG, window)

    out = jax.lax.map(one_query_block, (q_blocks, q_pos_blocks, jnp.arange(nq)))
    return _merge_query_blocks(out, T)
