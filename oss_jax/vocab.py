"""A small model's vocabulary: a subset of o200k_harmony, with an id map.

The bundled tiny model cannot afford an embedding row for each of o200k's 201,088 tokens (that
alone would be 51 MB), so it keeps only the tokens its training corpus uses. ``TokenMap`` maps
between the two numberings: *o200k ids* (what ``oss_jax.harmony`` renders and parses, what
``generate``, ``chat`` and ``trace`` take and return) and *model ids* (rows of the model's
embedding, columns of its logits). Model id 0 is reserved for every token the model never saw.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from oss_jax import harmony
from oss_jax.checks import INT32_MAX, check_range, int_array

UNKNOWN = 0  # the model id of every o200k token outside the model's vocabulary
FILENAME = "vocab.json"


class TokenMap:
    """o200k ids <-> model ids. ``o200k[m]`` is the o200k id of model id ``m`` (``o200k[0] = -1``).

    Args:
      o200k_ids: the o200k ids the model knows, in model-id order starting at model id 1.
      style: the trace style of the data the model was trained on (``oss_jax.data.STYLES``), saved with the
        map so that evaluation asks the questions the model learned to read; None when unknown (a map saved
        before styles were recorded: style ``"v1"``).
    """

    def __init__(self, o200k_ids: Iterable[int], style: str | None = None):
        ids = [int(i) for i in o200k_ids]
        if len(set(ids)) != len(ids) or any(not 0 <= i < harmony.VOCAB_SIZE for i in ids):
            raise ValueError("a token map needs distinct o200k ids in [0, 201088)")
        if style is not None and not (isinstance(style, str) and style.isidentifier()):
            raise ValueError(f"a token map's style must be a name like 'letters', got {style!r}")
        self.style = style
        self.o200k = np.array([-1, *ids], np.int32)  # model id -> o200k id
        self._model = np.full(harmony.VOCAB_SIZE, UNKNOWN, np.int32)  # o200k id -> model id
        self._model[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)

    def __len__(self) -> int:
        """The model's vocabulary size (including the reserved unknown id)."""
        return len(self.o200k)

    def __repr__(self) -> str:
        return f"TokenMap({len(self)} model ids for o200k_harmony)"

    def __contains__(self, o200k_id: int) -> bool:
        return 0 <= o200k_id < harmony.VOCAB_SIZE and self._model[o200k_id] != UNKNOWN

    def to_model(self, tokens, *, strict: bool = False) -> np.ndarray:
        """o200k ids (any shape) -> model ids. Unknown tokens become ``UNKNOWN`` with a warning
        (``strict``: a ``ValueError``); negative ids (padding) pass through unchanged.

        The ids are checked before they are cast: integers only (not floats or bools), in
        ``[-2**31, VOCAB_SIZE)``; ``oss_jax.boundary`` also refuses negative ids from users."""
        t = int_array(tokens, "tokens")
        if t.size:
            lo, hi = int(t.min()), int(t.max())
            if hi >= harmony.VOCAB_SIZE:
                raise ValueError(f"token id {hi} is outside o200k_harmony [0, {harmony.VOCAB_SIZE})")
            if lo < -INT32_MAX - 1:
                raise ValueError(f"token id {lo} is below int32's range (negative ids are padding, e.g. -1)")
        t = np.asarray(t).astype(np.int64)
        out = np.where(t < 0, t, self._model[np.clip(t, 0, None)]).astype(np.int32)
        unknown = (out == UNKNOWN) & (t >= 0)
        if unknown.any():
            missing = sorted(set(t[unknown].tolist()))
            names = ", ".join(repr(harmony.decode([i])) for i in missing[:5])
            msg = f"{len(missing)} token(s) not in this model's vocabulary, read as <unknown>: {names}"
            if strict:
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=2)
        return out

    def to_o200k(self, tokens) -> np.ndarray:
        """Model ids (any shape) -> o200k ids; negative ids (padding) pass through unchanged."""
        t = int_array(tokens, "model ids")
        check_range(t, -INT32_MAX - 1, len(self), "model ids", "this model's vocabulary (or padding)")
        t = np.asarray(t).astype(np.int64)
        return np.where(t < 0, t, self.o200k[np.clip(t, 0, len(self) - 1)]).astype(np.int32)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``vocab.json`` into ``directory``."""
        path = Path(directory) / FILENAME
        body = {"format": "oss-jax/token-map", "encoding": "o200k_harmony", "unknown_model_id": UNKNOWN,
                "o200k_ids": self.o200k[1:].tolist(), **({"style": self.style} if self.style else {})}
        path.write_text(json.dumps(body))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TokenMap | None:
        """The map saved in ``directory``, or None when it has none (a full-vocabulary model)."""
        path = Path(directory) / FILENAME
        if not path.exists():
            return None
        try:
            body = json.loads(path.read_text())
            return cls(body["o200k_ids"], style=body.get("style"))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a valid token map ({e})") from None
