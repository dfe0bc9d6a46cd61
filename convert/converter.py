"""Convert a gpt-oss checkpoint to an oss-jax orbax checkpoint, one layer at a time.

Output layout (``DST/``)::

    config.json           HF-style config (read back by ``Config.from_json``)
    params/<group>/       one orbax checkpoint per group: ``embed_VD``, ``layers.0`` .. ``layers.N-1``,
                          ``norm``, ``unembed_VD``; arrays in the model's own layout and the
                          checkpoint's dtypes (MXFP4 experts stay packed)
    oss_jax.json          written last: format marker, expert storage, group list

Everything is written under a temporary sibling directory that is renamed to ``DST`` only when
complete, so an interrupted conversion never leaves something that loads. Peak memory is a few
times the largest group (a layer of packed 20b is about 0.4 GB; the embedding 1.2 GB): the group
being saved, the next tensor (already read when the group changes) and orbax's copies while it
saves; 4.3 GiB measured for gpt-oss-20b (``benchmarks/results/real_size_load.md``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from oss_jax import checkpoint
from oss_jax.checkpoint import CheckpointError, Path_
from oss_jax.load import ORBAX_FORMAT, ORBAX_MARKER, resolve
from oss_jax.vocab import TokenMap


def group_of(path: Path_) -> tuple[str, Path_]:
    """The orbax group a parameter belongs to, and its key path inside that group."""
    if path[0] == "layers":
        return f"layers.{path[1]}", path[2:]
    return str(path[0]), path[1:] or ("value",)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
            progress: bool = True) -> Path:
    """Convert ``src`` (anything ``oss_jax.load`` reads except an orbax checkpoint) to ``dst``.

    Every tensor is checked against ``config.json`` before anything is written; any problem
    raises ``CheckpointError`` with a one-line message and leaves nothing at ``dst``.
    """
    import orbax.checkpoint as ocp

    dst = Path(dst).expanduser().absolute()
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst}: already exists (pass --overwrite to replace it)")
    source = checkpoint.open_checkpoint(resolve(src))
    cfg = source.config
    if not dst.parent.is_dir():
        raise CheckpointError(f"{dst.parent}: no such directory")
    ckpt = ocp.StandardCheckpointer()
    groups: list[str] = []
    with checkpoint.atomic_directory(dst) as tmp:
        (tmp / "params").mkdir()
        tree: dict = {}
        current: str | None = None

        def flush() -> None:
            if current is not None:
                ckpt.save(tmp / "params" / current, tree)
                ckpt.wait_until_finished()
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
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
        token_map = TokenMap.load(source.directory)  # a small model's vocabulary travels with it
        if token_map is not None:
            token_map.save(tmp)
        meta = {"format": ORBAX_FORMAT, "version": 1, "experts": "mxfp4" if source.mxfp4 else "dense",
                "groups": groups, "source_layout": source.layout}
        (tmp / ORBAX_MARKER).write_text(json.dumps(meta, indent=2))
    return dst
