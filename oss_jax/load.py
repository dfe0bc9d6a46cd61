"""``oss_jax.load``: a model from a checkpoint directory, a converted orbax checkpoint, or the hub.

Every source is read one tensor at a time into an abstract model (built with ``nnx.eval_shape``,
so no memory is spent on initial weights): peak memory is the final model plus one tensor.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from oss_jax import checkpoint, harmony, mxfp4, sharding
from oss_jax.checkpoint import CheckpointError, LazyTensor, Path_
from oss_jax.config import Config
from oss_jax.model import GptOss
from oss_jax.vocab import TokenMap

ORBAX_MARKER = "oss_jax.json"
ORBAX_FORMAT = "oss-jax/orbax"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


TINY_DIR = Path(__file__).parent / "tiny"  # the bundled model (oss_jax.train --ship installs it)


def tiny_snapshots() -> dict[int, Path]:
    """The bundled model's training snapshots: ``{step: checkpoint directory}`` (load each with ``load``)."""
    root = TINY_DIR / "snapshots"
    return {int(p.name.split("-")[1]): p for p in sorted(root.glob("step-*"))} if root.exists() else {}


def load(source: str | os.PathLike, dtype: str | jnp.dtype | None = None, experts: str = "auto",
         revision: str | None = None, progress: bool = False, mesh: Mesh | None = None) -> GptOss:
    """Load a gpt-oss model.

    Args:
      source: ``"tiny"`` (the bundled model, offline), a Hugging Face checkpoint directory (one
        or sharded safetensors, MXFP4 or dense experts), OpenAI's ``original/`` directory, a
        directory written by ``oss-jax convert``,
        or a hub repo id such as ``"openai/gpt-oss-20b"`` (downloaded with ``huggingface_hub``;
        ``HF_HUB_OFFLINE=1`` restricts it to the local cache).
      dtype: parameter dtype, ``"bfloat16"`` or ``"float32"``; default bfloat16, except float32
        for ``"tiny"`` (4M parameters: precision costs nothing there).
      experts: ``"auto"`` keeps MXFP4 experts packed (decoded on the fly) and dense ones dense;
        ``"dense"`` dequantizes packed experts to ``dtype`` at load; ``"packed"`` insists on MXFP4.
      revision: hub revision, for repo ids.
      progress: show a progress bar.
      mesh: a ``jax.sharding.Mesh`` (``oss_jax.sharding.make_mesh``): every parameter is created
        directly as a sharded array, each device's slice read from the file on its own
        (safetensors; a converted orbax checkpoint is restored one layer group at a time and
        sliced), and the model runs expert-parallel (``oss_jax.sharding``).

    Returns:
      A ``GptOss`` module: ``model(tokens [B, T] int32) -> logits [B, T, V] float32``.
    """
    if str(source) == "tiny" and not Path("tiny").exists():
        source = TINY_DIR / "model"
        if not (source / "config.json").exists():
            raise CheckpointError(f"the bundled tiny model is missing from {TINY_DIR} (train it: oss-jax train --ship)")
        dtype = dtype or "float32"
    dtype = _float_dtype(dtype or "bfloat16")
    if experts not in ("auto", "packed", "dense"):
        raise ValueError(f"experts must be 'auto', 'packed' or 'dense', got {experts!r}")
    path = resolve(source, revision)
    token_map = TokenMap.load(path)
    if token_map is not None and len(token_map) != _vocab_size(path):
        raise CheckpointError(f"{path}: vocab.json maps {len(token_map)} ids, the model has {_vocab_size(path)}")
    if (path / ORBAX_MARKER).exists():
        cfg, stored_packed, groups = open_orbax(path)
        tensors: Iterable[tuple[Path_, np.ndarray]] = read_orbax(path, groups)
        total = None
    else:
        src = checkpoint.open_checkpoint(path)
        cfg, stored_packed = src.config, src.mxfp4
        if mesh is None:
            tensors = (pa for name, arr in src.hf_tensors() for pa in checkpoint.to_params(cfg, name, arr))
        else:  # nothing is read here: each device's slice is read when its array is made
            tensors = (pa for name, t in src.lazy_tensors() for pa in checkpoint.to_lazy_params(cfg, name, t))
        total = len(src)
    if experts == "packed" and not stored_packed:
        raise CheckpointError(f"{path}: experts='packed' needs MXFP4 experts, this checkpoint stores them dense")
    packed = stored_packed and experts != "dense"
    if progress:
        tensors = _progress(tensors, total, f"loading {path.name}")
    model = build(cfg, tensors, packed=packed, stored_packed=stored_packed, dtype=dtype, mesh=mesh)
    model.token_map = token_map
    return model


