"""A markdown report with two PNG figures comparing students evaluated on the same records.

Why: the point of caching a teacher once is to train and compare many students from it, and
the comparison is what a person reads at the end of a run. :func:`write_report` turns the
evaluation summaries of :mod:`logitcache.pipeline.distill.metrics` and the JSONL training logs into
``report.md`` (tables that diff well and render anywhere), ``loss_curves.png`` and
``per_language.png``.

Every table has one row per student, so a report of a dozen students or more still reads
down a column: first the results (where each student comes from, the cache it was trained
from, its size, its overall metrics and its distance to the best student and to the
hard-label baseline), then one table per metric with the languages as columns. Metrics the
summaries carry beyond the known ones get columns and tables of their own, and a summary's
``teacher_<metric>`` values make a teacher row (which says "not stored" where the cache
holds no teacher CE). Columns of estimated metrics (``kl_estimated``, ``top1_estimated`` in a
summary, see ``metric_kinds``) are marked "(est.)". Numbers have fixed decimals and are
right-aligned. Ordering is deterministic (students as given, languages sorted, the overall
column ``all`` last) so reports of reruns compare line by line; missing values show as "–".
:func:`read_metrics_jsonl` reads training logs, including those of a killed run.

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
#: Per kind: the metric each student is compared on (key, label, format, lower is better).
PRIMARY = {"token": ("ce", "CE", ".3f", True), "classification": ("accuracy", "acc", "pct", False)}
COUNTS = ("positions", "records", "labelled")  # sizes in a summary row, not metrics
NOT_PER_LANGUAGE = ("ppl",)  # follows from CE: no table of its own per language
EXTRA_FORMAT = ".4f"  # metrics without a column of their own
TEACHER = "teacher_"  # a summary's teacher_<key> is the teacher's own value of <key>
TEACHER_ROW = "teacher"
TRAINED = "trained"
BAR_METRIC = {"token": ("ce", "CE (nats)", 1.0), "classification": ("accuracy", "accuracy %", 100.0)}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt_metric(value: Any, fmt: str) -> str:
    if _missing(value):
        return DASH
    if isinstance(value, str):  # a word in place of a number: "not stored"
        return value
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


# -- the results tables: one row per student ---------------------------------------------


def _extra_keys(kind: str, metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Metrics of the summaries beyond the kind's known columns, in order of appearance: any
    metric an accumulator adds is shown (``teacher_<key>`` values go to the teacher row)."""
    known = {key for key, _, _ in COLUMNS[kind]} | set(COUNTS)
    extra: list[str] = []
    for summary in metrics.values():
        for values in summary.values():
            for key, value in (values or {}).items():
                if key in known or key in extra or key.startswith(TEACHER):
                    continue
                if _missing(value) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                    extra.append(key)
    return extra


#: Summary flags that mark a metric as estimated, and the metric they mark.
ESTIMATED = {"kl": "kl_estimated", "top1": "top1_estimated"}
#: What the teacher's CE says (in eval.json and the report) when the cache holds no ``target_logprob``.
NOT_STORED = "not stored"


def _metric_columns(kind: str, metrics: Mapping[str, Mapping[str, Any]],
                    students: Mapping[str, Mapping[str, Any]] | None = None) -> list[tuple[str, str, str]]:
    """The kind's columns and any extra metric's; a metric that some student's evaluation
    estimated (rather than computed exactly) is labelled "(est.)"."""
    estimated = {key for key, flag in ESTIMATED.items()
                 if any((students or {}).get(name, {}).get(flag) for name in metrics)}
    known = [(key, f"{label} (est.)" if key in estimated else label, fmt) for key, label, fmt in COLUMNS[kind]]
    return [*known, *((key, key, EXTRA_FORMAT) for key in _extra_keys(kind, metrics))]


