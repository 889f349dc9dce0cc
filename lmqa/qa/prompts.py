"""Prompt templates, kept as files under prompts/ so they can be read and edited."""

from __future__ import annotations

import os
from pathlib import Path

# The answer lmqa's QA training teaches for a question the document does not answer.
REFUSAL = "The document does not say."

PROMPTS_DIR = Path(os.environ.get("LMQA_PROMPTS", Path(__file__).resolve().parents[2] / "prompts"))


def template(name: str) -> str:
    return (PROMPTS_DIR / f"{name}.txt").read_text().rstrip("\n")
