"""Code answers that name only real things.

A small model asked about a codebase in its own words invents identifiers
("`decode_json` is defined in _init__.py"). Here the answer is chosen, not
written: the candidates are definitions of the symbol index (symbols.py),
those the question names (in backticks, or as identifiers) first, then by
BM25 over their names, signatures, docstrings and bodies (stemmed), and the
first is written out from the index, so every name, path, line and
signature in the answer is the index's:

  `email.utils.parseaddr(addr)` in email/utils.py:208: Parse addr into ...

"What calls X" lists X's callers from the index's call sites, and a
constant's answer carries its value. `--no-quote` keeps free text.

The model does not rank the candidates: reading each as a whole answer in
its trained form ("`loads` is defined in _parser.py.") and taking the
likeliest (mean log p per token, as answer_search reads proposals) lost to
this ranking on `lmqa eval --tasks code` (docs/evaluation.md, "Code"): it
matched it where the question names the definition and lost most "which
function does Y" questions. The answer is still fed to the model, so its
evidence and a kept chat turn are recorded as for any answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import Stemmer

from lmqa.ingest.codebase import index_document
from .symbols import Definition, SymbolIndex

if TYPE_CHECKING:
    from lmqa.engine.landmark_engine import LandmarkEngine
    from lmqa.ingest import Document
    from lmqa.model.loading import LoadedModel

CANDIDATES = 10  # definitions BM25 ranks, after those the question names
CALLERS = 12  # callers an answer lists at most
BODY_LINES = 80  # lines of a definition's body that BM25 indexes
NAME_WEIGHT = 3  # a name's words count this many times in BM25 (a question names what it asks for)
_CALLERS = re.compile(r"\b(?:what|which\s+\w+|who)\s+(?:calls?|invokes?|uses?)\b|\bcallers?\s+of\b|"
                      r"\bcall(?:s|ed)?\s+(?:by|from)\b|\bwhere\s+is\s+\S+\s+called\b", re.I)
_MENTION = re.compile(r"`([^`]+)`|\b([A-Za-z_][\w.]*(?:_|[a-z][A-Z]|\.)[\w.]*)\b|\b(\w+)\(\)")
_WORD = re.compile(r"[A-Za-z][a-z]*|[A-Z]+(?![a-z])|\d+")
_STEMMER = Stemmer.Stemmer("english")
_STOP = frozenset("a an and are as at be by defined do does file for from function how in is it its of on or the "
                  "to what where which who with class method module constant value set".split())


class AskingSession(Protocol):
    """What answer_code uses of the session asking (qa/session.py's
    DocumentSession), written out here because the session imports this
    module: the document, the model's tokenizer and the engine it feeds."""

    document: Document
    loaded: LoadedModel
    engine: LandmarkEngine


@dataclass(frozen=True)
class Candidate:
    definition: Definition
    bm25: float  # BM25 score against the question (0 for a definition only named by it)


def index_of(document: Document) -> SymbolIndex:
    """The document's symbol index (built at ingest; for a codebase made
    some other way, such as a context file from before the index, built now
    from its files)."""
    if document.symbols is None:
        document.symbols = index_document(document)
    return document.symbols


def words(text: str) -> list[str]:
    """BM25 terms: identifiers split at underscores, dots and case changes,
    lower-cased and stemmed ("parses" finds parse), with the whole
    identifier kept too (parse_addr -> parse_addr, pars, addr)."""
    out = []
    for token in re.findall(r"\w+", text):
        lower = token.lower()
        parts = [p.lower() for p in _WORD.findall(token)]
        out += [p for p in parts if p not in _STOP]
        if len(parts) > 1 or lower not in parts:
            out.append(lower)
    return _STEMMER.stemWords(out)


def written(d: Definition) -> str:
    """The answer as printed: qualified name with signature, file:line, docstring line."""
    if d.kind in ("function", "method"):  # the signature from the name on ("function f(a)", "func (t T) f()")
        at = d.signature.find(d.name.rsplit(".", 1)[-1] + "(")
        head = f"`{d.name.rsplit('.', 1)[0]}.{d.signature[at:]}`" if at >= 0 else f"`{d.name}` ({d.signature})"
    elif d.kind == "class":
        bases = d.signature.partition("(")[2]
        head = f"class `{d.name}" + (f"({bases}`" if bases else "`")
    elif d.kind == "constant":
        head = f"`{d.name.rsplit('.', 1)[0]}.{d.signature}`"
    else:
        head = f"module `{d.name}`"
    return f"{head} in {d.location}" + (f": {d.doc}" if d.doc else "")


class DefinitionSearch:
    """BM25 over the index's definitions: name words (weighted), kind, path,
    signature, docstring line and the first BODY_LINES of the body."""

    def __init__(self, index: SymbolIndex, document: Document):
        self.definitions = index.definitions
        files = {s.title: document.text[s.char_start : s.char_end].splitlines() for s in document.segments}
        corpus = []
        for d in self.definitions:
            body = files.get(d.path, [])[d.line - 1 : min(d.end_line, d.line + BODY_LINES)]
            name = d.path if d.kind == "module" else d.name.rsplit(".", 1)[-1]
            corpus.append(words(name) * NAME_WEIGHT + words(f"{d.kind} {d.path} {d.signature} {d.doc} {' '.join(body)}"))
        import bm25s  # here: a document question never needs it (0.4 s to import)

        self.retriever = bm25s.BM25()
        self.retriever.index(corpus, show_progress=False)

    def top(self, question: str, k: int) -> list[tuple[Definition, float]]:
        terms = [w for w in words(question) if w in self.retriever.vocab_dict]
        if not terms or not self.definitions:
            return []
        ids, scores = self.retriever.retrieve([terms], k=min(k, len(self.definitions)), show_progress=False)
        return [(self.definitions[int(i)], float(s)) for i, s in zip(ids[0], scores[0]) if s > 0]


