"""Native CPU kernels for a decode step of gpt-oss, compiled on first use.

``mxfp4_cpu.cc`` (read it: it is also a lesson in how llama.cpp-class kernels read 4-bit weights) is
an XLA FFI custom call computing ``x @ decode(blocks[e], scales[e]).T`` for expert ``e`` straight from
the packed bytes, without copying the expert or expanding it in memory: at batch 1 about 10x XLA's
decode + matmul on the CPU (``benchmarks/results/mxfp4_kernel.md``), 12 G weights/s per core on AVX-512.
``mxfp4_grouped_cpu.cc`` is the same product for many rows at once, sorted by expert (a prefill's
token-expert pairs: :func:`grouped_matmul`, the CPU's ``"ragged"`` dispatch in ``kernels.experts``): each
expert decoded once per call a cache-sized panel at a time, and a blocked matrix product over its rows.
``bf16_cpu.cc`` multiplies by a bf16 weight read in place (``x @ w`` and ``x @ w.T``): the attention
projections and the unembedding of a decode step (``kernels.linear``), which XLA's CPU backend would first
copy to float32. All are compiled into one library; ``common.h`` and ``mxfp4_decode.h`` hold what they share.

:func:`available` builds it once with the system C++ compiler (``$CXX``, else ``c++``, ``g++`` or
``clang++``; ``-O3 -march=native``) into ``$OSS_JAX_CACHE/native`` (``~/.cache/oss-jax/native``), named by a
hash of the source, the compiler and its target, and jaxlib's version; the library is written under
a temporary name and renamed, so processes building it at once do not collide. No compiler, or a
failed build: one notice on stderr (logger ``oss_jax``) and ``False``, and the packed experts keep the
XLA path (``kernels.experts.expert_matmul``). ``OSS_JAX_NATIVE=0`` turns the kernel off, silently.

``Experts.native`` (``"auto"``, ``True`` or ``False``) chooses per model: see :func:`enabled`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

from oss_jax.kernels import mxfp4
from oss_jax.mxfp4 import BLOCK, checked

HERE = Path(__file__).parent
SOURCES = [HERE / "mxfp4_cpu.cc", HERE / "mxfp4_grouped_cpu.cc", HERE / "bf16_cpu.cc"]  # one library
HEADERS = [HERE / "common.h", HERE / "mxfp4_decode.h"]
TARGET = "oss_jax_mxfp4_matmul"  # the fastest decoder the compiler offers (a register table look-up on GCC)
PORTABLE_TARGET = "oss_jax_mxfp4_matmul_arith"  # the portable decoder, the same values (tests compare both)
BF16_NN, BF16_NT = "oss_jax_bf16_matmul_nn", "oss_jax_bf16_matmul_nt"  # bf16_cpu.cc: x @ w, x @ w.T
GROUPED_NT, GROUPED_NN = "oss_jax_mxfp4_grouped_nt", "oss_jax_mxfp4_grouped_nn"  # mxfp4_grouped_cpu.cc
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC"]
_lock = threading.Lock()
_state: dict[str, str | None] = {}  # "error": None once registered, else why not (after the first try)
_lanes = [0]  # the SIMD width the library was built for (floats per register), once registered
log = logging.getLogger("oss_jax")


class Unavailable(Exception):
    """Why the kernel could not be built or loaded (one line)."""


def available() -> bool:
    """Whether the kernel is built and registered with JAX; builds it on the first call.

    ``False`` when ``OSS_JAX_NATIVE=0``, or (with one notice, the first time) when there is no C++
    compiler or the build fails.
    """
    return reason() is None


def max_rows() -> int:
    """Rows of ``x`` up to which ``"auto"`` multiplies packed experts with the kernel; above it XLA decodes
    the expert and its matrix product wins. Measured with ``benchmarks/mxfp4_kernel.py``: built for AVX-512
    (16 floats per register) the two were equal at 64 rows; for AVX2 (8) the kernel was 2x faster at 8 rows
    and slower from 16 on (a 20b gate_up: 10.9 against 9.5 ms at 16 rows, 35 against 19 at 64)."""
    return 64 if available() and _lanes[0] >= 16 else 8


def reason() -> str | None:
    """None when the kernel is ready, else why it is not (one line)."""
    with _lock:
        if "error" not in _state:
            if os.environ.get("OSS_JAX_NATIVE", "1").strip() == "0":
                _state["error"] = "turned off by OSS_JAX_NATIVE=0"
            else:
                try:
                    _register(build())
                    _state["error"] = None
                except (Unavailable, OSError) as err:  # OSError: the source or the cache unreadable, say
                    _state["error"] = str(err)
                    log.warning("oss_jax: the native CPU kernels are unavailable (%s); packed experts and bf16 "
                                "decode steps use the slower XLA path (OSS_JAX_NATIVE=0 silences this)", err)
        return _state["error"]


def enabled(setting: bool | str) -> bool:
    """Whether ``kernels.experts.expert_matmul`` uses the kernel under ``setting`` (``Experts.native``).

    ``"auto"``: when the backend is the CPU and the kernel is available; ``True``: always (a one-line
    ``ValueError`` where it cannot); ``False``: never (XLA decodes the weights).
    """
    if not (isinstance(setting, bool) or (isinstance(setting, str) and setting == "auto")):
        raise ValueError(f"unknown native setting {setting!r} (use 'auto', True or False)")
    if setting is False:
        return False
    if jax.default_backend() != "cpu":
        if setting is True:
            raise ValueError(f"native=True: the native MXFP4 kernel runs on the CPU, not {jax.default_backend()}")
        return False
    why = reason()
    if setting is True and why is not None:
        raise ValueError(f"native=True: the native MXFP4 kernel is unavailable ({why})")
    return why is None


def expert_matmul(x_RI: jax.Array, blocks: jax.Array, scales: jax.Array, e: jax.Array,
                  target: str = TARGET) -> jax.Array:
    """``x @ decode(blocks[e], scales[e]).T`` -> ``[R, O]`` float32, by the native kernel.

    Args:
      x_RI: ``[R, I]`` floats (computed in float32).
      blocks: uint8 ``[E, O, I/32, 16]``; scales: uint8 ``[E, O, I/32]`` (read in place, not copied).
      e: the expert, an integer scalar (traced is fine); outside ``[0, E)`` it clamps, as ``dynamic_slice``.
      target: ``TARGET`` or ``PORTABLE_TARGET``.

    Differentiable with respect to ``x`` (the backward pass decodes expert ``e`` with XLA); the weights
    get no gradient. Builds the kernel on the first call; a one-line ``RuntimeError`` where it cannot.
    """
    why = reason()
    if why is not None:
        raise RuntimeError(f"kernels.native.expert_matmul: the native kernels are unavailable ({why})")
    blocks, scales = checked(blocks, scales, "kernels.native.expert_matmul")
    if blocks.ndim != 4 or x_RI.ndim != 2 or x_RI.shape[1] != blocks.shape[2] * BLOCK:
        raise ValueError(f"kernels.native.expert_matmul: x {x_RI.shape} does not match blocks {blocks.shape} "
                         "(expected x [R, I] and blocks [E, O, I/32, 16])")
    return _matmul(target, x_RI.astype(jnp.float32), blocks, scales, jnp.asarray(e, jnp.int32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _matmul(target: str, x_RI: jax.Array, blocks: jax.Array, scales: jax.Array, e: jax.Array) -> jax.Array:
    R, O = x_RI.shape[0], blocks.shape[1]
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((R, O), jnp.float32), vmap_method="sequential")
    return call(x_RI, blocks, scales, e)


def _matmul_fwd(target, x_RI, blocks, scales, e):
    return _matmul(target, x_RI, blocks, scales, e), (blocks, scales, e)


def _matmul_bwd(target, res, dy_RO):
    """``dx = dy @ W``, with ``W [O, I]`` expert ``e`` decoded by XLA; nothing for the integer inputs."""
    blocks, scales, e = res
    w_OI = mxfp4.decode(jax.lax.dynamic_index_in_dim(blocks, e, keepdims=False),
                        jax.lax.dynamic_index_in_dim(scales, e, keepdims=False), jnp.float32)
    return dy_RO @ w_OI, None, None, None


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def grouped_matmul(x_PI: jax.Array, blocks: jax.Array, scales: jax.Array, sizes_E: jax.Array) -> jax.Array:
    """Rows sorted by expert times their expert, ``x[p] @ decode(blocks[e], scales[e]).T`` -> ``[P, O]`` float32,
    by the native grouped kernel (``mxfp4_grouped_cpu.cc``): what ``jax.lax.ragged_dot`` computes with the
    decoded experts, without decoding them in memory.

    Args:
      x_PI: ``[P, I]`` floats (computed in float32), the rows of expert 0 first, then those of expert 1, ...
      blocks: uint8 ``[E, O, I/32, 16]``; scales: uint8 ``[E, O, I/32]`` (read in place).
      sizes_E: int32 ``[E]``, rows per expert; rows past ``sum(sizes)`` get 0.

    Differentiable with respect to ``x`` (the backward pass is the same kernel, ``dy @ W``); the weights get
    no gradient. Builds the kernels on the first call; a one-line ``RuntimeError`` where it cannot.
    """
    why = reason()
    if why is not None:
        raise RuntimeError(f"kernels.native.grouped_matmul: the native kernels are unavailable ({why})")
    blocks, scales = checked(blocks, scales, "kernels.native.grouped_matmul")
    if (blocks.ndim != 4 or x_PI.ndim != 2 or x_PI.shape[1] != blocks.shape[2] * BLOCK
            or sizes_E.shape != blocks.shape[:1]):
        raise ValueError(f"kernels.native.grouped_matmul: x {x_PI.shape}, blocks {blocks.shape} and sizes "
                         f"{sizes_E.shape} do not match (expected x [P, I], blocks [E, O, I/32, 16], sizes [E])")
    return _grouped(x_PI.astype(jnp.float32), blocks, scales, sizes_E.astype(jnp.int32))


def _grouped_call(target: str, x: jax.Array, blocks: jax.Array, scales: jax.Array, sizes_E: jax.Array) -> jax.Array:
    N = blocks.shape[1] if target == GROUPED_NT else blocks.shape[2] * BLOCK
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], N), jnp.float32), vmap_method="sequential")
    return call(x, blocks, scales, sizes_E)


@jax.custom_vjp
def _grouped(x_PI, blocks, scales, sizes_E):
    return _grouped_call(GROUPED_NT, x_PI, blocks, scales, sizes_E)


def _grouped_fwd(x_PI, blocks, scales, sizes_E):
    return _grouped(x_PI, blocks, scales, sizes_E), (blocks, scales, sizes_E)


def _grouped_bwd(res, dy_PO):
    """``dx = dy @ W`` per row's expert, by the same kernel; nothing for the integer inputs."""
    blocks, scales, sizes_E = res
    return _grouped_call(GROUPED_NN, dy_PO, blocks, scales, sizes_E), None, None, None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def bf16_matmul(x_RI: jax.Array, w: jax.Array, transposed: bool = False) -> jax.Array:
    """``x @ w`` (``w [I, O]``), or ``x @ w.T`` when ``transposed`` (``w [O, I]``) -> ``[R, O]`` float32, by the
    native bf16 kernel (``bf16_cpu.cc``): ``w`` bfloat16 read in place, ``x`` computed in float32.

    Differentiable (the backward pass is XLA's: ``dx = dy @ w.T``, ``dw = x.T @ dy``). Builds the kernel on
    the first call; a one-line ``RuntimeError`` where it cannot.
    """
    why = reason()
    if why is not None:
        raise RuntimeError(f"kernels.native.bf16_matmul: the native kernels are unavailable ({why})")
    I = w.shape[1] if transposed else w.shape[0]
    if w.dtype != jnp.bfloat16 or w.ndim != 2 or x_RI.ndim != 2 or x_RI.shape[1] != I:
        raise ValueError(f"kernels.native.bf16_matmul: x {x_RI.shape} and bfloat16 w {w.shape} do not match "
                         f"(got {w.dtype}; expected x [R, I] and w {'[O, I]' if transposed else '[I, O]'})")
    return _bf16(transposed, x_RI.astype(jnp.float32), w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bf16(transposed: bool, x_RI: jax.Array, w: jax.Array) -> jax.Array:
    O = w.shape[0] if transposed else w.shape[1]
    call = jax.ffi.ffi_call(BF16_NT if transposed else BF16_NN, jax.ShapeDtypeStruct((x_RI.shape[0], O), jnp.float32),
                            vmap_method="sequential")
    return call(x_RI, w)


def _bf16_fwd(transposed, x_RI, w):
    return _bf16(transposed, x_RI, w), (x_RI, w)


def _bf16_bwd(transposed, res, dy_RO):
    x_RI, w = res
    w32 = w.astype(jnp.float32)
    if transposed:  # y = x @ w.T
        return dy_RO @ w32, (dy_RO.T @ x_RI).astype(w.dtype)
    return dy_RO @ w32.T, (x_RI.T @ dy_RO).astype(w.dtype)


_bf16.defvjp(_bf16_fwd, _bf16_bwd)


# -- building ----------------------------------------------------------------------------------------------------
def compiler() -> list[str]:
    """The C++ compiler's command: ``$CXX`` (split like a shell), else the first of c++, g++, clang++."""
    cxx = os.environ.get("CXX", "").strip()
    if cxx:
        cmd = shlex.split(cxx)
        if shutil.which(cmd[0]) is None:
            raise Unavailable(f"CXX={cxx} is not a command")
        return cmd
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return [name]
    raise Unavailable("no C++ compiler (c++, g++ or clang++; or set CXX)")


def build() -> Path:
    """The compiled library, built now unless the cache has one for this source, compiler and target."""
    cxx = compiler()
    march = ["-march=native"]
    target = _run([*cxx, *march, "-dM", "-E", "-x", "c++", os.devnull], "query its target", ok=True)
    if target is None:  # a compiler without -march=native (some ARM clangs): its default target
        march = []
        target = _run([*cxx, "-dM", "-E", "-x", "c++", os.devnull], "query its target")
    code = [path.read_bytes() for path in SOURCES + HEADERS]
    key = hashlib.sha256(b"\0".join([*code, target.encode(), " ".join(cxx + march + _FLAGS).encode(),
                                     jaxlib.__version__.encode()])).hexdigest()[:16]
    root = os.environ.get("OSS_JAX_CACHE")  # as oss_jax.harmony's vocabulary cache
    cache = (Path(root).expanduser() if root else Path.home() / ".cache" / "oss-jax") / "native"
    lib = cache / f"oss_jax_cpu-{key}.so"
    if lib.is_file():
        return lib
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=lib.name + ".", suffix=".tmp", dir=cache)
        os.close(fd)
    except OSError as err:
        raise Unavailable(f"cannot write {cache}: {err.strerror or err}") from None
    try:
        _run([*cxx, *march, *_FLAGS, "-isystem", jax.ffi.include_dir(), *map(str, SOURCES), "-o", tmp], "compile")
        os.replace(tmp, lib)  # atomic: another process sees the whole library or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _run(cmd: list[str], what: str, ok: bool = False) -> str | None:
    """The command's stdout; on failure None if ``ok``, else ``Unavailable`` with its first error line."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise Unavailable(f"{cmd[0]} could not {what}: {err}") from None
    if r.returncode == 0:
        return r.stdout
    if ok:
        return None
    lines = [line for line in r.stderr.splitlines() if "error" in line] or r.stderr.splitlines() or ["no output"]
    raise Unavailable(f"{cmd[0]} could not {what}: {lines[0].strip()}")


def _register(lib: Path) -> None:
    """Load the library and register its handlers with XLA for the CPU platform."""
    try:
        so = ctypes.CDLL(str(lib))
        for name, symbol in ((TARGET, so.OssJaxMxfp4Matmul), (PORTABLE_TARGET, so.OssJaxMxfp4MatmulArith),
                             (BF16_NN, so.OssJaxBf16MatmulNN), (BF16_NT, so.OssJaxBf16MatmulNT),
                             (GROUPED_NT, so.OssJaxMxfp4GroupedNT), (GROUPED_NN, so.OssJaxMxfp4GroupedNN)):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
        _lanes[0] = int(so.OssJaxSimdLanes())
    except (OSError, AttributeError) as err:
        raise Unavailable(f"cannot load {lib}: {err}") from None
