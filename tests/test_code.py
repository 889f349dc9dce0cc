"""Code answers (lmqa/code): the symbol index built at ingest, its trip
through a context file, and answers that print only names, paths and lines
the tree holds."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from lmqa.code.answer import DefinitionSearch, candidates, named_in, render, words
from lmqa.code.symbols import SymbolIndex
from lmqa.engine.generation import SamplingConfig
from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.ingest import ingest
from lmqa.model.loading import load_model
from lmqa.qa.context_file import load, save
from lmqa.qa.session import DocumentSession

UTILS = '''"""Helpers for addresses."""

LIMIT = 78


def parse_address(text, *, strict=True) -> tuple:
    """Split an address into name and mailbox.

    More words here.
    """
    parts = text.split("<")
    return clean(parts[0]), clean(parts[-1])


def clean(value):
    return value.strip()


class Mailbox(Base):
    """One mailbox."""

    KIND = "box"

    def render(self, width=LIMIT):
        def pad(s):
            return s.ljust(width)
        return pad(format_box(self))
'''
APP = '''// Formats a greeting.
function greet(name) {
  return format(name);
}

class Greeter {
  /** Says hello twice. */
  hello(name) { log(greet(name)); }
}
'''
BROKEN = "def broken(:\n    pass\n"


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "mail"
    (root / "web").mkdir(parents=True)
    (root / "__init__.py").write_text('"""Mail."""\n')
    (root / "utils.py").write_text(UTILS)
    (root / "web" / "app.js").write_text(APP)
    (root / "broken.py").write_text(BROKEN)
    (root / "notes.txt").write_text("parse_address is documented elsewhere.\n")
    return root


def by_name(index: SymbolIndex) -> dict:
    return {d.name: d for d in index.definitions}


def test_python_definitions_from_ast(tree):
    index = ingest(tree).symbols
    found = by_name(index)
    assert index.package == "mail"
    assert found["mail"].kind == "module" and found["mail"].doc == "Mail."
    assert found["mail.utils"].kind == "module" and found["mail.utils"].doc == "Helpers for addresses."
    limit = found["mail.utils.LIMIT"]
    assert (limit.kind, limit.line, limit.signature) == ("constant", 3, "LIMIT = 78")
    parse = found["mail.utils.parse_address"]
    assert (parse.kind, parse.path, parse.line, parse.end_line) == ("function", "utils.py", 6, 12)
    assert parse.signature == "parse_address(text, *, strict=True) -> tuple"
    assert parse.doc == "Split an address into name and mailbox."
    assert parse.calls == ("split", "clean")
    box = found["mail.utils.Mailbox"]
    assert (box.kind, box.line, box.signature, box.doc) == ("class", 19, "class Mailbox(Base)", "One mailbox.")
    assert found["mail.utils.Mailbox.KIND"].kind == "constant"
    render = found["mail.utils.Mailbox.render"]
    assert (render.kind, render.line, render.short) == ("method", 24, "Mailbox.render")
    assert render.calls == ("pad", "format_box")  # the nested function's own calls are its own
    assert found["mail.utils.Mailbox.render.pad"].calls == ("ljust",)
    assert not any(d.path == "broken.py" for d in index.definitions)  # a file that does not parse: nothing guessed
    assert index.files == 3  # __init__.py, utils.py, app.js


def test_javascript_definitions_from_tree_sitter(tree):
    found = by_name(ingest(tree).symbols)
    greet = found["web.app.greet"]
    assert (greet.kind, greet.path, greet.line, greet.signature) == ("function", "web/app.js", 2, "function greet(name)")
    assert greet.doc == "Formats a greeting." and greet.calls == ("format",)
    assert found["web.app.Greeter"].kind == "class"
    hello = found["web.app.Greeter.hello"]
    assert (hello.kind, hello.line, hello.doc, hello.calls) == ("method", 8, "Says hello twice.", ("log", "greet"))


def test_index_is_json_and_round_trips(tree):
    index = ingest(tree).symbols
    again = SymbolIndex.from_json(json.loads(json.dumps(index.to_json())))
    assert again == index
    assert index.summary() == f"{len(index.definitions)} definitions in 3 source files"


def test_bm25_terms_split_identifiers_and_stem():
    assert words("parseAddress") == ["pars", "address", "parseaddress"]
    assert set(words("Which function parses addresses?")) == {"pars", "address"}


def test_candidates_put_named_definitions_first(tree):
    document = ingest(tree)
    index = document.symbols
    search = DefinitionSearch(index, document)
    assert candidates(index, search, "Where is `Mailbox.render` defined?")[0].definition.name == "mail.utils.Mailbox.render"
    top = candidates(index, search, "Which function splits an address into name and mailbox?")
    assert top[0].definition.name == "mail.utils.parse_address"


def test_answers_are_printed_from_the_index(tree):
    index = ingest(tree).symbols
    found = by_name(index)
    assert render(index, found["mail.utils.parse_address"], "Where is it?") == \
        "`mail.utils.parse_address(text, *, strict=True) -> tuple` in utils.py:6: Split an address into name and mailbox."
    assert render(index, found["mail.utils.LIMIT"], "What is LIMIT?") == "`mail.utils.LIMIT = 78` in utils.py:3"
    assert render(index, found["mail.utils.Mailbox"], "Which class?") == "class `mail.utils.Mailbox(Base)` in utils.py:19: One mailbox."
    assert render(index, found["mail.utils.clean"], "What calls `clean`?") == \
        "`mail.utils.clean` (utils.py:15) is called by `mail.utils.parse_address` (utils.py:6)."
    assert render(index, found["mail.utils.parse_address"], "Who calls it?") == \
        "No definition in the index calls `mail.utils.parse_address`, defined at utils.py:6."


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), device="cpu", dtype="float32", block_size=8, top_k=2, log=lambda m: None)
    return replace(loaded, landmark=replace(loaded.landmark, chunk_size=45))


QUESTIONS = ("Where is `parse_address` defined?", "Which function splits an address?", "What calls `clean`?",
             "What is the value of `LIMIT`?", "Which file handles greetings?", "Where is `nothing_like_this`?")


def printed_things_exist(text: str, document) -> None:
    """Every backticked name is a definition of the index or text of the
    tree, and every file:line is the file and first line of a definition."""
    names, locations = named_in(text)
    assert names or text == "No definition in the index matches the question."
    qualified = {d.name for d in document.symbols.definitions}
    for name in names:
        assert name in qualified or name in document.text, (name, text)
    files = {s.title: document.text[s.char_start : s.char_end].splitlines() for s in document.segments}
    starts = {(d.path, d.line) for d in document.symbols.definitions}
    for path, line in locations:
        assert path in files and 1 <= line <= len(files[path]) and (path, line) in starts, (path, line, text)


def test_code_answers_name_only_real_things(tree, loaded, tmp_path):
    """A tiny random model picks arbitrary candidates: whatever it picks is
    printed from the index. The index also survives a context file."""
    session = DocumentSession(loaded, LandmarkEngine(loaded.model, loaded.landmark), ingest(tree), "codebase")
    session.ingest()
    greedy = SamplingConfig(max_new_tokens=8)
    answers = [session.ask(q, greedy) for q in QUESTIONS]
    for answer in answers:
        printed_things_exist(answer.text, session.document)
    save(session, tmp_path / "ctx.lmqa")
    restored = load(tmp_path / "ctx.lmqa", loaded)
    assert restored.document.symbols == session.document.symbols
    assert [restored.ask(q, greedy).text for q in QUESTIONS] == [a.text for a in answers]


def test_no_quote_keeps_free_text(tree, loaded):
    session = DocumentSession(loaded, LandmarkEngine(loaded.model, loaded.landmark), ingest(tree), "codebase")
    session.ingest()
    session.quote = False
    text = session.ask(QUESTIONS[0], SamplingConfig(max_new_tokens=8)).text
    assert not text.startswith("`mail.")  # generated by the random model, not printed from the index


def test_index_is_built_from_the_text_when_missing(tree):
    """A codebase document from before the index (an old context file) gets the same one when asked."""
    from lmqa.code.answer import index_of

    document = ingest(tree)
    built, document.symbols = document.symbols, None
    assert index_of(document) == built


@pytest.mark.slow
def test_every_answer_of_the_code_eval_names_real_things():
    """The whole `lmqa eval --tasks code` with the default model: its
    answers and its BM25 baseline's print only what the trees hold."""
    from lmqa.evaluation.code_eval import load_questions, run_tree, tree_path

    loaded = load_model(None, device="cpu")
    engine = LandmarkEngine(loaded.model, loaded.landmark)
    questions = load_questions()
    for tree in dict.fromkeys(q.tree for q in questions):
        document = ingest(tree_path(tree))
        for result in run_tree(tree, [q for q in questions if q.tree == tree], loaded, engine, SamplingConfig()):
            printed_things_exist(result.answer, document)
            printed_things_exist(result.bm25_answer, document)


def test_the_definitions_passage_leads_the_evidence(tree, loaded):
    """A code answer's evidence starts with the lines of the definitions it
    prints (the definition, then its callers), marked as quoted, whatever
    the answer's attention read."""
    from lmqa.code.answer import definition_spans
    from lmqa.qa.evidence import passages

    session = DocumentSession(loaded, LandmarkEngine(loaded.model, loaded.landmark), ingest(tree), "codebase")
    session.ingest()
    answer = session.ask("Where is `parse_address` defined?", SamplingConfig(max_new_tokens=8))
    assert "utils.py:6" in answer.text
    (span,) = answer.evidence.quoted
    assert session.document.text[span[0]:span[1]].startswith("def parse_address(text, *, strict=True) -> tuple:")
    first = passages(session, answer.evidence)[0]
    assert first.quoted and first.file == "utils.py" and first.start_line <= 6 <= first.end_line
    callers = definition_spans(session.document, "`mail.utils.clean` (utils.py:15) is called by "
                                                 "`mail.utils.parse_address` (utils.py:6).")
    assert [session.document.text[a:b].split("(")[0] for a, b in callers] == ["def clean", "def parse_address"]
    assert definition_spans(session.document, "nothing printed") == ()
