"""Expert saliency (oss_jax.saliency), its recording (Recording.expert_outputs) and pruning (oss_jax.prune)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from reference import hf_logits, rel_err
from transformers import GptOssForCausalLM

import oss_jax
from oss_jax import metrics, prune
from oss_jax.layers import Recording
from oss_jax.moe import swiglu
from oss_jax.saliency import SaliencyStats, calibrate, frequency, reap_saliency, super_experts
from oss_jax.trace import Trace, trace, trace_chunks

TOKENS = np.random.default_rng(3).integers(0, 1031, 16).astype(np.int32)
DROP = [[0, 4], [1, 6], [2, 3], [5, 6]]  # the tiny model: 4 layers of 7 experts, top-3


@pytest.fixture(scope="module")
def model(mxfp4_dir):
    return oss_jax.load(mxfp4_dir, dtype="float32")


@pytest.fixture(scope="module")
def dense(mxfp4_dir):
    return oss_jax.load(mxfp4_dir, dtype="float32", experts="dense")


@pytest.fixture(scope="module")
def traced(model) -> Trace:
    return trace(model, TOKENS, expert_outputs=True)


# -- the metrics on hand-made routings --------------------------------------------------------------------------
def test_reap_and_frequency_by_hand():
    ids = np.array([[[0, 1], [0, 2]]])  # L=1, T=2, k=2
    gates = np.array([[[0.75, 0.25], [0.5, 0.5]]])
    norms = np.array([[[2.0, 4.0], [6.0, 8.0]]])
    # e0: (0.75*2 + 0.5*6) / 2; e1: 0.25*4; e2: 0.5*8; e3: never routed
    np.testing.assert_allclose(reap_saliency(ids, gates, norms, 4), [[2.25, 1.0, 4.0, 0.0]])
    np.testing.assert_allclose(frequency(ids, 4), [[1.0, 0.5, 0.5, 0.0]])
    with pytest.raises(ValueError, match=r"expert_ids hold values outside \[0, 2\)"):
        reap_saliency(ids, gates, norms, 2)


def test_super_experts_by_hand():
    ids = np.array([[0, 1], [2, 0], [1, 1], [0, 0]])[..., None]  # L=4, T=2, k=1
    peaks = np.array([[1.0, 2.0], [100.0, 3.0], [0.5, 0.7], [1000.0, 5.0]])[..., None]
    # first 3 layers: per-expert max [[1, 2, 0], [3, 0, 100], [0, 0.7, 0]]; P99.5 = 3 + 0.96 * 97 = 96.12 > 100 / 10
    assert super_experts(ids, peaks, 3) == [(1, 2, 100.0)]
    # all layers: P99.5 of 12 values = 100 + 0.945 * 900 = 950.5: only the 1000 of layer 3
    assert super_experts(ids, peaks, 3, layers_fraction=1.0) == [(3, 0, 1000.0)]
    with pytest.raises(ValueError, match=r"layers_fraction must be in \(0, 1\], got 0"):
        super_experts(ids, peaks, 3, layers_fraction=0)


# -- the recording --------------------------------------------------------------------------------------------
def _moe_inputs(model, tokens) -> list[np.ndarray]:
    """Each layer's MoE input ``[T, D]``, recomputed from the residual stream with the layers' own modules."""
    r = trace(model, tokens, router=False, sinks=False, residual=True).residual
    pos = jnp.arange(len(tokens), dtype=jnp.int32)[None]
    out = []
    for i, block in enumerate(model.layers):
        x = jnp.asarray(r[i])[None]
        x = x + block.attn(block.attn_norm(x), pos)[0]
        out.append(np.asarray(block.mlp_norm(x))[0])
    return out


def test_reap_from_recording_equals_direct_loop(model, traced):
    """Recorded norms -> reap_saliency equals a loop over tokens and chosen experts with plain math."""
    E = model.config.num_experts
    expect = np.zeros((len(model.layers), E))
    peak = np.zeros_like(traced.expert_max)
    for layer, (block, x_TD) in enumerate(zip(model.layers, _moe_inputs(model, TOKENS), strict=True)):
        ex = block.mlp.experts
        _, idx, gates = block.mlp.route(jnp.asarray(x_TD)[None])
        idx, gates = np.asarray(idx[0]), np.asarray(gates[0])
        np.testing.assert_array_equal(idx, traced.expert_ids[layer])
        w1_EDF2, w2_EFD = (np.asarray(w) for w in ex.weights(jnp.arange(E)))  # decoded once per layer
        b1_EF2, b2_ED = np.asarray(ex.gate_up_bias_EF2[...]), np.asarray(ex.down_bias_ED[...])
        sums, counts = np.zeros(E), np.zeros(E)
        for t in range(len(TOKENS)):
            for j, e in enumerate(idx[t]):
                h = x_TD[t] @ w1_EDF2[e] + b1_EF2[e]
                y = np.asarray(swiglu(h, ex.limit, ex.alpha)) @ w2_EFD[e] + b2_ED[e]
                sums[e] += gates[t, j] * np.linalg.norm(y)
                counts[e] += 1
                peak[layer, t, j] = np.abs(y).max()
        expect[layer] = np.divide(sums, counts, out=np.zeros(E), where=counts > 0)
    np.testing.assert_allclose(reap_saliency(traced.expert_ids, traced.gates, traced.expert_norms, E), expect,
                               rtol=1e-4)
    np.testing.assert_allclose(traced.expert_max, peak, rtol=1e-4)
    assert (expect == 0).any() and (expect > 0).sum() > 10  # some experts unrouted, most not


def test_recording_off_sows_nothing_and_changes_nothing(model, traced):
    plain = trace(model, TOKENS)  # router on, expert_outputs off
    assert plain.expert_norms is None and plain.expert_max is None
    np.testing.assert_array_equal(plain.next_token_entropy, traced.next_token_entropy)
    np.testing.assert_array_equal(plain.expert_ids, traced.expert_ids)
    # the module level: Recording(router=True) alone sows no expert_norms
    graphdef, state = nnx.split(model.layers[0].mlp)
    moe = nnx.merge(graphdef, state)
    moe.recording = Recording(expert_outputs=False)
    x = jax.random.normal(jax.random.key(0), (1, 5, model.config.hidden_size))
    _, inter = nnx.capture(lambda m, v: m(v), nnx.Intermediate)(moe, x)
    assert set(nnx.to_pure_dict(inter)) == {"router_logits", "expert_ids", "gates"}
    assert model.layers[0].mlp.recording is None  # tracing never touches the model


def test_flag_off_adds_nothing_to_the_program(model):
    """MoE's program with a Recording that records nothing is exactly the one without recording."""
    graphdef, state = nnx.split(model.layers[0].mlp)
    x = jnp.ones((1, 4, model.config.hidden_size))

    def program(recording: Recording | None) -> str:
        moe = nnx.merge(graphdef, state)
        moe.recording = recording
        g, s = nnx.split(moe)
        run = nnx.capture(lambda m, v: m(v), nnx.Intermediate)
        return str(jax.make_jaxpr(lambda s, v: run(nnx.merge(g, s), v))(s, x))

    off = program(None)
    assert program(Recording(router=False, expert_outputs=False)) == off
    assert program(Recording(router=False, expert_outputs=True)) != off


