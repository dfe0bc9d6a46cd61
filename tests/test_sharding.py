"""Sharding over devices and processes (``oss_jax.sharding``), checked for real.

JAX reads ``XLA_FLAGS`` once, at import, and the test session has already imported it with one
CPU device. So the multi-device checks run in subprocesses launched from here, with this file
as their script (``python tests/test_sharding.py eight|process ...``):

* one process with 8 simulated CPU devices loads tiny checkpoints with ``load(mesh=...)`` on
  several meshes, runs forward passes and a greedy generation, and records shard shapes, bytes
  held per device and every byte range it read; the tests compare its outputs with the
  unsharded model, computed meanwhile in this process;
* two processes with 2 CPU devices each join with ``jax.distributed`` on localhost (gloo
  collectives) and run one sharded forward pass over the 4 devices.

Checkpoints: 2 layers (one sliding, one full), 8 experts (so an ``expert`` axis of 2, 4 or 8
splits them) and a 7-expert one, whose experts are replicated along an ``expert`` axis of 2.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TOL = 1e-5  # max |diff| / max |logit|, fp32: sharded vs single-device; measured about 1e-6
TIMEOUT = 420  # seconds per subprocess (they take well under a minute on an idle machine)
# name: (checkpoint, (data, expert, tensor), load's experts=). All through load(mesh=...),
# except "shard-7...", which loads unsharded and calls shard(model, mesh).
CASES = {
    "dense-data-8x1x1": ("dense8", (8, 1, 1), "auto"),
    "mxfp4-expert-1x8x1": ("mxfp4_8", (1, 8, 1), "auto"),
    "dense-mixed-2x2x2": ("dense8", (2, 2, 2), "auto"),
    # MXFP4 dequantized slice by slice: 16 of 64 hidden units per device, half a 32-value block.
    "mxfp4-as-dense-1x2x4": ("mxfp4_8", (1, 2, 4), "dense"),
    # 7 experts on 2 and 2 KV heads on 4 do not divide: replicated; 64 hidden units on 4 do.
    "shard-7-experts-1x2x4": ("dense7", (1, 2, 4), "auto"),
}
GENERATE = ("mxfp4_8", (2, 2, 2))  # greedy generation, sharded vs not
PROCESS_MESH = (1, 2, 2)  # 2 processes x 2 devices: the expert axis spans the processes


# -- the subprocesses ------------------------------------------------------------------------------
def _read_log(checkpoint) -> list[tuple[str, int, int, int, int]]:
    """Record every byte range ``checkpoint.read_region`` reads: (tensor, offset, n, start, end)."""
    log: list = []
    real = checkpoint._pread

    def spy(info, fd, offset, n):
        log.append((info.name, offset, n, info.start, info.end))
        return real(info, fd, offset, n)

    checkpoint._pread = spy
    return log


def _held(model) -> dict[str, int]:
    """Parameter bytes each device holds."""
    import jax
    from flax import nnx

    held: dict[str, int] = {}
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            arr = var.get_value()
            assert isinstance(arr, jax.Array)
            for s in arr.addressable_shards:
                held[str(s.device)] = held.get(str(s.device), 0) + s.data.nbytes
    return held


def _expert_shards(model) -> dict[str, list]:
    """Shard shapes of layer 0's expert tensors, and their full shapes."""
    from flax import nnx

    out = {}
    for name, var in vars(model.layers[0].mlp.experts).items():
        if isinstance(var, nnx.Variable):
            arr = var.get_value()
            out[name] = [list(arr.shape), sorted({tuple(s.data.shape) for s in arr.addressable_shards})]
    return out


def run_eight(job: Path) -> None:
    """8 simulated devices: every case of CASES, then the sharded generation."""
    import oss_jax
    from oss_jax import checkpoint, sharding

    spec = json.loads((job / "job.json").read_text())
    tokens = np.load(job / "tokens.npy")
    log = _read_log(checkpoint)
    out: dict = {"meshes": {
        "default": dict(sharding.make_mesh().shape),
        "data=2": dict(sharding.make_mesh(data=2).shape),
        "expert=2,tensor=2": dict(sharding.make_mesh(expert=2, tensor=2).shape)}}
    arrays = {}
    for name, (ckpt, (d, e, t), experts) in CASES.items():
        mesh = sharding.make_mesh(data=d, expert=e, tensor=t)
        log.clear()
        if name.startswith("shard"):
            model = sharding.shard(oss_jax.load(spec[ckpt], dtype="float32", experts=experts), mesh)
        else:
            model = oss_jax.load(spec[ckpt], dtype="float32", experts=experts, mesh=mesh)
        packed = model.layers[0].mlp.experts.packed
        plan = sharding.plan(model.config, mesh, dtype="float32", experts="packed" if packed else "dense")
        out[name] = {"reads": list(log), "held": _held(model), "plan_weights": plan.weights_total,
                     "experts": _expert_shards(model), "mesh_of": sharding.mesh_of(model) is mesh}
        arrays[name] = np.asarray(model(sharding.shard_batch(tokens, mesh)))
    ckpt, (d, e, t) = GENERATE
    mesh = sharding.make_mesh(data=d, expert=e, tensor=t)
    model = oss_jax.load(spec[ckpt], dtype="float32", mesh=mesh)
    prompts = [np.load(job / f"prompt{i}.npy") for i in range(2)]
    arrays["generate"], cache = oss_jax.generate(model, prompts, max_new_tokens=12, return_cache=True)
    out["cache_k_shards"] = sorted({tuple(s.data.shape) for s in cache.layers[1].k.addressable_shards})
    np.savez(job / "eight.npz", **arrays)
    (job / "eight.json").write_text(json.dumps(out))


