"""Training data for document QA: questions answered by one sentence of a long
context, rendered exactly as `lmqa ask` renders them (QAPrompt: the chat
template around prompts/qa_document.txt or qa_codebase.txt).

A document example is a slice of real text with 1-8 invented facts written in
at sentence boundaries. Most facts are distractors built from the asked fact
by changing one detail of its subject (another town, another animal), so the
question can only be answered by the sentence whose subject matches it in
full. Questions are paraphrases that share few words with the fact; the
answer copies the fact's sentence, which is what the product wants anyway
(an answer that quotes its evidence). One sequence may ask up to three
questions as chat follow-ups, and some ask about a subject the document never
mentions ("The document does not say.").

A codebase example lays real Python files out as `ingest` does ("===== path
=====" headers) and asks which file defines a function or class, or what a
module-level constant is set to.

Every name a fact uses is made up from syllables or drawn from the lists
below, which are for training only; `lmqa eval` has its own needles, and a
fact that happens to contain one of their answers is drawn again.
"""

from __future__ import annotations

import functools
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .data import Example

NOT_SAID = "The document does not say."

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t", "th", "v", "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
_CODAS = ["", "n", "r", "l", "s", "th", "m", "nd", "rk", "x", "ck", "st"]
_TOWN_ENDINGS = ["by", "ton", "wick", "ford", "holm", "stead", "mere", "bridge", "moor", "haven", "dale", "worth"]

ROLES = ["miller", "ferryman", "schoolmaster", "baker", "blacksmith", "harbourmaster", "innkeeper", "tailor",
         "stationmaster", "gardener", "magistrate", "weaver", "clockmaker", "shepherd", "brewer", "cartographer",
         "bell-ringer", "apothecary", "chandler", "surveyor"]
ANIMALS = ["dog", "parrot", "goat", "horse", "tortoise", "hen", "donkey", "ferret", "canary", "pony", "hound", "owl"]
OBJECTS = ["brass key", "silver locket", "sealed letter", "copper coin", "leather journal", "signet ring",
           "pocket watch", "folded map", "wooden flute", "glass bead", "iron seal", "ivory comb"]
CONTAINERS = ["a flour sack", "the chimney", "a hollow oak", "the hay loft", "a biscuit tin", "the well bucket",
              "a boot", "the church organ", "a loose floorboard", "the rain barrel", "a hatbox", "the woodpile"]
EVENTS = ["harvest fair", "river regatta", "wool auction", "lantern parade", "chess tournament", "horse show",
          "spring market", "choir contest", "ploughing match", "flower show"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
BUILDINGS = ["granary", "town hall", "lighthouse", "mill", "chapel", "boathouse", "observatory", "schoolhouse",
             "toll house", "tannery"]
UNITS = ["windows", "steps", "rooms", "chimneys", "doors", "beams", "bells", "benches"]
COLOURS = ["crimson", "olive green", "pale yellow", "navy blue", "chalk white", "rust orange", "plum purple",
           "slate grey", "sky blue", "charcoal black"]
RELATIONS = ["uncle", "godmother", "cousin", "grandfather", "aunt", "elder sister", "stepbrother", "guardian"]
THINGS = [("fruit", ("quince", "apricot", "gooseberry", "damson", "fig", "mulberry")),
          ("song", ("The Salt Road", "Over Barrow Hill", "The Tinker's Wife", "Lanterns Low", "Grey Gull Morning")),
          ("flower", ("foxglove", "primrose", "cornflower", "marigold", "bluebell", "larkspur")),
          ("tool", ("chisel", "spokeshave", "awl", "mallet", "plane", "drawknife"))]
OCCUPATIONS = ["saddler", "glassblower", "bookbinder", "cooper", "wheelwright", "engraver", "rope maker",
               "lamplighter", "candle maker", "stonemason"]
QUOTE_NOUNS = ["river", "kettle", "ladder", "lantern", "barley", "orchard", "anvil", "compass", "thread", "harbour"]
QUOTE_VERBS = ["forgets", "waits", "bends", "sings", "wanders", "sleeps", "listens", "returns"]
QUOTE_ADVERBS = ["twice", "for no one", "in winter", "at dawn", "without reason", "before the rain"]


def made_up_name(rng: random.Random, syllables: int | None = None) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables or rng.randint(2, 3))]
    return "".join(parts).capitalize()


def made_up_town(rng: random.Random) -> str:
    return made_up_name(rng, rng.randint(1, 2)) + rng.choice(_TOWN_ENDINGS)


def person(rng: random.Random) -> str:
    return f"{made_up_name(rng)} {made_up_name(rng)}"


