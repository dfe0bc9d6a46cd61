"""Generation: one compiled prefill, then a compiled decode step per token.

Prompts of different lengths are left-padded; padding gets position ``-1`` and is never
attended to, so every row sees exactly its own tokens at positions ``0, 1, ...``. Long prompts
are prefilled in chunks (bounded activation memory). Without a streaming callback the whole
token loop runs on the device (``lax.while_loop``, one dispatch); with one, a jitted step is
called per token and the callback gets each new token. The token loop is compiled on a second
thread while the prompt is prefilled, and greedy decoding (``temperature=0``) compiles no sampler.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oss_jax import sharding
from oss_jax.cache import KVCache
from oss_jax.model import GptOss, compiled_apply

PAD = -1  # fills the output after a row stops; never a real token id
CACHE_ROUND = 256  # KV cache lengths are rounded up to a multiple of this (fewer compiled shapes)


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


def _next(logits_BV: jax.Array, key: jax.Array, greedy: bool, temperature, top_k,
          top_p) -> tuple[jax.Array, jax.Array]:
    """Next tokens ``[B]`` and the next key: ``sample``, or only the argmax when greedy is known
    before compiling (the sampler's sort and random draws are then not compiled at all, which
    saves about a second of the tiny model's first ``generate`` here)."""
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), key
    key, sub = jax.random.split(key)
    return sample(logits_BV, sub, temperature, top_k, top_p), key


@functools.partial(jax.jit, static_argnums=0, static_argnames=("size", "greedy"), donate_argnames=("cache",))
def _decode_loop(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, first_BV: jax.Array,
                 key: jax.Array, stop: jax.Array, steps: jax.Array, temperature, top_k, top_p, size: int,
                 greedy: bool):
    """The whole token loop on the device; stops early once every row has stopped."""
    model = nnx.merge(graphdef, state)
    B = first_BV.shape[0]

    def body(carry):
        i, logits, cache, out, done, key = carry
        tok, key = _next(logits, key, greedy, temperature, top_k, top_p)
        tok = jnp.where(done, PAD, tok)
        out = out.at[:, i].set(tok)
        done = done | jnp.isin(tok, stop)
        pos = cache.length[:, None]
        logits, cache = model.apply(jnp.maximum(tok, 0)[:, None], pos, cache, last_only=True)
        return i + 1, logits[:, 0], cache, out, done, key

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < steps) & ~jnp.all(done)

    out = jnp.full((B, size), PAD, jnp.int32)
    init = (0, first_BV, cache, out, jnp.zeros((B,), bool), key)
    _, _, cache, out, _, _ = jax.lax.while_loop(cond, body, init)
    return out, cache


