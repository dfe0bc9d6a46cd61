"""The harmony chat format (SPEC.md §5): prompts in, replies out, fully offline.

gpt-oss reads and writes *harmony* messages::

    <|start|>{role}[<|channel|>{channel}]<|message|>{content}<|end|>

A prompt for the model is a list of such messages ending in ``<|start|>assistant``; the model
then writes its own messages (``analysis`` = chain of thought, ``final`` = the answer) and stops
at ``<|return|>`` (answer done) or ``<|call|>`` (tool call). Rendering and parsing are done by
OpenAI's own ``openai-harmony`` package; this module only adds

- an offline vocabulary: openai-harmony wants ``o200k_base.tiktoken`` and would download it. We
  rebuild the file, byte for byte, from the ``quicktok-v1`` package (which bundles o200k), check
  its sha256, cache it and point ``TIKTOKEN_ENCODINGS_BASE`` at it. Nothing is ever downloaded.
- plain-dict messages and a ``render`` that applies the history rule in full (see ``render``).
- a ``parse`` that never raises: a tiny or random model writes anything at all, so where
  openai-harmony refuses the tokens a small lenient parser (``_parse_lenient``) takes over.

Example::

    prompt = render("What is 2 + 2?", effort="low")   # token ids ending in <|start|>assistant
    ...                                               # the model writes `completion`, stopping at STOP_TOKENS
    reply = Reply.from_tokens(completion)
    print(reply.analysis, reply.final)
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import openai_harmony as oh

# -- token ids (SPEC.md §5; checked against the encoding when it is loaded) ----------------------
STARTOFTEXT = 199998
ENDOFTEXT = 199999
RETURN = 200002  # end of a final answer; generation stops
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012  # end of a tool call; generation stops
STOP_TOKENS = (RETURN, CALL)
VOCAB_SIZE = 201088  # ids 0..201087; the ones from 199998 up that are not named above are reserved
SPECIAL_TOKENS = {"<|startoftext|>": STARTOFTEXT, "<|endoftext|>": ENDOFTEXT, "<|return|>": RETURN,
                  "<|constrain|>": CONSTRAIN, "<|channel|>": CHANNEL, "<|start|>": START, "<|end|>": END,
                  "<|message|>": MESSAGE, "<|call|>": CALL}

# -- the vocabulary file -------------------------------------------------------------------------
VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
N_BPE = 199998  # ordinary (byte-pair) tokens, ids 0..199997

Effort = Literal["low", "medium", "high"]
EFFORTS: dict[str, oh.ReasoningEffort] = {"low": oh.ReasoningEffort.LOW, "medium": oh.ReasoningEffort.MEDIUM,
                                          "high": oh.ReasoningEffort.HIGH}
ROLES: dict[str, oh.Role] = {r.value: r for r in oh.Role}  # system, developer, user, assistant, tool


class VocabError(RuntimeError):
    """The o200k vocabulary could not be rebuilt exactly (wrong sha256, quicktok missing, ...)."""


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where the rebuilt vocabulary lives: ``path`` if given, else ``$OSS_JAX_CACHE/tiktoken``,
    else ``~/.cache/oss-jax/tiktoken``."""
    if path is not None:
        return Path(path).expanduser()
    root = os.environ.get("OSS_JAX_CACHE")
    return Path(root).expanduser() / "tiktoken" if root else Path.home() / ".cache" / "oss-jax" / "tiktoken"


