"""Reading a checkpoint never loads something wrong silently: each bad file is one clear error line.

Safetensors headers are checked as strictly as the ``safetensors`` library checks them; NaN/Inf
weights and NaN MXFP4 scales are refused as they are read; a config is checked against the
checkpoint's tensors before anything is built from it; paths are taken from the current directory.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
import time
import types
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import SafetensorError, safe_open
from test_errors import cli, copy, one_line, rewrite

import oss_jax
from oss_jax import checkpoint, orbax_format, sharding
from oss_jax.checkpoint import CheckpointError

load_module = sys.modules["oss_jax.load"]  # the module (oss_jax.load is the function)


# -- safetensors headers ----------------------------------------------------------------------------
def raw_file(path: Path, header: dict, data: bytes, pad: bytes = b"") -> Path:
    """A safetensors file with exactly this header (JSON, then ``pad``) and data section."""
    raw = json.dumps(header).encode() + pad
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def f32(n: int, lo: int, hi: int | None = None, shape: list | None = None) -> dict:
    """A float32 header entry: ``n`` values at data byte ``lo`` (``hi`` and ``shape`` to falsify it)."""
    return {"dtype": "F32", "shape": [n] if shape is None else shape,
            "data_offsets": [lo, lo + 4 * n if hi is None else hi]}


# name: (header, data bytes, our error or None where both readers accept the file)
HEADERS = {
    "overlap": ({"a": f32(3, 0), "b": f32(3, 0)}, 12, r"tensor 'b' at data bytes \[0, 12\) overlaps"),
    "gap": ({"a": f32(3, 4)}, 16, r"tensor 'a' at data bytes \[4, 16\) leaves a gap"),
    "trailing bytes": ({"a": f32(3, 0)}, 16, "4 bytes after the last tensor"),
    "float offsets": ({"a": {**f32(3, 0), "data_offsets": [0.0, 12.0]}}, 12,
                      r"tensor 'a' has malformed data_offsets \[0.0, 12.0\]"),
    "bool offsets": ({"a": {**f32(1, 0), "data_offsets": [False, 4]}}, 4, "tensor 'a' has malformed data_offsets"),
    "three offsets": ({"a": {**f32(3, 0), "data_offsets": [0, 12, 12]}}, 12, "malformed data_offsets"),
    "float shape": ({"a": f32(3, 0, shape=[3.0])}, 12, r"tensor 'a' has a malformed shape \[3.0\]"),
    "bool shape": ({"a": f32(1, 0, shape=[True])}, 4, "malformed shape"),
    "negative shape": ({"a": f32(3, 0, shape=[-3])}, 12, "malformed shape"),
    "metadata not strings": ({"__metadata__": {"x": 1}, "a": f32(3, 0)}, 12, "__metadata__ must map strings"),
    "size mismatch": ({"a": f32(3, 0, hi=8)}, 8, "header size does not match shape"),
    "unordered": ({"b": f32(3, 12), "a": f32(3, 0)}, 24, None),
    "zero-size tensor": ({"a": f32(0, 0), "b": f32(3, 0)}, 12, None),
    "extra entry key": ({"a": {**f32(3, 0), "note": 1}}, 12, None),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_header_checks_agree_with_safetensors(case, tmp_path):
    """A file the safetensors library refuses we refuse (one line naming file and tensor); one it reads, we read."""
    header, nbytes, message = HEADERS[case]
    f = raw_file(tmp_path / "t.safetensors", header, bytes(nbytes))
    refused_by_library = False
    try:
        with safe_open(str(f), "np") as h:
            list(h.keys())
    except SafetensorError:
        refused_by_library = True
    assert refused_by_library == (message is not None)
    if message is None:
        assert set(checkpoint.read_header(f)) == set(header) - {"__metadata__"}
        return
    with pytest.raises(CheckpointError, match=message) as e:
        checkpoint.read_header(f)
    assert str(e.value).startswith(f"{f}: ") and "\n" not in str(e.value)


def test_files_both_readers_accept_still_load(mxfp4_dir, dense_dir, tmp_path):
    """Ours (header padded with spaces), transformers' own, and a sharded one: the library reads them, so do we."""
    f = raw_file(tmp_path / "padded.safetensors", {"a": f32(3, 0)}, bytes(12), pad=b"    ")
    files = [f, mxfp4_dir / "model.safetensors", dense_dir / "model.safetensors"]
    for path in files:
        with safe_open(str(path), "np") as h:
            names = set(h.keys())
        assert set(checkpoint.read_header(path)) == names
    assert checkpoint.open_checkpoint(dense_dir).layout == "hf"


