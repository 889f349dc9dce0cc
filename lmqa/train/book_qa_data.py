"""Training QA made from the training books' own sentences, for questions as
readers ask them.

The invented facts of qa_data.py share their words with their questions; a
reader asks "Who was the aged sea-cook?" of a book that says "Silver, the old
sea-cook, ...". Here the facts are sentences the book itself states, found by
hand-written patterns: appositions and descriptions ("X, the old sea-cook,"
/ "X was a clergyman"), relations between named characters ("A, B's
sister"; "A married B"), where someone lived, was born or came from, ages,
looks, and names given to things ("a dog called Bull's-eye"). Questions come
from hand-written templates that change the words (synonym lists) and the
word order, and often ask about the other side of the relation ("Whose
sister was A?"); a question is kept only when it copies less than
MAX_OVERLAP of the answer sentence's content words. Some answers need two
nearby sentences: a name, then "He was born at ..." in the next sentence.

The answer is the book's sentence (or two consecutive sentences) verbatim, as
lmqa/qa/sentences.py cuts them, because the model is trained to answer with
the sentence that holds the fact. A fact is asked only when no other fact of
the same kind and subject is in the document window, so the question has one
right answer. The document is a window of the book around the fact; some
windows take in the Project Gutenberg header or licence, which never holds
an answer.

RULER-shaped examples plant "One of the special magic numbers for <key> is:
<n>." needles in a window of a book: many near-identical keys with one
asked, one key with several values (a list answer), several keys asked at
once (a list answer), or a document made of needles alone. A list answer
quotes each needle sentence on its own line, in document order
(LIST_SEPARATOR).

Books held out for evaluation (prompts/bookqa_holdout.txt, data.held_out())
are recognised by their Gutenberg title and never used.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lmqa.qa.sentences import sentences_around

from .qa_data import insert_at_sentences

LIST_SEPARATOR = "\n"  # between the quotes of a list answer
MAX_OVERLAP = 0.5  # most of an answer sentence's content words a question may repeat
MAX_ANSWER_CHARS = 400

# ----- books -----
_START = re.compile(r"\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*\n")
_END = re.compile(r"\n[^\n]*\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG")
_TITLE = re.compile(r"^Title: *(.+)$|Project Gutenberg E[Bb]ook of (.+?)(?:,|\n|$)", re.M)


def slug(name: str) -> str:
    """'Alice’s Adventures in Wonderland' -> 'alice-s-adventures-in-wonderland' (a book file's stem)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def book_slug(text: str) -> str | None:
    """The slug of a Gutenberg book's title, from its header; None without one."""
    m = _TITLE.search(text[:3000])
    return slug(m.group(1) or m.group(2)) if m else None


@dataclass(frozen=True)
class Book:
    text: str
    body: tuple[int, int]  # the book between the Gutenberg header and licence (the whole text without them)


def as_book(text: str) -> Book:
    start, end = _START.search(text), _END.search(text)
    return Book(text, (start.end() if start else 0, end.start() if end else len(text)))


def training_books(texts: list[str], held_out: set[str], min_chars: int = 20_000) -> list[Book]:
    """Books fit for book QA: long enough, and none whose title matches a
    held-out file name (data.held_out()). A token stream made by
    tokenize_corpus has none already; this guards streams made before."""
    stems = {slug(Path(name).stem) for name in held_out}
    return [as_book(t) for t in texts if len(t) >= min_chars and book_slug(t) not in stems]


def split_documents(stream, tokenizer) -> list[str]:
    """The texts of a token stream made by data.tokenize_corpus (documents joined by EOS)."""
    ends = (stream == tokenizer.eos_token_id).nonzero().flatten().tolist() + [len(stream)]
    out, start = [], 0
    for end in ends:
        if end > start:
            out.append(tokenizer.decode(stream[start:end].tolist()))
        start = end + 1
    return out


# ----- words -----
_STOP = frozenset("""a an the of to in on at by for from with and or but as is was were be been being are am it its
he she his her him they them their we us our you your i my me that this these those which who whom whose what where
when why how there here then than so not no had has have do did does done into upon over under very would could should
will shall may might must can one all any some such only also just up out if about after before again""".split())
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower().replace("’", "'")) if w not in _STOP}


