"""The ``oss-jax`` command line: ``chat``, ``generate``, ``eval``, ``train``, ``convert`` and ``plan``.

Every model option defaults to the bundled tiny model (``--model tiny``), offline.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable

from oss_jax.checkpoint import CheckpointError

DIM, RESET = "\033[2m", "\033[0m"
# oss_jax.data's names, spelled out so that the parser is built without importing it (tests check they agree)
FAMILIES, EFFORTS, STYLES = ("add", "sort", "reverse", "count", "lookup", "sub"), ("low", "medium", "high"), \
    ("v1", "echo", "letters", "keyed", "named", "lined")
INT32 = 2**31


# -- argument types: a bad value is an argparse usage error (exit 2), before any model loads ---------
def _int_in(lo: int, hi: int = INT32) -> Callable[[str], int]:
    """An argparse type: an integer in ``[lo, hi)``."""
    bound = "2**31" if hi == INT32 else str(hi)

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value < hi:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {bound}), got {text!r}")
        return value

    return parse


def _float_in(lo: float, hi: float, *, lo_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``; ``hi`` may be inf)."""
    interval = f">= {lo:g}" if hi == math.inf else f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (lo < value if lo_open else lo <= value) and value <= hi):
            raise argparse.ArgumentTypeError(f"must be a finite number {interval}, got {text!r}")
        return value

    return parse


COUNT = _int_in(1)  # sizes, steps, token budgets: at least 1
ID = _int_in(0)  # token ids, top-k, seeds: non-negative and within int32


def _utf8(raw: bytes, where: str) -> str:
    """``raw`` decoded as strict UTF-8, or a one-line ValueError naming the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at position {e.start})") from None


def _stdin() -> str:
    """All of standard input as text (strict UTF-8)."""
    buffer = getattr(sys.stdin, "buffer", None)
    return sys.stdin.read() if buffer is None else _utf8(buffer.read(), "standard input")


def _arg_text(text: str | None, flag: str) -> str | None:
    """A text argument, refused if the command line held bytes that are not UTF-8."""
    if text is None:
        return None
    try:
        raw = text.encode("utf-8", "surrogateescape")  # argv's undecodable bytes come back as they were
    except UnicodeEncodeError as e:
        raise ValueError(f"{flag} is not valid text (lone surrogate at position {e.start})") from None
    return _utf8(raw, flag)


def _convert(args: argparse.Namespace) -> None:
    from oss_jax.convert import convert

    out = convert(args.src, args.dst, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {out}")


def _load(args: argparse.Namespace):
    import oss_jax
    from oss_jax.load import BUNDLED

    return oss_jax.load(args.model, dtype=args.dtype, progress=sys.stderr.isatty() and args.model not in BUNDLED)


def _sampling(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, key=args.seed)


def _generate(args: argparse.Namespace) -> None:
    from oss_jax import boundary, harmony
    from oss_jax.generate import PAD, generate

    if args.tokens is not None:
        prompt = _token_ids(args.tokens)
    else:
        prompt = harmony.encode(_arg_text(args.prompt, "--prompt") if args.prompt is not None else _stdin())
    model = _load(args)
    known = boundary.vocab_size(model) == harmony.VOCAB_SIZE  # o200k ids in and out: text can be decoded
    text_of = harmony.decode if known else None
    shown: list[int] = []

    def stream(toks) -> None:
        if int(toks[0]) == PAD or args.json:
            return
        shown.append(int(toks[0]))
        print(text_of([shown[-1]]) if text_of else f"{shown[-1]} ", end="", flush=True)

    out = generate(model, [prompt], stop_tokens=args.stop, on_token=stream, **_sampling(args))[0]
    new = [int(t) for t in out if t != PAD]
    if args.json:
        print(json.dumps({"prompt_tokens": prompt, "tokens": new, "text": text_of(new) if text_of else None}))
    else:
        print()


def _token_ids(text: str) -> list[int]:
    """``--tokens``: ids separated by spaces or commas."""
    ids = []
    for word in text.replace(",", " ").split():
        try:
            ids.append(int(word))
        except ValueError:
            raise ValueError(f"--tokens: expected token ids like '1 2 3', got {word!r}") from None
    return ids


def _chat(args: argparse.Namespace) -> None:
    from oss_jax.chat import chat

    message, system = _arg_text(args.message, "the message"), _arg_text(args.system, "--system")
    one_shot = message is not None or not sys.stdin.isatty()
    if message is None and one_shot:
        message = _stdin()  # read (and checked) before the model loads
    model = _load(args)
    color = sys.stdout.isatty() and not args.json
    history: list = [{"role": "system", "content": system}] if system else []

    def show(channel: str | None, text: str) -> None:
        nonlocal current
        if channel == "analysis" and not args.show_reasoning:
            return
        if channel != current:
            current = channel
            label = {"analysis": "reasoning", None: "(no channel)"}.get(channel, channel)
            if channel != "final":
                print(f"\n{DIM if color else ''}[{label}]{RESET if color else ''} ", end="")
            else:
                print("\n" if args.show_reasoning else "", end="")
        dim = color and channel == "analysis"
        print(f"{DIM}{text}{RESET}" if dim else text, end="", flush=True)

    def turn(text: str) -> None:
        nonlocal current
        current = "start"
        history.append({"role": "user", "content": text})
        reply = chat(model, history, effort=args.effort, on_text=None if args.json else show, **_sampling(args))
        history.extend(m.as_dict() for m in reply.messages if m.role == "assistant")
        if current == "start" and not args.json:  # nothing streamed: show what parsing recovered
            print(reply.final or f"{DIM if color else ''}(no text: {len(reply.tokens)} tokens){RESET if color else ''}",
                  end="")
        if args.json:
            print(json.dumps({"analysis": reply.analysis, "final": reply.final, "tokens": reply.tokens,
                              "messages": [m.as_dict() for m in reply.messages]}))
        else:
            print()

    current: str | None = "start"
    if one_shot:
        turn(message)
        return
    print("oss-jax chat: an empty line or Ctrl-D ends the conversation.", file=sys.stderr)
    while True:
        try:
            text = input("\n> ")
        except EOFError:
            break
        if not text.strip():
            break
        turn(text)


def _plan(args: argparse.Namespace) -> None:
    from oss_jax.config import PRESETS, Config
    from oss_jax.sharding import plan

    cfg = args.model if args.model in PRESETS else Config.from_json(args.model)
    mesh = _mesh(args.mesh) if args.mesh else args.devices
    print(plan(cfg, mesh, context=args.context, batch=args.batch, dtype=args.dtype, experts=args.experts,
               chunk=args.prefill_chunk, device=args.device))


def _mesh(text: str) -> tuple[int, int, int]:
    """``--mesh DATAxEXPERTxTENSOR`` as a shape of three positive sizes."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"--mesh: expected DATAxEXPERTxTENSOR like 1x4x2, got {text!r}")
    return tuple(int(p) for p in parts)


