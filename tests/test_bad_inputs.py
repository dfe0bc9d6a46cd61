"""The model-facing API refuses bad input with one clear line, before anything is cast or computed."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oss_jax
from oss_jax import harmony as H
from oss_jax.generate import check_sampling, generate, make_key
from oss_jax.trace import trace, trace_chunks
from oss_jax.vocab import TokenMap

GOOD = [H.START, H.MESSAGE]  # two o200k ids the tiny model knows


@pytest.fixture(scope="module")
def tiny():
    """The bundled model: o200k ids in, mapped to its own ids by its TokenMap."""
    return oss_jax.load("tiny")


@pytest.fixture(scope="module")
def dense(dense_dir):
    """A model without a token map: its own 1031 ids in."""
    return oss_jax.load(dense_dir, dtype="float32")


# -- 1. token ids: type, rank and range are checked before anything is cast or mapped -------------
BAD_TOKENS = [
    (np.array([[-2**32 + 23]]), ValueError, "tokens: token id -4294967273 is outside"),  # int32 cast: 23
    ([[2**70]], ValueError, "tokens: token id 1180591620717411303424 is outside"),  # beyond int64
    ([[1, 2**63]], ValueError, "tokens: token id 9223372036854775808 is outside"),  # numpy: float64
    (np.array([[1.0, 2.0]]), TypeError, "tokens must be integers, got float64"),
    (np.array([[True, False]]), TypeError, "tokens must be integers, got bool"),
    (np.zeros((1, 1, 2), np.int32), ValueError, r"tokens must be \[batch, time\], got shape \(1, 1, 2\)"),
    (np.array([[5, -1]]), ValueError, "tokens: token id -1 is outside"),
    ([[1, 2], [3]], ValueError, "tokens must be a rectangular array of integers"),
]


@pytest.mark.parametrize(("tokens", "error", "match"), BAD_TOKENS)
def test_model_refuses_bad_tokens(tiny, dense, tokens, error, match):
    for model in (tiny, dense):
        with pytest.raises(error, match=match):
            model(tokens)


def test_out_of_vocabulary_is_checked_in_the_callers_ids(tiny, dense):
    with pytest.raises(ValueError, match=r"tokens: token id 201088 is outside the vocabulary \[0, 201088\)"):
        tiny([[201088]])
    with pytest.raises(ValueError, match=r"tokens: token id 1031 is outside the vocabulary \[0, 1031\)"):
        dense([[1031]])
    with pytest.raises(ValueError, match="tokens: token id -5 is outside"):
        tiny.model_ids([[-5]])  # the public map refuses what the user gives; padding is generate's own
    with pytest.raises(TypeError, match="tokens must be integers, got float64"):
        tiny.model_ids([2.5])
    np.testing.assert_array_equal(tiny.model_ids([GOOD]), tiny.token_map.to_model([GOOD]))


def test_token_map_checks_before_it_casts(tiny):
    tmap: TokenMap = tiny.token_map
    with pytest.raises(ValueError, match="token id -4294967273 is below int32"):
        tmap.to_model([-2**32 + 23])  # was read as id 23
    with pytest.raises(TypeError, match="tokens must be integers, got float64"):
        tmap.to_model([1.5])
    with pytest.raises(TypeError, match="got bool"):
        tmap.to_model(np.array([True]))
    with pytest.raises(ValueError, match="token id 1180591620717411303424 is outside o200k_harmony"):
        tmap.to_model([2**70])
    n = len(tmap)  # one past the last model id
    with pytest.raises(ValueError, match=f"model ids: token id {n} is outside this model's vocabulary"):
        tmap.to_o200k([n])  # was read as the last model id
    assert tmap.to_o200k([n - 1])[0] == tmap.o200k[-1]
    np.testing.assert_array_equal(tmap.to_model([-1, GOOD[0]])[0], -1)  # padding still passes through


def test_a_mapped_model_refuses_tracers(tiny):
    with pytest.raises(TypeError, match="maps o200k ids to its own on the host"):
        jax.jit(lambda t: tiny(t))(jnp.asarray([GOOD]))


@pytest.mark.parametrize(("tokens", "error", "match"), BAD_TOKENS[:5])
def test_trace_and_generate_refuse_bad_tokens(tiny, tokens, error, match):
    with pytest.raises(error, match=match):
        trace(tiny, tokens)
    name = "tokens" if isinstance(tokens, np.ndarray) else "prompt 0"
    with pytest.raises(error, match=match.replace("tokens: ", f"{name}: ")):
        generate(tiny, tokens, max_new_tokens=2)


def test_generate_checks_every_prompt_before_mapping_any(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # id 1 is not in the tiny vocabulary: mapping it would warn
        with pytest.raises(ValueError, match="prompt 1: token id -1 is outside"):
            generate(tiny, [[1], [-1, GOOD[0]]], max_new_tokens=2)
        with pytest.raises(ValueError, match="prompt 1 must hold at least one token"):
            generate(tiny, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="flat list of ids; pass \\[tokens\\] for one prompt"):
        generate(tiny, GOOD, max_new_tokens=2)  # was: two prompts of one token each
    with pytest.raises(ValueError, match=r"got an array of shape \(2,\); pass \[prompt\]"):
        generate(tiny, np.array(GOOD), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompt 0 must be \[time\], got shape \(1, 2\)"):
        generate(tiny, [[GOOD]], max_new_tokens=2)


def test_trace_refuses_bad_rank(tiny):
    with pytest.raises(ValueError, match=r"tokens must be \[T\] or \[batch, time\], got shape \(1, 1, 2\)"):
        trace(tiny, np.zeros((1, 1, 2), np.int64))
    with pytest.raises(ValueError, match=r"trace_chunks takes one sequence \[T\]"):
        trace_chunks(tiny, [GOOD])


# -- 2. attention windows: clipped to the traced positions; negative or reversed refused ----------
def test_attention_window_is_clipped_to_the_traced_positions(tiny):
    tokens = tiny.token_map.o200k[1:6]  # five known ids
    huge = trace(tiny, tokens, attention_window=(0, 10**6))  # was a million-wide window (8.5 GB)
    assert huge.attention.shape == (4, 5, 4, 5)
    np.testing.assert_array_equal(huge.attention_keys, np.arange(5))
    exact = trace(tiny, tokens, attention_window=(0, 5))  # the same recording: no new compilation
    np.testing.assert_array_equal(huge.attention, exact.attention)
    # Both ends clip to the positions traced; padding (-1) and the last position of the context are fine.
    late = trace(tiny, tokens, positions=[-1, 131068, 131069, 131070, 131071], attention_window=(3, 10**6))
    np.testing.assert_array_equal(late.attention_keys, np.arange(131068, 131072))
    assert late.attention.shape == (4, 5, 4, 4) and np.isfinite(late.attention).all()
    assert next(trace_chunks(tiny, tokens, chunk=4, attention_window=(0, 10**6))).attention.shape == (4, 4, 4, 5)


def test_attention_window_outside_the_traced_positions_is_refused(tiny):
    tokens = tiny.token_map.o200k[1:4]
    with pytest.raises(ValueError, match=r"attention_window \(0, 50\) ends before the first traced position 100"):
        trace(tiny, tokens, positions=[100, 101, 102], attention_window=(0, 50))
    with pytest.raises(ValueError, match=r"attention_window \(0, 10\) spans 10 traced positions, more than the 3"):
        trace(tiny, tokens, positions=[0, 5, 9], attention_window=(0, 10))  # gaps: clipping alone does not bound it
    with pytest.raises(ValueError, match="positions are all -1"):
        trace(tiny, tokens, positions=[-1, -1, -1])


@pytest.mark.parametrize(("window", "error", "match"), [
    ((-1, 5), ValueError, "attention_window start must be at least 0, got -1"),
    ((4, 2), ValueError, r"0 <= start < stop, got \(4, 2\)"),
    ((3, 3), ValueError, r"0 <= start < stop, got \(3, 3\)"),
    ((5, 10), ValueError, r"attention_window \(5, 10\) starts past the last traced position 4"),
    ((0.5, 3), TypeError, "attention_window start must be an integer, got 0.5"),
    ((0, 3, 4), ValueError, "attention_window must be a pair"),
    (7, ValueError, "attention_window must be a pair"),
])
def test_bad_attention_windows_are_refused(tiny, window, error, match):
    tokens = tiny.token_map.o200k[1:6]
    with pytest.raises(error, match=match):
        trace(tiny, tokens, attention_window=window)
    with pytest.raises(error, match=match):
        trace_chunks(tiny, tokens, attention_window=window)  # when called, not at the first chunk


# -- 3. no tokens --------------------------------------------------------------------------------
def test_empty_tokens_are_refused(tiny, dense):
    for model in (tiny, dense):
        with pytest.raises(ValueError, match=r"tokens must hold at least one token, got shape \(1, 0\)"):
            model(np.zeros((1, 0), np.int32))  # was ZeroDivisionError
        with pytest.raises(ValueError, match=r"tokens must hold at least one token, got shape \(0, 3\)"):
            model(np.zeros((0, 3), np.int32))
        with pytest.raises(ValueError, match="tokens must hold at least one token"):
            trace(model, [])  # was ZeroDivisionError
        with pytest.raises(ValueError, match="tokens must hold at least one token"):
            trace_chunks(model, [])
        with pytest.raises(ValueError, match="prompt 1 must hold at least one token"):
            generate(model, [[1], []], max_new_tokens=2)
        with pytest.raises(ValueError, match="tokens must hold at least one prompt"):
            generate(model, [], max_new_tokens=2)


# -- 4. generate's arguments ---------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(prefill_chunk=0), ValueError, "prefill_chunk must be at least 1, got 0"),  # was range() arg 3
    (dict(prefill_chunk=-4), ValueError, "prefill_chunk must be at least 1, got -4"),
    (dict(prefill_chunk=2.0), TypeError, "prefill_chunk must be an integer, got 2.0"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an integer, got 2.5"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens must be an integer, got True"),
    (dict(max_new_tokens=-3), ValueError, "max_new_tokens must be at least 1, got -3"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be at least 1, got 0"),
    (dict(max_new_tokens=2**40), ValueError, "max_new_tokens must be at most 131071, got 1099511627776"),
    (dict(max_new_tokens=131071), ValueError, "prompt of 2 tokens \\+ 131071 new tokens exceeds the model's context"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a finite number >= 0 .* got nan"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a finite number >= 0 .* got inf"),
    (dict(temperature=-0.5), ValueError, "temperature must be a finite number >= 0 .* got -0.5"),
    (dict(temperature="0.7"), TypeError, "temperature must be a number, got '0.7'"),
    (dict(temperature=True), TypeError, "temperature must be a number, got True"),
    (dict(top_k=-1), ValueError, "top_k must be at least 0, got -1"),
    (dict(top_k=2**31), ValueError, "top_k must be at most 2147483647, got 2147483648"),  # was OverflowError
    (dict(top_k=3.0), TypeError, "top_k must be an integer, got 3.0"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\] \(1: no limit\), got 0.0"),
    (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\] .* got 1.5"),
    (dict(top_p=float("nan")), ValueError, r"top_p must be in \(0, 1\] .* got nan"),
    (dict(key=2**32), ValueError, r"key: a seed must be in \[0, 2\*\*32\) .* got 4294967296"),  # == seed 0
    (dict(key=-1), ValueError, r"key: a seed must be in \[0, 2\*\*32\) .* got -1"),
    (dict(key=2**70), ValueError, r"key: a seed must be in \[0, 2\*\*32\)"),
    (dict(key=1.5), TypeError, "key must be a jax PRNG key or an int seed, got 1.5"),
    (dict(key=jnp.ones(3)), TypeError, "key must be a jax PRNG key or an int seed"),
    (dict(stop_tokens=[2**40]), ValueError, "stop_tokens: token id 1099511627776 is outside the vocabulary"),
    (dict(stop_tokens=[201088]), ValueError, r"stop_tokens: token id 201088 is outside the vocabulary \[0, 201088\)"),
    (dict(stop_tokens=[-1]), ValueError, "stop_tokens: token id -1 is outside"),
    (dict(stop_tokens=[2.0]), TypeError, "stop_tokens must be integers, got float64"),
    (dict(stop_tokens=200002), TypeError, r"stop_tokens must be a sequence of token ids, got 200002; pass \[200002\]"),
    (dict(on_token="print"), TypeError, "on_token must be a callable or None"),
])
def test_generate_refuses_bad_arguments(tiny, kwargs, error, match):
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(error, match=match):
        generate(tiny, [GOOD], **kwargs)


def test_generate_accepts_the_edges(tiny):
    """The boundaries themselves are fine: top_p = 1, top_k at int32's max, seed 2**32 - 1, numpy scalars;
    a raw ``PRNGKey`` is the typed key with the same data. Padding (negative ids) stays generate's own."""
    np.testing.assert_array_equal(jax.random.key_data(make_key(jax.random.PRNGKey(5))),
                                  jax.random.key_data(make_key(5)))
    assert check_sampling(np.float32(0.5), np.int64(2**31 - 1), 1) == (0.5, 2**31 - 1, 1.0)
    out = generate(tiny, [GOOD, GOOD[:1]], max_new_tokens=np.int64(3), top_k=2**31 - 1, top_p=1, key=2**32 - 1,
                   stop_tokens=np.array([H.RETURN]))
    assert out.shape == (2, 3) and out.dtype == np.int32


