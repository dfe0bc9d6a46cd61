"""LoRA (``oss_jax.lora``) and fine-tuning (``oss_jax.finetune``, ``oss-jax finetune``).

The expert-parallel check runs in a subprocess with 4 simulated CPU devices (JAX reads
``XLA_FLAGS`` once, at import), with this file as its script, as ``test_sharding.py`` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

TOL = 1e-5  # max |diff| / max |grad|, float32: packed vs dense, each dispatch vs the reference; measured <= 2e-6
MODES = ("reference", "dense", "gather", "sorted", "ragged", "scan")
ALL = "attn,experts,router"
EP_MODES = ("gather", "sorted", "ragged")


# -- helpers (also used by the subprocess) ---------------------------------------------------------
def randomize(model, seed: int = 0) -> None:
    """Give every adapter's B random values (``add`` starts them at 0, where A gets no gradient)."""
    import jax
    from flax import nnx

    from oss_jax import lora

    for path, var in nnx.iter_graph(model):
        name, leaf = ".".join(map(str, path)), str(path[-1]) if path else ""
        if isinstance(var, lora.Adapter) and ("_B_" in leaf or leaf.startswith("B")):
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            old = var.get_value()
            value = (0.2 * rng.standard_normal(old.shape)).astype(np.float32)
            var.set_value(jax.device_put(value, old.sharding))


def lora_grads(model, tokens, mode: str) -> dict[str, np.ndarray]:
    """Gradients of a next-token loss with respect to the adapters, by dotted path, under ``mode``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from oss_jax import lora

    model.set_attributes(impl="reference" if mode == "reference" else "fast",
                         dispatch="auto" if mode == "reference" else mode)
    graphdef, adapters, rest = nnx.split(model, lora.Adapter, ...)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1] - 1), (tokens.shape[0], tokens.shape[1] - 1))

    def loss(adapters):
        logits, _ = nnx.merge(graphdef, adapters, rest).apply(tokens[:, :-1], positions)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    grads = jax.jit(jax.grad(loss))(adapters)
    model.set_attributes(impl="fast", dispatch="auto")
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def adapted(path, experts: str = "auto", mesh=None, targets: str = ALL):
    import oss_jax
    from oss_jax import lora

    model = oss_jax.load(path, dtype="float32", experts=experts, mesh=mesh)
    lora.add(model, lora.LoraConfig(rank=4, alpha=8.0, targets=targets, seed=3))
    randomize(model)
    return model


# -- the expert-parallel subprocess ----------------------------------------------------------------
def run_parallel(job: Path) -> None:
    """4 devices, mesh (data 1, expert 2, tensor 2): adapter gradients of the sharded packed model in each
    EP mode, and of the single-device dense one (reference), written to ``job/grads.npz``."""
    from oss_jax import sharding

    ckpt = (job / "ckpt.txt").read_text()
    tokens = np.load(job / "tokens.npy")
    out = {f"single/{k}": v for k, v in lora_grads(adapted(ckpt, "dense"), tokens, "reference").items()}
    mesh = sharding.make_mesh(data=1, expert=2, tensor=2)
    model = adapted(ckpt, mesh=mesh)
    shards = model.layers[0].mlp.experts.lora.B1_ErF2.get_value().addressable_shards
    out["b1_shard_shape"] = np.array(sorted({tuple(s.data.shape) for s in shards}))
    for mode in EP_MODES:
        grads = lora_grads(model, sharding.shard_batch(tokens, mesh), mode)
        out.update({f"{mode}/{k}": v for k, v in grads.items()})
    np.savez(job / "grads.npz", **out)


if __name__ == "__main__":
    run_parallel(Path(sys.argv[1]))
    sys.exit(0)


# -- tests -----------------------------------------------------------------------------------------
import reference as R  # noqa: E402
from flax import nnx  # noqa: E402
from test_errors import cli, one_line  # noqa: E402

import oss_jax  # noqa: E402
from oss_jax import data, finetune, harmony, lora  # noqa: E402
from oss_jax.checkpoint import CheckpointError  # noqa: E402
from oss_jax.vocab import TokenMap  # noqa: E402


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory) -> Path:
    """An MXFP4 checkpoint of the test shapes with 2 layers (one sliding, one full): half the compile time."""
    return R.save_mxfp4(R.hf_model(seed=0, num_hidden_layers=2), tmp_path_factory.mktemp("lora") / "mxfp4")


@pytest.fixture(scope="module")
def short_tokens():
    return np.random.default_rng(1).integers(0, R.TINY["vocab_size"], (2, 25)).astype(np.int32)


@pytest.fixture(scope="module")
def reference_grads(two_layers, short_tokens):
    """The adapters' gradients through the experts decoded to dense, by the reference math."""
    return lora_grads(adapted(two_layers, "dense"), short_tokens, "reference")


