"""Module-by-module parity with transformers' gpt-oss in float32, so that a failure names its cause.

RoPE/YaRN, attention (projections, RoPE, sinks, sliding window, GQA), the router and the experts
(dense and MXFP4-packed, both dispatch modes) are each compared with the transformers module
of the same name, on the TINY sizes of ``reference.py`` (and the real gpt-oss RoPE config).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as R
import torch
from flax import nnx
from transformers import GptOssConfig
from transformers.integrations.mxfp4 import convert_moe_packed_tensors
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding, apply_rotary_pos_emb

from oss_jax import mxfp4, rope
from oss_jax.attention import Attention, attention
from oss_jax.config import Config
from oss_jax.moe import Experts, MoE, swiglu

TOL = 2e-6  # rel_err bound for fp32 module parity; measured values are 1e-7 .. 4e-7
D, N, K, H = R.TINY["hidden_size"], R.TINY["num_attention_heads"], R.TINY["num_key_value_heads"], \
    R.TINY["head_dim"]
REAL_ROPE = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
             "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096}


def t2n(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


@nnx.jit
def call(module: nnx.Module, *args):
    """``module(*args)``, compiled: one XLA program per module configuration and input shapes
    (much cheaper on CPU than compiling every operation of an eager call separately)."""
    return module(*args)


def set_params(module: nnx.Module, **arrays) -> None:
    for name, a in arrays.items():
        old = getattr(module, name)[...]
        assert old.shape == a.shape, (name, old.shape, a.shape)
        setattr(module, name, nnx.Param(jnp.asarray(a, jnp.float32)))


@pytest.fixture(scope="module")
def hf():
    return R.hf_model(seed=1)


@pytest.fixture(scope="module")
def cfg(hf):
    return Config.from_dict(hf.config.to_dict())


# -- RoPE / YaRN ----------------------------------------------------------------------------------
def hf_rope_config(which: str) -> GptOssConfig:
    return GptOssConfig(**R.TINY) if which == "tiny" else GptOssConfig(rope_parameters=dict(REAL_ROPE))


def our_inv_freq(c: GptOssConfig) -> tuple[np.ndarray, float]:
    p = c.rope_parameters
    return rope.yarn_inv_freq(c.head_dim, p["rope_theta"], p["factor"], p["original_max_position_embeddings"],
                              p["beta_fast"], p["beta_slow"], p["truncate"])


def spec_inv_freq64(d: int, theta: float, factor: float, l0: int, beta_fast: float, beta_slow: float):
    """SPEC.md §2 YaRN, written out in float64."""
    j = np.arange(d // 2, dtype=np.float64)
    freq = theta ** (2 * j / d)
    low = max((d / 2) * math.log(l0 / (beta_fast * 2 * math.pi)) / math.log(theta), 0.0)
    high = min((d / 2) * math.log(l0 / (beta_slow * 2 * math.pi)) / math.log(theta), d - 1.0)
    ramp = np.clip((j - low) / (high - low), 0, 1)
    return (1 / freq) * (1 - ramp) + (1 / (factor * freq)) * ramp


def ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in float32 units in the last place (same-sign positive floats)."""
    return np.abs(a.astype(np.float32).view(np.int32).astype(np.int64)
                  - b.astype(np.float32).view(np.int32).astype(np.int64))


