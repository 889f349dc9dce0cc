"""CLI smoke tests with a tiny offline model (typer's CliRunner)."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from typer.testing import CliRunner

import lmqa
import lmqa.model.loading as loading
from lmqa.cli import app
from lmqa.model.manifest import DEFAULT_MODEL, find_manifest


@pytest.fixture
def runner():
    return CliRunner()


def run(runner, *args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def assert_ok(res):
    assert res.exit_code == 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output


def error_text(res) -> str:
    """The error message: from "error:" to the end of the output, hard wraps undone
    (rich wraps at the console width; test_long_error_is_one_line checks that separately)."""
    out = res.output
    start = out.rfind("\nerror:") + 1 if not out.startswith("error:") else 0
    assert out[start:].startswith("error:"), out
    return out[start:].rstrip("\n").replace("\n", "")


def assert_clean_error(res, *fragments, code=1):
    """Non-zero exit, no traceback, one "error:" message holding every fragment
    (at least one: an error that says nothing useful must not pass)."""
    assert fragments, "name what the error message must say"
    out = res.output
    assert res.exit_code == code, out
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in out
    assert out.count("error:") == 1, out
    text = error_text(res)
    for frag in fragments:
        assert frag in text, f"{frag!r} not in the error message:\n{out}"


@pytest.fixture(scope="module")
def doc_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("docs") / "doc.txt"
    p.write_text("The sky is blue. The grass is green. The pass key is 4711. " * 12)
    return p


# ----- basics -----
def test_version(runner):
    res = run(runner, "--version")
    assert_ok(res)
    assert res.output.strip() == f"lmqa {lmqa.__version__}"


def test_help(runner):
    res = run(runner, "--help")
    assert_ok(res)
    for command in ("passkey", "ask", "models"):
        assert command in res.output


def test_command_help(runner):
    for command in ("passkey", "ask"):
        res = run(runner, command, "--help")
        assert_ok(res)
        assert "--model" in res.output


# ----- working runs on the tiny model -----
class KnownAnswers:
    """Stands in for a generation function: reads the key from the prompt and
    answers as scripted per trial ("right", "wrong" or "none"), in the
    token ids a model would produce, so the CLI's scoring is what is tested."""

    def __init__(self, tokenizer, script):
        self.tok, self.script, self.keys = tokenizer, list(script), []

    def __call__(self, engine_or_model, ids, *args, **kwargs):
        key = int(re.search(r"The pass key is (\d+)\.", self.tok.decode(ids)).group(1))
        self.keys.append(key)
        text = {"right": f" {key}. Remember it.", "wrong": f" {key + 1}.", "none": " I do not know."}[self.script.pop(0)]
        return self.tok(text, add_special_tokens=False).input_ids


def passkey_with_known_answers(runner, monkeypatch, model_dir, script, *args):
    """`lmqa passkey` over len(script) trials with generation replaced by KnownAnswers;
    returns (result, the keys the prompts held)."""
    from transformers import AutoTokenizer

    import lmqa.engine.generation

    known = KnownAnswers(AutoTokenizer.from_pretrained(model_dir), script)
    monkeypatch.setattr(lmqa.engine.generation, "generate", known)
    monkeypatch.setattr(lmqa.engine.generation, "generate_full_attention", known)
    res = run(runner, "passkey", "--model", model_dir, "--length", 200, "--trials", len(script), "--device", "cpu", *args)
    assert_ok(res)
    return res, known.keys


def test_passkey_counts_right_answers(runner, tiny_model_dir, monkeypatch):
    res, keys = passkey_with_known_answers(runner, monkeypatch, tiny_model_dir, ["right", "wrong", "right", "none"])
    flat = " ".join(res.output.split())
    assert "accuracy: 2/4 = 50% at 200 tokens" in flat
    assert f"trial 1: key {keys[0]}, answer {keys[0]} (ok)" in flat
    assert f"trial 2: key {keys[1]}, answer {keys[1] + 1} (wrong)" in flat
    assert f"trial 4: key {keys[3]}, answer None (wrong)" in flat
    assert len(set(keys)) == 4


