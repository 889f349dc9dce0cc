"""Training pieces (lmqa/train/finetune.py, lmqa/train/data.py): the schedule, the
per-sequence loss, landmark batches and their labels, and the example sampler."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from lmqa.train.finetune import TrainConfig, lr_at, sequence_loss
from lmqa.train.data import Example, ExampleSampler, landmark_batch

LM = 99  # landmark id in the batches below


def test_lr_warmup_then_cosine_to_a_tenth():
    cfg = TrainConfig(output=Path("unused"), steps=110, lr=1.0, warmup=10)
    assert [lr_at(s, cfg) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_at(9, cfg) == 1.0  # warm-up ends at the peak
    assert lr_at(10, cfg) == 1.0
    assert math.isclose(lr_at(60, cfg), 0.1 + 0.9 * 0.5)  # half-way through the decay
    assert math.isclose(lr_at(110, cfg), 0.1) and math.isclose(lr_at(500, cfg), 0.1)  # floor, also past the end
    decay = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_sequence_loss_is_a_mean_of_per_sequence_means():
    """A sequence with one target weighs as much as one with many; ignored
    labels (-100) count nowhere."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[1, 2, 3, 4, 5], [-100, -100, -100, 6, -100]])
    per_tok = [F.cross_entropy(logits[b, t], labels[b, t]) for b in range(2) for t in range(5) if labels[b, t] >= 0]
    want = (sum(per_tok[:5]) / 5 + per_tok[5]) / 2
    assert torch.allclose(sequence_loss(logits, labels), want)
    assert not torch.allclose(sequence_loss(logits, labels), torch.stack(per_tok).mean())  # not a token mean
    all_ignored = torch.full((2, 5), -100)
    assert sequence_loss(logits, all_ignored) == 0  # no NaN from 0/0


def test_landmark_batch_inserts_landmarks_and_skips_them_in_labels():
    """Block size 3: a landmark after every 3 ordinary tokens. Each ordinary
    position predicts the next ordinary token (across a landmark), landmarks
    and positions before loss_from predict nothing; shorter rows are padded
    with 0 / -100."""
    long, short = Example([10, 11, 12, 13, 14, 15, 16], 0), Example([20, 21, 22, 23], 2)
    inputs, labels = landmark_batch([long, short], 3, LM)
    assert inputs.tolist() == [[10, 11, 12, LM, 13, 14, 15, LM, 16],
                               [20, 21, 22, LM, 23, 0, 0, 0, 0]]
    assert labels.tolist() == [[11, 12, 13, -100, 14, 15, 16, -100, -100],
                               [-100, -100, 23, -100, -100, -100, -100, -100, -100]]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_sampler_text_and_synthetic_examples(tok):
    stream = torch.arange(1000) % 250
    text = ExampleSampler(stream, tok, 60, synthetic_rate=0.0, seed=1)
    for _ in range(5):
        ex = text.sample()
        assert len(ex.ids) == 60 and ex.loss_from == 0
        start = int(ex.ids[0])
        assert ex.ids == [(start + i) % 250 for i in range(60)]  # a contiguous slice of the stream

    synthetic = ExampleSampler(stream, tok, 300, synthetic_rate=1.0, seed=1)
    for _ in range(5):
        ex = synthetic.sample()
        assert len(ex.ids) == 300
        question = tok.decode(ex.ids[: ex.loss_from + 1])
        answer = tok.decode(ex.ids[ex.loss_from + 1 :])
        subject = question.rsplit("Question: what is ", 1)[1].split("?")[0]
        value = answer.strip().rstrip(".")
        assert value.isdigit() and f"Note: {subject} is {value}. " in question  # the answer is in the text
        assert question.endswith(" is")  # only the answer tokens are targets

    a, b = ExampleSampler(stream, tok, 120, 0.5, seed=3), ExampleSampler(stream, tok, 120, 0.5, seed=3)
    assert [a.sample() for _ in range(4)] == [b.sample() for _ in range(4)]
    with pytest.raises(ValueError, match="fewer than one sequence"):
        ExampleSampler(torch.arange(50), tok, 60, 0.0, seed=0)
