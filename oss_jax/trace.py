"""Tracing: what every layer of a gpt-oss model did with some tokens, as numpy arrays.

    from oss_jax.trace import trace
    t = trace(model, tokens)                      # tokens [T] (or [B, T])
    t.expert_ids[5, :, 0]                         # first-choice expert of every token at layer 5
    t.sink_mass[:, -1].mean(-1)                   # sink share of the last query, per layer

The model's modules sow their intermediates (``nnx.Intermediate``) only while their static
``recording`` attribute is set (see ``oss_jax.model.Recording``). Tracing sets it on a *copy* of
the model's graph (same parameter arrays, nothing copied) and runs that copy under ``jax.jit``
with ``nnx.capture``; the model you pass is never modified, so its own compiled forward and
generation graphs stay the ones without any recording code.

Shapes (``L`` layers, ``T`` tokens, ``E`` experts, ``k`` experts per token, ``N`` query heads,
``D`` hidden size, ``W`` window of keys): tokens given as ``[T]`` give the shapes below; tokens
given as ``[B, T]`` insert a batch axis after the layer axis (``[L, B, T, E]``, ...).

Long inputs: :func:`trace` runs one forward pass without a cache, so its memory grows with T
(router logits ``L x T x E``, the residual ``(L + 1) x T x D``; attention itself is blockwise
beyond ``T * T > NAIVE_MAX``). :func:`trace_chunks` runs one long sequence through the KV cache
a chunk at a time and yields one :class:`Trace` per chunk; feed them to
``oss_jax.routing.RoutingStats`` for metrics over 100k tokens without keeping them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oss_jax import boundary
from oss_jax.cache import KVCache
from oss_jax.checks import int_arg, int_array, show
from oss_jax.config import SLIDING
from oss_jax.generate import padded_chunks
from oss_jax.model import NAIVE_MAX, GptOss, Recording

__all__ = ["NAIVE_MAX", "Trace", "trace", "trace_chunks"]


@dataclasses.dataclass
class Trace:
    """Per-layer records of one forward pass. Shapes for tokens ``[T]``; ``[B, T]`` adds ``B`` after ``L``.

    Attributes:
      tokens: int32 ``[T]``: the input tokens.
      positions: int32 ``[T]``: their positions (``-1`` marks padding, whose records are junk).
      router_logits: float32 ``[L, T, E]``: the full router logits ``x @ Wr.T + br``.
      expert_ids: int32 ``[L, T, k]``: the chosen experts, first choice first.
      gates: float32 ``[L, T, k]``: their mixing weights (softmax over the k chosen logits only).
      sink_mass: float32 ``[L, T, N]``: probability mass each head's sink takes, per query.
      attention: float32 ``[L, T, N, W]`` or None: attention probabilities on the keys at
        positions ``attention_keys`` (0 where a key is not visible); recorded only when asked.
      attention_keys: int ``[W]`` or None: the key positions of ``attention``'s last axis.
      residual: float32 ``[L + 1, T, D]``: the residual stream: the embeddings, then after each
        layer (``residual[L]`` is the final norm's input). For the logit lens.
      next_token_entropy: float32 ``[T]`` or None: entropy (nats) of the model's next-token distribution.
      predicted: int32 ``[T]`` or None: the model's most likely next token. Both None with
        ``next_token=False``: the output layer is then not computed at all.
      sliding: bool ``[L]``: which layers use the sliding window.
      num_experts: E.
      expert_norms: float32 ``[L, T, k]`` or None: ``||expert_e(x)||_2`` of each chosen expert's output
        before its gate (biases included), aligned with ``expert_ids``; recorded only when asked
        (``expert_outputs=True``). For saliency metrics (``oss_jax.saliency``).
      expert_max: float32 ``[L, T, k]`` or None: ``max |expert_e(x)|`` of the same outputs.

    A field is None when its recording was switched off.
    """

    tokens: np.ndarray
    positions: np.ndarray
    router_logits: np.ndarray | None
    expert_ids: np.ndarray | None
    gates: np.ndarray | None
    sink_mass: np.ndarray | None
    attention: np.ndarray | None
    attention_keys: np.ndarray | None
    residual: np.ndarray | None
    next_token_entropy: np.ndarray | None
    predicted: np.ndarray | None
    sliding: np.ndarray
    num_experts: int
    expert_norms: np.ndarray | None = None
    expert_max: np.ndarray | None = None

    @property
    def num_layers(self) -> int:
        return int(self.sliding.shape[0])

    @property
    def first_choice(self) -> np.ndarray:
        """int32 ``[L, T]``: each token's first-choice expert per layer."""
        return self.expert_ids[..., 0]

    @property
    def valid(self) -> np.ndarray:
        """bool ``[T]``: real tokens (position >= 0)."""
        return self.positions >= 0

    @classmethod
    def concatenate(cls, traces: Sequence[Trace]) -> Trace:
        """Join traces of consecutive pieces of one sequence (as :func:`trace_chunks` yields) along T."""
        first = traces[0]

        def cat(name: str, axis: int):
            parts = [getattr(t, name) for t in traces]
            return None if parts[0] is None else np.concatenate(parts, axis=axis)

        time_axis = first.tokens.ndim - 1  # 0 for [T], 1 for [B, T]
        return cls(tokens=cat("tokens", time_axis), positions=cat("positions", time_axis),
                   router_logits=cat("router_logits", time_axis + 1), expert_ids=cat("expert_ids", time_axis + 1),
                   gates=cat("gates", time_axis + 1), sink_mass=cat("sink_mass", time_axis + 1),
                   attention=cat("attention", time_axis + 1), attention_keys=first.attention_keys,
                   residual=cat("residual", time_axis + 1),
                   next_token_entropy=cat("next_token_entropy", time_axis), predicted=cat("predicted", time_axis),
                   sliding=first.sliding, num_experts=first.num_experts,
                   expert_norms=cat("expert_norms", time_axis + 1), expert_max=cat("expert_max", time_axis + 1))


def _split_for_recording(model: GptOss, recording: Recording) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph definition with ``recording`` set on every module that has it, and its state.

    The copy shares the parameter arrays (nothing is copied) and the model itself is untouched.
    """
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)
    for _, module in nnx.iter_modules(copy):
        if hasattr(module, "recording"):
            module.recording = recording
    return nnx.split(copy)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _traced_apply(graphdef: nnx.GraphDef, state: nnx.State, tokens_BT: jax.Array, positions_BT: jax.Array,
                  cache: KVCache | None, next_token: bool = True):
    """One recording forward pass: ``(records dict, next-token entropy [B, T], argmax [B, T], cache)``;
    without ``next_token`` the two are None, and the logits, unused, are never computed."""
    model = nnx.merge(graphdef, state)
    (logits, cache), inter = nnx.capture(GptOss.apply, nnx.Intermediate)(model, tokens_BT, positions_BT, cache)
    records = nnx.to_pure_dict(inter)
    if "residual" in records:  # tracing's contract is float32, whatever the activation dtype
        records["residual"] = [x.astype(jnp.float32) for x in records["residual"]]
    if not next_token:
        return records, None, None, cache
    logp = jax.nn.log_softmax(logits, axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return records, entropy, jnp.argmax(logits, axis=-1).astype(jnp.int32), cache


def _per_layer(records: dict, n_layers: int, module: str, name: str) -> np.ndarray | None:
    layers = records.get("layers", {})
    values = [layers.get(i, {}).get(module, {}).get(name) for i in range(n_layers)]
    if any(v is None for v in values):
        return None
    return np.stack([np.asarray(v) for v in values])


def _build(model: GptOss, records: dict, entropy, predicted, tokens_BT, positions_BT,
           recording: Recording, squeeze: bool, keep: slice = slice(None)) -> Trace:
    cfg = model.config
    L = cfg.num_hidden_layers

    def cut(x, time_axis):  # drop chunk padding (keep) and the batch axis for [T] inputs
        if x is None:
            return None
        x = np.asarray(x)
        index = [slice(None)] * x.ndim
        index[time_axis] = keep
        x = x[tuple(index)]
        return np.squeeze(x, axis=time_axis - 1) if squeeze else x

    residual = records.get("residual")
    window = recording.attention_window
    tokens_BT = boundary.to_user(model, tokens_BT)  # user ids
    predicted = None if predicted is None else boundary.to_user(model, predicted)
    return Trace(
        tokens=cut(tokens_BT, 1), positions=cut(positions_BT, 1),
        router_logits=cut(_per_layer(records, L, "mlp", "router_logits"), 2),
        expert_ids=cut(_per_layer(records, L, "mlp", "expert_ids"), 2),
        gates=cut(_per_layer(records, L, "mlp", "gates"), 2),
        sink_mass=cut(_per_layer(records, L, "attn", "sink_mass"), 2),
        attention=cut(_per_layer(records, L, "attn", "attention_weights"), 2),
        attention_keys=None if window is None else np.arange(*window),
        residual=None if residual is None else cut(np.stack([np.asarray(r) for r in residual]), 2),
        next_token_entropy=cut(entropy, 1), predicted=cut(predicted, 1),
        sliding=np.array([t == SLIDING for t in cfg.layer_types]), num_experts=cfg.num_experts,
        expert_norms=cut(_per_layer(records, L, "mlp", "expert_norms"), 2),
        expert_max=cut(_per_layer(records, L, "mlp", "expert_max"), 2))


def _recording(router: bool, sinks: bool, residual: bool, attention_window, keys: tuple[int, int],
               tokens: int, expert_outputs: bool = False) -> Recording:
    """The ``Recording``, its ``attention_window`` checked and clipped to ``keys``: the range of positions
    traced, ``(first, last + 1)``. Clipped, it may span at most ``tokens`` (the tokens per row)."""
    if attention_window is not None:
        try:
            start, stop = attention_window
        except (TypeError, ValueError):
            raise ValueError(f"attention_window must be a pair (start, stop) of key positions, "
                             f"got {show(attention_window)}") from None
        start, stop = int_arg("attention_window start", start, 0), int_arg("attention_window stop", stop, 0)
        if not start < stop:
            raise ValueError(f"attention_window must be (start, stop) key positions with 0 <= start < stop, "
                             f"got {attention_window}")
        first, end = keys
        if start >= end:
            raise ValueError(f"attention_window {attention_window} starts past the last traced position {end - 1}")
        if stop <= first:
            raise ValueError(f"attention_window {attention_window} ends before the first traced position {first}")
        start, stop = max(start, first), min(stop, end)  # no key exists outside: keep the record that small
        if stop - start > tokens:
            raise ValueError(f"attention_window {attention_window} spans {stop - start} traced positions, more than "
                             f"the {tokens} tokens per row (positions with gaps): narrow it")
        attention_window = (start, stop)
    return Recording(router=router, sinks=sinks, residual=residual, attention_window=attention_window,
                     expert_outputs=bool(expert_outputs))


def trace(model: GptOss, tokens, *, positions=None, router: bool = True, sinks: bool = True,
          residual: bool = True, attention_window: tuple[int, int] | None = None,
          expert_outputs: bool = False, next_token: bool = True) -> Trace:
    """Run the model on ``tokens`` and record every layer (one pass, no KV cache).

    Args:
      model: a ``GptOss`` (never modified).
      tokens: int ``[T]`` (arrays without batch axis) or ``[B, T]`` (batch axis after the layer axis).
      positions: int, the tokens' shape; default ``0 .. T-1``. ``-1`` marks padding.
      router, sinks, residual: what to record (see :class:`Trace`); off saves memory and time.
      attention_window: ``(start, stop)``: also record attention probabilities on the keys at
        positions ``start .. stop - 1`` (``Trace.attention [L, T, N, stop - start]``). Available
        on the naive attention path only, i.e. for ``T * T <= NAIVE_MAX`` (T up to 1024). The
        window is clipped to the positions traced (no key exists outside them; ``Trace.attention_keys``
        says which positions were recorded), so it is at most ``T`` wide for the default positions;
        a window outside them, or still wider than ``T`` once clipped (gapped positions), is refused.
      expert_outputs: also record ``Trace.expert_norms`` and ``Trace.expert_max`` (each layer then
        runs its chosen experts once more, one choice at a time: about twice the experts' work).
      next_token: record ``Trace.next_token_entropy`` and ``Trace.predicted``. Off, the output layer is
        skipped: with o200k's 201,088 rows it is most of a small model's work (routing studies need only
        the layers).

    Returns:
      A :class:`Trace` of numpy arrays.

    Tokens and positions get the checks of ``model()`` (``oss_jax.boundary``): a bad input raises
    one ``ValueError``/``TypeError``. Each distinct (shape, recording options) compiles once; later
    calls reuse it.
    """
    given = int_array(tokens, "tokens")
    if given.ndim not in (1, 2):
        raise ValueError(f"tokens must be [T] or [batch, time], got shape {tuple(given.shape)}")
    squeeze = given.ndim == 1
    tokens_BT = jnp.asarray(boundary.model_tokens(model, given[None] if squeeze else given), jnp.int32)
    if positions is None:
        positions_BT = boundary.positions(model, None, tokens_BT.shape)
    else:
        positions_BT = boundary.positions(model, positions, given.shape).reshape(tokens_BT.shape)
    pos = np.asarray(positions_BT)
    if not (pos >= 0).any():
        raise ValueError("positions are all -1 (padding): there is no token to trace")
    keys = (int(pos[pos >= 0].min()), int(pos.max()) + 1)
    recording = _recording(router, sinks, residual, attention_window, keys, tokens=pos.shape[1],
                           expert_outputs=expert_outputs)
    graphdef, state = _split_for_recording(model, recording)
    records, entropy, predicted, _ = _traced_apply(graphdef, state, tokens_BT, positions_BT, None, bool(next_token))
    return _build(model, records, entropy, predicted, tokens_BT, positions_BT, recording, squeeze)


def trace_chunks(model: GptOss, tokens, *, chunk: int = 256, router: bool = True, sinks: bool = True,
                 residual: bool = False, attention_window: tuple[int, int] | None = None,
                 cache_dtype=None, expert_outputs: bool = False, next_token: bool = True) -> Iterator[Trace]:
    """Trace one long sequence ``[T]`` a chunk at a time through the KV cache; yields a Trace per chunk.

    Every chunk sees all earlier tokens (as generation's chunked prefill does), so the records
    equal those of :func:`trace` on the whole sequence. Each yielded Trace covers ``chunk`` tokens
    (the last one fewer) with absolute ``positions``. Memory: the KV cache of T tokens plus one
    chunk's records. ``residual`` is off by default (``(L + 1) x chunk x D`` floats per chunk).
    ``attention_window`` needs ``chunk * cache length <= NAIVE_MAX`` on full-attention layers; its
    ``stop`` is clipped to ``T``. ``expert_outputs``, ``next_token``: as in :func:`trace`. The arguments are
    checked when this is called, not at the first chunk.
    """
    given = int_array(tokens, "tokens")
    if given.ndim != 1:
        raise ValueError(f"trace_chunks takes one sequence [T], got shape {tuple(given.shape)}")
    tokens_BT = jnp.asarray(boundary.model_tokens(model, given[None]), jnp.int32)
    chunk = int_arg("chunk", chunk, 1)
    T = tokens_BT.shape[1]
    recording = _recording(router, sinks, residual, attention_window, (0, T), tokens=T,
                           expert_outputs=expert_outputs)
    return _chunks(model, tokens_BT, chunk, recording, cache_dtype, bool(next_token))


def _chunks(model: GptOss, tokens_BT: jax.Array, chunk: int, recording: Recording, cache_dtype,
            next_token: bool = True) -> Iterator[Trace]:
    """``trace_chunks``'s loop, on checked arguments."""
    T = tokens_BT.shape[1]
    graphdef, state = _split_for_recording(model, recording)
    C = min(chunk, T)
    cache = KVCache.create(model.config, 1, T, cache_dtype or model.embed_VD[...].dtype)
    positions_BT = jnp.arange(T, dtype=jnp.int32)[None]
    for piece, pos, n in padded_chunks(tokens_BT, positions_BT, C):  # as generate's prefill: one compiled shape
        records, entropy, predicted, cache = _traced_apply(graphdef, state, piece, pos, cache, next_token)
        yield _build(model, records, entropy, predicted, piece, pos, recording, squeeze=True, keep=slice(0, n))
