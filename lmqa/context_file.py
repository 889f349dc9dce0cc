"""Ingested contexts on disk: `lmqa ingest PATH -o FILE.lmqa` once, then
`lmqa ask FILE.lmqa` / `lmqa chat FILE.lmqa` in seconds instead of a prefill.

Format: one safetensors file (8-byte little-endian header length, a JSON
header giving each tensor's dtype, shape and byte range, then raw bytes), so
any safetensors reader can inspect it. The header's "__metadata__" holds one
key, "lmqa": a small JSON object with the format name and version, the lmqa
version, the model's identity (name, manifest base/adapter checksums, a
fingerprint of the loaded weights and one of the tokenizer), the landmark
settings (landmark id, block size, top-k and prefill chunk at ingest, train
context), the kv dtype, the shapes and the token count. Tensors:

  layers.{i}.landmark_keys              [n, Hkv, d]     compute dtype
  layers.{i}.keys, .values              [n, Hkv, b, d]  kv dtype (int8: codes)
  layers.{i}.key_scales, .value_scales  [n, Hkv, b]     float32, int8 only
  layers.{i}.open_keys, .open_values    [Hkv, p, d]     the open (partial) block
  token_ids                             [N] int64       prompt head + document
  document                              [bytes] uint8   UTF-8 JSON: the document
        (source, kind, text, segments, skips, warnings), the source map
        (block -> file/chapter/page and lines) and the ingest statistics

The state saved is the document state (the session's document mark), never a
kept conversation. The ingest's own retrieval trace is not saved: answers
only report their own steps.

We write and read the bytes ourselves rather than with safetensors' save_file
and safe_open: save_file materialises every tensor's bytes at once (twice the
context in RAM) and safe_open copies each tensor it hands out. Here tensors
stream out part by part, and come back as torch.frombuffer views of one
private memory map, so opening a context reads its header, landmark keys and
document only; block keys and values are paged in as questions retrieve them,
and a context larger than RAM still opens. Tensors are laid out by
descending element size, so each is aligned for its dtype.

Writes are atomic (atomic_file.atomic_path: a temp file beside the target,
fsynced, then renamed over it). A file shorter or longer than its header
says is refused, so neither an interrupted write's leftover temp file nor a
truncated copy opens as a context.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .atomic_file import atomic_path
from .block_store import kv_dtype_name, parse_kv_dtype
from .engine import LandmarkEngine, RetrievalTrace
from .ingest import BlockSource, Document, Location, Segment, SkipReport
from .loading import LoadedModel
from .manifest import find_manifest
from .qa import DocumentSession, IngestStats

FORMAT = "lmqa-context"
FORMAT_VERSION = 1
SUFFIX = ".lmqa"
_MAX_HEADER = 100 << 20  # safetensors' own limit
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_BY_NAME = {v: k for k, v in _DTYPES.items()}
_STORE_TENSORS = ("landmark_keys", "keys", "values", "key_scales", "value_scales")


class ContextError(Exception):
    """A context file cannot be used (corrupt, foreign or incompatible); one line for the user."""


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


# ----- safetensors bytes, streamed out and mapped back -----
@dataclass
class _Entry:
    name: str
    parts: list[torch.Tensor]  # concatenated along dim 0

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def shape(self) -> list[int]:
        return [sum(p.shape[0] for p in self.parts), *self.parts[0].shape[1:]]

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts)


def _write(path: Path, entries: list[_Entry], metadata: dict[str, Any]) -> int:
    entries = sorted(entries, key=lambda e: -e.parts[0].element_size())  # keeps every tensor aligned
    header: dict[str, Any] = {"__metadata__": {"lmqa": json.dumps(metadata, separators=(",", ":"))}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": _DTYPES[e.dtype], "shape": e.shape, "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for e in entries:
            for part in e.parts:
                _write_part(fh, part)
        fh.flush()
        os.fsync(fh.fileno())
    return 8 + len(raw) + offset


def _write_part(fh, part: torch.Tensor) -> None:
    if part.numel():
        fh.write(part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _map(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The lmqa metadata and every tensor as a zero-copy view of a private map."""
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise ContextError(f"{path}: {e.strerror}") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        bad = ContextError(f"{path} is not a complete lmqa context file (truncated, or another kind of file)")
        if size < 8:
            raise bad
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > min(_MAX_HEADER, size - 8):
            raise bad
        try:
            header = json.loads(fh.read(n))
            extra = header.pop("__metadata__", None) or {}
            spans = {name: (_BY_NAME[info["dtype"]], info["shape"], *info["data_offsets"]) for name, info in header.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise bad from None
        data = size - 8 - n
        if max((end for *_, end in spans.values()), default=0) != data:
            raise bad
        try:
            meta = json.loads(extra["lmqa"])
        except (KeyError, TypeError, ValueError):
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ContextError(f"{path} is a safetensors file but not an lmqa context")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ContextError(f"{path} has context format version {meta.get('format_version')}; "
                               f"this lmqa ({__version__}) reads version {FORMAT_VERSION}: ingest again")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if data else None
    tensors = {}
    for name, (dtype, shape, start, end) in spans.items():
        count = end - start
        numel = 1
        for dim in shape:
            numel *= dim
        if count != numel * dtype.itemsize:
            raise bad
        tensors[name] = (torch.frombuffer(mm, dtype=dtype, count=numel, offset=8 + n + start).view(shape)
                         if numel else torch.empty(shape, dtype=dtype))
    return meta, tensors


# ----- what a session becomes on disk -----
def _document_json(session: DocumentSession) -> dict[str, Any]:
    doc = session.document
    return {"source": doc.source, "kind": session.kind, "text": doc.text,
            "segments": [asdict(s) for s in doc.segments], "skipped": doc.skipped.by_reason, "warnings": doc.warnings,
            "doc_token_start": session.doc_token_start,
            "sources": [[s.block, s.char_start, s.char_end, s.snippet, [list(asdict(loc).values()) for loc in s.locations]]
                        for s in session.sources.values()],
            "stats": asdict(session.stats) if session.stats else None}


def _document_from(raw: dict[str, Any]) -> tuple[Document, dict[int, BlockSource], IngestStats | None]:
    doc = Document(raw["source"], raw["text"], [Segment(**s) for s in raw["segments"]],
                   SkipReport(raw["skipped"]), list(raw["warnings"]))
    sources = {block: BlockSource(block, start, end, snippet, tuple(Location(*loc) for loc in locs))
               for block, start, end, snippet, locs in raw["sources"]}
    return doc, sources, IngestStats(**raw["stats"]) if raw["stats"] else None


def _settings(engine: LandmarkEngine) -> dict[str, Any]:
    c = engine.config
    return {"landmark_id": c.landmark_id, "block_size": c.block_size, "top_k": c.top_k,
            "train_context": c.train_context, "prefill_chunk": c.prefill_chunk,
            "layers": len(engine.stores), "kv_heads": engine.n_kv, "head_dim": engine.head_dim,
            "dtype": str(engine.dtype).removeprefix("torch.")}


def save(session: DocumentSession, path: Path) -> int:
    """Write the session's document state to path atomically; returns bytes written."""
    engine = session.engine
    mark = session.document_mark
    entries = [_Entry("token_ids", [torch.tensor(session.token_ids, dtype=torch.int64)]),
               _Entry("document", [torch.frombuffer(bytearray(json.dumps(_document_json(session)).encode()), dtype=torch.uint8)])]
    for i, store in enumerate(engine.stores):
        entries += [_Entry(f"layers.{i}.{name}", parts) for name, parts in store.export(mark.n_blocks).items()]
        entries += [_Entry(f"layers.{i}.open_keys", [mark.open_keys[i][0]]),
                    _Entry(f"layers.{i}.open_values", [mark.open_values[i][0]])]
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "lmqa_version": __version__,
            "model": asdict(ModelIdentity.of(session.loaded)), "settings": _settings(engine),
            "kv_dtype": kv_dtype_name(engine.kv_dtype), "n_tokens": mark.n_tokens, "n_blocks": mark.n_blocks}
    return _write(Path(path), entries, meta)


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
    """The file's description (validated, nothing but the header read)."""
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


