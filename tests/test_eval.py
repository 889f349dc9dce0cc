"""`lmqa eval`: the eval-only needle set, haystack placement, scoring, the
grid, determinism and the CLI's table/PNG/JSON outputs (tiny random model)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from test_cli import assert_clean_error, assert_ok, run
from typer.testing import CliRunner

from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.evaluation.tasks import (SENTENCE_END, Evaluator, Needle, Settings, build_haystack, is_correct, load_needles,
                           parse_depths, read_books)
from lmqa.model.loading import load_model
from lmqa.qa.prompts import template

ROOT = Path(__file__).resolve().parent.parent
SENTENCE = "Mary walked to the mill at dawn. The river ran fast and cold. Nobody spoke of the storm."


@pytest.fixture(scope="module")
def books(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("books")
    for i in range(2):
        body = " ".join(f"{SENTENCE} Chapter {i} line {j} ends here." for j in range(60))
        (d / f"book{i}.txt").write_text(f"Header\n*** START OF THE BOOK ***\n{body}\n*** END OF THE BOOK ***\nLicence")
    return d


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


# ----- the needle set -----
def test_needles_are_many_varied_and_answerable():
    facts = load_needles()
    assert len(facts) >= 40 and len({n.kind for n in facts}) >= 6
    assert len({n.fact for n in facts}) == len(facts) and len({n.question for n in facts}) == len(facts)
    for n in facts:
        assert n.answers and any(is_correct(n.fact, [a]) for a in n.answers), n  # the fact holds its answer
        assert not is_correct(n.question, n.answers), n  # the question does not give it away


def test_needles_are_disjoint_from_training_data_and_passkey():
    """No accepted answer occurs in lmqa's training
    data generators, no fact has the numeric training shape, and nothing
    touches the passkey prompt."""
    generators = [ROOT / "lmqa" / "train" / name for name in ("data.py", "qa_data.py")]
    training = " ".join(p.read_text() for p in generators).lower()  # a moved file fails here, not silently
    passkey = (template("passkey") + " " + template("passkey_filler")).lower()
    for n in load_needles():
        for word in n.answers:
            assert not re.search(r"(?<!\w)" + re.escape(word.lower()) + r"(?!\w)", training), word
        assert not n.fact.startswith("Note:") and "pass key" not in n.fact.lower() + n.question.lower()
        assert not any(s and s in n.fact.lower() for s in passkey.split(". ")), n.fact
        assert (ROOT / "prompts" / "eval_needles.jsonl").read_text().startswith('{"_": "EVALUATION ONLY')


# ----- scoring and placement -----
@pytest.mark.parametrize("answer,accepted,ok", [
    ("The cat was called PIMENTO.", ["Pimento"], True), ("pimentos everywhere", ["Pimento"], True),
    ("It was 1911.", ["11"], False), ("It was 1894.\n\nQuestion: was it 1894?", ["1894"], True),
    ("Kept in 7000.\n\nQuestion: What was the year 1894?", ["1894"], False), ("eleven or 11 cloves", ["11"], True), ("about 2,306", ["2306", "2,306"], True),
    ("The frogs came.", ["frog"], True), ("a bullfrog", ["frog"], False), ("", ["x"], False),
])
def test_is_correct(answer, accepted, ok):
    assert is_correct(answer, accepted) is ok


def test_read_books_drops_gutenberg_boilerplate(books):
    texts = read_books(books)
    assert len(texts) == 2 and all(t.startswith("Mary walked") and "Licence" not in t for t in texts)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_haystack_places_the_fact_at_depth_on_a_sentence_boundary(tokenizer, books, depth):
    fact = "The lighthouse keeper's cat was named Pimento."
    hay = build_haystack(tokenizer, read_books(books), 1500, depth, fact, random.Random(3))
    assert hay.text[hay.needle_start : hay.needle_end] == fact
    assert abs(hay.depth - depth) <= 0.03
    n = len(tokenizer(hay.text, add_special_tokens=False).input_ids)
    assert 1300 <= n <= 1510
    before = hay.text[: hay.needle_start].rstrip()
    assert hay.needle_start == 0 or before.endswith((".", "!", "?"))
    assert SENTENCE_END.match(hay.text[hay.needle_end - 1 :] + " X") or hay.needle_end == len(hay.text)


def test_parse_depths():
    assert parse_depths("0, 50,100") == (0.0, 0.5, 1.0)


# ----- the grid -----
@pytest.fixture(scope="module")
def evaluator(tiny_model_dir, books):
    loaded = load_model(str(tiny_model_dir), device="cpu", block_size=8, log=lambda m: None)
    settings = Settings((300, 500), (0.0, 0.5, 1.0), 2, seed=1, max_new_tokens=3, max_full=400, window=350)
    return Evaluator(loaded, LandmarkEngine(loaded.model, loaded.landmark), settings, read_books(books),
                     load_needles(), loaded)


def test_grid_shape(evaluator):
    cells = list(evaluator.cells())
    assert len(cells) == 2 * 2 * 3 * 2  # needle and passkey: lengths x depths x trials


def test_trials_are_deterministic_and_carry_baselines(evaluator):
    first, again = evaluator.run("needle", 500, 0.5, 0), evaluator.run("needle", 500, 0.5, 0)
    assert [(t.method, t.answer, t.question) for t in first] == [(t.method, t.answer, t.question) for t in again]
    assert [t.method for t in first] == ["landmark", "truncated"]  # 500 tokens > --max-full 400: no full run
    landmark, truncated = first
    assert landmark.tokens >= 450 and truncated.tokens <= 350 and isinstance(landmark.evidence_hit, bool)
    short = evaluator.run("needle", 300, 0.0, 1)
    assert [t.method for t in short] == ["landmark", "truncated", "full"]
    assert short[1].answer == short[2].answer  # it fits the window: truncation cuts nothing


# ----- the command -----
def test_cli_writes_table_png_and_json(tiny_model_dir, books, tmp_path):
    out = tmp_path / "out"
    args = ("eval", "--model", tiny_model_dir, "--baseline-model", tiny_model_dir, "--lengths", "300", "--depths",
            "0,100", "--trials", 1, "--books", books, "--tasks", "needle,passkey", "--max-new-tokens", 2,
            "--device", "cpu", "-o", out)
    res = run(CliRunner(), *args, "--json")
    assert_ok(res)
    data = json.loads(res.stdout)
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.png", "eval.txt"]
    assert json.loads((out / "eval.json").read_text()) == data
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert {(t["task"], t["method"]) for t in data["trials"]} == {
        ("needle", "landmark"), ("needle", "truncated"), ("needle", "full"), ("passkey", "landmark")}
    for t in data["trials"]:
        assert {"question", "answer", "correct", "evidence_hit", "seconds", "depth", "length"} <= set(t)
    needle_rows = [r for r in data["summary"] if r["task"] == "needle" and r["method"] == "landmark"]
    assert needle_rows[0]["total"] == 2 and set(needle_rows[0]["by_depth"]) == {"0", "100"}
    assert "evidence" in (out / "eval.txt").read_text()

    res = run(CliRunner(), *args[:-2], "-o", out, "--tasks", "passkey")
    assert_ok(res)
    assert "passkey" in res.output and "landmark" in res.output


def test_cli_keeps_old_outputs_when_plotting_fails(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.png").write_bytes(b"old")

    def broken(fig, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", broken)
    res = run(CliRunner(), "eval", "--model", tiny_model_dir, "--tasks", "passkey", "--lengths", "300", "--depths",
              "50", "--trials", 1, "--device", "cpu", "-o", out)
    assert_clean_error(res, f"{out}: could not write the results (No space left on device)")
    assert (out / "eval.png").read_bytes() == b"old"
    assert not list(out.glob(".*tmp")), list(out.iterdir())


def test_cli_interrupted_reports_the_trials_done(tiny_model_dir, tmp_path, monkeypatch):
    original, calls = Evaluator.run, []

    def stop_at_the_second(self, *cell):
        calls.append(cell)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *cell)

    monkeypatch.setattr(Evaluator, "run", stop_at_the_second)
    res = run(CliRunner(), "eval", "--model", tiny_model_dir, "--tasks", "passkey", "--lengths", "300", "--depths",
              "0,50", "--trials", 1, "--device", "cpu", "-o", tmp_path / "out", "--json")
    assert_ok(res)
    assert len(json.loads(res.stdout)["trials"]) == 1 and "interrupted" in res.stderr


@pytest.mark.parametrize("args,message", [
    (("--books", "/no/such/books"), "no evaluation books (*.txt) in /no/such/books"),
    (("--tasks", "needle,riddles"), "--tasks must name some of needle, passkey, code"),
    (("--depths", "0,150"), "--depths must be percentages from 0 to 100"),
    (("--lengths", "100"), "--lengths needs lengths of at least 256 tokens"),
    (("-o", "/no/such/dir/out"), "--out /no/such/dir/out: directory /no/such/dir does not exist"),
])
def test_cli_bad_input(tiny_model_dir, args, message):
    res = run(CliRunner(), "eval", "--model", tiny_model_dir, "--device", "cpu", *args)
    assert_clean_error(res, message)


def test_a_needle_without_answer_is_never_correct():
    assert not is_correct("anything", Needle("name", "f", "q", ()).answers)
