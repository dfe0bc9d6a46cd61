"""Routing research metrics and the ``oss-jax routes`` report.

* cross-layer transitions and mutual information, fingerprint overlap (Jaccard) and group divergence
  against random halves, on constructed routings with known answers;
* the streamed report of the bundled tiny model equals a slow direct loop over its one-shot trace;
* the CLI end to end, resume = uninterrupted (stopped by ``stop_after`` and by Ctrl-C), refusals.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil

import numpy as np
import pytest
from test_errors import cli, one_line

import oss_jax
from oss_jax import harmony, routes
from oss_jax import metrics as M
from oss_jax.checkpoint import CheckpointError
from oss_jax.routing import RoutingStats
from oss_jax.trace import trace

CONV = [{"role": "user", "content": "What is 12 times 12?"},
        {"role": "assistant", "channel": "analysis", "content": "Twelve twelves: 120 plus 24 is 144."},
        {"role": "assistant", "channel": "final", "content": "144."}]
PROMPTS = [
    {"domain": "math", "text": "Two plus two is four, and three times three is nine."},
    {"domain": "math", "text": "The square root of 81 is 9; half of 9 is 4.5."},
    {"domain": "code", "text": "def add(a, b):\n    return a + b"},
    {"domain": "code", "text": "for i in range(10): print(i * i)"},
    {"domain": "code", "effort": "high", "messages": CONV},
    {"domain": "math", "effort": "low", "messages": [CONV[0], {**CONV[1], "content": "Easy: 144."}, CONV[2]]},
]
CHUNK = 64  # the conversations span two chunks


@pytest.fixture(scope="module")
def tiny():
    return oss_jax.load("tiny")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def full(tiny, corpus, tmp_path_factory):
    """One uninterrupted run of the report over ``corpus``."""
    out = tmp_path_factory.mktemp("routes") / "full"
    result = routes.routes(tiny, corpus, out, chunk=CHUNK, name="tiny")
    assert result.complete and result.prompts_done == len(PROMPTS)
    return out


# -- constructed routings ----------------------------------------------------------------------------------------
def test_transitions_and_mutual_information_by_hand():
    # layer 1 copies layer 0 (1 bit shared), layer 2 is independent of layer 1 (0 bits): k = 1, E = 2
    ids = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 1, 0, 1]])[..., None]
    C = M.transition_counts(ids, 2)
    np.testing.assert_array_equal(C, [[[2, 0], [0, 2]], [[1, 1], [1, 1]]])
    np.testing.assert_array_equal(C, np.stack([M.cross_layer_counts(ids, 2)[a, a + 1] for a in range(2)]))
    np.testing.assert_allclose(M.mutual_information(C), [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(M.normalized_mutual_information(C), [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(M.transition_probs(C), [[[1, 0], [0, 1]], [[0.5, 0.5], [0.5, 0.5]]])
    # k = 2: a token's 4 pairs; tokens on {0,1} -> {2,3} and {2,3} -> {0,1}: X determines the half of Y, 1 bit
    ids = np.array([[[0, 1], [2, 3]], [[2, 3], [0, 1]]])  # [L=2, T=2, k=2]
    C = M.transition_counts(ids, 4, valid=np.array([True, True]))
    assert C.sum() == 2 * 4 and C[0, 0, 2] == 1 and C[0, 0, 0] == 0
    np.testing.assert_allclose(M.mutual_information(C), [1.0])
    np.testing.assert_allclose(M.normalized_mutual_information(C), [0.5])  # H(X) = H(Y) = 2 bits
    assert M.transition_counts(ids, 4, valid=np.array([True, False])).sum() == 4


def test_mutual_information_baseline_is_the_finite_sample_bias():
    E, T = 8, 2000  # k = 1: the plug-in MI of independent variables is about (E-1)^2 / (2 T ln 2) bits
    base = M.mutual_information_baseline(np.ones((3, E)), T, 1, samples=16)
    assert base.shape == (2,)
    np.testing.assert_allclose(base, (E - 1) ** 2 / (2 * T * math.log(2)), rtol=0.1)
    # more tokens than simulated: scaled by 1/T; and independent layers measured directly sit at it
    np.testing.assert_allclose(M.mutual_information_baseline(np.ones((2, E)), 4 * T, 1, samples=16, max_tokens=T),
                               base[:1] / 4, rtol=0.1)
    rng = np.random.default_rng(5)
    ids = np.argsort(rng.random((2, T, 16)), -1)[..., :4]  # uniformly random top-4 of 16, twice
    measured = np.mean([M.mutual_information(M.transition_counts(np.argsort(rng.random((2, T, 16)), -1)[..., :4],
                                                                 16)) for _ in range(8)])
    expected = M.mutual_information_baseline(M.expert_counts(ids, 16), T, 4, samples=8)[0]
    assert abs(measured / expected - 1) < 0.15, (measured, expected)
    assert np.isnan(M.mutual_information_baseline(np.ones((2, E)), 0, 1)).all()


def test_jaccard_overlap_by_hand():
    a = np.array([5, 4, 3, 0, 0])
    b = np.array([0, 4, 6, 1, 1])  # top-2 {2, 1}; a's {0, 1}: J = 1/3
    assert M.jaccard_top(a, b, 2) == pytest.approx(1 / 3)
    assert M.jaccard_top(np.array([1, 1, 1, 0]), np.array([0, 1, 1, 1]), 2) == pytest.approx(1 / 3)  # ties: low id
    np.testing.assert_allclose(M.jaccard_top(np.stack([a, b]), np.stack([a, a]), 2), [1.0, 1 / 3])
    # baseline: every pair of 2-subsets of 6 experts, enumerated
    subsets = list(itertools.combinations(range(6), 2))
    exact = np.mean([len(set(x) & set(y)) / len(set(x) | set(y)) for x in subsets for y in subsets])
    assert M.jaccard_baseline(6, 2) == pytest.approx(exact)
    assert M.jaccard_baseline(4, 2) == pytest.approx(7 / 18)


def test_group_divergence_and_its_random_halves_baseline():
    L, E, k = 1, 8, 1
    stats = RoutingStats(L, E, k)
    ids = np.array([[0, 0, 1, 1, 0, 1]])[..., None]  # tokens 0, 1, 4 in group "a" (expert 0), 2, 3, 5 in "b"
    halves = np.array([[0, 1, 0, 1, 0, 1]])  # one split
    stats.add_groups(ids, ["a", "a", "b", "b", "a", "b"], halves_ST=halves)
    stats.add_groups(ids, ("all", 1), valid_T=np.array([1, 1, 1, 1, 1, 0], bool))
    np.testing.assert_array_equal(stats.group_load["a"], [[3, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(stats.group_load[("all", 1)], [[3, 2, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(stats.group_halves["b"][0, :, 0, :2], [[0, 1], [0, 2]])
    js, base = stats.compare_groups("a", "b")
    np.testing.assert_allclose(js, [1.0])  # disjoint experts: 1 bit
    # pooled halves: H0 = {0, 2, 4} -> [2, 1], H1 = {1, 3, 5} -> [1, 2]; sizes 3, 3 and groups 3, 3: no rescaling
    np.testing.assert_allclose(base, M.js_divergence(np.array([2, 1]), np.array([1, 2])))
    assert np.isnan(stats.compare_groups("a", ("all", 1))[1]).all()  # no halves kept for ("all", 1)
    with pytest.raises(ValueError, match=r"labels: expected one label per token \(6\), got 2"):
        stats.add_groups(ids, ["a", "b"])

    # label-independent routing: the mean JS of groups of 300 and 900 tokens is the baseline's mean
    rng = np.random.default_rng(0)
    E, k = 8, 2
    js_seen, baselines = [], []
    for _ in range(30):
        s = RoutingStats(1, E, k)
        for label, n in (("a", 300), ("b", 900)):
            s.add_groups(np.argsort(rng.random((1, n, E)), -1)[..., :k], label, halves_ST=rng.integers(0, 2, (8, n)))
        j, b = s.compare_groups("a", "b")
        js_seen.append(j[0])
        baselines.append(b[0])
    assert abs(np.mean(js_seen) / np.mean(baselines) - 1) < 0.15, (np.mean(js_seen), np.mean(baselines))


def test_routing_stats_save_and_restore_exactly():
    rng = np.random.default_rng(1)
    L, E, k, T = 3, 6, 2, 50
    stats = RoutingStats(L, E, k)
    ids = np.argsort(rng.random((L, T, E)), -1)[..., :k]
    stats.update(ids, rng.standard_normal((L, T, E)), tokens_T=rng.integers(0, 20, T))
    stats.add_groups(ids, ("domain", "x"), halves_ST=rng.integers(0, 2, (4, T)))
    stats.add_groups(ids, [("channel", "final") if t % 3 else None for t in range(T)])
    np.testing.assert_array_equal(stats.transition_counts, M.transition_counts(ids, E))
    np.testing.assert_array_equal(stats.transition_counts, [stats.pair_counts[a, a + 1] for a in range(L - 1)])
    back = RoutingStats.from_arrays(stats.to_arrays())
    for key, value in stats.to_arrays().items():
        np.testing.assert_array_equal(back.to_arrays()[key], value, err_msg=key)
    assert set(back.group_load) == {("domain", "x"), ("channel", "final")}
    back.update(ids[:, :5])  # the consecutive-token state came back too: the pair across the boundary counts
    assert back.pairs[0] == stats.pairs[0] + 5


# -- conversations and prompt files -------------------------------------------------------------------------------
def test_conversation_tokens_are_labelled_by_channel():
    ids, channels = routes.render_conversation(CONV, "high")
    text = harmony.decode(ids)
    assert "Reasoning: high" in text and ids[-1] == harmony.RETURN
    for channel, message in (("analysis", CONV[1]), ("final", CONV[2])):
        assert harmony.decode([t for t, c in zip(ids, channels, strict=True) if c == channel]) == message["content"]
    assert set(channels) == {None, "analysis", "final"}
    # an earlier turn's analysis is dropped (harmony's history rule), its final kept and labelled
    ids, channels = routes.render_conversation([*CONV, {"role": "user", "content": "And 13?"}], "low")
    assert "Twelve" not in harmony.decode(ids) and [c for c in channels if c] == ["final"] * 2


BAD_LINES = {
    "json": ('{"text": "ok"', "not valid JSON"),
    "key": ('{"text": "ok", "domian": "math"}', "unknown key 'domian'"),
    "both": ('{"text": "ok", "messages": []}', "either 'text' or 'messages' (a harmony conversation), not both"),
    "effort": ('{"messages": [{"role": "user", "content": "hi"}], "effort": "max"}', "'effort' must be one of"),
    "effort on text": ('{"text": "ok", "effort": "low"}', "'effort' applies to harmony conversations"),
    "role": ('{"messages": [{"role": "robot", "content": "hi"}]}', "message 0: unknown role 'robot'"),
    "list": ('["ok"]', "expected a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_malformed_prompt_line_is_refused_with_its_line_number(case, tmp_path):
    line, message = BAD_LINES[case]
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"^{path}:3: .*{message.replace('(', '.').replace(')', '.')}"):
        routes.read_prompts(path)


def test_prompt_files(tmp_path):
    text = tmp_path / "p.txt"
    text.write_bytes(b"first prompt\n\n  \nsecond \xff prompt\n")
    with pytest.raises(ValueError, match=rf"^{text}:4: not valid UTF-8 \(byte 0xff at column 8\)$"):
        routes.read_prompts(text)
    text.write_text("first prompt here\nsecond\n")
    first, second = routes.read_prompts(text, max_tokens=2)
    assert (first.line, second.line, first.length, len(first.tokens)) == (1, 2, 3, 2)
    assert first.domain is first.effort is first.channels is None
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match=r"empty\.txt: holds no prompts"):
        routes.read_prompts(tmp_path / "empty.txt")
    shipped = routes.read_prompts()
    domains = {p.domain for p in shipped}
    assert domains == {"math", "code", "science", "history", "everyday"}
    assert all(sum(p.domain == d and p.channels is None for p in shipped) >= 8 for d in domains)
    assert {p.effort for p in shipped if p.channels is not None} == {"low", "medium", "high"}


# -- the report on the tiny model ------------------------------------------------------------------------------------
def _js_bits(p, q):
    p, q = np.asarray(p, float) / sum(p), np.asarray(q, float) / sum(q)
    total = 0.0
    for a, b in zip(p, q, strict=True):
        m = (a + b) / 2
        total += (a * math.log2(a / m) if a else 0) / 2 + (b * math.log2(b / m) if b else 0) / 2
    return total


def test_report_equals_a_direct_loop_over_the_trace(tiny, corpus, full):
    """metrics.json of the chunked, streamed run = plain loops over one-shot traces of the same prompts."""
    got = json.loads((full / "metrics.json").read_text())
    prompts = routes.read_prompts(corpus)
    cfg = tiny.config
    L, E, k = cfg.num_hidden_layers, cfg.num_experts, cfg.experts_per_token
    n = max(len(p.tokens) for p in prompts)
    tokens = np.array([p.tokens + [p.tokens[0]] * (n - len(p.tokens)) for p in prompts])
    positions = np.array([list(range(len(p.tokens))) + [-1] * (n - len(p.tokens)) for p in prompts])
    with pytest.warns(UserWarning, match="not in this model's vocabulary"):
        t = trace(tiny, tokens, positions=positions, residual=False)
    C = np.zeros((L - 1, E, E))
    entropy = np.zeros(L)
    group = {}  # (family, name) -> [L, E] counts
    halves = {}  # (family, name) -> [S, 2, L, E] counts over each random split's halves
    total = 0
    for b, p in enumerate(prompts):
        coins = np.random.default_rng([routes.SEED, b]).integers(0, 2, (routes.SPLITS, len(p.tokens)))
        for pos in range(len(p.tokens)):
            total += 1
            labels = [("domain", p.domain), ("effort", p.effort),
                      ("channel", p.channels[pos] if p.channels else None)]
            for layer in range(L):
                logits = t.router_logits[layer, b, pos].astype(float)
                z = sum(math.exp(x - logits.max()) for x in logits)
                entropy[layer] -= sum(math.exp(x - logits.max()) / z * (x - logits.max() - math.log(z)) for x in logits)
                chosen = t.expert_ids[layer, b, pos]
                for label in labels:
                    if label[1] is not None:
                        group.setdefault(label, np.zeros((L, E)))[layer, chosen] += 1
                        for split in range(routes.SPLITS):
                            h = halves.setdefault(label, np.zeros((routes.SPLITS, 2, L, E)))
                            h[split, coins[split, pos], layer, chosen] += 1
                if layer + 1 < L:
                    for i in chosen:
                        for j in t.expert_ids[layer + 1, b, pos]:
                            C[layer, i, j] += 1
    assert got["tokens"] == total
    np.testing.assert_allclose(got["metrics"]["router_entropy"]["per_layer"], entropy / total, rtol=1e-5)
    mi = []
    for layer in range(L - 1):
        P = C[layer] / C[layer].sum()
        mi.append(sum(P[i, j] * math.log2(P[i, j] / (P[i].sum() * P[:, j].sum()))
                      for i in range(E) for j in range(E) if P[i, j] > 0))
    np.testing.assert_allclose(got["metrics"]["transition_mi"]["per_layer"], mi, rtol=1e-6)
    np.testing.assert_allclose(got["transitions"], C / C.sum(-1, keepdims=True), rtol=1e-6)
    for family in ("domain", "effort", "channel"):
        names = sorted(name for f, name in group if f == family)
        assert sorted(got["groups"][family]["frequency"]) == names
        for name in names:
            counts = group[(family, name)]
            np.testing.assert_allclose(got["groups"][family]["frequency"][name], counts / (counts[0].sum() / k))
        for a, b in itertools.combinations(names, 2):
            pair = got["groups"][family]["pairs"][f"{a} vs {b}"]
            ca, cb = group[(family, a)], group[(family, b)]
            np.testing.assert_allclose(pair["js"], [_js_bits(ca[i], cb[i]) for i in range(L)], atol=1e-12)
            top = [[set(sorted(range(E), key=lambda e, c=c[i]: (-c[e], e))[:k]) for i in range(L)] for c in (ca, cb)]
            np.testing.assert_allclose(pair["jaccard"], [len(x & y) / len(x | y) for x, y in zip(*top, strict=True)])
            ha, hb = halves[(family, a)], halves[(family, b)]
            expect = []
            for i in range(L):  # random halves of the pooled tokens, rescaled from their sizes to the groups'
                scaled = [_js_bits(ha[s, 0, i] + hb[s, 0, i], ha[s, 1, i] + hb[s, 1, i])
                          * (1 / ca[i].sum() + 1 / cb[i].sum())
                          / (1 / (ha[s, 0, i] + hb[s, 0, i]).sum() + 1 / (ha[s, 1, i] + hb[s, 1, i]).sum())
                          for s in range(routes.SPLITS)]
                expect.append(sum(scaled) / len(scaled))
            np.testing.assert_allclose(pair["js_baseline"], expect, rtol=1e-9)
    analyses = [p["messages"][1]["content"] for p in PROMPTS if "messages" in p]
    assert got["groups"]["channel"]["tokens"] == {"analysis": sum(len(harmony.encode(a)) for a in analyses),
                                                  "final": 2 * len(harmony.encode("144."))}
    assert set(got["groups"]["effort"]["tokens"]) == {"high", "low"}


def test_resume_equals_uninterrupted(tiny, corpus, full, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    first = routes.routes(tiny, corpus, out, chunk=CHUNK, name="tiny", stop_after=2)
    assert not first.complete and first.prompts_done == 2 and not (out / "metrics.json").exists()
    assert json.loads((out / "done.json").read_text())["prompts_done"] == 2
    calls = []
    real = routes._trace_prompt

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(routes, "_trace_prompt", interrupted)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C inside the 4th prompt: the 3rd is saved
        routes.routes(tiny, corpus, out, chunk=CHUNK, name="tiny")
    assert json.loads((out / "done.json").read_text())["prompts_done"] == 3
    monkeypatch.setattr(routes, "_trace_prompt", real)
    last = routes.routes(tiny, corpus, out, chunk=CHUNK, name="tiny")
    assert last.complete and last.prompts_done == len(PROMPTS)
    assert (out / "metrics.json").read_bytes() == (full / "metrics.json").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["done.json", "figures", "metrics.json", "report.md", "state.npz"]
    monkeypatch.setattr(routes, "_trace_prompt", lambda *args: pytest.fail("a finished run traced again"))
    written = {p: p.stat().st_mtime_ns for p in [*out.iterdir(), *(out / "figures").iterdir()]}
    again = routes.routes(tiny, corpus, out, chunk=CHUNK, name="tiny")  # all done: nothing traced or redrawn
    assert again.complete and again.prompts_done == len(PROMPTS) and again.tokens == last.tokens
    assert again.metrics == last.metrics
    assert {p: p.stat().st_mtime_ns for p in written} == written


def test_destinations_refused(tiny, corpus, full, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match=r"mine: already exists and is not an oss-jax routes report \(routes "
                                              r"writes only .*; it holds notes.txt\); not replaced: use another --out"):
        routes.routes(tiny, corpus, user, name="tiny")
    assert [p.name for p in user.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="file: is a file"):
        routes.routes(tiny, corpus, tmp_path / "file", name="tiny")
    other = tmp_path / "other"
    shutil.copytree(full, other)
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"other: holds a routes run with other settings \(effort: 'medium' there, "
                                         r"'high' now\); use another --out, or delete it to start over$"):
        routes.routes(tiny, corpus, other, chunk=CHUNK, name="tiny", effort="high")
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before
    (other / "done.json").unlink()
    with pytest.raises(CheckpointError, match=r"other: holds routes output but no done\.json"):
        routes.routes(tiny, corpus, other, chunk=CHUNK, name="tiny")


def test_cli_end_to_end(corpus, full, tmp_path):
    out = tmp_path / "cli"
    r = cli("routes", "--prompts", corpus, "--out", out, "--chunk", CHUNK, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {out / 'report.md'} (6 prompts, ")
    assert "are not in the model's vocabulary" in one_line(r.stderr)  # the tiny model: one summary line
    assert (out / "metrics.json").read_bytes() == (full / "metrics.json").read_bytes()
    report = (out / "report.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    for key in metrics["metrics"]:
        assert f"`{key}`" in report, key
    for words in ("Cross-layer routing consistency", "Domains: fingerprints and overlap", "Reasoning effort",
                  "Channel (analysis vs final)", "Jaccard", "REAP", "Super experts",
                  "code vs math", "analysis vs final"):
        assert words in report, words
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == sorted(routes.FIGURE_FILES)
    assert all(f"figures/{name}" in report for name in figures)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    r = cli("routes", "--prompts", bad, "--out", tmp_path / "never", "--no-progress")
    assert r.returncode == 1 and one_line(r.stderr) == f"oss-jax routes: error: {bad}:2: 'text' must be a non-empty " \
                                                        f"string, got 3"
    assert not (tmp_path / "never").exists()


def test_empty_stats_round_trip():
    """A run killed before its first prompt finished saved empty sums; they must load back (a
    20b-sized run killed while compiling could not resume)."""
    empty = RoutingStats(3, 8, 2)
    again = RoutingStats.from_arrays(empty.to_arrays())
    assert again.tokens == 0 and again.token_counts.shape == (0, 3, 8)