@pytest.mark.parametrize("which", ["tiny", "gpt-oss"])
def test_yarn_inv_freq_matches_transformers(which):
    c = hf_rope_config(which)
    emb = GptOssRotaryEmbedding(c)
    ours, conc = our_inv_freq(c)
    assert ours.dtype == np.float32 and ours.shape == (c.head_dim // 2,)
    # Ours is the float64 formula of the spec rounded once to float32 (exactly),
    p = c.rope_parameters
    exact = spec_inv_freq64(c.head_dim, p["rope_theta"], p["factor"], p["original_max_position_embeddings"],
                            p["beta_fast"], p["beta_slow"])
    assert np.array_equal(ours, exact.astype(np.float32))
    # transformers computes in float32 and lands a few ulps away (measured: 4 for tiny, 1 for gpt-oss).
    hf = emb.inv_freq.numpy()
    assert ulps(ours, hf).max() <= 4
    np.testing.assert_allclose(ours, hf, rtol=5e-7, atol=0)
    assert conc == pytest.approx(emb.attention_scaling, rel=1e-15)
    assert conc == pytest.approx(0.1 * math.log(32.0) + 1, rel=1e-15)  # 1.3465736
    # the ramp really blends: some dimensions extrapolate, some interpolate (gpt-oss), at 1 / factor
    if which == "gpt-oss":
        theta_pow = 150000.0 ** (-np.arange(32) / 32)
        assert np.allclose(ours[:9], theta_pow[:9], rtol=1e-7, atol=0)  # j <= 8 < low: unscaled
        assert np.allclose(ours[18:], theta_pow[18:] / 32, rtol=1e-7, atol=0)  # j >= 18 > high: / factor
        assert not np.allclose(ours[9:18], theta_pow[9:18], rtol=1e-3)


def test_yarn_correction_range():
    low, high = rope.correction_range(64, 150000.0, 4096, 32.0, 1.0, truncate=False)
    assert low == pytest.approx(8.0928, abs=1e-4) and high == pytest.approx(17.3980, abs=1e-4)
    assert rope.correction_range(64, 150000.0, 4096, 32.0, 1.0, truncate=True) == (8, 18)
    # TINY: low would be negative, clamped at 0 as transformers does
    low, high = rope.correction_range(20, 150000.0, 64, 32.0, 1.0, truncate=False)
    assert low == 0.0 and high == pytest.approx(10 * math.log(64 / (2 * math.pi)) / math.log(150000.0))


@pytest.mark.parametrize("which", ["tiny", "gpt-oss"])
def test_cos_sin_matches_transformers(which):
    c = hf_rope_config(which)
    emb = GptOssRotaryEmbedding(c)
    pos = np.arange(301)[None]
    with torch.no_grad():
        hc, hs = (t2n(t)[0] for t in emb(torch.zeros(1), torch.as_tensor(pos)))
    # Same inv_freq in: the tables agree to float32 rounding.
    hf_inv = emb.inv_freq.numpy()
    oc, os_ = (np.asarray(t)[0] for t in rope.cos_sin(jnp.asarray(pos), hf_inv, emb.attention_scaling))
    assert oc.dtype == np.float32 and oc.shape == (301, c.head_dim // 2)
    np.testing.assert_allclose(oc, hc, rtol=0, atol=2.5e-7)
    np.testing.assert_allclose(os_, hs, rtol=0, atol=2.5e-7)
    # Our own inv_freq: the few-ulp difference above times the position, plus one float32 rounding
    # of the angle where the two products differ, and nothing more.
    inv, conc = our_inv_freq(c)
    oc, os_ = (np.asarray(t)[0] for t in rope.cos_sin(jnp.asarray(pos), inv, conc))
    d_inv = np.abs(inv.astype(np.float64) - hf_inv)
    angle = (pos[0, :, None] * inv).astype(np.float32)
    bound = conc * (pos[0, :, None] * d_inv + np.spacing(angle) * (d_inv > 0)) + 2.5e-7
    assert d_inv.max() > 0  # (otherwise this part would test nothing new)
    assert np.all(np.abs(oc - hc) <= bound) and np.all(np.abs(os_ - hs) <= bound)


def test_cos_sin_large_positions():
    inv, conc = rope.yarn_inv_freq(64, 150000.0, 32.0, 4096, 32.0, 1.0, False)
    pos = np.concatenate([[0, 1, 255, 256, 257, 4095, 4096, 65535, 100000, 131071],
                          np.random.default_rng(0).integers(0, 131072, 100)])
    c, s = (np.asarray(t, np.float64) for t in rope.cos_sin(jnp.asarray(pos, jnp.int32), inv, conc))
    angle = pos[:, None].astype(np.float64) * inv.astype(np.float64)  # exact product of the fp32 inputs
    angle32 = pos[:, None].astype(np.float32) * inv  # one float32 rounding
    # cos/sin of the float32 angle, to float32 accuracy (range reduction done right)
    np.testing.assert_allclose(c, conc * np.cos(angle32.astype(np.float64)), rtol=0, atol=3e-7)
    np.testing.assert_allclose(s, conc * np.sin(angle32.astype(np.float64)), rtol=0, atol=3e-7)
    # and within half an ulp of the angle of the float64 truth (0.004 rad at 131071)
    bound = conc * (0.5 * np.spacing(np.abs(angle).astype(np.float32)).astype(np.float64) + 3e-7)
    assert np.all(np.abs(c - conc * np.cos(angle)) <= bound)
    assert np.all(np.abs(s - conc * np.sin(angle)) <= bound)
    assert np.abs(c - conc * np.cos(angle)).max() > 1e-3  # the bound is not vacuous at 131071
    # position 257 is not 256 (as it would be in bf16)
    assert float(jnp.asarray(257, jnp.bfloat16)) == 256.0
    assert np.abs(c[4] - c[3]).max() > 0.1
    np.testing.assert_allclose(c[4], conc * np.cos(257 * inv.astype(np.float64)), atol=1e-5)


def test_rope_apply_matches_transformers():
    rng = np.random.default_rng(5)
    q = rng.normal(size=(2, 30, N, H)).astype(np.float32)
    c = hf_rope_config("tiny")
    emb = GptOssRotaryEmbedding(c)
    pos = np.stack([np.arange(30), np.arange(100, 130)])
    cos, sin = emb(torch.zeros(1), torch.as_tensor(pos))
    ref, _ = apply_rotary_pos_emb(torch.from_numpy(q).transpose(1, 2), torch.zeros(2, N, 30, H), cos, sin)
    ours = rope.apply(jnp.asarray(q), jnp.asarray(t2n(cos)), jnp.asarray(t2n(sin)))
    np.testing.assert_allclose(np.asarray(ours), t2n(ref.transpose(1, 2)), rtol=0, atol=1e-6)


# -- attention ------------------------------------------------------------------------------------
def our_attention(cfg: Config, layer: int, a) -> Attention:
    """Our Attention with the weights of transformers' GptOssAttention ``a`` (torch Linear [out, in])."""
    ours = Attention(cfg, layer, dtype=jnp.float32)
    set_params(ours,
               wq_DNH=t2n(a.q_proj.weight).T.reshape(D, N, H), bq_NH=t2n(a.q_proj.bias).reshape(N, H),
               wk_DKH=t2n(a.k_proj.weight).T.reshape(D, K, H), bk_KH=t2n(a.k_proj.bias).reshape(K, H),
               wv_DKH=t2n(a.v_proj.weight).T.reshape(D, K, H), bv_KH=t2n(a.v_proj.bias).reshape(K, H),
               wo_NHD=t2n(a.o_proj.weight).T.reshape(N, H, D), bo_D=t2n(a.o_proj.bias),
               sinks_N=t2n(a.sinks))
    return ours


def run_attention_layer(ours: Attention, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    out = call(ours, jnp.asarray(x), jnp.asarray(pos))
    if isinstance(out, tuple):  # (output, cache) when the layer supports a KV cache
        out = out[0]
    return np.asarray(out)


@pytest.fixture(scope="module")
def layer_inputs(hf):
    """Two sequences of 50 tokens, and what transformers' attention layers 0 and 1 saw and returned
    inside a full forward pass (hooks)."""
    seen: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    handles = []
    for i in (0, 1):
        def hook(mod, args, kwargs, out, i=i):
            seen[i] = (t2n(kwargs["hidden_states"]), t2n(out[0]))
        handles.append(hf.model.layers[i].self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        R.hf_logits(hf, np.random.default_rng(2).integers(0, R.TINY["vocab_size"], (2, 50)))
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("layer", [0, 1], ids=["sliding", "full"])
def test_attention_layer_matches_transformers(hf, cfg, layer, impl):
    """Same hidden states into GptOssAttention (with its rotary embedding and masks) and ours."""
    a = hf.model.layers[layer].self_attn
    assert (a.sliding_window, cfg.window(layer)) == ((16, 16) if layer == 0 else (None, None))
    T = 50
    x = torch.from_numpy(np.random.default_rng(layer).normal(size=(2, T, D)).astype(np.float32))
    pos = torch.arange(T)[None].expand(2, T)
    kw = dict(config=hf.config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=pos)
    mask = (create_sliding_window_causal_mask if layer == 0 else create_causal_mask)(**kw)
    visible = (t2n(mask[0, 0]) == 0)
    q_k = np.arange(T)[:, None] - np.arange(T)[None, :]
    assert np.array_equal(visible, (q_k >= 0) & (q_k < (16 if layer == 0 else T)))  # the spec's mask
    with torch.no_grad():
        ref, _ = a(hidden_states=x, position_embeddings=hf.model.rotary_emb(x, pos), attention_mask=mask)
    ours = our_attention(cfg, layer, a)
    ours.impl = impl
    out = run_attention_layer(ours, x.numpy(), pos.numpy())
    assert out.shape == (2, T, D) and out.dtype == np.float32
    assert R.rel_err(out, t2n(ref)) < TOL
    if layer == 0:  # the comparison can see an off-by-one window
        for w in (15, 17):
            ours.window = w
            assert R.rel_err(run_attention_layer(ours, x.numpy(), pos.numpy()), t2n(ref)) > 1e-3


@pytest.mark.parametrize("layer", [0, 1], ids=["sliding", "full"])
def test_attention_inside_the_full_model(hf, cfg, layer_inputs, layer):
    """Our layer reproduces what transformers' attention saw and gave during a full forward."""
    x, ref = layer_inputs[layer]
    out = run_attention_layer(our_attention(cfg, layer, hf.model.layers[layer].self_attn), x,
                              np.tile(np.arange(50), (2, 1)))
    assert R.rel_err(out, ref) < TOL


def naive_attention(q, k, v, sinks, q_pos, k_pos, window):
    """float64 reference: explicit logits, an appended sink column, softmax, drop the column."""
    B, T, Nq, Hd = q.shape
    Kv = k.shape[2]
    out = np.zeros((B, T, Nq, Hd))
    for b in range(B):
        for h in range(Nq):
            kh = h // (Nq // Kv)
            logits = q[b, :, h].astype(np.float64) @ k[b, :, kh].T.astype(np.float64) / math.sqrt(Hd)
            delta = q_pos[b][:, None] - k_pos[b][None, :]
            vis = (delta >= 0) & (k_pos[b][None, :] >= 0)
            if window is not None:
                vis &= delta <= window - 1
            logits = np.where(vis, logits, -np.inf)
            full = np.concatenate([logits, np.full((T, 1), float(sinks[h]))], axis=1)
            p = np.exp(full - full.max(axis=1, keepdims=True))
            p = p / p.sum(axis=1, keepdims=True)
            out[b, :, h] = p[:, :-1] @ v[b, :, kh].astype(np.float64)
    return out


# Compiled once per shape: the window is traced when it is an int (a separate program for None).
_attention_int_window = jax.jit(attention)
_attention_no_window = jax.jit(lambda q, k, v, s, qp, kp: attention(q, k, v, s, qp, kp, None))
S_, H_ = 37, 8  # one shape for all the direct tests below, so that they share compilations


def run_attention(q, k, v, sinks, q_pos, k_pos, window):
    args = [jnp.asarray(a) for a in (q, k, v, sinks, q_pos, k_pos)]
    if window is None:
        return np.asarray(_attention_no_window(*args))
    return np.asarray(_attention_int_window(*args, window))


def random_qkv(seed: int, T: int):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(2, T, N, H_)).astype(np.float32) * 2
    k = rng.normal(size=(2, S_, K, H_)).astype(np.float32) * 2
    v = rng.normal(size=(2, S_, K, H_)).astype(np.float32)
    return q, k, v, rng.normal(size=N).astype(np.float32) * 2


@pytest.mark.parametrize("case", ["prefill", "decode", "padded"])
def test_attention_function_against_naive(case):
    T = S_ if case != "decode" else 3
    q, k, v, sinks = random_qkv(7, T)
    k_pos = np.tile(np.arange(S_), (2, 1))
    q_pos = k_pos[:, S_ - T:]
    if case == "padded":  # batch row 1: the first 6 key slots are padding
        k_pos[1, :6] = -1
    for window in (None, 1, 5, 36, 37):
        out = run_attention(q, k, v, sinks, q_pos, k_pos, window)
        ref = naive_attention(q, k, v, sinks, q_pos, k_pos, window)
        assert out.shape == (2, T, N, H_) and np.isfinite(out).all()
        assert R.rel_err(out, ref) < 1e-6, window
        if window == 5:  # an off-by-one window is visible to this comparison
            assert R.rel_err(out, naive_attention(q, k, v, sinks, q_pos, k_pos, 4)) > 1e-2
            assert R.rel_err(out, naive_attention(q, k, v, sinks, q_pos, k_pos, 6)) > 1e-2


def test_attention_window_edges():
    """Key s is visible to query t iff changing v[s] changes out[t]: exactly when 0 <= t - s <= w - 1."""
    q, k, v, sinks = random_qkv(11, S_)
    pos = np.tile(np.arange(S_), (2, 1))
    q_k = np.arange(S_)[:, None] - np.arange(S_)[None, :]
    for window in (5, 16, None):
        base = run_attention(q, k, v, sinks, pos, pos, window)
        visible = np.zeros((S_, S_), bool)
        for s in range(0, S_, 2):  # batch row 0 perturbs key s, row 1 key s + 1
            v2 = v.copy()
            v2[0, s] += 100.0
            v2[1, min(s + 1, S_ - 1)] += 100.0
            moved = np.abs(run_attention(q, k, v2, sinks, pos, pos, window) - base).max(axis=(2, 3)) > 0
            visible[:, s] = moved[0]
            visible[:, min(s + 1, S_ - 1)] = moved[1]
        want = (q_k >= 0) & (q_k <= (window or S_) - 1)
        assert np.array_equal(visible, want), window
        if window is not None:
            assert visible[20, 20 - (window - 1)] and not visible[20, 20 - window]


def test_attention_sink_mass():
    """Zero logits, values 1: each query's output is the mass n / (n + exp(s_h)) on its n visible keys."""
    q = np.zeros((2, S_, N, H_), np.float32)
    k = np.zeros((2, S_, K, H_), np.float32)
    v = np.ones((2, S_, K, H_), np.float32)
    sinks = np.linspace(-2, 2, N).astype(np.float32)
    pos = np.tile(np.arange(S_), (2, 1))
    for window in (5, None):
        out = run_attention(q, k, v, sinks, pos, pos, window)[0, :, :, 0]  # [T, N]
        n = np.minimum(np.arange(S_) + 1, window or S_)[:, None]
        np.testing.assert_allclose(out, n / (n + np.exp(sinks.astype(np.float64))), rtol=1e-6)


def test_attention_gqa_head_mapping():
    """Query head h reads KV head h // (N/K): give each KV head a different constant value."""
    q, k, _, _ = random_qkv(8, S_)
    v = np.zeros((2, S_, K, H_), np.float32)
    v[:, :, :, 0] = np.arange(1, K + 1)  # kv head g has value g+1 everywhere
    sinks = np.full(N, -30.0, np.float32)  # negligible sink: each head's output is exactly g+1
    pos = np.tile(np.arange(S_), (2, 1))
    out = run_attention(q, k, v, sinks, pos, pos, None)[:, :, :, 0]  # [B, T, N]
    want = np.arange(N) // (N // K) + 1
    assert want.tolist() == [1, 1, 1, 2, 2, 2]
    np.testing.assert_allclose(out, np.broadcast_to(want, out.shape), rtol=1e-5)


def test_attention_no_visible_key_gives_zero():
    q, k, v, sinks = random_qkv(12, S_)
    pos = np.tile(np.arange(S_), (2, 1))
    out = run_attention(q, k, v, sinks, pos, np.full((2, S_), -1), 5)
    assert np.array_equal(out, np.zeros_like(out))


# -- router and experts ---------------------------------------------------------------------------
def test_router_matches_transformers(hf, cfg):
    mlp = hf.model.layers[1].mlp
    x = np.random.default_rng(9).normal(0, 2.0, (2, 25, D)).astype(np.float32)
    with torch.no_grad():
        logits, scores, idx = (t.numpy() for t in mlp.router(torch.from_numpy(x.reshape(50, D))))
    moe = MoE(cfg, packed=False, dtype=jnp.float32)
    set_params(moe, router_ED=t2n(mlp.router.weight), router_bias_E=t2n(mlp.router.bias))
    ol, oi, og = (np.asarray(a) for a in moe.route(jnp.asarray(x)))
    assert ol.shape == (2, 25, cfg.num_experts) and oi.shape == og.shape == (2, 25, cfg.experts_per_token)
    assert R.rel_err(ol.reshape(50, -1), logits) < TOL
    assert np.array_equal(oi.reshape(50, -1), idx)  # same experts, same order (descending logit)
    assert R.rel_err(og.reshape(50, -1), scores) < TOL
    np.testing.assert_allclose(og.sum(-1), 1.0, rtol=1e-6)  # softmax over the k chosen only


def test_swiglu_matches_transformers(hf):
    """The clamps: gate only from above (at 7), linear both sides; alpha 1.702; (lin + 1)."""
    g = np.linspace(-30, 30, 241, dtype=np.float32)
    h = np.stack(np.meshgrid(g, g, indexing="ij"), axis=-1).reshape(-1, 2)  # all (gate, lin) pairs
    h = h.reshape(-1, 2 * 241)  # interleaved gate0, lin0, gate1, lin1, ...
    with torch.no_grad():
        ref = t2n(hf.model.layers[0].mlp.experts._apply_gate(torch.from_numpy(h)))
    out = np.asarray(swiglu(jnp.asarray(h), 7.0, 1.702))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-9)


@pytest.fixture(scope="module")
def expert_case(hf):
    """Inputs, routing from transformers' router, and the transformers experts module (layer 0)."""
    mlp = hf.model.layers[0].mlp
    x = np.random.default_rng(10).normal(0, 5.0, (40, D)).astype(np.float32)
    with torch.no_grad():
        _, scores, idx = mlp.router(torch.from_numpy(x))
    return x, idx.numpy(), scores.numpy(), mlp.experts


def set_dispatch(ours: Experts, dispatch: str) -> None:
    """A fast dispatch, or ``"reference"``: ``impl="reference"`` (the mixture of ``Experts.reference``)."""
    if dispatch == "reference":
        ours.impl = "reference"
    else:
        ours.dispatch = dispatch


def _clamped_fraction(x, idx, w1, b1):
    h = np.einsum("nd,nkdf->nkf", x.astype(np.float64), w1[idx]) + b1[idx]
    return (h[..., 0::2] > 7).mean(), (np.abs(h[..., 1::2]) > 7).mean()


@pytest.mark.parametrize("dispatch", ["gather", "scan", "dense", "sorted", "ragged", "reference"])
def test_dense_experts_match_transformers(cfg, expert_case, dispatch):
    x, idx, gates, ex = expert_case
    w1, b1 = t2n(ex.gate_up_proj), t2n(ex.gate_up_proj_bias)
    gate_frac, lin_frac = _clamped_fraction(x, idx, w1, b1)
    assert gate_frac > 0.01 and lin_frac > 0.01  # the clamp at 7 is active on both halves
    with torch.no_grad():
        ref = t2n(ex(torch.from_numpy(x), torch.from_numpy(idx), torch.from_numpy(gates)))
    ours = Experts(cfg, packed=False, dtype=jnp.float32)
    set_params(ours, gate_up_EDF2=w1, down_EFD=t2n(ex.down_proj), gate_up_bias_EF2=b1,
               down_bias_ED=t2n(ex.down_proj_bias))
    set_dispatch(ours, dispatch)
    out = np.asarray(call(ours, jnp.asarray(x), jnp.asarray(idx), jnp.asarray(gates)))
    assert out.shape == x.shape and out.dtype == np.float32
    assert R.rel_err(out, ref) < TOL


@pytest.mark.parametrize("dispatch", ["gather", "scan", "dense", "sorted", "ragged", "reference"])
def test_packed_experts_match_transformers(cfg, expert_case, dispatch):
    """MXFP4 bytes in ours; transformers gets the same bytes dequantized by its own converter."""
    x, idx, gates, ex = expert_case
    enc = {}
    for name, w in (("gate_up", t2n(ex.gate_up_proj)), ("down", t2n(ex.down_proj))):  # [E, in, out]
        blocks, scales = (np.asarray(a) for a in mxfp4.encode(np.swapaxes(w, -1, -2)))
        enc[name] = blocks, scales
        assert len(np.unique(scales)) > 1  # more than one scale
    dq = {name: convert_moe_packed_tensors(torch.tensor(b), torch.tensor(s), dtype=torch.float32)
          for name, (b, s) in enc.items()}  # [E, in, out], as transformers' parameters
    b1, b2 = t2n(ex.gate_up_proj_bias), t2n(ex.down_proj_bias)
    gate_frac, lin_frac = _clamped_fraction(x, idx, dq["gate_up"].numpy(), b1)
    assert gate_frac > 0.01 and lin_frac > 0.01
    saved = ex.gate_up_proj.data.clone(), ex.down_proj.data.clone()
    try:
        with torch.no_grad():
            ex.gate_up_proj.copy_(dq["gate_up"])
            ex.down_proj.copy_(dq["down"])
            ref = t2n(ex(torch.from_numpy(x), torch.from_numpy(idx), torch.from_numpy(gates)))
    finally:
        with torch.no_grad():
            ex.gate_up_proj.copy_(saved[0])
            ex.down_proj.copy_(saved[1])
    ours = Experts(cfg, packed=True, dtype=jnp.float32)
    ours.gate_up_blocks[...] = jnp.asarray(enc["gate_up"][0])
    ours.gate_up_scales[...] = jnp.asarray(enc["gate_up"][1])
    ours.down_blocks[...] = jnp.asarray(enc["down"][0])
    ours.down_scales[...] = jnp.asarray(enc["down"][1])
    set_params(ours, gate_up_bias_EF2=b1, down_bias_ED=b2)
    set_dispatch(ours, dispatch)
    out = np.asarray(call(ours, jnp.asarray(x), jnp.asarray(idx), jnp.asarray(gates)))
    assert R.rel_err(out, ref) < TOL
