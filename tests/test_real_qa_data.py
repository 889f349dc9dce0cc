"""Human-written QA training data (lmqa/train/real_qa_data.py) on small
fixture files in the formats of ../shared/data/qa (CI has no ../shared):
examples fit the sequence with the loss on the answers only, FairytaleQA
windows hold the evidence, val/test stories and held-out SQuAD articles are
never drawn, unanswerable questions answer the refusal, and `lmqa train`
takes the data through --qa-data/--real-qa-rate."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lmqa.cli import app
from lmqa.model.loading import load_model
from lmqa.qa.session import QAPrompt
from lmqa.train.data import ExampleSampler, landmark_batch
from lmqa.train.qa_data import NOT_SAID
from lmqa.train.real_qa_data import (FairytaleQA, RealQASampler, SquadQA, as_answer, load_real_qa, squad_heldout,
                                     window)

WORDS = ["fox", "mill", "crow", "river", "lantern", "goose", "baker", "well", "oak", "bell", "king", "stone"]
TITLES = [f"Article_{i}" for i in range(24)]
BOOK = "The grass is green. The sky is blue. Here we go. There and back again. " * 200


def sentence(story: str, section: int, k: int) -> str:
    return f"In part {section} of {story} the {WORDS[(section + k) % len(WORDS)]} said word {k}."


def section_text(story: str, section: int) -> str:
    """Two paragraphs of unique sentences; the first names the section's marker."""
    first = f"Marker {story}-{section} is here. " + " ".join(sentence(story, section, k) for k in range(3))
    return first + "\n" + " ".join(sentence(story, section, k) for k in range(3, 6))


