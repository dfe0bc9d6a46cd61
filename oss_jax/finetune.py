"""Fine-tuning with LoRA: teach a model from conversations while its weights stay frozen (and packed).

    oss-jax finetune --model tiny --data conversations.jsonl --out runs/ft --steps 200 --targets attn,experts

Data: one conversation per line, the shape ``oss-jax chat --json`` prints its messages in::

    {"messages": [{"role": "user", "content": "What is 9 - 4?"},
                  {"role": "assistant", "channel": "analysis", "content": "Nine minus four."},
                  {"role": "assistant", "channel": "final", "content": "5"}], "effort": "low"}

System and developer messages, earlier turns and ``effort`` (default medium) are optional; the line
must end with the assistant's reply (``analysis`` and/or ``final`` messages, the last one ``final``).
A malformed line is refused with ``FILE:LINE:`` and what is wrong.

Tokens: the prompt (everything before the reply) is ``harmony.render(messages, effort)``, exactly
what ``chat`` gives the model; the reply is rendered by openai-harmony for training (its last
``<|end|>`` is ``<|return|>``, where generation stops). The loss is the cross-entropy of the reply's
tokens only. A model with a token map (the bundled tiny model) gets its own ids: a token it does
not know is refused with the line it is on. The reply is tokenized as the model writes: the bundled
model was trained to write numbers one token per digit (``oss_jax.data.split_digits``), so with
``FinetuneConfig.split_digits`` None (the default) a model with a token map gets the reply's multi-digit
o200k tokens ("347") split into digits ("3", "4", "7"), and a model without one (a real gpt-oss) o200k's
own; True or False forces it (``--split-digits`` / ``--no-split-digits``). A line of ``oss_jax.data``'s
may name its task ``"family"``: where the model's trace style writes that family's numbers whole
(``data.SPLIT_BY_STYLE``: sorting, for the bundled model), its reply is not split. The prompt is never
split: ``chat`` does not split it either.

Training: LoRA adapters (``oss_jax.lora``) on the targets, AdamW (optax) with a linear warmup then a
rate falling along a cosine to 0 at the last step (``decay="cosine"``, the default: with a constant rate,
``decay="constant"``, the subtraction experiment of ``benchmarks/finetune_new_family.py`` stayed at 62.5% on the
first bundled model),
global-norm clipping. Only the adapters are differentiated; the base weights are
inputs of the compiled step, never outputs, so they cannot change.

The run directory ``--out`` gets ``finetune_config.json`` (the configuration, the model and the
data's sha256), ``checkpoints/`` (orbax: adapters and optimizer state, atomic), ``metrics.jsonl``
(per logged step: loss, token accuracy, gradient norm, and per layer the expert load: the share of
the reply tokens' expert slots each expert took, and its spread, std / mean) and, at the end,
``adapters/`` (``lora.save_adapters``). Batch ``i`` is a pure function of ``(seed, i)``, so a run
started again resumes from its last checkpoint and ends with the same adapters as one that was never
interrupted; a changed configuration, model or data file is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import numbers
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import openai_harmony as oh
import optax
import orbax.checkpoint as ocp
from flax import nnx

from oss_jax import boundary, data, harmony, lora
from oss_jax.evaluate import trained_style
from oss_jax.model import GptOss, Recording
from oss_jax.train import read_metrics

f32 = jnp.float32
CONFIG_FILE = "finetune_config.json"
# The keys a line may hold: the conversation, its effort, and what `oss-jax chat --json` prints besides.
LINE_KEYS = {"messages", "effort", "analysis", "final", "tokens", "family"}
REPLY_CHANNELS = ("analysis", "final")
DECAYS = ("constant", "cosine")  # FinetuneConfig.decay: the learning rate after the warmup


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Everything a run depends on besides the model and the data (saved with its checkpoints)."""

    steps: int = 100
    batch: int = 4
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = lora.ATTENTION  # see lora.TARGETS; "attn,experts,router" also accepted
    lr: float = 1e-3
    warmup: int = 10  # steps of linear warmup from 0 (fewer when the run is shorter)
    decay: str = "cosine"  # after the warmup: "cosine" (to 0 at step `steps`), or "constant"; see DECAYS
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0  # adapters' initialisation and the order of the conversations
    checkpoint_every: int = 50
    log_every: int = 1
    split_digits: bool | None = None  # the reply one token per digit; None: when the model has a token map

    def __post_init__(self) -> None:
        """Refuse values that would train nothing or diverge at once; one line naming the field."""
        if not isinstance(self.decay, str) or self.decay not in DECAYS:
            raise ValueError(f"FinetuneConfig.decay must be one of {', '.join(DECAYS)}, got {self.decay!r}")
        if self.split_digits is not None and not isinstance(self.split_digits, bool):
            raise ValueError(f"FinetuneConfig.split_digits must be True, False or None, got {self.split_digits!r}")
        for name, least in (("steps", 1), ("batch", 1), ("rank", 1), ("warmup", 0), ("seed", 0),
                            ("checkpoint_every", 1), ("log_every", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"FinetuneConfig.{name} must be an integer >= {least}, got {value!r}")
        for name, lo, open_ in (("alpha", 0.0, True), ("lr", 0.0, True), ("weight_decay", 0.0, False),
                                ("clip", 0.0, True)):
            value = getattr(self, name)
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or (value <= lo if open_ else value < lo):
                raise ValueError(f"FinetuneConfig.{name} must be a finite number {'>' if open_ else '>='} {lo:g}, "
                                 f"got {value!r}")
        object.__setattr__(self, "targets", lora.parse_targets(self.targets))

    @property
    def lora(self) -> lora.LoraConfig:
        """The adapters' configuration."""
        return lora.LoraConfig(rank=self.rank, alpha=self.alpha, targets=self.targets, seed=self.seed)

    def splits_digits(self, model: GptOss) -> bool:
        """Whether ``model`` is trained on replies one token per digit: ``split_digits``, or when None, whether
        the model has a token map (a small model trained by oss_jax, which writes numbers digit by digit)."""
        return model.token_map is not None if self.split_digits is None else self.split_digits


# -- data ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Conversation:
    """One line of the data: where it is, and its o200k ids (prompt, then the reply the loss is on)."""

    where: str  # "FILE:LINE"
    prompt: list[int]
    reply: list[int]
    family: str | None = None  # an oss_jax.data task family, when the line names one


def encode(record: object, where: str) -> Conversation:
    """One parsed line -> its tokens (see the module docstring); a one-line ValueError starting ``where``."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        got = type(record).__name__ if not isinstance(record, dict) else "no 'messages' list"
        raise ValueError(f'{where}: expected an object {{"messages": [...], "effort": ...}}, got {got}')
    unknown = sorted(set(record) - LINE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (a line holds 'messages' and optionally 'effort' "
                         f"and 'family')")
    effort = record.get("effort", "medium")
    if not isinstance(effort, str) or effort not in harmony.EFFORTS:
        raise ValueError(f"{where}: effort must be one of {', '.join(harmony.EFFORTS)}, got {effort!r}")
    family = record.get("family")
    if family is not None and family not in data.ALL_FAMILIES:
        raise ValueError(f"{where}: family must be one of {', '.join(data.ALL_FAMILIES)}, got {family!r}")
    messages = record["messages"]
    start = len(messages)
    while start > 0 and isinstance(messages[start - 1], dict) and messages[start - 1].get("role") == "assistant":
        start -= 1
    context, reply = messages[:start], messages[start:]
    if not reply or reply[-1].get("channel", "final") != "final":
        raise ValueError(f"{where}: the conversation must end with the assistant's reply, its last message on "
                         f"the 'final' channel")
    if not context:
        raise ValueError(f"{where}: no message before the assistant's reply (a user message, at least)")
    for i, m in enumerate(reply, start):
        if m.get("channel", "final") not in REPLY_CHANNELS or m.get("recipient") is not None:
            raise ValueError(f"{where}: message {i}: the reply's messages are on the 'analysis' or 'final' channel, "
                             f"addressed to nobody (got channel {m.get('channel')!r})")
    try:
        prompt = harmony.render(context, effort)
        msgs = [harmony._to_harmony(m, effort, i) for i, m in enumerate(reply, start)]
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    config = oh.RenderConversationConfig(auto_drop_analysis=False)  # the reply's own analysis is trained
    rendered = list(harmony.encoding().render_conversation_for_training(oh.Conversation.from_messages(msgs), config))
    head = [harmony.START, *harmony.encode("assistant")]  # the prompt ends with it: the reply starts after
    if prompt[-len(head):] != head or rendered[:len(head)] != head:  # pragma: no cover - openai-harmony changed
        raise RuntimeError(f"{where}: harmony rendered an unexpected reply header")
    return Conversation(where, prompt, rendered[len(head):], family)


def read_conversations(path: str | os.PathLike) -> list[Conversation]:
    """Every conversation of a JSONL file (blank lines skipped); a bad line is a ValueError ``FILE:LINE: ...``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    out = []
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not valid UTF-8 (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise ValueError(f"{where}: not valid JSON (nested too deeply)") from None
        out.append(encode(record, where))
    if not out:
        raise ValueError(f"{path}: no conversations (one JSON object per line)")
    return out


def model_ids(model: GptOss, conv: Conversation, split_digits: bool = False) -> list[int]:
    """The conversation's prompt + reply in the model's ids (through its token map, strictly); ``split_digits``:
    the reply's multi-digit tokens split into one token per digit first (``oss_jax.data.split_digits``), unless
    the conversation's family is one that the model's trace style writes whole (``data.SPLIT_BY_STYLE``)."""
    if split_digits and conv.family is not None:
        split_digits = conv.family in data.SPLIT_BY_STYLE[trained_style(model)]
    ids = conv.prompt + (data.split_digits(conv.reply) if split_digits else conv.reply)
    tmap = model.token_map
    if tmap is None:
        return ids
    missing = sorted({t for t in ids if t not in tmap})
    if missing:
        shown = ", ".join(repr(harmony.decode([t])) for t in missing[:5])
        raise ValueError(f"{conv.where}: {len(missing)} token(s) not in the model's vocabulary: {shown}")
    return tmap.to_model(ids).tolist()


@functools.lru_cache(maxsize=4)
def _order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def make_batch(rows: list[tuple[list[int], int]], fc: FinetuneConfig, step: int, seq_len: int) -> dict[str, np.ndarray]:
    """Batch ``step``: ``rows`` are ``(model ids, prompt length)``, each epoch a permutation drawn from
    ``(seed, epoch)``. ``tokens [B, T+1]``, ``positions [B, T]`` (-1 on padding), ``mask [B, T]`` (1 where
    the target is a reply token)."""
    B = fc.batch
    tokens = np.zeros((B, seq_len + 1), np.int32)
    positions = np.full((B, seq_len), -1, np.int32)
    mask = np.zeros((B, seq_len), np.float32)
    for b in range(B):
        epoch, k = divmod(step * B + b, len(rows))
        ids, n_prompt = rows[int(_order(fc.seed, epoch, len(rows))[k])]
        n = len(ids)
        tokens[b, :n] = ids
        positions[b, :n - 1] = np.arange(n - 1)
        mask[b, n_prompt - 1:n - 1] = 1.0  # targets: the reply's tokens
    return {"tokens": tokens, "positions": positions, "mask": mask}


# -- the step ------------------------------------------------------------------------------------
def losses(graphdef: nnx.GraphDef, adapters: nnx.State, frozen: nnx.State,
           batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(cross-entropy on the reply tokens, metrics)``; the router statistics from the recording hooks."""
    model = nnx.merge(graphdef, adapters, frozen)
    tokens, positions, mask = batch["tokens"], batch["positions"], batch["mask"]
    (logits, _), inter = nnx.capture(GptOss.apply, nnx.Intermediate)(model, tokens[:, :-1], positions)
    targets = tokens[:, 1:]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    n = jnp.maximum(mask.sum(), 1.0)
    ce = jnp.sum(nll * mask) / n
    accuracy = jnp.sum((jnp.argmax(logits, -1) == targets) * mask) / n
    records = nnx.to_pure_dict(inter)["layers"]
    E = model.config.num_experts
    load = []
    for i in range(model.config.num_hidden_layers):
        ids = records[i]["mlp"]["expert_ids"]  # [B, T, k]
        slots = jnp.sum(jax.nn.one_hot(ids, E) * mask[..., None, None], axis=(0, 1, 2))
        load.append(slots / jnp.maximum(slots.sum(), 1.0))  # share of the reply tokens' slots per expert
    load_LE = jnp.stack(load)
    spread = jnp.std(load_LE, axis=-1) / jnp.mean(load_LE, axis=-1)
    return ce, {"loss": ce, "accuracy": accuracy, "expert_load": load_LE, "load_spread": spread}


def learning_rate(fc: FinetuneConfig) -> optax.ScalarOrSchedule:
    """The rate of update ``i`` (counted from 0): linear from 0 to ``lr`` over ``warmup`` steps, then ``lr``
    (``decay="constant"``) or ``lr * (1 + cos(pi * (i - warmup) / (steps - warmup))) / 2`` (``"cosine"``: 0 at
    ``i = steps``, so the last update, ``steps - 1``, is the smallest; a run no longer than its warmup has no
    decay). A rate that never changes is a plain number (as before the setting: the optimizer state of such a
    run, and so its checkpoints, keep their shape)."""
    warmup = min(fc.warmup, fc.steps)
    if fc.decay == "cosine" and warmup < fc.steps:
        return optax.warmup_cosine_decay_schedule(0.0, fc.lr, warmup, fc.steps, end_value=0.0)
    return optax.linear_schedule(0.0, fc.lr, warmup) if warmup else fc.lr


@functools.cache  # one object per configuration: the compiled train_step is keyed on it
def optimizer(fc: FinetuneConfig) -> optax.GradientTransformation:
    """AdamW after global-norm clipping at the rate ``learning_rate(fc)``."""
    return optax.chain(optax.clip_by_global_norm(fc.clip),
                       optax.adamw(learning_rate(fc), weight_decay=fc.weight_decay))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 4))
def train_step(graphdef: nnx.GraphDef, opt: optax.GradientTransformation, adapters: nnx.State, frozen: nnx.State,
               opt_state, batch: dict[str, jax.Array]):
    """One optimizer step on the adapters: ``(adapters, opt_state, metrics)``. ``frozen`` is only read."""
    grads, metrics = jax.grad(losses, argnums=1, has_aux=True)(graphdef, adapters, frozen, batch)
    updates, opt_state = opt.update(grads, opt_state, adapters)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return optax.apply_updates(adapters, updates), opt_state, metrics


def split_for_training(model: GptOss) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, adapters, frozen)`` of a copy of ``model`` with router recording on (the same arrays).

    The copy has no token map (``apply`` works in model ids): two loads of one model then have equal graphs,
    and the compiled step is reused."""
    copy = nnx.merge(*nnx.split(model))
    copy.token_map = None
    for _, module in nnx.iter_modules(copy):
        if hasattr(module, "recording"):
            module.recording = Recording(router=True, sinks=False, residual=False)
    return nnx.split(copy, lora.Adapter, ...)


# -- the run -------------------------------------------------------------------------------------
def finetune(model: str | os.PathLike | GptOss, data: str | os.PathLike, out: str | os.PathLike,
             fc: FinetuneConfig = FinetuneConfig(), *, dtype: str | None = None, progress: bool = True,
             stop_after: int | None = None, on_metrics: Callable[[dict], None] | None = None) -> GptOss:
    """Train LoRA adapters on the conversations of ``data`` (JSONL) in the run directory ``out``.

    Args:
      model: what ``oss_jax.load`` takes (``"tiny"``, a directory, a hub id), or a loaded ``GptOss``
        (given adapters of ``fc.lora`` in place, unless it has those already).
      data: the JSONL file (see the module docstring).
      out: the run directory: new, empty, or an earlier run of the same configuration (resumed).
      fc: the configuration; dtype: for ``oss_jax.load``.
      stop_after: stop (after checkpointing) at this step, as if interrupted; for tests.

    Returns the model with its trained adapters; ``out/adapters`` holds them once the run is complete.
    """
    fc = fc if isinstance(fc, FinetuneConfig) else FinetuneConfig(**fc)
    out = Path(out)
    _check_out(out)
    conversations = read_conversations(data)  # a bad line is refused before anything is loaded
    digest = hashlib.sha256(Path(data).read_bytes()).hexdigest()
    if not isinstance(model, GptOss):
        import oss_jax

        source = str(model)
        model = oss_jax.load(model, dtype=dtype)
    else:
        source = "a GptOss passed in"
    if not boundary.reads_harmony(model):
        raise ValueError(f"this model's vocabulary has {model.config.vocab_size} tokens; fine-tuning on "
                         f"conversations needs the harmony tokens (an o200k_harmony model or a token map)")
    split = fc.splits_digits(model)
    rows = [(model_ids(model, c, split), len(c.prompt)) for c in conversations]
    seq_len = max(len(ids) for ids, _ in rows) - 1
    # split_digits as resolved for this model: None and True train the bundled model alike, and resume each other
    settings = {**dataclasses.asdict(fc), "split_digits": split}
    setup = {"finetune": json.loads(json.dumps(settings)), "model": source,
             "base": lora.base_shape(model.config), "data": {"sha256": digest, "conversations": len(rows)}}
    saved = out / CONFIG_FILE
    if saved.exists():
        _same_setup(saved, setup)
    metrics_path = out / "metrics.jsonl"
    logged = read_metrics(metrics_path)  # a corrupt log is refused before any work
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(setup, indent=1))

    had = lora.config(model)
    if had is None:
        lora.add(model, fc.lora)
    elif had != fc.lora:
        raise ValueError(f"the model has adapters of {had}, this run trains {fc.lora}")
    graphdef, adapters, frozen = split_for_training(model)
    # train_step donates its adapters: copies, not the model's own. Committed to their devices, as orbax
    # restores them: the step compiled for a fresh run is then the one a resumed run uses.
    adapters = _committed(jax.tree.map(jnp.copy, adapters))
    opt = optimizer(fc)
    opt_state = _committed(opt.init(adapters))
    manager = ocp.CheckpointManager(out.absolute() / "checkpoints",
                                    options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    start = manager.latest_step() or 0
    if start:
        restored = manager.restore(start, args=ocp.args.StandardRestore({"adapters": adapters, "opt_state": opt_state}))
        adapters, opt_state = restored["adapters"], restored["opt_state"]
    if metrics_path.exists():  # drop rows logged after the checkpoint this run resumes from
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in logged if r["step"] <= start))
    end = fc.steps if stop_after is None else min(fc.steps, stop_after)
    bar = _bar(progress, start, fc.steps)
    t0 = time.perf_counter()
    try:
        with metrics_path.open("a") as log:
            for step in range(start, end):
                batch = {k: jnp.asarray(v) for k, v in make_batch(rows, fc, step, seq_len).items()}
                adapters, opt_state, metrics = train_step(graphdef, opt, adapters, frozen, opt_state, batch)
                done = step + 1
                if done % fc.log_every == 0 or done == fc.steps:
                    row = {"step": done, **{k: _jsonable(v) for k, v in metrics.items()},
                           "seconds": round(time.perf_counter() - t0, 2)}
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    if on_metrics:
                        on_metrics(row)
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}")
                if bar is not None:
                    bar.update(1)
                if done % fc.checkpoint_every == 0 or done == end:
                    manager.save(done, args=ocp.args.StandardSave({"adapters": adapters, "opt_state": opt_state}))
        manager.wait_until_finished()
    finally:
        manager.close()
        if bar is not None:
            bar.close()
    nnx.update(model, adapters)
    if end == fc.steps:
        lora.save_adapters(model, out / "adapters")
    return model


