"""Weight-diff recovery (the paper's 7B, in miniature), hf: model ids, and their errors.

A tiny random LLaMA plays LLaMA-7B; a "tuned" copy with the two added tokens
plays the released model, and the test makes the diff the way the release's
make_diff did (fp32 .bin shards, rotary buffers included). Hub tests build a
huggingface_hub cache by hand and run offline (conftest sets HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import lmqa.model.loading as loading
from lmqa.cli import app
from lmqa.model.hub import git_blob_sha1
from lmqa.model.manifest import ModelError

from conftest import make_tiny_llama, save_tiny_model_dir
from test_loading import models_dir  # noqa: F401  (a fixture)

ADDED = ["[PAD]", "<landmark>"]
LFS = (".bin", ".safetensors", ".model")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def grown(raw: torch.Tensor) -> torch.Tensor:
    """The release's vocabulary growth: new rows = mean of the old rows (float32)."""
    return torch.cat([raw, raw.mean(0, keepdim=True).expand(len(ADDED), -1)])


@pytest.fixture(scope="module")
def release(tmp_path_factory, tiny_tokenizer_dir):
    """(base dir, diff dir, expected recovered tensors, tuned tensors, expected float32 sum)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("release")
    base_dir = save_tiny_model_dir(root / "base", tiny_tokenizer_dir, seed=1)
    raw = load_file(base_dir / "model.safetensors")
    cfg = json.loads((base_dir / "config.json").read_text())
    torch.manual_seed(7)
    resized = {k: grown(v) if k in ("model.embed_tokens.weight", "lm_head.weight") else v for k, v in raw.items()}
    tuned = {k: v + 0.01 * torch.randn_like(v) for k, v in resized.items()}
    names = sorted(resized)
    dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    # transformers 4.29 saved each layer's rotary buffer; in the diff it is tuned - raw = 0
    shards[0] = shards[0] + [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(cfg["num_hidden_layers"])]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))

    diff_dir = root / "diff"
    diff_dir.mkdir()
    expected, weight_map, total = {}, {}, torch.zeros(())
    for i, shard in enumerate(shards, 1):
        fname = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        part = {}
        for name in shard:
            if name.endswith("inv_freq"):
                part[name] = torch.zeros(dim // 2)
                total += (part[name] + inv_freq).sum()
            else:
                part[name] = tuned[name] - resized[name]
                expected[name] = part[name] + resized[name]
                total += expected[name].sum()
            weight_map[name] = fname
        torch.save(part, diff_dir / fname)
    (diff_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (diff_dir / "config.json").write_text(json.dumps(dict(cfg, vocab_size=cfg["vocab_size"] + len(ADDED))))
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.add_special_tokens({"pad_token": ADDED[0], "additional_special_tokens": [ADDED[1]]})
    tok.save_pretrained(diff_dir)
    return base_dir, diff_dir, expected, tuned, float(total), cfg["vocab_size"]


MANIFEST = """\
name = "tiny-diff"
description = "test"

[diff]
repo = "test-org/tiny-wdiff"
revision = "{revision}"
base = "the tiny test base"
added_tokens = ["[PAD]", "<landmark>"]
dtype = "float32"

[diff.files]
{files}

[diff.check]
param_sum = {param_sum!r}
tolerance = 1e-3

[landmark]
token = "<landmark>"
id = {landmark_id}
block_size = 7
top_k = 3
train_context = 128

[prompt]
format = "plain"
"""


def write_manifest(models_dir: Path, release, files: dict[str, str], revision: str = "c" * 40) -> None:
    _, _, _, _, total, vocab = release
    (models_dir / "tiny-diff").mkdir(parents=True, exist_ok=True)
    lines = "\n".join(f'"{name}" = "{digest}"' for name, digest in sorted(files.items()))
    (models_dir / "tiny-diff" / "manifest.toml").write_text(MANIFEST.format(
        revision=revision, files=lines, param_sum=total, landmark_id=vocab + 1))


@pytest.fixture
def diff_copy(tmp_path, release):
    """A private copy of the diff that a test may damage, and the manifest's sha256 of each file."""
    d = tmp_path / "diff"
    shutil.copytree(release[1], d)
    return d, {f.name: sha(f) for f in d.iterdir()}


def pull(*args: str):
    return CliRunner().invoke(app, ["models", "pull", "tiny-diff", *args])


