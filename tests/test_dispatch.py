"""Every expert dispatch gives the same outputs: gather, scan, dense, sorted, ragged and auto.

Dense and MXFP4-packed experts, routings with very uneven expert loads (one expert chosen by
every token, some by none, loads that fill whole tiles of the sorted dispatch exactly), compared
with a float64 per-token loop; then a whole model (forward and greedy generate) with a packed
and a dense layer whose routers are pushed to the same extremes. Ragged (``lax.ragged_dot``) also
against sorted with gradients and LoRA adapters, and "auto" as each backend chooses it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oss_jax
from oss_jax import lora
from oss_jax.config import Config
from oss_jax.kernels import experts as expert_kernels
from oss_jax.model import GptOss
from oss_jax.moe import Experts

MODES = ("gather", "scan", "dense", "sorted", "ragged", "auto")
E, K = 7, 3  # experts, experts per token
CFG = Config(vocab_size=97, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, num_experts=E, experts_per_token=K, sliding_window=8,
             max_position_embeddings=256)
TOL = 1e-5


def randomize(module: nnx.Module, seed: int) -> None:
    """Fill every variable with random values from numpy (no JAX random ops: nothing to compile).

    MXFP4 block bytes uniform, scale bytes 118..122 (decoded weights ~1e-2..1e-1, as the random
    real-shape checkpoints); norm scales in [0.5, 1.5]; sinks N(0, 1); biases N(0, 0.2); other
    weights N(0, 0.1).
    """
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(module):
        if not isinstance(var, nnx.Variable):
            continue
        name, shape, dtype = str(path[-1]), var.get_value().shape, var.get_value().dtype
        if name.endswith("_blocks"):
            value = rng.integers(0, 256, shape)
        elif name.endswith("_scales"):
            value = rng.integers(118, 123, shape)
        elif name == "scale":
            value = rng.uniform(0.5, 1.5, shape)
        elif name.startswith("sinks"):
            value = rng.normal(0.0, 1.0, shape)
        elif "bias" in name or name[:2] in ("bq", "bk", "bv", "bo"):
            value = rng.normal(0.0, 0.2, shape)
        else:
            value = rng.normal(0.0, 0.1, shape)
        var.set_value(jnp.asarray(value.astype(dtype)))


def make_experts(packed: bool) -> Experts:
    ex = Experts(CFG, packed=packed, dtype=jnp.float32)
    randomize(ex, 2 if packed else 1)
    return ex


def reference(ex: Experts, x: np.ndarray, idx: np.ndarray, gates: np.ndarray) -> np.ndarray:
    """``sum_k gates[n, k] * expert_{idx[n, k]}(x[n])`` one token and one expert at a time, in float64."""
    w = {e: tuple(np.asarray(a, np.float64) for a in ex.weights(jnp.int32(e))) for e in range(E)}
    b1, b2 = np.asarray(ex.gate_up_bias_EF2[...], np.float64), np.asarray(ex.down_bias_ED[...], np.float64)
    out = np.zeros(x.shape, np.float64)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[n, j])
            h = x[n].astype(np.float64) @ w[e][0] + b1[e]
            gate, lin = np.minimum(h[0::2], ex.limit), np.clip(h[1::2], -ex.limit, ex.limit)
            a = gate / (1 + np.exp(-ex.alpha * gate)) * (lin + 1)
            out[n] += gates[n, j] * (a @ w[e][1] + b2[e])
    return out


def routings(N: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Routings of N tokens with uneven expert loads (every row: K distinct experts), random gates.

    With N = 40 (120 rows), the sorted dispatch uses tiles of 32 rows: loads of 32 and 33 rows
    end exactly on, and one past, a tile boundary.
    """
    rng = np.random.default_rng(N)

    def rows(first, rest, n=N):  # expert `first` in every row, at a random slot; the others from `rest`
        idx = [rng.permutation(np.concatenate([[first], rng.choice(rest, K - 1, replace=False)])) for _ in range(n)]
        return np.stack(idx)

    cases = {
        # expert 0: every token; experts 5 and 6: none
        "skewed": rows(0, np.arange(1, 5)),
        "uniform": np.stack([rng.choice(E, K, replace=False) for _ in range(N)]),
        # every token on the same three experts (in varying order): four experts get nothing
        "three-experts": np.stack([rng.permutation([2, 0, 4]) for _ in range(N)]),
    }
    if N == 40:  # tiles of 32 rows: expert 6 fills exactly one, expert 3 one and a row
        others = np.array([0, 1, 2, 4, 5])
        idx = [[6, 3, rng.choice(others)] for _ in range(32)] + [[3, *rng.choice(others, 2, replace=False)]]
        idx += [rng.choice(others, 3, replace=False) for _ in range(7)]
        cases["tile-edges"] = np.stack([rng.permutation(row) for row in idx])
    return {name: (idx.astype(np.int32), rng.dirichlet(np.ones(K), N).astype(np.float32))
            for name, idx in cases.items()}


