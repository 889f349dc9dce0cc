"""Training data for document QA: questions answered by one sentence of a long
context, rendered exactly as `lmqa ask` renders them (QAPrompt: the chat
template around prompts/qa_document.txt or qa_codebase.txt).

A document example is a slice of real text with 1-8 invented facts written in
at sentence boundaries. A fact is drawn from one of many shapes (names of
pets and ships, places, objects, dates, quantities, relations, trades,
colours, causes, quotes, "who did it"), each with several sentence templates
and several question paraphrases that use other verbs and word orders than
the fact, about people named by invented names or by plain descriptions ("the
old ferryman"). Most facts are distractors built from the asked fact by
changing one detail of its subject (another town, another person), so the
question can only be answered by the sentence whose subject matches it in
full. The answer copies the fact's sentence, which is what the product wants
anyway (an answer that quotes its evidence). One sequence may ask up to three
questions as chat follow-ups, and a few ask about something the document never
mentions ("The document does not say."): a subject like a written one, or
one the document says nothing about at all.

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
from dataclasses import dataclass, field
from pathlib import Path

from lmqa.qa.prompts import REFUSAL as NOT_SAID

from .data import Example

# ----- word lists (training only; tests check that none holds an eval answer) -----
_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t", "th", "v", "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
_CODAS = ["", "n", "r", "l", "s", "th", "m", "nd", "rk", "x", "ck", "st"]
_TOWN_ENDINGS = ["by", "ton", "wick", "ford", "holm", "stead", "mere", "bridge", "moor", "haven", "dale", "worth"]

GIVEN_NAMES = ["Ilse", "Tobias", "Maren", "Osric", "Delphine", "Anselm", "Greta", "Lorcan", "Sabine", "Ruben", "Hedda",
               "Emrys", "Odile", "Caspar", "Wilma", "Bertram", "Ines", "Leopold", "Noor", "Piet", "Solveig", "Dmitri",
               "Gideon", "Yusuf", "Clementine", "Barnaby", "Ingrid", "Silas", "Keziah", "Mungo", "Philippa", "Rasmus",
               "Zofia", "Hamish", "Liesel", "Aurelie"]
SURNAMES = ["Quarrie", "Pritchard", "Vane", "Okafor", "Lindqvist", "Marchbank", "Thistlewood", "Coyle", "Bexley",
            "Ravensworth", "Farrant", "Dacre", "Tennant", "Hallam", "Strand", "Penhaligon", "Kowalczyk", "Abernathy",
            "Fairweather", "Rook", "Castellane", "Winterbourne", "Gaskell", "Tregarth", "Sorensen", "Mallory", "Larkin",
            "Ashby", "Kemble", "Fitch", "Ridley", "Saltonstall"]
TITLES = ["Captain", "Dr.", "Professor", "Colonel", "Judge", "Reverend", "Alderman", "Sergeant", "Madame", "Master"]
ADJECTIVES = ["old", "young", "retired", "new", "blind", "widowed", "travelling", "elderly", "one-eyed", "red-haired",
              "deaf", "grumpy"]
ORDINALS = ["youngest", "eldest", "second", "tallest", "quietest", "cleverest"]
COUNT_WORDS = ["three", "four", "five", "six"]
GROUPS = ["sisters", "brothers", "cousins", "weavers", "fishermen", "Farrant children", "Larkin girls"]
ROLES = ["miller", "ferryman", "schoolmaster", "baker", "blacksmith", "harbourmaster", "innkeeper", "tailor",
         "stationmaster", "gardener", "magistrate", "weaver", "clockmaker", "shepherd", "brewer", "cartographer",
         "bell-ringer", "apothecary", "chandler", "surveyor", "lock-keeper", "postmistress", "organist", "verger",
         "coachman", "falconer", "night watchman", "vicar", "ratcatcher", "dairymaid"]
ANIMALS = ["dog", "parrot", "goat", "horse", "tortoise", "hen", "donkey", "ferret", "canary", "pony", "hound",
           "barn owl", "jackdaw", "rabbit", "pig"]
OBJECTS = ["brass key", "silver locket", "sealed letter", "copper coin", "leather journal", "signet ring",
           "pocket watch", "folded map", "wooden flute", "glass bead", "wax seal", "bone comb", "tin whistle",
           "compass", "pearl button", "prayer book"]
CONTAINERS = ["a flour sack", "the chimney", "a hollow oak", "the hay loft", "a biscuit tin", "the well bucket",
              "a boot", "the church organ", "a loose floorboard", "the rain barrel", "a hatbox", "the woodpile"]
FIND_PLACES = ["the bandstand", "a rabbit hole", "the vicarage cellar", "the old quarry", "a ditch by the road",
               "the bell tower", "the attic of the school", "a heap of fishing nets", "the mill race"]
BURY_PLACES = ["the pear tree", "the garden gate", "the old well", "the stable floor", "the rose bed", "the chapel steps",
               "the beech hedge", "the compost heap"]
RECORDS = ["parish register", "town charter", "harbour ledger", "guild seal", "silver mace", "flood map",
           "founding deed", "church plate"]
STORE_PLACES = ["the vestry", "the bank vault", "a locked chest in the town hall", "the cellar of the inn",
                "the museum basement", "an iron safe at the post office", "the schoolroom cupboard"]
OCCASIONS = ["after the war", "after the great flood", "in old age", "after the wedding", "when the mill closed",
             "after the fire"]
EVENTS = ["harvest fair", "river regatta", "wool auction", "lantern parade", "chess tournament", "horse show",
          "spring market", "choir contest", "ploughing match", "flower show"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
BUILDINGS = ["granary", "town hall", "lighthouse", "mill", "chapel", "boathouse", "observatory", "schoolhouse",
             "toll house", "tannery"]
UNITS = ["windows", "steps", "rooms", "chimneys", "doors", "beams", "bells", "benches"]
COLOURS = ["crimson", "sage green", "pale yellow", "navy blue", "chalk white", "rust orange", "plum purple",
           "slate grey", "sky blue", "charcoal black", "bottle green", "mustard yellow"]
RELATIONS = ["uncle", "godmother", "cousin", "grandfather", "aunt", "elder sister", "stepbrother", "guardian"]
KIN = ["younger sister", "baby brother", "stepdaughter", "godson", "half-brother", "niece", "nephew"]
THINGS = [("fruit", ("quince", "apricot", "gooseberry", "damson", "fig", "mulberry")),
          ("song", ("The Salt Road", "Over Barrow Hill", "The Tinker's Wife", "Lanterns Low", "Grey Gull Morning")),
          ("flower", ("foxglove", "primrose", "cornflower", "marigold", "bluebell", "larkspur")),
          ("tool", ("chisel", "spokeshave", "awl", "mallet", "plane", "drawknife"))]
OCCUPATIONS = ["saddler", "glassblower", "bookbinder", "cooper", "wheelwright", "copper engraver", "rope maker",
               "lamplighter", "candle maker", "stonemason", "thatcher", "clog maker", "basket weaver", "tanner"]
OFFICES = ["mayor", "town clerk", "coroner", "churchwarden", "justice of the peace", "high sheriff", "bailiff",
           "harbour warden"]
QUOTE_NOUNS = ["river", "kettle", "ladder", "lantern", "barley", "orchard", "anvil", "compass", "thread", "harbour"]
QUOTE_VERBS = ["forgets", "waits", "bends", "sings", "wanders", "sleeps", "listens", "returns"]
QUOTE_ADVERBS = ["twice", "for no one", "in winter", "at dawn", "without reason", "before the rain"]
MOTTO_VERBS = ["Mend", "Mind", "Guard", "Keep", "Sow", "Trim", "Light", "Tend"]
MOTTO_NOUNS = ["net", "tide", "flame", "gate", "field", "sail", "hearth", "lamp", "road", "well"]
PASSWORD_WORDS = (["copper", "midnight", "salted", "crooked", "silver", "woollen", "pickled", "paper"],
                  ["lantern", "kettle", "walnut", "rabbit", "bishop", "thimble", "biscuit", "pelican"])
INSCRIPTIONS = (["Rest", "Wait", "Work", "Watch", "Sing", "Pray"], ["until", "while"],
                ["the tide turns", "the bell rings", "the corn is in", "the lamps are lit", "the ice breaks",
                 "the ships come home"])
VESSELS = ["schooner", "barge", "brig", "fishing smack", "cutter", "steamer", "ketch", "lugger"]
SHIP_NAMES = (["Silver", "Northern", "Brave", "Patient", "Merry", "Restless", "Faithful", "Golden", "Lucky", "Winter"],
              ["Plover", "Lass", "Tern", "Promise", "Curlew", "Dolphin", "Venture", "Star", "Kittiwake", "Rose"])
INN_NAMES = (["Crooked", "Drowsy", "Laughing", "Lame", "Golden", "Three-Legged", "Salty", "Sleeping"],
             ["Heron", "Fox", "Mackerel", "Ram", "Kettle", "Cartwheel", "Lantern", "Pike"])
HORSES = ["mare", "gelding", "pony", "stallion", "cob", "carthorse"]
INSTITUTIONS = ["rowing club", "lending library", "brass band", "grammar school", "printing works", "savings bank",
                "lifeboat station", "botanical garden", "debating society", "cricket club"]
SOCIETIES = ["chess circle", "choral society", "whist club", "gardening club", "photographic club", "angling club",
             "poetry circle", "bell-ringers' guild"]
MONEY = ["shillings", "guineas", "crowns", "pounds", "francs", "florins"]
VEGETABLES = ["pumpkin", "cabbage", "leek", "squash", "beetroot", "cauliflower", "swede", "parsnip"]
SKILLS = ["swim", "read", "ride a bicycle", "play the fiddle", "sail", "write", "skate", "dance the polka"]
TALL_THINGS = ["church spire", "old elm", "mill chimney", "signal mast", "bell tower", "water tower", "maypole"]
INSTRUMENTS = ["fiddle", "cello", "oboe", "trumpet", "harmonium", "piano", "bagpipes", "concertina", "mandolin", "flute"]
GAMES = ["chess", "archery", "bowls", "fencing", "draughts", "debating", "cheese-making", "ploughing"]
MATERIALS = ["grey flint", "yellow brick", "blue slate", "red sandstone", "limestone", "oak timber", "cob and thatch",
             "dressed chalk"]
BELONGINGS = ["walking stick", "pipe", "chess set", "writing desk", "soup spoon", "jewellery box", "rocking chair"]
SUBSTANCES = ["ebony", "pewter", "blackthorn", "whalebone", "walnut", "horn", "copper", "birch bark", "cherry wood"]
GARMENTS = ["scarf", "coat", "hat", "waistcoat", "shawl", "cap", "cloak"]
LEAVE_REASONS = ["a quarrel with the vicar", "the failing harvest", "a debt to the miller", "a broken engagement",
                 "the damp winters", "a dispute over a fence", "the new railway", "a scandal at the bank"]
CLOSE_REASONS = ["a leaking roof", "a lack of money", "a fire in the cellar", "a dispute over rent", "rats in the walls",
                 "the death of its owner", "a cracked foundation"]
FAME = ["rescuing a drowning calf", "growing enormous onions", "never once being late", "walking to the coast and back",
        "painting every house in the street", "carving tiny boats", "whistling like a blackbird"]
INSCRIBED = ["church bell", "town fountain", "old gravestone", "garden gate", "market clock", "milestone"]
WATERS = ["millpond", "river", "harbour", "flooded quarry", "canal", "weir pool"]
ARTIFACTS = ["pulpit", "weathervane", "village sign", "organ case", "lychgate", "rood screen", "market cross"]
DISCOVERIES = ["cave", "spring", "hoard of coins", "fossil bed", "buried chapel", "underground lake", "old mine shaft"]


# ----- drawing values -----
_RUDE = ("fuck", "cunt", "shit", "cock", "dick", "twat", "piss", "slut", "nig", "fag", "wank")


def made_up_name(rng: random.Random, syllables: int | None = None) -> str:
    """Syllables joined into a name; one that spells a rude word is drawn again."""
    count = syllables or rng.randint(2, 3)
    name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(count))
    return made_up_name(rng, syllables) if any(w in name for w in _RUDE) else name.capitalize()


def made_up_town(rng: random.Random) -> str:
    return made_up_name(rng, rng.randint(1, 2)) + rng.choice(_TOWN_ENDINGS)


def surname(rng: random.Random) -> str:
    return rng.choice(SURNAMES) if rng.random() < 0.5 else made_up_name(rng)


def _draw(source, rng: random.Random):
    """A value from a list (uniformly) or from a drawing function."""
    return rng.choice(source) if isinstance(source, (list, tuple)) else source(rng)


def _joined(*lists):
    """A drawing function: one word of each list, joined ("Silver Plover")."""
    return lambda rng: " ".join(rng.choice(words) for words in lists)


def _number(low: int, high: int, unit: str = ""):
    return lambda rng: f"{rng.randint(low, high)}{unit}"


def _year(rng: random.Random) -> str:
    return str(rng.randint(1650, 1990))


def _date(rng: random.Random) -> str:
    return f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {_year(rng)}"


def _month_year(rng: random.Random) -> str:
    return f"{rng.choice(MONTHS)} {_year(rng)}" if rng.random() < 0.5 else _year(rng)


def _money(rng: random.Random) -> str:
    return f"{rng.randint(2, 90)} {rng.choice(MONEY)}"


def _quote(rng: random.Random) -> str:
    return f"The {rng.choice(QUOTE_NOUNS)} {rng.choice(QUOTE_VERBS)} {rng.choice(QUOTE_ADVERBS)}."


def _motto(rng: random.Random) -> str:
    first, second = rng.sample(MOTTO_NOUNS, 2)
    return f"{rng.choice(MOTTO_VERBS)} the {first}, {rng.choice(MOTTO_VERBS).lower()} the {second}"


# ----- people -----
# How a fact names someone, how a question may name them (None: the same), and
# a drawer per part. Natural descriptions sit beside invented names so that
# questions about "the old ferryman" look like questions about "Captain Vane".
_WHO_FORMS = (
    ("{0} {1}", None, (made_up_name, made_up_name)),
    ("{0} {1}", None, (GIVEN_NAMES, surname)),
    ("{0} {1} {2}", "{0} {2}", (TITLES, GIVEN_NAMES, surname)),
    ("the {0} {1}", None, (ADJECTIVES, ROLES)),
    ("the {0} of {1}", None, (ROLES, made_up_town)),
    ("the {0} of the {1} {2}", None, (ORDINALS, COUNT_WORDS, GROUPS)),
)
_NAMED_FORMS = 3  # the first forms are names, fit to answer "who" questions


@dataclass(frozen=True, eq=False)
class Who:
    """Someone a fact is about: named in full by the fact, maybe shortened by a
    question ("Captain Ilse Vane" / "Captain Vane"). Two people a question
    could not tell apart are equal, so a document never holds both."""
    form: int
    parts: tuple[str, ...]

    @property
    def name(self) -> str:
        return _WHO_FORMS[self.form][0].format(*self.parts)

    @property
    def short(self) -> str:
        return (_WHO_FORMS[self.form][1] or _WHO_FORMS[self.form][0]).format(*self.parts)

    def __eq__(self, other) -> bool:
        return isinstance(other, Who) and other.short == self.short

    def __hash__(self) -> int:
        return hash(self.short)

    def __str__(self) -> str:
        return self.name

    def vary(self, rng: random.Random) -> Who:
        """The same form with one part redrawn: a near-identical person."""
        i = rng.randrange(len(self.parts))
        part = _draw(_WHO_FORMS[self.form][2][i], rng)
        return Who(self.form, tuple(part if j == i else p for j, p in enumerate(self.parts)))


def _who(rng: random.Random, form: int) -> Who:
    return Who(form, tuple(_draw(d, rng) for d in _WHO_FORMS[form][2]))


def someone(rng: random.Random) -> Who:
    return _who(rng, rng.randrange(len(_WHO_FORMS)))


def named(rng: random.Random) -> str:
    """A person's name, as the answer to a "who" question."""
    return _who(rng, rng.randrange(_NAMED_FORMS)).name


