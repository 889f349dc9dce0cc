"""The answer's decoding rules: quoting (lmqa/qa/quote.py) against the
obvious definition (the answer's text occurs in the document), and the
refusal margin (lmqa/qa/abstention.py) against a refusal log-probability
computed by feeding the refusal to a fresh engine."""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import build_tiny_tokenizer, make_tiny_llama
from lmqa.engine.generation import SamplingConfig, generate
from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.engine.landmarks import LandmarkConfig
from lmqa.qa.abstention import AbstentionPrior, choose_margin
from lmqa.qa.quote import QuoteConstraint, normalize

DOCUMENT = ("The keeper of the light was a quiet man.\nHis cat, a grey tom, was named Pimento; "
            "it slept on the lamp-room stairs.  Ships passed the rock at night, and the keeper counted them: "
            "forty-one in the winter of the storm.")
REFUSAL = "The document does not say."


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def decode_with(tok, rule: QuoteConstraint, logits_for, steps: int = 30, stop: int | None = None) -> list[int]:
    out: list[int] = []
    for i in range(steps):
        t = int(rule(logits_for(i), out).argmax())
        if stop is not None and t == stop:
            break
        out.append(t)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_any_logits_give_a_quote_of_the_document_or_the_refusal(tok, seed):
    g = torch.Generator().manual_seed(seed)
    vocab = len(tok)
    eos = tok.eos_token_id
    rule = QuoteConstraint(tok, normalize(DOCUMENT), (REFUSAL,), stop_ids={eos}, candidates=vocab)
    out = decode_with(tok, rule, lambda i: torch.randn(vocab, generator=g), stop=eos)
    text = normalize(tok.decode(out)).strip()
    assert text and (is_quote(text, normalize(DOCUMENT)) or normalize(REFUSAL).startswith(text)), text


def is_quote(text: str, document: str) -> bool:
    """text occurs in document, or it starts with a capital and occurs with
    that letter in lower case at the start of a word."""
    if text in document:
        return True
    lowered = text[0].lower() + text[1:]
    return lowered != text and any(i == 0 or not document[i - 1].isalnum() for i in range(len(document))
                                   if document.startswith(lowered, i))


def test_a_favoured_quote_comes_out_whole_and_a_drift_is_cut_off(tok):
    """Logits that favour "was named Pimento; it slept" but then push a word
    the document does not have: the quote runs to where the document and the
    push part, then takes the document's next token."""
    wanted = tok("was named Pimento; it slept", add_special_tokens=False).input_ids
    drift = tok(" Biscuit", add_special_tokens=False).input_ids[0]
    vocab = len(tok)

    def logits_for(i):
        logits = torch.zeros(vocab)
        if i < len(wanted):
            logits[wanted[i]] = 5.0
        if i == 2:
            logits[drift] = 9.0  # "was named Biscuit": not in the document
        return logits

    rule = QuoteConstraint(tok, normalize(DOCUMENT), (), stop_ids=set(), candidates=vocab)
    out = decode_with(tok, rule, logits_for, steps=len(wanted))
    assert tok.decode(out) == "was named Pimento; it slept"


def test_stopping_needs_text_and_the_candidates_are_the_likeliest(tok):
    vocab, eos = len(tok), tok.eos_token_id
    keeper = tok("keeper", add_special_tokens=False).input_ids
    rule = QuoteConstraint(tok, normalize(DOCUMENT), (), stop_ids={eos}, candidates=4)
    logits = torch.zeros(vocab)
    logits[eos], logits[keeper[0]] = 10.0, 1.0
    first = rule(logits, [])
    assert first[eos] == float("-inf") and torch.isfinite(first[keeper[0]]) and torch.isfinite(first).sum() <= 3
    assert torch.isfinite(rule(logits, keeper)[eos])


def test_stopping_needs_the_end_of_a_word_and_whitespace_cannot_pile_up(tok):
    vocab, eos = len(tok), tok.eos_token_id
    rule = QuoteConstraint(tok, normalize(DOCUMENT), (REFUSAL,), stop_ids={eos}, candidates=vocab)
    ids = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    logits = torch.zeros(vocab)
    assert torch.isfinite(rule(logits, ids("a grey"))[eos])
    assert torch.isfinite(rule(logits, ids("The document does not say."))[eos])
    cut = ids("a gr")
    assert tok.decode(cut) == "a gr" and rule(logits, cut)[eos] == float("-inf")  # the document has "grey"
    space, space_led = ids(" ")[0], ids(" tom")[0]
    assert torch.isfinite(rule(logits, ids("a grey"))[space])
    assert torch.isfinite(rule(logits, ids("a grey"))[space_led])
    # the document's whitespace is normalised, so " tom" would match after a
    # space too; it is held back, as "a grey  tom" shows a space too many
    assert rule(logits, ids("a grey") + [space])[space_led] == float("-inf")
    assert rule(logits, ids("a grey") + [space])[space] == float("-inf")
    # a quote's whitespace is a space: not the document's line break ("light was a quiet man.\nHis cat"),
    # nor a tab, though both match the normalised document (a no-break space is the same rule,
    # but not one token of this tokenizer)
    for other in ("\n", "\t"):
        token = ids(other)[0]
        assert tok.decode([token]) == other
        assert rule(logits, ids("a quiet man."))[token] == float("-inf")
        assert torch.isfinite(rule(logits, ids("a quiet man."))[space])