def test_passkey_runs(runner, tiny_model_dir):
    """The real engine end to end (the random model's answer is anyone's guess)."""
    res = run(runner, "passkey", "--model", tiny_model_dir, "--length", 300, "--trials", 1, "--device", "cpu")
    assert_ok(res)
    m = re.search(r"accuracy: (\d+)/1 = (\d+)% at 300 tokens", res.output)
    assert m, res.output
    assert "trial 1: key" in res.output


def test_passkey_two_trials_fixed_depth(runner, tiny_model_dir):
    res = run(runner, "passkey", "-m", tiny_model_dir, "-n", 200, "-t", 2, "--depth", 0.5, "--top-k", 1,
              "--block-size", 8, "--kv-offload", "device", "--device", "cpu")
    assert_ok(res)
    assert re.search(r"accuracy: \d+/2 = \d+% at 200 tokens", res.output), res.output
    assert "k=1, b=8" in res.output


def test_ask_runs(runner, tiny_model_dir, doc_file):
    res = run(runner, "ask", doc_file, "What is the pass key?", "--model", tiny_model_dir, "--max-new-tokens", 4,
              "--device", "cpu", "--block-size", 16, "--show-blocks", 3)
    assert_ok(res)
    assert "prefill" in res.output
    assert "retrieved blocks per layer" in res.output  # the retrieval summary table, on request


def test_ask_plain_invocation(runner, tiny_model_dir, doc_file):
    """Exactly `lmqa ask FILE "q" --model DIR`, all defaults."""
    res = run(runner, "ask", doc_file, "q", "--model", tiny_model_dir)
    assert_ok(res)
    assert re.search(r"\d+ tokens in [\d.]+ s", res.output), res.output


def test_ask_from_stdin(runner, tiny_model_dir):
    res = run(runner, "ask", "-", "what colour is the sky?", "--model", tiny_model_dir, "-n", 2,
              "--show-blocks", 0, "--device", "cpu", input="The sky is blue. " * 20)
    assert_ok(res)
    assert re.search(r"\b[0-2] tokens in [\d.]+ s", res.output), res.output  # -n: llama.cpp's --max-new-tokens
    assert "prefill" in res.output


