"""The package's layers import one way: storage_schemas <- pipeline <- stages <- cli.

Every ``logitcache`` import of every module is checked, those inside functions too (a lazy
import is still a dependency). Inside ``pipeline``, ``common`` comes first and the two stages'
parts, ``capture`` and ``distill``, never import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "logitcache"

# The layer of a module is the first prefix that matches; a module may import its own layer
# and any layer below it. capture and distill share a rank but may not import each other.
LAYERS = [
    ("logitcache.errors", 0),
    ("logitcache.storage_schemas", 1),
    ("logitcache.config", 2),
    ("logitcache.config_reference", 2),
    ("logitcache.pipeline.common", 3),
    ("logitcache.pipeline.capture", 4),
    ("logitcache.pipeline.distill", 4),
    ("logitcache.pipeline", 4),
    ("logitcache.stages", 5),
    ("logitcache.integrations", 5),
    ("logitcache.cli", 6),
    ("logitcache.__main__", 6),
    ("logitcache", 0),  # the package's own __init__ (the version)
]
SIBLINGS_APART = {"logitcache.pipeline.capture", "logitcache.pipeline.distill"}


def layer_of(module: str) -> tuple[str, int]:
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return prefix, rank
    raise AssertionError(f"{module} belongs to no layer; add it to LAYERS")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)]
            # `from logitcache.pipeline import distill` imports logitcache.pipeline.distill
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; use the absolute module name")
    return [(line, name) for line, name in found if name == "logitcache" or name.startswith("logitcache.")]


def is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (PACKAGE.parent / relative.with_suffix(".py")).is_file() or (PACKAGE.parent / relative).is_dir()


def violation(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported``; None when it may."""
    own, own_rank = layer_of(importer)
    other, rank = layer_of(imported)
    if rank > own_rank:
        return f"{importer} imports {imported} from a higher layer ({other})"
    if own in SIBLINGS_APART and other in SIBLINGS_APART and other != own:
        return f"{importer} imports {imported}: {own} and {other} stay apart"
    return None


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for line, imported in imports_of(path):
            if is_module(imported) and (why := violation(importer, imported)):  # not `from m import f`
                found.append(f"line {line}: {why}")
    return found


def test_imports_point_one_way():
    assert violations() == []


def test_every_module_has_a_layer_and_a_docstring():
    for path in sorted(PACKAGE.rglob("*.py")):
        layer_of(module_name(path))
        if path.stat().st_size:
            assert ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))), f"{path} has no module docstring"


@pytest.mark.parametrize(("importer", "imported"), [
    ("logitcache.storage_schemas.shard_writer", "logitcache.config"),
    ("logitcache.pipeline.capture.teacher", "logitcache.pipeline.distill.dataset"),
    ("logitcache.pipeline.distill.students", "logitcache.pipeline.capture.teacher"),
    ("logitcache.pipeline.common.corpus", "logitcache.pipeline.capture.teacher"),
    ("logitcache.pipeline.distill.training", "logitcache.stages.evaluate"),
    ("logitcache.stages.build_cache", "logitcache.cli"),
])
def test_a_backward_import_is_refused(importer, imported):
    assert violation(importer, imported) is not None


@pytest.mark.parametrize(("importer", "imported"), [
    ("logitcache.pipeline.distill.dataset", "logitcache.pipeline.common.splits"),
    ("logitcache.stages.train_students", "logitcache.stages.evaluate"),
    ("logitcache.cli", "logitcache.storage_schemas.verify"),
    ("logitcache.storage_schemas.layout", "logitcache.errors"),
])
def test_a_forward_import_is_allowed(importer, imported):
    assert violation(importer, imported) is None
