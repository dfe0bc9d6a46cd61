"""Writing a checkpoint never destroys what the user did not ask to replace (issue 19).

``convert`` and ``save`` write only to a missing or empty directory or over an earlier checkpoint of
their own kind, never over the source, a file or a directory with other contents; a full disk is one
line; a killed run's temporaries are cleaned up by the next one.
"""

from __future__ import annotations

import errno
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from test_errors import cli, copy, one_line
from test_random_checkpoint import SCRIPT, TINY

import oss_jax
from oss_jax import checkpoint
from oss_jax import convert as converter
from oss_jax.checkpoint import CheckpointError

save = oss_jax.save


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes): what the user has on disk."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def no_reading(monkeypatch) -> None:
    """Make any read of the source fail loudly: a refusal must come before it."""
    def fail(*args, **kwargs):
        raise AssertionError("the source was opened before the destination was refused")

    monkeypatch.setattr(converter.checkpoint, "open_checkpoint", fail)


# -- convert: the destination ---------------------------------------------------------------------------------
def layout(tmp_path: Path, mxfp4_dir: Path, case: str) -> tuple[Path, Path, str]:
    """(source, destination, expected message) for each refused destination, built under ``tmp_path``."""
    if case == "source itself":
        src = copy(mxfp4_dir, tmp_path, "src")
        return src, src, "is the source checkpoint"
    if case == "parent of source":
        src = copy(mxfp4_dir, tmp_path / "parent", "src")
        (tmp_path / "parent" / "notes.txt").write_text("mine")
        return src, tmp_path / "parent", "contains the source checkpoint"
    if case == "inside source":
        src = copy(mxfp4_dir, tmp_path, "src")
        return src, src / "out", "lies inside the source checkpoint"
    if case == "source via link":
        src = copy(mxfp4_dir, tmp_path, "src")
        (tmp_path / "link").symlink_to(src)
        return tmp_path / "link", src, "is the source checkpoint"
    if case == "foreign directory":
        (tmp_path / "out" / "sub").mkdir(parents=True)
        (tmp_path / "out" / "notes.txt").write_text("mine")
        (tmp_path / "out" / "sub" / "data.bin").write_bytes(b"\0" * 10)
        return mxfp4_dir, tmp_path / "out", ("out: already exists and is not an oss-jax orbax checkpoint "
                                             "(no oss_jax.json marker; it holds notes.txt, sub/); not replaced")
    if case == "hf checkpoint":
        return mxfp4_dir, copy(mxfp4_dir, tmp_path, "out"), "no oss_jax.json marker; it holds config.json"
    if case == "file":
        (tmp_path / "out").write_text("mine")
        return mxfp4_dir, tmp_path / "out", "out: is a file, not an oss-jax orbax checkpoint; not replaced"
    raise KeyError(case)


REFUSED = ["source itself", "parent of source", "inside source", "source via link", "foreign directory",
           "hf checkpoint", "file"]


@pytest.mark.parametrize("case", REFUSED)
def test_convert_refuses_destination_even_with_overwrite(case, mxfp4_dir, tmp_path, monkeypatch):
    """Each used to be deleted (or, for a file, failed only after converting every tensor)."""
    src, dst, message = layout(tmp_path, mxfp4_dir, case)
    before = files(tmp_path)
    no_reading(monkeypatch)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        converter.convert(src, dst, overwrite=True, progress=False)
    assert files(tmp_path) == before
    assert not list(tmp_path.rglob(".*.tmp-*")) and not list(tmp_path.rglob(".*.old-*"))


def test_convert_cli_refusals(mxfp4_dir, tmp_path):
    """The two cases of the issue through the command line: exit 1, one line, everything still there."""
    src, dst, _ = layout(tmp_path, mxfp4_dir, "source itself")
    before = files(tmp_path)
    r = cli("convert", src, dst, "--overwrite", "--no-progress")
    assert r.returncode == 1 and one_line(r.stderr).endswith(f"{dst}: is the source checkpoint {src}; "
                                                             "convert to another directory")
    assert files(tmp_path) == before
    parent = tmp_path / "parent"
    copy(mxfp4_dir, parent, "src")
    (parent / "notes.txt").write_text("mine")
    before = files(tmp_path)
    r = cli("convert", parent / "src", parent, "--overwrite", "--no-progress")
    assert r.returncode == 1 and "contains the source checkpoint" in one_line(r.stderr)
    assert files(tmp_path) == before
    assert files(parent / "src")["model.safetensors"] == (mxfp4_dir / "model.safetensors").read_bytes()


