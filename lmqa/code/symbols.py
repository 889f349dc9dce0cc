"""The symbol index of a codebase: every definition with its qualified name,
file:line, signature, first docstring line and the names its body calls.

Built once when a directory is ingested and saved with the context, so a
code answer can only name things that exist: answers are chosen among the
index's definitions (answer.py), never generated as free identifiers.
Python is read with the standard library's `ast`; other languages with
tree-sitter grammars (tree-sitter-language-pack, prebuilt); a file that
does not parse contributes no definitions rather than guessed ones.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from dataclasses import astuple, dataclass
from typing import Any

KINDS = ("module", "class", "function", "method", "constant")
SIGNATURE_CHARS = 160  # longer signatures and constant values are cut (with "…")
_CONSTANT = re.compile(r"^_*[A-Z][A-Z0-9_]*$")

# tree-sitter: file suffix -> grammar name, and the node types that define things
LANGUAGES = {".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
             ".ts": "typescript", ".tsx": "tsx", ".go": "go", ".rs": "rust", ".java": "java", ".rb": "ruby",
             ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp", ".cs": "csharp"}
_FUNCTIONS = {"function_declaration", "function_definition", "generator_function_declaration", "function_item",
              "method_definition", "method_declaration", "method", "singleton_method", "constructor_declaration"}
_METHODS = {"method_definition", "method_declaration", "method", "singleton_method", "constructor_declaration"}
_CLASSES = {"class_declaration", "class_definition", "class", "class_specifier", "struct_specifier", "struct_item",
            "interface_declaration", "trait_item", "enum_item", "enum_declaration", "module", "type_spec"}
_CALLS = {"call_expression", "method_invocation", "call", "invocation_expression"}
_NAMES = {"identifier", "field_identifier", "property_identifier", "type_identifier", "constant",
          "qualified_identifier", "destructor_name", "operator_name"}


@dataclass(frozen=True)
class Definition:
    name: str  # qualified: package.module.Class.method
    kind: str  # one of KINDS
    path: str  # the file, relative to the ingested directory
    line: int  # where the definition starts (its def/class line, or the assignment)
    end_line: int
    signature: str  # "parse(data, *, strict=True) -> Message", "class Message(Base)", "LIMIT = 78", or the path
    doc: str  # the first line of its docstring (or leading comment), "" if none
    calls: tuple[str, ...] = ()  # names called in its own body (a.b.c() -> "c"), in order, once each

    @property
    def short(self) -> str:
        """The name as code writes it: the module's path, a method as Class.method, else the last part."""
        if self.kind == "module":
            return self.path
        parts = self.name.split(".")
        return ".".join(parts[-2:]) if self.kind == "method" else parts[-1]

    @property
    def location(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class SymbolIndex:
    definitions: list[Definition]
    files: int  # source files read (Python, or a language with a grammar)
    package: str | None = None  # the ingested directory's own package name, prefixed to Python modules

    def to_json(self) -> dict[str, Any]:
        return {"package": self.package, "files": self.files,
                "definitions": [list(astuple(d)) for d in self.definitions]}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> SymbolIndex:
        return cls([Definition(*d[:7], tuple(d[7])) for d in raw["definitions"]], raw["files"], raw["package"])

    def summary(self) -> str:
        """"1,204 definitions in 372 files", for the ingest line."""
        return f"{len(self.definitions):,} definitions in {self.files:,} source files"


def build_index(files: Iterable[tuple[str, str]], package: str | None = None) -> SymbolIndex:
    """files: (path relative to the tree, text). package: the tree's own
    package name when the tree is one (it has an __init__.py at its top)."""
    definitions, read = [], 0
    for path, text in files:
        if path.endswith(".py"):
            found = _python(path, text, package)
        elif _suffix(path) in LANGUAGES:
            found = _tree_sitter(path, text, LANGUAGES[_suffix(path)])
        else:
            continue
        if found is not None:
            read += 1
            definitions += found
    return SymbolIndex(definitions, read, package)


def _suffix(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return name[name.rfind("."):].lower() if "." in name else ""


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SIGNATURE_CHARS else text[: SIGNATURE_CHARS - 1] + "…"


def _first_line(doc: str | None) -> str:
    return next((line.strip() for line in (doc or "").splitlines() if line.strip()), "")


def module_name(path: str, package: str | None = None) -> str:
    """email/utils.py -> [package.]email.utils; a package's __init__.py is the package itself."""
    parts = path.rsplit(".", 1)[0].split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(([package] if package else []) + parts) or (package or path)


# ----- Python -----
def _python(path: str, text: str, package: str | None) -> list[Definition] | None:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):  # Python 2, templates, a NUL byte: nothing is guessed
        return None
    module = module_name(path, package)
    out = [Definition(module, "module", path, 1, max(text.count("\n"), 1), path, _first_line(ast.get_docstring(tree)))]
    _python_body(tree.body, module, path, in_class=False, out=out)
    return out


def _python_body(body: list[ast.stmt], prefix: str, path: str, in_class: bool, out: list[Definition]) -> None:
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}.{node.name}"
            returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
            out.append(Definition(name, "method" if in_class else "function", path, node.lineno, node.end_lineno,
                                  _cut(f"{node.name}({ast.unparse(node.args)}){returns}"),
                                  _first_line(ast.get_docstring(node)), _python_calls(node.body)))
            _python_body(node.body, name, path, in_class=False, out=out)
        elif isinstance(node, ast.ClassDef):
            name = f"{prefix}.{node.name}"
            bases = ", ".join(ast.unparse(b) for b in [*node.bases, *node.keywords])
            out.append(Definition(name, "class", path, node.lineno, node.end_lineno,
                                  _cut(f"class {node.name}({bases})" if bases else f"class {node.name}"),
                                  _first_line(ast.get_docstring(node))))
            _python_body(node.body, name, path, in_class=True, out=out)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and _CONSTANT.match(target.id):
                    out.append(Definition(f"{prefix}.{target.id}", "constant", path, node.lineno, node.end_lineno,
                                          _cut(f"{target.id} = {ast.unparse(node.value)}"), ""))
        elif isinstance(node, (ast.If, ast.Try)):  # definitions under `if TYPE_CHECKING:` or `try: import`
            for part in (node.body, node.orelse, *([h.body for h in node.handlers] if isinstance(node, ast.Try) else [])):
                _python_body(part, prefix, path, in_class, out)


