"""The bundled tiny model: its data, its vocabulary, its training loop, its export and the shipped files."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import GptOssForCausalLM

import oss_jax
from oss_jax import data, harmony, train
from oss_jax.load import BUNDLED, TINY_DIR, save, tiny_snapshots
from oss_jax.trace import trace
from oss_jax.vocab import UNKNOWN, TokenMap
from tests.reference import hf_logits, load_hf_mxfp4, rel_err


# -- data --------------------------------------------------------------------------------------------
def test_generator_is_deterministic():
    a = [data.example(3, i) for i in range(50)]
    assert a == [data.example(3, i) for i in range(50)]
    assert a != [data.example(4, i) for i in range(50)]
    assert data.example(3, 7, effort="high").effort == "high"


def test_heldout_split_is_disjoint():
    train_ex = [data.example(0, i) for i in range(3000)]
    test_ex = [data.example(0, i, heldout=True) for i in range(600)]
    train_keys = {(e.family, e.key) for e in train_ex}
    test_keys = {(e.family, e.key) for e in test_ex}
    assert not train_keys & test_keys
    assert {e.family for e in test_ex} == set(data.FAMILIES)
    for family in data.FAMILIES:  # every family has questions on both sides, and none in common
        train_f = {e.key for e in train_ex if e.family == family}
        test_f = {e.key for e in test_ex if e.family == family}
        assert train_f and test_f and not train_f & test_f, family
    assert all(not data.is_heldout(e.family, e.key) for e in train_ex)
    assert all(data.is_heldout(e.family, e.key) for e in test_ex)
    # about 10% of addition pairs are held out, and the questions are phrased exactly
    pairs = [(a, b) for a in range(0, 1000, 7) for b in range(0, 1000, 11)]
    share = np.mean([data.is_heldout("add", p) for p in pairs])
    assert 0.07 < share < 0.13
    assert all(e.question == f"What is {e.key[0]} + {e.key[1]}?" for e in test_ex if e.family == "add")


class _Draws:
    """A stand-in for ``np.random.Generator`` whose ``integers`` returns the numbers given."""

    def __init__(self, *numbers: int):
        self.numbers = np.array(numbers)

    def integers(self, low, high, size):
        return self.numbers


def test_sub_is_a_new_family_written_in_the_bundled_vocabulary():
    assert "sub" in data.NEW_FAMILIES and "sub" not in data.FAMILIES and "sub" not in data.MIX
    assert data.ALL_FAMILIES == (*data.FAMILIES, "sub")
    # Every column of the worked answer is right, borrows included (written "carry", as the vocabulary has it).
    for a, b in ((885, 347), (1000 - 1, 0), (100, 1), (500, 499), (7, 7), (0, 0), (347, 885)):
        key, question, analyses, final = data._sub(_Draws(a, b))
        a, b = max(a, b), min(a, b)
        assert key == (a, b) and question == f"What is {a}-{b}?" and final == str(a - b)
        assert analyses["high"].startswith(f"Pad to three digits: {a:03d} and {b:03d}. Ones: ")
        steps = re.findall(r"(\w+): (\d+) is (\d) \+ (\d) \+ (\d), write (\d) carry (\d)\.", analyses["high"])
        assert [s[0] for s in steps] == ["Ones", "Tens", "Hundreds"], analyses["high"]
        borrow, digits = 0, ""
        for (_, top, y, c, d, w, new), x in zip(steps, reversed(f"{a:03d}"), strict=True):
            assert int(c) == borrow and int(top) == int(x) + 10 * int(new) and int(top) - int(y) - int(c) == int(d)
            assert d == w and int(d) >= 0
            borrow, digits = int(new), d + digits
        assert borrow == 0 and analyses["high"].endswith(f" Result: {int(digits)}.") and int(digits) == a - b
        assert analyses["low"] == "" and analyses["medium"].endswith(f"the answer is {a - b}.")
    # The held-out split, and the vocabulary: LoRA cannot add tokens, so every token must be one the model knows,
    # and the reply must write only tokens it was trained to write (an untrained output row, "-", is not one).
    tmap = TokenMap.load(TINY_DIR / "model")
    written = {t for i in range(3000) for t in data.completion(data.example(0, i))}
    rng = np.random.default_rng(0)
    for heldout in (False, True):
        exs = [data.make("sub", data.EFFORTS[i % 3], rng, heldout=heldout) for i in range(600)]
        assert all(data.is_heldout("sub", e.key) == heldout for e in exs)
        for e in exs:
            prompt, completion = data.tokens(e)
            tmap.to_model(prompt + completion, strict=True)
            assert set(completion) <= written, [harmony.decode([t]) for t in set(completion) - written]
            assert harmony.Reply.from_tokens(completion, strict=True).final == e.final
    share = np.mean([data.is_heldout("sub", (a, b)) for a in range(0, 1000, 7) for b in range(0, a + 1, 11)])
    assert 0.07 < share < 0.13
    # The training stream draws it only when a mix names it; an unknown name is refused.
    assert {data.example(1, i, mix={"sub": 0.5, "add": 0.5}).family for i in range(40)} == {"sub", "add"}
    with pytest.raises(ValueError, match=r"^unknown family 'mul' in mix: use add, sort, reverse, count, lookup, sub$"):
        data.example(1, 0, mix={"mul": 1.0})


def test_evaluate_asks_the_new_family():
    from oss_jax import evaluate

    model = oss_jax.load("tiny")
    (cell,) = evaluate.evaluate(model, per_cell=2, families=("sub",), efforts=("low",), keep_examples=2)
    assert (cell.family, cell.effort, cell.n) == ("sub", "low", 2)
    for ex in cell.examples:
        a, b = (int(x) for x in re.fullmatch(r"What is (\d+)-(\d+)\?", ex["question"]).groups())
        assert data.is_heldout("sub", (a, b)) and ex["expected"] == str(a - b)
    with pytest.raises(ValueError, match=r"^unknown family 'mul': use add, sort, reverse, count, lookup, sub$"):
        evaluate.evaluate(model, per_cell=1, families=("mul",))
    # asked in the style it was trained in, which its token map records: reverse asks random letters
    assert evaluate.trained_style(model) == model.token_map.style == data.STYLE == "letters"
    (cell,) = evaluate.evaluate(model, per_cell=3, families=("reverse",), efforts=("low",), keep_examples=3)
    for ex in cell.examples:
        word = "".join(ex["question"].removeprefix("Reverse the letters: ").split())
        assert word not in data.WORDS and data.is_heldout("reverse", (word,)) and ex["expected"] == " ".join(word[::-1])
    # another style on request; a map saved before styles were recorded is v1's; o200k's whole vocabulary: any
    (cell,) = evaluate.evaluate(model, per_cell=2, families=("reverse",), efforts=("low",), keep_examples=2, style="v1")
    assert all("".join(ex["question"].removeprefix("Reverse the letters: ").split()) in data.WORDS
               for ex in cell.examples)
    with pytest.raises(ValueError, match=r"^unknown trace style 'v3': use v1, echo, letters, keyed, named, lined$"):
        evaluate.evaluate(model, per_cell=1, style="v3")
    model.token_map = TokenMap(model.token_map.o200k[1:])
    assert evaluate.trained_style(model) == "v1"
    model.token_map = None
    assert evaluate.trained_style(model) == data.STYLE


def test_eval_command_asks_chosen_families_and_efforts(capsys):
    """``oss-jax eval --families --efforts``: one cell per pair asked, in the model's style; the command's
    names are ``oss_jax.data``'s."""
    from oss_jax import cli

    assert (cli.FAMILIES, cli.EFFORTS, cli.STYLES) == (data.ALL_FAMILIES, data.EFFORTS, data.STYLES)
    assert cli.main(["eval", "--per-cell", "2", "--families", "reverse", "add", "--efforts", "high",
                     "--experts", "packed", "--json"]) in (0, None)
    (cells,) = json.loads(capsys.readouterr().out).values()
    assert [(c["family"], c["effort"], c["n"]) for c in cells] == [("reverse", "high", 2), ("add", "high", 2)]
    assert all(ex["question"].startswith("Reverse the letters: ") and ex["expected"].replace(" ", "").isalpha()
               for ex in cells[0]["examples"])


