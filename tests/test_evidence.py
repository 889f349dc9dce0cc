"""Evidence with every answer: the grouped softmax's per-slot attention
probabilities, their sum per token over an answer's token steps, and the passages
`ask` and `chat` show (file:line, text) and `ask --json` carries."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from rich.console import Console
from test_chat import chat_run
from test_cli import assert_ok, run
from test_grouped_attention import _inference_layout
from transformers import AttentionInterface

from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.qa.evidence import EvidenceRecorder, TokenMass, document_mass, excerpt, passages
from lmqa.engine.generation import SamplingConfig
from lmqa.engine.grouped_attention import grouped_attention_inference, sequence_grouped_attention
from lmqa.ingest import ingest
from lmqa.engine.landmarks import LandmarkConfig, insert_landmarks
from lmqa.model.loading import load_model
from lmqa.qa.session import DocumentSession, QAPrompt
from lmqa.qa.retrieval_summary import render_evidence

VOCAB = 128
LANDMARK = VOCAB - 1
TEXT = "".join(f"Line {i}: the sky is blue." + (" The pass key is 4711." if i == 9 else "") + "\n" for i in range(24))


# ----- the slot probabilities -----
def explicit_slots(q_row: torch.Tensor, k_flat: torch.Tensor, is_landmark: torch.Tensor, i: int, b: int) -> list[float]:
    """Method page, section 2, for query position i of a flat sequence: the
    attention probability of every position 0..i. An own-block token gets
    exp(s_j) / Z; a token of an earlier block gets its landmark's share
    exp(s_L) / Z times its own share of the block, exp(s_j) / sum over the
    block; landmarks carry no value and get 0."""
    S = b + 1
    d = q_row.shape[-1]
    s = [(q_row.double() @ k_flat[j].double()).item() / math.sqrt(d) for j in range(i + 1)]
    own = [j for j in range(i // S * S, i + 1) if not is_landmark[j]]
    marks = [j for j in range(i) if is_landmark[j]]
    z = sum(math.exp(s[j]) for j in own) + sum(math.exp(s[j]) for j in marks)
    out = [0.0] * (i + 1)
    for j in own:
        out[j] = math.exp(s[j]) / z
    for m in marks:
        members = range(m - b, m)
        inner = sum(math.exp(s[j]) for j in members)
        for j in members:
            out[j] = math.exp(s[m]) / z * math.exp(s[j]) / inner
    return out


@pytest.mark.parametrize("b,r,T_window,p,H,Hkv", [(3, 2, 1, 2, 4, 2), (4, 3, 2, 3, 2, 2), (2, 4, 5, 0, 4, 1)])
def test_slot_probs_match_explicit_formula(b, r, T_window, p, H, Hkv):
    q, kb, vb, q_block, q_offset, valid, (qf, kf, vf, is_lm, rows) = _inference_layout(b, r, T_window, p, H, Hkv, 8, 3)
    plain = grouped_attention_inference(q, kb, vb, q_block, q_offset, valid)
    out, probs = grouped_attention_inference(q, kb, vb, q_block, q_offset, valid, slot_probs=True)
    assert torch.equal(out, plain)  # asking for the probabilities changes nothing else
    group, Q, N, S = H // Hkv, q.shape[2], kb.shape[2], b + 1
    assert probs.shape == (1, Hkv, group * Q, N, S)
    assert torch.allclose(probs.sum((-1, -2)), torch.ones(1, Hkv, group * Q))
    for h in range(H):
        for qi, row in enumerate(rows.tolist()):
            want = torch.zeros(N * S, dtype=torch.float64)
            want[: row + 1] = torch.tensor(explicit_slots(qf[0, h, row], kf[0, h // group], is_lm, row, b))
            got = probs[0, h // group, (h % group) * Q + qi].flatten().double()
            assert torch.allclose(got, want, atol=1e-5)  # later slots and landmarks: none


# ----- the engine's recorder against a full-sequence recomputation -----
@pytest.fixture(scope="module")
def model():
    from conftest import make_tiny_llama

    return make_tiny_llama(vocab=VOCAB, heads=4, kv_heads=2, seed=0)


def full_sequence_mass(model, stream: list[int], b: int, queries: int) -> torch.Tensor:
    """Per ordinary token, the attention probability that the last `queries`
    ordinary tokens' queries give it, summed over them, layers and heads,
    from the stock HF forward over the whole sequence with an attention
    function that also evaluates the method page's formula for those queries."""
    is_lm = torch.tensor([t == LANDMARK for t in stream])
    ordinary = [j for j, t in enumerate(stream) if t != LANDMARK]
    per_layer: list[torch.Tensor] = []

    def probe(module, query, key, value, attention_mask, **kwargs):
        group = query.shape[1] // key.shape[1]
        total = torch.zeros(len(stream), dtype=torch.float64)
        for i in ordinary[-queries:]:
            for h in range(query.shape[1]):
                total[: i + 1] += torch.tensor(explicit_slots(query[0, h, i], key[0, h // group], is_lm, i, b))
        per_layer.append(total[ordinary])
        return sequence_grouped_attention(query, key, value, b).transpose(1, 2).contiguous(), None

    AttentionInterface.register("evidence_probe", probe)
    previous = model.config._attn_implementation
    model.config._attn_implementation = "evidence_probe"
    try:
        with torch.no_grad():
            model(torch.tensor([stream]))
    finally:
        model.config._attn_implementation = previous
    return torch.stack(per_layer).sum(0)


# 24: the last token closes its block, fed together with the landmark; 3 queries: a short chunk over a block's end
@pytest.mark.parametrize("n,queries", [(23, 1), (24, 1), (23, 3)])
def test_recorded_mass_equals_full_sequence_recomputation(model, n, queries):
    b = 4
    ids = torch.randint(0, LANDMARK, (n,), generator=torch.Generator().manual_seed(4)).tolist()
    engine = LandmarkEngine(model, LandmarkConfig(landmark_id=LANDMARK, block_size=b, top_k=64, train_context=4096))
    engine.feed(ids[:-queries])
    recorder = EvidenceRecorder()
    engine.record_evidence(recorder)
    engine.feed(ids[-queries:])
    engine.record_evidence(None)
    got = recorder.result()
    want = full_sequence_mass(model, insert_landmarks(ids, b, LANDMARK), b, queries)  # every token, open block too
    assert torch.allclose(got.mass[:n], want, atol=1e-4) and got.mass[n:].sum() == 0
    rows = len(model.model.layers) * model.config.num_attention_heads * queries
    assert got.rows == rows and torch.isclose(got.mass.sum(), torch.tensor(float(rows), dtype=torch.float64))


def test_recording_covers_only_the_blocks_read(model):
    b = 4
    ids = torch.randint(0, LANDMARK, (41,), generator=torch.Generator().manual_seed(5)).tolist()
    engine = LandmarkEngine(model, LandmarkConfig(landmark_id=LANDMARK, block_size=b, top_k=2, train_context=4096))
    engine.feed(ids[:37])
    recorder = EvidenceRecorder()
    engine.record_evidence(recorder)
    engine.feed(ids[37:38])
    step = engine.trace.steps[-1]
    mass = recorder.result().mass
    read = set(step.block_ids.flatten().tolist()) | {37 // b}  # retrieved, and the open block
    assert {t // b for t in mass.nonzero().flatten().tolist()} <= read
    assert len(read) < 37 // b  # top-k read only some of the blocks
    assert torch.isclose(mass.sum(), torch.tensor(float(recorder.result().rows), dtype=torch.float64))


# ----- sessions: document blocks only, passages, display -----
@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", block_size=8, top_k=64, log=lambda m: None)


@pytest.fixture(scope="module")
def session(loaded, tmp_path_factory):
    path = tmp_path_factory.mktemp("evidence") / "notes.txt"
    path.write_text(TEXT)
    s = DocumentSession(loaded, LandmarkEngine(loaded.model, loaded.landmark), ingest(path))
    s.ingest()
    return s


def first_whole_block(session) -> int:
    return -(-session.doc_token_start // session.block_size)


def at_blocks(session, masses: dict[int, float]) -> torch.Tensor:
    """A per-token mass with each block's mass on its last token."""
    b = session.block_size
    mass = torch.zeros((max(masses) + 1) * b, dtype=torch.float64)
    for block, m in masses.items():
        mass[block * b + b - 1] = m
    return mass


def test_document_mass_counts_document_tokens_only(session):
    b, start, end = session.block_size, session.doc_token_start, len(session.token_ids)
    n = end // b + 3
    blocks = document_mass(session, TokenMass(torch.ones(n * b, dtype=torch.float64), rows=1))
    assert len(blocks) == n and start % b and end % b  # the first and last blocks are shared with the prompt
    for block, m in enumerate(blocks.tolist()):
        assert m == len(set(range(block * b, (block + 1) * b)) & set(range(start, end)))


def test_evidence_excludes_prompt_and_question_tokens(session):
    answer = session.ask("What is the pass key?", SamplingConfig(max_new_tokens=4))
    assert answer.evidence is not None and answer.evidence.rows > 0
    mass, start, end = answer.evidence.mass, session.doc_token_start, len(session.token_ids)
    assert mass[:start].sum() > 0 and mass[end:].sum() > 0  # the prompt's head and the question got attention ...
    blocks = document_mass(session, answer.evidence)
    assert torch.isclose(blocks.sum(), mass[start:end].sum())  # ... but only document tokens are evidence
    found = passages(session, answer.evidence)
    assert 1 <= len(found) <= 3
    assert all(b in session.sources for p in found for b in p.blocks)
    assert session.engine.evidence is None  # the recorder is detached after the answer


def test_a_fact_in_the_open_block_is_evidence(tiny_model_dir, tmp_path):
    """The document's last tokens share the open block with the question
    while the answer is generated: they are read directly, not retrieved,
    and must count as evidence all the same."""
    loaded = load_model(str(tiny_model_dir), device="cpu", block_size=48, top_k=2, log=lambda m: None)
    b = loaded.landmark.block_size
    tail = len(loaded.tokenizer(QAPrompt(loaded, "document").tail("Key?"), add_special_tokens=False).input_ids)
    path = tmp_path / "end.txt"
    for pad in range(2 * b):  # filler until the document ends early in a block
        path.write_text(TEXT + "so " * pad + "The pass key is 4711.")
        s = DocumentSession(loaded, LandmarkEngine(loaded.model, loaded.landmark), ingest(path))
        end = s.prepare()
        if 0 < end % b < b - tail - 2:
            break
    assert 0 < end % b < b - tail - 2  # the document's last block is still open during the answer
    s.ingest()
    answer = s.ask("Key?", SamplingConfig(max_new_tokens=2))
    last = (end - 1) // b
    assert answer.evidence.mass[last * b : end].sum() > 0
    assert document_mass(s, answer.evidence)[last] > 0


def test_passages_merge_neighbours_and_map_lines(session):
    a = first_whole_block(session) + 1
    mass = at_blocks(session, {a: 3.0, a + 1: 2.0, a + 5: 4.0, a + 11: 0.0})
    mass[0] = 100.0  # the prompt's head, never evidence
    found = passages(session, TokenMass(mass, rows=10))
    assert [p.blocks for p in found] == [(a, a + 1), (a + 5,)]  # merged pair has more mass (5 > 4)
    first = found[0]
    src = session.sources
    assert first.top_block == a and first.mass == 5.0 and first.share == 0.5
    assert (first.file, first.start_line, first.end_line) == ("notes.txt", src[a].line_start, src[a + 1].line_end)
    assert first.text == session.document.text[src[a].char_start : src[a + 1].char_end].strip()
    assert first.location == f"notes.txt:{first.start_line}-{first.end_line}"
    assert set(first.to_json()) == {"file", "start_line", "end_line", "block", "blocks", "mass", "share", "quoted", "text"}


def test_passages_cap_a_run_and_look_elsewhere(session):
    a = first_whole_block(session) + 1
    mass = at_blocks(session, {a: 9.0, a + 1: 8.0, a + 2: 7.0, a + 3: 6.0, a + 4: 5.0, a + 8: 1.0})
    found = passages(session, TokenMass(mass, rows=1))
    # a+3 touches the full run of 3 and is passed over; a+4 and a+8 are other places
    assert [p.blocks for p in found] == [(a, a + 1, a + 2), (a + 4,), (a + 8,)]


def test_a_quoted_passage_leads_whatever_its_mass(session):
    """An answer that repeats the document is shown where it repeats it
    first, before blocks with more attention (the ones nearest the question)."""
    from lmqa.qa.evidence import quoted_span

    a = first_whole_block(session) + 1
    mass = at_blocks(session, {a: 1.0, a + 6: 9.0})
    text = session.document.text
    start = text.index("Line 9:")
    span = quoted_span(session, "Line 9: the sky is\n blue.  The pass key is 4711.", TokenMass(mass, rows=1))
    assert span == (start, text.index("4711.") + len("4711."))
    found = passages(session, TokenMass(mass, rows=1, quoted=(span,)))
    held = [b for b, s in session.sources.items() if s.char_start < span[1] and s.char_end > span[0]]
    assert list(found[0].blocks) == held[:3] and found[1].blocks == (a + 6,)
    assert found[0].quoted and not found[1].quoted
    assert quoted_span(session, "The sky is green.", TokenMass(mass, rows=1)) is None


def test_of_several_places_the_quote_is_the_most_attended(session):
    from lmqa.qa.evidence import quoted_span

    text, b = session.document.text, session.block_size
    places = [m for m in range(len(text)) if text.startswith("the sky is blue.", m)]
    late = max(places)
    block = next(k for k, s in session.sources.items() if s.char_start <= late < s.char_end)
    mass = at_blocks(session, {block: 5.0})
    span = quoted_span(session, "the sky is blue.", TokenMass(mass, rows=1))
    assert span[0] in places and session.sources[block].char_start < span[1] and span[0] < session.sources[block].char_end


def test_excerpt_cuts_at_a_word():
    assert excerpt("a  b\n c") == "a b c"
    cut = excerpt("word " * 100, width=42)
    assert cut.endswith(" …") and len(cut) <= 44 and "wor …" not in cut


def test_render_evidence():
    out = io.StringIO()
    Console(file=out, width=100).print(render_evidence([]))
    assert "Evidence: none" in out.getvalue()


# ----- the CLI and chat -----
def test_ask_prints_evidence_and_table_only_on_request(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    args = ("ask", doc, "What is the pass key?", "--model", tiny_model_dir, "--device", "cpu", "--block-size", 8,
            "--top-k", 64, "--max-new-tokens", 3)
    res = run(CliRunner(), *args)
    assert_ok(res)
    assert "Evidence" in res.output and "doc.txt:" in res.output
    assert "retrieved blocks per layer" not in res.output
    res = run(CliRunner(), *args, "--show-blocks", 2)
    assert "Evidence" in res.output and "retrieved blocks per layer" in res.output
    res = run(CliRunner(), *args, "--json")
    result = json.loads(res.stdout)
    assert "retrieved" not in result and 1 <= len(result["evidence"]) <= 3
    for item in result["evidence"]:
        assert {"file", "start_line", "end_line", "block", "mass", "share", "text"} <= set(item)
        assert item["file"] == "doc.txt" and item["text"] in TEXT and item["start_line"] <= item["end_line"]


def test_chat_prints_evidence_after_each_answer(session):
    _, out, _ = chat_run(session, ["What is the pass key?", "Where?"], max_new_tokens=3)
    assert out.count("Evidence") == 2 and "notes.txt:" in out