@pytest.mark.parametrize("mode", MODES)
def test_grads_through_packed_experts_equal_dense(mode, two_layers, short_tokens, reference_grads):
    packed = adapted(two_layers)
    assert packed.layers[0].mlp.experts.packed
    dense = lora_grads(adapted(two_layers, "dense"), short_tokens, mode)
    got = lora_grads(packed, short_tokens, mode)
    assert set(got) == set(reference_grads) and any(".experts.lora." in k for k in got)
    for name, ref in reference_grads.items():
        assert np.max(np.abs(ref)) > 0, name  # every adapter is in the loss's path
        assert rel(got[name], dense[name]) < TOL, (name, rel(got[name], dense[name]))
        assert rel(got[name], ref) < TOL, (name, rel(got[name], ref))


def test_grads_expert_parallel_equal_single_device(tmp_path):
    ckpt = R.save_mxfp4(R.hf_model(seed=1, num_hidden_layers=2, num_local_experts=8), tmp_path / "mxfp4_8")
    (tmp_path / "ckpt.txt").write_text(str(ckpt))
    tokens = np.random.default_rng(2).integers(0, R.TINY["vocab_size"], (2, 20)).astype(np.int32)
    np.save(tmp_path / "tokens.npy", tokens)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4")
    r = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = dict(np.load(tmp_path / "grads.npz"))
    assert [list(s) for s in out["b1_shard_shape"]] == [[4, 4, 64]]  # 8 experts / 2, 2F = 128 / 2: split both ways
    single = {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith("single/")}
    assert any(".experts.lora." in k for k in single)
    for mode in EP_MODES:
        for name, ref in single.items():
            assert rel(out[f"{mode}/{name}"], ref) < TOL, (mode, name, rel(out[f"{mode}/{name}"], ref))


@pytest.mark.parametrize("mode", ("gather", "sorted", "ragged", "scan"))
def test_backward_keeps_no_copy_of_the_experts(mode):
    """What the backward pass keeps of the packed experts: the packed bytes themselves (inputs), never a
    decoded expert nor a per-tile copy of the weights; the rest is about the size of the tokens."""
    import contextlib
    import io

    import jax.numpy as jnp
    from jax.ad_checkpoint import print_saved_residuals

    from oss_jax.config import Config
    from oss_jax.moe import Experts

    cfg = Config(vocab_size=10, hidden_size=128, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, num_experts=4, experts_per_token=2, sliding_window=8)
    experts = Experts(cfg, packed=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
    experts.lora = lora.ExpertsLora(cfg, lora.LoraConfig(targets="experts"), np.random.default_rng(0))
    experts.dispatch = mode
    x, idx, gates = jnp.ones((6, 128)), jnp.array([[0, 1], [2, 3]] * 3), jnp.full((6, 2), 0.5)
    graphdef, adapters, rest = nnx.split(experts, lora.Adapter, ...)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(lambda a: jnp.sum(nnx.merge(graphdef, a, rest)(x, idx, gates)), adapters)
    sizes = {"f32": 4, "i32": 4, "u8": 1, "bool": 1}
    made = 0  # bytes of residuals computed in the forward pass (not the weights or adapters passed in)
    for line in out.getvalue().splitlines():
        dtype, shape = line.split("[", 1)[0], line.split("[", 1)[1].split("]", 1)[0]
        if "from the argument" not in line and "from a constant" not in line:
            made += sizes[dtype] * int(np.prod([int(d) for d in shape.split(",") if d]))
    one_expert = 4 * 3 * 128 * 128  # gate_up [128, 256] + down [128, 128], decoded to float32
    assert 0 < made < one_expert / 4, out.getvalue()


def test_zero_B_leaves_logits_unchanged(mxfp4_dir, tokens):
    model = oss_jax.load(mxfp4_dir, dtype="float32")
    before = np.asarray(model(tokens))
    lora.add(model, lora.LoraConfig(targets=ALL))
    assert lora.config(model).targets == ("q", "k", "v", "o", "experts", "router")
    np.testing.assert_array_equal(np.asarray(model(tokens)), before)
    randomize(model)
    assert rel(np.asarray(model(tokens)), before) > 1e-2  # the adapters are applied
    np.testing.assert_array_equal(np.asarray(lora.remove(model)(tokens)), before)


def test_add_twice_and_save_adapted_are_refused(dense_dir, tmp_path):
    model = oss_jax.load(dense_dir, dtype="float32")
    lora.add(model)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.add(model)
    with pytest.raises(ValueError, match=r"has LoRA adapters \(save lora.merge\(model\)"):
        oss_jax.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="unknown LoRA target 'mlp'"):
        lora.LoraConfig(targets="attn,mlp")


