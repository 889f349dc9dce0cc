"""`lmqa eval --tasks fairytaleqa,squad`: ROUGE-L and the SQuAD scores against
hand-computed values, the held-out filter, how questions are chosen and
documents built, and runs with a tiny random model over fixture files (CI
has no shared/data)."""

from __future__ import annotations

import json
import random

import pytest
from test_cli import assert_clean_error, assert_ok, run
from typer.testing import CliRunner

from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.evaluation import realqa
from lmqa.evaluation.realqa import (BASELINE, RealQuestion, fairytaleqa, pick_squad, place, rouge_l, run_fairytaleqa,
                                    run_squad, scores, squad, squad_em, squad_f1, squad_normalize, summary)
from lmqa.evaluation.tasks import EvalError
from lmqa.model.loading import load_model
from lmqa.qa.prompts import REFUSAL
from lmqa.train.real_qa_data import squad_heldout


# ----- scores -----
def test_rouge_l_is_the_lcs_f1_of_lowercased_words():
    assert rouge_l("The cat sat on the mat.", "the cat was on the mat") == pytest.approx(5 / 6)  # LCS 5 of 6 and 6
    assert rouge_l("Golden hair!", "golden hair") == 1.0
    assert rouge_l("a b c d", "d c b a") == pytest.approx(0.25)  # order matters: LCS 1
    assert rouge_l("he went to the market", "market") == pytest.approx(1 / 3)  # P 1/5, R 1
    assert rouge_l("Don't stop", "dont stop") == pytest.approx(0.4)  # don|t|stop vs dont|stop: P 1/3, R 1/2
    assert rouge_l("x y", "z") == 0.0 and rouge_l("", "z") == 0.0 and rouge_l("...", "z") == 0.0


def test_fairytaleqa_takes_the_better_reference():
    q = RealQuestion("fairytaleqa test", "s", "s-1", "?", ("golden hair", "the queen"))
    assert scores(q, "the golden hair", False) == {"rouge_l": pytest.approx(0.8)}  # 2/3 and 1 vs 1/3 and 1/2


def test_squad_normalize_em_and_f1_as_the_official_script():
    assert squad_normalize("The  Cat's, an apple!") == "cats apple"
    assert squad_em("the Denver Broncos.", ("Denver Broncos",)) == 1.0
    assert squad_em("Denver", ("Denver Broncos",)) == 0.0
    assert squad_f1("Denver Broncos won", ("Denver Broncos", "Broncos")) == pytest.approx(0.8)  # 2*2/(3+2), best
    assert squad_f1("the the cat cat", ("a cat",)) == pytest.approx(2 / 3)  # cat cat vs cat: P 1/2, R 1
    assert squad_f1("nothing shared", ("Denver",)) == 0.0


def test_squad_scores_answerable_and_unanswerable():
    answerable = RealQuestion("squad v2.0", "Huguenot", "1", "?", ("oxygen",), "p")
    got = scores(answerable, "It is oxygen.", False)
    assert got == {"em": 0.0, "f1": pytest.approx(0.5), "holds": 1.0}  # it is oxygen vs oxygen: P 1/3, R 1
    unanswerable = RealQuestion("squad v2.0", "Huguenot", "2", "?", (), "p")
    assert scores(unanswerable, REFUSAL, True) == {"no_answer": 1.0}
    assert scores(unanswerable, "It is oxygen.", False) == {"no_answer": 0.0}


# ----- fixture data -----
def sentences(word: str, n: int) -> str:
    return " ".join(f"The {word} number {i} is green and the sky is blue." for i in range(n))


STORIES = {
    "the-king": "There was once a king who had a wife with golden hair. " + sentences("tree", 12),
    "the-fox": "A fox lived under the old bridge. " + sentences("stone", 10),
    "the-mill": "The miller kept a grey horse called Ambrose. " + sentences("cloud", 8),
}
FAIRY = [("the-king", "What kind of hair did the wife have?", "golden hair", "golden hair"),
         ("the-king", "Who had a wife?", "a king", ""),
         ("the-king", "What colour is the sky?", "blue", "the sky is blue"),
         ("the-fox", "Where did the fox live?", "under the old bridge", "under a bridge"),
         ("the-mill", "What was the horse called?", "Ambrose", "Ambrose")]
