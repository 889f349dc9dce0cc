"""`lmqa eval --tasks fairytaleqa,squad`: questions people wrote, scored as their papers score them.

bookqa's questions were written for this project; these two sets were not,
so they check the reader against questions nobody tuned it on (the data and
its provenance: shared/data/qa/*/SOURCE.md).

* fairytaleqa: FairytaleQA's test (or val) split. Each story is written out
  as a text file and read as `lmqa ingest` reads one (bookqa.open_book, its
  context kept for reruns), then every chosen question of the story is asked
  of the whole story. Score: ROUGE-L F1 against the two benchmark references
  (answer1, answer4), the better one, as the FairytaleQA paper scores.
* squad: SQuAD dev v1.1 and v2.0, only articles that training holds out
  (lmqa.train.real_qa_data.squad_heldout). A question's paragraph is put at a
  random paragraph boundary of at least --realqa-filler tokens of other
  articles' paragraphs (held-out ones first: text no trained model has seen;
  then the rest of the file, should they run short), so the reader must
  find it. Scores: the official EM and F1 (best
  gold answer) and whether the answer holds a gold answer, on answerable
  questions; for v2.0 also how often an unanswerable question is refused.

Beside every answer path, in the same run, the baseline: the document's
single best BM25 sentence for the question (bookqa.SentenceIndex), scored
the same way. It never refuses.

The answer path is pluggable: an Answerer takes the session (the document
already read) and the question and returns the answer's text and whether it
is the refusal. ANSWER_PATHS names the ones `--realqa-answer` can pick;
"ask" is today's DocumentSession.ask, as `lmqa ask` answers. A new answering
mode registers a factory there (SamplingConfig -> Answerer) and
`--realqa-answer ask,NEW` scores both on the same documents in one run.
"""

from __future__ import annotations

import json
import random
import re
import string
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rich.table import Table

from lmqa.engine.generation import SamplingConfig
from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.model.loading import LoadedModel
from lmqa.qa.prompts import REFUSAL
from lmqa.qa.session import DocumentSession
from lmqa.train.real_qa_data import squad_heldout
from .bookqa import Bar, SentenceIndex, open_book
from .tasks import ROOT, EvalError, is_correct, one_file

DATA = Path("shared/data/qa")  # relative to the repository (or the directory above it)
SPLITS = ("test", "val")
SQUAD_VERSIONS = ("1.1", "2.0")
BASELINE = "BM25 sentence"
PUNCTUATION = frozenset(string.punctuation)
LABELS = {"rouge_l": "ROUGE-L F1", "em": "EM", "f1": "F1", "holds": "holds gold", "no_answer": "refused unans.",
          "false_refusals": "refused ans."}


# ----- scores -----
def rouge_words(text: str) -> list[str]:
    """ROUGE's tokens (as rouge-score makes them, no stemming): lowercase runs of letters and digits."""
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of words over the lengths of both."""
    a, b = rouge_words(prediction), rouge_words(reference)
    if not a or not b:
        return 0.0
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    lcs = row[-1]
    if not lcs:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def squad_normalize(text: str) -> str:
    """The official SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def squad_em(prediction: str, golds: tuple[str, ...]) -> float:
    return float(any(squad_normalize(prediction) == squad_normalize(g) for g in golds))


def squad_f1(prediction: str, golds: tuple[str, ...]) -> float:
    """The official token F1, the best over the gold answers."""
    def f1(gold: str) -> float:
        p, g = squad_normalize(prediction).split(), squad_normalize(gold).split()
        common = sum((Counter(p) & Counter(g)).values())
        return 0.0 if not common else 2 * common / (len(p) + len(g))

    return max(map(f1, golds), default=0.0)


# ----- answer paths -----
Answerer = Callable[[DocumentSession, str], tuple[str, bool]]  # (session, question) -> (answer text, refused)


def ask_path(sampling: SamplingConfig) -> Answerer:
    """Today's answer path: DocumentSession.ask, as `lmqa ask` calls it. The
    refusal is the whole answer (abstention.py forces all of its tokens)."""
    def answer(session: DocumentSession, question: str) -> tuple[str, bool]:
        text = session.ask(question, sampling).text
        return text, text == REFUSAL

    return answer


def one_pass_path(quote: bool) -> Callable[[SamplingConfig], Answerer]:
    """One read of the question and a greedy answer (no candidate search):
    held to the document's text with quote=True, in the model's words without."""
    def make(sampling: SamplingConfig) -> Answerer:
        one = replace(sampling, candidates=1, temperature=0.0)

        def answer(session: DocumentSession, question: str) -> tuple[str, bool]:
            was, session.quote = session.quote, quote
            try:
                text = session.ask(question, one).text
            finally:
                session.quote = was
            return text, text == REFUSAL

        return answer

    return make