def _python_calls(body: list[ast.stmt]) -> tuple[str, ...]:
    """Names called in a body, nested definitions excluded (they are definitions of their own)."""
    calls: dict[str, None] = {}
    stack: list[ast.AST] = list(reversed(body))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                calls[func.id] = None
            elif isinstance(func, ast.Attribute):
                calls[func.attr] = None
        stack.extend(reversed(list(ast.iter_child_nodes(node))))
    return tuple(calls)


# ----- other languages: tree-sitter -----
def _parser(language: str):
    """The grammar's parser, or None where tree-sitter is not installed."""
    try:
        from tree_sitter_language_pack import get_parser
    except ImportError:
        return None
    return get_parser(language)


def _tree_sitter(path: str, text: str, language: str) -> list[Definition] | None:
    parser = _parser(language)
    if parser is None:
        return None
    source = text.encode()
    root = parser.parse(source).root_node
    module = module_name(path)
    out = [Definition(module, "module", path, 1, max(text.count("\n"), 1), path, "")]
    for node, prefix, in_class in _ts_definitions(root, module, False):
        name_node = _ts_name(node)
        if name_node is None:
            continue
        name = source[name_node.start_byte : name_node.end_byte].decode(errors="replace")
        body = node.child_by_field_name("body")
        head = source[node.start_byte : body.start_byte if body is not None else node.end_byte].decode(errors="replace")
        kind = "class" if node.type in _CLASSES else "method" if in_class or node.type in _METHODS else "function"
        calls = tuple(dict.fromkeys(_ts_calls(body, source))) if body is not None and kind != "class" else ()
        out.append(Definition(f"{prefix}.{name}", kind, path, node.start_point[0] + 1, node.end_point[0] + 1,
                              _cut(head.rstrip(" {:")), _ts_doc(node, source), calls))
    return out


def _ts_definitions(node, prefix: str, in_class: bool) -> Iterator[tuple[Any, str, bool]]:
    """(definition node, its qualified prefix, whether it is a class member), depth first."""
    for child in node.named_children:
        if child.type in _FUNCTIONS or child.type in _CLASSES:
            yield child, prefix, in_class
            name = _ts_name(child)
            inner = f"{prefix}.{name.text.decode(errors='replace')}" if name is not None else prefix
            yield from _ts_definitions(child, inner, child.type in _CLASSES)
        else:
            yield from _ts_definitions(child, prefix, in_class)


def _ts_name(node):
    """The node naming a definition: its `name` field, or (C, C++) the identifier inside its declarator."""
    name = node.child_by_field_name("name")
    while name is None and (node := node.child_by_field_name("declarator")) is not None:
        name = node if node.type in _NAMES else node.child_by_field_name("name")
    return name


def _ts_calls(node, source: bytes) -> Iterator[str]:
    stack = [node]
    while stack:
        node = stack.pop()
        if node.type in _FUNCTIONS or node.type in _CLASSES:
            continue
        if node.type in _CALLS:
            callee = node.child_by_field_name("function") or node.child_by_field_name("name") \
                or node.child_by_field_name("method")
            if callee is not None:
                words = re.findall(r"\w+", source[callee.start_byte : callee.end_byte].decode(errors="replace"))
                if words:
                    yield words[-1]
        stack.extend(reversed(node.named_children))


def _ts_doc(node, source: bytes) -> str:
    """The first line of the comment right above a definition (JSDoc, //, #)."""
    before = node.prev_named_sibling
    if before is None or "comment" not in before.type or before.end_point[0] < node.start_point[0] - 1:
        return ""
    text = source[before.start_byte : before.end_byte].decode(errors="replace")
    lines = (line.strip().removesuffix("*/").lstrip("/*#!").strip() for line in text.splitlines())
    return next((line for line in lines if line and not line.startswith("@")), "")