def test_a_quote_that_stops_inside_a_word_can_always_finish_it(tok):
    vocab, eos = len(tok), tok.eos_token_id
    rule = QuoteConstraint(tok, normalize(DOCUMENT), (), stop_ids={eos}, candidates=2)
    cut = tok("a gr", add_special_tokens=False).input_ids
    rest = tok("ey tom,", add_special_tokens=False).input_ids[0]
    logits = torch.zeros(vocab)
    logits[eos] = 10.0
    logits[rest] = -30.0  # far outside the likeliest candidates
    shaped = rule(logits, cut)
    assert torch.isfinite(shaped[rest]) and shaped[eos] == float("-inf")


def test_line_breaks_and_a_first_capital_do_not_break_a_quote_but_other_capitals_do(tok):
    rule = QuoteConstraint(tok, normalize(DOCUMENT), (), stop_ids=set(), candidates=len(tok))
    ids = tok("His cat, a grey tom", add_special_tokens=False).input_ids  # the document breaks the line before "His"
    for i in range(1, len(ids)):
        assert torch.isfinite(rule(torch.zeros(len(tok)), ids[:i])[ids[i]])
    assert torch.isfinite(rule(torch.zeros(len(tok)), [])[tok("Ships", add_special_tokens=False).input_ids[0]])
    assert torch.isfinite(rule(torch.zeros(len(tok)), [])[tok("ships", add_special_tokens=False).input_ids[0]])
    shouted = tok("HIS CAT", add_special_tokens=False).input_ids
    assert not all(torch.isfinite(rule(torch.zeros(len(tok)), shouted[:i])[shouted[i]]) for i in range(len(shouted)))


# ----- the refusal's margin -----
LANDMARK = 1


def tiny_engine(seed: int = 0, top_k: int = 2) -> LandmarkEngine:
    model = make_tiny_llama(vocab=64, seed=seed)
    cfg = LandmarkConfig(landmark_id=LANDMARK, block_size=5, top_k=top_k, train_context=256)
    return LandmarkEngine(model, cfg, offload="cpu", prefill="serial")


def refusal_logprob_by_feeding(prompt: list[int], refusal: list[int], stops: list[int], top_k: int) -> float:
    engine = tiny_engine(top_k=top_k)
    total, logits = 0.0, engine.feed(prompt)
    for t in refusal:
        total += float(torch.log_softmax(logits.float(), -1)[t])
        logits = engine.feed([t])
    return total + float(torch.logsumexp(torch.log_softmax(logits.float(), -1)[stops], 0))


@pytest.mark.parametrize("margin,refuses", [(-math.inf, True), (math.inf, False)])
def test_the_margin_forces_or_forbids_the_refusal_and_leaves_the_engine_as_it_was(margin, refuses):
    """The refusal is read in one feed, its tokens sharing one retrieval; with
    every block retrievable (top_k past the block count) that is exactly
    token-by-token reading, which checks the arithmetic."""
    rng = random.Random(0)
    prompt = [rng.randrange(2, 64) for _ in range(23)]
    refusal, stops = [7, 9, 11, 13], {3}
    engine = tiny_engine(top_k=16)
    rule = AbstentionPrior(engine, refusal, stops, margin)
    out = generate(engine, prompt, SamplingConfig(max_new_tokens=8), stops, processors=(rule,))
    by_feeding = refusal_logprob_by_feeding(prompt, refusal, sorted(stops), top_k=16)
    assert rule.scores[0] == pytest.approx(by_feeding, abs=1e-4)
    if refuses:
        assert out == refusal
    else:
        assert out[:2] != refusal[:2]
    # the look-ahead was rolled back: the answer's own steps follow the prompt directly
    plain = tiny_engine()
    plain.feed(prompt)
    for t in out:
        plain.feed([t])
    assert engine.n_tokens == plain.n_tokens and len(engine.trace.steps) == len(plain.trace.steps)


def test_choose_margin_trades_answers_against_refusals():
    records = ([dict(answerable=True, correct=True, refusal=-1.0, best=-2.0)] * 3  # right from a margin of 1 on
               + [dict(answerable=True, correct=False, refusal=-1.0, best=-5.0)]
               + [dict(answerable=False, correct=False, refusal=-0.1, best=-3.0)] * 4)  # refused while margin < 2.9
    margin, scores = choose_margin(records, answerable=0.75)
    assert margin == 1.0  # answers the 3 (75% of answerable) and still refuses every unanswerable one
    assert scores[1.0] == (0.75, 1.0, pytest.approx(0.8125))
    assert scores[0.0][:2] == (0.0, 1.0) and scores[3.0][:2] == (0.75, 0.0)


