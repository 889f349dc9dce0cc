"""`lmqa eval --tasks code`: the questions people ask of a codebase, on real trees.

prompts/code_questions.jsonl holds hand-written questions about source
trees installed with Python (`stdlib:tomllib`, `site:safetensors`, ...), of
five kinds: where is X defined, which function/class does Y, what calls X,
what is the value of constant C, which file handles Z; each with the
qualified names (or file paths) that answer it. Each tree is read as
`lmqa ask DIR` reads it (its symbol index built at ingest) and every
question asked through the same session and rules as `lmqa ask`.

An answer is right when the definition it names first (for "what calls",
any caller it lists) is an expected one: the same qualified name, or one
ending in it (".Class.method"); or its file is an expected path. The
evidence is hit when a passage holds the expected definition's first line.
The baseline, in the same run: BM25 over the definitions alone (its top
definition, printed by the same rule), so the table says whether the
model's reading beats plain lexical retrieval.
"""

from __future__ import annotations

import json
import sysconfig
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.table import Table

from lmqa.code.answer import asks_for_callers, named_in, render, search_of
from lmqa.code.symbols import Definition, SymbolIndex
from lmqa.engine.generation import SamplingConfig
from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.ingest import IngestError, ingest
from lmqa.model.loading import LoadedModel
from lmqa.qa.evidence import holds, passages
from lmqa.qa.prompts import PROMPTS_DIR
from lmqa.qa.session import DocumentSession
from .tasks import EvalError

QUESTIONS = PROMPTS_DIR / "code_questions.jsonl"
ROOTS = {"stdlib": "stdlib", "site": "purelib"}  # a tree's prefix -> the sysconfig path it lies under


@dataclass(frozen=True)
class CodeQuestion:
    tree: str  # stdlib:PATH or site:PATH
    kind: str  # where, which, callers, value, file
    question: str
    expected: tuple[str, ...]  # qualified names or file paths; any one counts


def load_questions(path: Path = QUESTIONS) -> list[CodeQuestion]:
    """The questions; the file's first line is its eval-only notice."""
    return [CodeQuestion(r["tree"], r["kind"], r["question"], tuple(r["expected"]))
            for r in map(json.loads, path.read_text().splitlines()) if "question" in r]


def tree_path(tree: str) -> Path:
    """stdlib:tomllib -> the running Python's .../lib/python3.X/tomllib."""
    root, _, rel = tree.partition(":")
    if root not in ROOTS or not rel:
        raise EvalError(f"code question tree {tree!r}: expected stdlib:PATH or site:PATH")
    path = Path(sysconfig.get_paths()[ROOTS[root]]) / rel
    if not path.is_dir():
        raise EvalError(f"code question tree {tree!r}: {path} is not installed here")
    return path


def is_named(name: str, expected: tuple[str, ...]) -> bool:
    return any(name == e or name.endswith("." + e) for e in expected)


def is_right(answer: str, question: CodeQuestion) -> bool:
    """See the module docstring: the answer's first definition (or its
    listed callers) and the first file it gives."""
    names, locations = named_in(answer)
    if asks_for_callers(question.question):
        return any(is_named(n, question.expected) for n in names[1:])
    return bool(names and is_named(names[0], question.expected)
                or locations and locations[0][0] in question.expected)


def expected_definition(index: SymbolIndex, question: CodeQuestion) -> Definition | None:
    """The definition an expected answer names (a file: its module)."""
    return next((d for e in question.expected for d in index.definitions
                 if is_named(d.name, (e,)) or d.kind == "module" and d.path == e), None)


def line_span(session: DocumentSession, d: Definition) -> tuple[int, int]:
    """The document's characters of d's first line."""
    segment = next(s for s in session.document.segments if s.title == d.path)
    text = session.document.text
    start = segment.char_start
    for _ in range(d.line - 1):
        start = text.index("\n", start) + 1
    return start, text.index("\n", start) + 1


@dataclass
class CodeResult:
    tree: str
    kind: str
    question: str
    expected: list[str]
    answer: str
    correct: bool
    evidence_hit: bool
    bm25_answer: str
    bm25_correct: bool
    seconds: float
    evidence: list[str] = field(default_factory=list)  # file:lines of the evidence passages


def run_tree(tree: str, questions: list[CodeQuestion], loaded: LoadedModel, engine: LandmarkEngine,
             sampling: SamplingConfig,
             reading: Callable[[int], tuple[AbstractContextManager, Callable[[int], None]]] | None = None,
             done: Callable[[CodeResult], None] | None = None) -> list[CodeResult]:
    """Read one tree and ask it its questions (see the module docstring).
    reading(positions): a progress display and its advance(n) for the
    tree's prefill; done(result): called after each question."""
    try:
        document = ingest(tree_path(tree))
    except IngestError as e:
        raise EvalError(str(e)) from None
    session = DocumentSession(loaded, engine, document, "codebase")
    bar, advance = reading(session.positions) if reading is not None else (nullcontext(), None)
    with bar:
        session.ingest(advance)
    index, search = document.symbols, search_of(document)
    out = []
    for q in questions:
        target = expected_definition(index, q)
        if target is None:
            raise EvalError(f"{tree}: no definition {' or '.join(q.expected)} for {q.question!r}")
        start = time.perf_counter()
        answer = session.ask(q.question, sampling)
        seconds = time.perf_counter() - start
        found = passages(session, answer.evidence)
        top = search.top(q.question, 1)
        baseline = render(index, top[0][0], q.question) if top else ""
        result = CodeResult(tree, q.kind, q.question, list(q.expected), answer.text, is_right(answer.text, q),
                            holds(session, found, *line_span(session, target)), baseline, is_right(baseline, q),
                            seconds, [p.location for p in found])
        out.append(result)
        if done is not None:
            done(result)
    return out


def summary(results: list[CodeResult]) -> list[dict]:
    """Per tree, per kind and over all: questions, right, evidence hits, BM25 right."""
    groups: dict[str, list[CodeResult]] = {}
    for prefix in ("tree", "kind"):
        for r in results:
            groups.setdefault(f"{prefix} {getattr(r, prefix)}", []).append(r)
    groups["all"] = results
    return [{"group": key, "questions": len(rs), "right": sum(r.correct for r in rs),
             "evidence": sum(r.evidence_hit for r in rs), "bm25_right": sum(r.bm25_correct for r in rs)}
            for key, rs in groups.items()]


def report(results: list[CodeResult], model: str, sampling: SamplingConfig) -> dict:
    return {"task": "code", "model": model, "candidates": sampling.candidates, "summary": summary(results),
            "results": [asdict(r) for r in results]}


def table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in ("group", "questions", "right", "evidence", "BM25 right"):
        t.add_column(col, justify="left" if col == "group" else "right")
    for row, after in zip(rows, rows[1:] + [None]):  # a line between trees, kinds and all
        n = row["questions"]
        t.add_row(row["group"], str(n), *(f"{row[k]}/{n} ({100 * row[k] / n:.0f}%)" for k in ("right", "evidence", "bm25_right")),
                  end_section=after is not None and after["group"].split()[0] != row["group"].split()[0])
    return t