def test_effort_sets_the_analysis():
    rng = lambda: np.random.default_rng(5)  # same question at each effort
    low, med, high = (data.make("add", e, rng()) for e in data.EFFORTS)
    assert low.analysis == "" and low.final == med.final == high.final
    assert len(med.analysis) < len(high.analysis)
    a, b = low.key
    assert int(low.final) == a + b


@pytest.mark.parametrize("style", data.STYLES)
def test_conversations_parse_back_and_digits_are_single_tokens(style):
    split = kept = 0
    for i in range(200):
        ex = data.example(1, i, style=style)
        prompt, comp = data.tokens(ex)
        assert prompt == harmony.render(ex.question, ex.effort)
        reply = harmony.Reply.from_tokens(comp, strict=True)
        assert reply.final == ex.final and reply.analysis == ex.analysis
        digits = [harmony.decode([t]) for t in comp if harmony.decode([t]).isdigit()]
        if ex.family in data.SPLIT_BY_STYLE[style]:  # one token per digit
            assert all(len(d) == 1 for d in digits)
            split += 1
        else:  # the other families (sort in the echo styles) copy numbers as o200k writes them
            final = harmony.encode(ex.final)
            assert comp[-1 - len(final):-1] == final
            kept += any(len(d) > 1 for d in digits)
    assert split > 20 and (kept > 5 if style != "v1" else kept == 0)


# -- vocabulary ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tmap() -> TokenMap:
    return TokenMap(data.vocabulary())


def test_vocabulary_covers_the_corpus(tmap):
    for i in range(1500):
        for heldout in (False, True):
            prompt, comp = data.tokens(data.example(11, i, heldout=heldout))
            tmap.to_model(prompt + comp, strict=True)  # raises on any unknown token
    assert len(tmap) < 2000