@functools.cache
def mixer(packed: bool, mode: str):
    """The experts' ``__call__`` under one dispatch mode, jitted (one compile per input shape)."""
    graphdef, state = nnx.split(experts(packed))

    @jax.jit
    def run(state, x, idx, gates):
        m = nnx.merge(graphdef, state)
        m.dispatch = mode
        return m(x, idx, gates)

    return functools.partial(run, state)


@functools.cache
def experts(packed: bool) -> Experts:
    return make_experts(packed)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("N", [1, 40])  # 1 token: N * K < E (auto: gather), as a decode step
def test_every_dispatch_matches_the_per_token_loop(packed, N):
    ex = experts(packed)
    x = np.random.default_rng(N).normal(0, 3.0, (N, CFG.hidden_size)).astype(np.float32)
    for name, (idx, gates) in routings(N).items():
        counts = np.bincount(idx.reshape(-1), minlength=E)
        if name == "skewed":
            assert counts[0] == N and counts[5] == counts[6] == 0
        if name == "tile-edges":
            assert counts[6] == 32 and counts[3] == 33
        ref = reference(ex, x, idx, gates)
        scale = np.max(np.abs(ref))
        for mode in MODES:
            out = np.asarray(mixer(packed, mode)(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(gates)))
            assert out.shape == x.shape and out.dtype == np.float32
            err = np.max(np.abs(out - ref)) / scale
            assert err < TOL, f"{name}, {mode}: relative error {err:.2e}"


def test_unknown_dispatch_is_an_error():
    ex = make_experts(packed=False)
    ex.dispatch = "grouped"
    with pytest.raises(ValueError, match="unknown expert dispatch 'grouped'"):
        ex(jnp.zeros((2, CFG.hidden_size)), jnp.zeros((2, K), jnp.int32), jnp.ones((2, K)) / K)


def test_ragged_without_a_grouped_matmul_is_an_error():
    ex = experts(False)
    x, idx, gates = jnp.zeros((5, CFG.hidden_size)), jnp.zeros((5, K), jnp.int32), jnp.ones((5, K)) / K
    with pytest.raises(ValueError, match="'ragged' needs the experts' grouped matmul"):
        expert_kernels.mix(ex.ffn, E, x, idx, gates, "ragged")


