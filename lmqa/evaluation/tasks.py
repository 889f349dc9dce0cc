"""`lmqa eval`: does the answer come from the document, at any length and depth?

Two tasks, each a grid of trials (NIAH/RULER style), all greedy and seeded
per trial so a cell's results do not depend on which other cells run:

* needle: one invented fact (prompts/eval_needles.jsonl, evaluation only)
  written at a sentence boundary at the requested depth of a haystack cut
  from the evaluation books, then asked through the same DocumentSession and
  QA prompt as `lmqa ask`. Correct when an accepted answer appears in the
  answer; the evidence passages are scored too (does one hold the fact?).
  Baselines on the same prompt: the base model over what fits its window
  (prompt head, the document's end, the question) and over all of it
  where that fits --max-full.
* passkey: the paper's test (passkey.py) on the same lengths and depths.

Questions about real source trees are `--tasks code` (code_eval.py).
"""

from __future__ import annotations

import json
import random
import re
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.qa.evidence import holds, passages
from lmqa.engine.generation import SamplingConfig, generate, generate_full_attention
from lmqa.ingest import Document
from lmqa.ingest.document import DocumentBuilder
from lmqa.model.loading import LoadedModel
from .passkey import first_integer, make_case
from lmqa.qa.prompts import PROMPTS_DIR
from lmqa.qa.sentences import SENTENCE_END  # where a fact may be written in
from lmqa.qa.session import DocumentSession, QAPrompt

ROOT = Path(__file__).resolve().parents[2]
NEEDLES = PROMPTS_DIR / "eval_needles.jsonl"
BOOKS = Path("shared/books/eval")  # relative to the repository (or the directory above it)
TASKS = ("needle", "passkey")
GUTENBERG = re.compile(r"\*\*\* ?START OF.*?\*\*\*(.*?)(\*\*\* ?END OF|\Z)", re.S)


class EvalError(Exception):
    """Missing or unusable evaluation input; the message is one line for the user."""


@dataclass(frozen=True)
class Needle:
    kind: str  # name, place, object, date, quantity, relation, quote
    fact: str  # the sentence put into the haystack
    question: str
    answers: tuple[str, ...]  # any one of them in the answer counts


def load_needles(path: Path = NEEDLES) -> list[Needle]:
    """The evaluation needles; the file's first line is its eval-only notice."""
    out = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "fact" in record:
            out.append(Needle(record["kind"], record["fact"], record["question"], tuple(record["answers"])))
    return out


def is_correct(answer: str, accepted: tuple[str, ...] | list[str]) -> bool:
    """Case-insensitive: an accepted answer occurs starting at a word
    boundary; one ending in a digit must end at one too (11 is not in 1911,
    but "frog" is in "frogs"). Only the model's own answer counts: from a
    line that starts a new "Question:" on (the model writing the next turn
    itself, which may repeat the answer) the text is cut. A run of
    whitespace counts as one space (a quoted answer may wrap a line)."""
    text = " ".join(re.split(r"\n\s*Question:", answer, maxsplit=1)[0].split()).lower()
    for a in accepted:
        tail = r"(?!\d)" if a[-1:].isdigit() else ""
        if re.search(r"(?<!\w)" + re.escape(" ".join(a.split()).lower()) + tail, text):
            return True
    return False


def books_dir(path: Path | None, default: Path = BOOKS, flag: str = "--books") -> Path:
    """path (the option flag), or default (shared/books/eval) beside or above the repository."""
    candidates = [path] if path is not None else [ROOT / default, ROOT.parent / default]
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("*.txt")):
            return candidate
    raise EvalError(f"no evaluation books (*.txt) in {' or '.join(map(str, candidates))}; pass {flag} DIR")