ANSWER_PATHS: dict[str, Callable[[SamplingConfig], Answerer]] = {
    "ask": ask_path, "greedy": one_pass_path(quote=True), "free": one_pass_path(quote=False)}


def answer_paths(names: list[str], sampling: SamplingConfig) -> dict[str, Answerer]:
    """The named paths (ANSWER_PATHS), each made once for the run."""
    unknown = [n for n in names if n not in ANSWER_PATHS]
    if unknown or not names or BASELINE in names:
        raise EvalError(f"--realqa-answer must name some of {', '.join(ANSWER_PATHS)}, not {','.join(names)!r}")
    return {n: ANSWER_PATHS[n](sampling) for n in dict.fromkeys(names)}


# ----- questions -----
@dataclass(frozen=True)
class RealQuestion:
    set: str  # "fairytaleqa test", "squad v1.1", ...
    group: str  # the story, or the SQuAD article's title
    id: str
    question: str
    references: tuple[str, ...]  # the answers scored against; empty: SQuAD v2.0's unanswerable
    paragraph: str = ""  # SQuAD: the paragraph the question was written about


def data_dir(path: Path | None) -> Path:
    """path (--realqa-dir), or shared/data/qa beside or above the repository."""
    candidates = [path] if path is not None else [ROOT / DATA, ROOT.parent / DATA]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise EvalError(f"no QA data directory at {' or '.join(map(str, candidates))}; pass --realqa-dir DIR")