def with_adapters(packed: bool) -> Experts:
    """Random experts with random LoRA adapters on them (B nonzero, so that A has gradients too)."""
    ex = make_experts(packed)
    ex.lora = lora.ExpertsLora(CFG, lora.LoraConfig(rank=4, alpha=8.0, targets="experts"), np.random.default_rng(0))
    rng = np.random.default_rng(4)
    for var in (ex.lora.B1_ErF2, ex.lora.B2_ErD):
        var.set_value(jnp.asarray(rng.normal(0, 0.2, var.get_value().shape).astype(np.float32)))
    return ex


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def gradients(ex: Experts, mode: str, x: np.ndarray, idx: np.ndarray, gates: np.ndarray):
    """``((d/d params, d/dx, d/d gates), out)`` of ``sum(out * cos(out))`` under dispatch ``mode``; params:
    the ``nnx.Param`` of ``ex`` (biases, dense weights, LoRA adapters; packed bytes are not Params)."""
    graphdef, params, rest = nnx.split(ex, nnx.Param, ...)

    def loss(params, x, gates):
        m = nnx.merge(graphdef, params, rest)
        m.dispatch = mode
        out = m(x, jnp.asarray(idx), gates)
        return jnp.sum(out * jnp.cos(out)), out

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(params, jnp.asarray(x), jnp.asarray(gates))


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("X", [1, 9])  # 3 pairs of 7 experts (most groups empty); 9 tokens, 27 pairs
def test_ragged_equals_sorted_with_gradients(packed, X, backend, monkeypatch):
    """Ragged (each projection one grouped matmul, the adapters' too) against the float64 per-token loop;
    with LoRA adapters, its outputs and gradients (tokens, gates, every parameter: biases, dense weights,
    adapters A and B) against sorted's. ``"cpu"``: packed experts on the native grouped kernel where it builds,
    the adapters as one-hot products; ``"gpu"`` (what the code chooses there, run on the CPU): ``ragged_dot``
    throughout, packed experts decoded first."""
    if backend == "gpu":
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    x = np.random.default_rng(X).normal(0, 3.0, (X, CFG.hidden_size)).astype(np.float32)
    idx, gates = routings(X)["skewed"]
    out = mixer(packed, "ragged")(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(gates))
    assert rel(out, reference(experts(packed), x, idx, gates)) < TOL
    ex = with_adapters(packed)
    (g_params, g_x, g_gates), out = gradients(ex, "ragged", x, idx, gates)
    (s_params, s_x, s_gates), s_out = gradients(ex, "sorted", x, idx, gates)
    assert rel(out, s_out) < TOL and rel(g_x, s_x) < TOL and rel(g_gates, s_gates) < TOL
    flat, s_flat = nnx.to_flat_state(g_params), dict(nnx.to_flat_state(s_params))
    names = {".".join(map(str, path)) for path, _ in flat}
    assert {"lora.A1_EDr", "lora.B1_ErF2", "lora.A2_EFr", "lora.B2_ErD", "down_bias_ED"} <= names
    assert ("gate_up_EDF2" in names) == (not packed)
    for path, g in flat:
        s_g = s_flat[path].get_value()
        assert np.max(np.abs(s_g)) > 0, path  # every parameter is in the loss's path
        assert rel(g.get_value(), s_g) < TOL, (path, rel(g.get_value(), s_g))


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_other_devices_experts_add_nothing(packed):
    """Indices outside [0, E) (another device's experts under expert parallelism) add nothing in any
    dispatch, even with a nonzero gate: the result is the mixture of the other pairs."""
    N = 9
    x = np.random.default_rng(6).normal(0, 3.0, (N, CFG.hidden_size)).astype(np.float32)
    idx, gates = routings(N)["uniform"]
    idx = idx.copy()
    idx[::2, 0], idx[1::3, 2] = -1, E  # some pairs not ours; token 2 keeps one pair, token 3 none of its first
    idx[4] = [-1, E + 3, -5]  # a token with no expert here at all: 0
    ours = (idx >= 0) & (idx < E)
    ref = reference(experts(packed), x, np.where(ours, idx, 0), np.where(ours, gates, 0.0))
    assert np.all(ref[4] == 0) and np.max(np.abs(ref)) > 0
    for mode in MODES:
        out = np.asarray(mixer(packed, mode)(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(gates)))
        assert np.all(out[4] == 0), mode
        assert rel(out, ref) < TOL, (mode, rel(out, ref))


