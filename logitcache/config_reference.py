"""The configuration reference, generated from :mod:`logitcache.config` itself.

Every field of a job config is a dataclass field in ``logitcache/config.py`` with a comment
next to it (on the same line, or on the lines just above) saying what it means. This module
reads that source with :func:`inspect.getsource`, :mod:`ast` and :mod:`tokenize`, takes
types, ``Literal`` choices, bounds and defaults from the dataclasses, and renders one
markdown table per section, so the reference cannot drift from the code:
``docs/configuration.md`` holds the rendered text between two markers, and a test fails
when it differs from :func:`render_reference`.

``python -m logitcache.config_reference`` prints the reference; ``--write PATH`` replaces
the generated block of PATH (creating the file when it does not exist); ``--check PATH``
exits 1 when PATH's block is out of date.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import re
import sys
import tokenize
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Literal

from logitcache import config as config_module

__all__ = [
    "BEGIN_MARKER", "END_MARKER", "REGENERATE_COMMAND", "FieldRow", "Section", "field_comments",
    "reference_sections", "render_reference", "generated_block", "replace_generated_block", "main",
]

BEGIN_MARKER = "<!-- BEGIN GENERATED CONFIG REFERENCE -->"
END_MARKER = "<!-- END GENERATED CONFIG REFERENCE -->"
REGENERATE_COMMAND = "python -m logitcache.config_reference --write docs/configuration.md"
_BOUND_SYMBOLS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_PRAGMAS = ("noqa", "type:", "pragma", "fmt:", "pyright:", "mypy:")
_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")  # what markdown would read as the start of an HTML tag
_NEW_FILE_HEADER = "# Configuration reference\n\n"


@dataclass(frozen=True)
class FieldRow:
    """One row of the reference: a field of a section, as the user writes it in YAML."""

    key: str  # dotted key, e.g. students[].loss.kind
    owner: type  # the config dataclass the field belongs to
    name: str  # the dataclass field name
    type: str
    default: str
    meaning: str


@dataclass(frozen=True)
class Section:
    """One config dataclass at one place of the job file."""

    path: str  # dotted path of the section; "" for the top level
    cls: type
    doc: str
    rows: tuple[FieldRow, ...]


def _is_section(value: Any) -> bool:
    return isinstance(value, type) and dataclasses.is_dataclass(value)


@functools.cache
def _source_tree() -> tuple[ast.Module, dict[int, list[tuple[str, bool]]]]:
    """The parsed source of logitcache.config, and its comments by line (text, whole-line?)."""
    source = inspect.getsource(config_module)
    comments: dict[int, list[tuple[str, bool]]] = {}
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        line, column = token.start
        whole_line = not lines[line - 1][:column].strip()
        comments.setdefault(line, []).append((token.string, whole_line))
    return ast.parse(source), comments


def _comment_text(raw: str) -> str:
    text = raw.lstrip("#").strip()
    return "" if text.startswith(_PRAGMAS) else text


def _class_nodes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment that documents it in config.py ("" when there is none).

    The comment is the block of whole-line comments directly above the field (no blank line
    between) followed by any comment on the field's own lines (a statement may span several),
    joined with spaces. Tool pragmas (``# noqa``, ``# type: ...``) are not comments here.
    """
    tree, comments = _source_tree()
    node = _class_nodes(tree).get(cls.__name__)
    if node is None:
        raise LookupError(f"{cls.__name__} is not defined at the top level of logitcache/config.py")
    found: dict[str, str] = {}
    for statement in node.body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        above: list[str] = []
        line = statement.lineno - 1
        while line in comments and all(whole for _, whole in comments[line]):
            above[:0] = [_comment_text(text) for text, _ in comments[line]]
            line -= 1
        end = statement.end_lineno or statement.lineno
        trailing = [_comment_text(text) for number in range(statement.lineno, end + 1)
                    for text, _ in comments.get(number, ())]
        found[statement.target.id] = " ".join(part for part in above + trailing if part)
    return found


def _class_doc(cls: type) -> str:
    tree, _ = _source_tree()
    node = _class_nodes(tree).get(cls.__name__)
    doc = ast.get_docstring(node, clean=True) if node is not None else None
    return doc or ""