@dataclass(frozen=True)
class Fact:
    sentence: str  # as written into the document
    questions: tuple[str, ...]  # paraphrases, any of which it answers
    answer: str  # the span a correct answer must contain


# Each shape draws its subject and value, and can redraw one subject detail
# for a distractor ("vary") so near-identical sentences compete for the question.
def _pet(rng, subject=None):
    role, town, animal = subject or (rng.choice(ROLES), made_up_town(rng), rng.choice(ANIMALS))
    name = made_up_name(rng)
    return (role, town, animal), Fact(
        f"The {role} of {town} kept a {animal} called {name}.",
        (f"What was the name of the {animal} owned by the {role} of {town}?",
         f"What did the {role} in {town} call the {animal}?",
         f"Which name did the {town} {role}'s {animal} answer to?"), name)


def _birthplace(rng, subject=None):
    (who,) = subject or (person(rng),)
    town = made_up_town(rng)
    return (who,), Fact(f"{who} was born in {town}.",
                        (f"Where does {who} come from?", f"In which town did {who} come into the world?",
                         f"What is the birthplace of {who}?"), town)


def _hiding(rng, subject=None):
    who, obj = subject or (person(rng), rng.choice(OBJECTS))
    place = rng.choice(CONTAINERS)
    return (who, obj), Fact(f"{who} hid the {obj} in {place}.",
                            (f"Where was the {obj} put away by {who}?", f"Where did {who} conceal the {obj}?",
                             f"In what place could the {obj} that {who} tucked away be found?"), place)


def _date(rng, subject=None):
    event, town = subject or (rng.choice(EVENTS), made_up_town(rng))
    date = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1700, 1999)}"
    return (event, town), Fact(f"The {event} of {town} was held on {date}.",
                               (f"When did {town} hold its {event}?", f"On what date was the {event} in {town}?",
                                f"What day did the {event} take place at {town}?"), date)


def _count(rng, subject=None):
    building, town, unit = subject or (rng.choice(BUILDINGS), made_up_town(rng), rng.choice(UNITS))
    n = str(rng.randint(3, 480))
    return (building, town, unit), Fact(f"The {building} in {town} has {n} {unit}.",
                                        (f"How many {unit} does the {building} of {town} have?",
                                         f"What is the number of {unit} in {town}'s {building}?",
                                         f"Count the {unit} of the {building} at {town}: how many are there?"), n)


def _colour(rng, subject=None):
    building, town = subject or (rng.choice(BUILDINGS), made_up_town(rng))
    colour = rng.choice(COLOURS)
    return (building, town), Fact(f"The door of the {building} in {town} was painted {colour}.",
                                  (f"What colour is the door of {town}'s {building}?",
                                   f"Which colour was used on the {building} door at {town}?"), colour)


def _relation(rng, subject=None):
    who, relation = subject or (person(rng), rng.choice(RELATIONS))
    other = person(rng)
    return (who, relation), Fact(f"{other} is the {relation} of {who}.",
                                 (f"Who is {who}'s {relation}?", f"Name the {relation} of {who}.",
                                  f"Which person is {relation} to {who}?"), other)


def _job(rng, subject=None):
    (who,) = subject or (person(rng),)
    job, town = rng.choice(OCCUPATIONS), made_up_town(rng)
    return (who,), Fact(f"{who} worked as a {job} in {town}.",
                        (f"What was {who}'s trade?", f"What did {who} do for a living?",
                         f"Which job did {who} have?"), job)


def _favourite(rng, subject=None):
    who, (kind, values) = subject or (person(rng), rng.choice(THINGS))
    value = rng.choice(values)
    return (who, (kind, values)), Fact(f"The favourite {kind} of {who} was {value}.",
                                       (f"Which {kind} did {who} like best?", f"What {kind} did {who} prefer above all?",
                                        f"Name the {kind} {who} loved most."), value)


def _quote(rng, subject=None):
    (who,) = subject or (person(rng),)
    quote = f"The {rng.choice(QUOTE_NOUNS)} {rng.choice(QUOTE_VERBS)} {rng.choice(QUOTE_ADVERBS)}."
    return (who,), Fact(f'{who} liked to say: "{quote}"',
                        (f"What saying was {who} fond of?", f"What words did {who} often repeat?",
                         f"Quote {who}'s favourite saying."), quote)


SHAPES = [_pet, _birthplace, _hiding, _date, _count, _colour, _relation, _job, _favourite, _quote]