def _vocab_size(path: Path) -> int | None:
    try:
        return int(json.loads((path / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # open_checkpoint reports a bad config properly


def save(model: GptOss, dst: str | os.PathLike, *, mxfp4: bool = True, float_dtype: str = "bfloat16",
         token_map: TokenMap | None = None, extra: dict | None = None) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory (``config.json``, ``model.safetensors``).

    The directory loads with ``oss_jax.load`` and with ``transformers.GptOssForCausalLM`` (whose
    vocabulary is then the model's own ids). Written to a temporary directory and renamed when
    complete, so an interrupted save leaves nothing that loads.

    Args:
      model: a model with dense experts (as trained).
      dst: the directory to (re)place.
      mxfp4: store the experts as MXFP4 blocks and scales (``mxfp4.encode``), as gpt-oss does.
      float_dtype: dtype of every other tensor (``"bfloat16"`` as gpt-oss, or ``"float32"``).
      token_map: a small model's vocabulary map, saved as ``vocab.json`` (default: the model's).
      extra: JSON-able notes stored in ``config.json`` under ``"oss_jax"``.
    """
    token_map = token_map if token_map is not None else model.token_map
    if model.layers[0].mlp.experts.packed:
        raise ValueError("save() writes models with dense experts (load with experts='dense')")
    np_dtype = np.dtype(_float_dtype(float_dtype))
    cfg = model.config.replace(quant_method="mxfp4" if mxfp4 else None)
    params = {tuple(path): np.asarray(var.get_value()) for path, var in nnx.iter_graph(model)
              if isinstance(var, nnx.Variable)}
    tensors = {name: (arr if arr.dtype == np.uint8 else arr.astype(np_dtype))
               for name, arr in checkpoint.from_params(cfg, params, mxfp4_experts=mxfp4)}
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = str(np_dtype)
    if cfg.vocab_size <= hf["eos_token_id"]:  # a small vocabulary: o200k's <|return|> is not an id of it
        hf["pad_token_id"] = None
        hf["eos_token_id"] = int(token_map.to_model([harmony.RETURN])[0]) if token_map is not None else None
    if extra:
        hf["oss_jax"] = extra
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with checkpoint.atomic_directory(dst) as tmp:
        checkpoint.write_safetensors(tmp / "model.safetensors", tensors)
        if token_map is not None:
            token_map.save(tmp)
        (tmp / "config.json").write_text(json.dumps(hf, indent=1))
    return dst


def build(cfg: Config, tensors: Iterable[tuple[Path_, np.ndarray | LazyTensor]], *, packed: bool,
          stored_packed: bool, dtype=jnp.bfloat16, mesh: Mesh | None = None) -> GptOss:
    """Fill an abstract ``GptOss`` from ``(parameter path, array)`` pairs, one at a time.

    Float arrays are cast to ``dtype``; packed expert bytes are kept, or decoded when
    ``stored_packed and not packed``. Every parameter must arrive exactly once. With a ``mesh``,
    each parameter becomes a sharded array made slice by slice (arrays may then be
    ``LazyTensor`` s, read only where a device needs them) and the model is sharded.
    """
    model = nnx.eval_shape(lambda: GptOss(cfg, packed=packed, dtype=dtype))
    targets = sharding.shardings(model, mesh) if mesh is not None else {}
    variables = {path: var for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Variable)}
    filled: set[Path_] = set()
    pending: dict[Path_, np.ndarray] = {}  # packed halves waiting for their partner (dense mode)

    def put(path: Path_, arr: np.ndarray) -> None:
        var = variables.get(path)
        if var is None:
            raise CheckpointError(f"no model parameter for {'.'.join(map(str, path))}")
        if path in filled:
            raise CheckpointError(f"parameter {'.'.join(map(str, path))} given twice")
        want = var.get_value()
        if tuple(arr.shape) != tuple(want.shape):
            raise CheckpointError(f"parameter {'.'.join(map(str, path))}: shape {arr.shape}, "
                                  f"expected {want.shape}")
        if mesh is not None:
            var.set_value(sharding.place(arr, targets[path], want.dtype))
            filled.add(path)
            return
        if want.dtype != arr.dtype:
            arr = arr.astype(want.dtype)
        var.set_value(jax.device_put(arr))
        filled.add(path)

    for path, arr in tensors:
        name = path[-1]
        if stored_packed and not packed and name in ("gate_up_blocks", "gate_up_scales",
                                                    "down_blocks", "down_scales"):
            proj, part = name.rsplit("_", 1)
            other = path[:-1] + (f"{proj}_{'scales' if part == 'blocks' else 'blocks'}",)
            if other not in pending:
                pending[path] = arr
                continue
            partner = pending.pop(other)
            blocks, scales = (arr, partner) if part == "blocks" else (partner, arr)
            dense = "gate_up_EDF2" if proj == "gate_up" else "down_EFD"
            if isinstance(blocks, LazyTensor):
                put(path[:-1] + (dense,), checkpoint.lazy_dequantized(blocks, scales, dtype))
                continue
            w = mxfp4.decode(blocks, scales, dtype)
            put(path[:-1] + (dense,), np.asarray(jnp.swapaxes(w, -1, -2)))
            continue
        put(path, arr)
    missing = [p for p in variables if p not in filled]
    if missing or pending:
        first = missing[0] if missing else next(iter(pending))
        raise CheckpointError(f"checkpoint has no value for parameter {'.'.join(map(str, first))}")
    return model if mesh is None else sharding.shard(model, mesh)


# -- sources -------------------------------------------------------------------------------------
def resolve(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory for ``source``: the path itself, or a hub snapshot for a repo id."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a checkpoint directory, got a file")
        return path
    text = str(source)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise CheckpointError(f"{text}: no such directory (and not a hub repo id like 'openai/gpt-oss-20b')")
    return download(text, revision)


def download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch a checkpoint's config and safetensors from the hub (or the cache when offline)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError("loading from the hub needs `pip install huggingface_hub`") from None
    try:
        snap = snapshot_download(repo_id, revision=revision,
                                 allow_patterns=["config.json", "vocab.json", "*.safetensors",
                                                 "*.safetensors.index.json"],
                                 ignore_patterns=["original/*", "metal/*"])
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{repo_id}: not in the local hub cache and downloads are off "
                              f"(HF_HUB_OFFLINE is set or the hub is unreachable)") from None
    except Exception as e:  # network, auth, missing repo: one line, no traceback
        raise CheckpointError(f"{repo_id}: download failed ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return Path(snap)


def open_orbax(path: Path) -> tuple[Config, bool, list[str]]:
    """Read and check the marker and config of a converted checkpoint."""
    try:
        meta = json.loads((path / ORBAX_MARKER).read_text())
        assert meta["format"] == ORBAX_FORMAT and isinstance(meta["groups"], list)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"{path / ORBAX_MARKER}: not an oss-jax checkpoint marker") from None
    try:
        cfg = Config.from_json(path)
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    for g in meta["groups"]:
        if not (path / "params" / g).is_dir():
            raise CheckpointError(f"{path / 'params' / g}: missing parameter group")
    return cfg, meta["experts"] == "mxfp4", meta["groups"]


def read_orbax(path: Path, groups: list[str]) -> Iterator[tuple[Path_, np.ndarray]]:
    """Yield ``(parameter path, numpy array)`` from a converted checkpoint, one group at a time."""
    import orbax.checkpoint as ocp

    ckpt = ocp.StandardCheckpointer()
    for g in groups:
        try:
            tree = ckpt.restore(path / "params" / g)
        except Exception as e:
            raise CheckpointError(f"{path / 'params' / g}: unreadable ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None
        prefix: Path_ = ("layers", int(g.split(".")[1])) if g.startswith("layers.") else (g,)
        for keys, arr in _flatten(tree):
            if keys == ("value",) and not prefix[0] == "layers":
                keys = ()
            yield prefix + keys, np.asarray(arr)
        del tree


def _flatten(tree: dict, prefix: Path_ = ()) -> Iterator[tuple[Path_, np.ndarray]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _float_dtype(dtype) -> jnp.dtype:
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r}") from None
    if dt not in (jnp.bfloat16, jnp.float32, jnp.float16):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dt}")
    return dt


def _progress(items: Iterable, total: int | None, desc: str) -> Iterable:
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit="tensor")

