"""Reading gpt-oss checkpoints tensor by tensor: safetensors bytes and checkpoint directories.

A checkpoint directory holds ``config.json`` and either one ``*.safetensors`` file or shards
listed in ``model.safetensors.index.json``. Tensor names follow one of two layouts (SPEC.md §4):
Hugging Face (``model.layers.N...``) or OpenAI's ``original/`` (``block.N...``); which tensors a
checkpoint holds and which parameter each becomes is the table in ``params_map.py``. Everything is
checked against the config from the file headers alone, before any weight is read, and every
problem is a ``CheckpointError`` whose one-line message names the file or tensor. Writing:
``write_safetensors``, and ``atomic_directory`` for a directory that appears whole or not at all.

Tensors are read with ``pread`` into fresh buffers (not memory-mapped), so a loader's resident
memory is the model it builds plus the tensor in flight. Every tensor or slice read is checked
for NaN/Inf (floats) and 255 (MXFP4 scales, E8M0's NaN) before it is used.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import json
import math
import os
import re
import shutil
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from oss_jax.config import Config
from oss_jax.params_map import Path_, hf_shapes, openai_shapes, openai_to_hf, to_params

# The name table's functions stay importable from here, as before they moved to params_map.
from oss_jax.params_map import from_params as from_params
from oss_jax.params_map import openai_to_hf_name as openai_to_hf_name

DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
          "F32": np.dtype(np.float32), "F64": np.dtype(np.float64), "U8": np.dtype(np.uint8),
          "I8": np.dtype(np.int8), "I16": np.dtype(np.int16), "I32": np.dtype(np.int32),
          "I64": np.dtype(np.int64), "BOOL": np.dtype(np.bool_)}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
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


def os_reason(e: OSError) -> str:
    """A short reason for an ``OSError`` ("symlink loop" for ELOOP, else its strerror)."""
    if e.errno == errno.ELOOP:
        return f"symlink loop: {e.strerror}"
    return e.strerror or str(e)


def _is_count(x) -> bool:
    """A JSON unsigned integer (not a float, not a bool)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header as strictly as the ``safetensors`` library does.

    Shapes and ``data_offsets`` are unsigned integers; sorted by offset the tensors tile the data
    section exactly (each starts where the previous ended, the first at 0, the last at the file's
    end): no overlap, no gap, nothing after. ``__metadata__`` maps strings to strings.
    """
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
        raise CheckpointError(f"{path}: cannot read ({os_reason(e)})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    base = 8 + n
    entries = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed shape {shape!r} (non-negative integers)")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise CheckpointError(f"{path}: tensor {name!r} has malformed data_offsets {offsets!r} "
                                  f"(two non-negative integers)")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        lo, hi = offsets
        if hi < lo or hi - lo != math.prod(shape) * DTYPES[dtype].itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} header size does not match shape {tuple(shape)}")
        entries.append((lo, hi, name, dtype, tuple(shape)))
    entries.sort()
    out, end, last = {}, 0, None
    for lo, hi, name, dtype, shape in entries:
        if lo != end:
            where = f"tensor {last!r} ends at byte {end}" if last is not None else "the data section starts at 0"
            kind = "overlaps the tensor before it" if lo < end else "leaves a gap"
            raise CheckpointError(f"{path}: tensor {name!r} at data bytes [{lo}, {hi}) {kind} ({where})")
        if base + hi > size:
            raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends at byte {base + hi}, "
                                  f"file has {size}")
        out[name] = TensorInfo(path, name, dtype, shape, base + lo, base + hi)
        end, last = hi, name
    if base + end != size:
        raise CheckpointError(f"{path}: {size - base - end} bytes after the last tensor (the header does not "
                              f"cover the file)")
    return out


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Read one tensor into a new numpy array (bf16 via ml_dtypes); refuses NaN/Inf (``check_values``)."""
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
        raise CheckpointError(f"{info.file}: cannot read tensor {info.name!r} ({os_reason(e)})") from None
    arr = np.frombuffer(buf, dtype=DTYPES[info.dtype]).reshape(info.shape)
    check_values(arr, f"{info.file}: tensor {info.name!r}", scales=_is_scales(info.name))
    return arr


# Bits that are all set exactly in NaN and Inf, per float dtype.
_EXPONENT = {np.dtype(ml_dtypes.bfloat16): 0x7F80, np.dtype(np.float16): 0x7C00,
             np.dtype(np.float32): 0x7F80_0000, np.dtype(np.float64): 0x7FF0_0000_0000_0000}
