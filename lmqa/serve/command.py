"""`lmqa serve CTX.lmqa|DOC ...`: load the model and every context once, then
answer over HTTP until Ctrl-C or SIGTERM. Contexts are opened and documents
read by the same functions as `lmqa ask` (lmqa/sessions.py); register()
adds the command to the app, so this module never imports cli.py. FastAPI
and uvicorn are imported only here, so the other commands do not pay for them."""

from __future__ import annotations

import functools
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape

from lmqa.flags import (BlockOpt, BoilerplateOpt, CandidatesOpt, DeviceOpt, ExcludeOpt, IncludeOpt, KvDtypeOpt, MaxGpuOpt,
                        MaxMemoryOpt, ModelOpt, OffloadOpt, PrefillOpt, QuantOpt, QuoteOpt, SeedOpt, TopKOpt,
                        answer_options, session_options)
from lmqa.options import AnswerOptions, SessionOptions
from lmqa.sessions import load_model, open_session
from lmqa.terminal import UserError, err, friendly

if TYPE_CHECKING:
    from .app import ServeOptions

GRACE_S = 5  # at shutdown, seconds the answers in flight get before they are stopped
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def context_name(path: Path) -> str:
    """The model id a context is served as: its file's stem, a directory's name, stdin for -."""
    if str(path) == "-":
        return "stdin"
    return path.resolve().name if path.is_dir() else path.stem


def _stopped(signum, frame) -> None:
    """uvicorn shuts down gracefully on SIGINT and SIGTERM, then raises the
    signal again for the handler it found; this one makes that shutdown the
    end of the command (exit code 0), not a KeyboardInterrupt or a kill."""


def register(app: typer.Typer) -> None:
    """Add `lmqa serve` to the app. cli.py calls this, as simonw/llm's plugins
    register their commands, so this module needs nothing of cli.py."""
    app.command()(friendly(serve))


def serve(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="Context files from `lmqa ingest` (.lmqa) or documents, each served as the model named after its file (book.lmqa: book).")],
    host: Annotated[str, typer.Option("--host", envvar="LMQA_HOST", help="Address to listen on: 127.0.0.1 serves this machine only; 0.0.0.0 every network (use --api-key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", envvar="LMQA_PORT", min=0, max=65535, help="Port to listen on (0: any free one, printed at start).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="LMQA_API_KEY", show_default=False, help="Require the header 'Authorization: Bearer KEY' on /v1/ requests (/health stays open).")] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="Questions waiting or being answered at once; more are refused with HTTP 429.")] = 32,
    max_request_bytes: Annotated[int, typer.Option("--max-request-bytes", min=1, help="Largest request body; larger ones are refused with HTTP 413.")] = 1 << 20,
    warmup: Annotated[bool, typer.Option("--warmup/--no-warmup", help="Answer one short question per context before serving, so the first real one does not pay for kernel compilation.")] = True,
    include: IncludeOpt = None, exclude: ExcludeOpt = None, keep_boilerplate: BoilerplateOpt = False,
    max_memory: MaxMemoryOpt = "auto",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Longest answer, in tokens (a request's max_tokens may ask for fewer).")] = 200,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy (a request's temperature overrides it).")] = 0.0,
    quote: QuoteOpt = True, candidates: CandidatesOpt = 4, seed: SeedOpt = None,
    kv_dtype: KvDtypeOpt = None,
    model: ModelOpt = None, quantize: QuantOpt = "none", device: DeviceOpt = "auto",
    kv_offload: OffloadOpt = "auto", top_k: TopKOpt = None, block_size: BlockOpt = None,
    prefill: PrefillOpt = "layer", max_gpu_memory: MaxGpuOpt = "auto",
):
    """Answer questions about contexts over an OpenAI-compatible HTTP API (/v1/chat/completions), with the model loaded once."""
    from .app import ServeOptions  # here: FastAPI is imported by this command alone

    names = [context_name(p) for p in paths]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"two contexts would both be served as {twice[0]!r}: rename or copy one")
    answering = answer_options(ctx)
    server = ServeOptions(sampling=answering.sampling, api_key=api_key or None, max_queue=max_queue,
                          max_request_bytes=max_request_bytes, warmup=warmup)
    _serve(dict(zip(names, paths)), session_options(ctx), answering, server, host=host, port=port)


def _serve(paths: dict[str, Path], options: SessionOptions, answering: AnswerOptions, server: ServeOptions, *,
           host: str, port: int) -> None:
    """Open every context (name -> path) with one model per distinct model
    options, then serve them until Ctrl-C or SIGTERM."""
    import uvicorn

    from .app import build_app

    loader = functools.cache(load_model)  # contexts made with one model share it
    # --no-quote: the model's own words (a codebase then answers freely too)
    contexts = {name: open_session(path, options, quote=answering.quote, loader=loader) for name, path in paths.items()}
    if server.api_key is None and host not in LOOPBACK:
        err.print(f"[yellow]note:[/yellow] serving on {escape(host)} without --api-key: anyone who can reach "
                  f"this port can ask", soft_wrap=True, highlight=False)
    err.print(f"[dim]models: {escape(', '.join(contexts))}[/dim]", soft_wrap=True, highlight=False)
    app_ = build_app(contexts, server, log=lambda line: err.print(f"[dim]{escape(line)}[/dim]", soft_wrap=True,
                                                                  highlight=False))
    uvicorn_server = uvicorn.Server(uvicorn.Config(app_, host=host, port=port, timeout_graceful_shutdown=GRACE_S))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stopped)
    uvicorn_server.run()
