"""A directory as a codebase: every text file worth reading, one segment each.

Symlinks are never followed, only reported: one pointing out of the root
could smuggle ~/.ssh into a prompt, and one pointing inside it leads to a
file or directory the walk reaches at its real path anyway, under that
path's own ignore rules (so a link cannot expose .git/config or an ignored
.env either), and following it would only read the same text twice or loop.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pathspec import GitIgnoreSpec

from lmqa.code.symbols import SymbolIndex, build_index

from .decoding import decode, looks_binary
from .document import Document, DocumentBuilder, IngestError, SkipReport
from .generated import is_generated
from .gitignore import IgnoreRules

DEFAULT_MAX_FILE_BYTES = 1 << 20


def read_directory(path: Path, include: Sequence[str] = (), exclude: Sequence[str] = (),
                   max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Document:
    """include/exclude: .gitignore-syntax patterns relative to the root; a
    file is read when it matches some include pattern (or none are given) and
    no exclude pattern. An excluded directory is not entered."""
    builder = DocumentBuilder(str(path))
    walk = _Walk(path.resolve(), GitIgnoreSpec.from_lines(include) if include else None,
                 GitIgnoreSpec.from_lines(exclude), max_file_bytes, builder.document.skipped)
    walk.directory(walk.root, "", IgnoreRules())
    for rel, file in walk.found:
        text = _read(file, rel, builder.document)
        if text is not None:
            builder.add(rel, "file", text, header=True)
    if not builder.document.segments:
        why = "; ".join(builder.document.skipped.lines(examples=0)) or "it is empty"
        raise IngestError(f"{path}: no readable text file in this directory ({why})")
    document = builder.build()
    document.symbols = index_document(document)
    return document


def index_document(document: Document) -> SymbolIndex:
    """The symbol index of a codebase read as one document: its Python
    modules are named under the directory's own name when the directory is
    a package (has an __init__.py at its top). Here, not in code/symbols.py,
    which knows files and text but not documents."""
    package = Path(document.source).resolve().name if any(s.title == "__init__.py" for s in document.segments) else None
    return build_index(((s.title, document.text[s.char_start : s.char_end]) for s in document.segments), package)


@dataclass
class _Walk:
    """Decides from names and metadata alone which files to read, in sorted
    order so the same tree always gives the same document."""

    root: Path
    include: GitIgnoreSpec | None
    exclude: GitIgnoreSpec
    max_file_bytes: int
    skipped: SkipReport
    found: list[tuple[str, str]] = field(default_factory=list)  # (relative path, path to open)

    def directory(self, directory: Path, rel: str, rules: IgnoreRules) -> None:
        rules = rules.enter(directory, rel)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            self.skipped.add("unreadable", rel + "/")
            return
        for entry in entries:
            if entry.name == ".git":
                continue
            child = f"{rel}/{entry.name}" if rel else entry.name
            self.entry(entry, child, rules)

    def entry(self, entry: os.DirEntry, rel: str, rules: IgnoreRules) -> None:
        is_dir = entry.is_dir(follow_symlinks=False)
        shown = rel + "/" if is_dir else rel
        if rules.ignored(rel, is_dir):
            self.skipped.add("gitignored", shown)
        elif self.exclude.match_file(shown):
            self.skipped.add("excluded", shown)
        elif entry.is_symlink():
            self.symlink(Path(entry.path), rel)
        elif is_dir:
            self.directory(Path(entry.path), rel, rules)
        else:
            self.file(entry, rel)
    def symlink(self, link: Path, rel: str) -> None:
        try:
            target = link.resolve()
        except (OSError, RuntimeError):  # a loop (RuntimeError before Python 3.13)
            self.skipped.add("broken symlink", rel)
            return
        if not target.exists():
            self.skipped.add("broken symlink", rel)
        elif not target.is_relative_to(self.root):
            self.skipped.add("symlink outside root", rel)
        else:
            self.skipped.add("symlink inside root (target walked at its own path)", rel)

    def file(self, entry: os.DirEntry, rel: str) -> None:
        """DirEntry and plain strings, not Path objects: a tree of 50,000
        files spends most of its walk building paths otherwise."""
        if self.include is not None and not self.include.match_file(rel):
            self.skipped.add("not included", rel)
        elif not entry.is_file(follow_symlinks=False):
            self.skipped.add("not a regular file", rel)
        elif _size(entry) > self.max_file_bytes:
            self.skipped.add(f"larger than {self.max_file_bytes:,} bytes", rel)
        else:
            self.found.append((rel, entry.path))


def _size(entry: os.DirEntry) -> int:
    """Bytes, or 0 when stat fails so that reading reports the file as unreadable."""
    try:
        return entry.stat(follow_symlinks=False).st_size
    except OSError:
        return 0


def _read(path: str, rel: str, document: Document) -> str | None:
    """The file's text, or None with the reason recorded in document.skipped."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError:
        document.skipped.add("unreadable", rel)
        return None
    if looks_binary(raw):
        document.skipped.add("binary", rel)
        return None
    warnings: list[str] = []  # kept only if the file is, so a skipped file does not warn
    text = decode(raw, rel, warnings)
    if is_generated(rel.rsplit("/", 1)[-1], text):
        document.skipped.add("generated", rel)
        return None
    if not text.strip():
        document.skipped.add("empty", rel)
        return None
    document.warnings.extend(warnings)
    return text
