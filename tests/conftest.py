"""Shared fixtures: tiny random checkpoints written once per test session."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# The harmony vocabulary is rebuilt into a throwaway cache, never the user's ~/.cache.
os.environ.setdefault("OSS_JAX_CACHE", tempfile.mkdtemp(prefix="oss-jax-test-cache-"))
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
import pytest
import reference as R


@pytest.fixture(scope="session")
def hf_tiny():
    """The transformers model every checkpoint below is written from."""
    return R.hf_model(seed=0)


@pytest.fixture(scope="session")
def tokens():
    """Two sequences of 70 tokens: more than four sliding windows of 16."""
    return np.random.default_rng(0).integers(0, R.TINY["vocab_size"], (2, 70)).astype(np.int32)


@pytest.fixture(scope="session")
def dense_dir(hf_tiny, tmp_path_factory) -> Path:
    return R.save_dense(hf_tiny, tmp_path_factory.mktemp("ckpt") / "dense")


@pytest.fixture(scope="session")
def mxfp4_dir(hf_tiny, tmp_path_factory) -> Path:
    return R.save_mxfp4(hf_tiny, tmp_path_factory.mktemp("ckpt") / "mxfp4")
