"""Codebases as things with names: the symbol index built at ingest
(symbols.py) and answers that name only what it holds (answer.py)."""
