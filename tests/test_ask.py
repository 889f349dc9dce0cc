"""`lmqa ask` end to end on a tiny random model: DocumentSession rollback,
--json/--trace/--plot outputs with source locations, and bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch
from conftest import save_tiny_model_dir
from test_cli import assert_clean_error, assert_ok, run
from test_ingest import BAD_INPUTS, make_epub, minimal_pdf, write
from typer.testing import CliRunner

from lmqa.atomic_file import atomic_path
from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.engine.generation import SamplingConfig
from lmqa.ingest import ingest
from lmqa.model.loading import load_model
from lmqa.qa.session import DocumentSession, QAPrompt

FAST = ("--device", "cpu", "--block-size", 8, "--max-new-tokens", 3)
LOCATION = re.compile(r"\b[\w/]+\.(?:py|md|txt):\d+(?:-\d+)?")


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def codebase(tmp_path_factory):
    root = tmp_path_factory.mktemp("code")
    write(root, ".gitignore", "secret.py\n")
    write(root, "secret.py", "TOKEN = 'never read'\n")
    write(root, "README.md", "# demo\nThe sky is blue.\n")
    for i in range(3):
        write(root, f"pkg/mod{i}.py", "".join(f"def f{i}_{j}(x):\n    return x + {j}\n\n" for j in range(3)))
    return root


@pytest.fixture(scope="module")
def session(tiny_model_dir, tmp_path_factory):
    doc = write(tmp_path_factory.mktemp("doc"), "doc.txt", "The sky is blue. The pass key is 4711.\n" * 8)
    loaded = load_model(str(tiny_model_dir), device="cpu", block_size=8, log=lambda m: None)
    s = DocumentSession(loaded, LandmarkEngine(loaded.model, loaded.landmark), ingest(doc))
    s.ingest()
    return s


def no_outputs(directory) -> bool:
    """Neither a result file nor a leftover temp file."""
    return not any(p.suffix in (".json", ".png", ".tmp") for p in directory.iterdir())


# ----- DocumentSession -----
def test_ask_twice_gives_the_same_answer_and_trace(session):
    greedy = SamplingConfig(max_new_tokens=5)
    first, second = session.ask("What is the pass key?", greedy), session.ask("What is the pass key?", greedy)
    assert first.token_ids == second.token_ids and first.text == second.text
    assert [s.block_ids.tolist() for s in first.steps] == [s.block_ids.tolist() for s in second.steps]
    assert first.steps and first.steps[0].kind == "chunk"  # the question's prefill, then tokens
    assert first.timings.question_tokens > 0 and first.timings.answer_tokens == len(first.token_ids)


def _ids(session, text):
    return session.loaded.tokenizer(text, add_special_tokens=False).input_ids


def test_kept_turn_is_in_the_engine_and_forget_rolls_it_back(session):
    """keep=True leaves question and answer in the engine: it then holds exactly
    what a fresh engine holds after document + question + answer fed the same
    way (equal logits for any continuation); the next question is a follow-up
    fed after it; forget() returns to the document."""
    greedy = SamplingConfig(max_new_tokens=3)
    engine = session.engine
    doc = engine.snapshot()
    fresh = session.ask("q?", greedy)
    assert engine.n_tokens == doc.n_tokens  # not kept

    tail = _ids(session, session.prompt.tail("first?"))
    first = session.ask("first?", greedy, keep=True)
    assert first.token_ids
    assert engine.n_tokens == doc.n_tokens + len(tail) + len(first.token_ids)
    assert engine.n_blocks == (doc.n_tokens + len(tail) + len(first.token_ids)) // session.block_size

    reference = LandmarkEngine(session.loaded.model, session.loaded.landmark)
    reference.feed(session.token_ids)  # as ingest() did: head + document, then the question, then token by token
    reference.feed(tail)
    for t in first.token_ids:
        reference.feed([t])
    probe = _ids(session, session.prompt.tail("then?", follow_up=True))
    kept = engine.snapshot()
    got = engine.feed(probe)
    engine.rollback(kept)
    assert torch.equal(got, reference.feed(probe))

    fed = []
    real_feed = engine.feed
    engine.feed = lambda ids, progress=None: fed.append(list(ids)) or real_feed(ids, progress)
    try:
        session.ask("then?", greedy)  # a follow-up, not kept: back to the kept turn
    finally:
        del engine.feed
    assert fed[0] == probe
    assert engine.n_tokens == kept.n_tokens

    session.forget()
    assert engine.n_tokens == doc.n_tokens and engine.n_blocks == doc.n_blocks
    assert session.ask("q?", greedy).token_ids == fresh.token_ids


# ----- the chat-template prompt (the default model's path) -----
def test_chat_template_prompt(chat_model_dir, tmp_path):
    """First question: system + user turn around the document, ending where the
    assistant's answer begins. Follow-up: the <|im_end|> that generation stopped
    at (a stop token) closes the kept answer, then a new user turn."""
    loaded = load_model(str(chat_model_dir), device="cpu", block_size=8, log=lambda m: None)
    prompt = QAPrompt(loaded, "document")
    assert prompt.chat
    assert prompt.head.startswith("<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\n"
                                  "Read the document below")
    assert prompt.head.endswith("<document>\n")
    assert prompt.tail("Who?") == "\n</document>\n\nQuestion: Who?<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.tail("Why?", follow_up=True) == "<|im_end|>\n<|im_start|>user\nQuestion: Why?<|im_end|>\n<|im_start|>assistant\n"

    doc = write(tmp_path, "doc.txt", "The sky is blue. The pass key is 4711.\n" * 4)
    session = DocumentSession(loaded, LandmarkEngine(loaded.model, loaded.landmark), ingest(doc))
    im_end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert session.stop_ids() == {loaded.tokenizer.eos_token_id, im_end}
    session.ingest()
    first = session.ask("Who?", SamplingConfig(max_new_tokens=2), keep=True)
    follow = _ids(session, session.prompt.tail("Why?", follow_up=True))
    assert follow[0] == im_end and session.engine.n_tokens == session.document_mark.n_tokens + len(
        _ids(session, prompt.tail("Who?"))) + len(first.token_ids)

    plain = QAPrompt(dataclasses.replace(loaded, prompt_format="plain"), "document")  # a manifest can opt out
    assert not plain.chat and "<|im_start|>" not in plain.head + plain.tail("Who?", follow_up=True)
    assert plain.tail("Who?").endswith("Question: Who?\nAnswer:")


def test_per_layer_aggregates_heads_and_steps_onto_sources(session):
    answer = session.ask("What is the pass key?", SamplingConfig(max_new_tokens=4))
    layers = answer.per_layer()
    assert len(layers) == session.engine.model.config.num_hidden_layers
    for blocks in layers:
        total = sum(b.count for b in blocks)
        assert total == sum(s.block_ids[0].numel() for s in answer.steps)  # every head, step and rank counted
        assert [b.count for b in blocks] == sorted((b.count for b in blocks), reverse=True)
        for b in blocks:
            assert (b.source is None) == (b.block not in session.sources)
            if b.source is not None:
                assert b.source.title == "doc.txt"


# ----- the command -----
def test_codebase_json_trace_and_plot(runner, tiny_model_dir, codebase, tmp_path):
    trace, plot = tmp_path / "trace.json", tmp_path / "heat.png"
    res = run(runner, "ask", codebase, "What does f1_2 return?", "--model", tiny_model_dir, *FAST, "--json",
              "--trace", trace, "--plot", plot, "--show-blocks", 2, "--exclude", "README.md")
    assert_ok(res)
    result = json.loads(res.stdout)  # nothing else on stdout
    assert result["document"]["kind"] == "codebase" and result["document"]["segments"] == 4  # .gitignore + 3 modules
    assert set(result["timings"]) >= {"prefill_s", "first_token_s", "tokens_per_s", "document_prefill_tokens_per_s"}
    assert len(result["retrieved"]) == 2 and all(len(layer["blocks"]) <= 2 for layer in result["retrieved"])
    locations = [b["source"]["location"] for layer in result["retrieved"] for b in layer["blocks"] if b["source"]]
    assert locations and all(LOCATION.fullmatch(loc.split(" ")[0]) for loc in locations), locations
    assert "secret.py" not in res.stdout and "README.md" not in res.stdout
    flat = " ".join(res.output.split())
    assert "excluded: 1 (README.md)" in flat and "gitignored: 1 (secret.py)" in flat  # the skip summary, on stderr

    full = json.loads(trace.read_text())
    step = full["steps"][0]
    assert len(step["block_ids"]) == 2 and len(step["block_ids"][0]) == 2  # [layer][kv_head][rank]
    assert len(step["scores"][1][1]) == len(step["block_ids"][1][1])
    used = {b for s in full["steps"] for layer in s["block_ids"] for head in layer for b in head}
    assert {int(b) for b in full["blocks"]} == used
    assert any(src and src["title"].startswith("pkg/mod") for src in full["blocks"].values())
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_text_summary_shows_file_and_lines(runner, tiny_model_dir, tmp_path):
    doc = write(tmp_path, "novel.md", "".join(f"Chapter {i}\nThe sky is blue. The grass is green.\n" for i in range(1, 9)))
    res = run(runner, "ask", doc, "What colour is the sky?", "--model", tiny_model_dir, *FAST, "--show-blocks", 2)
    assert_ok(res)
    assert "retrieved blocks per layer" in res.output
    assert re.search(r"novel\.md:\d+", res.output), res.output
    assert re.search(r"\d[\d,]* tokens, \d+ blocks of 8; estimated key/value cache", " ".join(res.output.split()))
    assert re.search(r"read [\d,]+ tokens in [\d.]+ s \([\d,]+ tok/s\)", res.output)
    assert re.search(r"first token after [\d.]+ s, \d+ tokens in [\d.]+ s \([\d.]+ tok/s\)", " ".join(res.output.split()))


@pytest.mark.parametrize("fmt", ["pdf", "epub"])
def test_books(runner, tiny_model_dir, tmp_path, fmt):
    if fmt == "pdf":
        book = write(tmp_path, "book.pdf", minimal_pdf([["The sky is blue."] * 6, ["The pass key is 4711."] * 6]))
        where = "page 2"
    else:
        chapters = [("one.xhtml", "<html><body><p>" + "The sky is blue. " * 10 + "</p></body></html>"),
                    ("two.xhtml", "<html><body><p>" + "The pass key is 4711. " * 10 + "</p></body></html>")]
        book = make_epub(tmp_path / "book.epub", chapters, [("one.xhtml", "Opening"), ("two.xhtml", "Key")])
        where = "Key"
    res = run(runner, "ask", book, "What is the pass key?", "--model", tiny_model_dir, *FAST, "--json", "--show-blocks", 50)
    assert_ok(res)
    result = json.loads(res.stdout)
    titles = {b["source"]["title"] for layer in result["retrieved"] for b in layer["blocks"] if b["source"]}
    assert where in titles, titles


def test_latin1_is_read_and_said(runner, tiny_model_dir, tmp_path):
    doc = write(tmp_path, "latin1.txt", "Caf\xe9 au lait. The sky is blue.\n".encode("latin-1") * 4)
    res = run(runner, "ask", doc, "q?", "--model", tiny_model_dir, *FAST, "--show-blocks", 0)
    assert_ok(res)
    assert "not UTF-8; read as Latin-1" in " ".join(res.output.split())


# ----- bad input: one line, non-zero exit, no traceback, no output files -----
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_documents(runner, tiny_model_dir, tmp_path, case):
    make, expected = BAD_INPUTS[case]
    out = tmp_path / "out"
    out.mkdir()
    res = run(runner, "ask", make(tmp_path), "q", "--model", tiny_model_dir, "--device", "cpu",
              "--trace", out / "t.json", "--plot", out / "p.png")
    assert_clean_error(res, expected)
    assert no_outputs(out)


def test_document_over_the_memory_budget(runner, tiny_model_dir, codebase, tmp_path):
    res = run(runner, "ask", codebase, "q", "--model", tiny_model_dir, *FAST, "--max-memory", "1K",
              "--trace", tmp_path / "t.json", "--plot", tmp_path / "p.png")
    assert_clean_error(res, "key/value memory", "over the budget of 1.0 KiB", "--max-memory")  # even streamed (spilled)
    assert no_outputs(tmp_path)


@pytest.mark.parametrize("args, expected", [
    (("--max-memory", "lots"), "--max-memory: not a size: 'lots'"),
    (("--trace", "/no/such/dir/t.json"), "--trace /no/such/dir/t.json: directory /no/such/dir does not exist"),
])
def test_bad_options(runner, tiny_model_dir, codebase, args, expected):
    assert_clean_error(run(runner, "ask", codebase, "q", "--model", tiny_model_dir, *args), expected)


def test_atomic_path_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "plot.png"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("failed half-way")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_result_gets_the_umask_mode(tmp_path):
    target = tmp_path / "trace.json"
    old = os.umask(0o022)
    try:
        with atomic_path(target) as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert target.read_text() == "{}" and (target.stat().st_mode & 0o777) == 0o644
