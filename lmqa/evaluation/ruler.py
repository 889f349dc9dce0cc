"""RULER's synthetic tasks for `lmqa eval --tasks ruler`.

Written from the task definitions of NVIDIA/RULER (Hsieh et al. 2024,
scripts/data/synthetic/ and scripts/synthetic.yaml): the same templates,
needle formats, numbers of keys, values and queries, haystacks and
`string_match_all` scoring, so the scores can be set beside published ones.
Where RULER's generator leans on downloads, this one uses what the
repository holds: the 'essay' haystack is cut from the evaluation books,
the key words are adjective-noun pairs from the lists below, and the common
words come from the books' vocabulary.

Each sample is asked as lmqa asks about any document: RULER's input up to
its question (the task's opening instruction, any worked example, the
context) is the document; its question followed by its answer prefix is the
question. Lengths count the whole prompt (lmqa's QA prompt around the
document and question included) plus the task's answer budget, as RULER
counts its own. A task whose answer is lines of the document
(the needles, variable chains) is answered with quotes, as the default
model is trained to answer (one per item for several values, keys or
variables); word counts (cwe, fwe) are free generation through the same session.

Departures from RULER, each because its version needs what we lack or
would be ambiguous: needles in the 'noise' and 'needle' haystacks are
placed at RULER's 40 depths like the essay's (RULER draws any line); the
distractor keys of the 'needle' haystack never equal a queried key (with
our smaller word list they could); the essay starts at a random sentence
of the books (RULER: always at the start of its essays).
"""

from __future__ import annotations

import math
import random
import re
import string
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.table import Table

from lmqa.engine.generation import SamplingConfig
from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.model.loading import LoadedModel
from lmqa.qa.evidence import holds, passages
from lmqa.qa.sentences import SENTENCE_END
from lmqa.qa.session import DocumentSession, QAPrompt
from .tasks import EvalError, one_file

RULER = "ruler"  # the name `lmqa eval --tasks` knows the suite by

DEPTHS = [round(100 * i / 39) / 100 for i in range(40)]  # RULER: 40 evenly spaced depths, 0 to 100%
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
HOPS = 4  # vt: one chain of 4 assignments after the value (5 variables)
ICL_TOKENS = 500  # vt: RULER's worked example is made to fit 500 tokens
COMMON = 10  # cwe: how many words are the common ones
FUNCTION_WORDS = 200  # cwe: the books' commonest words are left out of the lists
CWE_SHOT = 40  # cwe: words in the worked example (20 below 4,096 tokens)
ZETA_2 = math.pi ** 2 / 6  # fwe: the zeta distribution's normaliser at alpha = 2
NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}  # RULER's tokens_to_generate

ADJECTIVES = """able acid angry amber ancient arctic ashen autumn bald bitter black blond bold brave brief bright
brisk broad bronze busy calm candid careful cheap cheerful chilly civic clean clever cloudy coarse cold cosmic
crisp cruel curly cyan damp dapper dark dear deep dense dizzy dry dusty eager early earnest easy elder empty
endless equal exotic faint fancy fast fierce flat fluffy fond foolish fragile free fresh frosty funny gentle
giant glad glossy golden grand gray greasy green grim gruff happy hardy hasty heavy hidden hollow honest humble
hungry icy idle jolly keen kind large lazy lean little lively lone loud lucky lunar mellow merry mild misty
modern modest muddy narrow neat nimble noble noisy odd olive orange pale patient plain plump polite proud
purple quick quiet rapid rare raw red rich rigid ripe robust rosy rough round royal rusty sad salty scarlet
secret serene shaggy sharp shiny short shy silent silly silver simple sleek slim slow small smooth snowy soft
solar solid sour spare spicy steady steep stern stiff stormy strange strict sturdy subtle sudden sunny sweet
swift tall tame tender thick thin tidy tiny tough tranquil twin vague vast velvet violet vivid warm wary weary
wet white wide wild windy wise witty wooden young zealous""".split()
NOUNS = """acorn admiral anchor angle ankle apple apron arch archer arrow atlas attic avenue badge bakery ballad
balloon banjo barn barrel basket beacon beaver bell bench berry bicycle bishop blanket blossom bonnet bottle
boulder bracelet branch bridge brook bucket buffalo bugle button cabin cactus camel candle canoe canyon carpet
carrot castle cattle cellar chapel cherry chimney cider circus cliff clover coconut comet compass copper
cottage cousin coyote crater cricket crown cupboard curtain cushion daisy dancer desert diamond dolphin donkey
dragon drum eagle easel elbow engine falcon feather fern ferry fiddle finch flute forest fountain fox garden
garnet geyser ginger glacier goblet goose granite guitar hammer harbor harp hazel helmet heron hill hive
honey horizon hornet island ivory jacket jaguar jasmine jelly kettle kitten ladder lagoon lantern lemon
lighthouse lily lizard locket lobster magnet mango maple marble meadow melon mirror mitten monk moss mountain
mule napkin needle nest nickel oak ocean olive orchard otter owl oyster paddle palace panther parrot pebble
pelican pepper piano pigeon pillow pine planet plum pocket pony poppy puppet quarry quilt rabbit raft raven
reef ribbon river robin rocket saddle sailor salmon satchel scarf seal shovel shrub silo sparrow spider
spoon squirrel stable statue stream sunset swan sword teapot temple thimble thistle thunder tiger timber
tulip tunnel turtle umbrella valley violin volcano wagon walnut walrus whistle willow window wizard wolf
yacht zebra""".split()


