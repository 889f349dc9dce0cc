"""`lmqa serve` (lmqa/serve/) against the official openai client, on a tiny
random model: the real uvicorn server on 127.0.0.1, plain and streamed
answers equal to DocumentSession.ask's with their evidence, 20 concurrent
clients, every refusal as an OpenAI-style 4xx after which the server still
answers, and SIGINT/SIGTERM to a `lmqa serve` process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import uvicorn
from openai import OpenAI

from lmqa.engine.generation import SamplingConfig
from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.ingest import ingest
from lmqa.model.loading import load_model
from lmqa.qa.context_file import load, save
from lmqa.qa.questions import MAX_QUESTION_CHARS
from lmqa.qa.session import DocumentSession
from lmqa.qa.trace_export import result
from lmqa.serve.app import ServeOptions, build_app

KEY = "test-key"
QUESTION = "What is the pass key?"
SAMPLING = SamplingConfig(max_new_tokens=6, candidates=2)
MAX_BYTES = 64 << 10  # a question over MAX_QUESTION_CHARS still fits: it is refused as a question, not as a body
TEXT = "".join(f"Line {i}: the sky is blue, the grass is green. " + ("The pass key is 4711. " if i == 5 else "")
               for i in range(12)) + "The end."
ROOT = Path(__file__).resolve().parent.parent


def wait_healthy(url: str, deadline_s: float = 120.0, process: subprocess.Popen | None = None) -> None:
    """Poll /health until it answers 200 (or the server process ends: fail)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if process is not None and process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode} before it was healthy")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)  # poll interval, not synchronisation: the loop waits for /health
    pytest.fail(f"{url}/health did not answer within {deadline_s:.0f} s")


class Served:
    """build_app's app on the real uvicorn server in a background thread, on a
    port the OS picked (the socket is bound before the thread starts)."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        wait_healthy(self.url)
        return self

    def __exit__(self, *_):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive(), "the server did not stop"

    def client(self, **kw) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60, **kw)

    def post(self, body: bytes | str, key: str | None = KEY) -> httpx.Response:
        headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
        return httpx.post(f"{self.url}/v1/chat/completions", content=body, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", block_size=8, log=lambda m: None)


@pytest.fixture(scope="module")
def context(loaded, tmp_path_factory) -> Path:
    """A saved context of TEXT, made with the tiny model."""
    directory = tmp_path_factory.mktemp("serve")
    (directory / "book.txt").write_text(TEXT)
    session = DocumentSession(loaded, LandmarkEngine(loaded.model, loaded.landmark), ingest(directory / "book.txt"))
    session.ingest()
    save(session, directory / "book.lmqa")
    return directory / "book.lmqa"


@pytest.fixture(scope="module")
def expected(loaded, context) -> dict:
    """`lmqa ask --json`'s result for QUESTION from a session of its own."""
    session = load(context, loaded)
    return result(session, session.ask(QUESTION, SAMPLING), 0)


@pytest.fixture(scope="module")
def short(loaded, context) -> str:
    """The answer when a request asks for one token (quick: most tests only
    need to see that the server still answers, and answers right)."""
    session = load(context, loaded)
    return session.ask(QUESTION, replace(SAMPLING, max_new_tokens=1)).text


@pytest.fixture(scope="module")
def served(loaded, context):
    lines: list[str] = []
    app = build_app({"book": load(context, loaded)},
                    ServeOptions(SAMPLING, api_key=KEY, max_queue=32, max_request_bytes=MAX_BYTES), log=lines.append)
    with Served(app) as server:
        server.lines = lines
        yield server


def ask(client: OpenAI, question: str = QUESTION, **kw):
    return client.chat.completions.create(model="book", messages=[{"role": "user", "content": question}], **kw)


# ----- answers -----
def test_models_and_health(served):
    assert [m.id for m in served.client().models.list()] == ["book"]
    health = httpx.get(f"{served.url}/health").json()
    assert health["status"] == "ok" and health["models"] == ["book"]


def test_answer_equals_ask_with_evidence(served, expected):
    served.lines.clear()
    reply = ask(served.client())
    assert reply.choices[0].message.content == expected["answer"]
    assert expected["answer"] and expected["evidence"]
    assert reply.evidence == expected["evidence"]  # file:line, text, share: what ask --json prints
    assert {"file", "start_line", "end_line", "text", "share"} <= set(reply.evidence[0])
    assert reply.usage.completion_tokens == expected["timings"]["answer_tokens"]
    timings = reply.timings
    assert 0 <= timings["queued_s"] and 0 < timings["first_token_s"] <= timings["total_s"]
    assert len(served.lines) == 1 and "first token after" in served.lines[0]


def test_stream_equals_ask_and_ends_with_evidence(served, expected):
    chunks = list(ask(served.client(), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == expected["answer"]
    assert sum(bool(c.choices[0].delta.content) for c in chunks) > 1  # streamed, not sent at once
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    assert last.evidence == expected["evidence"] and "total_s" in last.timings
    assert all(c.model_extra.get("evidence") is None for c in chunks[:-1])


def test_earlier_turns_are_not_questions(served, expected):
    """The last user message is the question, whatever came before it."""
    reply = served.client().chat.completions.create(model="book", messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "blue"}, {"role": "user", "content": [{"type": "text", "text": QUESTION}]}])
    assert reply.choices[0].message.content == expected["answer"]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_twenty_concurrent_clients_all_answered_memory_flat(served, short):
    """20 clients at once (the queue answers them one by one), three rounds:
    every answer equal, and the process's memory after the first round
    (threads, connections, allocator pools warmed) grows by under 32 MiB."""
    clients = [served.client() for _ in range(20)]

    def round_() -> list[str]:
        with ThreadPoolExecutor(20) as pool:
            return [r.choices[0].message.content for r in pool.map(lambda c: ask(c, max_tokens=1), clients)]

    assert round_() == [short] * 20
    before = rss_bytes()
    for _ in range(2):
        assert round_() == [short] * 20
    grown = rss_bytes() - before
    assert grown < 32 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 40 answers"
    assert httpx.get(f"{served.url}/health").json()["queued"] == 0


