"""Sentences of the document that share the question's rarer words (BM25).

Landmark retrieval finds what the question's queries match, and attention
mass favours the blocks nearest the question; neither reliably surfaces a
sentence that shares a rare name with the question ("Who was Jeff
Thatcher?") when it lies far back in a book. BM25 over sentences does, at
no model cost, so its best sentences join the candidate answers the model
reads (DocumentSession.proposals); the model still decides among them.
"""

from __future__ import annotations

from bisect import bisect_right

import bm25s

from .sentences import sentence_spans


class SentenceIndex:
    """BM25 over the sentences of one text (built once per session)."""

    def __init__(self, text: str):
        self.spans = sentence_spans(text)
        self._starts = [a for a, _ in self.spans]
        self._retriever = bm25s.BM25()
        self._retriever.index(bm25s.tokenize([text[a:b] for a, b in self.spans], stopwords="en", show_progress=False),
                              show_progress=False)

    def best(self, question: str, n: int) -> list[tuple[int, int]]:
        """Character spans of the n sentences that score best for question,
        best first; none when the question has no indexed word."""
        query = bm25s.tokenize([question], stopwords="en", show_progress=False)
        if not self.spans or not any(len(ids) for ids in query.ids):
            return []
        docs, scores = self._retriever.retrieve(query, k=min(n, len(self.spans)), show_progress=False)
        return [self.spans[int(d)] for d, s in zip(docs[0], scores[0]) if s > 0]

    def scores_at(self, question: str, positions: list[int | None]) -> list[float]:
        """For each character position, the BM25 score for question of the
        sentence it lies in (0 for None, or before the first sentence)."""
        words = bm25s.tokenize([question], stopwords="en", show_progress=False, return_ids=False)[0]
        words = [w for w in words if w in self._retriever.vocab_dict]
        if not words or not self.spans:
            return [0.0] * len(positions)
        scores = self._retriever.get_scores(words)
        at = [None if p is None else bisect_right(self._starts, p) - 1 for p in positions]
        return [0.0 if i is None or i < 0 else float(scores[i]) for i in at]