def _train(args: argparse.Namespace) -> None:
    from oss_jax import train

    given = {k: getattr(args, k) for k in ("steps", "seed") if getattr(args, k) is not None}
    tc = train.twin_config(args.twin, **given)
    out = args.out or ("runs/tiny" if args.twin is None else f"runs/tiny-{args.twin}")
    model = train.train(out, tc, progress=not args.no_progress)
    print(f"trained: {out}/model")
    if args.eval:
        _write_eval(train.evaluate_run(model, out, per_cell=args.per_cell), out)
    if args.ship:
        print(f"installed as oss_jax.load({train.twin_name(tc)!r}): {train.ship(out)}")


def _finetune(args: argparse.Namespace) -> None:
    from oss_jax import finetune

    given = {k: getattr(args, k) for k in ("steps", "batch", "rank", "alpha", "lr", "decay", "targets", "seed",
                                           "split_digits")}
    fc = finetune.FinetuneConfig(**{k: v for k, v in given.items() if v is not None})
    finetune.finetune(args.model, args.data, args.out, fc, dtype=args.dtype, progress=not args.no_progress)
    print(f"fine-tuned: adapters in {args.out}/adapters (load with oss_jax.lora.load_adapters)")


def _write_eval(results, out) -> None:
    from pathlib import Path

    from oss_jax import evaluate

    print(evaluate.table(results))
    (Path(out) / "eval.json").write_text(json.dumps(evaluate.as_json(results), indent=1))


def _eval(args: argparse.Namespace) -> None:
    import oss_jax
    from oss_jax import evaluate

    results = {}
    for experts in args.experts:
        model = oss_jax.load(args.model, dtype=args.dtype, experts=experts)
        name = {"auto": "as stored", "packed": "MXFP4 packed", "dense": "experts decoded at load"}
        chosen = {k: getattr(args, k) for k in ("families", "efforts", "style") if getattr(args, k)}
        results[name[experts]] = evaluate.evaluate(model, per_cell=args.per_cell, seed=args.seed, **chosen)
    if args.json:
        print(json.dumps(evaluate.as_json(results)))
    else:
        print(evaluate.table(results))


