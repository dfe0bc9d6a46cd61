"""Sharding gpt-oss over devices and hosts with JAX's own machinery.

Everything here is plain JAX: a ``jax.sharding.Mesh`` with three axes, ``NamedSharding`` s chosen
by partition rules, XLA's SPMD partitioner for attention and the dense parts, ``jax.shard_map``
for the experts, and ``jax.distributed`` for several processes. No home-made process management.

Mesh axes (``make_mesh``):

* ``data``: batch rows (activations, KV cache); weights are replicated along it.
* ``expert``: experts (expert parallelism); embedding and unembedding tables too.
* ``tensor``: attention heads (query and KV heads, KV cache) and expert hidden units;
  embedding and unembedding tables too.

Partition rules (``param_spec``), each applied only where it divides evenly (otherwise that
dimension is replicated along that axis, which is always correct, only less memory-efficient):

=========================================  ==================================================
parameter                                  split
=========================================  ==================================================
``wq_DNH``, ``bq_NH``, ``wo_NHD``,         query heads N over ``tensor``
``sinks_N``
``wk_DKH``, ``wv_DKH``, ``bk_KH``,         KV heads K over ``tensor`` (when K % tensor == 0;
``bv_KH``                                  then N = G*K divides too)
experts ``[E, ...]`` (dense, MXFP4         E over ``expert``; hidden units F over ``tensor``
blocks/scales, biases)                     (dense: F % tensor == 0; MXFP4: the F/32 blocks of
                                           ``down`` must split, so (F/32) % tensor == 0)
``embed_VD``, ``unembed_VD``               vocabulary V over ``(expert, tensor)``, else hidden D,
                                           else replicated
router, norms, ``bo_D``                    replicated (small)
KV cache ``k``, ``v`` ``[B, S, K, H]``     B over ``data``, K over ``tensor``
tokens, activations ``[B, T, ...]``        B over ``data``
=========================================  ==================================================

MXFP4 blocks ``[E, out, in/32, 16]`` and scales ``[E, out, in/32]`` are split exactly like the
dense weight they encode: ``gate_up`` (``out`` = 2F interleaved gate/linear rows: a contiguous
range of 2F/t rows holds whole gate/linear pairs) along ``out``, ``down`` (``in`` = F) along its
blocks. The tiny test model has 7 experts: with an ``expert`` axis of 2, 4 or 8 its experts are
replicated along that axis (and still correct); the tests also use an 8-expert variant.

Expert parallelism (``kernels.experts.experts_parallel``, run by ``Experts`` once ``shard`` gave it a mesh):
tokens are sharded over ``data`` only, so every device of an ``(expert, tensor)`` group already
holds the same tokens: that is the all-gather of tokens, for free. Each device applies its own
experts (its slice of hidden units) to the tokens routed to them, with the single-device code
(gather or scan; the gates of other devices' experts are zeroed), and one ``psum`` over
``expert`` and ``tensor`` combines the partial outputs. Nothing is dropped and there is no
capacity: a device computes whatever its experts receive, and the result equals the
single-device one (float32 partial sums, as the single-device code accumulates).

Communication per MoE layer: one all-reduce of ``[tokens per data shard, D]`` float32 over the
``g = expert x tensor`` devices of a group, i.e. a payload of ``tokens x 2880 x 4`` bytes
(11.5 KB per token of gpt-oss) of which a ring all-reduce moves ``2 (g-1)/g`` per device: 20 KB
per decoded token on 8 devices (latency-bound), 10 MB for a 512-token prefill chunk. An
all-to-all dispatch would move less (a token goes only to the devices holding its k = 4
experts, about 3.3 of 8 for 120b, in bf16) but needs tokens sharded across the expert axis
(token-parallel attention), fixed-size buffers (a capacity that drops tokens, or worst-case
padding) and a second all-to-all to return the outputs; the all-reduce is exact, capacity-free
and a few lines. Attention is replicated along ``expert`` (computed redundantly; its weights are
1.2 GiB for 20b, 1.8 GiB for 120b) and split along ``tensor`` by XLA, which inserts an
all-reduce after the output projection.

Loading (``oss_jax.load(source, mesh=mesh)``): every parameter is created with
``jax.make_array_from_callback``; the callback reads only the requested slice of the file
(``checkpoint.read_region``: one pread for slices along the leading axis, a few larger reads
otherwise), so a process holds at most its own slices of one tensor besides its shards.

Launch recipes
--------------

Plan first (bytes per device for weights, KV cache and activations; no device needed)::

    oss-jax plan --model gpt-oss-120b --devices 2 --context 131072

One host, N GPUs (one process sees every GPU)::

    import oss_jax
    from oss_jax import sharding

    mesh = sharding.make_mesh()                         # all devices; or make_mesh(expert=4, tensor=2)
    model = oss_jax.load("openai/gpt-oss-120b", mesh=mesh)
    new = oss_jax.generate(model, tokens, max_new_tokens=64)

On GPUs, let JAX use more than its default 75% of memory when the plan is tight:
``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95``.

Several hosts (one process per host, each seeing its local GPUs; every process runs the same
script, and each needs the checkpoint at the same path, on a shared filesystem or copied)::

    # host 0 is the coordinator; run on every host with its own JAX_PROCESS_ID:
    JAX_COORDINATOR_ADDRESS=10.0.0.1:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python run.py

    # run.py
    from oss_jax import sharding
    sharding.initialize()                 # first, before anything touches a device
    mesh = sharding.make_mesh()           # jax.devices(): the GPUs of every process
    model = oss_jax.load("/shared/gpt-oss-120b", mesh=mesh)   # each process reads its slices
    logits = model(tokens)                # same tokens in every process
    from jax.experimental import multihost_utils
    logits = multihost_utils.process_allgather(logits)          # the whole array, on every host

Under SLURM (or Open MPI, Kubernetes, Cloud TPU), ``sharding.initialize()`` needs no variables:
JAX detects the cluster, e.g. ``srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 python run.py``.
On CPUs (for testing), processes exchange data with gloo collectives (JAX's default).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from oss_jax.cache import KVCache
from oss_jax.checkpoint import LazyTensor, normalize_index
from oss_jax.config import PRESETS, SLIDING, Config
from oss_jax.kernels import experts as expert_kernels
from oss_jax.kernels.attention import NAIVE_MAX
from oss_jax.model import GptOss
from oss_jax.moe import Experts

AXES = ("data", "expert", "tensor")
# (data, expert, tensor) per device count: experts first (no communication but the MoE psum),
# then heads over 2, which also halves the KV cache per device.
DEFAULT_SHAPES = {1: (1, 1, 1), 2: (1, 2, 1), 4: (1, 4, 1), 8: (1, 4, 2)}
MeshShape = tuple[int, int, int]


# -- meshes ----------------------------------------------------------------------------------------
def default_shape(n: int) -> MeshShape:
    """The default ``(data, expert, tensor)`` for ``n`` devices (``(1, n, 1)`` beyond the table)."""
    if n < 1:
        raise ValueError(f"need at least one device, got {n}")
    return DEFAULT_SHAPES.get(n, (1, n, 1))


def make_mesh(devices: Sequence[jax.Device] | None = None, *, data: int | None = None,
              expert: int | None = None, tensor: int | None = None) -> Mesh:
    """A mesh with axes ``('data', 'expert', 'tensor')`` over ``devices`` (default: ``jax.devices()``).

    With no sizes given, ``default_shape(len(devices))``. Sizes left out when others are given
    absorb the remaining devices: ``expert`` first, else ``data``, else ``tensor``; the rest are 1.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    given = {"data": data, "expert": expert, "tensor": tensor}
    if all(v is None for v in given.values()):
        shape = default_shape(n)
    else:
        fixed = math.prod(v for v in given.values() if v is not None)
        if fixed < 1 or n % fixed:
            raise ValueError(f"mesh sizes {given} do not divide {n} devices")
        rest = n // fixed
        for name in ("expert", "data", "tensor"):
            if given[name] is None:
                given[name], rest = rest, 1
        shape = tuple(given[a] for a in AXES)
    if math.prod(shape) != n:
        raise ValueError(f"mesh {dict(zip(AXES, shape, strict=True))} has {math.prod(shape)} devices, "
                         f"not {n}")
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _sizes(mesh: Mesh | MeshShape | int) -> MeshShape:
    if isinstance(mesh, Mesh):
        return tuple(int(mesh.shape[a]) for a in AXES)
    if isinstance(mesh, int):
        return default_shape(mesh)
    if len(mesh) != 3 or min(mesh) < 1:
        raise ValueError(f"mesh shape must be (data, expert, tensor), got {mesh}")
    return tuple(int(x) for x in mesh)