def alias(path: Path, name: str, target: str) -> None:
    """Rewrite a checkpoint so that tensor ``name`` points at ``target``'s bytes (its own are dropped)."""
    f = path / "model.safetensors"
    tensors = {n: checkpoint.read_tensor(i) for n, i in checkpoint.read_header(f).items() if n != name}
    checkpoint.write_safetensors(f, tensors)
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header[name] = dict(header[target])
    new = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_two_tensors_on_the_same_bytes_refused(mxfp4_dir, tmp_path):
    """k_proj.bias aliased onto v_proj.bias (same shape): it used to load and convert silently."""
    from oss_jax.convert import convert

    path = copy(mxfp4_dir, tmp_path)
    alias(path, "model.layers.0.self_attn.k_proj.bias", "model.layers.0.self_attn.v_proj.bias")
    with pytest.raises(SafetensorError, match="invalid offset"), safe_open(str(path / "model.safetensors"), "np"):
        pass
    message = r"model.safetensors: tensor 'model.layers.0.self_attn.(k|v)_proj.bias' at data bytes .* overlaps"
    with pytest.raises(CheckpointError, match=message):
        oss_jax.load(path)
    with pytest.raises(CheckpointError, match=message):
        convert(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_float_offsets_in_a_checkpoint(mxfp4_dir, tmp_path):
    path = copy(mxfp4_dir, tmp_path)
    f = path / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"]["data_offsets"] = [float(x) for x in header["model.norm.weight"]["data_offsets"]]
    new = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    with pytest.raises(CheckpointError, match=rf"^{f}: tensor 'model.norm.weight' has malformed data_offsets "
                                              r"\[\d+\.0, \d+\.0\] \(two non-negative integers\)$"):
        oss_jax.load(path)


# -- values -----------------------------------------------------------------------------------------
def poison(name: str, index: tuple, value, dtype=None):
    def change(t: dict) -> dict:
        a = t[name].astype(dtype or t[name].dtype)
        a[index] = value
        return {**t, name: a}
    return change


POISON = {  # case: (tensor, index, value, stored dtype, message)
    "nan f32": ("model.layers.1.mlp.router.bias", (3,), np.nan, None, r"a non-finite value \(nan\) at index \[3\]"),
    "inf bf16": ("model.layers.2.self_attn.o_proj.weight", (5, 7), -np.inf, ml_dtypes.bfloat16,
                 r"a non-finite value \(-inf\) at index \[5, 7\]"),
    "scale 255": ("model.layers.0.mlp.experts.down_proj_scales", (2, 1, 0), 255, None,
                  r"an MXFP4 scale of 255 \(NaN in E8M0\) at index \[2, 1, 0\]"),
}


@pytest.mark.parametrize("case", list(POISON))
def test_non_finite_values_refused(case, mxfp4_dir, tmp_path):
    """Eager load, conversion and sharded (lazy, slice by slice) load all refuse, naming file, tensor and index."""
    from oss_jax.convert import convert

    name, index, value, dtype, message = POISON[case]
    path = copy(mxfp4_dir, tmp_path)
    rewrite(path, poison(name, index, value, dtype))
    expected = rf"^{path / 'model.safetensors'}: tensor '{name}' holds {message}$"
    with pytest.raises(CheckpointError, match=expected):
        oss_jax.load(path)
    with pytest.raises(CheckpointError, match=expected):
        convert(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match=expected):
        oss_jax.load(path, mesh=sharding.make_mesh())


def test_lazy_slices_report_the_tensors_index(mxfp4_dir, tmp_path):
    """A slice not covering the bad value reads fine; one covering it names the index in the whole tensor."""
    name = "model.layers.2.self_attn.o_proj.weight"
    path = copy(mxfp4_dir, tmp_path)
    rewrite(path, poison(name, (50, 7), np.inf))
    lazy = checkpoint.LazyTensor.from_file(checkpoint.read_header(path / "model.safetensors")[name])
    assert np.isfinite(lazy[:50]).all() and np.isfinite(lazy[51:]).all()
    with pytest.raises(CheckpointError, match=r"non-finite value \(inf\) at index \[50, 7\]$"):
        lazy[40:60, 5:9]


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32, np.float64])
def test_bad_value_finds_every_non_finite(dtype, monkeypatch):
    """Every NaN/Inf bit pattern is found, in any chunk; the largest finite values and -0 pass."""
    monkeypatch.setattr(checkpoint, "CHECK_CHUNK", 16)
    info = np.finfo(dtype)
    a = np.array([0, -0.0, info.max, -info.max, info.tiny, info.smallest_subnormal] * 10, dtype)
    assert checkpoint.bad_value(a) is None
    for v in (np.nan, np.inf, -np.inf, -np.nan):
        b = a.copy()
        b[37] = v
        assert checkpoint.bad_value(b.reshape(6, 10))[0] == (3, 7)
    bits = a.view(f"u{a.itemsize}").copy()
    bits[59] |= checkpoint._EXPONENT[np.dtype(dtype)] | 1  # a NaN with another payload
    assert checkpoint.bad_value(bits.view(dtype))[0] == (59,)


