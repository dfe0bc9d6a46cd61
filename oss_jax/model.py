"""gpt-oss in Flax NNX: the whole forward pass of SPEC.md §2 in one file.

Shapes in names: B batch, T query positions, S key positions, D hidden, N query heads,
K key/value heads, G = N/K query heads per KV head, H head dim, E experts, k experts per token,
F expert hidden units, V vocabulary.

Precision policy: parameters in ``dtype`` (bf16 by default); RMSNorm, RoPE, attention softmax,
the router and the expert mixing weights in float32; logits returned in float32.

Tracing: ``GptOss``, ``Attention`` and ``MoE`` carry a static attribute ``recording`` (``None``:
off). While it holds a :class:`Recording`, they ``sow`` router outputs, attention-sink mass,
attention weights and the residual stream as ``nnx.Intermediate`` values (read back with
``nnx.capture``; ``oss_jax.trace`` does all of it). With ``None`` no recording code is traced.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oss_jax import attention, mxfp4, rope
from oss_jax.cache import KVCache, LayerCache
from oss_jax.config import Config
from oss_jax.vocab import TokenMap

f32 = jnp.float32
# Attention materialises [T, S] logits per head up to this many entries, then goes blockwise.
NAIVE_MAX = 1 << 20
# Rows per tile of the "sorted" expert dispatch (at most).
SORTED_TILE = 128
# An expert's weight is read in slices of at most this many bytes (of float32 nibble planes when
# packed): see _expert_matmul.
SLICE_BYTES = 4 << 20


class Packed(nnx.Variable):
    """Packed MXFP4 bytes (blocks or scales): state, but not a trainable parameter."""


@dataclasses.dataclass(frozen=True)
class Recording:
    """What the model sows as ``nnx.Intermediate`` while tracing (see ``oss_jax.trace``).

    Held in the static attribute ``recording`` of ``GptOss``, ``Attention`` and ``MoE``. Static
    means it is part of the graph definition, so ``None`` (the default) traces no recording code at
    all: compiled forward and generation graphs are exactly those of a model without these hooks,
    and turning recording on compiles a separate graph instead of adding a runtime branch.

    Attributes:
      router: ``MoE`` sows ``router_logits [B, T, E]`` (float32), ``expert_ids [B, T, k]``
        (int32, first choice first) and ``gates [B, T, k]`` (float32).
      sinks: ``Attention`` sows ``sink_mass [B, T, N]``: the probability each head's sink takes.
      residual: ``GptOss.apply`` sows ``residual``: L + 1 arrays ``[B, T, D]`` (the embeddings,
        then the stream after each block), in the activation dtype.
      attention_window: ``(start, stop)`` key positions: ``Attention`` sows
        ``attention_weights [B, T, N, stop - start]`` (float32), the probability each query puts
        on the keys at those positions (0 where not visible). Only on the naive attention path
        (``T * S <= NAIVE_MAX``); tracing raises ``ValueError`` otherwise.
    """

    router: bool = True
    sinks: bool = True
    residual: bool = True
    attention_window: tuple[int, int] | None = None


def _sow(module: nnx.Module, name: str, value: jax.Array) -> None:
    """Sow one value per call (not the default tuple of calls): each module runs once per pass."""
    module.sow(nnx.Intermediate, name, value, reduce_fn=lambda _, v: v, init_fn=lambda: None)


def _param(shape: tuple[int, ...], dtype, rngs: nnx.Rngs | None, std: float = 0.02) -> nnx.Param:
    if rngs is None:
        return nnx.Param(jnp.zeros(shape, dtype))
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, f32)).astype(dtype))


class RMSNorm(nnx.Module):
    """``x * rsqrt(mean(x^2) + eps) * scale`` in float32, cast back (no ``1 + scale``)."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.bfloat16):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(f32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(f32)).astype(x.dtype)


