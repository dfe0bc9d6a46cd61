"""oss-jax: OpenAI's gpt-oss models in JAX/Flax NNX, small enough to read."""

from oss_jax import xla_flags  # noqa: F401  (first: before JAX starts a backend)
from oss_jax.cache import KVCache
from oss_jax.chat import chat
from oss_jax.checkpoint import CheckpointError
from oss_jax.config import GPT_OSS_20B, GPT_OSS_120B, PRESETS, Config
from oss_jax.generate import generate
from oss_jax.load import load, save
from oss_jax.model import GptOss
from oss_jax.sharding import make_mesh

__all__ = ["GPT_OSS_20B", "GPT_OSS_120B", "PRESETS", "CheckpointError", "Config", "GptOss", "KVCache", "chat",
           "generate", "load", "make_mesh", "save"]
