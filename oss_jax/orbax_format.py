"""The oss-jax orbax checkpoint: written by ``oss-jax convert`` (``write``), read by ``oss_jax.load``.

Layout::

    config.json           HF-style config (read back by ``Config.from_json``)
    params/<group>/       one orbax checkpoint per group: ``embed_VD``, ``layers.0`` .. ``layers.N-1``,
                          ``norm``, ``unembed_VD``; arrays in the model's own layout and the
                          checkpoint's dtypes (MXFP4 experts stay packed)
    vocab.json            a small model's vocabulary map, when it has one
    oss_jax.json          written last: format marker, expert storage, group list

Arrays are read back one group at a time and checked as safetensors are (dtype, NaN/Inf, MXFP4
scale 255); the marker's group list is checked against the config before anything is built.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from oss_jax import checkpoint
from oss_jax.checkpoint import CheckpointError
from oss_jax.config import Config
from oss_jax.params_map import Path_
from oss_jax.vocab import TokenMap

ORBAX_MARKER = "oss_jax.json"
ORBAX_FORMAT = "oss-jax/orbax"
FILES = ("config.json", "params", "vocab.json", ORBAX_MARKER)  # everything ``write`` puts in a directory
_FLOATS = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32))


def group_of(path: Path_) -> tuple[str, Path_]:
    """The orbax group a parameter belongs to, and its key path inside that group."""
    if path[0] == "layers":
        return f"layers.{path[1]}", path[2:]
    return str(path[0]), path[1:] or ("value",)


def param_path(group: str, keys: Path_) -> Path_:
    """The parameter path of ``keys`` inside ``group`` (the inverse of ``group_of``)."""
    if group.startswith("layers."):
        return ("layers", int(group.split(".")[1]), *keys)
    return (group,) if keys == ("value",) else (group, *keys)


# -- writing ------------------------------------------------------------------------------------------
def write(directory: Path, cfg: Config, params: Iterable[tuple[Path_, np.ndarray]], *, packed: bool,
          token_map: TokenMap | None, source_layout: str, dst: Path) -> None:
    """Write a checkpoint into the empty ``directory``: ``params`` (in group order), config, vocabulary, marker.

    Each group is saved when the next one starts, so memory holds about one group. A failed write
    (a full disk) raises ``CheckpointError`` naming ``dst``, the directory ``directory`` becomes.
    """
    import orbax.checkpoint as ocp

    ckpt = ocp.StandardCheckpointer()
    groups: list[str] = []
    tree: dict = {}
    current: str | None = None

    def flush() -> None:
        if current is not None:
            try:
                ckpt.save(directory / "params" / current, tree)
                ckpt.wait_until_finished()
            except Exception as e:  # tensorstore raises ValueError for a full disk
                raise cannot_write(dst, e) from None
            groups.append(current)

    with quiet_orbax(), contextlib.closing(ckpt):
        (directory / "params").mkdir()
        for path, arr in params:
            g, key = group_of(path)
            if g != current:
                flush()
                current, tree = g, {}
            node = tree
            for k in key[:-1]:
                node = node.setdefault(str(k), {})
            node[str(key[-1])] = np.ascontiguousarray(arr)
        flush()
    (directory / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    if token_map is not None:
        token_map.save(directory)
    meta = {"format": ORBAX_FORMAT, "version": 1, "experts": "mxfp4" if packed else "dense",
            "groups": groups, "source_layout": source_layout}
    (directory / ORBAX_MARKER).write_text(json.dumps(meta, indent=2))


def cannot_write(dst: Path, e: Exception) -> CheckpointError:
    """One line for a failed write; orbax (tensorstore) reports the OS error as ``[os_error_code='28']``."""
    if isinstance(e, OSError):
        reason = e.strerror or str(e)
    elif m := re.search(r"os_error_code='(\d+)'", str(e)):
        reason = os.strerror(int(m[1]))
    else:
        reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    return CheckpointError(f"{dst}: cannot write ({reason})")


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
    """Keep orbax's absl logging (a traceback from every thread of a failed write) off stderr meanwhile;
    the failure itself is raised as one line."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


