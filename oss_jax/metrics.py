"""Routing and attention metrics for mixture-of-experts models, each with its formula and source.

Conventions. Routings are ``expert_ids [..., T, k]`` (int, first choice first, as
``oss_jax.trace.Trace.expert_ids``): the token axis is the second-to-last, any leading axes (for
instance layers ``L``) are kept. ``valid [..., T]`` (bool, broadcastable) drops padding tokens.
A "routing" is one (token, chosen expert) pair, so T tokens make ``T * k`` routings.

Two kinds of functions:

* counting functions (``*_counts``) turn routings into integer counts. Counts add up, so a long
  run can be counted chunk by chunk (``oss_jax.routing.RoutingStats`` does) and never holds
  ``layers x tokens x experts`` numbers at once;
* metric functions turn counts (or small arrays) into the numbers papers report, next to their
  baseline under uniformly random routing where one exists (``*_baseline``).

A note on gpt-oss's router: it takes the top-k of the E router logits and applies the softmax to
those k logits only (SPEC.md §2), so its gates never involve the other E - k experts. The
"router probabilities" below (:func:`router_probs`, :func:`routing_entropy`, the ``P_i`` of
:func:`switch_loss`) are the softmax over all E logits, which gpt-oss itself never computes; it
is the distribution the load-balancing literature works with. :func:`gate_entropy` is the
entropy of the gates gpt-oss actually uses.

Sources:
  [Switch]  Fedus, Zoph, Shazeer. Switch Transformers. JMLR 2022 (arXiv:2101.03961), eq. 4-6.
  [LossFree] Wang, Gao, Zhao, Sun, Dai. Auxiliary-Loss-Free Load Balancing Strategy for
            Mixture-of-Experts. arXiv:2408.15664, 2024 (MaxVio).
  [OLMoE]   Muennighoff et al. OLMoE: Open Mixture-of-Experts Language Models. arXiv:2409.02060,
            2024, section 5: 5.1 router saturation, 5.2 co-activation, 5.3 domain and 5.4 vocabulary
            specialization.
  [Mixtral] Jiang et al. Mixtral of Experts. arXiv:2401.04088, 2024, section 5 (routing analysis,
            Table 5: repeated assignments of consecutive tokens).
  [JS]      Lin. Divergence measures based on the Shannon entropy. IEEE Trans. Inf. Theory 1991.
  [Sinks]   Xiao, Tian, Chen, Han, Lewis. Efficient Streaming Language Models with Attention
            Sinks. ICLR 2024 (arXiv:2309.17453); gpt-oss learns one sink logit per head.
  [Lens]    nostalgebraist. Interpreting GPT: the logit lens. LessWrong, 2020.
  [MI]      Cover, Thomas. Elements of Information Theory, 2nd ed. Wiley 2006, section 2.4 (mutual
            information); its finite-sample bias: Miller 1955, Panzeri and Treves, Network 7, 1996.
  [NMI]     Strehl, Ghosh. Cluster Ensembles. JMLR 3, 2002, eq. 2 (MI / sqrt(H(X) H(Y))).
  [Jaccard] Jaccard. The distribution of the flora in the alpine zone. New Phytologist 11, 1912.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oss_jax import boundary

# -- helpers ---------------------------------------------------------------------------------------


def _valid_tokens(expert_ids: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """bool ``[..., T]`` of the routings' token axes (all True without a mask)."""
    shape = np.shape(expert_ids)[:-1]
    return np.ones(shape, bool) if valid is None else np.broadcast_to(np.asarray(valid, bool), shape)


