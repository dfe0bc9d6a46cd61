"""The API boundary: what ``model()``, ``generate``, ``chat`` and ``trace`` do to user ids before the model sees them.

Users speak *user ids*: o200k_harmony ids for a model with a vocabulary map (``model.token_map``, set
by ``oss_jax.load`` for the bundled tiny model; see ``oss_jax.vocab``), the model's own ids otherwise.
The model itself (``GptOss.apply``, the layers, the kernels) reads *model ids* only and checks
nothing. Here, and only here, user input is checked (``oss_jax.checks``: one ``ValueError`` or
``TypeError`` naming the value) and mapped, and the model's ids are mapped back::

    tokens_BT = boundary.model_tokens(model, tokens)       # checked, then model ids
    out = boundary.to_user(model, new_tokens)              # model ids -> user ids
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from oss_jax import checks, harmony
from oss_jax.config import Config
from oss_jax.vocab import TokenMap


class GptOss(Protocol):
    """What the boundary reads of a model (``oss_jax.model.GptOss``, which imports this module)."""

    config: Config
    token_map: TokenMap | None


def vocab_size(model: GptOss) -> int:
    """The user id space: o200k_harmony's with a ``token_map``, else the model's own vocabulary."""
    return harmony.VOCAB_SIZE if model.token_map is not None else model.config.vocab_size


def reads_harmony(model: GptOss) -> bool:
    """True when user ids include the harmony special tokens (up to ``harmony.CALL``), as chat needs."""
    return model.token_map is not None or model.config.vocab_size > harmony.CALL


def check_tokens(model: GptOss, tokens, *, rank: int = 2, name: str = "tokens"):
    """``checks.check_tokens`` in user ids, against the model's context; not mapped (see ``model_tokens``)."""
    return checks.check_tokens(tokens, vocab_size(model), context=model.config.max_position_embeddings,
                               rank=rank, name=name)


def to_model(model: GptOss, tokens, name: str = "tokens"):
    """User ids (any shape) -> model ids: integers in ``[0, vocab_size(model))``, then mapped (the identity
    without a ``token_map``). int32 numpy for lists and numpy; a jax array stays one when there is no map.
    Inside ``jax.jit`` only the dtype is checked, and a model with a map refuses (it maps on the host)."""
    t = checks.int_array(tokens, name)
    if checks.is_traced(t):
        if model.token_map is not None:
            raise TypeError("this model maps o200k ids to its own on the host: call it outside jax.jit, "
                            "or call apply() with model ids (model.token_map.to_model)")
        return t
    checks.check_range(t, 0, vocab_size(model), name)
    if model.token_map is not None:
        return model.token_map.to_model(t)
    return t if isinstance(t, jax.Array) else np.asarray(t, np.int32)


def model_tokens(model: GptOss, tokens, *, rank: int = 2, name: str = "tokens"):
    """User tokens -> checked model ids: the one way in for ``model()``, ``generate`` and ``trace``.

    ``check_tokens`` (integers, ``rank`` 2 ``[batch, time]`` or 1, at least one token, at most the
    context per row, ids in ``[0, vocab_size(model))``), then ``to_model``.
    """
    return to_model(model, check_tokens(model, tokens, rank=rank, name=name))


def to_user(model: GptOss, ids) -> np.ndarray:
    """Model ids (any shape; negative ids, padding, pass through) -> user ids, as numpy."""
    return model.token_map.to_o200k(ids) if model.token_map is not None else np.asarray(ids)


def stop_ids(model: GptOss, stop_tokens: list[int]) -> list[int]:
    """Checked stop tokens (user ids) in model ids; those the model's vocabulary lacks are dropped
    (it can never emit them)."""
    tmap = model.token_map
    if tmap is None:
        return list(stop_tokens)
    return [int(s) for s in tmap.to_model([s for s in stop_tokens if s in tmap])]


def positions(model: GptOss, positions_BT, shape: tuple[int, ...]) -> jax.Array:
    """Positions for tokens of ``shape`` (default ``0 .. T-1`` per row), checked: integers, the tokens'
    shape, below the context, ``-1`` the only negative (padding). int32."""
    if positions_BT is None:
        return jnp.broadcast_to(jnp.arange(shape[-1], dtype=jnp.int32), tuple(shape))
    positions_BT = checks.check_positions(positions_BT, shape, model.config.max_position_embeddings)
    return jnp.asarray(positions_BT, jnp.int32)
