"""`lmqa bench --answers`: how long a question takes, per answer path, in one run.

A document is cut to each length and read once, as `lmqa serve` holds a
context; every question is then answered by every answer path (candidate
search with N candidates, one pass with 1) from that same state, so the
paths' ratio holds on a busy machine. With fresh=True each answer is also
timed as a user's one-off `lmqa ask CTX.lmqa` in a new process (model load,
context file, answer), from a context file saved once per length.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmqa.engine.generation import SamplingConfig
from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.model.loading import LoadedModel
from lmqa.qa.session import DocumentSession
from .tasks import one_file

QUESTIONS = ("Who tells the story?", "Where does the story begin?")
ANSWER_TOKENS = 64  # the longest answer timed, as lmqa eval's default


@dataclass
class AnswerRow:
    tokens: int  # the document's tokens
    candidates: int  # the answer path: 1 = one pass, N = candidate search
    question: str
    total_s: float  # the call to the answer's end
    first_token_s: float | None  # None in a fresh process (it prints no timings we read)
    question_tokens: int
    answer_tokens: int
    answer: str
    fresh: bool = False  # a new `lmqa ask` process from the saved context file


def cut(tokenizer, text: str, n_tokens: int) -> str:
    """The first n_tokens tokens of text (repeated as often as it takes), cut
    at a token boundary."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if not enc.input_ids:
        raise ValueError("the document holds no text")
    if len(enc.input_ids) < n_tokens:  # repeat it, then cut the whole
        text = "\n\n".join([text] * -(-n_tokens // len(enc.input_ids)))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return text if len(enc.input_ids) <= n_tokens else text[: enc.offset_mapping[n_tokens][0]]


def bench_answers(loaded: LoadedModel, engine: LandmarkEngine, text: str, lengths: list[int],
                  questions: tuple[str, ...], candidates: list[int], max_new_tokens: int,
                  fresh_flags: list[str] | None = None, status: Callable[[str], None] = lambda m: None
                  ) -> list[AnswerRow]:
    """Rows for every length x question x path (the paths in turn per
    question, from the same state). fresh_flags: time each answer as a new
    `lmqa ask CTX Q -c N` process too, with these flags (the model, the
    device); None: not."""
    from lmqa.qa.context_file import save

    rows = []
    for n in lengths:
        status(f"reading {n:,} tokens")
        session = DocumentSession(loaded, engine, one_file(cut(loaded.tokenizer, text, n), "document.txt"))
        session.ingest()
        for question in questions:
            for c in candidates:
                status(f"{n:,} tokens, -c {c}: {question}")
                answer = session.ask(question, SamplingConfig(max_new_tokens=max_new_tokens, candidates=c))
                t = answer.timings
                rows.append(AnswerRow(n, c, question, t.first_token_s + t.generate_s, t.first_token_s,
                                      t.question_tokens, t.answer_tokens, answer.text))
        if fresh_flags is None:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.lmqa"
            save(session, path)
            for question in questions:
                for c in candidates:
                    status(f"{n:,} tokens, a new `lmqa ask` process, -c {c}: {question}")
                    start = time.perf_counter()
                    done = subprocess.run([sys.executable, "-m", "lmqa", "ask", str(path), question, "-c", str(c),
                                           "-n", str(max_new_tokens), "--json", *fresh_flags],
                                          capture_output=True, text=True)
                    seconds = time.perf_counter() - start
                    if done.returncode:
                        raise RuntimeError(f"lmqa ask failed: {done.stderr.strip().splitlines()[-1:]}")
                    rows.append(AnswerRow(n, c, question, seconds, None, 0, 0, _answer_of(done.stdout), fresh=True))
    return rows


def _answer_of(stdout: str) -> str:
    return json.loads(stdout.strip().splitlines()[-1])["answer"]


def summary(rows: list[AnswerRow]) -> list[dict]:
    """Per length, path and kind (held context or fresh process): the median
    total and first-token seconds, and the search's total over the one
    pass's where both ran."""
    out = []
    keys = dict.fromkeys((r.tokens, r.fresh, r.candidates) for r in rows)
    for tokens, fresh, c in keys:
        group = [r for r in rows if (r.tokens, r.fresh, r.candidates) == (tokens, fresh, c)]
        firsts = [r.first_token_s for r in group if r.first_token_s is not None]
        out.append({"tokens": tokens, "fresh": fresh, "candidates": c,
                    "total_s": statistics.median(r.total_s for r in group),
                    "first_token_s": statistics.median(firsts) if firsts else None,
                    "answer_tokens": statistics.median(r.answer_tokens for r in group) if not fresh else None})
    for row in out:
        one = next((o for o in out if (o["tokens"], o["fresh"], o["candidates"]) == (row["tokens"], row["fresh"], 1)), None)
        row["vs_one_pass"] = row["total_s"] / one["total_s"] if one else None
    return out