def test_merged_checkpoint_gives_the_adapted_logits(mxfp4_dir, tokens, tmp_path):
    import torch
    from transformers import GptOssForCausalLM

    model = adapted(mxfp4_dir)
    want = np.asarray(model(tokens))
    merged = lora.merge(model)
    assert lora.config(merged) is None and not merged.layers[0].mlp.experts.packed
    assert lora.config(model) is not None and model.layers[0].mlp.experts.packed  # the adapted model is unchanged
    assert R.rel_err(np.asarray(merged(tokens)), want) < 1e-5
    path = oss_jax.save(merged, tmp_path / "merged", mxfp4=False, float_dtype="float32")
    assert R.rel_err(np.asarray(oss_jax.load(path, dtype="float32")(tokens)), want) < 1e-5
    theirs = GptOssForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    assert R.rel_err(R.hf_logits(theirs, tokens), want) < 1e-4


def test_adapters_round_trip(mxfp4_dir, tokens, tmp_path):
    model = adapted(mxfp4_dir, targets="q,v,experts")
    dst = lora.save_adapters(model, tmp_path / "adapters")
    assert sorted(p.name for p in dst.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    fresh = lora.load_adapters(oss_jax.load(mxfp4_dir, dtype="float32"), dst)
    assert lora.config(fresh) == lora.config(model)
    for (p, a), (q, b) in zip(nnx.to_flat_state(lora.trainable(model)), nnx.to_flat_state(lora.trainable(fresh)),
                              strict=True):
        assert p == q and np.asarray(a.get_value()).tobytes() == np.asarray(b.get_value()).tobytes()
    np.testing.assert_array_equal(np.asarray(fresh(tokens)), np.asarray(model(tokens)))
    lora.save_adapters(model, dst)  # an earlier save_adapters output is replaced


def test_adapters_refuse_bad_destinations_and_files(mxfp4_dir, tmp_path):
    from oss_jax import checkpoint

    model = adapted(mxfp4_dir)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="is not adapters written by save_adapters"):
        lora.save_adapters(model, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    dst = lora.save_adapters(model, tmp_path / "adapters")
    f = dst / "adapters.safetensors"
    tensors = {n: checkpoint.read_tensor(i) for n, i in checkpoint.read_header(f).items()}
    checkpoint.write_safetensors(f, {k: v for k, v in tensors.items() if k != "layers.1.mlp.lora.B_rE"})
    base = oss_jax.load(mxfp4_dir, dtype="float32")
    with pytest.raises(CheckpointError, match=r"adapters.safetensors: missing tensor 'layers.1.mlp.lora.B_rE'"):
        lora.load_adapters(base, dst)
    assert lora.config(base) is None  # left as it was
    other = oss_jax.load(mxfp4_dir, dtype="float32")
    lora.add(other, lora.LoraConfig(rank=2))
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: adapters of LoraConfig"):
        lora.load_adapters(other, tmp_path / "adapters")


# -- fine-tuning -----------------------------------------------------------------------------------
def write_jsonl(path: Path, indices=(1, 3, 5)) -> Path:
    """Conversations of the family the bundled model never saw, in tokens it knows (``sub``), one per line: its
    loss falls from the first steps (on its own families, replies split as it was trained, it starts low)."""
    lines = []
    for i in indices:
        ex = data.example(7, i, effort="medium", mix={"sub": 1.0})
        lines.append(json.dumps({"messages": ex.messages, "effort": ex.effort}))
    path.write_text("\n".join(lines) + "\n")
    return path


FC = finetune.FinetuneConfig(steps=4, batch=2, targets=ALL, checkpoint_every=2, lr=1e-2)


def plain(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "seconds"}


def test_finetune_trains_adapters_only_and_resume_equals_uninterrupted(tmp_path):
    from oss_jax.train import read_metrics

    jsonl = write_jsonl(tmp_path / "conv.jsonl")
    whole = finetune.finetune("tiny", jsonl, tmp_path / "a", FC, progress=False)
    base = oss_jax.load("tiny")
    trained = dict(nnx.to_flat_state(nnx.state(whole, nnx.Variable)))
    for path, var in nnx.to_flat_state(nnx.state(base, nnx.Variable)):  # the frozen base: the same bytes
        assert np.asarray(trained[path].get_value()).tobytes() == np.asarray(var.get_value()).tobytes(), path
    assert whole.layers[0].mlp.experts.packed
    assert np.max(np.abs(np.asarray(whole.layers[0].mlp.experts.lora.B1_ErF2[...]))) > 0  # adapters moved
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] < rows[0]["loss"]
    assert np.asarray(rows[0]["expert_load"]).shape == (4, 16) and len(rows[0]["load_spread"]) == 4
    np.testing.assert_allclose(np.sum(rows[0]["expert_load"], axis=1), 1.0, atol=1e-4)

    finetune.finetune("tiny", jsonl, tmp_path / "b", FC, progress=False, stop_after=2)
    assert not (tmp_path / "b" / "adapters").exists()
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:  # logged after the checkpoint: dropped on resume
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n")
    resumed = finetune.finetune("tiny", jsonl, tmp_path / "b", FC, progress=False)
    for (p, a), (q, b) in zip(nnx.to_flat_state(lora.trainable(whole)), nnx.to_flat_state(lora.trainable(resumed)),
                              strict=True):
        assert p == q and np.asarray(a.get_value()).tobytes() == np.asarray(b.get_value()).tobytes(), p
    assert [plain(r) for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == [plain(r) for r in rows]
    saved = lora.load_adapters(oss_jax.load("tiny"), tmp_path / "b" / "adapters")
    tokens = np.array([finetune.read_conversations(jsonl)[0].prompt])
    np.testing.assert_array_equal(np.asarray(saved(tokens)), np.asarray(whole(tokens)))

    with pytest.raises(ValueError, match=r"different finetune.rank \(8, now 4\); use a new --out"):
        finetune.finetune("tiny", jsonl, tmp_path / "b", finetune.FinetuneConfig(**{**FC.__dict__, "rank": 4}),
                          progress=False)


GOOD = {"messages": [{"role": "user", "content": "Reverse the letters: c a t"},
                     {"role": "assistant", "channel": "final", "content": "t a c"}]}
BAD = {
    "json": ('{"messages": [', "not valid JSON"),
    "not an object": ("[1, 2]", 'expected an object {"messages"'),
    "unknown key": (json.dumps({**GOOD, "mesages": []}), "unknown key 'mesages'"),
    "effort": (json.dumps({**GOOD, "effort": "max"}), "effort must be one of low, medium, high, got 'max'"),
    "no reply": (json.dumps({"messages": GOOD["messages"][:1]}), "must end with the assistant's reply"),
    "ends in analysis": (json.dumps({"messages": [GOOD["messages"][0], {**GOOD["messages"][1],
                                                                        "channel": "analysis"}]}),
                         "its last message on the 'final' channel"),
    "no prompt": (json.dumps({"messages": GOOD["messages"][1:]}), "no message before the assistant's reply"),
    "role": (json.dumps({"messages": [{"role": "robot", "content": "hi"}, GOOD["messages"][1]]}),
             "message 0: unknown role 'robot'"),
    "content": (json.dumps({"messages": [{"role": "user", "content": 3}, GOOD["messages"][1]]}),
                "message 0: content must be a str, got int"),
    "commentary": (json.dumps({"messages": [GOOD["messages"][0], {**GOOD["messages"][1], "channel": "commentary"},
                                            GOOD["messages"][1]]}), "message 1: the reply's messages are on"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_line_refused_with_its_number(case, tmp_path):
    line, message = BAD[case]
    path = tmp_path / "conv.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(ValueError, match=f"^{re.escape(f'{path}:3: ')}.*{re.escape(message)}"):
        finetune.read_conversations(path)


def test_rendering_matches_chat_and_harmony_training():
    """The prompt is chat's own; prompt + reply is openai-harmony's training rendering of the conversation."""
    import openai_harmony as oh

    from oss_jax import harmony

    ex = data.example(0, 3, effort="high")
    conv = finetune.encode({"messages": ex.messages, "effort": "high"}, "x:1")
    assert conv.prompt == harmony.render(ex.question, "high")
    system = oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new().with_reasoning_effort(
        harmony.EFFORTS["high"]))
    msgs = [system, *(harmony._to_harmony(m, "high", i) for i, m in enumerate(ex.messages))]
    full = harmony.encoding().render_conversation_for_training(oh.Conversation.from_messages(msgs),
                                                               oh.RenderConversationConfig(auto_drop_analysis=False))
    assert conv.prompt + conv.reply == list(full) and conv.reply[-1] == harmony.RETURN
    assert harmony.decode(conv.reply).startswith("<|channel|>analysis<|message|>")


def test_unknown_token_refused_with_its_line(tmp_path):
    path = tmp_path / "conv.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({"messages": [{"role": "user", "content": "Übersetze 猫"},
                                                                       GOOD["messages"][1]]}) + "\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: \d+ token\(s\) not in the model's vocabulary"):
        finetune.finetune("tiny", path, tmp_path / "run", FC, progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_finetune_end_to_end_and_malformed_line(tmp_path):
    jsonl = write_jsonl(tmp_path / "conv.jsonl")
    r = cli("finetune", "--model", "tiny", "--data", jsonl, "--out", tmp_path / "run", "--steps", "2", "--batch", "2",
            "--rank", "4", "--targets", "attn,experts", "--decay", "cosine", "--no-progress")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "adapters").iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    assert json.loads((run / "adapters" / "adapter_config.json").read_text())["lora"]["rank"] == 4
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    saved = json.loads((run / finetune.CONFIG_FILE).read_text())["finetune"]
    assert saved["split_digits"] is True and saved["decay"] == "cosine"  # split automatically; --decay kept

    r = cli("finetune", "--model", "tiny", "--data", jsonl, "--out", run, "--steps", "2", "--batch", "2",
            "--rank", "4", "--targets", "attn,experts", "--decay", "cosine", "--no-split-digits", "--no-progress")
    assert r.returncode == 1
    assert one_line(r.stderr) == (f"oss-jax finetune: error: {run} holds a fine-tuning run with a different "
                                  f"finetune.split_digits (True, now False); use a new --out")
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # untouched

    bad = tmp_path / "bad.jsonl"
    bad.write_text(jsonl.read_text() + '{"messages": [{"role": "user"}, {"role": "assistant", "content": "1"}]}\n')
    r = cli("finetune", "--data", bad, "--out", tmp_path / "run2", "--steps", "2", "--no-progress")
    assert r.returncode == 1
    assert one_line(r.stderr).startswith(f"oss-jax finetune: error: {bad}:4: message 0: a message is a dict")
    assert not (tmp_path / "run2").exists()


