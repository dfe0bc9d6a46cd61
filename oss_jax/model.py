"""gpt-oss in Flax NNX: the block and the model of SPEC.md §2.

The layers are in their own files, each read top to bottom like the spec: ``norm.py`` (RMSNorm),
``rope.py`` (YaRN RoPE), ``attention.py`` (grouped-query attention with sinks), ``moe.py`` (router
and experts), ``mxfp4.py`` (the 4-bit expert weights). Fast equivalents of the attention, the
expert dispatch and MXFP4 decoding are in ``oss_jax/kernels/`` (see ``GptOss``: ``impl``).

Shape letters: an array's name ends in the letters of its axes (``wq_DNH`` is ``[D, N, H]``):

  B batch                       T query positions             S key positions
  D hidden size                 N query heads                 K key/value heads
  G = N/K query heads per KV    H head dim                    V vocabulary
  E experts                     k experts per token           F expert hidden units
  F2 = 2F gate and linear units, interleaved                  h = H/2 RoPE frequencies
  L layers                      W keys of a traced attention window
  X tokens of a batch, flattened (B*T), as the experts see them
  P (token, expert) pairs (X*k)                  R rows of one tile of the expert loops
  C rows of one weight slice                     I, O input and output width of one matmul
  Q query rows of one KV head (G*T, or G*U)      A a stack of blocks that a loop walks
  U queries of one attention block               J keys of one attention block

Precision policy: parameters in ``dtype`` (bf16 by default); RMSNorm, RoPE, attention softmax,
the router and the expert mixing weights in float32; logits returned in float32.

Tracing: ``GptOss``, ``Attention`` and ``MoE`` carry a static attribute ``recording`` (``None``:
off). While it holds a :class:`Recording`, they ``sow`` router outputs, expert output magnitudes,
attention-sink mass, attention weights and the residual stream as ``nnx.Intermediate`` values (read back with
``nnx.capture``; ``oss_jax.trace`` does all of it). With ``None`` no recording code is traced.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from oss_jax import boundary
from oss_jax.attention import Attention
from oss_jax.cache import KVCache, LayerCache
from oss_jax.checks import is_traced
from oss_jax.config import Config
from oss_jax.kernels import logits as kernels_logits
from oss_jax.kernels.attention import NAIVE_MAX
from oss_jax.kernels.experts import SLICE_BYTES, SORTED_TILE
from oss_jax.layers import Packed, Recording, check_impl, f32, param
from oss_jax.moe import Experts, MoE, swiglu
from oss_jax.norm import RMSNorm
from oss_jax.vocab import TokenMap

# Re-exported for older imports (``from oss_jax.model import MoE, swiglu``, ``model.NAIVE_MAX``);
# the constants are read where they are defined, in oss_jax.kernels.
__all__ = ["NAIVE_MAX", "SLICE_BYTES", "SORTED_TILE", "Attention", "Block", "Experts", "GptOss", "MoE", "Packed",
           "RMSNorm", "Recording", "compiled_apply", "f32", "swiglu"]


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

    Two ways in, and one compiled function:

    - ``model(tokens, positions=None)``: the contract. Checks and maps user ids
      (``oss_jax.boundary``), then runs ``compiled_apply``.
    - ``model.apply(tokens, positions, cache=None, last_only=False)``: the forward pass itself, in
      model ids, unchecked; for use inside your own ``jax.jit`` or loop.
    - ``compiled_apply(graphdef, state, tokens, positions, cache=None, last_only=False)``: ``apply``
      compiled, as a function of ``nnx.split(model)`` (``generate``'s prefill calls it).

    Reference or fast: ``Attention``, ``Experts`` and the model itself (its unembedding) carry a static
    attribute ``impl``, ``"fast"`` by default (``oss_jax.kernels``) or ``"reference"`` (the plain math of
    ``attention.py``, ``moe.py`` and the unembedding's einsum, which the kernels are tested equal to). One
    call sets it for the whole model::

        model.set_attributes(impl="reference")   # and back: model.set_attributes(impl="fast")

    ``Experts.dispatch`` chooses among the fast expert loops (``kernels.experts``). Static means
    part of the graph: each setting compiles its own program.

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
        self.embed_VD = param((V, D), dtype, rngs)
        self.layers = nnx.List([Block(cfg, i, packed=packed, dtype=dtype, rngs=rngs)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(D, cfg.rms_norm_eps, dtype=dtype)
        self.unembed_VD = param((V, D), dtype, rngs)
        self.impl = "fast"  # static: the unembedding's reference einsum or kernels.logits.unembed
        self.recording: Recording | None = None  # static: see Recording
        # Static. Set (by oss_jax.load) for a model whose vocabulary is a subset of o200k_harmony (the
        # bundled tiny model): model(), generate, chat and trace then take and return o200k ids (they
        # map through oss_jax.boundary); apply, compiled_apply and the logits' last axis use the
        # model's own ids (see oss_jax.vocab).
        self.token_map: TokenMap | None = None

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None) -> jax.Array:
        """Logits ``[B, T, V]`` float32 for tokens ``[B, T]`` in user ids: the checked, compiled call.

        ``oss_jax.boundary`` checks tokens and positions (a bad input raises one ``ValueError`` or
        ``TypeError``) and maps user ids to model ids (``token_map``); then ``compiled_apply`` runs
        ``apply``. The logits' last axis counts model ids. Warns (``RuntimeWarning``) when the logits
        are not all finite (not inside ``jax.jit``, where values are not known).
        """
        tokens_BT = boundary.model_tokens(self, tokens_BT)
        positions_BT = boundary.positions(self, positions_BT, tokens_BT.shape)
        logits, _ = compiled_apply(*nnx.split(self), jnp.asarray(tokens_BT, jnp.int32), positions_BT)
        if not is_traced(logits) and not bool(jnp.all(jnp.isfinite(logits))):
            warnings.warn("model(): the logits hold NaN or infinity (damaged weights, or an activation overflow "
                          "in this dtype?)", RuntimeWarning, stacklevel=2)
        return logits

    def apply(self, tokens_BT: jax.Array, positions_BT: jax.Array, cache: KVCache | None = None,
              last_only: bool = False) -> tuple[jax.Array, KVCache | None]:
        """The forward pass itself: the math, in model ids, with no checks and no compilation.

        For use inside your own ``jax.jit`` or loop (``generate``'s decode loop calls it); compiled
        on its own it is ``compiled_apply``. Users call ``model(tokens)``, which checks and maps first.

        Args:
          tokens_BT: int32 ``[B, T]``.
          positions_BT: int32 ``[B, T]`` absolute positions; ``-1`` marks padding (never attended to).
          cache: a ``KVCache`` to read and extend (generation), or None.
          last_only: return logits for the last position only (``[B, 1, V]``), as a prefill needs: in each
            row the column with the largest position, so a right-padded chunk gives its last real token.

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
        if last_only:  # the last real column of each row (padding, at position -1, comes after it)
            last_B = jnp.argmax(positions_BT, axis=1)
            x = jnp.take_along_axis(x, last_B[:, None, None], axis=1)
        x = self.norm(x)
        if check_impl(self.impl) == "reference":
            logits = jnp.einsum("btd,vd->btv", x, self.unembed_VD[...], preferred_element_type=f32)
        else:  # the same, a slice of the vocabulary at a time (kernels.logits: bounded memory)
            logits = kernels_logits.unembed(x, self.unembed_VD[...])
        if cache is not None:
            length = jnp.maximum(cache.length, jnp.max(positions_BT, axis=1) + 1)
            cache = KVCache(layers=new_layers, length=length)
        return logits, cache

    def model_ids(self, tokens):
        """User ids (any shape) -> this model's ids, checked: ``oss_jax.boundary.to_model``."""
        return boundary.to_model(self, tokens)

    def forward(self, tokens_BT: jax.Array, positions_BT: jax.Array, cache: KVCache | None = None,
                last_only: bool = False) -> tuple[jax.Array, KVCache | None]:
        """Deprecated: use ``model(...)`` or ``compiled_apply(*nnx.split(model), ...)`` (this is the latter)."""
        warnings.warn("GptOss.forward is deprecated: use model(tokens) (checked) or "
                      "compiled_apply(*nnx.split(model), tokens, positions, cache)", DeprecationWarning, stacklevel=2)
        return compiled_apply(*nnx.split(self), tokens_BT, positions_BT, cache, last_only=last_only)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("last_only",))
def compiled_apply(graphdef: nnx.GraphDef, state: nnx.State, tokens_BT: jax.Array, positions_BT: jax.Array,
                   cache: KVCache | None = None, last_only: bool = False) -> tuple[jax.Array, KVCache | None]:
    """``GptOss.apply`` as a pure compiled function of ``nnx.split(model)``.

    Plain ``jax.jit`` on the split state rather than ``nnx.jit`` on the module: ``nnx.jit`` hands
    every parameter back as a new output buffer (so it can propagate mutations), which copies
    the whole model on each call (12.8 GiB for gpt-oss-20b). Nothing here mutates the model.
    """
    return nnx.merge(graphdef, state).apply(tokens_BT, positions_BT, cache, last_only)

