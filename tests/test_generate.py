"""Generation: token-identical to transformers, cache equals recomputation, sampling contracts."""

from __future__ import annotations

import logging
import threading

import jax
import numpy as np
import pytest
import reference as R
import torch
from flax import nnx

import oss_jax
from oss_jax.cache import KVCache
from oss_jax.generate import PAD, generate, left_pad
from oss_jax.model import compiled_apply


@pytest.fixture(scope="module")
def model(dense_dir):
    return oss_jax.load(dense_dir, dtype="float32")


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(7)
    return [rng.integers(1, R.TINY["vocab_size"], 23), rng.integers(1, R.TINY["vocab_size"], 9)]


def hf_generate(hf, prompts, n):
    T = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), T), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.as_tensor(p)
        mask[b, T - len(p):] = 1
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                          do_sample=False)
    return out[:, T:].numpy()


def test_greedy_matches_transformers(model, hf_tiny, prompts):
    """Two prompt lengths (left padding), 40 new tokens: 63 positions, four sliding windows of 16."""
    ours = generate(model, prompts, max_new_tokens=40)
    assert ours.shape == (2, 40) and ours.dtype == np.int32
    np.testing.assert_array_equal(ours, hf_generate(hf_tiny, prompts, 40))


def test_chunked_prefill_and_streaming_agree(model, prompts):
    whole = generate(model, prompts, max_new_tokens=12)
    seen = []
    streamed = generate(model, prompts, max_new_tokens=12, prefill_chunk=5, on_token=seen.append)
    np.testing.assert_array_equal(whole, streamed)
    np.testing.assert_array_equal(np.stack(seen, axis=1), streamed)


def test_sampled_streaming_agrees_with_the_device_loop(model, prompts):
    """The per-token step (streaming) and the on-device loop draw from the same key sequence."""
    loop = generate(model, prompts, max_new_tokens=10, temperature=1.0, key=4)
    streamed = generate(model, prompts, max_new_tokens=10, temperature=1.0, key=4, on_token=lambda t: None)
    np.testing.assert_array_equal(loop, streamed)


def test_token_loop_is_compiled_once(model, prompts, caplog):
    """``generate`` compiles its token loop on a second thread during the prefill: the call after
    the prefill must find that program, not compile the loop a second time."""
    caplog.set_level(logging.WARNING)
    before = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)  # globally: the `with` form is per thread
    try:
        generate(model, prompts, max_new_tokens=23)  # a length no other test uses: a new program
    finally:
        jax.config.update("jax_log_compiles", before)
    done = [r for r in caplog.records if "XLA compilation of jit(_decode_loop)" in r.getMessage()]
    assert len(done) == 1, [r.getMessage() for r in done]
    assert done[0].thread != threading.get_ident()  # compiled by the warm-up thread, not here


def test_cached_decode_equals_recomputation(model):
    """Logits of every decode step equal a full forward pass over the whole sequence, also after
    the 16-slot ring buffers have wrapped several times."""
    rng = np.random.default_rng(3)
    seq = rng.integers(0, R.TINY["vocab_size"], (2, 60)).astype(np.int32)
    cfg = model.config
    cache = KVCache.create(cfg, 2, 60, dtype=np.float32)
    full = np.asarray(model(seq))
    pos = np.broadcast_to(np.arange(60, dtype=np.int32), (2, 60))
    graphdef, state = nnx.split(model)
    logits, cache = compiled_apply(graphdef, state, seq[:, :8], pos[:, :8], cache)  # prefill 8
    assert R.rel_err(np.asarray(logits), full[:, :8]) < 1e-5
    for t in range(8, 60):
        logits, cache = compiled_apply(graphdef, state, seq[:, t:t + 1], pos[:, t:t + 1], cache)
        assert R.rel_err(np.asarray(logits[:, 0]), full[:, t]) < 1e-5, t
    ring = cache.layers[0]
    assert ring.ring and ring.k.shape[1] == cfg.sliding_window
    assert sorted(np.asarray(ring.pos[0]).tolist()) == list(range(60 - 16, 60))
    assert not cache.layers[1].ring and cache.layers[1].k.shape[1] == 60
    assert "ring" in repr(cache) and "16/16" in repr(cache)


