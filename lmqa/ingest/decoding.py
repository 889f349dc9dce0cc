"""Bytes to text: the one place that decides what counts as text.

UTF-8 is assumed because it is what nearly all books and code are stored in
(UTF-16 only when a BOM says so). A file whose non-ASCII bytes contain no
valid UTF-8 sequence at all is in an 8-bit legacy encoding, almost always
Latin-1 or its Windows superset (old Project Gutenberg books, Windows
files): it is read as Windows-1252 (Latin-1 for its five unassigned bytes)
with a note. Anything else that is not valid UTF-8 is UTF-8 with damage:
decoded with U+FFFD replacement and reported instead of guessed at, so the
user knows the model saw damaged text.
"""

from __future__ import annotations

import codecs

SNIFF_BYTES = 8192
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_CONTROL = {chr(c) for c in range(32)} - set("\t\n\r\f\v\x1b")


def decode(raw: bytes, name: str, warnings: list[str], legacy: bool = True) -> str:
    """Text with a BOM dropped and newlines made "\\n", so line numbers mean
    the same whatever system wrote the file. UTF-16 is honoured only with a
    BOM, as Windows editors write it; without one it cannot be told apart.
    legacy=False: never read as Latin-1 (for text that was UTF-8 already)."""
    utf16 = raw.startswith(_UTF16_BOMS)
    encoding = "utf-16" if utf16 else "utf-8-sig"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        text = raw.decode(encoding, errors="replace")
        if legacy and not utf16 and all(c == "\ufffd" for c in text if ord(c) > 127):
            warnings.append(f"{name}: not UTF-8; read as Latin-1 (Windows-1252)")
            text = _cp1252(raw)
        else:
            bad = text.count("\ufffd") - raw.decode(encoding, errors="ignore").count("\ufffd")
            warnings.append(f"{name}: not valid {'UTF-16' if utf16 else 'UTF-8'}; "
                            f"{bad} undecodable byte sequence(s) replaced with U+FFFD")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _cp1252(raw: bytes) -> str:
    """Windows-1252, with Latin-1 for the five bytes it leaves unassigned."""
    return raw.decode("latin-1").translate(_CP1252)


_CP1252 = {b: bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in range(0x80, 0xA0)}


def looks_binary(raw: bytes) -> bool:
    """Git's rule (a NUL byte near the start), widened to bytes that are mostly
    undecodable or control characters, which is what images and archives
    without a NUL in their first bytes look like."""
    if raw.startswith(_UTF16_BOMS):
        return False
    head = raw[:SNIFF_BYTES]
    if b"\0" in head:
        return True
    sample = head.decode("utf-8", errors="replace")
    junk = sum(1 for c in sample if c == "\ufffd" or c in _CONTROL)
    return junk > 0.3 * max(len(sample), 1)
