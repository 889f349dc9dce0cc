"""Plain-text sources: a .txt/.md/.rst file or standard input, one segment each."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .boilerplate import strip_gutenberg
from .decoding import SNIFF_BYTES, decode, looks_binary
from .document import Document, DocumentBuilder, IngestError

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
STDIN = "-"
MAX_TEXT_BYTES = 1 << 30  # ~250 million tokens: days of prefill on a CPU, terabytes of keys and values


def read_text_file(path: Path, keep_boilerplate: bool = False) -> Document:
    """The file's head is sniffed before the rest is read, so a huge binary
    (or sparse) file is refused at once instead of read whole.
    keep_boilerplate: keep a Project Gutenberg header and licence (boilerplate.py)."""
    with open(path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
        if looks_binary(head):
            raise IngestError(f"{path}: looks like a binary file, not text")
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_TEXT_BYTES:
            raise IngestError(f"{path}: {size / (1 << 30):.1f} GiB is over the limit of {MAX_TEXT_BYTES >> 30} GiB "
                              f"of text per file; split it, or ask about a part")
        return _document(str(path), path.name, head + fh.read(), keep_boilerplate)


def read_stdin(keep_boilerplate: bool = False) -> Document:
    """Bytes, not text, so a non-UTF-8 pipe gets the same replacement and
    warning as a file instead of a decoding crash."""
    if sys.stdin is None:
        raise IngestError(f"{STDIN}: there is no standard input to read")
    raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
    return _document(STDIN, "<stdin>", raw, keep_boilerplate)


def _document(source: str, title: str, raw: bytes, keep_boilerplate: bool) -> Document:
    if looks_binary(raw):
        raise IngestError(f"{source}: looks like a binary file, not text")
    builder = DocumentBuilder(source)
    text = decode(raw, title, builder.document.warnings)
    if not text.strip():
        raise IngestError(f"{source}: the document is empty")
    trimmed = strip_gutenberg(text)
    if keep_boilerplate or not trimmed.dropped:
        builder.add(title, "file", text, header=False)
    elif not trimmed.body.strip():
        raise IngestError(f"{source}: only Project Gutenberg's header and licence, no book between their markers "
                          f"(--keep-boilerplate reads it anyway)")
    else:
        builder.add(title, "file", trimmed.body, header=False, line_start=trimmed.first_line)
        builder.document.dropped.append(trimmed.dropped)
    return builder.build()