@pytest.mark.parametrize("platform, many", [("cpu", "sorted"), ("gpu", "ragged"), ("cuda", "ragged"),
                                            ("rocm", "ragged"), ("tpu", "ragged")])
def test_auto_is_chosen_per_backend(platform, many, monkeypatch):
    """"auto" (and training's grouped dispatch) as the backend reported: gather for a decode step
    (X*k < E) everywhere; for more tokens, sorted on the CPU and ragged on accelerators. The mixture
    really runs that dispatch, and gives the per-token loop's result."""
    monkeypatch.setattr(expert_kernels, "backend", lambda: platform)
    assert expert_kernels.choose("auto", 2, E) == "gather" and expert_kernels.choose("auto", E, E) == many
    assert expert_kernels.choose("sorted", 100, E) == "sorted" and expert_kernels.grouped_dispatch() == many
    ran = []
    real_tiles, real_ragged = expert_kernels._tiles, expert_kernels._ragged

    def tiles(*args, tile):
        ran.append("gather" if tile == 1 else "sorted")
        return real_tiles(*args, tile=tile)

    def ragged(*args):
        ran.append("ragged")
        return real_ragged(*args)

    monkeypatch.setattr(expert_kernels, "_tiles", tiles)
    monkeypatch.setattr(expert_kernels, "_ragged", ragged)
    ex = experts(False)  # dispatch "auto", run eagerly: traced now, under the patched backend
    for X, expected in ((1, "gather"), (5, many)):
        x = np.random.default_rng(X).normal(0, 3.0, (X, CFG.hidden_size)).astype(np.float32)
        idx, gates = routings(X)["uniform"]
        ran.clear()
        out = ex(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(gates))
        assert ran == [expected]
        assert rel(out, reference(ex, x, idx, gates)) < TOL
    from oss_jax import train

    graphdef, state = train._for_training(GptOss(CFG, dtype=jnp.float32))
    assert {layer.mlp.experts.dispatch for layer in nnx.merge(graphdef, state).layers} == {many}


# -- whole models --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model() -> GptOss:
    """A random 2-layer model, layer 0 with packed MXFP4 experts and layer 1 with dense ones.

    Routers pushed to the extremes: in layer 0 expert 0 takes every token and experts 5, 6 none;
    in layer 1 expert 3 takes every token and expert 1 none.
    """
    model = GptOss(CFG, packed=True, dtype=jnp.float32)
    model.layers[1].mlp.experts = Experts(CFG, packed=False, dtype=jnp.float32)
    randomize(model, 3)
    for layer, (top, never) in zip(model.layers, [(0, (5, 6)), (3, (1,))], strict=True):
        bias = np.zeros(E, np.float32)
        bias[top], bias[list(never)] = 50.0, -50.0
        layer.mlp.router_bias_E.set_value(jnp.asarray(bias))
    return model


def set_dispatch(model: GptOss, mode: str) -> None:
    for layer in model.layers:
        layer.mlp.experts.dispatch = mode


def test_router_extremes_are_reached(model):
    """Each layer's router sends every token to one expert and none to others, whatever the input."""
    assert [layer.mlp.experts.packed for layer in model.layers] == [True, False]
    x = jnp.asarray(np.random.default_rng(0).normal(0, 1.0, (1, 50, CFG.hidden_size)), jnp.float32)
    for layer, (top, never) in zip(model.layers, [(0, (5, 6)), (3, (1,))], strict=True):
        _, idx, _ = layer.mlp.route(layer.mlp_norm(x))
        counts = np.bincount(np.asarray(idx).reshape(-1), minlength=E)
        assert counts[top] == 50 and not counts[list(never)].any()


