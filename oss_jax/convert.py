"""Convert a gpt-oss checkpoint to an oss-jax orbax checkpoint, one layer at a time.

Run as ``oss-jax convert SRC DST`` or ``python -m oss_jax.convert SRC DST``; from Python,
``from oss_jax.convert import convert``.

The output (``DST/``) is the orbax layout of ``orbax_format.py`` (which ``oss_jax.load`` reads):
``config.json``, one orbax checkpoint per parameter group under ``params/`` (arrays in the model's
own layout and the checkpoint's dtypes; MXFP4 experts stay packed), and the marker, written last.

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

import json
import os
from collections.abc import Iterable
from pathlib import Path

from oss_jax import checkpoint, orbax_format
from oss_jax.checkpoint import CheckpointError
from oss_jax.load import resolve
from oss_jax.orbax_format import ORBAX_FORMAT, ORBAX_MARKER
from oss_jax.vocab import TokenMap


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
    extra = sorted(p.name for p in path.iterdir() if p.name not in orbax_format.FILES)
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


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
            progress: bool = True) -> Path:
    """Convert ``src`` (anything ``oss_jax.load`` reads except an orbax checkpoint) to ``dst``.

    ``dst`` must be missing or an empty directory; ``overwrite`` replaces an earlier conversion, never
    anything else, nor the source. Every tensor is checked against ``config.json`` before anything is
    written; any problem (a full disk included) raises ``CheckpointError`` with a one-line message and
    leaves nothing at ``dst``.
    """
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
    token_map = TokenMap.load(source.directory)  # a small model's vocabulary travels with it
    params: Iterable = source.params()
    if progress:
        from tqdm.auto import tqdm

        params = tqdm(params, total=len(source), desc=f"converting {source.directory.name}", unit="tensor")
    try:
        with checkpoint.atomic_directory(dst, check=lambda d: check_destination(d, overwrite)) as tmp:
            orbax_format.write(tmp, source.config, params, packed=source.mxfp4, token_map=token_map,
                               source_layout=source.layout, dst=dst)
    except OSError as e:  # a full disk, a failed rename: one line naming DST
        raise orbax_format.cannot_write(dst, e) from None
    return dst


if __name__ == "__main__":  # python -m oss_jax.convert SRC DST: the CLI's convert subcommand
    import runpy
    import sys

    # Run by name rather than imported: the CLI imports this module, and dependencies run one way.
    sys.argv[1:1] = ["convert"]
    runpy.run_module("oss_jax.cli", run_name="__main__", alter_sys=True)