@dataclass(frozen=True)
class Spec:
    """One task of RULER's scripts/synthetic.yaml."""

    family: str  # niah, vt, cwe, fwe
    haystack: str = "essay"  # niah and vt: essay (the books), noise (NOISE lines), needle (distractor needles)
    key: str = "words"  # niah: words, numbers or uuids
    value: str = "numbers"
    keys: int = 1
    values: int = 1
    queries: int = 1


SPECS: dict[str, Spec] = {
    "niah_single_1": Spec("niah", "noise"),
    "niah_single_2": Spec("niah"),
    "niah_single_3": Spec("niah", value="uuids"),
    "niah_multikey_1": Spec("niah", keys=4),
    "niah_multikey_2": Spec("niah", "needle"),
    "niah_multikey_3": Spec("niah", "needle", key="uuids", value="uuids"),
    "niah_multivalue": Spec("niah", values=4),
    "niah_multiquery": Spec("niah", keys=4, queries=4),
    "vt": Spec("vt", "noise"),
    "cwe": Spec("cwe"),
    "fwe": Spec("fwe"),
}
TASKS = tuple(SPECS)


@dataclass(frozen=True)
class Sample:
    task: str
    document: str  # RULER's input up to its question
    question: str  # RULER's question and answer prefix
    references: tuple[str, ...]  # string_match_all's references
    spans: tuple[tuple[int, int], ...]  # character spans in document of the lines that hold the references
    depths: tuple[float, ...]  # where those lines are, as a fraction of the document
    max_new_tokens: int

    @property
    def answer_mode(self) -> str:
        """quote where the answer is lines of the document (one quote per line
        for a list question, lmqa/qa/list_answers.py), else free."""
        return "quote" if self.spans else "free"


def string_match_all(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    """RULER's score of one answer: the fraction of references found in it,
    case-insensitive substrings."""
    text = prediction.lower()
    return sum(r.lower() in text for r in references) / len(references)


# ----- what the haystacks are made of -----
class Sources:
    """The evaluation books as RULER's 'essay' (their words, whitespace
    normalised) and their vocabulary (common-words lists)."""

    def __init__(self, books: list[str]):
        self.words = re.sub(r"\s+", " ", " ".join(books)).strip().split(" ") if books else []
        # lower-case words seen twice or more, but not the commonest (and, which): answers are scored by substring
        seen = Counter(re.findall(r"\b[a-z]{4,}\b", " ".join(books)))
        words = [w for w, c in seen.most_common()[FUNCTION_WORDS:] if c > 1]
        self.vocabulary = sorted(set(words) | set(ADJECTIVES) | set(NOUNS))
        self._starts = [i + 1 for i, w in enumerate(self.words[:-1])
                        if w[-1:] in ".!?" and self.words[i + 1][:1].isupper()] or [0]

    def essay(self, n: int, rng: random.Random) -> list[str]:
        """The sentences of n words of the books from a random sentence on
        (around again to the first word where the books are too short)."""
        if not self.words:
            raise EvalError("the ruler essay haystack needs evaluation books; pass --books DIR")
        start = rng.choice(self._starts)
        words = [self.words[(start + i) % len(self.words)] for i in range(n)]
        text = " ".join(words)
        cuts = [0] + [m.end() for m in SENTENCE_END.finditer(text)] + [len(text)]
        return [text[a:b].strip() for a, b in zip(cuts, cuts[1:]) if text[a:b].strip()]


def _random(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))  # RULER: 7 digits
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def _plant(units: list[str], placed: list[tuple[int, str]], sep: str) -> tuple[str, list[tuple[int, int]]]:
    """units joined by sep, each (index, line) of placed written before
    units[index] (after the last unit for index len(units)), lines at one
    index in placed's order. Returns the text and each line's span."""
    order = sorted(range(len(placed)), key=lambda i: placed[i][0])
    parts, spans, pos, j = [], [(0, 0)] * len(placed), 0, 0
    for i in range(len(units) + 1):
        while j < len(order) and placed[order[j]][0] == i:
            line = placed[order[j]][1]
            spans[order[j]] = (pos, pos + len(line))
            parts.append(line)
            pos += len(line) + len(sep)
            j += 1
        if i < len(units):
            parts.append(units[i])
            pos += len(units[i]) + len(sep)
    return sep.join(parts), spans