def load(path: Path, loaded: LoadedModel, offload: str = "cpu") -> DocumentSession:
    """A DocumentSession at the saved document state, block keys/values read
    in place from the file's memory map (see the module docstring)."""
    meta, tensors = _map(Path(path))
    info = _info(path, meta)
    check_compatible(info, loaded)
    engine = LandmarkEngine(loaded.model, loaded.landmark, offload=offload, kv_dtype=parse_kv_dtype(info.kv_dtype))
    try:
        layers = range(info.settings["layers"])
        stores = [engine.new_store({name: tensors[f"layers.{i}.{name}"] for name in _STORE_TENSORS
                                    if f"layers.{i}.{name}" in tensors}) for i in layers]
        engine.restore(stores, [tensors[f"layers.{i}.open_keys"][None] for i in layers],
                       [tensors[f"layers.{i}.open_values"][None] for i in layers], info.n_tokens, RetrievalTrace())
        raw = json.loads(bytes(tensors["document"].numpy()))
        document, sources, stats = _document_from(raw)
        ids = tensors["token_ids"].tolist()
    except (KeyError, ValueError, TypeError) as e:
        raise ContextError(f"{path}: inconsistent context file ({e})") from None
    if engine.n_blocks != info.n_blocks or engine.n_tokens != len(ids):
        raise ContextError(f"{path}: inconsistent context file (block or token counts disagree)")
    return DocumentSession.restored(loaded, engine, document, raw["kind"], ids, raw["doc_token_start"], sources, stats)