def test_bad_orbax_values_refused(mxfp4_dir, tmp_path):
    """A converted group with a NaN, or packed bytes stored as floats, is refused naming group and array."""
    import orbax.checkpoint as ocp

    from oss_jax.convert import convert

    out = convert(mxfp4_dir, tmp_path / "conv", progress=False)
    ckpt = ocp.StandardCheckpointer()
    tree = ckpt.restore(out / "params" / "norm")
    tree["scale"] = np.where(np.arange(tree["scale"].size) == 4, np.nan, tree["scale"]).astype(tree["scale"].dtype)
    ckpt.save(out / "params" / "norm", tree, force=True)
    ckpt.wait_until_finished()
    with pytest.raises(CheckpointError, match=rf"^{out}/params/norm: array 'scale' holds a non-finite value "
                                              r"\(nan\) at index \[4\]$"):
        oss_jax.load(out)
    group = out / "params" / "layers.1"
    tree = ckpt.restore(group)
    tree["mlp"]["experts"]["down_scales"] = tree["mlp"]["experts"]["down_scales"].astype(np.float32)
    ckpt.save(group, tree, force=True)
    ckpt.wait_until_finished()
    ckpt.close()
    with pytest.raises(CheckpointError, match=r"layers.1: array 'mlp.experts.down_scales' has dtype float32, "
                                              r"expected uint8 \(MXFP4\)$"):
        list(orbax_format.read_orbax(out, ["layers.1"]))


# -- config against checkpoint ---------------------------------------------------------------------
def set_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("layer_types", None)  # derived from num_hidden_layers
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("layers,message", [
    (10**6, "num_hidden_layers is 1000000 but the checkpoint has tensors for layers 0..3"),
    (2, "num_hidden_layers is 2 but the checkpoint has tensors for layers 0..3"),
])
def test_layer_count_checked_before_anything_is_built(layers, message, mxfp4_dir, tmp_path):
    """10**6 layers used to build a dict of every expected name (gigabytes, ~40 s) before failing."""
    path = copy(mxfp4_dir, tmp_path)
    set_config(path, num_hidden_layers=layers)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"^{path / 'config.json'}: {message}$"):
        oss_jax.load(path)
    assert time.perf_counter() - start < 5  # was ~40 s and 4.5 GB; measured ~0.1 s


def test_absurd_sizes_fail_on_the_header_shapes(mxfp4_dir, tmp_path):
    path = copy(mxfp4_dir, tmp_path)
    set_config(path, vocab_size=10**12, num_hidden_layers=4)
    with pytest.raises(CheckpointError, match=r"'model.embed_tokens.weight' has shape \[1031, 96\], "
                                              r"expected \[1000000000000, 96\]"):
        oss_jax.load(path)


def test_missing_layer_named(mxfp4_dir, tmp_path):
    path = copy(mxfp4_dir, tmp_path)
    rewrite(path, lambda t: {k: v for k, v in t.items() if ".layers.2." not in k})
    with pytest.raises(CheckpointError, match=r"num_hidden_layers is 4 but the checkpoint has tensors for "
                                              r"layers 0\.\.1, 3$"):
        oss_jax.load(path)


