"""Training batches drawn ahead and by several processes (lmqa/train/batches.py,
the loop in lmqa/train/finetune.py): every micro-batch is a function of
(seed, step, draw) alone, so the prefetcher gives what direct drawing gives,
a run interrupted and resumed equals an uninterrupted one, and two processes
under `accelerate launch` (gloo, CPU) train as one process does on their
union, writing one set of files."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer
from typer.testing import CliRunner

from lmqa.cli import app
from lmqa.train.batches import Prefetcher, draw_batch, draw_numbers, draw_seed
from lmqa.train.data import ExampleSampler
from lmqa.train.finetune import ResumeError, TrainConfig, add_lora, load_checkpoint, train

from conftest import CORPUS, ROOT, make_tiny_llama
from test_cli import assert_clean_error

BLOCK = 7


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def sampler(tok, seed: int = 0) -> ExampleSampler:
    """Plain text and synthetic retrieval examples (the latter tokenize) of 56 tokens."""
    stream = torch.tensor(tok(" ".join(CORPUS * 20)).input_ids)
    return ExampleSampler(stream, tok, 56, synthetic_rate=0.5, seed=seed)


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for (xi, xl), (yi, yl) in zip(a, b) for x, y in ((xi, yi), (xl, yl)))


def test_draw_seed_is_a_fixed_function_of_its_numbers():
    """A change of formula would silently change what a resumed run trains on."""
    assert draw_seed(0, 0, 0) == 11178193017341804924
    seeds = {draw_seed(s, t, d) for s, t, d in itertools.product(range(3), range(3), range(3))}
    assert len(seeds) == 27


def test_a_micro_batch_depends_on_seed_step_and_draw_only(tok):
    s = sampler(tok)
    first = draw_batch(s, 0, 5, 1, 3, BLOCK, 0)
    for key in [(5, 0), (6, 1), (0, 0)]:
        draw_batch(s, 0, *key, 3, BLOCK, 0)
    assert same_batches([draw_batch(sampler(tok, seed=9), 0, 5, 1, 3, BLOCK, 0)], [first])  # any prior rng state
    assert same_batches([draw_batch(s, 0, 5, 1, 3, BLOCK, 0)], [first])
    for other in [(1, 5, 1), (0, 4, 1), (0, 5, 0)]:
        assert not same_batches([draw_batch(s, *other, 3, BLOCK, 0)], [first]), other


def test_processes_split_one_process_global_batch():
    """Two processes with grad_accum 2 draw, step by step, what one process
    with grad_accum 4 draws, each draw once."""
    one = list(draw_numbers(3, 6, 4, 0, 1))
    two = [list(draw_numbers(3, 6, 2, p, 2)) for p in range(2)]
    assert sorted(two[0] + two[1]) == sorted(one)
    for step in range(3, 6):
        assert sorted(d for s, d in two[0] + two[1] if s == step) == [0, 1, 2, 3]
    assert [s for s, _ in two[1]] == [3, 3, 4, 4, 5, 5]  # training order


def test_prefetcher_yields_what_direct_drawing_yields(tok):
    keys = list(draw_numbers(0, 4, 2, 1, 2))
    direct = [draw_batch(sampler(tok), 0, *key, 2, BLOCK, 0) for key in keys]
    s = sampler(tok, seed=5)
    with Prefetcher(lambda key: draw_batch(s, 0, *key, 2, BLOCK, 0), iter(keys), ahead=2) as batches:
        got = list(batches)
    assert same_batches(got, direct)


def test_prefetcher_raises_the_threads_error_and_stops_when_left():
    def make(i):
        if i == 3:
            raise KeyError("bad example")
        return i

    with Prefetcher(make, range(10)) as items:
        assert [next(items) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(KeyError, match="bad example"):
            next(items)
        with pytest.raises(KeyError):  # again, rather than waiting for an item that never comes
            next(items)
    with Prefetcher(lambda i: i, itertools.count(), ahead=2) as items:  # endless, its queue full
        assert next(items) == 0
        thread = items._thread
    assert not thread.is_alive()


class Interrupt(Exception):
    pass


def train_run(tok, out, steps: int, stop_after: int | None = None, sampler_seed: int = 0) -> list[float]:
    """train() of a tiny LLaMA with LoRA, 2 micro-batches a step, a checkpoint
    every step; stop_after raises in the progress callback after that step
    (before its checkpoint), as an interruption would, with the prefetcher
    some batches ahead."""
    model = make_tiny_llama(vocab=len(tok) + 1)
    torch.manual_seed(0)
    peft = add_lora(model, len(tok), 4, 8)
    cfg = TrainConfig(output=out, steps=steps, context=64, block_size=BLOCK, batch_size=2, grad_accum=2, lr=0.05,
                      warmup=2, save_every=1, attention_form="tiled")

    def progress(step, loss):
        if step == stop_after:
            raise Interrupt

    return train(peft, sampler(tok, sampler_seed), len(tok), cfg, log=lambda m: None, progress=progress)


def test_an_interrupted_run_resumes_to_the_uninterrupted_one(tmp_path, tok):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    want = train_run(tok, straight, 4)
    with pytest.raises(Interrupt):
        train_run(tok, resumed, 4, stop_after=3)
    assert json.loads((resumed / "checkpoint" / "meta.json").read_text())["step"] == 2
    got = train_run(tok, resumed, 4, sampler_seed=77)  # the sampler's own state does not matter
    assert got == want
    a, b = (load_file(d / "checkpoint" / "state.safetensors") for d in (straight, resumed))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_of_another_process_count_are_refused_old_ones_load(tmp_path, tok):
    out = tmp_path / "run"
    train_run(tok, out, 1)
    meta_path = out / "checkpoint" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["num_processes"] == 1 and "rng" not in meta
    model = add_lora(make_tiny_llama(vocab=len(tok) + 1), len(tok), 4, 8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    cfg = TrainConfig(output=out)
    with pytest.raises(ResumeError, match="written by a run of 1 process.*this one has 2.*--num_processes 1"):
        load_checkpoint(model, optimizer, cfg, num_processes=2)
    del meta["num_processes"]  # as written before this commit, with the sampler's rng state
    meta_path.write_text(json.dumps(meta | {"rng": [0] * 625}))
    assert load_checkpoint(model, optimizer, cfg)[0] == 1


# ----- the CLI under accelerate launch -----
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("train-data")
    (d / "book.txt").write_text(" ".join(CORPUS * 40))
    return d


def cli_args(data, out, model_dir, grad_accum: int) -> list[str]:
    return ["train", str(data), "-o", str(out), "--model", str(model_dir), "--device", "cpu", "--steps", "3",
            "--context", "64", "--batch-size", "2", "--grad-accum", str(grad_accum), "--save-every", "1",
            "--block-size", str(BLOCK), "--lr", "0.05", "--lora-rank", "4", "--synthetic-rate", "0.5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], processes: int, tmp_path) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N -m lmqa ARGS`, one
    thread a process, no accelerate config but the command line's.
    --multi_gpu is accelerate's torchrun launcher, which a multi-GPU host
    picks by itself; on CPU lmqa then runs over gloo. (accelerate's --cpu
    starts a single process unless through mpirun.) A launch that hangs is
    killed with its workers."""
    env = os.environ | {"HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), "-m", "lmqa", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_two_processes_train_as_one_does_on_their_union(tmp_path, data, tiny_model_dir):
    """Two processes with grad_accum 2 against one with grad_accum 4: the same
    8 sequences a step, so the same losses and weights up to float rounding
    (the gradients are summed in another order). Only the main process writes:
    one runs.jsonl line, one checkpoint, the adapter and plot."""
    two, one = tmp_path / "two", tmp_path / "one"
    res = launch(cli_args(data, two, tiny_model_dir, 2), 2, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("trained 3 steps") == 1  # one process reports
    solo = CliRunner().invoke(app, cli_args(data, one, tiny_model_dir, 4))
    assert solo.exit_code == 0, solo.output

    assert json.loads((two / "losses.json").read_text()) == pytest.approx(json.loads((one / "losses.json").read_text()),
                                                                           rel=1e-5)
    want, got = (load_file(d / "checkpoint" / "state.safetensors") for d in (one, two))
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)
    assert sorted(p.name for p in two.iterdir()) == ["adapter", "checkpoint", "loss.png", "losses.json", "runs.jsonl"]
    runs = [json.loads(line) for line in (two / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 1 and runs[0]["num_processes"] == 2
    assert json.loads((two / "checkpoint" / "meta.json").read_text())["num_processes"] == 2

    # resuming with one process is refused in one line, before any training
    longer = cli_args(data, two, tiny_model_dir, 4)
    longer[longer.index("--steps") + 1] = "6"
    assert_clean_error(CliRunner().invoke(app, longer), "2 process", "this one has 1", "--num_processes 2")