CHECK_CHUNK = 1 << 20  # elements per step of the value check: small temporaries, cache-sized


def _is_scales(name: str) -> bool:
    """MXFP4 scales (HF ``*_scales``, OpenAI ``*.scales``): E8M0 bytes, where 255 is NaN."""
    return name.endswith("scales")


def bad_value(arr: np.ndarray, scales: bool = False) -> tuple[tuple[int, ...], str] | None:
    """The index and a description of the first NaN/Inf of a float array, or 255 of MXFP4 ``scales``.

    None when every value is usable. Floats are checked on their bits in chunks (``x | ~exponent``
    is all ones only for NaN/Inf): 10-20 ms per 100M bf16 values, about a tenth of reading them.
    """
    arr = np.ascontiguousarray(arr)
    if arr.dtype == np.uint8 and scales:
        if arr.size and int(arr.max()) == 255:
            at = np.unravel_index(int(np.argmax(arr.reshape(-1) == 255)), arr.shape)
            return tuple(int(i) for i in at), "an MXFP4 scale of 255 (NaN in E8M0)"
        return None
    exponent = _EXPONENT.get(arr.dtype)
    if exponent is None or not arr.size:
        return None
    bits = arr.reshape(-1).view(f"u{arr.itemsize}")
    ones = np.iinfo(bits.dtype).max
    fill = bits.dtype.type(ones & ~exponent)
    tmp = np.empty(min(CHECK_CHUNK, bits.size), bits.dtype)
    for i in range(0, bits.size, CHECK_CHUNK):
        chunk = bits[i:i + CHECK_CHUNK]
        m = np.bitwise_or(chunk, fill, out=tmp[:chunk.size])
        if m.max() == ones:
            flat = i + int(np.argmax(m == ones))
            value = arr.reshape(-1)[flat]
            return tuple(int(j) for j in np.unravel_index(flat, arr.shape)), f"a non-finite value ({float(value)})"
    return None


def check_values(arr: np.ndarray, what: str, scales: bool = False, offset: tuple[int, ...] | None = None) -> None:
    """Raise ``CheckpointError`` naming ``what`` if ``arr`` holds NaN/Inf (or 255 in MXFP4 ``scales``).

    ``offset`` is where ``arr`` starts in the whole tensor (a slice), so the index reported is the tensor's.
    """
    bad = bad_value(arr, scales)
    if bad is not None:
        at, desc = bad
        if offset is not None:
            at = tuple(i + o for i, o in zip(at, offset, strict=True))
        raise CheckpointError(f"{what} holds {desc} at index {list(at)}")


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

    Values are checked as for ``read_tensor`` (NaN/Inf, MXFP4 scale 255), for the rectangle read.
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
        raise CheckpointError(f"{info.file}: cannot read tensor {info.name!r} ({os_reason(e)})") from None
    check_values(out, f"{info.file}: tensor {info.name!r}", scales=_is_scales(info.name),
                 offset=tuple(sl.start for sl in index))
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

    def derive(self, shape: tuple[int, ...], dtype,
               read: Callable[[LazyTensor, tuple[slice, ...]], np.ndarray]) -> LazyTensor:
        """A lazy tensor of ``shape`` whose rectangle ``index`` is ``read(self, index)``: a view made of slices
        of this one (``params_map`` maps parameter slices to checkpoint slices this way)."""
        return LazyTensor(tuple(shape), np.dtype(dtype), functools.partial(read, self))

    @classmethod
    def from_file(cls, info: TensorInfo) -> LazyTensor:
        """The tensor ``info``, read by rectangle (``read_region``)."""
        return cls(info.shape, DTYPES[info.dtype], functools.partial(read_region, info))


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray] | Iterator[tuple[str, np.ndarray]],
                      shapes: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None,
                      metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temporary name, then rename).

    ``tensors`` is a dict, or an iterator of ``(name, array)`` in the order of ``shapes``
    (``{name: (shape, dtype)}``, needed up front for the header) so that arrays can be produced
    one at a time and a file larger than memory can be written. A failed write (disk full) raises
    ``CheckpointError`` naming ``path`` and removes the temporary; temporaries of killed earlier
    writes to ``path`` are removed first.
    """
    path = Path(path)
    remove_stale_temporaries(path)
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
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write ({e.strerror or e})") from e
    finally:
        tmp.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    """Delete a file, link or directory tree (best effort)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _running(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):  # no process can have this id
        return False
    return True


