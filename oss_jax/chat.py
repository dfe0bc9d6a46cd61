"""Chat: harmony prompt in, streamed channels out, a parsed ``Reply`` back.

``chat(model, "What is 2 + 2?", effort="low")`` renders the conversation with openai-harmony
(``harmony.render``), generates until ``<|return|>`` or ``<|call|>``, and parses what the model
wrote into messages by channel (``harmony.Reply``): ``.analysis`` is the chain of thought,
``.final`` the answer. ``on_text(channel, text)`` receives the text as it is generated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from oss_jax import boundary, harmony
from oss_jax.generate import PAD, generate
from oss_jax.model import GptOss

_CLOSERS = (harmony.END, harmony.RETURN, harmony.CALL)
MAX_HEADER = 16  # tokens; real headers ("assistant<|channel|>final") are a handful


class ChannelStream:
    """Follows completion tokens one at a time: which channel a token's text belongs to.

    The completion starts inside a message header (the prompt ended with ``<|start|>assistant``);
    ``<|channel|>`` names the channel, ``<|message|>`` starts the content, ``<|end|>``,
    ``<|return|>`` or ``<|call|>`` closes it and ``<|start|>`` opens the next header. Text that
    arrives outside that grammar (a small model may write anything), including a "header" that
    runs past ``MAX_HEADER`` tokens without ``<|message|>``, is reported with channel None.
    """

    def __init__(self) -> None:
        self.state = "header"
        self.channel: str | None = None
        self._header: list[int] = []
        self._content: list[int] = []
        self._shown = 0

    def feed(self, token: int) -> tuple[str | None, str]:
        """Take one token; return ``(channel, new text)`` (the text may be empty)."""
        if token == harmony.START:
            self.state, self._header, self.channel = "header", [], None
        elif token == harmony.MESSAGE:
            self.channel = self._channel()
            self.state, self._content, self._shown = "content", [], 0
        elif token in _CLOSERS:
            self.state = "between"
        elif self.state == "header" and len(self._header) < MAX_HEADER:
            self._header.append(token)
        else:
            if self.state == "header":  # no <|message|> in sight: what came was text, not a header
                self.state, self.channel, self._content, self._shown = "content", None, self._header, 0
            if self.state == "between":  # text outside any message
                self.state, self.channel, self._content, self._shown = "content", None, [], 0
            self._content.append(token)
            text = harmony.decode(self._content)
            if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
                return self.channel, ""
            new, self._shown = text[self._shown:], len(text)
            return self.channel, new
        return self.channel, ""

    def flush(self) -> tuple[str | None, str]:
        """At the end of generation: a "header" that never got its ``<|message|>`` was text."""
        if self.state != "header" or not self._header:
            return self.channel, ""
        text, self._header = harmony.decode([t for t in self._header if t < harmony.STARTOFTEXT]), []
        return None, text

    def _channel(self) -> str | None:
        if harmony.CHANNEL not in self._header:
            return None
        after = self._header[self._header.index(harmony.CHANNEL) + 1:]
        words = harmony.decode([t for t in after if t < harmony.STARTOFTEXT]).split()
        return words[0] if words else None


def chat(model: GptOss, messages: str | Sequence[harmony.MessageLike], effort: str = "medium", *,
         max_new_tokens: int = 1024, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
         key=None, on_text: Callable[[str | None, str], None] | None = None) -> harmony.Reply:
    """Answer a conversation.

    Args:
      model: a gpt-oss model whose vocabulary holds the harmony tokens (``o200k_harmony``).
      messages: a user message, or a list of ``{"role", "content"[, "channel"]}`` dicts (earlier
        ``Reply.messages`` can be appended as they are; older analysis is dropped by the
        harmony history rule).
      effort: reasoning effort, ``"low"``, ``"medium"`` or ``"high"`` (the system message line).
      max_new_tokens, temperature, top_k, top_p, key: as for ``generate``.
      on_text: streaming callback ``(channel, text)``; channel is ``"analysis"``, ``"final"``,
        ``"commentary"`` or None.

    Returns:
      ``harmony.Reply`` with ``.analysis``, ``.final``, ``.messages`` and ``.tokens``.

    Bad input raises one ``ValueError``/``TypeError``: messages as ``harmony.render`` checks them
    ("message N: ..."), the sampling arguments as ``generate`` does.
    """
    if on_text is not None and not callable(on_text):
        raise TypeError(f"on_text must be a callable or None, got {type(on_text).__name__}")
    vocab = model.config.vocab_size
    if not boundary.reads_harmony(model):
        raise ValueError(f"this model's vocabulary has {vocab} tokens; chat needs the harmony special "
                         f"tokens (ids up to {harmony.CALL}), i.e. an o200k_harmony model")
    prompt = harmony.render(messages, effort)
    stream = ChannelStream()

    def on_token(toks: np.ndarray) -> None:
        tok = int(toks[0])
        if tok != PAD:
            channel, text = stream.feed(tok)
            if text:
                on_text(channel, text)

    out = generate(model, [prompt], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, stop_tokens=harmony.STOP_TOKENS, key=key,
                   on_token=on_token if on_text else None)
    if on_text:
        channel, text = stream.flush()
        if text:
            on_text(channel, text)
    return harmony.Reply.from_tokens([int(t) for t in out[0] if t != PAD])