def test_chat_passes_its_arguments_through_the_same_checks(tiny):
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0 .* got nan"):
        oss_jax.chat(tiny, "hi", temperature=float("nan"), max_new_tokens=2)
    with pytest.raises(TypeError, match=r"max_new_tokens must be an integer, got 2\.5"):
        oss_jax.chat(tiny, "hi", max_new_tokens=2.5)
    with pytest.raises(TypeError, match="on_text must be a callable or None, got str"):
        oss_jax.chat(tiny, "hi", max_new_tokens=2, on_text="print")


# -- 5. positions: trace refuses what model() refuses ----------------------------------------------
@pytest.mark.parametrize(("positions", "error", "match"), [
    ([0, 1, 131072], ValueError, "position 131072 is past the model's context of 131072"),
    ([0, 1, 2**40], ValueError, "position 1099511627776 is past the model's context"),
    ([-2, 0, 1], ValueError, r"position -2 is negative \(only -1, padding, is allowed\)"),
    ([0.0, 1.0, 2.0], TypeError, "positions must be integers, got float64"),
    ([0, 1], ValueError, r"positions must have the tokens' shape \(3,\), got \(2,\)"),
])
def test_trace_and_model_refuse_bad_positions(tiny, positions, error, match):
    tokens = tiny.token_map.o200k[1:4]
    with pytest.raises(error, match=match):
        trace(tiny, tokens, positions=positions)  # was: traced at any position
    with pytest.raises(error, match=match.replace(r"\(3,\)", r"\(1, 3\)").replace(r"\(2,\)", r"\(1, 2\)")):
        tiny(tokens[None], np.asarray(positions)[None])