# Huguenot and Black_Death are held out of training (squad_heldout); Normans is not.
ARTICLES = {"Huguenot": 3, "Black_Death": 4, "Normans": 6}


def article(title: str, v2: bool) -> dict:
    paragraphs = []
    for i in range(ARTICLES[title]):
        context = f"{title} paragraph {i}. " + sentences(f"{title.lower()} {i}", 4)
        qas = [{"id": f"{title}-{i}", "question": f"What is {title} paragraph {i} about?",
                "answers": [{"text": f"{title} paragraph {i}", "answer_start": 0}]}]
        if v2:
            qas[0]["is_impossible"] = False
            qas.append({"id": f"{title}-{i}-no", "question": f"Who wrote {title} paragraph {i}?", "answers": [],
                        "is_impossible": True})
        paragraphs.append({"context": context, "qas": qas})
    return {"title": title, "paragraphs": paragraphs}


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "qa"
    (root / "fairytaleqa").mkdir(parents=True)
    (root / "squad-dev").mkdir()
    (root / "fairytaleqa" / "stories_test.jsonl").write_text(
        "".join(json.dumps({"story": s, "split": "test", "text": t}) + "\n" for s, t in STORIES.items()))
    (root / "fairytaleqa" / "qa_test.jsonl").write_text("".join(
        json.dumps({"id": f"{s}-{i}", "story": s, "question": q, "answer1": a1, "answer4": a4}) + "\n"
        for i, (s, q, a1, a4) in enumerate(FAIRY)))
    for version, v2 in (("1.1", False), ("2.0", True)):
        (root / "squad-dev" / f"dev-v{version}.json").write_text(
            json.dumps({"version": version, "data": [article(t, v2) for t in ARTICLES]}))
    return root


# ----- choosing questions -----
def test_held_out_rule_and_only_held_out_articles_are_asked(data):
    held = {"Huguenot", "European_Union_law", "Fresno,_California", "Black_Death", "Genghis_Khan", "Yuan_dynasty"}
    for title in held | {"Normans", "Oxygen", "Super_Bowl_50", "Warsaw", "Amazon_rainforest"}:
        assert squad_heldout(title) == (title in held), title  # SQuAD dev v1.1's held-out articles, and some others
    for version in ("1.1", "2.0"):
        dev = squad(data, version)
        assert {q.group for q in dev.questions} == {"Huguenot", "Black_Death"}
        assert len(dev.questions) == 7 * (2 if version == "2.0" else 1)
        assert list(dev.articles) == list(ARTICLES)  # every article is filler


def test_squad_v2_alternates_answerable_and_unanswerable_and_is_seeded(data):
    questions = squad(data, "2.0").questions
    picked = pick_squad(questions, 4, seed=3)
    assert [bool(q.references) for q in picked] == [True, False, True, False]
    assert picked == pick_squad(questions, 4, seed=3) and len(pick_squad(questions, None, 3)) == 14
    assert pick_squad(squad(data, "2.0").questions, 6, seed=4) != pick_squad(questions, 6, seed=3)
    refused = next(q for q in questions if not q.references)
    assert refused.paragraph.startswith(refused.group)  # its own paragraph goes into the document


