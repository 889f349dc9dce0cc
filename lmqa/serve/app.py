"""The HTTP app over sessions loaded once: OpenAI's GET /v1/models and POST
/v1/chat/completions (plain and streamed as server-sent events), GET /health,
and the reader's page at `/` with the JSON it reads (web.py). `model` names
the context; the last user message is the question, answered by the same
DocumentSession.ask and described by the same result() as `lmqa ask --json`,
so an answer here equals the command's with the same options. Every refusal
is an OpenAI-style JSON error and leaves the server serving."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lmqa import __version__
from lmqa.engine.generation import SamplingConfig, StreamDecoder
from lmqa.qa.questions import question_problem
from lmqa.qa.session import DocumentSession
from lmqa.qa.trace_export import result
from .protocol import ApiError, ChatRequest, Completion, usage
from .web import AnswerStore, add_web_routes, answer_details
from .worker import AnswerQueue, Job, QueueFull


@dataclass(frozen=True)
class ServeOptions:
    """sampling: the defaults, as `lmqa ask` takes them; a request may set
    temperature, top_p and seed, and ask for fewer tokens than
    sampling.max_new_tokens, never more."""

    sampling: SamplingConfig
    api_key: str | None = None
    max_queue: int = 32  # questions waiting or being answered; more get 429
    max_request_bytes: int = 1 << 20
    warmup: bool = True  # answer one short question per context before serving (kernels, CUDA graphs)


class _AnswerText:
    """Stream increments whose concatenation is the answer's text: `ask`
    strips the decoded answer, so leading whitespace is dropped and trailing
    whitespace held back until text follows it."""

    def __init__(self, tokenizer):
        self._decoder = StreamDecoder(tokenizer)
        self._held = ""
        self._started = False

    def push(self, token: int) -> str:
        text = self._held + self._decoder.push(token)
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        body = text.rstrip()
        self._held = text[len(body):]
        return body


def _sampling(request: ChatRequest, defaults: SamplingConfig) -> SamplingConfig:
    asked = request.max_completion_tokens or request.max_tokens or defaults.max_new_tokens
    return replace(defaults, max_new_tokens=min(asked, defaults.max_new_tokens),
                   temperature=defaults.temperature if request.temperature is None else request.temperature,
                   top_p=defaults.top_p if request.top_p is None else request.top_p,
                   seed=defaults.seed if request.seed is None else request.seed)


def _answer(session: DocumentSession, question: str, sampling: SamplingConfig, job: Job,
            on_token: Callable[[int], None] | None = None) -> dict[str, Any]:
    """On the answer thread: `lmqa ask --json`'s result, stopped between
    tokens when the job is cancelled."""

    def token(t: int) -> None:
        job.check()
        if on_token is not None:
            on_token(t)

    answer = session.ask(question, sampling, on_token=token)
    out = result(session, answer, 0)
    out["web"] = answer_details(session, answer, out["evidence"])  # kept by id for /v1/answers (web.py)
    return out


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def build_app(contexts: Mapping[str, DocumentSession], options: ServeOptions,
              log: Callable[[str], None] | None = None) -> FastAPI:
    """The app; log (if given) gets one line of timings per answer."""
    queue = AnswerQueue(options.max_queue)
    answers = AnswerStore()
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if options.warmup:
            warm = replace(options.sampling, max_new_tokens=2)
            for session in contexts.values():
                await submit(lambda job, s=session: _answer(s, "?", warm, job))[1]
        yield
        queue.close()

    app = FastAPI(title="lmqa", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):  # unknown path, wrong method
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return JSONResponse(ApiError(e.status_code, str(e.detail), code).body(), status_code=e.status_code,
                            headers=e.headers)

    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception):
        return JSONResponse(ApiError(500, f"the answer failed: {e}", "server_error", "server_error").body(),
                            status_code=500)

    def authorize(request: Request) -> None:
        if options.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), options.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           "invalid_api_key", "authentication_error")

    async def read_body(request: Request) -> bytes:
        too_large = ApiError(413, f"the request is over {options.max_request_bytes:,} bytes", "request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > options.max_request_bytes:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > options.max_request_bytes:
                raise too_large
        return bytes(body)

    def submit(fn):
        try:
            return queue.submit(fn)
        except QueueFull:
            raise ApiError(429, f"{queue.limit} questions are already waiting or being answered: try again later",
                           "queue_full", "rate_limit_error") from None

    def finish(name: str, sampling: SamplingConfig, job: Job, out: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """finish_reason and the response's extra fields (evidence, timings); logs the timings."""
        timings = {**out["timings"], "queued_s": job.queued_s, "total_s": time.perf_counter() - job.submitted}
        if log is not None:
            log(f"{name}: {timings['question_tokens']} question tokens, queued {job.queued_s:.2f} s, first token "
                f"after {job.queued_s + timings['first_token_s']:.2f} s, {timings['answer_tokens']} tokens, "
                f"total {timings['total_s']:.2f} s")
        reason = "length" if timings["answer_tokens"] >= sampling.max_new_tokens else "stop"
        return reason, {"evidence": out["evidence"], "timings": timings}

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(contexts), "queued": queue.active, "max_queue": queue.limit}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": started, "owned_by": "lmqa",
                                            "document": s.document.source, "tokens": s.engine.n_tokens}
                                           for name, s in contexts.items()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req = ChatRequest.parse(await read_body(request))
        session = contexts.get(req.model)
        if session is None:
            raise ApiError(404, f"unknown model {req.model!r}: this server answers about {', '.join(contexts)}",
                           "model_not_found")
        question = req.question()
        problem = question_problem(question)
        if problem:
            raise ApiError(400, problem, "invalid_question")
        sampling = _sampling(req, options.sampling)
        completion = Completion(req.model)
        if req.stream:
            return StreamingResponse(stream(session, question, sampling, completion), media_type="text/event-stream")
        job, future = submit(lambda job: _answer(session, question, sampling, job))
        try:
            out = await future
        except asyncio.CancelledError:  # the server stops before the answer is done
            job.cancel.set()
            raise
        reason, extra = finish(req.model, sampling, job, out)
        answers.keep(completion.id, req.model, out)
        t = out["timings"]
        return completion.response(out["answer"], reason, usage(t["question_tokens"], t["answer_tokens"]), extra)

    def stream(session: DocumentSession, question: str, sampling: SamplingConfig, completion: Completion):
        """Queues the answer now (a full queue is a 429, not a broken stream)
        and returns the events: the role, the answer's text as it is
        generated, a last chunk with finish_reason, usage, evidence and
        timings, and [DONE]."""
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int | None] = asyncio.Queue()

        job, future = submit(lambda job: _answer(session, question, sampling, job,
                                                 lambda t: loop.call_soon_threadsafe(tokens.put_nowait, t)))
        # None ends the tokens however the answer ends (done, failed, or dropped
        # unstarted at shutdown); the loop runs it after the tokens sent before.
        future.add_done_callback(lambda _: tokens.put_nowait(None))

        async def events():
            text = _AnswerText(session.loaded.tokenizer)
            try:
                yield _sse(completion.chunk({"role": "assistant", "content": ""}))
                while (token := await tokens.get()) is not None:
                    piece = text.push(token)
                    if piece:
                        yield _sse(completion.chunk({"content": piece}))
                try:
                    out = await future
                except Exception as e:  # the stream has begun: the error is its last event
                    yield _sse(ApiError(500, f"the answer failed: {e}", "server_error", "server_error").body())
                    return
                reason, extra = finish(completion.model, sampling, job, out)
                answers.keep(completion.id, completion.model, out)
                t = out["timings"]
                yield _sse(completion.chunk({}, reason, usage=usage(t["question_tokens"], t["answer_tokens"]), **extra))
                yield "data: [DONE]\n\n"
            finally:  # the client went away or the server stops: the answer stops at its next token
                job.cancel.set()

        return events()

    add_web_routes(app, contexts, answers, authorize)
    return app
