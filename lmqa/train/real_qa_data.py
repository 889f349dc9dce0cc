"""Training QA from human-written questions, so the reader learns questions as
people ask them rather than only the templated ones of qa_data.py and
book_qa_data.py.

Two sources, both under one folder (`--qa-data`, ../shared/data/qa):

- FairytaleQA (fairytaleqa/): questions written by education experts about
  whole fairy tales. Only the train split is ever read (its val and test
  stories are the held-out check of a trained reader); a record of another
  split is an error. The story is the document, whole when it fits, else a
  window of whole sentences that holds the question's evidence sections
  (cor_section) at a random place. More questions about the same story may
  follow as chat follow-ups when their evidence is in the window too.
- SQuAD dev v1.1 and v2.0 (squad-dev/): questions about a Wikipedia
  paragraph, which is hidden at a random depth among other text (paragraphs
  of other articles, or whole sentences of the training books' token
  stream) up to the sequence length, so the answer must be found by
  retrieval. v2.0's unanswerable questions answer the refusal sentence. A
  tenth of the articles (squad_heldout) is kept out for evaluation, in both
  versions. v2.0 repeats v1.1's answerable questions (same ids): each
  question is used once.

Answers are short, as a reader writes them: the annotator's words, first
letter capitalised, ending with a period ("Delightfully cold.").
Examples are rendered by QASampler's own code, so they are exactly what
`lmqa ask` feeds a session, with the loss on the answers only.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lmqa.qa.sentences import sentence_spans

from .data import Example
from .qa_data import NOT_SAID, QASampler

FAIRYTALE_DIR, FAIRYTALE_FILES = "fairytaleqa", ("qa_train.jsonl", "stories_train.jsonl")
SQUAD_DIR, SQUAD_FILES = "squad-dev", ("dev-v1.1.json", "dev-v2.0.json")
# Of SQuAD's first questions (v2.0 alone is half unanswerable); follow-ups about v1.1-only articles are all
# answerable, so about 13% of all SQuAD questions asked and 20% of SQuAD examples hold one (measured).
UNANSWERABLE_SHARE = 0.15
BOOK_FILLER_SHARE = 0.5  # of SQuAD documents padded with book text rather than other paragraphs
TURNS = (1, 1, 2, 3)  # questions per example, drawn as QASampler draws them
TRIES = 50  # draws before giving up: only a context too small for any question exhausts them

_END = re.compile(r"[.!?][\"'’”)\]]*$")


def squad_heldout(title: str) -> bool:
    """Whether a SQuAD article is kept out of training (for `lmqa eval`): a
    stable hash of its title, so v1.1 and v2.0 hold out the same articles on
    every machine (Python's hash() varies between runs)."""
    return int(hashlib.sha256(title.encode()).hexdigest(), 16) % 10 == 0


def as_answer(text: str) -> str:
    """An annotator's answer as the reader should say it: whitespace
    collapsed, first letter capitalised, ending with a sentence end."""
    text = " ".join(text.split()).rstrip(",;:")
    text = text[:1].upper() + text[1:]
    return text if _END.search(text) else text + "."


# ----- FairytaleQA -----
@dataclass(frozen=True)
class Story:
    name: str
    text: str
    sections: dict[int, tuple[int, int]]  # section number -> character span in text


@dataclass(frozen=True)
class TaleQuestion:
    story: str
    question: str
    answers: tuple[str, ...]  # distinct, as as_answer writes them
    sections: tuple[int, ...]  # the evidence (cor_section)


def _train_records(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for r in records:
        if r.get("split") != "train":  # val and test judge the trained reader: never train on them
            raise ValueError(f"{path}: record of split {r.get('split')!r}; only the train split may be trained on")
    return records


class FairytaleQA:
    """FairytaleQA's train split: stories by name and their questions."""

    def __init__(self, folder: Path):
        qa_file, story_file = (folder / name for name in FAIRYTALE_FILES)
        self.stories: dict[str, Story] = {}
        for r in _train_records(story_file):
            spans, at = {}, 0
            for section in r["sections"]:
                start = r["text"].index(section["text"], at)
                spans[int(section["section"])] = (start, start + len(section["text"]))
                at = start + len(section["text"])
            self.stories[r["story"]] = Story(r["story"], r["text"], spans)
        self.questions: list[TaleQuestion] = []
        self.by_story: dict[str, list[TaleQuestion]] = {}
        for r in _train_records(qa_file):
            answers = tuple(dict.fromkeys(as_answer(a) for a in (r["answers"] or [r["answer1"]]) if a.strip()))
            story = self.stories.get(r["story"])
            if not answers or story is None or not set(r["cor_section"]) <= set(story.sections):
                raise ValueError(f"{qa_file}: question {r['id']} has no answer, story or evidence section")
            q = TaleQuestion(r["story"], r["question"].strip(), answers, tuple(r["cor_section"]))
            self.questions.append(q)
            self.by_story.setdefault(q.story, []).append(q)


# ----- SQuAD -----
@dataclass(frozen=True)
class SquadQuestion:
    paragraph: int  # index into SquadQA.paragraphs
    question: str
    answer: str  # NOT_SAID for v2.0's unanswerable questions


class SquadQA:
    """SQuAD dev v1.1 + v2.0 less the held-out articles, each question once."""

    def __init__(self, folder: Path):
        self.paragraphs: list[tuple[str, str]] = []  # (title, text)
        self.questions: list[SquadQuestion] = []
        index: dict[tuple[str, str], int] = {}
        seen_ids: set[str] = set()
        seen_questions: set[tuple[int, str]] = set()  # a question asked twice of one paragraph, under two ids
        for name in SQUAD_FILES:
            for article in json.loads((folder / name).read_text(encoding="utf-8"))["data"]:
                if squad_heldout(article["title"]):
                    continue
                for p in article["paragraphs"]:
                    key = (article["title"], p["context"])
                    if key not in index:
                        index[key] = len(self.paragraphs)
                        self.paragraphs.append(key)
                    for q in p["qas"]:
                        question = " ".join(q["question"].split())
                        if q["id"] in seen_ids or (index[key], question) in seen_questions:
                            continue
                        seen_ids.add(q["id"])
                        seen_questions.add((index[key], question))
                        texts = [a["text"] for a in q["answers"] if a["text"].strip()]
                        if q.get("is_impossible") or not texts:
                            answer = NOT_SAID
                        else:
                            answer = as_answer(min(texts, key=len))
                        self.questions.append(SquadQuestion(index[key], question, answer))
        self.answerable = [q for q in self.questions if q.answer != NOT_SAID]
        self.unanswerable = [q for q in self.questions if q.answer == NOT_SAID]
        self.by_paragraph: dict[int, list[SquadQuestion]] = {}
        for q in self.questions:
            self.by_paragraph.setdefault(q.paragraph, []).append(q)


def load_real_qa(folder: Path) -> tuple[FairytaleQA | None, SquadQA | None]:
    """The sources found under folder (fairytaleqa/, squad-dev/); an error
    naming the files looked for when there is neither."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such directory")
    have = lambda sub, files: all((folder / sub / f).is_file() for f in files)
    fairytale = FairytaleQA(folder / FAIRYTALE_DIR) if have(FAIRYTALE_DIR, FAIRYTALE_FILES) else None
    squad = SquadQA(folder / SQUAD_DIR) if have(SQUAD_DIR, SQUAD_FILES) else None
    if fairytale is None and squad is None:
        raise FileNotFoundError(f"{folder}: holds neither {FAIRYTALE_DIR}/{{{','.join(FAIRYTALE_FILES)}}} nor "
                                f"{SQUAD_DIR}/{{{','.join(SQUAD_FILES)}}}")
    return fairytale, squad


def window(costs: list[int], first: int, last: int, budget: int, rng) -> tuple[int, int]:
    """Units [start, end) around the evidence units first..last (inclusive)
    that cost at most budget: a random share of the room goes before the
    evidence, the rest after, and room left at the text's end goes before."""
    evidence = sum(costs[first:last + 1])
    before = rng.randint(0, budget - evidence)
    start, end, used = first, last + 1, evidence
    while start > 0 and used + costs[start - 1] <= evidence + before:
        start -= 1
        used += costs[start]
    while end < len(costs) and used + costs[end] <= budget:
        used += costs[end]
        end += 1
    while start > 0 and used + costs[start - 1] <= budget:
        start -= 1
        used += costs[start]
    return start, end


# ----- the sampler -----
class RealQASampler(QASampler):
    """Draws a FairytaleQA or SQuAD example with probability rate (FairytaleQA
    for a share fairytale_share of them), otherwise delegates to `base`, and
    shares base's rng so a checkpoint resumes it. A QASampler for its
    rendering (head, tails, end of turn, loss positions), so every QA source
    teaches one prompt format; only what is drawn differs.

    book_slice(n) -> n tokens of the training text (ExampleSampler._slice),
    used to pad SQuAD documents; without it they are padded with other
    SQuAD paragraphs only."""

    def __init__(self, base, prompt, rate: float, fairytale: FairytaleQA | None = None, squad: SquadQA | None = None,
                 fairytale_share: float = 0.5, book_slice: Callable[[int], list[int]] | None = None,
                 unanswerable_share: float = UNANSWERABLE_SHARE):
        if fairytale is None and squad is None:
            raise ValueError("RealQASampler needs FairytaleQA or SQuAD data")
        super().__init__(base, {"document": prompt}, rate)
        self.fairytale, self.squad = fairytale, squad
        self.fairytale_share = 0.0 if fairytale is None else 1.0 if squad is None else fairytale_share
        self.book_slice = book_slice
        self.unanswerable_share = unanswerable_share if squad and squad.unanswerable else 0.0
        self._story_units: dict[str, tuple[list[tuple[int, int]], list[int]]] = {}  # tokenized once, when first drawn
        self._paragraph_ids: dict[int, list[int]] = {}

    def sample(self) -> Example:
        if self.rng.random() >= self.qa_rate:
            return self.base.sample()
        if self.rng.random() < self.fairytale_share:
            return self._tale()
        return self._squad()

    def _turns(self, asked: list[tuple[str, str]]) -> tuple[list, int]:
        """Encoded turns and the tokens left for the document."""
        turns = self._encode_turns("document", asked)
        return turns, self._budget("document", turns)

    # --- FairytaleQA ---
    def _units(self, story: Story) -> tuple[list[tuple[int, int]], list[int]]:
        """A story's sentences (a window starts and ends at one) and the tokens
        each takes with the whitespace after it."""
        if story.name not in self._story_units:
            units = sentence_spans(story.text)
            pieces = [story.text[a:b] for (a, _), (b, _) in zip(units, units[1:])]
            pieces.append(story.text[units[-1][0]:units[-1][1]])
            costs = [len(ids) for ids in self.tok(pieces, add_special_tokens=False).input_ids]
            self._story_units[story.name] = units, costs
        return self._story_units[story.name]

    def _evidence(self, story: Story, questions: list[TaleQuestion]) -> tuple[int, int]:
        """The first and last unit of the questions' evidence sections."""
        units, _ = self._units(story)
        spans = [story.sections[s] for q in questions for s in q.sections]
        first = bisect.bisect_right([b for _, b in units], min(a for a, _ in spans))
        last = bisect.bisect_left([a for a, _ in units], max(b for _, b in spans)) - 1
        return first, last

    def _tale(self) -> Example:
        rng = self.rng
        for _ in range(TRIES):
            q = rng.choice(self.fairytale.questions)
            story = self.fairytale.stories[q.story]
            _, costs = self._units(story)
            asked, pairs = [q], [(q.question, rng.choice(q.answers))]
            turns, budget = self._turns(pairs)
            first, last = self._evidence(story, asked)
            if sum(costs[first:last + 1]) > budget:
                continue  # evidence sections far apart: longer than the sequence
            want = rng.choice(TURNS)
            others = [o for o in self.fairytale.by_story[q.story] if o is not q]
            rng.shuffle(others)
            for other in others[:10]:  # follow-ups whose evidence fits in the same window
                if len(asked) == want:
                    break
                more = pairs + [(other.question, rng.choice(other.answers))]
                more_turns, more_budget = self._turns(more)
                a, b = self._evidence(story, asked + [other])
                if sum(costs[a:b + 1]) <= more_budget:
                    asked, pairs, turns, budget, first, last = asked + [other], more, more_turns, more_budget, a, b
            document = self._fit(story, *window(costs, first, last, budget, rng), first, last, budget)
            if document is not None:
                return self._render("document", document, turns)
        raise RuntimeError(f"no FairytaleQA question fits {self.n} tokens in {TRIES} tries: is the context too small?")

    def _fit(self, story: Story, start: int, end: int, first: int, last: int, budget: int) -> list[int] | None:
        """The encoded window, outer sentences dropped until it fits the budget
        (the per-sentence counts are an estimate); None if only evidence is left."""
        units, _ = self._units(story)
        while True:
            ids = self._encode(story.text[units[start][0]:units[end - 1][1]])
            if len(ids) <= budget:
                return ids
            if start == first and end == last + 1:
                return None
            if end - 1 - last >= first - start:
                end -= 1
            else:
                start += 1

    # --- SQuAD ---
    def _paragraph(self, i: int) -> list[int]:
        if i not in self._paragraph_ids:
            self._paragraph_ids[i] = self._encode(self.squad.paragraphs[i][1])
        return self._paragraph_ids[i]

    def _ask_squad(self) -> list[SquadQuestion]:
        """Questions about one paragraph; each is unanswerable with probability
        unanswerable_share, follow-ups while the paragraph has one of the kind drawn."""
        rng = self.rng
        unanswerable = rng.random() < self.unanswerable_share
        asked = [rng.choice(self.squad.unanswerable if unanswerable else self.squad.answerable)]
        want = rng.choice(TURNS)
        while len(asked) < want:
            unanswerable = rng.random() < self.unanswerable_share
            rest = [q for q in self.squad.by_paragraph[asked[0].paragraph]
                    if q not in asked and (q.answer == NOT_SAID) == unanswerable]
            if not rest:
                break
            asked.append(rng.choice(rest))
        return asked

    def _squad(self) -> Example:
        rng = self.rng
        for _ in range(TRIES):
            asked = self._ask_squad()
            turns, budget = self._turns([(q.question, q.answer) for q in asked])
            paragraph = self._paragraph(asked[0].paragraph)
            room = budget - len(paragraph)
            if room < 0:
                continue
            title = self.squad.paragraphs[asked[0].paragraph][0]
            books = self.book_slice is not None and rng.random() < BOOK_FILLER_SHARE
            filler = self._book_text if books else lambda n: self._other_paragraphs(n, title)
            before_room = rng.randint(0, room)
            before, after = filler(before_room), filler(room - before_room)
            before_ids = self._encode(before + "\n\n") if before else []
            after_ids = self._encode("\n\n" + after) if after else []
            over = len(before_ids) + len(after_ids) - room  # re-encoded book text may take a few more tokens
            if over > 0:
                cut = min(over, len(after_ids))
                after_ids, before_ids = after_ids[:len(after_ids) - cut], before_ids[over - cut:]
            return self._render("document", before_ids + paragraph + after_ids, turns)
        raise RuntimeError(f"no SQuAD paragraph fits {self.n} tokens in {TRIES} tries: is the context too small?")

    def _other_paragraphs(self, n: int, title: str) -> str:
        """Random paragraphs of other training articles, n tokens' worth at most
        (drawing stops after three that would not fit)."""
        others = [i for i, (t, _) in enumerate(self.squad.paragraphs) if t != title]
        texts, used, misses = [], 0, 0
        while others and misses < 3:
            i = self.rng.choice(others)
            cost = len(self._paragraph(i)) + 2  # and the blank line between paragraphs
            if used + cost > n:
                misses += 1
                continue
            texts.append(self.squad.paragraphs[i][1])
            used += cost
        return "\n\n".join(texts)

    def _book_text(self, n: int) -> str:
        """About n tokens of the training text, whole sentences only."""
        if n < 32:
            return ""
        text = self.tok.decode(self.book_slice(n), skip_special_tokens=True)
        spans = sentence_spans(text)
        return text[spans[1][0]:spans[-2][1]] if len(spans) >= 3 else ""