# -- partition rules -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    """Which model dimensions a mesh splits, decided once per (config, mesh, expert storage).

    Attributes:
      data, expert, tensor: the mesh axis sizes.
      heads: attention heads (and the KV cache's heads) over ``tensor``.
      experts: experts over ``expert``.
      hidden: expert hidden units over ``tensor``.
      table: dimension of ``embed_VD`` / ``unembed_VD`` split over ``(expert, tensor)``:
        0 (vocabulary), 1 (hidden) or None (replicated).
    """

    data: int
    expert: int
    tensor: int
    heads: bool
    experts: bool
    hidden: bool
    table: int | None


def expert_split(num_experts: int, hidden: int, packed: bool, mesh: Mesh | MeshShape) -> tuple[bool, bool]:
    """(experts over ``expert``, hidden units over ``tensor``): each only where it divides."""
    _, e, t = _sizes(mesh)
    return expert_kernels.split(num_experts, hidden, packed, e, t)


def layout(cfg: Config, mesh: Mesh | MeshShape | int, packed: bool) -> Layout:
    """The ``Layout`` of ``cfg`` on ``mesh`` (a Mesh, a (data, expert, tensor) shape or a device count)."""
    d, e, t = _sizes(mesh)
    by_expert, by_hidden = expert_split(cfg.num_experts, cfg.intermediate_size, packed, (d, e, t))
    m = e * t
    table = None
    if m > 1:
        table = 0 if cfg.vocab_size % m == 0 else 1 if cfg.hidden_size % m == 0 else None
    return Layout(d, e, t, heads=t > 1 and cfg.num_key_value_heads % t == 0, experts=by_expert,
                  hidden=by_hidden, table=table)


def param_spec(path: tuple, lay: Layout) -> P:
    """The ``PartitionSpec`` of the parameter at ``path`` (as ``nnx.iter_graph`` names it)."""
    name = path[-1]
    if name in expert_kernels.PARAM_AXES:  # the experts' rules live with the expert-parallel kernel
        return expert_kernels.param_spec(name, lay.experts, lay.hidden)
    T = "tensor" if lay.heads else None
    rules = {
        "wq_DNH": (None, T, None), "bq_NH": (T, None), "wk_DKH": (None, T, None), "bk_KH": (T, None),
        "wv_DKH": (None, T, None), "bv_KH": (T, None), "wo_NHD": (T, None, None), "sinks_N": (T,),
    }
    if name in ("embed_VD", "unembed_VD"):
        spec: list = [None, None]
        if lay.table is not None:
            spec[lay.table] = ("expert", "tensor")
        return P(*spec)
    return P(*rules.get(name, ()))


def batch_spec(batch: int, ndim: int, mesh: Mesh) -> P:
    """Batch (the leading dimension) over ``data`` when it divides, the rest replicated."""
    d = mesh.shape["data"]
    return P("data" if d > 1 and batch % d == 0 else None, *[None] * (ndim - 1))


def _packed(model: GptOss) -> bool:
    return bool(model.layers[0].mlp.experts.packed)


def shardings(model: GptOss, mesh: Mesh) -> dict[tuple, NamedSharding]:
    """``{parameter path: NamedSharding}`` for every parameter of ``model`` on ``mesh``."""
    lay = layout(model.config, mesh, _packed(model))
    return {path: NamedSharding(mesh, param_spec(path, lay))
            for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Variable)}


def shard(model: GptOss, mesh: Mesh) -> GptOss:
    """Move every parameter of ``model`` to its sharding on ``mesh`` and make its MoE layers
    expert-parallel (in place; returns ``model``). Arrays already placed right are not copied.

    For a model already in one process's memory; across hosts, use ``load(source, mesh=mesh)``,
    which never holds the whole model anywhere."""
    targets = shardings(model, mesh)
    for path, node in list(nnx.iter_graph(model)):
        if isinstance(node, nnx.Variable):
            node.set_value(jax.device_put(node.get_value(), targets[path]))
        elif isinstance(node, Experts):
            node.mesh = mesh
    return model


def mesh_of(model: GptOss) -> Mesh | None:
    """The mesh ``shard`` (or ``load(mesh=...)``) gave ``model``, or None."""
    return model.layers[0].mlp.experts.mesh if len(model.layers) else None


def cache_shardings(cache: KVCache, mesh: Mesh) -> KVCache:
    """A ``KVCache``-shaped tree of ``NamedSharding`` s: batch over ``data``, KV heads over ``tensor``
    (each where it divides). ``cache`` may be abstract (``jax.eval_shape``)."""
    data = batch_spec(cache.length.shape[0], 1, mesh)[0]
    t = mesh.shape["tensor"]

    def named(spec: P) -> NamedSharding:
        return NamedSharding(mesh, spec)

    layers = []
    for c in cache.layers:
        kv = named(P(data, None, "tensor" if t > 1 and c.k.shape[2] % t == 0 else None, None))
        layers.append(dataclasses.replace(c, k=kv, v=kv, pos=named(P(data, None))))
    return KVCache(layers=layers, length=named(P(data)))


def shard_cache(cache: KVCache, mesh: Mesh) -> KVCache:
    """Move a ``KVCache`` to its shardings on ``mesh`` (see ``cache_shardings``)."""
    return jax.device_put(cache, cache_shardings(cache, mesh))


def make_cache(cfg: Config, batch: int, max_len: int, dtype, mesh: Mesh) -> KVCache:
    """``KVCache.create``, born sharded: no device ever holds more than its part."""
    def create() -> KVCache:
        return KVCache.create(cfg, batch, max_len, dtype)

    return jax.jit(create, out_shardings=cache_shardings(jax.eval_shape(create), mesh))()


def shard_batch(x, mesh: Mesh) -> jax.Array:
    """Tokens or positions ``[B, ...]`` with the batch over ``data`` (replicated if it does not divide)."""
    x = x if isinstance(x, jax.Array) else np.asarray(x)  # numpy: valid for a multi-process mesh too
    return jax.device_put(x, NamedSharding(mesh, batch_spec(x.shape[0], x.ndim, mesh)))


def to_host(x: jax.Array) -> np.ndarray:
    """``x`` as numpy, whole, in every process (gathered from the others' devices if needed)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def place(tensor: np.ndarray | LazyTensor, target: NamedSharding, dtype) -> jax.Array:
    """A sharded array of ``dtype`` made slice by slice: each of this process's devices gets
    ``tensor[its index]``, read only then (a ``LazyTensor`` reads just those bytes). Slices that
    several devices share (replicas) are read once."""
    dtype = np.dtype(dtype)
    read: dict[tuple, np.ndarray] = {}

    def slice_for(index) -> np.ndarray:
        key = tuple((sl.start, sl.stop) for sl in normalize_index(index, tuple(tensor.shape)))
        if key not in read:
            read[key] = np.asarray(tensor[index]).astype(dtype, copy=False)
        return read[key]

    return jax.make_array_from_callback(tuple(tensor.shape), target, slice_for)


# -- multi-host ------------------------------------------------------------------------------------
def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, **kwargs) -> None:
    """Join a multi-process JAX job (``jax.distributed.initialize``); call before using any device.

    Arguments left out come from ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0),
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; when those are unset too, JAX detects the
    cluster (SLURM, Open MPI, Kubernetes, Cloud TPU). Other keyword arguments go to
    ``jax.distributed.initialize`` (e.g. ``local_device_ids``, ``initialization_timeout``).
    A second call does nothing.
    """
    if jax.distributed.is_initialized():
        return
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)


