"""Question answering over one ingested document held in a landmark engine.

A DocumentSession reads a book or codebase into the engine once and answers
any number of questions from that state: each question's tail is fed after
the document, the answer is generated, and the engine rolls back to the
document (or, with keep=True, keeps the turn for a follow-up). The prompt is
cut at the document so the expensive part is prefilled once and reused by
the ask command, a chat REPL and persisted contexts alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from lmqa.code.answer import answer_code, definition_spans
from lmqa.engine.landmark_engine import LandmarkEngine, Mark, RetrievalStep
from .abstention import AbstentionPrior
from .answer_search import candidates, choose, emit, fused, read_score
from .evidence import EvidenceRecorder, TokenMass, document_mass, quoted_span
from .lexical import SentenceIndex
from .list_answers import pick_items, requested_items
from lmqa.engine.generation import LogitsProcessor, SamplingConfig, generate
from lmqa.ingest import BlockSource, Document, build_source_map, kv_cache_bytes, tokenize_document
from lmqa.model.loading import LoadedModel
from .prompts import REFUSAL, template
from .quote import QuoteConstraint, normalize
from .sentences import sentences_around

DocumentKind = Literal["document", "codebase"]
KINDS: tuple[str, ...] = ("document", "codebase")

PROPOSAL_BLOCKS = 6  # blocks whose sentences are read as candidate answers (DocumentSession.proposals), per ranking
LEXICAL_SENTENCES = 8  # BM25's best sentences read as candidate answers too
NEIGHBOUR_OF, NEIGHBOUR_CHARS = 3, 400  # second round: sentences this near the three best quotes
# What the question-free baseline asks (answer_search.py): a question about nothing in particular, so the
# likelihood a candidate keeps is what it owes to being easy to quote, not to the question.
NEUTRAL_QUESTION = "What does the document say?"
# Placeholders cut the rendered chat template at the document, the question
# and a previous answer; control characters never occur in prompts or templates.
_DOC, _QUESTION, _ANSWER = "\x00", "\x01", "\x02"


class QAPrompt:
    """The QA prompt of prompts/qa_<kind>.txt + qa_question.txt, rendered
    through the model's chat template (or a plain "Answer:" form for models
    without one) and cut into the part before the document and the part
    after it, so the document can be fed once and questions appended."""

    def __init__(self, loaded: LoadedModel, kind: DocumentKind):
        self.tokenizer = loaded.tokenizer
        self.chat = loaded.prompt_format == "chat" and bool(getattr(self.tokenizer, "chat_template", None))
        question = template("qa_question").replace("{question}", _QUESTION)
        user = template(f"qa_{kind}").replace("{document}", _DOC) + "\n\n" + question
        self.head, self._first_tail = self._render([{"role": "user", "content": user}]).split(_DOC)
        follow_up = self._render([{"role": "user", "content": _DOC}, {"role": "assistant", "content": _ANSWER},
                                  {"role": "user", "content": question}])
        self._follow_up_tail = follow_up.split(_ANSWER, 1)[1]

    def tail(self, question: str, follow_up: bool = False) -> str:
        """Text after the document (or, for a follow-up, after the previous
        answer) up to where the model's answer begins."""
        return (self._follow_up_tail if follow_up else self._first_tail).replace(_QUESTION, question)

    def _render(self, messages: list[dict[str, str]]) -> str:
        if self.chat:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        turns = []
        for message in messages:
            turns.append(message["content"] + "\nAnswer:" if message["role"] == "user" else f" {message['content']}\n\n")
        return "".join(turns)


