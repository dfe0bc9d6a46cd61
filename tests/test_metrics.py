"""Routing metrics on constructed routings whose answers are known, and streaming = one shot.

* uniformly random routing: every metric at its random baseline (within a few standard errors);
* deterministic token -> experts routing: specialization 1, entropy 0, saturation 1;
* hand-built routings: exact co-activation, consecutive and load counts;
* sink mass: the formula on a hand-built attention case, and the blockwise identity used for
  long inputs (``1 - attention to values of 1``);
* ``RoutingStats`` / ``SinkStats`` fed in chunks equal the one-shot counts.

Pure numpy except the two attention checks (one small compile each).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from oss_jax import metrics as M
from oss_jax.routing import RoutingStats, SinkStats


def random_routing(rng, L, T, E, k, scale=1e-3):
    """Router logits of i.i.d. noise and their top-k: uniformly random ordered k-subsets."""
    logits = scale * rng.standard_normal((L, T, E))
    ids = np.argsort(-logits, axis=-1)[..., :k]
    return logits, ids


@pytest.fixture(scope="module")
def uniform():
    L, T, E, k = 6, 20000, 16, 3
    logits, ids = random_routing(np.random.default_rng(0), L, T, E, k)
    return logits, ids, E, k


def test_uniform_routing_sits_at_the_baselines(uniform):
    logits, ids, E, k = uniform
    L, T, _ = ids.shape
    counts = M.expert_counts(ids, E)
    assert counts.shape == (L, E) and (counts.sum(-1) == T * k).all()
    p = k / E  # each expert's count is Binomial(T, k/E)
    np.testing.assert_allclose(M.load_fractions(counts), 1 / E, atol=5 * math.sqrt(p * (1 - p) / T) / k)
    cv = M.coefficient_of_variation(counts)
    assert abs(cv.mean() / M.cv_baseline(T, E, k) - 1) < 0.3  # CV's own spread over 16 experts: ~18% / sqrt(6)
    assert (M.max_violation(counts) < 5 * M.cv_baseline(T, E, k)).all()
    np.testing.assert_allclose(M.switch_loss(counts, M.router_probs(logits).mean(1)), 1.0, atol=1e-2)
    np.testing.assert_allclose(M.routing_entropy(logits), math.log(E), atol=1e-5)

    rate = M.coactivation(M.coactivation_counts(ids, E))
    off = ~np.eye(E, dtype=bool)
    base = M.coactivation_baseline(E, k)
    np.testing.assert_allclose(np.diagonal(rate, axis1=1, axis2=2), 1.0)
    assert abs(rate[:, off].mean() - base) < 0.005 and np.abs(rate[:, off] - base).max() < 0.05

    cross = M.cross_layer_cooccurrence(M.cross_layer_counts(ids, E))
    other = cross[0, 1:]  # layer 0 against layers 1..L-1: independent, so k/E
    assert abs(other.mean() - k / E) < 0.005 and np.abs(other - k / E).max() < 0.05

    first, anyk = M.consecutive_same_expert(ids)
    base_first, base_any = M.consecutive_baseline(E, k)
    for rate_, b in ((first, base_first), (anyk, base_any)):
        assert np.abs(rate_ - b).max() < 5 * math.sqrt(b * (1 - b) / (T - 1))

    # Vocabulary specialization: 20 token ids seen ~1000 times each, routed at random.
    tokens = np.random.default_rng(1).integers(0, 20, T)
    uniq, tok_counts = M.token_expert_counts(tokens, ids, E)
    assert tok_counts.shape == (L, 20, E)
    _, spec = M.vocabulary_specialization(uniq, tok_counts, k, min_count=100)
    assert abs(spec.mean() - M.specialization_baseline(E, k)) < 0.02  # small upward bias of the max

    _, other_ids = random_routing(np.random.default_rng(2), L, T, E, k)
    np.testing.assert_allclose(M.router_saturation(ids, other_ids), k / E, atol=0.01)
    half = T // 2
    assert (M.js_divergence(M.expert_counts(ids[:, :half], E), M.expert_counts(ids[:, half:], E)) < 2e-3).all()


def test_deterministic_routing_is_fully_specialized():
    rng = np.random.default_rng(0)
    E, k, V, T = 8, 2, 30, 3000
    experts_of = np.stack([rng.permutation(E)[:k] for _ in range(V)])  # token id -> its k experts
    tokens = rng.integers(0, V, T)
    ids = experts_of[tokens][None]  # [1, T, k]
    logits = np.full((1, T, E), -50.0)
    np.put_along_axis(logits, ids[..., :1], 50.0, axis=-1)  # all mass on the first choice
    np.put_along_axis(logits, ids[..., 1:], 0.0, axis=-1)
    np.testing.assert_allclose(M.routing_entropy(logits), 0.0, atol=1e-12)
    uniq, counts = M.token_expert_counts(tokens, ids, E)
    _, spec = M.vocabulary_specialization(uniq, counts, k)
    np.testing.assert_allclose(spec, 1.0)
    per_expert = M.specialization_per_expert(counts, k)
    np.testing.assert_allclose(np.sort(per_expert, -1)[..., -k:], 1.0)  # its k experts get every occurrence
    np.testing.assert_allclose(M.router_saturation(ids, ids[..., ::-1]), 1.0)  # order within top-k is irrelevant
    # Two domains routed to disjoint expert sets: domain specialization 1, JS divergence 1 bit.
    a, b = np.tile([0, 1], (100, 1)), np.tile([2, 3], (50, 1))
    load_a, load_b = M.expert_counts(a, E), M.expert_counts(b, E)
    np.testing.assert_allclose(M.domain_specialization(np.stack([load_a, load_b]), k), 1.0)
    assert M.js_divergence(load_a, load_b) == pytest.approx(1.0)
    np.testing.assert_allclose(M.gate_entropy(np.array([[1.0, 0.0], [0.5, 0.5]])), [0.0, math.log(2)])


def test_hand_built_counts():
    ids = np.array([[0, 1], [0, 2], [1, 2], [0, 1]])  # 4 tokens, E = 3, k = 2
    np.testing.assert_array_equal(M.expert_counts(ids, 3), [3, 3, 2])
    np.testing.assert_array_equal(M.expert_counts(ids, 3, first_only=True), [3, 1, 0])
    counts = M.coactivation_counts(ids, 3)
    np.testing.assert_array_equal(counts, [[3, 2, 1], [2, 3, 1], [1, 1, 2]])
    np.testing.assert_allclose(M.coactivation(counts), [[1, 2 / 3, 1 / 3], [2 / 3, 1, 1 / 3], [1 / 2, 1 / 2, 1]])
    # Pairs (t-1, t): same first choice once (0 -> 0); top-k sets always intersect.
    first, anyk = M.consecutive_same_expert(ids)
    assert (first, anyk) == (pytest.approx(1 / 3), pytest.approx(1.0))
    valid = np.array([True, True, False, True])  # padding breaks both pairs around token 2
    assert M.consecutive_counts(ids, valid) == (1, 1, 1)
    # Layer 0 = ids, layer 1 = every token to experts {2, 0}: C[0, 1, i, j] = N_0(i) for j in {0, 2}.
    two = np.stack([ids, np.tile([2, 0], (4, 1))])
    cross = M.cross_layer_counts(two, 3)
    np.testing.assert_array_equal(cross[0, 0], counts)
    np.testing.assert_array_equal(cross[0, 1], [[3, 0, 3], [3, 0, 3], [2, 0, 2]])
    np.testing.assert_array_equal(cross[1, 0], cross[0, 1].T)
    np.testing.assert_allclose(M.cross_layer_cooccurrence(cross)[0, 1, 0], [1, 0, 1])

    load = np.array([2.0, 4.0, 6.0])
    assert M.max_violation(load) == pytest.approx(0.5)
    assert M.coefficient_of_variation(load) == pytest.approx(np.std([2, 4, 6]) / 4)
    assert M.switch_loss(np.array([5, 0, 0]), np.array([1.0, 0, 0])) == pytest.approx(3.0)  # = E when collapsed
    assert M.js_divergence(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == pytest.approx(
        -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)) - 0.5)  # H(m) - (H(p) + H(q)) / 2
    assert M.consecutive_baseline(8, 2) == (0.125, pytest.approx(1 - 15 / 28))  # Mixtral's 46%
    assert M.specialization(np.array([3, 1, 0, 0]), 1) == pytest.approx(0.75)


def test_sink_mass_hand_built():
    """One query, two visible keys, one masked by the window; logits chosen by hand."""
    import jax.numpy as jnp

    from oss_jax import attention

    H = 4  # scale 1/2
    q = np.zeros((1, 1, 2, H), np.float32)
    q[0, 0, 0, 0], q[0, 0, 1, 1] = 2.0, 4.0  # head 0, head 1 (same KV head)
    k = np.zeros((1, 3, 1, H), np.float32)
    k[0, :, 0, 0] = [5.0, 1.0, -1.0]  # head 0 logits: 5, 1, -1 (x 2 / 2)
    k[0, :, 0, 1] = [0.0, 0.5, 1.0]  # head 1 logits: 0, 1, 2
    sinks = np.array([0.5, -1.0], np.float32)
    q_pos, k_pos = np.array([[10]]), np.array([[7, 9, 10]])  # window 3: key at 7 is out of it
    probs, sink = attention.weights(jnp.asarray(q), jnp.asarray(k), jnp.asarray(sinks), jnp.asarray(q_pos),
                                    jnp.asarray(k_pos), 3)
    for h, visible in ((0, [1.0, -1.0]), (1, [1.0, 2.0])):
        denom = math.exp(sinks[h]) + sum(math.exp(x) for x in visible)
        assert float(sink[0, 0, h]) == pytest.approx(math.exp(sinks[h]) / denom, rel=1e-6)
        np.testing.assert_allclose(probs[0, 0, h], [0.0] + [math.exp(x) / denom for x in visible], rtol=1e-6)


def test_blockwise_sink_mass_identity():
    """Long inputs get the sink mass as 1 - (attention to values of 1): equal to the formula."""
    import jax
    import jax.numpy as jnp

    from oss_jax import attention

    rng = np.random.default_rng(0)
    B, T, N, K, H = 1, 40, 4, 2, 8
    q, k = 2 * rng.standard_normal((B, T, N, H), np.float32), rng.standard_normal((B, T, K, H), np.float32)
    sinks = 2 * rng.standard_normal(N).astype(np.float32)
    pos = np.arange(T)[None]

    @jax.jit
    def both(q, k, sinks, pos):
        ones = jnp.ones((B, T, K, H), jnp.float32)
        mass = 1.0 - attention.blockwise_causal(q, k, ones, sinks, pos, 8, block_q=8, block_k=8)[..., 0]
        return mass, attention.weights(q, k, sinks, pos, pos, 8)

    mass, (probs, sink) = both(q, k, sinks, pos)
    np.testing.assert_allclose(mass, sink, atol=1e-6)
    np.testing.assert_allclose(np.asarray(probs).sum(-1) + sink, 1.0, atol=1e-6)


def test_sink_mass_summaries():
    rng = np.random.default_rng(0)
    mass = rng.random((4, 50, 3))
    pos = np.arange(50)
    by_head = M.sink_mass_by_head(mass)
    np.testing.assert_allclose(by_head, mass.mean(1))
    types = M.sink_mass_by_layer_type(mass, np.array([True, False, True, False]))
    assert types["sliding"] == pytest.approx(by_head[[0, 2]].mean())
    _, by_pos = M.sink_mass_by_position(mass, pos, edges=np.array([0, 10, 50]))
    np.testing.assert_allclose(by_pos[:, 0], mass[:, :10].mean((1, 2)))
    np.testing.assert_allclose(by_pos[:, 1], mass[:, 10:].mean((1, 2)))


def test_streaming_equals_one_shot():
    rng = np.random.default_rng(0)
    L, T, E, k = 3, 1000, 8, 2
    logits, ids = random_routing(rng, L, T, E, k, scale=1.0)
    gates = np.exp(np.take_along_axis(logits, ids, -1))
    gates /= gates.sum(-1, keepdims=True)
    tokens = rng.integers(0, 50, T)
    valid = rng.random(T) > 0.05
    labels = np.where(np.arange(T) < 600, "analysis", "final")

    whole = RoutingStats(L, E, k)
    whole.update(ids, logits, gates_LTk=gates, tokens_T=tokens, valid_T=valid, labels=labels)
    chunked = RoutingStats(L, E, k)
    for start in range(0, T, 137):
        s = slice(start, start + 137)
        chunked.update(ids[:, s], logits[:, s], gates_LTk=gates[:, s], tokens_T=tokens[s], valid_T=valid[s],
                       labels=labels[s])
    for name in ("tokens", "load", "first_load", "pair_counts", "pairs", "same_first", "any_shared"):
        np.testing.assert_array_equal(getattr(chunked, name), getattr(whole, name), err_msg=name)
    for name in ("prob_sum", "entropy_sum", "gate_entropy_sum"):
        np.testing.assert_allclose(getattr(chunked, name), getattr(whole, name), rtol=1e-12, err_msg=name)
    order = np.argsort(chunked.token_ids)
    np.testing.assert_array_equal(chunked.token_ids[order], np.sort(whole.token_ids))
    np.testing.assert_array_equal(chunked.token_counts[order], whole.token_counts[np.argsort(whole.token_ids)])
    for label in ("analysis", "final"):
        np.testing.assert_array_equal(chunked.group_load[label], whole.group_load[label])

    # ... and the one-shot counting functions on the valid tokens (padding dropped = gaps closed).
    kept = ids[:, valid]
    np.testing.assert_array_equal(whole.load, M.expert_counts(kept, E))
    np.testing.assert_array_equal(whole.coactivation_counts, M.coactivation_counts(kept, E))
    np.testing.assert_array_equal(whole.pair_counts, M.cross_layer_counts(kept, E))
    assert tuple(whole.pairs) == tuple(M.consecutive_counts(kept)[0])
    _, counts = M.token_expert_counts(tokens, ids, E, valid=valid)
    np.testing.assert_array_equal(whole.token_counts[np.argsort(whole.token_ids)], counts.transpose(1, 0, 2))
    np.testing.assert_allclose(whole.entropy_sum, M.routing_entropy(logits[:, valid]).sum(1))
    np.testing.assert_array_equal(whole.group_load["final"], M.expert_counts(ids[:, valid & (labels == "final")], E))

    merged = RoutingStats(L, E, k).merge(chunked)
    np.testing.assert_array_equal(merged.pair_counts, whole.pair_counts)
    summary = chunked.summary(min_count=1)
    assert summary["load"].shape == (L, E) and summary["cross_layer"].shape == (L, L, E, E)
    np.testing.assert_allclose(chunked.js_divergence("analysis", "final"),
                               M.js_divergence(whole.group_load["analysis"], whole.group_load["final"]))

    mass = rng.random((L, T, 4))
    pos = np.where(valid, np.arange(T), -1)
    sinks = SinkStats(L, 4, edges=np.array([0, 100, 500, 1000]))
    for start in range(0, T, 137):
        sinks.update(mass[:, start:start + 137], pos[start:start + 137])
    np.testing.assert_allclose(sinks.by_head(), M.sink_mass_by_head(mass, valid))
    np.testing.assert_allclose(sinks.by_position()[1], M.sink_mass_by_position(mass, pos, sinks.edges)[1])


def test_plots_return_labelled_figures():
    """Smoke test: every plot builds a Figure with labelled axes (pixels are checked by eye)."""
    from matplotlib.figure import Figure

    from oss_jax import plots

    rng = np.random.default_rng(0)
    _, ids = random_routing(rng, 4, 30, 12, 2)
    decode = lambda toks: "".join(chr(97 + t % 26) for t in toks)
    lens_ids, lens_probs = rng.integers(0, 50, (5, 30)), rng.random((5, 30))
    figs = [plots.load_heatmap(M.expert_counts(ids, 12), sliding=np.arange(4) % 2 == 0),
            plots.coactivation_heatmap(M.coactivation(M.coactivation_counts(ids[1], 12)), layer=1),
            plots.expert_text(np.arange(30), ids[2, :, 0], decode, layer=2, num_experts=12, width=20),
            plots.sink_heatmap(rng.random((4, 6))),
            plots.logit_lens_grid(lens_ids, lens_probs, decode, tokens=np.arange(30)),
            plots.entropy_plot(rng.random(30), others={"routing": rng.random(30)}, regions=[(0, 10, "analysis")])]
    for fig in figs:
        assert isinstance(fig, Figure)
        ax = fig.axes[0]
        assert ax.get_title() or fig.get_suptitle()
        assert (ax.get_xlabel() and ax.get_ylabel()) or not ax.axison
    colors = plots.expert_colors(np.array([3] * 5 + [1] * 3 + list(range(20))))
    assert colors[3] == plots.EXPERT_COLORS[0] and colors[1] == plots.EXPERT_COLORS[1]
    assert len(colors) == 20 and list(colors.values()).count(plots.OTHER_COLOR) == 20 - len(plots.EXPERT_COLORS)
