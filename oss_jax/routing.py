"""Streaming aggregation of routing and sink statistics: counts that add up, chunk by chunk.

A 100k-token run of gpt-oss-20b (24 layers, 32 experts, top-4) has 77M router logits; the
metrics of ``oss_jax.metrics`` only need sums of counts. :class:`RoutingStats` keeps those sums
(all sizes independent of the number of tokens except the per-token-id table, which grows with
the number of *distinct* token ids) and :class:`SinkStats` the sink sums, so records can be
dropped after each chunk::

    stats = RoutingStats(cfg.num_hidden_layers, cfg.num_experts, cfg.experts_per_token)
    sinks = SinkStats(cfg.num_hidden_layers, cfg.num_attention_heads)
    for piece in trace_chunks(model, tokens, chunk=512):
        stats.update_trace(piece)
        sinks.update_trace(piece)
    stats.summary()

Every accumulated quantity equals the one computed in one shot over the concatenated chunks
(the tests check it), including pairs of neighbouring tokens that straddle two chunks.

Memory (L layers, E experts, n distinct token ids, G groups): ``(L E)^2`` int64 for co-activation
and cross-layer counts (4.7 MB for 20b), ``n L E`` int32 per-token-id counts (3 MB per 1000 ids
for 20b; restrict with ``vocab_layers``), ``G L E`` for groups, plus one chunk's temporaries.

Routing drift (:func:`routing_drift`): how fine-tuning moved the routers. Two models (before and after)
read the same token sequences; per layer, :class:`RoutingDrift` holds the expert-load distribution of
each, their Jensen-Shannon divergence, the experts whose share grew most, and the share of tokens whose
top-k set changed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence

import numpy as np

from oss_jax import metrics as M


class RoutingStats:
    """Sums over routings ``[L, T, k]`` (and router logits ``[L, T, E]``) fed chunk by chunk.

    Args:
      num_layers, num_experts, k: L, E and the experts per token.
      vocab_layers: layers whose per-token-id counts are kept (for vocabulary specialization);
        default all, ``()`` for none.
      cross_layer: keep the ``[L, L, E, E]`` cross-layer counts (else only per-layer co-activation).

    Attributes (all sums since construction):
      tokens: number of routed (valid) tokens.
      load: int64 ``[L, E]`` routings per expert; ``first_load`` the same for first choices.
      prob_sum: float64 ``[L, E]``: sum over tokens of the full-softmax router probabilities.
      entropy_sum: float64 ``[L]``: sum of per-token routing entropies (nats);
        ``gate_entropy_sum`` the same for gpt-oss's top-k gates.
      logit_tokens: tokens whose router logits were given (denominator of the two above).
      pair_counts: int64 ``[L, L, E, E]`` (cross-layer counts; ``[a, a]`` blocks are co-activation)
        or, with ``cross_layer=False``, ``[L, E, E]`` co-activation counts.
      transition_counts: int64 ``[L - 1, E, E]``: tokens routed to i at layer l and j at layer l + 1
        (``metrics.transition_counts``; kept in both modes, small).
      pairs, same_first, any_shared: consecutive-token counts ``[L]`` (see ``metrics.consecutive_counts``).
      token_ids, token_counts: per-token-id counts ``[n, len(vocab_layers), E]`` (int32).
      group_load: ``{label: int64 [L, E]}`` load per group (domain, channel, ...).
      group_halves: ``{label: int64 [S, 2, L, E]}``: the same load split by S random coins per token
        (``add_groups`` with ``halves_ST``), for the baseline of :meth:`compare_groups`.
    """

    def __init__(self, num_layers: int, num_experts: int, k: int, *, vocab_layers: Sequence[int] | None = None,
                 cross_layer: bool = True):
        L, E = num_layers, num_experts
        self.num_layers, self.num_experts, self.k = L, E, k
        self.vocab_layers = tuple(range(L)) if vocab_layers is None else tuple(vocab_layers)
        self.cross_layer = cross_layer
        self.tokens = 0
        self.load = np.zeros((L, E), np.int64)
        self.first_load = np.zeros((L, E), np.int64)
        self.prob_sum = np.zeros((L, E), np.float64)
        self.entropy_sum = np.zeros(L, np.float64)
        self.gate_entropy_sum = np.zeros(L, np.float64)
        self.logit_tokens = 0
        self.gate_tokens = 0
        self.pair_counts = np.zeros((L, L, E, E) if cross_layer else (L, E, E), np.int64)
        self.transition_counts = np.zeros((max(L - 1, 0), E, E), np.int64)
        self.pairs = np.zeros(L, np.int64)
        self.same_first = np.zeros(L, np.int64)
        self.any_shared = np.zeros(L, np.int64)
        self._row_of: dict[int, int] = {}
        self._token_counts = np.zeros((0, len(self.vocab_layers), E), np.int32)
        self.group_load: dict[object, np.ndarray] = {}
        self.group_halves: dict[object, np.ndarray] = {}
        self._last: np.ndarray | None = None  # [L, k] routing of the previous chunk's last valid token

    # -- feeding ---------------------------------------------------------------------------------
    def update(self, expert_ids_LTk: np.ndarray, router_logits_LTE: np.ndarray | None = None, *,
               gates_LTk: np.ndarray | None = None, tokens_T: np.ndarray | None = None,
               valid_T: np.ndarray | None = None, labels=None, continues: bool = True) -> None:
        """Add one chunk of one sequence.

        Args:
          expert_ids_LTk: int ``[L, T, k]``.
          router_logits_LTE: float ``[L, T, E]`` (for probabilities and entropy), or None.
          gates_LTk: float ``[L, T, k]`` (for the gate entropy), or None.
          tokens_T: int ``[T]`` token ids (for vocabulary specialization), or None.
          valid_T: bool ``[T]``; False tokens (padding) are ignored everywhere.
          labels: a group label for the whole chunk (e.g. a domain name), or ``[T]`` labels per
            token (e.g. the harmony channel), or None.
          continues: this chunk follows the previous one in the same sequence (the pair of
            neighbouring tokens across the boundary is counted); False starts a new sequence.
        """
        ids = np.asarray(expert_ids_LTk)
        L, T, k = ids.shape
        if (L, k) != (self.num_layers, self.k):
            raise ValueError(f"expected routings [L={self.num_layers}, T, k={self.k}], got {ids.shape}")
        valid = np.ones(T, bool) if valid_T is None else np.asarray(valid_T, bool).reshape(T)
        if not valid.all():
            ids = ids[:, valid]
            router_logits_LTE = None if router_logits_LTE is None else np.asarray(router_logits_LTE)[:, valid]
            gates_LTk = None if gates_LTk is None else np.asarray(gates_LTk)[:, valid]
            tokens_T = None if tokens_T is None else np.asarray(tokens_T).reshape(T)[valid]
            if labels is not None and np.ndim(labels) == 1 and len(labels) == T:
                labels = np.asarray(labels)[valid]
        T = ids.shape[1]
        if not continues:
            self._last = None
        if T == 0:
            return
        E = self.num_experts
        self.tokens += T
        self.load += M.expert_counts(ids, E)
        self.first_load += M.expert_counts(ids, E, first_only=True)
        if router_logits_LTE is not None:
            logp = M.router_log_probs(router_logits_LTE)  # one exp pass serves P_i and the entropy
            p = np.exp(logp)
            self.prob_sum += p.sum(1, dtype=np.float64)
            self.entropy_sum -= np.sum(p * logp, axis=-1).sum(1, dtype=np.float64)
            self.logit_tokens += T
        if gates_LTk is not None:
            self.gate_entropy_sum += M.gate_entropy(gates_LTk).sum(1)
            self.gate_tokens += T
        if self.cross_layer:
            self.pair_counts += M.cross_layer_counts(ids, E)
        else:
            self.pair_counts += M.coactivation_counts(ids, E)
        self.transition_counts += M.transition_counts(ids, E)
        # Neighbouring tokens, including the pair across the chunk boundary.
        joined = ids if self._last is None else np.concatenate([self._last[:, None], ids], axis=1)
        pairs, same, shared = M.consecutive_counts(joined)
        self.pairs += pairs
        self.same_first += same
        self.any_shared += shared
        self._last = ids[:, -1].copy()
        if tokens_T is not None and self.vocab_layers:
            self._add_tokens(np.asarray(tokens_T).reshape(T), ids[list(self.vocab_layers)])
        if labels is not None:
            if np.ndim(labels) == 0:
                self._add_group(labels, M.expert_counts(ids, E))
            else:
                labels = np.asarray(labels)
                for label in np.unique(labels):
                    self._add_group(label.item(), M.expert_counts(ids, E, valid=(labels == label)[None]))

    def add_groups(self, expert_ids_LTk: np.ndarray, labels, *, valid_T: np.ndarray | None = None,
                   halves_ST: np.ndarray | None = None) -> None:
        """Add routings to group loads only (a token may belong to several groupings: call once per grouping).

        Args:
          expert_ids_LTk: int ``[L, T, k]`` (routings already given to :meth:`update`).
          labels: one label for all T tokens (any hashable that is not a list or array, e.g.
            ``("effort", "high")``), or a list / array of T labels, None for a token in no group.
          valid_T: bool ``[T]``; False tokens are ignored.
          halves_ST: int ``[S, T]`` of 0/1: S random splits of the tokens into two halves, kept per
            group in ``group_halves`` for the baseline of :meth:`compare_groups`.
        """
        ids = np.asarray(expert_ids_LTk)
        L, T, k = ids.shape
        if (L, k) != (self.num_layers, self.k):
            raise ValueError(f"expected routings [L={self.num_layers}, T, k={self.k}], got {ids.shape}")
        per_token = isinstance(labels, list | np.ndarray)
        if per_token and len(labels) != T:
            raise ValueError(f"labels: expected one label per token ({T}), got {len(labels)}")
        halves = None if halves_ST is None else np.asarray(halves_ST).reshape(-1, T)
        valid = np.ones(T, bool) if valid_T is None else np.asarray(valid_T, bool).reshape(T)
        groups: dict[object, np.ndarray] = {}
        if per_token:
            for t, label in enumerate(labels):
                if label is not None and valid[t]:
                    groups.setdefault(label.item() if isinstance(label, np.generic) else label, []).append(t)
            groups = {g: np.isin(np.arange(T), ts) for g, ts in groups.items()}
        elif labels is not None:
            groups = {labels: valid}
        E = self.num_experts
        for label, mask in groups.items():
            self._add_group(label, M.expert_counts(ids, E, valid=mask[None]))
            if halves is not None:
                split = np.stack([np.stack([M.expert_counts(ids, E, valid=(mask & (h == side))[None])
                                            for side in (0, 1)]) for h in halves])
                if label in self.group_halves:
                    self.group_halves[label] += split
                else:
                    self.group_halves[label] = split

    def update_trace(self, trace, labels=None, continues: bool = True) -> None:
        """Add an ``oss_jax.trace.Trace`` (a ``[T]`` one, or each row of a ``[B, T]`` one as its own sequence)."""
        if trace.tokens.ndim == 2:
            for b in range(trace.tokens.shape[0]):
                row_labels = labels[b] if labels is not None and np.ndim(labels) == 2 else labels
                self.update(trace.expert_ids[:, b], None if trace.router_logits is None else trace.router_logits[:, b],
                            gates_LTk=None if trace.gates is None else trace.gates[:, b], tokens_T=trace.tokens[b],
                            valid_T=trace.valid[b], labels=row_labels, continues=False)
            return
        self.update(trace.expert_ids, trace.router_logits, gates_LTk=trace.gates, tokens_T=trace.tokens,
                    valid_T=trace.valid, labels=labels, continues=continues)

    def _rows(self, token_ids: np.ndarray) -> np.ndarray:
        """Rows of ``_token_counts`` for distinct token ids, allocating (and growing) as needed."""
        rows = np.empty(len(token_ids), np.int64)
        for i, tok in enumerate(np.asarray(token_ids).tolist()):
            row = self._row_of.get(tok)
            if row is None:
                row = self._row_of[tok] = len(self._row_of)
            rows[i] = row
        n, cap = len(self._row_of), self._token_counts.shape[0]
        if n > cap:  # grow by doubling: amortised O(1) per new id
            grown = np.zeros((max(n, 2 * cap, 64), *self._token_counts.shape[1:]), np.int32)
            grown[:cap] = self._token_counts
            self._token_counts = grown
        return rows

    def _add_tokens(self, tokens_T: np.ndarray, ids_lTk: np.ndarray) -> None:
        uniq, counts_lnE = M.token_expert_counts(tokens_T, ids_lTk, self.num_experts)
        rows = self._rows(uniq)
        self._token_counts[rows] += counts_lnE.transpose(1, 0, 2).astype(np.int32)  # rows are distinct

    def _add_group(self, label, counts_LE: np.ndarray) -> None:
        if label not in self.group_load:
            self.group_load[label] = np.zeros_like(self.load)
        self.group_load[label] += counts_LE

    def merge(self, other: RoutingStats) -> RoutingStats:
        """Add another accumulator's sums (e.g. from another process or corpus shard) into this one.

        The consecutive-token state is not merged: the two runs are separate sequences.
        """
        for name in self._SUMS:
            getattr(self, name).__iadd__(getattr(other, name))
        self.tokens += other.tokens
        self.logit_tokens += other.logit_tokens
        self.gate_tokens += other.gate_tokens
        if other.vocab_layers != self.vocab_layers:
            raise ValueError(f"vocab_layers differ: {self.vocab_layers} vs {other.vocab_layers}")
        rows = self._rows(other.token_ids)  # may reallocate _token_counts: index it afterwards
        self._token_counts[rows] += other.token_counts
        for label, load in other.group_load.items():
            self._add_group(label, load)
        for label, split in other.group_halves.items():
            if label in self.group_halves:
                self.group_halves[label] = self.group_halves[label] + split
            else:
                self.group_halves[label] = split.copy()
        return self

    # -- saving and restoring (resumable runs) ------------------------------------------------------
    _SUMS = ("load", "first_load", "prob_sum", "entropy_sum", "gate_entropy_sum", "pair_counts", "transition_counts",
             "pairs", "same_first", "any_shared")

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything accumulated, as named numpy arrays (for ``np.savez``); :meth:`from_arrays` inverts it exactly."""
        labels, halves = list(self.group_load), list(self.group_halves)
        L, E = self.num_layers, self.num_experts
        out = {name: getattr(self, name) for name in self._SUMS}
        out.update(shape=np.array([L, E, self.k]), vocab_layers=np.array(self.vocab_layers, np.int64),
                   cross_layer=np.array(self.cross_layer), counters=np.array([self.tokens, self.logit_tokens,
                                                                              self.gate_tokens]),
                   token_ids=self.token_ids, token_counts=self.token_counts,
                   group_labels=np.array(json.dumps([_label_json(g) for g in labels])),
                   group_load=np.stack([self.group_load[g] for g in labels]) if labels else np.zeros((0, L, E)),
                   halves_labels=np.array(json.dumps([_label_json(g) for g in halves])),
                   group_halves=(np.stack([self.group_halves[g] for g in halves]) if halves
                                 else np.zeros((0, 0, 2, L, E), np.int64)),
                   last=np.zeros((0, self.k), np.int64) if self._last is None else self._last)
        return out

    @classmethod
    def from_arrays(cls, arrays) -> RoutingStats:
        """The accumulator :meth:`to_arrays` saved (``arrays``: that dict, or an open ``np.load`` of it)."""
        L, E, k = (int(x) for x in arrays["shape"])
        stats = cls(L, E, k, vocab_layers=[int(x) for x in arrays["vocab_layers"]],
                    cross_layer=bool(arrays["cross_layer"]))
        for name in cls._SUMS:
            setattr(stats, name, np.array(arrays[name], getattr(stats, name).dtype))
        stats.tokens, stats.logit_tokens, stats.gate_tokens = (int(x) for x in arrays["counters"])
        ids = np.asarray(arrays["token_ids"])
        stats._row_of = {int(t): i for i, t in enumerate(ids.tolist())}
        stats._token_counts = np.array(arrays["token_counts"], np.int32).reshape(len(ids), len(stats.vocab_layers), E)
        for label, load in zip(json.loads(str(arrays["group_labels"])), arrays["group_load"], strict=True):
            stats.group_load[_label_from_json(label)] = np.array(load, np.int64)
        for label, split in zip(json.loads(str(arrays["halves_labels"])), arrays["group_halves"], strict=True):
            stats.group_halves[_label_from_json(label)] = np.array(split, np.int64)
        last = np.asarray(arrays["last"])
        stats._last = last.copy() if last.size else None
        return stats

    # -- reading -----------------------------------------------------------------------------------
    @property
    def token_ids(self) -> np.ndarray:
        """int64 ``[n]``: the distinct token ids seen, in order of first appearance."""
        return np.fromiter(self._row_of.keys(), np.int64, len(self._row_of))

    @property
    def token_counts(self) -> np.ndarray:
        """int32 ``[n, len(vocab_layers), E]``: routings of each token id to each expert."""
        return self._token_counts[:len(self._row_of)]

    @property
    def coactivation_counts(self) -> np.ndarray:
        """int64 ``[L, E, E]``: ``N(i, j)`` per layer."""
        if not self.cross_layer:
            return self.pair_counts
        return np.stack([self.pair_counts[a, a] for a in range(self.num_layers)])

    def summary(self, min_count: int = 5) -> dict[str, object]:
        """Every routing metric, per layer where it applies (numpy arrays; see ``oss_jax.metrics``).

        Keys: ``load`` (fractions ``[L, E]``), ``cv``, ``max_vio``, ``switch_loss``, ``entropy``,
        ``gate_entropy`` (``[L]`` means, nats), ``coactivation`` ``[L, E, E]``,
        ``cross_layer`` ``[L, L, E, E]`` (if kept), ``consecutive_first``, ``consecutive_any`` ``[L]``,
        ``vocab_specialization`` ``[len(vocab_layers)]`` (mean over token ids seen at least
        ``min_count`` times, weighted by occurrences), ``domain_specialization`` ``{label: [L]}``,
        ``baselines`` (uniformly random routing), ``tokens``.
        """
        E, k = self.num_experts, self.k
        out: dict[str, object] = {"tokens": self.tokens, "load": M.load_fractions(self.load),
                                  "cv": M.coefficient_of_variation(self.load), "max_vio": M.max_violation(self.load)}
        if self.logit_tokens:
            out["switch_loss"] = M.switch_loss(self.load, self.prob_sum / self.logit_tokens)
            out["entropy"] = self.entropy_sum / self.logit_tokens
        if self.gate_tokens:
            out["gate_entropy"] = self.gate_entropy_sum / self.gate_tokens
        out["coactivation"] = M.coactivation(self.coactivation_counts)
        if self.cross_layer:
            out["cross_layer"] = M.cross_layer_cooccurrence(self.pair_counts)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["consecutive_first"] = self.same_first / self.pairs
            out["consecutive_any"] = self.any_shared / self.pairs
        if len(self._row_of):
            counts = self.token_counts.transpose(1, 0, 2)  # [l, n, E]
            ids, spec = M.vocabulary_specialization(self.token_ids, counts, k, min_count=min_count)
            occ = counts.sum(-1)[:, np.isin(self.token_ids, ids)] / k
            out["vocab_specialization"] = (spec * occ).sum(-1) / np.maximum(occ.sum(-1), 1)
        out["domain_specialization"] = {g: M.domain_specialization(c, k) for g, c in self.group_load.items()}
        first, anyk = M.consecutive_baseline(E, k)
        out["baselines"] = {"cv": M.cv_baseline(max(self.tokens, 1), E, k), "entropy": math.log(E),
                            "gate_entropy": math.log(k), "switch_loss": 1.0,
                            "coactivation": M.coactivation_baseline(E, k),
                            "specialization": M.specialization_baseline(E, k), "cross_layer": k / E,
                            "consecutive_first": first, "consecutive_any": anyk}
        return out

    def js_divergence(self, label_a, label_b) -> np.ndarray:
        """``[L]``: Jensen-Shannon divergence (bits) between two groups' expert distributions."""
        return M.js_divergence(self.group_load[label_a], self.group_load[label_b])

    def compare_groups(self, label_a, label_b) -> tuple[np.ndarray, np.ndarray]:
        """``(js [L], baseline [L])``: :meth:`js_divergence` of two groups and ``metrics.js_halves_baseline``,
        the JS two random halves of their pooled tokens show, rescaled to the groups' sizes (NaN
        without ``group_halves``)."""
        js = self.js_divergence(label_a, label_b)
        if label_a not in self.group_halves or label_b not in self.group_halves:
            return js, np.full(self.num_layers, np.nan)
        return js, M.js_halves_baseline(self.group_halves[label_a], self.group_halves[label_b])


