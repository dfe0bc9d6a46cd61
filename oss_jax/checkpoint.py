"""Reading gpt-oss checkpoints tensor by tensor: safetensors files, HF and OpenAI layouts.

A checkpoint directory holds ``config.json`` and either one ``*.safetensors`` file or shards
listed in ``model.safetensors.index.json``. Tensor names follow one of two layouts (SPEC.md §4):
Hugging Face (``model.layers.N...``) or OpenAI's ``original/`` (``block.N...``). Everything is
checked against the config from the file headers alone, before any weight is read, and every
problem is a ``CheckpointError`` whose one-line message names the file or tensor.

Tensors are read with ``pread`` into fresh buffers (not memory-mapped), so a loader's resident
memory is the model it builds plus the tensor in flight.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from oss_jax import mxfp4
from oss_jax.config import Config

DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
          "F32": np.dtype(np.float32), "F64": np.dtype(np.float64), "U8": np.dtype(np.uint8),
          "I8": np.dtype(np.int8), "I16": np.dtype(np.int16), "I32": np.dtype(np.int32),
          "I64": np.dtype(np.int64), "BOOL": np.dtype(np.bool_)}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT = ("BF16", "F16", "F32")
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file or tensor."""


# -- safetensors ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header; offsets must lie inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: not a safetensors file or truncated (header length {n})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = meta["dtype"], tuple(int(s) for s in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        expected = int(np.prod(shape)) * DTYPES[dtype].itemsize
        if hi - lo != expected or lo < 0:
            raise CheckpointError(f"{path}: tensor {name!r} header size does not match shape {shape}")
        if base + hi > size:
            raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends at byte {base + hi}, "
                                  f"file has {size}")
        out[name] = TensorInfo(path, name, dtype, shape, base + lo, base + hi)
    return out


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Read one tensor into a new numpy array (bf16 via ml_dtypes)."""
    n = info.end - info.start
    buf = bytearray(n)
    try:
        fd = os.open(info.file, os.O_RDONLY)
        try:
            view, done = memoryview(buf), 0
            while done < n:
                got = os.preadv(fd, [view[done:]], info.start + done)
                if got <= 0:
                    raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name!r}")
                done += got
        finally:
            os.close(fd)
    except OSError as e:
        raise CheckpointError(f"{info.file}: cannot read tensor {info.name!r} ({e.strerror or e})") from None
    return np.frombuffer(buf, dtype=DTYPES[info.dtype]).reshape(info.shape)


# Reading a slice. Runs shorter than RUN_MIN bytes are merged into one read of their enclosing
# slab when that slab is at most SPAN_MAX bytes: a few large reads instead of thousands of tiny ones.
RUN_MIN = 1 << 16
SPAN_MAX = 1 << 26


def _pread(info: TensorInfo, fd: int, offset: int, n: int) -> bytearray:
    """``n`` bytes at absolute ``offset`` of ``info.file`` (every slice read goes through here)."""
    buf = bytearray(n)
    view, done = memoryview(buf), 0
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name!r}")
        done += got
    return buf


def normalize_index(index, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """``index`` (slices, or fewer of them than dimensions) as one ``slice(start, stop)`` per dimension."""
    index = index if isinstance(index, tuple) else (index,)
    index = index + (slice(None),) * (len(shape) - len(index))
    out = []
    for sl, n in zip(index, shape, strict=True):
        if not isinstance(sl, slice):
            raise TypeError(f"only slices can index a lazy tensor, got {sl!r}")
        start, stop, step = sl.indices(n)
        if step != 1:
            raise ValueError(f"only contiguous slices can index a lazy tensor, got step {step}")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


def read_region(info: TensorInfo, index) -> np.ndarray:
    """Read the rectangle ``index`` (one contiguous slice per dimension) of a tensor from its file.

    In row-major order a rectangle is a set of contiguous byte runs, one per combination of
    indices in the dimensions before the last partial one (``j``). Level ``m <= j`` reads, for
    each index combination in dimensions ``< m``, the whole rows ``index[m]`` of dimension ``m``
    (all later dimensions) and slices them in memory; ``m = j`` reads exactly the needed bytes,
    a smaller ``m`` fewer but larger reads. Only dimension 0 sliced: one read.
    """
    dtype = DTYPES[info.dtype]
    shape = info.shape
    index = normalize_index(index, shape)
    lens = [sl.stop - sl.start for sl in index]
    if not shape:
        return read_tensor(info)
    if 0 in lens:
        return np.empty(lens, dtype)
    strides = [int(np.prod(shape[i + 1:])) for i in range(len(shape))]  # elements
    partial = [i for i, (sl, n) in enumerate(zip(index, shape, strict=True)) if sl.stop - sl.start != n]
    m = partial[-1] if partial else 0

    def span(level: int) -> int:
        return lens[level] * strides[level] * dtype.itemsize

    while m > 0 and span(m) < RUN_MIN and span(m - 1) <= SPAN_MAX:
        m -= 1
    out = np.empty(lens, dtype)
    try:
        fd = os.open(info.file, os.O_RDONLY)
        try:
            for outer in itertools.product(*(range(sl.start, sl.stop) for sl in index[:m])):
                first = sum(i * st for i, st in zip(outer, strides, strict=False)) + index[m].start * strides[m]
                raw = _pread(info, fd, info.start + first * dtype.itemsize, span(m))
                rows = np.frombuffer(raw, dtype).reshape(lens[m], *shape[m + 1:])
                here = tuple(i - sl.start for i, sl in zip(outer, index, strict=False))
                out[here] = rows[(slice(None), *index[m + 1:])]
        finally:
            os.close(fd)
    except OSError as e:
        raise CheckpointError(f"{info.file}: cannot read tensor {info.name!r} ({e.strerror or e})") from None
    return out


@dataclass(frozen=True)
class LazyTensor:
    """A tensor read on demand: ``lazy[index]`` reads just that rectangle (contiguous slices).

    ``read`` gets one ``slice(start, stop)`` per dimension. Sharded loading hands each device's
    index to ``read``, so no process ever holds more than its slices of one tensor.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[tuple[slice, ...]], np.ndarray]

    def __getitem__(self, index) -> np.ndarray:
        return self.read(normalize_index(index, self.shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @classmethod
    def from_file(cls, info: TensorInfo, rows: tuple[int, int] | None = None) -> LazyTensor:
        """The tensor ``info``, or only its rows ``[start, stop)`` (a part of a fused tensor)."""
        if rows is None:
            return cls(info.shape, DTYPES[info.dtype], lambda index: read_region(info, index))
        r0, r1 = rows

        def read(index: tuple[slice, ...]) -> np.ndarray:
            return read_region(info, (slice(index[0].start + r0, index[0].stop + r0), *index[1:]))

        return cls((r1 - r0, *info.shape[1:]), DTYPES[info.dtype], read)


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray] | Iterator[tuple[str, np.ndarray]],
                      shapes: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None,
                      metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temporary name, then rename).

    ``tensors`` is a dict, or an iterator of ``(name, array)`` in the order of ``shapes``
    (``{name: (shape, dtype)}``, needed up front for the header) so that arrays can be produced
    one at a time and a file larger than memory can be written.
    """
    path = Path(path)
    if isinstance(tensors, dict):
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
        items: Iterator[tuple[str, np.ndarray]] = iter(tensors.items())
    else:
        if shapes is None:
            raise ValueError("write_safetensors: an iterator of tensors needs `shapes`")
        items = tensors
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, (shape, dtype) in shapes.items():
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for (name, arr), (want, (shape, dtype)) in zip(items, shapes.items(), strict=True):
                arr = np.ascontiguousarray(arr)
                if name != want or tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
                    raise ValueError(f"write_safetensors: got {name} {arr.shape} {arr.dtype}, "
                                     f"expected {want} {shape} {np.dtype(dtype)}")
                f.write(arr.tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(dst: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``dst`` to fill; it replaces ``dst`` only if the block
    completes. On any exception (Ctrl-C included) it is deleted, so nothing half-written remains."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def list_tensors(directory: Path) -> dict[str, TensorInfo]:
    """All tensors of a checkpoint directory (index-listed shards, or every ``*.safetensors``)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: corrupt index (expected a 'weight_map' object)") from None
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files")
    tensors: dict[str, TensorInfo] = {}
    for fname in files:
        path = directory / fname
        if not path.exists():
            raise CheckpointError(f"{path}: shard listed in the index is missing")
        for name, info in read_header(path).items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name!r} also appears in {tensors[name].file.name}")
            tensors[name] = info
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in tensors or tensors[name].file.name != fname:
                raise CheckpointError(f"{directory / fname}: tensor {name!r} listed in the index is not in it")
    return tensors


