"""Fast attention: the numbers of ``oss_jax.attention.attention``, with less memory or time.

The rule is the reference's: a key at position ``s`` is visible to a query at position ``t`` when
``0 <= t - s`` (and ``t - s < window`` on sliding layers) and ``s >= 0``; negative positions are
padding or empty cache slots. Visibility depends on positions only, never on the order of the
keys, so keys may sit in a ring buffer in slot order.

* :func:`materialized`: the reference's logits, computed as one ``[G*T, H] @ [H, S]`` matmul per
  (batch, KV head). Written as one einsum over the model's ``[B, T, N, H]`` layout, XLA's CPU
  backend computes the transposed product and then spends longer transposing the ``T x S``
  logits than multiplying. Cheapest while ``T x S`` is small.
* :func:`blockwise`: one ``block_q x block_k`` tile at a time with an online (flash-style)
  softmax, never a ``T x S`` array; key blocks in which no key is visible to any query of the
  block are skipped (``lax.cond``), so sorted causal attention does about half the work. Any
  positions, any key order (prefill, a chunk against a cache, decode).
* :func:`blockwise_causal`: self-attention over one sequence (the keys are the queries' own
  tokens): with a window, each query block reads only the ``block_q + window - 1`` keys that can
  be visible to it, so the cost is ``O(T * window)``.
* :func:`attend`: the one ``Attention`` calls: ``materialized`` up to ``NAIVE_MAX`` logits per
  head, else ``blockwise_causal`` (self-attention) or ``blockwise`` (against a cache).

The online softmax with a sink (per query row, in float32): the running max starts at the sink
logit ``m = s_h`` and the denominator at ``l = exp(s_h - m) = 1``; for each key block with logits
``x`` (masked keys excluded), ``m' = max(m, max x)``, ``l' = l exp(m - m') + sum exp(x - m')``,
``acc' = acc exp(m - m') + exp(x - m') @ v``; the output is ``acc / l``. The sink takes probability
mass and contributes no value. Because ``m`` starts at a finite sink, a row with no visible key
ends with ``acc = 0`` and ``l = 1``: output 0, no NaN. Masked logits use a large finite negative
value and masked probabilities are zeroed explicitly, so ``-inf - -inf`` never occurs (even with
``sinks = -inf``, which gives attention without a sink).

Shape letters: the legend in ``oss_jax/model.py``; here also Q (the G*T, or G*U, query rows of
one KV head), A (a stack of blocks that a loop walks), U (queries of a block), J (keys of a block).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

f32 = jnp.float32
# attend materialises [T, S] logits per head up to this many entries, then goes blockwise.
NAIVE_MAX = 1 << 20
_MASKED = -1e30  # finite stand-in for -inf on masked logits


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, sinks_N: jax.Array, q_pos_BT: jax.Array,
           k_pos_BS: jax.Array, window: int | None, *, self_attention: bool) -> jax.Array:
    """``attention.attention`` by the cheapest kernel for these sizes. ``self_attention``: the keys
    are the queries' own tokens, ``k_pos == q_pos`` contiguous (no cache). Returns ``[B, T, N, H]``."""
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    if T * S <= NAIVE_MAX:  # short: one [T, S] logits matrix is cheapest
        return materialized(q_BTNH, k_BSKH, v_BSKH, sinks_N, q_pos_BT, k_pos_BS, window)
    if self_attention:  # long self-attention: tiles, sliding layers visit only their window
        return blockwise_causal(q_BTNH, k_BSKH, v_BSKH, sinks_N, q_pos_BT, window)
    return blockwise(q_BTNH, k_BSKH, v_BSKH, sinks_N, q_pos_BT, k_pos_BS, window)  # a chunk against a cache


