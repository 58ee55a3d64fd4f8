"""A markdown report with two PNG figures comparing the students trained from one cache.

Why: the point of caching a teacher once is to train and compare many students from it, and
the comparison is what a person reads at the end of a run. :func:`write_report` turns the
evaluation summaries of :mod:`logitcache.pipeline.distill.metrics` and the JSONL training logs into
``report.md`` (tables that diff well and render anywhere), ``loss_curves.png`` and
``per_language.png``. Ordering is deterministic (students as given, languages sorted, the
overall row ``all`` last) so reports of reruns compare line by line; missing values show as
"–". :func:`read_metrics_jsonl` reads training logs, including those of a killed run.

Figures are drawn on a ``matplotlib.figure.Figure`` with the Agg canvas, imported inside the
drawing functions: importing this module stays cheap, no process-wide backend is switched and
no pyplot figure registry exists to leak figures into.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["read_metrics_jsonl", "write_report"]

DASH = "–"
OVERALL = "all"
DPI = 120
LOSS_PNG = "loss_curves.png"
LANG_PNG = "per_language.png"
KINDS = ("token", "classification")
# (summary key, column label, format) per kind; "pct" shows a fraction as a percentage
COLUMNS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "token": (("ce", "CE", ".3f"), ("ppl", "PPL", ",.2f"), ("kl", "KL", ".4f"),
              ("top1", "top-1 %", "pct")),
    "classification": (("accuracy", "acc %", "pct"), ("macro_f1", "macro-F1 %", "pct"),
                       ("agreement", "agree %", "pct"), ("kl", "KL", ".4f")),
}
BAR_METRIC = {"token": ("ce", "CE (nats)", 1.0), "classification": ("accuracy", "accuracy %", 100.0)}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt_metric(value: Any, fmt: str) -> str:
    if _missing(value):
        return DASH
    if fmt == "pct":
        return f"{100.0 * value:.1f}"
    return f"{value:{fmt}}"


def _fmt_info(value: Any) -> str:
    if _missing(value):
        return DASH
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer() and abs(value) < 1e15):
        return f"{int(value):,}"
    return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1) -> list[str]:
    """A markdown table: the first ``left`` columns left-aligned (names), the rest right."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join("---" if i < left else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _languages(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    names = {lang for summary in summaries for lang in summary}
    return sorted(names - {OVERALL}) + ([OVERALL] if OVERALL in names else [])


def _by_kind(students: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Mapping[str, Any]]]:
    groups: dict[str, dict[str, Mapping[str, Any]]] = {kind: {} for kind in KINDS}
    for name, student in students.items():
        kind = student.get("kind")
        if kind not in groups:
            raise ValueError(f"student {name!r}: kind must be one of {KINDS}, got {kind!r}")
        groups[kind][name] = student.get("metrics") or {}
    return groups


def _students_section(students: Mapping[str, Mapping[str, Any]]) -> list[str]:
    keys: list[str] = []
    for student in students.values():
        keys += [k for k in (student.get("info") or {}) if k not in keys]
    rows = [[name, str(student.get("kind")), *(_fmt_info((student.get("info") or {}).get(k))
                                               for k in keys)]
            for name, student in students.items()]
    return ["## Students", "", *_table(["student", "kind", *keys], rows, left=2), ""]