def _shift(spans: list[tuple[int, int]], by: int) -> tuple[tuple[int, int], ...]:
    return tuple((a + by, b + by) for a, b in spans)


def _series(items: list[str]) -> str:
    """RULER's list of the queried keys: "a", or "a, b, c, and d"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


# ----- the four families -----
def niah(task: str, n: int, rng: random.Random, sources: Sources, depths: list[float] | None = None) -> Sample:
    """Needles "One of the special magic {values} for {key} is: {value}."
    in n haystack units (essay words, noise lines or distractor needles) at
    `depths` (default: distinct depths drawn from RULER's 40); the question
    asks for all values of `queries` of the keys."""
    spec = SPECS[task]
    kind = spec.value
    keys: list[str] = []
    values: list[list[str]] = []
    needles: list[tuple[str, str]] = []  # (key, line)
    while len(keys) < max(spec.keys, spec.queries):
        key = _random(spec.key, rng)
        if key in keys:
            continue
        keys.append(key)
        values.append([_random(spec.value, rng) for _ in range(spec.values)])
        needles += [(key, NEEDLE.format(kind=kind, key=key, value=v)) for v in values[-1]]
    rng.shuffle(needles)
    depths = list(depths) if depths is not None else rng.sample(DEPTHS, len(needles))
    if spec.haystack == "essay":
        units, sep = sources.essay(n, rng), " "
    elif spec.haystack == "noise":
        units, sep = [NOISE] * n, "\n"
    else:
        units, sep = [], "\n"
        while len(units) < n:
            key = _random(spec.key, rng)
            if key not in keys:
                units.append(NEEDLE.format(kind=kind, key=key, value=_random(spec.value, rng)))
    context, spans = _plant(units, [(int(len(units) * d), line) for d, (_, line) in zip(depths, needles)], sep)
    asked = rng.sample(range(len(keys)), spec.queries)
    query = _series([keys[i] for i in asked])
    one = spec.queries * spec.values == 1  # RULER's singular wording
    noun = kind[:-1] if one else kind
    head = (f"{'A' if one else 'Some'} special magic {noun} {'is' if one else 'are'} hidden within the following "
            f"text. Make sure to memorize it. I will quiz you about the {noun} afterwards.\n")
    question = (f"What {'is' if one else 'are all'} the special magic {noun} for {query} mentioned in the provided "
                f"text? The special magic {noun} for {query} mentioned in the provided text {'is' if one else 'are'}")
    wanted = {keys[i] for i in asked}
    held = [(s, d) for s, d, (key, _) in zip(spans, depths, needles) if key in wanted]
    document = head + context
    return Sample(task, document, question, tuple(v for i in asked for v in values[i]),
                  _shift([s for s, _ in held], len(head)), tuple(d for _, d in held), NEW_TOKENS["niah"])


def _chain(rng: random.Random, letters: int) -> tuple[list[str], str, list[str]]:
    """HOPS + 1 distinct variables, the value and the assignment lines."""
    names: list[str] = []
    while len(names) < HOPS + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    lines = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:])]
    return names, value, lines


VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"


def _vt_question(value: str) -> str:
    return (f"Find all variables that are assigned the value {value} in the text above. Answer: According to the "
            f"chain(s) of variable assignment in the text above, {HOPS + 1} variables are assigned the value "
            f"{value}, they are:")


def _vt_context(n: int, rng: random.Random, letters: int) -> tuple[str, list[str], str, list[tuple[int, int]], list[int]]:
    names, value, lines = _chain(rng, letters)
    at = sorted(rng.sample(range(n), len(lines))) if n >= len(lines) else [0] * len(lines)
    context, spans = _plant([NOISE] * n, list(zip(at, lines)), "\n")
    return context, names, value, spans, at


def vt_example(n: int, rng: random.Random) -> str:
    """RULER's worked example before the task: one short chain of
    three-letter variables in n noise lines, question, answer prefix and answer."""
    context, names, value, _, _ = _vt_context(n, rng, 3)
    return VT_HEAD + context + "\nQuestion: " + _vt_question(value) + " " + " ".join(names) + "\n"


def vt(n: int, rng: random.Random, example: str) -> Sample:
    """Variable tracking: a chain VAR A = value, VAR B = VAR A, ... in n
    noise lines, after `example`; every variable of the chain is an answer."""
    context, names, value, spans, at = _vt_context(n, rng, 5)
    head = example + "\n" + VT_HEAD
    return Sample("vt", head + context, _vt_question(value), tuple(names), _shift(spans, len(head)),
                  tuple(i / max(n, 1) for i in at), NEW_TOKENS["vt"])


CWE_HEAD = ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n")
CWE_QUESTION = (f"What are the {COMMON} most common words in the above list? Answer: The top {COMMON} words that "
                "appear most often in the list are:")


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _word_list(words: list[str], often: int, rarely: int, rng: random.Random) -> str:
    listed = words[:COMMON] * often + words[COMMON:] * rarely
    rng.shuffle(listed)
    return _numbered(listed)


def cwe(n: int, rng: random.Random, sources: Sources, short: bool) -> Sample:
    """Common words: n distinct words, the first COMMON listed 30 times and
    the rest 3 times (6 and 1 below 4,096 tokens), in a shuffled numbered
    list, after one worked example of 40 words (10 and 3 times; 20 words,
    3 and 1 times below 4,096)."""
    shot, (often, rarely), (shot_often, shot_rarely) = ((CWE_SHOT // 2, (6, 1), (3, 1)) if short
                                                         else (CWE_SHOT, (30, 3), (10, 3)))
    if n + shot > len(sources.vocabulary):
        raise EvalError(f"cwe needs {n + shot:,} distinct words; the books' vocabulary has {len(sources.vocabulary):,}")
    words = rng.sample(sources.vocabulary, n + shot)
    example, main = words[:shot], words[shot:]
    worked = CWE_HEAD + _word_list(example, shot_often, shot_rarely, rng) + "\nQuestion: " + CWE_QUESTION + " "
    worked += _numbered(example[:COMMON]) + "\n"
    return Sample("cwe", worked + CWE_HEAD + _word_list(main, often, rarely, rng), CWE_QUESTION,
                  tuple(main[:COMMON]), (), (), NEW_TOKENS["cwe"])


FWE_HEAD = ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. ")
FWE_QUESTION = ("Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently "
                "appeared words in the above coded text? Answer: According to the coded text above, the three most "
                "frequently appeared words are:")


def fwe(n: int, rng: random.Random, vocabulary_size: int) -> Sample:
    """Frequent words: vocabulary_size random six-letter words, the k-th
    most frequent written int(n k^-2 / zeta(2)) times in random order; the
    most frequent is '...' (noise), the next three are the answer."""
    vocabulary: set[str] = set()
    while len(vocabulary) < vocabulary_size:
        vocabulary.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    ranked = sorted(vocabulary)
    rng.shuffle(ranked)
    ranked[0] = "..."
    words = [w for k, w in enumerate(ranked, 1) for _ in range(int(n * k ** -2.0 / ZETA_2))]
    rng.shuffle(words)
    return Sample("fwe", FWE_HEAD + " ".join(words), FWE_QUESTION, tuple(ranked[1:4]), (), (), NEW_TOKENS["fwe"])


# ----- sizing and running -----
@dataclass
class RulerTrial:
    task: str
    length: int  # requested tokens (prompt and answer budget)
    sample: int
    tokens: int  # prompt tokens actually fed
    answer_mode: str  # quote or free
    depths: list[float]  # of the lines that hold the answer
    question: str
    references: list[str]
    answer: str
    score: float  # string_match_all
    seconds: float
    evidence: float | None = None  # the fraction of answer lines held by an evidence passage
    evidence_passages: list[str] = field(default_factory=list)


class RulerEvaluator:
    """RULER's tasks at each length, `samples` times, each sample seeded by
    (seed, task, length, index) alone."""

    def __init__(self, loaded: LoadedModel, engine: LandmarkEngine, lengths: tuple[int, ...], samples: int,
                 books: list[str], seed: int = 0, candidates: int = 1, tasks: tuple[str, ...] = TASKS,
                 progress: Callable[[int], None] | None = None):
        self.loaded, self.engine, self.lengths, self.samples = loaded, engine, lengths, samples
        self.seed, self.candidates, self.tasks, self.progress = seed, candidates, tasks, progress
        self.sources = Sources(books)
        self.prompt = QAPrompt(loaded, "document")
        self._head = self._count(self.prompt.head)
        self._sizes: dict[tuple[str, int], int] = {}

    def cells(self) -> Iterator[tuple[str, int, int]]:
        for task in self.tasks:
            for length in self.lengths:
                for index in range(self.samples):
                    yield task, length, index

    def positions(self) -> int:
        """Engine positions the run prefills, about (for a progress bar's total)."""
        b = self.loaded.landmark.block_size
        return sum(n + n // b for _, n, _ in self.cells())

    def _count(self, text: str) -> int:
        return len(self.loaded.tokenizer(text, add_special_tokens=False).input_ids)

    def total(self, sample: Sample) -> int:
        """Tokens the sample needs: prompt head, document, question and answer budget."""
        return self._head + self._count(sample.document) + self._count(self.prompt.tail(sample.question)) \
            + sample.max_new_tokens

    def _size(self, make: Callable[[int], Any], count: Callable[[Any], int], length: int, low: int, start: int,
              most: int | None = None) -> tuple[Any, int]:
        """make(n) with the most haystack units n (words, lines or list
        entries, `low` to `most`) whose count() is at most `length` tokens,
        within 1% (or one unit) of it, and that n: secant steps on n from
        `start`, as tokens grow about linearly with n."""
        slack = max(length // 100, 16)
        tried: dict[int, int] = {}
        best: tuple[Any, int] | None = None
        n = start
        for _ in range(12):
            made = make(n)
            tried[n] = tokens = count(made)
            if tokens <= length and (best is None or n > best[1]):
                best = (made, n)
            if tokens <= length and (tokens >= length - slack or n == most):
                break
            if tokens > length and n == low:
                break
            fits, over = [k for k in tried if tried[k] <= length], [k for k in tried if tried[k] > length]
            lo, hi = max(fits, default=None), min(over, default=None)
            ns = sorted(tried, key=lambda k: abs(tried[k] - length))[:2]
            if len(ns) == 2 and tried[ns[0]] != tried[ns[1]]:
                guess = ns[0] + (length - slack / 2 - tried[ns[0]]) * (ns[1] - ns[0]) / (tried[ns[1]] - tried[ns[0]])
            else:
                guess = n * (length - slack / 2) / tokens
            n = round(guess)
            n = max(n, low if lo is None else lo + 1)
            n = min(n, (hi - 1) if hi is not None else n, most if most is not None else n)
            if n in tried:
                break
        if best is None:
            raise EvalError(f"ruler: {length:,} tokens is too short for the task's prompt")
        return best

    def _make(self, task: str, length: int, n: int, rng: random.Random) -> Sample:
        family = SPECS[task].family
        if family == "niah":
            return niah(task, n, rng, self.sources)
        if family == "vt":
            return vt(n, rng, vt_example(self._units("vt_example", ICL_TOKENS), rng))
        if family == "cwe":
            return cwe(n, rng, self.sources, short=length < 4096)
        return fwe(n, rng, max((length - NEW_TOKENS["fwe"]) // 50, 4))

    def _limits(self, name: str) -> tuple[int, int | None]:
        """The fewest and most haystack units a sample of `name` can have."""
        family = SPECS[name].family if name in SPECS else name
        if family == "cwe":
            return COMMON + 1, len(self.sources.vocabulary) - CWE_SHOT
        return {"fwe": 30}.get(family, 1), None

    def _units(self, name: str, length: int) -> int:
        """Haystack units for about `length` tokens of `name` (a task, or
        vt's worked example), found once per task and length on a sample
        seeded by those alone (RULER also sizes once per task)."""
        key = (name, length)
        if key not in self._sizes:
            def make(n: int) -> Any:
                seeded = random.Random(f"{self.seed}/ruler/{name}/{length}/size")
                return vt_example(n, seeded) if name == "vt_example" else self._make(name, length, n, seeded)

            count = self._count if name == "vt_example" else self.total
            low, most = self._limits(name)
            self._sizes[key] = self._size(make, count, length, low, min(low * 4, most or low * 4), most)[1]
        return self._sizes[key]

    def sample(self, task: str, length: int, index: int) -> Sample:
        """The task's sample `index`: from the task's size, the haystack
        grown or shrunk until it fills about `length` tokens (another draw
        of words or keys tokenizes longer or shorter)."""
        low, most = self._limits(task)

        def make(n: int) -> Sample:
            return self._make(task, length, n, random.Random(f"{self.seed}/ruler/{task}/{length}/{index}"))

        return self._size(make, self.total, length, low, self._units(task, length), most)[0]

    def run(self, task: str, length: int, index: int) -> RulerTrial:
        sample = self.sample(task, length, index)
        session = DocumentSession(self.loaded, self.engine, one_file(sample.document, "ruler.txt"), "document")
        session.quote = sample.answer_mode == "quote"
        start = time.perf_counter()
        session.ingest(self.progress)
        answer = session.ask(sample.question, SamplingConfig(max_new_tokens=sample.max_new_tokens,
                                                             candidates=self.candidates))
        seconds = time.perf_counter() - start
        found = passages(session, answer.evidence)
        evidence = (sum(holds(session, found, a, b) for a, b in sample.spans) / len(sample.spans)
                    if sample.spans else None)
        return RulerTrial(task, length, index, session.prepare() + answer.timings.question_tokens,
                          sample.answer_mode, list(sample.depths), sample.question, list(sample.references),
                          answer.text, string_match_all(answer.text, sample.references), seconds, evidence,
                          [p.location for p in found])


# ----- reporting -----
def summarize(trials: list[RulerTrial]) -> dict[str, Any]:
    """Mean score (percent) per task and length, and the averages RULER
    reports: all tasks, and the eight needle tasks."""
    cells: dict[tuple[str, int], list[RulerTrial]] = defaultdict(list)
    for t in trials:
        cells[(t.task, t.length)].append(t)
    rows = []
    for (task, length), group in cells.items():
        hits = [t.evidence for t in group if t.evidence is not None]
        rows.append({"task": task, "length": length, "samples": len(group), "answer_mode": group[0].answer_mode,
                     "score": 100 * sum(t.score for t in group) / len(group),
                     "evidence": 100 * sum(hits) / len(hits) if hits else None,
                     "seconds_per_sample": sum(t.seconds for t in group) / len(group)})
    averages = {}
    for name, members in (("average", TASKS), ("niah average", tuple(t for t in TASKS if t.startswith("niah")))):
        for length in sorted({r["length"] for r in rows}):
            scores = [r["score"] for r in rows if r["length"] == length and r["task"] in members]
            if scores:
                averages.setdefault(name, {})[str(length)] = {"score": sum(scores) / len(scores), "tasks": len(scores)}
    return {"summary": rows, "averages": averages}


def report(trials: list[RulerTrial], lengths: tuple[int, ...], samples: int, seed: int) -> dict[str, Any]:
    """The JSON result: settings, the summary and every sample."""
    return {"settings": {"tasks": list(dict.fromkeys(t.task for t in trials)), "lengths": list(lengths),
                         "samples": samples, "seed": seed},
            **summarize(trials), "trials": [asdict(t) for t in trials]}


def table(trials: list[RulerTrial], title: str) -> Table:
    """Tasks x lengths: mean score (and the evidence's hit rate), then the averages."""
    data = summarize(trials)
    lengths = sorted({r["length"] for r in data["summary"]})
    out = Table(title=title)
    out.add_column("task", no_wrap=True)
    out.add_column("answer", no_wrap=True)
    for n in lengths:
        out.add_column(f"{n:,}", justify="right", no_wrap=True)
        out.add_column("evidence", justify="right", no_wrap=True)
    cell = {(r["task"], r["length"]): r for r in data["summary"]}
    for task in dict.fromkeys(t.task for t in trials):
        values = []
        for n in lengths:
            r = cell.get((task, n))
            values += ["", ""] if r is None else [
                f"{r['score']:.0f}% ({r['samples']})", "" if r["evidence"] is None else f"{r['evidence']:.0f}%"]
        out.add_row(task, next(r["answer_mode"] for r in data["summary"] if r["task"] == task), *values)
    for name, by_length in data["averages"].items():
        values = []
        for n in lengths:
            a = by_length.get(str(n))
            values += ["" if a is None else f"{a['score']:.0f}% ({a['tasks']} tasks)", ""]
        out.add_row(name, "", *values, end_section=False)
    return out
