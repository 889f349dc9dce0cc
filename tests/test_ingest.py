"""Ingestion of text, PDF, EPUB, stdin and directories, on fixtures made here."""

from __future__ import annotations

import io
import os
import sys
import zipfile
from pathlib import Path

import pytest

from lmqa.ingest import IngestError, ingest


def write(root: Path, rel: str, content: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def minimal_pdf(pages: list[list[str]]) -> bytes:
    """A PDF with one Helvetica text line per string; [] makes a blank page."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", "", "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for lines in pages:
        ops = "".join(f"BT /F1 12 Tf 72 {720 - 16 * i} Td ({line}) Tj ET\n" for i, line in enumerate(lines))
        objects.append(f"<< /Length {len(ops)} >>\nstream\n{ops}endstream")
        objects.append("<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                       f"/Resources << /Font << /F1 3 0 R >> >> /Contents {len(objects)} 0 R >>")
        kids.append(len(objects))
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def make_epub(path: Path, chapters: list[tuple[str, str]], toc: list[tuple[str, str]]) -> Path:
    """chapters: (file name, body html) in spine order; toc: (href, title) as
    the table of contents lists them, in its own order."""
    from ebooklib import epub

    book = epub.EpubBook()
    book.set_identifier("lmqa-test")
    book.set_title("Test Book")
    book.set_language("en")
    items = {}
    for name, body in chapters:
        items[name] = epub.EpubHtml(title=name, file_name=name, lang="en", content=body)
        book.add_item(items[name])
    book.toc = [epub.Link(href, title, href) for href, title in toc]
    book.add_item(epub.EpubNcx())
    book.spine = [items[name] for name, _ in chapters]
    epub.write_epub(str(path), book)
    return path


def titles(document) -> list[str]:
    return [segment.title for segment in document.segments]


# ----- single files -----

def test_text_file_is_one_segment_with_its_text(tmp_path):
    content = "# Title\n\nSome *markdown*.\n"
    doc = ingest(write(tmp_path, "notes.md", content))
    assert doc.text == content
    assert [(s.title, s.kind, s.char_start, s.char_end, s.line_start) for s in doc.segments] == \
        [("notes.md", "file", 0, len(content), 1)]
    assert doc.warnings == [] and doc.skipped.total == 0
    assert doc.source == str(tmp_path / "notes.md")


def test_crlf_and_bom_are_normalized(tmp_path):
    doc = ingest(write(tmp_path, "a.rst", b"\xef\xbb\xbfone\r\ntwo\rthree"))
    assert doc.text == "one\ntwo\nthree\n"


def test_utf16_with_a_bom_is_text_not_binary(tmp_path):
    doc = ingest(write(tmp_path, "windows.txt", "\ufeffhello\r\nwörld\r\n".encode("utf-16-le")))
    assert doc.text == "hello\nwörld\n" and doc.warnings == []


def test_latin1_is_read_as_such_and_reported(tmp_path):
    doc = ingest(write(tmp_path, "latin.txt", "café crème \u201cquoted\u201d\n".encode("cp1252")))
    assert doc.text == "café crème \u201cquoted\u201d\n"
    assert doc.warnings == ["latin.txt: not UTF-8; read as Latin-1 (Windows-1252)"]


def test_damaged_utf8_is_replaced_and_reported(tmp_path):
    doc = ingest(write(tmp_path, "damaged.txt", "café crème\n".encode() + b"\xff\xfe\n"))
    assert doc.text == "café crème\n\ufffd\ufffd\n"
    assert len(doc.warnings) == 1 and "damaged.txt" in doc.warnings[0] and "2 " in doc.warnings[0]


def test_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("from a pipe \u00e9\n".encode() + b"\xff\n")))
    doc = ingest("-")
    assert doc.source == "-" and titles(doc) == ["<stdin>"]
    assert doc.text == "from a pipe \u00e9\n\ufffd\n"
    assert len(doc.warnings) == 1


def test_missing_stdin_is_an_ingest_error(monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(IngestError, match="no standard input"):
        ingest("-")


def test_pdf_pages_are_segments_and_blank_pages_are_reported(tmp_path):
    path = write(tmp_path, "paper.pdf", minimal_pdf([["Hello page one", "second line"], [], ["Third page here"]]))
    doc = ingest(path)
    assert titles(doc) == ["page 1", "page 3"]
    assert {s.kind for s in doc.segments} == {"page"}
    first, third = (doc.text[s.char_start:s.char_end] for s in doc.segments)
    assert first.split() == ["Hello", "page", "one", "second", "line"]
    assert third.strip() == "Third page here"
    assert "===== page 3 =====\n" in doc.text
    assert doc.skipped.by_reason == {"no text (scanned or blank page)": ["page 2"]}


def test_epub_chapters_follow_the_spine_and_take_toc_titles(tmp_path):
    path = make_epub(tmp_path / "book.epub", [
        ("intro.xhtml", "<h1>Opening words</h1><p>It was a\n   dark night.</p><script>var x = 1;</script>"),
        ("empty.xhtml", "<div><img src='cover.png'/></div>"),
        ("c1.xhtml", "<h1>One</h1><p>First <b>bold</b> para.<br/>Same para, new line.</p>"
                     "<pre>  code\n    indented</pre>"),
        ("Text/c2.xhtml", "<p>Last words.</p>"),
    ], toc=[("c1.xhtml", "Chapter One"), ("c2.xhtml#start", "Chapter Two")])
    doc = ingest(path)
    # Not in the TOC: titled by its first line.
    # Text/c2.xhtml is named by a TOC href relative to another folder.
    assert titles(doc) == ["Opening words", "Chapter One", "Chapter Two"]
    assert {s.kind for s in doc.segments} == {"chapter"}
    intro, one, _ = (doc.text[s.char_start:s.char_end] for s in doc.segments)
    assert intro == "Opening words\nIt was a dark night.\n"
    assert one == "One\nFirst bold para.\nSame para, new line.\n  code\n    indented\n"
    assert doc.skipped.by_reason == {"no text": ["empty.xhtml"]}


# ----- directories -----

def test_nested_gitignore_and_git_dir(tmp_path):
    for rel in ["a.py", "x.log", "local.txt", "build/out.py", "sub/keep.log", "sub/drop.log", "sub/local.txt",
                "sub/build/y.py", "sub/deeper/z.md", ".git/config", ".git/HEAD"]:
        write(tmp_path, rel, f"content of {rel}\n")
    write(tmp_path, ".gitignore", "*.log\nbuild/\n")
    write(tmp_path, "sub/.gitignore", "!keep.log\nlocal.txt\n")
    doc = ingest(tmp_path)
    assert titles(doc) == [".gitignore", "a.py", "local.txt", "sub/.gitignore", "sub/deeper/z.md", "sub/keep.log"]
    assert sorted(doc.skipped.by_reason["gitignored"]) == ["build/", "sub/build/", "sub/drop.log", "sub/local.txt",
                                                          "x.log"]
    assert ".git/" not in doc.text and "content of .git" not in doc.text


def test_include_and_exclude_use_gitignore_patterns(tmp_path):
    for rel in ["src/app.py", "src/util.py", "src/secret_key.py", "README.md", "tests/test_app.py"]:
        write(tmp_path, rel, f"# {rel}\n")
    doc = ingest(tmp_path, include=["*.py"], exclude=["tests/", "secret_*"])
    assert titles(doc) == ["src/app.py", "src/util.py"]
    assert doc.skipped.by_reason["excluded"] == ["src/secret_key.py", "tests/"]
    assert doc.skipped.by_reason["not included"] == ["README.md"]


def test_binary_huge_generated_and_empty_files_are_skipped_with_a_summary(tmp_path):
    write(tmp_path, "main.py", "print('hi')\n")
    write(tmp_path, "logo.png", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    write(tmp_path, "noise.dat", bytes(range(128, 192)))
    write(tmp_path, "big.txt", "x" * 200 + "\n")
    write(tmp_path, "package-lock.json", '{"lockfileVersion": 3}\n')
    write(tmp_path, "dist/app.min.js", "var a=1;\n")
    write(tmp_path, "api_pb2.py", "# -*- coding: utf-8 -*-\n# Generated by the protocol buffer compiler. DO NOT EDIT!")
    write(tmp_path, "gen.go", "// Code generated by stringer; DO NOT EDIT.\n\npackage main\n")
    write(tmp_path, "mentions.py", "\n" * 10 + "# files marked @generated are skipped\n")
    write(tmp_path, "blank.txt", "  \n\n")
    doc = ingest(tmp_path, max_file_bytes=100)
    assert titles(doc) == ["main.py", "mentions.py"]
    assert doc.skipped.by_reason == {
        "binary": ["logo.png", "noise.dat"],
        "larger than 100 bytes": ["big.txt"],
        "generated": ["api_pb2.py", "dist/app.min.js", "gen.go", "package-lock.json"],
        "empty": ["blank.txt"],
    }
    assert doc.skipped.total == 8
    assert doc.skipped.lines(examples=1) == [
        "binary: 2 (logo.png, …)", "empty: 1 (blank.txt)", "generated: 4 (api_pb2.py, …)",
        "larger than 100 bytes: 1 (big.txt)",
    ]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlinks_are_reported_and_never_followed(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    write(outside, "secret.txt", "TOP SECRET\n")
    write(root, "a.py", "inside\n")
    write(root, ".git/config", "[remote] url = https://token@example.invalid\n")
    (root / "to_secret.txt").symlink_to(outside / "secret.txt")
    (root / "to_outside_dir").symlink_to(outside, target_is_directory=True)
    (root / "alias.py").symlink_to(root / "a.py")
    (root / "git_config.txt").symlink_to(root / ".git" / "config")
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "dangling.txt").symlink_to(root / "missing.txt")
    doc = ingest(root)
    assert "TOP SECRET" not in doc.text and "token@" not in doc.text
    assert titles(doc) == ["a.py"] and doc.text.count("inside\n") == 1
    assert doc.skipped.by_reason == {
        "broken symlink": ["dangling.txt"],
        "symlink outside root": ["to_outside_dir", "to_secret.txt"],
        "symlink inside root (target walked at its own path)": ["alias.py", "git_config.txt", "loop"],
    }


def test_order_is_sorted_by_path_components_and_stable(tmp_path):
    for rel in ["z.txt", "a.txt", "a/b.txt", "B.txt", "a-b.txt", "a/a/c.txt"]:
        write(tmp_path, rel, f"{rel}\n")
    first = ingest(tmp_path)
    assert titles(first) == ["B.txt", "a/a/c.txt", "a/b.txt", "a-b.txt", "a.txt", "z.txt"]
    assert ingest(tmp_path).text == first.text


def test_each_file_is_headed_by_its_path_and_segments_hold_exactly_its_text(tmp_path):
    files = {"one.py": "def f():\n    return 1\n", "pkg/two.md": "no trailing newline"}
    for rel, content in files.items():
        write(tmp_path, rel, content)
    doc = ingest(tmp_path)
    assert doc.text == "===== one.py =====\ndef f():\n    return 1\n\n===== pkg/two.md =====\nno trailing newline\n"
    for segment in doc.segments:
        assert doc.text[segment.char_start:segment.char_end].rstrip("\n") == files[segment.title].rstrip("\n")
        assert doc.text[:segment.char_start].endswith(f"===== {segment.title} =====\n")


def test_non_utf8_file_in_a_codebase_is_kept_with_a_warning(tmp_path):
    write(tmp_path, "old.c", "/* caf\xe9 */\nint x;\n".encode("latin-1"))
    doc = ingest(tmp_path)
    assert titles(doc) == ["old.c"] and "caf\u00e9" in doc.text
    assert len(doc.warnings) == 1 and doc.warnings[0].startswith("old.c:")


# ----- bad input -----

def _zip(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    return path


BAD_INPUTS = {
    "missing": (lambda d: d / "nope.txt", "no such file"),
    "empty file": (lambda d: write(d, "empty.txt", b""), "empty"),
    "blank text": (lambda d: write(d, "blank.md", "\n \n"), "empty"),
    "binary text": (lambda d: write(d, "x.txt", b"\0\1\2binary"), "binary"),
    "empty dir": (lambda d: (d / "void").mkdir() or d / "void", "no readable text file"),
    "dir of junk": (lambda d: write(d, "junk/a.bin", b"\0\0\0").parent, "binary: 1"),
    "unsupported": (lambda d: write(d, "deck.pptx", b"PK"), ".pdf"),
    "corrupt pdf": (lambda d: write(d, "bad.pdf", b"%PDF-1.4\nnot really\n"), "not a readable PDF"),
    "textless pdf": (lambda d: write(d, "scan.pdf", minimal_pdf([[], []])), "no page has extractable text"),
    "corrupt epub": (lambda d: write(d, "bad.epub", b"PK\3\4 not a zip"), "not a readable EPUB"),
    "zip not epub": (lambda d: _zip(d / "plain.epub", {"hello.txt": "hi"}), "not a readable EPUB"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_one_line_ingest_error(tmp_path, case):
    make, expected = BAD_INPUTS[case]
    with pytest.raises(IngestError) as info:
        ingest(make(tmp_path))
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_unsupported_extension_lists_what_is_supported(tmp_path):
    with pytest.raises(IngestError, match=r"unsupported file type '\.pptx'; supported: \.txt, .*\.epub, \.pdf"):
        ingest(write(tmp_path, "deck.pptx", b"PK"))