def _label_json(label):
    """A group label as JSON (tuples become lists)."""
    if isinstance(label, tuple | list):
        return [_label_json(x) for x in label]
    if isinstance(label, np.generic):
        return label.item()
    if label is None or isinstance(label, str | int | float | bool):
        return label
    raise ValueError(f"group label {label!r} cannot be saved: use str, int or tuples of them")


def _label_from_json(value):
    """Inverse of :func:`_label_json` (lists become tuples)."""
    return tuple(_label_from_json(x) for x in value) if isinstance(value, list) else value


class SinkStats:
    """Sums of sink mass ``[L, T, N]`` by layer and head, and by layer and position bin.

    Args:
      num_layers, num_heads: L, N.
      edges: position bin edges for the by-position means (default: powers of two up to 2^17,
        i.e. bins [0,1), [1,2), [2,4), ... so short and 128k-long contexts both read well).
    """

    def __init__(self, num_layers: int, num_heads: int, edges: np.ndarray | None = None):
        self.edges = np.concatenate([[0], 2 ** np.arange(18)]) if edges is None else np.asarray(edges)
        P = len(self.edges) - 1
        self.queries = 0
        self.sum_LN = np.zeros((num_layers, num_heads))
        self.sum_LP = np.zeros((num_layers, P))
        self.count_P = np.zeros(P)

    def update(self, sink_mass_LTN: np.ndarray, positions_T: np.ndarray) -> None:
        """Add one chunk: sink mass ``[L, T, N]`` of queries at ``positions [T]`` (negative: padding)."""
        x = np.asarray(sink_mass_LTN)
        pos = np.asarray(positions_T).reshape(-1)
        keep = pos >= 0
        if not keep.all():
            x, pos = x[:, keep], pos[keep]
        self.queries += len(pos)
        self.sum_LN += x.sum(1, dtype=np.float64)
        which = np.searchsorted(self.edges, pos, side="right") - 1
        inside = (which >= 0) & (which < len(self.edges) - 1)
        P = len(self.count_P)
        self.count_P += np.bincount(which[inside], minlength=P)
        head_mean = x.mean(-1, dtype=np.float64)
        for layer in range(x.shape[0]):
            self.sum_LP[layer] += np.bincount(which[inside], weights=head_mean[layer, inside], minlength=P)

    def update_trace(self, trace) -> None:
        """Add an ``oss_jax.trace.Trace`` (rows of a ``[B, T]`` one one by one)."""
        if trace.tokens.ndim == 2:
            for b in range(trace.tokens.shape[0]):
                self.update(trace.sink_mass[:, b], trace.positions[b])
        else:
            self.update(trace.sink_mass, trace.positions)

    def by_head(self) -> np.ndarray:
        """``[L, N]`` mean sink mass (as ``metrics.sink_mass_by_head``)."""
        return self.sum_LN / max(self.queries, 1)

    def by_layer_type(self, sliding_L: np.ndarray) -> dict[str, float]:
        """``{"sliding": ..., "full": ...}`` means (as ``metrics.sink_mass_by_layer_type``)."""
        by_layer = self.by_head().mean(-1)
        s = np.asarray(sliding_L, bool)
        return {"sliding": float(by_layer[s].mean()) if s.any() else math.nan,
                "full": float(by_layer[~s].mean()) if (~s).any() else math.nan}

    def by_position(self) -> tuple[np.ndarray, np.ndarray]:
        """``(edges [P + 1], mean over heads [L, P])`` (as ``metrics.sink_mass_by_position``)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.edges, self.sum_LP / self.count_P


# -- routing drift: the same tokens through two models -------------------------------------------------------
@dataclasses.dataclass
class RoutingDrift:
    """How routing moved between two models on the same tokens (``L`` layers, ``E`` experts).

    Attributes:
      load_before, load_after: float ``[L, E]``: the share of the tokens' expert slots each expert took.
      js: float ``[L]``: Jensen-Shannon divergence (bits, 0 to 1) between the two loads.
      grew: int ``[L, n]``: the ``n`` experts whose share grew most, most first (ties: lower id first).
      growth: float ``[L, n]``: their share after minus before.
      changed: float ``[L]``: the fraction of tokens whose set of top-k experts is not the same.
      kept: float ``[L]``: the mean share of a token's k experts that both models chose
        (``metrics.router_saturation``: 1 = no change).
      tokens: the number of tokens compared.
    """

    load_before: np.ndarray
    load_after: np.ndarray
    js: np.ndarray
    grew: np.ndarray
    growth: np.ndarray
    changed: np.ndarray
    kept: np.ndarray
    tokens: int

    @property
    def changed_overall(self) -> float:
        """The fraction of (token, layer) top-k choices that changed (every layer sees the same tokens)."""
        return float(np.mean(self.changed))

    def table(self) -> str:
        """A markdown table, one row per layer."""
        lines = ["| layer | JS (bits) | top-k changed | experts kept | grew most (share before -> after) |",
                 "|---|---|---|---|---|"]
        for layer in range(len(self.js)):
            grew = ", ".join(f"{e} ({self.load_before[layer, e]:.1%} -> {self.load_after[layer, e]:.1%})"
                             for e in self.grew[layer])
            lines.append(f"| {layer} | {self.js[layer]:.4f} | {self.changed[layer]:.1%} | {self.kept[layer]:.1%} | "
                         f"{grew} |")
        return "\n".join(lines)


def drift(expert_ids_before: np.ndarray, expert_ids_after: np.ndarray, num_experts: int, *,
          valid: np.ndarray | None = None, top: int = 3) -> RoutingDrift:
    """:class:`RoutingDrift` from two routings of the same tokens: int ``[L, ..., k]`` each (``[L, T, k]``, or
    ``[L, B, T, k]`` from a batched trace); ``valid`` bool ``[...]`` (``[T]`` or ``[B, T]``): tokens to count."""
    a, b = np.asarray(expert_ids_before), np.asarray(expert_ids_after)
    if a.shape != b.shape or a.ndim < 3:
        raise ValueError(f"drift needs two routings [L, T, k] of the same tokens, got shapes {a.shape} and {b.shape}")
    L, k = a.shape[0], a.shape[-1]
    a, b = a.reshape(L, -1, k), b.reshape(L, -1, k)
    mask = np.ones(a.shape[1], bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    if mask.shape[0] != a.shape[1]:
        raise ValueError(f"valid: expected {a.shape[1]} tokens, got {mask.shape[0]}")
    a, b = a[:, mask], b[:, mask]
    if not 1 <= top <= num_experts:
        raise ValueError(f"top must be in [1, {num_experts}], got {top}")
    before, after = M.load_fractions(M.expert_counts(a, num_experts)), M.load_fractions(M.expert_counts(b, num_experts))
    delta = after - before
    grew = np.argsort(-delta, axis=-1, kind="stable")[:, :top]
    T = a.shape[1]
    changed = np.any(np.sort(a, -1) != np.sort(b, -1), -1).mean(-1) if T else np.full(L, np.nan)
    return RoutingDrift(before, after, M.js_divergence(before, after), grew, np.take_along_axis(delta, grew, -1),
                        changed, M.router_saturation(a, b) if T else np.full(L, np.nan), T)


def routing_drift(before, after, sequences: Sequence[Sequence[int]], *, select: Sequence[np.ndarray] | None = None,
                  batch: int = 16, top: int = 3) -> RoutingDrift:
    """Trace the same ``sequences`` (o200k ids, as ``trace`` takes them) through two models and compare
    their routing (:func:`drift`).

    Args:
      before, after: two ``GptOss`` of the same shape (e.g. the base model and the fine-tuned one, adapters
        included); neither is modified.
      sequences: token sequences of any lengths, read whole (teacher forcing): both models see exactly the
        same inputs, so every difference comes from the weights.
      select: per sequence, a bool array of its length: the tokens to count (e.g. the reply's); default all.
      batch: sequences per traced batch (padded to the longest sequence: one compiled shape per model).
      top: how many of the most-grown experts to keep per layer.
    """
    from oss_jax.trace import trace

    seqs = [np.asarray(s, np.int64).reshape(-1) for s in sequences]
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("routing_drift needs at least one sequence, and no empty one")
    for name, model in (("before", before), ("after", after)):
        cfg = model.config
        if (cfg.num_hidden_layers, cfg.num_experts, cfg.experts_per_token) != (
                before.config.num_hidden_layers, before.config.num_experts, before.config.experts_per_token):
            raise ValueError(f"routing_drift: {name} has {cfg.num_hidden_layers} layers of {cfg.num_experts} experts "
                             f"(top-{cfg.experts_per_token}), unlike the other model")
    if select is not None:
        if len(select) != len(seqs) or any(np.shape(m) != s.shape for m, s in zip(select, seqs, strict=False)):
            raise ValueError("routing_drift: select needs one bool array per sequence, of its length")
    width = max(len(s) for s in seqs)
    pad = int(seqs[0][0])  # any token the models know: padding is masked by its position -1
    ids_a, ids_b, valid = [], [], []
    for start in range(0, len(seqs), batch):
        group = seqs[start:start + batch]
        tokens = np.full((batch, width), pad, np.int64)
        positions = np.full((batch, width), -1, np.int64)
        keep = np.zeros((batch, width), bool)
        for i, s in enumerate(group):
            tokens[i, :len(s)], positions[i, :len(s)] = s, np.arange(len(s))
            keep[i, :len(s)] = True if select is None else np.asarray(select[start + i], bool)
        positions[len(group):, 0] = 0  # a padding row still needs one position (trace refuses an all -1 batch)
        for model, out in ((before, ids_a), (after, ids_b)):
            t = trace(model, tokens, positions=positions, router=True, sinks=False, residual=False, next_token=False)
            out.append(t.expert_ids)  # [L, B, T, k]
        valid.append(keep)
    return drift(np.concatenate(ids_a, 1), np.concatenate(ids_b, 1), before.config.num_experts,
                 valid=np.concatenate(valid), top=top)