def overlap(question: str, answer: str) -> float:
    """Share of the answer's content words that the question repeats."""
    words = content_words(answer)
    return len(words & content_words(question)) / max(1, len(words))


# Swapped into questions so they do not copy the book's wording.
SYNONYMS = {
    "old": ["aged", "elderly"], "young": ["youthful"], "little": ["small"], "small": ["little"], "big": ["large"],
    "large": ["big"], "great": ["large", "grand"], "man": ["fellow", "gentleman"], "woman": ["lady"],
    "gentleman": ["man"], "lady": ["woman"], "boy": ["lad"], "girl": ["young woman", "lass"], "rich": ["wealthy"],
    "poor": ["needy"], "beautiful": ["lovely"], "pretty": ["lovely"], "handsome": ["good-looking"], "fat": ["stout"],
    "stout": ["heavy"], "thin": ["slender", "lean"], "clever": ["intelligent"], "tall": ["high"], "dead": ["late"],
    "house": ["home"], "home": ["house"], "friend": ["companion", "comrade"], "servant": ["attendant"],
    "doctor": ["physician"], "physician": ["doctor"], "surgeon": ["doctor"], "lawyer": ["attorney"],
    "attorney": ["lawyer"], "sailor": ["seaman"], "seaman": ["sailor"], "clergyman": ["parson", "minister"],
    "parson": ["clergyman"], "captain": ["skipper", "commander"], "merchant": ["trader"], "soldier": ["fighting man"],
    "teacher": ["schoolmaster"], "schoolmaster": ["teacher"], "governess": ["tutor"], "wife": ["spouse"],
    "husband": ["spouse"], "father": ["parent"], "mother": ["parent"], "sister": ["sibling"], "brother": ["sibling"],
    "son": ["child"], "daughter": ["child"], "master": ["employer"], "maid": ["servant"],
    "uncle": ["relative"], "aunt": ["relative"], "cousin": ["relative"], "nephew": ["relative"], "niece": ["relative"],
    "grandfather": ["grandparent"], "grandmother": ["grandparent"], "guardian": ["protector"], "nurse": ["carer"],
    "dark": ["black"], "black": ["dark"], "grey": ["gray"], "white": ["pale"], "eyes": ["gaze"], "face": ["features"],
    "hair": ["locks"], "voice": ["way of speaking"], "fair": ["light"], "ugly": ["plain"], "kind": ["good-hearted"],
    "good": ["kindly"], "honest": ["upright"], "famous": ["renowned"], "strange": ["odd"], "cook": ["chef"],
}
KIN = ["father", "mother", "wife", "husband", "son", "daughter", "brother", "sister", "uncle", "aunt", "cousin", "nephew",
       "niece", "grandfather", "grandmother"]
RELATIONS = KIN + ["friend", "servant", "master", "guardian", "maid", "nurse", "housekeeper", "secretary", "clerk"]
TRADES = ["doctor", "physician", "surgeon", "lawyer", "attorney", "sailor", "seaman", "clergyman", "parson", "vicar",
          "captain", "merchant", "soldier", "officer", "teacher", "schoolmaster", "governess", "farmer", "banker",
          "clerk", "butler", "cook", "servant", "maid", "smith", "blacksmith", "carpenter", "shoemaker", "painter",
          "artist", "priest", "student", "nurse", "magistrate", "judge", "innkeeper", "landlord", "shopkeeper",
          "tradesman", "fisherman", "miller", "weaver", "tailor", "baker", "coachman", "gardener", "shepherd"]
NUMBER_WORDS = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
                "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety").split()
FEATURES = ["hair", "eyes", "beard", "face", "voice", "hands", "whiskers", "complexion", "moustache", "nose"]


def reword(phrase: str, rng) -> str:
    """phrase with each word that has synonyms swapped, at random, for one."""
    return " ".join(rng.choice(SYNONYMS[w]) if w in SYNONYMS and rng.random() < 0.7 else w for w in phrase.split())


