"""Books and codebases as one document, and the way back from a block to its source.

ingest() turns a path into a Document (text plus file/chapter/page segments);
tokenize_document() and build_source_map() tie each landmark block to the
lines it holds; estimate() sizes the cache before a model is loaded.
"""

from .codebase import DEFAULT_MAX_FILE_BYTES
from .dispatch import SUPPORTED, ingest
from .document import Document, IngestError, Segment, SkipReport
from .estimate import Estimate, estimate, kv_cache_bytes
from .source_map import BlockSource, Location, build_source_map, tokenize_document

__all__ = [
    "DEFAULT_MAX_FILE_BYTES", "SUPPORTED", "BlockSource", "Document", "Estimate", "IngestError", "Location",
    "Segment", "SkipReport", "build_source_map", "estimate", "ingest", "kv_cache_bytes", "tokenize_document",
]