# -- layouts -------------------------------------------------------------------------------------
def hf_shapes(cfg: Config, mxfp4_experts: bool) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Every tensor an HF gpt-oss checkpoint holds: ``{name: (shape, allowed dtypes)}``."""
    D, V, E, F = cfg.hidden_size, cfg.vocab_size, cfg.num_experts, cfg.intermediate_size
    N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    out = {"model.embed_tokens.weight": ((V, D), FLOAT), "model.norm.weight": ((D,), FLOAT),
           "lm_head.weight": ((V, D), FLOAT)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": ((D,), FLOAT),
            p + "post_attention_layernorm.weight": ((D,), FLOAT),
            p + "self_attn.q_proj.weight": ((N * H, D), FLOAT), p + "self_attn.q_proj.bias": ((N * H,), FLOAT),
            p + "self_attn.k_proj.weight": ((K * H, D), FLOAT), p + "self_attn.k_proj.bias": ((K * H,), FLOAT),
            p + "self_attn.v_proj.weight": ((K * H, D), FLOAT), p + "self_attn.v_proj.bias": ((K * H,), FLOAT),
            p + "self_attn.o_proj.weight": ((D, N * H), FLOAT), p + "self_attn.o_proj.bias": ((D,), FLOAT),
            p + "self_attn.sinks": ((N,), FLOAT),
            p + "mlp.router.weight": ((E, D), FLOAT), p + "mlp.router.bias": ((E,), FLOAT),
            p + "mlp.experts.gate_up_proj_bias": ((E, 2 * F), FLOAT),
            p + "mlp.experts.down_proj_bias": ((E, D), FLOAT),
        }
        if mxfp4_experts:
            out |= {
                p + "mlp.experts.gate_up_proj_blocks": ((E, 2 * F, D // 32, 16), ("U8",)),
                p + "mlp.experts.gate_up_proj_scales": ((E, 2 * F, D // 32), ("U8",)),
                p + "mlp.experts.down_proj_blocks": ((E, D, F // 32, 16), ("U8",)),
                p + "mlp.experts.down_proj_scales": ((E, D, F // 32), ("U8",)),
            }
        else:
            out |= {p + "mlp.experts.gate_up_proj": ((E, D, 2 * F), FLOAT),
                    p + "mlp.experts.down_proj": ((E, F, D), FLOAT)}
    return out


# OpenAI name -> HF name, per layer ({i}); qkv is split separately.
_OPENAI_LAYER = {
    "attn.norm.scale": "input_layernorm.weight", "attn.sinks": "self_attn.sinks",
    "attn.out.weight": "self_attn.o_proj.weight", "attn.out.bias": "self_attn.o_proj.bias",
    "mlp.norm.scale": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.router.weight", "mlp.gate.bias": "mlp.router.bias",
    "mlp.mlp1_weight.blocks": "mlp.experts.gate_up_proj_blocks",
    "mlp.mlp1_weight.scales": "mlp.experts.gate_up_proj_scales",
    "mlp.mlp1_bias": "mlp.experts.gate_up_proj_bias",
    "mlp.mlp2_weight.blocks": "mlp.experts.down_proj_blocks",
    "mlp.mlp2_weight.scales": "mlp.experts.down_proj_scales",
    "mlp.mlp2_bias": "mlp.experts.down_proj_bias",
}
_OPENAI_TOP = {"embedding.weight": "model.embed_tokens.weight", "norm.scale": "model.norm.weight",
               "unembedding.weight": "lm_head.weight"}


def openai_to_hf_name(name: str) -> str | None:
    """HF name of an OpenAI ``original/`` tensor (None for the fused qkv, or unknown names)."""
    if name in _OPENAI_TOP:
        return _OPENAI_TOP[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "block" and parts[1].isdigit() and parts[2] in _OPENAI_LAYER:
        return f"model.layers.{parts[1]}.{_OPENAI_LAYER[parts[2]]}"
    return None


def openai_shapes(cfg: Config) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Every tensor of OpenAI's ``original/`` checkpoint: ``{name: (shape, allowed dtypes)}``."""
    hf = hf_shapes(cfg, mxfp4_experts=True)
    back = {f"model.layers.{{i}}.{v}": k for k, v in _OPENAI_LAYER.items()}
    out = {}
    for k, v in _OPENAI_TOP.items():
        out[k] = hf[v]
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    for i in range(cfg.num_hidden_layers):
        for hf_tpl, oa in back.items():
            out[f"block.{i}.{oa}"] = hf[hf_tpl.format(i=i)]
        out[f"block.{i}.attn.qkv.weight"] = ((qkv, cfg.hidden_size), FLOAT)
        out[f"block.{i}.attn.qkv.bias"] = ((qkv,), FLOAT)
    return out