def test_fairytaleqa_spreads_questions_over_stories(data):
    questions, stories = fairytaleqa(data, "test", 3, seed=0)
    assert len(questions) == 3 and {q.group for q in questions} == set(STORIES) == set(stories)
    assert stories["the-fox"] == STORIES["the-fox"]
    again, _ = fairytaleqa(data, "test", 3, seed=0)
    assert again == questions
    everything, _ = fairytaleqa(data, "test", None, seed=1)
    assert len(everything) == len(FAIRY)
    groups = [q.group for q in everything]
    assert groups == sorted(groups, key=groups.index)  # grouped by story: each story is read once
    king = next(q for q in everything if q.question == "Who had a wife?")
    assert king.references == ("a king",)  # an empty reference is not scored against
    with pytest.raises(EvalError, match="stories_val.jsonl: no such file"):
        fairytaleqa(data, "val", None, 0)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def test_place_puts_the_paragraph_inside_enough_filler(data, tokenizer):
    dev = squad(data, "1.1")
    q = next(q for q in dev.questions if q.group == "Huguenot")
    depths = set()
    for seed in range(6):
        placed = place(tokenizer, q, dev.articles, 300, random.Random(seed))
        assert placed.text[placed.start : placed.end] == q.paragraph and placed.text.count(q.paragraph) == 1
        filler = (placed.text[: placed.start] + placed.text[placed.end :]).replace("\n\n\n\n", "\n\n").strip("\n")
        assert count(tokenizer, filler) == placed.filler_tokens >= 300
        assert "Huguenot" not in filler  # never its own article
        assert "Normans" not in filler  # held-out articles first: Black_Death is enough
        depths.add(round(placed.depth, 2))
    assert len(depths) > 1 and all(0 <= d <= 1 for d in depths)
    assert place(tokenizer, q, dev.articles, 300, random.Random(1)) == place(tokenizer, q, dev.articles, 300,
                                                                               random.Random(1))
    held = count(tokenizer, "\n\n".join(dev.articles["Black_Death"]))
    more = place(tokenizer, q, dev.articles, held + 50, random.Random(0))
    assert "Normans" in more.text and more.filler_tokens >= held + 50  # then the rest of the file
    with pytest.raises(EvalError, match="fewer than the 100,000 of filler"):
        place(tokenizer, q, dev.articles, 100_000, random.Random(0))


# ----- runs -----
@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", block_size=8, log=lambda m: None)


def test_fairytaleqa_run_with_a_stub_answer_and_a_kept_context(tiny, data, tmp_path):
    questions, stories = fairytaleqa(data, "test", None, seed=0)
    king = [q for q in questions if q.group == "the-king"]
    asked = []

    def stub(session, question):
        asked.append((session.document.text, question))
        return "golden hair", False

    out = tmp_path / "out"
    runs = run_fairytaleqa(king, stories, tiny, LandmarkEngine(tiny.model, tiny.landmark), {"stub": stub}, out)
    assert len(runs) == 1 and runs[0].ingest_seconds > 0 and runs[0].name == "the-king.txt"
    assert [q for _, q in asked] == [q.question for q in king]
    assert {text.strip() for text, _ in asked} == {STORIES["the-king"]}  # the whole story is the document
    hair = next(r for r in runs[0].results if r.question.startswith("What kind of hair"))
    assert hair.replies["stub"].scores["rouge_l"] == 1.0
    assert hair.replies[BASELINE].answer == "There was once a king who had a wife with golden hair."
    assert hair.replies[BASELINE].scores["rouge_l"] == pytest.approx(2 / 7)  # 2 of 12 words and of 2
    again = run_fairytaleqa(king, stories, tiny, LandmarkEngine(tiny.model, tiny.landmark), {"stub": stub}, out)
    assert again[0].ingest_seconds == 0 and again[0].tokens == runs[0].tokens  # the context was reused
    rows = summary(runs)
    assert [r["method"] for r in rows] == ["stub", BASELINE]
    assert rows[0]["rouge_l"] == pytest.approx(sum(r.replies["stub"].scores["rouge_l"] for r in runs[0].results) / 3,
                                               abs=1e-4)


