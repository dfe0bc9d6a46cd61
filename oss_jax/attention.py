"""Attention in gpt-oss (SPEC.md §2): grouped-query attention with learned sinks.

Read top to bottom: :func:`visible` (which keys a query may see: causal, a sliding window on
even layers, never padding), :func:`weights` (the probabilities: the logits plus one sink column
per head, a softmax in float32, the sink column dropped), :func:`attention` (the probabilities
times the values), then the :class:`Attention` layer (projections, RoPE, the KV cache, the output
projection).

These functions are the reference. By default (``impl="fast"``) the layer computes the same
numbers with ``oss_jax.kernels.attention``, which materialises no ``T x S`` array for long inputs, and
its projections with ``oss_jax.kernels.linear`` (at a decode step on the CPU, a native kernel that reads
the bf16 weights in place); ``impl="reference"`` calls :func:`attention` and ``jnp.einsum`` itself.

Shape letters: the legend in ``oss_jax/model.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from oss_jax import rope
from oss_jax.cache import LayerCache
from oss_jax.config import Config
from oss_jax.kernels import attention as fast
from oss_jax.kernels import linear
from oss_jax.kernels.attention import blockwise, blockwise_causal  # noqa: F401  (re-exported)
from oss_jax.layers import Recording, check_impl, f32, param, sow


def visible(q_pos_BT: jax.Array, k_pos_BS: jax.Array, window: int | None) -> jax.Array:
    """``[B, T, S]`` bool: key ``s`` is visible to query ``t`` when ``0 <= t - s < window`` (the window
    counts the query itself; ``None``: no window) and ``s >= 0`` (negative positions are padding or
    empty cache slots). Positions, not indices: keys may come in any order."""
    delta = q_pos_BT[:, :, None] - k_pos_BS[:, None, :]
    seen = (delta >= 0) & (k_pos_BS[:, None, :] >= 0)
    if window is not None:
        seen &= delta < window
    return seen


def weights(q_BTNH: jax.Array, k_BSKH: jax.Array, sinks_N: jax.Array, q_pos_BT: jax.Array,
            k_pos_BS: jax.Array, window: int | None) -> tuple[jax.Array, jax.Array]:
    """The attention probabilities and the probability mass each head's sink takes, float32.

    Query head ``n`` reads KV head ``n // G``. With logits ``l_s = q . k_s / sqrt(H)`` over the
    visible keys and the head's sink logit ``s_h`` appended as one more column::

        p_s = exp(l_s) / (exp(s_h) + sum_s' exp(l_s')),   sink = exp(s_h) / (same denominator)

    so ``sink + sum_s p_s = 1``: the sink takes probability mass and brings no value.

    Returns ``(probs [B, T, N, S], sink_mass [B, T, N])``; invisible keys get probability 0.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)  # query heads in K groups of G: group k reads KV head k
    logits_BTKGS = jnp.einsum("btkgh,bskh->btkgs", q_BTKGH, k_BSKH, preferred_element_type=f32) * (H ** -0.5)
    logits_BTNS = logits_BTKGS.reshape(B, T, N, -1)
    logits_BTNS = jnp.where(visible(q_pos_BT, k_pos_BS, window)[:, :, None, :], logits_BTNS, -jnp.inf)
    sink_BTN1 = jnp.broadcast_to(sinks_N.astype(f32)[:, None], (B, T, N, 1))
    probs = jax.nn.softmax(jnp.concatenate([logits_BTNS, sink_BTN1], axis=-1), axis=-1)
    return probs[..., :-1], probs[..., -1]


def attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, sinks_N: jax.Array,
              q_pos_BT: jax.Array, k_pos_BS: jax.Array, window: int | None) -> jax.Array:
    """Grouped-query attention with sinks: ``out[t, n] = sum_s p[t, n, s] v[s, n // G]``.

    Returns ``[B, T, N, H]`` in the dtype of ``v`` (the probabilities are cast to it first).
    A query that sees no key gets 0.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    probs_BTNS, _ = weights(q_BTNH, k_BSKH, sinks_N, q_pos_BT, k_pos_BS, window)
    probs_BTKGS = probs_BTNS.reshape(B, T, K, N // K, -1).astype(v_BSKH.dtype)
    out = jnp.einsum("btkgs,bskh->btkgh", probs_BTKGS, v_BSKH, preferred_element_type=f32)
    return out.reshape(B, T, N, H).astype(v_BSKH.dtype)


naive = attention  # the reference's earlier name


class Attention(nnx.Module):
    """Self-attention layer: biased q/k/v/o projections, YaRN RoPE, sinks, optional window.

    Static attributes: ``impl`` (``"fast"``: ``kernels.attention.attend``; ``"reference"``:
    :func:`attention`), ``window`` and ``recording`` (tracing; see ``layers.Recording``).
    ``lora``: None, or low-rank adapters of the projections (``oss_jax.lora.AttentionLora``).
    """

    def __init__(self, cfg: Config, layer: int, *, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.wq_DNH = param((D, N, H), dtype, rngs)
        self.bq_NH = param((N, H), dtype, rngs)
        self.wk_DKH = param((D, K, H), dtype, rngs)
        self.bk_KH = param((K, H), dtype, rngs)
        self.wv_DKH = param((D, K, H), dtype, rngs)
        self.bv_KH = param((K, H), dtype, rngs)
        self.wo_NHD = param((N, H, D), dtype, rngs)
        self.bo_D = param((D,), dtype, rngs)
        self.sinks_N = param((N,), dtype, rngs, std=1.0)
        self.window = cfg.window(layer)
        self.rope_args = (H, cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max_position,
                          cfg.rope_beta_fast, cfg.rope_beta_slow, cfg.rope_truncate)
        self.impl = "fast"
        self.recording: Recording | None = None
        self.lora = nnx.data(None)  # None: no adapters, nothing traced (see oss_jax.lora)

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array,
                 cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
        """Attend over the sequence itself, or over cached keys too; returns (out, updated cache).

        A full-attention cache holds every position, so new keys are written first and the
        queries read the cache. A ring buffer may overwrite keys the chunk's earlier queries still
        need, so those read ``ring ++ chunk`` and the ring is updated afterwards.
        """
        reference = check_impl(self.impl) == "reference"
        if reference:
            q = jnp.einsum("btd,dnh->btnh", x_BTD, self.wq_DNH[...])
            k = jnp.einsum("btd,dkh->btkh", x_BTD, self.wk_DKH[...])
            v = jnp.einsum("btd,dkh->btkh", x_BTD, self.wv_DKH[...])
        else:  # the same products; at a decode step without XLA's float32 copy of the weights (kernels.linear)
            q, k, v = (linear.project(x_BTD, w[...]) for w in (self.wq_DNH, self.wk_DKH, self.wv_DKH))
        q, k, v = q + self.bq_NH[...], k + self.bk_KH[...], v + self.bv_KH[...]
        if self.lora is not None:  # q, k, v += (alpha / r) x A B, for the adapted ones
            q, k, v = self.lora.add("q", x_BTD, q), self.lora.add("k", x_BTD, k), self.lora.add("v", x_BTD, v)
        inv_freq, concentration = rope.yarn_inv_freq(*self.rope_args)
        cos, sin = rope.cos_sin(positions_BT, inv_freq, concentration)
        q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
        if cache is None:
            keys, values, k_pos = k, v, positions_BT
        elif cache.ring:
            keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)
            values = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
            k_pos = jnp.concatenate([cache.pos, positions_BT], axis=1)
            cache = cache.write(k, v, positions_BT)
        else:
            cache = cache.write(k, v, positions_BT)
            keys, values, k_pos = cache.k, cache.v, cache.pos
        values = values.astype(v.dtype)
        sinks = self.sinks_N[...]
        if reference:
            o = attention(q, keys, values, sinks, positions_BT, k_pos, self.window)
        else:
            o = fast.attend(q, keys, values, sinks, positions_BT, k_pos, self.window, self_attention=cache is None)
        rec = self.recording
        if rec is not None and (rec.sinks or rec.attention_window is not None):
            self._record(q, keys, sinks, positions_BT, k_pos, self_attention=cache is None)
        if reference:
            out = jnp.einsum("btnh,nhd->btd", o, self.wo_NHD[...])
        else:  # as one [B*T, N*H] @ [N*H, D] product: as an einsum over (n, h), XLA's CPU backend may
            # transpose the whole weight to suit the attention output's layout, every call.
            B, T, N, H = o.shape
            out = linear.project(o.reshape(B, T, N * H), self.wo_NHD[...].reshape(N * H, -1))
        if self.lora is not None:
            out = self.lora.add("o", o, out)
        return out + self.bo_D[...], cache

    # -- tracing: runs only while ``recording`` is set (see oss_jax.trace) ------------------------
    def _record(self, q_BTNH: jax.Array, k_BSKH: jax.Array, sinks_N: jax.Array, positions_BT: jax.Array,
                k_pos_BS: jax.Array, self_attention: bool) -> None:
        """Sow sink mass ``[B, T, N]`` and window weights ``[B, T, N, W]``.

        Short inputs get both from :func:`weights`; long ones (past ``kernels.attention.NAIVE_MAX``)
        get the sink mass as ``1 - (attention mass on the keys)`` by attending to values of 1 with
        the blockwise kernels, which reuses their exact masking and never materialises ``T x S``.
        """
        rec = self.recording
        T, S = q_BTNH.shape[1], k_BSKH.shape[1]
        if T * S <= fast.NAIVE_MAX:
            probs_BTNS, sink_BTN = weights(q_BTNH, k_BSKH, sinks_N, positions_BT, k_pos_BS, self.window)
            if rec.sinks:
                sow(self, "sink_mass", sink_BTN)
            if rec.attention_window is not None:
                start, stop = rec.attention_window
                # Keys may sit in cache-slot order: pick them by stored position, not by index.
                onehot_BSW = (k_pos_BS[:, :, None] == jnp.arange(start, stop)).astype(f32)
                sow(self, "attention_weights", jnp.einsum("btns,bsw->btnw", probs_BTNS, onehot_BSW))
            return
        if rec.attention_window is not None:
            raise ValueError(f"attention weights are recorded on the naive path only ({T} queries x {S} keys "
                             f"> NAIVE_MAX = {fast.NAIVE_MAX}): trace fewer tokens per chunk")
        if rec.sinks:
            ones_BSKH = jnp.ones(k_BSKH.shape, f32)  # the blockwise kernels want values of the keys' shape
            if self_attention:
                mass = fast.blockwise_causal(q_BTNH, k_BSKH, ones_BSKH, sinks_N, positions_BT, self.window)
            else:
                mass = fast.blockwise(q_BTNH, k_BSKH, ones_BSKH, sinks_N, positions_BT, k_pos_BS, self.window)
            sow(self, "sink_mass", 1.0 - mass[..., 0])