def remove_stale_temporaries(dst: Path) -> None:
    """Clean up after earlier writes to ``dst`` that were killed (``kill -9``, power loss), one stderr line each.

    Only the names this module's writers use, ``.<name>.tmp-<pid>`` (being filled) and ``.<name>.old-<pid>``
    (the previous ``dst`` moved aside while being replaced), and only when that process is no longer running.
    An ``.old`` one is moved back to ``dst`` if ``dst`` is missing (killed between moving it aside and renaming
    the new one in), otherwise deleted; a ``.tmp`` one is deleted.
    """
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.(tmp|old)-(\d+)")
    try:
        entries = sorted(dst.parent.iterdir())  # "old" sorts before "tmp"
    except OSError:
        return
    for path in entries:
        m = pattern.fullmatch(path.name)
        if m is None or int(m[2]) == os.getpid() or _running(int(m[2])):
            continue
        if m[1] == "old" and not os.path.lexists(dst):
            try:
                os.rename(path, dst)
            except OSError:
                continue
            print(f"oss-jax: restored {dst} from {path.name}, moved aside by process {m[2]} which died "
                  f"before replacing it", file=sys.stderr)
        else:
            _remove(path)
            print(f"oss-jax: removed {path}, left by an interrupted write (process {m[2]} is no longer running)",
                  file=sys.stderr)


@contextlib.contextmanager
def atomic_directory(dst: Path, check: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``dst`` to fill; it replaces ``dst`` only if the block completes.

    On any exception (Ctrl-C included) it is deleted, so nothing half-written remains. An existing ``dst`` is
    renamed aside to ``.<name>.old-<pid>``, the new one renamed in, then the old one deleted: a crash in
    between never leaves neither (``remove_stale_temporaries`` puts the old one back on the next write).
    ``check(dst)``, when given, runs once the block completes, just before ``dst`` is replaced, to refuse
    contents that appeared meanwhile. Callers decide what ``dst`` may hold (``check_destination``).
    """
    remove_stale_temporaries(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    replaced = False
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if check is not None:
            check(dst)
        if os.path.lexists(dst):
            os.rename(dst, old)
            replaced = True
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(old, dst)
                replaced = False
                raise
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replaced:
        _remove(old)


def check_destination(dst: Path, *, overwrite: bool, ours: Callable[[Path], str | None], what: str,
                      hint: str = "") -> None:
    """Refuse to write ``dst`` where that would destroy something the caller was not asked to replace.

    ``dst`` may be missing or an empty directory. A directory that ``ours(dst)`` accepts (returns None: a
    previous checkpoint of the same kind) is replaced only with ``overwrite``; anything else (a file, a link,
    a directory with other contents) raises ``CheckpointError`` with ``ours``'s reason and what is there.
    """
    if not os.path.lexists(dst):
        return
    if dst.is_symlink():
        raise CheckpointError(f"{dst}: is a symbolic link (to {os.readlink(dst)}); not replaced, give the real path")
    if not dst.is_dir():
        raise CheckpointError(f"{dst}: is a file, not {what}; not replaced{hint}")
    try:
        entries = sorted(dst.iterdir())
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot list ({e.strerror or e})") from None
    if not entries:
        return
    why = ours(dst)
    if why is not None:
        names = [p.name + ("/" if p.is_dir() else "") for p in entries]
        held = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise CheckpointError(f"{dst}: already exists and is not {what} ({why}; it holds {held}); not replaced{hint}")
    if not overwrite:
        raise CheckpointError(f"{dst}: already exists (pass --overwrite to replace it)")


def list_tensors(directory: Path) -> dict[str, TensorInfo]:
    """All tensors of a checkpoint directory (index-listed shards, or every ``*.safetensors``)."""
    index = directory / "model.safetensors.index.json"
    if os.path.lexists(index):
        weight_map: dict[str, str] | None = read_index(index)
        files = sorted(set(weight_map.values()))
        if not files:
            raise CheckpointError(f"{index}: the index lists no shards")
    else:
        weight_map = None
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files")
    tensors: dict[str, TensorInfo] = {}
    for fname in files:
        path = directory / fname
        if weight_map is not None:
            try:
                os.stat(path)
            except FileNotFoundError:
                broken = " (a broken symlink)" if path.is_symlink() else ""
                raise CheckpointError(f"{path}: shard listed in the index is missing{broken}") from None
            except OSError:
                pass  # a symlink loop, no permission: read_header names it
        for name, info in read_header(path).items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name!r} also appears in {tensors[name].file.name}")
            tensors[name] = info
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in tensors or tensors[name].file != directory / fname:
                raise CheckpointError(f"{directory / fname}: tensor {name!r} listed in the index is not in it")
    return tensors


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of ``model.safetensors.index.json``: tensor name -> shard file inside the directory."""
    try:
        data = json.loads(index.read_text())
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read ({os_reason(e)})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{index}: corrupt index (not valid JSON)") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        got = "nothing" if weight_map is None else f"a {type(weight_map).__name__}"
        raise CheckpointError(f"{index}: corrupt index ('weight_map' must map tensor names to shard files, "
                              f"got {got})")
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or not fname:
            raise CheckpointError(f"{index}: corrupt index (tensor {name!r} maps to {fname!r}, not a shard file name)")
        norm = os.path.normpath(fname)
        if os.path.isabs(norm) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
            raise CheckpointError(f"{index}: shard path {fname!r} (tensor {name!r}) leaves the checkpoint directory")
    return weight_map


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

    def hf_tensors(self, lazy: bool = False) -> Iterator[tuple[str, np.ndarray | LazyTensor]]:
        """Yield ``(HF name, tensor)`` one tensor at a time, whatever the on-disk layout.

        Tensors are read arrays, or with ``lazy`` ``LazyTensor`` s that read nothing until sliced.
        """
        for name, info in sorted(self.tensors.items(), key=lambda kv: _layer_order(kv[0])):
            x = LazyTensor.from_file(info) if lazy else read_tensor(info)
            yield from [(name, x)] if self.layout == "hf" else openai_to_hf(self.config, name, x)

    def params(self, lazy: bool = False) -> Iterator[tuple[Path_, np.ndarray | LazyTensor]]:
        """Yield ``(parameter path, tensor in the model's layout)`` one tensor at a time (``to_params``)."""
        for name, x in self.hf_tensors(lazy):
            yield to_params(self.config, name, x)


def _layer_order(name: str) -> tuple[int, str]:
    """Sort key that keeps each layer's tensors together (shards may split a layer)."""
    parts = name.split(".")
    for here, after in itertools.pairwise(parts):
        if here in ("layers", "block") and after.isdigit():
            return int(after), name
    return -1, name


def read_config(directory: Path) -> Config:
    """``directory/config.json`` as a ``Config``; any problem is one ``CheckpointError`` line naming the file."""
    path = directory / "config.json"
    try:
        return Config.from_json(directory)
    except ValueError as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(f"{path}:") else f"{path}: {msg}") from None