def test_token_map_round_trips_every_family(tmap):
    """o200k text of every family and effort -> model ids -> o200k ids -> the same text."""
    rng = np.random.default_rng(3)
    for family in data.FAMILIES:
        for effort in data.EFFORTS:
            for heldout in (False, True):
                ex = data.make(family, effort, rng, heldout=heldout)
                prompt, completion = data.tokens(ex)
                ids = prompt + completion
                back = tmap.to_o200k(tmap.to_model(ids, strict=True))
                np.testing.assert_array_equal(back, ids)
                text = harmony.decode([int(t) for t in back])
                assert ex.question in text and ex.final in text and ex.analysis in text


def test_token_map_saves_its_style(tmp_path):
    """``vocab.json`` records the trace style the model was trained in (absent: unknown, v1's); a bad one is
    refused naming the file."""
    ids = data.vocabulary("letters")
    for style in ("letters", None):
        TokenMap(ids, style=style).save(tmp_path)
        back = TokenMap.load(tmp_path)
        assert back.style == style and back.o200k.tolist() == [-1, *ids]
        assert ("style" in json.loads((tmp_path / "vocab.json").read_text())) == (style is not None)
    with pytest.raises(ValueError, match="style must be a name"):
        TokenMap(ids, style="")
    (tmp_path / "vocab.json").write_text(json.dumps({"o200k_ids": ids, "style": 3}))
    with pytest.raises(ValueError, match=r"vocab\.json: not a valid token map \(a token map's style must be a name"):
        TokenMap.load(tmp_path)


def test_echo_style_opens_with_the_question_and_round_trips():
    """The "echo" traces (data.STYLES): each high-effort analysis but the addition's opens with words of the
    question, the rest of the conversation is unchanged, and its vocabulary covers it (o200k text that
    round-trips); sort then writes o200k's number tokens."""
    echo_map = TokenMap(data.vocabulary("echo"))
    assert set(data.vocabulary()) <= set(echo_map.o200k.tolist())
    opening = {"sort": "from smallest to largest: ", "reverse": "the letters: ", "count": "appear in: ",
               "lookup": "does "}
    for i, family in enumerate(data.FAMILIES):
        for effort in data.EFFORTS:
            v1, echo = (data.make(family, effort, np.random.default_rng([i, 7]), heldout=True, style=s)
                        for s in ("v1", "echo"))
            assert (v1.key, v1.question, v1.final) == (echo.key, echo.question, echo.final)
            if effort != "high" or family == "add":
                assert echo.analysis == v1.analysis
            else:
                words = echo.analysis.split(". ")[0]
                assert opening[family] in echo.analysis and words.split(":")[0].split()[-1] in echo.question
            prompt, completion = data.tokens(echo)
            ids = prompt + completion
            np.testing.assert_array_equal(echo_map.to_o200k(echo_map.to_model(ids, strict=True)), ids)
            reply = harmony.Reply.from_tokens(completion, strict=True)
            assert (reply.analysis, reply.final) == (echo.analysis, echo.final)
    sort = data.make("sort", "high", np.random.default_rng(1), style="echo")
    assert data.tokens(sort)[1][-1 - len(harmony.encode(sort.final)):-1] == harmony.encode(sort.final)
    with pytest.raises(ValueError, match="unknown trace style"):
        data.make("add", "high", np.random.default_rng(0), style="v3")
    with pytest.raises(ValueError, match=r"TrainConfig\.style"):
        train.TrainConfig(style="v3")


def test_letters_style_reverses_strings_that_cannot_be_learned_by_heart():
    """The "letters" style: the echo traces, and reverse asks for random distinct letters (3 to 7) instead of
    one of 76 words (68 of them in training: a model learns those by heart and reverses no held-out word). The
    split is by the string, the vocabulary covers every letter, and the other families are the echo style's."""
    letters_map = TokenMap(data.vocabulary("letters"))
    seen = {False: set(), True: set()}
    for heldout in (False, True):
        for i in range(300):
            ex = data.make("reverse", "high", np.random.default_rng([i, 5]), heldout=heldout, style="letters")
            word = "".join(ex.question.removeprefix("Reverse the letters: ").split())
            assert 3 <= len(word) <= 7 and len(set(word)) == len(word) and set(word) <= set(data.LETTERS)
            assert ex.key == (word,) and ex.final == " ".join(reversed(word))
            assert ex.analysis.startswith(f"the letters: {' '.join(word)}. Numbered: 1 {word[0]}")
            assert data.is_heldout("reverse", ex.key) == heldout
            seen[heldout].add(word)
            prompt, completion = data.tokens(ex)
            ids = prompt + completion
            np.testing.assert_array_equal(letters_map.to_o200k(letters_map.to_model(ids, strict=True)), ids)
    assert not seen[False] & seen[True] and min(map(len, seen.values())) > 250  # hardly a string twice
    assert set(data.LETTERS) <= {w[0] for w in seen[False]}
    for i, family in enumerate(f for f in data.FAMILIES if f != "reverse"):
        echo, letters = (data.make(family, "high", np.random.default_rng([i, 8]), style=s) for s in ("echo", "letters"))
        assert echo == dataclasses.replace(letters, style="echo")