def _routes(args: argparse.Namespace) -> None:
    import time

    from oss_jax.routes import routes

    start = time.perf_counter()
    r = routes(args.model, args.prompts, args.out, effort=args.effort, chunk=args.chunk, max_tokens=args.max_tokens,
               dtype=args.dtype, progress=not args.no_progress and sys.stderr.isatty())
    if r.unknown_tokens:
        print(f"oss-jax routes: {r.unknown_tokens} of {r.tokens} tokens ({r.unknown_distinct} distinct) are not in "
              f"the model's vocabulary and were read as its unknown token", file=sys.stderr)
    print(f"wrote {r.out / 'report.md'} ({r.prompts} prompts, {r.tokens} tokens, {time.perf_counter() - start:.1f} s)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny",
                   help="'tiny' (the bundled model, default), a checkpoint directory, a converted orbax "
                        "checkpoint, or a hub repo id")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="parameter dtype (default: float32 for tiny, else bfloat16)")
    p.add_argument("--max-new-tokens", type=COUNT, default=256)
    p.add_argument("--temperature", type=_float_in(0.0, math.inf), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=ID, default=0, help="0 = no limit")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, lo_open=True), default=1.0)
    p.add_argument("--seed", type=ID, default=0, help="PRNG seed for sampling")
    p.add_argument("--json", action="store_true", help="print one JSON object, for scripts")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oss-jax", description="gpt-oss in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert a Hugging Face or OpenAI checkpoint to orbax",
                       description="Convert SRC (HF directory, OpenAI original/ directory or hub repo id) "
                                   "to an orbax checkpoint at DST, checking every tensor.")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=_convert)

    g = sub.add_parser("generate", help="continue raw text or token ids (no chat format)")
    _model_args(g)
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text to continue (default: read standard input)")
    src.add_argument("--tokens", help="token ids to continue, e.g. '1 2 3'")
    g.add_argument("--stop", type=ID, nargs="*", default=[], help="stop token ids")
    g.set_defaults(func=_generate)

    ch = sub.add_parser("chat", help="chat in the harmony format (one-shot or interactive)")
    _model_args(ch)
    ch.add_argument("message", nargs="?", help="one-shot message (default: interactive, or standard input)")
    ch.add_argument("--effort", default="medium", choices=["low", "medium", "high"])
    ch.add_argument("--system", help="model identity line of the system message")
    ch.add_argument("--show-reasoning", action=argparse.BooleanOptionalAction, default=True,
                    help="show the analysis channel, dimmed and labelled (default: shown)")
    ch.set_defaults(func=_chat)

    ev = sub.add_parser("eval", help="exact-match accuracy on held-out questions, per family and effort")
    ev.add_argument("--model", default="tiny", help="a model trained on oss_jax.data (default: the bundled one)")
    ev.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    ev.add_argument("--per-cell", type=COUNT, default=50, help="questions per family and effort")
    ev.add_argument("--seed", type=ID, default=1234)
    ev.add_argument("--families", nargs="+", choices=FAMILIES,
                    help="task families (default: the five of the training recipe; sub: notebook 13's new one)")
    ev.add_argument("--efforts", nargs="+", choices=EFFORTS, help="efforts (default: all three)")
    ev.add_argument("--style", choices=STYLES,
                    help="how the questions are written (default: the style the model was trained in)")
    ev.add_argument("--experts", nargs="+", default=["packed", "dense"], choices=["auto", "packed", "dense"],
                    help="expert storage variants to compare (default: MXFP4 packed vs decoded at load)")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=_eval)

    tr = sub.add_parser("train", help="train the tiny model from scratch (resumes an interrupted run)")
    tr.add_argument("--out", help="run directory (checkpoints, metrics, exports; default runs/tiny, or "
                                  "runs/tiny-TWIN)")
    tr.add_argument("--twin", choices=["dense", "nosink"],
                    help="train a twin of the tiny model for the course, same recipe and data: dense (one FFN, the "
                         "same active parameters) or nosink (no attention sinks); --ship installs it as "
                         "oss_jax.load('tiny-TWIN')")
    tr.add_argument("--steps", type=COUNT, help="optimizer steps (default: the recipe's)")
    tr.add_argument("--seed", type=ID, help="data and initialisation seed (default 0)")
    tr.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                    help="evaluate at the end: unquantized float32 vs the MXFP4 export (default: on)")
    tr.add_argument("--per-cell", type=COUNT, default=50, help="evaluation questions per family and effort")
    tr.add_argument("--ship", action="store_true", help="install the result as the bundled model (oss_jax/tiny)")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=_train)

    ft = sub.add_parser("finetune", help="train LoRA adapters on conversations (JSONL); the base stays frozen",
                        description="Train LoRA adapters on one conversation per line of --data (loss on the "
                                    "assistant's reply); an interrupted run resumes. See oss_jax/finetune.py.")
    ft.add_argument("--model", default="tiny", help="as for generate (default: the bundled tiny model)")
    ft.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    ft.add_argument("--data", required=True, help='JSONL: {"messages": [...], "effort": ...} per line')
    ft.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, adapters/)")
    ft.add_argument("--steps", type=COUNT, help="optimizer steps (default 100)")
    ft.add_argument("--batch", type=COUNT, help="conversations per step (default 4)")
    ft.add_argument("--rank", type=COUNT, help="LoRA rank (default 8)")
    ft.add_argument("--alpha", type=_float_in(0.0, math.inf, lo_open=True), help="LoRA alpha (default 16)")
    ft.add_argument("--lr", type=_float_in(0.0, 1.0, lo_open=True), help="peak learning rate (default 1e-3)")
    ft.add_argument("--decay", choices=["constant", "cosine"],
                    help="the rate after the warmup: cosine down to 0 at the last step (default), or constant")
    ft.add_argument("--targets", help="comma-separated: attn (or q,k,v,o), experts, router (default attn)")
    ft.add_argument("--seed", type=ID, help="adapter initialisation and data order (default 0)")
    ft.add_argument("--split-digits", action=argparse.BooleanOptionalAction, default=None,
                    help="write the reply's numbers one token per digit, as the bundled model was trained (default: "
                         "on for a model with a token map, off for an o200k model)")
    ft.add_argument("--no-progress", action="store_true")
    ft.set_defaults(func=_finetune)

    pl = sub.add_parser("plan", help="memory per device for a model, mesh and context (no device needed)")
    pl.add_argument("--model", default="gpt-oss-20b",
                    help="gpt-oss-20b, gpt-oss-120b, or a checkpoint directory / config.json")
    pl.add_argument("--devices", type=COUNT, default=1, help="device count (default mesh for it)")
    pl.add_argument("--mesh", help="DATAxEXPERTxTENSOR, e.g. 1x4x2 (overrides --devices)")
    pl.add_argument("--context", type=COUNT, default=8192, help="positions in the KV cache")
    pl.add_argument("--batch", type=COUNT, default=1)
    pl.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    pl.add_argument("--experts", default="packed", choices=["packed", "dense"])
    pl.add_argument("--prefill-chunk", type=COUNT, default=512)
    pl.add_argument("--device", default="gpu", choices=["gpu", "tpu", "cpu"],
                    help="what runs it: a GPU/TPU prefill holds a layer's experts decoded (default gpu)")
    pl.set_defaults(func=_plan)

    ro = sub.add_parser("routes", help="routing report of a prompt corpus: metrics.json, figures, report.md",
                        description="Run prompts through the model in chunks and write DIR/metrics.json, "
                                    "DIR/figures/*.png and DIR/report.md; an interrupted run resumes.")
    ro.add_argument("--model", default="tiny", help="as for generate (default: the bundled tiny model)")
    ro.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    ro.add_argument("--prompts", help="plain text (one prompt a line) or .jsonl ({'domain', 'text'} or "
                                      "{'domain', 'messages', 'effort'}); default: the shipped corpus")
    ro.add_argument("--out", required=True, help="output directory (an earlier run of the same settings resumes)")
    ro.add_argument("--effort", default="medium", choices=["low", "medium", "high"],
                    help="reasoning effort of conversations that do not give one")
    ro.add_argument("--chunk", type=COUNT, default=256, help="tokens per forward pass")
    ro.add_argument("--max-tokens", type=COUNT, default=2048, help="cut each prompt to its first N tokens")
    ro.add_argument("--no-progress", action="store_true")
    ro.set_defaults(func=_routes)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, ValueError, OSError) as e:  # ValueError includes UnicodeDecodeError
        print(f"oss-jax {args.command}: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        from oss_jax.harmony import VocabError

        if not isinstance(e, VocabError):  # the o200k vocabulary cannot be rebuilt: an install problem
            raise
        print(f"oss-jax {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\noss-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