def test_squad_run_scores_refusals_and_answers(tiny, data):
    dev = squad(data, "2.0")
    questions = pick_squad(dev.questions, 4, seed=0)

    def refuse_or_quote(session, question):
        if question.startswith("Who wrote"):
            return REFUSAL, True
        return question.removeprefix("What is ").removesuffix(" about?"), False

    runs = run_squad(questions, dev.articles, tiny, LandmarkEngine(tiny.model, tiny.landmark),
                     {"stub": refuse_or_quote}, 120, seed=0)
    assert len(runs) == 4 and all(r.ingest_seconds > 0 and len(r.results) == 1 for r in runs)
    rows = {r["method"]: r for r in summary(runs)}
    assert rows["stub"]["em"] == rows["stub"]["f1"] == rows["stub"]["holds"] == 1.0
    assert rows["stub"]["no_answer"] == 1.0 and rows["stub"]["false_refusals"] == 0.0
    assert rows[BASELINE]["no_answer"] == 0.0  # BM25 never refuses
    assert rows["stub"]["questions"] == 4 and rows["stub"]["answerable"] == 2
    assert all(0 <= r.results[0].depth <= 1 for r in runs)


def test_cli_runs_both_tasks_with_two_answer_paths(tiny_model_dir, data, tmp_path, monkeypatch):
    monkeypatch.setitem(realqa.ANSWER_PATHS, "echo", lambda sampling: lambda session, question: (question, False))
    out = tmp_path / "out"
    args = ("eval", "--tasks", "fairytaleqa,squad", "--model", tiny_model_dir, "--device", "cpu", "--realqa-dir",
            data, "--realqa-limit", 2, "--realqa-filler", 100, "--realqa-answer", "ask,echo", "-n", 2, "-o", out)
    res = run(CliRunner(), *args, "--json")
    assert_ok(res)
    data_out = json.loads(res.stdout)
    for task in ("fairytaleqa", "squad"):
        assert json.loads((out / f"{task}.json").read_text()) == data_out[task]
        assert data_out[task]["settings"]["answer_paths"] == ["ask", "echo"]
    fairy = data_out["fairytaleqa"]
    assert [(r["set"], r["method"]) for r in fairy["summary"]] == [("fairytaleqa test", m)
                                                                  for m in ("ask", "echo", BASELINE)]
    assert len(fairy["results"]) == 2 and len(fairy["documents"]) == 2  # two questions, two stories
    squad_sets = [(r["set"], r["method"]) for r in data_out["squad"]["summary"]]
    assert squad_sets == [(f"squad v{v}", m) for v in ("1.1", "2.0") for m in ("ask", "echo", BASELINE)]
    assert all(set(r["replies"]) == {"ask", "echo", BASELINE} for r in data_out["squad"]["results"])
    res = run(CliRunner(), *args)
    assert_ok(res)
    assert "ROUGE-L F1" in res.output and "unans." in res.output and "BM25" in res.output
    assert "fairytaleqa the-" in res.output and ("squad Huguenot" in res.output or "squad Black_Death" in res.output)


def test_cli_realqa_bad_input(tiny_model_dir, data, tmp_path):
    args = ("eval", "--tasks", "squad", "--model", tiny_model_dir, "--device", "cpu", "-o", tmp_path / "o")
    assert_clean_error(run(CliRunner(), *args, "--realqa-dir", tmp_path / "none"), "no QA data directory",
                       "--realqa-dir")
    assert_clean_error(run(CliRunner(), *args, "--realqa-dir", data, "--realqa-answer", "nope"),
                       "--realqa-answer must name some of ask")
    assert_clean_error(run(CliRunner(), *args, "--realqa-dir", data, "--realqa-split", "train"),
                       "--realqa-split must be one of test, val")
    assert_clean_error(run(CliRunner(), *args, "--realqa-dir", tmp_path), "dev-v1.1.json: no such file")
    (data / "squad-dev" / "dev-v1.1.json").write_text('{"data": [{"title": "Huguenot"}]}')
    assert_clean_error(run(CliRunner(), *args, "--realqa-dir", data), "dev-v1.1.json: not a SQuAD JSON file",
                       "KeyError")
