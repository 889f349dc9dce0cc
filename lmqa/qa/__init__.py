"""Question answering over a document: sessions, prompts, evidence, chat and context files."""
