"""`lmqa serve`'s reader page (lmqa/serve/static/, lmqa/serve/web.py) in a real
browser: headless Chromium from the system's packages (Debian's `chromium`;
.ci/run installs it), driven by Playwright's Python package, against the
real uvicorn server on 127.0.0.1 with a tiny random model.

It asks a question on a small document and sees the streamed answer (equal
to DocumentSession.ask's), an evidence passage with its quoted span
highlighted, a heatmap with one row per layer whose cells name their
file:line, and the document view opened at the passage; the conversation
stays per context. A document full of HTML and script injections (and a
file name that is one) shows as text and runs nothing: the test listens for
dialogs, console errors and page errors. A server with --api-key shows a
clear message and a key field. Skipped, with the reason, when Playwright or
Chromium is missing."""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from lmqa.engine.generation import SamplingConfig
from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.ingest import ingest
from lmqa.model.loading import load_model
from lmqa.qa.context_file import load, save
from lmqa.qa.session import DocumentSession
from lmqa.qa.trace_export import result
from lmqa.serve.app import ServeOptions, build_app
from lmqa.serve.web import CSP
from test_serve import Served

KEY = "page-key"
QUESTION = "What is the pass key?"
SAMPLING = SamplingConfig(max_new_tokens=12, candidates=2)
TEXT = "".join(f"Line {i}: the sky is blue, the grass is green.\n" + ("The pass key is 4711. Remember it.\n" if i == 5 else "")
               for i in range(14)) + "The end.\n"
EVIL_NAME = "<img src=x onerror=alert('name')>.txt"  # a file name is document text too
INJECTIONS = [
    "<script>alert('script')</script>",
    "<img src=x onerror=\"alert('img')\">",
    "<a href=\"javascript:alert('link')\">click here</a>",
    "<svg onload=alert('svg')><circle r=5></svg>",
    "<iframe src=\"javascript:alert('frame')\"></iframe>",
    "\"><script>alert(document.domain)</script>",
    "<body onload=alert('body')><style>*{display:none}</style>",
    "javascript:alert('bare')",
]
EVIL = "".join(f"The pass key is 4711. {line}\nThe sky is blue. {line}\n" for line in INJECTIONS)
EVIL_MODEL = "evil<script>alert('model')</script>"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
TIMEOUT_MS = 30_000


def chromium_path() -> str | None:
    for candidate in (os.environ.get("LMQA_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed "
                                                                 "(pip install -e '.[test]')")
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium; .ci/run installs it)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, timeout=60_000)
        yield browser
        browser.close()


class Watched:
    """A fresh page (its own session storage) that records dialogs, console
    errors and uncaught page errors; dialogs are dismissed so none blocks."""

    def __init__(self, browser):
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.dialogs, self.console_errors, self.page_errors = [], [], []
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))

    def assert_quiet(self) -> None:
        assert self.dialogs == [], f"a script ran: {self.dialogs}"
        assert self.page_errors == [], self.page_errors
        assert self.console_errors == [], self.console_errors

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def watched(browser):
    w = Watched(browser)
    yield w
    w.close()


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", block_size=8, log=lambda m: None)


def saved_context(loaded, directory: Path, name: str, text: str) -> Path:
    (directory / name).write_text(text)
    session = DocumentSession(loaded, LandmarkEngine(loaded.model, loaded.landmark), ingest(directory / name))
    session.ingest()
    save(session, directory / "context.lmqa")
    return directory / "context.lmqa"


@pytest.fixture(scope="module")
def contexts(loaded, tmp_path_factory) -> dict[str, Path]:
    return {"book": saved_context(loaded, tmp_path_factory.mktemp("book"), "book.txt", TEXT),
            EVIL_MODEL: saved_context(loaded, tmp_path_factory.mktemp("evil"), EVIL_NAME, EVIL)}


@pytest.fixture(scope="module")
def expected(loaded, contexts) -> dict:
    session = load(contexts["book"], loaded)
    return result(session, session.ask(QUESTION, SAMPLING), 0)


class Paced:
    """A session whose answer tokens leave 30 ms apart, so the stream reaches
    the page in several reads however fast the tiny model is."""

    def __init__(self, session: DocumentSession):
        self._session = session

    def __getattr__(self, name):
        return getattr(self._session, name)

    def ask(self, question, sampling, on_token=None, keep=False):
        def paced(token: int) -> None:
            time.sleep(0.03)
            if on_token is not None:
                on_token(token)

        return self._session.ask(question, sampling, on_token=paced, keep=keep)


