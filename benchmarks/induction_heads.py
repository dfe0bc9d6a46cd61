"""Does a tiny model copy a look-up's count by name? Its previous-token heads, and the copy itself (issue 16).

    .venv/bin/python benchmarks/induction_heads.py --model tiny --style letters
    .venv/bin/python benchmarks/induction_heads.py --model runs/screen-lined-prev/model --style lined

A look-up's copy ("Kate" -> the count word that follows "Kate" in the question) is what an induction head does,
and an induction head needs a previous-token head before it. Two tables, on held-out high-effort look-ups under
teacher forcing:

1. each layer's heads: their mean attention on the token just before the query (prompt's last 40 tokens and the
   reply);
2. at the analysis' count word (styles ``named`` and ``lined``, whose count is a word right after the name): how
   often the model predicts it, another fact's count, or something else, and each head's mean attention on the
   right fact's count word against the other facts'.
"""

from __future__ import annotations

import argparse
import collections

import numpy as np
from common import cpu_name, save

import oss_jax
from oss_jax import data, harmony
from oss_jax.trace import trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="a bundled name or a model directory")
    parser.add_argument("--style", default=data.STYLE, choices=data.STYLES)
    parser.add_argument("-n", type=int, default=60, help="held-out look-ups")
    parser.add_argument("--name", default=None, help="also write the tables to benchmarks/results/NAME")
    args = parser.parse_args()
    model = oss_jax.load(args.model)
    L, N = model.config.num_hidden_layers, model.config.num_attention_heads
    words = {harmony.encode(f" {w}")[0]: c for c, w in enumerate(data.COUNT_WORDS)}
    previous, right, other = np.zeros((L, N)), np.zeros((L, N)), np.zeros((L, N))
    outcome = collections.Counter()
    for i in range(args.n):
        ex = data.make("lookup", "high", np.random.default_rng([9, i]), heldout=True, style=args.style)
        prompt, completion = data.tokens(ex)
        ids = prompt + completion
        T = len(ids)
        tr = trace(model, np.array(ids, np.int32), router=False, sinks=False, residual=False,
                   attention_window=(0, T))
        a_LTNW = tr.attention
        previous += np.mean([a_LTNW[:, t, :, t - 1] for t in range(len(prompt) - 40, T)], axis=0)
        n = len(ex.key) // 3
        j, counts = ex.key[-1], ex.key[2 * n:3 * n]
        word = harmony.encode(f" {data.COUNT_WORDS[counts[j]]}")[0]
        if args.style not in ("named", "lined") or word not in completion:
            continue
        copy = len(prompt) + completion.index(word)  # the analysis' count word; the query is the token before
        got = int(tr.predicted[copy - 1])
        outcome["right" if got == word else "another fact's count" if words.get(got) in counts else "other"] += 1
        facts = [t for t in range(len(prompt)) if ids[t] in words]  # the questions' only count words
        mine = [t for t in facts if ids[t - 1] == ids[copy - 1]]  # after the name just written: the right fact
        right += a_LTNW[:, copy - 1, :, mine[0]]
        others = [t for t in facts if t not in mine]
        other += np.mean([a_LTNW[:, copy - 1, :, t] for t in others], axis=0)
    lines = [f"# Induction heads: {args.model}, style {args.style}", "",
             f"{args.n} held-out high-effort look-ups, teacher forcing; {cpu_name()}", "",
             "| layer: attention on the previous token | " + " | ".join(f"head {h}" for h in range(N)) + " |",
             "|---" * (N + 1) + "|"]
    lines += [f"| {layer} | " + " | ".join(f"{x:.2f}" for x in previous[layer] / args.n) + " |" for layer in range(L)]
    done = sum(outcome.values())
    if done:
        seen = ", ".join(f"{k} {v} of {done}" for k, v in outcome.most_common())
        lines += ["", f"At the analysis' count word: {seen}",
                  "", "| layer: attention on the right fact's count word (the others') | " +
                  " | ".join(f"head {h}" for h in range(N)) + " |", "|---" * (N + 1) + "|"]
        lines += [f"| {layer} | " + " | ".join(f"{r:.2f} ({o:.2f})" for r, o in zip(right[layer] / done,
                                                                                  other[layer] / done, strict=True))
                  + " |" for layer in range(L)]
    text = "\n".join(lines) + "\n"
    if args.name:
        save(args.name, text)
    else:
        print(text)


if __name__ == "__main__":
    main()