# -- replies tokenized as the model writes them ------------------------------------------------------
def test_reply_digits_split_for_a_model_with_a_token_map(mxfp4_dir):
    tiny = oss_jax.load("tiny")
    conv = finetune.encode({"messages": [{"role": "user", "content": "What is 100 + 23?"},
                                         {"role": "assistant", "channel": "final", "content": "123"}]}, "x:1")
    assert finetune.FinetuneConfig().splits_digits(tiny)  # auto: on for a model with a token map
    assert not finetune.FinetuneConfig().splits_digits(oss_jax.load(mxfp4_dir))  # off for an o200k model
    assert not finetune.FinetuneConfig(split_digits=False).splits_digits(tiny)
    for split, written in ((True, ["1", "2", "3"]), (False, ["123"])):
        reply = tiny.token_map.to_o200k(finetune.model_ids(tiny, conv, split)[len(conv.prompt):]).tolist()
        assert reply[:-1][-len(written):] == [harmony.encode(d)[0] for d in written], split  # then <|return|>
        assert harmony.decode(reply).endswith("<|message|>123<|return|>")
    with pytest.raises(ValueError, match=r"^FinetuneConfig.split_digits must be True, False or None, got 'yes'$"):
        finetune.FinetuneConfig(split_digits="yes")


def test_split_reply_is_the_bundled_model_training_completion():
    # Every family (the new one too) at every effort: prompt + split reply are data.tokens, what it was trained on,
    # when the line names its family: the bundled model's style writes sort's numbers whole
    tiny = oss_jax.load("tiny")
    assert "sort" not in data.SPLIT_BY_STYLE[tiny.token_map.style]
    rng = np.random.default_rng(5)
    for family in data.ALL_FAMILIES:
        for effort in data.EFFORTS:
            ex = data.make(family, effort, rng)
            conv = finetune.encode({"messages": ex.messages, "effort": effort, "family": family}, "x:1")
            prompt, completion = data.tokens(ex)
            ids = finetune.model_ids(tiny, conv, split_digits=True)
            assert tiny.token_map.to_o200k(ids).tolist() == prompt + completion, (family, effort)
            # without a family every number is split; a model of style v1 splits every family
            plain = finetune.model_ids(tiny, dataclasses.replace(conv, family=None), split_digits=True)
            whole = [t for t in conv.reply if harmony.decode([t]).isdigit() and len(harmony.decode([t])) > 1]
            assert (plain == ids) == (family != "sort" or not whole), (family, effort)
    ex = data.make("sort", "high", rng, style="v1")
    conv = finetune.encode({"messages": ex.messages, "effort": "high", "family": "sort"}, "x:1")
    tiny.token_map = TokenMap(tiny.token_map.o200k[1:])  # no style recorded: v1's
    prompt, completion = data.tokens(ex)
    assert tiny.token_map.to_o200k(finetune.model_ids(tiny, conv, split_digits=True)).tolist() == prompt + completion
    with pytest.raises(ValueError, match=r"^x:2: family must be one of add, sort, reverse, count, lookup, sub, "
                                         r"got 'mul'$"):
        finetune.encode({"messages": ex.messages, "family": "mul"}, "x:2")