def _language_section(kind: str, metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    header = ["language"] + [f"{name} {label}" for name in metrics for _, label, _ in COLUMNS[kind]]
    rows = []
    for lang in _languages(list(metrics.values())):
        row = [f"**{lang}**" if lang == OVERALL else lang]
        for summary in metrics.values():
            values = summary.get(lang) or {}
            row += [_fmt_metric(values.get(key), fmt) for key, _, fmt in COLUMNS[kind]]
        rows.append(row)
    return [f"## Per-language metrics ({kind})", "", *_table(header, rows), ""]


def write_report(
    out_dir: str | Path,
    *,
    title: str,
    students: Mapping[str, Mapping[str, Any]],
    curves: Mapping[str, Sequence[Mapping[str, float]]],
    notes: Sequence[str] = (),
) -> Path:
    """Write ``report.md``, ``loss_curves.png`` and ``per_language.png``; return the .md path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = _by_kind(students)
    _plot_loss_curves(out / LOSS_PNG, curves)
    _plot_per_language(out / LANG_PNG, groups)
    lines = [f"# {title}", "", *_students_section(students)]
    for kind in KINDS:
        if groups[kind]:
            lines += _language_section(kind, groups[kind])
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    lines += ["## Figures", "", f"![Training loss per step]({LOSS_PNG})", "",
              f"![Metrics per language]({LANG_PNG})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def read_metrics_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics log, one per line; an unreadable LAST line (the partial
    write of a killed run) is dropped, an unreadable line before it raises ``ValueError``."""
    lines = [(i, line) for i, line in enumerate(Path(path).read_bytes().split(b"\n"), 1)
             if line.strip()]
    rows: list[dict[str, Any]] = []
    for number, line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            row = None
        if not isinstance(row, dict):
            if number == lines[-1][0]:
                break
            raise ValueError(f"{path}:{number}: not a JSON object")
        rows.append(row)
    return rows


# -- figures --------------------------------------------------------------------------------


def _figure(panels: int, *, width: float, height: float = 4.0) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * panels, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, panels, squeeze=False)[0])


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = sorted(
        (float(row["step"]), float(row[key])) for row in rows
        if isinstance(row.get("step"), (int, float)) and isinstance(row.get(key), (int, float))
        and math.isfinite(row[key])
    )
    return [x for x, _ in points], [y for _, y in points]


def _plot_loss_curves(path: Path, curves: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    series = {name: _series(rows, "loss") for name, rows in curves.items()}
    evals = {name: _series(rows, "eval_ce") for name, rows in curves.items()}
    evals = {name: xy for name, xy in evals.items() if xy[0]}
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(2 if evals else 1, width=6.5)
    panels = [(axes[0], series, "training loss", "loss", "-")]
    if evals:
        panels.append((axes[1], evals, "evaluation CE", "eval CE (nats)", "o-"))
    for ax, data, heading, ylabel, style in panels:
        drawn = 0
        for name, (xs, ys) in data.items():
            if xs:
                ax.plot(xs, ys, style, label=name, linewidth=1.5, markersize=3)
                drawn += 1
        if not drawn:
            _empty(ax, "no rows with a step and a loss")
            continue
        ax.set_title(heading)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=DPI)


def _plot_per_language(path: Path, groups: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
    kinds = [kind for kind in KINDS if groups[kind]]
    widest = max((len(_languages(list(groups[k].values()))) * max(1, len(groups[k]))
                  for k in kinds), default=1)
    fig, axes = _figure(max(1, len(kinds)), width=min(16.0, 3.0 + 0.45 * widest))
    if not kinds:
        _empty(axes[0], "no students")
    for ax, kind in zip(axes, kinds, strict=False):
        key, ylabel, scale = BAR_METRIC[kind]
        metrics = groups[kind]
        langs = _languages(list(metrics.values()))
        width = 0.8 / len(metrics)
        for i, (name, summary) in enumerate(metrics.items()):
            xs, hs = [], []
            for j, lang in enumerate(langs):
                value = (summary.get(lang) or {}).get(key)
                if not _missing(value):
                    xs.append(j - 0.4 + width * (i + 0.5))
                    hs.append(scale * float(value))
            ax.bar(xs, hs, width, label=name)
        ax.set_xticks(range(len(langs)), langs, rotation=45 if len(langs) > 8 else 0)
        ax.set_xlim(-0.6, len(langs) - 0.4)
        ax.set_title(f"{ylabel} per language ({kind})")
        ax.set_ylabel(ylabel)
        if kind == "classification":
            ax.set_ylim(0.0, 105.0)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, not on them
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
