"""Sentences of a text: the spans a quoting answer is made of.

The shipped model answers with the sentence of the document that holds the
fact (lmqa/train/qa_data.py), so whole sentences are the natural candidate
answers (answer_search.py). A sentence ends at . ! or ? (closing quotes and
brackets included) before whitespace and a capital, or at a blank line;
"Mr. Darcy" aside, that is where a new sentence may start.
"""

from __future__ import annotations

import re

SENTENCE_END = re.compile(r"[.!?][\"'’”)\]]*\s+(?=[\"'“‘(]?[A-Z])")
_BREAK = re.compile(f"{SENTENCE_END.pattern}|\\n\\s*\\n")
LOOK_BACK = 2000  # characters searched for the start of a sentence that overlaps a span


def sentences_around(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Character spans (start, end) of the sentences of text that overlap
    [start, end), whitespace stripped, in order. A sentence that began more
    than LOOK_BACK characters before start is cut there."""
    lo = max(start - LOOK_BACK, 0)
    cuts = [lo] + [m.end() for m in _BREAK.finditer(text, lo, start + 8) if lo < m.end() <= start]  # 8: lookahead
    bounds = [cuts[-1]]  # sentence starts, from the one at or before start to the first at or after end
    for m in _BREAK.finditer(text, bounds[0]):
        bounds.append(m.end())
        if m.end() >= end:
            break
    else:
        bounds.append(len(text))
    out = []
    for a, b in zip(bounds, bounds[1:]):
        piece = text[a:b]
        a, b = a + len(piece) - len(piece.lstrip()), a + len(piece.rstrip())
        if a < b and a < end and b > start:
            out.append((a, b))
    return out


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Every sentence of text, as sentences_around() cuts them."""
    return sentences_around(text, 0, len(text))
