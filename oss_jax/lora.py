"""LoRA: low-rank adapters on a frozen gpt-oss, its MXFP4 experts left packed (Hu et al. 2021).

An adapted projection ``y = x @ W`` computes ``y = x @ W + (alpha / r) * (x @ A) @ B`` with
``A [in, r]`` random and ``B [r, out]`` zero at the start, so a freshly adapted model computes what the
base model does. Only ``A`` and ``B`` (:class:`Adapter` parameters) are trained; ``W`` stays frozen.

Targets (``LoraConfig.targets``):

- ``"q"``, ``"k"``, ``"v"``, ``"o"`` (``"attn"``: all four): the attention projections
  (:class:`AttentionLora`, on ``Attention.lora``).
- ``"experts"``: every expert's ``gate_up`` and ``down`` projections, one pair per expert:
  ``A1 [E, D, r]``, ``B1 [E, r, 2F]``, ``A2 [E, F, r]``, ``B2 [E, r, D]`` (:class:`ExpertsLora`, on
  ``Experts.lora``). The update is added inside whichever path runs: ``Experts.reference`` and
  ``Experts.ffn``, the step of every fast dispatch loop (gather, sorted, scan) and of expert
  parallelism, and ``Experts.grouped`` (the ragged dispatch, adapters as ``ragged_dot`` too). The
  experts' weights are not touched: MXFP4 experts stay packed bytes (not parameters), decoded one
  expert at a time as in inference (all of them at once, transiently, by ragged), and gradients reach
  the adapters through the decoded matmuls. No dense copy of the experts is kept.
- ``"router"``: the router's logits (:class:`RouterLora`, on ``MoE.lora``).

A model without adapters has ``lora = None`` on those modules: nothing is traced, and its compiled
programs are those of the unadapted code.

    model = oss_jax.load("tiny")
    lora.add(model, LoraConfig(rank=8, alpha=16, targets=("attn", "experts")))
    graphdef, adapters, frozen = nnx.split(model, lora.Adapter, ...)   # train `adapters` only
    lora.save_adapters(model, "runs/ft/adapters")                      # safetensors + config, atomic
    merged = lora.merge(model)                     # plain dense weights, no adapters
    oss_jax.save(merged, "runs/ft/merged", mxfp4=False)                 # transformers loads it

Shape letters: the legend in ``oss_jax/model.py``; here also ``r``, the rank.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oss_jax import checkpoint, params_map, sharding
from oss_jax.checkpoint import CheckpointError
from oss_jax.config import Config
from oss_jax.kernels.experts import row
from oss_jax.load import build
from oss_jax.model import GptOss

f32 = jnp.float32
TARGETS = ("q", "k", "v", "o", "experts", "router")
GROUPS = {"attn": ("q", "k", "v", "o")}
ATTENTION = GROUPS["attn"]
CONFIG_FILE, TENSORS_FILE = "adapter_config.json", "adapters.safetensors"
FORMAT = "oss-jax/lora"


class Adapter(nnx.Param):
    """A LoRA matrix (``A`` or ``B``): the only trainable state of an adapted model."""


def parse_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """``"attn,experts"`` or ``("q", "v")`` -> the targets in ``TARGETS`` order (``attn`` = q, k, v, o);
    a one-line ValueError naming an unknown one."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    chosen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or name not in (*TARGETS, *GROUPS):
            raise ValueError(f"unknown LoRA target {name!r} (use {', '.join([*GROUPS, *TARGETS])})")
        chosen.update(GROUPS.get(name, (name,)))
    if not chosen:
        raise ValueError("LoRA needs at least one target (attn, experts, router, or q/k/v/o)")
    return tuple(t for t in TARGETS if t in chosen)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank ``r``, ``alpha`` (the update is scaled by ``alpha / r``), targets, and the seed of ``A``'s init."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ATTENTION
    seed: int = 0

    def __post_init__(self) -> None:
        for name, least in (("rank", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"LoraConfig.{name} must be an integer >= {least}, got {value!r}")
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"LoraConfig.alpha must be a finite number > 0, got {alpha!r}")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "targets", parse_targets(self.targets))

    @property
    def scale(self) -> float:
        """``alpha / rank``: the factor of every update."""
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), "seed": self.seed}


def _normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> Adapter:
    """``A``: normal with std ``1/sqrt(fan_in)``, so ``x @ A`` keeps the scale of ``x``."""
    return Adapter(jnp.asarray(rng.standard_normal(shape, np.float32) / np.sqrt(fan_in, dtype=np.float32)))