def _vary(subject: tuple, rng: random.Random, shape) -> tuple:
    """The subject with one detail redrawn: a distractor about a similar subject."""
    fresh, _ = shape(rng)
    i = rng.randrange(len(subject))
    return tuple(fresh[j] if j == i else s for j, s in enumerate(subject))


@functools.cache
def eval_answers() -> tuple[str, ...]:
    """Accepted answers of `lmqa eval`'s needles: no training fact may contain one."""
    from lmqa.evaluation.tasks import load_needles

    return tuple(a for needle in load_needles() for a in needle.answers)


def touches_eval(fact: Fact) -> bool:
    from lmqa.evaluation.tasks import is_correct

    return is_correct(fact.sentence, eval_answers())


def fact_family(rng: random.Random, n: int) -> tuple[list[Fact], Fact, Fact]:
    """n facts to write into a document (the asked one among them, the rest
    distractors), the asked fact, and an unwritten fact about a similar
    subject for a "not in the document" question. Random names and numbers
    that happen to hit an eval needle's answer are drawn again."""
    shape = rng.choice(SHAPES)
    subject, asked = shape(rng)
    if touches_eval(asked):
        return fact_family(rng, n)
    facts, seen = [asked], {subject}
    while len(facts) < n:
        if rng.random() < 0.6:  # near miss: same shape, one detail changed
            other, fact = shape(rng, _vary(subject, rng, shape))
        else:  # another kind of fact
            other, fact = rng.choice(SHAPES)(rng)
        if other not in seen and fact.answer != asked.answer and not touches_eval(fact):
            seen.add(other)
            facts.append(fact)
    while True:
        other, missing = shape(rng, _vary(subject, rng, shape))
        if other not in seen and not touches_eval(missing):
            return facts, asked, missing


_SENTENCE_END = re.compile(r"[.!?][\"')\]]?\s+")