def _committed(tree):
    """Every array of ``tree`` placed explicitly where it is (``jax.jit`` compiles separately for arrays
    that are and are not committed to a device)."""
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding), tree)


def _jsonable(value: jax.Array) -> float | list:
    """A metric for metrics.jsonl: a float, or (per layer, per expert) lists rounded to 5 decimals."""
    arr = np.asarray(value, np.float64)
    return float(arr) if arr.ndim == 0 else np.round(arr, 5).tolist()


def _check_out(out: Path) -> None:
    """Refuse a run directory that is a file, or holds files no fine-tuning run wrote."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: expected a run directory, got a file")
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).exists():
        names = sorted(p.name for p in out.iterdir())
        raise ValueError(f"{out}: holds {', '.join(names[:4])}{' ...' if len(names) > 4 else ''} and is not a "
                         f"fine-tuning run (no {CONFIG_FILE}); use a new --out")


def _same_setup(saved: Path, setup: dict) -> None:
    """Refuse to resume a run whose configuration, model or data differ: one line naming the first difference."""
    try:
        before = json.loads(saved.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{saved}: not valid JSON ({e})") from None
    if isinstance(before, dict) and isinstance(before.get("finetune"), dict):
        before["finetune"].setdefault("split_digits", False)  # a run from before the setting never split digits
        before["finetune"].setdefault("decay", "constant")  # nor decayed its rate
    if before == setup:
        return
    for part in setup:
        old, new = before.get(part) if isinstance(before, dict) else None, setup[part]
        if old != new:
            if isinstance(old, dict) and isinstance(new, dict):
                key = next(k for k in sorted({*old, *new}) if old.get(k) != new.get(k))
                what, old, new = f"{part}.{key}", old.get(key), new.get(key)
            else:
                what = part
            raise ValueError(f"{saved.parent} holds a fine-tuning run with a different {what} ({old!r}, now "
                             f"{new!r}); use a new --out")
    raise ValueError(f"{saved}: not a fine-tuning configuration; use a new --out")


def _bar(progress: bool, start: int, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="fine-tuning", unit="step")
