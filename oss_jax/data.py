"""Synthetic harmony conversations for training the bundled tiny model.

Every example is a whole conversation in the harmony format: the standard system message with
``Reasoning: low|medium|high``, a user question, and the assistant's reply: an ``analysis``
message whose detail follows the effort (none at low, a sketch at medium, every step at high),
then the ``final`` answer. Five task families with their own vocabulary give experts domains to
specialise in:

=========  ==========================================================  ===================
family     question                                                    answer
=========  ==========================================================  ===================
add        ``What is 347 + 885?`` (0 <= a, b <= 999)                   ``1232``
sort       ``Sort these numbers from smallest to largest: 42, 7, 19.`` ``7, 19, 42``
reverse    ``Reverse the letters: g b p d t``                          ``t d p b g``
count      ``How many times does cat appear in: dog cat bird cat?``    ``2``
lookup     ``Ana has 3 figs. Ben has 8 pears. How many pears ...?``    ``8``
sub        ``What is 885-347?`` (0 <= b <= a <= 999)                   ``538``
=========  ==========================================================  ===================

``sub`` (in ``NEW_FAMILIES``, not in ``FAMILIES``) is a family the bundled model never saw: the task of
``oss_jax.finetune`` 's LoRA experiment (``benchmarks/finetune_new_family.py``, notebook 13). It is written
in the bundled model's own vocabulary, since LoRA cannot add tokens: the question's minus is o200k's ``-``
token without a space (``" -"`` is not in the vocabulary). The reply uses only tokens the model was trained
to *write*: ``-`` is not one of them (it occurs only in the system message, "2024-06", so its output row was
never a target; a first try at ``15-7-0 = 8`` taught the model to write " digits" there), so each column
is written as the sum it checks, in the order of an addition's column: ``15 is 7 + 0 + 8`` (the top digit,
10 more when it borrows, is the bottom digit plus the borrow plus the difference), and a borrow is called a
``carry`` ("borrow" is not in the vocabulary). ``ALL_FAMILIES`` is both.

Determinism: ``example(seed, index)`` depends on nothing else, so a training run can regenerate
batch ``i`` after a restart. Held-out split by construction: each question has a *key* (the pair
``(a, b)``, the word, the list, ...) and ``is_heldout(key)`` puts about 10% of keys in the test
split by a hash of the key; training only ever draws train keys and evaluation only test keys.

Tokens: the prompt is rendered by ``oss_jax.harmony`` exactly as ``chat`` renders it. In the
assistant's text every digit is its own token (o200k groups digits in threes, "1232" -> "123",
"2"): decoding gives the same text, and a 4M-parameter model can copy digits one at a time where
it could not learn to compose a thousand three-digit tokens from a few examples each
(``SPLIT_BY_STYLE`` says in which families: in the bundled models' style all but ``sort``, whose reply
copies whole numbers from the question).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable

import numpy as np

from oss_jax import harmony

FAMILIES = ("add", "sort", "reverse", "count", "lookup")
# Share of training data after the first stage (the default of ``TrainConfig.family_mix``: the bundled
# model's recipe). The additions get the most: reading the digits out of o200k's three-digit number tokens
# takes many examples. The first recipe gave them 80% (92% correct at high effort, and near 0% on sort and
# reverse); once a first stage of reversing had taught the model to copy (``TrainConfig.first_mix``), 35%
# was enough for 97% and the rest went to the families that copy (benchmarks/results/tiny_recipe_pilots.md).
MIX = {"add": 0.35, "sort": 0.2, "reverse": 0.1, "count": 0.15, "lookup": 0.2}
V1_MIX = {"add": 0.8, "sort": 0.05, "reverse": 0.05, "count": 0.05, "lookup": 0.05}  # the first recipe's
EFFORTS = ("low", "medium", "high")
HELDOUT_PERCENT = 10
# Families outside the bundled model's training recipe (never drawn by ``example``'s default mix): new
# tasks to teach it by fine-tuning. ``make`` and ``evaluate`` take them like the others.
NEW_FAMILIES = ("sub",)
ALL_FAMILIES = (*FAMILIES, *NEW_FAMILIES)

# Trace styles. "v1": the first bundled model's. "echo": each high-effort analysis opens by repeating the words
# of the question that precede what it must copy ("the letters: f r o g", "does dog appear in: ..."), so the
# first copy is a match-and-copy of the question's own tokens (an induction head), and ``sort`` writes o200k's
# number tokens (copying "42" is copying one token) instead of one token per digit.
# "letters" (the bundled models'): the echo traces, and ``reverse`` asks for random distinct letters instead of
# one of ``WORDS``: a model trained on 68 words learns each word's reversal by heart (100% on training words, 0%
# held out, session 10's echo pilot), while a string it never saw has to be read letter by letter. Distinct
# letters, so each letter of the question is followed by one letter only: copying them in order is a
# match-and-copy.
# "keyed" (session 15's pilot D, tiny_recipe_pilots.md): the letters style, with the questions rewritten so that
# every token a trace copies follows a one-token key in the question: each fact's count right after the name
# ("Kate 8 pears."), each counted animal after its position ("1 bird 2 frog"), the numbers to sort without
# commas. Only the animal list got its one-token keys: o200k writes a space before a number as a token of its own
# (session 17), so keyed's counts and sorted numbers still follow " ", as in the letters style.
# "named" (session 17): the letters style, except the look-ups. o200k writes a space before a number as a token of its
# own ("Kate has 8" -> "Kate", " has", " ", "8"), so the token before any count is " " and the copy of a count
# needs a key three tokens long. Here the count is a word right after the name ("Kate eight pears." -> " Kate",
# " eight"), a one-token key as in the reversals' "2 p"; the question comes first, so that every name has its
# leading space; the analysis echoes the question's end ("does Kate have? Kate eight pears.") and the final answer
# is the digit. It did not help the look-ups (60% alone, 40% in pilot J; tiny_recipe_pilots.md).
# "lined" (session 18): as named, but one look-up fact a line ("...have?\nKate eight pears.\nDan six keys."). A name
# starting a line is o200k's token without the space ("Kate"; the question keeps " Kate"), so the token before the
# analysis' count word ("Kate eight pears. So the answer is 8.") occurs once before it, in its own fact: a unique
# key. Alone it did not help either (65%); with TrainConfig.prev_head the look-ups reach 85% alone.
STYLES = ("v1", "echo", "letters", "keyed", "named", "lined")
STYLE = "letters"  # the default everywhere: the style the bundled models were trained in
ECHO_STYLES = ("echo", "letters", "keyed", "named", "lined")  # the styles that write the echo traces
LETTER_STYLES = ("letters", "keyed", "named", "lined")  # reverse asks for random letters (and the vocabulary has them)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")  # named, lined

WORDS = ("apple", "bread", "cloud", "dance", "eagle", "flame", "grape", "house", "island", "jelly",
         "kite", "lemon", "mango", "night", "ocean", "piano", "queen", "river", "stone", "tiger",
         "umbrella", "violet", "water", "yellow", "zebra", "anchor", "basket", "candle", "dragon",
         "forest", "garden", "hammer", "jacket", "kettle", "ladder", "market", "needle", "orange",
         "pepper", "rabbit", "saddle", "tunnel", "velvet", "window", "planet", "silver", "winter",
         "summer", "castle", "bottle", "mirror", "pencil", "rocket", "spider", "turtle", "wizard",
         "sun", "cup", "map", "fox", "owl", "box", "pen", "bus", "jam", "net", "leaf", "frog",
         "milk", "ship", "road", "song", "star", "tree", "wind", "gold")
ANIMALS = ("cat", "dog", "bird", "fish", "frog", "horse", "sheep", "duck")
NAMES = ("Ana", "Ben", "Cara", "Dan", "Eva", "Finn", "Gina", "Hugo", "Ivy", "Jack", "Kate", "Leo")
ITEMS = ("apples", "pears", "plums", "figs", "coins", "books", "cards", "shells", "stamps", "keys")


@dataclasses.dataclass(frozen=True)
class Example:
    """One conversation: its family, effort, held-out key, texts and answer."""

    family: str
    effort: str
    key: tuple
    question: str
    analysis: str  # empty: no analysis message
    final: str
    style: str = STYLE  # how the analysis is written and the reply tokenized (STYLES)

    @property
    def messages(self) -> list[dict]:
        """The conversation as ``oss_jax.harmony`` messages (the system message is implied)."""
        reply = [{"role": "assistant", "channel": "analysis", "content": self.analysis}] if self.analysis else []
        return [{"role": "user", "content": self.question}, *reply,
                {"role": "assistant", "channel": "final", "content": self.final}]


def is_heldout(family: str, key: tuple) -> bool:
    """The split, by construction: a hash of the question's key, about 10% held out."""
    return zlib.crc32(repr((family, key)).encode()) % 100 < HELDOUT_PERCENT