def test_split_digits_is_part_of_the_run_setup(tmp_path):
    jsonl = write_jsonl(tmp_path / "conv.jsonl", indices=(1,))
    fc = finetune.FinetuneConfig(steps=1, batch=1, rank=1, targets="q")
    finetune.finetune("tiny", jsonl, tmp_path / "run", fc, progress=False)
    config = tmp_path / "run" / finetune.CONFIG_FILE
    assert json.loads(config.read_text())["finetune"]["split_digits"] is True  # None, resolved for the tiny model
    same = finetune.FinetuneConfig(**{**fc.__dict__, "split_digits": True})
    finetune.finetune("tiny", jsonl, tmp_path / "run", same, progress=False)  # the same training: resumes
    off = finetune.FinetuneConfig(**{**fc.__dict__, "split_digits": False})
    with pytest.raises(ValueError, match=r"different finetune.split_digits \(True, now False\); use a new --out"):
        finetune.finetune("tiny", jsonl, tmp_path / "run", off, progress=False)
    # A run written before the setting existed never split digits: it resumes with False only.
    setup = json.loads(config.read_text())
    del setup["finetune"]["split_digits"]
    config.write_text(json.dumps(setup))
    with pytest.raises(ValueError, match=r"different finetune.split_digits \(False, now True\)"):
        finetune.finetune("tiny", jsonl, tmp_path / "run", fc, progress=False)
    finetune.finetune("tiny", jsonl, tmp_path / "run", off, progress=False)