def test_ask_non_utf8_file(runner, tiny_model_dir, tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("Caf\xe9 au lait. The sky is blue.\n".encode("latin-1") * 5)
    res = run(runner, "ask", p, "q?", "--model", tiny_model_dir, "--max-new-tokens", 1, "--show-blocks", 0,
              "--device", "cpu")
    assert_ok(res)
    assert "not UTF-8; read as Latin-1" in " ".join(res.output.split())


# ----- bad input: one line, non-zero exit, no traceback -----
def test_ask_missing_file(runner, tiny_model_dir, tmp_path):
    res = run(runner, "ask", tmp_path / "nope.txt", "q", "--model", tiny_model_dir)
    assert_clean_error(res, "nope.txt", "no such file")


def test_ask_missing_file_name_with_brackets(runner, tiny_model_dir, tmp_path):
    """File names are printed as given, not read as rich markup ("[red]" must not vanish)."""
    res = run(runner, "ask", tmp_path / "notes[red]v2.txt", "q", "--model", tiny_model_dir)
    assert_clean_error(res, "notes[red]v2.txt", "no such file")


def test_long_error_is_one_line(runner, tiny_model_dir, tmp_path):
    """An error message longer than the console is still one line: logs, pipes and
    scripts (grep "^error:") get it whole. Rich hard-wraps at 80 columns when stderr
    is not a terminal unless told soft_wrap=True."""
    deep = tmp_path / ("a-rather-long-directory-name-" * 3) / "missing-document.txt"
    res = run(runner, "ask", deep, "q", "--model", tiny_model_dir)
    assert res.exit_code == 1
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and lines[0].endswith("no such file or directory"), res.output


def test_ask_empty_file(runner, tiny_model_dir, tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text(" \n\t\n")
    assert_clean_error(run(runner, "ask", p, "q", "--model", tiny_model_dir), "empty")


def test_ask_directory_with_nothing_readable(runner, tiny_model_dir, tmp_path):
    """A directory is read as a codebase; one with no text file in it is refused."""
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    res = run(runner, "ask", tmp_path, "q", "--model", tiny_model_dir)
    assert_clean_error(res, str(tmp_path), "no readable text file", "binary")


def test_ask_empty_question(runner, tiny_model_dir, doc_file):
    assert_clean_error(run(runner, "ask", doc_file, "   ", "--model", tiny_model_dir), "question is empty")


def test_passkey_length_too_small(runner, tiny_model_dir):
    assert_clean_error(run(runner, "passkey", "--length", 10, "--model", tiny_model_dir), "--length 10", "too small")


def test_passkey_length_not_a_number(runner, tiny_model_dir):
    """A usage error from the parser: exit 2, no traceback, the complaint names the option."""
    res = run(runner, "passkey", "--length", "abc", "--model", tiny_model_dir)
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    assert isinstance(res.exception, SystemExit)
    flat = " ".join(res.output.replace("│", " ").split())
    # wordings differ across typer/click versions ("... a valid integer", "'abc' is not a valid int")
    assert re.search(r"Invalid value for '--length'.* valid int", flat), flat


def test_unknown_model(runner):
    res = run(runner, "passkey", "--length", 300, "--model", "no-such-model-xyz")
    assert_clean_error(res, "unknown model 'no-such-model-xyz'", DEFAULT_MODEL)


def test_model_dir_with_broken_config(runner, tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    res = run(runner, "passkey", "--length", 300, "--model", d, "--device", "cpu")
    assert_clean_error(res, "could not load")


def test_adapter_dir_with_broken_meta(runner, tmp_path):
    """An `lmqa train` adapter directory whose lmqa.json is damaged."""
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "lmqa.json").write_text('{"block_size": 8')
    res = run(runner, "passkey", "--length", 300, "--model", d, "--device", "cpu")
    assert_clean_error(res, str(d / "lmqa.json"), "not a valid lmqa adapter description")


def test_not_a_gguf_file(runner, tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"\x00" * 256)
    assert_clean_error(run(runner, "passkey", "--length", 300, "--model", p, "--device", "cpu"), "could not load")


def test_bad_kv_offload(runner, tiny_model_dir):
    res = run(runner, "passkey", "--length", 300, "--model", tiny_model_dir, "--kv-offload", "disk", "--device", "cpu")
    assert_clean_error(res, "--kv-offload", "'disk'")


def test_cuda_without_cuda(runner, tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    res = run(runner, "passkey", "--length", 300, "--model", tiny_model_dir, "--device", "cuda")
    assert_clean_error(res, "no CUDA device")


class FailingPip:
    def __init__(self):
        self.calls = 0

    def __call__(self, cmd, **kwargs):
        self.calls += 1
        assert "pip" in cmd and "download" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network is unreachable)")


def test_no_network_on_first_fetch(runner, monkeypatch, isolated_cache):
    pip = FailingPip()
    monkeypatch.setattr(loading.subprocess, "run", pip)
    res = run(runner, "passkey", "--length", 300, "--device", "cpu")  # the default model, nothing cached
    assert pip.calls == 1
    assert_clean_error(res, "could not download", "network is unreachable")
    assert not (isolated_cache / "converted").exists()


def test_corrupt_cache_is_rebuilt_then_fetch_fails_cleanly(runner, monkeypatch, isolated_cache):
    manifest = find_manifest(DEFAULT_MODEL)
    out = isolated_cache / "converted" / manifest.base.member_sha256[:16]
    out.mkdir(parents=True)
    (out / loading.WEIGHTS).write_bytes(b"not the weights that were converted")
    (out / loading.STAMP).write_text(json.dumps({"source": "x.gguf", "sha256": "0" * 64}))
    pip = FailingPip()
    monkeypatch.setattr(loading.subprocess, "run", pip)
    res = run(runner, "passkey", "--length", 300, "--model", DEFAULT_MODEL, "--device", "cpu")
    assert "corrupt" in res.output  # it noticed, and tried to rebuild...
    assert pip.calls == 1  # ...by fetching again
    assert_clean_error(res, "could not download")
