"""The reader's page at `/` and the JSON it reads, which scripts can use too.

- `GET /`: the page (lmqa/serve/static/: plain HTML, CSS and JS, no CDN and
  no build step), served with a Content-Security-Policy that allows scripts,
  styles and connections from this server only, and no inline script.
- `GET /v1/answers/{id}`: an answer given since the server started (id: the
  completion's `id`, `chatcmpl-...`; the last KEPT_ANSWERS are kept): the
  question, the answer and its evidence passages, each with its document
  characters [char_start, char_end) and `spans`, the parts of its `text` the
  answer quotes ([start, end) in the passage's text).
- `GET /v1/answers/{id}/blocks`: per layer, the blocks that layer retrieved
  for the answer and how often (over heads and steps, as `ask --plot` draws
  them), each retrieved document block's file:line, and the chapter or file
  marks along the block axis.
- `GET /v1/document?model=M&start=C&end=C` (characters of the document) or
  `?model=M&file=F&line=N&lines=K`: the document's text there, whole lines,
  each with its file and line number.

Everything but the page's files needs the API key when the server has one.
The page shows document text through DOM text nodes only (never as HTML):
a book is untrusted input.
"""

from __future__ import annotations

import re
import threading
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from importlib import resources
from typing import Any, Callable, Mapping

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from lmqa.qa.heatmap import retrieval_counts, structure_marks
from lmqa.qa.session import Answer, DocumentSession
from lmqa.qa.trace_export import source_json
from .protocol import ApiError

KEPT_ANSWERS = 128  # answers whose evidence and blocks stay available by id
MAX_DOCUMENT_CHARS = 200_000  # the most text one /v1/document request returns
MAX_DOCUMENT_LINES = 5_000
SNAP_CHARS = 2_000  # a range is widened to whole lines, by at most this much on each side
# default-src 'self' covers scripts, styles, images and fetch(); no inline script or style element
# can run, nothing can frame the page, and a form or <base> cannot send the reader elsewhere.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}


class AnswerStore:
    """The last `limit` answers' page data by completion id (thread-safe)."""

    def __init__(self, limit: int = KEPT_ANSWERS):
        self.limit = limit
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def keep(self, answer_id: str, model: str, out: dict[str, Any]) -> None:
        """out: _answer's result, with the page data under "web" (taken out here)."""
        web = out.pop("web", None)
        if web is None:
            return
        with self._lock:
            self._items[answer_id] = {"id": answer_id, "model": model, **web}
            while len(self._items) > self.limit:
                self._items.popitem(last=False)

    def get(self, answer_id: str) -> dict[str, Any]:
        with self._lock:
            item = self._items.get(answer_id)
        if item is None:
            raise ApiError(404, f"no answer {answer_id!r}: the server keeps the last {self.limit} answers since "
                                "it started", "answer_not_found")
        return item


def answer_details(session: DocumentSession, answer: Answer, evidence: list[dict[str, Any]]) -> dict[str, Any]:
    """On the answer thread: what /v1/answers/{id} and its /blocks return.
    evidence: the answer's passages as result() gives them."""
    text = session.document.text
    quotes = [list(span) for span in (answer.evidence.quoted if answer.evidence is not None else ())]
    passages = []
    for p in evidence:
        first, last = session.sources.get(p["blocks"][0]), session.sources.get(p["blocks"][-1])
        if first is None or last is None:  # not a document block: no place to show (never seen; the answer still stands)
            passages.append({**p, "char_start": None, "char_end": None, "spans": []})
            continue
        raw = text[first.char_start : last.char_end]
        start = first.char_start + len(raw) - len(raw.lstrip())  # the passage's text is stripped
        end = start + len(p["text"])
        spans = [[max(s, start) - start, min(e, end) - start] for s, e in quotes if s < end and e > start]
        passages.append({**p, "char_start": start, "char_end": end, "spans": spans})
    return {"question": answer.question, "answer": answer.text, "quotes": quotes, "evidence": passages,
            "blocks": _blocks(session, answer)}


def _blocks(session: DocumentSession, answer: Answer) -> dict[str, Any]:
    used = max((int(s.block_ids.max()) for s in answer.steps if s.block_ids.numel()), default=-1)
    n_blocks = max(max(session.sources, default=-1), used) + 1
    counts = retrieval_counts(answer, max(n_blocks, 1))
    rows = []
    for layer in counts:
        nonzero = np.flatnonzero(layer)
        rows.append([[int(b), int(layer[b])] for b in nonzero])
    retrieved = sorted({b for row in rows for b, _ in row})
    sources = {str(b): _source(session.sources[b]) for b in retrieved if b in session.sources}
    marks = [{"block": b, "label": label} for b, label in structure_marks(session)]
    doc = [min(session.sources), max(session.sources)] if session.sources else None
    return {"layers": int(counts.shape[0]), "blocks": n_blocks, "block_size": session.block_size,
            "document_blocks": doc, "max_count": int(counts.max(initial=0)), "retrievals": rows,
            "sources": sources, "marks": marks}


def _source(source) -> dict[str, Any]:
    full = source_json(source)
    return {k: full[k] for k in ("location", "title", "line_start", "line_end", "char_start", "char_end")}


