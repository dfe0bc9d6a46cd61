"""Training a small gpt-oss with optax: the recipe behind the bundled tiny model.

    oss-jax train --out runs/tiny             # from scratch (or resumes runs/tiny), then exports
    oss-jax train --out runs/tiny --ship      # ... and installs the result as oss_jax.load("tiny")
    oss-jax train --twin dense --ship         # the course's twins, same recipe and data: oss_jax.load("tiny-dense")
    oss-jax train --twin nosink --ship        # ... and oss_jax.load("tiny-nosink")

The loss is next-token cross-entropy on the assistant's tokens only (the prompt is context), plus
two router losses, each switchable (``lb_coef = 0`` or ``z_coef = 0`` turns it off) and logged:

- load balancing (Switch Transformer, Fedus et al. 2021, eq. 4): ``E * sum_e f_e * P_e`` per
  layer, where ``f_e`` is the share of (token, choice) slots routed to expert e and ``P_e`` the
  mean router probability of e. It is 1 when routing is uniform, and pushes towards it.
- router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): ``mean(logsumexp(router_logits)^2)``, which
  keeps router logits small so that the top-k choice stays stable in low precision.

The router logits come from the model's own tracing hooks (``Recording``, ``nnx.capture``), the
same ones ``oss_jax.trace`` uses, so training runs the very forward pass that inference runs.

Reproducible and resumable: batch ``i`` is a pure function of ``(seed, i)`` (``oss_jax.data``),
and an orbax checkpoint of (parameters, optimizer state) is written every ``checkpoint_every``
steps; a run that is interrupted and started again ends with the same weights, bit for bit, as
one that was not.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from oss_jax import data, harmony, rope
from oss_jax.config import Config
from oss_jax.kernels import experts as expert_kernels
from oss_jax.load import BUNDLED, save
from oss_jax.model import GptOss, Recording
from oss_jax.vocab import TokenMap

f32 = jnp.float32


def _check_heads(heads: object, name: str = "heads") -> None:
    """Query heads must be even (key-value heads are half as many) and split 192 dimensions into even widths
    (RoPE rotates pairs)."""
    if (isinstance(heads, bool) or not isinstance(heads, numbers.Integral) or heads < 2 or heads % 2
            or 192 % heads or (192 // heads) % 2):
        raise ValueError(f"{name} must be even and split 192 query dimensions into even head widths, got {heads!r}")


def tiny_config(vocab_size: int, *, dense: bool = False, heads: int = 4) -> Config:
    """The bundled model: every gpt-oss feature at small scale (about 4M parameters).

    Sinks, alternating sliding (64-token) and full attention, YaRN RoPE with gpt-oss's own
    constants, 16 experts with top-4 routing, clamped SwiGLU, biases; sizes all different
    (4 query heads x 48 = 192 != hidden 128) as in the real models.

    ``dense``: its dense twin, with the same parameters active per token: one expert of width
    k * F = 512 chosen for every token (top-1 of 1, so its gate is always 1). It is still a gpt-oss
    config, so every code path, checkpoint format and tool works on it unchanged.

    ``heads``: query heads sharing the same 192 query dimensions (head width 192 / heads; key-value heads
    half as many, as the bundled 4 : 2). More, narrower heads give more attention
    patterns at about the same cost (a pilot's question; the bundled models have 4).
    """
    experts, k, width = (1, 1, 4 * 128) if dense else (16, 4, 128)
    _check_heads(heads)
    return Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=width, num_hidden_layers=4,
                  num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=192 // heads,
                  num_experts=experts,
                  experts_per_token=k, sliding_window=64, quant_method="mxfp4")


# The no-sink twin's sink logits: exp(NO_SINK - max score) is exactly 0 in float32 and bfloat16, so
# the sink takes no attention and receives no gradient; finite, so the checkpoint is a valid gpt-oss one.
NO_SINK = -1e4


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on (saved with its checkpoints)."""

    steps: int = 4800  # 35 minutes here (batch 8: 0.42-0.46 s per step)
    batch: int = 8
    # Share of each task family (in data.FAMILIES order) in the training stream.
    family_mix: tuple[float, ...] = tuple(data.MIX[f] for f in data.FAMILIES)
    # Each step trains on one effort (low, medium, high), drawn with these weights, padded to that
    # effort's length: a third of the compute padding cost of one length for all. Mostly high: the
    # step-by-step analyses are what a small model needs the most examples of.
    effort_mix: tuple[float, float, float] = (0.1, 0.1, 0.8)
    # T per effort: a conversation of up to T + 1 tokens fits (the longest are 96, 114 and 184 tokens)
    seq_lens: tuple[int, int, int] = (96, 116, 184)
    # Measured on additions alone (batch 8, 800 steps): peak 3e-3 sat on a plateau, 1e-3 learned,
    # 6e-4 learned fastest (per-token cross-entropy 0.03 at step 800 against 0.18 for 1e-3).
    lr: float = 6e-4
    warmup: int = 100
    final_lr_ratio: float = 0.05  # cosine decay from lr to lr * final_lr_ratio
    weight_decay: float = 0.1
    clip: float = 1.0
    lb_coef: float = 0.01
    z_coef: float = 1e-3
    # A first stage (a curriculum): the first ``first_steps`` steps draw their families from ``first_mix``
    # instead (empty: none). Copying a token out of the question is a skill every family but the addition
    # needs, and a mixed stream never taught it: 3,600 steps with reverse at 15% left every copy wrong, while
    # reverse alone (style "letters") copies every letter after 800 steps (benchmarks/results/tiny_recipe_pilots.md).
    first_mix: tuple[float, ...] = (0.0, 0.0, 1.0, 0.0, 0.0)  # reverse alone
    first_steps: int = 800
    # Later stages of the curriculum, in turn after the first: (steps, family mix) each; then ``family_mix`` to
    # the end. Session 16's pilot G asks whether each copying skill forms in a stage of its own and survives the
    # mixed stream (counting alone after the reversal stage: 95% in 1,000 steps, against 27-37% in the mix).
    stages: tuple[tuple[int, tuple[float, ...]], ...] = ()
    tied_init: bool = False  # the unembedding starts equal to the embedding (init_model)
    prev_head: bool = False  # layer 0's first query head starts attending to the previous token (init_model)
    seed: int = 0
    digit_init: bool = True  # number tokens' embeddings start digit-structured (see init_model)
    dense: bool = False  # the dense twin: one FFN of width k * F instead of E experts (tiny_config)
    sinks: bool = True  # False: the no-sink twin, sink logits fixed at NO_SINK (no learned sinks)
    heads: int = 4  # query heads (tiny_config): 8 is session 16's pilot F, more and narrower heads
    style: str = data.STYLE  # how the questions and analyses are written (data.STYLES)
    checkpoint_every: int = 200
    snapshot_steps: tuple[int, ...] = (100, 500, 1500)  # whole small checkpoints kept for the notebooks
    log_every: int = 10

    def __post_init__(self) -> None:
        """Refuse counts that would train nothing (``steps=0`` would export an untrained model)."""
        for name, least in (("steps", 1), ("batch", 1), ("checkpoint_every", 1), ("log_every", 1), ("warmup", 0),
                            ("first_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {least}, got {value!r}")
        _check_heads(self.heads, "TrainConfig.heads")
        if self.style not in data.STYLES:
            raise ValueError(f"TrainConfig.style must be one of {', '.join(data.STYLES)}, got {self.style!r}")
        if self.first_steps and not self.first_mix:
            raise ValueError(f"TrainConfig.first_steps={self.first_steps} needs a first_mix")
        F = len(data.FAMILIES)
        mixes = [("family_mix", self.family_mix, F), ("effort_mix", self.effort_mix, len(data.EFFORTS)),
                 *((("first_mix", self.first_mix, F),) if self.first_mix else ())]
        for i, stage in enumerate(self.stages):
            steps = stage[0] if isinstance(stage, tuple | list) and len(stage) == 2 else None
            if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
                raise ValueError(f"TrainConfig.stages[{i}] must be (steps >= 1, family mix), got {stage!r}")
            mixes.append((f"stages[{i}] mix", stage[1], F))
        for name, mix, n in mixes:
            if len(mix) != n or any(not 0 <= w <= 1 for w in mix) or abs(sum(mix) - 1) > 1e-6:
                raise ValueError(f"TrainConfig.{name} must be {n} weights >= 0 that sum to 1, got {mix!r}")

    @property
    def mix(self) -> dict[str, float]:
        """``family_mix`` by family name."""
        return dict(zip(data.FAMILIES, self.family_mix, strict=True))

    def mix_at(self, step: int) -> dict[str, float]:
        """The family mix of batch ``step``: ``first_mix`` for the first ``first_steps`` steps, then each of
        ``stages`` for its steps, then ``mix``."""
        end = 0
        for steps, mix in ((self.first_steps, self.first_mix), *self.stages):
            end += steps
            if step < end:
                return dict(zip(data.FAMILIES, mix, strict=True))
        return self.mix


# -- data -----------------------------------------------------------------------------------------
def batch_effort(tc: TrainConfig, step: int) -> str:
    """The reasoning effort of every conversation in batch ``step``."""
    return data.EFFORTS[int(np.random.default_rng([tc.seed, step, 7]).choice(3, p=tc.effort_mix))]


def make_batch(tmap: TokenMap, tc: TrainConfig, step: int) -> dict[str, np.ndarray]:
    """Batch ``step`` of the training stream (a pure function of the seed and step): model ids
    ``tokens [B, T+1]``, ``positions [B, T]`` (-1 on padding), ``mask [B, T]`` (1 where the
    target is an assistant token). One effort per batch, T its ``seq_lens`` entry."""
    effort, batch = batch_effort(tc, step), tc.batch
    seq_len = tc.seq_lens[data.EFFORTS.index(effort)]
    tokens = np.zeros((batch, seq_len + 1), np.int32)
    mask = np.zeros((batch, seq_len), np.float32)
    positions = np.full((batch, seq_len), -1, np.int32)
    for b in range(batch):
        ex = data.example(tc.seed, step * batch + b, effort=effort, mix=tc.mix_at(step), style=tc.style)
        prompt, comp = data.tokens(ex)
        ids = tmap.to_model(prompt + comp, strict=True)
        n = len(ids)
        if n > seq_len + 1:
            raise ValueError(f"a conversation of {n} tokens exceeds seq_len + 1 = {seq_len + 1}")
        tokens[b, :n] = ids
        positions[b, :n - 1] = np.arange(n - 1)
        mask[b, len(prompt) - 1:n - 1] = 1.0  # targets prompt[-1]+1 .. end: the completion
    return {"tokens": tokens, "positions": positions, "mask": mask}


# -- model ----------------------------------------------------------------------------------------
def init_model(cfg: Config, seed: int, tmap: TokenMap | None = None, *, sinks: bool = True,
               tied_init: bool = False, prev_head: bool = False) -> GptOss:
    """A float32 model with dense experts: weights N(0, 0.02) (output projections scaled by
    1/sqrt(2L), as GPT-2), biases and sinks 0, norm scales 1. Filled from numpy (fast, and the same
    on every machine).

    With ``tmap``, the embedding rows of number tokens ("7", "27", "347") start as sums of one
    random vector per (digit place, digit): ``e[347] = h[3] + t[4] + o[7]``, so a token's digits
    can be read linearly from step 0. o200k writes 0..999 as single tokens; learning a thousand
    separate decompositions from a dozen examples each is what a 30-minute run cannot do.

    ``tied_init``: the unembedding starts equal to the embedding (they stay separate parameters, as in
    gpt-oss). Copying a token from the context then needs an attention head that carries the token's
    direction along, the same map for every token, where separate random matrices need a copy learned
    for each token the model must copy.
    """
    model = nnx.eval_shape(lambda: GptOss(cfg, packed=False, dtype=f32))
    rng = np.random.default_rng(seed)
    digits_PdD = 0.02 * rng.standard_normal((3, 10, cfg.hidden_size))  # places: ones, tens, hundreds
    out_std = 0.02 / math.sqrt(2 * cfg.num_hidden_layers)
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Variable):
            continue
        name, shape = str(path[-1]), var.get_value().shape
        if name == "scale":
            value = np.ones(shape, np.float32)
        elif name.startswith("sinks"):
            value = np.full(shape, 0.0 if sinks else NO_SINK, np.float32)
        elif name.startswith(("b", "router_bias", "gate_up_bias", "down_bias")):
            value = np.zeros(shape, np.float32)
        else:
            std = out_std if name in ("wo_NHD", "down_EFD") else 0.02
            value = (std * rng.standard_normal(shape)).astype(np.float32)
        if name == "embed_VD" and tmap is not None:
            for m, text in enumerate(_texts(tmap)):
                if text.isdigit() and len(text) <= 3:
                    value[m] = sum(digits_PdD[p, int(c)] for p, c in enumerate(reversed(text)))
        var.set_value(jnp.asarray(value))
    if tied_init:
        model.unembed_VD.set_value(jnp.array(model.embed_VD.get_value()))  # a copy: a buffer of its own
    if prev_head:
        previous_token_head(model)
    return model


PREV_HEAD_PAIRS, PREV_HEAD_SIZE = 4, 5.0  # RoPE's 4 fastest frequency pairs; at init 0.97 of the head's attention


def previous_token_head(model: GptOss) -> None:
    """Make layer 0's query head 0 attend to the token before each query: half of an induction head, built in.

    A look-up's copy ("Kate" -> the count word after "Kate" in the question) needs two heads in turn: one
    that writes each token's predecessor into its position (here), and one that finds the position whose
    predecessor is the current token and copies it. Trained from N(0, 0.02), the tiny models never formed the
    first (session 18: no head puts more than 0.09 of its attention on the previous token).

    The query and key biases (added before RoPE, and at init far larger than the projections of the
    normalized input) get the same vector ``b`` in the ``PREV_HEAD_PAIRS`` fastest frequency pairs, the key's
    rotated one position forward: the score of query ``m`` on key ``n`` is then ``|b|^2 sum_i cos((n - m + 1)
    w_i)`` up to the concentration, whatever the tokens, and peaks at ``n = m - 1``. Training may change it.
    Key-value head 0 is shared with the next query head (GQA), whose query bias stays 0.
    """
    attn = model.layers[0].attn
    H = attn.bq_NH.get_value().shape[-1]
    inv_freq, _ = rope.yarn_inv_freq(*attn.rope_args)
    pairs = np.arange(PREV_HEAD_PAIRS)
    bq_NH, bk_KH = np.array(attn.bq_NH.get_value()), np.array(attn.bk_KH.get_value())
    bq_NH[0] = bk_KH[0] = 0.0
    bq_NH[0, pairs] = PREV_HEAD_SIZE
    bk_KH[0, pairs] = PREV_HEAD_SIZE * np.cos(inv_freq[pairs])  # rope.apply pairs dimension i with i + H/2
    bk_KH[0, pairs + H // 2] = PREV_HEAD_SIZE * np.sin(inv_freq[pairs])
    attn.bq_NH.set_value(jnp.asarray(bq_NH))
    attn.bk_KH.set_value(jnp.asarray(bk_KH))


def _texts(tmap: TokenMap) -> list[str]:
    """The text of every model id (the reserved unknown id reads as '')."""
    return [""] + [harmony.decode([int(i)]) for i in tmap.o200k[1:]]


def _for_training(model: GptOss) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph with router recording on and grouped-matmul experts (sorted on the CPU, ragged on
    a GPU or TPU: ``kernels.experts.grouped_dispatch``), and its state."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)
    for _, module in nnx.iter_modules(copy):
        if hasattr(module, "recording"):
            module.recording = Recording(router=True, sinks=False, residual=False)
        if hasattr(module, "dispatch"):
            module.dispatch = expert_kernels.grouped_dispatch()
    return nnx.split(copy)


def losses(graphdef: nnx.GraphDef, params: nnx.State, batch: dict[str, jax.Array], lb_coef: float,
           z_coef: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(total loss, metrics)`` for one batch (see the module docstring)."""
    model = nnx.merge(graphdef, params)
    tokens, positions, mask = batch["tokens"], batch["positions"], batch["mask"]
    (logits, _), inter = nnx.capture(GptOss.apply, nnx.Intermediate)(model, tokens[:, :-1], positions)
    targets = tokens[:, 1:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    n = jnp.maximum(mask.sum(), 1.0)
    ce = jnp.sum(nll * mask) / n
    accuracy = jnp.sum((jnp.argmax(logits, -1) == targets) * mask) / n
    valid = (positions >= 0).astype(f32)  # router losses over every real token
    lb, z, spread = [], [], []
    records = nnx.to_pure_dict(inter)["layers"]
    E = model.config.num_experts
    for i in range(model.config.num_hidden_layers):
        mlp = records[i]["mlp"]
        rl, ids = mlp["router_logits"], mlp["expert_ids"]
        w = valid[..., None]
        probs = jax.nn.softmax(rl, axis=-1)
        p_e = jnp.sum(probs * w, axis=(0, 1)) / valid.sum()
        f_e = jnp.sum(jax.nn.one_hot(ids, E) * w[..., None], axis=(0, 1, 2)) / (valid.sum() * ids.shape[-1])
        lb.append(E * jnp.sum(f_e * p_e))
        z.append(jnp.sum(jax.nn.logsumexp(rl, axis=-1) ** 2 * valid) / valid.sum())
        spread.append(jnp.std(f_e) / jnp.mean(f_e))  # coefficient of variation of the expert load
    lb_loss, z_loss = jnp.mean(jnp.stack(lb)), jnp.mean(jnp.stack(z))
    total = ce + lb_coef * lb_loss + z_coef * z_loss
    return total, {"loss": total, "ce": ce, "lb_loss": lb_loss, "z_loss": z_loss, "accuracy": accuracy,
                   "load_spread": jnp.stack(spread)}


@functools.cache  # one object per configuration: the compiled train_step is keyed on it
def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup, cosine decay and global-norm clipping; no decay on vectors."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup, max(tc.steps, tc.warmup + 1),
                                                  end_value=tc.lr * tc.final_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    steps = [optax.clip_by_global_norm(tc.clip),
             optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=tc.weight_decay, mask=decay_mask)]
    if not tc.sinks:  # the no-sink twin: its sink logits never move from NO_SINK
        steps.append(optax.masked(optax.set_to_zero(), _sink_mask))
    return optax.chain(*steps)


def _sink_mask(params: nnx.State) -> nnx.State:
    """True on the sink logits, False elsewhere (same tree as ``params``)."""
    return jax.tree.map_with_path(lambda path, _: "sinks_N" in jax.tree_util.keystr(path), params)


@functools.partial(jax.jit, static_argnums=(0, 1, 5, 6), donate_argnums=(2, 3))
def train_step(graphdef: nnx.GraphDef, opt: optax.GradientTransformation, params, opt_state, batch,
               lb_coef: float, z_coef: float):
    """One optimizer step: ``(params, opt_state, metrics)``."""
    grads, metrics = jax.grad(losses, argnums=1, has_aux=True)(graphdef, params, batch, lb_coef, z_coef)
    updates, opt_state = opt.update(grads, opt_state, params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return optax.apply_updates(params, updates), opt_state, metrics


# -- the run --------------------------------------------------------------------------------------
def train(out: str | Path, tc: TrainConfig = TrainConfig(), *, progress: bool = True,
          stop_after: int | None = None, on_metrics: Callable[[dict], None] | None = None) -> GptOss:
    """Train (or resume) a tiny model in ``out``; returns the trained float32 model.

    ``out`` gets ``checkpoints/`` (orbax: parameters + optimizer state, atomic), ``metrics.jsonl``
    (one line per ``log_every`` steps), ``train_config.json``, ``snapshots/step-NNNNNN/`` (small
    MXFP4 checkpoints at ``snapshot_steps``) and, at the end, ``model/`` (the final export).
    ``stop_after``: stop (after checkpointing) at this step, as if interrupted; for tests.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: expected a run directory, got a file")
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "train_config.json"
    if saved.exists() and _with_added_fields(_read_json(saved)) != _jsonable(tc):
        raise ValueError(f"{out} holds a run with a different configuration ({saved}); use a new --out")
    metrics_path = out / "metrics.jsonl"
    logged = read_metrics(metrics_path)  # a corrupt log is refused before any work
    saved.write_text(json.dumps(_jsonable(tc), indent=1))
    tmap = TokenMap(data.vocabulary(tc.style), style=tc.style)
    cfg = tiny_config(len(tmap), dense=tc.dense, heads=tc.heads)
    model = init_model(cfg, tc.seed, tmap if tc.digit_init else None, sinks=tc.sinks, tied_init=tc.tied_init,
                       prev_head=tc.prev_head)
    graphdef, params = _for_training(model)
    opt = optimizer(tc)
    opt_state = opt.init(params)
    manager = ocp.CheckpointManager(out.absolute() / "checkpoints",
                                    options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        abstract = {"params": params, "opt_state": opt_state}
        restored = manager.restore(start, args=ocp.args.StandardRestore(abstract))
        params, opt_state = restored["params"], restored["opt_state"]
    _truncate_metrics(metrics_path, logged, start)
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    bar = _bar(progress, start, tc.steps)
    t0 = time.perf_counter()
    with metrics_path.open("a") as log:
        for step in range(start, end):
            batch = {k: jnp.asarray(v) for k, v in make_batch(tmap, tc, step).items()}
            params, opt_state, metrics = train_step(graphdef, opt, params, opt_state, batch, tc.lb_coef, tc.z_coef)
            done = step + 1
            if done % tc.log_every == 0 or done == tc.steps:
                row = {"step": done, "effort": batch_effort(tc, step),
                       **{k: np.asarray(v).tolist() for k, v in metrics.items()},
                       "seconds": round(time.perf_counter() - t0, 2)}
                log.write(json.dumps(row) + "\n")
                log.flush()
                if on_metrics:
                    on_metrics(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['ce']:.3f}", acc=f"{row['accuracy']:.3f}")
            if bar is not None:
                bar.update(1)
            if done in tc.snapshot_steps:
                export(_inference_model(graphdef, params), out / "snapshots" / f"step-{done:06d}", tmap,
                       float_dtype="bfloat16", note={"step": done})
            if done % tc.checkpoint_every == 0 or done == end:
                manager.save(done, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
    manager.wait_until_finished()
    manager.close()
    if bar is not None:
        bar.close()
    trained = _inference_model(graphdef, params)
    trained.token_map = tmap
    if end == tc.steps:
        export(trained, out / "model", tmap, float_dtype=export_dtype(tc), note={"step": tc.steps})
    return trained


def export_dtype(tc: TrainConfig) -> str:
    """The dtype of the exported model's non-expert weights (its experts are MXFP4): float32 for the tiny
    model, bfloat16 for a twin (dense or no-sink), as in gpt-oss's own checkpoints, so that the three
    bundled models fit in 20 MB together. Their evaluation (``evaluate_run``) reads the export as shipped."""
    return "bfloat16" if tc.dense or not tc.sinks else "float32"


def evaluate_run(trained: GptOss, run_dir: str | Path, per_cell: int = 50) -> dict:
    """Held-out accuracy of the float32 model as trained versus its MXFP4 export (``run_dir/model``):
    what quantizing the experts costs. ``{variant name: [evaluate.Cell]}``."""
    from oss_jax import evaluate
    from oss_jax.load import load

    exported = load(Path(run_dir) / "model", dtype="float32")
    return {"float32 experts (as trained)": evaluate.evaluate(trained, per_cell=per_cell),
            "MXFP4 experts (shipped)": evaluate.evaluate(exported, per_cell=per_cell)}


def _inference_model(graphdef: nnx.GraphDef, params: nnx.State) -> GptOss:
    """A plain model (no recording, automatic dispatch) on copies of the training parameters."""
    model = nnx.merge(graphdef, jax.tree.map(jnp.copy, params))
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "recording"):
            module.recording = None
        if hasattr(module, "dispatch"):
            module.dispatch = "auto"
    return model


def export(model: GptOss, dst: str | Path, tmap: TokenMap, *, float_dtype: str = "float32",
           note: dict | None = None) -> Path:
    """Write ``model`` as a Hugging Face checkpoint with MXFP4 experts, plus its ``vocab.json``."""
    return save(model, dst, mxfp4=True, float_dtype=float_dtype, token_map=tmap, extra=note)


def twin_name(tc: TrainConfig) -> str:
    """The bundled name a run of ``tc`` installs as: ``"tiny"``, or a twin's (``load.BUNDLED``)."""
    if tc.dense and not tc.sinks:
        raise ValueError("a run is the dense twin or the no-sink twin, not both: it has no bundled name")
    return "tiny-dense" if tc.dense else "tiny" if tc.sinks else "tiny-nosink"


def twin_config(twin: str | None = None, **changes) -> TrainConfig:
    """The recipe of the tiny model (``twin=None``) or of its twin ``"dense"`` or ``"nosink"``: the same
    recipe and data, one architectural change. ``changes``: other fields to replace."""
    twins = {None: {}, "dense": {"dense": True}, "nosink": {"sinks": False}}
    if twin not in twins:
        raise ValueError(f"unknown twin {twin!r}: use dense or nosink")
    return TrainConfig(**twins[twin], **changes)


def ship(run_dir: str | Path, dst: str | Path | None = None) -> Path:
    """Install a finished run as a bundled model: its ``model/``, metrics and evaluation, and (the tiny model
    only: the three share 20 MB) its ``snapshots/``. ``dst``: default the folder of the run's bundled name
    (``twin_name``)."""
    run_dir = Path(run_dir)
    if not (run_dir / "model" / "config.json").exists():
        raise FileNotFoundError(f"{run_dir} has no finished model/ to ship")
    saved = _read_json(run_dir / "train_config.json")
    name = twin_name(TrainConfig(dense=saved.get("dense", False), sinks=saved.get("sinks", True)))
    dst = BUNDLED[name] if dst is None else Path(dst)
    from oss_jax.checkpoint import atomic_directory

    with atomic_directory(dst) as tmp:
        for item in ("model", "snapshots") if name == "tiny" else ("model",):
            if (run_dir / item).exists():
                shutil.copytree(run_dir / item, tmp / item)
        for item in ("metrics.jsonl", "train_config.json", "eval.json"):
            if (run_dir / item).exists():
                shutil.copy2(run_dir / item, tmp / item)
    return dst


# Fields added to TrainConfig after runs were saved without them, with the values that reproduce those runs.
ADDED_FIELDS = {"style": "v1", "first_mix": [], "first_steps": 0, "tied_init": False, "heads": 4, "stages": [],
                "prev_head": False}


def _with_added_fields(saved: object) -> object:
    """A saved configuration as today's ``_jsonable`` writes it: the fields added since, at their old values."""
    return {**ADDED_FIELDS, **saved} if isinstance(saved, dict) else saved


def _jsonable(tc: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(tc)))


def _read_json(path: Path) -> object:
    """The JSON in ``path``, or a one-line ValueError naming it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``.

    A torn last line (a run killed mid-write) is dropped with a warning naming the file; a corrupt
    line before it, or a row without an integer ``step``, is a ValueError ``"<file>:<line>: ..."``.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    rows = []
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    for i, (n, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(numbered) - 1:
                warnings.warn(f"{path}:{n}: dropped a torn last line (a run interrupted mid-write)", stacklevel=2)
                break
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{n}: not a metrics row (no integer 'step')")
        rows.append(row)
    return rows


def _truncate_metrics(path: Path, rows: list[dict], step: int) -> None:
    """Rewrite ``path`` as ``rows`` (from ``read_metrics``: no torn last line) up to ``step``,
    dropping those written after the checkpoint a resumed run starts from."""
    if not path.exists():
        return
    path.write_text("".join(json.dumps(row) + "\n" for row in rows if row["step"] <= step))


def _bar(progress: bool, start: int, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="training", unit="step")
