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


def table(text: str, heading: str) -> list[dict[str, str]]:
    """The rows of the markdown table under ``## heading``, as {column: cell}."""
    lines = text[text.index(f"## {heading}\n"):].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    header, body = rows[0], rows[2:]  # rows[1] is the alignment rule
    return [dict(zip(header, row, strict=True)) for row in body]


def test_token_report(tmp_path: Path) -> None:
    md = write_report(tmp_path / "out", title="Token students", students=token_students(),
                      curves=curves(), notes=["teacher: tiny-llama", "k = 8"])
    assert md == tmp_path / "out" / "report.md"
    text = md.read_text(encoding="utf-8")
    assert text.startswith("# Token students")
    for expected in ("1,234,567", "12.35", "0.0003", "- teacher: tiny-llama", "- k = 8",
                     "![Training loss per step](loss_curves.png)", "(per_language.png)"):
        assert expected in text, expected
    results = table(text, "Results (token)")
    assert [row["student"] for row in results] == ["tiny-kd", "tiny-ce"]
    kd, ce = results
    assert (kd["CE"], kd["PPL"], kd["KL"], kd["top-1 %"], kd["params"]) == ("1.780", "5.93", "0.1235", "58.0", "–")
    assert kd["ΔCE vs best"] == "+0.030" and ce["ΔCE vs best"] == "+0.000"
    assert "ΔCE vs CE-only" not in kd  # no student was trained on hard labels alone
    per_lang = table(text, "Per-language CE (token)")
    assert list(per_lang[0]) == ["student", "de", "en", "**all**"]  # languages sorted, "all" last
    assert per_lang[0] == {"student": "tiny-kd", "de": "2.346", "en": "1.500", "**all**": "1.780"}
    assert per_lang[1]["de"] == "–"  # tiny-ce has no German at all
    assert table(text, "Per-language KL (token)")[0]["en"] == "–"  # tiny-kd's missing KL
    assert table(text, "Per-language top-1 % (token)")[1] == {"student": "tiny-ce", "de": "–", "en": "25.0",
                                                              "**all**": "25.0"}
    assert "Per-language PPL" not in text and "teacher" not in text.split("## Notes")[0]
    # numbers right-aligned, names left
    rule = next(line for line in text.splitlines() if line.startswith("|---"))
    assert rule.startswith("|---|---|---|---|---:|")
    for name in ("loss_curves.png", "per_language.png"):
        check_png(tmp_path / "out" / name)


def test_classification_report(tmp_path: Path) -> None:
    md = write_report(tmp_path, title="Classifiers", students=classification_students(),
                      curves={})
    text = md.read_text(encoding="utf-8")
    results = table(text, "Results (classification)")
    assert [row["student"] for row in results] == ["clf-small", "clf-tiny", "*teacher*"]
    assert (results[0]["acc %"], results[0]["macro-F1 %"], results[0]["agree %"], results[0]["KL"]) == \
        ("87.5", "81.2", "90.0", "0.0500")
    assert results[2]["acc %"] == "100.0" and results[2]["KL"] == "–"  # the teacher's own accuracy
    accuracy = table(text, "Per-language acc % (classification)")
    assert accuracy[0] == {"student": "clf-small", "ru": "87.5", "zh": "50.0", "**all**": "87.5"}
    assert accuracy[1]["ru"] == "–" and accuracy[1]["zh"] == "–"
    assert "## Notes" not in text
    for name in ("loss_curves.png", "per_language.png"):
        check_png(tmp_path / name)


def many_students(count: int) -> dict:
    """``count`` token students from two caches, one a CE-only baseline, one a pretrained model,
    with the teacher's CE and an extra metric in their summaries."""
    caches = [{"path": "runs/topk", "kind": "token_topk", "k": 8, "values": "float16", "bytes_per_token": 21.5,
               "records": 900, "teacher": "tiny"},
              {"path": "runs/sampled", "kind": "token_sampled", "samples": 16, "values": "float16",
               "bytes_per_token": 9.25, "records": 900, "teacher": "tiny"}]
    students = {}
    for i in range(count):
        metrics = {lang: {"positions": 10, "ce": 2.0 + i / 100 + j / 10, "ppl": 7.0, "kl": 0.1 * i, "top1": 0.5,
                          "kl_sampled": 0.01 * i, "teacher_ce": 1.0 + j / 10, "teacher_ppl": 2.7}
                   for j, lang in enumerate(("ar", "de", "en", "all"))}
        students[f"student-{i:02d}"] = {
            "kind": "token", "metrics": metrics, "source": "trained" if i < count - 1 else "--model",
            "trained_from": caches[i % 2] if i < count - 1 else None,
            "info": {"parameters": 1_500_000 + i, "alpha": 0.0 if i == 3 else 0.5}}
    return students


def test_a_report_of_twelve_students_has_a_row_per_student(tmp_path: Path) -> None:
    students = many_students(12)
    logs = curves()
    text = write_report(tmp_path, title="Many", students=students,
                        curves={"student-00": logs["tiny-kd"], "student-11": []}).read_text(encoding="utf-8")
    results = table(text, "Results (token)")
    assert [row["student"] for row in results] == [*students, "*teacher*"]
    assert all(len(row) == len(results[0]) for row in results)
    first, baseline, model, teacher = results[0], results[3], results[11], results[12]
    assert (first["cache"], first["labels"], first["B/token"]) == ("C1", "top-k 8", "21.50")
    assert (results[1]["cache"], results[1]["labels"], results[1]["B/token"]) == ("C2", "16 samples", "9.25")
    assert first["params"] == "1.5M" and first["source"] == "trained"
    assert model["source"] == "--model: not trained here" and model["cache"] == "–"
    assert first["ΔCE vs best"] == "+0.000" and results[5]["ΔCE vs best"] == "+0.050"
    assert baseline["ΔCE vs CE-only"] == "+0.000" and first["ΔCE vs CE-only"] == "-0.030"
    assert first["kl_sampled"] == "0.0000" and results[5]["kl_sampled"] == "0.0500"  # an extra metric, generic
    assert (teacher["CE"], teacher["PPL"], teacher["KL"], teacher["ΔCE vs best"]) == ("1.300", "2.70", "–", "–")
    for metric in ("CE", "KL", "top-1 %", "kl_sampled"):
        rows = table(text, f"Per-language {metric} (token)")
        assert [row["student"] for row in rows][:12] == list(students)
        assert list(rows[0]) == ["student", "ar", "de", "en", "**all**"]
    ce = table(text, "Per-language CE (token)")
    assert ce[-1] == {"student": "*teacher*", "ar": "1.000", "de": "1.100", "en": "1.200", "**all**": "1.300"}
    assert table(text, "Per-language KL (token)")[-1]["student"] == "student-11"  # no teacher KL to itself
    caches = table(text, "Caches the students were trained from")
    assert [(row["cache"], row["path"], row["kind"]) for row in caches] == [
        ("C1", "runs/topk", "token_topk"), ("C2", "runs/sampled", "token_sampled")]
    assert len(table(text, "Students")) == 12
    check_png(tmp_path / "per_language.png")
    check_png(tmp_path / "loss_curves.png")


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
