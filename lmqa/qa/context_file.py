"""Ingested contexts on disk: `lmqa ingest PATH -o FILE.lmqa` once, then
`lmqa ask FILE.lmqa` / `lmqa chat FILE.lmqa` in seconds instead of a prefill.

Format: one safetensors file (8-byte little-endian header length, a JSON
header giving each tensor's dtype, shape and byte range, then raw bytes), so
any safetensors reader can inspect it. The header's "__metadata__" holds one
key, "lmqa": a small JSON object with the format name and version, the lmqa
version, the model's identity (name, manifest base/adapter checksums, a
fingerprint of the loaded weights and one of the tokenizer), the landmark
settings (landmark id, block size, top-k and prefill chunk at ingest, train
context), the kv dtype, the token, block and document byte counts and the
blocks per checksummed piece. Tensors:

  layers.{i}.landmark_keys              [n, Hkv, d]     compute dtype
  layers.{i}.keys, .values              [n, Hkv, b, d]  kv dtype (int8: codes)
  layers.{i}.key_scales, .value_scales  [n, Hkv, b]     float32, int8 only
  layers.{i}.open_keys, .open_values    [Hkv, p, d]     the open (partial) block
  token_ids                             [N] int64       prompt head + document
  document                              [bytes] uint8   UTF-8 JSON: the document
        (source, kind, text, segments, skips, warnings) and the source map
        (block -> file/chapter/page and lines)
  checksums                             [pieces + 2] int64: CRC-32 + 1 (0:
        not written yet) of the header, token ids and document; of each
        piece of blocks (its rows of every block tensor, layer by layer);
        and of the open block, written last, which marks the file complete

Every shape follows from the metadata, so the whole header is known before
the first block exists: `lmqa ingest` writes it first, then each piece of
blocks as the prefill closes it (ContextWriter; the engine then reads those
blocks back through the file's memory map, so its memory stays at one
piece), and an interrupted ingest resumes after its last checksummed piece.
A reader recomputes the header from the metadata and requires it byte for
byte, so a crafted or damaged header is refused before any tensor is made,
and load() checks every checksum (CRC-32 runs at several GB/s: about a
second per 3 GB). The file holds no wall-clock time, so a resumed ingest
writes exactly the bytes an uninterrupted one does.

The state saved is the document state (the session's document mark), never a
kept conversation. The ingest's own retrieval trace is not saved: answers
only report their own steps.

We write and read the bytes ourselves rather than with safetensors' save_file
and safe_open: save_file materialises every tensor's bytes at once (twice the
context in RAM) and safe_open copies each tensor it hands out. Here tensors
are written part by part, and come back as torch.frombuffer views of one
private memory map, so opening a context keeps only its landmark keys and
document in memory; block keys and values are paged in as questions retrieve
them, and a context larger than RAM still opens. Tensors are laid out by
descending element size, so each is aligned for its dtype.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import struct
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lmqa import __version__
from lmqa.atomic_file import atomic_path
from lmqa.code.symbols import SymbolIndex
from lmqa.engine.block_store import KV_DTYPES, kv_dtype_name, parse_kv_dtype
from lmqa.engine.cache import OPEN_TENSORS
from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.ingest import BlockSource, Document, Location, Segment, SkipReport
from lmqa.model.loading import LoadedModel
from lmqa.model.manifest import find_manifest
from lmqa.options import EngineOptions
from .session import DocumentSession

FORMAT = "lmqa-context"
FORMAT_VERSION = 2
SUFFIX = ".lmqa"
PIECE_BYTES = 64 << 20  # default keys/values per checksummed piece: what `lmqa ingest` holds in memory
_MAX_HEADER = 100 << 20  # safetensors' own limit
_MAX_LAYERS = 4096  # sanity bound on a header's claims, checked before anything is sized by them
_IO_CHUNK = 16 << 20
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_BY_NAME = {v: k for k, v in _DTYPES.items()}
_STORE_TENSORS = ("landmark_keys", "keys", "values", "key_scales", "value_scales")
_CACHE_TENSORS = _STORE_TENSORS + OPEN_TENSORS  # a layer's LandmarkCache.state


class ContextError(Exception):
    """A context file cannot be used (corrupt, foreign or incompatible); one line for the user."""


class ContextBusy(ContextError):
    """Another process is writing this file (its partial work is not ours to remove)."""


# ----- model identity -----
def _sha(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def weights_fingerprint(model: torch.nn.Module, samples: int = 256) -> str:
    """A hash of every parameter's name, shape and `samples` evenly spaced
    values in bf16: cheap for any size, the same for a model loaded in fp32
    or bf16 from one checkpoint, and different for other weights, another
    adapter or another quantization."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        flat = p.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // samples)][:samples].to("cpu", torch.bfloat16)
        digest.update(f"{name}{tuple(p.shape)}".encode())
        digest.update(picked.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Vocabulary (added tokens included) and chat template."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    return _sha(type(tokenizer).__name__.encode(), vocab, str(getattr(tokenizer, "chat_template", "")).encode())


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    weights: str
    tokenizer: str
    base_sha256: str | None = None  # manifest models: the base GGUF's checksum
    adapter: dict[str, str] | None = None  # manifest models: adapter file -> checksum

    @classmethod
    def of(cls, loaded: LoadedModel) -> ModelIdentity:
        manifest = find_manifest(loaded.name)
        return cls(loaded.name, weights_fingerprint(loaded.model), tokenizer_fingerprint(loaded.tokenizer),
                   manifest.base.member_sha256 if manifest else None, dict(manifest.adapter) if manifest and manifest.adapter else None)

    def mismatch(self, other: ModelIdentity) -> str | None:
        """What differs between the model a context was made with (self) and
        `other`, or None. Two manifest models are the same checkpoint when
        their checksums agree, whatever dtype each run loaded it in (a LoRA
        merged in bf16 and one merged in fp32 differ in the last bits, and a
        context made on one serves the other); other models are compared by
        their weights' fingerprint."""
        if self.tokenizer != other.tokenizer:
            return "tokenizer"
        if self.base_sha256 and other.base_sha256:
            if self.base_sha256 != other.base_sha256:
                return "base weights"
            return "landmark adapter" if self.adapter != other.adapter else None
        return "weights" if self.weights != other.weights else None


# ----- the layout: every byte range follows from the metadata -----
@dataclass(frozen=True)
class _Span:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offsets
    end: int

    @property
    def row_bytes(self) -> int:
        return (self.end - self.start) // self.shape[0] if self.shape[0] else 0


class _Layout:
    """Header bytes, tensor spans and checksum ranges of the file a metadata
    object describes. Raises KeyError/TypeError/ValueError on metadata that
    is incomplete or impossible."""

    def __init__(self, meta: dict[str, Any]):
        s = meta["settings"]
        layers, heads, dim, b = (int(s[k]) for k in ("layers", "kv_heads", "head_dim", "block_size"))
        n, n_tokens, doc_bytes, self.piece_blocks = (int(meta[k]) for k in ("n_blocks", "n_tokens", "document_bytes", "piece_blocks"))
        if not (0 < layers <= _MAX_LAYERS and heads > 0 and dim > 0 and b > 0 and self.piece_blocks > 0 and doc_bytes >= 0
                and n >= 0 and 0 <= n_tokens - n * b < b):
            raise ValueError("impossible shapes")
        compute, kv = getattr(torch, s["dtype"]), parse_kv_dtype(meta["kv_dtype"])
        if compute not in KV_DTYPES.values():
            raise ValueError(f"compute dtype {s['dtype']}")
        self.meta, self.layers, self.n_blocks = meta, layers, n
        self.n_pieces = -(-n // self.piece_blocks)
        specs = [("token_ids", torch.int64, (n_tokens,)), ("checksums", torch.int64, (self.n_pieces + 2,)),
                 ("document", torch.uint8, (doc_bytes,))]
        for i in range(layers):
            specs += [(f"layers.{i}.landmark_keys", compute, (n, heads, dim)),
                      (f"layers.{i}.keys", kv, (n, heads, b, dim)), (f"layers.{i}.values", kv, (n, heads, b, dim))]
            if kv == torch.int8:
                specs += [(f"layers.{i}.key_scales", torch.float32, (n, heads, b)),
                          (f"layers.{i}.value_scales", torch.float32, (n, heads, b))]
            specs += [(f"layers.{i}.open_keys", compute, (heads, n_tokens - n * b, dim)),
                      (f"layers.{i}.open_values", compute, (heads, n_tokens - n * b, dim))]
        specs.sort(key=lambda spec: -spec[1].itemsize)  # stable: keeps every tensor aligned
        header: dict[str, Any] = {"__metadata__": {"lmqa": json.dumps(meta, separators=(",", ":"))}}
        offset = 0
        for name, dtype, shape in specs:
            nbytes = dtype.itemsize
            for dim_size in shape:
                nbytes *= dim_size
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)
        self.header = struct.pack("<Q", len(raw)) + raw
        data = len(self.header)
        self.spans = {name: _Span(dtype, shape, data + header[name]["data_offsets"][0], data + header[name]["data_offsets"][1])
                      for name, dtype, shape in specs}
        self.size = data + offset
        self.store_names = [name for name in _STORE_TENSORS if f"layers.0.{name}" in self.spans]

    def blocks(self, piece: int) -> tuple[int, int]:
        """The block range [start, stop) of a checksummed piece."""
        return piece * self.piece_blocks, min((piece + 1) * self.piece_blocks, self.n_blocks)

    def piece_ranges(self, piece: int) -> list[tuple[int, int]]:
        """(offset, length) of a piece's bytes, in the order they are checksummed."""
        start, stop = self.blocks(piece)
        out = []
        for i in range(self.layers):
            for name in self.store_names:
                span = self.spans[f"layers.{i}.{name}"]
                out.append((span.start + start * span.row_bytes, (stop - start) * span.row_bytes))
        return out

    def head_ranges(self) -> list[tuple[int, int]]:
        return [(0, len(self.header))] + [self._whole(name) for name in ("token_ids", "document")]

    def tail_ranges(self) -> list[tuple[int, int]]:
        return [self._whole(f"layers.{i}.{name}") for i in range(self.layers) for name in ("open_keys", "open_values")]

    def _whole(self, name: str) -> tuple[int, int]:
        span = self.spans[name]
        return span.start, span.end - span.start

    def tensors(self, mm: mmap.mmap | None) -> dict[str, torch.Tensor]:
        """Every tensor as a zero-copy view of the file's map."""
        out = {}
        for name, span in self.spans.items():
            numel = (span.end - span.start) // span.dtype.itemsize
            out[name] = (torch.frombuffer(mm, dtype=span.dtype, count=numel, offset=span.start).view(span.shape)
                         if numel else torch.empty(span.shape, dtype=span.dtype))
        return out


def _crc(fd: int, ranges: list[tuple[int, int]], crc: int = 0) -> int:
    """CRC-32 of the file's bytes in ranges, read in chunks (the page cache
    holds them, not this process)."""
    for offset, length in ranges:
        while length:
            chunk = os.pread(fd, min(length, _IO_CHUNK), offset)
            if not chunk:
                raise OSError(f"short read at {offset}")
            crc = zlib.crc32(chunk, crc)
            offset += len(chunk)
            length -= len(chunk)
    return crc


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    """Every write to a context file goes through here (one place to fail)."""
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _map_private(fd: int, size: int) -> mmap.mmap | None:
    return mmap.mmap(fd, size, access=mmap.ACCESS_COPY) if size else None


def _open_layout(path: Path, fh) -> _Layout:
    """The layout a file's header describes, required to match the file byte
    for byte (header) and in size; ContextError otherwise."""
    size = os.fstat(fh.fileno()).st_size
    bad = ContextError(f"{path} is not a complete lmqa context file (truncated, or another kind of file)")
    if size < 8:
        raise bad
    (n,) = struct.unpack("<Q", fh.read(8))
    if n > min(_MAX_HEADER, size - 8):
        raise bad
    raw = fh.read(n)
    try:
        extra = json.loads(raw).get("__metadata__") or {}
    except (ValueError, AttributeError, UnicodeDecodeError):
        raise bad from None
    try:
        meta = json.loads(extra["lmqa"])
    except (KeyError, TypeError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ContextError(f"{path} is a safetensors file but not an lmqa context")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ContextError(f"{path} has context format version {meta.get('format_version')}; "
                           f"this lmqa ({__version__}) reads version {FORMAT_VERSION}: ingest again")
    try:
        layout = _Layout(meta)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ContextError(f"{path}: its lmqa metadata is incomplete or inconsistent") from None
    if layout.header != struct.pack("<Q", n) + raw or layout.size != size:
        raise bad
    return layout


def _map(path: Path, verify: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The lmqa metadata and every tensor as a zero-copy view of a private
    map; verify: check every checksum first (reads the whole file once)."""
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise ContextError(f"{path}: {e.strerror}") from None
    with fh:
        layout = _open_layout(path, fh)
        if verify:
            _verify(path, fh.fileno(), layout)
        mm = _map_private(fh.fileno(), layout.size)
    return layout.meta, layout.tensors(mm)


def _stored_checksums(fd: int, layout: _Layout) -> list[int]:
    span = layout.spans["checksums"]
    return list(struct.unpack(f"<{layout.n_pieces + 2}q", os.pread(fd, span.end - span.start, span.start)))


def _verify(path: Path, fd: int, layout: _Layout) -> None:
    stored = _stored_checksums(fd, layout)
    if stored[-1] == 0:
        raise ContextError(f"{path} is an unfinished ingest, not a context file: finish it with `lmqa ingest ... --resume`")
    checks = [("header and document", layout.head_ranges())]
    checks += [(f"blocks {a}-{b - 1}", layout.piece_ranges(j)) for j in range(layout.n_pieces) for a, b in [layout.blocks(j)]]
    checks += [("open block", layout.tail_ranges())]
    for (what, ranges), want in zip(checks, stored):
        if _crc(fd, ranges) + 1 != want:
            raise ContextError(f"{path} is corrupt (checksum mismatch in its {what}): ingest the document again")


class ContextWriter:
    """Writes one context file piece by piece (see the module docstring):
    the header, token ids and document first, then each piece of blocks,
    each followed by its checksum, then the open block. `resume=True` keeps
    a file that already has this exact header and document, and every piece
    whose checksum verifies; `done` says how many."""

    def __init__(self, path: Path, meta: dict[str, Any], token_ids: list[int], document: bytes, resume: bool = False):
        self.path = Path(path)
        self.layout = _Layout(meta)
        ids = torch.tensor(token_ids, dtype=torch.int64)
        head = [self.layout.header, bytes(_bytes(ids)), document]
        self.head_crc = 0
        for part in head:
            self.head_crc = zlib.crc32(part, self.head_crc)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:  # two ingests to one output would write over each other's pieces
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ContextBusy(f"{self.path} is being written by another lmqa process") from None
            self.done = self._resumable() if resume else 0
            if not self.done:
                self._start(head)
            with open(self.path, "rb") as fh:  # its own descriptor: the map must not keep the lock held
                self.mm = _map_private(fh.fileno(), self.layout.size)
            self.tensors = self.layout.tensors(self.mm)
        except BaseException:
            os.close(self.fd)
            raise

    def _resumable(self) -> int:
        """Pieces already written and intact (0: start over). The last piece
        is never counted: the open block after it was not saved."""
        lay = self.layout
        if os.fstat(self.fd).st_size != lay.size or os.pread(self.fd, len(lay.header), 0) != lay.header:
            return 0
        stored = _stored_checksums(self.fd, lay)
        if stored[0] != self.head_crc + 1 or _crc(self.fd, lay.head_ranges()) != self.head_crc:
            return 0
        done = 0
        while done < lay.n_pieces - 1 and stored[done + 1] == _crc(self.fd, lay.piece_ranges(done)) + 1:
            done += 1
        return done

    def _start(self, head: list[bytes]) -> None:
        lay = self.layout
        os.ftruncate(self.fd, 0)
        os.ftruncate(self.fd, lay.size)
        try:  # claim the disk space now: a full disk fails here, not an hour in
            os.posix_fallocate(self.fd, 0, lay.size)
        except OSError as e:
            if e.errno not in (getattr(os, "EOPNOTSUPP", 95), 22):  # file systems without it: write sparse
                raise
        _pwrite(self.fd, memoryview(head[0]), 0)
        _pwrite(self.fd, memoryview(head[1]), lay.spans["token_ids"].start)
        _pwrite(self.fd, memoryview(head[2]), lay.spans["document"].start)
        self._checksum(0, self.head_crc)

    def _checksum(self, index: int, crc: int) -> None:
        """Record a part as written, after its bytes are on disk."""
        os.fdatasync(self.fd)
        _pwrite(self.fd, memoryview(struct.pack("<q", crc + 1)), self.layout.spans["checksums"].start + 8 * index)

    def write_piece(self, piece: int, exports: list[dict[str, list[torch.Tensor]]]) -> None:
        """exports: per layer, the cache's state (LandmarkCache.state) of
        exactly this piece's blocks (its open block is not read here)."""
        lay = self.layout
        crc = 0
        ranges = iter(lay.piece_ranges(piece))
        for export in exports:
            for name in lay.store_names:
                offset, length = next(ranges)
                for part in export[name]:
                    data = _bytes(part)
                    _pwrite(self.fd, data, offset)
                    crc = zlib.crc32(data, crc)
                    offset += len(data)
                    length -= len(data)
                if length:
                    raise ValueError(f"piece {piece}: {name} has {length} bytes too few")
        self._checksum(1 + piece, crc)

    def saved(self, layer: int, n_blocks: int) -> dict[str, torch.Tensor]:
        """A layer's first n_blocks as written, as views of the file's map
        (a cache's state, see LandmarkCache.state, and LandmarkCache.freeze)."""
        return {name: self.tensors[f"layers.{layer}.{name}"][:n_blocks] for name in self.layout.store_names}

    def release_pages(self) -> None:
        """Drop this process's mapping of the pages read so far (they stay
        in the page cache): what retrieval touched must not add up in RSS."""
        if self.mm is not None:
            self.mm.madvise(mmap.MADV_DONTNEED)

    def finish(self, open_keys: list[torch.Tensor], open_values: list[torch.Tensor]) -> None:
        """Write the open block ([Hkv, p, d] per layer) and the completing
        checksum, and flush everything to disk."""
        crc = 0
        for i, (k, v) in enumerate(zip(open_keys, open_values)):
            for name, t in (("open_keys", k), ("open_values", v)):
                data = _bytes(t)
                _pwrite(self.fd, data, self.layout.spans[f"layers.{i}.{name}"].start)
                crc = zlib.crc32(data, crc)
        self._checksum(self.layout.n_pieces + 1, crc)
        os.fsync(self.fd)

    def close(self) -> None:
        """Close the file; the map (and tensors viewing it) stays valid."""
        os.close(self.fd)


# ----- what a session becomes on disk -----
def document_bytes(session: DocumentSession) -> bytes:
    """The document tensor's bytes: everything about the document but its
    token ids (no timings: see the module docstring)."""
    session.prepare()  # the source map and prompt head come from tokenizing
    doc = session.document
    return json.dumps({"source": doc.source, "kind": session.kind, "text": doc.text,
                       "segments": [asdict(s) for s in doc.segments], "skipped": doc.skipped.by_reason,
                       "warnings": doc.warnings, "doc_token_start": session.doc_token_start,
                       "symbols": doc.symbols.to_json() if doc.symbols is not None else None,
                       "sources": [[s.block, s.char_start, s.char_end, s.snippet, [list(asdict(loc).values()) for loc in s.locations]]
                                   for s in session.sources.values()]}).encode()


def _document_from(raw: dict[str, Any]) -> tuple[Document, dict[int, BlockSource]]:
    doc = Document(raw["source"], raw["text"], [Segment(**s) for s in raw["segments"]],
                   SkipReport(raw["skipped"]), list(raw["warnings"]),
                   SymbolIndex.from_json(raw["symbols"]) if raw.get("symbols") is not None else None)
    sources = {block: BlockSource(block, start, end, snippet, tuple(Location(*loc) for loc in locs))
               for block, start, end, snippet, locs in raw["sources"]}
    return doc, sources


def _settings(engine: LandmarkEngine) -> dict[str, Any]:
    c = engine.config
    return {"landmark_id": c.landmark_id, "block_size": c.block_size, "top_k": c.top_k,
            "train_context": c.train_context, "prefill_chunk": c.prefill_chunk,
            "layers": len(engine.caches), "kv_heads": engine.n_kv, "head_dim": engine.head_dim,
            "dtype": str(engine.dtype).removeprefix("torch.")}


def piece_blocks(engine: LandmarkEngine, piece_bytes: int | None = None) -> int:
    """Blocks per checksummed piece: about piece_bytes (default PIECE_BYTES) of block keys/values,
    and a whole number of prefill chunks, so feeding a document piece by
    piece chunks it exactly as feeding it at once does."""
    c = engine.config
    heads, b, d, layers = engine.n_kv, c.block_size, engine.head_dim, len(engine.caches)
    per_block = layers * heads * (2 * b * d * engine.kv_dtype.itemsize + d * engine.dtype.itemsize
                                  + (2 * b * 4 if engine.kv_dtype == torch.int8 else 0))
    chunk_blocks = c.prefill_chunk // c.slot if c.prefill_chunk % c.slot == 0 else 1
    return max(1, (piece_bytes or PIECE_BYTES) // (per_block * chunk_blocks)) * chunk_blocks


def metadata(session: DocumentSession, n_tokens: int, document: bytes, blocks_per_piece: int) -> dict[str, Any]:
    """The lmqa metadata of the session's document state at n_tokens tokens
    (every shape in the file follows from it)."""
    engine = session.engine
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "lmqa_version": __version__,
            "model": asdict(ModelIdentity.of(session.loaded)), "settings": _settings(engine),
            "kv_dtype": kv_dtype_name(engine.kv_dtype), "n_tokens": n_tokens,
            "n_blocks": n_tokens // engine.config.block_size, "document_bytes": len(document),
            "piece_blocks": blocks_per_piece}


def save(session: DocumentSession, path: Path) -> int:
    """Write the session's document state to path atomically; returns bytes written."""
    engine = session.engine
    mark = session.document_mark
    document = document_bytes(session)
    meta = metadata(session, mark.n_tokens, document, piece_blocks(engine))
    with atomic_path(Path(path)) as tmp:
        writer = ContextWriter(tmp, meta, session.token_ids, document)
        try:
            for piece in range(writer.layout.n_pieces):
                start, stop = writer.layout.blocks(piece)
                writer.write_piece(piece, [cache.state(start, stop, at) for cache, at in zip(engine.caches, mark.caches)])
            opened = [cache.state(at=at) for cache, at in zip(engine.caches, mark.caches)]
            writer.finish([o["open_keys"][0] for o in opened], [o["open_values"][0] for o in opened])
        finally:
            writer.close()
    return writer.layout.size


@dataclass(frozen=True)
class ContextInfo:
    """What a context file says about itself, read without a model."""

    path: Path
    model: ModelIdentity
    kv_dtype: str
    n_tokens: int
    n_blocks: int
    settings: dict[str, Any]
    lmqa_version: str


def is_context_file(path: Path) -> bool:
    return Path(path).suffix == SUFFIX and Path(path).is_file()


def _info(path: Path, meta: dict[str, Any]) -> ContextInfo:
    try:
        return ContextInfo(Path(path), ModelIdentity(**meta["model"]), meta["kv_dtype"], meta["n_tokens"],
                           meta["n_blocks"], meta["settings"], meta["lmqa_version"])
    except (KeyError, TypeError):
        raise ContextError(f"{path}: its lmqa metadata is incomplete") from None


def peek(path: Path) -> ContextInfo:
    """The file's description (header and size validated, nothing else read)."""
    return _info(path, _map(Path(path))[0])


def check_compatible(info: ContextInfo, loaded: LoadedModel) -> None:
    """Refuse a context made with another model or incompatible settings."""
    made, here = info.model, ModelIdentity.of(loaded)
    what = made.mismatch(here)
    if what is not None:
        raise ContextError(f"{info.path} was made with model {made.name!r}; the loaded model {here.name!r} has "
                           f"different {what}: use --model {made.name} or ingest the document again")
    s, c = info.settings, loaded.landmark
    model_cfg = loaded.model.config
    want = {"landmark_id": c.landmark_id, "block_size": c.block_size, "layers": model_cfg.num_hidden_layers,
            "kv_heads": model_cfg.num_key_value_heads}
    for key, value in want.items():
        if s.get(key) != value:
            raise ContextError(f"{info.path} was made with {key.replace('_', ' ')} {s.get(key)}; "
                               f"the loaded model uses {value}: ingest the document again")


def load(path: Path, loaded: LoadedModel, options: EngineOptions = EngineOptions()) -> DocumentSession:
    """A DocumentSession at the saved document state, block keys/values read
    in place from the file's memory map (see the module docstring). Its
    engine has the command's options but the file's kv dtype, and offload
    auto keeps the blocks in host memory: read in place, never copied whole
    to a GPU."""
    meta, tensors = _map(Path(path), verify=True)
    info = _info(path, meta)
    check_compatible(info, loaded)
    engine = replace(options, kv_dtype=info.kv_dtype,
                     kv_offload="cpu" if options.kv_offload == "auto" else options.kv_offload).engine(loaded)
    try:
        engine.load_state([{name: tensors[f"layers.{i}.{name}"] for name in _CACHE_TENSORS if f"layers.{i}.{name}" in tensors}
                           for i in range(info.settings["layers"])], info.n_tokens)
        raw = json.loads(bytes(tensors["document"].numpy()))
        document, sources = _document_from(raw)
        ids = tensors["token_ids"].tolist()
    except (KeyError, ValueError, TypeError) as e:
        raise ContextError(f"{path}: inconsistent context file ({e})") from None
    if engine.n_blocks != info.n_blocks or engine.n_tokens != len(ids):
        raise ContextError(f"{path}: inconsistent context file (block or token counts disagree)")
    return DocumentSession.restored(loaded, engine, document, raw["kind"], ids, raw["doc_token_start"], sources, None)