def assert_one_line_error(result, *needles: str):
    """Exit 1, no traceback, the error on one line after any progress lines."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output and lines[-1].startswith("error: "), result.output
    assert not any(line.startswith("error") for line in lines[:-1]), result.output
    for needle in needles:
        assert needle in lines[-1], result.output


def test_recover_bit_exact_and_load(models_dir, release, diff_copy, isolated_cache):
    base_dir, _, expected, tuned, total, vocab = release
    diff_dir, files = diff_copy
    write_manifest(models_dir, release, files)
    result = pull("--base", str(base_dir), "--diff", str(diff_dir))
    assert result.exit_code == 0, result.output

    out = next((isolated_cache / "recovered").iterdir())
    got = {}
    for f in sorted(out.glob("model-*.safetensors")):
        got.update(load_file(f))
    assert len(list(out.glob("model-*.safetensors"))) == 2  # one output shard per diff shard
    assert sorted(got) == sorted(expected)  # rotary buffers counted in the sum, not stored
    for name, want in expected.items():
        assert torch.equal(got[name], want), name  # bit-exact: the release's float32 base + diff
        assert torch.allclose(got[name], tuned[name], atol=1e-6), name
    stamp = json.loads((out / loading.STAMP).read_text())
    assert abs(stamp["param_sum"] - total) < 1e-3
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["mem_id"], cfg["mem_freq"], cfg["train_context_length"]) == (vocab + 1, 7, 128)

    loaded = loading.load_model("tiny-diff", device="cpu", dtype="float32", log=lambda m: None)
    assert loaded.trained and loaded.prompt_format == "plain"
    assert (loaded.landmark.landmark_id, loaded.landmark.block_size, loaded.landmark.top_k) == (vocab + 1, 7, 3)
    assert loaded.model.get_input_embeddings().weight.shape[0] == vocab + 2  # nothing added at load
    assert torch.equal(loaded.model.model.embed_tokens.weight, expected["model.embed_tokens.weight"])

    again = pull()  # no --base: the recovered cache is re-verified in full
    assert again.exit_code == 0 and "checksums verified" in again.output


def test_unrecovered_model_says_how_to_pull(models_dir, release, diff_copy):
    write_manifest(models_dir, release, diff_copy[1])
    with pytest.raises(ModelError, match="models pull tiny-diff --base DIR"):
        loading.load_model("tiny-diff", device="cpu", log=lambda m: None)
    assert_one_line_error(pull(), "pass --base DIR")


def test_wrong_base_shape(models_dir, release, diff_copy, tmp_path):
    diff_dir, files = diff_copy
    write_manifest(models_dir, release, files)
    other = tmp_path / "other-base"
    make_tiny_llama(vocab=release[5], hidden=32).save_pretrained(other)
    assert_one_line_error(pull("--base", str(other), "--diff", str(diff_dir)), "hidden_size 32", "needs 64")
    vocab = tmp_path / "vocab-base"
    make_tiny_llama(vocab=release[5] + 2).save_pretrained(vocab)
    assert_one_line_error(pull("--base", str(vocab), "--diff", str(diff_dir)), "vocabulary")
    assert_one_line_error(pull("--base", str(tmp_path / "nowhere"), "--diff", str(diff_dir)), "config.json")


def test_wrong_base_weights_fail_the_parameter_sum(models_dir, release, diff_copy, tmp_path, isolated_cache):
    diff_dir, files = diff_copy
    write_manifest(models_dir, release, files)
    impostor = tmp_path / "impostor"  # same shapes, other weights
    tok_dir = release[0]
    save_tiny_model_dir(impostor, tok_dir, seed=2)
    assert_one_line_error(pull("--base", str(impostor), "--diff", str(diff_dir)), "sum to", "not the one")
    assert not any((isolated_cache / "recovered").glob("tiny-diff*"))  # nothing half-written left behind


def test_missing_and_tampered_diff_files(models_dir, release, diff_copy):
    diff_dir, files = diff_copy
    write_manifest(models_dir, release, files)
    intact = (diff_dir / "config.json").read_text()
    (diff_dir / "config.json").write_text(intact + " ")
    assert_one_line_error(pull("--base", str(release[0]), "--diff", str(diff_dir)), "checksum mismatch", "config.json")
    (diff_dir / "config.json").write_text(intact)
    (diff_dir / "pytorch_model-00002-of-00002.bin").unlink()
    assert_one_line_error(pull("--base", str(release[0]), "--diff", str(diff_dir)),
                          "pytorch_model-00002-of-00002.bin is missing")


def test_pickled_code_in_a_bin_diff_is_refused(models_dir, release, diff_copy):
    """weights_only=True: a .bin that would run code when unpickled is an error, not an execution."""
    diff_dir, _ = diff_copy
    torch.save({"x": Path("/")}, diff_dir / "pytorch_model-00002-of-00002.bin")  # an arbitrary object
    write_manifest(models_dir, release, {f.name: sha(f) for f in diff_dir.iterdir()})
    assert_one_line_error(pull("--base", str(release[0]), "--diff", str(diff_dir)), "plain PyTorch weights")


# ----- a hand-made huggingface_hub cache -----
def hub_repo(cache: Path, repo: str, files: dict[str, bytes], commit: str = "f" * 40) -> str:
    """Lay files out as huggingface_hub caches them: blobs named by the hub's ETag
    (LFS sha256, else git blob id), snapshot symlinks, refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for name, data in files.items():
        tmp = root / "incoming"
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "f").write_bytes(data)
        digest = hashlib.sha256(data).hexdigest() if name.endswith(LFS) else git_blob_sha1(tmp / "f")
        blob = root / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / "f", blob)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    shutil.rmtree(root / "incoming", ignore_errors=True)
    return commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_diff_from_hub_cache_checked_against_hub_records(models_dir, release, hub_cache, isolated_cache):
    diff_dir = release[1]
    files = {f.name: f.read_bytes() for f in diff_dir.iterdir()}
    commit = hub_repo(hub_cache, "test-org/tiny-wdiff", files)
    write_manifest(models_dir, release, {name: "" for name in files}, revision=commit)  # no published sha256
    result = pull("--base", str(release[0]))
    assert result.exit_code == 0, result.output
    # a blob that no longer matches what the hub reported is refused
    blob = (hub_cache / "models--test-org--tiny-wdiff" / "snapshots" / commit / "tokenizer_config.json").resolve()
    blob.write_bytes(blob.read_bytes() + b" ")
    assert_one_line_error(pull("--base", str(release[0])), "checksum mismatch", "git-sha1", "hub's record")