# ----- fact shapes -----
@dataclass(frozen=True)
class Fact:
    sentence: str  # as written into the document
    questions: tuple[str, ...]  # paraphrases, any of which it answers
    answer: str  # the span a correct answer must contain


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _possessive(text: str) -> str:
    return text + ("'" if text.endswith("s") else "'s")


def _fill(template: str, slots: dict) -> str:
    """template with each slot as {key}, {Key} (capitalised, to start a
    sentence), {key_s} and {Key_s} (possessive)."""
    values = {}
    for key, value in slots.items():
        value = str(value)
        values |= {key: value, key.capitalize(): _cap(value),
                   f"{key}_s": _possessive(value), f"{key.capitalize()}_s": _cap(_possessive(value))}
    return template.format(**values)


@dataclass(frozen=True)
class Shape:
    """A kind of fact. subject: the slots a question names (a distractor
    redraws one of them); answer: the drawer of the asked value, which every
    fact template writes as {answer}; details: slots only the fact names.
    Questions are paraphrases with other verbs and word orders than the
    facts, so that matching a question to its fact takes more than
    matching words."""
    subject: dict
    answer: object
    facts: tuple[str, ...]
    questions: tuple[str, ...]
    details: dict = field(default_factory=dict)

    def __call__(self, rng: random.Random, subject: tuple | None = None,
                 template: str | None = None) -> tuple[tuple, Fact]:
        """(subject, fact), drawing what is not given; template: one of facts."""
        subject = subject or tuple(_draw(d, rng) for d in self.subject.values())
        short = rng.random() < 0.5  # questions may name a person shortly
        asked = {k: v.short if short and isinstance(v, Who) else v for k, v in zip(self.subject, subject)}
        while True:  # a value that a question happens to contain is drawn again
            answer = _draw(self.answer, rng)
            questions = tuple(_fill(q, asked) for q in self.questions)
            if not any(answer in q for q in questions):
                break
        slots = dict(zip(self.subject, subject)) | {k: _draw(d, rng) for k, d in self.details.items()}
        return subject, Fact(_fill(template or rng.choice(self.facts), slots | {"answer": answer}), questions, answer)

    def vary(self, subject: tuple, rng: random.Random) -> tuple:
        """The subject with one detail redrawn: a distractor about a similar subject."""
        i = rng.randrange(len(subject))
        old = subject[i]
        new = old.vary(rng) if isinstance(old, Who) else _draw(list(self.subject.values())[i], rng)
        return subject[:i] + (new,) + subject[i + 1:]


