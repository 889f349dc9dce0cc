"""The shipped default model end to end through the CLI (slow: fetches and
converts the base weights once, then reads a few thousand tokens on the CPU)."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from lmqa.cli import app


@pytest.mark.slow
def test_default_model_finds_the_passkey_beyond_its_training_context():
    """4,000 tokens is twice the adapter's 2,048-token training context (and
    past the 1,664-position prefill chunk): the key comes back through retrieval."""
    res = CliRunner().invoke(app, ["passkey", "--length", "4000", "--trials", "2", "--seed", "5", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert re.search(r"accuracy: 2/2 = 100% at 4,000 tokens", res.output), res.output
