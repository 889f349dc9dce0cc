"""Streaming ingestion (lmqa/qa/context_stream.py): piece by piece equals all at
once, memory stays at one piece, interrupted ingests resume byte-identical,
and ask spills a document over --max-memory to a temporary file."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import pytest
import torch
from test_context_file import GREEDY, QUESTIONS, TEXT, fresh, loaded, same_answers  # noqa: F401 (loaded: a fixture)

from lmqa.qa import context_file
from lmqa.qa.context_file import ContextError, ContextWriter, load, save
from lmqa.qa.context_stream import ingest_file, partial_path
from lmqa.ingest import ingest

LONG = TEXT * 4  # about 250 blocks of 8 tokens
PIECE = 100_000  # bytes per piece: 20 blocks of the tiny model (a multiple of its 5-block prefill chunk)


@pytest.fixture(scope="module")
def document(tmp_path_factory):
    path = tmp_path_factory.mktemp("doc") / "doc.txt"
    path.write_text(LONG)
    return ingest(path)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kv", [None, torch.int8])
def test_pieces_equal_all_at_once(loaded, document, tmp_path, monkeypatch, kv):
    """Fed piece by piece and frozen onto the file, the engine answers as one
    fed at once, the file is the one save() writes, and the in-memory tail
    never held more than one piece (plus the growth slack)."""
    monkeypatch.setattr(context_file, "PIECE_BYTES", PIECE)
    at_once = fresh(loaded, document, kv)
    at_once.ingest()
    save(at_once, tmp_path / "saved.lmqa")
    streamed = ingest_file(fresh(loaded, document, kv), tmp_path / "streamed.lmqa")
    assert sha(tmp_path / "saved.lmqa") == sha(tmp_path / "streamed.lmqa")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved.lmqa", "streamed.lmqa"]
    engine = streamed.session.engine
    per_piece = context_file.piece_blocks(engine)
    assert engine.n_blocks > 2 * per_piece
    for store in engine.stores:
        assert store.n_frozen == engine.n_blocks
        assert store.keys.codes.data.shape[0] <= max(16, 2 * per_piece)
    for q in QUESTIONS:
        same_answers(streamed.session.ask(q, GREEDY), at_once.ask(q, GREEDY))
    same_answers(load(tmp_path / "streamed.lmqa", loaded).ask(QUESTIONS[0], GREEDY), at_once.ask(QUESTIONS[0], GREEDY))


def interrupt_at(monkeypatch, piece: int, how):
    """Make the writer call how() just before writing `piece`."""
    real = ContextWriter.write_piece

    def write_piece(self, index, exports):
        if index == piece:
            how()
        return real(self, index, exports)

    monkeypatch.setattr(ContextWriter, "write_piece", write_piece)


def test_interrupted_ingest_resumes_byte_identical(loaded, document, tmp_path, monkeypatch):
    out = tmp_path / "ctx.lmqa"
    whole = ingest_file(fresh(loaded, document), tmp_path / "whole.lmqa", piece_bytes=PIECE)
    with monkeypatch.context() as m:
        def ctrl_c():
            raise KeyboardInterrupt

        interrupt_at(m, 3, ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            ingest_file(fresh(loaded, document), out, piece_bytes=PIECE)
    assert not out.exists() and partial_path(out).exists()
    resumed = ingest_file(fresh(loaded, document), out, resume=True, piece_bytes=PIECE)
    assert resumed.resumed_blocks == 3 * context_file.piece_blocks(whole.session.engine, PIECE)
    assert sha(out) == sha(tmp_path / "whole.lmqa") and not partial_path(out).exists()
    same_answers(resumed.session.ask(QUESTIONS[0], GREEDY), whole.session.ask(QUESTIONS[0], GREEDY))


def test_killed_ingest_resumes_and_damaged_pieces_are_redone(loaded, document, tmp_path, monkeypatch):
    """SIGKILL mid-ingest (in a child) leaves only the partial file; a piece
    damaged since is written again; another document starts over."""
    out = tmp_path / "ctx.lmqa"
    pid = os.fork()
    if pid == 0:  # the child dies before writing piece 4: pieces 0-3 are checkpointed
        try:
            interrupt_at(monkeypatch, 4, lambda: os.kill(os.getpid(), signal.SIGKILL))
            ingest_file(fresh(loaded, document), out, piece_bytes=PIECE)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert [p.name for p in tmp_path.iterdir()] == [partial_path(out).name]
    with pytest.raises(ContextError, match="unfinished ingest"):
        load(partial_path(out), loaded)

    work = partial_path(out)
    writer = ContextWriter(work, *_args(loaded, document), resume=True)  # the child's header: opened as is
    writer.close()
    layout = writer.layout
    assert writer.done == 4
    offset = layout.piece_ranges(2)[0][0]
    data = bytearray(work.read_bytes())
    data[offset] ^= 0x10
    work.write_bytes(data)
    resumed = ingest_file(fresh(loaded, document), out, resume=True, piece_bytes=PIECE)
    assert resumed.resumed_blocks == 2 * layout.piece_blocks  # piece 2 failed its checksum
    ingest_file(fresh(loaded, document), tmp_path / "whole.lmqa", piece_bytes=PIECE)
    assert sha(out) == sha(tmp_path / "whole.lmqa")

    other = ingest(_write(tmp_path / "other.txt", LONG.replace("4711", "4712")))
    work.write_bytes(out.read_bytes())  # a finished file of another document at the partial name
    assert ingest_file(fresh(loaded, other), out, resume=True, piece_bytes=PIECE).resumed_blocks == 0


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _args(loaded, document):
    session = fresh(loaded, document)
    body = context_file.document_bytes(session)
    meta = context_file.metadata(session, len(session.token_ids), body, context_file.piece_blocks(session.engine, PIECE))
    return meta, session.token_ids, body


def test_bit_flips_are_refused(loaded, document, tmp_path):
    path = tmp_path / "ctx.lmqa"
    ingest_file(fresh(loaded, document), path, piece_bytes=PIECE)
    data = path.read_bytes()
    flipped = tmp_path / "flipped.lmqa"
    for offset in (9, 200, len(data) // 3, len(data) // 2, len(data) - 3):
        damaged = bytearray(data)
        damaged[offset] ^= 0x01
        flipped.write_bytes(damaged)
        with pytest.raises(ContextError, match="corrupt|not a complete|metadata"):
            load(flipped, loaded)


def test_ask_spills_over_max_memory(tmp_path, tiny_model_dir):
    from test_cli import assert_ok, run
    from typer.testing import CliRunner

    doc = _write(tmp_path / "doc.txt", LONG)
    fast = ("--device", "cpu", "--max-new-tokens", 4, "--show-blocks", 0, "--model", tiny_model_dir, "--block-size", 8)
    runner = CliRunner()
    direct = run(runner, "ask", doc, "What is the pass key?", *fast)
    spilled = run(runner, "ask", doc, "What is the pass key?", "--max-memory", "300K", *fast)
    assert_ok(direct)
    assert_ok(spilled)
    assert "temporary file" in spilled.output and "temporary file" not in direct.output
    answer = [line for line in direct.output.splitlines() if "question prefill" in line]
    assert answer and direct.output.split("question prefill")[0].splitlines()[-1] == \
        spilled.output.split("question prefill")[0].splitlines()[-1]
    import lmqa.model.loading

    assert not any((lmqa.model.loading.CACHE_DIR / "spill").iterdir())


def test_second_ingest_to_the_same_output_is_refused(loaded, document, tmp_path):
    """While one ingest writes the partial file, another is refused and
    leaves that file alone."""
    out = tmp_path / "ctx.lmqa"
    session = fresh(loaded, document)
    body = context_file.document_bytes(session)
    meta = context_file.metadata(session, len(session.token_ids), body, context_file.piece_blocks(session.engine, PIECE))
    first = ContextWriter(partial_path(out), meta, session.token_ids, body)
    try:
        with pytest.raises(context_file.ContextBusy, match="another lmqa process"):
            ingest_file(fresh(loaded, document), out, piece_bytes=PIECE)
        assert partial_path(out).exists() and not out.exists()
    finally:
        first.close()
