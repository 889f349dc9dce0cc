"""Sentences as candidate answers: the spans around a block, and the
proposals a session reads for a question (the sentences of the blocks its
question attended to most)."""

from __future__ import annotations

import pytest
import torch

from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.ingest import ingest
from lmqa.model.loading import load_model
from lmqa.qa.evidence import TokenMass
from lmqa.qa.quote import normalize
from lmqa.qa.sentences import sentences_around
from lmqa.qa.session import DocumentSession

TEXT = 'Hello there. Mr. Darcy came! "Yes," she said.\n\nChapter 2\n\nIt was late. The end'


@pytest.mark.parametrize("span,want", [
    ((0, 5), ["Hello there."]),
    ((14, 20), ["Mr.", "Darcy came!"]),  # "Mr." ends a sentence: the rule's known blind spot
    ((30, 60), ['"Yes," she said.', "Chapter 2", "It was late."]),  # a blank line ends one too
    ((0, len(TEXT)), ["Hello there.", "Mr.", "Darcy came!", '"Yes," she said.', "Chapter 2", "It was late.", "The end"]),
    ((len(TEXT) - 2, len(TEXT)), ["The end"]),
])
def test_sentences_around(span, want):
    assert [TEXT[a:b] for a, b in sentences_around(TEXT, *span)] == want


def test_a_sentence_longer_than_the_look_back_is_cut():
    text = "Start. " + "word " * 1000 + "end."
    (a, b), = sentences_around(text, 4000, 4005)
    assert b == len(text) and 0 < 4000 - a <= 2000 + 1


@pytest.fixture(scope="module")
def session(tiny_model_dir, tmp_path_factory):
    loaded = load_model(str(tiny_model_dir), device="cpu", block_size=8, top_k=4, log=lambda m: None)
    path = tmp_path_factory.mktemp("sentences") / "notes.txt"
    path.write_text(" ".join(f"Sentence number {i} is here." for i in range(40)))
    s = DocumentSession(loaded, LandmarkEngine(loaded.model, loaded.landmark), ingest(path))
    s.prepare()
    return s


def test_proposals_are_the_sentences_of_the_most_attended_blocks(session):
    b, text, tok = session.block_size, session.document.text, session.loaded.tokenizer
    first = -(-session.doc_token_start // b)
    mass = torch.zeros((first + 20) * b, dtype=torch.float64)
    mass[(first + 9) * b + 2] = 5.0  # the most attended block first
    mass[(first + 3) * b + 1] = 2.0
    mass[: session.doc_token_start] = 100.0  # the prompt's head is no document
    got = [tok.decode(ids) for ids in session.proposals(TokenMass(mass, rows=1), blocks=6)]
    want = []
    for block in (first + 9, first + 3):  # only blocks with mass, most first
        src = session.sources[block]
        want += [normalize(text[a:c]) for a, c in sentences_around(text, src.char_start, src.char_end)]
    assert got == list(dict.fromkeys(want)) and got
    src = session.sources[first + 9]
    one = [normalize(text[a:c]) for a, c in sentences_around(text, src.char_start, src.char_end)]
    assert [tok.decode(ids) for ids in session.proposals(TokenMass(mass, rows=1), blocks=1)] == one