def test_convert_into_empty_directory_and_over_earlier_conversion(mxfp4_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    converter.convert(mxfp4_dir, out, progress=False)  # an empty directory may be used
    assert (out / "oss_jax.json").exists()
    with pytest.raises(CheckpointError, match=r"out: already exists \(pass --overwrite to replace it\)"):
        converter.convert(mxfp4_dir, out, progress=False)
    (out / "params" / "layers.0" / "stale-marker").write_text("x")  # inside params/: part of the conversion
    converter.convert(mxfp4_dir, out, overwrite=True, progress=False)
    assert not (out / "params" / "layers.0" / "stale-marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    oss_jax.load(out)
    (out / "README.md").write_text("notes about this conversion")  # the user's file: not replaced
    with pytest.raises(CheckpointError, match=r"convert does not write README\.md"):
        converter.convert(mxfp4_dir, out, overwrite=True, progress=False)
    assert (out / "README.md").exists()


def test_replace_never_leaves_neither(mxfp4_dir, tmp_path, monkeypatch, capsys):
    """Replacing moves the old one aside, renames the new one in, then deletes the old one."""
    out = converter.convert(mxfp4_dir, tmp_path / "out", progress=False)
    old = files(out)
    real = os.rename

    def rename(a, b):
        if Path(a).name.startswith(".out.tmp-"):
            raise OSError(errno.EIO, "Input/output error")
        return real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(CheckpointError, match=r"out: cannot write \(Input/output error\)"):
        converter.convert(mxfp4_dir, out, overwrite=True, progress=False)
    monkeypatch.undo()
    assert files(out) == old and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # killed between moving the old one aside and renaming the new one in: the next run puts it back
    aside = tmp_path / f".out.old-{dead_pid()}"
    os.rename(out, aside)
    converter.convert(mxfp4_dir, out, overwrite=True, progress=False)
    assert "restored" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "oss_jax.json").exists()


# -- killed runs' temporaries ---------------------------------------------------------------------------------
def test_stale_temporaries_of_dead_processes_are_removed(mxfp4_dir, tmp_path):
    dead = tmp_path / f".out.tmp-{dead_pid()}"
    (dead / "params").mkdir(parents=True)
    (dead / "params" / "junk").write_bytes(b"\0" * 1000)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        live = tmp_path / f".out.tmp-{sleeper.pid}"
        live.mkdir()
        (live / "busy").write_text("x")
        others = [tmp_path / f".out.tmp-{dead.name.rsplit('-', 1)[1]}x", tmp_path / f".other.tmp-{dead_pid()}"]
        for p in others:
            p.mkdir()
        r = cli("convert", mxfp4_dir, tmp_path / "out", "--no-progress")
        assert r.returncode == 0, r.stderr
        assert one_line(r.stderr) == (f"oss-jax: removed {dead}, left by an interrupted write "
                                      f"(process {dead.name.rsplit('-', 1)[1]} is no longer running)")
        assert not dead.exists() and (tmp_path / "out" / "oss_jax.json").exists()
        assert (live / "busy").exists() and all(p.exists() for p in others)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stale_safetensors_temporary_is_removed(tmp_path, capsys):
    import numpy as np

    stale = tmp_path / f".t.safetensors.tmp-{dead_pid()}"
    stale.write_bytes(b"\0" * 100)
    checkpoint.write_safetensors(tmp_path / "t.safetensors", {"a": np.zeros(3, np.float32)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]
    assert capsys.readouterr().err.count("removed") == 1


# -- a full disk ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   ValueError("OUT_OF_RANGE: Error writing \"value/0.0\" in OCDBT database: "
                                              "Failed to write 100 bytes to file 10 [os_error_code='28']")])
