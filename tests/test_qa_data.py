"""Document/codebase QA training data (lmqa/train/qa_data.py): rendered exactly as
`ask` feeds a session, loss only on answers, answers that copy a sentence
of the document, distractors, and nothing shared with `lmqa eval`."""

from __future__ import annotations

import inspect
import random
import re
from collections import Counter

import pytest
import torch

from lmqa.evaluation.tasks import is_correct, load_needles
from lmqa.model.loading import load_model
from lmqa.qa.session import QAPrompt
from lmqa.train.qa_data import (NOT_SAID, SHAPES, QASampler, Who, fact_family, insert_at_sentences, made_up_name,
                                 question_turn, read_python_files)
from lmqa.train.data import ExampleSampler, landmark_batch


TEXT = ("The river ran low that summer. Nobody in the village spoke of it! The mill stood idle, and the children "
        "played in the dry bed. ") * 60


@pytest.fixture(scope="module")
def loaded(chat_model_dir):
    return load_model(str(chat_model_dir), device="cpu", block_size=8, log=lambda m: None)


def sampler(loaded, code=None, code_rate=0.0, not_said_rate=0.1, n=600, seed=0):
    tok = loaded.tokenizer
    stream = torch.tensor(tok(TEXT, add_special_tokens=False).input_ids)
    base = ExampleSampler(stream, tok, n, 0.0, seed)
    prompts = {kind: QAPrompt(loaded, kind) for kind in ("document", "codebase")}
    return QASampler(base, prompts, 1.0, code, code_rate=code_rate, not_said_rate=not_said_rate)


def targets(ex, loaded) -> list[int]:
    landmark = loaded.landmark.landmark_id
    _, labels = landmark_batch([ex], loaded.landmark.block_size, landmark)
    return [t for t in labels[0].tolist() if t != -100]


def test_document_example_is_the_ask_prompt_with_loss_on_answers_only(loaded):
    tok = loaded.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    prompt = QAPrompt(loaded, "document")
    s = sampler(loaded)
    multi = 0
    for _ in range(12):
        ex = s.sample()
        assert len(ex.ids) <= s.n
        head = tok(prompt.head, add_special_tokens=False).input_ids
        assert ex.ids[: len(head)] == head
        text = tok.decode(ex.ids)
        document = text[len(prompt.head): text.index("\n</document>")]
        # the targets are the answers, each closed by the end of turn, and nothing else
        answers = tok.decode(targets(ex, loaded)).split("<|im_end|>")
        assert answers[-1] == "" and len(answers) >= 2
        for answer in answers[:-1]:
            assert answer == NOT_SAID or answer in document  # an answer copies a sentence of the document
        turns = len(answers) - 1
        assert text.count("<|im_start|>assistant\n") == turns and ex.ids[-1] == im_end
        # a follow-up's tail starts with the end of turn that generation stopped at, as a session feeds it
        assert text.count("<|im_end|><|im_end|>") == 0
        multi += turns > 1
    assert multi  # follow-up questions occur


def test_facts_written_whole_with_near_miss_distractors():
    rng = random.Random(3)
    near = 0
    for _ in range(200):
        facts, asked, missing = fact_family(rng, 6)
        assert asked in facts and len(facts) == 6
        assert asked.answer in asked.sentence
        assert missing.sentence not in {f.sentence for f in facts}
        assert sum(f.answer == asked.answer for f in facts) == 1  # the question has one right answer
        words = set(re.findall(r"\w+", asked.sentence)) - set(re.findall(r"\w+", asked.answer))
        near += any(len(words & set(re.findall(r"\w+", f.sentence))) >= len(words) - 2 for f in facts if f is not asked)
    assert near > 100  # most families hold a distractor that differs from the asked fact in a detail or two


def test_insert_at_sentences_keeps_text_sentences_whole():
    rng = random.Random(0)
    text = "One. Two words here! Three? Four."
    out = insert_at_sentences(text, ["Alpha beta.", "Gamma."], rng)
    assert "Alpha beta." in out and "Gamma." in out
    rest = out.replace("Alpha beta. ", "").replace("Gamma. ", "")
    assert rest == text


def test_questions_do_not_give_the_answer_away():
    rng = random.Random(1)
    for _ in range(300):
        _, fact = rng.choice(SHAPES)(rng)
        for q in fact.questions:
            assert fact.answer not in q


