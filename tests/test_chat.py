"""Chat on top of harmony and generation, and the ``oss-jax generate`` / ``chat`` commands."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import reference as R

import oss_jax
from oss_jax import harmony
from oss_jax.chat import ChannelStream, chat
from oss_jax.generate import PAD, generate


@pytest.fixture(scope="module")
def harmony_dir(tmp_path_factory):
    """A random gpt-oss with the real 201088-token vocabulary (so harmony ids exist), tiny otherwise."""
    hf = R.hf_model(seed=5, vocab_size=harmony.VOCAB_SIZE, hidden_size=32, intermediate_size=32,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return R.save_dense(hf, tmp_path_factory.mktemp("harmony") / "model")


@pytest.fixture(scope="module")
def harmony_model(harmony_dir):
    return oss_jax.load(harmony_dir, dtype="float32")


def completion(*parts) -> list[int]:
    return [t for p in parts for t in ([p] if isinstance(p, int) else harmony.encode(p))]


def test_channel_stream_follows_channels():
    toks = completion(harmony.CHANNEL, "analysis", harmony.MESSAGE, "Add 2 and 2: four.", harmony.END,
                      harmony.START, "assistant", harmony.CHANNEL, "final", harmony.MESSAGE, "2 + 2 = 4 ✓",
                      harmony.RETURN)
    stream, seen = ChannelStream(), {}
    for t in toks:
        channel, text = stream.feed(t)
        if text:
            seen[channel] = seen.get(channel, "") + text
    assert seen == {"analysis": "Add 2 and 2: four.", "final": "2 + 2 = 4 ✓"}
    reply = harmony.Reply.from_tokens(toks)
    assert (reply.analysis, reply.final) == ("Add 2 and 2: four.", "2 + 2 = 4 ✓")


def test_channel_stream_survives_garbage():
    rng = np.random.default_rng(0)
    stream = ChannelStream()
    for t in rng.integers(0, harmony.VOCAB_SIZE, 500):
        _, text = stream.feed(int(t))
        assert isinstance(text, str)


def test_chat_is_generation_on_the_harmony_prompt(harmony_model):
    streamed = []
    reply = chat(harmony_model, "What is 2 + 2?", effort="low", max_new_tokens=24,
                 on_text=lambda c, t: streamed.append(t))
    prompt = harmony.render("What is 2 + 2?", effort="low")
    assert prompt[-2:] == [harmony.START, harmony.encode("assistant")[0]]
    raw = generate(harmony_model, [prompt], max_new_tokens=24, stop_tokens=harmony.STOP_TOKENS)[0]
    assert reply.tokens == [int(t) for t in raw if t != PAD]
    assert isinstance(reply.analysis, str) and isinstance(reply.final, str)
    quiet = chat(harmony_model, "What is 2 + 2?", effort="low", max_new_tokens=24)
    assert quiet.tokens == reply.tokens


def test_multi_turn_history(harmony_model):
    first = chat(harmony_model, "Hi", max_new_tokens=8)
    history = [{"role": "user", "content": "Hi"}, *(m.as_dict() for m in first.messages if m.role == "assistant"),
               {"role": "user", "content": "And then?"}]
    second = chat(harmony_model, history, max_new_tokens=8)
    assert isinstance(second.final, str)


def test_chat_needs_harmony_vocabulary(dense_dir):
    with pytest.raises(ValueError, match="chat needs the harmony special tokens"):
        chat(oss_jax.load(dense_dir, dtype="float32"), "hello")


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "oss_jax.cli", *map(str, args)], capture_output=True,
                          text=True, input=stdin)


def test_cli_chat_json_one_shot(harmony_dir):
    r = cli("chat", "--model", harmony_dir, "--json", "--max-new-tokens", "12", "--effort", "high",
            "What is 3 + 4?")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"analysis", "final", "tokens", "messages"} and 0 < len(out["tokens"]) <= 12


def test_cli_chat_streams_from_stdin(harmony_dir):
    r = cli("chat", "--model", harmony_dir, "--max-new-tokens", "12", stdin="Hello there\n")
    assert r.returncode == 0, r.stderr and "Traceback" not in r.stderr


def test_cli_generate_tokens(dense_dir):
    r = cli("generate", "--model", dense_dir, "--dtype", "float32", "--tokens", "5 6 7", "--max-new-tokens", "6",
            "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    model = oss_jax.load(dense_dir, dtype="float32")
    assert out["tokens"] == generate(model, [[5, 6, 7]], max_new_tokens=6)[0].tolist()


def test_cli_errors_are_one_line(tmp_path):
    r = cli("chat", "--model", tmp_path / "missing", "hi")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "no such directory" in r.stderr


def test_channel_stream_shows_text_without_header():
    """A model that never writes <|message|> still has its text shown (channel None)."""
    words = "just some words without any harmony header at all, going on for more than sixteen tokens"
    assert len(harmony.encode(words)) > 16
    stream = ChannelStream()
    shown = [stream.feed(t) for t in harmony.encode(words)]
    assert "".join(text for _, text in shown) == words
    assert {channel for channel, text in shown if text} == {None}
    short = ChannelStream()
    assert all(short.feed(t) == (None, "") for t in harmony.encode("a short answer"))
    assert short.flush() == (None, "a short answer")