def layer_indices(names, prefix: str) -> set[int]:
    """The layer numbers N of names ``<prefix>.N.*`` (``model.layers`` for HF, ``block`` for OpenAI)."""
    pattern = re.compile(rf"{re.escape(prefix)}\.([0-9]+)(\.|$)")
    return {int(m[1]) for m in map(pattern.match, names) if m}


def _ranges(indices: set[int]) -> str:
    """``{0, 1, 2, 5}`` -> ``"0..2, 5"`` (at most a few runs shown)."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    shown = [f"{a}..{b}" if b > a else str(a) for a, b in runs[:4]]
    return ", ".join(shown) + (f", ... ({len(indices)} layers)" if len(runs) > 4 else "")


def check_layers(directory: Path, cfg: Config, present: set[int], what: str) -> None:
    """Refuse a config whose ``num_hidden_layers`` disagrees with the layers a checkpoint holds.

    Run before anything is built from the config, so an absurd layer count fails at once.
    """
    n = cfg.num_hidden_layers
    if present != set(range(n)):
        have = f"{what} layers {_ranges(present)}" if present else f"no {what} any layer"
        raise CheckpointError(f"{directory / 'config.json'}: num_hidden_layers is {n} but the checkpoint has {have}")


def open_checkpoint(directory: str | Path) -> Source:
    """Read the config and every header of a checkpoint directory, and check them all."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    cfg = read_config(directory)
    tensors = list_tensors(directory)
    openai = "embedding.weight" in tensors or any(n.startswith("block.") for n in tensors)
    check_layers(directory, cfg, layer_indices(tensors, "block" if openai else "model.layers"), "tensors for")
    if openai:
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