def _favourite(kind: str, values: tuple[str, ...]) -> Shape:
    return Shape({"who": someone}, values,
                 (f"The favourite {kind} of {{who}} was {{answer}}.", f"{{Who}} loved no {kind} more than {{answer}}.",
                  f"Above every other {kind}, {{who}} preferred {{answer}}."),
                 (f"Which {kind} did {{who}} like best?", f"What {kind} did {{who}} hold dearest?",
                  f"Name the {kind} {{who}} was fondest of.", f"What was {{who_s}} best-loved {kind}?",
                  f"If {{who}} could pick one {kind}, which would it be?"))


SHAPES = [
    # --- names of pets, ships, inns, horses ---
    Shape({"who": someone, "animal": ANIMALS}, made_up_name,
          ("{Who} kept a {animal} called {answer}.", "{Who_s} {animal} was named {answer}.",
           "A {animal} by the name of {answer} belonged to {who}."),
          ("By what name was {who_s} {animal} known?", "What did {who} call the {animal}?",
           "Which name did the {animal} owned by {who} answer to?", "What name had {who} given the {animal}?",
           "What was the {animal} that lived with {who} called?")),
    Shape({"who": someone, "vessel": VESSELS}, _joined(*SHIP_NAMES),
          ("{Who} was master of a {vessel} named the {answer}.", "The {vessel} that {who} commanded was the {answer}.",
           "{Who} went to sea aboard the {answer}, a {vessel}."),
          ("Which {vessel} did {who} sail?", "What was {who_s} {vessel} called?",
           "On what {vessel} did {who} put out to sea?", "Name the {vessel} under the command of {who}.",
           "What name was painted on the bow of {who_s} {vessel}?")),
    Shape({"who": someone}, _joined(*INN_NAMES),
          ("{Who} kept an inn called the {answer}.", "The inn run by {who} was known as the {answer}.",
           "{Who} was landlord of the {answer}, an inn by the {place}."),
          ("Which inn belonged to {who}?", "What was the name of {who_s} tavern?",
           "In which public house did {who} pour the ale?", "What sign hung over the inn that {who} ran?",
           "Where was {who} the landlord?"),
          {"place": ["crossroads", "harbour", "old bridge", "market square"]}),
    Shape({"who": someone, "horse": HORSES}, made_up_name,
          ("{Who} rode a {horse} called {answer}.", "{Who_s} {horse} went by the name {answer}.",
           "Every market day {who} saddled a {horse} named {answer}."),
          ("What was the name of the {horse} that {who} rode?", "Which {horse} carried {who}?",
           "On what {horse} was {who} usually mounted?", "What did {who} call the {horse}?",
           "Name {who_s} {horse}.")),
    # --- places ---
    Shape({"who": someone}, made_up_town,
          ("{Who} was born in {answer}.", "{Who} first saw the light of day in {answer}.",
           "{Answer} was the birthplace of {who}."),
          ("Where does {who} come from?", "In which town did {who} come into the world?",
           "What is the birthplace of {who}?", "What is {who_s} home town?", "Where was {who} brought into the world?")),
    Shape({"who": someone, "obj": OBJECTS}, CONTAINERS,
          ("{Who} hid the {obj} in {answer}.", "{Who} kept the {obj} tucked inside {answer}.",
           "The {obj} was hidden by {who} in {answer}."),
          ("Where was the {obj} put away by {who}?", "Where did {who} conceal the {obj}?",
           "In what place did {who} stash the {obj}?", "Where could one find the {obj} that {who} secreted away?",
           "What was the hiding place of {who_s} {obj}?")),
    Shape({"who": someone, "obj": OBJECTS}, FIND_PLACES,
          ("{Who} found a {obj} in {answer}.", "A {obj} turned up in {answer}, where {who} came across it.",
           "The {obj} that {who} discovered was lying in {answer}."),
          ("Where did {who} come upon the {obj}?", "In what spot was the {obj} discovered by {who}?",
           "Where did {who} stumble on the {obj}?", "Where was the {obj} lying when {who} found it?",
           "In which place did the {obj} turn up for {who}?")),
    Shape({"who": someone, "obj": OBJECTS}, BURY_PLACES,
          ("{Who} buried the {obj} under {answer}.", "Beneath {answer}, {who} dug a hole for the {obj}.",
           "The {obj} lies buried under {answer}, where {who} put it."),
          ("Where did {who} put the {obj} in the ground?", "Under what was the {obj} laid by {who}?",
           "Where should one dig for {who_s} {obj}?", "Below which spot did {who} hide the {obj}?",
           "Where is the {obj} that {who} interred?")),
    Shape({"record": RECORDS, "town": made_up_town}, STORE_PLACES,
          ("The {record} of {town} was kept in {answer}.", "{Town} stored its {record} in {answer}.",
           "For safety the {record} of {town} stayed in {answer}."),
          ("Where was the {record} of {town} held?", "In what place could one consult {town_s} {record}?",
           "Where did {town} keep its {record} safe?", "Where was {town_s} {record} housed?",
           "Where would you go to see the {record} of {town}?")),
    Shape({"who": someone, "when": OCCASIONS}, made_up_town,
          ("{Who} moved to {answer} {when}.", "{When}, {who} settled in {answer}.",
           "{Who} made a new home in {answer} {when}."),
          ("Where did {who} go to live {when}?", "To which town did {who} relocate {when}?",
           "Where did {who} settle {when}?", "Which town became {who_s} home {when}?",
           "Where did {who} end up living {when}?")),
    # --- objects ---
    Shape({"who": someone}, OBJECTS,
          ("{Who} never travelled without a {answer}.", "On every journey {who} carried a {answer}.",
           "{Who} took a {answer} along wherever the road led."),
          ("What did {who} always bring when travelling?", "Which object went everywhere with {who}?",
           "What item was packed for each of {who_s} trips?", "What did {who} have in hand on every journey?",
           "What was {who} never seen on the road without?")),
    Shape({"who": someone, "whom": someone}, OBJECTS,
          ("{Who} gave {whom} a {answer}.", "{Whom} received a {answer} from {who}.",
           "A {answer} was the present that {who} made to {whom}."),
          ("What did {whom} get from {who}?", "What was {who_s} gift to {whom}?",
           "Which present did {who} hand to {whom}?", "What did {who} offer {whom} as a gift?",
           "What did {whom} unwrap from {who}?")),
    Shape({"who": someone, "event": EVENTS}, OBJECTS,
          ("{Who} lost a {answer} at the {event}.", "At the {event}, {who_s} {answer} went missing.",
           "{Who} came home from the {event} without the {answer}."),
          ("What did {who} mislay at the {event}?", "Which of {who_s} belongings disappeared at the {event}?",
           "What went astray for {who} during the {event}?", "What was {who} missing after the {event}?",
           "What object did {who} fail to bring back from the {event}?")),
    Shape({"who": someone, "town": made_up_town}, OBJECTS,
          ("{Who} bought a {answer} at the market in {town}.", "At {town} market {who} paid for a {answer}.",
           "A {answer} was what {who} purchased in {town}."),
          ("What did {who} buy in {town}?", "Which item did {who} come home with from {town} market?",
           "What was {who_s} purchase at {town}?", "What did {who} spend money on at the {town} market?",
           "What did {who} acquire in {town}?")),
    Shape({"who": someone, "whom": someone}, OBJECTS,
          ("{Who} inherited a {answer} from {whom}.", "{Whom} left a {answer} to {who} in the will.",
           "When {whom} died, a {answer} passed to {who}."),
          ("What did {whom} bequeath to {who}?", "What was {who_s} inheritance from {whom}?",
           "Which heirloom came to {who} from {whom}?", "What did {who} receive under the will of {whom}?",
           "What did {who} get when {whom} passed away?")),
    # --- dates and years ---
    Shape({"institution": INSTITUTIONS, "town": made_up_town}, _year,
          ("The {institution} of {town} was founded in {answer}.", "{Town_s} {institution} was established in {answer}.",
           "In {answer} the {institution} at {town} opened its doors."),
          ("When was the {institution} of {town} set up?", "In which year did {town} get its {institution}?",
           "What year did the {institution} in {town} begin?", "Since when has {town} had a {institution}?",
           "When did {town_s} {institution} first open?")),
    Shape({"who": someone, "whom": someone}, _month_year,
          ("{Who} married {whom} in {answer}.", "{Who} and {whom} were wed in {answer}.",
           "The wedding of {who} and {whom} took place in {answer}."),
          ("When did {who} take {whom} as a spouse?", "In which year did {who} and {whom} marry?",
           "When was {whom} wedded to {who}?", "When did {who} and {whom} tie the knot?",
           "What is the date of the marriage between {who} and {whom}?")),
    Shape({"who": someone, "town": made_up_town}, _month_year,
          ("{Who} arrived in {town} in {answer}.", "{Who} first came to {town} in {answer}.",
           "It was in {answer} that {who} reached {town}."),
          ("When did {who} get to {town}?", "In what year did {who} turn up in {town}?",
           "When did {who} first set foot in {town}?", "Since when had {who} been in {town}?",
           "When was {who_s} arrival at {town}?")),
    Shape({"building": BUILDINGS, "town": made_up_town}, _year,
          ("The {building} at {town} was built in {answer}.", "Work on {town_s} {building} was finished in {answer}.",
           "{Town_s} {building} went up in {answer}."),
          ("When was the {building} of {town} constructed?", "In which year was {town_s} {building} completed?",
           "What year did {town} raise its {building}?", "When did the builders finish the {building} in {town}?",
           "Since which year has the {building} at {town} stood?")),
    Shape({"event": EVENTS, "town": made_up_town}, _date,
          ("The {event} of {town} was held on {answer}.", "{Town} held its {event} on {answer}.",
           "On {answer}, {town} staged its {event}."),
          ("When did {town} hold its {event}?", "On what date was the {event} in {town}?",
           "What day did the {event} take place at {town}?", "When was {town_s} {event}?",
           "On which day did the {event} of {town} happen?")),
    # --- quantities ---
    Shape({"building": BUILDINGS, "town": made_up_town, "unit": UNITS}, _number(3, 480),
          ("The {building} in {town} has {answer} {unit}.", "There are {answer} {unit} in {town_s} {building}.",
           "{Town_s} {building} counts {answer} {unit} in all."),
          ("How many {unit} does the {building} of {town} have?", "What is the number of {unit} in {town_s} {building}?",
           "Count the {unit} of the {building} at {town}: how many are there?",
           "How many {unit} can be found in the {building} at {town}?", "What number of {unit} has {town_s} {building}?")),
    Shape({"start": made_up_town, "end": made_up_town}, _number(2, 190, " miles"),
          ("The road from {start} to {end} is {answer} long.", "{Start} lies {answer} from {end}.",
           "It is {answer} by road between {start} and {end}."),
          ("How far is it from {start} to {end}?", "What distance separates {start} and {end}?",
           "How long is the journey by road from {start} to {end}?", "How far apart are {start} and {end}?",
           "What is the distance between {end} and {start}?")),
    Shape({"who": someone, "vegetable": VEGETABLES}, _number(4, 160, " pounds"),
          ("The prize {vegetable} grown by {who} weighed {answer}.", "{Who_s} champion {vegetable} came to {answer}.",
           "{Who} grew a {vegetable} of {answer}."),
          ("How heavy was {who_s} prize {vegetable}?", "What did the scales say for the {vegetable} {who} raised?",
           "What weight did {who_s} {vegetable} reach?", "How much did the {vegetable} from {who_s} garden weigh?",
           "How heavy a {vegetable} did {who} produce?")),
    Shape({"who": someone, "obj": BELONGINGS}, _money,
          ("{Who} paid {answer} for the {obj}.", "The {obj} cost {who} {answer}.",
           "For {answer}, {who} bought the {obj}."),
          ("How much did {who} spend on the {obj}?", "What price did {who} give for the {obj}?",
           "What was the cost of {who_s} {obj}?", "For what sum did {who} acquire the {obj}?",
           "How much money changed hands when {who} got the {obj}?")),
    Shape({"who": someone, "skill": SKILLS}, _number(5, 90),
          ("{Who} only learned to {skill} at the age of {answer}.", "{Who} could not {skill} until the age of {answer}.",
           "At the age of {answer}, {who} finally learned to {skill}."),
          ("How old was {who} on learning to {skill}?", "At what age did {who} first manage to {skill}?",
           "What age was {who} upon learning to {skill}?", "How many years old was {who} before being able to {skill}?",
           "At how many years of age could {who} first {skill}?")),
    Shape({"event": EVENTS, "town": made_up_town}, _number(40, 9000),
          ("The {event} at {town} drew a crowd of {answer}.", "{Answer} people came to the {event} in {town}.",
           "A crowd of {answer} gathered for {town_s} {event}."),
          ("How many people attended the {event} in {town}?", "How large was the audience at {town_s} {event}?",
           "What was the turnout for the {event} at {town}?", "How many spectators watched the {event} of {town}?",
           "How big a crowd did {town_s} {event} attract?")),
    Shape({"start": made_up_town, "end": made_up_town}, _number(2, 40, " days"),
          ("The voyage from {start} to {end} took {answer}.", "Sailing from {start}, a ship reached {end} in {answer}.",
           "It was a passage of {answer} from {start} to {end}."),
          ("How long did it take to sail from {start} to {end}?", "How much time did the passage from {start} to {end} need?",
           "What was the length of the voyage between {start} and {end}?",
           "How long was a ship at sea going from {start} to {end}?", "What time did the crossing from {start} to {end} take?")),
    Shape({"thing": TALL_THINGS, "town": made_up_town}, _number(12, 400, " feet"),
          ("The {thing} at {town} stands {answer} tall.", "{Town_s} {thing} rises {answer} above the ground.",
           "At {answer}, the {thing} in {town} is the tallest thing for miles."),
          ("How tall is the {thing} in {town}?", "What is the height of {town_s} {thing}?",
           "How high does the {thing} at {town} reach?", "How far up does the {thing} of {town} go?",
           "What height is {town_s} {thing}?")),
    # --- relations ---
    Shape({"who": someone, "relation": RELATIONS}, named,
          ("{Answer} is the {relation} of {who}.", "{Who_s} {relation} was {answer}.",
           "{Who} often stayed with {answer}, who was {who_s} {relation}."),
          ("Who is {who_s} {relation}?", "Name the {relation} of {who}.", "Which person is {relation} to {who}?",
           "Who was {relation} to {who}?", "Who was related to {who} as {relation}?")),
    Shape({"who": someone}, named,
          ("{Who} went into business with {answer}.", "{Answer} was the business partner of {who}.",
           "{Who} and {answer} ran a shop together."),
          ("Who was {who_s} partner in trade?", "With whom did {who} set up a business?",
           "Who shared a business with {who}?", "Which person did {who} go into partnership with?",
           "Whom did {who} work alongside as a partner?")),
    Shape({"who": someone, "instrument": INSTRUMENTS}, named,
          ("{Who} was taught the {instrument} by {answer}.", "{Answer} gave {who} lessons on the {instrument}.",
           "{Who} learned to play the {instrument} from {answer}."),
          ("Who instructed {who} on the {instrument}?", "From whom did {who} pick up the {instrument}?",
           "Who was {who_s} {instrument} teacher?", "Which tutor showed {who} how to play the {instrument}?",
           "Who coached {who} on the {instrument}?")),
    Shape({"who": someone, "game": GAMES}, named,
          ("{Who_s} great rival at {game} was {answer}.", "At {game}, {who} was forever competing against {answer}.",
           "{Answer} and {who} were bitter rivals at {game}."),
          ("Who was {who_s} chief opponent at {game}?", "Against whom did {who} keep contending at {game}?",
           "Which person did {who} most want to beat at {game}?", "Who was the main competitor of {who} in {game}?",
           "At {game}, who was the adversary of {who}?")),
    Shape({"who": someone, "kin": KIN}, made_up_name,
          ("{Who} had a {kin} named {answer}.", "{Who_s} {kin} was called {answer}.",
           "{Answer} was the {kin} of {who}."),
          ("What name did {who_s} {kin} go by?", "Who was {who_s} {kin}?", "By what name was the {kin} of {who} known?",
           "Name the {kin} of {who}.", "What was the {kin} of {who} called?")),
    # --- occupations and titles ---
    Shape({"who": someone}, OCCUPATIONS,
          ("{Who} worked as a {answer} in {town}.", "In {town}, {who} earned a living as a {answer}.",
           "{Who} was a {answer} by trade."),
          ("What was {who_s} trade?", "What did {who} do for a living?", "Which job did {who} have?",
           "How did {who} make money?", "What was {who_s} occupation?"),
          {"town": made_up_town}),
    Shape({"who": someone}, OFFICES,
          ("{Who} was elected {answer} of {town}.", "{Town} chose {who} as its {answer}.",
           "For many years {who} served {town} as {answer}."),
          ("What office did {who} hold?", "To which post was {who} chosen?", "What position was {who} given in the town?",
           "What was {who_s} official title?", "In what role did {who} serve the town?"),
          {"town": made_up_town}),
    Shape({"who": someone, "age": ["twelve", "thirteen", "fourteen", "fifteen"]}, OCCUPATIONS,
          ("At {age}, {who} was apprenticed to a {answer}.", "{Who} began as a {answer}'s apprentice at {age}.",
           "When {who} was {age}, a {answer} took {who} on as an apprentice."),
          ("Which trade did {who} start to learn at {age}?", "To what kind of master was {who} bound at {age}?",
           "What craft did {who} train in from the age of {age}?", "Under which sort of craftsman did {who} serve at {age}?",
           "At {age}, whose trade did {who} take up?")),
    # --- colours and materials ---
    Shape({"building": BUILDINGS, "town": made_up_town}, COLOURS,
          ("The door of the {building} in {town} was painted {answer}.",
           "{Town_s} {building} had a {answer} door.", "Someone gave the {building} at {town} a {answer} door."),
          ("What colour is the door of {town_s} {building}?", "Which colour was used on the {building} door at {town}?",
           "What shade is the entrance of the {building} in {town}?", "How is the door of the {building} at {town} coloured?",
           "What paint colour covers the {building} door in {town}?")),
    Shape({"building": BUILDINGS, "town": made_up_town}, MATERIALS,
          ("The {building} in {town} was built of {answer}.", "{Town_s} {building} is made of {answer}.",
           "Builders raised the {building} at {town} from {answer}."),
          ("What is the {building} at {town} constructed from?", "Which material went into {town_s} {building}?",
           "What did the builders of the {building} in {town} use?", "Out of what was the {building} of {town} made?",
           "What are the walls of {town_s} {building}?")),
    Shape({"who": someone, "garment": GARMENTS}, COLOURS,
          ("{Who} always wore a {answer} {garment}.", "{Who_s} {garment} was {answer}.",
           "Nobody saw {who} in any {garment} but the {answer} one."),
          ("What colour was {who_s} {garment}?", "Which shade of {garment} did {who} favour?",
           "What hue was the {garment} {who} wore?", "In what colour was {who} seen wearing a {garment}?",
           "What was the colour of the {garment} belonging to {who}?")),
    Shape({"who": someone, "obj": BELONGINGS}, SUBSTANCES,
          ("{Who_s} {obj} was made of {answer}.", "{Who} owned a {obj} of {answer}.",
           "The {obj} that {who} used was carved from {answer}."),
          ("From what was {who_s} {obj} fashioned?", "What material was the {obj} belonging to {who}?",
           "Out of what had {who_s} {obj} been made?", "What was {who_s} {obj} composed of?",
           "Which material formed the {obj} of {who}?")),
    # --- causes ---
    Shape({"who": someone, "town": made_up_town}, LEAVE_REASONS,
          ("{Who} left {town} because of {answer}.", "It was {answer} that drove {who} from {town}.",
           "{Who} abandoned {town} on account of {answer}."),
          ("Why did {who} depart from {town}?", "What made {who} quit {town}?",
           "For what reason did {who} move away from {town}?", "What caused {who} to go from {town}?",
           "Why was {who} no longer living in {town}?")),
    Shape({"building": BUILDINGS, "town": made_up_town}, CLOSE_REASONS,
          ("The {building} at {town} closed because of {answer}.", "{Town_s} {building} shut down owing to {answer}.",
           "Because of {answer}, the {building} in {town} had to close."),
          ("Why did {town_s} {building} shut?", "What caused the {building} in {town} to close its doors?",
           "For what reason was the {building} at {town} closed?", "What led to the end of the {building} in {town}?",
           "Why is the {building} of {town} no longer open?")),
    Shape({"who": someone}, FAME,
          ("{Who} became famous for {answer}.", "{Who} was known far and wide for {answer}.",
           "People remembered {who} chiefly for {answer}."),
          ("What was {who} renowned for?", "Why did {who} become well known?", "What made {who} celebrated?",
           "For what is {who} remembered?", "What gave {who} a reputation?")),
    # --- quotes, mottos, passwords, inscriptions ---
    Shape({"who": someone}, _quote,
          ('{Who} liked to say: "{answer}"', '"{answer}" was a saying {who} often used.',
           'Whenever things went wrong, {who} would mutter, "{answer}"'),
          ("What saying was {who} fond of?", "What words did {who} often repeat?", "Quote {who_s} favourite saying.",
           "Which phrase did {who} use again and again?", "What would {who} say when times were hard?")),
    Shape({"society": SOCIETIES, "town": made_up_town}, _motto,
          ('The motto of the {society} of {town} was "{answer}".', '"{answer}" was written over the door of {town_s} {society}.',
           'The {society} at {town} took "{answer}" as its motto.'),
          ("What words did the {society} of {town} live by?", "What was the watchword of {town_s} {society}?",
           "Which phrase did the {society} at {town} adopt as a slogan?", "What motto belonged to the {society} of {town}?",
           "What does the {society} in {town} have for a motto?")),
    Shape({"society": SOCIETIES, "town": made_up_town}, _joined(*PASSWORD_WORDS),
          ('Members of the {society} of {town} gave the password "{answer}".',
           'To enter the {society} at {town} one said "{answer}".', 'The secret word of {town_s} {society} was "{answer}".'),
          ("What had to be whispered to get into the {society} of {town}?", "What was the password of {town_s} {society}?",
           "Which secret phrase opened the door of the {society} at {town}?",
           "What did members say at the door of the {society} in {town}?", "What password did the {society} of {town} use?")),
    Shape({"object": INSCRIBED, "town": made_up_town}, _joined(*INSCRIPTIONS),
          ('The {object} at {town} bore the inscription "{answer}".', 'Carved on {town_s} {object} were the words "{answer}".',
           'The words "{answer}" were cut into the {object} in {town}.'),
          ("What is engraved on the {object} in {town}?", "What is written on {town_s} {object}?",
           "Which words can be read on the {object} at {town}?", "What does the lettering on the {object} of {town} say?",
           "What inscription does {town_s} {object} carry?")),
    # --- who did it ---
    Shape({"event": EVENTS, "town": made_up_town}, named,
          ("The {event} at {town} was won by {answer}.", "{Answer} took first prize at {town_s} {event}.",
           "At the {event} in {town}, the winner was {answer}."),
          ("Who came first at the {event} in {town}?", "Who triumphed at {town_s} {event}?",
           "Which person was champion of the {event} at {town}?", "Who carried off the prize at the {event} of {town}?",
           "Who beat everyone at the {event} in {town}?")),
    Shape({"institution": INSTITUTIONS, "town": made_up_town}, named,
          ("The {institution} of {town} was founded by {answer}.", "{Answer} established the {institution} at {town}.",
           "It was {answer} who started {town_s} {institution}."),
          ("Who set up the {institution} in {town}?", "Whose work created {town_s} {institution}?",
           "Who is the founder of the {institution} at {town}?", "Which person began the {institution} of {town}?",
           "Who brought the {institution} in {town} into being?")),
    Shape({"who": someone, "water": WATERS}, named,
          ("{Who} was pulled from the {water} by {answer}.", "{Answer} dragged {who} out of the {water}.",
           "When {who} fell into the {water}, {answer} came to the rescue."),
          ("Who rescued {who} from the {water}?", "By whom was {who} saved from the {water}?",
           "Who brought {who} safely out of the {water}?", "Which person came to {who_s} aid in the {water}?",
           "Who hauled {who} from the {water}?")),
    Shape({"artifact": ARTIFACTS, "town": made_up_town}, named,
          ("The {artifact} in {town} was carved by {answer}.", "{Answer} made the {artifact} at {town}.",
           "{Town_s} {artifact} is the work of {answer}."),
          ("Who crafted the {artifact} at {town}?", "Whose hands shaped {town_s} {artifact}?",
           "Which craftsman produced the {artifact} of {town}?", "Who was the maker of the {artifact} in {town}?",
           "Who is responsible for the {artifact} in {town}?")),
    Shape({"find": DISCOVERIES, "town": made_up_town}, named,
          ("The {find} near {town} was first found by {answer}.", "{Answer} discovered the {find} close to {town}.",
           "Nobody knew of the {find} by {town} until {answer} came upon it."),
          ("Who first came across the {find} near {town}?", "Who was the discoverer of the {find} close to {town}?",
           "Which person stumbled on the {find} by {town}?", "Who located the {find} outside {town}?",
           "By whom was the {find} near {town} uncovered?")),
    *(_favourite(kind, values) for kind, values in THINGS),
]


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
    distractors), the asked fact, and an unwritten fact for a "not in the
    document" question: half the time about a subject like the asked one
    (one detail changed), otherwise about anything the document is silent
    on. Near misses share the asked fact's wording, so only the changed
    detail tells them apart. Random names and numbers that happen to hit an
    eval needle's answer are drawn again."""
    shape = rng.choice(SHAPES)
    template = rng.choice(shape.facts)
    subject, asked = shape(rng, template=template)
    if touches_eval(asked):
        return fact_family(rng, n)
    facts, seen = [asked], {subject}
    while len(facts) < n:
        if rng.random() < 0.6:  # near miss: same shape and wording, one detail changed
            other, fact = shape(rng, shape.vary(subject, rng), template)
        else:  # another kind of fact
            other, fact = rng.choice(SHAPES)(rng)
        if other not in seen and fact.answer != asked.answer and not touches_eval(fact):
            seen.add(other)
            facts.append(fact)
    while True:
        if rng.random() < 0.5:
            other, missing = shape(rng, shape.vary(subject, rng))
        else:
            other, missing = rng.choice(SHAPES)(rng)
        if other not in seen and not touches_eval(missing):
            return facts, asked, missing