def test_orbax_layer_count_and_marker(mxfp4_dir, tmp_path):
    from oss_jax.convert import convert

    out = convert(mxfp4_dir, tmp_path / "conv", progress=False)
    set_config(out, num_hidden_layers=10**6)
    with pytest.raises(CheckpointError, match="num_hidden_layers is 1000000 but the checkpoint has parameter "
                                              r"groups for layers 0\.\.3$"):
        oss_jax.load(out)
    set_config(out, num_hidden_layers=4)
    marker = json.loads((out / "oss_jax.json").read_text())
    for change, message in [(lambda m: m.pop("experts"), "not an oss-jax checkpoint marker"),
                            (lambda m: m["groups"].append("../../etc"), r"parameter group '\.\./\.\./etc' unexpected"),
                            (lambda m: m["groups"].remove("norm"), "parameter group 'norm' not listed"),
                            (lambda m: m["groups"].append("norm"), "parameter group 'norm' listed twice")]:
        m = json.loads(json.dumps(marker))
        change(m)
        (out / "oss_jax.json").write_text(json.dumps(m))
        with pytest.raises(CheckpointError, match=f"^{out / 'oss_jax.json'}: {message}$"):
            oss_jax.load(out)


def test_config_error_names_the_file_once(mxfp4_dir, tmp_path):
    path = copy(mxfp4_dir, tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=rf"^{path / 'config.json'}: cannot read config \(No such file"):
        oss_jax.load(path)


# -- shards and the index ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded_dir(hf_tiny, tmp_path_factory) -> Path:
    import reference as R

    return R.save_dense(hf_tiny, tmp_path_factory.mktemp("ckpt") / "sharded", shard_size="200KB")


def edit_index(path: Path, change) -> Path:
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    index.write_text(json.dumps(change(data)))
    return index


@pytest.mark.parametrize("change,message", [
    (lambda d: {**d, "weight_map": list(d["weight_map"])},
     r"corrupt index \('weight_map' must map tensor names to shard files, got a list\)"),
    (lambda d: {**d, "weight_map": {**d["weight_map"], "lm_head.weight": 3}},
     r"corrupt index \(tensor 'lm_head.weight' maps to 3, not a shard file name\)"),
    (lambda d: {"metadata": {}}, r"corrupt index \('weight_map' must map tensor names to shard files, got nothing\)"),
    (lambda d: [1, 2], r"corrupt index \('weight_map' must map tensor names to shard files, got nothing\)"),
    (lambda d: {**d, "weight_map": {**d["weight_map"], "lm_head.weight": "../elsewhere/x.safetensors"}},
     r"shard path '\.\./elsewhere/x\.safetensors' \(tensor 'lm_head.weight'\) leaves the checkpoint directory"),
    (lambda d: {**d, "weight_map": {**d["weight_map"], "lm_head.weight": "/etc/x.safetensors"}},
     r"shard path '/etc/x\.safetensors' \(tensor 'lm_head.weight'\) leaves the checkpoint directory"),
    (lambda d: {**d, "weight_map": {}}, "the index lists no shards"),
], ids=["list", "int", "no weight_map", "not an object", "outside", "absolute", "empty"])
def test_bad_index(change, message, sharded_dir, tmp_path):
    path = copy(sharded_dir, tmp_path)
    index = edit_index(path, change)
    with pytest.raises(CheckpointError, match=f"^{index}: {message}$"):
        oss_jax.load(path)


def test_shard_in_a_subdirectory_loads(sharded_dir, tmp_path):
    """Index entries are paths relative to the directory: a shard under a subfolder is found (and compared whole)."""
    path = copy(sharded_dir, tmp_path)
    shard = sorted(path.glob("*.safetensors"))[0]
    (path / "sub").mkdir()
    shard.rename(path / "sub" / shard.name)
    edit_index(path, lambda d: {**d, "weight_map": {k: (f"sub/{v}" if v == shard.name else v)
                                                    for k, v in d["weight_map"].items()}})
    assert len(checkpoint.open_checkpoint(path)) == len(checkpoint.open_checkpoint(sharded_dir))


def test_symlink_loop_and_broken_link(sharded_dir, tmp_path):
    path = copy(sharded_dir, tmp_path)
    victim = sorted(path.glob("*.safetensors"))[1]
    victim.unlink()
    victim.symlink_to(victim.name)
    with pytest.raises(CheckpointError, match=rf"^{victim}: cannot read \(symlink loop: "):
        oss_jax.load(path)
    victim.unlink()
    victim.symlink_to("nowhere.safetensors")
    with pytest.raises(CheckpointError, match=rf"^{victim}: shard listed in the index is missing \(a broken symlink"):
        oss_jax.load(path)
    (path / "model.safetensors.index.json").unlink()  # no index: every *.safetensors file is read
    with pytest.raises(CheckpointError, match=rf"^{victim}: cannot read \(No such file"):
        oss_jax.load(path)


