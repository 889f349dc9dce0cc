"""`lmqa chat`: the REPL's commands in-process, and a real terminal session
driven by pexpect (20 questions with flat memory, Ctrl-C, Ctrl-D)."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from rich.console import Console

from lmqa.qa.chat import PROMPT, Chat, ChatConfig, PlainLineReader, SigintPipe
from lmqa.qa.context_file import load
from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.engine.generation import SamplingConfig
from lmqa.ingest import ingest
from lmqa.model.loading import load_model
from lmqa.qa.session import DocumentSession

ROOT = Path(__file__).resolve().parent.parent
TEXT = "".join(f"Line {i}: the sky is blue. " + ("The pass key is 4711. " if i == 5 else "") for i in range(16))


@pytest.fixture(scope="module")
def doc_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat-doc") / "doc.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", block_size=8, top_k=2, log=lambda m: None)


@pytest.fixture
def session(loaded, doc_path):
    s = DocumentSession(loaded, LandmarkEngine(loaded.model, loaded.landmark), ingest(doc_path))
    s.ingest()
    return s


@pytest.fixture
def default_sigint():
    """Python's default SIGINT handler for the test, restored after: a run
    started with SIGINT ignored (a background job of a non-interactive shell,
    nohup) has none, as Python installs it only over the default disposition."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def chat_run(session, lines, max_new_tokens=4, keep=False):
    """Run the REPL over scripted lines; returns (chat, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    chat = Chat(session, ChatConfig(SamplingConfig(max_new_tokens=max_new_tokens), keep=keep),
                Console(file=out, width=200), Console(file=err, width=200))
    feed = iter(lines)

    def read_line(prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    chat.run(read_line)
    return chat, out.getvalue(), err.getvalue()


# ----- commands, in-process -----
def test_questions_roll_back_to_the_document(session):
    mark = session.engine.snapshot()
    chat, out, err = chat_run(session, ["What is the pass key?", "What colour is the sky?"])
    assert err.count("first token after") == 2
    assert session.engine.n_blocks == mark.n_blocks and session.engine.n_tokens == mark.n_tokens
    assert chat.last is not None and chat.last.question == "What colour is the sky?"


def test_commands(session, tmp_path):
    lines = ["/blocks", "What is the pass key?", "/blocks 2", f"/trace {tmp_path}/t.json", f"/plot {tmp_path}/p.png",
             "/topk 1", "Again?", "/keep on", "First turn.", "/keep maybe", "/reset", f"/save {tmp_path}/ctx",
             "/nope", "/trace", f"/trace {tmp_path}/missing/t.json", "/topk x", "/help", "/exit", "never read"]
    chat, out, err = chat_run(session, lines)
    assert "no answer yet" in err
    assert "retrieved blocks per layer" in out
    trace = json.loads((tmp_path / "t.json").read_text())
    assert trace["question"] == "What is the pass key?" and trace["steps"]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert chat.last.question == "First turn."
    assert all(step.block_ids.shape[-1] == 1 for step in chat.last.steps)  # /topk 1 took effect
    assert "/keep on|off (now on)" in err
    assert "unknown command /nope" in err and "/trace needs a file name" in err
    assert "does not exist" in err and "needs a whole number" in err and "/topk N" in out
    assert session.engine.n_tokens == session.document_mark.n_tokens  # /reset dropped the kept turn
    assert load(tmp_path / "ctx.lmqa", session.loaded).engine.n_blocks == session.engine.n_blocks
    assert chat.last.question != "never read"  # /exit left


def test_kept_conversation_grows_and_reset_restores(session):
    before = session.engine.n_tokens
    chat_run(session, ["/keep on", "One.", "Two."])
    assert session.engine.n_tokens > before
    chat_run(session, ["/reset"])
    assert session.engine.n_tokens == before


def test_ctrl_c_stops_the_answer_and_keeps_the_session(session):
    """KeyboardInterrupt while tokens stream (what Ctrl-C raises): the answer
    stops, the engine is back at the document, the next answer is unharmed."""
    greedy = SamplingConfig(max_new_tokens=6)
    want = session.ask("What is the pass key?", greedy)
    mark = session.engine.snapshot()
    class InterruptOnThirdWrite(io.StringIO):
        writes = 0

        def write(self, text):
            self.writes += 1
            if self.writes == 3:
                raise KeyboardInterrupt
            return super().write(text)

    err = io.StringIO()
    chat = Chat(session, ChatConfig(greedy), Console(file=InterruptOnThirdWrite()), Console(file=err))
    chat.ask("What is the pass key?")
    assert "stopped" in err.getvalue() and chat.last is None
    assert session.engine.n_blocks == mark.n_blocks and session.engine.n_tokens == mark.n_tokens
    assert len(session.engine.trace.steps) == mark.n_steps
    assert session.ask("What is the pass key?", greedy).token_ids == want.token_ids


def test_real_sigint_while_streaming_stops_the_answer(session, default_sigint):
    """A real SIGINT (what the terminal sends on Ctrl-C) during an answer: the
    answer stops, the REPL goes on to the next line, the engine is back at the
    document and Python's default handler is back once the REPL ends."""
    mark = session.engine.snapshot()

    class SigintOnFirstWrite(io.StringIO):
        writes = 0

        def write(self, text):
            self.writes += 1
            if self.writes == 1:
                os.kill(os.getpid(), signal.SIGINT)  # delivered to this thread before kill() returns
            return super().write(text)

    err = io.StringIO()
    chat = Chat(session, ChatConfig(SamplingConfig(max_new_tokens=8)), Console(file=SigintOnFirstWrite()),
                Console(file=err))
    lines = iter(["What is the pass key?", "/blocks"])

    def read_line(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    chat.run(read_line)
    assert "stopped; the session is as it was" in err.getvalue() and chat.last is None
    assert "no answer yet" in err.getvalue()  # the next line was read and run
    assert session.engine.n_tokens == mark.n_tokens and len(session.engine.trace.steps) == mark.n_steps
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_plain_reader_never_loses_a_ctrl_c(default_sigint):
    """The race behind issue 14: a SIGINT that lands before the read begins.
    input() would block in read() until the next Enter (and then drop the
    line); the plain reader raises KeyboardInterrupt at once, even with input
    waiting, and the input is still there for the next read."""
    pipe = SigintPipe()
    r, w = os.pipe()
    os.write(w, "first\nsecond\npartial é".encode())
    reader = PlainLineReader(r, io.StringIO(), pipe)
    assert pipe.arm()
    try:
        assert reader(PROMPT) == "first"
        os.kill(os.getpid(), signal.SIGINT)  # does not raise here: armed
        with pytest.raises(KeyboardInterrupt):
            reader(PROMPT)
        assert reader(PROMPT) == "second"
        os.close(w)
        assert reader(PROMPT) == "partial é"  # a last line without newline
        with pytest.raises(EOFError):
            reader(PROMPT)
    finally:
        pipe.disarm()
        os.close(r)
    assert reader.out.getvalue() == PROMPT * 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ----- a real terminal -----
def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_terminal_session_30_questions_flat_memory(tiny_model_dir, doc_path):
    """The prompt is the readiness marker: the REPL arms its SIGINT pipe before
    writing it, so a Ctrl-C sent once the prompt is seen cannot be lost (see
    test_plain_reader_never_loses_a_ctrl_c), and no step waits on time."""
    pexpect = pytest.importorskip("pexpect")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TERM": "dumb", "PYTHONPATH": path, "COLUMNS": "200"}
    child = pexpect.spawn(sys.executable, ["-m", "lmqa", "chat", str(doc_path), "--model", str(tiny_model_dir),
                                           "--device", "cpu", "--block-size", "8", "--max-new-tokens", "6"],
                          env=env, encoding="utf-8", timeout=120, dimensions=(50, 200))
    try:
        child.expect_exact(PROMPT)
        for _ in range(3):
            child.sendintr()  # Ctrl-C at the prompt: a fresh prompt, not an exit
            child.expect_exact(PROMPT)
        rss = []
        for i in range(30):  # the soak: memory must not grow with the questions asked (each reads ~100 candidates)
            child.sendline(f"Question {i}: what is the pass key?")
            child.expect(r"first token after [\d.]+ s, \d+ tokens")
            child.expect_exact(PROMPT)
            rss.append(rss_kib(child.pid))
        first, last = rss[0], rss[-1]
        print(f"chat RSS after question 1: {first / 1024:.1f} MiB, after question 30: {last / 1024:.1f} MiB")
        assert last - first < min(16 * 1024, 0.05 * first), rss
        child.sendeof()  # Ctrl-D leaves
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