# -- memory planner --------------------------------------------------------------------------------
GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bytes per device for a config on a mesh. ``print(plan)`` shows a table.

    ``weights`` is broken down by group; ``kv_cache`` is ``generate``'s cache (full buffers for
    full-attention layers, ring buffers of ``sliding_window`` slots for sliding ones);
    ``activations`` estimates the transient peak of one layer during a prefill chunk of
    ``chunk`` tokens against a full cache (decode steps need far less). XLA's own workspace and
    fragmentation are not counted: keep about 10% headroom.
    """

    name: str
    mesh: MeshShape
    context: int
    batch: int
    dtype: str
    experts: str
    chunk: int
    weights: dict[str, int]
    kv_cache: int
    activations: int

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def total(self) -> int:
        return self.weights_total + self.kv_cache + self.activations

    def fits(self, device_gib: float, headroom: float = 0.9) -> bool:
        """Whether ``total`` fits in ``headroom`` of a device of ``device_gib`` GiB."""
        return self.total <= headroom * device_gib * GiB

    def __str__(self) -> str:
        d, e, t = self.mesh
        rows = [f"{self.name}: {self.experts} experts, {self.dtype}, mesh data={d} x expert={e} x "
                f"tensor={t} ({d * e * t} devices), batch {self.batch}, context {self.context}",
                "per device:"]
        for k, v in self.weights.items():
            rows.append(f"  {k:<34s}{v / GiB:9.2f} GiB")
        rows += [f"  {'weights':<34s}{self.weights_total / GiB:9.2f} GiB",
                 f"  {'KV cache':<34s}{self.kv_cache / GiB:9.2f} GiB",
                 f"  {f'activations (prefill chunk {self.chunk})':<34s}{self.activations / GiB:9.2f} GiB",
                 f"  {'total':<34s}{self.total / GiB:9.2f} GiB",
                 "fits (90% of device memory): " + ", ".join(
                     f"{g} GiB {'yes' if self.fits(g) else 'no'}" for g in (16, 24, 40, 80, 141))]
        return "\n".join(rows)


@functools.lru_cache(maxsize=8)
def _parameters(cfg: Config, packed: bool, dtype: jnp.dtype) -> list[tuple[tuple, tuple[int, ...], int]]:
    """(path, shape, itemsize) of every parameter, from the abstract model (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: GptOss(cfg, packed=packed, dtype=dtype))
    return [(path, tuple(var.get_value().shape), var.get_value().dtype.itemsize)
            for path, var in nnx.iter_graph(abstract) if isinstance(var, nnx.Variable)]