def test_last_only_of_a_padded_chunk_is_its_last_real_token(model):
    """``last_only``: the logits of each row's last real column, also in a right-padded chunk (the prefill's
    last piece), so the prefill never computes a whole chunk's logits; and the prefill's result is the
    full forward pass's last logits."""
    from oss_jax.generate import padded_chunks, prefill

    rng = np.random.default_rng(4)
    seq = rng.integers(0, R.TINY["vocab_size"], (2, 13)).astype(np.int32)
    pos = np.broadcast_to(np.arange(13, dtype=np.int32), (2, 13))
    full = np.asarray(model(seq))
    (piece, piece_pos, n), = padded_chunks(seq, pos, 16)  # 13 real columns, 3 of padding
    assert n == 13 and piece.shape == (2, 16)
    graphdef, state = nnx.split(model)
    logits, _ = compiled_apply(graphdef, state, piece, piece_pos, None, last_only=True)
    assert logits.shape == (2, 1, model.config.vocab_size)
    assert R.rel_err(np.asarray(logits[:, 0]), full[:, 12]) < 1e-5
    last, _ = prefill(graphdef, state, seq, pos, KVCache.create(model.config, 2, 16, dtype=np.float32), 5)
    assert R.rel_err(np.asarray(last), full[:, 12]) < 1e-5  # chunks of 5, 5 and 3 (+2 padding)


def test_forward_is_a_deprecated_alias_of_compiled_apply(model):
    """``model.forward`` (kept one release for notebooks and scripts) warns and is ``compiled_apply``;
    ``model()`` is the same program after its checks."""
    seq = np.arange(1, 9, dtype=np.int32)[None]
    pos = np.arange(8, dtype=np.int32)[None]
    with pytest.warns(DeprecationWarning, match="GptOss.forward is deprecated: use model"):
        old, _ = model.forward(seq, pos)
    new, _ = compiled_apply(*nnx.split(model), seq, pos)
    np.testing.assert_array_equal(np.asarray(old), np.asarray(new))
    np.testing.assert_array_equal(np.asarray(model(seq)), np.asarray(new))


def test_stop_tokens_pad_the_rest(model, prompts):
    free = generate(model, prompts, max_new_tokens=20)
    stop = int(free[0, 4])
    out = generate(model, prompts, max_new_tokens=20, stop_tokens=(stop,))
    first = int(np.argmax(free[0] == stop))
    np.testing.assert_array_equal(out[0, :first + 1], free[0, :first + 1])
    assert (out[0, first + 1:] == PAD).all()
    row1_stop = np.flatnonzero(free[1] == stop)
    end = row1_stop[0] + 1 if len(row1_stop) else 20
    np.testing.assert_array_equal(out[1, :end], free[1, :end])


def test_sampling_is_reproducible_and_restricted(model, prompts):
    a = generate(model, prompts, max_new_tokens=15, temperature=1.0, key=1)
    b = generate(model, prompts, max_new_tokens=15, temperature=1.0, key=1)
    c = generate(model, prompts, max_new_tokens=15, temperature=1.0, key=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = generate(model, prompts, max_new_tokens=15)
    np.testing.assert_array_equal(generate(model, prompts, max_new_tokens=15, temperature=1.0, top_k=1), greedy)
    np.testing.assert_array_equal(generate(model, prompts, max_new_tokens=15, temperature=0.7, top_p=1e-6),
                                  greedy)


def test_sample_top_p_keeps_the_nucleus():
    import jax

    from oss_jax.generate import sample

    # 400 identical rows drawn at once: every row is an independent draw.
    logits = np.repeat(np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)), 400, axis=0)
    draw = jax.jit(sample)
    assert set(np.asarray(draw(logits, jax.random.key(0), 1.0, 0, 0.7)).tolist()) == {0, 1}
    assert set(np.asarray(draw(logits, jax.random.key(1), 1.0, 3, 1.0)).tolist()) == {0, 1, 2}
    assert set(np.asarray(draw(logits, jax.random.key(2), 1.0, 0, 1.0)).tolist()) == {0, 1, 2, 3}
    assert set(np.asarray(draw(logits, jax.random.key(3), 0.0, 0, 1.0)).tolist()) == {0}