# ----- finding facts -----
_TITLES = r"(?:(?:Mr|Mrs|Dr|St)\.? |Miss |Captain |Lady |Sir |Lord |Colonel |Madame |Monsieur |Prince |Princess |Count |Countess |Aunt |Uncle |Squire |Doctor )"
NAME = rf"{_TITLES}?[A-Z][a-z]{{2,}}(?: [A-Z][a-z]{{2,}})?"
_NOT_NAMES = frozenset("""The This That Then There They Their These Those When What Where Which While Whose Why How Who
But And For Yet Nor His Her She Yes Now Well Here One Some All Our Your After Before Chapter God Lord Heaven Not
Nothing Everything Every Each Such Still Though Although Since Until Upon Once Again Only Even Perhaps Indeed Ah Oh
Poor Dear Mother Father Sister Brother Sir Madam Monday Tuesday Wednesday Thursday Friday Saturday Sunday January
February March April May June July August September October November December English French Russian German Christ
Christian Book Part Neither Either Nor Rich Mine Project Gutenberg Volume Letter Mine Its Let Did Does Had Has Have Was Were Will Would Could Should
Shall Must Can Come Go Look See Tell Say Said Good Very Many Much More Most Old Young Little Great First Last""".split())
_S = "{S}"  # the subject slot: a NAME, or He/She in the second of two sentences


def _pattern(text: str) -> str:
    return text.replace("{NAME}", NAME).replace("{REL}", "|".join(RELATIONS))


def _desc(words: int = 4) -> str:
    return rf"((?:[a-z][a-z'-]* ){{0,{words - 1}}}[a-z][a-z'-]*)"


_CLAUSE = frozenset("is was are were has had have will would could should said says did does do not be been shall "
                    "may might must can".split())
_NOT_DESC_START = frozenset("first second third fourth fifth sixth last only one same very most least best worst other "
                            "next more less whole".split())


PERSONS = frozenset("man woman boy girl fellow gentleman lady person child creature bachelor widow widower youth maiden "
                    "lad lass gentlewoman chap hero heroine villain stranger visitor guest neighbour neighbor".split())
_AGENT = re.compile(r"(?:er|or|ist|ian|ant|ent|man|woman|ess)$")


def _head(desc: str) -> str:
    """The head noun of a description: "son of a doctor" -> "son"."""
    return desc.split(" of ")[0].split()[-1]


def _description_ok(desc: str) -> bool:
    """A noun phrase about a person: not the start of a clause ("Marianne, the
    horse is yours"), nor a rank ("the first to speak"), nor a thing ("Moscow,
    the capture of marauders")."""
    words = desc.split()
    head = _head(desc)
    personal = head in PERSONS or head in TRADES or head in RELATIONS or bool(_AGENT.search(head))
    return personal and not (_CLAUSE & set(words)) and words[0] not in _NOT_DESC_START and words[-1] not in _STOP


@dataclass(frozen=True)
class Rule:
    """A sentence pattern and the questions it answers. ask(m, rng) gives
    (key, questions) pairs: a key names the kind of fact and its subject, so
    two facts of a window with one key make its question ambiguous."""
    pattern: str
    ask: Callable
    subject_led: bool = False  # the pattern starts with {S}: it may be the second of two sentences
    name_first: bool = True  # the pattern starts with a name

    def compiled(self, pronoun: bool) -> re.Pattern:
        """The pattern for running over a whole book: any whitespace between
        words (books wrap their lines)."""
        subject = r"(He|She)" if pronoun else rf"({NAME})"
        pattern = _pattern(self.pattern).replace(_S, subject).replace(" ", r"\s+")
        # a pattern that starts with a name skips every place that is no capital at once (10x faster)
        return re.compile(r"(?=[A-Z])" + pattern if self.name_first else pattern)


def _poss(name: str) -> str:
    return name + ("'" if name.endswith("s") else "'s")


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def _about_person(name: str, desc: str, article: str, rng) -> list[tuple[tuple, list[str]]]:
    if not _description_ok(desc):
        return []
    out = [(("about", name), [f"Who is {name}?", f"How is {name} described?", f"What do we learn about who {name} was?",
                              f"What sort of person was {name}?"])]
    last = _head(desc)
    if last in TRADES:
        other = reword(last, rng)
        out.append((("trade", name), [f"What did {name} do for a living?", f"What was {_poss(name)} occupation?",
                                      f"What was {_poss(name)} profession?", f"What line of work was {name} in?"]))
        out.append((("who-trade", last), [f"Which character worked as {_a(other)}?", f"Who earned a living as {_a(other)}?"]))
    if article == "the":
        d = reword(desc, rng)
        out.append((("who-desc", desc), [f"Who was the {d}?", f"Which character is the {d}?",
                                         f"Who is described as the {d}?", f"Which person was the {d}?"]))
    return out