def _zeros(shape: tuple[int, ...]) -> Adapter:
    return Adapter(jnp.zeros(shape, f32))


def _update(x: jax.Array, A: jax.Array, B: jax.Array, scale: float) -> jax.Array:
    """``scale * (x @ A) @ B`` in float32 over the last ``A.ndim - 1`` axes of ``x`` (``A [*in, r]``,
    ``B [r, *out]``) -> ``[*x.shape[:-len(in)], *out]`` in ``x``'s dtype."""
    n_in = A.ndim - 1
    lead = x.shape[:x.ndim - n_in]
    x2 = x.reshape(*lead, -1).astype(f32)
    y = (x2 @ A.reshape(-1, A.shape[-1])) @ B.reshape(B.shape[0], -1)
    return (scale * y).reshape(*lead, *B.shape[1:]).astype(x.dtype)


# Parameter names of each attention target: (A, B); the letters are the axes.
ATTENTION_NAMES = {"q": ("q_A_Dr", "q_B_rNH"), "k": ("k_A_Dr", "k_B_rKH"), "v": ("v_A_Dr", "v_B_rKH"),
                   "o": ("o_A_NHr", "o_B_rD")}
# Which attention weight each target updates (merge).
ATTENTION_WEIGHTS = {"q": "wq_DNH", "k": "wk_DKH", "v": "wv_DKH", "o": "wo_NHD"}


class AttentionLora(nnx.Module):
    """Adapters of one attention layer: for each target ``t`` of q, k, v, o, ``t_A [*in, r]`` and
    ``t_B [r, *out]`` in the weight's own axes (``q_A_Dr``, ``q_B_rNH``; ``o_A_NHr``, ``o_B_rD``)."""

    def __init__(self, cfg: Config, lc: LoraConfig, rng: np.random.Generator):
        D, N, K, H, r = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, lc.rank
        ins = {"q": (D,), "k": (D,), "v": (D,), "o": (N, H)}
        outs = {"q": (N, H), "k": (K, H), "v": (K, H), "o": (D,)}
        self.config = lc
        for t in ATTENTION:
            if t in lc.targets:
                a, b = ATTENTION_NAMES[t]
                setattr(self, a, _normal(rng, (*ins[t], r), math.prod(ins[t])))
                setattr(self, b, _zeros((r, *outs[t])))

    def add(self, target: str, x: jax.Array, y: jax.Array) -> jax.Array:
        """``y + scale * x A B`` when ``target`` is adapted, else ``y``: x ``[B, T, *in]``, y ``[B, T, *out]``."""
        if target not in self.config.targets:
            return y
        a, b = ATTENTION_NAMES[target]
        return y + _update(x, getattr(self, a)[...], getattr(self, b)[...], self.config.scale).astype(y.dtype)


class RouterLora(nnx.Module):
    """The router's adapter: ``A_Dr``, ``B_rE``; called on ``x [B, T, D]`` it gives the logit update ``[B, T, E]``."""

    def __init__(self, cfg: Config, lc: LoraConfig, rng: np.random.Generator):
        D, E, r = cfg.hidden_size, cfg.num_experts, lc.rank
        self.config = lc
        self.A_Dr = _normal(rng, (D, r), D)
        self.B_rE = _zeros((r, E))

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        return _update(x_BTD.astype(f32), self.A_Dr[...], self.B_rE[...], self.config.scale)


