"""The harmony format: offline vocabulary, rendering as openai-harmony does, parsing that never raises."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import openai_harmony as oh
import pytest

from oss_jax import harmony as H

# SPEC.md §5, verbatim: the system message openai-harmony renders for effort medium, no date.
SPEC_SYSTEM = """<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06

Reasoning: medium

# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"""


@pytest.fixture(scope="session")
def enc(tmp_path_factory):
    """The encoding, built once into a fresh cache directory (TIKTOKEN_ENCODINGS_BASE unset first)."""
    cache = tmp_path_factory.mktemp("tiktoken")
    saved = os.environ.pop("TIKTOKEN_ENCODINGS_BASE", None)
    try:
        yield H.encoding(cache)
    finally:
        if saved is None:
            os.environ.pop("TIKTOKEN_ENCODINGS_BASE", None)
        else:
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = saved


def ids(enc, text: str) -> list[int]:
    """Token ids of text written with special-token names, e.g. '<|channel|>final<|message|>hi'."""
    return enc.encode(text, allowed_special="all")


def system(effort=oh.ReasoningEffort.MEDIUM, identity=None) -> oh.Message:
    content = oh.SystemContent.new().with_reasoning_effort(effort)
    if identity is not None:
        content = content.with_model_identity(identity)
    return oh.Message.from_role_and_content(oh.Role.SYSTEM, content)


def user(text):
    return oh.Message.from_role_and_content(oh.Role.USER, text)


def assistant(text, channel):
    return oh.Message.from_role_and_content(oh.Role.ASSISTANT, text).with_channel(channel)


def harmony_prompt(enc, messages, drop=False) -> list[int]:
    conv = oh.Conversation.from_messages(messages)
    return enc.render_conversation_for_completion(conv, oh.Role.ASSISTANT,
                                                  oh.RenderConversationConfig(auto_drop_analysis=drop))


# -- the vocabulary ------------------------------------------------------------------------------
def test_rebuilt_vocab_has_the_official_sha256(enc):
    path = H.cache_dir(os.environ["TIKTOKEN_ENCODINGS_BASE"]) / H.VOCAB_FILE
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == H.VOCAB_SHA256
    lines = data.splitlines()
    assert len(lines) == H.N_BPE and lines[0] == b"IQ== 0" and lines[-1].endswith(b" 199997")
    assert not [p for p in path.parent.iterdir() if p.name != H.VOCAB_FILE]  # no temporary files left


def test_damaged_vocab_is_rebuilt_and_a_wrong_build_is_refused(enc, tmp_path, monkeypatch):
    good = (H.cache_dir(os.environ["TIKTOKEN_ENCODINGS_BASE"]) / H.VOCAB_FILE).read_bytes()
    target = tmp_path / H.VOCAB_FILE
    target.write_bytes(good[:-10])
    monkeypatch.setattr(H, "_vocab_bytes", lambda: good)
    assert H.ensure_vocab(tmp_path) == target and target.read_bytes() == good

    target.write_bytes(b"damaged")
    monkeypatch.setattr(H, "_vocab_bytes", lambda: good.replace(b"IQ== 0", b"Ig== 0"))
    with pytest.raises(H.VocabError, match="sha256"):
        H.ensure_vocab(tmp_path)
    assert list(tmp_path.iterdir()) == []  # the damaged file is gone, nothing half-written left


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("OSS_JAX_CACHE", str(tmp_path))
    assert H.cache_dir() == tmp_path / "tiktoken"
    assert H.cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("OSS_JAX_CACHE")
    assert H.cache_dir() == H.Path.home() / ".cache" / "oss-jax" / "tiktoken"


