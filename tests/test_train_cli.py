"""`lmqa train` end to end on a tiny model: adapter, losses, plot, recorded settings, resume."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from lmqa.cli import app

from conftest import CORPUS


def test_train_writes_adapter_and_resumes(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "book.txt").write_text(" ".join(CORPUS * 40))
    out = tmp_path / "run"
    args = ["train", str(data), "-o", str(out), "--model", str(tiny_model_dir), "--device", "cpu", "--steps", "2",
            "--context", "64", "--batch-size", "2", "--save-every", "1", "--block-size", "7"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "loss.png").is_file()
    assert len(json.loads((out / "losses.json").read_text())) == 2
    res = CliRunner().invoke(app, args[:9] + ["4"] + args[10:])  # more steps: resumes at step 2
    assert res.exit_code == 0, res.output
    assert "resuming from step 2" in res.output
    assert len(json.loads((out / "losses.json").read_text())) == 4
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in runs] == [2, 4]
    assert runs[0]["data"] == [str(data)] and runs[0]["context"] == 64 and runs[0]["block_size"] == 7