# -- paths ------------------------------------------------------------------------------------------
def test_relative_paths(mxfp4_dir, tmp_path, monkeypatch):
    """A converted checkpoint and an HF directory given relative to the current directory (orbax wants absolute)."""
    from oss_jax.convert import convert

    convert(mxfp4_dir, tmp_path / "conv", progress=False)
    shutil.copytree(mxfp4_dir, tmp_path / "hf")
    tokens = np.array([[1, 2, 3, 4]], np.int32)
    want = {name: np.asarray(oss_jax.load(tmp_path / name, dtype="float32")(tokens)) for name in ("conv", "hf")}
    monkeypatch.chdir(tmp_path)
    for name in ("conv", "hf", "./conv"):
        got = np.asarray(oss_jax.load(name, dtype="float32")(tokens))
        np.testing.assert_array_equal(got, want[name.removeprefix("./")])
    assert load_module.resolve("conv") == tmp_path / "conv"


def test_name_tiny_is_the_bundled_model(mxfp4_dir, tmp_path, monkeypatch):
    """A local file or folder ``tiny`` does not shadow the bundled model; ``./tiny`` reaches it."""
    monkeypatch.chdir(tmp_path)
    Path("tiny").write_text("not a model")
    bundled = oss_jax.load("tiny")
    shipped = json.loads((load_module.TINY_DIR / "model" / "config.json").read_text())
    assert bundled.config.vocab_size == shipped["vocab_size"] != 1031
    with pytest.raises(CheckpointError, match="tiny: expected a checkpoint directory, got a file"):
        oss_jax.load("./tiny")
    Path("tiny").unlink()
    shutil.copytree(mxfp4_dir, "tiny")
    assert oss_jax.load("./tiny").config.vocab_size == 1031
    assert oss_jax.load(Path("tiny")).config.vocab_size == 1031
    assert oss_jax.load("tiny").config.vocab_size == bundled.config.vocab_size


# -- damaged orbax groups ---------------------------------------------------------------------------
def empty_group(group: Path) -> None:
    for p in group.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def drop_data(group: Path) -> None:
    shutil.rmtree(group / "d")
    shutil.rmtree(group / "ocdbt.process_0")


def truncate_data(group: Path) -> None:
    for f in [*group.glob("d/*"), *group.glob("ocdbt.process_0/d/*")]:
        f.write_bytes(f.read_bytes()[:10])


@pytest.mark.parametrize("damage", [empty_group, drop_data, truncate_data])
def test_damaged_orbax_group(damage, mxfp4_dir, tmp_path):
    from oss_jax.convert import convert

    out = convert(mxfp4_dir, tmp_path / "conv", progress=False)
    damage(out / "params" / "layers.0")
    with pytest.raises(CheckpointError) as e:
        oss_jax.load(out)
    msg = str(e.value)
    assert msg.startswith(f"{out}/params/layers.0: unreadable orbax group (data missing or corrupt: ")
    assert "\n" not in msg and "tensorstore_spec" not in msg and len(msg) < 400, msg


def test_cli_damaged_orbax_relative_path(mxfp4_dir, tmp_path, monkeypatch):
    """`--model conv` (relative) with layers.0's data deleted: exit 1, one stderr line naming that group.

    The groups restored before it (unembed_VD, embed_VD, norm) are read through the relative path, which
    orbax used to refuse ("Checkpoint path should be absolute"); a full generate would cost ~17 s of compiling.
    """
    from oss_jax.convert import convert

    convert(mxfp4_dir, tmp_path / "conv", progress=False)
    monkeypatch.chdir(tmp_path)
    drop_data(tmp_path / "conv" / "params" / "layers.0")
    r = cli("generate", "--model", "conv", "--tokens", "1 2", "--max-new-tokens", "1")
    line = one_line(r.stderr)
    assert r.returncode == 1 and line.startswith(
        f"oss-jax generate: error: {tmp_path}/conv/params/layers.0: unreadable orbax group (data missing or corrupt")


def test_closed_loop_reports_are_dropped_others_kept(monkeypatch):
    """The hook read_orbax installs drops only tensorstore's 'Event loop is closed' callbacks."""
    import asyncio

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    orbax_format._drop_abandoned_callback_errors()
    orbax_format._drop_abandoned_callback_errors()  # installed once
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        closed = e
    other = RuntimeError("Event loop is closed")  # same text, not from call_soon_threadsafe

    def report(exc):
        return types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=exc.__traceback__,
                                     err_msg=None, object=None)

    sys.unraisablehook(report(closed))
    sys.unraisablehook(report(other))
    assert [u.exc_value for u in seen] == [other]