def read_books(directory: Path) -> list[str]:
    """Every book's text without its Project Gutenberg header and licence."""
    texts = []
    for path in sorted(directory.glob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        match = GUTENBERG.search(text)
        texts.append((match.group(1) if match else text).strip())
    return texts


@dataclass(frozen=True)
class Haystack:
    text: str
    needle_start: int  # character span of the fact in text
    needle_end: int
    depth: float  # where the fact landed: ordinary tokens before it / tokens of the haystack


def build_haystack(tokenizer, books: list[str], n_tokens: int, depth: float, fact: str,
                   rng: random.Random) -> Haystack:
    """About n_tokens of book text (fact included) starting at a random
    sentence, with fact written at the sentence boundary nearest to depth."""
    order = rng.sample(books, len(books))
    text = "\n\n".join(order)
    start = SENTENCE_END.search(text, rng.randrange(len(text)))
    if start is not None:  # start at a sentence, wrap around to the beginning
        text = text[start.end():] + "\n\n" + text[: start.end()]
    need = max(n_tokens - len(tokenizer(" " + fact, add_special_tokens=False).input_ids), 1)
    chars = need * 6 + 1000
    while True:
        piece = text[:chars]
        offsets = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) > need or chars >= len(text):
            break
        chars *= 2
    if len(offsets) < need:
        raise EvalError(f"the evaluation books hold {len(offsets):,} tokens, fewer than the {n_tokens:,} asked for")
    cut = offsets[need - 1][1]
    ends = [m.end() for m in SENTENCE_END.finditer(piece, 0, cut)]
    hay = piece[: ends[-1] if ends else cut].rstrip()
    starts = [s for s, _ in offsets]
    n_hay = bisect_left(starts, len(hay))
    target = len(hay) if depth >= 1 else starts[min(round(depth * n_hay), n_hay - 1)]
    bounds = [0] + [e for e in ends if e < len(hay)] + [len(hay)]
    i = bisect_left(bounds, target)
    pos = min(bounds[max(i - 1, 0) : i + 1], key=lambda b: abs(b - target))
    if pos == len(hay):
        text, at = hay + " " + fact, len(hay) + 1
    else:
        text, at = hay[:pos] + fact + " " + hay[pos:], pos
    return Haystack(text, at, at + len(fact), bisect_left(starts, pos) / max(n_hay, 1))


def one_file(text: str, title: str) -> Document:
    """text as the Document `lmqa ask` makes of a .txt file named title."""
    builder = DocumentBuilder(title)
    builder.add(title, "file", text, header=False)
    return builder.build()


@dataclass
class Trial:
    task: str
    method: str  # landmark (the engine), truncated (base model, last window) or full (base model, whole prompt)
    length: int  # requested tokens
    depth: float  # requested, 0..1
    trial: int
    tokens: int  # prompt tokens actually fed
    placed_depth: float
    question: str
    expected: list[str]
    answer: str
    correct: bool
    seconds: float
    evidence_hit: bool | None = None  # landmark only: a passage holds the fact
    evidence: list[str] = field(default_factory=list)  # file:line of each evidence passage
    refusal_scores: tuple[float, float] | None = None  # landmark only: log p of refusing vs the best other start


@dataclass(frozen=True)
class Settings:
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    trials: int
    seed: int = 0
    tasks: tuple[str, ...] = TASKS
    max_new_tokens: int = 64
    candidates: int = 1  # whole answers to choose among (SamplingConfig.candidates)
    max_full: int = 8192  # base model over the whole prompt up to this many tokens
    window: int = 8192  # the base model's own context: the truncated baseline keeps this much


