"""`lmqa train` end to end on a tiny model: adapter, losses, plot, recorded
settings; a resumed run equals an uninterrupted one (weights, AdamW state,
losses); the exported adapter loads back with `--model DIR` and
gives the trained model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lmqa.cli import app
from lmqa.model.loading import load_model
from lmqa.train.finetune import add_lora

from conftest import CORPUS

LORA_RANK = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("train-data")
    (d / "book.txt").write_text(" ".join(CORPUS * 40))
    return d


def train(data, out, model_dir, steps, rank=LORA_RANK):
    """One `lmqa train` run. The LoRA matrices are initialised from torch's
    global RNG before --seed is applied, so both runs compared here seed it
    alike (the resumed run loads its weights from the checkpoint anyway)."""
    torch.manual_seed(0)
    args = ["train", str(data), "-o", str(out), "--model", str(model_dir), "--device", "cpu", "--steps", str(steps),
            "--context", "64", "--batch-size", "2", "--save-every", "1", "--block-size", "7", "--lr", "0.05",
            "--lora-rank", str(rank), "--synthetic-rate", "0.5"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return res


def checkpoint(out):
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    return load_file(out / "checkpoint" / "state.safetensors"), meta


def test_resume_equals_an_uninterrupted_run(tmp_path, data, tiny_model_dir):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(data, straight, tiny_model_dir, 4)
    train(data, resumed, tiny_model_dir, 2)
    res = train(data, resumed, tiny_model_dir, 4)
    assert "resuming from step 2" in res.output

    losses = json.loads((straight / "losses.json").read_text())
    assert len(losses) == 4 and json.loads((resumed / "losses.json").read_text()) == losses
    want, want_meta = checkpoint(straight)
    got, got_meta = checkpoint(resumed)
    assert got_meta["step"] == want_meta["step"] == 4
    assert got_meta["num_processes"] == want_meta["num_processes"] == 1
    assert set(got) == set(want)
    assert any(k.startswith("opt/") and k.endswith("/exp_avg_sq") for k in want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert (tmp_path / "straight" / "adapter" / "adapter_model.safetensors").is_file()
    assert (straight / "loss.png").is_file()
    runs = [json.loads(line) for line in (resumed / "runs.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in runs] == [2, 4]
    assert runs[0]["data"] == [str(data)] and runs[0]["context"] == 64 and runs[0]["block_size"] == 7


def test_exported_adapter_gives_the_trained_logits(tmp_path, data, tiny_model_dir):
    """The trained model is rebuilt from the last checkpoint (base + LoRA +
    landmark row, float32); `--model adapter/` (fp16 adapter, merged) must give
    its logits, and both must differ from the untrained base."""
    out = tmp_path / "run"
    train(data, out, tiny_model_dir, 3)
    state, _ = checkpoint(out)

    trained = load_model(str(tiny_model_dir), device="cpu", block_size=7, log=lambda m: None, dtype="float32")
    landmark = trained.landmark.landmark_id
    base_model = load_model(str(tiny_model_dir), device="cpu", block_size=7, log=lambda m: None, dtype="float32").model
    peft = add_lora(trained.model, landmark, LORA_RANK, 2 * LORA_RANK)
    params = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    assert set(params) == {k[len("param/"):] for k in state if k.startswith("param/")}
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[f"param/{name}"])
    peft.eval()

    exported = load_model(str(out / "adapter"), device="cpu", log=lambda m: None, dtype="float32")
    assert exported.landmark.landmark_id == landmark and exported.landmark.block_size == 7
    tok = exported.tokenizer
    ids = tok("The sky is blue. The pass key is 12345.", add_special_tokens=False).input_ids
    ids = torch.tensor([ids[:7] + [landmark] + ids[7:]])  # the trained landmark row is used too
    with torch.no_grad():
        want = peft(input_ids=ids).logits
        got = exported.model(input_ids=ids).logits
        base = base_model(input_ids=ids).logits
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-3 * scale  # the adapter is saved in fp16
    assert (base - want).abs().max() > 1e-2 * scale


def test_init_adapter_that_does_not_fit_is_one_clean_line(data, tiny_model_dir, tmp_path):
    """--init-adapter from a missing file or an adapter of another shape: one
    line naming the flag, no traceback, no training."""
    from safetensors.torch import save_file

    from test_cli import assert_clean_error

    args = ["train", str(data), "-o", str(tmp_path / "run"), "--model", str(tiny_model_dir), "--device", "cpu",
            "--steps", "1", "--context", "64", "--batch-size", "1", "--block-size", "7", "--lora-rank", str(LORA_RANK)]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(CliRunner().invoke(app, args + ["--init-adapter", str(empty)]), "no adapter_model.safetensors")
    other = tmp_path / "other"
    other.mkdir()
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(LORA_RANK, 64)},
              other / "adapter_model.safetensors")  # one tensor of a LoRA: the others are missing
    assert_clean_error(CliRunner().invoke(app, args + ["--init-adapter", str(other)]), "--init-adapter", "missing")
    # a whole adapter of another rank: every tensor is there, with other sizes
    bigger = tmp_path / "bigger"
    train(data, bigger, tiny_model_dir, 1, rank=LORA_RANK + 2)
    assert_clean_error(CliRunner().invoke(app, args + ["--init-adapter", str(bigger / "adapter")]),
                       "--init-adapter", "has size")
    assert not (tmp_path / "run" / "adapter").exists()