def write_fairytale(folder: Path) -> dict[str, tuple[int, ...]]:
    """Stories and questions in each split's files; returns train question -> evidence sections."""
    folder.mkdir(parents=True)
    sizes = {"train": {"long-tale": 12, "short-tale": 1}, "val": {"val-tale": 3}, "test": {"test-tale": 3}}
    evidence = {}
    for split, stories in sizes.items():
        story_rows, qa_rows = [], []
        for story, n in stories.items():
            sections = [{"section": s, "text": section_text(story, s)} for s in range(1, n + 1)]
            story_rows.append({"story": story, "origin": None, "split": split, "sections": sections,
                               "text": "\n\n".join(x["text"] for x in sections)})
            asked = [(1,), (3,), (6, 7), (9,), (12,), (2, 3)] if n > 1 else [(1,)]
            for i, cor in enumerate(asked):
                question = f"What is asked {i} about {story} in part {cor[0]}?"
                answers = [f"the {WORDS[cor[0] % len(WORDS)]} of {story}", f"word {i} of {story}"]
                qa_rows.append({"id": f"{story}-{i}", "story": story, "split": split, "question": question,
                                "answer1": answers[0], "answer4": "", "answers": answers, "cor_section": list(cor),
                                "ex_or_im": "explicit"})
                evidence[question] = cor
        (folder / f"stories_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in story_rows))
        (folder / f"qa_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa_rows))
    return {q: cor for q, cor in evidence.items() if "val-tale" not in q and "test-tale" not in q}


def paragraph(title: str, j: int) -> str:
    return f"Paragraph {j} of {title} tells that the {WORDS[j]} of {title} is old. It has stood for {j + 2} years."


def write_squad(folder: Path) -> None:
    """v1.1 with answerable questions; v2.0 repeats the first half of the
    articles with the same question ids and adds unanswerable ones."""
    folder.mkdir(parents=True)
    v1, v2 = [], []
    for t, title in enumerate(TITLES):
        paragraphs, with_impossible = [], []
        for j in range(2):
            qas = [{"id": f"{title}-{j}-{k}", "question": f"How old is the {WORDS[j]} of {title} ({k})?",
                    "answers": [{"text": f"{j + 2} years", "answer_start": 0}, {"text": f"{j + 2}", "answer_start": 0}]}
                   for k in range(2)]
            paragraphs.append({"context": paragraph(title, j), "qas": qas})
            impossible = [{"id": f"{title}-{j}-x{k}", "question": f"Who painted the {WORDS[j]} of {title} ({k})?",
                           "answers": [], "is_impossible": True} for k in range(4)]
            with_impossible.append({"context": paragraph(title, j),
                                    "qas": [dict(q, is_impossible=False) for q in qas] + impossible})
        v1.append({"title": title, "paragraphs": paragraphs})
        if t < len(TITLES) // 2:
            v2.append({"title": title, "paragraphs": with_impossible})
    (folder / "dev-v1.1.json").write_text(json.dumps({"version": "1.1", "data": v1}))
    (folder / "dev-v2.0.json").write_text(json.dumps({"version": "v2.0", "data": v2}))


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qa")
    write_fairytale(root / "fairytaleqa")
    write_squad(root / "squad-dev")
    return root


@pytest.fixture(scope="module")
def evidence(qa_dir) -> dict[str, tuple[int, ...]]:
    return {json.loads(line)["question"]: tuple(json.loads(line)["cor_section"])
            for line in (qa_dir / "fairytaleqa" / "qa_train.jsonl").read_text().splitlines()}


@pytest.fixture(scope="module")
def loaded(chat_model_dir):
    return load_model(str(chat_model_dir), device="cpu", block_size=8, log=lambda m: None)


def make_sampler(loaded, qa_dir, n=900, seed=0, rate=1.0, fairytale_share=0.5, books=True):
    tok = loaded.tokenizer
    base = ExampleSampler(torch.tensor(tok(BOOK, add_special_tokens=False).input_ids), tok, n, 0.0, seed)
    fairytale, squad = load_real_qa(qa_dir)
    return RealQASampler(base, QAPrompt(loaded, "document"), rate, fairytale, squad, fairytale_share=fairytale_share,
                         book_slice=base._slice if books else None)


def parts(ex, loaded) -> tuple[str, list[str], list[str]]:
    """(document, questions, answers) of an example; answers are its loss targets."""
    tok = loaded.tokenizer
    text = tok.decode(ex.ids)
    document = text[text.index("<document>\n") + len("<document>\n"): text.index("\n</document>")]
    questions = re.findall(r"Question: (.*?)<\|im_end\|>", text)
    _, labels = landmark_batch([ex], loaded.landmark.block_size, loaded.landmark.landmark_id)
    targets = tok.decode([t for t in labels[0].tolist() if t != -100]).split("<|im_end|>")
    assert targets[-1] == ""  # every answer is closed by the end of turn, and nothing else is a target
    return document, questions, targets[:-1]


def test_fairytale_examples_fit_and_their_windows_hold_the_evidence(loaded, qa_dir, evidence):
    s = make_sampler(loaded, qa_dir, fairytale_share=1.0)
    answers = {q.question: q.answers for q in s.fairytale.questions}
    starts, follow_ups, stories = set(), 0, set()
    for _ in range(60):
        ex = s.sample()
        assert len(ex.ids) <= s.n
        document, questions, targets = parts(ex, loaded)
        assert len(questions) == len(targets) >= 1
        follow_ups += len(questions) > 1
        story = "short-tale" if "short-tale" in document else "long-tale"
        stories.add(story)
        for question, target in zip(questions, targets):
            assert story in question and target in answers[question]
            for section in evidence[question]:
                assert section_text(story, section) in document  # every evidence section whole
        if story == "short-tale":
            assert document == section_text(story, 1)  # a story that fits is used whole
        else:
            assert document[0] in "MI" and document.endswith(".")  # cut at sentence boundaries
            starts.add(document[:30])
    assert len(starts) >= 10 and follow_ups >= 5  # windows at random offsets; follow-ups occur
    assert stories == {"long-tale", "short-tale"}


def test_window_keeps_the_evidence_and_the_budget():
    rng = random.Random(0)
    costs = [rng.randint(2, 6) for _ in range(60)]
    seen = set()
    for _ in range(300):
        start, end = window(costs, 30, 32, 80, rng)
        assert start <= 30 and end >= 33 and 74 < sum(costs[start:end]) <= 80  # room left is less than a unit
        seen.add(start)
    assert min(seen) < 20 and max(seen) > 28  # the evidence anywhere from the window's start to its end
    assert window(costs, 2, 3, sum(costs), rng) == (0, len(costs))  # the whole text when it fits


def test_val_and_test_stories_are_never_read(loaded, qa_dir, tmp_path):
    s = make_sampler(loaded, qa_dir, fairytale_share=1.0)
    assert set(s.fairytale.stories) == {"long-tale", "short-tale"}
    for _ in range(40):
        text = loaded.tokenizer.decode(s.sample().ids)
        assert "val-tale" not in text and "test-tale" not in text
    # a train file that holds a record of another split is refused
    bad = tmp_path / "fairytaleqa"
    write_fairytale(bad)
    rows = (bad / "qa_train.jsonl").read_text().splitlines()
    (bad / "qa_train.jsonl").write_text("\n".join(rows + [rows[0].replace('"split": "train"', '"split": "val"')]))
    with pytest.raises(ValueError, match="split 'val'"):
        FairytaleQA(bad)


def test_squad_examples_hide_the_paragraph_among_other_text(loaded, qa_dir):
    s = make_sampler(loaded, qa_dir, fairytale_share=0.0)
    held = [t for t in TITLES if squad_heldout(t)]
    assert held and len(held) < len(TITLES) // 2  # the fixture holds some out
    depths, fillers, turns, refusals = [], set(), 0, 0
    for _ in range(150):
        ex = s.sample()
        assert len(ex.ids) <= s.n
        document, questions, targets = parts(ex, loaded)
        title = re.search(r"of (Article_\d+) \(", questions[0]).group(1)
        assert title not in held
        assert not any(f"of {t} " in document for t in held)  # nor used as filler
        for question, target in zip(questions, targets):
            assert title in question
            j = WORDS.index(re.search(r"the (\w+) of", question).group(1))
            assert paragraph(title, j) in document
            assert target == (NOT_SAID if question.startswith("Who painted") else f"{j + 2}.")
            refusals += target == NOT_SAID
            turns += 1
        depths.append(document.index(paragraph(title, j)) / len(document))
        fillers.add("The sky is blue." in document)
        assert len(document) > 2 * len(paragraph(title, j))
    assert 0.08 < refusals / turns < 0.22  # about UNANSWERABLE_SHARE
    assert min(depths) < 0.2 and max(depths) > 0.6 and fillers == {True, False}


def test_squad_questions_counted_once_and_held_out_articles_left_out(qa_dir):
    squad = SquadQA(qa_dir / "squad-dev")
    kept = [t for t in TITLES if not squad_heldout(t)]
    assert {t for t, _ in squad.paragraphs} == set(kept)
    v2_kept = [t for t in TITLES[: len(TITLES) // 2] if not squad_heldout(t)]
    assert len(squad.answerable) == 4 * len(kept)  # v2.0's repeats of v1.1 questions are not added again
    assert len(squad.unanswerable) == 8 * len(v2_kept)
    assert {q.answer for q in squad.answerable} == {"2.", "3."}  # the shortest gold answer


def test_same_seed_same_examples(loaded, qa_dir):
    a, b, c = (make_sampler(loaded, qa_dir, seed=seed) for seed in (3, 3, 4))
    first = [a.sample().ids for _ in range(10)]
    assert first == [b.sample().ids for _ in range(10)]
    assert first != [c.sample().ids for _ in range(10)]


def test_rate_leaves_the_rest_to_the_base_sampler(loaded, qa_dir):
    s = make_sampler(loaded, qa_dir, rate=0.3)
    real = sum("<document>" in loaded.tokenizer.decode(s.sample().ids) for _ in range(200))
    assert 35 < real < 90


def test_answers_read_as_short_sentences():
    assert as_answer("delightfully cold") == "Delightfully cold."
    assert as_answer("  because he was\nquite hoarse, ") == "Because he was quite hoarse."
    assert as_answer("He said 'go.'") == "He said 'go.'"
    assert as_answer("1066") == "1066."


def test_real_data_keeps_val_test_and_held_out_articles_out():
    """The shared data itself, where this machine has it (CI does not)."""
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "qa"
    if not root.is_dir():
        pytest.skip("no ../shared/data/qa here")
    fairytale, squad = load_real_qa(root)
    for split in ("val", "test"):
        rows = (root / "fairytaleqa" / f"stories_{split}.jsonl").read_text().splitlines()
        assert not {json.loads(r)["story"] for r in rows} & set(fairytale.stories)
    assert squad.paragraphs and not any(squad_heldout(t) for t, _ in squad.paragraphs)
    assert 0.3 < len(squad.unanswerable) / len(squad.questions) < 0.4  # before UNANSWERABLE_SHARE is applied


def test_train_flags(tmp_path, qa_dir, tiny_model_dir):
    (tmp_path / "book.txt").write_text(BOOK)
    common = ["train", str(tmp_path / "book.txt"), "-o", str(tmp_path / "run"), "--model", str(tiny_model_dir),
              "--device", "cpu"]
    runner = CliRunner()
    res = runner.invoke(app, common + ["--real-qa-rate", "0.5"])
    assert res.exit_code == 1 and "--real-qa-rate needs --qa-data" in res.output
    res = runner.invoke(app, common + ["--qa-data", str(tmp_path / "missing"), "--real-qa-rate", "0.5"])
    assert res.exit_code == 1 and "no such directory" in res.output
    res = runner.invoke(app, common + ["--qa-data", str(tmp_path), "--real-qa-rate", "0.5"])
    assert res.exit_code == 1 and "holds neither" in res.output
    res = runner.invoke(app, common + ["--qa-data", str(qa_dir), "--real-qa-rate", "0.5", "--steps", "1", "--context",
                                       "1024", "--batch-size", "2", "--block-size", "7", "--lora-rank", "2"])
    assert res.exit_code == 0, res.output
    run = json.loads((tmp_path / "run" / "runs.jsonl").read_text().splitlines()[-1])
    assert run["real_qa_rate"] == 0.5 and run["qa_data"] == str(qa_dir)
    assert run["qa_data_questions"] == {"fairytaleqa": 7, "squad": len(SquadQA(qa_dir / "squad-dev").questions)}