def test_codebase_example_names_the_defining_file(loaded, tmp_path):
    files = {"pkg/alpha.py": "RETRY_LIMIT = 7\n\ndef fetch_rows(table):\n    return table\n",
             "pkg/beta.py": "class LedgerBook:\n    pass\n\n\ndef merge_pages(a, b):\n    return a + b\n",
             "gamma.py": "TIMEOUT_SECONDS = 30\n"}
    for rel, body in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(body)
    code = read_python_files(tmp_path)
    assert [p for p, _ in code] == ["gamma.py", "pkg/alpha.py", "pkg/beta.py"]
    s = sampler(loaded, code=code, code_rate=1.0)
    tok = loaded.tokenizer
    seen = set()
    for _ in range(20):
        ex = s.sample()
        text = tok.decode(ex.ids)
        if "<codebase>" not in text:
            continue
        answer = tok.decode(targets(ex, loaded)).removesuffix("<|im_end|>")
        name = re.search(r"`(\w+)`", answer).group(1)
        path = answer.rstrip(".").rsplit(" in ", 1)[1]
        assert f"===== {path} =====" in text and name in files[path]
        assert sum(name in body for body in files.values()) == 1
        seen.add(name)
    assert len(seen) >= 3


def test_many_shapes_each_with_templates_and_distinct_paraphrases():
    assert len(SHAPES) >= 40
    for shape in SHAPES:
        assert 2 <= len(shape.facts) <= 3 and 4 <= len(shape.questions) <= 6
        assert len(set(shape.questions)) == len(shape.questions) and len(set(shape.facts)) == len(shape.facts)


def test_every_shape_answer_is_a_span_of_every_fact_template():
    rng = random.Random(4)
    for shape in SHAPES:
        sentences = set()
        for _ in range(60):
            _, fact = shape(rng)
            assert fact.answer in fact.sentence, fact
            assert len(set(fact.questions)) == len(fact.questions), fact
            for text in (fact.sentence, *fact.questions):  # "a" before a vowel: a word list needs "an"
                assert not re.search(r"\b[Aa] [aeiouAEIOU]", text), text
            sentences.add(fact.sentence.replace(fact.answer, "@"))
        assert len(sentences) >= len(shape.facts)  # every template is drawn


def test_subjects_mix_natural_descriptions_and_names():
    rng = random.Random(6)
    people = [s for _ in range(500) for s in rng.choice(SHAPES)(rng)[0] if isinstance(s, Who)]
    assert sum(p.name.startswith("the ") for p in people) > len(people) // 4
    assert sum(p.short != p.name for p in people) > len(people) // 10  # titled names, asked as "Captain Vane"
    titled = Who(2, ("Captain", "Ilse", "Vane"))
    assert titled == Who(2, ("Captain", "Piet", "Vane")) and titled != Who(2, ("Captain", "Ilse", "Rook"))


def test_made_up_names_are_not_rude():
    rng = random.Random(9)
    names = " ".join(made_up_name(rng) for _ in range(20000)).lower()
    assert not any(word in names for word in ("fuck", "cunt", "shit", "cock", "dick"))


def test_no_sampled_fact_touches_an_eval_answer():
    rng = random.Random(7)
    answers = [a for n in load_needles() for a in n.answers]  # from the needles, not the code under test
    facts = []
    while len(facts) < 2000:
        written, _, missing = fact_family(rng, rng.randint(1, 8))
        facts += written + [missing]
    assert not [f.sentence for f in facts if is_correct(f.sentence, answers)]


def test_not_said_share_is_the_configured_rate_and_missing_subjects_vary():
    rng = random.Random(8)
    families = [fact_family(rng, rng.randint(1, 8)) for _ in range(3000)]
    answers = Counter(question_turn(rng, asked, missing, 0.04)[1] == NOT_SAID for _, asked, missing in families)
    assert 0.03 <= answers[True] / len(families) <= 0.05
    # the missing fact is sometimes about a subject like the asked one, sometimes a different kind of fact
    same_kind = sum(missing.questions[0].split()[:2] == asked.questions[0].split()[:2] for _, asked, missing in families)
    assert 0.3 * len(families) < same_kind < 0.8 * len(families)
    assert inspect.signature(QASampler).parameters["not_said_rate"].default == 0.04