@dataclass
class Source:
    """A checked checkpoint directory, ready to be read tensor by tensor."""

    directory: Path
    config: Config
    layout: str  # "hf" or "openai"
    mxfp4: bool  # expert weights stored as MXFP4 blocks/scales
    tensors: dict[str, TensorInfo]

    def __len__(self) -> int:
        return len(self.tensors)

    def hf_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(HF name, array)`` one tensor at a time, whatever the on-disk layout."""
        cfg = self.config
        for name, info in sorted(self.tensors.items(), key=lambda kv: _layer_order(kv[0])):
            arr = read_tensor(info)
            if self.layout == "hf":
                yield name, arr
                continue
            hf = openai_to_hf_name(name)
            if hf is not None:
                yield hf, arr
                continue
            i = name.split(".")[1]
            kind = name.rsplit(".", 1)[1]  # weight or bias
            nq = cfg.num_attention_heads * cfg.head_dim
            nk = cfg.num_key_value_heads * cfg.head_dim
            q, k, v = np.split(arr, [nq, nq + nk], axis=0)
            for proj, part in (("q", q), ("k", k), ("v", v)):
                yield f"model.layers.{i}.self_attn.{proj}_proj.{kind}", part


    def lazy_tensors(self) -> Iterator[tuple[str, LazyTensor]]:
        """Like ``hf_tensors`` but nothing is read: ``(HF name, LazyTensor)`` (fused qkv split by rows)."""
        cfg = self.config
        nq = cfg.num_attention_heads * cfg.head_dim
        nk = cfg.num_key_value_heads * cfg.head_dim
        for name, info in sorted(self.tensors.items(), key=lambda kv: _layer_order(kv[0])):
            hf = name if self.layout == "hf" else openai_to_hf_name(name)
            if hf is not None:
                yield hf, LazyTensor.from_file(info)
                continue
            i, kind = name.split(".")[1], name.rsplit(".", 1)[1]
            for proj, rows in (("q", (0, nq)), ("k", (nq, nq + nk)), ("v", (nq + nk, nq + 2 * nk))):
                yield f"model.layers.{i}.self_attn.{proj}_proj.{kind}", LazyTensor.from_file(info, rows)


def _layer_order(name: str) -> tuple[int, str]:
    """Sort key that keeps each layer's tensors together (shards may split a layer)."""
    parts = name.split(".")
    for here, after in itertools.pairwise(parts):
        if here in ("layers", "block") and after.isdigit():
            return int(after), name
    return -1, name


