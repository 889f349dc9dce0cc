"""Plain-text sources: a .txt/.md/.rst file or standard input, one segment each."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .decoding import SNIFF_BYTES, decode, looks_binary
from .document import Document, DocumentBuilder, IngestError

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
STDIN = "-"
MAX_TEXT_BYTES = 1 << 30  # ~250 million tokens: days of prefill on a CPU, terabytes of keys and values


def read_text_file(path: Path) -> Document:
    """The file's head is sniffed before the rest is read, so a huge binary
    (or sparse) file is refused at once instead of read whole."""
    with open(path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
        if looks_binary(head):
            raise IngestError(f"{path}: looks like a binary file, not text")
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_TEXT_BYTES:
            raise IngestError(f"{path}: {size / (1 << 30):.1f} GiB is over the limit of {MAX_TEXT_BYTES >> 30} GiB "
                              f"of text per file; split it, or ask about a part")
        return _document(str(path), path.name, head + fh.read())


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
