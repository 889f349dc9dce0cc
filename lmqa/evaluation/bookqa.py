"""`lmqa eval --tasks bookqa`: questions a reader would ask about whole books.

The needle task plants a fact worded like its question; readers do not ask
like that. prompts/bookqa.jsonl holds questions written in a reader's words
about facts three books state (prompts/bookqa_holdout.txt names them; they
are training books that training skips, see lmqa/train/data.py), each with
short accepted answers and the file line that states the fact.

Each book is read as `lmqa ingest` reads it (the same ingest, Gutenberg
boilerplate cut, streamed to a .lmqa context file kept under the cache
directory, so a rerun skips the prefill) and asked as `lmqa ask BOOK.lmqa`
asks. An answer is right when it holds an accepted answer (all of them, for
a question that asks for a list); the evidence is hit when a passage covers
the supporting line or holds an accepted answer. The baseline: the book's
single best BM25 sentence for the question (bm25s), scored the same way, so
the table says whether the reader beats plain lexical retrieval.
"""

from __future__ import annotations

import json
import re
import time
from bisect import bisect_left
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import bm25s
from rich.table import Table

from lmqa.engine.generation import SamplingConfig
from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.ingest import Document, IngestError, ingest
from lmqa.model.loading import LoadedModel
from lmqa.qa.context_file import ContextError, load
from lmqa.qa.context_stream import ingest_file
from lmqa.qa.evidence import passages
from lmqa.qa.prompts import PROMPTS_DIR
from lmqa.qa.sentences import sentences_around
from lmqa.qa.session import DocumentSession
from .tasks import EvalError, is_correct

QUESTIONS = PROMPTS_DIR / "bookqa.jsonl"
BOOKS = Path("shared/books/train")  # the held-out books are training books that training skips


@dataclass(frozen=True)
class BookQuestion:
    book: str  # file name in the books directory
    question: str
    answers: tuple[str, ...]
    all: bool  # a list question: every answer must be there
    line: int  # the file line that states the fact
    kind: str


def load_questions(path: Path = QUESTIONS) -> list[BookQuestion]:
    out = []
    for record in map(json.loads, path.read_text().splitlines()):
        out.append(BookQuestion(record["book"], record["question"], tuple(record["answers"]), record["all"],
                                record["line"], record["kind"]))
    return out


def select(questions: list[BookQuestion], books: list[str] | None, limit: int | None) -> list[BookQuestion]:
    """The questions on `books` (file names or their stems; None: all), the
    first `limit` of each book (None: all)."""
    known = {q.book for q in questions}
    wanted = known if books is None else set()
    for name in books or []:
        match = [b for b in known if name in (b, Path(b).stem)]
        if not match:
            raise EvalError(f"--bookqa-books: no questions on {name!r}; the set covers {', '.join(sorted(known))}")
        wanted.update(match)
    taken: dict[str, int] = {}
    out = []
    for q in questions:
        if q.book in wanted and (limit is None or taken.get(q.book, 0) < limit):
            taken[q.book] = taken.get(q.book, 0) + 1
            out.append(q)
    return out


def answers(text: str, question: BookQuestion, every: bool | None = None) -> bool:
    """Does text hold the question's answer: any accepted string, or every
    one for a list question (every overrides), matched as is_correct does.
    Underscores are Gutenberg's italics (_Thunder Child_), not letters."""
    text = text.replace("_", " ")
    found = [is_correct(text, [a]) for a in question.answers]
    return all(found) if (question.all if every is None else every) else any(found)


def evidence_hit(first_line: int, last_line: int, text: str, question: BookQuestion) -> bool:
    """A passage (or sentence) covers the supporting line or holds an accepted answer."""
    return first_line <= question.line <= last_line or answers(text, question, every=False)


@dataclass(frozen=True)
class Sentence:
    text: str
    first_line: int
    last_line: int


class SentenceIndex:
    """The baseline: BM25 over the document's sentences (English stopwords
    dropped, no stemming); search() returns the single best one."""

    def __init__(self, document: Document):
        text = document.text
        newlines = [m.start() for m in re.finditer("\n", text)]
        self.sentences = []
        for segment in document.segments:
            def line(pos: int) -> int:  # the file line of a character of this segment
                return segment.line_start + bisect_left(newlines, pos) - bisect_left(newlines, segment.char_start)

            for a, b in sentences_around(text[: segment.char_end], segment.char_start, segment.char_end):
                self.sentences.append(Sentence(text[a:b], line(a), line(b - 1)))
        if not self.sentences:
            raise EvalError(f"{document.source}: no sentences to index")
        self.bm25 = bm25s.BM25()
        self.bm25.index(bm25s.tokenize([s.text for s in self.sentences], stopwords="en", show_progress=False),
                        show_progress=False)

    def search(self, question: str) -> Sentence:
        query = bm25s.tokenize([question], stopwords="en", return_ids=False, show_progress=False)
        if not query[0]:
            return self.sentences[0]
        ids, _ = self.bm25.retrieve(query, k=1, show_progress=False)
        return self.sentences[int(ids[0][0])]


