"""The table from checkpoint tensor names to model parameters (SPEC.md §4), kept apart from the model.

Each Hugging Face tensor name maps to a parameter path and a layout: the stored tensor's axes and,
after ``->``, the parameter's, in the shape letters of ``oss_jax/model.py``. ``"N*H D -> D N H"`` is
q_proj: stored ``[N*H, D]`` (head-major rows), the parameter ``wq_DNH``. A layout without ``->`` is
stored as the parameter is. OpenAI's ``original/`` names map to HF names; its fused ``qkv`` splits by
rows into q, k and v. The one table drives:

* ``to_params``: a stored tensor as its parameter, whole (an array) or slice by slice (a
  ``checkpoint.LazyTensor``, read only where a device needs it: sharded loading); the converter
  and ``load`` both go through it;
* ``from_params``: the parameters as HF tensors (``save``);
* ``hf_shapes`` / ``openai_shapes``: what a checkpoint must hold (``checkpoint.open_checkpoint``).

MXFP4 experts are stored as ``*_blocks`` and ``*_scales``; ``dequantize`` turns such a pair into the
dense ``[E, in, out]`` parameter, ``mxfp4.encode`` goes back (``from_params``).

This module reads no files: a tensor here is a numpy array or a lazy tensor (anything with the
``LazyTensor`` interface: ``shape``, ``dtype``, ``t[index]`` and ``t.derive``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from oss_jax import mxfp4
from oss_jax.config import Config
from oss_jax.kernels import mxfp4 as fast_mxfp4

Path_ = tuple[str | int, ...]
Index = tuple[slice, ...]
Tensor = Any  # a numpy array, or a checkpoint.LazyTensor (read when indexed)
FLOAT = ("BF16", "F16", "F32")  # safetensors dtypes a float tensor may have


@dataclass(frozen=True)
class Entry:
    """One stored tensor: its parameter's path and the layout between them.

    ``layout`` is ``"stored axes -> parameter axes"``; an axis ``A*B`` holds ``A`` groups of ``B``
    values (``N*H``: N heads of H), split into two in the parameter. ``experts`` marks tensors that
    exist only when a checkpoint stores its experts that way.
    """

    path: Path_
    layout: str
    experts: str | None = None  # "packed" (MXFP4 blocks and scales) or "dense"

    @property
    def axes(self) -> tuple[list[str], list[str]]:
        """The stored tensor's axes and the parameter's (letters)."""
        stored, _, param = self.layout.partition(" -> ")
        return stored.split(), (param or stored).split()

    def shape(self, n: dict[str, int]) -> tuple[int, ...]:
        """The stored shape, for the dimension sizes ``n`` (``sizes``)."""
        return tuple(math.prod(n[c] for c in axis.split("*")) for axis in self.axes[0])

    def read(self, n: dict[str, int], src: Tensor, ix: Index) -> np.ndarray:
        """The parameter's rectangle ``ix`` (a slice per parameter axis) from the stored tensor ``src``.

        A slice of heads reads the rows of those whole heads; the head-dim slice is taken in memory.
        """
        stored, param = self.axes
        at = dict(zip(param, ix, strict=True))  # parameter axis -> its slice
        rows, split, keep = [], [], []
        for axis in stored:
            outer, *inner = axis.split("*")
            if inner:  # A*B: rows of whole groups A, then the slice of B
                (b,) = inner
                rows.append(slice(at[outer].start * n[b], at[outer].stop * n[b]))
                split += [at[outer].stop - at[outer].start, n[b]]
                keep += [slice(None), at[b]]
            else:
                rows.append(at[outer])
                split.append(at[outer].stop - at[outer].start)
                keep.append(slice(None))
        letters = [c for axis in stored for c in axis.split("*")]
        region = src[tuple(rows)].reshape(split)[tuple(keep)]
        return region.transpose([letters.index(c) for c in param])

    def write(self, n: dict[str, int], value: np.ndarray) -> np.ndarray:
        """The stored tensor of a parameter ``value`` (the inverse of ``read`` over the whole tensor)."""
        stored, param = self.axes
        letters = [c for axis in stored for c in axis.split("*")]
        return np.transpose(value, [param.index(c) for c in letters]).reshape(self.shape(n))


# -- the table --------------------------------------------------------------------------------------
# HF name -> parameter path, layout. In file order (hf_shapes, save and random checkpoints use it).
TOP = {
    "model.embed_tokens.weight": Entry(("embed_VD",), "V D"),
    "model.norm.weight": Entry(("norm", "scale"), "D"),
    "lm_head.weight": Entry(("unembed_VD",), "V D"),
}
# Per layer: "model.layers.{i}." + name -> ("layers", i) + path.
LAYER = {
    "input_layernorm.weight": Entry(("attn_norm", "scale"), "D"),
    "post_attention_layernorm.weight": Entry(("mlp_norm", "scale"), "D"),
    "self_attn.q_proj.weight": Entry(("attn", "wq_DNH"), "N*H D -> D N H"),
    "self_attn.q_proj.bias": Entry(("attn", "bq_NH"), "N*H -> N H"),
    "self_attn.k_proj.weight": Entry(("attn", "wk_DKH"), "K*H D -> D K H"),
    "self_attn.k_proj.bias": Entry(("attn", "bk_KH"), "K*H -> K H"),
    "self_attn.v_proj.weight": Entry(("attn", "wv_DKH"), "K*H D -> D K H"),
    "self_attn.v_proj.bias": Entry(("attn", "bv_KH"), "K*H -> K H"),
    "self_attn.o_proj.weight": Entry(("attn", "wo_NHD"), "D N*H -> N H D"),
    "self_attn.o_proj.bias": Entry(("attn", "bo_D"), "D"),
    "self_attn.sinks": Entry(("attn", "sinks_N"), "N"),
    "mlp.router.weight": Entry(("mlp", "router_ED"), "E D"),
    "mlp.router.bias": Entry(("mlp", "router_bias_E"), "E"),
    "mlp.experts.gate_up_proj_bias": Entry(("mlp", "experts", "gate_up_bias_EF2"), "E F2"),
    "mlp.experts.down_proj_bias": Entry(("mlp", "experts", "down_bias_ED"), "E D"),
    # MXFP4: blocks [E, out, in/32, 16] and scales [E, out, in/32] (stored as the parameters are)
    "mlp.experts.gate_up_proj_blocks": Entry(("mlp", "experts", "gate_up_blocks"), "E F2 D/32 16", "packed"),
    "mlp.experts.gate_up_proj_scales": Entry(("mlp", "experts", "gate_up_scales"), "E F2 D/32", "packed"),
    "mlp.experts.down_proj_blocks": Entry(("mlp", "experts", "down_blocks"), "E D F/32 16", "packed"),
    "mlp.experts.down_proj_scales": Entry(("mlp", "experts", "down_scales"), "E D F/32", "packed"),
    "mlp.experts.gate_up_proj": Entry(("mlp", "experts", "gate_up_EDF2"), "E D F2", "dense"),
    "mlp.experts.down_proj": Entry(("mlp", "experts", "down_EFD"), "E F D", "dense"),
}
# A packed pair's projection (gate_up, down) -> the dense parameter it decodes to, [E, in, out].
DENSE = {"gate_up": "gate_up_EDF2", "down": "down_EFD"}

# OpenAI's original/ names -> HF names; per layer "block.{i}." + name -> "model.layers.{i}." + name.
OPENAI_TOP = {"embedding.weight": "model.embed_tokens.weight", "norm.scale": "model.norm.weight",
              "unembedding.weight": "lm_head.weight"}
OPENAI_LAYER: dict[str, str | tuple[str, ...]] = {
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
    # fused: rows q | k | v
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
}
_LAYER_NAME = re.compile(r"(model\.layers|block)\.([0-9]+)\.(.+)")


def sizes(cfg: Config) -> dict[str, int]:
    """The size of every axis letter the table uses."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    return {"V": cfg.vocab_size, "D": D, "E": cfg.num_experts, "F": F, "F2": 2 * F, "N": cfg.num_attention_heads,
            "K": cfg.num_key_value_heads, "H": cfg.head_dim, "D/32": D // mxfp4.BLOCK, "F/32": F // mxfp4.BLOCK,
            "16": mxfp4.BLOCK // 2}