def test_keyed_style_puts_each_copied_token_right_after_a_one_token_key():
    """The "keyed" style (pilot D): the letters style, but where a copy needs a two-token key there, the question
    is written so that the token to copy follows one token: each fact's count right after the name, each counted
    animal after its position, the numbers to sort without commas. Same keys, so the same split; the analyses
    round-trip through the letters vocabulary (no new token)."""
    letters_map = TokenMap(data.vocabulary("letters"))
    assert data.vocabulary("keyed") == data.vocabulary("letters")
    for i in range(100):
        for family in data.FAMILIES:
            keyed, letters = (data.make(family, "high", np.random.default_rng([i, 9]), style=s)
                              for s in ("keyed", "letters"))
            assert keyed.key == letters.key and keyed.final == letters.final
            prompt, completion = data.tokens(keyed)
            ids = prompt + completion
            np.testing.assert_array_equal(letters_map.to_o200k(letters_map.to_model(ids, strict=True)), ids)
            if family in ("add", "reverse"):
                assert keyed == dataclasses.replace(letters, style="keyed")
            elif family == "lookup":
                names, n = keyed.key[:len(keyed.key) // 3], len(keyed.key) // 3
                counts = keyed.key[2 * n:3 * n]
                assert all(f"{p} {c} " in keyed.question for p, c in zip(names, counts, strict=True))
                assert " has " not in keyed.question
            elif family == "count":
                items = keyed.key[1:]
                assert keyed.question.endswith(" ".join(f"{j} {it}" for j, it in enumerate(items, 1)) + "?")
            else:
                assert keyed.question.endswith(" ".join(map(str, keyed.key)) + ".") and "," not in keyed.question


def test_token_map_round_trip(tmp_path, tmap):
    ids = harmony.render("What is 12 + 34?", "high")
    model_ids = tmap.to_model(ids, strict=True)
    assert model_ids.min() >= 1 and model_ids.max() < len(tmap)
    np.testing.assert_array_equal(tmap.to_o200k(model_ids), ids)
    np.testing.assert_array_equal(tmap.to_o200k([-1, 3]), [-1, tmap.o200k[3]])
    with pytest.warns(UserWarning, match="not in this model's vocabulary"):
        out = tmap.to_model(harmony.encode("Quantum chromodynamics"))
    assert (out == UNKNOWN).any()
    with pytest.raises(ValueError, match="not in this model's vocabulary"):
        tmap.to_model(harmony.encode("Quantum chromodynamics"), strict=True)
    with pytest.raises(ValueError, match="outside o200k_harmony"):
        tmap.to_model([harmony.VOCAB_SIZE])
    tmap.save(tmp_path)
    again = TokenMap.load(tmp_path)
    np.testing.assert_array_equal(again.o200k, tmap.o200k)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid token map"):
        TokenMap.load(tmp_path)


# -- training ----------------------------------------------------------------------------------------------
# the bundled recipe, shortened: its first stage (reverse alone) is steps 0-1, so the interrupted run resumes after it
SHORT = train.TrainConfig(steps=6, batch=4, effort_mix=(0.0, 0.0, 1.0), warmup=2, lr=3e-3, checkpoint_every=3,
                          first_steps=2, snapshot_steps=(2,), log_every=1)


def _params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def test_loss_goes_down_and_resume_equals_uninterrupted(tmp_path):
    straight = train.train(tmp_path / "a", SHORT, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    # four examples a step at the peak learning rate: noisy (step 6 spikes), but clearly downhill
    assert min(r["ce"] for r in rows[-3:]) < rows[0]["ce"] - 0.5, [r["ce"] for r in rows]
    assert {"lb_loss", "z_loss", "load_spread", "accuracy"} <= set(rows[0])
    assert len(rows[0]["load_spread"]) == straight.config.num_hidden_layers
    # interrupted after step 3 (its checkpoint), then started again with the same command
    train.train(tmp_path / "b", SHORT, progress=False, stop_after=4)  # steps 4's work is lost
    assert not (tmp_path / "b" / "model").exists()
    resumed = train.train(tmp_path / "b", SHORT, progress=False)
    for x, y in zip(_params(straight), _params(resumed), strict=True):
        np.testing.assert_array_equal(x, y)
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count("\n") == 6
    b_rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["ce"] for r in b_rows] == [r["ce"] for r in rows]
    # a different recipe in the same directory is refused, not mixed
    with pytest.raises(ValueError, match="different configuration"):
        train.train(tmp_path / "b", dataclasses.replace(SHORT, lr=1e-3), progress=False)
    # a run saved before later fields existed still resumes: they count at the values that reproduce it
    old = dataclasses.replace(SHORT, **{k: tuple(v) if isinstance(v, list) else v
                                        for k, v in train.ADDED_FIELDS.items()})
    saved = tmp_path / "c" / "train_config.json"
    saved.parent.mkdir()
    saved.write_text(json.dumps({k: v for k, v in train._jsonable(old).items() if k not in train.ADDED_FIELDS}))
    train.train(tmp_path / "c", old, progress=False, stop_after=0)
    assert json.loads(saved.read_text()) == train._jsonable(old)
    with pytest.raises(ValueError, match="different configuration"):
        train.train(tmp_path / "c", dataclasses.replace(old, tied_init=True), progress=False, stop_after=0)
    # the snapshot and the final export load, with their token map
    snap = oss_jax.load(tmp_path / "a" / "snapshots" / "step-000002")
    assert snap.token_map is not None and snap.layers[0].mlp.experts.packed
    final = oss_jax.load(tmp_path / "a" / "model", dtype="float32")
    prompt = harmony.render("What is 1 + 2?", "high")
    np.testing.assert_allclose(np.asarray(final(np.array([prompt]))), np.asarray(straight(np.array([prompt]))),
                               atol=0.25)  # MXFP4 experts vs the float32 ones


@pytest.mark.parametrize("heads", [4, 8])
def test_save_loads_in_transformers(tmp_path, heads):
    """The export is a real gpt-oss checkpoint: transformers reads it (model ids as its vocabulary), with the
    bundled 4 heads of 48 and a pilot's 8 of 24 (``TrainConfig.heads``)."""
    model = train.init_model(train.tiny_config(300, heads=heads), seed=1)
    tokens = np.random.default_rng(0).integers(0, 300, (1, 90))
    for mx in (False, True):
        path = save(model, tmp_path / f"m{int(mx)}", mxfp4=mx, float_dtype="float32")
        ours = oss_jax.load(path, dtype="float32")
        if mx:
            theirs = load_hf_mxfp4(path)
        else:
            theirs = GptOssForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
        assert rel_err(np.asarray(ours(tokens)), hf_logits(theirs, tokens)) < 1e-4
    np.testing.assert_allclose(np.asarray(oss_jax.load(tmp_path / "m0", dtype="float32")(tokens)),
                               np.asarray(model(tokens)), rtol=0, atol=1e-5)


# -- the shipped model ---------------------------------------------------------------------------------------
shipped = pytest.mark.skipif(not (TINY_DIR / "model" / "config.json").exists(),
                             reason="the bundled model is not installed (oss-jax train --ship)")


@shipped
def test_bundled_model_is_small_and_complete():
    size = sum(p.stat().st_size for d in BUNDLED.values() for p in d.rglob("*") if p.is_file())
    assert size <= 20e6, f"the bundled models take {size / 1e6:.1f} MB together (the budget: 20 MB)"
    assert len(tiny_snapshots()) >= 3
    cfg = json.loads((TINY_DIR / "model" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    assert cfg["num_local_experts"] >= 16 and cfg["num_experts_per_tok"] == 4


def test_bundled_twins_share_the_recipe_and_differ_in_one_thing():
    """Each twin's saved recipe is the tiny model's with one field changed, and its checkpoint shows it."""
    recipe = json.loads((TINY_DIR / "train_config.json").read_text())
    tiny = dataclasses.asdict(train.TrainConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                   for k, v in recipe.items()}))
    for name, field, value in (("tiny-dense", "dense", True), ("tiny-nosink", "sinks", False)):
        saved = json.loads((BUNDLED[name] / "train_config.json").read_text())
        assert train._with_added_fields(saved) == json.loads(json.dumps({**tiny, field: value})), name
        assert not (BUNDLED[name] / "snapshots").exists()
    dense = json.loads((BUNDLED["tiny-dense"] / "model" / "config.json").read_text())
    assert (dense["num_local_experts"], dense["num_experts_per_tok"], dense["intermediate_size"]) == (1, 1, 4 * 128)
    nosink = oss_jax.load("tiny-nosink")
    stored = np.float32(jax.numpy.bfloat16(train.NO_SINK))  # a twin's non-expert weights ship in bfloat16
    for layer in nosink.layers:
        np.testing.assert_array_equal(np.asarray(layer.attn.sinks_N[...]), stored)
    t = trace(nosink, np.array([harmony.render("What is 1 + 2?", "high")]), router=False)
    assert float(np.max(t.sink_mass)) == 0.0


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-nosink"])
def test_bundled_twins_load_offline_and_answer(name, monkeypatch):
    """Each twin loads by name with the network cut and reproduces its recorded evaluation: the same final
    answers for a transcript of every high-effort cell in its eval.json."""
    import socket

    def no_network(*a, **k):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "socket", no_network)
    model = oss_jax.load(name)
    assert model.layers[0].mlp.experts.packed
    cells = json.loads((BUNDLED[name] / "eval.json").read_text())["MXFP4 experts (shipped)"]
    for cell in (c for c in cells if c["effort"] == "high"):
        ex = cell["examples"][0]
        reply = oss_jax.chat(model, ex["question"], effort="high", max_new_tokens=160)
        assert reply.final == ex["final"], (name, ex["question"], reply.final, ex["final"])
    assert sum(c["correct"] for c in cells) > 0  # it answers some questions right