def test_forward_is_the_same_for_every_dispatch(model):
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 21)).astype(np.int32)
    logits = {}
    for mode in MODES:
        set_dispatch(model, mode)
        logits[mode] = np.asarray(model(tokens))
    set_dispatch(model, "auto")
    ref = logits["scan"]
    for mode, out in logits.items():
        err = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
        assert err < TOL, f"{mode}: relative error {err:.2e}"


def test_generate_is_the_same_for_every_dispatch(model):
    """Greedy generation: prefill (2 x 9 tokens) then decode steps of 2 tokens (N*k < E: gather)."""
    prompts = [np.random.default_rng(2).integers(0, CFG.vocab_size, 9), np.arange(5) + 11]
    outs = {}
    for mode in MODES:
        set_dispatch(model, mode)
        outs[mode] = oss_jax.generate(model, prompts, max_new_tokens=6)
    set_dispatch(model, "auto")
    for mode, out in outs.items():
        np.testing.assert_array_equal(out, outs["scan"], err_msg=mode)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_large_experts_are_read_in_slices(packed, monkeypatch):
    """An expert larger than ``SLICE_BYTES`` is multiplied a slice at a time (as gpt-oss-20b's are
    on CPU): the same outputs, and the same gradients for the inputs and the weights."""
    ex = experts(packed)
    graphdef, params, rest = nnx.split(ex, nnx.Param, ...)  # packed blocks: not differentiated
    x = jnp.asarray(np.random.default_rng(5).normal(0, 3.0, (9, CFG.hidden_size)).astype(np.float32))
    idx, gates = (jnp.asarray(a) for a in routings(9)["skewed"])
    ref = reference(ex, np.asarray(x), np.asarray(idx), np.asarray(gates))

    def loss(params, x, mode):
        m = nnx.merge(graphdef, params, rest)
        m.dispatch = mode
        m.native = False  # XLA's path, the one that slices (the native kernel reads the packed bytes in place)
        out = m(x, idx, gates)
        return jnp.sum(out * jnp.cos(out)), out

    def run(mode):  # traced afresh, so that it reads the SLICE_BYTES in force now
        grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
        (g_params, g_x), out = grad(params, x, mode)
        return out, g_x, jax.tree.leaves(g_params)

    whole = {mode: run(mode) for mode in ("gather", "sorted")}
    monkeypatch.setattr(expert_kernels, "SLICE_BYTES", 2048)
    w1, w2 = ((ex.gate_up_blocks, ex.down_blocks) if packed else (ex.gate_up_EDF2, ex.down_EFD))
    for w in (w1, w2):  # both matrices really are cut into several slices
        shape = w[...].shape
        rows, row_bytes = (shape[1], shape[2] * shape[3] * 4) if packed else (shape[1], shape[2] * 4)
        assert expert_kernels._slice_rows(rows, row_bytes) < rows
    for mode in ("gather", "sorted"):
        out, g_x, g_w = run(mode)
        out0, g_x0, g_w0 = whole[mode]
        assert np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)) < TOL, mode
        np.testing.assert_allclose(out, out0, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(out0))))
        np.testing.assert_allclose(g_x, g_x0, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(g_x0))))
        assert len(g_w) == len(g_w0) >= 2
        for a, b in zip(g_w, g_w0, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("ckpt", ["mxfp4_dir", "dense_dir"])
def test_checkpoint_logits_ragged_equal_sorted(ckpt, request, tokens):
    """A whole model loaded from a tiny random checkpoint (packed MXFP4 or dense experts): the logits of
    two 70-token sequences with dispatch "ragged" equal those with "sorted"."""
    model = oss_jax.load(request.getfixturevalue(ckpt), dtype="float32")
    assert model.layers[0].mlp.experts.packed == (ckpt == "mxfp4_dir")
    logits = {}
    for mode in ("sorted", "ragged"):
        set_dispatch(model, mode)
        logits[mode] = np.asarray(model(tokens))
    assert rel(logits["ragged"], logits["sorted"]) < TOL, rel(logits["ragged"], logits["sorted"])