def _sha256(path: Path) -> str | None:
    """sha256 of a file, or None if it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _vocab_bytes() -> bytes:
    """The text of ``o200k_base.tiktoken``: one line ``base64(token bytes) + " " + id`` per BPE token."""
    try:
        import quicktok
    except ImportError as e:
        raise VocabError("the o200k vocabulary is rebuilt from the 'quicktok-v1' package: "
                         "pip install quicktok-v1") from e
    token_bytes = quicktok.get_encoding("o200k_base").decode_single_token_bytes  # by id, unlike token_byte_values
    return b"".join(base64.b64encode(token_bytes(i)) + b" %d\n" % i for i in range(N_BPE))


_fallback: Path | None = None  # this process's temporary vocabulary cache, if the default one is unwritable


def ensure_vocab(path: str | os.PathLike | None = None) -> Path:
    """Return the path of a verified ``o200k_base.tiktoken`` in ``cache_dir(path)``, building it
    there first if it is missing or damaged (about 2 s). Never touches the network.

    The file is checked against ``VOCAB_SHA256`` before it is written, and written atomically
    (temporary file + rename), so a reader never sees half a file. Raises ``VocabError`` (and
    removes any damaged file) if the rebuilt bytes do not have the expected sha256.

    An unwritable cache: with ``path`` given, one-line ``OSError`` naming the directory; the default
    cache (``$OSS_JAX_CACHE``, ``~/.cache``) falls back to a temporary directory for this process,
    with a warning naming the directory and ``OSS_JAX_CACHE`` (removed at exit).
    """
    global _fallback
    directory = cache_dir(path)
    target = directory / VOCAB_FILE
    if _sha256(target) == VOCAB_SHA256:
        return target
    if path is None and _fallback is not None and _sha256(_fallback / VOCAB_FILE) == VOCAB_SHA256:
        return _fallback / VOCAB_FILE
    data = _vocab_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        with contextlib.suppress(OSError):
            target.unlink(missing_ok=True)
        raise VocabError(f"rebuilt {VOCAB_FILE} has sha256 {digest}, expected {VOCAB_SHA256}; "
                         "is the installed quicktok-v1 a different version?")
    try:
        _write_atomic(directory, target, data)
    except OSError as e:
        reason = e.strerror or str(e)
        if path is not None:
            raise OSError(f"cannot write the vocabulary cache {directory} ({reason}): pass a writable "
                          f"directory") from None
        fallback = Path(tempfile.mkdtemp(prefix="oss-jax-tiktoken-"))
        atexit.register(shutil.rmtree, fallback, ignore_errors=True)
        warnings.warn(f"cannot write the vocabulary cache {directory} ({reason}); using {fallback} for this "
                      f"process: set OSS_JAX_CACHE to a writable directory to keep it", stacklevel=2)
        target = fallback / VOCAB_FILE
        _write_atomic(fallback, target, data)
        _fallback = fallback
    if _sha256(target) != VOCAB_SHA256:  # e.g. a full disk
        target.unlink(missing_ok=True)
        raise VocabError(f"{target} does not have sha256 {VOCAB_SHA256} after writing it")
    return target


def _write_atomic(directory: Path, target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` via a temporary file in ``directory`` and a rename."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{VOCAB_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@functools.cache
def encoding(path: str | os.PathLike | None = None) -> oh.HarmonyEncoding:
    """The gpt-oss harmony encoding (``HarmonyEncodingName.HARMONY_GPT_OSS``), loaded offline.

    If ``TIKTOKEN_ENCODINGS_BASE`` already names a directory holding a valid vocabulary, that is
    used. Otherwise the vocabulary is built into ``cache_dir(path)`` (see ``ensure_vocab``) and
    ``TIKTOKEN_ENCODINGS_BASE`` is set to that directory for this process, so openai-harmony reads
    the file instead of downloading it. Loaded once per ``path`` (about 1 s).
    """
    user_dir = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if user_dir and _sha256(Path(user_dir) / VOCAB_FILE) == VOCAB_SHA256:
        directory = Path(user_dir)
    else:
        directory = ensure_vocab(path).parent
        if user_dir:
            warnings.warn(f"TIKTOKEN_ENCODINGS_BASE={user_dir} holds no valid {VOCAB_FILE}; "
                          f"using {directory} instead", stacklevel=2)
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(directory)
    return _load(str(directory))


@functools.cache
def _load(directory: str) -> oh.HarmonyEncoding:
    assert os.environ.get("TIKTOKEN_ENCODINGS_BASE") == directory
    enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    for text, i in SPECIAL_TOKENS.items():
        if enc.encode(text, allowed_special={text}) != [i]:
            raise RuntimeError(f"openai-harmony encodes {text} as {enc.encode(text, allowed_special={text})}, "
                               f"SPEC.md §5 says {i}")
    return enc


# -- plain token ids <-> text --------------------------------------------------------------------
def _ids(tokens: Iterable[int] | np.ndarray) -> list[int]:
    """Token ids as a flat list of Python ints (lists, tuples, numpy or jax arrays; any size)."""
    return [int(t) for t in np.asarray(tokens).reshape(-1).tolist()]


def _utf8(text: str | bytes, where: str) -> str:
    """``text`` as a str that is valid UTF-8 (bytes are decoded), or a ``ValueError`` saying where it is not.

    A str can hold lone surrogates (``"\\udcff"``, as ``surrogateescape`` reads undecodable bytes):
    openai-harmony would silently replace them, or refuse them with a message about JSON.
    """
    if isinstance(text, bytes):
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: text is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not isinstance(text, str):
        raise ValueError(f"{where}: text must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: text is not valid UTF-8 ({e.reason}: {text[e.start:e.end]!r} at character "
                         f"{e.start})") from None
    return text


def encode(text: str | bytes) -> list[int]:
    """Token ids of plain text (bytes: UTF-8). Special-token strings such as ``"<|start|>"`` are plain
    text too. Text that is not valid UTF-8 (lone surrogates) raises ``ValueError``."""
    return list(encoding().encode(_utf8(text, "encode"), disallowed_special=()))


def decode(tokens: Iterable[int] | np.ndarray) -> str:
    """Text of any token ids, never raising: special and reserved ids read as their names
    (``<|start|>``, ``<|reserved_200100|>``), ids outside ``0..VOCAB_SIZE-1`` as U+FFFD, and bytes
    that are not valid UTF-8 as U+FFFD."""
    enc, out, run = encoding(), [], []
    for t in _ids(tokens):
        if 0 <= t < VOCAB_SIZE:
            run.append(t)
            continue
        out += [enc.decode(run), "\ufffd"]
        run = []
    out.append(enc.decode(run))
    return "".join(out)


# -- messages ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Message:
    """One harmony message. ``role`` is system, developer, user, assistant or tool; ``name`` is a
    tool's name (``functions.get_weather``); ``recipient`` is whom a tool call is addressed to."""

    role: str
    content: str
    channel: str | None = None
    recipient: str | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The message as a dict that ``render`` accepts, without the fields that are None."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


