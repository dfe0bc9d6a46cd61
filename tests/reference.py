"""Tiny random gpt-oss checkpoints written by transformers itself, and its logits.

Sizes are chosen so that no two dimensions coincide (a transposed or mis-reshaped weight
cannot pass), the vocabulary is odd, and sequences run several times past the sliding window.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import GptOssConfig, GptOssForCausalLM

from oss_jax import mxfp4
from oss_jax.checkpoint import write_safetensors

TINY = dict(vocab_size=1031, hidden_size=96, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=6, num_key_value_heads=2, head_dim=20, num_local_experts=7,
            num_experts_per_tok=3, sliding_window=16, max_position_embeddings=2048,
            rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                             "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                             "original_max_position_embeddings": 64})


def hf_model(seed: int = 0, **overrides) -> GptOssForCausalLM:
    """A float32 transformers gpt-oss with every parameter random and non-zero (sinks, biases)."""
    torch.manual_seed(seed)
    cfg = GptOssConfig(**{**TINY, **overrides})
    cfg._attn_implementation = "eager"
    model = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0.0, 1.0)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 0.1 if "experts" in name or "router" in name else 0.05)
    return model


def save_dense(model: GptOssForCausalLM, path: Path, shard_size: str | None = None) -> Path:
    """Save with transformers' own ``save_pretrained`` (sharded with an index if ``shard_size``)."""
    kw = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


def mxfp4_tensors(model: GptOssForCausalLM) -> dict[str, np.ndarray]:
    """The model's tensors in the MXFP4 layout, experts encoded with ``oss_jax.mxfp4.encode``."""
    out = {}
    for name, p in model.state_dict().items():
        a = p.detach().float().numpy()
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            blocks, scales = mxfp4.encode(np.swapaxes(a, -1, -2))  # [E, out, in]
            out[name + "_blocks"], out[name + "_scales"] = np.asarray(blocks), np.asarray(scales)
        else:
            out[name] = a
    return out


def save_mxfp4(model: GptOssForCausalLM, path: Path) -> Path:
    """Write an MXFP4 checkpoint (as the real gpt-oss-20b is laid out) with ``quantization_config``."""
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / "model.safetensors", mxfp4_tensors(model))
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def load_hf_mxfp4(path: Path) -> GptOssForCausalLM:
    """transformers' own MXFP4 loader, dequantizing on CPU."""
    from transformers import Mxfp4Config

    model = GptOssForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True),
                                              dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_logits(model: GptOssForCausalLM, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|: the parity measure of the issue."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