def test_works_offline_from_an_empty_cache(tmp_path):
    """A fresh process with no vocabulary anywhere and no network: nothing is downloaded."""
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_ENCODINGS_BASE", "NO_PROXY", "no_proxy")}
    proxy = "http://127.0.0.1:9"  # nothing listens there: any download attempt fails
    env.update(OSS_JAX_CACHE=str(tmp_path / "cache"), TIKTOKEN_RS_CACHE_DIR=str(tmp_path / "rs-cache"),
               HF_HUB_OFFLINE="1", HTTPS_PROXY=proxy, HTTP_PROXY=proxy, ALL_PROXY=proxy, https_proxy=proxy,
               http_proxy=proxy, all_proxy=proxy)
    # oss_jax.harmony is loaded from its file, skipping oss_jax/__init__.py (and seconds of importing jax)
    code = ("import importlib.util as u, json, os, sys; s = u.spec_from_file_location('h', sys.argv[1]); "
            "H = sys.modules['h'] = u.module_from_spec(s); s.loader.exec_module(H); "
            "print(json.dumps([H.decode(H.render('Hi')), os.environ['TIKTOKEN_ENCODINGS_BASE']]))")
    out = subprocess.run([sys.executable, "-c", code, H.__file__], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text, base = json.loads(out.stdout.splitlines()[-1])
    assert text.startswith(SPEC_SYSTEM) and text.endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant")
    assert base == str(tmp_path / "cache" / "tiktoken")
    assert (tmp_path / "cache" / "tiktoken" / H.VOCAB_FILE).is_file()
    assert not (tmp_path / "rs-cache").exists() or not any((tmp_path / "rs-cache").iterdir())


# -- token ids -----------------------------------------------------------------------------------
def test_special_token_ids_agree_with_the_encoding(enc):
    for name, i in H.SPECIAL_TOKENS.items():
        assert ids(enc, name) == [i] and H.decode([i]) == name
    assert [H.START, H.END, H.MESSAGE, H.CHANNEL, H.RETURN, H.CALL, H.CONSTRAIN, H.ENDOFTEXT, H.STARTOFTEXT] == [
        200006, 200007, 200008, 200005, 200002, 200012, 200003, 199999, 199998]
    assert H.STOP_TOKENS == (H.RETURN, H.CALL)
    assert set(H.STOP_TOKENS) == set(enc.stop_tokens_for_assistant_actions())  # openai-harmony's order varies
    assert H.decode([H.VOCAB_SIZE - 1]) == "<|reserved_201087|>"
    assert enc.is_special_token(200100) and not enc.is_special_token(H.STARTOFTEXT - 1)


def test_encode_decode(enc):
    text = "Hello, world! Grüße 👋 <|start|>"
    tokens = H.encode(text)
    assert H.START not in tokens and H.decode(tokens) == text  # special names in text stay text
    assert H.decode(np.array(tokens)) == text
    assert H.decode([-1, *H.encode("a"), H.VOCAB_SIZE, 10**30]) == "\ufffda\ufffd\ufffd"
    assert H.decode([]) == ""


# -- rendering -----------------------------------------------------------------------------------
def test_system_message_is_the_one_in_the_spec(enc):
    assert H.decode(H.render("Hi")).startswith(SPEC_SYSTEM + "<|start|>user")


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_render_equals_openai_harmony(enc, effort):
    level = H.EFFORTS[effort]
    turns = [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}]
    expected = [oh.Message.from_role_and_content(oh.Role.DEVELOPER,
                                                 oh.DeveloperContent.new().with_instructions("Answer in French.")),
                user("2+2?"), assistant("4", "final"), user("3+3?")]
    assert H.render(turns, effort) == harmony_prompt(enc, [system(level), *expected])
    assert f"Reasoning: {effort}\n" in H.decode(H.render(turns, effort))
    # a system message's text is the model identity; the effort still applies
    mine = [{"role": "system", "content": "You are a pirate."}, *turns]
    assert H.render(mine, effort) == harmony_prompt(enc, [system(level, "You are a pirate."), *expected])
    # without a generation prompt: openai-harmony's render_conversation
    conv = oh.Conversation.from_messages([system(level), *expected])
    assert H.render(turns, effort, add_generation_prompt=False) == enc.render_conversation(
        conv, oh.RenderConversationConfig(auto_drop_analysis=False))
    assert H.render("2+2?", effort) == harmony_prompt(enc, [system(level), user("2+2?")])


def test_prompt_ends_with_start_assistant(enc):
    assert H.render("Hi")[-2:] == [H.START, *H.encode("assistant")]
    assert H.render("Hi", add_generation_prompt=False)[-1] == H.END