def _relation(a: str, rel: str, b: str, rng) -> list[tuple[tuple, list[str]]]:
    """b is a's rel."""
    r = reword(rel, rng)
    link = "related to" if rel in KIN else "to"
    return [(("rel", a, rel), [f"Who was {_poss(a)} {r}?", f"Who was the {r} of {a}?", f"Which character was {_poss(a)} {r}?",
                               f"Can you name the {r} of {a}?"]),
            (("rel-of", b, a), [f"Whose {r} was {b}?", f"{b} was the {r} of which character?",
                                f"How was {b} {link} {a}?" if rel in KIN else f"What was {b} to {a}?"])]


def _married(a: str, b: str, rng) -> list[tuple[tuple, list[str]]]:
    return [(("spouse", x), [f"Who was {x} married to?", f"Whom did {x} wed?", f"Who became {_poss(x)} spouse?",
                              f"Who was the spouse of {x}?"]) for x in (a, b)]


_PLACE = r"((?:the )?[A-Z][a-z]+(?: [A-Z][a-z]+){0,2})"
_LIVE = {"lived": "live", "dwelt": "live", "resided": "live", "lodged": "live", "was living": "live", "was born": "born",
         "had been born": "born", "grew up": "grew", "came": "from"}


def _where(name: str, verb: str, place: str, rng) -> list[tuple[tuple, list[str]]]:
    kind = _LIVE[verb]
    questions = {
        "live": ([f"Where was {_poss(name)} home?", f"In what place did {name} make a home?", f"Where did {name} reside?",
                  f"Which place was home to {name}?"], [f"Which character made a home in {place}?", f"Who had a home at {place}?"]),
        "born": ([f"What was {_poss(name)} birthplace?", f"Where did {name} come into the world?",
                  f"In which place was {name} born?"], [f"Which character was a native of {place}?"]),
        "grew": ([f"Where did {name} spend childhood?", f"In what place was {name} brought up?"],
                 [f"Who was raised in {place}?"]),
        "from": ([f"Where was {name} from?", f"Where did {name} originally come from?", f"What was {_poss(name)} origin?"],
                 [f"Which character hailed from {place}?"]),
    }[kind]
    return [(("where", kind, name), questions[0]), (("who-where", kind, place), questions[1])]


RULES = [
    Rule(rf"\b{_S}, the {_desc()}[,;.]", lambda m, rng: _about_person(m[1], m[2], "the", rng)),
    Rule(rf"{_S} (?:was|is) (a|an|the) {_desc()}(?=[,;.]| who| that| and| with| in| at)",
         lambda m, rng: _about_person(m[1], m[3], m[2], rng), subject_led=True),
    Rule(r"\b({NAME}), ({NAME})'s ({REL})\b", lambda m, rng: _relation(m[2], m[3], m[1], rng)),
    Rule(r"\b({NAME})'s ({REL}),? ({NAME})\b", lambda m, rng: _relation(m[1], m[2], m[3], rng)),
    Rule(rf"{_S} (?:was|is) ({{NAME}})'s ({{REL}})\b", lambda m, rng: _relation(m[2], m[3], m[1], rng), subject_led=True),
    Rule(r"\b({NAME}),? (?:was |is )?the ({REL}) of ({NAME})\b", lambda m, rng: _relation(m[3], m[2], m[1], rng)),
    Rule(rf"{_S} (?:had )?(?:married|was married to) ({{NAME}})\b", lambda m, rng: _married(m[1], m[2], rng),
         subject_led=True),
    Rule(rf"{_S} ({'|'.join(_LIVE)}) (?:in|at|from) {_PLACE}", lambda m, rng: _where(m[1], m[2], m[3], rng), subject_led=True),
    Rule(rf"{_S} (?:was|is) (?:now |then |about |nearly |only |just |not yet |over )?((?:{'|'.join(NUMBER_WORDS)})(?:-[a-z]+)?|\d+) years (?:old|of age)",
         lambda m, rng: [(("age", m[1]), [f"How old was {m[1]}?", f"What age was {m[1]}?", f"What was {_poss(m[1])} age?"])],
         subject_led=True),
    Rule(rf"{_S} had {_desc(3)} ({'|'.join(FEATURES)})\b",
         lambda m, rng: [(("feature", m[1], m[3]), [f"What {'were' if m[3].endswith('s') else 'was'} {_poss(m[1])} {m[3]} like?",
                                                    f"How does the text describe {_poss(m[1])} {reword(m[3], rng)}?"])],
         subject_led=True),
    Rule(r"\b(?:a|an|the|his|her|their) ((?:[a-z-]+ )?[a-z-]+),? (?:called|named) ({NAME})\b",
         lambda m, rng: [(("named", m[1]), [f"What was the name of the {reword(m[1], rng)}?",
                                            f"What name did the {reword(m[1], rng)} go by?",
                                            f"What was the {reword(m[1], rng)} known as?"])], name_first=False),
]
_COMPILED = [(rule.compiled(False), rule.compiled(True) if rule.subject_led else None) for rule in RULES]
_MID_SENTENCE_NAME = re.compile(rf"[a-z,;]\s+({NAME})\b")


