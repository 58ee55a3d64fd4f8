"""How a benchmark hands over its result: the command that reproduces it, and the report
printed and, with ``--out``, written to a file."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def command_line(script: str, argv: list[str] | None) -> str:
    """``python benchmarks/SCRIPT ARGS`` as it was run (``argv`` None: this process's)."""
    return f"python benchmarks/{script} {shlex.join(sys.argv[1:] if argv is None else argv)}".strip()


def publish(report: str, out: Path | None) -> None:
    print(report)
    if out is not None:
        out.write_text(report, encoding="utf-8")