@pytest.fixture(scope="module")
def server(loaded, contexts):
    app = build_app({name: Paced(load(path, loaded)) for name, path in contexts.items()},
                    ServeOptions(SAMPLING, warmup=False))
    with Served(app) as served:
        yield served


@pytest.fixture(scope="module")
def keyed_server(loaded, contexts):
    app = build_app({"book": load(contexts["book"], loaded)}, ServeOptions(SAMPLING, api_key=KEY, warmup=False))
    with Served(app) as served:
        yield served


def ask_in_page(page, model: str, question: str) -> str:
    """Pick the context, ask, wait for the streamed answer to end; returns
    the answer's id. Records every text the answer showed while streaming."""
    page.select_option("#context", value=model)
    page.evaluate("""() => {
        window.__shown = [];
        new MutationObserver(() => {
            const node = document.querySelector('#turns .streaming .answer');
            if (node && node.textContent) window.__shown.push(node.textContent);
        }).observe(document.getElementById('turns'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#question", question)
    page.press("#question", "Enter")
    turn = page.locator("#turns .turn.shown")
    turn.wait_for()
    page.locator("#evidence .passage").first.wait_for()
    return turn.get_attribute("data-id")


def blocks_of(server, answer_id: str, key: str | None = None) -> dict:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    res = httpx.get(f"{server.url}/v1/answers/{answer_id}/blocks", headers=headers, timeout=30)
    assert res.status_code == 200, res.text
    return res.json()


def hover_block(page, blocks: dict) -> tuple[int, int, dict]:
    """Move the mouse over a document block that layer 0 retrieved; returns (layer, block, source)."""
    layer = 0
    block = max((b for b, _ in blocks["retrievals"][layer] if str(b) in blocks["sources"]),
                key=lambda b: dict(blocks["retrievals"][layer])[b])
    canvas = page.locator("#heatmap-canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    per_column = int(canvas.get_attribute("data-per-column"))
    columns = math.ceil(blocks["blocks"] / per_column)
    cell, row = box["width"] / columns, box["height"] / blocks["layers"]
    page.mouse.move(box["x"] + (block // per_column + 0.5) * cell, box["y"] + (layer + 0.5) * row)
    return layer, block, blocks["sources"][str(block)]


# ----- the page in a browser -----
def test_ask_shows_streamed_answer_evidence_heatmap_and_document(server, watched, expected):
    page = watched.page
    started = time.monotonic()
    page.goto(server.url + "/")
    assert page.title() == "lmqa"
    answer_id = ask_in_page(page, "book", QUESTION)
    answer = expected["answer"]
    assert answer and page.locator("#turns .turn.shown .answer").text_content() == answer
    shown = page.evaluate("window.__shown")
    assert len(set(shown)) > 1 and shown[-1] == answer and all(answer.startswith(s) for s in shown), shown  # streamed

    # evidence: one entry per passage, file:line, the quoted span highlighted, the attention share
    passages = page.locator("#evidence .passage")
    assert passages.count() == len(expected["evidence"]) > 0
    first = expected["evidence"][0]
    lines = str(first["start_line"]) if first["start_line"] == first["end_line"] else f"{first['start_line']}-{first['end_line']}"
    head = passages.first.locator(".passage-head")
    assert head.locator(".location").text_content() == f"book.txt:{lines}"
    assert f"{100 * first['share']:.1f}% of the answer's attention" in head.text_content()
    assert passages.first.locator(".passage-text").text_content() == first["text"]
    if first["quoted"]:
        marked = " ".join(passages.first.locator("mark").all_text_contents())
        assert marked and " ".join(marked.split()) in " ".join(answer.split())
        assert "quoted by the answer" in head.text_content()

    # the heatmap: one row per layer; hovering a retrieved cell names its block's file:line
    layers = 2  # the tiny model's
    assert page.locator("#heatmap-labels .layer").count() == layers
    assert page.locator("#heatmap-canvas").get_attribute("data-layers") == str(layers)
    blocks = blocks_of(server, answer_id)
    assert blocks["layers"] == layers and len(blocks["retrievals"]) == layers and all(blocks["retrievals"])
    layer, block, source = hover_block(page, blocks)
    tip = page.locator("#heatmap-tip")
    tip.wait_for()
    assert source["location"] in tip.text_content() and f"layer {layer}, block {block}" in tip.text_content()

    # the document view opens at the passage
    passages.first.locator("button.open").click()
    view = page.locator("#document-text")
    view.wait_for()
    inside = view.locator(".line.in-passage")
    assert inside.count() >= 1
    assert inside.first.locator(".ln").text_content() == str(first["start_line"])
    page.wait_for_function("() => { const b = document.getElementById('document-text').getBoundingClientRect();"
                           " const l = document.querySelector('.line.in-passage').getBoundingClientRect();"
                           " return l.top >= b.top && l.bottom <= b.bottom; }")
    passage_lines = " ".join(inside.locator(".text").all_text_contents())
    assert " ".join(first["text"].split()) in " ".join(passage_lines.split())
    if first["quoted"]:
        assert view.locator("mark").count() >= 1

    # the conversation stays per context (this tab's session storage), as `lmqa chat` keeps a session's turns
    page.reload()
    page.locator("#turns .turn").first.wait_for()
    assert page.locator("#turns .turn .question").all_text_contents() == [QUESTION]
    page.select_option("#context", value=EVIL_MODEL)
    assert page.locator("#turns .turn").count() == 0
    page.select_option("#context", value="book")
    assert page.locator("#turns .turn .answer").all_text_contents() == [answer]
    watched.assert_quiet()
    assert time.monotonic() - started < 60


def test_injected_document_shows_as_text_and_runs_nothing(server, watched):
    page = watched.page
    page.goto(server.url + "/")
    evil = page.locator("#context option", has_text="evil<script>")
    evil.wait_for(state="attached")  # the page lists the contexts once /v1/models has answered
    assert evil.count() == 1
    answer_id = ask_in_page(page, EVIL_MODEL, "What is the pass key?")
    evidence = page.locator("#evidence .passage")
    assert EVIL_NAME in evidence.first.locator(".location").text_content()
    shown = " ".join(evidence.locator(".passage-text").all_text_contents())
    assert re.search(r"<(script|img|svg|iframe|a|body)\b", shown), shown  # markup, shown as text

    blocks = blocks_of(server, answer_id)
    hover_block(page, blocks)
    page.locator("#heatmap-tip").wait_for()
    assert EVIL_NAME in page.locator("#heatmap-tip").text_content()

    evidence.first.locator("button.open").click()
    view = page.locator("#document-text")
    view.wait_for()
    page.locator("#document-earlier, #document-later").first.wait_for(state="attached")
    text = "\n".join(view.locator(".line .text").all_text_contents())
    for line in INJECTIONS:  # every injection shows literally
        assert line in text, line
    assert page.locator("#document-title").text_content() == EVIL_NAME
    page.mouse.move(5, 5)
    page.wait_for_timeout(300)  # give any injected handler (onload, onerror) the chance to fire, and fail
    # nothing of the document became markup: no element the injections would make, no handler, no script link
    assert page.evaluate("""() => ({
        scripts: [...document.scripts].map(s => s.getAttribute('src')),
        made: document.querySelectorAll('img, iframe, svg, a, body style, object, embed').length,
        handlers: [...document.querySelectorAll('*')].filter(e => [...e.attributes].some(a => a.name.startsWith('on'))).length,
        scriptLinks: [...document.querySelectorAll('[href], [src]')].filter(e => /^\\s*javascript:/i.test(e.getAttribute('href') || e.getAttribute('src') || '')).length,
    })""") == {"scripts": ["/static/app.js"], "made": 0, "handlers": 0, "scriptLinks": 0}
    watched.assert_quiet()


def test_api_key_page_asks_for_the_key(keyed_server, watched):
    page = watched.page
    page.goto(keyed_server.url + "/")
    panel = page.locator("#key-panel")
    panel.wait_for()
    assert "asks for an API key" in panel.text_content() and "--api-key" in panel.text_content()
    assert page.locator("#main").is_hidden()
    page.fill("#key", "wrong")
    page.click("#key-form button[type=submit]")
    page.locator("#key-message", has_text="refused").wait_for()
    page.fill("#key", KEY)
    page.click("#key-form button[type=submit]")
    page.locator("#context option[value=book]").wait_for(state="attached")
    assert page.locator("#main").is_visible() and panel.is_hidden()
    assert page.evaluate("sessionStorage.getItem('lmqa-api-key')") == KEY
    page.reload()  # the key stays for this tab
    page.locator("#context option[value=book]").wait_for(state="attached")
    assert panel.is_hidden()
    assert watched.dialogs == [] and watched.page_errors == []


# ----- the page's files and JSON, without a browser -----
def test_page_is_served_with_a_content_security_policy(server):
    res = httpx.get(server.url + "/")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/html")
    policy = res.headers["content-security-policy"]
    assert policy == CSP and "default-src 'self'" in policy and "script-src 'self'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    html = res.text
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script"
    assert not re.search(r"\son[a-z]+\s*=", html), "inline event handler"
    assert not re.search(r"https?://", html), "the page loads nothing from elsewhere"
    for name in ("app.js", "style.css", "favicon.svg"):
        res = httpx.get(f"{server.url}/static/{name}")
        assert res.status_code == 200 and res.headers["content-security-policy"] == CSP
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", res.text), name
    script = httpx.get(f"{server.url}/static/app.js").text
    assert not re.search(r"\.(inner|outer)HTML\b|insertAdjacentHTML|document\.write|\beval\(|new Function", script)
    assert httpx.get(f"{server.url}/static/..%2Fapp.py").status_code == 404
    assert httpx.get(f"{server.url}/static/nothing.js").json()["error"]["code"] == "not_found"


def test_answer_and_document_endpoints(server, expected):
    reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                       json={"model": "book", "messages": [{"role": "user", "content": QUESTION}]}).json()
    answer = httpx.get(f"{server.url}/v1/answers/{reply['id']}").json()
    assert answer["answer"] == expected["answer"] and answer["question"] == QUESTION and answer["model"] == "book"
    for mine, theirs in zip(answer["evidence"], expected["evidence"], strict=True):
        assert {k: mine[k] for k in theirs} == theirs  # ask --json's passage, and where it is
        assert TEXT[mine["char_start"]:mine["char_end"]] == mine["text"]
        for start, end in mine["spans"]:
            assert 0 <= start < end <= len(mine["text"])
    if expected["evidence"][0]["quoted"]:
        (start, end), = answer["quotes"]
        assert " ".join(TEXT[start:end].split()) == " ".join(expected["answer"].split())
        assert answer["evidence"][0]["spans"]

    by_chars = httpx.get(f"{server.url}/v1/document", params={"model": "book", "start": 60, "end": 70}).json()
    assert by_chars["chars"] == len(TEXT) and by_chars["start"] == TEXT.index("Line 1:")  # widened to whole lines
    assert [line["text"] for line in by_chars["lines"]] == ["Line 1: the sky is blue, the grass is green."]
    assert by_chars["lines"][0]["file"] == "book.txt" and by_chars["lines"][0]["line"] == 2
    by_line = httpx.get(f"{server.url}/v1/document",
                        params={"model": "book", "file": "book.txt", "line": 7, "lines": 2}).json()
    assert [(line["line"], line["text"]) for line in by_line["lines"]] == [
        (7, "The pass key is 4711. Remember it."), (8, "Line 6: the sky is blue, the grass is green.")]
    whole = httpx.get(f"{server.url}/v1/document", params={"model": "book", "start": 0, "end": len(TEXT)}).json()
    assert "\n".join(line["text"] for line in whole["lines"]) + "\n" == TEXT

    for params, status, code in [({"model": "nope"}, 404, "model_not_found"),
                                 ({"model": "book", "start": "x"}, 400, "invalid_request"),
                                 ({"model": "book", "file": "other.txt"}, 404, "file_not_found")]:
        res = httpx.get(f"{server.url}/v1/document", params=params)
        assert res.status_code == status and res.json()["error"]["code"] == code
    res = httpx.get(f"{server.url}/v1/answers/chatcmpl-none")
    assert res.status_code == 404 and res.json()["error"]["code"] == "answer_not_found"


def test_json_endpoints_need_the_key(keyed_server):
    for path in ("/v1/answers/x", "/v1/answers/x/blocks", "/v1/document?model=book"):
        res = httpx.get(keyed_server.url + path)
        assert res.status_code == 401 and res.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(keyed_server.url + "/").status_code == 200  # the page itself asks for the key
    res = httpx.get(keyed_server.url + "/v1/document", params={"model": "book", "start": 0, "end": 10},
                    headers={"authorization": f"Bearer {KEY}"})
    assert res.status_code == 200 and res.json()["lines"]


def test_refused_question_shows_the_servers_message(server, watched):
    """A question the server refuses (400) is marked as not answered, with the
    server's reason, and the page goes on answering."""
    from lmqa.qa.questions import MAX_QUESTION_CHARS

    page = watched.page
    page.goto(server.url + "/")
    page.select_option("#context", value="book")
    page.fill("#question", "x" * (MAX_QUESTION_CHARS + 1))
    page.press("#question", "Enter")
    failed = page.locator("#turns .turn.failed")
    failed.wait_for()
    assert "not answered:" in failed.locator(".meta").text_content()
    assert page.locator("#status.error").is_visible() and page.locator("#ask").is_enabled()
    assert watched.dialogs == [] and watched.page_errors == []
