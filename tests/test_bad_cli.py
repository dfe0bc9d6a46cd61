"""Bad command-line values, bad standard input and damaged run files: one line, never a traceback.

Most cases run ``oss_jax.cli.main`` in this process (an argparse refusal needs no model, and a
subprocess costs seconds of JAX import); a few run the real command to check what a user sees.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import types
import warnings

import pytest
from test_errors import cli, one_line

from oss_jax import evaluate, sharding, train
from oss_jax.cli import main

BIG = str(2**40)

# argparse refuses these (exit 2) before any model loads (train's --out is unusable, should that ever change)
USAGE = [
    (["generate", "--tokens", "1", "--top-k", BIG], "argument --top-k: must be an integer in [0, 2**31)"),
    (["generate", "--tokens", "1", "--stop", "5", BIG], "argument --stop: must be an integer in [0, 2**31)"),
    (["chat", "--seed", BIG, "hi"], "argument --seed: must be an integer in [0, 2**31)"),
    (["chat", "--temperature", "nan", "hi"], "argument --temperature: must be a finite number >= 0, got 'nan'"),
    (["chat", "--temperature", "-1", "hi"], "argument --temperature: must be a finite number >= 0"),
    (["generate", "--tokens", "1", "--top-p", "0"], "argument --top-p: must be a finite number in (0, 1]"),
    (["generate", "--tokens", "1", "--top-p", "1.5"], "argument --top-p: must be a finite number in (0, 1]"),
    (["chat", "--max-new-tokens", "0", "hi"], "argument --max-new-tokens: must be an integer in [1, 2**31)"),
    (["train", "--out", "/dev/null/run", "--steps", "0"], "argument --steps: must be an integer in [1, 2**31)"),
    (["train", "--out", "/dev/null/run", "--per-cell", "0"], "argument --per-cell: must be an integer in [1, 2**31)"),
    (["eval", "--per-cell", "0"], "argument --per-cell: must be an integer in [1, 2**31)"),
    (["eval", "--seed", "-1"], "argument --seed: must be an integer in [0, 2**31)"),
    (["plan", "--context", "-5"], "argument --context: must be an integer in [1, 2**31), got '-5'"),
    (["plan", "--batch", "0"], "argument --batch: must be an integer in [1, 2**31)"),
    (["plan", "--devices", "0"], "argument --devices: must be an integer in [1, 2**31)"),
    (["plan", "--prefill-chunk", "0"], "argument --prefill-chunk: must be an integer in [1, 2**31)"),
]


@pytest.mark.parametrize("argv,message", USAGE, ids=[f"{a[0]} {[x for x in a if x[:2] == '--'][-1]}" for a, _ in USAGE])
def test_bad_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"oss-jax {argv[0]}: error: {message}"), err


def test_usage_error_from_the_real_command(tmp_path):
    """What a user sees: exit 2, argparse's usage and one error line; no run directory appears."""
    r = cli("train", "--out", tmp_path / "run", "--steps", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1] == ("oss-jax train: error: argument --steps: must be an integer in [1, 2**31), "
                                         "got '0'")
    assert not (tmp_path / "run").exists()
    r = cli("generate", "--tokens", "1", "--top-k", BIG)  # was an OverflowError traceback from jnp.asarray
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--top-k: must be an integer" in r.stderr


def _file(tmp_path):
    (tmp_path / "some_file.txt").write_text("hello\n")
    return tmp_path / "some_file.txt"


ONE_LINE = [  # refused by the command itself (exit 1), before any model runs
    (lambda t: ["plan", "--mesh", "abc"],
     "oss-jax plan: error: --mesh: expected DATAxEXPERTxTENSOR like 1x4x2, got 'abc'"),
    (lambda t: ["plan", "--mesh", "1x0x2"], "--mesh: expected DATAxEXPERTxTENSOR like 1x4x2, got '1x0x2'"),
    (lambda t: ["plan", "--mesh", "2x2"], "--mesh: expected DATAxEXPERTxTENSOR like 1x4x2, got '2x2'"),
    (lambda t: ["generate", "--tokens", "a b"],
     "oss-jax generate: error: --tokens: expected token ids like '1 2 3', got 'a'"),
    (lambda t: ["generate", "--prompt", "a\udcffb"], "--prompt is not valid UTF-8 (byte 0xff at position 1)"),
    (lambda t: ["plan", "--model", str(t / "nowhere")], "nowhere: cannot read config"),
    (lambda t: ["plan", "--model", str(_file(t))], "some_file.txt: not valid JSON"),
    (lambda t: ["chat", "--model", str(t / "nowhere"), "hi"], "nowhere: no such directory"),
    (lambda t: ["train", "--out", str(_file(t)), "--steps", "1"],
     "some_file.txt: expected a run directory, got a file"),
]


@pytest.mark.parametrize("make,message", ONE_LINE, ids=["mesh abc", "mesh 1x0x2", "mesh 2x2", "tokens", "prompt",
                                                        "plan nowhere", "plan file", "chat nowhere", "train file"])
