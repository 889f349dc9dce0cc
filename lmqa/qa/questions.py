"""What makes a question acceptable, for every way one arrives (`lmqa ask`, `lmqa serve`)."""

from __future__ import annotations

# A question is fed after the document like any text, but one longer than this
# is a document pasted in the wrong place (and minutes of prefill on a CPU).
MAX_QUESTION_CHARS = 20_000


def question_problem(question: str) -> str | None:
    """Why `question` cannot be asked (one line for the user), or None."""
    if not question.strip():
        return "the question is empty"
    if len(question) > MAX_QUESTION_CHARS:
        return (f"the question is {len(question):,} characters long, over the limit of {MAX_QUESTION_CHARS:,}: "
                f"put long text in the document and ask about it")
    return None
