"""Hugging Face hub access: ``--model hf:ORG/NAME[@REV]`` and released weight diffs.

Everything goes through huggingface_hub's snapshot_download, so its cache,
HF_HUB_OFFLINE and HF_TOKEN work as users expect. lmqa fetches only
safetensors weights, configs and tokenizer files: never pickled weights of a
model it loads, never code (no trust_remote_code anywhere).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .manifest import ModelError

HF_PREFIX = "hf:"
# What a LLaMA-family model needs; *.py and *.bin are left out on purpose.
MODEL_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                  "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                  "added_tokens.json", "chat_template.jinja"]
_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'hf:ORG/NAME[@REV]' -> (repo id, revision or None)."""
    repo, _, rev = spec[len(HF_PREFIX):].partition("@")
    if not _REPO.match(repo) or (rev == "" and "@" in spec):
        raise ModelError(f"bad model id {spec!r}: use hf:ORG/NAME or hf:ORG/NAME@REVISION")
    return repo, rev or None


def snapshot(repo: str, revision: str | None, patterns: list[str]) -> Path:
    """A local snapshot of the files of `repo` matching `patterns` (downloaded
    once into the hub cache; offline, only what the cache holds)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, IncompleteSnapshotError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = f"{repo}@{revision}" if revision else repo
    # offline, read only the cache: some huggingface_hub releases still ask the hub for the file list and fail
    offline = constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=offline))
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise ModelError(f"{where}: no such repository or revision on the Hugging Face hub ({type(err).__name__})") from None
    except IncompleteSnapshotError:
        raise ModelError(f"the cached snapshot of {where} is incomplete and the hub cannot be reached") from None
    except LocalEntryNotFoundError:
        raise ModelError(f"{where} is not in the local Hugging Face cache and the hub cannot be reached "
                         "(offline: HF_HUB_OFFLINE=1, or no network)") from None
    except (HfHubHTTPError, OSError) as err:
        raise ModelError(f"could not download {where}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def model_snapshot(spec: str) -> Path:
    """The local directory of an ``hf:`` model: safetensors weights or a clear refusal."""
    repo, revision = parse_spec(spec)
    folder = snapshot(repo, revision, MODEL_PATTERNS)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{spec}: no config.json: not a transformers model repository")
    if not any(folder.glob("*.safetensors")):
        raise ModelError(f"{spec} has no .safetensors weights; lmqa loads only safetensors (PyTorch .bin files "
                         "are pickles that can run code): use a repository or revision with safetensors")
    return folder


def git_blob_sha1(path: Path) -> str:
    """The id git (and the hub, for files outside LFS) gives a file's content."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hub_recorded_digest(path: Path) -> tuple[str, str] | None:
    """What the hub said about a file when huggingface_hub cached it: ("sha256",
    hex) for LFS files, ("git-sha1", hex) for small ones; None outside a hub cache.

    huggingface_hub names each cached blob by the ETag the hub served: the LFS
    object's sha256, or the git blob id.
    """
    if not path.is_symlink():
        return None
    blob = path.resolve()
    if blob.parent.name != "blobs":
        return None
    if re.fullmatch(r"[0-9a-f]{64}", blob.name):
        return "sha256", blob.name
    if re.fullmatch(r"[0-9a-f]{40}", blob.name):
        return "git-sha1", blob.name
    return None
