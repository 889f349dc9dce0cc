"""The generation loop: feed the prompt once, then one token at a time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .landmark_engine import LandmarkEngine


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    candidates: int = 1  # greedy answers: whole candidates to choose among (lmqa/qa/answer_search.py)


class LogitsProcessor(Protocol):
    """Reshapes the next token's logits [vocab] (float32, on the CPU) given the
    tokens generated so far: -inf forbids a token (see lmqa/qa/quote.py)."""

    def __call__(self, logits: torch.Tensor, generated: list[int]) -> torch.Tensor: ...


def apply_processors(logits: torch.Tensor, processors: tuple[LogitsProcessor, ...], generated: list[int]) -> torch.Tensor:
    """logits [vocab] as float32 on the CPU, reshaped by each processor in order."""
    logits = logits.float().cpu()
    for process in processors:
        logits = process(logits, generated)
    return logits


def keep_only(logits: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """logits with every token but `tokens` at -inf."""
    out = torch.full_like(logits, float("-inf"))
    out[tokens] = logits[tokens]
    return out


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> int:
    if cfg.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < cfg.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(engine: LandmarkEngine, prompt_ids: list[int], cfg: SamplingConfig, stop_ids: set[int],
             on_token: Callable[[int], None] | None = None, on_prefill: Callable[[int], None] | None = None,
             processors: tuple[LogitsProcessor, ...] = ()) -> list[int]:
    """Generate after prompt_ids; on_token streams each new token, on_prefill
    reports prefill progress in positions; processors reshape each step's
    logits, in order."""
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    logits = engine.feed(prompt_ids, progress=on_prefill)
    out: list[int] = []
    for _ in range(cfg.max_new_tokens):
        tok = sample(apply_processors(logits, processors, out), cfg, generator)
        if tok in stop_ids:
            break
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        logits = engine.feed([tok])
    return out


class StreamDecoder:
    """Turns a growing list of token ids into printable text increments,
    holding back bytes that do not yet form a whole character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[len(self.emitted):], text
        return new


@torch.inference_mode()
def generate_full_attention(model, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """Greedy decoding with transformers' own full attention and KV cache: the
    baseline a landmark model is measured against (no landmarks, no retrieval)."""
    device = model.get_input_embeddings().weight.device
    out = model.generate(torch.tensor([prompt_ids], device=device), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=sorted(stop_ids), pad_token_id=sorted(stop_ids)[0])
    new = out[0, len(prompt_ids):].tolist()
    return new[: next((i for i, t in enumerate(new) if t in stop_ids), len(new))]
