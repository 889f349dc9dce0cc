"""Which file/chapter/page and lines each landmark block holds.

The engine retrieves blocks by id; people need "src/app.py:40-52". A block is
b consecutive ordinary tokens of the whole stream, so its origin follows from
the tokenizer's character offsets and the document's segments, with no second
pass over the model.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

from .document import Document, Segment, SegmentKind

SNIPPET_CHARS = 60


@dataclass(frozen=True)
class Location:
    """Lines are 1-based and inclusive, counted in the segment's own source."""

    title: str
    kind: SegmentKind
    line_start: int
    line_end: int

    def __str__(self) -> str:
        lines = str(self.line_start) if self.line_start == self.line_end else f"{self.line_start}-{self.line_end}"
        return f"{self.title}:{lines}"


@dataclass(frozen=True)
class BlockSource:
    """Where block `block` came from.

    [char_start, char_end) runs from its first token's start to its last
    token's end in Document.text: tokenizers that trim offsets leave out the
    leading space of the first token, and nothing else is lost. locations[0]
    is where the block starts; a block that runs on into further files,
    chapters or pages lists those after it, in order.
    """

    block: int
    char_start: int
    char_end: int
    snippet: str
    locations: tuple[Location, ...]

    @property
    def title(self) -> str:
        return self.locations[0].title

    @property
    def line_start(self) -> int:
        return self.locations[0].line_start

    @property
    def line_end(self) -> int:
        return self.locations[0].line_end

    @property
    def also(self) -> tuple[Location, ...]:
        return self.locations[1:]

    def __str__(self) -> str:
        more = f" (also: {', '.join(map(str, self.also))})" if self.also else ""
        return f"{self.locations[0]}{more}"


def tokenize_document(tokenizer, document: Document) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets from one call, so the ids put in the
    context and the offsets behind the source map cannot disagree.
    tokenizer: a Hugging Face fast tokenizer (only those report offsets)."""
    encoded = tokenizer(document.text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(pair) for pair in encoded["offset_mapping"]]


def build_source_map(document: Document, offsets: list[tuple[int, int]], block_size: int,
                     doc_token_start: int = 0) -> list[BlockSource]:
    """One entry per block holding at least one document token, in block order.

    offsets: per document token, as from tokenize_document. doc_token_start:
    ordinary tokens before the document in the same stream (the prompt's
    head); block ids count from the stream's start, as the engine's do, and
    blocks of prompt tokens only get no entry.
    """
    if not offsets:
        return []
    lines = _Lines(document)
    first = doc_token_start // block_size
    last = (doc_token_start + len(offsets) - 1) // block_size
    out = []
    for block in range(first, last + 1):
        lo = max(block * block_size - doc_token_start, 0)
        hi = min((block + 1) * block_size - doc_token_start, len(offsets))
        start, end = offsets[lo][0], offsets[hi - 1][1]
        snippet = " ".join(document.text[start:end].split())
        if len(snippet) > SNIPPET_CHARS:
            snippet = snippet[:SNIPPET_CHARS] + "…"
        out.append(BlockSource(block, start, end, snippet, lines.locate(start, end)))
    return out


class _Lines:
    """Character span -> segments and line numbers, by binary search, so a
    whole book maps in time linear in its newlines and blocks."""

    def __init__(self, document: Document):
        self.segments = document.segments
        self.starts = [s.char_start for s in document.segments]
        self.newlines = [m.start() for m in re.finditer("\n", document.text)]

    def locate(self, start: int, end: int) -> tuple[Location, ...]:
        found = []
        for i in range(max(bisect_right(self.starts, start) - 1, 0), len(self.segments)):
            segment = self.segments[i]
            if segment.char_start >= end:
                break
            if segment.char_end > start:
                found.append(self._location(segment, max(start, segment.char_start), min(end, segment.char_end)))
        if not found:
            # Only header text: name the segment the header introduces.
            segment = self.segments[min(bisect_right(self.starts, start), len(self.segments) - 1)]
            found.append(self._location(segment, segment.char_start, segment.char_start + 1))
        return tuple(found)

    def _location(self, segment: Segment, start: int, end: int) -> Location:
        """Lines of [start, end); a newline belongs to the line it ends. A span
        can be empty when a tokenizer trims a whitespace-only token's offsets."""
        last = max(end - 1, start)
        return Location(segment.title, segment.kind, self._line(segment, start), self._line(segment, last))

    def _line(self, segment: Segment, pos: int) -> int:
        return segment.line_start + bisect_left(self.newlines, pos) - bisect_left(self.newlines, segment.char_start)
