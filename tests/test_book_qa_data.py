"""Book QA training data (lmqa/train/book_qa_data.py): questions about facts a
book's own sentences state, answered by those sentences verbatim, asked in
other words; list answers; RULER-shaped needles; Gutenberg boilerplate that
never holds an answer; held-out books and standard-library packages never
used."""

from __future__ import annotations

import random

import pytest
import torch

from lmqa.model.loading import load_model
from lmqa.qa.session import QAPrompt
from lmqa.train.book_qa_data import (LIST_SEPARATOR, MAX_OVERLAP, BookQA, book_slug, overlap, split_documents,
                                     training_books)
from lmqa.train.data import ExampleSampler, held_out, landmark_batch
from lmqa.train.qa_data import QASampler, read_python_files

FACTS = ["Martha Quill, the old ferryman, rowed the last boat across before the storm.",
         "Tobias Wren was a clergyman, and he kept bees behind the chapel.",
         "Ada Lowe, Tobias Wren's sister, laughed at the weather.",
         "Silas Penn married Ada Lowe in the spring.",
         "Silas Penn lived at Greyford Mill with two dogs.",
         "Tobias Wren was forty years old.",
         "Martha Quill kept the ledger of the ferry. She was born at Ashcombe, under the hill.",
         "Hester Vane had grey eyes and a quiet voice."]
FILLER = ["The rain came down on the roofs of the town and on {n} as well.",
          "Nobody in the village spoke to {n} about the river that week.",
          "In the evening the lamps were lit, and {n} walked down to the quay.",
          "It was a long winter, and {n} said little of it."]
NAMES = ["Martha Quill", "Tobias Wren", "Ada Lowe", "Silas Penn", "Hester Vane"]
LICENCE = ("End of the Project Gutenberg EBook of {t}\n\nSection 1. General Terms of Use of Project Gutenberg-tm "
           "electronic works. To donate, please visit: http://pglaf.org/donate. Redistribution is subject to the "
           "trademark license.\n") * 12


def gutenberg_book(title: str, seed: int) -> str:
    """A made-up book with a Project Gutenberg header and licence, each fact once."""
    rng = random.Random(seed)
    body = [rng.choice(FILLER).format(n=rng.choice(NAMES)) for _ in range(360)]
    for i, fact in enumerate(FACTS):
        body.insert(3 + i * 50 + rng.randrange(4), fact)
    paragraphs = "\n\n".join(" ".join(body[i:i + 6]) for i in range(0, len(body), 6))
    return (f"The Project Gutenberg EBook of {title}, by Nobody\n\nTitle: {title}\n\n"
            f"*** START OF THIS PROJECT GUTENBERG EBOOK {title.upper()} ***\n\n\n{paragraphs}\n\n"
            f"*** END OF THIS PROJECT GUTENBERG EBOOK {title.upper()} ***\n\n" + LICENCE.format(t=title))


BOOK = gutenberg_book("The Quiet Harbour", 0)


