"""Recover a model released as a weight diff: the paper's landmark LLaMA 7B.

The authors could not redistribute LLaMA, so they published fine-tuned minus
original weights. Their recovery (``llama/weight_diff.py`` in
epfml/landmark-attention) loads both whole models in float32 (some 54 GB);
this one streams tensor by tensor and writes one output shard per diff shard,
so host memory stays within one shard. The arithmetic is the same: the base
vocabulary grows by the added tokens with rows equal to the mean of the old
rows, each weight is diff + base in float32, and the float32 sum of all
recovered parameters (taken in the diff's own tensor order, as their state
dict had it) must match the released value, which catches a wrong base or a
damaged diff that the file checksums cannot (the base has no canonical
checksum: LLaMA-7B conversions differ in dtype and sharding).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from . import hub, loading
from .manifest import Manifest, ModelError

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")  # grow by the added tokens
ROTARY_BUFFER = "rotary_emb.inv_freq"  # saved by transformers < 4.31; recomputed, not stored
STRUCTURE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
COPIED = ("generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
          "special_tokens_map.json", "added_tokens.json")
INDEX = "model.safetensors.index.json"


class Checkpoint:
    """The tensors of a Hugging Face model directory, read one at a time.

    safetensors are memory-mapped; PyTorch .bin files are read only with
    torch.load(weights_only=True) (no code runs) and memory-mapped as well.
    """

    def __init__(self, directory: Path, label: str):
        self.label = label
        files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
        files = [f for f in files if f.name != "training_args.bin"]
        if not files:
            raise ModelError(f"{label} {directory}: no .safetensors or .bin weights")
        self.files = files
        self._where: dict[str, Path] = {}
        for f in files:
            for name in self._names(f):
                self._where[name] = f
        self._open: tuple[Path, dict] | None = None

    @staticmethod
    def _names(path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, "pt") as fh:
                return list(fh.keys())
        return list(Checkpoint._load_bin(path))

    @staticmethod
    def _load_bin(path: Path) -> dict:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # an unpickling refusal, a truncated zip, ...: all mean "bad file"
            raise ModelError(f"cannot read {path.name} as plain PyTorch weights: {str(err).splitlines()[0]}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def tensors(self, path: Path):
        """(name, tensor) of one file, in the order the file stores them."""
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, "pt") as fh:
                for name in fh.keys():
                    yield name, fh.get_tensor(name)
        else:
            yield from self._load_bin(path).items()

    def get(self, name: str) -> torch.Tensor:
        path = self._where[name]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, "pt") as fh:
                return fh.get_tensor(name)
        if self._open is None or self._open[0] != path:
            self._open = (path, self._load_bin(path))
        return self._open[1][name]


def verify_recovered(manifest: Manifest) -> bool:
    """Full check of a recovered cache against the sha256 recorded when it was written."""
    out = loading.recovered(manifest)
    if out is None:
        return False
    files = json.loads((out / loading.STAMP).read_text())["files"]
    return all(loading.sha256_file(out / name) == meta["sha256"] for name, meta in files.items())


def verify_diff_files(directory: Path, expected: dict[str, str], log=print) -> None:
    """Every diff file present, and equal to the manifest's sha256 or, where the
    manifest has none, to what the hub reported when huggingface_hub cached it."""
    for name, digest in expected.items():
        path = directory / name
        if not path.is_file():
            raise ModelError(f"weight diff file {name} is missing from {directory}")
        recorded = hub.hub_recorded_digest(path)
        if digest:
            kind, want, label = "sha256", digest, "the manifest's"
        elif recorded:
            (kind, want), label = recorded, "the hub's"
        else:
            log(f"{name}: no published checksum and not from the hub cache; the parameter sum checks the weights")
            continue
        got = loading.sha256_file(path) if kind == "sha256" else hub.git_blob_sha1(path)
        if got != want:
            raise ModelError(f"checksum mismatch for weight diff file {name} ({kind} {got[:12]}..., "
                             f"{label} record says {want[:12]}...): refusing to use it")


def _config(directory: Path, label: str) -> dict:
    try:
        return json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{label} {directory}: no readable config.json ({type(err).__name__}): "
                         "not a Hugging Face model directory") from None


def check_base(base_cfg: dict, diff_cfg: dict, manifest: Manifest) -> None:
    """Refuse a base that is not the model the diff was made against, before any heavy work."""
    want = manifest.diff.base_description
    if base_cfg.get("model_type") != "llama":
        raise ModelError(f"--base is a {base_cfg.get('model_type')!r} model; {manifest.name} needs {want}")
    for key in STRUCTURE:
        fallback = "num_attention_heads" if key == "num_key_value_heads" else key
        got, need = base_cfg.get(key, base_cfg.get(fallback)), diff_cfg.get(key, diff_cfg.get(fallback))
        if got != need:
            raise ModelError(f"--base has {key} {got}, the diff needs {need}: {manifest.name} needs {want}")
    vocab = diff_cfg["vocab_size"] - len(manifest.diff.added_tokens)
    if base_cfg.get("vocab_size") != vocab:
        raise ModelError(f"--base has a {base_cfg.get('vocab_size')}-token vocabulary, the diff needs {vocab} "
                         f"(before adding {', '.join(manifest.diff.added_tokens)}): {manifest.name} needs {want}")


def rotary_inv_freq(cfg: dict) -> torch.Tensor:
    """The rotary buffer old transformers saved with every LLaMA layer (and that the
    released checksum therefore counts), for bases converted without it."""
    dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return 1.0 / (cfg.get("rope_theta", 10000.0) ** (torch.arange(0, dim, 2).float() / dim))


def base_tensor(base: Checkpoint, name: str, shape: torch.Size, added: int, cfg: dict) -> torch.Tensor:
    """The float32 base tensor the diff applies to, with vocabulary rows added as the release did."""
    if name.endswith(ROTARY_BUFFER) and name not in base:
        return rotary_inv_freq(cfg)
    if name not in base:
        raise ModelError(f"--base has no tensor {name}: not the model the diff was made against")
    raw = base.get(name).float()
    if name in VOCAB_TENSORS:
        if raw.shape[0] + added != shape[0]:
            raise ModelError(f"--base {name} has {raw.shape[0]} rows; the diff needs {shape[0] - added}")
        raw = torch.cat([raw, raw.mean(dim=0, keepdim=True).expand(added, -1)])
    if raw.shape != shape:
        raise ModelError(f"--base {name} has shape {tuple(raw.shape)}, the diff {tuple(shape)}: "
                         "not the model the diff was made against")
    return raw


def _check_disk(out_parent: Path, diff: Checkpoint, dtype: torch.dtype) -> None:
    need = sum(f.stat().st_size for f in diff.files) * torch.finfo(dtype).bits // 32
    free = shutil.disk_usage(out_parent).free
    if free < need * 1.05:
        raise ModelError(f"recovery needs about {need / 2**30:.1f} GiB in {out_parent}, only "
                         f"{free / 2**30:.1f} GiB free (LMQA_CACHE moves the cache)")


def add_diff(base_dir: Path, diff_dir: Path, manifest: Manifest, out: Path, log=print) -> float:
    """Write base + diff as safetensors shards into `out`; return the float32 parameter sum."""
    from safetensors.torch import save_file

    base_cfg, diff_cfg = _config(base_dir, "--base"), _config(diff_dir, "weight diff")
    check_base(base_cfg, diff_cfg, manifest)
    base, diff = Checkpoint(base_dir, "--base"), Checkpoint(diff_dir, "weight diff")
    dtype = loading.DTYPES[manifest.diff.dtype]
    _check_disk(out.parent, diff, dtype)
    added = len(manifest.diff.added_tokens)
    total = torch.zeros((), dtype=torch.float32)
    weight_map, size = {}, 0
    for i, shard in enumerate(diff.files, 1):
        log(f"adding {shard.name} to the base ({i}/{len(diff.files)})")
        name_out = f"model-{i:05d}-of-{len(diff.files):05d}.safetensors"
        tensors = {}
        for name, delta in diff.tensors(shard):
            weight = delta.float() + base_tensor(base, name, delta.shape, added, base_cfg)
            total += weight.sum()
            if not name.endswith(ROTARY_BUFFER):
                tensors[name] = weight.to(dtype).contiguous()
                weight_map[name] = name_out
                size += tensors[name].numel() * tensors[name].element_size()
        save_file(tensors, out / name_out, metadata={"format": "pt"})
        del tensors
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=1))
    cfg = dict(diff_cfg, mem_id=manifest.landmark_id, mem_freq=manifest.block_size,
               train_context_length=manifest.train_context, torch_dtype=manifest.diff.dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in COPIED:
        if (diff_dir / name).is_file():
            shutil.copyfile(diff_dir / name, out / name)
    return float(total)


def recover(manifest: Manifest, base_dir: Path, diff_dir: Path | None = None, log=print) -> Path:
    """Recover `manifest`'s model from the user's base and the released diff (the
    hub's, through its cache, unless `diff_dir` is given) into the lmqa cache."""
    spec = manifest.diff
    if diff_dir is None:
        log(f"fetching the weight diff {spec.repo} (once; huggingface_hub caches it)")
        diff_dir = hub.snapshot(spec.repo, spec.revision, list(spec.files))
    verify_diff_files(diff_dir, spec.files, log)

    def write(tmp: Path) -> dict:
        total = add_diff(Path(base_dir), diff_dir, manifest, tmp, log)
        if abs(total - spec.param_sum) > spec.param_sum_tolerance:
            raise ModelError(f"recovered parameters sum to {total:.4f}, the release's check is {spec.param_sum} "
                             f"(within {spec.param_sum_tolerance}): the base or the diff is not the one "
                             f"{manifest.name} was made from")
        log("recording checksums of the recovered weights")
        files = {f.name: {"size": f.stat().st_size, "sha256": loading.sha256_file(f)}
                 for f in sorted(tmp.iterdir()) if f.is_file()}
        return {"source": f"{spec.repo}@{spec.revision}", "param_sum": total, "files": files}

    return loading.write_cache(loading.recovered_dir(manifest), write)
