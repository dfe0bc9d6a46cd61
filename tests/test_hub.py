"""Repo ids go through huggingface_hub, and only when asked for; HF_HUB_OFFLINE is honoured.

No test here reaches the network: the hub cache is written by hand in the layout
huggingface_hub uses (``models--org--name/snapshots/<commit>/`` plus ``refs/main``).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import oss_jax
from oss_jax.checkpoint import CheckpointError


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


def test_offline_repo_id_not_cached(hub_cache):
    with pytest.raises(CheckpointError, match="not in the local hub cache and downloads are off"):
        oss_jax.load("openai/gpt-oss-20b")


def test_offline_repo_id_from_cache(hub_cache, mxfp4_dir, tokens):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / "models--someone--tiny-gpt-oss"
    shutil.copytree(mxfp4_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = oss_jax.load("someone/tiny-gpt-oss", dtype="float32")
    direct = oss_jax.load(mxfp4_dir, dtype="float32")
    assert np.array_equal(np.asarray(model(tokens)), np.asarray(direct(tokens)))


def test_local_path_never_goes_to_hub(tmp_path, monkeypatch):
    import huggingface_hub

    def boom(*a, **k):
        raise AssertionError("tried the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    with pytest.raises(CheckpointError, match="no such directory"):
        oss_jax.load(str(tmp_path / "org" / "name"))
