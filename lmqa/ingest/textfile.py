"""Plain-text sources: a .txt/.md/.rst file or standard input, one segment each."""

from __future__ import annotations

import sys
from pathlib import Path

from .decoding import decode, looks_binary
from .document import Document, DocumentBuilder, IngestError

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
STDIN = "-"


def read_text_file(path: Path) -> Document:
    return _document(str(path), path.name, path.read_bytes())


def read_stdin() -> Document:
    """Bytes, not text, so a non-UTF-8 pipe gets the same replacement and
    warning as a file instead of a decoding crash."""
    if sys.stdin is None:
        raise IngestError(f"{STDIN}: there is no standard input to read")
    raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
    return _document(STDIN, "<stdin>", raw)


def _document(source: str, title: str, raw: bytes) -> Document:
    if looks_binary(raw):
        raise IngestError(f"{source}: looks like a binary file, not text")
    builder = DocumentBuilder(source)
    text = decode(raw, title, builder.document.warnings)
    if not text.strip():
        raise IngestError(f"{source}: the document is empty")
    builder.add(title, "file", text, header=False)
    return builder.build()
