"""`lmqa bench`, `lmqa models` and the full-attention passkey baseline."""

from __future__ import annotations

import re

import torch
from typer.testing import CliRunner

from lmqa.evaluation.bench import bench_engine, bench_full
from lmqa.cli import app
from lmqa.model.manifest import DEFAULT_MODEL, list_manifests

from conftest import make_tiny_llama
from test_cli import passkey_with_known_answers
from test_engine import make_engine, random_ids


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_bench_table_skips_full_attention_past_max_full(tiny_model_dir):
    res = invoke("bench", "-m", tiny_model_dir, "--lengths", "200,400", "--max-full", 300, "--new-tokens", 2,
                 "--device", "cpu")
    assert res.exit_code == 0, res.output
    rows = re.findall(r"│\s+(landmark|full)\s+│\s+([\d,]+)\s+│", res.output)
    assert [(m, int(n.replace(",", ""))) for m, n in rows] == [("landmark", 200), ("full", 200), ("landmark", 400)]
    assert "engine decode at 400 tokens is" in res.output


def test_bench_rejects_bad_lengths(tiny_model_dir):
    for lengths in ("2k,8k", "10"):
        res = invoke("bench", "-m", tiny_model_dir, "--lengths", lengths)
        assert res.exit_code == 1 and "error:" in res.output and "Traceback" not in res.output, res.output


def test_bench_cache_sizes_are_the_stored_keys_and_values():
    model = make_tiny_llama(vocab=128, layers=2, kv_heads=2, seed=3)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    ids, new = random_ids(100, seed=1), 3
    full = bench_full(model, ids, new)
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4  # fp32 key + value
    assert full.cache_mib * 2**20 == per_token * (len(ids) + new)
    b = 8
    engine = make_engine(model, b, top_k=2, chunk=2 * (b + 1))
    row = bench_engine(engine, ids, new)
    blocks = (len(ids) + new) // b
    landmark_keys = cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4 * blocks
    assert row.cache_mib * 2**20 == per_token * blocks * b + landmark_keys
    assert engine.n_blocks == 0  # the bench leaves the engine empty


def test_models_list_marks_the_default():
    res = invoke("models", "list")
    assert res.exit_code == 0, res.output
    for m in list_manifests():
        assert m.name in res.output
    assert f"{DEFAULT_MODEL} *" in res.output


def test_models_pull_unknown_is_a_clean_error():
    res = invoke("models", "pull", "no-such-model")
    assert res.exit_code == 1 and "unknown model 'no-such-model'" in res.output and "Traceback" not in res.output


def test_passkey_full_attention_baseline(tiny_model_dir, monkeypatch):
    """--attention full runs transformers' generation (here with known answers:
    the first right, the second wrong) and scores it like the engine's."""
    res, keys = passkey_with_known_answers(CliRunner(), monkeypatch, tiny_model_dir, ["right", "wrong"],
                                           "--attention", "full")
    flat = " ".join(res.output.split())
    assert "full attention" in flat and "accuracy: 1/2 = 50% at 200 tokens" in flat
    assert f"trial 2: key {keys[1]}, answer {keys[1] + 1} (wrong)" in flat
    monkeypatch.undo()
    res = invoke("passkey", "-m", tiny_model_dir, "--length", 200, "--trials", 1, "--attention", "full", "--device", "cpu")
    assert res.exit_code == 0 and re.search(r"accuracy: \d/1 = \d+% at 200 tokens", res.output), res.output
    res = invoke("passkey", "-m", tiny_model_dir, "--length", 200, "--attention", "sparse")
    assert res.exit_code == 1 and "--attention must be landmark or full" in res.output
