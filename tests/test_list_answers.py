"""List questions: how many quotes a question asks for, and which candidates make the list."""

from __future__ import annotations

import pytest

from lmqa.qa.list_answers import LIST_MAX, pick_items, requested_items


@pytest.mark.parametrize("question,count", [
    ("What was the name of the cat?", 1),
    ("Who is Tom's half-brother?", 1),
    ("What are all the special magic numbers for quiet-lake mentioned in the provided text?", LIST_MAX),
    ("Name the three ships of the fleet.", 3),
    ("List the 2 towns the army burned.", 2),
    ("Which animals were at the tea party?", LIST_MAX),
    ("What are both of the keys?", 2),
])
def test_requested_items(question, count):
    assert requested_items(question) == count


def test_items_are_the_best_distinct_candidates_near_the_best():
    texts = ["One number is 12.", "One number is 12", "Another number is 40.", "The sky is blue.", "A third is 7."]
    scores = [9.0, 10.0, 8.0, 2.0, 6.0]
    # "One number is 12" (best) covers "One number is 12."; the sky scores under half the best
    assert pick_items(texts, scores, 4, share=0.5) == [1, 2, 4]
    assert pick_items(texts, scores, 2, share=0.5) == [1, 2]
    assert pick_items(texts, scores, 4, share=0.9) == [1]
    assert pick_items(texts, [-1.0, -2.0, -0.5, -3.0, -4.0], 4) == [2]  # nothing the question lifts: one answer


def test_an_empty_best_still_answers():
    assert pick_items(["", ""], [1.0, 2.0], 3) == [1]