class ExpertsLora(nnx.Module):
    """Per-expert adapters: ``h += scale * x A1[e] B1[e]`` (``A1_EDr``, ``B1_ErF2``) and ``y += scale *
    swiglu(h) A2[e] B2[e]`` (``A2_EFr``, ``B2_ErD``), for the expert ``e`` that runs (``Experts.ffn``), for
    rows grouped by expert (``sizes``: ``Experts.grouped``, each product a ``ragged_dot``), or for every
    expert at once (``Experts.reference``)."""

    def __init__(self, cfg: Config, lc: LoraConfig, rng: np.random.Generator):
        E, D, F, r = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, lc.rank
        self.config = lc
        self.A1_EDr = _normal(rng, (E, D, r), D)
        self.B1_ErF2 = _zeros((E, r, 2 * F))
        self.A2_EFr = _normal(rng, (E, F, r), F)
        self.B2_ErD = _zeros((E, r, D))

    def gate_up(self, x: jax.Array, e: jax.Array | None = None, sizes: jax.Array | None = None) -> jax.Array:
        """The update of ``h``: rows ``x [R, D]`` of expert ``e`` -> ``[R, 2F]``; ``sizes [E]``: rows ``x [P, D]``
        sorted by expert, ``sizes[e]`` of expert ``e`` -> ``[P, 2F]``; neither: every expert, ``x [X, D]`` ->
        ``[X, E, 2F]``. In ``x``'s dtype."""
        return self._per_expert(x, self.A1_EDr[...], self.B1_ErF2[...], e, sizes)

    def down(self, s: jax.Array, e: jax.Array | None = None, sizes: jax.Array | None = None) -> jax.Array:
        """The update of ``y``: ``swiglu(h)`` rows ``s [R, F]`` of expert ``e`` -> ``[R, D]``; ``sizes``: rows
        ``s [P, F]`` grouped as in :meth:`gate_up`; neither: ``s [X, E, F]`` -> ``[X, E, D]``."""
        return self._per_expert(s, self.A2_EFr[...], self.B2_ErD[...], e, sizes)

    def _per_expert(self, x: jax.Array, A_EIr: jax.Array, B_ErO: jax.Array, e: jax.Array | None,
                    sizes: jax.Array | None = None) -> jax.Array:
        scale = self.config.scale
        if sizes is not None and jax.default_backend() == "cpu":  # float32, as _update
            # XLA's CPU backend runs ragged_dot as a dense product over every expert, with a [P, E, O]
            # temporary per call (1.5 GiB more for a 20b LoRA step). The same sums: x times every expert's A
            # ([P, E*r], small), each row keeping its own expert's r columns, times every expert's B stacked.
            P, (E, I, r) = x.shape[0], A_EIr.shape
            e_P = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(P), side="right")  # E: a row in no group
            u_PEr = (x.astype(f32) @ jnp.moveaxis(A_EIr.astype(f32), 0, 1).reshape(I, E * r)).reshape(P, E, r)
            u_PEr = jnp.where((e_P[:, None] == jnp.arange(E))[:, :, None], u_PEr, 0.0)
            return (scale * (u_PEr.reshape(P, E * r) @ B_ErO.astype(f32).reshape(E * r, -1))).astype(x.dtype)
        if sizes is not None:  # float32, as _update
            u_Pr = jax.lax.ragged_dot(x.astype(f32), A_EIr.astype(f32), sizes)
            return (scale * jax.lax.ragged_dot(u_Pr, B_ErO.astype(f32), sizes)).astype(x.dtype)
        if e is not None:
            return _update(x, row(A_EIr, e), row(B_ErO, e), scale)
        if x.ndim == 2:  # the same rows for every expert
            u_XEr = jnp.einsum("xi,eir->xer", x.astype(f32), A_EIr)
        else:
            u_XEr = jnp.einsum("xei,eir->xer", x.astype(f32), A_EIr)
        return (scale * jnp.einsum("xer,ero->xeo", u_XEr, B_ErO)).astype(x.dtype)


# -- adding, finding, removing ---------------------------------------------------------------------
def add(model: GptOss, lc: LoraConfig = LoraConfig()) -> GptOss:
    """Give ``model`` fresh adapters (``B = 0``: it computes what it did) on ``lc.targets``, in place; returns it.

    ``A`` is drawn from ``lc.seed`` (numpy, the same on every machine). A sharded model gets its adapters
    sharded like the weights they adapt (``oss_jax.sharding``). Refuses a model that already has adapters.
    """
    if not isinstance(lc, LoraConfig):
        raise TypeError(f"lora.add needs a LoraConfig, got {type(lc).__name__}")
    if config(model) is not None:
        raise ValueError("this model already has LoRA adapters (lora.remove or lora.merge it first)")
    cfg = model.config
    for i, block in enumerate(model.layers):
        rng = np.random.default_rng([lc.seed, i])
        if any(t in lc.targets for t in ATTENTION):
            block.attn.lora = AttentionLora(cfg, lc, rng)
        if "router" in lc.targets:
            block.mlp.lora = RouterLora(cfg, lc, rng)
        if "experts" in lc.targets:
            block.mlp.experts.lora = ExpertsLora(cfg, lc, rng)
    mesh = sharding.mesh_of(model)
    if mesh is not None:
        sharding.shard(model, mesh)
    return model


def _adapted(model: GptOss) -> list[nnx.Module]:
    """Every module of ``model`` that holds adapters."""
    found = []
    for block in model.layers:
        for module in (block.attn, block.mlp, block.mlp.experts):
            if module.lora is not None:
                found.append(module)
    return found


