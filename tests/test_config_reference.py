"""The generated configuration reference covers every field, and docs/configuration.md is current."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from logitcache import config
from logitcache.config_reference import (
    BEGIN_MARKER,
    END_MARKER,
    REGENERATE_COMMAND,
    field_comments,
    generated_block,
    main,
    reference_sections,
    render_reference,
    replace_generated_block,
)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"


def config_sections() -> list[type]:
    """Every config dataclass defined in logitcache.config (subclasses of its _Section base)."""
    return [value for value in vars(config).values()
            if isinstance(value, type) and dataclasses.is_dataclass(value)
            and issubclass(value, config._Section) and value.__module__ == config.__name__]


def test_every_field_of_every_config_dataclass_has_a_comment() -> None:
    missing = [f"{cls.__name__}.{spec.name}" for cls in config_sections()
               for spec in dataclasses.fields(cls) if not field_comments(cls).get(spec.name)]
    assert not missing, ("fields of logitcache/config.py without a comment saying what they mean "
                         "(add one on the field's line or just above it): " + ", ".join(missing))


def test_every_field_appears_in_the_reference_with_its_meaning() -> None:
    sections = reference_sections()
    documented = {(row.owner, row.name): row for section in sections for row in section.rows}
    unreachable = [cls.__name__ for cls in config_sections() if cls not in {s.cls for s in sections}]
    assert not unreachable, f"config dataclasses not reachable from JobConfig, so not in the reference: {unreachable}"
    rendered = render_reference()
    problems = []
    for cls in config_sections():
        for spec in dataclasses.fields(cls):
            row = documented.get((cls, spec.name))
            if row is None:
                problems.append(f"{cls.__name__}.{spec.name}: no row")
            elif not row.meaning.strip():
                problems.append(f"{row.key}: empty meaning")
            elif f"| `{row.key}` |" not in rendered:
                problems.append(f"{row.key}: not in the rendered reference")
    assert not problems, "; ".join(problems)


def test_reference_rows_say_types_choices_bounds_and_defaults() -> None:
    rows = {row.key: row for section in reference_sections() for row in section.rows}
    assert rows["train.batch_tokens"].type == "integer, >= 1"
    assert rows["train.batch_tokens"].default == "`16384`"
    assert rows["students[].loss.kind"].type.startswith("one of `forward_kl`, `reverse_kl`")
    assert rows["students[].loss.alpha"].type == "number, >= 0 and <= 1"
    assert rows["cache"].default == "**required**"
    assert rows["corpus"].default == "null (section absent)"
    assert rows["students"].type == "list of `students[]` sections"
    # a comment spread over the lines above a field is joined
    assert rows["students[].tokenizer"].meaning.startswith("Tokenizer path or hub name; None uses")
    assert rows["students[].tokenizer"].meaning.endswith("(its vocabulary must cover the teacher's).")


def test_docs_configuration_md_is_regenerated_from_config_py() -> None:
    block = generated_block(DOC.read_text(encoding="utf-8")) if DOC.is_file() else None
    assert block is not None, f"{DOC} has no {BEGIN_MARKER} ... {END_MARKER} block; run: {REGENERATE_COMMAND}"
    assert block == render_reference(), (
        f"docs/configuration.md is out of date with logitcache/config.py; regenerate it with: {REGENERATE_COMMAND}")


def test_write_replaces_only_the_generated_block(tmp_path: Path) -> None:
    target = tmp_path / "configuration.md"
    target.write_text(f"# Title\n\nintro kept\n\n{BEGIN_MARKER}\nstale\n{END_MARKER}\ntail kept\n", encoding="utf-8")
    assert main(["--check", str(target)]) == 1
    assert main(["--write", str(target)]) == 0
    text = target.read_text(encoding="utf-8")
    assert text.startswith("# Title\n\nintro kept\n\n") and text.endswith(f"{END_MARKER}\ntail kept\n")
    assert generated_block(text) == render_reference()
    assert main(["--check", str(target)]) == 0
    assert replace_generated_block(text, render_reference()) == text
