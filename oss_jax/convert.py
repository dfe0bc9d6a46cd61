"""Convert a gpt-oss checkpoint to an oss-jax orbax checkpoint, one layer at a time.

Run as ``oss-jax convert SRC DST`` or ``python -m oss_jax.convert SRC DST``; from Python,
``from oss_jax.convert import convert``.

Output layout (``DST/``)::

    config.json           HF-style config (read back by ``Config.from_json``)
    params/<group>/       one orbax checkpoint per group: ``embed_VD``, ``layers.0`` .. ``layers.N-1``,
                          ``norm``, ``unembed_VD``; arrays in the model's own layout and the
                          checkpoint's dtypes (MXFP4 experts stay packed)
    oss_jax.json          written last: format marker, expert storage, group list

``DST`` must be missing or an empty directory; ``--overwrite`` replaces an earlier conversion and
nothing else (never a directory with other contents, a file, or the source). Everything is written
under a temporary sibling directory that is renamed to ``DST`` only when complete, so an
interrupted conversion never leaves something that loads (a killed one's temporary is removed by
the next run). Peak memory is a few
times the largest group (a layer of packed 20b is about 0.4 GB; the embedding 1.2 GB): the group
being saved, the next tensor (already read when the group changes) and orbax's copies while it
saves; 4.3 GiB measured for gpt-oss-20b (``benchmarks/results/real_size_load.md``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from oss_jax import checkpoint
from oss_jax.checkpoint import CheckpointError, Path_
from oss_jax.load import ORBAX_FORMAT, ORBAX_MARKER, resolve
from oss_jax.vocab import TokenMap

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

WRITES = ("config.json", "params", "vocab.json", ORBAX_MARKER)  # everything convert puts in DST


def group_of(path: Path_) -> tuple[str, Path_]:
    """The orbax group a parameter belongs to, and its key path inside that group."""
    if path[0] == "layers":
        return f"layers.{path[1]}", path[2:]
    return str(path[0]), path[1:] or ("value",)


def earlier_conversion(path: Path) -> str | None:
    """None when directory ``path`` is what ``convert`` writes (its marker and files only), else why not."""
    try:
        fmt = json.loads((path / ORBAX_MARKER).read_text()).get("format")
    except FileNotFoundError:
        return f"no {ORBAX_MARKER} marker"
    except (OSError, ValueError, AttributeError):
        return f"unreadable {ORBAX_MARKER}"
    if fmt != ORBAX_FORMAT:
        return f"{ORBAX_MARKER} is not an {ORBAX_FORMAT} marker"
    extra = sorted(p.name for p in path.iterdir() if p.name not in WRITES)
    return f"convert does not write {', '.join(extra)}" if extra else None


def check_destination(dst: Path, overwrite: bool) -> None:
    """Refuse ``dst`` unless it is missing, an empty directory, or (with ``overwrite``) an earlier conversion."""
    checkpoint.check_destination(dst, overwrite=overwrite, ours=earlier_conversion,
                                 what="an oss-jax orbax checkpoint",
                                 hint=" (--overwrite replaces only an earlier conversion)")


def refuse_overlap(src: Path, dst: Path) -> None:
    """Refuse a ``dst`` that is the source directory, contains it, or lies inside it (real paths compared)."""
    s, d = Path(os.path.realpath(src)), Path(os.path.realpath(dst))
    if s == d:
        relation = "is"
    elif s.is_relative_to(d):
        relation = "contains"
    elif d.is_relative_to(s):
        relation = "lies inside"
    else:
        return
    raise CheckpointError(f"{dst}: {relation} the source checkpoint {src}; convert to another directory")


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


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
            progress: bool = True) -> Path:
    """Convert ``src`` (anything ``oss_jax.load`` reads except an orbax checkpoint) to ``dst``.

    ``dst`` must be missing or an empty directory; ``overwrite`` replaces an earlier conversion, never
    anything else, nor the source. Every tensor is checked against ``config.json`` before anything is
    written; any problem (a full disk included) raises ``CheckpointError`` with a one-line message and
    leaves nothing at ``dst``.
    """
    import orbax.checkpoint as ocp

    dst = Path(dst).expanduser().absolute()
    if Path(src).expanduser().exists():
        refuse_overlap(Path(src).expanduser(), dst)
    checkpoint.remove_stale_temporaries(dst)  # may put back an earlier conversion a killed run moved aside
    check_destination(dst, overwrite)
    if not dst.parent.is_dir():
        raise CheckpointError(f"{dst.parent}: no such directory")
    if not os.access(dst.parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"{dst}: cannot write ({os.strerror(13)} in {dst.parent})")
    src_dir = resolve(src)
    refuse_overlap(src_dir, dst)  # a hub snapshot
    source = checkpoint.open_checkpoint(src_dir)
    cfg = source.config
    token_map = TokenMap.load(source.directory)  # a small model's vocabulary travels with it
    ckpt = ocp.StandardCheckpointer()
    groups: list[str] = []
    try:
        with quiet_orbax(), contextlib.closing(ckpt), \
                checkpoint.atomic_directory(dst, check=lambda d: check_destination(d, overwrite)) as tmp:
            _write_params(source, ckpt, tmp, dst, groups, progress)
            (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
            if token_map is not None:
                token_map.save(tmp)
            meta = {"format": ORBAX_FORMAT, "version": 1, "experts": "mxfp4" if source.mxfp4 else "dense",
                    "groups": groups, "source_layout": source.layout}
            (tmp / ORBAX_MARKER).write_text(json.dumps(meta, indent=2))
    except OSError as e:  # a full disk, a failed rename: one line naming DST
        raise cannot_write(dst, e) from None
    return dst


def _write_params(source: checkpoint.Source, ckpt: ocp.StandardCheckpointer, tmp: Path, dst: Path,
                  groups: list[str], progress: bool) -> None:
    """Save ``source``'s tensors under ``tmp/params``, one orbax checkpoint per group (appended to ``groups``)."""
    cfg = source.config
    (tmp / "params").mkdir()
    tree: dict = {}
    current: str | None = None

    def flush() -> None:
        if current is not None:
            try:
                ckpt.save(tmp / "params" / current, tree)
                ckpt.wait_until_finished()
            except Exception as e:  # tensorstore raises ValueError for a full disk
                raise cannot_write(dst, e) from None
            groups.append(current)

    tensors: Iterable = source.hf_tensors()
    if progress:
        from tqdm.auto import tqdm

        tensors = tqdm(tensors, total=len(source), desc=f"converting {source.directory.name}",
                       unit="tensor")
    for name, arr in tensors:
        for path, a in checkpoint.to_params(cfg, name, arr):
            g, key = group_of(path)
            if g != current:
                flush()
                current, tree = g, {}
            node = tree
            for k in key[:-1]:
                node = node.setdefault(str(k), {})
            node[str(key[-1])] = np.ascontiguousarray(a)
    flush()


if __name__ == "__main__":  # python -m oss_jax.convert SRC DST: the CLI's convert subcommand
    import sys

    from oss_jax import cli

    sys.exit(cli.main(["convert", *sys.argv[1:]]))