# -- 6. chat messages ------------------------------------------------------------------------------
@pytest.mark.parametrize(("messages", "match"), [
    ("caf\udcff", r"message 0: text is not valid UTF-8 \(surrogates not allowed: '\\udcff' at character 3\)"),
    (b"caf\xff", r"message 0: text is not valid UTF-8 \(invalid start byte at byte 3\)"),
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": b"\xc3"}],
     r"message 1: text is not valid UTF-8 \(unexpected end of data at byte 0\)"),
    ([{"role": "system", "content": "\ud800"}], "message 0: text is not valid UTF-8"),
    ([{"role": "user", "content": "hi", "channel": "fi\udcffnal"}], "message 0: channel: text is not valid UTF-8"),
    ([{"role": "user", "content": "hi", "truncate": "false"}], r"message 0: .* got \['content', 'role', 'truncate'\]"),
    ([{"role": "user", "content": "hi", "channel": 3}], "message 0: channel must be a str, got int"),
    ([{"role": "tool", "content": "hi", "name": 3}], "message 0: name must be a str, got int"),
    ([{"role": ["user"], "content": "hi"}], r"message 0: unknown role \['user'\]"),
    (["hi"], "message 0: a message is a dict with 'role' and 'content', got str"),
    ({"role": "user", "content": "hi"}, "got one message: wrap it in a list"),
    (5, "messages must be a str or a list of messages, got int"),
])
def test_bad_messages_are_refused(tiny, messages, match):
    with pytest.raises(ValueError, match=match):
        H.render(messages)
    with pytest.raises(ValueError, match=match):
        oss_jax.chat(tiny, messages, max_new_tokens=2)


