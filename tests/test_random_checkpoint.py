"""``scripts/make_random_checkpoint.py`` on a tiny config: the exact HF layout, and it runs."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest

import oss_jax
from oss_jax import checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_random_checkpoint.py"
TINY = oss_jax.Config(vocab_size=1031, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=20, num_experts=7,
                      experts_per_token=3, quant_method="mxfp4")


@pytest.fixture(scope="module")
def script():
    return runpy.run_path(str(SCRIPT))


@pytest.fixture(scope="module")
def ckpt(script, tmp_path_factory) -> Path:
    return script["write_random_checkpoint"](tmp_path_factory.mktemp("rand") / "tiny", TINY, seed=1)


def test_layout_is_exactly_hf(ckpt):
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == ["config.json", "model-00000-of-00002.safetensors", "model-00001-of-00002.safetensors",
                     "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    src = checkpoint.open_checkpoint(ckpt)  # checks names, shapes and dtypes against config.json
    assert src.layout == "hf" and src.mxfp4 and src.config == TINY
    expected = checkpoint.hf_shapes(TINY, mxfp4_experts=True)
    assert set(src.tensors) == set(expected)
    for name, info in src.tensors.items():
        assert info.shape == expected[name][0]
        assert info.dtype == ("U8" if name.endswith(("_blocks", "_scales")) else "BF16"), name
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {n: i.file.name for n, i in src.tensors.items()}
    assert index["metadata"]["total_size"] == sum(i.end - i.start for i in src.tensors.values())
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["quantization_config"]["quant_method"] == "mxfp4"
    assert not any(p.name.startswith(".") for p in ckpt.parent.iterdir())  # temporary dir renamed


def test_values_are_sane(ckpt):
    src = checkpoint.open_checkpoint(ckpt)
    t = {n: checkpoint.read_tensor(i) for n, i in src.tensors.items()}
    w = t["model.layers.0.self_attn.q_proj.weight"].astype(np.float32)
    assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002
    assert abs(t["model.norm.weight"].astype(np.float32).mean() - 1) < 0.01
    scales = t["model.layers.1.mlp.experts.down_proj_scales"]
    assert scales.min() >= 118 and scales.max() <= 122
    blocks = t["model.layers.1.mlp.experts.gate_up_proj_blocks"]
    assert len(np.unique(blocks)) > 200  # uniformly random bytes


def test_forward_is_finite(ckpt):
    model = oss_jax.load(ckpt)
    assert model.layers[0].mlp.experts.packed
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (1, 16)).astype(np.int32)
    logits = np.asarray(model(tokens))
    assert logits.shape == (1, 16, TINY.vocab_size)
    assert np.isfinite(logits).all() and 0.1 < logits.std() < 10


def test_deterministic_and_no_overwrite(script, ckpt, tmp_path):
    again = script["write_random_checkpoint"](tmp_path / "again", TINY, seed=1, shards=1)
    assert sorted(p.name for p in again.iterdir()) == ["config.json", "model.safetensors"]
    a = checkpoint.open_checkpoint(ckpt).tensors
    b = checkpoint.open_checkpoint(again).tensors
    for name in ("lm_head.weight", "model.layers.1.mlp.experts.down_proj_blocks"):
        assert np.array_equal(checkpoint.read_tensor(a[name]), checkpoint.read_tensor(b[name]))
    with pytest.raises(checkpoint.CheckpointError, match=r"again: already exists \(pass --overwrite"):
        script["write_random_checkpoint"](again, TINY)


def test_cli(script, tmp_path):
    assert script["main"](["--out", str(tmp_path / "bad"), "--shards", "0"]) == 1
    assert not (tmp_path / "bad").exists()
