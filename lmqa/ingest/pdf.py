"""PDF books and papers: one segment per page, from pypdf's text extraction."""

from __future__ import annotations

from pathlib import Path

from pypdf import PdfReader

from .decoding import decode
from .document import Document, DocumentBuilder, IngestError

# pypdf reports damaged files through many exception types (its own, ValueError,
# KeyError, struct errors, ...), so its calls are guarded with Exception.


def read_pdf(path: Path) -> Document:
    try:
        reader = PdfReader(path)
        encrypted = reader.is_encrypted and not reader.decrypt("")
        pages = [] if encrypted else list(reader.pages)
    except Exception as exc:
        raise IngestError(f"{path}: not a readable PDF ({type(exc).__name__}: {exc})") from None
    if encrypted:
        raise IngestError(f"{path}: the PDF is encrypted with a password")
    builder = DocumentBuilder(str(path))
    for number, page in enumerate(pages, start=1):
        title = f"page {number}"
        try:
            text = page.extract_text()
        except Exception as exc:
            builder.document.warnings.append(f"{path}: {title} could not be read ({type(exc).__name__}: {exc})")
            continue
        # Through bytes, so lone surrogates from broken font maps become U+FFFD
        # with a warning instead of failing in the tokenizer.
        text = decode(text.encode("utf-8", errors="surrogatepass"), f"{path} {title}", builder.document.warnings,
                      legacy=False)
        if not text.strip():
            builder.document.skipped.add("no text (scanned or blank page)", title)
            continue
        builder.add(title, "page", text.strip("\n"), header=True)
    if not builder.document.segments:
        raise IngestError(f"{path}: no page has extractable text (a scanned PDF needs OCR first)")
    return builder.build()
