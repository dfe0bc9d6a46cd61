"""Expert saliency: which experts matter, from a trace's routing and expert-output magnitudes.

    from oss_jax.trace import trace
    t = trace(model, tokens, expert_outputs=True)
    reap = reap_saliency(t.expert_ids, t.gates, t.expert_norms, t.num_experts)   # [L, E]
    drop = prune.lowest(reap, 4)                                                 # 4 per layer

Inputs are numpy arrays ``[L, T, k]`` (``Trace.expert_ids``, ``.gates``, ``.expert_norms``,
``.expert_max``; a batch axis ``[L, B, T, k]`` is flattened into the tokens). Padding tokens must
be removed first (``Trace.valid``). :class:`SaliencyStats` accumulates the same metrics over the
chunks of ``trace_chunks`` without keeping them; :func:`calibrate` fills one from a list of token
sequences (a calibration set, as REAP prunes with).

Shape letters: the legend in ``oss_jax/model.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["SaliencyStats", "calibrate", "frequency", "reap_saliency", "super_experts"]


def _flat(x: np.ndarray, name: str) -> np.ndarray:
    """``[L, ..., k]`` -> ``[L, X, k]`` (batch and time flattened into X)."""
    x = np.asarray(x)
    if x.ndim < 3:
        raise ValueError(f"{name} must be [L, T, k] (or [L, B, T, k]), got shape {x.shape}")
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _sums(expert_ids, values, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Per layer and expert: the sum of ``values`` over the (token, slot) pairs routed there, and their count."""
    ids = _flat(expert_ids, "expert_ids")
    L = ids.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"expert_ids hold values outside [0, {num_experts}): {ids.min()} .. {ids.max()}")
    rows = np.repeat(np.arange(L), ids.shape[1] * ids.shape[2])
    flat = rows * num_experts + ids.reshape(-1)
    counts = np.bincount(flat, minlength=L * num_experts).reshape(L, num_experts)
    if values is None:
        return np.zeros((L, num_experts)), counts
    vals = _flat(values, "values").astype(np.float64)
    if vals.shape != ids.shape:
        raise ValueError(f"expert_ids {ids.shape} and values {vals.shape} must have the same shape")
    sums = np.bincount(flat, weights=vals.reshape(-1), minlength=L * num_experts).reshape(L, num_experts)
    return sums, counts


def reap_saliency(expert_ids_LTk, gates_LTk, norms_LTk, num_experts: int) -> np.ndarray:
    """REAP (Router-weighted Expert Activation Pruning) saliency ``[L, E]`` float64.

    ``S_e = 1/|X_e| * sum_{x in X_e} g_e(x) * ||f_e(x)||_2``, where ``X_e`` are the tokens routed to
    expert ``e`` (``e`` among their top-k), ``g_e(x)`` the gate and ``f_e(x)`` the expert's output
    before the gate. 0 for an expert that no token chose. REAP renormalises the gates over the
    top-k; gpt-oss's gates already are a softmax over the k chosen logits, so they sum to 1 as given.

    Lasby et al., "REAP the Experts: Why Pruning Prevails for One-Shot MoE compression",
    arXiv:2510.13999 (Cerebras, 2025).
    """
    gates, norms = _flat(gates_LTk, "gates"), _flat(norms_LTk, "norms")
    if gates.shape != norms.shape:
        raise ValueError(f"gates {gates.shape} and norms {norms.shape} must have the same shape")
    sums, counts = _sums(expert_ids_LTk, gates.astype(np.float64) * norms, num_experts)
    return np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)


def frequency(expert_ids_LTk, num_experts: int) -> np.ndarray:
    """Activation frequency ``[L, E]``: the share of tokens that chose each expert (among their top-k).

    ``freq_e = |X_e| / X``; each layer's row sums to k.
    """
    ids = _flat(expert_ids_LTk, "expert_ids")
    _, counts = _sums(ids, None, num_experts)
    return counts / max(ids.shape[1], 1)


def _max_per_expert(expert_ids_LTk, max_LTk, num_experts: int) -> np.ndarray:
    """``[L, E]``: the largest ``max_LTk`` of each expert over the tokens routed to it (0 if none)."""
    ids, peaks = _flat(expert_ids_LTk, "expert_ids"), _flat(max_LTk, "expert_max")
    if ids.shape != peaks.shape:
        raise ValueError(f"expert_ids {ids.shape} and expert_max {peaks.shape} must have the same shape")
    out = np.zeros((ids.shape[0], num_experts))
    for layer in range(ids.shape[0]):
        np.maximum.at(out[layer], ids[layer].reshape(-1), peaks[layer].reshape(-1).astype(np.float64))
    return out


