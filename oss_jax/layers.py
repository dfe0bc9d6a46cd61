"""What the layer files (``norm``, ``attention``, ``moe``, ``model``) share: parameter creation, the
variable that holds packed MXFP4 bytes, the ``impl`` switch, and the hooks tracing uses.

Shape letters: the legend in ``oss_jax/model.py``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

f32 = jnp.float32
# The values of the static attribute ``impl`` of Attention and Experts (see GptOss).
IMPLS = ("fast", "reference")


class Packed(nnx.Variable):
    """Packed MXFP4 bytes (blocks or scales): state, but not a trainable parameter."""


def param(shape: tuple[int, ...], dtype, rngs: nnx.Rngs | None, std: float = 0.02) -> nnx.Param:
    """A parameter: normal(0, std) from ``rngs``, or zeros when ``rngs`` is None (to be loaded)."""
    if rngs is None:
        return nnx.Param(jnp.zeros(shape, dtype))
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, f32)).astype(dtype))


def check_impl(impl: str) -> str:
    """``impl`` itself, or a one-line error naming it."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r} (use 'fast' or 'reference')")
    return impl


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
        ``attention_weights [B, T, N, W]`` (float32, ``W = stop - start``), the probability each
        query puts on the keys at those positions (0 where not visible). Only where the logits
        are materialised (``T * S <= kernels.attention.NAIVE_MAX``); tracing raises ``ValueError``
        otherwise.
      expert_outputs: ``MoE`` sows, per token and chosen expert, the L2 norm ``expert_norms [B, T, k]``
        and the largest absolute entry ``expert_max [B, T, k]`` (float32) of that expert's output
        ``expert_e(x)`` before its gate (biases included). Costs the layer's expert work once more
        (``MoE.expert_magnitudes``: each choice run on its own, with gate 1).
    """

    router: bool = True
    sinks: bool = True
    residual: bool = True
    attention_window: tuple[int, int] | None = None
    expert_outputs: bool = False


def sow(module: nnx.Module, name: str, value: jax.Array) -> None:
    """Sow one value per call (not the default tuple of calls): each module runs once per pass."""
    module.sow(nnx.Intermediate, name, value, reduce_fn=lambda _, v: v, init_fn=lambda: None)
