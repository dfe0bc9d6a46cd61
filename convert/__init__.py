"""Hugging Face / OpenAI gpt-oss checkpoints to orbax, streaming: ``oss-jax convert SRC DST``."""

from convert.converter import convert

__all__ = ["convert"]
