"""``oss-jax routes``: how a model routes a corpus, as ``metrics.json``, figures and one ``report.md``.

    from oss_jax.routes import routes
    result = routes("tiny", out="runs/routes")          # the shipped corpus (oss_jax/prompts/routes.jsonl)
    result = routes("ckpt/", "my.jsonl", "runs/mine", effort="high", chunk=512)

Each prompt runs through the model a chunk at a time (``oss_jax.trace.trace_chunks`` with
``expert_outputs=True``), and every metric is accumulated as sums that add up (``RoutingStats``,
``SaliencyStats``, ``SinkStats``), so memory is the model, one chunk's records and these sums, however
long the corpus. Every token is also labelled by group: its domain, the reasoning effort of its
conversation and, inside assistant messages, its harmony channel (``analysis``, ``final``); each group's
expert load is kept (``RoutingStats.add_groups``) with random halves for the baseline of the
comparison between groups (``metrics.js_halves_baseline``).

Prompts (``read_prompts``): a plain text file holds one prompt per line; a ``.jsonl`` file one JSON
object per line, either ``{"domain": "math", "text": "..."}`` (raw text) or ``{"domain": ...,
"messages": [...], "effort": "high"}``: a harmony conversation (messages as ``oss-jax chat --json``
prints them, ``{"role", "content", "channel"}``), rendered by ``oss_jax.harmony`` with the assistant's
trailing messages as the model writes them (its analysis kept, the final answer ending in
``<|return|>``). ``effort`` defaults to the run's.

Resumable: after every ``save_every`` prompts (and on Ctrl-C, and at ``stop_after``) the sums are saved
to ``DIR/state.npz`` and the progress to ``DIR/done.json``, each written to a temporary file and
renamed. A rerun with the same model, prompts and settings skips the prompts done and ends with the same
``metrics.json``, byte for byte; one with other settings is refused, as is a ``DIR`` holding other files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from oss_jax import checkpoint, harmony
from oss_jax import metrics as M
from oss_jax.checks import int_arg
from oss_jax.load import BUNDLED
from oss_jax.routing import RoutingStats, SinkStats
from oss_jax.saliency import SaliencyStats

__all__ = ["DEFAULT_PROMPTS", "Prompt", "RoutesResult", "read_prompts", "routes"]

DEFAULT_PROMPTS = Path(__file__).parent / "prompts" / "routes.jsonl"
FORMAT = "oss-jax/routes-1"
FILES = ("metrics.json", "report.md", "state.npz", "done.json")  # what routes writes in DIR
FIGURES = "figures"
SPLITS = 8  # random halves per token, for the baseline of the group comparisons
SEED = 20250917  # of the halves and of the simulated MI baseline: fixed, so reruns agree
KEYS = {"domain", "text", "messages", "effort"}
FAMILIES = ("domain", "effort", "channel")
FIGURE_FILES = ("load.png", "per_layer.png", "consistency.png", "fingerprints.png", "overlap.png", "groups.png",
                "saliency.png", "sinks.png")
_TEMP = re.compile(r"\.(.+)\.tmp-\d+")


# -- prompts ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Prompt:
    """One prompt, tokenized: o200k ``tokens`` (cut to ``max_tokens``), its ``domain`` (or None), the
    ``effort`` of a conversation (None for text), per-token harmony ``channels`` (conversations; None
    outside assistant messages), the ``line`` of the file it came from and its length before the cut."""

    line: int
    tokens: list[int]
    domain: str | None = None
    effort: str | None = None
    channels: list[str | None] | None = None
    length: int = 0


def _role(message) -> str | None:
    return message.get("role") if isinstance(message, dict) else None


def render_conversation(messages: Sequence[dict], effort: str) -> tuple[list[int], list[str | None]]:
    """A harmony conversation's tokens and the channel of each (None outside assistant messages' content).

    The messages before the trailing assistant ones are rendered by ``harmony.render`` (its history rule
    drops earlier turns' analysis); the trailing assistant messages follow as the model writes them after
    ``<|start|>assistant``: analysis kept, a final answer closed by ``<|return|>``.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of harmony messages")
    tail = len(messages)
    while tail > 0 and _role(messages[tail - 1]) == "assistant":
        tail -= 1
    if tail == len(messages):
        ids = harmony.render(messages, effort, add_generation_prompt=False)
    else:
        ids = harmony.render(messages[:tail], effort, add_generation_prompt=False)
        enc = harmony.encoding()
        for i in range(tail, len(messages)):
            ids += list(enc.render(harmony._to_harmony(messages[i], effort, i)))
        if messages[-1].get("channel", "final") == "final" and ids[-1] == harmony.END:
            ids[-1] = harmony.RETURN  # as generation ends a final answer
    return ids, channel_labels(ids)


def channel_labels(ids: Sequence[int]) -> list[str | None]:
    """Per token: the channel of the assistant message whose content it is (``analysis``, ``final``, ...), else None."""
    labels: list[str | None] = [None] * len(ids)
    header: list[int] | None = None
    role = channel = None
    for t, tok in enumerate(ids):
        if tok == harmony.START:
            header, role, channel = [], None, None
        elif header is not None:
            if tok == harmony.MESSAGE:
                role, channel = _header(header)
                header = None
            else:
                header.append(tok)
        elif tok in (harmony.END, harmony.RETURN, harmony.CALL):
            role = channel = None
        elif role == "assistant" and channel:
            labels[t] = channel
    return labels


def _header(header: list[int]) -> tuple[str | None, str | None]:
    """``(role, channel)`` of a message header ``role[ to=x]<|channel|>channel[ to=x][<|constrain|>type]``."""
    if harmony.CONSTRAIN in header:
        header = header[:header.index(harmony.CONSTRAIN)]
    cut = header.index(harmony.CHANNEL) if harmony.CHANNEL in header else len(header)
    role = [w for w in harmony.decode(header[:cut]).split() if not w.startswith("to=")]
    channel = [w for w in harmony.decode(header[cut + 1:]).split() if not w.startswith("to=")]
    return (role[0] if role else None), (channel[0] if channel else None)


def _prompt_from_json(obj, effort: str) -> Prompt:
    """One JSONL object as a Prompt (tokens not yet cut); ``ValueError`` without the file:line prefix."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object with 'text' or 'messages', got {type(obj).__name__}")
    unknown = sorted(set(obj) - KEYS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (keys: domain, text, messages, effort)")
    if ("text" in obj) == ("messages" in obj):
        raise ValueError("a prompt has either 'text' or 'messages' (a harmony conversation), not "
                         + ("both" if "text" in obj else "neither"))
    domain = obj.get("domain")
    if domain is not None and (not isinstance(domain, str) or not domain.strip()):
        raise ValueError(f"'domain' must be a non-empty string, got {domain!r}")
    if "text" in obj:
        if "effort" in obj:
            raise ValueError("'effort' applies to harmony conversations ('messages'), not to 'text'")
        text = obj["text"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"'text' must be a non-empty string, got {text!r}"[:200])
        return Prompt(0, harmony.encode(text), domain)
    eff = obj.get("effort", effort)
    if eff not in harmony.EFFORTS:
        raise ValueError(f"'effort' must be one of low, medium, high, got {eff!r}")
    ids, channels = render_conversation(obj["messages"], eff)
    return Prompt(0, ids, domain, eff, channels)


def read_prompts(path: str | os.PathLike | None = None, effort: str = "medium",
                 max_tokens: int | None = None) -> list[Prompt]:
    """The prompts of a file (default: the shipped corpus), tokenized and cut to ``max_tokens`` tokens each.

    ``*.jsonl`` / ``*.ndjson``: one JSON object per line (see the module docstring); any other file: one
    prompt of plain text per line. Blank lines are skipped. Anything else is one ``ValueError``
    ``FILE:LINE: what is wrong``.
    """
    path = Path(DEFAULT_PROMPTS if path is None else path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise OSError(f"{path}: cannot read ({checkpoint.os_reason(e)})") from None
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    prompts: list[Prompt] = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column "
                             f"{e.start + 1})") from None
        text = text.removesuffix("\r")
        if number == 1:
            text = text.removeprefix("\ufeff")  # a byte-order mark
        if not text.strip():
            continue
        try:
            if jsonl:
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
                prompt = _prompt_from_json(obj, effort)
            else:
                prompt = Prompt(0, harmony.encode(text))
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
        prompt.line, prompt.length = number, len(prompt.tokens)
        if max_tokens is not None:
            prompt.tokens = prompt.tokens[:max_tokens]
            if prompt.channels is not None:
                prompt.channels = prompt.channels[:max_tokens]
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: holds no prompts")
    return prompts


# -- the output directory ----------------------------------------------------------------------------------------
def _ours(path: Path) -> str | None:
    """None when directory ``path`` holds only what routes writes, else why not."""
    why = f"routes writes only {', '.join(FILES)} and {FIGURES}/"
    for p in path.iterdir():
        m = _TEMP.fullmatch(p.name)
        name = m[1] if m else p.name
        if p.is_symlink():
            return why
        if name == FIGURES and p.is_dir():
            if any(q.is_symlink() or not q.is_file() or not (q.suffix == ".png" or _TEMP.fullmatch(q.name))
                   for q in p.iterdir()):
                return f"{FIGURES}/ holds files other than .png figures"
        elif name not in FILES or not p.is_file():
            return why
    return None


def _check_out(out: Path) -> None:
    checkpoint.check_destination(out, overwrite=True, ours=_ours, what="an oss-jax routes report",
                                 hint=": use another --out")
    if out.is_dir() and any(True for _ in out.iterdir()) and not (out / "done.json").is_file():
        raise checkpoint.CheckpointError(f"{out}: holds routes output but no done.json, so the run it belongs "
                                         f"to is unknown; not replaced: use another --out, or delete it")


def _write_atomic(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a temporary file in the same directory and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _refuse_other_run(out: Path, settings: dict) -> dict | None:
    """The saved progress of ``out`` (None if none), refused when it was made with other settings."""
    path = out / "done.json"
    try:
        done = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise checkpoint.CheckpointError(f"{path}: unreadable ({e}); use another --out, or delete it") from None
    old = done.get("settings") if isinstance(done, dict) else None
    if not isinstance(old, dict):
        raise checkpoint.CheckpointError(f"{path}: not a routes progress file; use another --out")
    for key in settings:
        if old.get(key) != settings[key]:
            raise ValueError(f"{out}: holds a routes run with other settings ({key}: {old.get(key)!r} there, "
                             f"{settings[key]!r} now); use another --out, or delete it to start over")
    return done


# -- the accumulated sums ----------------------------------------------------------------------------------------
class _Run:
    """Every sum of a run: routing, saliency, sinks, and the tokens the model's vocabulary lacks."""

    def __init__(self, L: int, E: int, k: int, N: int):
        self.routing = RoutingStats(L, E, k, cross_layer=False)  # L E^2 pair counts, not (L E)^2
        self.saliency = SaliencyStats(E)
        self.sinks = SinkStats(L, N)
        self.prompts = 0
        self.unknown = 0
        self.unknown_ids: set[int] = set()
        self.truncated = 0

    def merge(self, other: _Run) -> None:
        self.routing.merge(other.routing)
        s, o = self.saliency, other.saliency
        if o.counts is not None:
            if s.counts is None:
                s.counts, s.reap_sums, s.max_LE = o.counts.copy(), o.reap_sums.copy(), o.max_LE.copy()
            else:
                s.counts, s.reap_sums, s.max_LE = s.counts + o.counts, s.reap_sums + o.reap_sums, \
                    np.maximum(s.max_LE, o.max_LE)
            s.tokens += o.tokens
        self.sinks.queries += other.sinks.queries
        self.sinks.sum_LN += other.sinks.sum_LN
        self.sinks.sum_LP += other.sinks.sum_LP
        self.sinks.count_P += other.sinks.count_P
        self.prompts += other.prompts
        self.unknown += other.unknown
        self.unknown_ids |= other.unknown_ids
        self.truncated += other.truncated

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {f"routing.{k}": v for k, v in self.routing.to_arrays().items()}
        s = self.saliency
        if s.counts is not None:
            out.update({"saliency.counts": s.counts, "saliency.reap_sums": s.reap_sums, "saliency.max_LE": s.max_LE})
        out.update({"saliency.tokens": np.array(s.tokens), "sinks.queries": np.array(self.sinks.queries),
                    "sinks.sum_LN": self.sinks.sum_LN, "sinks.sum_LP": self.sinks.sum_LP,
                    "sinks.count_P": self.sinks.count_P,
                    "run.counts": np.array([self.prompts, self.unknown, self.truncated]),
                    "run.unknown_ids": np.array(sorted(self.unknown_ids), np.int64)})
        return out

    @classmethod
    def from_arrays(cls, a, L: int, E: int, k: int, N: int) -> _Run:
        run = cls(L, E, k, N)
        run.routing = RoutingStats.from_arrays({key[8:]: a[key] for key in a if key.startswith("routing.")})
        if "saliency.counts" in a:
            run.saliency.counts = np.array(a["saliency.counts"])
            run.saliency.reap_sums = np.array(a["saliency.reap_sums"])
            run.saliency.max_LE = np.array(a["saliency.max_LE"])
        run.saliency.tokens = int(a["saliency.tokens"])
        run.sinks.queries = int(a["sinks.queries"])
        run.sinks.sum_LN, run.sinks.sum_LP = np.array(a["sinks.sum_LN"]), np.array(a["sinks.sum_LP"])
        run.sinks.count_P = np.array(a["sinks.count_P"])
        run.prompts, run.unknown, run.truncated = (int(x) for x in a["run.counts"])
        run.unknown_ids = {int(x) for x in a["run.unknown_ids"]}
        return run


def _save(out: Path, run: _Run, settings: dict, done: dict) -> None:
    """state.npz then done.json, each atomically; state.npz carries its own count (it wins if they differ)."""
    arrays = run.to_arrays()
    arrays["run.settings"] = np.array(json.dumps(settings, sort_keys=True))
    tmp = out / f".state.npz.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / "state.npz")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    done.update(prompts_done=run.prompts, tokens=run.routing.tokens)
    _write_atomic(out / "done.json", (json.dumps(done, indent=1) + "\n").encode())


def _load_state(out: Path, settings: dict, L: int, E: int, k: int, N: int) -> _Run | None:
    path = out / "state.npz"
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as a:
            arrays = {key: a[key] for key in a.files}
        if json.loads(str(arrays["run.settings"])) != json.loads(json.dumps(settings, sort_keys=True)):
            raise ValueError("it was written with other settings than done.json's")
        return _Run.from_arrays(arrays, L, E, k, N)
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise checkpoint.CheckpointError(f"{path}: cannot resume from it ({e}); use another --out, or delete "
                                         f"it") from None


# -- running -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RoutesResult:
    """What :func:`routes` did: ``complete`` (metrics.json and report.md written) or stopped at ``stop_after``;
    prompts done of all, tokens routed, tokens the model's vocabulary lacks (read as its unknown id), and the
    metrics (as in ``metrics.json``) when complete."""

    out: Path
    complete: bool
    prompts: int
    prompts_done: int
    tokens: int
    unknown_tokens: int
    unknown_distinct: int
    metrics: dict | None = None


def _model_name(model) -> str:
    if isinstance(model, str) and model == "tiny":
        return "tiny"
    if isinstance(model, str | os.PathLike) and os.path.exists(model):
        return os.path.realpath(model)
    return str(model)


def routes(model, prompts: str | os.PathLike | None = None, out: str | os.PathLike = "routes", *,
           effort: str = "medium", chunk: int = 256, max_tokens: int = 2048, dtype: str | None = None,
           name: str | None = None, save_every: int = 8, stop_after: int | None = None,
           progress: bool = False) -> RoutesResult:
    """Run a prompt corpus through a model and write ``out/metrics.json``, ``out/figures/*.png`` and ``out/report.md``.

    Args:
      model: what ``oss_jax.load`` takes (``"tiny"``, a checkpoint directory, a hub id), or a loaded
        ``GptOss`` (then give ``name``: resuming checks it).
      prompts: a prompt file (see :func:`read_prompts`); default the shipped corpus ``DEFAULT_PROMPTS``.
      out: the output directory: missing, empty, or an earlier run of the same model, prompts and settings
        (resumed: the prompts done are skipped). Anything else is refused before the model loads.
      effort: reasoning effort of conversations that do not give one.
      chunk: tokens per compiled forward pass (memory: one chunk's records).
      max_tokens: each prompt is cut to its first ``max_tokens`` tokens.
      dtype: parameter dtype for ``oss_jax.load``.
      name: what a loaded ``model`` is (recorded as the run's model, and checked on resume).
      save_every: save the sums after this many prompts.
      stop_after: stop (saved) after this many prompts in this call; a later call resumes.
      progress: a progress bar over the prompts on stderr.
    """
    from oss_jax.model import GptOss

    if not isinstance(effort, str) or effort not in harmony.EFFORTS:
        raise ValueError(f"effort must be one of low, medium, high, got {effort!r}")
    chunk, max_tokens = int_arg("chunk", chunk, 1), int_arg("max_tokens", max_tokens, 1)
    save_every = int_arg("save_every", save_every, 1)
    stop_after = None if stop_after is None else int_arg("stop_after", stop_after, 1)
    out = Path(out)
    _check_out(out)
    for file in (*FILES, *(f"{FIGURES}/{f}" for f in FIGURE_FILES)):
        checkpoint.remove_stale_temporaries(out / file)
    prompt_file = Path(DEFAULT_PROMPTS if prompts is None else prompts)
    corpus = read_prompts(prompt_file, effort, max_tokens)
    loaded = isinstance(model, GptOss)
    if loaded and name is None:
        raise ValueError("routes of a loaded model needs name= (what it is; a resumed run checks it)")
    settings = {"format": FORMAT, "model": name if loaded else _model_name(model), "dtype": None if loaded else dtype,
                "prompts_sha256": hashlib.sha256(prompt_file.read_bytes()).hexdigest(), "effort": effort,
                "chunk": chunk, "max_tokens": max_tokens}
    done = _refuse_other_run(out, settings)
    if not loaded:
        import oss_jax

        model = oss_jax.load(model, dtype=dtype, progress=progress and model not in BUNDLED)
    from oss_jax import boundary

    if boundary.vocab_size(model) < harmony.VOCAB_SIZE:
        raise ValueError(f"{settings['model']}: its vocabulary has {boundary.vocab_size(model)} ids and no map from "
                         f"o200k_harmony (vocab.json): routes feeds it o200k text")
    cfg = model.config
    shape = (cfg.num_hidden_layers, cfg.num_experts, cfg.experts_per_token, cfg.num_attention_heads)
    out.mkdir(parents=True, exist_ok=True)
    run = _load_state(out, settings, *shape) or _Run(*shape)
    if done is None:
        done = {"format": FORMAT, "settings": settings, "prompts_file": os.path.abspath(prompt_file),
                "prompts": len(corpus)}
        _save(out, run, settings, done)
    start, stopped, merging = run.prompts, False, False
    bar = tqdm(total=len(corpus), initial=start, unit="prompt", desc="routes", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    try:
        for index in range(start, len(corpus)):
            if stop_after is not None and index - start >= stop_after:
                stopped = True
                break
            one = _Run(*shape)
            _trace_prompt(model, corpus[index], index, chunk, one)
            merging = True
            run.merge(one)
            merging = False
            bar.update(1)
            bar.set_postfix(tokens=run.routing.tokens, refresh=False)
            if (run.prompts - start) % save_every == 0:
                _save(out, run, settings, done)
    except KeyboardInterrupt:
        if not merging:  # the sums hold whole prompts only: resumable from here
            _save(out, run, settings, done)
        raise
    finally:
        bar.close()
    if run.prompts > start:
        _save(out, run, settings, done)
    result = RoutesResult(out, not stopped, len(corpus), run.prompts, run.routing.tokens, run.unknown,
                          len(run.unknown_ids))
    if stopped:
        return result
    info = {"model": settings["model"], "prompts_file": os.path.abspath(prompt_file), "prompts": len(corpus)}
    result.metrics = summarize(run, cfg, settings, info)
    text = (json.dumps(result.metrics, indent=1, allow_nan=False) + "\n").encode()
    if _written(out, text):  # a finished run, rerun: everything is already there
        return result
    _write_atomic(out / "metrics.json", text)
    figures = write_figures(result.metrics, out / FIGURES)
    _write_atomic(out / "report.md", report(result.metrics, figures).encode())
    return result


def _written(out: Path, metrics: bytes) -> bool:
    """Whether ``out`` already holds these metrics, their report and every figure it links."""
    try:
        if (out / "metrics.json").read_bytes() != metrics:
            return False
        linked = re.findall(rf"\]\({FIGURES}/([\w.]+)\)", (out / "report.md").read_text())
    except OSError:
        return False
    return all((out / FIGURES / name).is_file() for name in linked)


def _trace_prompt(model, prompt: Prompt, index: int, chunk: int, run: _Run) -> None:
    """One prompt through ``trace_chunks``, into ``run`` (a fresh accumulator, merged by the caller)."""
    from oss_jax.trace import trace_chunks

    tokens = np.asarray(prompt.tokens, np.int64)
    n = len(tokens)
    tmap = model.token_map
    if tmap is not None:
        missing = np.array([t not in tmap for t in tokens.tolist()], bool)
        run.unknown += int(missing.sum())
        run.unknown_ids |= set(tokens[missing].tolist())
    run.truncated += int(prompt.length > n)
    # The KV cache is sized to a multiple of the chunk (few compiled shapes): the tokens are padded by repeating
    # the last one, and the padding, after every real token, is never read (causal) and never counted.
    C = chunk
    padded = np.concatenate([tokens, np.full(-n % C, tokens[-1])])
    halves = np.random.default_rng([SEED, index]).integers(0, 2, (SPLITS, n))
    whole = [g for g in (("domain", prompt.domain), ("effort", prompt.effort)) if g[1] is not None]
    with warnings.catch_warnings():  # unknown tokens are counted above and reported once
        warnings.filterwarnings("ignore", message=r".*not in this model's vocabulary")
        pieces = trace_chunks(model, padded, chunk=C, expert_outputs=True, next_token=False)
        for piece in itertools.islice(pieces, -(-n // C)):  # the chunks that hold real tokens
            real = (piece.positions >= 0) & (piece.positions < n)
            piece = dataclasses.replace(piece, positions=np.where(real, piece.positions, -1))
            run.routing.update_trace(piece)
            run.saliency.update(piece)
            run.sinks.update_trace(piece)
            at = piece.positions[real]
            ids = piece.expert_ids[:, real]
            for label in whole:
                run.routing.add_groups(ids, label, halves_ST=halves[:, at])
            if prompt.channels is not None:
                labels = [None if prompt.channels[t] is None else ("channel", prompt.channels[t]) for t in at.tolist()]
                run.routing.add_groups(ids, labels, halves_ST=halves[:, at])
    run.prompts += 1


# -- metrics -----------------------------------------------------------------------------------------------------
SOURCES = {
    "Switch": "Fedus, Zoph, Shazeer. Switch Transformers. JMLR 2022 (arXiv:2101.03961), eq. 4",
    "Shazeer": "Shazeer et al. Outrageously Large Neural Networks: the Sparsely-Gated Mixture-of-Experts Layer. "
               "ICLR 2017 (arXiv:1701.06538), CV of the load",
    "LossFree": "Wang et al. Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts. arXiv:2408.15664",
    "OLMoE": "Muennighoff et al. OLMoE: Open Mixture-of-Experts Language Models. arXiv:2409.02060, section 5",
    "Mixtral": "Jiang et al. Mixtral of Experts. arXiv:2401.04088, section 5, Table 5",
    "Entropy": "Shannon entropy; Cover, Thomas. Elements of Information Theory, 2nd ed., 2006, ch. 2",
    "MI": "Cover, Thomas. Elements of Information Theory, 2nd ed., 2006, section 2.4; plug-in bias: "
          "Panzeri, Treves. Network 7, 1996",
    "NMI": "Strehl, Ghosh. Cluster Ensembles. JMLR 3, 2002",
    "Jaccard": "Jaccard. The distribution of the flora in the alpine zone. New Phytologist 11, 1912",
    "JS": "Lin. Divergence measures based on the Shannon entropy. IEEE Trans. Inf. Theory 37, 1991",
    "REAP": "Lasby et al. REAP the Experts: Why Pruning Prevails for One-Shot MoE compression. arXiv:2510.13999",
    "Super": "Su et al. Unveiling Super Experts in Mixture-of-Experts Large Language Models. arXiv:2507.23279",
    "Sinks": "Xiao et al. Efficient Streaming Language Models with Attention Sinks. ICLR 2024 (arXiv:2309.17453)",
}


def _plain(x):
    """numpy -> JSON values (NaN and inf -> None)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return _plain(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _layer_metric(values, baseline, unit: str, source: str, formula: str) -> dict:
    """A per-layer metric: values ``[L]`` (or ``[L - 1]`` layer pairs), its mean, baseline, unit, source."""
    v = np.asarray(values, np.float64)
    b = np.asarray(baseline, np.float64)
    mean = float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
    bmean = float(np.nanmean(b)) if np.isfinite(b).any() else math.nan
    return {"per_layer": v, "mean": mean, "baseline": b if b.ndim else float(b), "baseline_mean": bmean,
            "unit": unit, "source": source, "formula": formula}


def _groups(stats: RoutingStats, family: str) -> list[str]:
    return sorted(g[1] for g in stats.group_load if isinstance(g, tuple) and g[0] == family)


def summarize(run: _Run, cfg, settings: dict, info: dict) -> dict:
    """Every metric of a run, JSON-ready: values, baselines, units, formulas and sources."""
    stats, E, k, L = run.routing, cfg.num_experts, cfg.experts_per_token, cfg.num_hidden_layers
    T = stats.tokens
    s = stats.summary(min_count=5)
    base = s["baselines"]
    m: dict[str, dict] = {}
    if "entropy" in s:
        m["router_entropy"] = _layer_metric(s["entropy"], base["entropy"], "nats", "Entropy",
                                            "H = -sum_i p_i ln p_i, p = softmax of all E router logits; "
                                            "baseline ln E (an indifferent router)")
    if "gate_entropy" in s:
        m["gate_entropy"] = _layer_metric(s["gate_entropy"], base["gate_entropy"], "nats", "Entropy",
                                          "entropy of gpt-oss's gates (softmax of the k chosen logits); baseline ln k")
    m["load_cv"] = _layer_metric(s["cv"], base["cv"], "", "Shazeer",
                                 "std_i N(i) / mean_i N(i); baseline: uniformly random routing of T tokens, "
                                 "sqrt((1 - k/E) / (T k/E))")
    m["max_vio"] = _layer_metric(s["max_vio"], 0.0, "", "LossFree",
                                 "max_i N(i) / mean_i N(i) - 1; 0 = perfectly balanced")
    if "switch_loss" in s:
        m["switch_loss"] = _layer_metric(s["switch_loss"], 1.0, "", "Switch",
                                         "E sum_i f_i P_i; 1 under uniform routing")
    m["consecutive_first"] = _layer_metric(s["consecutive_first"], base["consecutive_first"], "rate", "Mixtral",
                                           "P(first choice of token t = that of t-1); baseline 1/E")
    m["consecutive_any"] = _layer_metric(s["consecutive_any"], base["consecutive_any"], "rate", "Mixtral",
                                         "P(top-k of t and t-1 share an expert); baseline 1 - C(E-k,k)/C(E,k)")
    if "vocab_specialization" in s:
        m["vocab_specialization"] = _layer_metric(
            s["vocab_specialization"], base["specialization"], "share", "OLMoE",
            "share of a token id's routings going to its k most used experts (ids seen >= 5 times, weighted by "
            "occurrences); baseline k/E, biased upwards for rare ids")
    if L > 1:
        counts = stats.transition_counts
        mi = M.mutual_information(counts)
        mi_base = M.mutual_information_baseline(stats.load, T, k, seed=SEED)
        hx, hy = M.marginal_entropies(counts)
        with np.errstate(invalid="ignore", divide="ignore"):
            nmi_base = mi_base / np.sqrt(hx * hy)
        m["transition_mi"] = _layer_metric(mi, mi_base, "bits", "MI",
                                           "I(X_l; X_l+1) over the k x k (layer l, layer l+1) choice pairs of each "
                                           "token; 0 for independent layers, baseline = expected plug-in MI of T "
                                           "tokens routed independently per layer with the observed loads "
                                           "(simulated)")
        m["transition_nmi"] = _layer_metric(M.normalized_mutual_information(counts), nmi_base, "", "NMI",
                                            "I / sqrt(H(X_l) H(X_l+1)) in [0, 1]; baseline: the simulated MI "
                                            "baseline normalised the same way")
    out = {"format": FORMAT, "settings": settings, "info": info,
           "model": {"layers": L, "experts": E, "k": k, "heads": cfg.num_attention_heads,
                     "sliding": [t == "sliding_attention" for t in cfg.layer_types]},
           "tokens": T, "prompts": run.prompts, "truncated_prompts": run.truncated,
           "unknown_tokens": run.unknown, "unknown_distinct": len(run.unknown_ids), "metrics": m,
           "load": s["load"], "coactivation": s["coactivation"]}
    if L > 1:
        out["transitions"] = M.transition_probs(stats.transition_counts)
    # groups: fingerprints, overlap, divergence against random halves
    groups: dict[str, dict] = {}
    for family in FAMILIES:
        names = _groups(stats, family)
        if not names:
            continue
        g: dict[str, object] = {"tokens": {n: int(stats.group_load[(family, n)][0].sum() // k) for n in names},
                                "frequency": {n: M.specialization_per_expert(stats.group_load[(family, n)], k)
                                              for n in names}}
        pairs = {}
        for a, b in itertools.combinations(names, 2):
            js, bl = stats.compare_groups((family, a), (family, b))
            pair = {"js": js, "js_baseline": bl,
                    "jaccard": M.jaccard_top(stats.group_load[(family, a)], stats.group_load[(family, b)], k)}
            pairs[f"{a} vs {b}"] = pair
        g["pairs"] = pairs
        g["jaccard_n"] = k
        g["jaccard_baseline"] = M.jaccard_baseline(E, k)
        if family == "domain":
            g["specialization"] = {d: M.domain_specialization(stats.group_load[("domain", d)], k) for d in names}
            g["specialization_baseline"] = k / E
        groups[family] = g
    out["groups"] = groups
    if run.saliency.counts is not None:
        supers = run.saliency.super_experts()
        out["saliency"] = {"reap": run.saliency.reap(), "frequency": run.saliency.frequency(),
                           "super_experts": [{"layer": a, "expert": b, "max": c} for a, b, c in supers],
                           "peak": run.saliency.max_LE}
    if run.sinks.queries:
        sliding = np.array([t == "sliding_attention" for t in cfg.layer_types])
        out["sinks"] = {"by_head": run.sinks.by_head(), "by_layer_type": run.sinks.by_layer_type(sliding)}
    out["sources"] = SOURCES
    return _plain(out)


# -- figures -----------------------------------------------------------------------------------------------------
def _save_fig(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _write_atomic(path, buf.getvalue())


def _arr(x) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in x], np.float64) if x and isinstance(
        x[0], list) else np.array([np.nan if v is None else v for v in x], np.float64)


def _curve(ax, values, baseline, label: str, ylabel: str, first: int = 0, color: str = "#332288") -> None:
    from matplotlib.ticker import MaxNLocator

    from oss_jax.plots import EXPERT_COLORS

    x = np.arange(first, first + len(values))
    ax.plot(x, _arr(values), marker="o", color=color, lw=1.5, label=label)
    b = _arr(baseline) if isinstance(baseline, list) else np.full(len(values), np.nan if baseline is None
                                                                     else baseline)
    ax.plot(x, b, ls="--", color=EXPERT_COLORS[0], lw=1.2, label="baseline")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)


def write_figures(metrics: dict, directory: Path) -> dict[str, str]:
    """The report's figures as PNG files in ``directory``: ``{name: caption}``."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator

    from oss_jax import plots

    directory.mkdir(exist_ok=True)
    sliding = np.array(metrics["model"]["sliding"])
    L, E = metrics["model"]["layers"], metrics["model"]["experts"]
    m, made = metrics["metrics"], {}

    _save_fig(plots.load_heatmap(_arr(metrics["load"]), sliding=sliding), directory / "load.png")
    made["load.png"] = "Expert load per layer (share of routings)"

    names = [n for n in ("router_entropy", "gate_entropy", "load_cv", "consecutive_first") if n in m]
    fig = Figure(figsize=(4.2 * len(names), 3.4), layout="constrained")
    for i, n in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        _curve(ax, m[n]["per_layer"], m[n]["baseline"], n.replace("_", " "), m[n]["unit"] or "value")
        ax.set_xlabel("layer")
        ax.set_title(n.replace("_", " "))
    _save_fig(fig, directory / "per_layer.png")
    made["per_layer.png"] = "Per-layer metrics (solid) against their random-routing baselines (dashed)"

    if "transition_mi" in m:
        fig = Figure(figsize=(10, 4), layout="constrained")
        ax = fig.add_subplot(1, 2, 1)
        mi = m["transition_mi"]
        _curve(ax, mi["per_layer"], mi["baseline"], "MI(layer l; l+1)", "bits")
        ax.set_xlabel("layer l (pair l, l+1)")
        ax.set_title("Cross-layer routing consistency")
        excess = _arr(mi["per_layer"]) - _arr(mi["baseline"])
        pair = int(np.nanargmax(excess)) if np.isfinite(excess).any() else 0
        ax2 = fig.add_subplot(1, 2, 2)
        im = ax2.imshow(_arr(metrics["transitions"][pair]), cmap="viridis", vmin=0, interpolation="nearest")
        ax2.set_xlabel(f"expert at layer {pair + 1}")
        ax2.set_ylabel(f"expert at layer {pair}")
        ax2.set_title(f"Transition P(j at {pair + 1} | i at {pair}); independent = next load")
        fig.colorbar(im, ax=ax2)
        _save_fig(fig, directory / "consistency.png")
        made["consistency.png"] = ("Mutual information between consecutive layers' choices against the finite-sample "
                                   "baseline, and the transition matrix of the pair furthest above it")

    groups = metrics["groups"]
    if "domain" in groups:
        dom = groups["domain"]
        names = sorted(dom["frequency"])
        shown = sorted(set(np.linspace(0, L - 1, min(L, 4)).round().astype(int).tolist()))
        fig = Figure(figsize=(max(6.0, 0.25 * E + 2.5) * min(len(shown), 2), 1.2 + 0.9 * len(names) *
                              ((len(shown) + 1) // 2)), layout="constrained")
        for i, layer in enumerate(shown):
            ax = fig.add_subplot((len(shown) + 1) // 2, min(len(shown), 2), i + 1)
            grid = np.stack([_arr(dom["frequency"][n])[layer] for n in names])
            im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
            ax.set_yticks(range(len(names)), names, fontsize=8)
            ax.set_xlabel("expert")
            ax.set_title(f"layer {layer}", fontsize=10)
            fig.colorbar(im, ax=ax, label="activation frequency")
        fig.suptitle(f"Domain fingerprints: share of a domain's tokens routed to each expert (uniform = k/E = "
                     f"{metrics['model']['k'] / E:.3f})")
        _save_fig(fig, directory / "fingerprints.png")
        made["fingerprints.png"] = "Per-domain activation frequency of each expert (fingerprints)"
        if len(names) > 1:
            J = np.eye(len(names))
            for key, pair in dom["pairs"].items():
                a, b = key.split(" vs ")
                J[names.index(a), names.index(b)] = J[names.index(b), names.index(a)] = np.nanmean(
                    _arr(pair["jaccard"]))
            fig = Figure(figsize=(1.0 * len(names) + 3, 0.8 * len(names) + 2), layout="constrained")
            ax = fig.add_subplot()
            im = ax.imshow(J, cmap="cividis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
            ax.set_yticks(range(len(names)), names)
            for i, j in itertools.product(range(len(names)), repeat=2):
                ax.text(j, i, f"{J[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color=plots._text_color(im.get_cmap()(J[i, j])))
            ax.set_title(f"Domain overlap: Jaccard of top-{dom['jaccard_n']} experts, mean over layers\n"
                         f"(random = {dom['jaccard_baseline']:.3f})")
            fig.colorbar(im, ax=ax)
            _save_fig(fig, directory / "overlap.png")
            made["overlap.png"] = "Overlap of the domains' top experts (Jaccard), mean over layers"

    families = [f for f in FAMILIES if f in groups and groups[f]["pairs"]]
    if families:
        fig = Figure(figsize=(4.5 * len(families), 3.6), layout="constrained")
        for i, family in enumerate(families):
            ax = fig.add_subplot(1, len(families), i + 1)
            pairs = groups[family]["pairs"]
            if family == "domain":  # many pairs: their mean
                js = np.nanmean([_arr(p["js"]) for p in pairs.values()], 0)
                bl = np.nanmean([_arr(p["js_baseline"]) for p in pairs.values()], 0)
                _curve(ax, js.tolist(), bl.tolist(), "mean over domain pairs", "JS (bits)")
            else:
                for j, (key, p) in enumerate(pairs.items()):
                    color = plots.EXPERT_COLORS[(j + 1) % len(plots.EXPERT_COLORS)]
                    ax.plot(_arr(p["js"]), marker="o", color=color, label=key)
                    ax.plot(_arr(p["js_baseline"]), ls="--", color=color, lw=1)
                ax.set_ylabel("JS (bits)")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8, frameon=False, title="solid: groups, dashed: random halves", title_fontsize=7)
            ax.set_xlabel("layer")
            ax.set_title(f"Routing by {family}")
        _save_fig(fig, directory / "groups.png")
        made["groups.png"] = ("Jensen-Shannon divergence between groups' expert loads per layer (solid) against two "
                              "random halves of the same tokens (dashed)")

    if "saliency" in metrics:
        fig = Figure(figsize=(max(6.0, 0.28 * E + 2.5) * 2, max(3.0, 0.28 * L + 1.5)), layout="constrained")
        for i, (key, title) in enumerate((("reap", "REAP saliency"), ("frequency", "activation frequency"))):
            ax = fig.add_subplot(1, 2, i + 1)
            im = ax.imshow(_arr(metrics["saliency"][key]), aspect="auto", cmap="viridis", origin="lower",
                           interpolation="nearest")
            ax.set_xlabel("expert")
            ax.set_ylabel("layer")
            ax.set_yticks(range(L), plots._layer_labels(L, sliding), fontsize=8 if L > 12 else 10)
            for se in metrics["saliency"]["super_experts"]:
                ax.add_patch(Rectangle((se["expert"] - 0.5, se["layer"] - 0.5), 1, 1, fill=False,
                                             edgecolor="#CC6677", lw=2))
            ax.set_title(title + (" (red box: super expert)" if metrics["saliency"]["super_experts"] else ""))
            fig.colorbar(im, ax=ax)
        _save_fig(fig, directory / "saliency.png")
        made["saliency.png"] = "REAP saliency and activation frequency per (layer, expert)"

    if "sinks" in metrics:
        _save_fig(plots.sink_heatmap(_arr(metrics["sinks"]["by_head"]), sliding=sliding), directory / "sinks.png")
        made["sinks.png"] = "Attention-sink mass per layer and head"
    return made


# -- report ------------------------------------------------------------------------------------------------------
LABELS = {"router_entropy": "Router entropy", "gate_entropy": "Gate entropy", "load_cv": "Load CV",
          "max_vio": "MaxVio", "switch_loss": "Switch load-balancing loss", "consecutive_first":
          "Consecutive tokens, same first expert", "consecutive_any": "Consecutive tokens, shared expert",
          "vocab_specialization": "Vocabulary specialization", "transition_mi":
          "Cross-layer mutual information", "transition_nmi": "Cross-layer normalised MI"}


def _f(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, list):
        return "per layer" if x else "n/a"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def report(metrics: dict, figures: dict[str, str]) -> str:
    """The markdown report: settings, a table per topic (value, baseline, source), the figures linked."""
    st, mod, m = metrics["settings"], metrics["model"], metrics["metrics"]
    L = mod["layers"]
    out = [f"# Routing report: {st['model']}\n",
           f"{metrics['prompts']} prompts ({metrics['info']['prompts_file']}), {metrics['tokens']} tokens; "
           f"{L} layers, {mod['experts']} experts, top-{mod['k']}; effort {st['effort']} (conversations without "
           f"one), chunk {st['chunk']}, at most {st['max_tokens']} tokens per prompt "
           f"({metrics['truncated_prompts']} cut).\n"]
    if metrics["unknown_tokens"]:
        out.append(f"Note: {metrics['unknown_tokens']} tokens ({metrics['unknown_distinct']} distinct) are not in "
                   f"the model's vocabulary and were read as its unknown token.\n")
    out.append("Every baseline is what uniformly random routing (or, for comparisons, routing that ignores the "
               "label or the other layer) would show on the same number of tokens, except MaxVio's 0 (a perfectly "
               "balanced load) and the entropies' maxima ln E and ln k. Sources at the end.\n")
    out.append("## Summary (mean over layers)\n")
    rows = [[LABELS[n], f"`{n}`", _f(v["mean"]), _f(v["baseline_mean"]), v["unit"] or "-", f"[{v['source']}]"]
            for n, v in m.items()]
    out.append(_table(["metric", "key", "value", "baseline", "unit", "source"], rows))
    out.append("\n".join(f"- `{n}`: {v['formula']}" for n, v in m.items()) + "\n")
    out.append("## Per layer\n")
    per = [n for n in m if len(m[n]["per_layer"]) == L]
    rows = [[str(i)] + [_f(m[n]["per_layer"][i]) for n in per] for i in range(L)]
    base = [["baseline"] + [_f(m[n]["baseline"] if not isinstance(m[n]["baseline"], list) else None) for n in per]]
    out.append(_table(["layer"] + [f"`{n}`" for n in per], rows + base))
    for name in ("load.png", "per_layer.png"):
        if name in figures:
            out.append(f"![{figures[name]}](figures/{name})\n")
    if "transition_mi" in m:
        out.append("## Cross-layer routing consistency\n")
        out.append("Transition matrices `P(expert j at layer l+1 | expert i at layer l)` (`transitions` in "
                   "metrics.json) and their mutual information in **bits** over the k x k choice pairs of each "
                   "token. Independent layers have MI 0 in the limit; the baseline column is the expected "
                   "plug-in MI of the same number of tokens routed independently per layer with the observed "
                   "loads (simulated, seeded), so values near it mean no consistency. NMI divides by "
                   "sqrt(H(l) H(l+1)) [NMI].\n")
        mi, nmi = m["transition_mi"], m["transition_nmi"]
        rows = [[f"{i} -> {i + 1}", _f(mi["per_layer"][i]), _f(mi["baseline"][i]), _f(nmi["per_layer"][i]),
                 _f(nmi["baseline"][i])] for i in range(L - 1)]
        out.append(_table(["layers", "MI (bits)", "MI baseline", "NMI", "NMI baseline"], rows))
        if "consistency.png" in figures:
            out.append(f"![{figures['consistency.png']}](figures/consistency.png)\n")
    groups = metrics["groups"]
    titles = {"domain": "Domains: fingerprints and overlap", "effort": "Reasoning effort",
              "channel": "Channel (analysis vs final)"}
    for family in FAMILIES:
        out.append(f"## {titles[family]}\n")
        if family not in groups:
            out.append({"domain": "No domains in the prompts (JSONL prompts with a `domain` give them).\n",
                        "effort": "No harmony conversations in the prompts (JSONL prompts with `messages`).\n",
                        "channel": "No assistant messages in the prompts' conversations.\n"}[family])
            continue
        g = groups[family]
        out.append("Tokens per group: " + ", ".join(f"{n} {c}" for n, c in g["tokens"].items()) + ".\n")
        if family == "domain":
            out.append(f"Fingerprint: each domain's activation frequency per (layer, expert), the share of its "
                       f"tokens routed to the expert (`groups.domain.frequency`; uniform k/E = "
                       f"{mod['k'] / mod['experts']:.3f}) [OLMoE]. Domain specialization [OLMoE]: share of a "
                       f"domain's routings going to its top-k experts (baseline k/E). Overlap: Jaccard index of "
                       f"two domains' top-{g['jaccard_n']} experts [Jaccard], baseline "
                       f"{g['jaccard_baseline']:.3f} for random top-{g['jaccard_n']} sets.\n")
            rows = [[d, _f(float(np.nanmean(_arr(v))))] for d, v in g["specialization"].items()]
            out.append(_table(["domain", f"specialization (baseline {_f(g['specialization_baseline'])})"], rows))
        out.append("Jensen-Shannon divergence (bits) of the groups' expert loads [JS], mean over layers, against "
                   "the JS of two random halves of the same tokens rescaled to the groups' sizes "
                   "(`metrics.js_halves_baseline`): above it, the label changes routing. The halves split tokens one "
                   "by one, ignoring that tokens of one prompt route alike, so the baseline is a lower bound when a "
                   "group holds few prompts.\n")
        rows = [[pair, _f(float(np.nanmean(_arr(p["js"])))), _f(float(np.nanmean(_arr(p["js_baseline"])))),
                 _f(float(np.nanmean(_arr(p["jaccard"]))))] for pair, p in g["pairs"].items()]
        out.append(_table(["pair", "JS", "JS baseline", f"Jaccard top-{g['jaccard_n']} (baseline "
                                                       f"{g['jaccard_baseline']:.3f})"], rows))
    for name in ("fingerprints.png", "overlap.png", "groups.png"):
        if name in figures:
            out.append(f"![{figures[name]}](figures/{name})\n")
    if "saliency" in metrics:
        sal = metrics["saliency"]
        out.append("## Saliency and super experts\n")
        out.append("REAP saliency [REAP]: mean over the tokens routed to an expert of gate x ||expert output||; "
                   "activation frequency: share of tokens routing to it (uniform k/E). Super experts [Super]: "
                   "peak |output| above max(P99.5, global max / 10) over the first 75% of layers.\n")
        reap = _arr(sal["reap"])
        rows = [[str(i), str(int(np.argmax(reap[i]))), _f(float(reap[i].max())), str(int(np.argmin(reap[i]))),
                 _f(float(reap[i].min()))] for i in range(L)]
        out.append(_table(["layer", "most salient", "REAP", "least salient", "REAP"], rows))
        supers = sal["super_experts"]
        out.append("Super experts: " + (", ".join(f"layer {s['layer']} expert {s['expert']} (peak {_f(s['max'])})"
                                                  for s in supers) if supers else "none") + ".\n")
        if "saliency.png" in figures:
            out.append(f"![{figures['saliency.png']}](figures/saliency.png)\n")
    if "sinks" in metrics:
        lt = metrics["sinks"]["by_layer_type"]
        out.append("## Attention sinks\n")
        out.append(f"Mean sink mass [Sinks]: sliding-window layers {_f(lt['sliding'])}, full-attention layers "
                   f"{_f(lt['full'])}.\n")
        if "sinks.png" in figures:
            out.append(f"![{figures['sinks.png']}](figures/sinks.png)\n")
    out.append("## Sources\n")
    out.append("\n".join(f"- [{k}] {v}" for k, v in metrics["sources"].items()) + "\n")
    return "\n".join(out)
