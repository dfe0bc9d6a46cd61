"""Generation: prefill the prompts into a KV cache, then decode one token at a time.

``generate`` reads as the algorithm, one named step each:

1. ``_prepare``: every argument checked, prompts mapped to model ids (``oss_jax.boundary``) and
   left-padded (padding gets position ``-1`` and is never attended to, so every row sees exactly
   its own tokens at positions ``0, 1, ...``), the shapes to compile for rounded up (a ``Plan``).
2. ``prefill``: the prompts into the cache in chunks of one compiled shape (``padded_chunks``,
   which ``trace.trace_chunks`` shares); returns the logits at the last position.
3. ``decode``: without a streaming callback the whole token loop runs on the device
   (``lax.while_loop``, one dispatch), compiled on a second thread during the prefill
   (``_compile_ahead``); with one, a compiled step per token, and the callback gets each new token.
   Greedy decoding (``temperature=0``) compiles no sampler.
4. The new tokens mapped back to user ids.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oss_jax import boundary, checks, sharding
from oss_jax.cache import KVCache
from oss_jax.checks import INT32_MAX, int_arg, real_arg, show
from oss_jax.config import Config
from oss_jax.model import GptOss, compiled_apply

PAD = -1  # fills the output after a row stops; never a real token id
CACHE_ROUND = 256  # KV cache lengths are rounded up to a multiple of this (fewer compiled shapes)


def generate(model: GptOss, tokens: np.ndarray | Sequence[Sequence[int]], max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), key: jax.Array | int | None = None,
             on_token: Callable[[np.ndarray], None] | None = None, prefill_chunk: int = 512,
             cache_dtype=None, return_cache: bool = False):
    """Continue prompts by up to ``max_new_tokens`` tokens.

    Args:
      model: a ``GptOss``.
      tokens: int ``[B, T]``, or a list of prompts of different lengths (left-padded here).
      temperature, top_k, top_p: sampling (see ``sample``); ``temperature=0`` is greedy.
      stop_tokens: a row stops after emitting one of these (it is kept); the rest is ``PAD`` (-1).
      key: PRNG key or int seed in ``[0, 2**32)`` for sampling (same key, same output); default 0.
      on_token: streaming callback, called with the new tokens ``[B]`` after each step.
      prefill_chunk: prompt tokens per prefill step (bounds activation memory).
      cache_dtype: KV cache dtype (default: the model's parameter dtype).
      return_cache: also return the final ``KVCache``.

    Returns:
      New tokens, int32 numpy ``[B, max_new_tokens]`` (and the cache when asked).

    Every argument is checked before any work (one ``ValueError``/``TypeError`` naming it): prompts
    as ``model()`` checks tokens (``boundary.check_tokens``: integer ids in the vocabulary, none
    negative, none empty), ``max_new_tokens`` and ``prefill_chunk`` positive integers, sampling as
    ``check_sampling``, ``key`` as ``make_key``, ``stop_tokens`` ids in the vocabulary.
    """
    plan = _prepare(model, tokens, max_new_tokens, temperature, top_k, top_p, stop_tokens, key, on_token,
                    prefill_chunk, cache_dtype)
    graphdef, state = nnx.split(model)  # once: the compiled steps read these, never copy them
    cache = _new_cache(model.config, plan)
    warm = None
    if plan.on_token is None and plan.mesh is None:
        warm = _compile_ahead(graphdef, state, cache, model.config.vocab_size, plan)
    logits_BV, cache = prefill(graphdef, state, plan.tokens_BT, plan.positions_BT, cache, plan.chunk)
    out, cache = decode(graphdef, state, cache, logits_BV, plan, warm)
    out = boundary.to_user(model, out)
    return (out, cache) if return_cache else out


@dataclasses.dataclass(frozen=True)
class Plan:
    """``generate``'s arguments, checked, in model ids, with the shapes it compiles for.

    Shapes are rounded up (the cache to a multiple of ``CACHE_ROUND``, the prefill chunk to a power
    of two) so that prompts of other lengths (chat turns, eval batches) reuse the compiled programs.
    """

    tokens_BT: jax.Array  # the prompts, left-padded, in model ids; on the device (sharded like the model)
    positions_BT: jax.Array  # 0, 1, ... per row; -1 on padding
    new: int  # max_new_tokens: the length of the output
    chunk: int  # prefill chunk: min(prefill_chunk, a power of two >= T and >= 16)
    length: int  # KV cache length: T + new rounded up to CACHE_ROUND, at most the context
    cache_dtype: Any  # a jnp dtype: cache_dtype, or the model's parameter dtype
    stop: jax.Array  # stop tokens in model ids ([PAD] for none)
    key: jax.Array
    sampling: tuple[jax.Array, jax.Array, jax.Array]  # temperature, top_k, top_p: traced, never recompile
    greedy: bool  # temperature == 0, static: greedy decoding compiles no sampler
    on_token: Callable[[np.ndarray], None] | None  # streaming callback, given user ids
    mesh: jax.sharding.Mesh | None  # the model's, when it is sharded

    @property
    def loop_args(self) -> tuple:
        """``_decode_loop``'s arguments after the model, the cache and the logits."""
        return self.key, self.stop, jnp.int32(self.new), *self.sampling

    @property
    def loop_static(self) -> dict:
        return dict(size=self.new, greedy=self.greedy)


def _prepare(model: GptOss, tokens, max_new_tokens, temperature, top_k, top_p, stop_tokens, key, on_token,
             prefill_chunk, cache_dtype) -> Plan:
    """``generate``'s arguments checked (all before any work), prompts mapped and left-padded, shapes rounded."""
    cfg = model.config
    context = cfg.max_position_embeddings
    new = int_arg("max_new_tokens", max_new_tokens, 1, context - 1)
    prefill_chunk = int_arg("prefill_chunk", prefill_chunk, 1)
    temperature, top_k, top_p = check_sampling(temperature, top_k, top_p)
    key = make_key(key)
    if on_token is not None and not callable(on_token):
        raise TypeError(f"on_token must be a callable or None, got {show(on_token)}")
    stop_tokens = check_stop_tokens(stop_tokens, boundary.vocab_size(model))
    tokens_BT, positions_BT = left_pad(_prompts(model, tokens))
    T = tokens_BT.shape[1]
    if T + new > context:
        raise ValueError(f"prompt of {T} tokens + {new} new tokens exceeds the model's context of {context}")
    mesh = sharding.mesh_of(model)
    return Plan(tokens_BT=_on_device(tokens_BT, mesh), positions_BT=_on_device(positions_BT, mesh), new=new,
                chunk=min(prefill_chunk, 1 << max(T - 1, 15).bit_length()),
                length=min(-(-(T + new) // CACHE_ROUND) * CACHE_ROUND, context),
                cache_dtype=cache_dtype or model.embed_VD[...].dtype,
                stop=jnp.asarray(boundary.stop_ids(model, stop_tokens) or [PAD], jnp.int32), key=key,
                sampling=(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)), greedy=temperature == 0,
                on_token=None if on_token is None else functools.partial(_in_user_ids, model, on_token), mesh=mesh)


def _prompts(model: GptOss, tokens):
    """The prompts in model ids: ``[B, T]`` checked as ``model()`` checks it, or a list of prompts each
    checked as ``[T]`` (all before any is mapped)."""
    if isinstance(tokens, np.ndarray | jax.Array) and tokens.ndim == 2:  # [B, T]: no padding needed
        return boundary.model_tokens(model, tokens)
    if isinstance(tokens, np.ndarray | jax.Array):
        raise ValueError(f"tokens must be [batch, time] or a list of prompts, got an array of shape "
                         f"{tuple(tokens.shape)}; pass [prompt] for one prompt")
    if not isinstance(tokens, Sequence) or isinstance(tokens, str | bytes):
        raise TypeError(f"tokens must be [batch, time] or a list of prompts, got {show(tokens)}")
    if not tokens:
        raise ValueError("tokens must hold at least one prompt")
    if all(isinstance(p, int | np.integer) for p in tokens):
        raise ValueError("tokens must be a list of prompts, got a flat list of ids; pass [tokens] for one prompt")
    prompts = [boundary.check_tokens(model, p, rank=1, name=f"prompt {b}") for b, p in enumerate(tokens)]
    return [boundary.to_model(model, p) for p in prompts]


def left_pad(prompts: Sequence[Sequence[int]] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tokens ``[B, T]`` (left-padded with 0) and positions ``[B, T]`` (``-1`` on padding)."""
    if isinstance(prompts, np.ndarray | jax.Array) and np.ndim(prompts) == 2:
        tokens = np.asarray(prompts)
        return tokens, np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape).copy()
    rows = [np.asarray(p).reshape(-1) for p in prompts]
    if not rows or min(len(r) for r in rows) == 0:
        raise ValueError("every prompt needs at least one token")
    T = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), T), np.int64)
    positions = np.full((len(rows), T), -1, np.int32)
    for b, r in enumerate(rows):
        tokens[b, T - len(r):] = r
        positions[b, T - len(r):] = np.arange(len(r))
    return tokens, positions


def _on_device(x_BT, mesh) -> jax.Array:
    """int32 on the device; for a sharded model with the batch over the mesh, from numpy (so that every
    process of a multi-host mesh passes the same prompts)."""
    return jnp.asarray(x_BT, jnp.int32) if mesh is None else sharding.shard_batch(np.asarray(x_BT, np.int32), mesh)


def _new_cache(cfg: Config, plan: Plan) -> KVCache:
    """An empty cache of ``plan.length`` positions; sharded like the model on a mesh (see ``oss_jax.sharding``)."""
    B = plan.tokens_BT.shape[0]
    if plan.mesh is None:
        return KVCache.create(cfg, B, plan.length, plan.cache_dtype)
    return sharding.make_cache(cfg, B, plan.length, plan.cache_dtype, plan.mesh)


def padded_chunks(tokens_BT: jax.Array, positions_BT: jax.Array,
                  size: int) -> Iterator[tuple[jax.Array, jax.Array, int]]:
    """``(tokens [B, size], positions [B, size], n)`` pieces of ``[B, T]`` inputs along T, each with its
    number ``n`` of real columns. The last piece is right-padded (token 0, position -1: never attended
    to, never stored) so that every piece has the one compiled shape. Shared by the prefill and
    ``trace.trace_chunks``."""
    for start in range(0, tokens_BT.shape[1], size):
        piece, pos = tokens_BT[:, start:start + size], positions_BT[:, start:start + size]
        n = piece.shape[1]
        if n < size:
            piece = jnp.pad(piece, ((0, 0), (0, size - n)))
            pos = jnp.pad(pos, ((0, 0), (0, size - n)), constant_values=-1)
        yield piece, pos, n


def prefill(graphdef: nnx.GraphDef, state: nnx.State, tokens_BT: jax.Array, positions_BT: jax.Array,
            cache: KVCache, chunk: int) -> tuple[jax.Array, KVCache]:
    """The prompts into the cache, ``chunk`` tokens per compiled call (bounded activation memory).

    Returns the logits ``[B, V]`` at the last position (every row ends there: prompts are left-padded)
    and the cache."""
    for piece, pos, _ in padded_chunks(tokens_BT, positions_BT, chunk):
        # Logits of the last real token only, also in a right-padded last chunk: all of that chunk's
        # would be chunk x vocabulary floats (412 MB for gpt-oss at 512 tokens).
        logits, cache = compiled_apply(graphdef, state, piece, pos, cache, last_only=True)
    return logits[:, 0], cache


def decode(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, logits_BV: jax.Array, plan: Plan,
           warm: threading.Thread | None = None) -> tuple[np.ndarray, KVCache]:
    """The new tokens, int32 numpy ``[B, plan.new]`` in model ids (``PAD`` after a row stops), and the cache.

    Without ``plan.on_token`` the whole loop runs on the device (``_decode_loop``, one dispatch; ``warm``
    is its compilation, see ``_compile_ahead``); with it, a compiled step per token (``_decode_step``),
    and the callback sees each new token."""
    if plan.on_token is not None:
        return _stream(graphdef, state, cache, logits_BV, plan)
    if warm is not None:
        warm.join()
    out, cache = _decode_loop(graphdef, state, cache, logits_BV, *plan.loop_args, **plan.loop_static)
    return sharding.to_host(out), cache


def _compile_ahead(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, vocab_size: int,
                   plan: Plan) -> threading.Thread:
    """Start compiling the token loop on another thread; join it before the loop runs.

    XLA compiles one program at a time per caller: this overlaps the loop's compilation with the
    prefill's (about 1 s less for a first generate here). The real call then finds the program in
    jit's cache; should this fail, that call compiles it again and raises the error itself.
    """
    cache_shape = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), cache)
    logits_shape = jax.ShapeDtypeStruct((plan.tokens_BT.shape[0], vocab_size), jnp.float32)
    args = (graphdef, state, cache_shape, logits_shape, *plan.loop_args)
    thread = threading.Thread(target=_compile_quietly, args=(_decode_loop, args, plan.loop_static), daemon=True)
    thread.start()
    return thread


@functools.partial(jax.jit, static_argnums=0, static_argnames=("size", "greedy"), donate_argnames=("cache",))
def _decode_loop(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, first_BV: jax.Array,
                 key: jax.Array, stop: jax.Array, steps: jax.Array, temperature, top_k, top_p, size: int,
                 greedy: bool):
    """The whole token loop on the device; stops early once every row has stopped."""
    B = first_BV.shape[0]

    def body(carry):
        i, logits, cache, out, done, key = carry
        # The weights are the same every step, so XLA would hoist their float32 conversions out of the loop and
        # keep them all alive at once (4.5 GiB on gpt-oss-20b); tying them to the step number keeps each where it
        # is used.
        model = nnx.merge(graphdef, jax.lax.optimization_barrier((state, i))[0])
        tok, logits, cache, done, key = _step(model, cache, logits, key, done, stop, temperature, top_k, top_p,
                                              greedy)
        return i + 1, logits, cache, out.at[:, i].set(tok), done, key

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < steps) & ~jnp.all(done)

    out = jnp.full((B, size), PAD, jnp.int32)
    init = (0, first_BV, cache, out, jnp.zeros((B,), bool), key)
    _, _, cache, out, _, _ = jax.lax.while_loop(cond, body, init)
    return out, cache


def _stream(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, logits_BV: jax.Array,
            plan: Plan) -> tuple[np.ndarray, KVCache]:
    """``decode`` one token at a time, calling ``plan.on_token`` after each step."""
    B = logits_BV.shape[0]
    out = np.full((B, plan.new), PAD, np.int32)
    done, key = jnp.zeros((B,), bool), plan.key
    for i in range(plan.new):
        tok, logits_BV, cache, done, key = _decode_step(graphdef, state, cache, logits_BV, key, done, plan.stop,
                                                        *plan.sampling, greedy=plan.greedy)
        out[:, i] = sharding.to_host(tok)
        plan.on_token(out[:, i])
        if bool(jnp.all(done)):
            break
    return out, cache


@functools.partial(jax.jit, static_argnums=0, static_argnames=("greedy",), donate_argnames=("cache",))
def _decode_step(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, logits_BV, key, done, stop,
                 temperature, top_k, top_p, greedy: bool):
    """``_step`` compiled on its own (streaming: the host sees every token)."""
    return _step(nnx.merge(graphdef, state), cache, logits_BV, key, done, stop, temperature, top_k, top_p, greedy)


def _step(model: GptOss, cache: KVCache, logits_BV: jax.Array, key: jax.Array, done_B: jax.Array,
          stop: jax.Array, temperature, top_k, top_p, greedy: bool):
    """One decode step: the next token from ``logits_BV`` (``PAD`` for rows already done), then that
    token through the model. Returns ``(tokens [B], next logits [B, V], cache, done [B], key)``."""
    tok, key = _next(logits_BV, key, greedy, temperature, top_k, top_p)
    tok = jnp.where(done_B, PAD, tok)
    done_B = done_B | jnp.isin(tok, stop)
    logits, cache = model.apply(jnp.maximum(tok, 0)[:, None], cache.length[:, None], cache, last_only=True)
    return tok, logits[:, 0], cache, done_B, key


def _next(logits_BV: jax.Array, key: jax.Array, greedy: bool, temperature, top_k,
          top_p) -> tuple[jax.Array, jax.Array]:
    """Next tokens ``[B]`` and the next key: ``sample``, or only the argmax when greedy is known
    before compiling (the sampler's sort and random draws are then not compiled at all, which
    saves about a second of the tiny model's first ``generate`` here)."""
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), key
    key, sub = jax.random.split(key)
    return sample(logits_BV, sub, temperature, top_k, top_p), key


def sample(logits_BV: jax.Array, key: jax.Array, temperature: float | jax.Array = 0.0,
           top_k: int | jax.Array = 0, top_p: float | jax.Array = 1.0) -> jax.Array:
    """Next tokens ``[B]`` from logits ``[B, V]``; greedy when ``temperature == 0``.

    Otherwise the logits are divided by the temperature, restricted to the ``top_k`` largest
    (``0``: no limit), then to the smallest set of those whose probability reaches ``top_p``
    (``1``: no limit; the most likely token always stays), and a token is drawn with ``key``.
    All three may be traced values, so changing them never recompiles.
    """
    logits = logits_BV.astype(jnp.float32)
    V = logits.shape[-1]
    x = logits / jnp.maximum(temperature, 1e-6)

    def restrict(x):
        desc = -jnp.sort(-x, axis=-1)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
        desc = jnp.where(jnp.arange(V) < k, desc, -jnp.inf)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep = jnp.sum((before < top_p) & (jnp.arange(V) < k), axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(desc, jnp.maximum(keep, 1) - 1, axis=-1)
        return jnp.where(x >= threshold, x, -jnp.inf)

    x = jax.lax.cond((top_k > 0) | (top_p < 1.0), restrict, lambda x: x, x)
    drawn = jax.random.categorical(key, x, axis=-1)
    return jnp.where(temperature > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def check_sampling(temperature, top_k, top_p) -> tuple[float, int, float]:
    """``(temperature, top_k, top_p)`` checked: a finite temperature >= 0, ``0 <= top_k <= 2**31 - 1``,
    ``0 < top_p <= 1`` (NaN refused everywhere). One ``ValueError``/``TypeError`` naming the argument."""
    t = real_arg("temperature", temperature)
    if not (math.isfinite(t) and t >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    k = int_arg("top_k", top_k, 0, INT32_MAX)
    p = real_arg("top_p", top_p)
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1: no limit), got {top_p}")
    return t, k, p


def make_key(key) -> jax.Array:
    """A PRNG key from ``key``: None (seed 0), a seed in ``[0, 2**32)``, a jax key or a raw ``uint32[2]`` key.

    Seeds outside ``[0, 2**32)`` are refused: ``jax.random.key`` keeps only 32 bits of them, so two
    different seeds would silently give the same samples.
    """
    if key is None:
        return jax.random.key(0)
    if isinstance(key, jax.Array) and not checks.is_traced(key):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            if key.shape != ():
                raise ValueError(f"key must be a single PRNG key, got an array of shape {key.shape}")
            return key
        if key.dtype == jnp.uint32 and key.shape == (2,):  # jax.random.PRNGKey's raw form
            return jax.random.wrap_key_data(key)
    try:
        seed = int_arg("key", key, 0, 2**32 - 1)
    except TypeError:
        raise TypeError(f"key must be a jax PRNG key or an int seed, got {show(key)}") from None
    except ValueError:
        raise ValueError(f"key: a seed must be in [0, 2**32) (jax keeps 32 bits of it), got {key}") from None
    return jax.random.key(seed)


def check_stop_tokens(stop_tokens, vocab_size: int) -> list[int]:
    """Stop token ids as a list of ints, each in ``[0, vocab_size)`` (the ids ``generate`` takes)."""
    if isinstance(stop_tokens, int | np.integer) or getattr(stop_tokens, "ndim", None) == 0:
        raise TypeError(f"stop_tokens must be a sequence of token ids, got {show(stop_tokens)}; "
                        f"pass [{show(stop_tokens)}] for one")
    if not hasattr(stop_tokens, "shape"):
        try:
            stop_tokens = list(stop_tokens)
        except TypeError:
            raise TypeError(f"stop_tokens must be a sequence of token ids, got {show(stop_tokens)}") from None
    ids = checks.int_array(stop_tokens, "stop_tokens")
    if ids.ndim != 1:
        raise ValueError(f"stop_tokens must be a flat sequence of token ids, got shape {tuple(ids.shape)}")
    checks.check_range(ids, 0, vocab_size, "stop_tokens")
    return [int(s) for s in np.asarray(ids).tolist()]


def _compile_quietly(fn, args: tuple, kwargs: dict) -> None:
    """``fn.lower(*args, **kwargs).compile()``, errors ignored (the caller compiles again)."""
    try:
        fn.lower(*args, **kwargs).compile()
    except Exception:
        pass


def _in_user_ids(model: GptOss, on_token: Callable[[np.ndarray], None], toks_B: np.ndarray) -> None:
    on_token(boundary.to_user(model, toks_B))