def test_bad_input_is_one_line(make, message, tmp_path, capsys):
    argv = make(tmp_path)
    assert main(argv) == 1
    assert message in one_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["some_file.txt"])  # nothing written


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_stdin_not_utf8(command, tmp_path):
    """Bytes that are not UTF-8 on standard input: one line naming the byte (was a JSON surrogate error)."""
    r = subprocess.run([sys.executable, "-m", "oss_jax.cli", command, "--max-new-tokens", "2"], input=b"\xff\xfe hi",
                       capture_output=True)
    stderr = r.stderr.decode()
    assert r.returncode == 1
    assert one_line(stderr) == f"oss-jax {command}: error: standard input is not valid UTF-8 (byte 0xff at position 0)"


def test_stdin_not_utf8_in_process(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok \xc3\x28")))
    assert main(["chat"]) == 1  # refused before the model loads
    assert one_line(capsys.readouterr().err) == ("oss-jax chat: error: standard input is not valid UTF-8 "
                                                 "(byte 0xc3 at position 3)")


def test_eval_and_chat_need_a_harmony_vocabulary(mxfp4_dir):
    """A random checkpoint of 1031 ids and no token map cannot read a harmony conversation."""
    r = cli("eval", "--model", mxfp4_dir, "--per-cell", "1")
    assert r.returncode == 1
    assert one_line(r.stderr) == ("oss-jax eval: error: this model cannot read harmony conversations (vocabulary of "
                                  "1031 ids, no token map): eval needs an o200k_harmony model or one trained on "
                                  "oss_jax.data")
    r = cli("chat", "--model", mxfp4_dir, "hi")
    assert r.returncode == 1 and "harmony" in one_line(r.stderr)


# -- the library refuses the same values -----------------------------------------------------------
def test_train_config_refuses_counts():
    for field in ("steps", "batch", "checkpoint_every", "log_every"):
        with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be an integer >= 1, got 0"):
            train.TrainConfig(**{field: 0})
    with pytest.raises(ValueError, match=r"TrainConfig\.warmup must be an integer >= 0, got -1"):
        train.TrainConfig(warmup=-1)
    with pytest.raises(ValueError, match=r"TrainConfig\.steps must be an integer >= 1, got 2\.5"):
        train.TrainConfig(steps=2.5)


def test_evaluate_refuses(mxfp4_dir):
    import oss_jax

    with pytest.raises(ValueError, match=r"cannot read harmony conversations \(vocabulary of 1031 ids, no token map\)"):
        evaluate.evaluate(oss_jax.load(mxfp4_dir))
    harmony_like = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=201088), token_map=None)
    with pytest.raises(ValueError, match="per_cell must be an integer >= 1, got 0"):
        evaluate.evaluate(harmony_like, per_cell=0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        evaluate.evaluate(harmony_like, seed=-1)
    with pytest.raises(ValueError, match="unknown family 'divide'"):
        evaluate.evaluate(harmony_like, families=["add", "divide"])


@pytest.mark.parametrize("kw,message", [({"context": -5}, "context must be a positive integer, got -5"),
                                        ({"batch": 0}, "batch must be a positive integer, got 0"),
                                        ({"chunk": 0}, "chunk must be a positive integer, got 0"),
                                        ({"mesh": 0}, "need at least one device, got 0")])
def test_plan_refuses(kw, message):
    with pytest.raises(ValueError, match=message):
        sharding.plan("gpt-oss-20b", **kw)


# -- a run's metrics.jsonl -------------------------------------------------------------------------
ROWS = [{"step": 1, "ce": 2.5}, {"step": 2, "ce": 2.25}, {"step": 3, "ce": 2.0}]


def _log(path, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + tail)


def test_metrics_torn_last_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _log(path, '{"step": 4, "ce": 1.7')  # killed mid-write
    with pytest.warns(UserWarning, match=r"metrics.jsonl:4: dropped a torn last line") as caught:
        assert train.read_metrics(path) == ROWS
    assert len(caught) == 1
    train._truncate_metrics(path, ROWS, 2)  # as a resume from step 2 does
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in ROWS[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train.read_metrics(path) == ROWS[:2]  # clean again: no warning


@pytest.mark.parametrize("tail,line,message", [
    ('{"step": 4, "ce"\n{"step": 5, "ce": 1.5}\n', 4, "not valid JSON"),
    ('[1, 2]\n{"step": 5}\n', 4, "not a metrics row"),
    ('{"ce": 1.0}\n', 4, "not a metrics row"),
])
def test_metrics_corrupt_line_is_refused_naming_it(tmp_path, tail, line, message):
    path = tmp_path / "metrics.jsonl"
    _log(path, tail)
    with pytest.raises(ValueError, match=f"metrics.jsonl:{line}: {message}"):
        train.read_metrics(path)


def test_train_refuses_a_corrupt_log_before_any_work(tmp_path):
    """``train`` reads the log first: a corrupt middle line stops it, naming the file, and nothing is written."""
    run = tmp_path / "run"
    run.mkdir()
    _log(run / "metrics.jsonl", '{"step": 4, "ce"\n{"step": 5, "ce": 1.5}\n')
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"run/metrics.jsonl:4: not valid JSON"):
        train.train(run, train.TrainConfig(steps=1, batch=1), progress=False)
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
    assert (run / "metrics.jsonl").read_text() == before
    (run / "train_config.json").write_text("{torn")
    with pytest.raises(ValueError, match=r"run/train_config.json: not valid JSON"):
        train.train(run, train.TrainConfig(steps=1, batch=1), progress=False)
