"""Project Gutenberg's header and licence are cut on ingest, lines stay true."""

from __future__ import annotations

import pytest

from lmqa.ingest import IngestError, ingest
from lmqa.ingest.boilerplate import strip_gutenberg

BOOK = "\n".join([
    "The Project Gutenberg EBook of Pimento, by A. Writer",
    "",
    "This eBook is for the use of anyone anywhere at no cost.",
    "*** START OF THIS PROJECT GUTENBERG EBOOK PIMENTO ***",
    "",
    "CHAPTER I",
    "The lighthouse keeper had a cat.",
    "",
    "End of the Project Gutenberg EBook of Pimento, by",
    "A. Writer",
    "",
    "*** END OF THIS PROJECT GUTENBERG EBOOK PIMENTO ***",
    "",
    "Section 1. General Terms of Use and Redistributing Project Gutenberg-tm",
    "To donate, please visit: http://pglaf.org/donate",
]) + "\n"


def test_the_book_between_the_markers_with_its_first_line():
    trimmed = strip_gutenberg(BOOK)
    assert trimmed.body == "\nCHAPTER I\nThe lighthouse keeper had a cat.\n\n"
    assert trimmed.first_line == 5
    assert "header (4 lines)" in trimmed.dropped and "licence (7 lines)" in trimmed.dropped


def test_other_marker_spellings():
    text = "head\n***START OF THE PROJECT GUTENBERG EBOOK JANE EYRE***\nReader, I married him.\n" \
           "***END OF THE PROJECT GUTENBERG EBOOK JANE EYRE***\nlicence\n"
    assert strip_gutenberg(text).body == "Reader, I married him.\n"


def test_text_without_markers_is_unchanged():
    trimmed = strip_gutenberg("Just a text.\nEnd of Project Gutenberg, a sentence in a book.\n")
    assert (trimmed.body, trimmed.first_line, trimmed.dropped) == (
        "Just a text.\nEnd of Project Gutenberg, a sentence in a book.\n", 1, "")


def test_ingest_cuts_it_and_lines_point_into_the_file(tmp_path):
    path = tmp_path / "pimento.txt"
    path.write_text(BOOK)
    document = ingest(path)
    assert "pglaf" not in document.text and "START OF" not in document.text
    assert "The lighthouse keeper had a cat." in document.text
    assert document.dropped and document.segments[0].line_start == 5
    lines = BOOK.splitlines()
    at = document.text.splitlines().index("CHAPTER I")
    assert lines[document.segments[0].line_start - 1 + at] == "CHAPTER I"
    kept = ingest(path, keep_boilerplate=True)
    assert kept.text == BOOK and not kept.dropped


def test_only_boilerplate_is_an_error(tmp_path):
    path = tmp_path / "empty-book.txt"
    path.write_text("*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\n")
    with pytest.raises(IngestError, match="no book between"):
        ingest(path)
