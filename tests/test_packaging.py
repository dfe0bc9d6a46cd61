"""Packaging: what installing oss-jax puts in an environment, and the public names it exposes."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import oss_jax
from oss_jax.kernels import native
from oss_jax.load import ORBAX_FORMAT

ROOT = Path(__file__).resolve().parents[1]


def test_save_is_public():
    """``oss_jax.save`` is the module's ``save``; the function ``oss_jax.load`` still shadows the module."""
    module = importlib.import_module("oss_jax.load")
    assert oss_jax.save is module.save and "save" in oss_jax.__all__
    assert oss_jax.load is module.load
    from oss_jax.load import TINY_DIR, save

    assert save is oss_jax.save and (TINY_DIR / "model" / "config.json").is_file()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[list[str], str]:
    """Build a wheel from a copy of the sources (the ``convert/`` folder included): its file names and the
    build's output. Built offline with this environment's setuptools, as ``pip wheel .`` does."""
    pytest.importorskip("setuptools", minversion="77")  # pyproject's build-system requirement
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "out"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints")
    for name in ("oss_jax", "convert"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    code = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-W", "default", "-c", code, str(out)], cwd=src, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("*.whl")
    with zipfile.ZipFile(whl) as z:
        return z.namelist(), r.stdout + r.stderr


def test_wheel_installs_only_oss_jax(wheel):
    """No top-level ``convert`` package; every module (``oss_jax.kernels`` too), the tiny model's data and the routes
    prompt corpus."""
    names, _ = wheel
    top = {n.split("/")[0] for n in names}
    assert top == {"oss_jax", *(d for d in top if re.fullmatch(r"oss_jax-[\w.]+\.dist-info", d))}, top
    assert "oss_jax/convert.py" in names and "oss_jax/kernels/__init__.py" in names
    for path in native.SOURCES + native.HEADERS:  # compiled on first use (oss_jax.kernels.native): every file
        assert f"oss_jax/kernels/native/{path.name}" in names, path.name
    src = ROOT / "oss_jax"
    modules = {f"oss_jax/{p.relative_to(src)}" for p in src.rglob("*.py") if "__pycache__" not in p.parts}
    data = {f"oss_jax/{p.relative_to(src)}" for d in ("tiny", "prompts") for p in (src / d).rglob("*") if p.is_file()}
    assert "oss_jax/tiny/model/model.safetensors" in data and "oss_jax/prompts/routes.jsonl" in data
    assert not (modules | data) - set(names), sorted((modules | data) - set(names))


def test_build_prints_no_setuptools_warnings(wheel):
    """No "Package 'oss_jax.tiny' is absent from the `packages` configuration" screens, no deprecations."""
    _, log = wheel
    assert not re.findall(r"\w*Warning: .*", log), re.findall(r"\w*Warning: .*", log)


def test_python_m_oss_jax_convert(mxfp4_dir, tmp_path):
    """``python -m oss_jax.convert`` is ``oss-jax convert``: its help, and a real conversion."""
    r = subprocess.run([sys.executable, "-m", "oss_jax.convert", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("usage: oss-jax convert"), r.stdout + r.stderr
    assert r.stderr == ""  # e.g. no runpy RuntimeWarning (oss_jax/__init__ must not import oss_jax.convert)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "oss_jax.convert", str(mxfp4_dir), str(out), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"wrote {out}", r.stdout + r.stderr
    assert json.loads((out / "oss_jax.json").read_text())["format"] == ORBAX_FORMAT
