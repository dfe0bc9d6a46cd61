"""``oss_jax.load``: a model from a checkpoint directory, a converted orbax checkpoint, or the hub.

Every source is read one tensor at a time into an abstract model (built with ``nnx.eval_shape``,
so no memory is spent on initial weights): peak memory is the final model plus one tensor.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from oss_jax import checkpoint, harmony, params_map, sharding
from oss_jax.checkpoint import CheckpointError, LazyTensor
from oss_jax.config import Config
from oss_jax.model import GptOss
from oss_jax.orbax_format import ORBAX_FORMAT as ORBAX_FORMAT  # importable from here, as before the move
from oss_jax.orbax_format import ORBAX_MARKER, open_orbax, read_orbax
from oss_jax.params_map import Path_
from oss_jax.vocab import TokenMap

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


TINY_DIR = Path(__file__).parent / "tiny"  # the bundled model (oss_jax.train --ship installs it)
# The bundled models by name: the tiny model and its two twins for the course, trained on the same recipe
# and data (``oss-jax train --twin dense|nosink --ship``): the dense twin (one FFN with the tiny model's
# active parameters per token) and the no-sink twin (no learned attention sinks). Each folder holds model/,
# the training log and the evaluation; the twins have no snapshots (the three share 20 MB).
BUNDLED = {"tiny": TINY_DIR, "tiny-dense": Path(__file__).parent / "tiny_dense",
           "tiny-nosink": Path(__file__).parent / "tiny_nosink"}


def tiny_snapshots() -> dict[int, Path]:
    """The bundled model's training snapshots: ``{step: checkpoint directory}`` (load each with ``load``)."""
    root = TINY_DIR / "snapshots"
    return {int(p.name.split("-")[1]): p for p in sorted(root.glob("step-*"))} if root.exists() else {}