@shipped
def test_bundled_model_loads_offline_and_answers(monkeypatch):
    """Loads with the network cut; chat reproduces the recorded evaluation: the same final answers
    for the transcripts in eval.json, and its measured accuracy on fresh held-out questions."""
    import socket

    def no_network(*a, **k):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "socket", no_network)
    model = oss_jax.load("tiny")
    assert model.token_map is not None and len(model.token_map) == model.config.vocab_size
    assert model.layers[0].mlp.experts.packed  # MXFP4 kept packed
    cells = json.loads((TINY_DIR / "eval.json").read_text())["MXFP4 experts (shipped)"]
    for cell in cells:
        if cell["effort"] != "high":
            continue
        for ex in cell["examples"][:2]:
            reply = oss_jax.chat(model, ex["question"], effort="high", max_new_tokens=160)
            assert reply.final == ex["final"], (ex["question"], reply.final, ex["final"])
    # fresh held-out questions: as many right as the recorded accuracy predicts, within noise
    rng = np.random.default_rng(99)
    right, expected = 0, 0.0
    for cell in cells:
        if cell["effort"] != "high":
            continue
        for _ in range(4):
            ex = data.make(cell["family"], "high", rng, heldout=True)
            right += oss_jax.chat(model, ex.question, effort="high", max_new_tokens=160).final == ex.final
            expected += cell["accuracy"]
    assert right >= expected - 2 - 2 * np.sqrt(expected), f"{right} right, about {expected:.1f} expected"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        oss_jax.chat(model, "What is 5 + 7?", effort="low", max_new_tokens=8)