# -- the learning rate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("decay", finetune.DECAYS)
def test_optimizer_steps_at_the_configured_rate_to_the_last_step(decay):
    """Adam's step for a constant gradient is the rate: warmup, then constant or a cosine to 0 at step ``steps``."""
    import math

    import jax.numpy as jnp

    fc = finetune.FinetuneConfig(steps=10, warmup=2, lr=1e-2, decay=decay)
    opt, params = finetune.optimizer(fc), {"w": jnp.zeros(())}
    state, moves = opt.init(params), []
    for _ in range(fc.steps):
        updates, state = opt.update({"w": jnp.full((), 0.5)}, state, params)
        moves.append(-float(updates["w"]))
    after = [1.0 if decay == "constant" else (1 + math.cos(math.pi * (i - 2) / 8)) / 2 for i in range(2, 10)]
    np.testing.assert_allclose(moves, [0.0, 5e-3] + [1e-2 * r for r in after], rtol=1e-5, atol=1e-9)
    last = 1e-2 if decay == "constant" else 1e-2 * (1 - math.cos(math.pi / 8)) / 2  # the last update's rate
    assert moves[-1] == pytest.approx(last, rel=1e-5)
    assert float(finetune.learning_rate(fc)(fc.steps)) == pytest.approx(1e-2 if decay == "constant" else 0.0)
    with pytest.raises(ValueError, match=r"^FinetuneConfig.decay must be one of constant, cosine, got 'linear'$"):
        finetune.FinetuneConfig(decay="linear")


