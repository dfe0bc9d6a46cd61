"""Write a random gpt-oss checkpoint with the real tensor names, shapes, dtypes and sharding.

What it is for: exercising the real-size code paths (loading, conversion, a forward pass, peak
memory, timings) on machines that cannot download the real weights (13 GB for gpt-oss-20b,
65 GB for gpt-oss-120b). The output is laid out exactly as the Hugging Face ``openai/gpt-oss-*``
repositories are (SPEC.md §4): ``config.json`` with the real keys, shards
``model-00000-of-00002.safetensors`` ... with ``model.safetensors.index.json``, every tensor in
bf16 except the MXFP4 expert blocks and scales (uint8).

The values are random but sane, so that a forward pass is numerically meaningful (activations
of order one, finite logits): bf16 weights and biases ~ N(0, 0.02), norm scales ~ 1 + N(0, 0.02),
attention sinks ~ N(0, 1), MXFP4 block bytes uniformly random and scale bytes uniform in
118..122 (decoded expert weights of about 1e-2, like the bf16 ones). The tokens mean nothing.

Tensors are generated and written one at a time (memory stays about one tensor, 1.2 GB for the
20b embedding, plus the copy ``write_safetensors`` makes), into a temporary directory that is
renamed to ``--out`` only when complete. Writing the 20b checkpoint is bound by the disk
(a few minutes at 300 MB/s).

Run::

    .venv/bin/python scripts/make_random_checkpoint.py --out /work/tmp-20b/random-20b
    .venv/bin/python scripts/make_random_checkpoint.py --preset gpt-oss-120b --shards 15 --out DIR

Then ``oss_jax.load(DIR)`` or ``oss-jax convert DIR DST`` read it like the real checkpoint.
The writer is importable: ``write_random_checkpoint(out, cfg, seed=0, shards=3)``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from statistics import NormalDist

import ml_dtypes
import numpy as np

from oss_jax import checkpoint
from oss_jax.config import PRESETS, Config

BF16 = np.dtype(ml_dtypes.bfloat16)
U8 = np.dtype(np.uint8)
WEIGHT_STD = 0.02
SCALE_RANGE = (118, 122)  # E8M0 exponents 2**-9 .. 2**-5: |decoded| <= 6 * 2**-5, rms ~ 2e-2
CHUNK = 1 << 24  # values generated per step (keeps temporaries at a few tens of MB)

# A standard normal by inverse CDF at 65536 evenly spaced quantiles: indexing it with random
# uint16s draws N(0, 1) (discretised far below bf16's resolution) about ten times faster than
# Generator.standard_normal followed by a cast to bf16.
_NORMAL = np.array([NormalDist().inv_cdf((i + 0.5) / 65536) for i in range(65536)], np.float32)


def tensor_specs(cfg: Config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Every tensor of the HF MXFP4 layout, ``{name: (shape, dtype)}``, in layer order.

    Names and shapes come from ``oss_jax.checkpoint.hf_shapes`` (the loader's own check);
    floats are bf16 and the expert blocks/scales uint8, as in the real checkpoints.
    """
    shapes = checkpoint.hf_shapes(cfg, mxfp4_experts=True)
    top_last = ("model.norm.weight", "lm_head.weight")
    order = [n for n in shapes if n not in top_last] + list(top_last)  # embed, layers, norm, head
    return {n: (shapes[n][0], U8 if shapes[n][1] == ("U8",) else BF16) for n in order}