def test_left_pad():
    tokens, pos = left_pad([[5, 6, 7], [9]])
    np.testing.assert_array_equal(tokens, [[5, 6, 7], [0, 0, 9]])
    np.testing.assert_array_equal(pos, [[0, 1, 2], [-1, -1, 0]])


def test_context_overflow_refused_before_work(model):
    with pytest.raises(ValueError, match="exceeds the model's context of 2048"):
        generate(model, np.zeros((1, 2000), np.int32), max_new_tokens=100)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, 5000]], max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], max_new_tokens=2)


def test_long_prompt_blockwise_matches_transformers(model, hf_tiny):
    """1100 tokens: past NAIVE_MAX, so self-attention runs blockwise (sliding layers on their band)
    and chunked prefill attends to the cache blockwise; both agree with transformers."""
    from oss_jax import model as model_lib

    T = 1100
    assert T * T > model_lib.NAIVE_MAX
    seq = np.random.default_rng(11).integers(0, R.TINY["vocab_size"], (1, T)).astype(np.int32)
    ref = R.hf_logits(hf_tiny, seq)
    assert R.rel_err(np.asarray(model(seq)), ref) < 1e-4
    ours = generate(model, seq, max_new_tokens=4, prefill_chunk=1024)
    np.testing.assert_array_equal(ours, hf_generate(hf_tiny, [seq[0]], 4))


@pytest.mark.parametrize("bf16_kernel", [False, True], ids=["xla", "native"])
def test_decode_loop_holds_no_more_than_one_step(monkeypatch, bf16_kernel):
    """XLA compiles the token loop with the working memory of one step: the weights' float32 conversions are
    not hoisted out of the loop (all layers' copies at once), and the unembedding is converted a slice at a
    time (``kernels.logits``); with the native bf16 kernel (``kernels.linear``, where it builds) there are no
    such copies at all. Measured by XLA's memory analysis of both programs, on abstract weights in bf16 with a
    vocabulary large enough that its float32 copy would dominate."""
    import importlib

    import jax.numpy as jnp

    from oss_jax.config import GPT_OSS_20B
    from oss_jax.kernels import linear
    from oss_jax.kernels import logits as fast_logits
    from oss_jax.model import GptOss

    G = importlib.import_module("oss_jax.generate")
    monkeypatch.setattr(fast_logits, "SLICE_BYTES", 1 << 20)  # 20 slices of this vocabulary
    if not bf16_kernel:
        monkeypatch.setattr(linear, "MAX_ROWS", 0)  # XLA's products, whatever the machine has
    cfg = GPT_OSS_20B.replace(num_hidden_layers=4, hidden_size=256, intermediate_size=256, num_experts=8,
                              layer_types=GPT_OSS_20B.layer_types[:4], vocab_size=20000, quant_method="mxfp4")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GptOss(cfg, packed=True, dtype=jnp.bfloat16)))
    cache = jax.eval_shape(lambda: KVCache.create(cfg, 1, 256, jnp.bfloat16))
    sds = jax.ShapeDtypeStruct
    key = jax.eval_shape(lambda: jax.random.key(0))
    logits, stop, done = sds((1, cfg.vocab_size), np.float32), sds((1,), np.int32), sds((1,), bool)
    step = G._decode_step.lower(graphdef, state, cache, logits, key, done, stop, 0.0, 0, 1.0, greedy=True)
    loop = G._decode_loop.lower(graphdef, state, cache, logits, key, stop, sds((), np.int32), 0.0, 0, 1.0,
                                size=8, greedy=True)
    temp = {name: c.compile().memory_analysis().temp_size_in_bytes for name, c in (("step", step), ("loop", loop))}
    weights = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state))
    unembed_f32 = cfg.vocab_size * cfg.hidden_size * 4
    assert temp["step"] < unembed_f32 / 4, temp  # not a whole float32 copy
    assert temp["loop"] <= temp["step"] + (1 << 20), (temp, weights)  # the loop adds at most its carry