def test_hf_model_ids_resolve_offline(hub_cache, tiny_model_dir):
    files = {f.name: f.read_bytes() for f in tiny_model_dir.iterdir()}
    commit = hub_repo(hub_cache, "test-org/tiny-llama", files)
    for spec in ("hf:test-org/tiny-llama", f"hf:test-org/tiny-llama@{commit}"):
        where, manifest, gguf, adapter = loading.resolve(spec)
        assert where == hub_cache / "models--test-org--tiny-llama" / "snapshots" / commit
        assert (manifest, gguf, adapter) == (None, None, None)
    loaded = loading.load_model("hf:test-org/tiny-llama", device="cpu", block_size=8, log=lambda m: None)
    assert loaded.name == "hf:test-org/tiny-llama" and not loaded.trained

    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        loading.resolve("hf:test-org/absent")
    with pytest.raises(ModelError, match="bad model id"):
        loading.resolve("hf:no-slash")


def test_hf_bin_only_repo_is_refused(hub_cache, tmp_path):
    model = make_tiny_llama()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    hub_repo(hub_cache, "test-org/bin-only", {"config.json": json.dumps(model.config.to_dict()).encode(),
                                              "pytorch_model.bin": (tmp_path / "pytorch_model.bin").read_bytes()})
    result = CliRunner().invoke(app, ["passkey", "--model", "hf:test-org/bin-only", "--length", "200"])
    assert_one_line_error(result, "no .safetensors weights", "only safetensors")
    assert not list(hub_cache.glob("models--test-org--bin-only/snapshots/*/pytorch_model.bin.incomplete"))


def test_adapter_over_hf_base(hub_cache, tiny_model_dir, tmp_path):
    """An `lmqa train` adapter whose base is an hf: id loads with its recorded settings."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hub_repo(hub_cache, "test-org/tiny-llama", {f.name: f.read_bytes() for f in tiny_model_dir.iterdir()})
    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(adapter)
    (adapter / loading.ADAPTER_META).write_text(json.dumps({"base": "hf:test-org/tiny-llama", "block_size": 5}))
    loaded = loading.load_model(str(adapter), device="cpu", log=lambda m: None)
    assert loaded.trained and loaded.landmark.block_size == 5
    assert not any("lora" in n for n, _ in loaded.model.named_modules())
