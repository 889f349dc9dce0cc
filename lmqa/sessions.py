"""From a path and a command's options to a DocumentSession ready for
questions, saying on stderr what it read and where the blocks live.

ask, chat and serve open a context file or read a document through
open_session; ingest sizes one with prepared_session. Every model is loaded
by load_model and every engine built from the command's EngineOptions, so
the same flags mean the same engine whichever way the session was made.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rich.markup import escape

from lmqa.options import EngineOptions, ModelOptions, ReadOptions, SessionOptions
from lmqa.terminal import UserError, err, prefill_bar

if TYPE_CHECKING:
    from lmqa.engine.landmark_engine import LandmarkEngine
    from lmqa.ingest import Document
    from lmqa.model.loading import LoadedModel
    from lmqa.qa.session import DocumentSession

Loader = Callable[[ModelOptions], "LoadedModel"]  # `lmqa serve` shares one model among its contexts


def load_model(options: ModelOptions) -> LoadedModel:
    """The model, loaded with a spinner and without library chatter; a note
    when it was not trained with landmarks."""
    from transformers.utils import logging as hf_logging

    from lmqa.model.loading import load_model as load

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # Library chatter that says nothing actionable to a user: transformers'
    # deprecation notices and bitsandbytes' note that it cannot fetch an
    # optional CPU kernel from a hub (lmqa runs offline by design).
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with err.status("loading model"):
        loaded = load(options.model, quantize=options.quantize, device=options.device, top_k=options.top_k,
                      block_size=options.block_size, log=lambda m: err.print(f"[dim]{m}[/dim]"))
    if not loaded.trained:
        err.print(f"[yellow]note:[/yellow] {loaded.name} was not trained with landmarks; retrieval will be weak")
    return loaded


def new_engine(loaded: LoadedModel, options: EngineOptions) -> LandmarkEngine:
    """options.engine(loaded); with -v, where its blocks will live."""
    from lmqa.engine.memory_budget import format_size

    engine = options.engine(loaded)
    if options.verbose:
        why = (f" (auto: on the device up to {format_size(engine.auto_offload.limit)})"
               if engine.auto_offload and engine.auto_offload.limit else "")
        err.print(f"[dim]block keys/values: {'device' if engine.offload == 'device' else 'host memory'}{why}; "
                  f"{options.prefill} prefill on {engine.device}[/dim]")
    return engine


def report_memory(engine: LandmarkEngine, options: EngineOptions) -> None:
    """With -v: where the context's blocks ended up and what they take there."""
    from lmqa.engine.memory_budget import format_size

    if options.verbose:
        on = engine.memory()
        err.print(f"[dim]{engine.n_blocks:,} blocks, keys/values {'on the device' if engine.offload == 'device' else 'in host memory'}: "
                  f"{format_size(on['device'])} on the device, {format_size(on['host'])} in host memory[/dim]")


def open_session(path: Path, options: SessionOptions, *, quote: bool = True,
                 loader: Loader = load_model) -> DocumentSession:
    """A session for ask, chat and serve: opened from a context file, or read
    from the document; quote: --quote/--no-quote. With -v, where its blocks are."""
    from lmqa.qa.context_file import is_context_file

    if is_context_file(path):
        session = _open_context(path, options, loader)
    else:
        session = _read_session(path, options, loader)
    report_memory(session.engine, options.engine)
    session.quote = session.quote and quote
    return session


def prepared_session(path: Path, options: SessionOptions, loader: Loader = load_model) -> tuple[DocumentSession, int]:
    """A new DocumentSession for a document, tokenized and sized (tokens and
    estimated key/value cache, printed); returns it with the memory budget."""
    from lmqa.engine.memory_budget import budget, format_size
    from lmqa.qa.session import DocumentSession

    document = _document(path, options.read)
    kind = "codebase" if path.is_dir() else "document"
    loaded = loader(options.model)
    engine = new_engine(loaded, options.engine)
    session = DocumentSession(loaded, engine, document, kind)
    with err.status("tokenizing"):
        tokens = session.prepare()
    allowed = budget(options.read.memory_limit(), engine.device, options.engine.kv_offload)
    parts = f"{len(document.segments):,} {'files' if kind == 'codebase' else 'parts'}, " if len(document.segments) > 1 else ""
    parts += f"{document.symbols.summary()}, " if document.symbols is not None else ""
    parts += "".join(f"dropped the {escape(d)}, " for d in document.dropped)
    err.print(f"[dim]{escape(document.source)}: {parts}{tokens:,} tokens, {len(session.sources):,} blocks of "
              f"{session.block_size}; estimated key/value cache {format_size(session.cache_bytes())} "
              f"(budget {format_size(allowed)})[/dim]", soft_wrap=True, highlight=False)
    return session, allowed