def open_checkpoint(directory: str | Path) -> Source:
    """Read the config and every header of a checkpoint directory, and check them all."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    try:
        cfg = Config.from_json(directory)
    except ValueError as e:
        raise CheckpointError(f"{directory / 'config.json'}: {e}") from None
    tensors = list_tensors(directory)
    if "embedding.weight" in tensors or any(n.startswith("block.") for n in tensors):
        layout, is_mx = "openai", True
        expected = openai_shapes(cfg)
    else:
        layout = "hf"
        is_mx = any(n.endswith("_blocks") for n in tensors)
        expected = hf_shapes(cfg, is_mx)
    for name in expected:
        if name not in tensors:
            raise CheckpointError(f"{directory}: missing tensor {name!r}")
    for name, info in tensors.items():
        if name not in expected:
            raise CheckpointError(f"{info.file}: unexpected tensor {name!r}")
        shape, dtypes = expected[name]
        if info.shape != shape:
            raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                                  f"expected {list(shape)} from config.json")
        if info.dtype not in dtypes:
            raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, "
                                  f"expected {' or '.join(dtypes)}")
    if is_mx and cfg.quant_method is None:
        cfg = cfg.replace(quant_method="mxfp4")
    return Source(directory, cfg, layout, is_mx, tensors)


# -- HF names -> model parameters -----------------------------------------------------------------
_LAYER_PARAMS = {
    "input_layernorm.weight": ("attn_norm", "scale"),
    "post_attention_layernorm.weight": ("mlp_norm", "scale"),
    "self_attn.sinks": ("attn", "sinks_N"),
    "self_attn.o_proj.bias": ("attn", "bo_D"),
    "mlp.router.weight": ("mlp", "router_ED"),
    "mlp.router.bias": ("mlp", "router_bias_E"),
    "mlp.experts.gate_up_proj_bias": ("mlp", "experts", "gate_up_bias_EF2"),
    "mlp.experts.down_proj_bias": ("mlp", "experts", "down_bias_ED"),
    "mlp.experts.gate_up_proj_blocks": ("mlp", "experts", "gate_up_blocks"),
    "mlp.experts.gate_up_proj_scales": ("mlp", "experts", "gate_up_scales"),
    "mlp.experts.down_proj_blocks": ("mlp", "experts", "down_blocks"),
    "mlp.experts.down_proj_scales": ("mlp", "experts", "down_scales"),
    "mlp.experts.gate_up_proj": ("mlp", "experts", "gate_up_EDF2"),
    "mlp.experts.down_proj": ("mlp", "experts", "down_EFD"),
}
_TOP_PARAMS = {"model.embed_tokens.weight": ("embed_VD",), "model.norm.weight": ("norm", "scale"),
               "lm_head.weight": ("unembed_VD",)}
Path_ = tuple[str | int, ...]


def to_params(cfg: Config, name: str, arr: np.ndarray) -> list[tuple[Path_, np.ndarray]]:
    """Model parameter path(s) and array(s), in the model's layout, for one HF tensor."""
    if name in _TOP_PARAMS:
        return [(_TOP_PARAMS[name], arr)]
    _, _, i, rest = name.split(".", 3)
    layer: Path_ = ("layers", int(i))
    N, K, H, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    if rest.startswith("self_attn.") and rest[10] in "qkv" and rest[11:18] == "_proj.w":
        p, heads = rest[10], (N if rest[10] == "q" else K)
        return [(layer + ("attn", f"w{p}_D{'N' if p == 'q' else 'K'}H"), arr.T.reshape(D, heads, H))]
    if rest.startswith("self_attn.") and rest[10] in "qkv" and rest[11:18] == "_proj.b":
        p, heads = rest[10], (N if rest[10] == "q" else K)
        return [(layer + ("attn", f"b{p}_{'N' if p == 'q' else 'K'}H"), arr.reshape(heads, H))]
    if rest == "self_attn.o_proj.weight":
        return [(layer + ("attn", "wo_NHD"), arr.T.reshape(N, H, D))]
    return [(layer + _LAYER_PARAMS[rest], arr)]