MessageLike = Mapping[str, Any] | Message


def _to_harmony(m: MessageLike, effort: Effort, index: int = 0) -> oh.Message:
    """One dict (or ``Message``) as an openai-harmony message; see ``render`` for the rules.

    Errors are one ``ValueError`` starting ``message {index}:``.
    """
    where = f"message {index}"
    if not isinstance(m, Message | Mapping):
        raise ValueError(f"{where}: a message is a dict with 'role' and 'content', got {type(m).__name__}")
    d = m.as_dict() if isinstance(m, Message) else dict(m)
    unknown = set(d) - {"role", "content", "channel", "recipient", "name"}
    if unknown or "role" not in d or "content" not in d:
        raise ValueError(f"{where}: a message is a dict with 'role' and 'content' (optional: channel, recipient, "
                         f"name), got {sorted(map(str, d))}")
    role, content = d["role"], d["content"]
    if not isinstance(role, str) or role not in ROLES:
        raise ValueError(f"{where}: unknown role {role!r}; roles are {', '.join(ROLES)}")
    role = ROLES[role]
    for field in ("channel", "recipient", "name"):
        value = d.get(field)
        if value is not None:
            if not isinstance(value, str | bytes):
                raise ValueError(f"{where}: {field} must be a str, got {type(value).__name__}")
            d[field] = _utf8(value, f"{where}: {field}")
    if isinstance(content, str | bytes):
        content = _utf8(content, where)
    if isinstance(content, str) and role == oh.Role.SYSTEM:
        content = oh.SystemContent.new().with_model_identity(content).with_reasoning_effort(EFFORTS[effort])
    elif isinstance(content, str) and role == oh.Role.DEVELOPER:
        content = oh.DeveloperContent.new().with_instructions(content)
    elif not isinstance(content, str | oh.Content):
        raise ValueError(f"{where}: content must be a str, got {type(content).__name__}")
    if role == oh.Role.TOOL and not d.get("name"):
        raise ValueError(f"{where}: a tool message needs the tool's 'name', e.g. 'functions.get_weather'")
    msg = oh.Message.from_author_and_content(oh.Author(role=role, name=d.get("name")), content)
    channel = d.get("channel", "final" if role == oh.Role.ASSISTANT else None)
    if channel is not None:
        msg = msg.with_channel(channel)
    if d.get("recipient") is not None:
        msg = msg.with_recipient(d["recipient"])
    return msg