def insert_at_sentences(text: str, sentences: list[str], rng: random.Random) -> str:
    """Write each sentence in after a random sentence end of text (or at the
    start when text has none), keeping the text's own sentences whole."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)] or [0]
    cuts = sorted((rng.choice(ends), s) for s in sentences)
    out, last = [], 0
    for cut, sentence in cuts:
        out += [text[last:cut], sentence, " "]
        last = cut
    out.append(text[last:])
    return "".join(out)


# ----- codebase facts -----
_DEF = re.compile(r"^(?:async )?def ([A-Za-z_]\w{3,})\(", re.M)
_CLASS = re.compile(r"^class ([A-Za-z_]\w{3,})\b", re.M)
_CONST = re.compile(r"^([A-Z][A-Z0-9_]{3,}) = ([^\n#]{1,40}?)\s*$", re.M)


def code_facts(path: str, text: str) -> list[tuple[str, str, str]]:
    """(needle, question, answer) for top-level definitions and constants of
    one file. The needle is the text that defines the name: a question is
    asked only when its needle is unique in the sampled files and survives
    the cut at the token budget."""
    out = []
    for name in _DEF.findall(text):
        question = pick_by_name(("Which file defines the function `{n}`?", "Where is `{n}` defined?",
                                    "In which file is the function {n} written?"), name).format(n=name)
        out.append((f"def {name}(", question, f"`{name}` is defined in {path}."))
    for name in _CLASS.findall(text):
        out.append((f"class {name}", f"Which file defines the class `{name}`?", f"The class `{name}` is defined in {path}."))
    for name, value in _CONST.findall(text):
        out.append((f"{name} = ", f"What is `{name}` set to?", f"`{name}` is set to {value} in {path}."))
    return out


def pick_by_name(options: tuple[str, ...], key: str) -> str:
    """A paraphrase picked by the name itself, so a file's facts are a pure
    function of its text (cacheable) yet questions still vary across names."""
    return options[sum(map(ord, key)) % len(options)]


def read_python_files(root: Path, max_bytes: int = 60_000) -> list[tuple[str, str]]:
    """(path relative to root, text) of every readable .py file under root."""
    files = []
    for path in sorted(root.rglob("*.py")):
        try:
            if path.is_file() and path.stat().st_size <= max_bytes:
                files.append((str(path.relative_to(root)), path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    return files


# ----- the sampler -----
class QASampler:
    """Draws document- or codebase-QA examples with probability qa_rate (code
    among them with probability code_rate), otherwise delegates to `base` (an
    ExampleSampler: plain text and numeric retrieval). Shares base's rng so a
    checkpoint of base's rng state resumes this sampler too.

    prompts: kind -> QAPrompt ("document", and "codebase" when code is given).
    """

    def __init__(self, base, prompts: dict, qa_rate: float, code: list[tuple[str, str]] | None = None,
                 code_rate: float = 0.2, not_said_rate: float = 0.1):
        self.base = base
        self.rng = base.rng
        self.tok = base.tok
        self.n = base.n
        self.prompts = prompts
        self.qa_rate = qa_rate
        self.code = code or []
        self.code_facts = [code_facts(p, t) for p, t in self.code]
        self.code_rate = code_rate if self.code else 0.0
        self.not_said_rate = not_said_rate
        self.stop = self.tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in self.tok.get_vocab() else self.tok.eos_token_id
        self._encode = base._encode
        self.heads = {kind: self._encode(prompt.head) for kind, prompt in prompts.items()}

    def sample(self) -> Example:
        if self.rng.random() >= self.qa_rate:
            return self.base.sample()
        if self.rng.random() < self.code_rate:
            return self._codebase()
        return self._document()

    def _encode_turns(self, kind: str, turns: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """(tail ids, answer ids) per (question, answer); a follow-up has its own tail."""
        prompt = self.prompts[kind]
        return [(self._encode(prompt.tail(q, follow_up=i > 0)), self._encode(a)) for i, (q, a) in enumerate(turns)]

    def _render(self, kind: str, document_ids: list[int], turns: list[tuple[list[int], list[int]]]) -> Example:
        """head + document + (tail(question) + answer) per encoded turn + end
        of turn, as a session feeds them: generation stops at the end-of-turn
        token without feeding it, and a follow-up's tail begins with it. Loss
        on each answer and the end of turn after it."""
        ids = self.heads[kind] + document_ids
        holes, loss_from = [], None
        for tail, answer in turns:
            if loss_from is not None:  # the previous answer's last token predicts tail[0], the end of turn
                holes.append((len(ids), len(ids) + len(tail) - 1))
            ids += tail
            if loss_from is None:
                loss_from = len(ids) - 1
            ids += answer
        return Example(ids + [self.stop], loss_from, tuple(holes))

    def _budget(self, kind: str, turns: list[tuple[list[int], list[int]]]) -> int:
        """Ordinary tokens left for the document after head, encoded turns and a
        token per turn for its end (one more than needed for follow-ups)."""
        return self.n - len(self.heads[kind]) - sum(len(tail) + len(answer) + 1 for tail, answer in turns)

    def _document(self) -> Example:
        rng = self.rng
        n_questions = rng.choice([1, 1, 2, 3])
        written, turns = [], []
        for _ in range(n_questions):
            facts, asked, missing = fact_family(rng, rng.randint(1, 8 // n_questions))
            written += [f.sentence for f in facts]
            if rng.random() < self.not_said_rate:
                turns.append((rng.choice(missing.questions), NOT_SAID))
            else:
                turns.append((rng.choice(asked.questions), asked.sentence))
        turns = self._encode_turns("document", turns)
        budget = self._budget("document", turns)
        # text around the facts: decoded from the token stream so it is the same corpus as plain-text examples
        fact_tokens = sum(len(self._encode(" " + s)) for s in written)
        # 2% slack: re-tokenizing decoded text around the facts may take a few more tokens
        text = self.tok.decode(self.base._slice(max(int(budget * 0.98) - fact_tokens, 16)))
        doc = self._encode(insert_at_sentences(text, written, rng))[:budget]
        kept = self.tok.decode(doc)
        if not all(s in kept for s in written):  # a fact cut off at the budget would teach invention
            return self._document()
        return self._render("document", doc, turns)

    def _codebase(self) -> Example:
        """Consecutive files from a random start, laid out as `ingest` lays out
        a directory; one question about a definition that is unique in them
        and survives the cut at the token budget."""
        rng = self.rng
        start = rng.randrange(len(self.code))
        parts, facts, used = [], [], 0
        for i in range(start, len(self.code)):
            path, text = self.code[i]
            block = ("\n" if parts else "") + f"===== {path} =====\n" + (text if text.endswith("\n") else text + "\n")
            if parts and used + len(block) // 3 > self.n:  # 3 characters a token: code is rarely denser
                break
            parts.append(block)
            facts += self.code_facts[i]
            used += len(block) // 3
        counts = Counter(needle for needle, _, _ in facts)
        candidates = [f for f in facts if counts[f[0]] == 1]
        rng.shuffle(candidates)
        doc = self._encode("".join(parts))
        for needle, question, answer in candidates[:3]:
            turns = self._encode_turns("codebase", [(question, answer)])
            cut = doc[: self._budget("codebase", turns)]
            if needle in self.tok.decode(cut):
                return self._render("codebase", cut, turns)
        return self._document()
