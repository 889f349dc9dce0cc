"""XHTML (EPUB chapters) to plain text, one paragraph per line.

lxml's text_content() alone runs paragraphs together and keeps source
indentation; the model reads better, and line numbers mean "paragraph n",
when block elements end lines and inline whitespace is collapsed as a browser
would. <pre> keeps its lines and indentation, since books about code rely on it.
"""

from __future__ import annotations

import re

import lxml.html

_BLOCK_TAGS = {
    "address", "article", "aside", "blockquote", "br", "caption", "dd", "div", "dl", "dt", "figcaption",
    "figure", "footer", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "nav", "ol", "p", "pre",
    "section", "table", "td", "th", "tr", "ul",
}
_DROP_TAGS = {"script", "style", "head", "title"}
_SPACE = re.compile(r"\s+")
_BREAK = None


def html_to_text(markup: bytes) -> str:
    pieces: list[tuple[str, bool] | None] = []
    _walk(lxml.html.document_fromstring(markup), pieces, in_pre=False)
    lines: list[str] = []
    run: list[tuple[str, bool]] = []
    for piece in pieces + [_BREAK]:
        if piece is not _BREAK:
            run.append(piece)
            continue
        text = "".join(t for t, _ in run)
        if run and all(pre for _, pre in run):
            lines.extend(line.rstrip() for line in text.strip("\n").split("\n"))
        elif text.strip():
            lines.append(_SPACE.sub(" ", text).strip())
        run = []
    return "\n".join(lines)


def _walk(el, pieces: list[tuple[str, bool] | None], in_pre: bool) -> None:
    """Text in document order, with a break around every block element.

    in_pre: whether el's parent is (inside) a <pre>, which is what el's tail is in.
    """
    tag = el.tag if isinstance(el.tag, str) else ""  # comments and processing instructions have no text to show
    if tag and tag not in _DROP_TAGS:
        inner_pre = in_pre or tag == "pre"
        block = tag in _BLOCK_TAGS
        if block:
            pieces.append(_BREAK)
        if el.text:
            pieces.append((el.text, inner_pre))
        for child in el:
            _walk(child, pieces, inner_pre)
        if block:
            pieces.append(_BREAK)
    if el.tail:
        pieces.append((el.tail, in_pre))
