"""Calibrate a model's refusal margin (lmqa/qa/abstention.py) on
questions asked of haystacks cut from the TRAINING books: facts drawn as
lmqa's QA training draws them (lmqa/train/qa_data.py), or with --needles the
hand-written validation facts of prompts/validation_needles.jsonl (worded
unlike the training templates, as users' questions are); asked either for a
written fact or for one that is not written. Never on evaluation books or
needles.

Each case is answered once with refusals ruled out (margin = inf), which
records the answer the model gives when it must answer and the two scores
the margin is compared with; the margin that a user would want is then a
choice over those records (choose_margin).

    python scripts/calibrate_refusal.py --cases 120 --lengths 2000,4000,8000,32000 -o /tmp/calib.jsonl
    python scripts/calibrate_refusal.py --needles prompts/validation_needles.jsonl --cases 120 \
        --lengths 2000,4000,8000,32000 -o /tmp/calib-validation.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import torch

from lmqa.engine.generation import SamplingConfig
from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.evaluation.tasks import build_haystack, is_correct, load_needles, one_file, read_books
from lmqa.model.loading import load_model
from lmqa.qa.abstention import choose_margin
from lmqa.qa.evidence import holds, passages
from lmqa.qa.session import DocumentSession
from lmqa.train.qa_data import fact_family, insert_at_sentences

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--books", type=Path, default=ROOT.parent / "shared/books/train")
    ap.add_argument("--cases", type=int, default=60)
    ap.add_argument("--lengths", default="2000,4000,8000")
    ap.add_argument("--answerable", type=float, default=0.75, help="share of questions a user asks that the document answers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--candidates", type=int, default=4, help="whole answers to choose among, as `lmqa ask --candidates`")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--top-k", type=int, default=None, help="blocks retrieved per head and step, as `lmqa ask -k`")
    ap.add_argument("--needles", type=Path, default=None,
                    help="hand-written validation facts (prompts/validation_needles.jsonl) instead of training-shaped ones")
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args()
    loaded = load_model(args.model, device=args.device, top_k=args.top_k)
    engine = LandmarkEngine(loaded.model, loaded.landmark, offload="auto")
    books = read_books(args.books)
    lengths = [int(x) for x in args.lengths.split(",")]
    needles = load_needles(args.needles) if args.needles else []
    records = []
    with args.out.open("w") as out:
        for i in range(args.cases):
            rng = random.Random(f"calibrate/{args.seed}/{i}")
            length = lengths[i % len(lengths)]
            answerable = (i // len(lengths)) % 2 == 0  # both kinds at every length
            if needles:  # a validation fact; unanswerable: another one is written in, this one asked
                asked_needle = needles[(i // 2) % len(needles)]
                written = asked_needle if answerable else needles[(i // 2 + 1) % len(needles)]
                sentences, question, accepted = [written.fact], asked_needle.question, list(asked_needle.answers)
            else:
                facts, asked, missing = fact_family(rng, rng.randint(1, 4))
                sentences = [f.sentence for f in facts]
                question = rng.choice(asked.questions if answerable else missing.questions)
                accepted = [asked.answer]
            hay = build_haystack(loaded.tokenizer, books, length - 80, rng.random(), sentences[0], rng)
            text = insert_at_sentences(hay.text, sentences[1:], rng)
            session = DocumentSession(loaded, engine, one_file(text, "haystack.txt"))
            session.ingest()
            loaded_margin, loaded.abstain_margin = loaded.abstain_margin, math.inf  # answer, but score the refusal
            try:
                answer = session.ask(question, SamplingConfig(max_new_tokens=64, candidates=args.candidates))
            finally:
                loaded.abstain_margin = loaded_margin
            refusal, best = answer.refusal_scores
            at = text.find(sentences[0])
            held = holds(session, passages(session, answer.evidence), at, at + len(sentences[0]))
            record = dict(case=i, length=length, answerable=answerable, question=question, written=sentences[0],
                          answer=answer.text, correct=answerable and is_correct(answer.text, accepted),
                          evidence_hit=held, refusal=refusal, best=best)
            records.append(record)
            out.write(json.dumps(record) + "\n")
            out.flush()
            print(f"{i} {length} {'answerable' if answerable else 'unanswerable'} refusal {refusal:.2f} best {best:.2f} "
                  f"{'ok' if record['correct'] else '--'} {answer.text[:70]!r}", file=sys.stderr)
    for length in lengths:
        asked = [r for r in records if r["length"] == length and r["answerable"]]
        if asked:
            print(f"{length}: answerable right (refusal ruled out) {sum(r['correct'] for r in asked)}/{len(asked)}, "
                  f"evidence holds the fact {sum(r['evidence_hit'] for r in asked)}/{len(asked)}")
    margin, scores = choose_margin(records, args.answerable)
    for m, (ans, unans, total) in sorted(scores.items()):
        print(f"margin {m:5.1f}: answerable right {ans:.0%}, unanswerable refused {unans:.0%}, "
              f"expected right at {args.answerable:.0%} answerable {total:.1%}")
    print(f"chosen margin: {margin}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