def plan(cfg: Config | str, mesh: Mesh | MeshShape | int = 1, context: int = 8192, batch: int = 1,
         dtype=jnp.bfloat16, experts: str = "packed", chunk: int = 512, device: str = "gpu") -> Plan:
    """Bytes per device of weights, KV cache and activations, by the same rules ``shard`` applies.

    Args:
      cfg: a ``Config`` or a preset name (``"gpt-oss-20b"``, ``"gpt-oss-120b"``).
      mesh: a ``Mesh``, a ``(data, expert, tensor)`` shape, or a device count (default shape).
      context: positions the KV cache holds (prompt + new tokens).
      batch: sequences generated together.
      dtype: parameter, activation and KV cache dtype.
      experts: ``"packed"`` (MXFP4, 4.25 bits per value) or ``"dense"`` (``dtype``).
      chunk: prefill chunk (``generate``'s ``prefill_chunk``).
      device: ``"gpu"`` (or ``"tpu"``): a prefill runs each expert projection as one grouped matmul over
        all the layer's experts (``kernels.experts.choose``: ``"ragged"``), so a packed layer's experts
        are held decoded while it runs; ``"cpu"``: packed experts multiplied in place by the native grouped
        kernel (``kernels.native.grouped_matmul``), dense ones one expert at a time (``"sorted"``).
    """
    name = cfg if isinstance(cfg, str) else "gpt-oss"
    if isinstance(cfg, str):
        if cfg not in PRESETS:
            raise ValueError(f"unknown model {cfg!r}: use one of {sorted(PRESETS)} or a Config")
        cfg = PRESETS[cfg]
    if experts not in ("packed", "dense"):
        raise ValueError(f"experts must be 'packed' or 'dense', got {experts!r}")
    if device not in ("gpu", "tpu", "cpu"):
        raise ValueError(f"device must be 'gpu', 'tpu' or 'cpu', got {device!r}")
    for what, value in (("context", context), ("batch", batch), ("chunk", chunk)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{what} must be a positive integer, got {value!r}")
    packed = experts == "packed"
    dtype = jnp.dtype(dtype)
    lay = layout(cfg, mesh, packed)
    sizes = dict(zip(AXES, (lay.data, lay.expert, lay.tensor), strict=True))

    weights = {"embedding + unembedding": 0, "attention": 0, "router + norms": 0,
               f"experts ({'MXFP4' if packed else dtype.name})": 0}
    groups = list(weights)
    for path, shape, itemsize in _parameters(cfg, packed, dtype):
        split = math.prod(sizes[a] for part in param_spec(path, lay) if part
                          for a in (part if isinstance(part, tuple) else (part,)))
        nbytes = math.prod(shape) * itemsize // split
        group = (groups[0] if path[0] in ("embed_VD", "unembed_VD") else groups[3] if "experts" in path
                 else groups[1] if "attn" in path else groups[2])
        weights[group] += nbytes

    it, f4 = dtype.itemsize, 4
    B = batch // lay.data if batch % lay.data == 0 else batch
    K = cfg.num_key_value_heads // (lay.tensor if lay.heads else 1)
    N = cfg.num_attention_heads // (lay.tensor if lay.heads else 1)
    H, D = cfg.head_dim, cfg.hidden_size
    slots = sum(context if t != SLIDING else min(cfg.sliding_window, context) for t in cfg.layer_types)
    kv_cache = B * slots * (2 * K * H * it + 4) + B * 4  # k and v, plus each slot's position

    C = min(chunk, context)
    S = context  # keys of a full-attention layer at the last chunk
    F = cfg.intermediate_size // (lay.tensor if lay.hidden else 1)
    E = cfg.num_experts // (lay.expert if lay.experts else 1)
    V = cfg.vocab_size // (lay.expert * lay.tensor if lay.table == 0 else 1)
    stream = B * C * D * (2 * it + 2 * f4)  # residual, block output, float32 norm temporaries
    qkv = B * C * (N + 2 * K) * H * (it + f4)
    if C * S <= NAIVE_MAX:
        attn = 2 * B * N * C * S * f4  # logits and probabilities
    else:  # tiles of 128 x 128, the float32 accumulator, and the re-tiled keys and values
        attn = 3 * B * N * 128 * 128 * f4 + B * N * C * H * f4 + 2 * B * S * K * H * it
    tokens = B * C
    if device == "cpu" and packed:  # the native grouped kernel: nothing decoded, float32 rows per pair
        decoded = tokens * cfg.experts_per_token * (2 * D + 3 * F) * f4  # x reordered, gate_up, swiglu, down
    elif device == "cpu":
        decoded = 3 * D * F * it  # "sorted": one expert's weights
    else:  # "ragged": the layer's experts decoded at once (packed) for its grouped matmuls
        decoded = E * 3 * D * F * it if packed else 0
    moe = tokens * (2 * F * it + F * it + D * it + 2 * D * f4 + E * f4) + decoded
    logits = B * V * f4
    activations = stream + qkv + attn + moe + logits
    return Plan(name, (lay.data, lay.expert, lay.tensor), context, batch, dtype.name, experts, C,
                weights, kv_cache, activations)
