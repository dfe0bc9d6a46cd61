"""The gpt-oss configuration: one flat dataclass, read from any gpt-oss ``config.json``.

Three dialects exist in the wild (SPEC.md §1, §4):

* Hugging Face, older: top-level ``rope_theta`` plus a ``rope_scaling`` dict.
* Hugging Face, newer: a ``rope_parameters`` dict that also holds ``rope_theta``.
* OpenAI's ``original/config.json``: ``num_experts``, ``experts_per_token``,
  ``rope_scaling_factor``, ``rope_ntk_alpha`` (= beta_slow), ``rope_ntk_beta`` (= beta_fast).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class Config:
    """Every number the model needs. Defaults are gpt-oss-20b."""

    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880  # per expert
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_experts: int = 32
    experts_per_token: int = 4
    sliding_window: int = 128
    # One of SLIDING / FULL per layer; empty means "even layers slide" (SPEC.md §2).
    layer_types: tuple[str, ...] = ()
    rope_theta: float = 150000.0
    rope_factor: float = 32.0  # YaRN scaling factor; 1.0 means plain RoPE
    rope_original_max_position: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = False  # HF's `truncate`: round the ramp bounds (gpt-oss: no)
    max_position_embeddings: int = 131072
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    rms_norm_eps: float = 1e-5
    # "mxfp4" when the checkpoint stores expert weights as MXFP4 blocks/scales.
    quant_method: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.layer_types:
            types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", types)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that cannot describe a gpt-oss model."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts",
                     "experts_per_token", "sliding_window", "max_position_embeddings",
                     "rope_original_max_position"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "rope_factor", "rope_beta_fast", "rope_beta_slow",
                     "swiglu_limit", "swiglu_alpha", "rms_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"config: {name} must be a positive number, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"config: experts_per_token ({self.experts_per_token}) exceeds "
                             f"num_experts ({self.num_experts})")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"config: layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_hidden_layers} layers")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ValueError(f"config: unknown layer type {bad[0]!r} (expected {SLIDING!r} or {FULL!r})")
        if self.quant_method not in (None, "mxfp4"):
            raise ValueError(f"config: unsupported quant_method {self.quant_method!r} (only 'mxfp4')")
        if self.quant_method == "mxfp4":
            for name in ("hidden_size", "intermediate_size"):
                if getattr(self, name) % 32:
                    raise ValueError(f"config: MXFP4 experts need {name} divisible by 32, "
                                     f"got {getattr(self, name)}")

    # -- derived -----------------------------------------------------------------------------
    def window(self, layer: int) -> int | None:
        """Keys visible to a query in ``layer`` (including itself), or None for full causal."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (``layer_types`` is recomputed unless given)."""
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = ()
        return dataclasses.replace(self, **changes)

    def param_counts(self) -> tuple[int, int]:
        """(total, active per token) parameter counts.

        Active counts what one token's forward pass multiplies by: attention, router, k experts,
        norms and the unembedding, but not the embedding table (a lookup reads one row). This is
        the convention of OpenAI's model card: 3.6B (20b) and 5.1B (120b).
        """
        d, f, e, k = self.hidden_size, self.intermediate_size, self.num_experts, self.experts_per_token
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = d * q + q + 2 * (d * kv + kv) + q * d + d + self.num_attention_heads + d
        expert = d * 2 * f + 2 * f + f * d + d
        router = e * d + e + d
        total_layer = attn + router + e * expert
        active_layer = attn + router + k * expert
        embed = unembed = self.vocab_size * d
        n = self.num_hidden_layers
        return (embed + unembed + d + n * total_layer, unembed + d + n * active_layer)

    # -- reading and writing ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Read an HF (either rope generation) or OpenAI ``original/`` config dict."""
        if not isinstance(d, dict):
            raise ValueError(f"config: expected a JSON object, got {type(d).__name__}")
        openai = "num_local_experts" not in d and ("num_experts" in d or "rope_ntk_alpha" in d)
        get = d.get
        try:
            if openai:
                factor = float(get("rope_scaling_factor", 1.0))
                original = int(get("initial_context_length", 4096))
                kw = dict(
                    num_experts=get("num_experts"), experts_per_token=get("experts_per_token"),
                    rope_theta=float(get("rope_theta", 150000.0)), rope_factor=factor,
                    rope_original_max_position=original,
                    rope_beta_fast=float(get("rope_ntk_beta", 32.0)),
                    rope_beta_slow=float(get("rope_ntk_alpha", 1.0)),
                    max_position_embeddings=int(original * factor),
                    quant_method="mxfp4",  # OpenAI only ships MXFP4 experts
                )
            else:
                rope = get("rope_parameters") or get("rope_scaling") or {}
                theta = rope.get("rope_theta", get("rope_theta", 150000.0))
                rope_type = rope.get("rope_type", rope.get("type", "yarn" if rope else "default"))
                if rope_type not in ("yarn", "default"):
                    raise ValueError(f"config: unsupported rope_type {rope_type!r} (gpt-oss uses 'yarn')")
                yarn = rope_type == "yarn"
                quant = get("quantization_config") or {}
                kw = dict(
                    num_experts=get("num_local_experts"),
                    experts_per_token=get("num_experts_per_tok", get("experts_per_token")),
                    rope_theta=float(theta),
                    rope_factor=float(rope.get("factor", 1.0)) if yarn else 1.0,
                    rope_original_max_position=int(rope.get(
                        "original_max_position_embeddings", get("initial_context_length", 4096))),
                    rope_beta_fast=float(rope.get("beta_fast", 32.0)),
                    rope_beta_slow=float(rope.get("beta_slow", 1.0)),
                    rope_truncate=bool(rope.get("truncate", True)) if yarn else False,
                    max_position_embeddings=get("max_position_embeddings", 131072),
                    layer_types=tuple(get("layer_types") or ()),
                    quant_method=quant.get("quant_method") if quant else None,
                )
            for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window"):
                kw[name] = get(name)
            if get("head_dim") is None and d.get("hidden_size") and d.get("num_attention_heads"):
                kw["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
            for name, default in (("swiglu_limit", 7.0), ("swiglu_alpha", 1.702), ("rms_norm_eps", 1e-5)):
                kw[name] = float(get(name, default))
            missing = [k for k, v in kw.items() if v is None and k != "quant_method"]
            if missing:
                raise ValueError(f"config: missing required key {missing[0]!r}")
        except (TypeError, AttributeError) as e:
            raise ValueError(f"config: malformed value ({e})") from None
        return cls(**kw, extra=dict(d))

    @classmethod
    def from_json(cls, path: str | Path) -> Config:
        """Read ``config.json`` (a file, or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            text = path.read_text()
        except OSError as e:
            raise ValueError(f"{path}: cannot read config ({e.strerror or e})") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF-style ``config.json`` dict (older ``rope_scaling`` generation, read everywhere)."""
        d: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "num_local_experts": self.num_experts, "num_experts_per_tok": self.experts_per_token,
            "experts_per_token": self.experts_per_token, "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types), "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "yarn", "factor": self.rope_factor,
                "original_max_position_embeddings": self.rope_original_max_position,
                "beta_fast": self.rope_beta_fast, "beta_slow": self.rope_beta_slow,
                "truncate": self.rope_truncate,
            },
            "initial_context_length": self.rope_original_max_position,
            "max_position_embeddings": self.max_position_embeddings,
            "swiglu_limit": self.swiglu_limit, "swiglu_alpha": self.swiglu_alpha, "rms_norm_eps": self.rms_norm_eps,
            "attention_bias": True, "tie_word_embeddings": False,
            "eos_token_id": 200002, "pad_token_id": 199999,
        }
        if self.quant_method:
            d["quantization_config"] = {
                "quant_method": self.quant_method,
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
            }
        return d


GPT_OSS_20B = Config(quant_method="mxfp4")
GPT_OSS_120B = Config(num_hidden_layers=36, num_experts=128, quant_method="mxfp4")
PRESETS = {"gpt-oss-20b": GPT_OSS_20B, "gpt-oss-120b": GPT_OSS_120B}