def test_decay_is_part_of_the_run_setup(tmp_path):
    jsonl = write_jsonl(tmp_path / "conv.jsonl", indices=(1,))
    assert finetune.FinetuneConfig().decay == "cosine"  # the default: the recipe that met issue 18's goals
    fc = finetune.FinetuneConfig(steps=1, batch=1, rank=1, targets="q", decay="constant")
    finetune.finetune("tiny", jsonl, tmp_path / "run", fc, progress=False)
    config = tmp_path / "run" / finetune.CONFIG_FILE
    assert json.loads(config.read_text())["finetune"]["decay"] == "constant"
    cosine = finetune.FinetuneConfig(**{**fc.__dict__, "decay": "cosine"})
    with pytest.raises(ValueError, match=r"different finetune.decay \('constant', now 'cosine'\); use a new --out"):
        finetune.finetune("tiny", jsonl, tmp_path / "run", cosine, progress=False)
    # A run written before the setting existed had a constant rate: it resumes as constant, and only so.
    setup = json.loads(config.read_text())
    del setup["finetune"]["decay"]
    config.write_text(json.dumps(setup))
    with pytest.raises(ValueError, match=r"different finetune.decay \('constant', now 'cosine'\)"):
        finetune.finetune("tiny", jsonl, tmp_path / "run", cosine, progress=False)
    finetune.finetune("tiny", jsonl, tmp_path / "run", fc, progress=False)
    assert json.loads(config.read_text())["finetune"]["decay"] == "constant"


# -- routing drift ------------------------------------------------------------------------------------
def slow_drift(a, b, E: int, valid, top: int) -> dict:
    """Routing drift counted token by token, with sets and dicts."""
    import math
    from collections import Counter

    out = {k: [] for k in ("before", "after", "js", "grew", "changed", "kept")}
    for layer in range(a.shape[0]):
        tokens = [t for t in range(a.shape[1]) if valid[t]]
        shares = []
        for ids in (a, b):
            c = Counter(int(e) for t in tokens for e in ids[layer, t])
            shares.append([c[e] / (len(tokens) * a.shape[2]) for e in range(E)])
        p, q = shares
        m = [(x + y) / 2 for x, y in zip(p, q, strict=True)]
        js = sum(x * math.log2(x / z) / 2 for x, z in zip(p, m, strict=True) if x) + \
            sum(y * math.log2(y / z) / 2 for y, z in zip(q, m, strict=True) if y)
        out["before"].append(p)
        out["after"].append(q)
        out["js"].append(js)
        out["grew"].append(sorted(range(E), key=lambda e: (p[e] - q[e], e))[:top])
        out["changed"].append(sum(set(a[layer, t]) != set(b[layer, t]) for t in tokens) / len(tokens))
        out["kept"].append(sum(len(set(a[layer, t]) & set(b[layer, t])) for t in tokens) / len(tokens) / a.shape[2])
    return out


