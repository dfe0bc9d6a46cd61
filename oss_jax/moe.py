"""The mixture of experts of gpt-oss (SPEC.md §2).

A router scores the E experts for each token (``x @ Wr.T + br``), keeps the k best and takes a
softmax over those k only: the gates. Each expert is a feed-forward network with a clamped SwiGLU
whose gate and linear halves are interleaved. The layer's output is ``sum_k gate_k * expert_k(x)``.

Read top to bottom: :func:`swiglu`, :class:`Experts` (the weights, and :meth:`Experts.reference`:
the mixture as plain math), :class:`MoE` (the router, then the experts).

By default (``impl="fast"``) ``Experts`` computes the same mixture with ``oss_jax.kernels.experts``,
which applies only the chosen experts, one at a time (or, on a GPU, to all their tokens at once as
grouped matmuls: :meth:`Experts.grouped`); ``impl="reference"`` uses ``reference``.

Shape letters: the legend in ``oss_jax/model.py`` (X: the tokens of a batch, flattened).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from oss_jax import mxfp4
from oss_jax.config import Config
from oss_jax.kernels import experts as fast
from oss_jax.kernels import mxfp4 as fast_mxfp4
from oss_jax.kernels import native as native_cpu
from oss_jax.layers import Packed, Recording, check_impl, f32, param, sow


def swiglu(h: jax.Array, limit: float, alpha: float) -> jax.Array:
    """gpt-oss's clamped SwiGLU on interleaved ``[..., 2F]`` (gate = even, linear = odd) -> ``[..., F]``."""
    gate, lin = h[..., 0::2], h[..., 1::2]
    gate = jnp.minimum(gate, limit)
    lin = jnp.clip(lin, -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (lin + 1)


class Experts(nnx.Module):
    """E feed-forward experts: ``h = x @ W1[e] + b1[e]``, ``y = swiglu(h) @ W2[e] + b2[e]``.

    Weights are dense parameters, or MXFP4 packed bytes (the default for MXFP4 checkpoints), which
    stay 4.25 bits per value in memory and are decoded when used.

    Static attributes:
      impl: ``"fast"`` (default): ``kernels.experts``; ``"reference"``: :meth:`reference`.
      dispatch: which fast loop: ``"auto"``, ``"gather"``, ``"sorted"``, ``"ragged"`` (:meth:`grouped`)
        or ``"scan"`` (see ``kernels.experts``), or ``"dense"``: :meth:`reference` (every expert on every token).
      native: packed weights on the CPU through the native MXFP4 kernel (``oss_jax.kernels.native``):
        ``"auto"`` (default: when it is built), ``True`` or ``False`` (XLA decodes them).
      mesh: set by ``oss_jax.sharding.shard``: the mixture then runs expert-parallel.

    ``lora``: None, or per-expert low-rank adapters (``oss_jax.lora.ExpertsLora``, set by ``lora.add``)
    whose updates :meth:`reference` and :meth:`ffn` add to ``h`` and ``y``; the weights stay as they are.
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
            self.gate_up_EDF2 = param((E, D, 2 * F), dtype, rngs)
            self.down_EFD = param((E, F, D), dtype, rngs)
        self.gate_up_bias_EF2 = param((E, 2 * F), dtype, rngs)
        self.down_bias_ED = param((E, D), dtype, rngs)
        self.dtype = dtype
        self.limit, self.alpha = cfg.swiglu_limit, cfg.swiglu_alpha
        self.impl = "fast"
        self.dispatch = "auto"
        self.native = "auto"
        self.mesh: jax.sharding.Mesh | None = None
        self.lora = nnx.data(None)  # None: no adapters, nothing traced (see oss_jax.lora)

    def weights(self, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Expert weights for integer indices ``idx [...]``: ``w1 [..., D, 2F]``, ``w2 [..., F, D]``.

        Only the indexed experts are read (and, when packed, decoded: by ``mxfp4.decode`` under
        ``impl="reference"``, else by ``kernels.mxfp4.decode``, which gives the same bits).
        """
        if self.packed:
            decode = mxfp4.decode if check_impl(self.impl) == "reference" else fast_mxfp4.decode
            w1 = decode(self.gate_up_blocks[...][idx], self.gate_up_scales[...][idx], self.dtype)
            w2 = decode(self.down_blocks[...][idx], self.down_scales[...][idx], self.dtype)
            return jnp.swapaxes(w1, -1, -2), jnp.swapaxes(w2, -1, -2)
        return self.gate_up_EDF2[...][idx], self.down_EFD[...][idx]

    def reference(self, x_XD: jax.Array, idx_Xk: jax.Array, gates_Xk: jax.Array) -> jax.Array:
        """``sum_k gates[x, k] * expert_{idx[x, k]}(x)`` -> ``[X, D]`` float32, as plain math: every
        expert on every token, then each token keeps the experts it chose, weighted by their gates.
        An index outside ``[0, E)`` (another device's expert) contributes nothing."""
        E = self.gate_up_bias_EF2.shape[0]
        w1_EDF2, w2_EFD = self.weights(jnp.arange(E))
        h_XEF2 = jnp.einsum("xd,edf->xef", x_XD, w1_EDF2) + self.gate_up_bias_EF2[...]
        if self.lora is not None:
            h_XEF2 = h_XEF2 + self.lora.gate_up(x_XD)
        s_XEF = swiglu(h_XEF2, self.limit, self.alpha)
        y_XED = jnp.einsum("xef,efd->xed", s_XEF, w2_EFD) + self.down_bias_ED[...]
        if self.lora is not None:
            y_XED = y_XED + self.lora.down(s_XEF)
        gates_XE = jnp.einsum("xk,xke->xe", gates_Xk, jax.nn.one_hot(idx_Xk, E, dtype=f32))  # 0: not chosen
        return jnp.einsum("xed,xe->xd", y_XED.astype(f32), gates_XE)

    def __call__(self, x_XD: jax.Array, idx_Xk: jax.Array, gates_Xk: jax.Array) -> jax.Array:
        """Mix the chosen experts of tokens ``x [X, D]``: ``[X, D]`` in ``x``'s dtype."""
        if self.mesh is not None:
            return fast.experts_parallel(self, x_XD, idx_Xk, gates_Xk)
        return self.mix(x_XD, idx_Xk, gates_Xk).astype(x_XD.dtype)

    def mix(self, x_XD: jax.Array, idx_Xk: jax.Array, gates_Xk: jax.Array) -> jax.Array:
        """``__call__`` on this module's own experts, in float32 (expert-parallel devices sum these)."""
        if check_impl(self.impl) == "reference" or self.dispatch == "dense":
            return self.reference(x_XD, idx_Xk, gates_Xk)
        return fast.mix(self.ffn, self.gate_up_bias_EF2.shape[0], x_XD, idx_Xk, gates_Xk, self.dispatch,
                        grouped=self.grouped, native_grouped=self.native_grouped())

    def native_grouped(self) -> bool:
        """Whether :meth:`grouped` multiplies on the native CPU kernel (``kernels.native.grouped_matmul``):
        packed experts, ``native`` allowing it, one device (XLA cannot split a custom call across devices)."""
        return self.packed and native_cpu.enabled(self.native) and jax.device_count() == 1

    def ffn(self, e: jax.Array, x_RD: jax.Array) -> jax.Array:
        """Expert ``e`` (a traced scalar) on rows ``x [R, D]`` -> ``[R, D]`` float32: the step of the
        fast loops, reading (and decoding) only expert ``e``."""
        if self.packed:
            w1 = self.gate_up_blocks[...], self.gate_up_scales[...]
            w2 = self.down_blocks[...], self.down_scales[...]
        else:
            w1, w2 = self.gate_up_EDF2[...], self.down_EFD[...]
        h = fast.expert_matmul(x_RD, w1, e, self.dtype, self.native) + fast.row(self.gate_up_bias_EF2[...], e)
        if self.lora is not None:
            h = h + self.lora.gate_up(x_RD, e)
        s = swiglu(h, self.limit, self.alpha)
        y = fast.expert_matmul(s, w2, e, self.dtype, self.native)
        if self.lora is not None:
            y = y + self.lora.down(s, e)
        return (y + fast.row(self.down_bias_ED[...], e)).astype(f32)

    def grouped(self, x_PD: jax.Array, e_P: jax.Array, sizes_E: jax.Array) -> jax.Array:
        """:meth:`ffn` on every expert at once: rows ``x [P, D]`` sorted by expert, ``sizes[e]`` rows of
        expert ``e`` (``e [P]``: each row's expert, for the biases), rows past ``sum(sizes)`` in no group
        (their outputs are meaningless) -> ``[P, D]`` float32. The step of the ``"ragged"`` dispatch.

        Each projection is one ``jax.lax.ragged_dot`` over the stacked ``[E, in, out]`` weights (adapters
        too: ``ExpertsLora`` with ``sizes``). Packed weights are decoded whole to ``dtype`` first
        (``kernels.mxfp4.decode``, the same bits as :meth:`ffn`'s): a transient copy of every expert. On the
        CPU (:meth:`native_grouped`) the native kernel multiplies by the packed bytes instead, in float32.
        """
        if self.native_grouped():
            def product(x, w):  # float32 sums of the packed bytes, rounded to the dtype as ffn's products are
                return native_cpu.grouped_matmul(x, *w, sizes_E).astype(jnp.result_type(x, self.dtype))

            w1 = self.gate_up_blocks[...], self.gate_up_scales[...]
            w2 = self.down_blocks[...], self.down_scales[...]
        else:
            def product(x, w):
                dt = jnp.result_type(x, w)
                return jax.lax.ragged_dot(x.astype(dt), w.astype(dt), sizes_E)

            if self.packed:
                decode = fast_mxfp4.decode
                w1 = jnp.swapaxes(decode(self.gate_up_blocks[...], self.gate_up_scales[...], self.dtype), -1, -2)
                w2 = jnp.swapaxes(decode(self.down_blocks[...], self.down_scales[...], self.dtype), -1, -2)
            else:
                w1, w2 = self.gate_up_EDF2[...], self.down_EFD[...]
        h = product(x_PD, w1) + self.gate_up_bias_EF2[...][e_P]
        if self.lora is not None:
            h = h + self.lora.gate_up(x_PD, sizes=sizes_E)
        s = swiglu(h, self.limit, self.alpha)
        y = product(s, w2)
        if self.lora is not None:
            y = y + self.lora.down(s, sizes=sizes_E)
        return (y + self.down_bias_ED[...][e_P]).astype(f32)

class MoE(nnx.Module):
    """Router + experts. Top-k of the router logits first, then a softmax over those k only."""

    def __init__(self, cfg: Config, *, packed: bool, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None):
        self.router_ED = param((cfg.num_experts, cfg.hidden_size), dtype, rngs)
        self.router_bias_E = param((cfg.num_experts,), dtype, rngs)
        self.experts = Experts(cfg, packed=packed, dtype=dtype, rngs=rngs)
        self.k = cfg.experts_per_token
        self.recording: Recording | None = None  # static: see layers.Recording
        self.lora = nnx.data(None)  # None, or the router's adapter (oss_jax.lora.RouterLora)

    def route(self, x_BTD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Router logits ``[B, T, E]`` (float32), chosen experts ``[B, T, k]`` (best first), gates ``[B, T, k]``."""
        logits = jnp.einsum("btd,ed->bte", x_BTD.astype(f32), self.router_ED[...].astype(f32))
        logits = logits + self.router_bias_E[...].astype(f32)
        if self.lora is not None:
            logits = logits + self.lora(x_BTD)
        top, idx = jax.lax.top_k(logits, self.k)
        return logits, idx, jax.nn.softmax(top, axis=-1)

    def expert_magnitudes(self, x_XD: jax.Array, idx_Xk: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``||expert_e(x)||_2`` and ``max |expert_e(x)|`` (float32 ``[X, k]``) for each token's chosen experts.

        The expert outputs before the gate, biases included. Choice ``j`` of every token is run as a
        mixture of one expert with gate 1 (``idx[:, j]``, through the same dispatch as the layer itself,
        so only the chosen experts are read): k such passes cost about the layer's own expert work again.
        Traced only while recording asks for it.
        """
        ones_X1 = jnp.ones((x_XD.shape[0], 1), f32)
        norms, peaks = [], []
        for j in range(idx_Xk.shape[1]):
            choice_X1 = idx_Xk[:, j:j + 1]
            if self.experts.mesh is None:
                y_XD = self.experts.mix(x_XD, choice_X1, ones_X1)
            else:
                y_XD = self.experts(x_XD, choice_X1, ones_X1).astype(f32)
            norms.append(jnp.sqrt(jnp.sum(y_XD * y_XD, axis=-1)))
            peaks.append(jnp.max(jnp.abs(y_XD), axis=-1))
        return jnp.stack(norms, axis=-1), jnp.stack(peaks, axis=-1)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        B, T, D = x_BTD.shape
        logits, idx, gates = self.route(x_BTD)
        if self.recording is not None and self.recording.router:
            sow(self, "router_logits", logits)
            sow(self, "expert_ids", idx)
            sow(self, "gates", gates)
        if self.recording is not None and self.recording.expert_outputs:
            norms, peaks = self.expert_magnitudes(x_BTD.reshape(B * T, D), idx.reshape(B * T, -1))
            sow(self, "expert_norms", norms.reshape(B, T, -1))
            sow(self, "expert_max", peaks.reshape(B, T, -1))
        y = self.experts(x_BTD.reshape(B * T, D), idx.reshape(B * T, -1), gates.reshape(B * T, -1))
        return y.reshape(B, T, D)
