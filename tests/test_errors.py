"""Bad input gets a clear one-line error, and nothing half-written is ever left to load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import oss_jax
from oss_jax import checkpoint
from oss_jax.checkpoint import CheckpointError


def copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def rewrite(path, change):
    """Rewrite a single-file checkpoint's tensors through ``change(dict) -> dict``."""
    f = path / "model.safetensors"
    src = checkpoint.read_header(f)
    tensors = change({n: checkpoint.read_tensor(i) for n, i in src.items()})
    checkpoint.write_safetensors(f, tensors)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "oss_jax.cli", *map(str, args)], capture_output=True,
                          text=True)


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


BAD = {
    "missing": (lambda t: {k: v for k, v in t.items() if "layers.1.self_attn.sinks" not in k},
                "missing tensor 'model.layers.1.self_attn.sinks'"),
    "unexpected": (lambda t: {**t, "model.layers.0.extra.weight": np.zeros(3, np.float32)},
                   "unexpected tensor 'model.layers.0.extra.weight'"),
    "shape": (lambda t: {**t, "lm_head.weight": t["lm_head.weight"][:-1]},
              "tensor 'lm_head.weight' has shape [1030, 96], expected [1031, 96]"),
    "dtype": (lambda t: {**t, "model.norm.weight": t["model.norm.weight"].astype(np.int32)},
              "tensor 'model.norm.weight' has dtype I32"),
    "blocks dtype": (lambda t: {**t, "model.layers.0.mlp.experts.down_proj_scales":
                                t["model.layers.0.mlp.experts.down_proj_scales"].astype(ml_dtypes.bfloat16)},
                     "'model.layers.0.mlp.experts.down_proj_scales' has dtype BF16, expected U8"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tensors_refused_by_load_and_convert(case, mxfp4_dir, tmp_path):
    change, message = BAD[case]
    path = copy(mxfp4_dir, tmp_path)
    rewrite(path, change)
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        oss_jax.load(path)
    r = cli("convert", path, tmp_path / "out", "--no-progress")
    assert r.returncode == 1 and message in one_line(r.stderr)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_truncated_file(mxfp4_dir, tmp_path):
    path = copy(mxfp4_dir, tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated file: tensor"):
        oss_jax.load(path)
    r = cli("convert", path, tmp_path / "out")
    assert "model.safetensors: truncated" in one_line(r.stderr) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content,message", [(b"", "no header"), (b"\xff" * 64, "not a safetensors file"),
                                             (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}",
                                              "corrupt safetensors header")])
def test_corrupt_file(mxfp4_dir, tmp_path, content, message):
    path = copy(mxfp4_dir, tmp_path)
    (path / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        oss_jax.load(path)


def test_missing_shard(hf_tiny, tmp_path):
    import reference as R

    path = R.save_dense(hf_tiny, tmp_path / "sharded", shard_size="200KB")
    victim = sorted(path.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: shard listed in the index is missing"):
        oss_jax.load(path)


@pytest.mark.parametrize("change,message", [
    (lambda c: c.pop("hidden_size"), "missing required key 'hidden_size'"),
    (lambda c: c.update(num_attention_heads=5), "multiple of num_key_value_heads"),
    (lambda c: c.update(num_experts_per_tok=99), "exceeds num_experts"),
    (lambda c: c.update(layer_types=["sliding_attention"]), "layer_types has 1 entries for 4 layers"),
    (lambda c: c.update(vocab_size=-3), "vocab_size must be a positive integer"),
    (lambda c: c["rope_parameters"].update(rope_type="longrope"), "unsupported rope_type"),
])
def test_bad_config(mxfp4_dir, tmp_path, change, message):
    path = copy(mxfp4_dir, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    change(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        oss_jax.load(path)


def test_config_not_json(mxfp4_dir, tmp_path):
    path = copy(mxfp4_dir, tmp_path)
    (path / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        oss_jax.load(path)


def test_paths(tmp_path, mxfp4_dir):
    with pytest.raises(CheckpointError, match="no such directory"):
        oss_jax.load(tmp_path / "nowhere")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="got a file"):
        oss_jax.load(tmp_path / "file.bin")
    with pytest.raises(CheckpointError, match="no such directory"):
        oss_jax.load("./relative/not/here")
    with pytest.raises(ValueError, match="dtype must be"):
        oss_jax.load(mxfp4_dir, dtype="int8")
    with pytest.raises(ValueError, match="experts must be"):
        oss_jax.load(mxfp4_dir, experts="sometimes")
    r = cli("convert", tmp_path / "nowhere", tmp_path / "out")
    assert r.returncode == 1 and "no such directory" in one_line(r.stderr)


def test_packed_needs_mxfp4(dense_dir):
    with pytest.raises(CheckpointError, match="experts='packed' needs MXFP4"):
        oss_jax.load(dense_dir, experts="packed")


def test_bad_tokens(mxfp4_dir):
    model = oss_jax.load(mxfp4_dir, dtype="float32")
    with pytest.raises(ValueError, match="token id 1031 is outside the vocabulary"):
        model(np.array([[1, 1031]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(np.array([[-1, 3]]))
    with pytest.raises(ValueError, match=r"must be \[batch, time\]"):
        model(np.array([1, 2, 3]))
    with pytest.raises(TypeError, match="must be integers"):
        model(np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="exceed the model's context of 2048"):
        model(np.zeros((1, 2049), np.int32))
    with pytest.raises(ValueError, match="position 2048 is past the model's context of 2048"):
        model(np.zeros((1, 2), np.int32), np.array([[2047, 2048]]))
    with pytest.raises(ValueError, match="positions must have the tokens' shape"):
        model(np.zeros((1, 2), np.int32), np.array([[0, 1, 2]]))


def test_interrupted_conversion_leaves_nothing(mxfp4_dir, tmp_path, monkeypatch):
    """An exception half-way (as from Ctrl-C) removes the temporary directory; DST never appears."""
    from oss_jax import convert as converter

    calls = {"n": 0}
    real = checkpoint.to_params

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(converter.checkpoint, "to_params", flaky)
    with pytest.raises(KeyboardInterrupt):
        converter.convert(mxfp4_dir, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_half_written_orbax_does_not_load(mxfp4_dir, tmp_path):
    """A conversion killed before the marker is written leaves a directory that load refuses."""
    from oss_jax.convert import convert

    out = convert(mxfp4_dir, tmp_path / "out", progress=False)
    (out / "oss_jax.json").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        oss_jax.load(out)
    out2 = convert(mxfp4_dir, tmp_path / "out2", progress=False)
    shutil.rmtree(out2 / "params" / "layers.2")
    with pytest.raises(CheckpointError, match=r"layers\.2: missing parameter group"):
        oss_jax.load(out2)


def test_existing_destination_is_kept(mxfp4_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    r = cli("convert", mxfp4_dir, tmp_path / "out")
    assert "already exists" in one_line(r.stderr)
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"