def draws(seed: int, n: int, ruler_rate: float = 0.3, boilerplate_rate: float = 0.3, budget: int = 900):
    qa = BookQA(training_books([BOOK], set()), lambda text: len(text) // 4, ruler_rate, boilerplate_rate)
    rng = random.Random(seed)
    return [qa.draw(rng, lambda question, answer: budget) for _ in range(n)]


def test_answers_are_the_books_sentences_verbatim_in_the_window():
    body = BOOK[BOOK.index("*** START"):BOOK.index("*** END")]
    for d in draws(0, 120):
        assert len(d.document) // 4 <= 900
        assert d.quotes and d.answer == LIST_SEPARATOR.join(d.quotes)
        for quote in d.quotes:
            assert quote in d.document  # the answer quotes the document
            if "special magic" not in quote:
                assert quote in body  # a sentence of the book, never of its header or licence


def test_questions_do_not_copy_the_answer_sentence():
    facts = [d for d in draws(1, 120, ruler_rate=0.0)]
    assert len({d.question for d in facts}) > 20
    for d in facts:
        assert overlap(d.question, d.answer) < MAX_OVERLAP, (d.question, d.answer)
        assert d.question.lower().rstrip("?") not in d.answer.lower()


def test_fact_kinds_two_sentence_answers_lists_and_boilerplate_occur():
    got = draws(2, 200)
    questions = " ".join(d.question for d in got)
    assert any("Whose" in d.question or "married" in d.question or "spouse" in d.question or "wed" in d.question
               for d in got)  # relations, asked from either side
    # "Martha Quill kept the ledger ... She was born at Ashcombe": a name, then the fact in the next sentence
    assert any(d.answer.startswith("Martha Quill kept") and "Ashcombe" in d.answer for d in got)
    lists = [d for d in got if len(d.quotes) > 1]
    assert lists and all(len(d.answer.split(LIST_SEPARATOR)) == len(d.quotes) for d in lists)
    for d in lists:  # quotes in document order
        assert [d.document.index(q) for q in d.quotes] == sorted(d.document.index(q) for q in d.quotes)
    assert any("Project Gutenberg" in d.document for d in got if "special magic" not in d.answer)
    assert "special magic" in questions


def test_deterministic_under_a_seed():
    assert draws(5, 30) == draws(5, 30)
    assert draws(5, 30) != draws(6, 30)


def test_held_out_books_are_never_used():
    names = {"the-war-of-the-worlds.txt", "treasure-island.txt", "alice-s-adventures-in-wonderland.txt"}
    assert names <= held_out()  # prompts/bookqa_holdout.txt names the evaluation books
    books = [gutenberg_book(t, i) for i, t in enumerate(["Treasure Island", "The War of the Worlds",
                                                          "Alice’s Adventures in Wonderland", "The Quiet Harbour"])]
    assert [book_slug(b) for b in books] == ["treasure-island", "the-war-of-the-worlds",
                                            "alice-s-adventures-in-wonderland", "the-quiet-harbour"]
    kept = training_books(books, held_out())
    assert [b.text for b in kept] == [books[3]]


def test_code_data_skips_held_out_standard_library_packages(tmp_path):
    for path in ["json/__init__.py", "logging/handlers.py", "http/client.py", "argparse.py", "email/parser.py",
                 "jsonish.py"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("X = 1\n")
    assert [p for p, _ in read_python_files(tmp_path)] == ["email/parser.py", "jsonish.py"]


@pytest.fixture(scope="module")
def loaded(chat_model_dir):
    return load_model(str(chat_model_dir), device="cpu", block_size=8, log=lambda m: None)


def test_sampler_renders_book_questions_as_ask_does(loaded):
    """Through QASampler: the ask prompt around a window of the book, loss on
    the answer (the book's sentence, or the list of quotes) only."""
    tok = loaded.tokenizer
    stream = torch.tensor(tok(BOOK, add_special_tokens=False).input_ids + [tok.eos_token_id])
    assert split_documents(stream, tok) == [BOOK]
    base = ExampleSampler(stream, tok, 700, 0.0, 0)
    books = training_books(split_documents(stream, tok), held_out())
    qa = BookQA(books, lambda text: len(tok(text, add_special_tokens=False).input_ids))
    prompts = {kind: QAPrompt(loaded, kind) for kind in ("document", "codebase")}
    sampler = QASampler(base, prompts, 1.0, book_qa=qa, book_rate=1.0)
    prompt = QAPrompt(loaded, "document")
    for _ in range(6):
        ex = sampler.sample()
        assert len(ex.ids) <= sampler.n
        text = tok.decode(ex.ids)
        assert text.startswith(prompt.head)
        document = text[len(prompt.head): text.index("\n</document>")]
        _, labels = landmark_batch([ex], loaded.landmark.block_size, loaded.landmark.landmark_id)
        answer, end = tok.decode([t for t in labels[0].tolist() if t != -100]).split("<|im_end|>")
        assert end == "" and all(quote in document for quote in answer.split(LIST_SEPARATOR))