@dataclass(frozen=True)
class IngestStats:
    """The document's one prefill: ordinary tokens (prompt head included),
    engine positions (landmarks included) and wall time."""

    tokens: int
    positions: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class Timings:
    """One answer. first_token_s runs from the call to the first answer token
    (question prefill + first sampling), what a user waits before text appears."""

    question_tokens: int
    prefill_s: float
    first_token_s: float
    generate_s: float  # first answer token to the last
    answer_tokens: int

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed after the first token, which the prefill dominates."""
        return (self.answer_tokens - 1) / self.generate_s if self.answer_tokens > 1 and self.generate_s > 0 else 0.0


@dataclass(frozen=True)
class RetrievedBlock:
    """One block as retrieved by one layer: how often over heads and steps,
    its best score, and where it came from (None for blocks of prompt text
    or of the question, which are no part of the document)."""

    block: int
    count: int
    best_score: float
    source: BlockSource | None


@dataclass
class Answer:
    question: str
    text: str
    token_ids: list[int]
    timings: Timings
    steps: list[RetrievalStep]  # this answer's steps: question prefill chunks, then one per generated token
    sources: Mapping[int, BlockSource]  # the session's source map, shared
    evidence: TokenMass | None = None  # attention mass per token of the answer tokens' queries (evidence.py)
    refusal_scores: tuple[float, float] | None = None  # log p of "does not say" vs the best other start (abstention.py)

    @property
    def n_layers(self) -> int:
        return self.steps[0].block_ids.shape[0] if self.steps else 0

    def per_layer(self) -> list[list[RetrievedBlock]]:
        """Per layer, every block it retrieved, most often first (ties: best score)."""
        stats: list[dict[int, tuple[int, float]]] = [{} for _ in range(self.n_layers)]
        for step in self.steps:
            for layer, (ids, scores) in enumerate(zip(step.block_ids.tolist(), step.scores.tolist())):
                seen = stats[layer]
                for head_ids, head_scores in zip(ids, scores):
                    for block, score in zip(head_ids, head_scores):
                        count, best = seen.get(block, (0, 0.0))
                        seen[block] = (count + 1, max(best, score))
        return [sorted((RetrievedBlock(block, count, best, self.sources.get(block)) for block, (count, best) in seen.items()),
                       key=lambda r: (-r.count, -r.best_score, r.block))
                for seen in stats]


class DocumentSession:
    """One document in one engine: ingest() once, then ask() repeatedly.

    The engine belongs to the session from ingest() on: it is reset there,
    and every ask() leaves it at the document state (or at the last kept turn).

    quote: answers about a document are held to verbatim passages of it
    (quote.py), as the model was trained to answer; codebase answers are
    definitions of the symbol index (lmqa/code/answer.py). Set it False for
    answers in the model's own words.
    """

    def __init__(self, loaded: LoadedModel, engine: LandmarkEngine, document: Document, kind: DocumentKind = "document"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        self.loaded = loaded
        self.engine = engine
        self.document = document
        self.kind = kind
        self.prompt = QAPrompt(loaded, kind)
        self.quote = True
        self._quotable: str | None = None  # the document's text as QuoteConstraint matches it
        self._sentence_index: SentenceIndex | None = None
        self._ids: list[int] | None = None
        self.doc_token_start = 0  # ordinary tokens of the prompt head before the document
        self.sources: dict[int, BlockSource] = {}
        self.stats: IngestStats | None = None
        self._document_mark: tuple | None = None
        self._mark: tuple | None = None  # where the next question starts: the document or the last kept turn
        self._turns = 0

    @classmethod
    def restored(cls, loaded: LoadedModel, engine: LandmarkEngine, document: Document, kind: DocumentKind,
                 ids: list[int], doc_token_start: int, sources: dict[int, BlockSource],
                 stats: IngestStats | None) -> DocumentSession:
        """A session over an engine that already holds this document's state
        (a loaded context file, see context_file.py): no tokenizing, no prefill."""
        session = cls(loaded, engine, document, kind)
        session._ids, session.doc_token_start, session.sources, session.stats = list(ids), doc_token_start, sources, stats
        session._document_mark = session._mark = engine.snapshot()
        return session

    @property
    def token_ids(self) -> list[int]:
        """Prompt head + document, as fed to the engine."""
        self.prepare()
        return self._ids

    @property
    def document_mark(self) -> Mark:
        """The engine state right after the document (what a context file saves)."""
        if self._document_mark is None:
            raise RuntimeError("DocumentSession.document_mark before ingest()")
        return self._document_mark

    # ----- reading the document -----
    def prepare(self) -> int:
        """Tokenize the prompt head and the document and build the source map
        (no model work; idempotent). Returns the ordinary token count, so a
        caller can size and refuse a document before the prefill."""
        if self._ids is None:
            tok = self.loaded.tokenizer
            head = tok(self.prompt.head, add_special_tokens=False).input_ids
            doc_ids, offsets = tokenize_document(tok, self.document)
            self.doc_token_start = len(head)
            self.sources = {s.block: s for s in build_source_map(self.document, offsets, self.block_size, len(head))}
            self._ids = head + doc_ids
        return len(self._ids)

    @property
    def block_size(self) -> int:
        return self.loaded.landmark.block_size

    @property
    def positions(self) -> int:
        """Engine positions of the document state: tokens plus one landmark per full block."""
        n = self.prepare()
        return n + n // self.block_size

    def cache_bytes(self) -> int:
        """Keys and values the document state will hold, in the engine's storage dtype."""
        e = self.engine
        return kv_cache_bytes(self.positions, len(e.stores), e.n_kv, e.head_dim, e.kv_dtype.itemsize)

    def ingest(self, progress: Callable[[int], None] | None = None) -> IngestStats:
        """Feed prompt head + document once and mark that state.
        progress: called with engine positions done (landmarks included)."""
        self.prepare()
        self.engine.reset()
        start = time.perf_counter()
        self.engine.feed(self._ids, progress=progress)
        self.stats = IngestStats(len(self._ids), self.positions, time.perf_counter() - start)
        self._document_mark = self._mark = self.engine.snapshot()
        self._turns = 0
        return self.stats

    # ----- questions -----
    def ask(self, question: str, sampling: SamplingConfig, on_token: Callable[[int], None] | None = None,
            keep: bool = False) -> Answer:
        """Answer from the current state. keep=False rolls the engine back to
        where this question started; keep=True keeps question and answer so
        the next ask() is a follow-up turn."""
        if self._mark is None:
            raise RuntimeError("DocumentSession.ask() before ingest()")
        tok = self.loaded.tokenizer
        ids = self._question_ids(question)
        first_step = len(self.engine.trace.steps)
        times: dict[str, float] = {}
        recorder = EvidenceRecorder()

        def prefilled(_: int) -> None:
            times["prefill"] = time.perf_counter()

        def token(t: int) -> None:
            if "first" not in times:  # the question is prefilled: from here on, steps are answer tokens
                times["first"] = time.perf_counter()
                self.engine.record_evidence(recorder)
            if on_token is not None:
                on_token(t)

        processors = self.answer_rules()
        start = time.perf_counter()
        try:
            if self.quote and self.kind == "codebase":  # only names the symbol index holds
                self.engine.feed(ids, progress=prefilled)
                out = answer_code(self, question, on_token=token)
            elif sampling.candidates > 1 and sampling.temperature <= 0:
                read = EvidenceRecorder() if self.quote else None  # where the question looks: its sentences are read
                self.engine.record_evidence(read)
                logits = self.engine.feed(ids, progress=prefilled)
                self.engine.record_evidence(None)
                proposals = self.proposals(read.result(), question, self.engine.trace.steps[first_step:]) if read else []
                stops = self.stop_ids()
                options = candidates(self.engine, logits, sampling.candidates, sampling.max_new_tokens, stops,
                                     processors, proposals)
                if self.quote and len(options) > 1:
                    places = self._places(options)
                    scores = self._gains(options, ids, stops)
                    near = self._neighbours(options, places, scores)  # a second round: the best quotes' neighbours
                    if near:
                        scores += self._gains(near, ids, stops)
                        options += near
                        places += self._places(near)
                    lexical = self._sentences().scores_at(question, [None if p is None else p[0] for p in places])
                    scores = fused(scores, lexical)  # the gain and BM25's score of the sentence quoted
                    best = options[max(range(len(options)), key=scores.__getitem__)]
                else:
                    best, scores = choose(self.engine, logits, options, stops)
                wanted = requested_items(question) if self.quote else 1
                if wanted > 1:  # one quote per item, a line each
                    newline = tok("\n", add_special_tokens=False).input_ids
                    texts = [tok.decode(o, skip_special_tokens=True) for o in options]
                    items = [options[i] for i in pick_items(texts, scores, wanted)]
                    best = [t for i, item in enumerate(items) for t in (newline if i else []) + item]
                out = emit(self.engine, best, on_token=token)
            else:
                out = generate(self.engine, ids, sampling, self.stop_ids(), on_token=token, on_prefill=prefilled,
                               processors=processors)
        except BaseException:  # Ctrl-C in a chat stops the answer: the session stays as it was
            self.engine.rollback(self._mark)
            raise
        finally:
            self.engine.record_evidence(None)
        end = time.perf_counter()
        steps = list(self.engine.trace.steps[first_step:])
        if keep:
            self._turns += 1
            self._mark = self.engine.snapshot()
        else:
            self.engine.rollback(self._mark)
        first = times.get("first", end)
        timings = Timings(len(ids), times.get("prefill", start) - start, first - start, end - first, len(out))
        refusal = next((p.scores for p in processors if isinstance(p, AbstentionPrior)), None)
        text, evidence = tok.decode(out, skip_special_tokens=True).strip(), recorder.result()
        if self.quote and self.kind == "document" and text != REFUSAL:
            spans = (quoted_span(self, line, evidence) for line in text.split("\n"))
            evidence = replace(evidence, quoted=tuple(span for span in spans if span is not None))
        elif self.quote and self.kind == "codebase":
            evidence = replace(evidence, quoted=definition_spans(self.document, text))
        return Answer(question, text, out, timings, steps, self.sources, evidence, refusal)

    def _question_ids(self, question: str) -> list[int]:
        """The tokens fed after the document (or the last kept turn) for question."""
        tail = self.prompt.tail(question, follow_up=self._turns > 0)
        return self.loaded.tokenizer(tail, add_special_tokens=False).input_ids

    def _gains(self, options: list[list[int]], question_ids: list[int], stops: set[int]) -> list[float]:
        """Each option's total gain from the question (answer_search.choose
        with a baseline read after NEUTRAL_QUESTION); the engine is left
        after question_ids, where the answer goes."""
        self.engine.rollback(self._mark)
        logits = self.engine.feed(self._question_ids(NEUTRAL_QUESTION))
        baseline = [read_score(self.engine, logits, ids, stops) for ids in options]
        self.engine.rollback(self._mark)
        logits = self.engine.feed(question_ids)
        return choose(self.engine, logits, options, stops, baseline)[1]

    def _places(self, options: list[list[int]]) -> list[tuple[int, int] | None]:
        """Where in the document each option's text is (None: nowhere)."""
        tok = self.loaded.tokenizer
        return [quoted_span(self, tok.decode(o, skip_special_tokens=True)) for o in options]

    def _sentences(self) -> SentenceIndex:
        if self._sentence_index is None:
            self._sentence_index = SentenceIndex(self.document.text)
        return self._sentence_index

    def _neighbours(self, options: list[list[int]], places: list[tuple[int, int] | None], scores: list[float],
                    best: int = NEIGHBOUR_OF, reach: int = NEIGHBOUR_CHARS) -> list[list[int]]:
        """The sentences within `reach` characters of the `best` best-scoring
        options' places in the document that are not options yet: a question
        often lands next to its answer ("a new girl in the garden" ... "she
        tossed a pansy over the fence"), and those sentences may share no word
        with it."""
        tok, text, seen, out = self.loaded.tokenizer, self.document.text, {tuple(o) for o in options}, []
        for i in sorted(range(len(options)), key=lambda i: -scores[i])[:best]:
            span = places[i]
            if span is None:
                continue
            for a, b in sentences_around(text, max(span[0] - reach, 0), span[1] + reach):
                ids = tok(normalize(text[a:b]), add_special_tokens=False).input_ids
                if tuple(ids) not in seen:
                    seen.add(tuple(ids))
                    out.append(ids)
        return out

    def proposals(self, question: TokenMass, text_of_question: str = "", steps: list[RetrievalStep] = (),
                  blocks: int = PROPOSAL_BLOCKS, lexical: int = LEXICAL_SENTENCES) -> list[list[int]]:
        """Whole answers for answer_search to read, whitespace normalised as
        quotes are, taken in turn from three rankings: the sentences of the
        `blocks` document blocks the question's tokens attended to most (a
        fact the question asks about draws its attention, but so do the
        blocks just before it); of the `blocks` its queries retrieved with
        the best landmark scores (position-free: keys are stored unrotated);
        and BM25's `lexical` best sentences for the question's words."""
        mass = document_mass(self, question)
        attended = [b for b in mass.argsort(descending=True)[:blocks].tolist() if mass[b] > 0]
        retrieved: dict[int, float] = {}
        for step in steps:
            for block, score in zip(step.block_ids.flatten().tolist(), step.scores.flatten().tolist()):
                retrieved[block] = retrieved.get(block, 0.0) + score
        landmarked = sorted(retrieved, key=lambda b: -retrieved[b])[:blocks]
        text = self.document.text
        rankings = [self._block_sentences(attended), self._block_sentences(landmarked)]
        if lexical and text_of_question:
            rankings.append([[span] for span in self._sentences().best(text_of_question, lexical)])
        tok, seen, out = self.loaded.tokenizer, set(), []
        for span in (span for group in _interleave(rankings) for span in group):
            if span not in seen:
                seen.add(span)
                out.append(tok(normalize(text[span[0]:span[1]]), add_special_tokens=False).input_ids)
        return out

    def _block_sentences(self, blocks: list[int]) -> list[list[tuple[int, int]]]:
        """Per document block (others skipped), the spans of its sentences."""
        return [sentences_around(self.document.text, s.char_start, s.char_end)
                for s in (self.sources.get(b) for b in blocks) if s is not None]

    def answer_rules(self) -> tuple[LogitsProcessor, ...]:
        """The refusal's margin (for models trained to refuse), then quoting."""
        tok, rules = self.loaded.tokenizer, []
        if self.loaded.abstain_margin is not None:
            refusal = tok(REFUSAL, add_special_tokens=False).input_ids
            rules.append(AbstentionPrior(self.engine, refusal, self.stop_ids(), self.loaded.abstain_margin))
        if self.quote and self.kind == "document":
            if self._quotable is None:
                self._quotable = normalize(self.document.text)
            rules.append(QuoteConstraint(tok, self._quotable, (REFUSAL,), self.stop_ids()))
        return tuple(rules)

    def forget(self) -> None:
        """Drop kept turns: back to the document state."""
        if self._document_mark is None:
            raise RuntimeError("DocumentSession.forget() before ingest()")
        self.engine.rollback(self._document_mark)
        self._mark = self._document_mark
        self._turns = 0

    def stop_ids(self) -> set[int]:
        """End of text, and the chat template's end of turn where the vocabulary has one."""
        tok = self.loaded.tokenizer
        stops = {tok.eos_token_id} - {None}
        if "<|im_end|>" in tok.get_vocab():
            stops.add(tok.convert_tokens_to_ids("<|im_end|>"))
        return stops


def _interleave(rankings: list[list]) -> list:
    """First of each ranking, then second of each, ..."""
    return [r[i] for i in range(max(map(len, rankings), default=0)) for r in rankings if i < len(r)]