def test_twins_train_on_the_same_recipe(tmp_path, monkeypatch):
    """The no-sink twin's sinks never move from NO_SINK (no attention mass on them); the dense twin
    is a gpt-oss config with one expert of width k * F: the same active parameters per token."""
    nosink = train.train(tmp_path / "n", dataclasses.replace(SHORT, sinks=False, snapshot_steps=()), progress=False)
    for layer in nosink.layers:
        np.testing.assert_array_equal(np.asarray(layer.attn.sinks_N[...]), train.NO_SINK)
    prompt = harmony.render("What is 1 + 2?", "high")
    t = trace(nosink, np.array([prompt]), router=False)
    assert float(np.max(t.sink_mass)) == 0.0
    dense = train.train(tmp_path / "d", dataclasses.replace(SHORT, dense=True, snapshot_steps=()), progress=False)
    moe_cfg, dense_cfg = train.tiny_config(100), dense.config
    assert (dense_cfg.num_experts, dense_cfg.experts_per_token) == (1, 1)
    active = lambda c: c.experts_per_token * 3 * c.hidden_size * c.intermediate_size  # gate, up, down
    assert active(dense_cfg) == active(moe_cfg)
    again = oss_jax.load(tmp_path / "d" / "model", dtype="float32")
    np.testing.assert_allclose(np.asarray(again(np.array([prompt]))), np.asarray(dense(np.array([prompt]))), atol=0.25)
    # --ship installs each run under its bundled name; only the tiny model keeps its snapshots
    monkeypatch.setattr(train, "BUNDLED", {k: tmp_path / "bundled" / k for k in BUNDLED})
    assert train.ship(tmp_path / "d") == tmp_path / "bundled" / "tiny-dense"
    assert train.ship(tmp_path / "n") == tmp_path / "bundled" / "tiny-nosink"
    assert sorted(p.name for p in (tmp_path / "bundled" / "tiny-dense").iterdir()) == \
        ["metrics.jsonl", "model", "train_config.json"]
    assert train.twin_config("dense") == dataclasses.replace(train.TrainConfig(), dense=True)
    with pytest.raises(ValueError, match=r"^unknown twin 'moe': use dense or nosink$"):
        train.twin_config("moe")
    with pytest.raises(ValueError, match="family_mix"):
        train.TrainConfig(family_mix=(0.5, 0.5, 0.0, 0.0, 0.1))