class Attention(nnx.Module):
    """Self-attention block: biased q/k/v/o projections, YaRN RoPE, sinks, optional window."""

    def __init__(self, cfg: Config, layer: int, *, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.wq_DNH = _param((D, N, H), dtype, rngs)
        self.bq_NH = _param((N, H), dtype, rngs)
        self.wk_DKH = _param((D, K, H), dtype, rngs)
        self.bk_KH = _param((K, H), dtype, rngs)
        self.wv_DKH = _param((D, K, H), dtype, rngs)
        self.bv_KH = _param((K, H), dtype, rngs)
        self.wo_NHD = _param((N, H, D), dtype, rngs)
        self.bo_D = _param((D,), dtype, rngs)
        self.sinks_N = _param((N,), dtype, rngs, std=1.0)
        self.window = cfg.window(layer)
        self.rope_args = (H, cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max_position,
                          cfg.rope_beta_fast, cfg.rope_beta_slow, cfg.rope_truncate)
        self.recording: Recording | None = None  # static: see Recording

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array,
                 cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
        """Attend over the sequence itself, or over cached keys too; returns (out, updated cache).

        A full-attention cache holds every position, so new keys are written first and the
        queries read the cache. A ring buffer may overwrite keys the chunk's earlier queries still
        need, so those read ``ring ++ chunk`` and the ring is updated afterwards.
        """
        q = jnp.einsum("btd,dnh->btnh", x_BTD, self.wq_DNH[...]) + self.bq_NH[...]
        k = jnp.einsum("btd,dkh->btkh", x_BTD, self.wk_DKH[...]) + self.bk_KH[...]
        v = jnp.einsum("btd,dkh->btkh", x_BTD, self.wv_DKH[...]) + self.bv_KH[...]
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
        T, S = q.shape[1], keys.shape[1]
        if T * S <= NAIVE_MAX:  # short: one [T, S] logits matrix is cheapest
            o = attention.naive(q, keys, values, sinks, positions_BT, k_pos, self.window)
        elif cache is None:  # long self-attention: tiles, sliding layers visit only their window
            o = attention.blockwise_causal(q, keys, values, sinks, positions_BT, self.window)
        else:  # a prefill chunk against a long cache
            o = attention.blockwise(q, keys, values, sinks, positions_BT, k_pos, self.window)
        rec = self.recording
        if rec is not None and (rec.sinks or rec.attention_window is not None):
            self._record(q, keys, sinks, positions_BT, k_pos, long_self=cache is None)
        # One [B*T, N*H] @ [N*H, D] matmul: as an einsum over (n, h), XLA's CPU backend may
        # transpose the whole weight to suit the attention output's layout, on every call.
        B, T, N, H = o.shape
        out = (o.reshape(B * T, N * H) @ self.wo_NHD[...].reshape(N * H, -1)).reshape(B, T, -1)
        return out + self.bo_D[...], cache


    def _record(self, q_BTNH: jax.Array, k_BSKH: jax.Array, sinks_N: jax.Array, positions_BT: jax.Array,
                k_pos_BS: jax.Array, long_self: bool) -> None:
        """Sow sink mass ``[B, T, N]`` and window weights ``[B, T, N, W]`` (tracing only).

        The naive path gets both from :func:`attention.weights`; the blockwise paths (long inputs)
        get the sink mass as ``1 - (attention mass on the keys)`` by attending to values of 1,
        which reuses their exact masking and never materialises ``T x S``.
        """
        rec = self.recording
        T, S = q_BTNH.shape[1], k_BSKH.shape[1]
        if T * S <= NAIVE_MAX:
            probs_BTNS, sink_BTN = attention.weights(q_BTNH, k_BSKH, sinks_N, positions_BT, k_pos_BS,
                                                     self.window)
            if rec.sinks:
                _sow(self, "sink_mass", sink_BTN)
            if rec.attention_window is not None:
                start, stop = rec.attention_window
                # Keys may sit in cache-slot order: pick them by stored position, not by index.
                onehot_BSW = (k_pos_BS[:, :, None] == jnp.arange(start, stop)).astype(f32)
                _sow(self, "attention_weights", jnp.einsum("btns,bsw->btnw", probs_BTNS, onehot_BSW))
            return
        if rec.attention_window is not None:
            raise ValueError(f"attention weights are recorded on the naive path only ({T} queries x {S} keys "
                             f"> NAIVE_MAX = {NAIVE_MAX}): trace fewer tokens per chunk")
        if rec.sinks:
            ones_BSKH = jnp.ones(k_BSKH.shape, f32)  # the blockwise kernels want values of the keys' shape
            if long_self:
                mass = attention.blockwise_causal(q_BTNH, k_BSKH, ones_BSKH, sinks_N, positions_BT, self.window)
            else:
                mass = attention.blockwise(q_BTNH, k_BSKH, ones_BSKH, sinks_N, positions_BT, k_pos_BS, self.window)
            _sow(self, "sink_mass", 1.0 - mass[..., 0])


def _next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (int(n) - 1).bit_length()


def swiglu(h: jax.Array, limit: float, alpha: float) -> jax.Array:
    """gpt-oss's clamped SwiGLU on interleaved ``[..., 2F]`` (gate = even, linear = odd) -> ``[..., F]``."""
    gate, lin = h[..., 0::2], h[..., 1::2]
    gate = jnp.minimum(gate, limit)
    lin = jnp.clip(lin, -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (lin + 1)


class Experts(nnx.Module):
    """E feed-forward experts. Weights are either dense parameters or MXFP4 packed bytes.

    Packed (the default for MXFP4 checkpoints), weights stay 4.25 bits per value in memory and
    are decoded on the fly, only for the experts a computation touches. Four ways of computing
    the same mixture (``dispatch``):

      * ``"gather"``: a loop over the N*k (token, expert) pairs: each step reads one chosen
        expert and applies it to one token (decode steps: few tokens, so few experts are read).
      * ``"sorted"``: the pairs sorted by expert into tiles of M rows of one expert each, and a
        loop over the tiles, each one ``[M, D] @ w[expert]``: a grouped matmul, about N*k rows
        of work and each used expert read about once (prefill, large batches, training).
      * ``"scan"``: a loop over all E experts, each applied to every token and weighted by that
        token's gate (zero when not chosen): E/k times the useful work, one expert in memory.
      * ``"dense"``: every expert on every token in one einsum (E/k times the useful work; simple).

    ``dispatch="auto"`` picks gather when tokens x k < E, else sorted. Gather and sorted index one
    expert per loop step with ``dynamic_slice`` rather than gathering ``[N, k, D, 2F]`` copies of
    the weights: on XLA's CPU backend a plain 2-D matmul on one expert is the fast kernel, and
    batched einsums over a gathered expert axis are several times slower (see benchmarks/). An
    expert larger than ``SLICE_BYTES`` is read a slice at a time (``_expert_matmul``).
    """

    def __init__(self, cfg: Config, *, packed: bool, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None):
        E, D, F = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.packed = packed
        if packed:
            # HF layout [E, out, in/32, 16]: rows are outputs, blocks run along the input.
            self.gate_up_blocks = Packed(jnp.zeros((E, 2 * F, D // 32, 16), jnp.uint8))
            self.gate_up_scales = Packed(jnp.full((E, 2 * F, D // 32), 127, jnp.uint8))
            self.down_blocks = Packed(jnp.zeros((E, D, F // 32, 16), jnp.uint8))
            self.down_scales = Packed(jnp.full((E, D, F // 32), 127, jnp.uint8))
        else:
            self.gate_up_EDF2 = _param((E, D, 2 * F), dtype, rngs)
            self.down_EFD = _param((E, F, D), dtype, rngs)
        self.gate_up_bias_EF2 = _param((E, 2 * F), dtype, rngs)
        self.down_bias_ED = _param((E, D), dtype, rngs)
        self.dtype = dtype
        self.limit, self.alpha = cfg.swiglu_limit, cfg.swiglu_alpha
        self.dispatch = "auto"
        # Static: set by oss_jax.sharding.shard; with a mesh, __call__ runs expert-parallel.
        self.mesh: jax.sharding.Mesh | None = None

    def weights(self, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Expert weights for integer indices ``idx [...]``: ``w1 [..., D, 2F]``, ``w2 [..., F, D]``.

        Only the indexed experts are read (and, when packed, decoded).
        """
        if self.packed:
            w1 = mxfp4.decode(self.gate_up_blocks[...][idx], self.gate_up_scales[...][idx], self.dtype)
            w2 = mxfp4.decode(self.down_blocks[...][idx], self.down_scales[...][idx], self.dtype)
            return jnp.swapaxes(w1, -1, -2), jnp.swapaxes(w2, -1, -2)
        return self.gate_up_EDF2[...][idx], self.down_EFD[...][idx]

    def ffn(self, e: jax.Array, x_MD: jax.Array) -> jax.Array:
        """Expert ``e`` (a traced scalar) on rows ``x [M, D]`` -> ``[M, D]`` float32, biases included."""
        if self.packed:  # decode just this expert, straight into the matmul
            w1 = self.gate_up_blocks[...], self.gate_up_scales[...]
            w2 = self.down_blocks[...], self.down_scales[...]
        else:
            w1, w2 = self.gate_up_EDF2[...], self.down_EFD[...]
        h = _expert_matmul(x_MD, w1, e, self.dtype) + _row(self.gate_up_bias_EF2[...], e)
        y = _expert_matmul(swiglu(h, self.limit, self.alpha), w2, e, self.dtype)
        return (y + _row(self.down_bias_ED[...], e)).astype(f32)

    def __call__(self, x_ND: jax.Array, idx_Nk: jax.Array, gates_Nk: jax.Array) -> jax.Array:
        """Mix the chosen experts: ``sum_k gates[n, k] * expert_{idx[n, k]}(x[n])`` -> ``[N, D]``."""
        if self.mesh is not None:
            from oss_jax import sharding  # deferred: sharding imports this module

            return sharding.experts_parallel(self, x_ND, idx_Nk, gates_Nk)
        return self.mix(x_ND, idx_Nk, gates_Nk).astype(x_ND.dtype)

    def mix(self, x_ND: jax.Array, idx_Nk: jax.Array, gates_Nk: jax.Array) -> jax.Array:
        """``__call__`` on this module's own experts, in float32 (expert-parallel devices sum these).

        An index outside ``[0, E)`` (another device's expert) contributes nothing.
        """
        N, k = idx_Nk.shape
        E = self.gate_up_bias_EF2.shape[0]
        mode = self.dispatch
        if mode == "auto":
            mode = "gather" if N * k < E else "sorted"
        if mode == "gather":
            return self._loop(x_ND, idx_Nk, gates_Nk, tile=1)
        if mode == "sorted":
            return self._loop(x_ND, idx_Nk, gates_Nk, tile=_sorted_tile(N * k, E))
        if mode == "scan":
            def step(acc_ND, e):
                coef_N = jnp.sum(jnp.where(idx_Nk == e, gates_Nk, 0.0), axis=-1)
                return acc_ND + coef_N[:, None] * self.ffn(e, x_ND), None

            out, _ = jax.lax.scan(step, jnp.zeros(x_ND.shape, f32), jnp.arange(E))
        elif mode == "dense":
            b1, b2 = self.gate_up_bias_EF2[...], self.down_bias_ED[...]
            w1, w2 = self.weights(jnp.arange(E))  # [E, D, 2F], [E, F, D]
            h = jnp.einsum("nd,edf->nef", x_ND, w1) + b1
            y = jnp.einsum("nef,efd->ned", swiglu(h, self.limit, self.alpha), w2) + b2
            coef_NE = jnp.einsum("nk,nke->ne", gates_Nk, jax.nn.one_hot(idx_Nk, E, dtype=f32))
            out = jnp.einsum("ned,ne->nd", y.astype(f32), coef_NE)
        else:
            raise ValueError(f"unknown expert dispatch {mode!r} (use 'auto', 'gather', 'scan', 'dense' "
                             f"or 'sorted')")
        return out

    def _loop(self, x_ND: jax.Array, idx_Nk: jax.Array, gates_Nk: jax.Array, tile: int) -> jax.Array:
        """Gather (``tile == 1``: the pairs in token order) or sorted (the pairs grouped by expert).

        The N*k (token, expert) rows are laid out so that each tile of ``tile`` consecutive rows
        belongs to one expert; a loop then runs ``ffn(expert, rows)`` once per tile and adds the
        gated results into the tokens' outputs. Sorted: each expert's rows start a new tile, so at
        most ``ceil(N*k / M) + E`` tiles (a static bound), rows past the expert's end have gate 0,
        and tiles past the last used one (or of another device's experts) are skipped by a
        ``lax.cond``. No token is ever dropped.
        """
        N, k = idx_Nk.shape
        D = x_ND.shape[-1]
        E = self.gate_up_bias_EF2.shape[0]
        P, M = N * k, tile
        flat = idx_Nk.reshape(-1)
        flat = jnp.where((flat >= 0) & (flat < E), flat, E).astype(jnp.int32)  # E: not ours, skipped
        if M == 1:  # gather: row t is pair t, itself a tile
            n_tiles, row_e = P, flat
            row_tok = jnp.arange(P, dtype=jnp.int32) // k
            row_gate = gates_Nk.reshape(-1).astype(f32)
            tile_e, tile_row = flat, jnp.arange(P, dtype=jnp.int32)
        else:
            order = jnp.argsort(flat, stable=True)
            row_e = flat[order]
            row_tok = (order // k).astype(jnp.int32)
            row_gate = gates_Nk.reshape(-1).astype(f32)[order]
            sizes = jnp.bincount(flat, length=E + 1)[:E]
            starts = jnp.cumsum(sizes) - sizes  # each expert's first row
            tiles = -(-sizes // M)
            ends = jnp.cumsum(tiles)  # exclusive end of each expert's tiles
            n_tiles = min(-(-P // M) + min(E, P), P)
            t = jnp.arange(n_tiles)
            tile_e = jnp.searchsorted(ends, t, side="right").astype(jnp.int32)  # E past the last tile
            e = jnp.minimum(tile_e, E - 1)
            tile_row = (starts[e] + (t - (ends[e] - tiles[e])) * M).astype(jnp.int32)
        # M rows of padding at the end: every tile's slice is in bounds; padding has gate 0.
        x_rows = jnp.concatenate([x_ND[row_tok], jnp.zeros((M, D), x_ND.dtype)])
        row_tok = jnp.concatenate([row_tok, jnp.full((M,), N, jnp.int32)])
        row_gate = jnp.concatenate([row_gate, jnp.zeros((M,), f32)])
        row_e = jnp.concatenate([row_e, jnp.full((M,), E, jnp.int32)])
        # Recompute each tile's expert in the backward pass rather than keep its weights per tile.
        ffn = jax.checkpoint(self.ffn)

        def body(t, acc_ND):
            e, r = tile_e[t], tile_row[t]

            def run(acc_ND):
                y_MD = ffn(e, jax.lax.dynamic_slice_in_dim(x_rows, r, M))
                mine = jax.lax.dynamic_slice_in_dim(row_e, r, M) == e  # rows past the expert's end: 0
                g_M = jnp.where(mine, jax.lax.dynamic_slice_in_dim(row_gate, r, M), 0.0)
                return acc_ND.at[jax.lax.dynamic_slice_in_dim(row_tok, r, M)].add(g_M[:, None] * y_MD)

            return jax.lax.cond(e < E, run, lambda a: a, acc_ND)

        out = jax.lax.fori_loop(0, n_tiles, body, jnp.zeros((N + 1, D), f32))  # row N: padding's sink
        return out[:N]


def _row(x: jax.Array, i: jax.Array) -> jax.Array:
    """``x[i]`` for a traced scalar index: one ``dynamic_slice`` (no gather, no copy of ``x``)."""
    return jax.lax.dynamic_index_in_dim(x, i, keepdims=False)


def _expert_matmul(x_MI: jax.Array, w, e: jax.Array, dtype) -> jax.Array:
    """``x @ w[e]`` for one expert ``e`` (a traced scalar) of a stacked weight -> ``[M, O]``.

    ``w`` is dense ``[E, I, O]``, or MXFP4 ``(blocks [E, O, I/32, 16], scales [E, O, I/32])``
    decoded to ``dtype``. XLA's CPU backend copies a ``dynamic_slice`` out before a matmul reads
    it. A whole large expert (66 MB in float32 at the 20b shape) copied from memory and read back
    costs about 4x the matmul itself, while a slice of ``SLICE_BYTES`` stays in cache. So a large
    expert is taken a slice at a time: rows of ``I``, summed (dense); rows of ``O``, concatenated
    (packed). Small experts are one slice, a single matmul.
    """
    M = x_MI.shape[0]
    if isinstance(w, tuple):
        blocks, scales = w
        _, O, nb, half = blocks.shape
        R = _slice_rows(O, nb * half * 4)  # float32 bytes per output row of one nibble plane
        if R == O:
            return mxfp4.matmul(x_MI, _row(blocks, e), _row(scales, e), dtype)

        def part(_, c):
            b = jax.lax.dynamic_slice(blocks, (e, c * R, 0, 0), (1, R, nb, half))[0]
            s = jax.lax.dynamic_slice(scales, (e, c * R, 0), (1, R, nb))[0]
            return None, mxfp4.matmul(x_MI, b, s, dtype)

        _, y_nMR = jax.lax.scan(part, None, jnp.arange(O // R))
        return jnp.moveaxis(y_nMR, 0, 1).reshape(M, O)
    _, I, O = w.shape
    R = _slice_rows(I, O * w.dtype.itemsize)
    if R == I:
        return x_MI @ _row(w, e)

    def add(c, acc_MO):
        w_RO = jax.lax.dynamic_slice(w, (e, c * R, 0), (1, R, O))[0]
        x_MR = jax.lax.dynamic_slice_in_dim(x_MI, c * R, R, axis=1)
        return acc_MO + jnp.matmul(x_MR, w_RO, preferred_element_type=f32)

    y = jax.lax.fori_loop(0, I // R, add, jnp.zeros((M, O), f32))
    return y.astype(jnp.result_type(x_MI, w))


def _slice_rows(rows: int, row_bytes: int) -> int:
    """Rows per slice of ``_expert_matmul``: the largest divisor of ``rows`` whose slice fits in
    ``SLICE_BYTES``; all of them when they fit, when that divisor is under a quarter of what fits
    (slices that small cost more in loop steps than they save), or off the CPU backend (where the
    copies this avoids were measured)."""
    fit = SLICE_BYTES // row_bytes
    if rows <= fit or jax.default_backend() != "cpu":
        return rows
    best = max(d for d in range(1, max(fit, 1) + 1) if rows % d == 0)
    return best if 4 * best >= fit else rows


def _sorted_tile(pairs: int, experts: int) -> int:
    """Rows per tile of the sorted dispatch: about one tile per expert, a power of two in
    ``[8, SORTED_TILE]`` (small tiles waste less on padding; large ones feed the matmul better)."""
    return int(min(SORTED_TILE, max(8, _next_pow2(-(-pairs // experts)))))


class MoE(nnx.Module):
    """Router + experts. Top-k of the router logits first, then a softmax over those k only."""

    def __init__(self, cfg: Config, *, packed: bool, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None):
        self.router_ED = _param((cfg.num_experts, cfg.hidden_size), dtype, rngs)
        self.router_bias_E = _param((cfg.num_experts,), dtype, rngs)
        self.experts = Experts(cfg, packed=packed, dtype=dtype, rngs=rngs)
        self.k = cfg.experts_per_token
        self.recording: Recording | None = None  # static: see Recording

    def route(self, x_BTD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Router logits ``[B, T, E]`` (float32), chosen experts ``[B, T, k]``, gates ``[B, T, k]``."""
        logits = jnp.einsum("btd,ed->bte", x_BTD.astype(f32), self.router_ED[...].astype(f32))
        logits = logits + self.router_bias_E[...].astype(f32)
        top, idx = jax.lax.top_k(logits, self.k)
        return logits, idx, jax.nn.softmax(top, axis=-1)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        B, T, D = x_BTD.shape
        logits, idx, gates = self.route(x_BTD)
        if self.recording is not None and self.recording.router:
            _sow(self, "router_logits", logits)
            _sow(self, "expert_ids", idx)
            _sow(self, "gates", gates)
        y = self.experts(x_BTD.reshape(B * T, D), idx.reshape(B * T, -1), gates.reshape(B * T, -1))
        return y.reshape(B, T, D)


class Block(nnx.Module):
    """``x + attn(norm1(x))`` then ``x + moe(norm2(x))``."""

    def __init__(self, cfg: Config, layer: int, *, packed: bool, dtype=jnp.bfloat16,
                 rngs: nnx.Rngs | None = None):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.attn = Attention(cfg, layer, dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MoE(cfg, packed=packed, dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array,
                 cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
        h, cache = self.attn(self.attn_norm(x_BTD), positions_BT, cache)
        x_BTD = x_BTD + h
        return x_BTD + self.mlp(self.mlp_norm(x_BTD)), cache


class GptOss(nnx.Module):
    """The model. ``model(tokens [B, T] int32) -> logits [B, T, V] float32``.

    Args:
      cfg: the configuration.
      packed: keep expert weights as MXFP4 bytes (needs hidden and intermediate sizes divisible
        by 32); otherwise dense parameters.
      dtype: parameter and activation dtype.
      rngs: random initialisation; ``None`` gives zeros (for loading, use ``oss_jax.load``).
    """

    def __init__(self, cfg: Config, *, packed: bool = False, dtype=jnp.bfloat16,
                 rngs: nnx.Rngs | None = None):
        self.config = cfg
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed_VD = _param((V, D), dtype, rngs)
        self.layers = nnx.List([Block(cfg, i, packed=packed, dtype=dtype, rngs=rngs)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(D, cfg.rms_norm_eps, dtype=dtype)
        self.unembed_VD = _param((V, D), dtype, rngs)
        self.recording: Recording | None = None  # static: see Recording
        # Static. Set for a model whose vocabulary is a subset of o200k_harmony (the bundled tiny
        # model): model(), generate, chat and trace then take and return o200k ids; apply and
        # forward, and the logits' last axis, use the model's own ids (see oss_jax.vocab).
        self.token_map: TokenMap | None = None

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None) -> jax.Array:
        """Logits ``[B, T, V]`` float32 for tokens ``[B, T]`` (o200k ids; see ``token_map``)."""
        tokens_BT = self._check_tokens(self.model_ids(tokens_BT))
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        elif np.shape(positions_BT) != (B, T):
            raise ValueError(f"positions must have the tokens' shape {(B, T)}, got {np.shape(positions_BT)}")
        elif not isinstance(positions_BT, jax.core.Tracer):
            last, context = int(np.max(positions_BT)), self.config.max_position_embeddings
            if last >= context:
                raise ValueError(f"position {last} is past the model's context of {context}")
        logits, _ = self.forward(tokens_BT, jnp.asarray(positions_BT, jnp.int32))
        return logits

    def forward(self, tokens_BT: jax.Array, positions_BT: jax.Array, cache: KVCache | None = None,
                last_only: bool = False) -> tuple[jax.Array, KVCache | None]:
        """``apply``, compiled. The parameters are only read: nothing is copied per call."""
        graphdef, state = nnx.split(self)
        return compiled_apply(graphdef, state, tokens_BT, positions_BT, cache, last_only=last_only)

    def apply(self, tokens_BT: jax.Array, positions_BT: jax.Array, cache: KVCache | None = None,
              last_only: bool = False) -> tuple[jax.Array, KVCache | None]:
        """The forward pass, without input checks (call it inside your own jit or loop).

        Args:
          tokens_BT: int32 ``[B, T]``.
          positions_BT: int32 ``[B, T]`` absolute positions; ``-1`` marks padding (never attended to).
          cache: a ``KVCache`` to read and extend (generation), or None.
          last_only: return logits for the last position only (``[B, 1, V]``), as a prefill needs.

        Returns:
          ``(logits [B, T, V] float32, updated cache or None)``.
        """
        x = self.embed_VD[...][tokens_BT]
        record = self.recording is not None and self.recording.residual
        if record:
            self.sow(nnx.Intermediate, "residual", x)  # a tuple: embeddings, then after each block
        new_layers = []
        for i, block in enumerate(self.layers):
            x, layer_cache = block(x, positions_BT, None if cache is None else cache.layers[i])
            new_layers.append(layer_cache)
            if record:
                self.sow(nnx.Intermediate, "residual", x)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        logits = jnp.einsum("btd,vd->btv", x, self.unembed_VD[...], preferred_element_type=f32)
        if cache is not None:
            length = jnp.maximum(cache.length, jnp.max(positions_BT, axis=1) + 1)
            cache = KVCache(layers=new_layers, length=length)
        return logits, cache

    def model_ids(self, tokens):
        """o200k ids -> this model's ids: the identity unless the model has a ``token_map``."""
        if self.token_map is None or isinstance(tokens, jax.core.Tracer):
            return tokens
        return self.token_map.to_model(tokens)

    def _check_tokens(self, tokens) -> jax.Array:
        """Reject what would otherwise fail silently: wrong rank or dtype, ids out of range."""
        cfg = self.config
        if not hasattr(tokens, "shape"):
            tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tuple(tokens.shape)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must be integers, got {tokens.dtype}")
        if tokens.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the model's context of "
                             f"{cfg.max_position_embeddings}")
        if not isinstance(tokens, jax.core.Tracer) and tokens.size:
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= cfg.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
        return jnp.asarray(tokens, jnp.int32)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("last_only",))
def compiled_apply(graphdef: nnx.GraphDef, state: nnx.State, tokens_BT: jax.Array, positions_BT: jax.Array,
                   cache: KVCache | None = None, last_only: bool = False) -> tuple[jax.Array, KVCache | None]:
    """``GptOss.apply`` as a pure compiled function of ``nnx.split(model)``.

    Plain ``jax.jit`` on the split state rather than ``nnx.jit`` on the module: ``nnx.jit`` hands
    every parameter back as a new output buffer (so it can propagate mutations), which copies
    the whole model on each call (12.8 GiB for gpt-oss-20b). Nothing here mutates the model.
    """
    return nnx.merge(graphdef, state).apply(tokens_BT, positions_BT, cache, last_only)

