"""`lmqa serve CTX.lmqa|DOC ...`: load the model and every context once, then
answer over HTTP until Ctrl-C or SIGTERM. Contexts are opened and documents
read by the same functions as `lmqa ask`; FastAPI and uvicorn are imported
only here, so the other commands do not pay for them."""

from __future__ import annotations

import functools
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from lmqa.cli import (BlockOpt, BoilerplateOpt, CandidatesOpt, DeviceOpt, ExcludeOpt, IncludeOpt, KvDtypeOpt, MaxGpuOpt,
                      MaxMemoryOpt, ModelOpt, OffloadOpt, PrefillOpt, QuantOpt, QuoteOpt, SeedOpt, TopKOpt, UserError,
                      _engine_settings, _load, _report_memory, _session, app, err, friendly)

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


@app.command()
@friendly
def serve(
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
    import uvicorn

    from lmqa.engine.generation import SamplingConfig
    from .app import ServeOptions, build_app

    names = [context_name(p) for p in paths]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"two contexts would both be served as {twice[0]!r}: rename or copy one")
    _engine_settings(prefill, max_gpu_memory)
    loader = functools.cache(_load)  # contexts made with one model share it
    contexts = {}
    for name, path in zip(names, paths):
        session = _session(path, include, exclude, max_memory, model, quantize, device, kv_offload, top_k, block_size,
                           kv_dtype, keep_boilerplate, loader)
        _report_memory(session.engine)
        session.quote = session.quote and quote  # --no-quote: the model's own words (a codebase then answers freely too)
        contexts[name] = session
    options = ServeOptions(SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                          candidates=candidates),
                           api_key or None, max_queue, max_request_bytes, warmup)
    if options.api_key is None and host not in LOOPBACK:
        err.print(f"[yellow]note:[/yellow] serving on {escape(host)} without --api-key: anyone who can reach "
                  f"this port can ask", soft_wrap=True, highlight=False)
    err.print(f"[dim]models: {escape(', '.join(contexts))}[/dim]", soft_wrap=True, highlight=False)
    app_ = build_app(contexts, options, log=lambda line: err.print(f"[dim]{escape(line)}[/dim]", soft_wrap=True,
                                                                   highlight=False))
    server = uvicorn.Server(uvicorn.Config(app_, host=host, port=port, timeout_graceful_shutdown=GRACE_S))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stopped)
    server.run()