def run_process(job: Path, pid: int, port: int) -> None:
    """One of two processes joined by jax.distributed: a sharded forward pass over 4 devices.
    ``pid`` and ``port`` are passed as arguments only for the record: initialize() reads the
    environment."""
    import jax
    from jax.experimental import multihost_utils

    import oss_jax
    from oss_jax import checkpoint, sharding

    sharding.initialize(initialization_timeout=120)  # from JAX_COORDINATOR_ADDRESS etc., as a launcher sets them
    spec = json.loads((job / "job.json").read_text())
    tokens = np.load(job / "tokens.npy")
    log = _read_log(checkpoint)
    d, e, t = PROCESS_MESH
    mesh = sharding.make_mesh(data=d, expert=e, tensor=t)
    model = oss_jax.load(spec["mxfp4_8"], dtype="float32", mesh=mesh)
    logits = multihost_utils.process_allgather(model(sharding.shard_batch(tokens, mesh)), tiled=True)
    np.save(job / f"process{pid}.npy", np.asarray(logits))
    (job / f"process{pid}.json").write_text(json.dumps({
        "devices": [jax.device_count(), jax.local_device_count(), jax.process_count()],
        "reads": log, "experts": _expert_shards(model)}))
    jax.distributed.shutdown()


def _launch(role: str, job: Path, *args, devices: int, **env_vars: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_vars,
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
    return subprocess.Popen([sys.executable, __file__, role, str(job), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen, what: str) -> None:
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"{what} timed out after {TIMEOUT} s:\n{output[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{what} failed (exit {proc.returncode}):\n{output[-4000:]}")


# -- fixtures: checkpoints, the 8-device run, and the unsharded references meanwhile ---------------
@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    import reference as R

    d = tmp_path_factory.mktemp("sharding")
    eight = R.hf_model(seed=1, num_hidden_layers=2, num_local_experts=8)
    seven = R.hf_model(seed=2, num_hidden_layers=2)
    spec = {"dense8": str(R.save_dense(eight, d / "dense8")), "mxfp4_8": str(R.save_mxfp4(eight, d / "mxfp4_8")),
            "dense7": str(R.save_dense(seven, d / "dense7"))}
    (d / "job.json").write_text(json.dumps(spec))
    rng = np.random.default_rng(5)
    np.save(d / "tokens.npy", rng.integers(0, R.TINY["vocab_size"], (8, 40)).astype(np.int32))
    for i, n in enumerate((23, 9)):  # left padding; 23 + 12 positions wrap the 16-slot rings twice
        np.save(d / f"prompt{i}.npy", rng.integers(1, R.TINY["vocab_size"], n).astype(np.int32))
    return d


@pytest.fixture(scope="module")
def eight(job):
    """Run the 8-device process; meanwhile compute every unsharded reference here (1 device)."""
    import oss_jax

    proc = _launch("eight", job, devices=8)
    try:
        spec = json.loads((job / "job.json").read_text())
        tokens = np.load(job / "tokens.npy")
        ref = {name: None for name in CASES}
        by_ckpt = {}
        for name, (ckpt, _, _) in CASES.items():  # MXFP4 packed or dequantized: the same logits
            if ckpt not in by_ckpt:
                by_ckpt[ckpt] = np.asarray(oss_jax.load(spec[ckpt], dtype="float32")(tokens))
            ref[name] = by_ckpt[ckpt]
        prompts = [np.load(job / f"prompt{i}.npy") for i in range(2)]
        model = oss_jax.load(spec[GENERATE[0]], dtype="float32")
        ref["generate"] = oss_jax.generate(model, prompts, max_new_tokens=12)
    finally:
        _wait(proc, "the 8-device process")
    return ref, dict(np.load(job / "eight.npz")), json.loads((job / "eight.json").read_text())


# -- tests ---------------------------------------------------------------------------------------
def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_logits_equal_single_device(eight, case):
    ref, out, info = eight
    assert out[case].shape == ref[case].shape == (8, 40, 1031)
    assert rel_err(out[case], ref[case]) < TOL
    assert info[case]["mesh_of"]


def test_sharded_greedy_generation_is_token_identical(eight):
    ref, out, info = eight
    assert out["generate"].shape == (2, 12)
    np.testing.assert_array_equal(out["generate"], ref["generate"])
        # A full layer's cache [B=2, S=256 (35 positions, rounded up), K=2, H=20]: batch over data, heads over tensor.
    assert info["cache_k_shards"] == [[1, 256, 1, 20]]


def test_default_meshes(eight):
    meshes = eight[2]["meshes"]
    assert meshes["default"] == {"data": 1, "expert": 4, "tensor": 2}
    assert meshes["data=2"] == {"data": 2, "expert": 4, "tensor": 1}
    assert meshes["expert=2,tensor=2"] == {"data": 2, "expert": 2, "tensor": 2}


def test_expert_weights_are_really_split(eight):
    info = eight[2]
    # 1x8x1: each device holds 1 of the 8 experts (MXFP4 blocks and scales, and biases).
    ex = info["mxfp4-expert-1x8x1"]["experts"]
    for name, (full, shards) in ex.items():
        assert shards == [[1, *full[1:]]], name
    # 2x2x2: 4 of 8 experts and half of the 64 hidden units on each device.
    ex = info["dense-mixed-2x2x2"]["experts"]
    assert ex["gate_up_EDF2"] == [[8, 96, 128], [[4, 96, 64]]]
    assert ex["down_EFD"] == [[8, 64, 96], [[4, 32, 96]]]
    assert ex["gate_up_bias_EF2"] == [[8, 128], [[4, 64]]]
    # 7 experts on an expert axis of 2: replicated (and still correct: test above); their 64
    # hidden units split over a tensor axis of 4.
    ex = info["shard-7-experts-1x2x4"]["experts"]
    assert ex["gate_up_EDF2"] == [[7, 96, 128], [[7, 96, 32]]]
    assert ex["down_EFD"] == [[7, 64, 96], [[7, 16, 96]]]
    assert ex["down_bias_ED"] == [[7, 96], [[7, 96]]]


@pytest.mark.parametrize("case", list(CASES))
def test_planner_counts_what_devices_hold(eight, case):
    """``plan`` applies the same rules: its weight bytes are what every device really holds."""
    info = eight[2][case]
    assert set(info["held"].values()) == {info["plan_weights"]}


def test_load_reads_only_each_devices_slices(eight):
    """1x8x1: every expert tensor is read as 8 disjoint eighths, one pread each; no read of any
    tensor is larger than the tensor (one tensor at a time at most)."""
    reads = eight[2]["mxfp4-expert-1x8x1"]["reads"]
    by_tensor: dict[str, list] = {}
    for name, offset, n, start, end in reads:
        assert start <= offset and offset + n <= end and n <= end - start
        by_tensor.setdefault(name, []).append((offset, n, end - start))
    experts = {k: v for k, v in by_tensor.items() if ".experts." in k}
    assert len(experts) == 2 * 6  # 2 layers x (blocks, scales, bias) x (gate_up, down)
    for name, rs in experts.items():
        size = rs[0][2]
        assert sorted(n for _, n, _ in rs) == [size // 8] * 8, name
        assert len({o for o, _, _ in rs}) == 8, name


def test_two_processes_agree_with_single_process(job, eight):
    """Two processes on localhost, 2 CPU devices each, joined by jax.distributed (gloo)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_launch("process", job, pid, port, devices=2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid)) for pid in range(2)]
    try:
        for pid, p in enumerate(procs):
            _wait(p, f"process {pid}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    ref = eight[0]["mxfp4-expert-1x8x1"]  # single-device logits of the same checkpoint and tokens
    for pid in range(2):
        info = json.loads((job / f"process{pid}.json").read_text())
        assert info["devices"] == [4, 2, 2]
        assert rel_err(np.load(job / f"process{pid}.npy"), ref) < TOL
        # Mesh (1, 2, 2): process pid holds experts 4*pid .. 4*pid+3, and read no byte of the others.
        assert info["experts"]["gate_up_blocks"][1] == [[4, 64, 3, 16]]
        for name, offset, n, start, end in info["reads"]:
            if ".experts." in name:
                half = start + (end - start) // 2
                assert (offset + n <= half) if pid == 0 else (offset >= half), name


@pytest.mark.parametrize("run_min", [1, 1 << 16])
def test_read_region_equals_numpy_slicing(tmp_path, monkeypatch, run_min):
    """Any rectangle, read exactly (run_min=1) or by coalesced slabs, equals numpy's slice."""
    import ml_dtypes

    from oss_jax import checkpoint

    rng = np.random.default_rng(0)
    arrays = {"u8": rng.integers(0, 255, (5, 7, 3, 16), dtype=np.uint8),
              "bf16": rng.normal(size=(11, 13)).astype(ml_dtypes.bfloat16)}
    checkpoint.write_safetensors(tmp_path / "t.safetensors", arrays)
    infos = checkpoint.read_header(tmp_path / "t.safetensors")
    monkeypatch.setattr(checkpoint, "RUN_MIN", run_min)
    for name, a in arrays.items():
        for _ in range(30):
            index = []
            for n in a.shape:
                lo = int(rng.integers(0, n))
                index.append(slice(lo, int(rng.integers(lo + 1, n + 1))))
            got = checkpoint.read_region(infos[name], tuple(index))
            np.testing.assert_array_equal(got, a[tuple(index)])
            lazy = checkpoint.LazyTensor.from_file(infos[name])
            np.testing.assert_array_equal(lazy[tuple(index)], a[tuple(index)])


def test_layout_rules_for_the_real_models():
    from jax.sharding import PartitionSpec as P

    from oss_jax import GPT_OSS_20B, GPT_OSS_120B
    from oss_jax.sharding import layout, param_spec

    lay = layout(GPT_OSS_120B, (1, 4, 2), packed=True)
    assert (lay.heads, lay.experts, lay.hidden, lay.table) == (True, True, True, 0)
    assert param_spec(("layers", 0, "mlp", "experts", "down_blocks"), lay) == P("expert", None, "tensor", None)
    assert param_spec(("layers", 0, "attn", "wo_NHD"), lay) == P("tensor", None, None)
    assert param_spec(("unembed_VD",), lay) == P(("expert", "tensor"), None)
    assert param_spec(("layers", 0, "mlp", "router_ED"), lay) == P()
    # F = 2880: 90 MXFP4 blocks split over 2 but not 4; dense units split over 4.
    assert not layout(GPT_OSS_20B, (1, 1, 4), packed=True).hidden
    assert layout(GPT_OSS_20B, (1, 1, 4), packed=False).hidden


def test_plan_numbers():
    from oss_jax.sharding import GiB, plan

    one = plan("gpt-oss-120b", 1, context=131072)
    two = plan("gpt-oss-120b", 2, context=131072)
    assert 60 < one.weights_total / GiB < 62 and one.fits(80) and not one.fits(40)
    # 2 KiB per token per layer for 18 full layers, the 18 sliding ones hold 128 slots; + positions
    assert one.kv_cache == 18 * (131072 + 128) * (2048 + 4) + 4
    assert two.kv_cache == one.kv_cache  # the expert axis does not split the cache
    ex1, ex2 = one.weights["experts (MXFP4)"], two.weights["experts (MXFP4)"]
    assert ex2 * 2 == ex1
    assert plan("gpt-oss-20b", 1, context=8192, device="cpu").fits(16)
    assert plan("gpt-oss-20b", 1, context=8192).total < 15 * GiB  # on a GPU: 14.6 GiB, tight on a 16 GiB card
    # a GPU prefill holds one layer's 32 experts decoded in bf16 (ragged); the CPU's grouped kernel decodes nothing
    # but keeps float32 rows per token-expert pair (x reordered, gate_up, swiglu, down)
    gpu, cpu = plan("gpt-oss-20b", 1, device="gpu"), plan("gpt-oss-20b", 1, device="cpu")
    D = F = 2880
    assert gpu.activations - cpu.activations == 32 * 3 * D * F * 2 - cpu.chunk * 4 * (2 * D + 3 * F) * 4
    assert gpu.weights == cpu.weights and gpu.kv_cache == cpu.kv_cache
    with pytest.raises(ValueError, match="device must be 'gpu', 'tpu' or 'cpu', got 'npu'"):
        plan("gpt-oss-20b", device="npu")
    assert "KV cache" in str(two)


def test_cli_plan(capsys):
    from oss_jax.cli import main

    assert main(["plan", "--model", "gpt-oss-120b", "--devices", "2", "--context", "131072"]) == 0
    out = capsys.readouterr().out
    assert "expert=2" in out and "total" in out


if __name__ == "__main__":
    role, job_dir = sys.argv[1], Path(sys.argv[2])
    if role == "eight":
        run_eight(job_dir)
    else:
        run_process(job_dir, int(sys.argv[3]), int(sys.argv[4]))