def config(model: GptOss) -> LoraConfig | None:
    """The ``LoraConfig`` of ``model``'s adapters, or None when it has none."""
    found = _adapted(model)
    return found[0].lora.config if found else None


def remove(model: GptOss) -> GptOss:
    """Drop every adapter of ``model`` (in place; returns it): the base model again."""
    for module in _adapted(model):
        module.lora = None
    return model


def trainable(model: GptOss) -> nnx.State:
    """The adapters of ``model`` (an ``nnx.State`` of :class:`Adapter` s): what a fine-tuning run trains.
    Split a model into them and the frozen rest with ``nnx.split(model, lora.Adapter, ...)``."""
    return nnx.state(model, Adapter)


def _named(model: GptOss) -> dict[str, nnx.Variable]:
    """Every adapter variable by its dotted path (``layers.0.attn.lora.q_A_Dr``)."""
    return {".".join(map(str, path)): var for path, var in nnx.iter_graph(model) if isinstance(var, Adapter)}


# -- saving and loading adapters -------------------------------------------------------------------
def save_adapters(model: GptOss, dst: str | os.PathLike) -> Path:
    """Write ``model``'s adapters to the directory ``dst``: ``adapters.safetensors`` (float32) and
    ``adapter_config.json`` (the ``LoraConfig`` and the base model's shape).

    Atomic (a temporary directory renamed into place). ``dst`` may be missing, empty, or an earlier
    ``save_adapters`` output (replaced); anything else raises ``CheckpointError`` and is left untouched.
    """
    lc = config(model)
    if lc is None:
        raise ValueError("this model has no LoRA adapters to save (lora.add first)")
    dst = Path(dst)
    writes = (CONFIG_FILE, TENSORS_FILE)

    def earlier(path: Path) -> str | None:
        other = [p for p in path.iterdir() if p.name not in writes or p.is_symlink() or not p.is_file()]
        return f"save_adapters writes only {', '.join(writes)}" if other else None

    def check(path: Path) -> None:
        checkpoint.check_destination(path, overwrite=True, ours=earlier, what="adapters written by save_adapters")

    checkpoint.remove_stale_temporaries(dst)
    check(dst)
    tensors = {name: np.asarray(var.get_value(), np.float32) for name, var in sorted(_named(model).items())}
    body = {"format": FORMAT, "lora": lc.to_dict(), "base": base_shape(model.config)}
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with checkpoint.atomic_directory(dst, check=check) as tmp:
            checkpoint.write_safetensors(tmp / TENSORS_FILE, tensors, metadata={"format": FORMAT})
            (tmp / CONFIG_FILE).write_text(json.dumps(body, indent=1))
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot write ({e.strerror or e})") from None
    return dst


def base_shape(cfg: Config) -> dict[str, int]:
    """The sizes of a base model that adapters depend on."""
    return {k: getattr(cfg, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_experts",
                                         "num_attention_heads", "num_key_value_heads", "head_dim")}