def _one_hot_sum(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """``[..., T, k]`` ids -> ``[..., T, E]`` 0/1 (a token chooses k distinct experts)."""
    ids = np.asarray(expert_ids)
    out = np.zeros((*ids.shape[:-1], num_experts), np.float32)
    np.put_along_axis(out, ids, 1.0, axis=-1)
    return out


# -- counting ------------------------------------------------------------------------------------------


def expert_counts(expert_ids: np.ndarray, num_experts: int, valid: np.ndarray | None = None,
                  first_only: bool = False) -> np.ndarray:
    """Expert load: ``N(i)``, the number of routings to expert i, summed over the token axis.

    Args:
      expert_ids: int ``[..., T, k]``.
      num_experts: E.
      valid: bool ``[..., T]`` (broadcastable); False tokens are not counted.
      first_only: count first choices only (one routing per token).

    Returns int64 ``[..., E]``.
    """
    ids = np.asarray(expert_ids)
    if first_only:
        ids = ids[..., :1]
    mask = _valid_tokens(ids, valid)
    lead = ids.shape[:-2]
    flat = ids.reshape(-1, *ids.shape[-2:])
    m = mask.reshape(-1, mask.shape[-1])
    out = np.zeros((flat.shape[0], num_experts), np.int64)
    for r in range(flat.shape[0]):  # one bincount per leading index (layers): fast and exact
        out[r] = np.bincount(flat[r][m[r]].reshape(-1), minlength=num_experts)
    return out.reshape(*lead, num_experts)


def coactivation_counts(expert_ids: np.ndarray, num_experts: int, valid: np.ndarray | None = None) -> np.ndarray:
    """``N(i, j)``: the number of tokens whose top-k contains both experts i and j.

    The diagonal ``N(i, i)`` is the number of tokens routed to i (:func:`expert_counts`).

    Args:
      expert_ids: int ``[..., T, k]``; valid: bool ``[..., T]``.

    Returns int64 ``[..., E, E]``, symmetric.
    """
    onehot = _one_hot_sum(expert_ids, num_experts) * _valid_tokens(expert_ids, valid)[..., None]
    # float32 sums of 0/1 are exact below 2^24 tokens per call.
    return np.rint(np.einsum("...ti,...tj->...ij", onehot, onehot)).astype(np.int64)


def cross_layer_counts(expert_ids_LTk: np.ndarray, num_experts: int, valid: np.ndarray | None = None) -> np.ndarray:
    """``C[a, b, i, j]``: tokens routed to expert i at layer a and to expert j at layer b.

    One Gram matrix of the tokens' ``[T, L*E]`` routing indicators, so the diagonal blocks
    ``C[a, a]`` are the co-activation counts of layer a.

    Args:
      expert_ids_LTk: int ``[L, T, k]``; valid: bool ``[T]``.

    Returns int64 ``[L, L, E, E]``.
    """
    L, T, _ = np.shape(expert_ids_LTk)
    onehot_LTE = _one_hot_sum(expert_ids_LTk, num_experts)
    if valid is not None:
        onehot_LTE *= np.asarray(valid, bool).reshape(1, T, 1)
    M = onehot_LTE.transpose(1, 0, 2).reshape(T, L * num_experts)
    gram = np.rint(M.T @ M).astype(np.int64)  # exact below 2^24 tokens per call
    return gram.reshape(L, num_experts, L, num_experts).transpose(0, 2, 1, 3)


def token_expert_counts(tokens_T: np.ndarray, expert_ids: np.ndarray, num_experts: int,
                        valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per vocabulary item: how often its occurrences were routed to each expert.

    Args:
      tokens_T: int ``[T]`` token ids; expert_ids: int ``[..., T, k]``; valid: bool ``[T]``.

    Returns ``(ids [n], counts [..., n, E])``: the n distinct token ids (sorted) and int64 counts
    ``N(x, i)``; ``counts.sum(-1) == k * occurrences``.
    """
    ids = np.asarray(expert_ids)
    tokens = np.asarray(tokens_T).reshape(-1)
    keep = np.ones(tokens.shape, bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    uniq, row = np.unique(tokens[keep], return_inverse=True)
    kept = ids[..., keep, :]  # [..., T', k]
    lead = kept.shape[:-2]
    flat = kept.reshape(-1, *kept.shape[-2:])
    n, E = len(uniq), num_experts
    out = np.empty((flat.shape[0], n, E), np.int64)
    for r in range(flat.shape[0]):
        index = row[:, None] * E + flat[r]  # (token row, expert) -> one bin
        out[r] = np.bincount(index.reshape(-1), minlength=n * E).reshape(n, E)
    return uniq, out.reshape(*lead, n, E)


def consecutive_counts(expert_ids: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Counts behind :func:`consecutive_same_expert` over pairs of neighbouring tokens (t-1, t).

    Returns int64 ``(pairs, same_first, any_shared)``, each ``[...]``: the number of pairs with
    both tokens valid, those with equal first choices, and those whose top-k sets intersect.
    """
    ids = np.asarray(expert_ids)
    mask = _valid_tokens(ids, valid)
    both = mask[..., 1:] & mask[..., :-1]
    prev, cur = ids[..., :-1, :], ids[..., 1:, :]
    same_first = (prev[..., 0] == cur[..., 0]) & both
    shared = np.any(prev[..., :, None] == cur[..., None, :], axis=(-1, -2)) & both
    return both.sum(-1).astype(np.int64), same_first.sum(-1).astype(np.int64), shared.sum(-1).astype(np.int64)


# -- load balance --------------------------------------------------------------------------------


def load_fractions(counts: np.ndarray) -> np.ndarray:
    """``f_i = N(i) / sum_j N(j)``: each expert's share of the routings (``[..., E]`` -> ``[..., E]``).

    Uniform routing gives ``1/E`` everywhere.
    """
    counts = np.asarray(counts, np.float64)
    return counts / np.maximum(counts.sum(-1, keepdims=True), 1e-300)


def coefficient_of_variation(counts: np.ndarray) -> np.ndarray:
    """``CV = std_i N(i) / mean_i N(i)`` (population std over the E experts); ``[..., E]`` -> ``[...]``.

    0 for perfectly balanced load. Under uniformly random routing of T tokens each ``N(i)`` is
    Binomial(T, k/E), so CV is about ``sqrt((1 - k/E) / (T k/E))`` (:func:`cv_baseline`), not 0.
    """
    counts = np.asarray(counts, np.float64)
    return counts.std(-1) / np.maximum(counts.mean(-1), 1e-300)


def cv_baseline(tokens: int, num_experts: int, k: int) -> float:
    """Expected CV of uniformly random top-k routing of ``tokens`` tokens: ``sqrt((1 - k/E) / (T k / E))``."""
    p = k / num_experts
    return math.sqrt((1 - p) / (tokens * p))


def max_violation(counts: np.ndarray) -> np.ndarray:
    """MaxVio ``= max_i N(i) / mean_i N(i) - 1`` [LossFree, section 4.1]; ``[..., E]`` -> ``[...]``.

    How far the busiest expert is above a perfectly balanced load (0 = balanced; 1 = twice the mean).
    """
    counts = np.asarray(counts, np.float64)
    return counts.max(-1) / np.maximum(counts.mean(-1), 1e-300) - 1.0


def router_log_probs(router_logits: np.ndarray) -> np.ndarray:
    """Log-softmax over all E router logits, ``[..., E]`` -> ``[..., E]``.

    Computed in the input's precision (at least float32): float32 logits, as the model returns,
    stay float32, which halves the memory and time of long runs; float64 stays float64.
    """
    x = np.asarray(router_logits)
    x = x.astype(np.result_type(x.dtype, np.float32), copy=False)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def router_probs(router_logits: np.ndarray) -> np.ndarray:
    """Softmax over all E router logits, ``[..., E]`` -> ``[..., E]`` (precision as :func:`router_log_probs`).

    Not what gpt-oss mixes with (its gates are a softmax over the top-k logits only, see module
    docstring); this is the router distribution of the load-balancing and entropy literature.
    """
    return np.exp(router_log_probs(router_logits))


def switch_loss(counts: np.ndarray, mean_probs: np.ndarray) -> np.ndarray:
    """Switch Transformer load-balancing loss ``E * sum_i f_i P_i`` [Switch, eq. 4] (without ``alpha``).

    Args:
      counts: ``[..., E]`` routings per expert; ``f_i = N(i) / sum_j N(j)`` (for top-1 routing
        this is Switch's "fraction of tokens dispatched to expert i"; for top-k each token
        contributes k routings, so ``sum_i f_i = 1`` still holds).
      mean_probs: ``[..., E]``: ``P_i``, the mean over tokens of the full-softmax router
        probability of expert i (:func:`router_probs` averaged over the token axis).

    Returns ``[...]``: 1.0 under uniform routing (``f_i = P_i = 1/E``), up to E when one expert
    takes everything. (Implementations that count ``1{i in top-k}`` per token, whose ``f`` sums
    to k, report k times this value.)
    """
    f = load_fractions(counts)
    P = np.asarray(mean_probs, np.float64)
    return f.shape[-1] * np.sum(f * P, axis=-1)


# -- entropy -----------------------------------------------------------------------------------------


def routing_entropy(router_logits: np.ndarray) -> np.ndarray:
    """Per-token entropy (nats) of the full router softmax: ``H = -sum_i p_i log p_i``, ``[..., E]`` -> ``[...]``.

    From ``log E`` (indifferent router) down to 0 (all mass on one expert). Over the full softmax
    of the E logits, not gpt-oss's top-k gates (see :func:`gate_entropy`). A ``-inf`` logit (an expert
    masked by ``prune.mask_experts``) has p = 0 and adds nothing.
    """
    logp = router_log_probs(router_logits)
    return -np.sum(np.exp(logp) * np.where(np.isneginf(logp), 0, logp), axis=-1)


def gate_entropy(gates: np.ndarray) -> np.ndarray:
    """Entropy (nats) of gpt-oss's gates, the softmax over the top-k logits: ``[..., k]`` -> ``[...]``.

    Between 0 (one expert does all the mixing) and ``log k`` (equal weights).
    """
    g = np.asarray(gates, np.float64)
    return -np.sum(np.where(g > 0, g * np.log(np.where(g > 0, g, 1.0)), 0.0), axis=-1)


def next_token_entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy (nats) of the next-token distribution ``softmax(logits)``: ``[..., V]`` -> ``[...]``."""
    return routing_entropy(logits)


# -- co-activation -------------------------------------------------------------------------------------


def coactivation(counts: np.ndarray) -> np.ndarray:
    """Co-activation ``N(i, j) / N(i)`` [OLMoE, section 5.2]: ``[..., E, E]`` -> ``[..., E, E]``.

    Row i: of the tokens routed to expert i, the fraction also routed to expert j (``counts``
    from :func:`coactivation_counts`; its diagonal is ``N(i)``). The diagonal of the result is 1;
    rows of experts never used are NaN. Random baseline: :func:`coactivation_baseline`.
    """
    counts = np.asarray(counts, np.float64)
    diag = np.diagonal(counts, axis1=-2, axis2=-1)[..., :, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(diag > 0, counts / diag, np.nan)


def coactivation_baseline(num_experts: int, k: int) -> float:
    """``(k - 1) / (E - 1)``: ``N(i, j) / N(i)`` for uniformly random top-k sets (i != j)."""
    return (k - 1) / (num_experts - 1)


def cross_layer_cooccurrence(counts_LLEE: np.ndarray) -> np.ndarray:
    """``P(expert j at layer b | expert i at layer a) = C[a, b, i, j] / N_a(i)``.

    The cross-layer analogue of OLMoE's co-activation: with ``counts`` from
    :func:`cross_layer_counts`, ``N_a(i) = C[a, a, i, i]``. ``[L, L, E, E]`` -> ``[L, L, E, E]``
    (rows of unused experts are NaN). For independent random routing every entry with
    ``a != b`` is ``k / E`` (:func:`specialization_baseline`); large entries mark expert
    "paths" through the network.
    """
    counts = np.asarray(counts_LLEE, np.float64)
    L = counts.shape[0]
    n_LE = np.stack([np.diagonal(counts[a, a]) for a in range(L)])  # [L, E]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_LE[:, None, :, None] > 0, counts / n_LE[:, None, :, None], np.nan)


# -- cross-layer consistency -------------------------------------------------------------------------


def transition_counts(expert_ids_LTk: np.ndarray, num_experts: int, valid: np.ndarray | None = None) -> np.ndarray:
    """``C[l, i, j]``: tokens routed to expert i at layer l and to expert j at layer l + 1.

    The blocks ``cross_layer_counts(...)[l, l + 1]`` alone (``RoutingStats.transition_counts`` reads
    them from its cross-layer counts). A token adds one to each of its ``k * k`` pairs of choices, so
    every ``C[l]`` sums to ``k^2 T``.

    Args:
      expert_ids_LTk: int ``[L, T, k]``; valid: bool ``[T]``.

    Returns int64 ``[L - 1, E, E]``.
    """
    onehot = _one_hot_sum(expert_ids_LTk, num_experts) * _valid_tokens(expert_ids_LTk, valid)[..., None]
    return np.rint(np.einsum("lti,ltj->lij", onehot[:-1], onehot[1:])).astype(np.int64)  # exact below 2^24


def transition_probs(counts: np.ndarray) -> np.ndarray:
    """Transition matrix ``P(j at layer l+1 | i at layer l) = C[i, j] / sum_j' C[i, j']``: ``[..., E, E]``.

    Row i: where the tokens routed to expert i go next (rows sum to 1; unused experts' rows are NaN).
    It is :func:`cross_layer_cooccurrence` divided by k. Without any link between the layers every row
    is the next layer's load (:func:`load_fractions`), ``1/E`` for uniformly random routing.
    """
    counts = np.asarray(counts, np.float64)
    rows = counts.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, counts / rows, np.nan)


def _joint(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Joint ``P [..., E, E]`` and marginals ``[..., E, 1]``, ``[..., 1, E]`` of counts."""
    c = np.asarray(counts, np.float64)
    P = c / np.maximum(c.sum((-1, -2), keepdims=True), 1e-300)
    return P, P.sum(-1, keepdims=True), P.sum(-2, keepdims=True)


def _h_bits(p: np.ndarray, axes) -> np.ndarray:
    """Shannon entropy in bits of ``p`` summed over ``axes``."""
    return -np.sum(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0), axis=axes)


def mutual_information(counts: np.ndarray) -> np.ndarray:
    """Mutual information in **bits** of a contingency table [MI]: ``[..., E, E]`` -> ``[...]``.

    ``I(X; Y) = sum_ij P(i, j) log2(P(i, j) / (P(i) P(j)))`` with ``P = C / sum C``. For
    :func:`transition_counts` X is one of a token's k experts at layer l and Y one of its k at layer
    l + 1, each picked uniformly (the table counts all ``k^2`` pairs): 0 when the next layer's choice
    does not depend on this one's (the product of the marginals), at most ``min(H(X), H(Y))``. The
    plug-in estimate from T tokens is biased upwards, so compare with :func:`mutual_information_baseline`
    rather than with 0, or read :func:`normalized_mutual_information`.
    """
    P, px, py = _joint(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(P > 0, P * np.log2(np.where(P > 0, P, 1.0) / np.where(P > 0, px * py, 1.0)), 0.0)
    return np.maximum(terms.sum((-1, -2)), 0.0)


def marginal_entropies(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(H(X), H(Y))``: entropies (bits) of a table's row and column marginals, ``[..., E, E]`` -> ``[...]`` twice."""
    _, px, py = _joint(counts)
    return _h_bits(px, (-1, -2)), _h_bits(py, (-1, -2))


def normalized_mutual_information(counts: np.ndarray) -> np.ndarray:
    """``NMI = I(X; Y) / sqrt(H(X) H(Y))`` [NMI], in [0, 1] (unitless): ``[..., E, E]`` -> ``[...]``.

    0 for independent layers, 1 when each determines the other (possible only for k = 1: with k > 1
    the k^2 pairs of a token include pairs that carry no information). NaN when a layer has a
    single expert (zero entropy).
    """
    hx, hy = marginal_entropies(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return mutual_information(counts) / np.sqrt(hx * hy)


def mutual_information_baseline(load_LE: np.ndarray, tokens: int, k: int, *, samples: int = 4, seed: int = 0,
                                max_tokens: int = 8192) -> np.ndarray:
    """Expected :func:`mutual_information` (bits) of layers l, l + 1 routed independently: ``[L, E]`` -> ``[L - 1]``.

    The plug-in MI of T finite samples is positive even for independent variables (about
    ``(E - 1)^2 / (2 T ln 2)`` bits for k = 1 [MI]; less for k > 1, whose k^2 pairs per token are not
    independent samples). This simulates it: each layer routes ``tokens`` tokens on its own, k experts
    drawn without replacement in proportion to the observed load (Gumbel top-k, which reproduces the
    load approximately), ``samples`` times with a fixed ``seed`` (deterministic). The bias falls as
    1/T, so more than ``max_tokens`` tokens are simulated as ``max_tokens`` and scaled by
    ``max_tokens / tokens``. NaN for ``tokens == 0``.
    """
    load = np.asarray(load_LE, np.float64)
    L, E = load.shape
    if tokens <= 0:
        return np.full(L - 1, np.nan)
    T = min(tokens, max_tokens)
    logp = np.log(np.maximum(load_fractions(load), 1e-12))
    rng = np.random.default_rng(seed)
    out = np.zeros(L - 1)
    for _ in range(samples):
        prev = None
        for layer in range(L):  # one layer's [T, E] draws at a time
            ids = np.argpartition(-(logp[layer] + rng.gumbel(size=(T, E))), k - 1, axis=-1)[:, :k]
            if prev is not None:
                out[layer - 1] += mutual_information(transition_counts(np.stack([prev, ids]), E)[0])
            prev = ids
    return out / samples * (T / tokens)


# -- specialization ----------------------------------------------------------------------------------


def specialization_per_expert(counts: np.ndarray, k: int) -> np.ndarray:
    """OLMoE's specialization of expert i to a token id (or domain) x: ``N(x, i) / N(x)`` [OLMoE, 5.3, 5.4].

    ``N(x, i)``: occurrences of x routed to expert i (among the top k); ``N(x)``: occurrences of x,
    i.e. ``sum_i N(x, i) / k``. ``[..., E]`` -> ``[..., E]``, each entry in [0, 1], summing to k.
    Random baseline ``k / E``.
    """
    counts = np.asarray(counts, np.float64)
    occurrences = counts.sum(-1, keepdims=True) / k
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts / occurrences


def specialization(counts: np.ndarray, k: int) -> np.ndarray:
    """The fraction of x's routings that go to x's k most used experts, ``[..., E]`` -> ``[...]``.

    ``S(x) = sum_{i in top_k(N(x, .))} N(x, i) / (k N(x))``: the mean of OLMoE's per-expert
    specialization (:func:`specialization_per_expert`) over x's k most specialized experts. 1 when
    every occurrence of x goes to the same k experts; ``k / E`` for uniformly random routing
    (:func:`specialization_baseline`), biased upwards for small ``N(x)`` (a token seen once scores 1:
    filter rare items, see :func:`vocabulary_specialization`). x is a token id for vocabulary
    specialization and a domain (source of text) for domain specialization.
    """
    counts = np.asarray(counts, np.float64)
    top = -np.sort(-counts, axis=-1)[..., :k]
    with np.errstate(invalid="ignore", divide="ignore"):
        return top.sum(-1) / counts.sum(-1)


def specialization_baseline(num_experts: int, k: int) -> float:
    """``k / E``: the share of routings any k fixed experts receive under uniformly random routing."""
    return k / num_experts


def vocabulary_specialization(token_ids: np.ndarray, counts: np.ndarray, k: int,
                              min_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Vocabulary specialization [OLMoE, 5.4] per token id, from :func:`token_expert_counts`.

    Args:
      token_ids: ``[n]``; counts: ``[..., n, E]`` (leading axes such as layers are kept).
      k: experts per token.
      min_count: drop ids with fewer occurrences (their score is biased towards 1).

    Returns ``(ids [n'], S [..., n'])`` with S as in :func:`specialization`.
    """
    counts = np.asarray(counts)
    occurrences = counts.sum(-1) // k
    keep = np.all(occurrences >= min_count, axis=tuple(range(occurrences.ndim - 1)))
    return np.asarray(token_ids)[keep], specialization(counts[..., keep, :], k)


def domain_specialization(domain_counts: np.ndarray, k: int) -> np.ndarray:
    """Domain specialization [OLMoE, 5.3] summarised per domain: :func:`specialization` of the
    expert counts of all tokens of a domain (``[..., E]`` per domain, e.g. ``[D, L, E]``).

    Use :func:`specialization_per_expert` for OLMoE's per-expert bars.
    """
    return specialization(domain_counts, k)


# -- sequences -----------------------------------------------------------------------------------------


def consecutive_same_expert(expert_ids: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Repeated assignment of neighbouring tokens [Mixtral, section 5, Table 5].

    Over pairs of consecutive tokens (t-1, t): ``first = P(first choice of t == first choice of
    t-1)`` and ``any = P(top-k of t and top-k of t-1 share an expert)``. Mixtral's "first or second
    choice" column is ``any`` for k = 2. Compare with :func:`consecutive_baseline`.

    Args:
      expert_ids: int ``[..., T, k]``; valid: bool ``[..., T]``.

    Returns ``(first [...], any [...])`` rates.
    """
    pairs, same, shared = consecutive_counts(expert_ids, valid)
    with np.errstate(invalid="ignore", divide="ignore"):
        return same / pairs, shared / pairs


def consecutive_baseline(num_experts: int, k: int) -> tuple[float, float]:
    """Rates of :func:`consecutive_same_expert` for independent uniformly random routing.

    ``first = 1/E``; ``any = 1 - C(E-k, k) / C(E, k)`` (probability that two random k-subsets of
    E intersect: 0.464 for Mixtral's E=8, k=2; 0.431 for gpt-oss-20b's E=32, k=4).
    """
    return 1.0 / num_experts, 1.0 - math.comb(num_experts - k, k) / math.comb(num_experts, k)


def router_saturation(expert_ids_a: np.ndarray, expert_ids_b: np.ndarray,
                      valid: np.ndarray | None = None) -> np.ndarray:
    """Router saturation [OLMoE, section 5.1]: the share of top-k experts two routers agree on.

    ``sat = mean_x |topk_a(x) & topk_b(x)| / k`` over the same tokens routed by two checkpoints
    (OLMoE: an intermediate checkpoint vs the final one). ``[..., T, k]`` twice -> ``[...]``.
    1 = identical choices; independent random routers give ``k / E``.
    """
    a, b = np.asarray(expert_ids_a), np.asarray(expert_ids_b)
    k = a.shape[-1]
    mask = _valid_tokens(a, valid)
    kept = np.sum(a[..., :, None] == b[..., None, :], axis=(-1, -2)) / k  # [..., T]
    return np.sum(kept * mask, -1) / np.maximum(mask.sum(-1), 1)


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence [JS] in bits: ``JS = KL(p || m)/2 + KL(q || m)/2``, ``m = (p + q)/2``.

    For two expert distributions over the last axis (counts are normalised first), e.g. the load
    of the analysis-channel tokens versus the final-channel tokens of a reasoning trace.
    ``[..., E]`` twice -> ``[...]`` in [0, 1]: 0 for equal distributions, 1 for disjoint support.
    """
    p, q = load_fractions(p), load_fractions(q)
    m = (p + q) / 2

    def kl(a):
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sum(np.where(a > 0, a * np.log2(np.where(a > 0, a, 1.0) / np.where(m > 0, m, 1.0)), 0.0), -1)

    return np.clip(kl(p) / 2 + kl(q) / 2, 0.0, 1.0)


def js_halves_baseline(halves_a: np.ndarray, halves_b: np.ndarray) -> np.ndarray:
    """The :func:`js_divergence` two groups would show if their label did not matter: ``[S, 2, ..., E]`` -> ``[...]``.

    ``halves_g[s, h]`` are group g's expert counts over the tokens that random split s put in half h
    (``RoutingStats.add_groups``, a fair coin per token). Pooling both groups, split s gives two
    random halves ``H0 = a[s, 0] + b[s, 0]``, ``H1 = a[s, 1] + b[s, 1]`` of the same tokens; their JS
    divergence is pure sampling noise. To second order, the JS of two samples of sizes n and m from
    one distribution is proportional to ``1/n + 1/m`` (``JS ~ sum_i (p_i - q_i)^2 / (8 m_i ln 2)``
    [JS]), so each split's JS is rescaled from the halves' sizes to the groups' sizes ``n_a``, ``n_b``
    (routings) and the S splits are averaged: the expected JS of two groups of these sizes under
    label-independent routing. Tokens are split one by one, so tokens of one prompt that route alike
    are treated as independent: a lower bound where a group's tokens come from a few prompts.
    """
    a, b = np.asarray(halves_a, np.float64), np.asarray(halves_b, np.float64)
    n_a, n_b = a[0].sum((0, -1)), b[0].sum((0, -1))  # every split holds all of a group's routings
    h0, h1 = a[:, 0] + b[:, 0], a[:, 1] + b[:, 1]
    m0, m1 = h0.sum(-1), h1.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = (1 / n_a + 1 / n_b) / (1 / m0 + 1 / m1)
        per_split = np.where((m0 > 0) & (m1 > 0), js_divergence(h0, h1) * scale, np.nan)
        used = (~np.isnan(per_split)).sum(0)
        return np.where(used > 0, np.nansum(per_split, 0) / used, np.nan)


def top_experts(counts: np.ndarray, n: int) -> np.ndarray:
    """The n most used experts of counts ``[..., E]`` -> int ``[..., n]`` (ties: lower expert id first)."""
    return np.argsort(-np.asarray(counts, np.float64), axis=-1, kind="stable")[..., :n]


def jaccard_top(counts_a: np.ndarray, counts_b: np.ndarray, n: int) -> np.ndarray:
    """Overlap of two fingerprints: Jaccard index [Jaccard] of their n most used experts, ``[..., E]`` -> ``[...]``.

    ``J = |A & B| / |A | B|`` with A, B the top-n experts (:func:`top_experts`) of each expert-count
    (or frequency) vector, e.g. the per-domain activation frequencies of one layer. 1 = the same n
    experts, 0 = disjoint. Under uniformly random routing the top-n sets are random n-subsets:
    :func:`jaccard_baseline`.
    """
    A, B = top_experts(counts_a, n), top_experts(counts_b, n)
    shared = np.sum(A[..., :, None] == B[..., None, :], axis=(-1, -2))
    return shared / (2 * n - shared)


def jaccard_baseline(num_experts: int, n: int) -> float:
    """Expected :func:`jaccard_top` of two independent uniformly random n-subsets of E experts.

    ``|A & B|`` is hypergeometric: ``P(x) = C(n, x) C(E - n, n - x) / C(E, n)``, and
    ``E[J] = sum_x P(x) x / (2n - x)`` (0.0750 for E = 32, n = 4; 0.158 for E = 16, n = 4).
    """
    E = num_experts
    return sum(math.comb(n, x) * math.comb(E - n, n - x) / math.comb(E, n) * x / (2 * n - x)
               for x in range(max(0, 2 * n - E), n + 1))


# -- attention sinks -------------------------------------------------------------------------------


def sink_mass_by_head(sink_mass_LTN: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Mean sink mass per layer and head [Sinks]: ``[L, T, N]`` -> ``[L, N]`` (over valid queries).

    The sink mass of head h at query t is ``exp(s_h) / (exp(s_h) + sum_k exp(l_tk))``, the
    probability gpt-oss's learned sink logit takes (``Trace.sink_mass``).
    """
    x = np.asarray(sink_mass_LTN, np.float64)
    w = np.ones(x.shape[1], bool) if valid is None else np.asarray(valid, bool)
    return x[:, w].mean(axis=1)


def sink_mass_by_layer_type(sink_mass_LTN: np.ndarray, sliding_L: np.ndarray,
                            valid: np.ndarray | None = None) -> dict[str, float]:
    """Mean sink mass over sliding-window layers and over full-attention layers.

    Returns ``{"sliding": ..., "full": ...}`` (NaN for a type without layers).
    """
    by_layer = sink_mass_by_head(sink_mass_LTN, valid).mean(-1)
    sliding = np.asarray(sliding_L, bool)
    return {"sliding": float(by_layer[sliding].mean()) if sliding.any() else math.nan,
            "full": float(by_layer[~sliding].mean()) if (~sliding).any() else math.nan}


def sink_mass_by_position(sink_mass_LTN: np.ndarray, positions_T: np.ndarray,
                          edges: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean sink mass (over heads) per layer against query position.

    Args:
      sink_mass_LTN: ``[L, T, N]``; positions_T: ``[T]`` (negative = padding, dropped).
      edges: position bin edges ``[P + 1]`` (bins ``[edges[p], edges[p + 1])``); default one bin
        per position.

    Returns ``(edges [P + 1], mean [L, P])`` (NaN for empty bins).
    """
    x = np.asarray(sink_mass_LTN, np.float64).mean(-1)  # [L, T]
    pos = np.asarray(positions_T)
    keep = pos >= 0
    x, pos = x[:, keep], pos[keep]
    if edges is None:
        edges = np.arange(pos.max() + 2) if pos.size else np.arange(1)
    edges = np.asarray(edges)
    which = np.searchsorted(edges, pos, side="right") - 1
    inside = (which >= 0) & (which < len(edges) - 1)
    P = len(edges) - 1
    sums = np.zeros((x.shape[0], P))
    counts = np.bincount(which[inside], minlength=P).astype(np.float64)
    for layer in range(x.shape[0]):
        sums[layer] = np.bincount(which[inside], weights=x[layer, inside], minlength=P)
    with np.errstate(invalid="ignore", divide="ignore"):
        return edges, sums / counts


# -- logit lens ------------------------------------------------------------------------------------


@dataclasses.dataclass
class LogitLens:
    """Logit lens over a residual stream ``[L + 1, T]`` (batch axes kept after the layer axis).

    Attributes:
      top_ids: int32 ``[L + 1, T, top]``: most likely next tokens read from each layer's residual.
      top_probs: float32 ``[L + 1, T, top]``: their probabilities.
      entropy: float32 ``[L + 1, T]``: entropy (nats) of each layer's next-token distribution.
      target_probs: float32 ``[L + 1, T]`` or None: probability of the given target tokens.
    """

    top_ids: np.ndarray
    top_probs: np.ndarray
    entropy: np.ndarray
    target_probs: np.ndarray | None


@functools.partial(jax.jit, static_argnums=0, static_argnames=("top",))
def _lens_rows(norm_def, norm_state, unembed_VD: jax.Array, x_ND: jax.Array, targets_N: jax.Array, top: int):
    # The final norm and the unembedding are passed in, not the model: plain jit arguments are
    # only read (nnx.jit would hand every parameter of the model back as a copy).
    x = nnx.merge(norm_def, norm_state)(x_ND.astype(unembed_VD.dtype))
    logits = jnp.einsum("nd,vd->nv", x, unembed_VD, preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    top_logp, top_ids = jax.lax.top_k(logp, top)
    target = jnp.take_along_axis(logp, targets_N[:, None], axis=-1)[:, 0]
    return top_ids, jnp.exp(top_logp), entropy, jnp.exp(target)


def logit_lens(model, residual: np.ndarray, *, top: int = 5, targets: np.ndarray | None = None,
               rows: int = 256) -> LogitLens:
    """The logit lens [Lens]: read each layer's residual stream as if it were the last one.

    ``logits_l = norm_f(residual_l) @ unembed.T``, the model's own final norm and unembedding
    applied to the stream after layer l (``residual[0]`` is the embeddings, ``residual[L]`` gives
    the model's actual output). Computed ``rows`` positions at a time, so the full
    ``[L + 1, T, V]`` logits (200k-token vocabulary) never exist at once.

    Args:
      model: the ``GptOss`` whose ``Trace.residual`` this is.
      residual: float ``[L + 1, ..., D]``.
      top: how many most likely tokens to keep per layer and position.
      targets: int ``[...]`` (the residual's shape without L and D), e.g. the actual next tokens or
        the model's final prediction: their probability at every layer is returned.
      rows: positions per compiled call.

    Returns a :class:`LogitLens`.
    """
    r = np.asarray(residual)
    lead, D = r.shape[:-1], r.shape[-1]
    flat = r.reshape(-1, D)
    n = flat.shape[0]
    tg = np.zeros(lead[1:], np.int32) if targets is None else np.asarray(targets, np.int32)
    tg = np.broadcast_to(tg, lead).reshape(-1)
    tg = boundary.to_model(model, tg, "targets")  # targets and top ids are user ids (o200k, small vocabulary)
    rows = min(rows, n)
    norm_def, norm_state = nnx.split(model.norm)
    unembed = model.unembed_VD[...]
    outs = []
    for start in range(0, n, rows):
        x, t = flat[start:start + rows], tg[start:start + rows]
        m = x.shape[0]
        if m < rows:  # one compiled shape
            x = np.pad(x, ((0, rows - m), (0, 0)))
            t = np.pad(t, (0, rows - m))
        out = _lens_rows(norm_def, norm_state, unembed, jnp.asarray(x), jnp.asarray(t), top=top)
        outs.append([np.asarray(o)[:m] for o in out])
    top_ids, top_probs, entropy, target = (np.concatenate(parts) for parts in zip(*outs, strict=True))
    top_ids = boundary.to_user(model, top_ids)
    return LogitLens(top_ids=top_ids.reshape(*lead, top), top_probs=top_probs.reshape(*lead, top),
                     entropy=entropy.reshape(lead), target_probs=None if targets is None else target.reshape(lead))
