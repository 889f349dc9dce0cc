"""The ingested document: one string to tokenize, plus where each part came from.

Everything downstream (tokenizing, the landmark engine, the source map) works on
Document.text; segments keep the way back to files, chapters and pages so a
retrieved block can be shown as "src/app.py:40-52" instead of a token range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SegmentKind = Literal["file", "chapter", "page"]


class IngestError(Exception):
    """Input that cannot become a document; the message is one line meant for the user."""


@dataclass(frozen=True)
class Segment:
    """One file, chapter or page inside Document.text.

    [char_start, char_end) covers the source's own text only; headers the
    builder writes between segments lie outside every segment, so line numbers
    counted from char_start are the source's line numbers.
    """

    title: str
    kind: SegmentKind
    char_start: int
    char_end: int
    line_start: int = 1


@dataclass
class SkipReport:
    """What a directory walk left out, by reason, so the user can tell a
    deliberate skip from a missing file."""

    by_reason: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, path: str) -> None:
        self.by_reason.setdefault(reason, []).append(path)

    @property
    def total(self) -> int:
        return sum(len(paths) for paths in self.by_reason.values())

    def lines(self, examples: int = 3) -> list[str]:
        """One line per reason: the count, then up to `examples` paths."""
        out = []
        for reason, paths in sorted(self.by_reason.items()):
            line = f"{reason}: {len(paths)}"
            if examples:
                line += f" ({', '.join(paths[:examples])}{', …' if len(paths) > examples else ''})"
            out.append(line)
        return out


@dataclass
class Document:
    source: str
    text: str
    segments: list[Segment]
    skipped: SkipReport = field(default_factory=SkipReport)
    warnings: list[str] = field(default_factory=list)
    symbols: Any = None  # codebases: their lmqa.code.symbols.SymbolIndex, built at ingest
    dropped: list[str] = field(default_factory=list)  # text cut on purpose (boilerplate.py), for the ingest line


class DocumentBuilder:
    """Appends sources to one text and records their segments as it goes,
    so offsets are right by construction rather than recomputed later."""

    def __init__(self, source: str):
        self.document = Document(source=source, text="", segments=[])
        self._parts: list[str] = []
        self._length = 0

    def add(self, title: str, kind: SegmentKind, body: str, header: bool, line_start: int = 1) -> None:
        """header: write "===== title =====" before the body, for documents with
        more than one part, so the model itself can see where a part begins."""
        if self._parts:
            self._write("\n")
        if header:
            self._write(f"===== {title} =====\n")
        if not body.endswith("\n"):
            body += "\n"
        start = self._length
        self._write(body)
        self.document.segments.append(Segment(title, kind, start, self._length, line_start))

    def build(self) -> Document:
        self.document.text = "".join(self._parts)
        return self.document

    def _write(self, text: str) -> None:
        self._parts.append(text)
        self._length += len(text)