def read_config(src: str | os.PathLike) -> LoraConfig:
    """The ``LoraConfig`` saved in an adapters directory; a one-line ``CheckpointError`` naming the file."""
    path = Path(src) / CONFIG_FILE
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{Path(src)}: not an adapters directory (no {CONFIG_FILE})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({checkpoint.os_reason(e)})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not valid JSON") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT or not isinstance(body.get("lora"), dict):
        raise CheckpointError(f"{path}: not an oss-jax LoRA adapter config (format {FORMAT!r})")
    try:
        return LoraConfig(**body["lora"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_adapters(model: GptOss, src: str | os.PathLike) -> GptOss:
    """Put the adapters saved in ``src`` (by ``save_adapters``) into ``model``, in place; returns it.

    A model without adapters gets them (with the saved ``LoraConfig``); one with adapters must have the
    same configuration. Every tensor is checked (name, shape, finite values) before the model changes:
    a problem is one ``CheckpointError`` naming the file and tensor, and leaves ``model`` as it was.
    """
    src = Path(src)
    lc = read_config(src)
    had = config(model)
    if had is not None and had != lc:
        raise CheckpointError(f"{src / CONFIG_FILE}: adapters of {lc}, the model has adapters of {had}")
    path = src / TENSORS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    header = checkpoint.read_header(path)
    if had is None:
        add(model, lc)
    try:
        expected = _named(model)
        for name in header:
            if name not in expected:
                raise CheckpointError(f"{path}: unexpected tensor {name!r} (not an adapter of this model)")
        values = {}
        for name, var in expected.items():
            if name not in header:
                raise CheckpointError(f"{path}: missing tensor {name!r}")
            info = header[name]
            want = tuple(var.get_value().shape)
            if info.shape != want:
                raise CheckpointError(f"{path}: tensor {name!r} has shape {list(info.shape)}, expected {list(want)} "
                                      f"for this model")
            if info.dtype not in ("F32", "BF16", "F16"):
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {info.dtype}, expected F32")
            values[name] = checkpoint.read_tensor(info).astype(np.float32)
    except BaseException:
        if had is None:
            remove(model)
        raise
    for name, var in expected.items():
        old = var.get_value()
        var.set_value(jax.device_put(values[name], getattr(old, "sharding", None)))
    return model


# -- merging ---------------------------------------------------------------------------------------
def updates(model: GptOss) -> dict[tuple, Callable[[], np.ndarray]]:
    """``{weight path: () -> (alpha / r) A @ B}`` (float32, in the weight's layout) for every adapted weight.

    Each update is computed when called: an expert projection's is as large as the dense weight.
    """
    out: dict[tuple, Callable[[], np.ndarray]] = {}

    def product(A: nnx.Variable, B: nnx.Variable, scale: float, how: str = "weight") -> Callable[[], np.ndarray]:
        """``how``: "weight" (``A [*in, r] @ B [r, *out]`` -> ``[*in, *out]``), "transposed" (its transpose) or
        "experts" (``A [E, I, r] @ B [E, r, O]`` -> ``[E, I, O]``)."""
        def compute() -> np.ndarray:
            a, b = np.asarray(A[...], np.float32), np.asarray(B[...], np.float32)
            if how == "experts":
                return scale * (a @ b)
            d = scale * (a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1))
            return d.T if how == "transposed" else d.reshape(*a.shape[:-1], *b.shape[1:])
        return compute

    for i, block in enumerate(model.layers):
        attn, router, ex = block.attn.lora, block.mlp.lora, block.mlp.experts.lora
        if attn is not None:
            for t in attn.config.targets:
                if t in ATTENTION:
                    a, b = ATTENTION_NAMES[t]
                    out["layers", i, "attn", ATTENTION_WEIGHTS[t]] = product(getattr(attn, a), getattr(attn, b),
                                                                            attn.config.scale)
        if router is not None:  # the router weight is [E, D]: the update's transpose
            out["layers", i, "mlp", "router_ED"] = product(router.A_Dr, router.B_rE, router.config.scale, "transposed")
        if ex is not None:
            where = ("layers", i, "mlp", "experts")
            out[(*where, "gate_up_EDF2")] = product(ex.A1_EDr, ex.B1_ErF2, ex.config.scale, "experts")
            out[(*where, "down_EFD")] = product(ex.A2_EFr, ex.B2_ErD, ex.config.scale, "experts")
    return out


def merge(model: GptOss, dtype: str | jnp.dtype | None = None) -> GptOss:
    """A new plain model (no adapters, dense experts) whose weights include the updates:
    ``W + (alpha / r) A @ B``, summed in float32 and stored in ``dtype`` (default: ``model``'s; a small
    update is partly rounded away in bfloat16, so pass ``"float32"`` to keep it whole). ``model`` is not changed.

    MXFP4 experts are decoded first (a merged expert is no longer exactly MXFP4), so
    ``oss_jax.save(merged, dst, mxfp4=False)`` writes a checkpoint that ``oss_jax.load`` and transformers
    load with the adapted model's logits (``mxfp4=True`` would quantize the merged experts again).
    Built on the host one tensor at a time (memory: the merged model plus one float32 weight and its
    update); a sharded model gives an unsharded one.
    """
    dtype = jnp.dtype(dtype or model.embed_VD.get_value().dtype)
    pending = updates(model)

    def tensors() -> Iterable[tuple[tuple, np.ndarray]]:
        base = ((tuple(path), np.asarray(var.get_value())) for path, var in nnx.iter_graph(model)
                if isinstance(var, nnx.Variable) and not isinstance(var, Adapter))
        for path, arr in params_map.dense_experts(base, np.float32):
            if path in pending:
                arr = np.asarray(arr, np.float32) + pending.pop(path)()
            yield path, arr  # build casts to dtype

    merged = build(model.config, tensors(), packed=False, dtype=dtype)
    if pending:  # pragma: no cover - an adapter whose weight the model does not have
        raise RuntimeError(f"lora.merge: no weight {'.'.join(map(str, next(iter(pending))))} to update")
    merged.token_map = model.token_map
    return merged