def characters(text: str, least: int = 3) -> frozenset[str]:
    """Names a book uses in the middle of sentences at least `least` times: its
    characters and places (a capitalised word that starts a sentence is no name)."""
    counts = Counter(re.sub(r"\s+", " ", m[1]) for m in _MID_SENTENCE_NAME.finditer(text))
    return frozenset(n for n, c in counts.items() if c >= least and n.split()[0] not in _NOT_NAMES)


@dataclass(frozen=True)
class Candidate:
    key: tuple
    questions: tuple[str, ...]
    span: tuple[int, int]  # the answer: one or two sentences of the book


@dataclass(frozen=True)
class Match:
    position: int
    rule: int
    pronoun: bool  # "He/She ..." after a sentence that starts with a name


def matches(book: Book) -> list[Match]:
    """Where the rules match in the book's body, in order of position."""
    lo, hi = book.body
    out = [Match(m.start(), i, pronoun) for i, patterns in enumerate(_COMPILED)
           for pronoun, pattern in enumerate(patterns) if pattern is not None
           for m in pattern.finditer(book.text, lo, hi)]
    return sorted(out, key=lambda m: m.position)


def facts_at(book: Book, names: frozenset[str], match: Match, rng) -> list[Candidate]:
    """The candidates of one match: none when a name is no character's, the
    match is not one sentence (two for a pronoun), or every question copies
    the answer."""
    text = book.text
    pattern = _COMPILED[match.rule][match.pronoun]
    m = pattern.match(text, match.position)
    if m is None:
        return []
    spans = sentences_around(text, max(0, m.start() - 600), m.end())
    at = [s for s in spans if s[0] <= m.start() < s[1]]
    if not at or at[0][1] < m.end() or (RULES[match.rule].subject_led and at[0][0] != m.start()):
        return []
    span, lead = at[0], None
    if match.pronoun:
        before = [s for s in spans if s[1] <= span[0]]
        lead = re.match(rf"({NAME})\b", text[before[-1][0]:before[-1][1]]) if before else None
        if lead is None:
            return []
        span, lead = (before[-1][0], span[1]), re.sub(r"\s+", " ", lead[1])
    groups = [re.sub(r"\s+", " ", g) if g else g for g in m.groups()]
    groups = [lead if g in ("He", "She") else g for g in groups]
    if groups[0] not in names or any(g and g[:1].isupper() and g.split()[0] in _NOT_NAMES for g in groups):
        return []
    answer = text[span[0]:span[1]]
    if len(answer) > MAX_ANSWER_CHARS:
        return []
    out = []
    for key, questions in RULES[match.rule].ask([m[0], *groups], rng):  # numbered as the pattern's groups
        kept = tuple(q for q in questions if overlap(q, answer) < MAX_OVERLAP)
        if kept:
            out.append(Candidate(key, kept, span))
    return out