def load(source: str | os.PathLike, dtype: str | jnp.dtype | None = None, experts: str = "auto",
         revision: str | None = None, progress: bool = False, mesh: Mesh | None = None) -> GptOss:
    """Load a gpt-oss model.

    Args:
      source: ``"tiny"`` (the bundled model, offline; ``"tiny-dense"`` and ``"tiny-nosink"`` its twins,
        ``BUNDLED``), a Hugging Face checkpoint directory (one
        or sharded safetensors, MXFP4 or dense experts), OpenAI's ``original/`` directory, a
        directory written by ``oss-jax convert``,
        or a hub repo id such as ``"openai/gpt-oss-20b"`` (downloaded with ``huggingface_hub``;
        ``HF_HUB_OFFLINE=1`` restricts it to the local cache). Paths may be relative to the
        current directory. The string ``"tiny"`` always means the bundled model, even where a
        file or folder ``tiny`` exists: write ``"./tiny"`` (or pass a ``Path``) for that one (the
        same for the twins' names).
      dtype: parameter dtype, ``"bfloat16"`` or ``"float32"``; default bfloat16, except float32
        for the bundled models (4M parameters: precision costs nothing there).
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
    if isinstance(source, str) and source in BUNDLED:  # a bundled model; ./tiny is a local directory
        name, source = source, BUNDLED[source] / "model"
        if not (source / "config.json").exists():
            how = "oss-jax train --ship" if name == "tiny" else f"oss-jax train --twin {name[5:]} --ship"
            raise CheckpointError(f"the bundled model {name!r} is missing from {BUNDLED[name]} (train it: {how})")
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
        tensors: Iterable[tuple[Path_, np.ndarray | LazyTensor]] = read_orbax(path, groups)
        total = None
    else:
        src = checkpoint.open_checkpoint(path)
        cfg, stored_packed = src.config, src.mxfp4
        # with a mesh nothing is read here: each device's slice is read when its array is made
        tensors, total = src.params(lazy=mesh is not None), len(src)
    if experts == "packed" and not stored_packed:
        raise CheckpointError(f"{path}: experts='packed' needs MXFP4 experts, this checkpoint stores them dense")
    packed = stored_packed and experts != "dense"
    if progress:
        tensors = _progress(tensors, total, f"loading {path.name}")
    if stored_packed and not packed:
        tensors = params_map.dense_experts(tensors, dtype)
    model = build(cfg, tensors, packed=packed, dtype=dtype, mesh=mesh)
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
      dst: the directory to write: missing, empty, or an earlier save (holding only ``config.json``,
        ``model.safetensors`` and ``vocab.json`` files), which is replaced. Anything else (a file,
        a directory with other contents) raises ``CheckpointError`` and is left untouched.
      mxfp4: store the experts as MXFP4 blocks and scales (``mxfp4.encode``), as gpt-oss does.
      float_dtype: dtype of every other tensor (``"bfloat16"`` as gpt-oss, or ``"float32"``).
      token_map: a small model's vocabulary map, saved as ``vocab.json`` (default: the model's).
      extra: JSON-able notes stored in ``config.json`` under ``"oss_jax"``.
    """
    token_map = token_map if token_map is not None else model.token_map
    if any(getattr(module, "lora", None) is not None for _, module in nnx.iter_modules(model)):
        raise ValueError("save() writes plain models: this one has LoRA adapters (save lora.merge(model), or "
                         "the adapters alone with lora.save_adapters)")
    if model.layers[0].mlp.experts.packed:
        raise ValueError("save() writes models with dense experts (load with experts='dense')")
    for i, block in enumerate(model.layers):  # prune.mask_experts: load would refuse the -inf it wrote
        if not np.isfinite(np.asarray(block.mlp.router_bias_E[...], np.float32)).all():
            raise ValueError(f"save() writes plain models: layer {i}'s router bias has -inf (experts masked by "
                             "prune.mask_experts); save prune.prune_experts(model, drop) instead")
    dst = Path(dst)
    writes = ("config.json", "model.safetensors", "vocab.json")

    def earlier_save(path: Path) -> str | None:
        other = [p for p in path.iterdir() if p.name not in writes or p.is_symlink() or not p.is_file()]
        return f"save writes only {', '.join(writes)}" if other else None

    def check(path: Path) -> None:
        checkpoint.check_destination(path, overwrite=True, ours=earlier_save, what="a checkpoint written by save")

    checkpoint.remove_stale_temporaries(dst)
    check(dst)
    np_dtype = np.dtype(_float_dtype(float_dtype))
    cfg = model.config.replace(quant_method="mxfp4" if mxfp4 else None)
    params = {tuple(path): np.asarray(var.get_value()) for path, var in nnx.iter_graph(model)
              if isinstance(var, nnx.Variable)}
    tensors = {name: (arr if arr.dtype == np.uint8 else arr.astype(np_dtype))
               for name, arr in params_map.from_params(cfg, params, mxfp4_experts=mxfp4)}
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = str(np_dtype)
    if cfg.vocab_size <= hf["eos_token_id"]:  # a small vocabulary: o200k's <|return|> is not an id of it
        hf["pad_token_id"] = None
        hf["eos_token_id"] = int(token_map.to_model([harmony.RETURN])[0]) if token_map is not None else None
    if extra:
        hf["oss_jax"] = extra
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with checkpoint.atomic_directory(dst, check=check) as tmp:
            checkpoint.write_safetensors(tmp / "model.safetensors", tensors)
            if token_map is not None:
                token_map.save(tmp)
            (tmp / "config.json").write_text(json.dumps(hf, indent=1))
    except (OSError, CheckpointError) as e:  # a full disk: one line naming the destination
        cause = e if isinstance(e, OSError) else e.__cause__  # write_safetensors chains the OSError
        if not isinstance(cause, OSError):
            raise
        raise CheckpointError(f"{dst}: cannot write ({cause.strerror or cause})") from None
    return dst


def build(cfg: Config, tensors: Iterable[tuple[Path_, np.ndarray | LazyTensor]], *, packed: bool,
          dtype=jnp.bfloat16, mesh: Mesh | None = None) -> GptOss:
    """Fill an abstract ``GptOss`` from ``(parameter path, array)`` pairs, one at a time.

    Float arrays are cast to ``dtype``; with ``packed`` the experts are MXFP4 bytes (kept as they
    are), else dense (``params_map.dense_experts`` decodes packed ones on the way). Every parameter
    must arrive exactly once. With a ``mesh``,
    each parameter becomes a sharded array made slice by slice (arrays may then be
    ``LazyTensor`` s, read only where a device needs them) and the model is sharded.
    """
    model = nnx.eval_shape(lambda: GptOss(cfg, packed=packed, dtype=dtype))
    targets = sharding.shardings(model, mesh) if mesh is not None else {}
    variables = {path: var for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Variable)}
    filled: set[Path_] = set()

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
        put(path, arr)
    missing = [p for p in variables if p not in filled]
    if missing:
        raise CheckpointError(f"checkpoint has no value for parameter {'.'.join(map(str, missing[0]))}")
    return model if mesh is None else sharding.shard(model, mesh)


# -- sources -------------------------------------------------------------------------------------
def resolve(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory for ``source``, absolute: the path itself, or a hub snapshot for a repo id.

    A relative path is taken from the current directory (``Path.absolute``: symlinks are kept as written).
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a checkpoint directory, got a file")
        return path.absolute()
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

