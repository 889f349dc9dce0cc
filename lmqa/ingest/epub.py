"""EPUB books: one segment per spine document, in reading order."""

from __future__ import annotations

import posixpath
from pathlib import Path
from urllib.parse import unquote

import ebooklib
from ebooklib import epub
from lxml.etree import LxmlError

from .document import Document, DocumentBuilder, IngestError
from .html_text import html_to_text


def read_epub(path: Path) -> Document:
    try:
        book = epub.read_epub(str(path))
    except Exception as exc:  # ebooklib surfaces zip, XML and its own errors alike
        raise IngestError(f"{path}: not a readable EPUB ({type(exc).__name__}: {exc})") from None
    titles = _toc_titles(book.toc)
    builder = DocumentBuilder(str(path))
    for idref, _linear in book.spine:
        item = book.get_item_with_id(idref)
        if item is None or item.get_type() != ebooklib.ITEM_DOCUMENT:
            continue
        try:
            text = html_to_text(item.get_content())
        except LxmlError as exc:  # a damaged chapter should not cost the rest of the book
            builder.document.warnings.append(f"{path}: chapter {item.get_name()} could not be parsed ({exc})")
            continue
        if not text:
            builder.document.skipped.add("no text", item.get_name())
            continue
        title = _title(item.get_name(), titles) or text.split("\n", 1)[0][:80]
        builder.add(title, "chapter", text, header=True)
    if not builder.document.segments:
        raise IngestError(f"{path}: the EPUB has no chapter with text")
    return builder.build()


def _title(name: str, titles: dict[str, str]) -> str | None:
    """TOC hrefs are relative to the TOC file, item names to the package file;
    when those folders differ only the base name still matches."""
    if name in titles:
        return titles[name]
    base = posixpath.basename(name)
    return next((title for href, title in titles.items() if posixpath.basename(href) == base), None)


def _toc_titles(toc) -> dict[str, str]:
    """File name -> the first table-of-contents title pointing into it.

    The TOC holds the titles readers see; a chapter's first line is only the
    fallback for books whose TOC does not name it.
    """
    titles: dict[str, str] = {}
    stack = list(reversed(toc))
    while stack:
        entry = stack.pop()
        if isinstance(entry, tuple):  # (Section, [children])
            section, children = entry
            stack.extend(reversed([section, *children]))
            continue
        href = getattr(entry, "href", None)
        if href and entry.title:
            titles.setdefault(unquote(href.split("#", 1)[0]), entry.title.strip())
    return titles