# -- the five families: rng -> (key, question, {effort: analysis}, final) -----------------------------
def _add(rng: np.random.Generator, style: str = STYLE):
    a, b = (int(x) for x in rng.integers(0, 1000, 2))
    pa, pb = f"{a:03d}", f"{b:03d}"
    steps, carry = [], 0
    for col, name in zip(range(2, -1, -1), ("Ones", "Tens", "Hundreds"), strict=True):
        x, y = int(pa[col]), int(pb[col])
        s = x + y + carry
        steps.append(f"{name}: {x} + {y} + {carry} = {s}, write {s % 10} carry {s // 10}.")
        carry = s // 10
    total = a + b
    high = f"Pad to three digits: {pa} + {pb}. " + " ".join(steps) + f" Result: {total}."
    medium = f"Column by column from the right, with carries: the sum is {total}."
    return (a, b), f"What is {a} + {b}?", {"low": "", "medium": medium, "high": high}, str(total)


def _sort(rng: np.random.Generator, style: str = STYLE):
    n = int(rng.integers(3, 6))
    nums = [int(x) for x in rng.choice(100, n, replace=False)]
    order = sorted(nums)
    high = f"There are {n} numbers. The smallest is {order[0]}. " + " ".join(f"Then {x}." for x in order[1:])
    sep = " " if style == "keyed" else ", "  # keyed: no commas between the numbers, each the key of the next
    if style in ECHO_STYLES:  # echo the list, then remove the smallest until none is left
        left, steps = list(nums), []
        while left:
            x = min(left)
            left.remove(x)
            steps.append(f"smallest {x}, left: " + (sep.join(map(str, left)) or "none") + ".")
        high = "from smallest to largest: " + sep.join(map(str, nums)) + ". " + " ".join(steps)
    medium = f"The smallest is {order[0]} and the largest is {order[-1]}."
    q = "Sort these numbers from smallest to largest: " + sep.join(map(str, nums)) + "."
    return tuple(nums), q, {"low": "", "medium": medium, "high": high}, ", ".join(map(str, order))


