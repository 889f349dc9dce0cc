"""Training data for landmark fine-tuning: text token streams plus synthetic
long-range retrieval examples.

Synthetic examples hide a few facts ("the <adjective> <noun>'s <attribute> is
<value>.") at random places in ordinary text and ask for one of them at the
end, so the answer can only come through the landmark of the block that holds
it. They deliberately share nothing with the passkey test's prompt or filler,
which stays an out-of-distribution evaluation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmqa.qa.prompts import PROMPTS_DIR

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py"}
# Books `lmqa eval --tasks bookqa` asks about (lmqa/evaluation/bookqa.py): never trained on.
HOLDOUT = PROMPTS_DIR / "bookqa_holdout.txt"

ADJECTIVES = ["red", "silent", "northern", "ancient", "hollow", "golden", "bitter", "quiet", "crooked", "distant",
              "frozen", "hidden", "narrow", "velvet", "copper", "pale", "restless", "sunken", "wooden", "wild"]
NOUNS = ["harbour", "lantern", "orchard", "tower", "violin", "carriage", "garden", "bridge", "mirror", "chapel",
         "meadow", "compass", "library", "forge", "cellar", "falcon", "river", "clock", "market", "wagon"]
ATTRIBUTES = ["registry number", "access code", "serial number", "room number", "ledger entry", "locker code",
              "catalogue number", "account number", "order number", "ticket number"]


def held_out() -> set[str]:
    """File names of the held-out evaluation books."""
    return set(HOLDOUT.read_text().split())


def read_texts(paths: list[Path]) -> list[str]:
    """Every text or Python file under paths, in a stable order, except the
    held-out books (by file name, wherever they lie)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    skip = held_out()
    return [p.read_text(encoding="utf-8", errors="replace") for p in files if p.name not in skip]


def tokenize_corpus(paths: list[Path], tokenizer, out: Path | None = None) -> torch.Tensor:
    """One stream of all documents separated by EOS, saved as safetensors in
    uint16 when the vocabulary allows (half the bytes to carry around)."""
    ids: list[int] = []
    for text in read_texts(paths):
        ids += tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    stream = torch.tensor(ids, dtype=torch.int64)
    stream = stream.to(torch.uint16 if len(tokenizer) <= 65536 else torch.int32)
    if out is not None:
        save_file({"tokens": stream}, out)
    return stream


def load_stream(path: Path) -> torch.Tensor:
    return load_file(path)["tokens"].to(torch.int64)


@dataclass
class Example:
    ids: list[int]  # ordinary tokens, no landmarks
    loss_from: int  # first position whose next token is a training target
    holes: tuple[tuple[int, int], ...] = ()  # [start, end) positions after loss_from that predict nothing


class ExampleSampler:
    """Draws training sequences of n_ordinary tokens: plain text, or with probability
    synthetic_rate a retrieval example built on a text slice."""

    def __init__(self, stream: torch.Tensor, tokenizer, n_ordinary: int, synthetic_rate: float, seed: int):
        if len(stream) <= n_ordinary + 1:
            raise ValueError(f"training data has {len(stream)} tokens, fewer than one sequence ({n_ordinary})")
        self.stream = stream
        self.tok = tokenizer
        self.n = n_ordinary
        self.rate = synthetic_rate
        self.rng = random.Random(seed)

    def _slice(self, n: int) -> list[int]:
        start = self.rng.randrange(0, len(self.stream) - n)
        return self.stream[start : start + n].tolist()

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def sample(self) -> Example:
        if self.rng.random() >= self.rate:
            return Example(self._slice(self.n), 0)
        rng = self.rng
        facts = []
        for _ in range(rng.randint(1, 4)):
            subject = f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}'s {rng.choice(ATTRIBUTES)}"
            facts.append((subject, str(rng.randint(1, 99999))))
        subject, value = rng.choice(facts)
        question = self._encode(f"\nQuestion: what is {subject}?\nAnswer: {subject[0].upper() + subject[1:]} is")
        answer = self._encode(f" {value}.")
        fact_ids = [self._encode(f" Note: {s} is {v}. ") for s, v in facts]
        filler = self._slice(self.n - len(question) - len(answer) - sum(map(len, fact_ids)))
        # facts go in the first 80% so most answers must cross at least one block
        cuts = sorted(rng.randrange(0, max(1, int(len(filler) * 0.8))) for _ in fact_ids)
        ids, last = [], 0
        for cut, f in zip(cuts, fact_ids):
            ids += filler[last:cut] + f
            last = cut
        ids += filler[last:] + question
        loss_from = len(ids) - 1
        return Example(ids + answer, loss_from)


def landmark_batch(examples: list[Example], block_size: int, landmark_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids with landmarks every block_size tokens, and labels where every
    ordinary position predicts the next ordinary token (skipping landmarks, as
    at inference) and landmark positions predict nothing."""
    from lmqa.engine.landmarks import insert_landmarks

    inputs, labels = [], []
    for ex in examples:
        seq = insert_landmarks(ex.ids, block_size, landmark_id)
        lab = [-100] * len(seq)
        ordinary = [i for i, t in enumerate(seq) if t != landmark_id]
        for n, (i, j) in enumerate(zip(ordinary, ordinary[1:])):
            if n >= ex.loss_from and not any(a <= n < b for a, b in ex.holes):
                lab[i] = seq[j]
        inputs.append(seq)
        labels.append(lab)
    width = max(map(len, inputs))
    pad = lambda rows, v: torch.tensor([r + [v] * (width - len(r)) for r in rows])
    return pad(inputs, 0), pad(labels, -100)
