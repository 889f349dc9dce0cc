"""RULER's synthetic tasks (lmqa/evaluation/ruler.py): needles where they
were asked for, answers that the context alone determines, RULER's
string_match_all, sizing by tokens, and the task loop on a tiny model."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest
from test_cli import assert_ok, run
from typer.testing import CliRunner

from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.evaluation.tasks import EvalError
from lmqa.evaluation.ruler import (NEEDLE, NOISE, SPECS, TASKS, RulerEvaluator, Sources, cwe, fwe, niah,
                                   string_match_all, table, vt, vt_example)
from lmqa.model.loading import load_model
from lmqa.qa.prompts import REFUSAL

BOOK = " ".join(f"Mary walked to the mill at dawn number {i}. The river ran fast and cold. Nobody spoke of the storm."
                for i in range(400))


@pytest.fixture(scope="module")
def sources() -> Sources:
    return Sources([BOOK])


def test_string_match_all_is_rulers_fraction_of_references():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert string_match_all("the numbers are 123.", ["123", "456", "789", "000"]) == 0.25
    assert string_match_all("ALPHA-beta", ["alpha-BETA"]) == 1.0  # case-insensitive
    assert string_match_all("1234567", ["234"]) == 1.0  # a substring, as RULER scores
    assert string_match_all("", ["x"]) == 0.0


# ----- needles -----
@pytest.mark.parametrize("task", [t for t in TASKS if t.startswith("niah")])
def test_niah_needles_land_at_the_requested_depths(task, sources):
    spec = SPECS[task]
    count = max(spec.keys, spec.queries) * spec.values
    depths = [0.0, 0.5, 0.25, 1.0][:count]
    sample = niah(task, 300, random.Random(1), sources, depths=depths)
    head_end = sample.document.index("\n") + 1
    context = sample.document[head_end:]
    lines = re.findall(r"One of the special magic \w+ for \S+ is: \S+\.", context)
    planted = [m for m in lines if any(r in m for r in sample.references)]
    assert len(planted) == spec.queries * spec.values
    for (a, b), depth in zip(sample.spans, sample.depths):
        assert depth in depths
        at = (a - head_end) / len(context)
        assert abs(at - depth) < 0.05, (at, depth)  # short units: position tracks depth closely
        assert any(r in sample.document[a:b] for r in sample.references)
    if spec.haystack == "noise":
        assert set(context.split("\n")) - set(lines) == {NOISE}
    if spec.haystack == "needle":
        assert len(lines) == 300 + count


@pytest.mark.parametrize("task", [t for t in TASKS if t.startswith("niah")])
def test_niah_answers_are_recoverable_from_the_context(task, sources):
    """All values written for the queried keys, and nothing else, are the references."""
    sample = niah(task, 200, random.Random(7), sources)
    spec = SPECS[task]
    kind = spec.value
    query = re.search(rf"special magic {kind[:-1]}s? for (.+?) mentioned", sample.question).group(1)
    keys = re.split(r", and |, ", query)
    assert len(keys) == spec.queries
    found = [v for k in keys for v in re.findall(
        re.escape(NEEDLE.format(kind=kind, key=k, value="@")).replace("@", r"(\S+?)"), sample.document)]
    assert sorted(found) == sorted(sample.references) and len(found) == spec.queries * spec.values
    assert sample.answer_mode == "quote"  # one quote per needle line
    singular = spec.queries * spec.values == 1
    assert sample.question.endswith(f"mentioned in the provided text {'is' if singular else 'are'}")
    assert sample.document.startswith("A special magic" if singular else "Some special magic")


def test_vt_chain_is_followed_from_the_value():
    example = vt_example(20, random.Random(3))
    sample = vt(60, random.Random(4), example)
    assert sample.document.startswith(example)
    body = sample.document[len(example):]
    value = re.search(r"assigned the value (\d+) in", sample.question).group(1)
    assigned = dict(re.findall(r"^VAR (\w+) = (.+)$", body, re.M))
    names = {v for v, rhs in assigned.items() if rhs == value}
    while True:  # follow the chain: a variable assigned from a known one holds the value too
        more = {v for v, rhs in assigned.items() if rhs.removeprefix("VAR ") in names} - names
        if not more:
            break
        names |= more
    assert names == set(sample.references) and len(names) == 5
    assert [sample.document[a:b] for a, b in sample.spans][0] == f"VAR {sample.references[0]} = {value}"
    assert all(0 <= d < 1 for d in sample.depths) and list(sample.depths) == sorted(sample.depths)
    assert len(re.findall(r"^VAR [A-Z]{3} = ", example, re.M)) == 5  # the worked example: three-letter variables


@pytest.mark.parametrize("short", [False, True])
def test_cwe_references_are_the_most_common_words(sources, short):
    sample = cwe(200, random.Random(5), sources, short=short)
    main = sample.document.rsplit("Memorize the ones that appear most often.\n", 1)[1]
    counts = Counter(re.findall(r"\d+\. (\w+)", main))
    often, rarely = (6, 1) if short else (30, 3)
    assert {counts[w] for w in sample.references} == {often} and len(sample.references) == 10
    assert set(counts.values()) == {often, rarely} and len(counts) == 200
    numbers = [int(n) for n in re.findall(r"(\d+)\. \w+", main)]
    assert numbers == list(range(1, len(numbers) + 1))
    assert not set(sample.references) & set(re.findall(r"\d+\. (\w+)", sample.document[: -len(main)]))


def test_fwe_references_are_the_three_most_frequent_coded_words():
    sample = fwe(3000, random.Random(6), 60)
    counts = Counter(sample.document.split(". ", 1)[1].rsplit("words. ", 1)[1].split())
    ranked = [w for w, _ in counts.most_common()]
    assert ranked[0] == "..." and tuple(ranked[1:4]) == sample.references
    assert counts[ranked[1]] == int(3000 / 4 / (3.141592653589793 ** 2 / 6))  # k = 2 of the zeta distribution


# ----- sizing and the loop -----
@pytest.fixture(scope="module")
def evaluator(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), device="cpu", block_size=8, log=lambda m: None)
    return RulerEvaluator(loaded, LandmarkEngine(loaded.model, loaded.landmark), (2000,), 1, [BOOK], seed=3)


@pytest.mark.parametrize("task", TASKS)
def test_samples_fill_the_length_by_tokens(evaluator, task):
    sample = evaluator.sample(task, 2000, 0)
    assert 1880 <= evaluator.total(sample) <= 2000  # within 1% or one haystack line (a uuid needle: ~100 tokens here)
    assert evaluator.sample(task, 2000, 0) == sample  # seeded by task, length and index alone
    assert evaluator.sample(task, 2000, 1).document != sample.document


def test_too_short_a_length_is_a_clear_error(evaluator):
    with pytest.raises(EvalError, match="too short"):
        evaluator.sample("cwe", 300, 0)


def test_task_loop_end_to_end(evaluator):
    """A quoted answer, a quoted list with evidence, a free one without (the tiny model's
    answers are noise: what is checked is the loop, not the score)."""
    tasks = ("niah_single_1", "niah_multivalue", "cwe")
    loop = RulerEvaluator(evaluator.loaded, evaluator.engine, (2000,), 1, [BOOK], seed=3, tasks=tasks)
    trials = [loop.run(*cell) for cell in loop.cells()]
    assert [(t.task, t.answer_mode) for t in trials] == list(zip(tasks, ("quote", "quote", "free")))
    for t in trials:
        assert t.tokens <= 2000 and 0 <= t.score <= 1 and t.score == string_match_all(t.answer, t.references)
        assert (t.evidence is None) == (t.task == "cwe") and t.answer
    quoted = " ".join(trials[0].answer.split()).lower()
    assert quoted in " ".join(loop.sample("niah_single_1", 2000, 0).document.split()).lower() or quoted == REFUSAL.lower()
    assert loop.run("niah_single_1", 2000, 0).answer == trials[0].answer
    rendered = table(trials, "t")
    assert [c.header for c in rendered.columns] == ["task", "answer", "2,000", "evidence"]
    assert rendered.row_count == len(tasks) + 2  # and the two averages


def test_cli_ruler_writes_json(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    books = tmp_path / "books"
    books.mkdir()
    (books / "b.txt").write_text(BOOK)
    res = run(CliRunner(), "eval", "--model", tiny_model_dir, "--tasks", "niah_single_1,fwe", "--lengths", "1500",
              "--trials", 2, "--books", books, "--device", "cpu", "-o", out, "--json")
    assert_ok(res)
    data = json.loads(res.stdout)["ruler"]
    assert json.loads((out / "ruler.json").read_text()) == data
    assert [(r["task"], r["samples"]) for r in data["summary"]] == [("niah_single_1", 2), ("fwe", 2)]
    assert len(data["trials"]) == 4 and set(data["averages"]) == {"average", "niah average"}