def _section_of(hint: Any) -> tuple[type | None, bool]:
    """(dataclass, is_list) when the hint is a section, Optional section or list of sections."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in args if arg is not type(None)]
        return _section_of(inner[0]) if len(inner) == 1 else (None, False)
    if origin is list and args and _is_section(args[0]):
        return args[0], True
    return (hint, False) if _is_section(hint) else (None, False)


def _type_name(hint: Any, *, plural: bool = False) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in args if arg is not type(None)]
        text = " or ".join(_type_name(arg, plural=plural) for arg in inner)
        return f"{text} or null" if type(None) in args else text
    if origin is Literal:
        return "one of " + ", ".join(f"`{choice}`" for choice in args)
    if origin is list:
        return f"list of {_type_name(args[0], plural=True)}" if args else "list"
    if hint is dict or origin is dict:
        return "mappings" if plural else "mapping"
    names = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if hint in names:
        return names[hint] + ("s" if plural else "")
    return getattr(hint, "__name__", str(hint))


def _bounds_text(bounds: dict[str, Any]) -> str:
    return " and ".join(f"{_BOUND_SYMBOLS[name]} {limit}" for name, limit in bounds.items())


def _value_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value_text(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_value_text(item)}" for key, item in value.items()) + "}"
    return str(value)


def _default_text(spec: dataclasses.Field, section: type | None, is_list: bool) -> str:
    if spec.default is MISSING and spec.default_factory is MISSING:
        return "**required**"
    value = spec.default if spec.default is not MISSING else spec.default_factory()
    if section is not None and not is_list and value is not None:
        return "the section's defaults"
    if value is None and section is not None:
        return "null (section absent)"
    return f"`{_value_text(value)}`"


def _escape(text: str) -> str:
    """Markdown-safe table cell text: no pipes, no HTML tags, no stray emphasis."""
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")
    return _TAG_START.sub("&lt;", text)


def reference_sections() -> list[Section]:
    """Every section reachable from :class:`~logitcache.config.JobConfig`, depth first in field order."""
    sections: list[Section] = []

    def visit(cls: type, path: str) -> None:
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        rows: list[FieldRow] = []
        children: list[tuple[type, str]] = []
        for spec in dataclasses.fields(cls):
            hint = hints[spec.name]
            key = f"{path}.{spec.name}" if path else spec.name
            section, is_list = _section_of(hint)
            if section is not None:
                child = f"{key}[]" if is_list else key
                type_text = f"list of `{child}` sections" if is_list else f"section `{child}`"
                if type(None) in typing.get_args(hint):
                    type_text += " or null"
                children.append((section, child))
            else:
                type_text = _type_name(hint)
                if spec.metadata.get("one_or_many"):
                    type_text = f"{_type_name(typing.get_args(hint)[0])} or {type_text}"
                bounds = spec.metadata.get("bounds") or {}
                if bounds:
                    type_text += ", " + _bounds_text(bounds)
            rows.append(FieldRow(key=key, owner=cls, name=spec.name, type=type_text,
                                 default=_default_text(spec, section, is_list),
                                 meaning=comments.get(spec.name, "")))
        sections.append(Section(path=path, cls=cls, doc=_class_doc(cls), rows=tuple(rows)))
        for section, child in children:
            visit(section, child)

    visit(config_module.JobConfig, "")
    return sections


def _title(section: Section) -> str:
    return f"`{section.path}`" if section.path else "Top level"


def render_reference() -> str:
    """The markdown reference of every section and field (ends with a newline)."""
    sections = reference_sections()
    out = [
        "<!-- Generated from logitcache/config.py by "
        f"`{REGENERATE_COMMAND}`; edit the comments in config.py, not this block. -->",
        "",
        "Sections: " + ", ".join(_title(section) for section in sections) + ".",
        "",
        "Keys are written as in `--set` overrides and error messages; `students[]` is each entry "
        "of the `students` list (`--set students.0.loss.alpha=0.3`).",
    ]
    for section in sections:
        out += ["", f"## {_title(section)}", "", f"Defined by `{section.cls.__name__}`."]
        if section.doc:
            out += ["", section.doc]
        out += ["", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for row in section.rows:
            out.append(f"| `{row.key}` | {_escape(row.type)} | "
                       f"{row.default} | {_escape(row.meaning)} |")
    return "\n".join(out) + "\n"


def generated_block(document: str) -> str | None:
    """The text between the markers of ``document`` (None when it has no such block)."""
    start = document.find(BEGIN_MARKER)
    end = document.find(END_MARKER, start + 1)
    if start < 0 or end < 0:
        return None
    block = document[start + len(BEGIN_MARKER):end]
    return block[1:] if block.startswith("\n") else block


def replace_generated_block(document: str, reference: str) -> str:
    """``document`` with its generated block replaced by ``reference``."""
    start = document.find(BEGIN_MARKER)
    end = document.find(END_MARKER, start + 1)
    if start < 0 or end < 0:
        raise ValueError(f"no {BEGIN_MARKER} ... {END_MARKER} block")
    return document[:start] + BEGIN_MARKER + "\n" + reference + document[end:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m logitcache.config_reference",
        description="Print the configuration reference generated from logitcache/config.py.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="PATH",
                       help="replace the generated block of PATH (create PATH when missing)")
    group.add_argument("--check", metavar="PATH", help="exit 1 when PATH's generated block is out of date")
    args = parser.parse_args(argv)
    reference = render_reference()
    if args.write is None and args.check is None:
        sys.stdout.write(reference)
        return 0
    path = Path(args.write or args.check)
    if args.check is not None:
        current = generated_block(path.read_text(encoding="utf-8")) if path.is_file() else None
        if current != reference:
            print(f"{path}: the configuration reference is out of date; run: "
                  f"python -m logitcache.config_reference --write {path}", file=sys.stderr)
            return 1
        return 0
    if path.is_file():
        document = path.read_text(encoding="utf-8")
        if generated_block(document) is None:
            print(f"{path}: has no {BEGIN_MARKER} ... {END_MARKER} block to replace", file=sys.stderr)
            return 2
        document = replace_generated_block(document, reference)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        document = f"{_NEW_FILE_HEADER}{BEGIN_MARKER}\n{reference}{END_MARKER}\n"
    path.write_text(document, encoding="utf-8")
    print(f"wrote the configuration reference to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