# -- reading ------------------------------------------------------------------------------------------
def open_orbax(path: Path) -> tuple[Config, bool, list[str]]:
    """Read and check the marker and config of a converted checkpoint: ``(config, packed experts, groups)``.

    The marker's groups must be exactly ``embed_VD``, ``norm``, ``unembed_VD`` and one ``layers.N``
    per layer of the config (checked before anything is built), each a directory under ``params/``.
    """
    marker = path / ORBAX_MARKER
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError, RecursionError):
        meta = None
    meta = meta if isinstance(meta, dict) else {}
    groups, experts = meta.get("groups"), meta.get("experts")
    if not (meta.get("format") == ORBAX_FORMAT and experts in ("mxfp4", "dense") and isinstance(groups, list)
            and all(isinstance(g, str) for g in groups)):
        raise CheckpointError(f"{marker}: not an oss-jax checkpoint marker")
    cfg = checkpoint.read_config(path)
    checkpoint.check_layers(path, cfg, checkpoint.layer_indices(groups, "layers"), "parameter groups for")
    expected = {"embed_VD", "norm", "unembed_VD"} | {f"layers.{i}" for i in range(cfg.num_hidden_layers)}
    for problem, names in (("unexpected", set(groups) - expected), ("not listed", expected - set(groups)),
                           ("listed twice", {g for g, c in Counter(groups).items() if c > 1})):
        if names:
            raise CheckpointError(f"{marker}: parameter group {min(names)!r} {problem}")
    for g in groups:
        if not (path / "params" / g).is_dir():
            raise CheckpointError(f"{path / 'params' / g}: missing parameter group")
    return cfg, experts == "mxfp4", groups


def read_orbax(path: Path, groups: list[str]) -> Iterator[tuple[Path_, np.ndarray]]:
    """Yield ``(parameter path, numpy array)`` from a converted checkpoint, one group at a time.

    A group that cannot be restored (data deleted or corrupt) is one ``CheckpointError`` line naming
    it; float arrays are checked for NaN/Inf and MXFP4 scales for 255, as when reading safetensors.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()  # orbax refuses relative paths
    _drop_abandoned_callback_errors()
    ckpt = ocp.StandardCheckpointer()
    try:
        for g in groups:
            where = path / "params" / g
            try:
                tree = ckpt.restore(where)
            except Exception as e:
                raise CheckpointError(f"{where}: unreadable orbax group (data missing or corrupt: "
                                      f"{_first_line(e)})") from None
            for keys, arr in _flatten(tree):
                arr, what = np.asarray(arr), f"{where}: array {'.'.join(map(str, keys))!r}"
                packed = str(keys[-1]).endswith(("_blocks", "_scales"))
                if (arr.dtype != np.uint8) if packed else (arr.dtype not in _FLOATS):
                    raise CheckpointError(f"{what} has dtype {arr.dtype}, expected "
                                          f"{'uint8 (MXFP4)' if packed else 'bfloat16, float16 or float32'}")
                checkpoint.check_values(arr, what, scales=str(keys[-1]).endswith("scales"))
                yield param_path(g, keys), arr
            del tree
    finally:
        ckpt.close()


def _first_line(e: Exception, limit: int = 200) -> str:
    """``Type: first line`` of an exception, without tensorstore's spec dump, at most ``limit`` characters."""
    text = str(e).strip().split("\n", 1)[0].split(" [tensorstore_spec=", 1)[0]
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _drop_abandoned_callback_errors() -> None:
    """Silence tensorstore's "Event loop is closed" reports after a failed orbax restore (installed once).

    When one read of a group fails, orbax closes its event loop while the group's other reads are still
    in flight; as each finishes, tensorstore calls ``loop.call_soon_threadsafe`` on the closed loop and
    Python prints the ``RuntimeError`` as an unraisable exception, after the real error was reported.
    Only that error, raised from that asyncio call, is dropped; everything else reaches the previous hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "oss_jax_orbax", False):
        return

    def hook(unraisable) -> None:
        exc, tb = unraisable.exc_value, unraisable.exc_traceback
        frames = []
        while tb is not None:
            frames.append(tb.tb_frame.f_code.co_name)
            tb = tb.tb_next
        if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
                and "call_soon_threadsafe" in frames):
            previous(unraisable)

    hook.oss_jax_orbax = True
    sys.unraisablehook = hook


def _flatten(tree: dict, prefix: Path_ = ()) -> Iterator[tuple[Path_, np.ndarray]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v