def _reverse(rng: np.random.Generator, style: str = STYLE):
    if style in LETTER_STYLES:
        word = "".join(LETTERS[int(i)] for i in rng.choice(len(LETTERS), int(rng.integers(3, 8)), replace=False))
    else:
        word = WORDS[int(rng.integers(len(WORDS)))]
    letters = " ".join(word)
    back = " ".join(reversed(word))
    high = f"The letters are {letters}, {len(word)} of them. From the end: " + ", ".join(reversed(word)) + "."
    if style in ECHO_STYLES:  # number the letters, then read them back by number (each number occurs once)
        high = f"the letters: {letters}. Numbered: " + " ".join(f"{i} {c}" for i, c in enumerate(word, 1)) + \
               ". From the end: " + \
               " ".join(f"{i} {c}" for i, c in reversed(list(enumerate(word, 1)))) + "."
    medium = f"{len(word)} letters, read from the end."
    return (word,), f"Reverse the letters: {letters}", {"low": "", "medium": medium, "high": high}, back


def _count(rng: np.random.Generator, style: str = STYLE):
    target = ANIMALS[int(rng.integers(len(ANIMALS)))]
    n = int(rng.integers(4, 10))
    items = [ANIMALS[int(i)] for i in rng.integers(len(ANIMALS), size=n)]
    if target not in items and rng.random() < 0.8:
        items[int(rng.integers(n))] = target
    seen, steps = 0, []
    for it in items:
        if it == target:
            seen += 1
            steps.append(f"{it} {seen}")
        else:
            steps.append(f"{it} no")
    high = "Go through the list: " + ", ".join(steps) + f". Total {seen}."
    if style in ECHO_STYLES:
        high = f"does {target} appear in: " + ", ".join(steps) + f". Total {seen}."
    medium = f"{target} appears {seen} times."
    q = f"How many times does {target} appear in: {' '.join(items)}?"
    if style == "keyed":  # each animal after its own number: every copy has a one-token key
        high = f"does {target} appear in: " + ", ".join(f"{i} {s}" for i, s in enumerate(steps, 1)) + f". Total {seen}."
        q = f"How many times does {target} appear in: {' '.join(f'{i} {it}' for i, it in enumerate(items, 1))}?"
    return (target, *items), q, {"low": "", "medium": medium, "high": high}, str(seen)