def test_streaming_equals_whole(model, traced):
    chunks = list(trace_chunks(model, TOKENS, chunk=10, expert_outputs=True))
    joined = Trace.concatenate(chunks)
    np.testing.assert_allclose(joined.expert_norms, traced.expert_norms, rtol=1e-5)
    stats = SaliencyStats(model.config.num_experts)
    for t in chunks:
        stats.update(t)
    E = model.config.num_experts
    np.testing.assert_allclose(stats.reap(), reap_saliency(traced.expert_ids, traced.gates, traced.expert_norms, E),
                               rtol=1e-5)
    np.testing.assert_allclose(stats.frequency(), frequency(traced.expert_ids, E))
    whole = super_experts(traced.expert_ids, traced.expert_max, E)
    assert [(a, b) for a, b, _ in stats.super_experts()] == [(a, b) for a, b, _ in whole]
    with pytest.raises(ValueError, match="needs a trace with router=True and expert_outputs=True"):
        SaliencyStats(E).update(trace(model, TOKENS))


# -- pruning --------------------------------------------------------------------------------------------------
def test_pruned_equals_masked_equals_direct(model):
    pruned, masked = prune.prune_experts(model, DROP), prune.mask_experts(model, DROP)
    assert pruned.config.num_experts == 5 and model.config.num_experts == 7 and masked.config.num_experts == 7
    assert pruned.layers[1].mlp.experts.gate_up_blocks.shape[0] == 5
    got = np.asarray(pruned(TOKENS[None]))
    np.testing.assert_allclose(got, np.asarray(masked(TOKENS[None])), rtol=0, atol=1e-5)
    assert np.abs(got - np.asarray(model(TOKENS[None]))).max() > 1e-3
    # one layer directly: router logits of the dropped experts set to -inf, top-k, softmax, the plain mixture
    layer = 1
    mlp = model.layers[layer].mlp
    x = jax.random.normal(jax.random.key(1), (1, 9, model.config.hidden_size))
    logits = mlp.route(x)[0].at[..., jnp.asarray(DROP[layer])].set(-jnp.inf)
    top, idx = jax.lax.top_k(logits, mlp.k)
    want = mlp.experts.reference(x[0], idx[0], jax.nn.softmax(top, axis=-1)[0])
    np.testing.assert_allclose(np.asarray(pruned.layers[layer].mlp(x)[0]), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert model.layers[layer].mlp.router_bias_E.shape == (7,)  # the input is untouched
    assert np.isfinite(np.asarray(model.layers[layer].mlp.router_bias_E[...])).all()


def test_pruned_saves_and_loads_in_transformers(dense, tmp_path):
    pruned = prune.prune_experts(dense, {i: d for i, d in enumerate(DROP)})
    want = np.asarray(pruned(TOKENS[None]))
    path = oss_jax.save(pruned, tmp_path / "pruned", mxfp4=False, float_dtype="float32")
    np.testing.assert_allclose(np.asarray(oss_jax.load(path, dtype="float32")(TOKENS[None])), want, rtol=0,
                               atol=1e-5)
    theirs = GptOssForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    assert theirs.config.num_local_experts == 5
    assert rel_err(want, hf_logits(theirs, TOKENS[None])) < 1e-4


def test_masked_model_is_not_saved(dense, tmp_path):
    # its -inf router bias would make a checkpoint that load refuses: save says what to do and writes nothing
    with pytest.raises(ValueError, match=r"layer 0's router bias has -inf .* save prune.prune_experts"):
        oss_jax.save(prune.mask_experts(dense, DROP), tmp_path / "masked")
    assert not (tmp_path / "masked").exists()


def test_lowest():
    scores = np.array([[3.0, 1.0, 2.0, 0.5], [0.0, 9.0, 0.0, 1.0]])
    assert prune.lowest(scores, 2) == [[1, 3], [0, 2]]
    with pytest.raises(ValueError, match=r"n must be in \[0, 4\]"):
        prune.lowest(scores, 5)


@pytest.mark.parametrize("drop, message", [
    ([[0], [1, 2], [3], [4]], r"every layer must drop the same number of experts \(one num_experts\), got counts "
                              r"\[1, 2, 1, 1\]"),
    ([[0, 1, 2, 3, 4]] * 4, r"dropping 5 of 7 experts leaves 2, fewer than experts_per_token \(3\)"),
    ({0: [1], 1: [1], 2: [1]}, r"drop must name every layer .*missing layers \[3\]"),
    ([[0], [7], [1], [1]], r"drop\[1\] names experts \[7\] outside \[0, 7\)"),
    ([[0, 0], [1, 2], [1, 2], [1, 2]], r"drop\[0\] names an expert twice"),
    ([[0]] * 3, r"drop must hold one list per layer \(4\), got 3"),
])
def test_prune_refusals(model, drop, message):
    # masking keeps E, so its layers may drop different numbers (test_mask_uneven_layers)
    for fn in (prune.prune_experts,) if "same number" in message else (prune.prune_experts, prune.mask_experts):
        with pytest.raises(ValueError, match=message) as err:
            fn(model, drop)
        assert "\n" not in str(err.value)


def test_mask_uneven_layers(model):
    """Masking may drop different numbers per layer (the super experts, say): the router never picks a masked
    expert, the other layers are untouched, and a masked layer mixes its top-k of the rest, renormalised."""
    drop = [[3], [], [1, 2], []]
    masked = prune.mask_experts(model, drop)
    t = trace(masked, TOKENS)
    before, after = trace(model, TOKENS).expert_ids, t.expert_ids
    # the router's entropy over the experts left (p = 0 for a masked one, not 0 * log 0 = NaN)
    logits = np.asarray(t.router_logits[2], np.float64)
    rest = np.delete(logits, [1, 2], axis=-1)
    p = np.exp(rest - rest.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(metrics.routing_entropy(logits), -(p * np.log(p)).sum(-1), rtol=1e-6)
    assert np.isin(before[0], [3]).any() and np.isin(before[2], [1, 2]).any()  # they were picked before
    assert not np.isin(after[0], [3]).any() and not np.isin(after[2], [1, 2]).any()
    assert masked.layers[1].mlp.router_bias_E is model.layers[1].mlp.router_bias_E  # untouched layers share
    mlp = model.layers[2].mlp
    x = jax.random.normal(jax.random.key(2), (1, 9, model.config.hidden_size))
    top, idx = jax.lax.top_k(mlp.route(x)[0].at[..., jnp.asarray([1, 2])].set(-jnp.inf), mlp.k)
    want = mlp.experts.reference(x[0], idx[0], jax.nn.softmax(top, axis=-1)[0])
    np.testing.assert_allclose(np.asarray(masked.layers[2].mlp(x)[0]), np.asarray(want), rtol=1e-5, atol=1e-6)


# -- calibration and the sweep ------------------------------------------------------------------------------------
SEQS = [TOKENS.tolist(), TOKENS[:9].tolist(), TOKENS[:13].tolist()]  # prefixes: their traces are the whole one's


def test_calibrate_equals_traces_one_by_one(model, traced):
    """Padded batches count each real token once and no padding token."""
    stats = calibrate(model, SEQS, batch=2, pad_to=8)  # batches [16, 9] -> width 16 and [13] -> 16
    # a causal model: a prefix's records are the first records of the whole sequence's
    ones = Trace.concatenate([dataclasses.replace(traced, expert_ids=traced.expert_ids[:, :len(s)],
                                                  gates=traced.gates[:, :len(s)],
                                                  expert_norms=traced.expert_norms[:, :len(s)]) for s in SEQS])
    E = model.config.num_experts
    assert stats.tokens == sum(map(len, SEQS))
    np.testing.assert_allclose(stats.reap(), reap_saliency(ones.expert_ids, ones.gates, ones.expert_norms, E),
                               rtol=1e-4)
    np.testing.assert_allclose(stats.frequency(), frequency(ones.expert_ids, E), rtol=1e-12)
    with pytest.raises(ValueError, match="no empty one"):
        calibrate(model, [SEQS[0], []])


def test_sweep_rows_and_table(model):
    """The sweep scores the full model once, each criterion's choice pruned, random draws per seed, and the super
    experts masked; the table averages the seeds."""
    stats = calibrate(model, SEQS)
    seen = []

    def score(m) -> dict[str, float]:  # a stand-in for accuracy: what the sweep handed over
        seen.append(m)
        return {"a": m.config.num_experts / 7, "b": len(seen) / 10}

    rows = prune.sweep(model, stats, score, fractions=[0, 2 / 7], seeds=2)
    assert [(r.criterion, r.removed, r.seed) for r in rows[:5]] == [
        ("none", 0, None), ("reap", 2, None), ("frequency", 2, None), ("random", 2, 0), ("random", 2, 1)]
    assert seen[0] is model and [m.config.num_experts for m in seen[1:5]] == [5] * 4
    assert rows[1].drop == prune.lowest(stats.reap(), 2) and rows[2].drop == prune.lowest(stats.frequency(), 2)
    assert rows[3].drop != rows[4].drop and all(len(set(d)) == 2 for d in rows[3].drop)
    supers = stats.super_experts()
    assert supers, "4 layers x 7 experts: the rule always flags the largest peak"
    assert rows[5].criterion == "super" and rows[5].removed == len(supers) and len(rows) == 6
    layer, expert, _ = supers[0]
    assert float(seen[5].layers[layer].mlp.router_bias_E[expert]) == -np.inf and seen[5].config.num_experts == 7
    md = prune.table(rows)
    assert md.splitlines()[2] == "| 0/7 (0.0%) | none (full model) | 100.0% | 10.0% | **55.0%** |"
    assert "| 2/7 (28.6%) | REAP saliency | 71.4% | 20.0% | **45.7%** |" in md
    assert "| 2/7 (28.6%) | random, 2 seeds | 71.4% (71%-71%) | 45.0% (40%-50%) | **58.2% (56%-61%)** |" in md
    assert md.splitlines()[-1] == "| 1 in all (of 28) | super experts (masked) | 100.0% | 60.0% | **80.0%** |"
    with pytest.raises(ValueError, match=r"fraction 0.75 removes 5 of 7 experts per layer, leaving fewer than "
                                         r"experts_per_token \(3\)"):
        prune.sweep(model, stats, score, fractions=[0.75])
    with pytest.raises(ValueError, match="unknown criterion 'size'"):
        prune.sweep(model, stats, score, criteria=["size"])


# -- the expert-parallel path -------------------------------------------------------------------------------------
SHARDED = textwrap.dedent("""
    import json, sys
    import numpy as np
    import oss_jax
    from oss_jax import prune, sharding
    ckpt, out = sys.argv[1], sys.argv[2]
    tokens = np.load(out + "/tokens.npy")
    result, arrays = {}, {}
    for name, experts, (d, e, t), drop in json.loads(open(out + "/cases.json").read()):
        mesh = sharding.make_mesh(data=d, expert=e, tensor=t)
        model = oss_jax.load(ckpt, dtype="float32", experts=experts, mesh=mesh)
        pruned = prune.prune_experts(model, drop)
        ex = pruned.layers[0].mlp.experts
        result[name] = {"mesh": sharding.mesh_of(pruned) is mesh, "shards": {
            n: sorted({tuple(s.data.shape) for s in getattr(ex, n)[...].addressable_shards})
            for n in ("gate_up_bias_EF2", "down_bias_ED")}}
        arrays[name] = np.asarray(pruned(sharding.shard_batch(tokens, mesh)))
        arrays[name + "-masked"] = np.asarray(prune.mask_experts(model, drop)(sharding.shard_batch(tokens, mesh)))
    np.savez(out + "/logits.npz", **arrays)
    open(out + "/result.json", "w").write(json.dumps(result))
""")
# name, load's experts=, (data, expert, tensor), drop: 7 experts do not split over expert=2 or 4; 6 and 4 do
SHARDED_CASES = [("packed-1x2x2", "auto", (1, 2, 2), [[0], [1], [6], [3]]),
                 ("dense-1x4x1", "dense", (1, 4, 1), [[0, 1, 2], [4, 5, 6], [0, 3, 6], [1, 2, 5]])]


def test_prune_and_mask_on_a_mesh(mxfp4_dir, model, dense, tmp_path):
    """On 4 simulated devices (a subprocess: XLA_FLAGS is read once), a model loaded with a mesh, pruned, is laid
    out for its new expert count (split over the expert axis) and its logits equal the single-device pruned
    model's; masked, the same."""
    tokens = np.random.default_rng(4).integers(0, 1031, (2, 24)).astype(np.int32)
    np.save(tmp_path / "tokens.npy", tokens)
    (tmp_path / "cases.json").write_text(json.dumps(SHARDED_CASES))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4")
    proc = subprocess.Popen([sys.executable, "-c", SHARDED, str(mxfp4_dir), str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    want = {name: np.asarray(prune.prune_experts(dense if experts == "dense" else model, drop)(tokens))
            for name, experts, _, drop in SHARDED_CASES}  # meanwhile, on one device
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    got, info = np.load(tmp_path / "logits.npz"), json.loads((tmp_path / "result.json").read_text())
    for name, _, (_, e, t), drop in SHARDED_CASES:
        E = 7 - len(drop[0])
        scale = np.abs(want[name]).max()
        assert np.abs(got[name] - want[name]).max() / scale < 1e-5, name
        assert np.abs(got[name + "-masked"] - want[name]).max() / scale < 1e-5, name
        assert info[name]["mesh"]
        F2 = model.layers[0].mlp.experts.gate_up_bias_EF2.shape[1]
        assert info[name]["shards"] == {"gate_up_bias_EF2": [[E // e, F2 // t]], "down_bias_ED": [
            [E // e, model.config.hidden_size]]}, name
