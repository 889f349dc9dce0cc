"""lmqa: question answering over whole books and codebases with landmark attention."""

__version__ = "0.1.0"