def test_render_messages_round_trip_and_tools(enc):
    call = H.Message("assistant", '{"city":"Paris"}', "commentary", recipient="functions.weather")
    result = {"role": "tool", "name": "functions.weather", "content": "20C", "channel": "commentary",
              "recipient": "assistant"}
    text = H.decode(H.render([{"role": "user", "content": "Weather?"}, call, result]))
    assert text.endswith("<|start|>assistant to=functions.weather<|channel|>commentary<|message|>"
                         '{"city":"Paris"}<|call|><|start|>functions.weather to=assistant<|channel|>commentary'
                         "<|message|>20C<|end|><|start|>assistant")


@pytest.mark.parametrize("bad", [[{"role": "robot", "content": "x"}], [{"role": "user"}],
                                 [{"role": "user", "content": 3}], [{"role": "tool", "content": "x"}],
                                 [{"role": "user", "content": "x", "extra": 1}]])
def test_render_rejects_bad_messages(enc, bad):
    with pytest.raises(ValueError):
        H.render(bad)
    with pytest.raises(ValueError, match="effort"):
        H.render("Hi", effort="extreme")


def test_history_rule(enc):
    """Analysis before the last final answer is dropped; the current turn's analysis is kept."""
    a1, f1, a2, f2 = assistant("a1", "analysis"), assistant("f1", "final"), assistant("a2", "analysis"), \
        assistant("f2", "final")
    as_dicts = lambda ms: [{"role": m.author.role.value, "content": m.content[0].text, "channel": m.channel}
                           for m in ms]
    # one finished turn: what openai-harmony's own auto_drop_analysis does too
    conv = [user("q1"), a1, f1, user("q2")]
    assert H.render(as_dicts(conv)) == harmony_prompt(enc, [system(), *conv], drop=True) \
        == harmony_prompt(enc, [system(), user("q1"), f1, user("q2")])
    # two finished turns: both analyses go (openai-harmony 0.0.8 drops only the first)
    conv = [user("q1"), a1, f1, user("q2"), a2, f2, user("q3")]
    assert H.render(as_dicts(conv)) == harmony_prompt(enc, [system(), user("q1"), f1, user("q2"), f2, user("q3")])
    # an ongoing turn keeps its own analysis (e.g. between a tool call and its result)
    conv = [user("q1"), a1, f1, user("q2"), a2]
    assert H.render(as_dicts(conv)) == harmony_prompt(enc, [system(), user("q1"), f1, user("q2"), a2])
    text = H.decode(H.render(as_dicts(conv), add_generation_prompt=False))
    assert "a1" not in text and text.endswith("<|channel|>analysis<|message|>a2<|end|>")


# -- parsing -------------------------------------------------------------------------------------
def test_parse_well_formed(enc):
    out = ids(enc, "<|channel|>analysis<|message|>2 plus 2 is 4.<|end|>"
                   "<|start|>assistant<|channel|>final<|message|>4<|return|>")
    assert H.parse(out) == H.parse(out, strict=True) == [H.Message("assistant", "2 plus 2 is 4.", "analysis"),
                                                         H.Message("assistant", "4", "final")]
    assert H.parse(np.array(out)) == H.parse(out)
    reply = H.Reply.from_tokens(out)
    assert (reply.analysis, reply.final, reply.tokens) == ("2 plus 2 is 4.", "4", out)
    assert reply.messages == H.parse(out)
    # a tool call ends with <|call|>
    call = ids(enc, "<|channel|>commentary to=functions.weather <|constrain|>json<|message|>{}<|call|>")
    assert H.parse(call) == [H.Message("assistant", "{}", "commentary", recipient="functions.weather")]
    assert H.Reply.from_tokens(call).final == ""


def test_parse_truncated(enc):
    out = ids(enc, "<|channel|>analysis<|message|>Let me think<|end|><|start|>assistant<|channel|>final"
                   "<|message|>The answer is")
    assert H.parse(out) == [H.Message("assistant", "Let me think", "analysis"),
                            H.Message("assistant", "The answer is", "final")]
    # cut inside the second header: that message had not started yet
    second, body = out.index(H.START), len(out) - out[::-1].index(H.MESSAGE) - 1
    for cut in range(second + 1, body):
        assert H.parse(out[:cut]) == [H.Message("assistant", "Let me think", "analysis")]
        reply = H.Reply.from_tokens(out[:cut])
        assert (reply.analysis, reply.final) == ("Let me think", "")
    assert H.parse(out[:body + 1])[-1] == H.Message("assistant", "", "final")  # begun, nothing written yet
    # cut inside the first header
    assert H.parse(out[:1]) == [] and H.parse(out[:2]) == []


