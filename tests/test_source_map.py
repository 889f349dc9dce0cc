"""Block -> source lines, checked against the tokens that really fill each block."""

from __future__ import annotations

from itertools import pairwise

import pytest

from lmqa.ingest import Document, build_source_map, estimate, ingest, tokenize_document
from lmqa.ingest.document import DocumentBuilder

FILES = {
    "alpha.py": "".join(f"def alpha_{i}(x):\n    return x + {i}\n" for i in range(1, 9)),
    "docs/guide.md": "# Guide\n\nThe quick brown fox jumps over the lazy dog.\n\nCafé au lait, naïve façade.\n",
    "zeta.txt": "".join(f"line {i} of zeta\n" for i in range(1, 12)),
}


def make_tokenizer(corpus: str, trim_offsets: bool):
    """A tiny byte-level BPE, GPT-2 style (trim_offsets=True: offsets leave out
    surrounding spaces) or Llama-3/Qwen style (False: offsets cover every byte)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    trainer = trainers.BpeTrainer(vocab_size=350, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture
def codebase(tmp_path) -> Document:
    for rel, content in FILES.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    return ingest(tmp_path)


def char_oracle(document: Document) -> list[tuple[str, int] | None]:
    """(title, line) of every character, None for header text, by plain counting."""
    where: list[tuple[str, int] | None] = [None] * len(document.text)
    for segment in document.segments:
        line = segment.line_start
        for pos in range(segment.char_start, segment.char_end):
            where[pos] = (segment.title, line)
            line += document.text[pos] == "\n"
    return where


def expected_locations(where, start: int, end: int) -> list[tuple[str, int, int]]:
    found: dict[str, list[int]] = {}
    for spot in where[start:end]:
        if spot is not None:
            found.setdefault(spot[0], []).append(spot[1])
    return [(title, min(lines), max(lines)) for title, lines in found.items()]


@pytest.mark.parametrize("trim_offsets", [False, True])
@pytest.mark.parametrize("block_size", [7, 63])
def test_each_block_span_holds_exactly_its_tokens_text(codebase, trim_offsets, block_size):
    tok = make_tokenizer(codebase.text, trim_offsets)
    ids, offsets = tokenize_document(tok, codebase)
    smap = build_source_map(codebase, offsets, block_size)
    assert [s.block for s in smap] == list(range(-(-len(ids) // block_size)))
    where = char_oracle(codebase)
    crossing = header_only = 0
    for source in smap:
        span = codebase.text[source.char_start:source.char_end]
        decoded = tok.decode(ids[source.block * block_size:(source.block + 1) * block_size])
        if "\ufffd" in decoded:  # the block cuts a multi-byte character; both halves span all of it
            assert span.strip()[-1] in "éïç" or span.strip()[0] in "éïç"
        elif trim_offsets:  # offsets leave out the first and last tokens' outer spaces only
            assert decoded.strip() == span.strip() and span.strip() in decoded
        else:
            assert decoded == span
        expected = expected_locations(where, source.char_start, source.char_end)
        got = [(loc.title, loc.line_start, loc.line_end) for loc in source.locations]
        if expected:
            assert got == expected
        else:  # a block of header text only names the file the header introduces
            assert len(got) == 1 and got[0][1:] == (1, 1)
            header_only += 1
        assert source.snippet == " ".join(span.split())[:60] + ("…" if len(" ".join(span.split())) > 60 else "")
        crossing += len(source.also) > 0
    assert smap[0].char_start == 0 and smap[-1].char_end == len(codebase.text)
    for prev, after in pairwise(smap):  # nothing but whitespace falls between blocks
        assert not codebase.text[prev.char_end:after.char_start].strip()
    # Both ways of meeting a file boundary are exercised: small blocks fall
    # inside the headers, large ones run from one file into the next.
    if block_size == 7:
        assert header_only >= 1
    else:
        assert crossing == 2


def per_char(document: Document) -> list[tuple[int, int]]:
    """One token per character: a tokenizer whose spans are easy to predict."""
    return [(i, i + 1) for i in range(len(document.text))]


def two_files() -> Document:
    builder = DocumentBuilder("tree")
    builder.add("a.txt", "file", "a1\na2\n", header=True)
    builder.add("b.txt", "file", "b1\nb2\n", header=True)
    return builder.build()


def test_block_crossing_a_file_boundary_reports_both():
    doc = two_files()
    assert doc.text == "===== a.txt =====\na1\na2\n\n===== b.txt =====\nb1\nb2\n"
    smap = build_source_map(doc, per_char(doc), block_size=25)
    first, second = smap
    assert (first.char_start, first.char_end) == (0, 25)
    assert (first.title, first.line_start, first.line_end) == ("a.txt", 1, 2)
    assert [str(loc) for loc in first.also] == []
    assert (second.title, second.line_start, second.line_end) == ("b.txt", 1, 2)
    across = build_source_map(doc, per_char(doc), block_size=46)[0]
    assert str(across) == "a.txt:1-2 (also: b.txt:1)"  # ends on the newline of b1
    assert across.also[0].kind == "file"


def test_block_inside_a_header_names_the_file_it_introduces():
    doc = two_files()
    header = doc.text.index("===== b.txt")
    smap = build_source_map(doc, per_char(doc), block_size=5)
    inside = next(s for s in smap if s.char_start >= header + 5 and s.char_end <= doc.segments[1].char_start)
    assert (inside.title, inside.line_start, inside.line_end, inside.also) == ("b.txt", 1, 1, ())
    assert str(smap[0]) == "a.txt:1"


def test_prompt_tokens_before_the_document_shift_block_ids():
    doc = two_files()
    smap = build_source_map(doc, per_char(doc), block_size=10, doc_token_start=14)
    # Stream tokens 0-13 are the prompt: block 0 has no document token, block 1 has 6.
    assert smap[0].block == 1 and (smap[0].char_start, smap[0].char_end) == (0, 6)
    assert smap[1].block == 2 and (smap[1].char_start, smap[1].char_end) == (6, 16)
    assert smap[-1].block == (14 + len(doc.text) - 1) // 10 and smap[-1].char_end == len(doc.text)


def test_chapter_and_page_lines_count_within_their_own_segment():
    builder = DocumentBuilder("book.pdf")
    builder.add("page 1", "page", "p1 l1\np1 l2\np1 l3", header=True)
    builder.add("page 2", "page", "p2 l1\np2 l2", header=True)
    doc = builder.build()
    source = build_source_map(doc, per_char(doc), block_size=1)[doc.text.index("p2 l2")]
    assert str(source) == "page 2:2" and source.locations[0].kind == "page" and source.snippet == "p"


def test_empty_document_offsets_give_an_empty_map():
    assert build_source_map(two_files(), [], block_size=63) == []


def test_estimate_by_tokenizer_and_by_chars_per_token(codebase):
    tok = make_tokenizer(codebase.text, trim_offsets=False)
    n = len(tok(codebase.text, add_special_tokens=False)["input_ids"])
    kv = dict(layers=30, kv_heads=3, head_dim=64, dtype_bytes=2)
    assert estimate(codebase, tokenizer=tok, **kv) == (n, n * 30 * 2 * 3 * 64 * 2)
    tokens, kv_bytes = estimate(codebase, chars_per_token=4.0, **kv)
    assert tokens == -(-len(codebase.text) // 4) and kv_bytes == tokens * 23040