def materialized(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, sinks_N: jax.Array,
                 q_pos_BT: jax.Array, k_pos_BS: jax.Array, window: int | None) -> jax.Array:
    """``attention.attention`` with the query heads of each KV head stacked into ``[G*T, H]`` rows.

    Returns ``[B, T, N, H]`` in the dtype of ``v`` (probabilities cast to it before the value
    product, as in the reference).
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    G = N // K
    q_BKQH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)
    logits = jnp.einsum("bkqh,bksh->bkqs", q_BKQH, k_BSKH.transpose(0, 2, 1, 3), preferred_element_type=f32)
    logits = logits.reshape(B, K, T, G, -1) * (H ** -0.5)
    logits = jnp.where(_visible(q_pos_BT, k_pos_BS, window)[:, None, :, None], logits, -jnp.inf)
    sink = sinks_N.astype(f32).reshape(1, K, 1, G, 1)
    m = jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), sink)
    p = jnp.exp(logits - m)
    probs_BKTGS = p / (jnp.sum(p, axis=-1, keepdims=True) + jnp.exp(sink - m))
    probs_BKQS = probs_BKTGS.reshape(B, K, T * G, -1).astype(v_BSKH.dtype)
    out = jnp.einsum("bkqs,bksh->bkqh", probs_BKQS, v_BSKH.transpose(0, 2, 1, 3), preferred_element_type=f32)
    return out.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H).astype(v_BSKH.dtype)


def blockwise(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, sinks_N: jax.Array,
              q_pos_BT: jax.Array, k_pos_BS: jax.Array, window: int | None, *,
              block_q: int = 128, block_k: int = 128) -> jax.Array:
    """``attention.attention`` computed tile by tile, never materialising a ``T x S`` matrix.

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
    Probabilities are cast to ``v``'s dtype before the value product, as in the reference.
    (Under ``vmap`` the skip's ``lax.cond`` becomes a select and every block is computed.)
    For a single decode query (T = 1) :func:`materialized` is as cheap in memory and faster on CPU.
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    bq, bk = max(1, min(block_q, T)), max(1, min(block_k, S))
    nk = -(-S // bk)
    q_blocks, q_pos_blocks = _query_blocks(q_BTNH, q_pos_BT, K, bq)

    def key_blocks(x_BSKH):
        x = _pad_axis(x_BSKH, 1, 0, nk * bk - S)
        return x.reshape(B, nk, bk, K, H).transpose(1, 0, 3, 2, 4)  # [A, B, K, J, H]

    k_blocks, v_blocks = key_blocks(k_BSKH), key_blocks(v_BSKH)
    k_pos_blocks = _pad_axis(k_pos_BS, 1, 0, nk * bk - S, -1).reshape(B, nk, bk).transpose(1, 0, 2)
    sink_KG = sinks_N.astype(f32).reshape(K, N // K)

    def one_query_block(args):
        q, q_pos = args
        return _attend_block(q, q_pos, k_blocks, v_blocks, k_pos_blocks, sink_KG, window)

    out = jax.lax.map(one_query_block, (q_blocks, q_pos_blocks))  # [A, B, K, G, U, H]
    return _merge_query_blocks(out, T)


def blockwise_causal(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, sinks_N: jax.Array,
                     positions_BT: jax.Array, window: int | None, *,
                     block_q: int = 128, block_k: int = 128) -> jax.Array:
    """Self-attention over one sequence: the non-cached forward pass.

    Keys and values are the queries' own tokens (``S == T``) and ``positions_BT`` are contiguous
    along T: ``positions[b, t] = t - offset[b]`` for every non-negative entry (left or right
    padding marked by negative positions is fine). Under that assumption a query at index ``i``
    can only see keys at indices ``i - window + 1 .. i``, and this function reads only those.
    The position rule is still applied exactly inside the band, so a padding pattern that breaks
    the assumption gives missing keys, never extra ones.

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
            return x.reshape(B, K, nkb, bk, H).transpose(2, 0, 1, 3, 4)  # [A, B, K, J, H]

        k_pos = jax.lax.dynamic_slice_in_dim(k_pos_BS, start, L, axis=1).reshape(B, nkb, bk)
        return _attend_block(q, q_pos, band_blocks(k_BKSH), band_blocks(v_BKSH),
                             k_pos.transpose(1, 0, 2), sink_KG, window)

    out = jax.lax.map(one_query_block, (q_blocks, q_pos_blocks, jnp.arange(nq)))
    return _merge_query_blocks(out, T)


# -- tiles -----------------------------------------------------------------------------------------
def _visible(q_pos_BU: jax.Array, k_pos_BJ: jax.Array, window: int | None) -> jax.Array:
    """``[B, U, J]`` bool: which keys each query may see (the rule of ``attention.visible``)."""
    delta = q_pos_BU[:, :, None] - k_pos_BJ[:, None, :]
    visible = (delta >= 0) & (k_pos_BJ[:, None, :] >= 0)
    if window is not None:
        visible &= delta < window
    return visible


def _pad_axis(x: jax.Array, axis: int, before: int, after: int, value=0) -> jax.Array:
    if before == 0 and after == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (before, after)
    return jnp.pad(x, widths, constant_values=value)


def _query_blocks(q_BTNH: jax.Array, q_pos_BT: jax.Array, K: int, bq: int):
    """Pad T to a multiple of ``bq`` (dummy queries at position -1, which see nothing) and split.

    Returns ``q [A, B, K, G*U, H]`` (row ``g*U + u``) and ``q_pos [A, B, U]``, ``U = bq``.
    """
    B, T, N, H = q_BTNH.shape
    nq = -(-T // bq)
    q = _pad_axis(q_BTNH, 1, 0, nq * bq - T)
    q = q.reshape(B, nq, bq, K, N // K, H).transpose(1, 0, 3, 4, 2, 5).reshape(nq, B, K, N // K * bq, H)
    q_pos = _pad_axis(q_pos_BT, 1, 0, nq * bq - T, -1).reshape(B, nq, bq).transpose(1, 0, 2)
    return q, q_pos


def _merge_query_blocks(o_ABKGUH: jax.Array, T: int) -> jax.Array:
    """``[A, B, K, G, U, H]`` -> ``[B, T, N, H]`` (dropping the padded queries)."""
    nq, B, K, G, bq, H = o_ABKGUH.shape
    return o_ABKGUH.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, K * G, H)[:, :T]


def _attend_block(q_BKQH: jax.Array, q_pos_BU: jax.Array, k_ABKJH: jax.Array, v_ABKJH: jax.Array,
                  k_pos_ABJ: jax.Array, sink_KG: jax.Array, window: int | None) -> jax.Array:
    """One query block against a stack of key blocks: online softmax with a sink.

    ``q [B, K, G*U, H]``, ``q_pos [B, U]``; key blocks ``k, v [A, B, K, J, H]``, ``k_pos [A, B, J]``;
    ``sink [K, G]`` float32. Returns ``[B, K, G, U, H]`` in ``v``'s dtype.
    Live memory per step: the ``[B, K, G, U, J]`` float32 tile.
    """
    B, K, Q, H = q_BKQH.shape
    U = q_pos_BU.shape[1]
    G = Q // U
    scale = H ** -0.5
    m0 = jnp.broadcast_to(sink_KG[None, :, :, None], (B, K, G, U))  # running max starts at the sink
    l0 = jnp.ones((B, K, G, U), f32)  # exp(s_h - m0) = 1: the sink's share of the denominator
    acc0 = jnp.zeros((B, K, Q, H), f32)

    def update(carry, k_BKJH, v_BKJH, visible_B11UJ):
        m, l, acc = carry
        J = k_BKJH.shape[2]
        x = jnp.einsum("bkqh,bkjh->bkqj", q_BKQH, k_BKJH, preferred_element_type=f32) * scale
        x = jnp.where(visible_B11UJ, x.reshape(B, K, G, U, J), _MASKED)
        m_new = jnp.maximum(m, jnp.max(x, axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(visible_B11UJ, jnp.exp(x - m_new[..., None]), 0.0)
        l = alpha * l + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bkqj,bkjh->bkqh", p.reshape(B, K, Q, J).astype(v_BKJH.dtype), v_BKJH,
                        preferred_element_type=f32)
        acc = alpha.reshape(B, K, Q, 1) * acc + pv
        return m_new, l, acc

    def step(carry, kv):
        k_BKJH, v_BKJH, k_pos_BJ = kv
        visible = _visible(q_pos_BU, k_pos_BJ, window)[:, None, None]  # [B, 1, 1, U, J]
        # Skip key blocks no query of this block can see (above the causal diagonal, outside the
        # window, empty cache slots): XLA executes only the branch taken.
        carry = jax.lax.cond(jnp.any(visible), lambda c: update(c, k_BKJH, v_BKJH, visible),
                             lambda c: c, carry)
        return carry, None

    (_, l, acc), _ = jax.lax.scan(step, (m0, l0, acc0), (k_ABKJH, v_ABKJH, k_pos_ABJ))
    # l >= exp(s_h - m) > 0 with a finite sink; the guard only matters for sinks = -inf.
    l = jnp.where(l > 0, l, 1.0)
    out = acc.reshape(B, K, G, U, H) / l[..., None]
    return out.astype(v_ABKJH.dtype)