def random_tensor(name: str, shape: tuple[int, ...], dtype: np.dtype, bitgen: np.random.BitGenerator
                  ) -> np.ndarray:
    """One tensor of random values suited to ``name`` (see the module docstring)."""
    n = int(np.prod(shape))
    if name.endswith("_blocks"):
        raw = bitgen.random_raw(-(-n // 8))  # uniformly random bytes, 8 per draw
        return raw.view(np.uint8)[:n].reshape(shape)
    if name.endswith("_scales"):
        lo, hi = SCALE_RANGE
        return np.random.Generator(bitgen).integers(lo, hi + 1, n, dtype=np.uint8).reshape(shape)
    assert dtype == BF16, (name, dtype)
    if name.endswith("sinks"):
        mean, std = 0.0, 1.0
    elif name.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, model.norm
        mean, std = 1.0, WEIGHT_STD
    else:
        mean, std = 0.0, WEIGHT_STD
    table = (mean + std * _NORMAL).astype(BF16).view(np.uint16)
    out = np.empty(n, np.uint16)
    for lo in range(0, n, CHUNK):
        hi = min(lo + CHUNK, n)
        idx = bitgen.random_raw(-(-(hi - lo) // 4)).view(np.uint16)[: hi - lo]
        np.take(table, idx, out=out[lo:hi])
    return out.view(BF16).reshape(shape)


def shard_names(specs: dict[str, tuple[tuple[int, ...], np.dtype]], shards: int) -> list[list[str]]:
    """Split tensors, in order, into ``shards`` groups of about equal bytes (none empty)."""
    if not 1 <= shards <= len(specs):
        raise ValueError(f"shards must be between 1 and {len(specs)}, got {shards}")
    sizes = {n: int(np.prod(s)) * d.itemsize for n, (s, d) in specs.items()}
    total, names = sum(sizes.values()), list(specs)
    groups: list[list[str]] = [[] for _ in range(shards)]
    g = done = 0
    for i, name in enumerate(names):
        later = shards - 1 - g  # shards after the current one, all still empty
        if groups[g] and later and (done * shards >= (g + 1) * total or len(names) - i == later):
            g += 1
        groups[g].append(name)
        done += sizes[name]
    return groups


def hf_config(cfg: Config) -> dict:
    """``config.json`` with the keys of the real ``openai/gpt-oss-*`` config."""
    d = cfg.to_hf_dict()
    d.setdefault("torch_dtype", "bfloat16")
    for key, value in (("attention_dropout", 0.0), ("hidden_act", "silu"), ("initializer_range", 0.02),
                       ("output_router_logits", False), ("router_aux_loss_coef", 0.9),
                       ("use_cache", True)):
        d.setdefault(key, value)
    return dict(sorted(d.items()))


WRITES = re.compile(r"config\.json|model\.safetensors\.index\.json|model(-\d{5}-of-\d{5})?\.safetensors")


def earlier_random_checkpoint(path: Path) -> str | None:
    """None when directory ``path`` holds only files this script writes, else why not."""
    other = sorted(p.name for p in path.iterdir() if not WRITES.fullmatch(p.name) or p.is_symlink() or not p.is_file())
    return f"this script does not write {', '.join(other)}" if other else None


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse ``out`` unless it is missing, empty, or (with ``overwrite``) an earlier random checkpoint."""
    checkpoint.check_destination(out, overwrite=overwrite, ours=earlier_random_checkpoint,
                                 what="a random checkpoint", hint=" (--overwrite replaces only an earlier one)")


def write_random_checkpoint(out: str | os.PathLike, cfg: Config, *, seed: int = 0, shards: int = 3,
                            overwrite: bool = False, progress: bool = False) -> Path:
    """Write a random MXFP4 checkpoint for ``cfg`` to the directory ``out``; return its path.

    Shards are named like the real ones (``model-00000-of-00002.safetensors`` for 3 shards; a
    single shard is ``model.safetensors``, with no index). Deterministic for a given ``seed``.
    ``out`` must be missing or empty; ``overwrite`` replaces an earlier random checkpoint (a directory
    holding only ``config.json``, shards and their index), never anything else (``CheckpointError``).
    """
    out = Path(out).expanduser().absolute()
    checkpoint.remove_stale_temporaries(out)
    check_destination(out, overwrite)
    if cfg.quant_method != "mxfp4":
        cfg = cfg.replace(quant_method="mxfp4")  # validates hidden/intermediate % 32
    specs = tensor_specs(cfg)
    groups = shard_names(specs, shards)
    files = (["model.safetensors"] if shards == 1 else
             [f"model-{i:05d}-of-{shards - 1:05d}.safetensors" for i in range(shards)])
    sizes = {n: int(np.prod(s)) * d.itemsize for n, (s, d) in specs.items()}
    bitgen = np.random.PCG64(seed)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"writing {out.name}")

    def generate(names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
        for name in names:
            shape, dtype = specs[name]
            yield name, random_tensor(name, shape, dtype, bitgen)
            if bar is not None:
                bar.update(sizes[name])

    try:
        with checkpoint.atomic_directory(out, check=lambda d: check_destination(d, overwrite)) as tmp:
            for fname, names in zip(files, groups, strict=True):
                checkpoint.write_safetensors(tmp / fname, generate(names),
                                             shapes={n: specs[n] for n in names}, metadata={"format": "pt"})
            if shards > 1:
                index = {"metadata": {"total_size": sum(sizes.values())},
                         "weight_map": {n: f for f, names in zip(files, groups, strict=True) for n in names}}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            (tmp / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    finally:
        if bar is not None:
            bar.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpt-oss-20b",
                        help="model shape (default gpt-oss-20b)")
    parser.add_argument("--out", required=True, help="checkpoint directory to create")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--shards", type=int, default=3,
                        help="number of safetensors files (default 3, as the real 20b)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it is an earlier random checkpoint (never anything else)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        path = write_random_checkpoint(args.out, PRESETS[args.preset], seed=args.seed, shards=args.shards,
                                       overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, OSError) as e:
        print(f"make_random_checkpoint: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