def _records(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise EvalError(f"{path}: no such file; --realqa-dir must hold fairytaleqa/ and squad-dev/") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: not JSON lines ({e})") from None


def fairytaleqa(root: Path, split: str, limit: int | None, seed: int) -> tuple[list[RealQuestion], dict[str, str]]:
    """The split's questions, `limit` of them spread over its stories (a
    seeded shuffle of stories and of each story's questions, then one
    question of each story in turn), grouped by story; and the texts of
    their stories."""
    folder = root / "fairytaleqa"
    by_story: dict[str, list[RealQuestion]] = {}
    try:
        stories = {r["story"]: r["text"] for r in _records(folder / f"stories_{split}.jsonl")}
        for r in _records(folder / f"qa_{split}.jsonl"):
            if r["story"] not in stories:
                raise EvalError(f"{folder}: question {r['id']} is about {r['story']!r}, "
                                f"which stories_{split}.jsonl lacks")
            references = tuple(a for a in (r["answer1"], r["answer4"]) if a and a.strip())
            by_story.setdefault(r["story"], []).append(
                RealQuestion(f"fairytaleqa {split}", r["story"], r["id"], r["question"], references))
    except (KeyError, TypeError) as e:
        raise EvalError(f"{folder}: a {split} record lacks the field {e}") from None
    rng = random.Random(f"{seed}/fairytaleqa/{split}")
    order = sorted(by_story)
    rng.shuffle(order)
    queues = [rng.sample(by_story[s], len(by_story[s])) for s in order]
    taken = _round_robin(queues, limit)
    return [q for s in order for q in taken if q.group == s], {s: stories[s] for s in {q.group for q in taken}}


def _round_robin(queues: list[list], limit: int | None) -> list:
    """The first of each queue, then the second of each, ..., up to limit."""
    out = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    return out if limit is None else out[:limit]


@dataclass(frozen=True)
class SquadFile:
    version: str
    articles: dict[str, list[str]]  # title -> paragraphs, in file order
    questions: list[RealQuestion]  # on held-out articles only


def squad(root: Path, version: str) -> SquadFile:
    """One SQuAD dev file: every article's paragraphs (the filler) and the
    questions about held-out articles."""
    path = root / "squad-dev" / f"dev-v{version}.json"
    articles, questions = {}, []
    try:
        for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
            title = article["title"]
            articles[title] = [p["context"] for p in article["paragraphs"]]
            if squad_heldout(title):
                for p in article["paragraphs"]:
                    for qa in p["qas"]:
                        answers = [] if qa.get("is_impossible") else qa["answers"]
                        golds = tuple(dict.fromkeys(a["text"] for a in answers))
                        questions.append(RealQuestion(f"squad v{version}", title, qa["id"], qa["question"], golds,
                                                      p["context"]))
    except FileNotFoundError:
        raise EvalError(f"{path}: no such file; --realqa-dir must hold fairytaleqa/ and squad-dev/") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise EvalError(f"{path}: not a SQuAD JSON file ({type(e).__name__}: {e})") from None
    return SquadFile(version, articles, questions)


def pick_squad(questions: list[RealQuestion], limit: int | None, seed: int) -> list[RealQuestion]:
    """`limit` questions in a seeded order; answerable and unanswerable ones
    alternate (v2.0), so a short run still measures both."""
    rng = random.Random(f"{seed}/{questions[0].set}" if questions else seed)
    answerable = [q for q in questions if q.references]
    unanswerable = [q for q in questions if not q.references]
    return _round_robin([rng.sample(g, len(g)) for g in (answerable, unanswerable) if g], limit)


@dataclass(frozen=True)
class Placed:
    """A question's document: its paragraph among filler paragraphs."""

    text: str
    start: int  # character span of the paragraph in text
    end: int
    filler_tokens: int  # tokens of the filler alone (its paragraphs joined as in text)
    depth: float  # filler tokens before the paragraph / filler_tokens


def place(tokenizer, question: RealQuestion, articles: dict[str, list[str]], tokens: int,
          rng: random.Random) -> Placed:
    """The question's paragraph at a random paragraph boundary of at least
    `tokens` tokens of other articles' paragraphs, blank lines between:
    held-out articles' paragraphs first (shuffled), then the others'."""
    def count(parts: list[str]) -> int:
        return len(tokenizer("\n\n".join(parts), add_special_tokens=False).input_ids)

    held, rest = [], []
    for title, paragraphs in articles.items():
        if title != question.group:
            (held if squad_heldout(title) else rest).extend(paragraphs)
    pool = rng.sample(held, len(held)) + rng.sample(rest, len(rest))
    chosen: list[str] = []
    estimate = 0  # the pieces' sum; the joined text is counted once the sum is enough
    for paragraph in pool:
        if estimate >= tokens and count(chosen) >= tokens:
            break
        chosen.append(paragraph)
        estimate += len(tokenizer(paragraph, add_special_tokens=False).input_ids)
    total = count(chosen)
    if total < tokens:
        raise EvalError(f"{question.set}: the other articles hold {total:,} tokens, "
                        f"fewer than the {tokens:,} of filler asked for")
    at = rng.randint(0, len(chosen))
    before = "\n\n".join(chosen[:at])
    start = len(before) + 2 if at else 0
    text = "\n\n".join(chosen[:at] + [question.paragraph] + chosen[at:])
    return Placed(text, start, start + len(question.paragraph), total, count(chosen[:at]) / total if at else 0.0)


# ----- asking -----
@dataclass
class Reply:
    answer: str
    refused: bool
    seconds: float
    scores: dict[str, float]


@dataclass
class RealResult:
    set: str
    group: str
    id: str
    question: str
    references: list[str]
    document: str  # the name of the document it was asked of
    depth: float | None  # squad: where the paragraph was put
    replies: dict[str, Reply]  # per answer path, then the BM25 sentence's


@dataclass
class DocumentRun:
    """One document read once and the questions asked of it."""

    set: str
    name: str
    tokens: int
    ingest_seconds: float  # 0 when a kept context was reused
    results: list[RealResult] = field(default_factory=list)


def scores(question: RealQuestion, text: str, refused: bool) -> dict[str, float]:
    """The set's scores for one answer (see the module docstring)."""
    if question.set.startswith("fairytaleqa"):
        return {"rouge_l": max((rouge_l(text, r) for r in question.references), default=0.0)}
    if not question.references:
        return {"no_answer": float(refused)}
    return {"em": squad_em(text, question.references), "f1": squad_f1(text, question.references),
            "holds": float(is_correct(text, question.references))}


def ask_all(session: DocumentSession, run: DocumentRun, questions: list[RealQuestion], paths: dict[str, Answerer],
            depth: float | None = None, on_result: Callable[[RealResult], None] | None = None) -> None:
    """Every question asked of the session through every path, and the BM25 sentence, scored."""
    index = SentenceIndex(session.document)
    for q in questions:
        replies = {}
        for name, answer in paths.items():
            start = time.perf_counter()
            text, refused = answer(session, q.question)
            replies[name] = Reply(text, refused, time.perf_counter() - start, scores(q, text, refused))
        start = time.perf_counter()
        best = index.search(q.question).text
        replies[BASELINE] = Reply(best, False, time.perf_counter() - start, scores(q, best, False))
        result = RealResult(q.set, q.group, q.id, q.question, list(q.references), run.name, depth, replies)
        run.results.append(result)
        if on_result is not None:
            on_result(result)


def run_fairytaleqa(questions: list[RealQuestion], stories: dict[str, str], loaded: LoadedModel,
                    engine: LandmarkEngine, paths: dict[str, Answerer], out: Path, bar: Bar | None = None,
                    on_result: Callable[[RealResult], None] | None = None) -> list[DocumentRun]:
    """Each story written to OUT/stories/STORY.txt, read whole (its context
    kept in OUT/contexts) and asked its questions."""
    runs = []
    (out / "stories").mkdir(parents=True, exist_ok=True)
    for story in dict.fromkeys(q.group for q in questions):
        path = out / "stories" / f"{story}.txt"
        path.write_text(stories[story], encoding="utf-8")
        session, seconds = open_book(path, loaded, engine, out / "contexts", bar)
        run = DocumentRun(questions[0].set, path.name, len(session.token_ids), seconds)
        ask_all(session, run, [q for q in questions if q.group == story], paths, on_result=on_result)
        runs.append(run)
    return runs


def run_squad(questions: list[RealQuestion], articles: dict[str, list[str]], loaded: LoadedModel,
              engine: LandmarkEngine, paths: dict[str, Answerer], filler: int, seed: int, bar: Bar | None = None,
              on_result: Callable[[RealResult], None] | None = None) -> list[DocumentRun]:
    """Each question asked of its own document (place()), seeded by the
    question alone so a question's document does not depend on the others run."""
    runs = []
    for q in questions:
        placed = place(loaded.tokenizer, q, articles, filler, random.Random(f"{seed}/{q.set}/{q.id}"))
        session = DocumentSession(loaded, engine, one_file(placed.text, f"{q.id}.txt"))
        display, advance = bar(session.positions) if bar is not None else (nullcontext(), None)
        with display:
            stats = session.ingest(advance)
        run = DocumentRun(q.set, f"{q.id}.txt", stats.tokens, stats.seconds)
        ask_all(session, run, [q], paths, placed.depth, on_result)
        runs.append(run)
    return runs


# ----- reporting -----
def said(result: RealResult) -> str:
    """One question's scores per method, for a progress line."""
    parts = []
    for name, reply in result.replies.items():
        if "no_answer" in reply.scores:  # unanswerable: refusing is the right answer
            parts.append(f"{name} {'refused' if reply.refused else 'answered'}")
        else:
            values = ", ".join(f"{LABELS[k]} {v:.2f}" for k, v in reply.scores.items())
            parts.append(f"{name}{' (refused)' if reply.refused else ''} {values}")
    return "; ".join(parts)


def summary(runs: list[DocumentRun]) -> list[dict]:
    """Per set and method: questions, mean document tokens, each score's mean
    over the questions it applies to, how often an answerable question was
    refused, seconds per question."""
    rows = []
    for name in dict.fromkeys(r.set for r in runs):
        group = [r for r in runs if r.set == name]
        results = [x for r in group for x in r.results]
        if not results:
            continue
        tokens = round(sum(r.tokens * len(r.results) for r in group) / len(results))
        for method in results[0].replies:
            replies = [x.replies[method] for x in results]
            row = {"set": name, "method": method, "questions": len(results),
                   "answerable": sum(bool(x.references) for x in results), "tokens": tokens}
            for key in LABELS:
                values = [r.scores[key] for r in replies if key in r.scores]
                if values:
                    row[key] = round(sum(values) / len(values), 4)
            refused = [r.refused for x, r in zip(results, replies) if x.references]
            if refused:
                row["false_refusals"] = round(sum(refused) / len(refused), 4)
            row["seconds_per_question"] = round(sum(r.seconds for r in replies) / len(replies), 2)
            rows.append(row)
    return rows


def report(runs: list[DocumentRun], model: str, sampling: SamplingConfig, settings: dict) -> dict:
    """The JSON result: settings, the summary rows, the documents read and every question's result."""
    return {"model": model, "sampling": asdict(sampling), "settings": settings, "summary": summary(runs),
            "documents": [{"set": r.set, "name": r.name, "tokens": r.tokens,
                           "ingest_seconds": round(r.ingest_seconds, 1)} for r in runs],
            "results": [asdict(x) for r in runs for x in r.results]}


def table(rows: list[dict], title: str) -> Table:
    """Per set (named on its first row), each answer path and the BM25
    sentence; scores in percent; the documents' mean tokens."""
    keys = [k for k in LABELS if any(k in r for r in rows)]
    out = Table(title=title)
    out.add_column("set")
    out.add_column("method")
    for col in ("asked", "tokens", *(LABELS[k] for k in keys), "s/q"):
        out.add_column(col, justify="right")
    for i, r in enumerate(rows):
        first, last = i == 0 or rows[i - 1]["set"] != r["set"], i + 1 == len(rows) or rows[i + 1]["set"] != r["set"]
        out.add_row(r["set"] if first else "", r["method"], str(r["questions"]), f"{r['tokens']:,}",
                    *(f"{100 * r[k]:.1f}" if k in r else "" for k in keys), f"{r['seconds_per_question']:.1f}",
                    end_section=last)
    return out
