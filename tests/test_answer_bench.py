"""`lmqa bench --answers`: seconds per question per answer path, on the answers the paths really give."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from lmqa.cli import app
from lmqa.engine.generation import SamplingConfig
from lmqa.evaluation.answer_bench import AnswerRow, cut, summary
from lmqa.evaluation.tasks import one_file
from lmqa.model.loading import load_model
from lmqa.options import EngineOptions
from lmqa.qa.session import DocumentSession

from conftest import build_tiny_tokenizer

TEXT = ("The lighthouse keeper wrote in his log every night. A storm came from the north and the boats stayed in "
        "the harbour. His daughter Mara counted the gulls on the rocks, and the cook baked bread for the crew.\n")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cut_gives_exactly_the_tokens_asked_repeating_short_text():
    tok = build_tiny_tokenizer()
    n = len(tok(TEXT, add_special_tokens=False).input_ids)
    for want in (5, n, 3 * n + 7):
        piece = cut(tok, TEXT, want)
        assert len(tok(piece, add_special_tokens=False).input_ids) in (want, want + 1)  # a merge at the cut
        assert TEXT.startswith(piece[:50])
    assert cut(tok, TEXT, n + 20).count("lighthouse keeper") == 2


def test_bench_answers_times_the_answers_the_paths_give(tiny_model_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    res = invoke("bench", "--answers", "-m", tiny_model_dir, "--device", "cpu", "--document", doc, "--lengths", "300",
                 "--answer-candidates", "2,1", "--question", "Who counted the gulls?", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    rows = [AnswerRow(**r) for r in out["rows"]]
    assert [(r.tokens, r.candidates, r.fresh) for r in rows] == [(300, 2, False), (300, 1, False)]
    # the same answers as the session gives, on the same document cut
    loaded = load_model(str(tiny_model_dir), device="cpu", log=lambda m: None)
    session = DocumentSession(loaded, EngineOptions().engine(loaded), one_file(cut(loaded.tokenizer, TEXT, 300),
                                                                                  "document.txt"))
    session.ingest()
    for row in rows:
        answer = session.ask(row.question, SamplingConfig(max_new_tokens=64, candidates=row.candidates))
        assert row.answer == answer.text and row.answer_tokens == answer.timings.answer_tokens
        assert row.total_s >= row.first_token_s > 0
    medians = {m["candidates"]: m for m in out["summary"]}
    assert medians[1]["vs_one_pass"] == 1.0
    assert medians[2]["vs_one_pass"] == rows[0].total_s / rows[1].total_s


def test_bench_answers_in_a_fresh_process_answers_as_held(tiny_model_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    res = invoke("bench", "--answers", "-m", tiny_model_dir, "--device", "cpu", "--document", doc, "--lengths", "300",
                 "--answer-candidates", "1", "--question", "Who baked bread?", "--fresh", "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout.strip().splitlines()[-1])["rows"]
    held, fresh = rows
    assert not held["fresh"] and fresh["fresh"] and fresh["first_token_s"] is None
    assert fresh["answer"] == held["answer"] and fresh["total_s"] > 0


def test_bench_answers_needs_a_document(tiny_model_dir, tmp_path):
    for extra in ([], ["--document", tmp_path / "missing.txt"]):
        res = invoke("bench", "--answers", "-m", tiny_model_dir, *extra)
        assert res.exit_code == 1 and "--document" in res.output and "Traceback" not in res.output, res.output
    res = invoke("bench", "--answers", "-m", tiny_model_dir, "--document", __file__, "--answer-candidates", "0")
    assert res.exit_code == 1 and "--answer-candidates" in res.output, res.output


def test_summary_takes_medians_per_path():
    rows = [AnswerRow(100, c, q, total, total / 2, 5, 3, "a") for c, q, total in
            ((4, "a", 10.0), (1, "a", 2.0), (4, "b", 14.0), (1, "b", 4.0), (4, "c", 30.0), (1, "c", 3.0))]
    by = {m["candidates"]: m for m in summary(rows)}
    assert by[4]["total_s"] == 14.0 and by[1]["total_s"] == 3.0 and by[4]["vs_one_pass"] == 14.0 / 3.0
    assert by[1]["first_token_s"] == 1.5