class _Lines:
    """A document's newlines and segments, to cut it into numbered lines."""

    def __init__(self, session: DocumentSession):
        doc = session.document
        self.text, self.segments = doc.text, doc.segments
        self.starts = [s.char_start for s in doc.segments]
        self.newlines = [m.start() for m in re.finditer("\n", doc.text)]

    def line_start(self, pos: int) -> int:
        """The start of the line holding character pos."""
        i = bisect_left(self.newlines, pos)
        return self.newlines[i - 1] + 1 if i else 0

    def line_end(self, pos: int) -> int:
        """pos, if a line ends just before it; else the end of pos's line (its newline, or the text's end)."""
        if pos <= 0 or pos >= len(self.text) or self.text[pos - 1] == "\n":
            return pos
        i = bisect_left(self.newlines, pos)
        return self.newlines[i] if i < len(self.newlines) else len(self.text)

    def segment(self, pos: int):
        i = bisect_right(self.starts, pos) - 1
        if i >= 0 and self.segments[i].char_start <= pos < self.segments[i].char_end:
            return self.segments[i]
        return None

    def line_number(self, segment, pos: int) -> int:
        return segment.line_start + bisect_left(self.newlines, pos) - bisect_left(self.newlines, segment.char_start)

    def at_line(self, file: str, line: int) -> int:
        """The first character of `file`'s line `line` (clamped to the file)."""
        segment = next((s for s in self.segments if s.title == file), None)
        if segment is None:
            raise ApiError(404, f"no file {file!r} in this document", "file_not_found")
        first = bisect_left(self.newlines, segment.char_start)  # the segment's first newline
        skip = max(line - segment.line_start, 0)
        if skip == 0:
            return segment.char_start
        i = first + skip - 1
        if i >= len(self.newlines) or self.newlines[i] + 1 >= segment.char_end:
            return self.line_start(max(segment.char_end - 1, segment.char_start))
        return self.newlines[i] + 1

    def cut(self, start: int, end: int) -> list[dict[str, Any]]:
        """[start, end) as lines: start (character), file and line number (None
        for the headers between files), text without its newline."""
        out, pos = [], start
        while True:
            stop = self.text.find("\n", pos, end)
            stop = end if stop < 0 else stop
            segment = self.segment(pos)
            out.append({"start": pos, "file": segment.title if segment else None,
                        "line": self.line_number(segment, pos) if segment else None, "text": self.text[pos:stop]})
            if stop >= end:
                return out
            pos = stop + 1


def _int(request: Request, name: str, default: int | None = None) -> int | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, f"{name} must be a whole number, not {value!r}", "invalid_request") from None


def add_web_routes(app: FastAPI, contexts: Mapping[str, DocumentSession], answers: AnswerStore,
                   authorize: Callable[[Request], None]) -> None:
    lines: dict[str, _Lines] = {}
    lines_lock = threading.Lock()

    def static(name: str) -> Response:
        body = resources.files("lmqa.serve").joinpath("static", name).read_bytes()
        return Response(body, media_type=STATIC[name], headers=PAGE_HEADERS)

    @app.get("/", include_in_schema=False)
    async def page():
        return static("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str):
        if name not in STATIC:
            raise ApiError(404, f"no file {name!r}", "not_found")
        return static(name)

    @app.get("/v1/answers/{answer_id}")
    async def answer(answer_id: str, request: Request):
        authorize(request)
        return JSONResponse({k: v for k, v in answers.get(answer_id).items() if k != "blocks"})

    @app.get("/v1/answers/{answer_id}/blocks")
    async def answer_blocks(answer_id: str, request: Request):
        authorize(request)
        item = answers.get(answer_id)
        return JSONResponse({"id": item["id"], "model": item["model"], **item["blocks"]})

    @app.get("/v1/document")
    async def document(request: Request):
        authorize(request)
        name = request.query_params.get("model", "")
        session = contexts.get(name)
        if session is None:
            raise ApiError(404, f"unknown model {name!r}: this server answers about {', '.join(contexts)}",
                           "model_not_found")
        with lines_lock:
            if name not in lines:
                lines[name] = _Lines(session)
        index = lines[name]
        size = len(index.text)
        file = request.query_params.get("file")
        if file is not None:
            count = _int(request, "lines", 40)
            if not 1 <= count <= MAX_DOCUMENT_LINES:
                raise ApiError(400, f"lines must be 1 to {MAX_DOCUMENT_LINES}", "invalid_request")
            start = index.at_line(file, _int(request, "line", 1))
            end = start
            for _ in range(count):
                end = index.text.find("\n", end, size)
                if end < 0:
                    end = size
                    break
                end += 1
            end = min(end, start + MAX_DOCUMENT_CHARS)
        else:
            start = min(max(_int(request, "start", 0), 0), size)
            end = min(max(_int(request, "end", start + 20_000), start), size)
            if end - start > MAX_DOCUMENT_CHARS:
                raise ApiError(400, f"at most {MAX_DOCUMENT_CHARS:,} characters at once", "invalid_request")
            start = max(index.line_start(start), start - SNAP_CHARS)
            end = min(index.line_end(end), end + SNAP_CHARS) if end > start else end
        end = max(min(end, size), start)
        if end > start and index.text[end - 1] == "\n":
            end -= 1
        return {"model": name, "source": session.document.source, "chars": size, "start": start, "end": end,
                "lines": index.cut(start, end)}