def entries(cfg: Config, mxfp4_experts: bool) -> dict[str, tuple[Path_, Entry]]:
    """Every tensor of an HF checkpoint of ``cfg``, in file order: ``{name: (parameter path, entry)}``."""
    keep = (None, "packed" if mxfp4_experts else "dense")
    out = {name: (e.path, e) for name, e in TOP.items()}
    for i in range(cfg.num_hidden_layers):
        out |= {f"model.layers.{i}.{name}": (("layers", i, *e.path), e) for name, e in LAYER.items()
                if e.experts in keep}
    return out


def lookup(name: str) -> tuple[Path_, Entry]:
    """The parameter path and entry of one HF tensor name."""
    if name in TOP:
        return TOP[name].path, TOP[name]
    m = _LAYER_NAME.fullmatch(name)
    if m is None or m[1] != "model.layers" or m[3] not in LAYER:
        raise ValueError(f"{name!r} is not a tensor of a gpt-oss checkpoint")
    return ("layers", int(m[2]), *LAYER[m[3]].path), LAYER[m[3]]


def hf_shapes(cfg: Config, mxfp4_experts: bool) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Every tensor an HF gpt-oss checkpoint holds: ``{name: (shape, allowed dtypes)}``."""
    n = sizes(cfg)
    return {name: (e.shape(n), ("U8",) if e.experts == "packed" else FLOAT)
            for name, (_, e) in entries(cfg, mxfp4_experts).items()}


def openai_to_hf_name(name: str) -> str | None:
    """HF name of an OpenAI ``original/`` tensor (None for the fused qkv, or unknown names)."""
    if name in OPENAI_TOP:
        return OPENAI_TOP[name]
    m = _LAYER_NAME.fullmatch(name)
    hf = OPENAI_LAYER.get(m[3]) if m is not None and m[1] == "block" else None
    return f"model.layers.{m[2]}.{hf}" if isinstance(hf, str) else None


def openai_shapes(cfg: Config) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Every tensor of OpenAI's ``original/`` checkpoint: ``{name: (shape, allowed dtypes)}``."""
    hf = hf_shapes(cfg, mxfp4_experts=True)
    out = {name: hf[target] for name, target in OPENAI_TOP.items()}
    for i in range(cfg.num_hidden_layers):
        for name, target in OPENAI_LAYER.items():
            parts = [hf[f"model.layers.{i}.{t}"] for t in ((target,) if isinstance(target, str) else target)]
            rows = sum(shape[0] for shape, _ in parts)
            out[f"block.{i}.{name}"] = ((rows, *parts[0][0][1:]), parts[0][1])
    return out