def test_text_that_is_not_utf8_is_not_silently_replaced():
    with pytest.raises(ValueError, match="encode: text is not valid UTF-8"):
        H.encode("a\udcff")  # was encoded as "a\ufffd"
    assert H.encode(b"caf\xc3\xa9") == H.encode("café")
    assert H.render(b"caf\xc3\xa9") == H.render("café")


# -- 7. an unwritable vocabulary cache -------------------------------------------------------------
def _unwritable_home(tmp_path, kind: str):
    if kind == "file":  # a HOME that is a file: no directory can be made under it, even by root
        home = tmp_path / "home"
        home.write_text("not a directory")
        return home
    home = tmp_path / "readonly-home"
    home.mkdir()
    home.chmod(0o500)
    return home


@pytest.mark.parametrize("kind", ["file", "readonly"])
def test_unwritable_default_cache_falls_back_to_a_temporary_directory(tmp_path, monkeypatch, kind):
    if kind == "readonly" and os.geteuid() == 0:
        pytest.skip("root writes into read-only directories; the 'file' case covers this as root")
    good = H.ensure_vocab().read_bytes()  # the session's cache (OSS_JAX_CACHE set by conftest)
    monkeypatch.setattr(H, "_vocab_bytes", lambda: good)  # no 2 s rebuild
    monkeypatch.setattr(H, "_fallback", None)
    monkeypatch.delenv("OSS_JAX_CACHE")
    home = _unwritable_home(tmp_path, kind)
    monkeypatch.setenv("HOME", str(home))
    with pytest.warns(UserWarning, match=r"cannot write the vocabulary cache .*home/\.cache/oss-jax/tiktoken .*"
                                         r"set OSS_JAX_CACHE to a writable directory"):
        path = H.ensure_vocab()
    assert path.read_bytes() == good and "oss-jax-tiktoken-" in str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert H.ensure_vocab() == path  # the same fallback for the rest of the process, no new warning
    with pytest.raises(OSError, match=r"cannot write the vocabulary cache .*explicit .*: pass a writable directory"):
        H.ensure_vocab(home / "explicit")


def test_unwritable_home_end_to_end(tmp_path):
    """A fresh process with HOME unwritable and no OSS_JAX_CACHE encodes text; one warning says why and what to set."""
    env = {k: v for k, v in os.environ.items() if k not in ("OSS_JAX_CACHE", "TIKTOKEN_ENCODINGS_BASE")}
    env["HOME"] = str(_unwritable_home(tmp_path, "file"))
    r = subprocess.run([sys.executable, "-W", "default", "-c",
                        "from oss_jax import harmony; print(harmony.encode('hi there'))"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.strip() == str(H.encode("hi there"))
    assert "set OSS_JAX_CACHE to a writable directory" in r.stderr


# -- 8. non-finite logits --------------------------------------------------------------------------
def test_model_warns_on_non_finite_logits(dense):
    tokens = np.array([[1, 2, 3]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        dense(tokens)  # finite: no warning
    scale = dense.norm.scale[...]
    try:
        dense.norm.scale[...] = jnp.full_like(scale, jnp.nan)
        with pytest.warns(RuntimeWarning, match="the logits hold NaN or infinity"):
            dense(tokens)
    finally:
        dense.norm.scale[...] = scale
    assert np.isfinite(np.asarray(dense(tokens))).all()