class Evaluator:
    """Runs the grid. progress(n) reports engine positions prefilled."""

    def __init__(self, loaded: LoadedModel, engine: LandmarkEngine, settings: Settings, books: list[str],
                 needles: list[Needle], baseline: LoadedModel | None = None,
                 progress: Callable[[int], None] | None = None):
        self.loaded, self.engine, self.settings = loaded, engine, settings
        self.books, self.baseline, self.facts = books, baseline, needles
        self.progress = progress
        self.sampling = SamplingConfig(max_new_tokens=settings.max_new_tokens, candidates=settings.candidates)

    def cells(self) -> Iterator[tuple[str, int, float, int]]:
        s = self.settings
        for task in s.tasks:
            for length in s.lengths:
                for depth in s.depths:
                    for trial in range(s.trials):
                        yield task, length, depth, trial

    def positions(self) -> int:
        """Engine positions the whole run prefills (for a progress bar's total)."""
        b = self.loaded.landmark.block_size
        return sum(n + n // b for _, n, _, _ in self.cells())

    def run(self, task: str, length: int, depth: float, trial: int) -> list[Trial]:
        """One cell's trial: the landmark model's, then its baselines' results."""
        rng = random.Random(f"{self.settings.seed}/{task}/{length}/{depth}/{trial}")
        return getattr(self, f"_{task}")(rng, length, depth, trial)

    # ----- tasks -----
    def _needle(self, rng: random.Random, length: int, depth: float, trial: int) -> list[Trial]:
        needle = rng.choice(self.facts)
        prompt = QAPrompt(self.loaded, "document")
        overhead = len(self._ids(prompt.head)) + len(self._ids(prompt.tail(needle.question)))
        hay = build_haystack(self.loaded.tokenizer, self.books, length - overhead, depth, needle.fact, rng)
        document = one_file(hay.text, "haystack.txt")
        return self._ask(document, needle.question, list(needle.answers), (hay.needle_start, hay.needle_end),
                         ("needle", length, depth, trial, hay.depth))

    def _passkey(self, rng: random.Random, length: int, depth: float, trial: int) -> list[Trial]:
        tok = self.loaded.tokenizer
        case = make_case(tok, length, rng, depth)
        ids = tok(case.prompt).input_ids
        self.engine.reset()
        start = time.perf_counter()
        out = generate(self.engine, ids, SamplingConfig(max_new_tokens=8), {tok.eos_token_id}, on_prefill=self.progress)
        text = tok.decode(out, skip_special_tokens=True).strip()
        return [Trial("passkey", "landmark", length, depth, trial, len(ids), case.depth, "What is the pass key?",
                      [str(case.key)], text, first_integer(text) == case.key, time.perf_counter() - start)]

    # ----- asking -----
    def _ids(self, text: str) -> list[int]:
        return self.loaded.tokenizer(text, add_special_tokens=False).input_ids

    def _ask(self, document: Document, question: str, expected: list[str], span: tuple[int, int],
             where: tuple) -> list[Trial]:
        task, length, depth, trial, placed = where
        session = DocumentSession(self.loaded, self.engine, document)
        start = time.perf_counter()
        session.ingest(self.progress)
        answer = session.ask(question, self.sampling)
        seconds = time.perf_counter() - start
        found = passages(session, answer.evidence)
        tokens = session.prepare() + answer.timings.question_tokens
        results = [Trial(task, "landmark", length, depth, trial, tokens, placed, question, expected, answer.text,
                         is_correct(answer.text, expected), seconds,
                         holds(session, found, *span), [p.location for p in found],
                         answer.refusal_scores)]
        if self.baseline is not None:
            results += self._baselines(document, question, expected, where)
        return results

    def _baselines(self, document: Document, question: str, expected: list[str], where: tuple) -> list[Trial]:
        """The base model with its own full attention over the prompt's head,
        as much of the document's end as fits its window, and the question;
        and over the whole prompt where that fits --max-full."""
        task, length, depth, trial, placed = where
        s = self.settings
        session = DocumentSession(self.baseline, None, document)  # the same prompt, tokenized; no engine
        tok = self.baseline.tokenizer
        ids, tail = session.token_ids, tok(session.prompt.tail(question), add_special_tokens=False).input_ids
        head, body = ids[: session.doc_token_start], ids[session.doc_token_start :]
        room = max(s.window - len(head) - len(tail) - s.max_new_tokens, 0)
        runs = {"truncated": head + body[len(body) - min(room, len(body)) :] + tail}
        if len(ids) + len(tail) <= s.max_full:
            runs["full"] = ids + tail
        done: dict[tuple[int, ...], tuple[str, float]] = {}
        out = []
        for method, prompt in runs.items():
            key = tuple(prompt)
            if key not in done:  # a document that fits the window: truncation changes nothing
                start = time.perf_counter()
                generated = generate_full_attention(self.baseline.model, prompt, s.max_new_tokens, session.stop_ids())
                done[key] = (tok.decode(generated, skip_special_tokens=True).strip(), time.perf_counter() - start)
            text, seconds = done[key]
            out.append(Trial(task, method, length, depth, trial, len(prompt), placed, question, expected, text,
                             is_correct(text, expected), seconds))
        return out


def parse_depths(text: str) -> tuple[float, ...]:
    """"0,25,50" (percent) -> (0.0, 0.25, 0.5)."""
    try:
        depths = tuple(float(x) / 100 for x in text.split(",") if x.strip())
    except ValueError:
        raise EvalError(f"--depths must be comma-separated percentages, not {text!r}") from None
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise EvalError(f"--depths must be percentages from 0 to 100, not {text!r}")
    return depths
