"""Questions that ask for several things, answered with several quotes.

A quoting answer is one sentence of the document, so "What are all the
special magic numbers for X?" or "Name the three ships" could only ever be
answered with one of the items. A list question is answered instead with up
to `count` quotes, one per item (each with its own evidence): the best
candidates by the same score as single answers (the fused rank score of
answer_search.py), best first, while they keep LIST_SHARE of the best one's
score, distinct and not part of one another. A plural question that wants
one thing ("Which weapons were used in the duel?") then still gets one quote
unless a second one ranks nearly as well.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

LIST_MAX = 5  # quotes for a list question that does not say how many it wants
LIST_SHARE = 0.75  # an item's score must be at least this share of the best one's
_NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "both": 2}
_COUNT = re.compile(r"\b(two|three|four|five|six|both|[2-6])\b", re.IGNORECASE)
_LIST = re.compile(
    r"\b(list|name (all|every|each|the)|all (the|of the)|what are (all )?the|which \w+ (are|were)|"
    r"every|each of|both|enumerate|values|find all|all \w+s)\b|\b(two|three|four|five|six|[2-6]) \w+s\b",
    re.IGNORECASE)


def requested_items(question: str) -> int:
    """How many quotes the question asks for: 1 for an ordinary question, the
    number it names, or LIST_MAX for a list of unstated length."""
    if not _LIST.search(question):
        return 1
    count = _COUNT.search(question)
    if count is None:
        return LIST_MAX
    word = count.group(1).lower()
    return _NUMBERS.get(word) or int(word)


def pick_items(texts: Sequence[str], scores: Sequence[float], count: int, share: float = LIST_SHARE) -> list[int]:
    """Indices of up to count options, best score first: each scoring at
    least share of the best (a positive score), non-empty, and neither inside
    nor around one already taken."""
    order = sorted(range(len(texts)), key=lambda i: -scores[i])
    taken: list[int] = []
    for i in order:
        if len(taken) == count or (taken and scores[i] < share * scores[order[0]]) or (taken and scores[i] <= 0):
            break
        text = texts[i].strip()
        if text and not any(text in texts[j] or texts[j] in text for j in taken):
            taken.append(i)
    return taken or order[:1]