def to_lazy_params(cfg: Config, name: str, t: LazyTensor) -> list[tuple[Path_, LazyTensor]]:
    """``to_params`` without reading: the parameter(s) as ``LazyTensor`` s in the model's layout.

    Each parameter slice maps to one rectangle of the file tensor: heads are a row range of the
    q/k/v projections (``[heads*H, D]``) and a column range of ``o_proj`` (``[D, N*H]``).
    """
    if name in _TOP_PARAMS:
        return [(_TOP_PARAMS[name], t)]
    _, _, i, rest = name.split(".", 3)
    layer: Path_ = ("layers", int(i))
    N, K, H, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size

    def heads(sl: slice) -> slice:
        return slice(sl.start * H, sl.stop * H)

    if rest.startswith("self_attn.") and rest[10] in "qkv" and rest[11:18] == "_proj.w":
        p, n = rest[10], (N if rest[10] == "q" else K)

        def read_w(ix: tuple[slice, ...]) -> np.ndarray:  # [D, n, H] <- rows of [n*H, D]
            sd, sn, sh = ix
            a = t[heads(sn), sd]
            return a.reshape(sn.stop - sn.start, H, -1)[:, sh].transpose(2, 0, 1)

        path = layer + ("attn", f"w{p}_D{'N' if p == 'q' else 'K'}H")
        return [(path, LazyTensor((D, n, H), t.dtype, read_w))]
    if rest.startswith("self_attn.") and rest[10] in "qkv" and rest[11:18] == "_proj.b":
        p, n = rest[10], (N if rest[10] == "q" else K)

        def read_b(ix: tuple[slice, ...]) -> np.ndarray:  # [n, H] <- [n*H]
            sn, sh = ix
            return t[heads(sn)].reshape(sn.stop - sn.start, H)[:, sh]

        return [(layer + ("attn", f"b{p}_{'N' if p == 'q' else 'K'}H"), LazyTensor((n, H), t.dtype, read_b))]
    if rest == "self_attn.o_proj.weight":
        def read_o(ix: tuple[slice, ...]) -> np.ndarray:  # [N, H, D] <- columns of [D, N*H]
            sn, sh, sd = ix
            a = t[sd, heads(sn)]
            return a.reshape(a.shape[0], sn.stop - sn.start, H)[:, :, sh].transpose(1, 2, 0)

        return [(layer + ("attn", "wo_NHD"), LazyTensor((N, H, D), t.dtype, read_o))]
    return [(layer + _LAYER_PARAMS[rest], t)]


