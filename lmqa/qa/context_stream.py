"""Streaming ingestion: a document's prefill written to a context file piece
by piece, so memory stays at the model plus one piece however long the
document, and an interrupted ingest can resume.

The document is fed one checksummed piece of blocks at a time (a whole
number of prefill chunks, so the engine chunks it as it would all at once).
After each piece its blocks are written (ContextWriter) and the engine's
block stores are frozen onto the file's memory map, which is then released
from this process (the page cache keeps it), so neither the stores nor the
pages retrieval touched grow with the document.

`lmqa ingest` writes to a fixed temporary name beside the output
(partial_path) and renames it when complete, so a killed ingest leaves no
file at the output path, and `--resume` finds the work. Each piece ends
at a block boundary, where the open block is empty, so a checkpoint is just
"pieces 0..j written": the engine restarts from the file's blocks with the
token count they imply, and feeds exactly what the uninterrupted run fed
next. The result is byte-identical (on the same machine and settings: the
header records model, dtype, kv dtype and piece size, and another header
starts over).

ask and chat use the same path to spill a document whose cache would not fit
in memory to an unlinked temporary file (spill), so nothing is left behind.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .context_file import PIECE_BYTES, ContextBusy, ContextWriter, document_bytes, metadata, piece_blocks
from lmqa.engine.landmark_engine import RetrievalTrace
from .session import DocumentSession, IngestStats

PARTIAL_SUFFIX = ".partial"


def partial_path(output: Path) -> Path:
    """Where `lmqa ingest -o output` works until the file is complete."""
    return output.with_name(f".{output.name}{PARTIAL_SUFFIX}")


def _landmark_bytes(session: DocumentSession) -> int:
    e = session.engine
    return session.prepare() // session.block_size * len(e.stores) * e.n_kv * e.head_dim * e.dtype.itemsize


def resident_bytes(session: DocumentSession, piece_bytes: int | None = None) -> int:
    """Key/value memory a streamed prefill holds: every landmark key (scored
    at each step) plus the in-memory tail of block keys/values, which grows
    to at most twice a piece before it is frozen onto the file."""
    return _landmark_bytes(session) + 2 * min(piece_bytes or PIECE_BYTES, session.cache_bytes())


def fitting_piece_bytes(session: DocumentSession, budget: int) -> int | None:
    """The largest piece (at most PIECE_BYTES) whose streamed prefill fits
    budget, or None when not even one block's does."""
    piece = min(PIECE_BYTES, (budget - _landmark_bytes(session)) // 2)
    return piece if piece >= session.cache_bytes() // max(session.prepare() // session.block_size, 1) else None


@dataclass(frozen=True)
class Streamed:
    session: DocumentSession  # at the document state, its blocks read from the file
    stats: IngestStats  # this run's prefill (after the resumed part)
    resumed_blocks: int  # blocks taken from an earlier, interrupted run


def stream_to(session: DocumentSession, work: Path, resume: bool = False, piece_bytes: int | None = None,
              progress: Callable[[int], None] | None = None, unlink: bool = False) -> Streamed:
    """Prefill session's document into a context file at `work`.

    resume: continue a file at `work` made by an interrupted run with the same
    document, model and settings (else start over). unlink: remove the file's
    name as soon as it is open (a spill: the map keeps the data until exit).
    On return the file is complete and synced; renaming it is the caller's.
    """
    engine = session.engine
    ids = session.token_ids
    document = document_bytes(session)
    meta = metadata(session, len(ids), document, piece_blocks(engine, piece_bytes))
    writer = ContextWriter(work, meta, ids, document, resume=resume)
    try:
        if unlink:
            work.unlink()
        return _feed(session, writer, ids, progress)
    finally:
        writer.close()


def _feed(session: DocumentSession, writer: ContextWriter, ids: list[int],
          progress: Callable[[int], None] | None) -> Streamed:
    engine, layout = session.engine, writer.layout
    b, slot = engine.config.block_size, engine.config.slot
    freeze = engine.offload == "cpu"  # device-resident stores stay where the user put them
    engine.reset()
    resumed = layout.blocks(writer.done)[0]
    if resumed:
        empty = torch.zeros(1, engine.n_kv, 0, engine.head_dim, dtype=engine.dtype, device=engine.device)
        stores = [engine.new_store(writer.saved(i, resumed)) for i in range(layout.layers)]
        engine.restore(stores, [empty] * layout.layers, [empty] * layout.layers, resumed * b, RetrievalTrace())
        if progress is not None:
            progress(resumed * slot)
    start_time = time.perf_counter()
    pieces = range(writer.done, layout.n_pieces)
    for piece in pieces:
        start, stop = layout.blocks(piece)
        engine.feed(ids[start * b : stop * b if piece < layout.n_pieces - 1 else len(ids)], progress=progress)
        writer.write_piece(piece, [store.export(stop, start) for store in engine.stores])
        if freeze:
            for i, store in enumerate(engine.stores):
                store.freeze(writer.saved(i, stop))
            writer.release_pages()
        engine.trace.steps.clear()  # the ingest's trace is never saved; keep it from growing
    if not pieces:  # shorter than one block
        engine.feed(ids, progress=progress)
        engine.trace.steps.clear()
    writer.finish([k[0] for k in engine.open.keys], [v[0] for v in engine.open.values])
    fed = len(ids) - resumed * b
    stats = IngestStats(fed, fed + fed // b, time.perf_counter() - start_time)
    restored = DocumentSession.restored(session.loaded, engine, session.document, session.kind, ids,
                                        session.doc_token_start, session.sources, stats)
    return Streamed(restored, stats, resumed)


def ingest_file(session: DocumentSession, output: Path, resume: bool = False, piece_bytes: int | None = None,
                progress: Callable[[int], None] | None = None) -> Streamed:
    """`lmqa ingest`: stream to partial_path(output), then rename it over
    output. An error removes the partial file (a full disk must not stay
    full); an interrupt (Ctrl-C, a kill) keeps it for resume, and a file
    another process is writing is left to it."""
    work = partial_path(output)
    try:
        streamed = stream_to(session, work, resume, piece_bytes, progress)
    except (KeyboardInterrupt, ContextBusy):
        raise
    except BaseException:
        work.unlink(missing_ok=True)
        raise
    os.replace(work, output)
    return streamed


def spill(session: DocumentSession, directory: Path, piece_bytes: int | None = None,
          progress: Callable[[int], None] | None = None) -> Streamed:
    """ask/chat on a document too large for memory: stream it to an unnamed
    temporary context file in directory (freed when the process exits)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="spill-", suffix=".lmqa", dir=directory)
    os.close(fd)
    try:
        return stream_to(session, Path(name), piece_bytes=piece_bytes, progress=progress, unlink=True)
    finally:
        Path(name).unlink(missing_ok=True)