def test_convert_disk_full_is_one_line(error, mxfp4_dir, tmp_path, monkeypatch, capfd):
    """An OSError, or tensorstore's ValueError for one, while orbax saves: one line, no temporary."""
    import orbax.checkpoint as ocp

    def full(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", full)
    with pytest.raises(CheckpointError) as e:
        converter.convert(mxfp4_dir, tmp_path / "out", progress=False)
    assert str(e.value) == f"{tmp_path / 'out'}: cannot write (No space left on device)"
    assert list(tmp_path.iterdir()) == [] and capfd.readouterr().err == ""


def limited(size: int, code: str, *args) -> subprocess.CompletedProcess:
    """Run Python ``code`` in a process whose files may not exceed ``size`` bytes (writes fail with EFBIG)."""
    setup = (f"import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size}, {size})); ")
    return subprocess.run([sys.executable, "-c", setup + code, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_convert_write_failure_real(mxfp4_dir, tmp_path):
    """A real failed write (file size limit, as a full disk without a tmpfs): used to print 195 lines."""
    r = limited(50_000, "from oss_jax.cli import main; sys.exit(main())", "convert", mxfp4_dir, tmp_path / "out",
                "--no-progress")
    assert r.returncode == 1
    assert one_line(r.stderr) == f"oss-jax convert: error: {tmp_path / 'out'}: cannot write (File too large)"
    assert list(tmp_path.iterdir()) == []


# -- save -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(mxfp4_dir):
    return oss_jax.load(mxfp4_dir, experts="dense", dtype="float32")


def test_save_refuses_what_it_did_not_write(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    before = files(tmp_path)
    with pytest.raises(CheckpointError, match=r"out: already exists and is not a checkpoint written by save "
                                              r"\(save writes only config.json, model.safetensors, vocab.json; "
                                              r"it holds config.json, notes.txt\); not replaced"):
        save(model, out)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(CheckpointError, match="file: is a file, not a checkpoint written by save"):
        save(model, tmp_path / "file")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"it holds deeper/\)"):
        save(model, tmp_path / "sub")
    assert files(tmp_path) == {**before, "file": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out", "sub"]


def test_save_replaces_only_an_earlier_save(model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    save(model, out, float_dtype="float32")  # empty directory
    first = files(out)
    stale = tmp_path / f".out.tmp-{dead_pid()}"
    stale.mkdir()
    save(model, out)  # an earlier save: replaced (bfloat16 now)
    assert "removed" in capsys.readouterr().err and not stale.exists()
    assert files(out)["model.safetensors"] != first["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    oss_jax.load(out)


def test_save_disk_full_is_one_line(model, tmp_path, monkeypatch):
    class Full:
        """A file whose writes fail as on a full disk."""

        def __init__(self, path, mode):
            self.f = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    out = save(model, tmp_path / "out")
    monkeypatch.setattr(checkpoint, "open", Full, raising=False)
    with pytest.raises(CheckpointError) as e:
        save(model, out)  # over an earlier save: it stays
    monkeypatch.undo()
    assert str(e.value) == f"{out}: cannot write (No space left on device)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    oss_jax.load(out)


def test_save_write_failure_real(tmp_path):
    """The same with a real failed write, through ``train.export``."""
    r = limited(20_000, "from oss_jax import train; "
                "train.export(train.init_model(train.tiny_config(300), seed=1), sys.argv[1], None)", tmp_path / "out")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].endswith(
        f"CheckpointError: {tmp_path / 'out'}: cannot write (File too large)")
    assert list(tmp_path.iterdir()) == []


def test_random_checkpoint_overwrite_replaces_only_an_earlier_one(tmp_path, monkeypatch, capsys):
    """``scripts/make_random_checkpoint.py --overwrite`` over a user's directory: refused, untouched."""
    script = runpy.run_path(str(SCRIPT))
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    before = files(tmp_path)
    with pytest.raises(CheckpointError, match=r"out: already exists and is not a random checkpoint \(this script "
                                              r"does not write notes\.txt; it holds config\.json, notes\.txt\); "
                                              r"not replaced \(--overwrite replaces only an earlier one\)"):
        script["write_random_checkpoint"](out, TINY, shards=1, overwrite=True)
    monkeypatch.setitem(script["PRESETS"], "gpt-oss-20b", TINY)  # the CLI's default preset, tiny here
    assert script["main"](["--out", str(out), "--overwrite", "--no-progress"]) == 1
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"make_random_checkpoint: error: {out}: already exists and is not a random checkpoint")
    assert files(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    (out / "notes.txt").unlink()
    (out / "config.json").unlink()
    script["write_random_checkpoint"](out, TINY, shards=1)  # an empty directory may be used
    with pytest.raises(CheckpointError, match=r"out: already exists \(pass --overwrite to replace it\)"):
        script["write_random_checkpoint"](out, TINY, shards=2)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert script["main"](["--out", str(out), "--overwrite", "--no-progress", "--shards", "3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model-00000-of-00002.safetensors",
                                                     "model-00001-of-00002.safetensors",
                                                     "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
