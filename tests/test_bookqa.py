"""`lmqa eval --tasks bookqa`: the question set (well-formed, each answer at
its line, held-out books only), the holdout kept out of training, scoring,
the BM25 sentence baseline, and a tiny-model run through the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import assert_clean_error, assert_ok, run
from typer.testing import CliRunner

from lmqa.engine.generation import SamplingConfig
from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.evaluation.bookqa import (BookQuestion, SentenceIndex, answers, context_path, evidence_hit, load_questions,
                                    run_book, select)
from lmqa.evaluation.tasks import EvalError, one_file
from lmqa.model.loading import load_model
from lmqa.train.data import held_out, read_texts

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "books"
KINDS = {"who", "what", "where", "list", "relation", "description", "two-sentence"}


def question(answers_=("Flint",), all_=False, line=10) -> BookQuestion:
    return BookQuestion("book.txt", "Who?", tuple(answers_), all_, line, "list" if all_ else "who")


# ----- the question set -----
def test_questions_are_well_formed_and_many():
    records = [json.loads(line) for line in (ROOT / "prompts/bookqa.jsonl").read_text().splitlines()]
    assert all(set(r) == {"book", "question", "answers", "all", "line", "kind"} for r in records)
    assert all(r["kind"] in KINDS and r["answers"] and all(isinstance(a, str) and a.strip() for a in r["answers"])
               and isinstance(r["all"], bool) and r["all"] == (r["kind"] == "list") and r["line"] > 0 for r in records)
    assert len(records) >= 100 and len({r["question"] for r in records}) == len(records)
    per_book = {b: sum(r["book"] == b for r in records) for b in held_out()}
    assert len(per_book) == 3 and min(per_book.values()) >= 30
    assert {r["book"] for r in records} == held_out()
    for q in load_questions():
        assert not answers(q.question, q, every=False), q  # the question does not give its answer away


@pytest.mark.skipif(not (SHARED / "train").is_dir(), reason="needs ../shared/books")
def test_every_answer_is_stated_at_its_line_of_a_training_book_never_an_eval_book():
    assert not held_out() & {p.name for p in (SHARED / "eval").glob("*")}
    for q in load_questions():
        lines = (SHARED / "train" / q.book).read_text(encoding="utf-8").splitlines()
        assert 1 <= q.line <= len(lines)
        near = "\n".join(lines[max(q.line - 4, 0) : q.line + 3]).replace("’", "'")
        assert answers(near, q), q


def test_training_skips_the_held_out_books(tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    for name in sorted(held_out()):
        (books / name).write_text("held out")
    (books / "kept.txt").write_text("kept")
    assert read_texts([books]) == ["kept"]
    assert read_texts([books / "kept.txt", books / "treasure-island.txt"]) == ["kept"]


# ----- scoring -----
def test_answers_any_all_and_word_boundaries():
    assert answers("It was Flint's gunner.", question(["Flint"]))
    assert not answers("a skinflint", question(["Flint"]))  # not at a word start
    assert answers("the White\nRabbit", question(["white rabbit"]))  # a quote may wrap
    listed = question(["Elsie", "Lacie", "Tillie"], all_=True)
    assert answers("Elsie, Lacie, and Tillie", listed)
    assert not answers("Elsie and Lacie", listed)
    assert answers("Elsie and Lacie", listed, every=False)


def test_evidence_covers_the_line_or_holds_an_answer():
    q = question(["Flint"], line=10)
    assert evidence_hit(8, 12, "nothing here", q) and evidence_hit(10, 10, "nothing", q)
    assert not evidence_hit(11, 20, "nothing here", q)
    assert evidence_hit(11, 20, "Cap'n Flint, the parrot", q)
    listed = question(["Elsie", "Tillie"], all_=True, line=3)
    assert evidence_hit(40, 41, "only Tillie", listed)  # evidence needs one item, not all


def test_select_books_by_name_or_stem_and_limit():
    qs = load_questions()
    alice = select(qs, ["alice-s-adventures-in-wonderland"], 3)
    assert len(alice) == 3 and {q.book for q in alice} == {"alice-s-adventures-in-wonderland.txt"}
    both = select(qs, ["treasure-island.txt", "the-war-of-the-worlds"], 2)
    assert [q.book for q in both].count("treasure-island.txt") == 2 and len(both) == 4
    assert len(select(qs, None, None)) == len(qs)
    with pytest.raises(EvalError, match="no questions on 'dracula'"):
        select(qs, ["dracula"], None)


def test_bm25_finds_the_sentence_and_its_file_lines():
    text = ("The miller lived by the river.\nHe had a grey horse\ncalled Ambrose. The baker sold bread.\n\n"
            "Nobody knew where the key was hidden.")
    index = SentenceIndex(one_file(text, "t.txt"))
    best = index.search("What was the miller's horse called?")
    assert best.text.startswith("He had a grey horse") and (best.first_line, best.last_line) == (2, 3)
    assert index.search("Where was the key hidden?").first_line == 5


# ----- a run -----
STORY = ("Title page\n*** START OF THE PROJECT GUTENBERG EBOOK TEST ***\n"
         + "".join(f"The sky is blue. The grass is green {i}. Here we go.\n" for i in range(30))
         + "The pass key is 12345.\n"
         + "".join(f"There and back again {i}. The sun is yellow.\n" for i in range(30))
         + "*** END OF THE PROJECT GUTENBERG EBOOK TEST ***\nLicence text\n")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", block_size=8, log=lambda m: None)


def test_run_book_asks_every_question_and_reuses_the_context(tiny, tmp_path):
    book = tmp_path / "story.txt"
    book.write_text(STORY)
    qs = [BookQuestion("story.txt", "What is the pass key?", ("12345",), False, 33, "what"),
          BookQuestion("story.txt", "What colour is the sun?", ("yellow",), False, 40, "what")]
    sampling = SamplingConfig(max_new_tokens=3)
    cache = tmp_path / "contexts"
    first = run_book(book, qs, tiny, LandmarkEngine(tiny.model, tiny.landmark), cache, sampling)
    assert context_path(cache, "story.txt", tiny).is_file() and first.ingest_seconds > 0
    assert [r.question for r in first.results] == [q.question for q in qs]
    key = first.results[0]
    assert key.bm25_sentence == "The pass key is 12345." and key.bm25_lines == "33"
    assert key.bm25_correct and key.bm25_evidence
    spans = [[int(n) for n in loc.rsplit(":", 1)[1].split("-")] for r in first.results for loc in r.evidence]
    assert spans and all(3 <= span[0] and span[-1] <= 63 for span in spans)  # the book's lines, never its boilerplate
    again = run_book(book, qs, tiny, LandmarkEngine(tiny.model, tiny.landmark), cache, sampling)
    assert again.ingest_seconds == 0 and again.tokens == first.tokens  # the context file was reused
    assert [r.answer for r in again.results] == [r.answer for r in first.results]


def test_cli_bookqa_writes_json_and_reports_per_book(tiny_model_dir, tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    (books / "alice-s-adventures-in-wonderland.txt").write_text(STORY)
    out = tmp_path / "out"
    args = ("eval", "--tasks", "bookqa", "--model", tiny_model_dir, "--device", "cpu", "--bookqa-dir", books,
            "--bookqa-books", "alice-s-adventures-in-wonderland", "--bookqa-limit", 2, "-n", 2, "-o", out)
    res = run(CliRunner(), *args, "--json")
    assert_ok(res)
    data = json.loads(res.stdout)["bookqa"]
    assert json.loads((out / "bookqa.json").read_text()) == data
    assert [r["book"] for r in data["summary"]] == ["alice-s-adventures-in-wonderland.txt", "all"]
    assert data["summary"][-1]["questions"] == len(data["results"]) == 2
    assert {"answer", "correct", "evidence_hit", "bm25_sentence", "bm25_correct", "seconds"} <= set(data["results"][0])
    res = run(CliRunner(), *args)
    assert_ok(res)
    assert "BM25" in res.output and data["books"][0]["context"] in str(list((out / "contexts").iterdir()))


def test_cli_bookqa_bad_input(tiny_model_dir, tmp_path):
    args = ("eval", "--tasks", "bookqa", "--model", tiny_model_dir, "--device", "cpu", "-o", tmp_path / "o")
    assert_clean_error(run(CliRunner(), *args, "--bookqa-dir", tmp_path / "none"), "no evaluation books",
                       "--bookqa-dir")
    assert_clean_error(run(CliRunner(), *args, "--bookqa-books", "dracula"), "no questions on 'dracula'")
