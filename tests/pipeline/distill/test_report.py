"""The markdown + PNG report, and reading training logs of killed runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from logitcache.pipeline.distill.report import read_metrics_jsonl, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def token_students() -> dict:
    return {
        "tiny-kd": {
            "kind": "token",
            "metrics": {
                "de": {"positions": 100, "ce": 2.34567, "ppl": 10.4399, "kl": 0.123456, "top1": 0.5},
                "en": {"positions": 200, "ce": 1.5, "ppl": 4.4817, "kl": None, "top1": 0.625},
                "all": {"positions": 300, "ce": 1.78, "ppl": 5.93, "kl": 0.123456, "top1": 0.58},
            },
            "info": {"params": 1_234_567, "loss": "kd", "steps": 500, "wall_seconds": 12.345},
        },
        "tiny-ce": {
            "kind": "token",
            "metrics": {  # no German: the cell and the bar are missing
                "en": {"positions": 200, "ce": 1.75, "ppl": 5.75, "kl": 0.4, "top1": 0.25},
                "all": {"positions": 200, "ce": 1.75, "ppl": 5.75, "kl": 0.4, "top1": 0.25},
            },
            "info": {"params": 1_234_567, "loss": "ce", "lr": 0.0003},
        },
    }


def classification_students() -> dict:
    row = {"records": 10, "labelled": 8, "kl": 0.05, "agreement": 0.9, "accuracy": 0.875,
           "macro_f1": 0.8125, "teacher_accuracy": 1.0}
    return {
        "clf-small": {"kind": "classification", "info": {"params": 5000},
                      "metrics": {"ru": row, "zh": dict(row, accuracy=0.5), "all": row}},
        "clf-tiny": {"kind": "classification", "info": {},
                     "metrics": {"ru": dict(row, accuracy=None, macro_f1=None), "all": row}},
    }


def curves() -> dict:
    rows = [{"step": s, "loss": 3.0 / s, "kd": 1.0, "ce": 2.0, "lr": 3e-4, "tokens": 4096 * s}
            for s in range(1, 6)]
    return {
        "tiny-kd": rows + [{"step": 5, "eval_ce": 2.2}, {"step": 3, "eval_ce": 2.5}],
        "tiny-ce": rows[:3],
    }


def check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert 300 <= width <= 4000 and 200 <= height <= 2000


def test_token_report(tmp_path: Path) -> None:
    md = write_report(tmp_path / "out", title="Token students", students=token_students(),
                      curves=curves(), notes=["teacher: tiny-llama", "k = 8"])
    assert md == tmp_path / "out" / "report.md"
    text = md.read_text(encoding="utf-8")
    assert text.startswith("# Token students")
    for expected in ("tiny-kd", "tiny-ce", "| de |", "| en |", "| **all** |",
                     "2.346", "10.44", "0.1235", "50.0", "62.5", "1,234,567", "12.35", "0.0003",
                     "- teacher: tiny-llama", "- k = 8",
                     "![Training loss per step](loss_curves.png)", "(per_language.png)"):
        assert expected in text, expected
    de_row = next(line for line in text.splitlines() if line.startswith("| de |"))
    assert de_row.count("–") == 4  # tiny-ce has no German at all
    en_row = next(line for line in text.splitlines() if line.startswith("| en |"))
    assert en_row.split(" | ")[3] == "–"  # tiny-kd's missing KL
    # languages sorted, "all" last
    assert text.index("| de |") < text.index("| en |") < text.index("| **all** |")
    for name in ("loss_curves.png", "per_language.png"):
        check_png(tmp_path / "out" / name)


def test_classification_report(tmp_path: Path) -> None:
    md = write_report(tmp_path, title="Classifiers", students=classification_students(),
                      curves={})
    text = md.read_text(encoding="utf-8")
    for expected in ("clf-small", "clf-tiny", "| ru |", "| zh |", "87.5", "81.2", "90.0",
                     "0.0500", "acc %", "macro-F1 %"):
        assert expected in text, expected
    ru_row = next(line for line in text.splitlines() if line.startswith("| ru |"))
    assert ru_row.count("–") == 2
    assert "## Notes" not in text
    for name in ("loss_curves.png", "per_language.png"):
        check_png(tmp_path / name)


def test_mixed_kinds_and_no_figure_leak(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    students = {**token_students(), **classification_students()}
    text = write_report(tmp_path, title="All", students=students, curves=curves()).read_text()
    assert "(token)" in text and "(classification)" in text
    assert plt.get_fignums() == before
    with pytest.raises(ValueError):
        write_report(tmp_path, title="x", students={"s": {"kind": "regression"}}, curves={})


def test_read_metrics_jsonl_skips_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25, "eval_ce": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo',
                    encoding="utf-8")
    assert read_metrics_jsonl(path) == rows
    path.write_bytes(path.read_bytes()[: -len(b'{"step": 3, "lo')] + b'\n{"lang": "\xe4')
    assert read_metrics_jsonl(path) == rows  # cut inside a multi-byte character
    path.write_text(json.dumps(rows[0]) + "\n{broken\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match=":2:"):
        read_metrics_jsonl(path)
    path.write_text("")
    assert read_metrics_jsonl(path) == []