def question_turn(rng: random.Random, asked: Fact, missing: Fact, not_said_rate: float) -> tuple[str, str]:
    """(question, answer): a paraphrase asking for the asked fact, answered by
    its sentence, or with probability not_said_rate one asking for the
    missing fact, answered NOT_SAID."""
    if rng.random() < not_said_rate:
        return rng.choice(missing.questions), NOT_SAID
    return rng.choice(asked.questions), asked.sentence


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


# standard-library packages held out of all training data (the project's own checks ask about them)
HELD_OUT_CODE = ("json", "logging", "http", "argparse")


def read_python_files(root: Path, max_bytes: int = 60_000) -> list[tuple[str, str]]:
    """(path relative to root, text) of every readable .py file under root,
    except those of the HELD_OUT_CODE packages (a folder or module of that
    name anywhere in the path)."""
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if any(p in HELD_OUT_CODE for p in parts):
            continue
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
    book_qa: a book_qa_data.BookQA, drawn (as a document) for a share book_rate of the QA examples.
    """

    def __init__(self, base, prompts: dict, qa_rate: float, code: list[tuple[str, str]] | None = None,
                 code_rate: float = 0.2, not_said_rate: float = 0.04, book_qa=None, book_rate: float = 0.0):
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
        self.book_qa = book_qa
        self.book_rate = book_rate if book_qa else 0.0
        self.stop = self.tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in self.tok.get_vocab() else self.tok.eos_token_id
        self._encode = base._encode
        self.heads = {kind: self._encode(prompt.head) for kind, prompt in prompts.items()}

    def sample(self) -> Example:
        if self.rng.random() >= self.qa_rate:
            return self.base.sample()
        if self.book_rate and self.rng.random() < self.book_rate:
            return self._book()
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
            turns.append(question_turn(rng, asked, missing, self.not_said_rate))
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

    def _book(self) -> Example:
        """A question about a fact a training book states, its window of the book as the document."""
        room = lambda question, answer: self._budget("document", self._encode_turns("document", [(question, answer)]))
        drawn = self.book_qa.draw(self.rng, room)
        turns = self._encode_turns("document", [(drawn.question, drawn.answer)])
        return self._render("document", self._encode(drawn.document), turns)

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