# ----- RULER-shaped needles -----
_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
_ONE = ["What is the special magic {one} for {keys} mentioned in the provided text?",
        "Which special magic {one} does the text give for {keys}?", "What special magic {one} belongs to {keys}?"]
_ALL = ["What are all the special magic {kind} for {keys} mentioned in the provided text?",
        "List every special magic {one} the text gives for {keys}.", "Which special magic {kind} does the text give for {keys}?"]


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@dataclass(frozen=True)
class Drawn:
    """A book-QA example before tokenizing: the document, one question, and the
    quotes the answer is made of (each verbatim in the document)."""
    document: str
    question: str
    quotes: tuple[str, ...]

    @property
    def answer(self) -> str:
        return LIST_SEPARATOR.join(self.quotes)


class BookQA:
    """Draws book-QA examples. measure(text) -> tokens; draw() is given room(question,
    answer) -> the document's token budget once the question is known."""

    def __init__(self, books: list[Book], measure: Callable[[str], int], ruler_rate: float = 0.3,
                 boilerplate_rate: float = 0.15):
        if not books:
            raise ValueError("no book to make book-QA examples from")
        self.books = books
        self.measure = measure
        self.ruler_rate = ruler_rate
        self.boilerplate_rate = boilerplate_rate
        self.cum = []
        total = 0
        for b in books:
            total += b.body[1] - b.body[0]
            self.cum.append(total)
        self._indexed: dict[int, tuple] = {}
        sample = books[0].text[books[0].body[0]:][:20_000]
        self.chars_per_token = len(sample) / max(1, measure(sample))

    def _book(self, rng) -> int:
        """A book's index, drawn in proportion to its length."""
        return bisect.bisect_right(self.cum, rng.random() * self.cum[-1])

    def draw(self, rng, room: Callable[[str, str], int]) -> Drawn:
        if rng.random() < self.ruler_rate:
            return self._needles(rng, room)
        return self._fact(rng, room)

    def _index(self, i: int) -> tuple[list[Match], list[int], frozenset[str]]:
        """A book's rule matches, their positions and its character names, found on first use."""
        if i not in self._indexed:
            found = matches(self.books[i])
            book = self.books[i]
            self._indexed[i] = found, [m.position for m in found], characters(book.text[book.body[0]:book.body[1]])
        return self._indexed[i]

    def _window(self, rng, book: Book, span: tuple[int, int], chars: int, side: str | None) -> tuple[int, int]:
        """About `chars` characters of the book holding span at a random place:
        in the body, or reaching into the header or the licence (side)."""
        lo, hi = book.body
        if side == "header":
            start, end = 0, chars
        elif side == "licence":
            end = min(len(book.text), hi + int(chars * rng.uniform(0.2, 0.6)))
            start = end - chars
        else:
            start = max(lo, span[0] - rng.randint(0, max(0, chars - (span[1] - span[0]))))
            end = min(hi, start + chars)
        return max(0, min(start, span[0])), max(end, span[1])

    def _fact(self, rng, room) -> Drawn:
        chars = int(room("Who was the elderly sea-cook of the ship?", "x" * 160) * self.chars_per_token)
        for _ in range(200):
            i = self._book(rng)
            book = self.books[i]
            found, positions, names = self._index(i)
            lo, hi = book.body
            side = rng.choice(["header", "licence"]) if rng.random() < self.boilerplate_rate else None
            if side == "header" and lo > 0:
                pool = range(0, bisect.bisect_right(positions, lo + chars // 2))
            elif side == "licence" and hi < len(book.text):
                pool = range(bisect.bisect_left(positions, hi - chars // 2), len(found))
            else:
                pool, side = range(len(found)), None
            if not pool:
                continue
            candidates = facts_at(book, names, found[rng.choice(pool)], rng)
            if not candidates:
                continue
            c = rng.choice(candidates)
            if c.key[0] == "about" and rng.random() < 0.5:
                continue  # "Who is X?" would be half the questions: descriptions are the commonest match
            start, end = self._window(rng, book, c.span, chars, side)
            near = found[bisect.bisect_left(positions, start):bisect.bisect_left(positions, end)]
            if any(o.key == c.key and o.span != c.span for m in near for o in facts_at(book, names, m, rng)):
                continue  # the question would have two answers in this window
            question = rng.choice(c.questions)
            answer = book.text[c.span[0]:c.span[1]]
            document = self._fit(book.text, start, end, [c.span], room(question, answer))
            if document is not None:
                return Drawn(document, question, (answer,))
        raise RuntimeError("no book fact found in 200 tries: are the books prose?")

    def _fit(self, text: str, start: int, end: int, spans: list[tuple[int, int]], budget: int) -> str | None:
        """text[start:end] cut (from the end first, then the start) until it
        measures at most budget tokens, keeping every span whole."""
        first, last = min(s[0] for s in spans), max(s[1] for s in spans)
        for _ in range(6):
            excess = self.measure(text[start:end]) - budget
            if excess <= 0:
                return text[start:end]
            cut = int(excess * self.chars_per_token * 1.1) + 16
            from_end = min(cut, end - last)
            end -= from_end
            start += min(cut - from_end, first - start)
            if from_end == 0 and start == first:
                return None
        return None

    def _needles(self, rng, room) -> Drawn:
        kind, one, value = rng.choice([("numbers", "number", lambda: str(rng.randint(1_000_000, 9_999_999))),
                                       ("words", "word", lambda: rng.choice(self._words(rng, 40))),
                                       ("uuids", "uuid", lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4)))])
        words = self._words(rng, 400)
        key = rng.choice([lambda: f"{rng.choice(words)}-{rng.choice(words)}",
                          lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4))])
        shape = rng.choice(["multikey", "multikey", "multivalue", "multiquery", "only-needles"])
        n_keys = rng.randint(2, 40) if shape != "only-needles" else rng.randint(30, 120)
        keys = list(dict.fromkeys(key() for _ in range(n_keys)))
        facts = [(k, value()) for k in keys]
        if shape == "multivalue":
            facts += [(keys[0], value()) for _ in range(rng.randint(1, 3))]  # up to 4 values, as list answers quote (qa/list_answers.py)
        asked = keys[:rng.randint(2, min(4, len(keys)))] if shape == "multiquery" else keys[:1]
        sentences = list(dict.fromkeys(_NEEDLE.format(kind=kind, key=k, value=v) for k, v in facts))
        rng.shuffle(sentences)
        several = shape == "multiquery" or (shape == "multivalue" and rng.random() < 0.9)
        question = rng.choice(_ALL if several else _ONE).format(kind=kind, one=one, keys=_and(asked))
        quoted = [s for s in sentences if any(f" for {k} is:" in s for k in asked)]
        budget = room(question, LIST_SEPARATOR.join(quoted))
        if shape == "only-needles":
            document = " ".join(sentences)
        else:
            book = self.books[self._book(rng)]
            chars = max(200, int(budget * self.chars_per_token) - sum(len(s) + 1 for s in sentences))
            start = rng.randrange(book.body[0], max(book.body[0] + 1, book.body[1] - chars))
            document = insert_at_sentences(book.text[start:min(book.body[1], start + chars)], sentences, rng)
        spans = [(document.index(s), document.index(s) + len(s)) for s in quoted]
        fitted = self._fit(document, 0, len(document), spans, budget)
        if fitted is None or not all(s in fitted for s in quoted):
            return self._needles(rng, room)
        # a needle cut off by the fit must not be asked about, and the answer lists the asked ones in document order
        quoted.sort(key=fitted.index)
        return Drawn(fitted, question, tuple(quoted))

    def _words(self, rng, n: int) -> list[str]:
        """Lower-case words of a random stretch of a book: RULER's keys and values are plain words too."""
        book = self.books[self._book(rng)]
        start = rng.randrange(book.body[0], max(book.body[0] + 1, book.body[1] - 5000))
        words = sorted(set(re.findall(r"\b[a-z]{5,12}\b", book.text[start:start + 5000])))
        return rng.sample(words, min(n, len(words))) if len(words) >= 10 else ["lantern", "harbour", "orchard", "meadow", "thimble", "bishop",
                                                    "compass", "pelican", "biscuit", "walnut"]

