"""Input checks shared by the model-facing API (``model()``, ``generate``, ``chat``, ``trace``).

Each check refuses a bad input with one line naming the argument and the value, before anything is
cast, mapped or computed: a float or bool token id, a Python int beyond 64 bits, an id or a
position out of range, an empty sequence, a sampling parameter that would be silently misread.
Concrete values only: inside ``jax.jit`` (tracers) only shapes and dtypes are checked.
"""

from __future__ import annotations

import numbers
import operator

import jax
import numpy as np

INT32_MAX = 2**31 - 1


def is_traced(x) -> bool:
    """True for an abstract value inside ``jax.jit`` (its values cannot be checked)."""
    return isinstance(x, jax.core.Tracer)


def show(value, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (for error messages)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def int_array(values, name: str = "tokens"):
    """``values`` as an array of integers, or one line why not.

    Arrays (numpy, jax) are returned as they are; lists are read with numpy. Refused: ragged lists,
    floats, bools, strings. Python ints too large for int64 are kept exactly (an object array, for
    the range check that must follow to refuse). An empty list reads as an empty int64 array.
    """
    if hasattr(values, "dtype") and hasattr(values, "shape"):
        arr = values
        if isinstance(arr, np.ndarray) and arr.dtype == object and _all_ints(arr):
            return arr
    else:
        try:
            arr = np.asarray(values)
        except (ValueError, TypeError, OverflowError) as e:
            raise ValueError(f"{name} must be a rectangular array of integers ({e})") from None
        if arr.size == 0 and arr.dtype == np.float64:  # numpy's dtype for [] (no values to judge)
            return arr.astype(np.int64)
        if arr.dtype.kind in "fO":  # numpy reads lists holding ints beyond int64 as float or object
            exact = np.asarray(values, dtype=object)
            if exact.shape == arr.shape and _all_ints(exact):
                return exact
    try:
        kind = np.dtype(arr.dtype).kind
    except TypeError:  # not a numpy dtype (a jax PRNG key array)
        kind = "V"
    if kind not in "iu":
        raise TypeError(f"{name} must be integers, got {arr.dtype}")
    return arr


def _all_ints(arr: np.ndarray) -> bool:
    """An object array holding Python (or numpy) ints only, no bools."""
    return all(isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_) for v in arr.reshape(-1).tolist())


def check_range(arr, low: int, high: int, name: str = "tokens", what: str = "the vocabulary") -> None:
    """Raise ``ValueError`` naming the first-found id outside ``[low, high)`` (no-op for tracers)."""
    if is_traced(arr) or arr.size == 0:
        return
    lo, hi = int(arr.min()), int(arr.max())
    if lo < low or hi >= high:
        bad = lo if lo < low else hi
        raise ValueError(f"{name}: token id {bad} is outside {what} [{low}, {high})")


def check_tokens(tokens, vocab_size: int, *, context: int | None = None, rank: int = 2, name: str = "tokens"):
    """The one check of token ids before any model sees them; returns them as an integer array.

    In this order: integers (not floats, bools, or ints beyond int64), rank (``2``: ``[batch, time]``,
    ``1``: ``[time]``), at least one token, at most ``context`` per row, every id in
    ``[0, vocab_size)``. ``vocab_size`` is the id space the caller speaks: o200k_harmony's for a model
    with a token map (the map comes after this check), the model's own otherwise. Negative ids are
    refused: padding is the caller's business (``generate`` pads internally, with positions -1).
    """
    arr = int_array(tokens, name)
    if arr.ndim != rank:
        want = "[batch, time]" if rank == 2 else "[time]"
        raise ValueError(f"{name} must be {want}, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name} must hold at least one token, got shape {tuple(arr.shape)}")
    if context is not None and arr.shape[-1] > context:
        raise ValueError(f"{arr.shape[-1]} tokens exceed the model's context of {context}")
    check_range(arr, 0, vocab_size, name)
    return arr


def check_positions(positions, shape: tuple[int, ...], context: int, name: str = "positions"):
    """Positions of the tokens' ``shape``: integers in ``[0, context)``, or ``-1`` (padding)."""
    arr = int_array(positions, name)
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name} must have the tokens' shape {tuple(shape)}, got {tuple(arr.shape)}")
    if not is_traced(arr) and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if hi >= context:
            raise ValueError(f"position {hi} is past the model's context of {context}")
        if lo < -1:
            raise ValueError(f"position {lo} is negative (only -1, padding, is allowed)")
    return arr


def int_arg(name: str, value, low: int, high: int | None = None) -> int:
    """An integer argument in ``[low, high]``: Python or numpy ints and 0-d integer arrays, not bools."""
    if isinstance(value, bool | np.bool_) or getattr(value, "dtype", None) == np.bool_:
        raise TypeError(f"{name} must be an integer, got {show(value)}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {show(value)}") from None
    if v < low:
        raise ValueError(f"{name} must be at least {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be at most {high}, got {v}")
    return v


def real_arg(name: str, value) -> float:
    """A real-number argument as a float (NaN and infinities included: the caller bounds it)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int beyond float's range
            raise ValueError(f"{name} is too large, got {show(value)}") from None
    if np.ndim(value) == 0 and hasattr(value, "dtype") and np.dtype(value.dtype).kind in "iuf":
        return float(value)
    raise TypeError(f"{name} must be a number, got {show(value)}")