def over_budget(session: DocumentSession, need: int, allowed: int) -> UserError:
    from lmqa.engine.memory_budget import format_size

    return UserError(f"{session.document.source}: {session.prepare():,} tokens need an estimated {format_size(need)} "
                     f"of key/value memory, over the budget of {format_size(allowed)}; raise it with --max-memory "
                     f"(e.g. --max-memory {-(-need // (1 << 30)) + 1}GiB) or ask about a smaller part")


def _document(path: Path, options: ReadOptions) -> Document:
    """The document, with its warnings and skipped files reported on stderr."""
    from lmqa.ingest import IngestError, ingest

    try:
        document = ingest(path, options.include, options.exclude, keep_boilerplate=options.keep_boilerplate)
    except IngestError as e:
        raise UserError(str(e)) from None
    for warning in document.warnings:
        err.print(f"[yellow]note:[/yellow] {escape(warning)}", soft_wrap=True, highlight=False)
    if document.skipped.total:
        err.print(f"[dim]skipped {document.skipped.total:,} path(s): "
                  f"{escape('; '.join(document.skipped.lines()))}[/dim]", soft_wrap=True, highlight=False)
    return document


def _read_session(path: Path, options: SessionOptions, loader: Loader) -> DocumentSession:
    """Read a document into a new DocumentSession with a progress bar: in
    memory when its estimated cache fits the budget, else spilled to a
    temporary context file (see context_stream.py)."""
    from lmqa.model.loading import CACHE_DIR
    from lmqa.qa.context_stream import fitting_piece_bytes, spill

    session, allowed = prepared_session(path, options, loader)
    need = session.cache_bytes()
    piece_bytes = fitting_piece_bytes(session, allowed) if session.engine.offload == "cpu" else None  # device blocks stay put
    if need > allowed and piece_bytes is None:
        raise over_budget(session, need, allowed)
    progress, advance = prefill_bar(session.positions, "reading")
    if need <= allowed:
        with progress:
            stats = session.ingest(advance)
    else:
        err.print(f"[dim]over the budget: keeping the blocks in a temporary file in {escape(str(CACHE_DIR / 'spill'))}[/dim]",
                  soft_wrap=True, highlight=False)
        try:
            with progress:
                streamed = spill(session, CACHE_DIR / "spill", piece_bytes, advance)
        except OSError as e:
            raise UserError(f"could not write the temporary context file in {CACHE_DIR / 'spill'} "
                            f"({e.strerror or e})") from None
        session, stats = streamed.session, streamed.stats
    err.print(f"[dim]read {stats.tokens:,} tokens in {stats.seconds:.1f} s ({stats.tokens_per_s:,.0f} tok/s)[/dim]")
    return session


def _open_context(path: Path, options: SessionOptions, loader: Loader) -> DocumentSession:
    """A DocumentSession from a context file, with the model it was made with
    unless --model names another (which it must then match)."""
    from dataclasses import replace

    from lmqa.qa.context_file import ContextError, load, peek

    try:
        info = peek(path)
        asked = options.engine.kv_dtype
        if asked is not None and asked != info.kv_dtype:
            raise UserError(f"{path} keeps its keys/values in {info.kv_dtype}; --kv-dtype {asked} applies "
                            f"when ingesting: run `lmqa ingest` again with it")
        model = options.model
        loaded = loader(replace(model, model=model.model or info.model.name,
                                block_size=model.block_size or info.settings.get("block_size")))
        with err.status("opening the context"):
            session = load(path, loaded, options.engine)
    except ContextError as e:
        raise UserError(str(e)) from None
    err.print(f"[dim]{escape(str(path))}: {escape(session.document.source)}, {info.n_tokens:,} tokens, {info.n_blocks:,} "
              f"blocks, keys/values in {info.kv_dtype}, made with {escape(info.model.name)} (lmqa {info.lmqa_version})[/dim]",
              soft_wrap=True, highlight=False)
    return session