def named(index: SymbolIndex, question: str) -> list[Definition]:
    """Definitions the question names as code: in backticks, as a dotted or
    snake_case/camelCase identifier, or as name(); by qualified name, a
    suffix of it (Class.method) or the last part."""
    mentions = {next(g for g in m.groups() if g).strip().removesuffix("()") for m in _MENTION.finditer(question)}
    out = []
    for d in index.definitions:
        if d.kind != "module" and any(d.name == m or d.name.endswith("." + m) for m in mentions):
            out.append(d)
        elif d.kind == "module" and any(m in (d.name, d.path) for m in mentions):
            out.append(d)
    return out


def candidates(index: SymbolIndex, search: DefinitionSearch, question: str, k: int = CANDIDATES) -> list[Candidate]:
    """Definitions the question names first (most likely what it asks
    about), then BM25's top k, each once."""
    scored = dict(search.top(question, k))
    first = named(index, question)
    out = [Candidate(d, scored.get(d, 0.0)) for d in first]
    out += [Candidate(d, s) for d, s in scored.items() if d not in first]
    return out


def callers(index: SymbolIndex, target: Definition) -> list[Definition]:
    """Definitions whose body calls target's name (call sites are names:
    a method is matched by its own name, whatever object it is called on)."""
    name = target.name.rsplit(".", 1)[-1]
    return [d for d in index.definitions if name in d.calls and d is not target]


def asks_for_callers(question: str) -> bool:
    return bool(_CALLERS.search(question))


def render(index: SymbolIndex, d: Definition, question: str) -> str:
    """The printed answer for the chosen definition d."""
    if not asks_for_callers(question):
        return written(d)
    found = callers(index, d)
    if not found:
        return f"No definition in the index calls `{d.name}`, defined at {d.location}."
    listed = ", ".join(f"`{c.name}` ({c.location})" for c in found[:CALLERS])
    more = f" and {len(found) - CALLERS} more" if len(found) > CALLERS else ""
    return f"`{d.name}` ({d.location}) is called by {listed}{more}."


_NAMED = re.compile(r"`([A-Za-z_][\w.]*)")
_LOCATION = re.compile(r"(?<![\w/.-])([\w./-]+):(\d+)\b")


def named_in(text: str) -> tuple[list[str], list[tuple[str, int]]]:
    """The qualified names (each backticked span's leading name) and the
    file:line locations a code answer prints, in order."""
    return _NAMED.findall(text), [(path, int(line)) for path, line in _LOCATION.findall(text)]


def definition_spans(document: Document, text: str) -> tuple[tuple[int, int], ...]:
    """The characters of document holding each definition a code answer
    prints (file:line to the definition's end, in the answer's order: the
    definition, then its callers), so those passages lead the answer's
    evidence as a quote's own place does (evidence.passages): the answer
    is those definitions, whatever the answer's attention read."""
    definitions = index_of(document).definitions
    out = []
    for path, line in named_in(text)[1]:
        segment = next((s for s in document.segments if s.title == path), None)
        if segment is None:
            continue
        end = max((d.end_line for d in definitions if d.path == path and d.line == line), default=line)
        body = document.text[segment.char_start:segment.char_end]
        starts = [0] + [i + 1 for i, c in enumerate(body) if c == "\n"]  # offsets of the segment's lines
        first, last = line - segment.line_start, end - segment.line_start + 1
        if 0 <= first < len(starts):
            stop = starts[last] if last < len(starts) else len(body)
            out.append((segment.char_start + starts[first], segment.char_start + stop))
    return tuple(out)


def search_of(document: Document) -> DefinitionSearch:
    """The BM25 search over the document's index, kept for the last
    codebase asked about (a chat asks many questions of one)."""
    index = index_of(document)
    if _SEARCH.get(id(index), (None,))[0] is not index:
        _SEARCH.clear()
        _SEARCH[id(index)] = (index, DefinitionSearch(index, document))
    return _SEARCH[id(index)][1]


_SEARCH: dict[int, tuple[SymbolIndex, DefinitionSearch]] = {}


def answer_code(session: AskingSession, question: str, on_token: Callable[[int], None] | None = None) -> list[int]:
    """generate()'s contract for a codebase question already fed: the
    answer's tokens, streamed to on_token and then read in one feed (the
    evidence recorder sees each token)."""
    index = index_of(session.document)
    found = candidates(index, search_of(session.document), question)
    text = render(index, found[0].definition, question) if found else "No definition in the index matches the question."
    out = session.loaded.tokenizer(text, add_special_tokens=False).input_ids
    for t in out:
        if on_token is not None:
            on_token(t)
    session.engine.feed(out)
    return out
