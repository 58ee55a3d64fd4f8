"""The fenced code blocks of README.md, by language, for the tests that run or check them."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def code_blocks(language: str, path: Path = README) -> list[str]:
    """Every block fenced as ```<language>, in the order of the file."""
    return [body for lang, body in _FENCE.findall(path.read_text(encoding="utf-8")) if lang == language]


def block_containing(language: str, text: str, path: Path = README) -> str:
    """The one ```<language> block that contains ``text``."""
    found = [block for block in code_blocks(language, path) if text in block]
    if len(found) != 1:
        raise LookupError(f"{path.name}: {len(found)} {language} blocks contain {text!r}, expected one")
    return found[0]