def test_a_first_stage_draws_its_own_families():
    """``first_mix`` / ``first_steps``: a curriculum's first stage. Its batches come from its mix, the batches
    after it from ``family_mix``; a stage without a mix, or a mix of the wrong length, is refused."""
    tc = train.TrainConfig(first_mix=(0.0, 0.0, 1.0, 0.0, 0.0), first_steps=2, batch=6, style="letters")
    assert tc.mix_at(1) == dict(zip(data.FAMILIES, (0.0, 0.0, 1.0, 0.0, 0.0), strict=True))
    assert tc.mix_at(2) == tc.mix == train.TrainConfig().mix
    tmap = TokenMap(data.vocabulary("letters"))

    def questions(step: int) -> list[str]:
        batch = train.make_batch(tmap, tc, step)
        texts = [harmony.decode([int(t) for t in row if t > 0]) for row in tmap.to_o200k(batch["tokens"])]
        return [t.split("<|start|>user<|message|>")[1].split("<|end|>")[0] for t in texts]

    assert all(q.startswith("Reverse the letters: ") for step in (0, 1) for q in questions(step))
    later = [q for step in range(2, 6) for q in questions(step)]
    assert len({q.split()[0] for q in later}) >= 3  # the families of family_mix: "What is", "Sort", "How many", ...
    # a stage changes the stream only where it is: batch 2 onwards equals a run without it
    plain = dataclasses.replace(tc, first_mix=(), first_steps=0)
    np.testing.assert_array_equal(train.make_batch(tmap, tc, 3)["tokens"], train.make_batch(tmap, plain, 3)["tokens"])
    with pytest.raises(ValueError, match=r"first_steps=5 needs a first_mix"):
        train.TrainConfig(first_mix=(), first_steps=5)
    with pytest.raises(ValueError, match="first_mix"):
        train.TrainConfig(first_mix=(0.5, 0.5), first_steps=5)


def test_later_stages_follow_the_first_in_turn():
    """``stages``: each (steps, mix) after the first stage, in order, then ``family_mix``; a stage's step count
    and mix are checked like the others, and the stream before and after the stages is unchanged."""
    count, lookup = (0.0, 0.0, 0.0, 1.0, 0.0), (0.0, 0.0, 0.0, 0.0, 1.0)
    tc = train.TrainConfig(first_steps=2, stages=((3, count), (1, lookup)), batch=4, style="letters")
    mixes = [tc.mix_at(step) for step in range(8)]
    names = ["mix" if m == tc.mix else max(m, key=m.get) for m in mixes]
    assert names == ["reverse", "reverse", "count", "count", "count", "lookup", "mix", "mix"]
    tmap = TokenMap(data.vocabulary("letters"))
    rows = tmap.to_o200k(train.make_batch(tmap, tc, 4)["tokens"])
    texts = [harmony.decode([int(t) for t in row if t > 0]) for row in rows]
    assert all("How many times does" in t for t in texts)
    plain = dataclasses.replace(tc, stages=())
    for step in (0, 7 + 3):  # the first stage, and the mixed stream: the same batches as without the stages
        np.testing.assert_array_equal(train.make_batch(tmap, tc, step)["tokens"],
                                      train.make_batch(tmap, plain, step)["tokens"])
    for bad in ((0, count), (3, (0.5, 0.5)), (3,), (True, count)):
        with pytest.raises(ValueError, match=r"stages\[0\]"):
            train.TrainConfig(stages=(bad,))
    # a saved run's configuration (lists, as JSON holds them) reads back equal
    assert train._jsonable(tc)["stages"] == [[3, list(count)], [1, list(lookup)]]


def test_tied_init_starts_the_unembedding_at_the_embedding(tmp_path):
    """``tied_init``: equal at step 0, separate parameters that training moves apart (each its own buffer: the
    step donates them)."""
    tc = train.TrainConfig(steps=2, batch=2, seq_lens=(112, 128, 176), tied_init=True, checkpoint_every=2,
                           snapshot_steps=())
    cfg = train.tiny_config(300)
    tied, plain = train.init_model(cfg, 1, tied_init=True), train.init_model(cfg, 1)
    np.testing.assert_array_equal(tied.unembed_VD[...], tied.embed_VD[...])
    np.testing.assert_array_equal(tied.embed_VD[...], plain.embed_VD[...])
    assert not np.array_equal(plain.unembed_VD[...], plain.embed_VD[...])
    trained = train.train(tmp_path / "run", tc, progress=False)
    assert not np.array_equal(trained.unembed_VD[...], trained.embed_VD[...])


def test_head_count_is_a_recipe_field():
    """``heads`` splits the same 192 query dimensions; impossible splits are refused with the value, and a run
    saved before the field existed reads as the 4 heads it was trained with."""
    cfg = train.tiny_config(300, heads=8)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (8, 4, 24)
    for bad in (3, 5, 10, 64):
        with pytest.raises(ValueError, match=f"got {bad}"):
            train.tiny_config(300, heads=bad)
    for bad in (0, 3, 5, True, 4.0):  # refused when the recipe is written, not when training builds the model
        with pytest.raises(ValueError, match=rf"TrainConfig.heads .*got {bad!r}"):
            train.TrainConfig(heads=bad)
    saved = {k: v for k, v in train._jsonable(train.TrainConfig()).items() if k != "heads"}
    assert train._with_added_fields(saved) == train._jsonable(train.TrainConfig())