def lazy_dequantized(blocks: LazyTensor, scales: LazyTensor, dtype) -> LazyTensor:
    """Dense ``[E, in, out]`` weights of ``dtype`` from MXFP4 ``[E, out, in/32, 16]`` + scales, by slice.

    A slice of the input dimension reads the 32-value blocks that cover it.
    """
    E, n_out, nb, _ = blocks.shape

    def read(ix: tuple[slice, ...]) -> np.ndarray:
        se, si, so = ix
        b0, b1 = si.start // 32, -(-si.stop // 32)
        w = mxfp4.decode(blocks[se, so, b0:b1], scales[se, so, b0:b1], dtype)  # [e, out, covering in]
        return np.swapaxes(np.asarray(w)[:, :, si.start - 32 * b0:si.stop - 32 * b0], -1, -2)

    return LazyTensor((E, nb * 32, n_out), np.dtype(dtype), read)


def dequantize_experts(params: dict[Path_, np.ndarray], layer: int, dtype) -> dict[Path_, np.ndarray]:
    """Replace one layer's packed expert bytes by dense ``[E, in, out]`` weights of ``dtype``."""
    out = dict(params)
    for proj, dense in (("gate_up", "gate_up_EDF2"), ("down", "down_EFD")):
        blocks = out.pop(("layers", layer, "mlp", "experts", f"{proj}_blocks"))
        scales = out.pop(("layers", layer, "mlp", "experts", f"{proj}_scales"))
        w = np.asarray(mxfp4.decode(blocks, scales, dtype))
        out[("layers", layer, "mlp", "experts", dense)] = np.swapaxes(w, -1, -2)
    return out


# -- model parameters -> HF names (the writer's side) ---------------------------------------------
def from_params(cfg: Config, params: dict[Path_, np.ndarray], *,
                mxfp4_experts: bool) -> Iterator[tuple[str, np.ndarray]]:
    """The HF tensors of a model's parameters: the inverse of ``to_params``, layer by layer.

    ``params`` maps parameter paths to arrays in the model's layout (dense experts). With
    ``mxfp4_experts`` the expert weights are encoded (``mxfp4.encode``) into HF's blocks/scales.
    """
    yield "model.embed_tokens.weight", params[("embed_VD",)]
    N, K, H, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    for i in range(cfg.num_hidden_layers):
        pre, layer = f"model.layers.{i}.", ("layers", i)
        for p, heads in (("q", N), ("k", K), ("v", K)):
            w = params[layer + ("attn", f"w{p}_D{'N' if p == 'q' else 'K'}H")]
            b = params[layer + ("attn", f"b{p}_{'N' if p == 'q' else 'K'}H")]
            yield f"{pre}self_attn.{p}_proj.weight", w.reshape(D, heads * H).T
            yield f"{pre}self_attn.{p}_proj.bias", b.reshape(heads * H)
        yield f"{pre}self_attn.o_proj.weight", params[layer + ("attn", "wo_NHD")].reshape(N * H, D).T
        for name, path in _LAYER_PARAMS.items():
            if path[-1] in ("gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales",
                            "gate_up_EDF2", "down_EFD"):
                continue
            yield pre + name, params[layer + path]
        w1, w2 = params[layer + ("mlp", "experts", "gate_up_EDF2")], params[layer + ("mlp", "experts", "down_EFD")]
        if not mxfp4_experts:
            yield f"{pre}mlp.experts.gate_up_proj", w1
            yield f"{pre}mlp.experts.down_proj", w2
            continue
        for proj, w in (("gate_up_proj", w1), ("down_proj", w2)):
            blocks, scales = mxfp4.encode(np.swapaxes(np.asarray(w, np.float32), -1, -2))  # [E, out, in]
            yield f"{pre}mlp.experts.{proj}_blocks", np.asarray(blocks)
            yield f"{pre}mlp.experts.{proj}_scales", np.asarray(scales)
    yield "model.norm.weight", params[("norm", "scale")]
    yield "lm_head.weight", params[("unembed_VD",)]
