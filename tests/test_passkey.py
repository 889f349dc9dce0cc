"""lmqa/evaluation/passkey.py: the answer parser and the prompt builder's length and depth."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from lmqa.evaluation.passkey import first_integer, make_case
from lmqa.qa.prompts import template


@pytest.mark.parametrize("text, want", [
    ("12345", 12345),
    (" 40917. Remember it.", 40917),  # what a model typically writes after "The pass key is"
    ("The pass key is 7 and then 12", 7),  # the first number, whole
    ("key: -42", 42),  # keys are positive: a sign is not part of the number
    ("007", 7),
    ("\n\n 3141592653589793", 3141592653589793),
    ("no digits here", None),
    ("", None),
])
def test_first_integer(text, want):
    assert first_integer(text) == want


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.mark.parametrize("length", [120, 500, 3000])
def test_make_case_length(tok, length):
    """n_tokens is the prompt's true token count, within one filler sentence of length."""
    per_filler = len(tok(template("passkey_filler")).input_ids)
    case = make_case(tok, length, random.Random(length))
    assert case.n_tokens == len(tok(case.prompt).input_ids)
    assert abs(case.n_tokens - length) <= per_filler / 2 + 2, (case.n_tokens, length)
    assert case.prompt.count(f"The pass key is {case.key}.") == 1 and 1 <= case.key <= 50000


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_make_case_depth(tok, depth):
    """The key sits after round(depth * fillers) of the filler sentences."""
    filler = template("passkey_filler")
    case = make_case(tok, 2000, random.Random(0), depth)
    before, _, after = case.prompt.partition(f"The pass key is {case.key}.")
    n_before, n_after = before.count(filler), after.count(filler)
    assert n_before + n_after > 30
    assert case.depth == depth
    assert abs(n_before / (n_before + n_after) - depth) <= 1 / (n_before + n_after)


def test_make_case_is_seeded_and_random_depth_is_recorded(tok):
    a, b = make_case(tok, 400, random.Random(3)), make_case(tok, 400, random.Random(3))
    assert a == b and 0.0 <= a.depth <= 1.0
    assert make_case(tok, 400, random.Random(4)).key != a.key