def openai_to_hf(cfg: Config, name: str, x: Tensor) -> list[tuple[str, Tensor]]:
    """The HF tensor(s) of one OpenAI tensor: ``[(HF name, tensor)]``, the fused qkv split by rows."""
    hf = openai_to_hf_name(name)
    if hf is not None:
        return [(hf, x)]
    m = _LAYER_NAME.fullmatch(name)
    targets = OPENAI_LAYER.get(m[3]) if m is not None and m[1] == "block" else None
    if not isinstance(targets, tuple):
        raise ValueError(f"{name!r} is not a tensor of an OpenAI gpt-oss checkpoint")
    n, out, r0 = sizes(cfg), [], 0
    for target in targets:
        full = f"model.layers.{m[2]}.{target}"
        rows = lookup(full)[1].shape(n)[0]

        def read(src: Tensor, ix: Index, r0: int = r0) -> np.ndarray:
            return src[(slice(ix[0].start + r0, ix[0].stop + r0), *ix[1:])]

        out.append((full, _view(x, (rows, *x.shape[1:]), x.dtype, read)))
        r0 += rows
    return out


# -- checkpoint tensors <-> parameters ---------------------------------------------------------------
def _view(x: Tensor, shape: tuple[int, ...], dtype, read: Callable[[Tensor, Index], np.ndarray]) -> Tensor:
    """``read(x, index)`` over all of ``shape`` for an array; for a lazy ``x``, the same as a lazy tensor of
    ``shape`` that reads by slice (each rectangle maps to one rectangle of ``x``)."""
    derive = getattr(x, "derive", None)
    if derive is None:
        return read(np.asarray(x), tuple(slice(0, s) for s in shape))
    return derive(shape, dtype, read)


