"""The name table (``oss_jax.params_map``): HF tensors -> parameters -> HF tensors, whole and by slice."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oss_jax import mxfp4, params_map
from oss_jax.checkpoint import LazyTensor
from oss_jax.config import Config
from oss_jax.model import GptOss

CFG = Config(vocab_size=50, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, head_dim=10, num_experts=3, experts_per_token=2, sliding_window=8)


def random_checkpoint(mxfp4_experts: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Every HF tensor of ``CFG``, random: floats, or MXFP4 blocks and scales (scales near 2**0)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, dtypes) in params_map.hf_shapes(CFG, mxfp4_experts).items():
        if dtypes == ("U8",):
            lo, hi = (120, 130) if name.endswith("_scales") else (0, 256)
            out[name] = rng.integers(lo, hi, shape, dtype=np.uint8)
        else:
            out[name] = rng.normal(size=shape).astype(np.float32)
    return out


def lazy(a: np.ndarray) -> LazyTensor:
    """``a`` as a lazy tensor that records nothing and reads by slice."""
    return LazyTensor(a.shape, a.dtype, lambda index: a[index])


def rectangles(shape: tuple[int, ...], rng: np.random.Generator, n: int = 8):
    for _ in range(n):
        index = []
        for size in shape:
            lo = int(rng.integers(0, size))
            index.append(slice(lo, int(rng.integers(lo + 1, size + 1))))
        yield tuple(index)


@pytest.mark.parametrize("mxfp4_experts", [False, True], ids=["dense", "mxfp4"])
def test_every_tensor_round_trips(mxfp4_experts):
    """Each HF tensor becomes exactly one model parameter of the model's shape, and ``from_params`` gives it back."""
    tensors = random_checkpoint(mxfp4_experts)
    params = dict(params_map.to_params(CFG, name, a) for name, a in tensors.items())
    model = nnx.eval_shape(lambda: GptOss(CFG, packed=mxfp4_experts, dtype=jnp.float32))
    shapes = {path: tuple(v.get_value().shape) for path, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}
    assert {path: p.shape for path, p in params.items()} == shapes
    # the layouts the model documents: q is [N*H, D] -> [D, N, H], o is [D, N*H] -> [N, H, D]
    N, H, D = CFG.num_attention_heads, CFG.head_dim, CFG.hidden_size
    q, o = tensors["model.layers.1.self_attn.q_proj.weight"], tensors["model.layers.1.self_attn.o_proj.weight"]
    np.testing.assert_array_equal(params[("layers", 1, "attn", "wq_DNH")], q.T.reshape(D, N, H))
    np.testing.assert_array_equal(params[("layers", 1, "attn", "wo_NHD")], o.T.reshape(N, H, D))

    dense = dict(params_map.dense_experts(params.items(), jnp.float32)) if mxfp4_experts else params
    back = dict(params_map.from_params(CFG, dense, mxfp4_experts=mxfp4_experts))
    assert list(back) == list(tensors)  # every name, in file order
    for name, a in tensors.items():
        if a.dtype != np.uint8:
            np.testing.assert_array_equal(back[name], a, err_msg=name)
    if mxfp4_experts:  # re-encoded: the same values (a block may pick an equivalent scale)
        for i in range(CFG.num_hidden_layers):
            for proj, param in params_map.DENSE.items():
                pre = f"model.layers.{i}.mlp.experts.{proj}_proj"
                again = params_map.dequantize(back[f"{pre}_blocks"], back[f"{pre}_scales"], jnp.float32)
                np.testing.assert_array_equal(again, dense[("layers", i, "mlp", "experts", param)])


@pytest.mark.parametrize("mxfp4_experts", [False, True], ids=["dense", "mxfp4"])
def test_lazy_slices_equal_eager(mxfp4_experts):
    """A lazy tensor's parameter, read by rectangle, equals the same rectangle of the eager parameter."""
    rng = np.random.default_rng(1)
    tensors = random_checkpoint(mxfp4_experts)
    for name, a in tensors.items():
        path, eager = params_map.to_params(CFG, name, a)
        path2, view = params_map.to_params(CFG, name, lazy(a))
        assert path2 == path and view.shape == eager.shape and view.dtype == eager.dtype
        for index in rectangles(eager.shape, rng):
            np.testing.assert_array_equal(view[index], eager[index], err_msg=f"{name} {index}")
    if mxfp4_experts:
        for proj in params_map.DENSE:
            pre = f"model.layers.0.mlp.experts.{proj}_proj"
            blocks, scales = tensors[f"{pre}_blocks"], tensors[f"{pre}_scales"]
            eager = params_map.dequantize(blocks, scales, jnp.bfloat16)
            ref = np.swapaxes(np.asarray(mxfp4.decode(blocks, scales, jnp.bfloat16)), -1, -2)  # the reference
            np.testing.assert_array_equal(eager, ref)
            view = params_map.dequantize(lazy(blocks), lazy(scales), jnp.bfloat16)
            for index in rectangles(eager.shape, rng, n=3):  # each slice shape compiles the decoder once
                np.testing.assert_array_equal(view[index], eager[index], err_msg=f"{pre} {index}")


def test_openai_fused_qkv_splits_by_rows():
    """OpenAI's fused qkv becomes HF's q, k, v (rows in that order), whole and lazily."""
    rng = np.random.default_rng(2)
    tensors = random_checkpoint(True)
    for kind in ("weight", "bias"):
        parts = [tensors[f"model.layers.1.self_attn.{p}_proj.{kind}"] for p in "qkv"]
        fused = np.concatenate(parts)
        assert fused.shape == params_map.openai_shapes(CFG)[f"block.1.attn.qkv.{kind}"][0]
        want = {f"model.layers.1.self_attn.{p}_proj.{kind}": a for p, a in zip("qkv", parts, strict=True)}
        got = params_map.openai_to_hf(CFG, f"block.1.attn.qkv.{kind}", fused)
        assert [n for n, _ in got] == list(want)
        for name, a in got:
            np.testing.assert_array_equal(a, want[name])
        for name, view in params_map.openai_to_hf(CFG, f"block.1.attn.qkv.{kind}", lazy(fused)):
            for index in rectangles(view.shape, rng):
                np.testing.assert_array_equal(view[index], want[name][index])
    assert params_map.openai_to_hf(CFG, "block.0.mlp.mlp1_weight.blocks", tensors[
        "model.layers.0.mlp.experts.gate_up_proj_blocks"])[0][0] == "model.layers.0.mlp.experts.gate_up_proj_blocks"


def test_lone_mxfp4_half_is_refused():
    """A blocks tensor whose scales never arrive is named, not silently dropped."""
    blocks = np.zeros((3, 64, 1, 16), np.uint8)
    with pytest.raises(ValueError, match=r"^parameter layers\.0\.mlp\.experts\.gate_up_blocks: MXFP4 blocks "
                                         r"without their scales$"):
        list(params_map.dense_experts([(("layers", 0, "mlp", "experts", "gate_up_blocks"), blocks)], jnp.float32))