# ----- refusals -----
def message(question: str, model: str = "book") -> str:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": question}]})


BAD = [  # (what, body, key, status, code)
    ("no API key", message(QUESTION), None, 401, "invalid_api_key"),
    ("wrong API key", message(QUESTION), "wrong", 401, "invalid_api_key"),
    ("malformed JSON", '{"model": "book", "messages": [', KEY, 400, "invalid_json"),
    ("not a chat request", '{"model": "book"}', KEY, 400, "invalid_request"),
    ("a list, not an object", "[1, 2]", KEY, 400, "invalid_request"),
    ("unknown model", message(QUESTION, "nope"), KEY, 404, "model_not_found"),
    ("empty question", message("   "), KEY, 400, "invalid_question"),
    ("oversized question", message("x" * (MAX_QUESTION_CHARS + 1)), KEY, 400, "invalid_question"),
    ("no user message", '{"model": "book", "messages": [{"role": "system", "content": "hi"}]}', KEY, 400, "no_question"),
    ("body over the limit", message("x" * MAX_BYTES), KEY, 413, "request_too_large"),
]


@pytest.mark.parametrize("what,body,key,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_request_is_refused_and_the_server_still_answers(served, short, what, body, key, status, code):
    res = served.post(body, key)
    assert res.status_code == status, res.text
    error = res.json()["error"]
    assert error["code"] == code and error["type"] and error["message"]
    assert ask(served.client(), max_tokens=1).choices[0].message.content == short


def test_unknown_path_is_a_json_404(served):
    res = httpx.get(f"{served.url}/v1/nothing")
    assert res.status_code == 404 and res.json()["error"]["code"] == "not_found"


class Gated:
    """A session whose ask() waits until the test lets it go, so a question
    is certainly being answered while the next ones arrive."""

    def __init__(self, session: DocumentSession):
        self._session = session
        self.entered, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._session, name)

    def ask(self, *args, **kwargs):
        self.entered.set()
        assert self.release.wait(60)
        return self._session.ask(*args, **kwargs)


def test_full_queue_is_429_and_frees_when_answered(loaded, context, expected):
    gated = Gated(load(context, loaded))
    options = ServeOptions(SAMPLING, max_queue=1, warmup=False)
    with Served(build_app({"book": gated}, options)) as server, ThreadPoolExecutor(1) as pool:
        first = pool.submit(server.post, message(QUESTION), None)
        assert gated.entered.wait(60)
        refused = server.post(message(QUESTION), None)
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
        gated.release.set()
        assert first.result().json()["choices"][0]["message"]["content"] == expected["answer"]
        assert server.post(message(QUESTION), None).json()["choices"][0]["message"]["content"] == expected["answer"]


# ----- the command -----
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_signals() -> None:
    """In the child: SIGINT and SIGTERM as a shell's foreground job has them,
    whatever pytest's process was started with (a background job ignores SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_signal_stops_lmqa_serve_cleanly(context, tmp_path):
    """`lmqa serve` answers, then SIGINT (Ctrl-C) or SIGTERM shuts it down with
    exit code 0; both servers run at once to pay the start-up once."""
    runs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        port, log = free_port(), tmp_path / f"{sig.name}.log"
        cmd = [sys.executable, "-m", "lmqa", "serve", str(context), "--port", str(port), "--device", "cpu",
               "--max-new-tokens", "2", "--candidates", "1"]
        with open(log, "w") as out:
            process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=default_signals,
                                       env={**os.environ, "LMQA_API_KEY": ""})
        runs[sig] = (process, f"http://127.0.0.1:{port}", log)
    try:
        for sig, (process, url, log) in runs.items():
            wait_healthy(url, process=process)
            reply = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60).chat.completions.create(
                model="book", messages=[{"role": "user", "content": QUESTION}])
            assert reply.choices[0].message.content is not None
            process.send_signal(sig)
            assert process.wait(timeout=60) == 0, log.read_text()
            text = log.read_text()
            assert "Finished server process" in text and "Traceback" not in text, text
    finally:
        for process, _, _ in runs.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def test_environment_variables_set_options(tmp_path):
    """LMQA_* reach the shared options (--help names them), and serve refuses
    two contexts that would share a name before loading anything."""
    from test_cli import assert_clean_error, run
    from typer.testing import CliRunner

    runner = CliRunner()
    assert "LMQA_TOP_K" in run(runner, "ask", "--help", env={"COLUMNS": "200"}).output
    assert_clean_error(run(runner, "ask", tmp_path / "doc.txt", "q?", env={"LMQA_PREFILL": "sideways"}),
                       "--prefill must be layer or serial, not 'sideways'")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "book.lmqa").write_bytes(b"")
    assert_clean_error(run(runner, "serve", tmp_path / "a" / "book.lmqa", tmp_path / "b" / "book.lmqa"),
                       "both be served as 'book'")