def test_parse_empty(enc):
    assert H.parse([]) == [] and H.parse(np.zeros(0, np.int32)) == []
    assert H.Reply.from_tokens([]) == H.Reply("", "", [], [])


def test_parse_text_without_a_header_is_final(enc):
    reply = H.Reply.from_tokens(H.encode("Just text."))
    assert reply.messages == [H.Message("assistant", "Just text.")] and reply.final == "Just text."


def test_parse_garbage_never_raises(enc):
    rng = np.random.default_rng(0)
    specials = [H.START, H.END, H.MESSAGE, H.CHANNEL, H.RETURN, H.CALL, H.CONSTRAIN, H.ENDOFTEXT, 200100, 201087]
    for n in [1, 2, 5, 50, 300] * 20:
        tokens = rng.integers(0, H.VOCAB_SIZE, n)
        mask = rng.random(n)
        tokens = np.where(mask < 0.3, rng.choice(specials, n), tokens)
        tokens = np.where(mask > 0.97, rng.integers(H.VOCAB_SIZE, 10**6, n), tokens)  # beyond the vocabulary
        tokens = np.where((mask > 0.95) & (mask <= 0.97), -rng.integers(1, 5, n), tokens)
        reply = H.Reply.from_tokens(tokens)
        assert isinstance(reply.final, str) and isinstance(reply.analysis, str)
        assert all(isinstance(m.content, str) and isinstance(m.role, str) for m in reply.messages)
    # random ordinary ids: all of it is text without a channel, i.e. the final answer
    tokens = rng.integers(0, H.STARTOFTEXT, 40)
    assert H.Reply.from_tokens(tokens).final == H.decode(tokens)


@pytest.mark.parametrize("text,expected", [
    ("<|channel|>final<|message|>a<|return|>xyz", [("a", "final"), ("xyz", None)]),  # text after a stop token
    ("<|end|>abc<|message|>def", [("def", None)]),
    ("<|channel|>final<|message|>x<|reserved_200100|>y<|end|>", [("x<|reserved_200100|>y", "final")]),
    ("<|channel|>final<|message|>a<|return|><|start|>assistant<|channel|>final<|message|>b",
     [("a", "final"), ("b", "final")]),
    ("<|channel|>final hello<|end|><|start|>assistant<|channel|>analysis<|message|>t",  # openai-harmony's guess
     [("hello", "final"), ("t", "analysis")]),
    ("<|channel|>final hello<|end|><|start|>assistant<|channel|>analysis<|message|>t<|return|>x<|start|>",
     [("<|channel|>final hello", None), ("t", "analysis"), ("x", None)]),
])
def test_parse_malformed_leniently(enc, text, expected):
    assert [(m.content, m.channel) for m in H.parse(ids(enc, text))] == expected


def test_parse_ids_out_of_range(enc):
    out = [H.VOCAB_SIZE + 5, *ids(enc, "<|channel|>final<|message|>ok<|return|>"), -1, 2**70]
    assert H.parse(out) == [H.Message("assistant", "ok", "final"), H.Message("assistant", "\ufffd\ufffd")]
    with pytest.raises(ValueError, match="outside"):
        H.parse(out, strict=True)
    with pytest.raises(ValueError, match="malformed"):
        H.parse(ids(enc, "<|channel|>final<|message|>a<|return|>xyz"), strict=True)


def test_lenient_parser_agrees_with_openai_harmony_on_well_formed_output(enc):
    for text in ["<|channel|>analysis<|message|>t<|end|><|start|>assistant<|channel|>final<|message|>f<|return|>",
                 "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|call|>",
                 "<|channel|>final<|message|>cut off"]:
        assert H._parse_lenient(ids(enc, text)) == H.parse(ids(enc, text))