@dataclass
class BookResult:
    book: str
    question: str
    kind: str
    expected: list[str]
    all: bool
    line: int
    answer: str
    correct: bool
    evidence_hit: bool
    evidence: list[str]  # file:lines of each evidence passage, most attended first
    seconds: float  # asking (question prefill and answer), the book's prefill not included
    bm25_sentence: str
    bm25_lines: str
    bm25_correct: bool
    bm25_evidence: bool


@dataclass
class BookRun:
    """One book's context: its tokens and what reading it took (0 when the
    context file was reused)."""

    book: str
    tokens: int
    ingest_seconds: float
    context: str
    results: list[BookResult] = field(default_factory=list)


def context_path(cache: Path, book: str, loaded: LoadedModel) -> Path:
    """Where the book's context file for this model is kept."""
    return cache / f"{Path(book).stem}.{re.sub(r'[^A-Za-z0-9_.-]+', '-', loaded.name)}.lmqa"


Bar = Callable[[int], tuple[AbstractContextManager, Callable[[int], None]]]  # total positions -> (display, advance)


def open_book(path: Path, loaded: LoadedModel, engine: LandmarkEngine, cache: Path,
              bar: Bar | None = None) -> tuple[DocumentSession, float]:
    """The book as `lmqa ask BOOK.lmqa` opens it, ingesting it first (as
    `lmqa ingest --resume` does: an interrupted run's work is continued)
    unless the cache holds a context this model can use. Returns the
    session and the seconds the ingest took (0 when reused)."""
    target = context_path(cache, path.name, loaded)
    if target.is_file():
        try:
            return load(target, loaded), 0.0
        except ContextError:
            pass  # another model or settings, or damaged: read the book again
    try:
        document = ingest(path)
    except IngestError as e:
        raise EvalError(str(e)) from None
    session = DocumentSession(loaded, engine, document, "document")
    display, advance = bar(session.positions) if bar is not None else (nullcontext(), None)
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with display:
        ingest_file(session, target, resume=True, progress=advance)
    return load(target, loaded), time.perf_counter() - start


def run_book(path: Path, questions: list[BookQuestion], loaded: LoadedModel, engine: LandmarkEngine, cache: Path,
             sampling: SamplingConfig, bar: Bar | None = None,
             on_result: Callable[[BookResult], None] | None = None) -> BookRun:
    """Every question of one book, asked of its whole text."""
    session, seconds = open_book(path, loaded, engine, cache, bar)
    index = SentenceIndex(session.document)
    run = BookRun(path.name, len(session.token_ids), seconds, str(context_path(cache, path.name, loaded)))
    for q in questions:
        start = time.perf_counter()
        answer = session.ask(q.question, sampling)
        elapsed = time.perf_counter() - start
        found = passages(session, answer.evidence)
        best = index.search(q.question)
        lines = str(best.first_line) if best.first_line == best.last_line else f"{best.first_line}-{best.last_line}"
        result = BookResult(path.name, q.question, q.kind, list(q.answers), q.all, q.line, answer.text,
                            answers(answer.text, q), any(evidence_hit(p.start_line, p.end_line, p.text, q) for p in found),
                            [p.location for p in found], elapsed, best.text, lines, answers(best.text, q),
                            evidence_hit(best.first_line, best.last_line, best.text, q))
        run.results.append(result)
        if on_result is not None:
            on_result(result)
    return run


def summary(runs: list[BookRun]) -> list[dict]:
    """Per book, then overall: questions, right, evidence hits and the BM25
    sentence's, as counts and percentages; seconds per question."""
    rows = []
    for name, group in [(r.book, [r]) for r in runs] + [("all", runs)]:
        results = [x for r in group for x in r.results]
        n = len(results)
        if not n:
            continue
        row = {"book": name, "questions": n, "tokens": sum(r.tokens for r in group),
               "ingest_seconds": round(sum(r.ingest_seconds for r in group), 1),
               "seconds_per_question": round(sum(x.seconds for x in results) / n, 2)}
        for key in ("correct", "evidence_hit", "bm25_correct", "bm25_evidence"):
            hits = sum(getattr(x, key) for x in results)
            row[key] = hits
            row[f"{key}_pct"] = round(100 * hits / n, 1)
        rows.append(row)
    return rows


def report(runs: list[BookRun], model: str, sampling: SamplingConfig) -> dict:
    """The JSON result: settings, the summary rows and every question's result."""
    return {"model": model, "sampling": asdict(sampling), "summary": summary(runs),
            "books": [{"book": r.book, "tokens": r.tokens, "ingest_seconds": round(r.ingest_seconds, 1),
                       "context": r.context} for r in runs],
            "results": [asdict(x) for r in runs for x in r.results]}


def table(rows: list[dict], title: str) -> Table:
    """Per book and overall; BM25: the book's best BM25 sentence for the question, scored as the answer is."""
    out = Table(title=title)
    out.add_column("book", overflow="fold", min_width=14)
    for col in ("asked", "tokens", "right", "evidence", "BM25", "BM25 evid.", "s/q"):
        out.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        out.add_row(Path(r["book"]).stem, str(r["questions"]), f"{r['tokens']:,}", f"{r['correct_pct']:.0f}%",
                    f"{r['evidence_hit_pct']:.0f}%", f"{r['bm25_correct_pct']:.0f}%", f"{r['bm25_evidence_pct']:.0f}%",
                    f"{r['seconds_per_question']:.1f}")
    return out
