"""Project Gutenberg's header and licence, cut from a book before it is read.

Most public-domain books people try come from Project Gutenberg, whose files
wrap the book in a header (title, credits) and a ~350-line licence. Left in,
the licence sits right before the question, where recency and its fluent,
predictable sentences win both the answer and the evidence. The book itself
lies between the "*** START OF ..." and "*** END OF ..." marker lines (an
"End of [the] Project Gutenberg ..." line just before the end marker is the
licence's too).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_START = re.compile(r"^\*{3} ?START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^\*{3} ?END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.IGNORECASE | re.MULTILINE)
_END_LINE = re.compile(r"^End of (?:the )?Project Gutenberg.*$", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Trimmed:
    """The book's text and where it starts: first_line is the 1-based line
    of the original file that body's first line is, so file:line stays true.
    dropped: what was cut, for the ingest line (empty when nothing was)."""

    body: str
    first_line: int
    dropped: str


def strip_gutenberg(text: str) -> Trimmed:
    """The text between Project Gutenberg's start and end markers; the text
    unchanged when it has no start marker (not a Gutenberg file)."""
    start = _START.search(text)
    if start is None:
        return Trimmed(text, 1, "")
    begin = start.end() + 1  # the line after the marker
    end_marker = _END.search(text, begin)
    end = len(text) if end_marker is None else end_marker.start()
    closing = None
    for closing in _END_LINE.finditer(text, begin, end):
        pass  # the last one before the end marker
    if closing is not None and text.count("\n", closing.start(), end) <= 4:  # its title may wrap
        end = closing.start()
    header_lines = text.count("\n", 0, begin)
    tail_lines = text.count("\n", end) + (not text.endswith("\n"))
    dropped = f"Project Gutenberg header ({header_lines:,} lines) and licence ({tail_lines:,} lines)"
    return Trimmed(text[begin:end], header_lines + 1, dropped)