def _lookups_against_letters(style: str, seed: int):
    """Every family at every effort in ``style``, checked against the letters style: each conversation
    round-trips through the style's token map, every family but the look-ups is written as in letters, and
    the look-ups keep letters' keys and answers. Yields ``(example, prompt, completion, name, count)`` for
    each look-up at medium and high effort."""
    tmap = TokenMap(data.vocabulary(style))
    yielded = 0
    for i in range(100):
        for family in data.FAMILIES:
            for effort in data.EFFORTS:
                ex, letters = (data.make(family, effort, np.random.default_rng([i, seed]), style=s)
                               for s in (style, "letters"))
                prompt, completion = data.tokens(ex)
                ids = prompt + completion
                np.testing.assert_array_equal(tmap.to_o200k(tmap.to_model(ids, strict=True)), ids)
                if family != "lookup":
                    assert ex == dataclasses.replace(letters, style=style)
                    continue
                assert ex.key == letters.key and ex.final == letters.final
                if effort == "low":
                    continue
                n = len(ex.key) // 3
                yielded += 1
                yield ex, prompt, completion, ex.key[ex.key[-1]], ex.key[2 * n + ex.key[-1]]
    assert yielded == 200  # 100 seeds x medium and high


def test_named_style_gives_each_lookup_count_a_one_token_key():
    """The "named" style (session 17): the letters style but the look-ups, whose count is a word right after the
    name ("Kate eight pears."), the question first. In o200k a number after a space is the tokens " " and "8",
    so in the letters style the count's one-token key is " " (every count has it). Here the name's token is
    followed by the count's word once in the question and by no other count word; every name has its leading
    space (no "Kate" at a message's start). Same keys, answers and split as letters; everything round-trips."""
    words = {harmony.encode(f" {w}")[0] for w in data.COUNT_WORDS}
    for named, prompt, completion, name, count in _lookups_against_letters("named", 10):
        ids = prompt + completion
        name_id, word_id = harmony.encode(f" {name}")[0], harmony.encode(f" {data.COUNT_WORDS[count]}")[0]
        copy = completion.index(word_id)  # the analysis' first count word: the copy
        assert ids[len(prompt) + copy - 1] == name_id
        before = ids[:len(prompt) + copy - 1]
        after_name = [before[k + 1] for k in range(len(before) - 1) if before[k] == name_id]
        assert after_name.count(word_id) == 1 and len(words & set(after_name)) == 1
        for text in (named.question, named.analysis):  # the name always has its space (one token)
            assert text.count(name) == text.count(f" {name}") > 0


def test_lined_style_gives_each_lookup_count_a_key_seen_once():
    """The "lined" style (session 18): the letters style but the look-ups, one fact a line ("\\nKate eight pears.").
    A name at a line's start is o200k's token without the space ("Kate"; "Gina" is "G", "ina"), the question's
    name keeps it (" Kate"), so the token before the analysis' count word occurs once before it, in its fact,
    followed by that word: the copy's key is unique, as in the reversals' "2 p". Same keys, answers and split as
    letters; everything round-trips through the style's token map."""
    for lined, prompt, completion, name, count in _lookups_against_letters("lined", 11):
        ids = prompt + completion
        word_id = harmony.encode(f" {data.COUNT_WORDS[count]}")[0]
        copy = len(prompt) + completion.index(word_id)  # the analysis' first count word: the copy
        key = ids[copy - 1]
        assert key == harmony.encode(name)[-1] != harmony.encode(f" {name}")[0]
        assert [ids[k + 1] for k in range(copy - 1) if ids[k] == key] == [word_id]
        assert "have?\n" in lined.question and lined.question.count(f"\n{name} ") == 1


def test_previous_token_head_attends_to_the_previous_token_from_step_0():
    """``prev_head`` (session 18): layer 0's query head 0 starts as a previous-token head (its query and key
    biases, whatever the tokens), every other weight as without it; a run saved before the field existed reads
    as False."""
    cfg = train.tiny_config(300)
    built, plain = train.init_model(cfg, 1, prev_head=True), train.init_model(cfg, 1)
    tokens = np.random.default_rng(0).integers(0, 300, (2, 120)).astype(np.int32)

    def on_previous(model):  # [L, N]: mean attention on the previous token
        a = trace(model, tokens, router=False, sinks=False, residual=False, attention_window=(0, 120),
                  next_token=False).attention  # [L, B, T, N, W]
        return np.mean([a[:, :, t, :, t - 1] for t in range(1, 120)], axis=(0, 2))

    assert on_previous(built)[0, 0] > 0.9
    assert on_previous(plain).max() < 0.2 and np.delete(on_previous(built).ravel(), 0).max() < 0.2
    a_state, b_state = (dict(nnx.to_flat_state(nnx.state(m, nnx.Param))) for m in (built, plain))
    differ = sorted(str(k) for k in a_state if not np.array_equal(a_state[k].get_value(), b_state[k].get_value()))
    assert len(differ) == 2 and all("layers" in k and "0" in k and ("bq_NH" in k or "bk_KH" in k) for k in differ)
    assert not train.TrainConfig().prev_head
    saved = {k: v for k, v in train._jsonable(train.TrainConfig()).items() if k != "prev_head"}
    assert train._with_added_fields(saved) == train._jsonable(train.TrainConfig())
