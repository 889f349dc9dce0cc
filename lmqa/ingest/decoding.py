"""Bytes to text: the one place that decides what counts as text.

UTF-8 is assumed because it is what nearly all books and code are stored in
(UTF-16 only when a BOM says so); anything else is decoded with U+FFFD
replacement and reported instead of guessed at, so the user knows the model
saw damaged text.
"""

from __future__ import annotations

import codecs

SNIFF_BYTES = 8192
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_CONTROL = {chr(c) for c in range(32)} - set("\t\n\r\f\v\x1b")


def decode(raw: bytes, name: str, warnings: list[str]) -> str:
    """Text with a BOM dropped and newlines made "\\n", so line numbers mean
    the same whatever system wrote the file. UTF-16 is honoured only with a
    BOM, as Windows editors write it; without one it cannot be told apart."""
    utf16 = raw.startswith(_UTF16_BOMS)
    encoding = "utf-16" if utf16 else "utf-8-sig"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        text = raw.decode(encoding, errors="replace")
        bad = text.count("\ufffd") - raw.decode(encoding, errors="ignore").count("\ufffd")
        warnings.append(f"{name}: not valid {'UTF-16' if utf16 else 'UTF-8'}; "
                        f"{bad} undecodable byte sequence(s) replaced with U+FFFD")
    return text.replace("\r\n", "\n").replace("\r", "\n")


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
