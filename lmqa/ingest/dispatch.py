"""From a path the user typed to a Document, by what the path is."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .codebase import DEFAULT_MAX_FILE_BYTES, read_directory
from .document import Document, IngestError
from .epub import read_epub
from .pdf import read_pdf
from .textfile import STDIN, TEXT_SUFFIXES, read_stdin, read_text_file

_READERS = {**{suffix: read_text_file for suffix in TEXT_SUFFIXES}, ".epub": read_epub, ".pdf": read_pdf}
SUPPORTED = (*TEXT_SUFFIXES, ".epub", ".pdf")


def ingest(path: str | Path, include: Sequence[str] = (), exclude: Sequence[str] = (),
           max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, keep_boilerplate: bool = False) -> Document:
    """path: a file, a directory (read as a codebase), or "-" for standard input.

    include, exclude and max_file_bytes apply to directories only: a file or
    stream named explicitly is always read whole. keep_boilerplate applies to
    plain text: a Project Gutenberg header and licence are cut unless it is set.
    """
    if str(path) == STDIN:
        return read_stdin(keep_boilerplate)
    path = Path(path)
    try:
        if path.is_symlink() and not path.exists():
            raise IngestError(f"{path}: a broken symbolic link or a symlink loop")
        if not path.exists():
            raise IngestError(f"{path}: no such file or directory")
        if path.is_dir():
            return read_directory(path, include, exclude, max_file_bytes)
        if not path.is_file():  # reading a FIFO or a device could block or never end
            raise IngestError(f"{path}: not a regular file (a FIFO, device or socket); to read a stream, "
                              f"pipe it into `-` (standard input)")
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            raise IngestError(f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; "
                              f"supported: {', '.join(SUPPORTED)}, a directory, or - for standard input")
        if path.stat().st_size == 0:
            raise IngestError(f"{path}: the file is empty")
        return read_text_file(path, keep_boilerplate) if reader is read_text_file else reader(path)
    except OSError as e:  # permissions, a path component that is a file, I/O errors
        raise IngestError(f"{path}: {e.strerror or e}") from None