def test_drift_equals_a_direct_count():
    from oss_jax import routing

    rng = np.random.default_rng(0)
    L, T, E, k = 3, 200, 8, 2
    a = np.argsort(rng.random((L, T, E)), -1)[..., :k]
    b = a.copy()
    moved = rng.random((L, T)) < 0.3
    b[moved] = np.argsort(rng.random((int(moved.sum()), E)) + np.eye(E)[3], -1)[:, -k:]  # expert 3 favoured
    valid = rng.random(T) < 0.9
    d = routing.drift(a, b, E, valid=valid, top=2)
    want = slow_drift(a, b, E, valid, 2)
    np.testing.assert_allclose(d.load_before, want["before"], atol=1e-12)
    np.testing.assert_allclose(d.load_after, want["after"], atol=1e-12)
    np.testing.assert_allclose(d.js, want["js"], atol=1e-12)
    np.testing.assert_allclose(d.changed, want["changed"], atol=1e-12)
    np.testing.assert_allclose(d.kept, want["kept"], atol=1e-12)
    assert d.grew.tolist() == want["grew"] and (d.grew[:, 0] == 3).all() and d.tokens == int(valid.sum())
    np.testing.assert_allclose(d.growth, np.take_along_axis(d.load_after - d.load_before, d.grew, -1))

    same = routing.drift(a, a, E)
    assert (same.js == 0).all() and (same.changed == 0).all() and (same.kept == 1).all() and same.changed_overall == 0
    disjoint = routing.drift(np.zeros((1, 5, 1), int), np.ones((1, 5, 1), int), E, top=1)
    assert disjoint.js.tolist() == [1.0] and disjoint.changed.tolist() == [1.0] and disjoint.kept.tolist() == [0.0]
    assert disjoint.grew.tolist() == [[1]] and disjoint.growth.tolist() == [[1.0]]
    with pytest.raises(ValueError, match=r"two routings \[L, T, k\] of the same tokens, got shapes \(3, 200, 2\)"):
        routing.drift(a, a[:, :5], E)


def test_routing_drift_of_two_models():
    """Identical models: nothing moves. A masked expert: its share goes to 0, and nothing before its layer moves.
    Batched and padded, the drift equals that of each sequence traced alone."""
    from oss_jax import prune, routing
    from oss_jax.trace import trace

    base = oss_jax.load("tiny")
    rng = np.random.default_rng(2)
    convs = [data.tokens(data.make(f, "high", rng, heldout=True)) for f in ("add", "sub", "lookup")]
    seqs = [p + c for p, c in convs]
    select = [np.arange(len(p) + len(c)) >= len(p) for p, c in convs]  # the replies
    same = routing.routing_drift(base, base, seqs, batch=2)
    assert (same.js == 0).all() and (same.changed == 0).all() and same.tokens == sum(map(len, seqs))

    masked = prune.mask_experts(base, [[], [5], [], []])
    d = routing.routing_drift(base, masked, seqs, select=select, batch=2)
    assert d.load_before[1, 5] > 0 and d.load_after[1, 5] == 0 and d.js[1] > 0 and d.changed[1] > 0
    assert d.js[0] == 0 and d.changed[0] == 0 and 5 not in d.grew[1] and (d.growth[1] > 0).all()
    alone = [[trace(m, s, sinks=False, residual=False).expert_ids for s in seqs] for m in (base, masked)]
    want = routing.drift(np.concatenate(alone[0], 1), np.concatenate(alone[1], 1), base.config.num_experts,
                         valid=np.concatenate(select))
    for name in ("load_before", "load_after", "js", "changed", "kept", "grew"):
        np.testing.assert_allclose(getattr(d, name), getattr(want, name), err_msg=name)
    with pytest.raises(ValueError, match="select needs one bool array per sequence, of its length"):
        routing.routing_drift(base, base, seqs, select=select[:2])