def drop_old_analysis(messages: Sequence[oh.Message]) -> list[oh.Message]:
    """The harmony history rule: assistant ``analysis`` messages that come before the last
    assistant ``final`` message are dropped (the model only sees the chain of thought of the turn
    it is in). openai-harmony 0.0.8's own ``auto_drop_analysis`` does less: only analysis before the
    *first* final, and only when the last assistant message is a final one."""
    finals = [i for i, m in enumerate(messages) if m.author.role == oh.Role.ASSISTANT and m.channel == "final"]
    last_final = finals[-1] if finals else -1
    return [m for i, m in enumerate(messages)
            if not (i < last_final and m.author.role == oh.Role.ASSISTANT and m.channel == "analysis")]


def render(messages: str | Sequence[MessageLike], effort: Effort = "medium", *,
           add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation in harmony format, rendered by openai-harmony.

    ``messages`` is a string (one user message) or a list of dicts ``{"role", "content"}`` with
    optional ``"channel"`` (``analysis``, ``commentary``, ``final``), ``"recipient"`` and, for
    tool messages, ``"name"``; ``Message`` objects (from ``parse``) work too. Rules:

    - With no system message, harmony's standard one is put first: model identity, knowledge
      cutoff, ``Reasoning: {effort}``, the valid channels, no date (so the output is
      deterministic). A system message's string content replaces only the model identity
      ("You are ChatGPT, ..."); the rest, and ``effort``, still apply.
    - A developer message's string is its instructions (rendered under ``# Instructions``).
    - An assistant message without a channel is a final answer (channel ``final``).
    - Content may also be an openai-harmony ``Content`` object (``SystemContent``, ...), used as is.
    - History rule (``drop_old_analysis``): analysis before the last final answer is dropped.

    With ``add_generation_prompt`` (the default) the ids end with ``<|start|>assistant``, ready for
    the model to continue; without it they end with the last message's ``<|end|>`` (or ``<|call|>``).
    """
    if not isinstance(effort, str) or effort not in EFFORTS:
        raise ValueError(f"effort must be one of {', '.join(EFFORTS)}, got {effort!r}")
    if isinstance(messages, str | bytes):
        messages = [{"role": "user", "content": messages}]
    elif isinstance(messages, Mapping | Message):
        raise ValueError("messages must be a str or a list of messages, got one message: wrap it in a list")
    elif not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a str or a list of messages, got {type(messages).__name__}")
    msgs = [_to_harmony(m, effort, i) for i, m in enumerate(messages)]
    if not any(m.author.role == oh.Role.SYSTEM for m in msgs):
        system = oh.SystemContent.new().with_reasoning_effort(EFFORTS[effort])
        msgs.insert(0, oh.Message.from_role_and_content(oh.Role.SYSTEM, system))
    conversation = oh.Conversation.from_messages(drop_old_analysis(msgs))
    config = oh.RenderConversationConfig(auto_drop_analysis=False)  # done above, in full
    if add_generation_prompt:
        return list(encoding().render_conversation_for_completion(conversation, oh.Role.ASSISTANT, config))
    return list(encoding().render_conversation(conversation, config))


# -- parsing what the model wrote ----------------------------------------------------------------
def _from_harmony(m: oh.Message) -> Message:
    text = "".join(c.text for c in m.content if isinstance(c, oh.TextContent))
    return Message(m.author.role.value, text, m.channel, m.recipient, m.author.name)


def parse(tokens: Iterable[int] | np.ndarray, *, strict: bool = False) -> list[Message]:
    """The messages in completion tokens: what the model wrote after ``<|start|>assistant``.

    Well-formed output is parsed by openai-harmony. A message cut off mid-content (the token
    budget ran out) is returned with the content so far; its stop token may be missing.

    With ``strict=False`` (the default) this never raises. Where openai-harmony refuses the tokens
    (an id outside the vocabulary, a header cut off before ``<|message|>``, text after a stop token,
    ...), ``_parse_lenient`` parses them instead: every ``<|start|>`` or ``<|end|>``/``<|return|>``/
    ``<|call|>`` closes the message in progress, a header's channel is read after ``<|channel|>``,
    text that is not inside a message becomes a message with channel None, and a header cut off
    at the very end (nothing written yet) is dropped. Text is ``decode``d, so special and reserved
    ids inside it show as their names. With ``strict=True``, openai-harmony's strict parser is used
    and malformed output raises ``ValueError``.
    """
    ids = _ids(tokens)
    if strict:
        if bad := [t for t in ids if not 0 <= t < VOCAB_SIZE]:
            raise ValueError(f"malformed harmony output: token ids outside 0..{VOCAB_SIZE - 1}: {bad[:5]}")
        try:
            msgs = encoding().parse_messages_from_completion_tokens(ids, oh.Role.ASSISTANT, strict=True)
        except (oh.HarmonyError, OverflowError) as e:
            raise ValueError(f"malformed harmony output: {e}") from e
        return [_from_harmony(m) for m in msgs]
    if not ids:
        return []
    if all(0 <= t < VOCAB_SIZE for t in ids):
        try:
            msgs = encoding().parse_messages_from_completion_tokens(ids, oh.Role.ASSISTANT, strict=False)
            return [_from_harmony(m) for m in msgs]
        except Exception:  # HarmonyError, in practice; fall back below
            pass
    return _parse_lenient(ids)


def _parse_lenient(ids: list[int]) -> list[Message]:
    """A forgiving harmony parser for output openai-harmony refuses (see ``parse``)."""
    out: list[Message] = []
    header: list[int] = []  # the current message's header tokens
    content: list[int] | None = None  # its content tokens; None while still in the header
    opened = False  # the header began with <|start|> (so it names a role)

    def close() -> None:
        nonlocal header, content, opened
        if content is not None:
            out.append(_message(header, content, opened))
        elif header:  # a header that never reached <|message|>: keep its text
            out.append(Message("assistant", decode(header)))
        header, content, opened = [], None, False

    for t in ids:
        if t == START:
            close()
            opened = True
        elif t in (END, RETURN, CALL):
            close()
        elif t == MESSAGE and content is None:
            content = []
        elif content is None:
            header.append(t)
        else:
            content.append(t)
    if content is None and (opened or header[:1] == [CHANNEL]):
        header = []  # cut off inside a header: the model had not begun to write this message
    close()
    return out


def _message(header: list[int], content: list[int], opened: bool) -> Message:
    """A message from its header tokens: ``[role][ to=x]<|channel|>channel[ to=x][<|constrain|>type]``."""
    if CONSTRAIN in header:  # what follows is the content type ("json"), not kept
        header = header[:header.index(CONSTRAIN)]
    if CHANNEL in header:
        i = header.index(CHANNEL)
        role_words, channel_words = decode(header[:i]).split(), decode(header[i + 1:]).split()
    else:
        role_words, channel_words = decode(header).split(), []
    recipient = next((w[3:] for w in role_words + channel_words if w.startswith("to=")), None)
    role_words = [w for w in role_words if not w.startswith("to=")]
    channel_words = [w for w in channel_words if not w.startswith("to=")]
    role, name = "assistant", None
    if opened and role_words:  # after <|start|>: a role, or a tool's name (a message from that tool)
        role, name = (role_words[0], None) if role_words[0] in ROLES else ("tool", role_words[0])
    return Message(role, decode(content), channel_words[0] if channel_words else None, recipient or None, name)


@dataclass
class Reply:
    """What the model answered: ``analysis`` (its chain of thought, the analysis-channel texts
    joined by newlines), ``final`` (the answer: the final-channel texts, plus any text that came
    without a channel), the parsed ``messages`` and the completion ``tokens``."""

    analysis: str
    final: str
    messages: list[Message]
    tokens: list[int]

    @classmethod
    def from_tokens(cls, tokens: Iterable[int] | np.ndarray, *, strict: bool = False) -> Reply:
        """Parse completion tokens (see ``parse``; never raises unless ``strict``)."""
        ids = _ids(tokens)
        msgs = parse(ids, strict=strict)
        analysis = "\n".join(m.content for m in msgs if m.channel == "analysis")
        final = "\n".join(m.content for m in msgs if m.channel in ("final", None))
        return cls(analysis, final, msgs, ids)


__all__ = ["CALL", "CHANNEL", "CONSTRAIN", "END", "ENDOFTEXT", "MESSAGE", "RETURN", "SPECIAL_TOKENS", "START",
           "STARTOFTEXT", "STOP_TOKENS", "VOCAB_SHA256", "VOCAB_SIZE", "Message", "Reply", "VocabError", "cache_dir",
           "decode", "drop_old_analysis", "encode", "encoding", "ensure_vocab", "parse", "render"]