# ----- choosing among whole answers -----
def wide_engine() -> LandmarkEngine:
    """tiny_engine's model with top_k above any block count here: every block
    is retrieved, so reading a candidate in one feed and token by token see
    the same context and must score alike."""
    model = make_tiny_llama(vocab=64, seed=0)
    cfg = LandmarkConfig(landmark_id=LANDMARK, block_size=5, top_k=16, train_context=256)
    return LandmarkEngine(model, cfg, offload="cpu", prefill="serial")


def reference_score(prompt: list[int], ids: list[int], stops: set[int]) -> float:
    """Mean log p per token of ids and the likeliest stop, fed token by token."""
    engine = wide_engine()
    logits, total = engine.feed(prompt), 0.0
    for t in ids:
        total += float(torch.log_softmax(logits.float(), -1)[t])
        logits = engine.feed([t])
    return (total + max(float(torch.log_softmax(logits.float(), -1)[s]) for s in stops)) / (len(ids) + 1)


@pytest.mark.parametrize("seed", range(3))
def test_read_score_in_one_feed_equals_token_by_token(seed):
    from lmqa.qa.answer_search import read_score

    rng = random.Random(seed)
    prompt, stops = [rng.randrange(5, 64) for _ in range(17)], {3, 4}
    engine = wide_engine()
    logits = engine.feed(prompt)
    before = (engine.n_tokens, len(engine.trace.steps))
    for length in (0, 1, 4, 9):
        ids = [rng.randrange(5, 64) for _ in range(length)]
        assert read_score(engine, logits, ids, stops) == pytest.approx(reference_score(prompt, ids, stops), abs=1e-4)
        assert (engine.n_tokens, len(engine.trace.steps)) == before  # rolled back


@pytest.mark.parametrize("seed", range(3))
def test_the_likeliest_candidate_wins_and_one_answer_is_left_in_the_engine(seed):
    """Greedy completions of the n likeliest first tokens and proposals (one
    forbidden by a processor, one repeated) are scored as whole answers; the
    best by the slow reference wins and is the only answer fed."""
    from lmqa.qa.answer_search import candidates, choose, emit

    rng, stops = random.Random(seed), {3, 4}
    prompt = [rng.randrange(5, 64) for _ in range(17)]
    proposals = [[rng.randrange(5, 64) for _ in range(rng.randrange(1, 6))] for _ in range(4)]
    forbidden = proposals[0][0]
    forbid = lambda logits, generated: logits.index_fill(0, torch.tensor([forbidden]), float("-inf"))  # noqa: E731
    engine = wide_engine()
    logits = engine.feed(prompt)
    options = candidates(engine, logits, 3, 6, stops, (forbid,), proposals + [proposals[1]])
    assert engine.n_tokens == len(prompt)
    assert len(options) == len({tuple(o) for o in options}) and all(o[:1] != [forbidden] for o in options)
    assert [p for p in proposals[1:] if p[0] != forbidden] == [o for o in options if o in proposals]
    best, scores = choose(engine, logits, options, stops)
    reference = [reference_score(prompt, o, stops) for o in options]
    assert scores == pytest.approx(reference, abs=1e-4)
    assert best == options[max(range(len(options)), key=reference.__getitem__)]
    streamed = []
    assert emit(engine, best, streamed.append) == streamed == best
    assert engine.n_tokens == len(prompt) + len(best)


def test_a_baseline_scores_candidates_by_what_the_question_adds():
    """With a baseline (mean log p per token after a neutral question), an
    option scores by its total gain: a long answer the question lifts a
    little per token beats a short one it lifts more, and one it does not
    lift loses however likely it is."""
    from lmqa.qa.answer_search import choose

    engine, stops = wide_engine(), {3, 4}
    logits = engine.feed([7, 8, 9, 10, 11, 12])
    options = [[20, 21, 22, 23, 24, 25, 26], [30], [40, 41, 42]]
    _, plain = choose(engine, logits, options, stops)
    baseline = [plain[0] - 1.0, plain[1] - 2.0, plain[2] + 0.5]
    best, scores = choose(engine, logits, options, stops, baseline)
    assert scores == pytest.approx([8.0, 4.0, -2.0])
    assert best == options[0]


def test_fused_ranks_combine_scorings_of_any_scale():
    from lmqa.qa.answer_search import fused

    gains, bm25 = [30.0, 2.0, 10.0, 1.0], [0.1, 9.0, 5.0, 0.0]
    assert fused(gains, bm25, k=1) == pytest.approx([1 / 1 + 1 / 3, 1 / 3 + 1 / 1, 1 / 2 + 1 / 2, 1 / 4 + 1 / 4])
    assert fused(gains, [s * 1000 for s in bm25], k=1) == fused(gains, bm25, k=1)  # ranks, not values
    assert fused([1.0, 5.0]) == pytest.approx([1 / 11, 1 / 10])