def _lookup(rng: np.random.Generator, style: str = STYLE):
    n = int(rng.integers(2, 5))
    names = [NAMES[int(i)] for i in rng.choice(len(NAMES), n, replace=False)]
    items = [ITEMS[int(i)] for i in rng.choice(len(ITEMS), n, replace=False)]
    counts = [int(c) for c in rng.integers(1, 10, n)]
    j = int(rng.integers(n))
    name, item, count = names[j], items[j], counts[j]
    answer = f"So the answer is {count}."
    medium = f"{name} has {count}."
    if style in ("named", "lined"):  # each count a word right after the name: "Kate eight pears."
        facts = [f"{p} {COUNT_WORDS[c]} {it}." for p, c, it in zip(names, counts, items, strict=True)]
        word = COUNT_WORDS[count]
    if style == "named":  # the question first, so that every name keeps its leading space
        q = f"How many {item} does {name} have? " + " ".join(facts)
        medium = f"So {name} {word}."
        high = f"does {name} have? {name} {word} {item}. {answer}"
    elif style == "lined":  # one fact a line: a name starting a line is its other o200k token ("Kate", not " Kate")
        q = f"How many {item} does {name} have?\n" + "\n".join(facts)
        medium = f"{name} {word}."
        high = f"{name} {word} {item}. {answer}"
    else:
        has = "" if style == "keyed" else " has"  # keyed: the count right after the name
        q = " ".join(f"{p}{has} {c} {it}." for p, c, it in zip(names, counts, items, strict=True)) + \
            f" How many {item} does {name} have?"
        high = f"The question asks about {name} and {item}. {name} has {count} {item}. {answer}"
        if style in ECHO_STYLES:
            high = f"How many {item} does {name} have? {name}{has} {count} {item}. {answer}"
    return (*names, *items, *counts, j), q, {"low": "", "medium": medium, "high": high}, str(count)


def _sub(rng: np.random.Generator, style: str = STYLE):
    b, a = sorted(int(x) for x in rng.integers(0, 1000, 2))  # a >= b: the difference is never negative
    pa, pb = f"{a:03d}", f"{b:03d}"
    steps, borrow = [], 0
    for col, name in zip(range(2, -1, -1), ("Ones", "Tens", "Hundreds"), strict=True):
        x, y = int(pa[col]), int(pb[col])
        top = x + 10 if x - y - borrow < 0 else x  # borrow ten from the next column when the digit is too small
        d = top - y - borrow
        steps.append(f"{name}: {top} is {y} + {borrow} + {d}, write {d} carry {int(top > x)}.")
        borrow = int(top > x)
    diff = a - b
    high = f"Pad to three digits: {pa} and {pb}. " + " ".join(steps) + f" Result: {diff}."
    medium = f"Column by column from the right, with carries: the answer is {diff}."
    return (a, b), f"What is {a}-{b}?", {"low": "", "medium": medium, "high": high}, str(diff)


_MAKERS: dict[str, Callable] = {"add": _add, "sort": _sort, "reverse": _reverse, "count": _count, "lookup": _lookup,
                                "sub": _sub}


def make(family: str, effort: str, rng: np.random.Generator, heldout: bool = False, style: str = STYLE) -> Example:
    """One example of ``family`` (any of ``ALL_FAMILIES``) at ``effort`` from the requested split (rejection
    sampling), its analysis in trace ``style`` (``STYLES``)."""
    if family not in _MAKERS or effort not in EFFORTS:
        raise ValueError(f"unknown family {family!r} or effort {effort!r}")
    if style not in STYLES:
        raise ValueError(f"unknown trace style {style!r}: use {', '.join(STYLES)}")
    while True:
        key, question, analyses, final = _MAKERS[family](rng, style)
        if is_heldout(family, key) == heldout:
            return Example(family, effort, key, question, analyses[effort], final, style)


def example(seed: int, index: int, heldout: bool = False, effort: str | None = None,
            mix: dict[str, float] | None = None, style: str = STYLE) -> Example:
    """Example number ``index`` of the stream ``seed``: family by ``mix`` (default ``MIX``; a mix may name
    ``NEW_FAMILIES`` too, e.g. ``{"sub": 1.0}``), effort uniform unless given."""
    rng = np.random.default_rng([seed, index, int(heldout)])
    mix = MIX if mix is None else mix
    if unknown := sorted(set(mix) - set(ALL_FAMILIES)):
        raise ValueError(f"unknown family {unknown[0]!r} in mix: use {', '.join(ALL_FAMILIES)}")
    # FAMILIES alone when the mix names no new family: the stream the bundled model was trained on is unchanged
    names = ALL_FAMILIES if any(mix.get(f, 0) for f in NEW_FAMILIES) else FAMILIES
    family = names[int(rng.choice(len(names), p=[mix.get(f, 0.0) for f in names]))]
    drawn = EFFORTS[int(rng.integers(len(EFFORTS)))]
    return make(family, effort or drawn, rng, heldout, style)