def _teacher_values(metrics: Mapping[str, Mapping[str, Any]], lang: str,
                    students: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The teacher's own metrics at ``lang`` (``teacher_ce`` -> ``ce``): the same records give
    the same values for every student, so the first student that has them speaks for all.
    Where the evaluation says the teacher's CE is not stored, CE and PPL say so."""
    for summary in metrics.values():
        values = {key[len(TEACHER):]: value for key, value in (summary.get(lang) or {}).items()
                  if key.startswith(TEACHER) and not _missing(value)}
        if values:
            return values
    if any(((students or {}).get(name, {}).get("teacher") or {}).get("ce") == NOT_STORED for name in metrics):
        return {"ce": NOT_STORED, "ppl": NOT_STORED}
    return {}


def _has_teacher(metrics: Mapping[str, Mapping[str, Any]], keys: Sequence[str],
                 students: Mapping[str, Mapping[str, Any]] | None = None) -> bool:
    langs = _languages(list(metrics.values()))
    return any(key in _teacher_values(metrics, lang, students) for lang in langs for key in keys)


def _compact_count(value: Any) -> str:
    """Parameter counts as 12.3M / 456K / 789: short enough for a row per student."""
    if _missing(value) or isinstance(value, bool) or not isinstance(value, (int, float)):
        return DASH if _missing(value) else str(value)
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{int(value)}"


def _labels_of(cache: Mapping[str, Any]) -> str:
    """What a cache's soft labels are, in a few characters: top-k 64, 50 samples, 3 classes."""
    parts = []
    if cache.get("k"):
        parts.append(f"top-k {cache['k']}")
    if cache.get("samples"):
        parts.append(f"{cache['samples']} samples")
    if cache.get("num_classes"):
        parts.append(f"{cache['num_classes']} classes")
    return " + ".join(parts) or str(cache.get("kind") or DASH)


def _cache_ids(students: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """C1, C2, ... for each distinct cache students were trained from, in order of appearance."""
    ids: dict[str, str] = {}
    for student in students.values():
        cache = student.get("trained_from") or {}
        path = cache.get("path")
        if path is not None and str(path) not in ids:
            ids[str(path)] = f"C{len(ids) + 1}"
    return ids


def _source(student: Mapping[str, Any]) -> str:
    source = student.get("source")
    if source is None:
        return DASH
    return str(source) if source == TRAINED else f"{source}: not trained here"


def _delta(value: Any, reference: Any, fmt: str) -> str:
    if _missing(value) or _missing(reference):
        return DASH
    difference = float(value) - float(reference)
    if fmt == "pct":
        return f"{100.0 * difference:+.1f}"
    return f"{difference:+.3f}"


def _baseline_names(students: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> list[str]:
    """Students trained on hard labels only (``alpha`` 0): the baseline distillation must beat."""
    return [name for name in names if students[name].get("source", TRAINED) == TRAINED
            and (students[name].get("info") or {}).get("alpha") == 0]


def _results_section(kind: str, students: Mapping[str, Mapping[str, Any]],
                     metrics: Mapping[str, Mapping[str, Any]], cache_ids: Mapping[str, str]) -> list[str]:
    """One row per student: where it comes from, its size and its overall metrics, and how far
    its primary metric is from the best student's (and the best hard-label-only baseline's)."""
    columns = _metric_columns(kind, metrics, students)
    key, label, fmt, lower_better = PRIMARY[kind]
    names = list(metrics)
    overall = {name: metrics[name].get(OVERALL) or {} for name in names}
    scored = [overall[name][key] for name in names if not _missing(overall[name].get(key))]
    best = (min(scored) if lower_better else max(scored)) if scored else None
    baselines = [overall[name].get(key) for name in _baseline_names(students, names)
                 if not _missing(overall[name].get(key))]
    baseline = (min(baselines) if lower_better else max(baselines)) if baselines else None
    header = ["student", "source", "cache", "labels", "B/token", "params", *(c[1] for c in columns),
              f"Δ{label} vs best"]
    if baseline is not None:
        header.append(f"Δ{label} vs CE-only")
    rows = []
    for name in names:
        student = students[name]
        cache = student.get("trained_from") or {}
        row = [name, _source(student), cache_ids.get(str(cache.get("path")), DASH),
               _labels_of(cache) if cache else DASH, _fmt_metric(cache.get("bytes_per_token"), ".2f"),
               _compact_count((student.get("info") or {}).get("parameters")),
               *(_fmt_metric(overall[name].get(k), f) for k, _, f in columns),
               _delta(overall[name].get(key), best, fmt)]
        if baseline is not None:
            row.append(_delta(overall[name].get(key), baseline, fmt))
        rows.append(row)
    teacher = _teacher_values(metrics, OVERALL, students)
    if any(k in teacher for k, _, _ in columns):
        rows.append([f"*{TEACHER_ROW}*", TEACHER_ROW, DASH, DASH, DASH, DASH,
                     *(_fmt_metric(teacher.get(k), f) for k, _, f in columns),
                     *([DASH] * (len(header) - 6 - len(columns)))])
    return [f"## Results ({kind})", "", *_table(header, rows, left=4), ""]


def _per_language_sections(kind: str, metrics: Mapping[str, Mapping[str, Any]],
                           students: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """A table per metric, students as rows and languages as columns (``all`` last), plus the
    teacher's row where the summaries carry its value of that metric."""
    langs = _languages(list(metrics.values()))
    lines: list[str] = []
    for key, label, fmt in [c for c in _metric_columns(kind, metrics, students) if c[0] not in NOT_PER_LANGUAGE]:
        rows = [[name, *(_fmt_metric((summary.get(lang) or {}).get(key), fmt) for lang in langs)]
                for name, summary in metrics.items()]
        if _has_teacher(metrics, [key], students):
            rows.append([f"*{TEACHER_ROW}*", *(_fmt_metric(_teacher_values(metrics, lang, students).get(key), fmt)
                                               for lang in langs)])
        header = ["student", *(f"**{lang}**" if lang == OVERALL else lang for lang in langs)]
        lines += [f"## Per-language {label} ({kind})", "", *_table(header, rows), ""]
    return lines


def _caches_section(students: Mapping[str, Mapping[str, Any]], cache_ids: Mapping[str, str]) -> list[str]:
    caches = {}
    for student in students.values():
        cache = student.get("trained_from") or {}
        if cache.get("path") is not None:
            caches.setdefault(str(cache["path"]), cache)
    rows = [[cache_ids[path], path, str(cache.get("kind") or DASH), _labels_of(cache),
             str(cache.get("values") or DASH), str(cache.get("teacher") or DASH),
             _fmt_metric(cache.get("bytes_per_token"), ".2f"), _fmt_info(cache.get("records"))]
            for path, cache in caches.items()]
    header = ["cache", "path", "kind", "labels", "values", "teacher", "B/token", "records"]
    return ["## Caches the students were trained from", "", *_table(header, rows, left=6), ""]


def write_report(
    out_dir: str | Path,
    *,
    title: str,
    students: Mapping[str, Mapping[str, Any]],
    curves: Mapping[str, Sequence[Mapping[str, float]]],
    notes: Sequence[str] = (),
) -> Path:
    """Write ``report.md``, ``loss_curves.png`` and ``per_language.png``; return the .md path.

    ``students`` maps the name of a row to ``{"kind", "metrics", "info"}`` and optionally
    ``"source"`` (``trained``, or where an evaluated model that was not trained here came from)
    and ``"trained_from"`` (the cache it was trained from: path, kind, k, samples, num_classes,
    values, bytes_per_token, records, teacher). ``curves`` holds the training logs of those
    that have one; the others draw no curve.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = _by_kind(students)
    _plot_loss_curves(out / LOSS_PNG, {name: rows for name, rows in curves.items() if rows})
    _plot_per_language(out / LANG_PNG, groups)
    cache_ids = _cache_ids(students)
    lines = [f"# {title}", ""]
    for kind in KINDS:
        if groups[kind]:
            lines += _results_section(kind, students, groups[kind], cache_ids)
    for kind in KINDS:
        if groups[kind]:
            lines += _per_language_sections(kind, groups[kind], students)
    if cache_ids:
        lines += _caches_section(students, cache_ids)
    lines += _students_section(students)
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