def _super(max_LE: np.ndarray, layers_fraction: float) -> list[tuple[int, int, float]]:
    if not 0 < layers_fraction <= 1:
        raise ValueError(f"layers_fraction must be in (0, 1], got {layers_fraction}")
    L = max_LE.shape[0]
    considered = max_LE[: max(1, int(L * layers_fraction))]
    threshold = max(float(np.percentile(considered, 99.5)), float(considered.max()) / 10)
    return [(int(layer), int(e), float(considered[layer, e]))
            for layer, e in zip(*np.nonzero(considered > threshold), strict=True)]


def super_experts(expert_ids_LTk, max_LTk, num_experts: int,
                  layers_fraction: float = 0.75) -> list[tuple[int, int, float]]:
    """Super experts: ``(layer, expert, max activation)`` of the experts with extreme output peaks.

    ``m_{l,e} = max_{x in X_{l,e}} max_d |f_{l,e}(x)_d|`` (0 for an expert no token chose), over the
    first ``layers_fraction`` of the layers only; an expert is super when
    ``m_{l,e} > max(P99.5({m_{l,e}}), max_{l,e} m_{l,e} / 10)``: the rule of REAP's code.

    Su et al., "Unveiling Super Experts in Mixture-of-Experts Large Language Models", arXiv:2507.23279
    (2025); the threshold as in REAP (arXiv:2510.13999).
    """
    return _super(_max_per_expert(expert_ids_LTk, max_LTk, num_experts), layers_fraction)


class SaliencyStats:
    """Streaming :func:`reap_saliency`, :func:`frequency` and :func:`super_experts` over traces (chunks).

        stats = SaliencyStats(model.config.num_experts)
        for t in trace_chunks(model, tokens, expert_outputs=True):
            stats.update(t)
        stats.reap(), stats.frequency(), stats.super_experts()

    Padding tokens (``Trace.valid`` false) are skipped.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.tokens = 0
        self.counts: np.ndarray | None = None
        self.reap_sums: np.ndarray | None = None
        self.max_LE: np.ndarray | None = None

    def update(self, t) -> None:
        """Add one :class:`oss_jax.trace.Trace` recorded with ``router=True, expert_outputs=True``."""
        if t.expert_ids is None or t.gates is None or t.expert_norms is None or t.expert_max is None:
            raise ValueError("SaliencyStats.update needs a trace with router=True and expert_outputs=True")
        valid = np.asarray(t.valid)
        ids, gates = t.expert_ids[:, valid], t.gates[:, valid]
        norms, peaks = t.expert_norms[:, valid], t.expert_max[:, valid]
        sums, counts = _sums(ids, gates.astype(np.float64) * norms, self.num_experts)
        max_LE = _max_per_expert(ids, peaks, self.num_experts)
        if self.counts is None:
            self.counts, self.reap_sums, self.max_LE = counts, sums, max_LE
        else:
            self.counts, self.reap_sums = self.counts + counts, self.reap_sums + sums
            self.max_LE = np.maximum(self.max_LE, max_LE)
        self.tokens += int(valid.sum())

    def _check(self) -> None:
        if self.counts is None:
            raise ValueError("SaliencyStats: no trace was added (call update first)")

    def reap(self) -> np.ndarray:
        """:func:`reap_saliency` of everything added, ``[L, E]``."""
        self._check()
        return np.divide(self.reap_sums, self.counts, out=np.zeros_like(self.reap_sums), where=self.counts > 0)

    def frequency(self) -> np.ndarray:
        """:func:`frequency` of everything added, ``[L, E]``."""
        self._check()
        return self.counts / max(self.tokens, 1)

    def super_experts(self, layers_fraction: float = 0.75) -> list[tuple[int, int, float]]:
        """:func:`super_experts` of everything added."""
        self._check()
        return _super(self.max_LE, layers_fraction)


def calibrate(model, sequences: Sequence[Sequence[int]], *, batch: int = 32, pad_to: int = 64) -> SaliencyStats:
    """:class:`SaliencyStats` of ``model`` over token ``sequences`` (o200k ids, e.g. whole conversations).

    Sequences are traced ``batch`` at a time (``trace(..., expert_outputs=True)``), each in its own row
    from position 0, padded to a multiple of ``pad_to`` tokens with positions -1 (few compiled shapes);
    padding is not counted. Every token counts, the system message's too.
    """
    from oss_jax.trace import trace

    seqs = [list(map(int, s)) for s in sequences]
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("calibrate needs at least one sequence, and no empty one")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 1:
        raise ValueError(f"pad_to must be an integer >= 1, got {pad_to!r}")
    stats = SaliencyStats(model.config.num_experts)
    for start in range(0, len(seqs), batch):
        part = seqs[start:start + batch]
        width = -(-max(map(len, part)) // pad_to) * pad_to
        tokens = np.full((len(part), width), part[0][0], np.int64)  # a token the model knows; never read
        positions = np.full(tokens.shape, -1, np.int32)
        for row, s in enumerate(part):
            tokens[row, :len(s)], positions[row, :len(s)] = s, np.arange(len(s))
        stats.update(trace(model, tokens, positions=positions, sinks=False, residual=False, expert_outputs=True,
                           next_token=False))
    return stats
