"""Expert pruning: remove experts from a model, or mask them out of its router.

    from oss_jax import prune, saliency
    reap = saliency.reap_saliency(t.expert_ids, t.gates, t.expert_norms, t.num_experts)   # [L, E]
    small = prune.prune_experts(model, prune.lowest(reap, 4))     # E - 4 experts in every layer
    oss_jax.save(small, "pruned/")                                # a gpt-oss checkpoint

:func:`prune_experts` slices the router (rows and bias) and every expert tensor (dense, or MXFP4
blocks and scales, and the biases) and sets ``num_experts = E - n``. The router then takes its top-k
and softmax over the experts that remain, which is REAP's renormalisation (arXiv:2510.13999).
:func:`mask_experts` keeps all E experts but sets the dropped ones' router bias to ``-inf``, so no
token picks them: its logits equal the pruned model's.

``drop`` names the experts to remove per layer: ``{layer: [experts]}`` (every layer must appear) or
a list of L lists. The configuration has one ``num_experts``, so every layer drops the same number.

Shape letters: the legend in ``oss_jax/model.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from oss_jax.model import GptOss

__all__ = ["lowest", "mask_experts", "prune_experts"]

# Every expert tensor of ``Experts`` (whichever exist), E first.
_EXPERT_TENSORS = ("gate_up_EDF2", "down_EFD", "gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales",
                   "gate_up_bias_EF2", "down_bias_ED")


def lowest(scores_LE, n: int) -> list[list[int]]:
    """The ``n`` experts of each layer with the lowest score (``[L, E]``, e.g. REAP saliency), ascending."""
    scores = np.asarray(scores_LE)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [L, E], got shape {scores.shape}")
    if not 0 <= n <= scores.shape[1]:
        raise ValueError(f"n must be in [0, {scores.shape[1]}] (experts per layer), got {n}")
    return [sorted(int(e) for e in np.argsort(row, kind="stable")[:n]) for row in scores]


def _drop_lists(model: GptOss, drop: Mapping[int, Sequence[int]] | Sequence[Sequence[int]]) -> list[list[int]]:
    """``drop`` checked: one sorted list of distinct expert ids per layer, all of the same length."""
    cfg = model.config
    L, E, k = cfg.num_hidden_layers, cfg.num_experts, cfg.experts_per_token
    if isinstance(drop, Mapping):
        extra = sorted(set(drop) - set(range(L)))
        if extra:
            raise ValueError(f"drop names layers {extra} outside [0, {L})")
        missing = sorted(set(range(L)) - set(drop))
        if missing:
            raise ValueError(f"drop must name every layer (num_experts is one number for all layers); "
                             f"missing layers {missing}")
        lists = [drop[i] for i in range(L)]
    else:
        lists = list(drop)
        if len(lists) != L:
            raise ValueError(f"drop must hold one list per layer ({L}), got {len(lists)}")
    out = []
    for i, experts in enumerate(lists):
        ids = [int(e) for e in experts]
        if len(set(ids)) != len(ids):
            raise ValueError(f"drop[{i}] names an expert twice: {ids}")
        bad = [e for e in ids if not 0 <= e < E]
        if bad:
            raise ValueError(f"drop[{i}] names experts {bad} outside [0, {E})")
        out.append(sorted(ids))
    counts = sorted({len(d) for d in out})
    if len(counts) > 1:
        raise ValueError(f"every layer must drop the same number of experts (one num_experts), got counts "
                         f"{[len(d) for d in out]}")
    if E - counts[0] < k:
        raise ValueError(f"dropping {counts[0]} of {E} experts leaves {E - counts[0]}, fewer than "
                         f"experts_per_token ({k})")
    return out


def _copy(model: GptOss) -> GptOss:
    """A new model sharing the parameter arrays (replacing a variable in it leaves ``model`` alone)."""
    return nnx.merge(*nnx.split(model))


def prune_experts(model: GptOss, drop: Mapping[int, Sequence[int]] | Sequence[Sequence[int]]) -> GptOss:
    """A new model without the experts ``drop`` names (per layer); ``model`` is not modified.

    Slices the router's rows and bias and every expert tensor along E; the new config has
    ``num_experts = E - n``. Keeps ``token_map``, ``impl`` and ``dispatch``. Raises a one-line
    ``ValueError`` for layers dropping different numbers of experts, or fewer than k experts left.
    """
    lists = _drop_lists(model, drop)
    cfg = model.config
    new = _copy(model)
    for block, dropped in zip(new.layers, lists, strict=True):
        keep = jnp.asarray(np.setdiff1d(np.arange(cfg.num_experts), dropped), jnp.int32)
        mlp = block.mlp
        for owner, name in [(mlp, "router_ED"), (mlp, "router_bias_E")] + [(mlp.experts, n) for n in _EXPERT_TENSORS]:
            var = getattr(owner, name, None)
            if var is None:
                continue
            setattr(owner, name, type(var)(var[...][keep]))
    new.config = cfg.replace(num_experts=cfg.num_experts - len(lists[0]))
    return new


def mask_experts(model: GptOss, drop: Mapping[int, Sequence[int]] | Sequence[Sequence[int]]) -> GptOss:
    """A new model whose router never picks the experts ``drop`` names: their router bias is ``-inf``.

    Keeps all E experts (and the config); its logits equal those of ``prune_experts(model, drop)``.
    The same checks as :func:`prune_experts`. ``model`` is not modified.
    """
    lists = _drop_lists(model, drop)
    new = _copy(model)
    for block, dropped in zip(new.layers, lists, strict=True):
        var = block.mlp.router_bias_E
        bias = var[...].at[jnp.asarray(dropped, jnp.int32)].set(-jnp.inf)
        block.mlp.router_bias_E = type(var)(bias)
    return new