def to_params(cfg: Config, name: str, x: Tensor) -> tuple[Path_, Tensor]:
    """The parameter path of HF tensor ``name``, and ``x`` in the parameter's layout.

    ``x`` is an array (the result is one too) or a lazy tensor (the result reads ``x`` by slice).
    """
    path, e = lookup(name)
    stored, param = e.axes
    if stored == param:
        return path, x
    n = sizes(cfg)
    return path, _view(x, tuple(n[c] for c in param), x.dtype, lambda src, ix: e.read(n, src, ix))


_decode = jax.jit(fast_mxfp4.decode, static_argnums=2)  # fused: no full-size temporaries


def dequantize(blocks: Tensor, scales: Tensor, dtype) -> Tensor:
    """Dense ``[E, in, out]`` weights of ``dtype`` from MXFP4 blocks ``[E, out, in/32, 16]`` and scales.

    Arrays give an array; lazy tensors a lazy tensor, where a slice of the input axis reads the
    32-value blocks that cover it. Decoded by ``kernels.mxfp4.decode`` (bit for bit ``mxfp4.decode``).
    """
    E, n_out, nb, _ = blocks.shape
    B = mxfp4.BLOCK

    def read(b: Tensor, ix: Index) -> np.ndarray:
        se, si, so = ix
        b0, b1 = si.start // B, -(-si.stop // B)
        w = np.asarray(_decode(b[se, so, b0:b1], scales[se, so, b0:b1], dtype))  # [e, out, covering in]
        return np.swapaxes(w[:, :, si.start - B * b0:si.stop - B * b0], -1, -2)

    return _view(blocks, (E, nb * B, n_out), np.dtype(dtype), read)


def dense_experts(params: Iterable[tuple[Path_, Tensor]], dtype) -> Iterator[tuple[Path_, Tensor]]:
    """``params`` with each MXFP4 blocks/scales pair replaced by its dense parameter (``dequantize``).

    Raises ``ValueError`` naming a half whose partner never arrives.
    """
    pending: dict[Path_, Tensor] = {}
    for path, x in params:
        proj, _, part = str(path[-1]).rpartition("_")
        if proj not in DENSE or part not in ("blocks", "scales"):
            yield path, x
            continue
        other = path[:-1] + (f"{proj}_{'scales' if part == 'blocks' else 'blocks'}",)
        if other not in pending:
            pending[path] = x
            continue
        partner = pending.pop(other)
        blocks, scales = (x, partner) if part == "blocks" else (partner, x)
        yield path[:-1] + (DENSE[proj],), dequantize(blocks, scales, dtype)
    for path in pending:
        half = str(path[-1]).rpartition("_")[2]
        raise ValueError(f"parameter {'.'.join(map(str, path))}: MXFP4 {half} without their "
                         f"{'scales' if half == 'blocks' else 'blocks'}")


def from_params(cfg: Config, params: dict[Path_, np.ndarray], *,
                mxfp4_experts: bool) -> Iterator[tuple[str, np.ndarray]]:
    """The HF tensors of a model's parameters, in file order: the inverse of ``to_params``.

    ``params`` maps parameter paths to arrays in the model's layout (dense experts). With
    ``mxfp4_experts`` the expert weights are encoded (``mxfp4.encode``) into HF's blocks/scales.
    """
    n = sizes(cfg)
    encoded: dict[Path_, dict[str, np.ndarray]] = {}  # a pair's half not yet written
    for name, (path, e) in entries(cfg, mxfp4_experts).items():
        if e.experts != "packed":
            yield name, e.write(n, params[path])
            continue
        proj, _, part = str(path[-1]).rpartition("_")
        key = path[:-1] + (proj,)
        if key not in encoded:
            w = np.asarray(params[path[:-1] + (DENSE[proj],)], np.float32)  # [E, in, out]
            blocks, scales = mxfp4.encode(np.swapaxes(w, -1, -2))
            encoded[key] = {"blocks": np.asarray(blocks), "scales": np.asarray(scales)}
        yield name, encoded[key].pop(part)
        if not encoded[key]:
            del encoded[key]