@functools.partial(jax.jit, static_argnums=0, static_argnames=("greedy",), donate_argnames=("cache",))
def _decode_step(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, logits_BV, key, done, stop,
                 temperature, top_k, top_p, greedy: bool):
    """One token: sample from ``logits_BV``, then run it through the model (streaming mode)."""
    model = nnx.merge(graphdef, state)
    tok, key = _next(logits_BV, key, greedy, temperature, top_k, top_p)
    tok = jnp.where(done, PAD, tok)
    done = done | jnp.isin(tok, stop)
    logits, cache = model.apply(jnp.maximum(tok, 0)[:, None], cache.length[:, None], cache, last_only=True)
    return tok, logits[:, 0], cache, done, key


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
      key: PRNG key or int seed for sampling (same key, same output); default 0.
      on_token: streaming callback, called with the new tokens ``[B]`` after each step.
      prefill_chunk: prompt tokens per prefill step (bounds activation memory).
      cache_dtype: KV cache dtype (default: the model's parameter dtype).
      return_cache: also return the final ``KVCache``.

    Returns:
      New tokens, int32 numpy ``[B, max_new_tokens]`` (and the cache when asked).
    """
    cfg = model.config
    tmap = model.token_map
    if tmap is not None:  # o200k ids in and out; the model itself works in its own ids
        tokens = [tmap.to_model(p) for p in tokens]
        stop_tokens = [int(s) for s in tmap.to_model([s for s in stop_tokens if s in tmap])]
        if on_token is not None:
            on_token = functools.partial(_mapped_callback, on_token, tmap)
    tokens, positions = left_pad(tokens)
    model._check_tokens(tokens)
    B, T = tokens.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if T + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the model's "
                         f"context of {cfg.max_position_embeddings}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got {temperature}, "
                         f"{top_p}, {top_k}")
    sampling = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    key = jax.random.key(0 if key is None else key) if not isinstance(key, jax.Array) else key
    stop = jnp.asarray(list(stop_tokens) or [PAD], jnp.int32)
    dtype = cache_dtype or model.embed_VD[...].dtype
    mesh = sharding.mesh_of(model)
    # Shapes rounded up (cache to a multiple of CACHE_ROUND, the prefill chunk to a power of two) so
    # that prompts of other lengths (chat turns, eval batches) reuse the compiled prefill and loop.
    length = min(-(-(T + max_new_tokens) // CACHE_ROUND) * CACHE_ROUND, cfg.max_position_embeddings)
    if mesh is None:
        cache = KVCache.create(cfg, B, length, dtype)
    else:  # a sharded model: the cache and the batch are sharded too (see oss_jax.sharding)
        cache = sharding.make_cache(cfg, B, length, dtype, mesh)

    # Prefill in chunks; the last chunk is right-padded (position -1) to keep one compiled shape.
    if mesh is None:
        tokens = jnp.asarray(tokens, jnp.int32)
        positions = jnp.asarray(positions)
    else:  # from numpy, so that every process of a multi-host mesh passes the same prompts
        tokens = sharding.shard_batch(np.asarray(tokens, np.int32), mesh)
        positions = sharding.shard_batch(positions, mesh)
    C = min(prefill_chunk, 1 << max(T - 1, 15).bit_length())  # >= T and >= 16
    logits = None
    graphdef, state = nnx.split(model)  # once: the compiled steps read these, never copy them
    cache_shape = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), cache)
    loop_args = (graphdef, state, cache_shape, jax.ShapeDtypeStruct((B, cfg.vocab_size), jnp.float32), key,
                 stop, jnp.int32(max_new_tokens), *sampling)
    greedy = temperature == 0  # static: greedy decoding compiles no sampler
    loop_kw = dict(size=max_new_tokens, greedy=greedy)
    warm = None
    if on_token is None and mesh is None:
        # XLA compiles one program at a time per caller: compile the token loop on another thread
        # while this one compiles and runs the prefill (about 1 s less for a first generate here).
        # The real call below then finds it in jit's cache; should this fail, that call compiles
        # it again and raises the error itself.
        warm = threading.Thread(target=_compile_quietly, args=(_decode_loop, loop_args, loop_kw), daemon=True)
        warm.start()
    for start in range(0, T, C):
        chunk, pos = tokens[:, start:start + C], positions[:, start:start + C]
        n = chunk.shape[1]
        if n < C:
            chunk = jnp.pad(chunk, ((0, 0), (0, C - n)))
            pos = jnp.pad(pos, ((0, 0), (0, C - n)), constant_values=-1)
        logits_all, cache = compiled_apply(graphdef, state, chunk, pos, cache, last_only=n == C)
        logits = logits_all[:, -1] if n == C else logits_all[:, n - 1]
    if on_token is None:
        if warm is not None:
            warm.join()
        out, cache = _decode_loop(graphdef, state, cache, logits, *loop_args[4:], **loop_kw)
        out = sharding.to_host(out)
    else:
        out = np.full((B, max_new_tokens), PAD, np.int32)
        done = jnp.zeros((B,), bool)
        for i in range(max_new_tokens):
            tok, logits, cache, done, key = _decode_step(graphdef, state, cache, logits, key, done, stop,
                                                         *sampling, greedy=greedy)
            out[:, i] = sharding.to_host(tok)
            on_token(out[:, i])
            if bool(jnp.all(done)):
                break
    if tmap is not None:
        out = tmap.to_o200k(out)
    return (out, cache) if return_cache else out


def _compile_quietly(fn, args: tuple, kwargs: dict) -> None:
    """``fn.lower(*args, **kwargs).compile()``, errors ignored (the caller compiles again)."""
    try:
        fn.lower(*args, **kwargs).compile()
    except Exception:
        pass


def _mapped_callback(on_token: Callable[[np.ndarray], None], tmap, toks_B: np.ndarray) -> None:
    on_token(tmap.to_o200k(toks_B))