# -- tokens --------------------------------------------------------------------------------------
_SPLIT: dict[int, list[int]] = {}  # o200k id -> its digit tokens (or itself)


def split_digits(ids: list[int]) -> list[int]:
    """Replace each multi-digit o200k token ("347") with one token per digit ("3", "4", "7")."""
    out = []
    for t in ids:
        if t not in _SPLIT:
            text = harmony.decode([t])
            _SPLIT[t] = [harmony.encode(c)[0] for c in text] if len(text) > 1 and text.isdigit() else [t]
        out.extend(_SPLIT[t])
    return out


# The families in which the assistant writes one token per digit; elsewhere it writes o200k's own
# tokens (copying "42" from the question is then copying one token). Style v1: all of them.
SPLIT_FAMILIES = ALL_FAMILIES
SPLIT_BY_STYLE = {"v1": SPLIT_FAMILIES, **{s: tuple(f for f in ALL_FAMILIES if f != "sort") for s in ECHO_STYLES}}


def assistant_tokens(text: str, family: str | None = None, style: str = STYLE) -> list[int]:
    """How the assistant writes ``text`` in ``family``: o200k tokens, digits one per token in
    ``SPLIT_BY_STYLE[style]`` (and when ``family`` is None)."""
    ids = harmony.encode(text)
    return split_digits(ids) if family is None or family in SPLIT_BY_STYLE[style] else ids


@functools.cache
def _header(channel: str) -> list[int]:
    return [harmony.CHANNEL, *harmony.encode(channel), harmony.MESSAGE]


def completion(ex: Example) -> list[int]:
    """What the model writes after ``<|start|>assistant``: [analysis message], final message."""
    out: list[int] = []
    if ex.analysis:
        out += _header("analysis") + assistant_tokens(ex.analysis, ex.family, ex.style) + [harmony.END, harmony.START]
        out += harmony.encode("assistant")
    return out + _header("final") + assistant_tokens(ex.final, ex.family, ex.style) + [harmony.RETURN]


def tokens(ex: Example) -> tuple[list[int], list[int]]:
    """``(prompt, completion)`` o200k ids: the prompt exactly as ``chat`` renders it."""
    return harmony.render(ex.question, ex.effort), completion(ex)


def vocabulary(style: str = STYLE) -> list[int]:
    """Every o200k id the corpus can use, sorted: the tiny model's vocabulary.

    Built from the templates by enumeration (every number 0..999 in both operand places, every
    word, name, item and animal, every effort) plus a large sample of whole conversations, so no
    question the generator can produce has a token outside it. ``style``: with the conversations of that
    trace style (``STYLES``) too.
    """
    return list(_vocabulary(style))  # a copy: the cached tuple stays as built


@functools.cache  # a pure function of this module's constants; building it reads ~16,000 conversations
def _vocabulary(style: str) -> tuple[int, ...]:
    ids: set[int] = set()
    # V1_MIX: the sample the first vocabularies were built from, so that a shipped vocabulary stays the same
    for ex in (example(0, i, heldout=h, mix=V1_MIX, style=s) for i in range(4000) for h in (False, True)
               for s in dict.fromkeys(("v1", style))):
        prompt, comp = tokens(ex)
        ids.update(prompt)
        ids.update(comp)
    for n in range(1000):
        ids.update(harmony.render(f"What is {n} + {n}?", "low"))
        ids.update(harmony.encode(f"Sort these numbers from smallest to largest: {n}, {n}."))
    for w in (*WORDS, *ANIMALS, *NAMES, *ITEMS, *(LETTERS if style in LETTER_STYLES else ())):
        for text in (w, f" {w}", f"{w}.", f" {w}.", f"{w}?", f" {w}?", " ".join(w)):
            ids.update(harmony.encode(text))
    for effort in EFFORTS:
        ids.update(harmony.render("x", effort))
    ids.update(harmony.encode(str(d))[0] for d in range(10))
    ids.update((harmony.RETURN, harmony.CALL, harmony.END, harmony.START, harmony.MESSAGE, harmony.CHANNEL))
    return tuple(sorted(ids))
