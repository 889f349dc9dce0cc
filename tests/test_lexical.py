"""BM25 sentence candidates: the sentence sharing the question's rare words comes first."""

from __future__ import annotations

from lmqa.qa.lexical import SentenceIndex

TEXT = ("The summer evenings were long. A stranger stood before him in the village of St. Petersburg. "
        "He wore a necktie, a bright bit of ribbon.\n\nTom went home. The fence was nine feet high. "
        "Jim came out singing Buffalo Gals. Tom went to bed.")


def test_the_sentence_with_the_rare_words_is_best():
    index = SentenceIndex(TEXT)
    best = index.best("Which song did Jim sing?", 3)
    assert TEXT[best[0][0]:best[0][1]] == "Jim came out singing Buffalo Gals."
    assert len(best) <= 3 and len(set(best)) == len(best)
    assert all(TEXT[a:b].strip() == TEXT[a:b] for a, b in best)


def test_no_shared_word_no_sentence():
    index = SentenceIndex(TEXT)
    assert index.best("Qwzx?", 3) == [] and index.best("the of a", 3) == []


def test_scores_at_a_position_are_its_sentences():
    index = SentenceIndex(TEXT)
    song, fence = TEXT.index("Buffalo"), TEXT.index("nine feet")
    at_song, at_fence, none = index.scores_at("Which song did Jim sing?", [song, fence, None])
    assert at_song > 0 and at_fence == 0 and none == 0
    best = index.best("Which song did Jim sing?", 1)[0]
    assert index.scores_at("Which song did Jim sing?", [best[0]])[0] == at_song
    assert index.scores_at("Qwzx?", [song]) == [0.0]
