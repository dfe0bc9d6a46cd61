"""Tracing on the tiny random checkpoint agrees with quantities recomputed from transformers.

Router logits are recomputed in numpy from transformers' own router weights and the router's
input (captured with a forward hook on each layer's ``mlp``: ``post_attention_layernorm`` of the
residual after attention); the residual stream is transformers' ``hidden_states`` (its last entry
is after the final norm, so the last layer's output is hooked too); attention weights and sink
mass come from its eager attention (``output_attentions``: probabilities without the sink column,
so the sink takes ``1 - sum``). Also: chunked tracing through the KV cache equals one pass, the
blockwise (long input) sink mass equals the naive one, tracing leaves the model and its compiled
graph untouched, and the logit lens of the last layer is the model's own output.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as R
import torch
from flax import nnx

import oss_jax
import oss_jax.kernels.attention
from oss_jax import metrics as M
from oss_jax.routing import RoutingStats, SinkStats
from oss_jax.trace import Trace, trace, trace_chunks

WINDOW = (0, 20)  # attention weights on the first 20 keys (beyond the sliding window of 16)


@pytest.fixture(scope="module")
def model(dense_dir):
    return oss_jax.load(dense_dir, dtype="float32")


@pytest.fixture(scope="module")
def hf_run(hf_tiny, tokens):
    """transformers' hidden states, attention probabilities, router inputs and layer outputs."""
    mlp_in, layer_out = {}, {}
    hooks = []
    for i, layer in enumerate(hf_tiny.model.layers):
        hooks.append(layer.mlp.register_forward_hook(
            lambda mod, args, out, i=i: mlp_in.__setitem__(i, args[0].detach().double().numpy())))
        hooks.append(layer.register_forward_hook(
            lambda mod, args, out, i=i: layer_out.__setitem__(i, (out[0] if isinstance(out, tuple) else out)
                                                               .detach().double().numpy())))
    try:
        with torch.no_grad():
            out = hf_tiny(torch.as_tensor(tokens, dtype=torch.long), output_hidden_states=True,
                          output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    return {"hidden": [h.double().numpy() for h in out.hidden_states],
            "attn": [a.double().numpy() for a in out.attentions], "logits": out.logits.double().numpy(),
            "mlp_in": mlp_in, "layer_out": layer_out}


@pytest.fixture(scope="module")
def traced(model, tokens):
    return trace(model, tokens, attention_window=WINDOW)


def test_shapes(traced, tokens):
    L, E, k, N, D = 4, 7, 3, 6, 96
    B, T = tokens.shape
    assert traced.router_logits.shape == (L, B, T, E) and traced.router_logits.dtype == np.float32
    assert traced.expert_ids.shape == traced.gates.shape == (L, B, T, k)
    assert traced.sink_mass.shape == (L, B, T, N)
    assert traced.attention.shape == (L, B, T, N, WINDOW[1] - WINDOW[0])
    assert traced.residual.shape == (L + 1, B, T, D)
    assert traced.next_token_entropy.shape == traced.predicted.shape == (B, T)
    np.testing.assert_array_equal(traced.sliding, [True, False, True, False])


def test_router_matches_transformers(traced, hf_tiny, hf_run):
    for i, layer in enumerate(hf_tiny.model.layers):
        W = layer.mlp.router.weight.detach().double().numpy()
        b = layer.mlp.router.bias.detach().double().numpy()
        logits = hf_run["mlp_in"][i] @ W.T + b  # [B, T, E], numpy float64
        assert R.rel_err(traced.router_logits[i], logits) < 1e-5
        ids = np.argsort(-logits, axis=-1)[..., :3]
        np.testing.assert_array_equal(traced.expert_ids[i], ids)
        top = np.take_along_axis(logits, ids, -1)
        gates = np.exp(top - top.max(-1, keepdims=True))
        np.testing.assert_allclose(traced.gates[i], gates / gates.sum(-1, keepdims=True), atol=1e-5)


def test_residual_matches_transformers(traced, hf_run):
    L = 4
    for i in range(L):  # hidden_states[i] is the input of layer i
        assert R.rel_err(traced.residual[i], hf_run["hidden"][i]) < 1e-5
    assert R.rel_err(traced.residual[L], hf_run["layer_out"][L - 1]) < 1e-5


def test_attention_and_sinks_match_transformers(traced, hf_run):
    for i, probs_BNTS in enumerate(hf_run["attn"]):
        sink = 1.0 - probs_BNTS.sum(-1)  # [B, N, T]
        np.testing.assert_allclose(traced.sink_mass[i], sink.transpose(0, 2, 1), atol=1e-5)
        window = probs_BNTS[..., WINDOW[0]:WINDOW[1]].transpose(0, 2, 1, 3)  # [B, T, N, W]
        np.testing.assert_allclose(traced.attention[i], window, atol=1e-5)
    assert (traced.attention[0][:, 40] == 0).all()  # sliding layer: query 40 cannot see keys 0..19


def test_entropy_and_logit_lens(model, traced, hf_run):
    logits = hf_run["logits"]
    np.testing.assert_allclose(traced.next_token_entropy, M.next_token_entropy(logits), atol=1e-4)
    np.testing.assert_array_equal(traced.predicted, logits.argmax(-1))
    lens = M.logit_lens(model, traced.residual, top=3, targets=traced.predicted, rows=64)
    assert lens.top_ids.shape == (5, 2, 70, 3) and lens.entropy.shape == (5, 2, 70)
    np.testing.assert_array_equal(lens.top_ids[-1, ..., 0], logits.argmax(-1))  # the last layer is the output
    np.testing.assert_allclose(lens.entropy[-1], traced.next_token_entropy, atol=1e-4)
    np.testing.assert_allclose(lens.target_probs[-1], lens.top_probs[-1, ..., 0], rtol=1e-5)


def test_chunked_trace_equals_one_pass(model, tokens, traced):
    pieces = list(trace_chunks(model, tokens[0], chunk=32, attention_window=WINDOW))
    assert [p.tokens.shape[0] for p in pieces] == [32, 32, 6]
    whole = Trace.concatenate(pieces)
    np.testing.assert_array_equal(whole.positions, np.arange(70))
    np.testing.assert_array_equal(whole.expert_ids, traced.expert_ids[:, 0])
    for name in ("router_logits", "gates", "sink_mass", "attention"):
        np.testing.assert_allclose(getattr(whole, name), getattr(traced, name)[:, 0], atol=1e-5, err_msg=name)
    assert whole.residual is None  # off by default for chunks

    stats, one_shot = RoutingStats(4, 7, 3), RoutingStats(4, 7, 3)
    sinks = SinkStats(4, 6)
    for piece in pieces:
        stats.update_trace(piece)
        sinks.update_trace(piece)
    one_shot.update(traced.expert_ids[:, 0], traced.router_logits[:, 0], tokens_T=tokens[0])
    np.testing.assert_array_equal(stats.pair_counts, one_shot.pair_counts)
    np.testing.assert_array_equal(stats.same_first, one_shot.same_first)
    np.testing.assert_allclose(sinks.by_head(), M.sink_mass_by_head(traced.sink_mass[:, 0]), atol=1e-6)


def test_without_next_token_the_output_layer_is_not_computed(model, tokens, traced):
    bare = trace(model, tokens, next_token=False)
    assert bare.next_token_entropy is None and bare.predicted is None
    np.testing.assert_array_equal(bare.expert_ids, traced.expert_ids)
    np.testing.assert_allclose(bare.router_logits, traced.router_logits, atol=1e-6)
    np.testing.assert_allclose(bare.residual, traced.residual, atol=1e-6)
    pieces = list(trace_chunks(model, tokens[0], chunk=32, next_token=False))
    assert all(p.predicted is None for p in pieces) and Trace.concatenate(pieces).next_token_entropy is None
    # the compiled program holds no [B, T, V] logits (V = the vocabulary) with next_token=False, and does with it
    from oss_jax.trace import _recording, _split_for_recording, _traced_apply

    graphdef, state = _split_for_recording(model, _recording(True, True, True, None, (0, 70), 70))
    B, T, V = *tokens.shape, model.config.vocab_size
    logits = re.compile(rf"f32\[{B},{T},{V}\]")
    args = (graphdef, state, jnp.asarray(tokens, jnp.int32), jnp.broadcast_to(jnp.arange(T), (B, T)), None)
    assert logits.search(_traced_apply.lower(*args, True).compile().as_text())
    assert not logits.search(_traced_apply.lower(*args, False).compile().as_text())


def test_blockwise_path_sink_mass(model, tokens, traced, monkeypatch):
    """Inputs past NAIVE_MAX take the blockwise path: sink mass from ``1 - mass on the keys``."""
    monkeypatch.setattr(oss_jax.kernels.attention, "NAIVE_MAX", 64)  # 70 x 70 > 64: blockwise from here on
    long = trace(model, tokens[1], residual=False, router=False)  # a graph not compiled before
    np.testing.assert_allclose(long.sink_mass, traced.sink_mass[:, 1], atol=1e-5)
    assert long.router_logits is None and long.residual is None and long.attention is None
    with pytest.raises(ValueError, match="naive path only"):
        trace(model, tokens[1], residual=False, router=False, attention_window=(0, 4))


def hlo(model, tokens) -> str:
    graphdef, state = nnx.split(model)
    text = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).lower(state, jnp.asarray(tokens)).as_text()
    return re.sub(r"loc\(.*?\)", "", text)


def test_tracing_leaves_the_model_untouched(dense_dir, tokens):
    """Zero cost when off: tracing works on a copy, so the model's graph and compiled code stay as they were."""
    model = oss_jax.load(dense_dir, dtype="float32")
    graphdef = nnx.graphdef(model)
    before = hlo(model, tokens)
    trace(model, tokens, attention_window=WINDOW)
    assert nnx.graphdef(model) == graphdef
    assert all(getattr(m, "recording", None) is None for _, m in nnx.iter_modules(model))
    assert not nnx.state(model, nnx.Intermediate)
    assert hlo(model, tokens) == before
    assert "exponential" in before  # sanity: the text is the real forward graph
