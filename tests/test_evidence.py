"""Evidence with every answer: the grouped softmax's per-block outer
probabilities, their sum over an answer's token steps, and the passages
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
from lmqa.qa.evidence import BlockMass, EvidenceRecorder, document_mass, document_share, excerpt, passages
from lmqa.engine.generation import SamplingConfig
from lmqa.engine.grouped_attention import grouped_attention_inference, sequence_grouped_attention
from lmqa.ingest import ingest
from lmqa.engine.landmarks import LandmarkConfig, insert_landmarks
from lmqa.model.loading import load_model
from lmqa.qa.session import DocumentSession
from lmqa.qa.retrieval_summary import render_evidence

VOCAB = 128
LANDMARK = VOCAB - 1
TEXT = "".join(f"Line {i}: the sky is blue." + (" The pass key is 4711." if i == 9 else "") + "\n" for i in range(24))


# ----- the outer probabilities -----
def explicit_outer(q_row: torch.Tensor, k_flat: torch.Tensor, is_landmark: torch.Tensor, i: int, b: int) -> list[float]:
    """Method page, section 2, for query position i of a flat sequence: each
    earlier block's landmark share exp(s_L) / Z, and the own block's summed
    token share, in block order."""
    S = b + 1
    d = q_row.shape[-1]
    s = [(q_row.double() @ k_flat[j].double()).item() / math.sqrt(d) for j in range(i + 1)]
    own = [j for j in range(i // S * S, i + 1) if not is_landmark[j]]
    marks = [j for j in range(i) if is_landmark[j]]
    z = sum(math.exp(s[j]) for j in own) + sum(math.exp(s[j]) for j in marks)
    return [math.exp(s[m]) / z for m in marks] + [sum(math.exp(s[j]) for j in own) / z]


@pytest.mark.parametrize("b,r,T_window,p,H,Hkv", [(3, 2, 1, 2, 4, 2), (4, 3, 2, 3, 2, 2), (2, 4, 5, 0, 4, 1)])
def test_block_probs_match_explicit_formula(b, r, T_window, p, H, Hkv):
    q, kb, vb, q_block, q_offset, valid, (qf, kf, vf, is_lm, rows) = _inference_layout(b, r, T_window, p, H, Hkv, 8, 3)
    plain = grouped_attention_inference(q, kb, vb, q_block, q_offset, valid)
    out, probs = grouped_attention_inference(q, kb, vb, q_block, q_offset, valid, block_probs=True)
    assert torch.equal(out, plain)  # asking for the probabilities changes nothing else
    group, Q = H // Hkv, q.shape[2]
    assert probs.shape == (1, Hkv, group * Q, kb.shape[2])
    assert torch.allclose(probs.sum(-1), torch.ones(1, Hkv, group * Q))
    for h in range(H):
        for qi, row in enumerate(rows.tolist()):
            want = explicit_outer(qf[0, h, row], kf[0, h // group], is_lm, row, b)
            got = probs[0, h // group, (h % group) * Q + qi, : len(want)]
            assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5)
            assert probs[0, h // group, (h % group) * Q + qi, len(want):].abs().sum() <= 1e-6  # later blocks: none


# ----- the engine's recorder against a full-sequence recomputation -----
@pytest.fixture(scope="module")
def model():
    from conftest import make_tiny_llama

    return make_tiny_llama(vocab=VOCAB, heads=4, kv_heads=2, seed=0)


def full_sequence_mass(model, stream: list[int], b: int) -> torch.Tensor:
    """Per earlier block, the last ordinary token's landmark share summed over layers and
    heads, from the stock HF forward over the whole sequence with an attention
    function that also evaluates the method page's formula for that query."""
    is_lm = torch.tensor([t == LANDMARK for t in stream])
    per_layer: list[torch.Tensor] = []

    def probe(module, query, key, value, attention_mask, **kwargs):
        group = query.shape[1] // key.shape[1]
        i = max(j for j, t in enumerate(stream) if t != LANDMARK)  # the last token's query, not its landmark's
        shares = [explicit_outer(query[0, h, i], key[0, h // group], is_lm, i, b)[:-1] for h in range(query.shape[1])]
        per_layer.append(torch.tensor(shares, dtype=torch.float64).sum(0))
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


@pytest.mark.parametrize("n", [23, 24])  # 24: the last token closes its block, fed together with the landmark
def test_recorded_mass_equals_full_sequence_recomputation(model, n):
    b = 4
    ids = torch.randint(0, LANDMARK, (n,), generator=torch.Generator().manual_seed(4)).tolist()
    engine = LandmarkEngine(model, LandmarkConfig(landmark_id=LANDMARK, block_size=b, top_k=64, train_context=4096))
    engine.feed(ids[:-1])
    recorder = EvidenceRecorder()
    engine.evidence = recorder
    engine.feed(ids[-1:])
    engine.evidence = None
    got = recorder.result()
    want = full_sequence_mass(model, insert_landmarks(ids, b, LANDMARK), b)
    assert len(want) == (n - 1) // b
    assert torch.allclose(got.mass[: len(want)], want, atol=1e-4)
    assert got.rows == len(model.model.layers) * model.config.num_attention_heads


def test_no_recording_outside_token_steps_and_only_retrieved_blocks(model):
    b = 4
    ids = torch.randint(0, LANDMARK, (41,), generator=torch.Generator().manual_seed(5)).tolist()
    engine = LandmarkEngine(model, LandmarkConfig(landmark_id=LANDMARK, block_size=b, top_k=2, train_context=4096))
    recorder = EvidenceRecorder()
    engine.evidence = recorder
    engine.feed(ids[:37])  # a prefill: chunks record nothing
    assert recorder.result().rows == 0
    engine.feed(ids[37:38])
    step = engine.trace.steps[-1]
    mass = recorder.result().mass
    assert set(mass.nonzero().flatten().tolist()) <= set(step.block_ids.flatten().tolist())
    assert 0 < mass.sum() < recorder.result().rows  # the window keeps the rest of the attention


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
    return int((document_share(session, 100) == 1).nonzero()[0])


def test_document_share_and_mass(session):
    b, start, end = session.block_size, session.doc_token_start, len(session.token_ids)
    share = document_share(session, end // b + 3)
    for block, s in enumerate(share.tolist()):
        inside = len(set(range(block * b, (block + 1) * b)) & set(range(start, end)))
        assert s == inside / b
    mass = torch.ones(len(share), dtype=torch.float64)
    weighted = document_mass(session, BlockMass(mass, rows=1))
    assert torch.equal(weighted, torch.where(share >= 0.5, share, 0.0))  # mostly-prompt blocks count nothing


def test_evidence_excludes_prompt_and_question_blocks(session):
    answer = session.ask("What is the pass key?", SamplingConfig(max_new_tokens=4))
    assert answer.evidence is not None and answer.evidence.rows > 0
    share = document_share(session, len(answer.evidence.mass))
    assert share[0] < 0.5 and session.doc_token_start > 0  # block 0 is mostly the prompt's head
    retrieved = answer.evidence.mass.nonzero().flatten().tolist()
    assert any(share[b] < 0.5 for b in retrieved)  # prompt or question blocks got mass (top-k covers all) ...
    found = passages(session, answer.evidence)
    assert 1 <= len(found) <= 3
    assert all(share[b] >= 0.5 for p in found for b in p.blocks)  # ... but are never evidence
    assert session.engine.evidence is None  # the recorder is detached after the answer


def test_passages_merge_neighbours_and_map_lines(session):
    a = first_whole_block(session) + 1
    mass = torch.zeros(a + 12, dtype=torch.float64)
    mass[a], mass[a + 1], mass[a + 5], mass[0] = 3.0, 2.0, 4.0, 100.0  # block 0: prompt head, never evidence
    found = passages(session, BlockMass(mass, rows=10))
    assert [p.blocks for p in found] == [(a, a + 1), (a + 5,)]  # merged pair has more mass (5 > 4)
    first = found[0]
    src = session.sources
    assert first.top_block == a and first.mass == 5.0 and first.share == 0.5
    assert (first.file, first.start_line, first.end_line) == ("notes.txt", src[a].line_start, src[a + 1].line_end)
    assert first.text == session.document.text[src[a].char_start : src[a + 1].char_end].strip()
    assert first.location == f"notes.txt:{first.start_line}-{first.end_line}"
    assert set(first.to_json()) == {"file", "start_line", "end_line", "block", "blocks", "mass", "share", "text"}


def test_passages_cap_a_run_and_look_elsewhere(session):
    a = first_whole_block(session) + 1
    mass = torch.zeros(a + 12, dtype=torch.float64)
    mass[a : a + 5] = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0])
    mass[a + 8] = 1.0
    found = passages(session, BlockMass(mass, rows=1))
    # a+3 touches the full run of 3 and is passed over; a+4 and a+8 are other places
    assert [p.blocks for p in found] == [(a, a + 1, a + 2), (a + 4,), (a + 8,)]


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
