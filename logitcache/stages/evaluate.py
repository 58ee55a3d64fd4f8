"""Evaluate students on the cache's held-out split, per language, and write the report.

The held-out split is chosen by record-id hash (``eval.held_out_fraction``), so training
never saw it and every run and every student sees the same records. Token caches give,
per language: cross-entropy and perplexity of the student on the next token, KL(teacher ||
student) (over the cached top-k plus one tail bucket; for sampled caches estimated from the
draws and the stored entropy), and top-1 agreement with the teacher (for a pure sampled cache
estimated from the most-drawn id); ``metric_kinds`` in each result says which is which. Where
the cache stores the teacher's log-probability of each next token (``target_logprob``), the
teacher's own held-out CE and perplexity per language come beside each student's
(``teacher_ce``, ``teacher_ppl``), from the same positions; ``teacher.ce`` says "not stored"
for a cache built without that column.
Classification caches give accuracy and macro-F1 against gold labels (where the corpus has
them), agreement with the teacher, and KL to its class distribution.

``logitcache eval CONFIG`` loads each student's final model from ``<output>/<student>/final``
(or, for a student never trained whose config names a pretrained ``model.path``, that model
as it is) and writes ``eval.json`` next to it; training calls :func:`evaluate_students`
directly with the models in memory. ``logitcache eval CONFIG CONFIG ... --model PATH``
(:func:`evaluate_configs`) compares students of several configs, trained from other caches
too, and any pretrained models in one report: all are evaluated on the same records, the
held-out split of the first config's cache, so the other caches must have been built with
the same teacher tokenizer (their token ids must mean the same tokens).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from logitcache.config import JobConfig, StudentConfig, StudentModelConfig
from logitcache.errors import ConfigError, IncompatibleCacheError, StudentError
from logitcache.pipeline.common.hf_models import resolve_device
from logitcache.pipeline.distill.collate import (
    SequenceBatch,
    SequencePacker,
    TokenBatch,
    TokenPacker,
    row_pieces,
    rows_for,
)
from logitcache.pipeline.distill.dataset import CacheDataset
from logitcache.pipeline.distill.metrics import (
    ClassificationMetrics,
    LanguageMetrics,
    token_metric_kinds,
    token_metrics,
)
from logitcache.pipeline.distill.report import NOT_STORED, read_metrics_jsonl, write_report
from logitcache.pipeline.distill.shard_checks import find_corrupt_shards, warn_skipped
from logitcache.pipeline.distill.students import (
    Student,
    build_student,
    describe_student,
    shared_pad_id,
)
from logitcache.pipeline.distill.training import StudentTexts, student_class_logits
from logitcache.storage_schemas.fingerprint import diff_fields
from logitcache.storage_schemas.manifest import Manifest, vocabulary_identity
from logitcache.storage_schemas.shard_reader import CacheReader
from logitcache.storage_schemas.summary import bytes_per_token


def evaluate_students(cfg: JobConfig, students: dict[str, Student], *, texts: dict[str, StudentTexts] | None = None,
                      progress: bool = True, skipped: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Per student: ``{"kind", "metrics": {lang: {...}, "all": {...}}, "info", "split", "skipped_shards"}``.

    A corrupt shard stops the evaluation, or, with ``train.on_corrupt_shard: skip``, is left
    out: ``skipped`` (shard path -> problem) when the caller already checked the shards,
    else every shard is checked here first.
    """
    reader = CacheReader(cfg.cache)
    skip = cfg.train.on_corrupt_shard == "skip"
    if skip and skipped is None:
        skipped = find_corrupt_shards(reader)
        warn_skipped(skipped, cache=cfg.cache, what="evaluation")
    skipped = skipped or {}
    layout = reader.layout
    fraction = cfg.eval.held_out_fraction
    split = "eval" if fraction > 0 else "all"
    # the whole split, also when called on rank 0 of a torchrun job (the reader would take its rank's share)
    dataset = CacheDataset(cfg.cache, seed=cfg.train.seed, epochs=1, shuffle_buffer=0, split=split,
                           held_out_fraction=fraction, languages=cfg.train.languages, rank=0, world_size=1,
                           verify=not skip, skip_shards=skipped)
    length = int(reader.manifest.windows.get("max_length") or cfg.windows.max_length)
    rows = rows_for(cfg.train.batch_tokens, length)
    # each student in micro-batches of its own size, as it trains (its memory may need them)
    pieces = {name: None if s.cfg.batch_tokens is None else rows_for(s.cfg.batch_tokens, length)
              for name, s in students.items()}
    texts = texts or {}
    if layout.is_token_level:
        packer: TokenPacker | SequencePacker = TokenPacker(layout, rows=rows, length=length, decode=False,
                                                           pad_id=shared_pad_id(students.values()))
        accumulators: dict[str, Any] = {name: LanguageMetrics() for name in students}
        teacher = LanguageMetrics()
    else:
        packer = SequencePacker(layout, rows=rows, pad_id=shared_pad_id(students.values()))
        accumulators = {name: ClassificationMetrics() for name in students}

    records = 0
    limit = cfg.eval.max_records
    modes = {name: s.model.training for name, s in students.items()}
    bar = tqdm(desc="evaluating", unit="rec", disable=not progress, dynamic_ncols=True)
    try:
        for student in students.values():
            student.model.eval()
        with torch.no_grad():
            for batch in packer.pack(_limited(dataset, limit)):
                batch = batch.to(next(iter(students.values())).device).decoded()
                if isinstance(batch, TokenBatch) and batch.target_logprob is not None:
                    teacher.add(batch.position_langs(), {"ce": -batch.target_logprob[batch.label_mask]})
                for name, student in students.items():
                    for piece in row_pieces(batch, rows=rows, piece_rows=pieces[name]):
                        if piece is None:
                            continue
                        if isinstance(piece, TokenBatch):
                            _token_eval(student, piece, accumulators[name])
                        else:
                            _sequence_eval(student, piece, accumulators[name], texts.get(name))
                records += len(batch.langs)
                bar.update(len(batch.langs))
    finally:
        bar.close()
        for name, student in students.items():
            student.model.train(modes[name])
    kind = "token" if layout.is_token_level else "classification"
    results = {name: {"kind": kind, "metrics": accumulators[name].summary(), "records": records, "split": split,
                      "info": describe_student(student), "skipped_shards": sorted(skipped)}
               for name, student in students.items()}
    if layout.is_token_level:
        teacher_summary = teacher.summary() if layout.target_logprob else None
        for result in results.values():
            _add_teacher(result, teacher_summary)
            result.update(metric_kinds=token_metric_kinds(layout))
            result.update(kl_estimated=result["metric_kinds"]["kl_estimated"],
                          top1_estimated=result["metric_kinds"]["top1_estimated"])
    return results


def _add_teacher(result: dict[str, Any], summary: dict[str, dict[str, Any]] | None) -> None:
    """The teacher's held-out CE and perplexity beside the student's, per language, from the
    same positions (``teacher_ce``, ``teacher_ppl``); ``summary`` None: the cache lacks them."""
    if summary is None:
        result["teacher"] = {"ce": NOT_STORED, "note": (
            "the teacher's CE is not stored: this cache was built without the target_logprob column "
            "(before logitcache stored it); rebuild it with --overwrite to get it")}
        return
    result["teacher"] = {"ce": "stored", "note": "the teacher's CE on the same held-out positions"}
    for lang, values in result["metrics"].items():
        mine = summary.get(lang) or {}
        values["teacher_ce"], values["teacher_ppl"] = mine.get("ce"), mine.get("ppl")


def _limited(dataset: CacheDataset, limit: int | None):
    for index, record in enumerate(dataset):
        if limit is not None and index >= limit:
            return
        yield record


def _token_eval(student: Student, batch: TokenBatch, metrics: LanguageMetrics) -> None:
    batch = batch.decoded()  # a no-op unless the top-k are still in their stored types
    mask = batch.label_mask
    with student.autocast():
        hidden = student.hidden_states(batch.input_ids, batch.position_ids)[mask]
    langs = batch.position_langs()
    topk_ids, topk_lp = _select(batch.topk_ids, mask), _select(batch.topk_logprobs, mask)
    s_ids, s_counts = _select(batch.sample_ids, mask), _select(batch.sample_counts, mask)
    entropy = _select(batch.entropy, mask)
    hard = batch.hard_targets[mask]
    chunk = student.cfg.loss.chunk_tokens
    for start in range(0, hidden.shape[0], chunk):
        stop = start + chunk
        with student.autocast():
            logits = student.head(hidden[start:stop])
        rows = slice(start, stop)
        values = token_metrics(logits.float(), topk_ids=_select(topk_ids, rows),
                               topk_logprobs=_select(topk_lp, rows), sample_ids=_select(s_ids, rows),
                               sample_counts=_select(s_counts, rows), entropy=_select(entropy, rows),
                               hard_targets=hard[rows])
        metrics.add(langs[start:stop], values)


def _select(tensor: torch.Tensor | None, index: torch.Tensor | slice) -> torch.Tensor | None:
    """``tensor[index]`` of an optional column (None stays None)."""
    return None if tensor is None else tensor[index]


def _sequence_eval(student: Student, batch: SequenceBatch, metrics: ClassificationMetrics,
                   texts: StudentTexts | None) -> None:
    result = student_class_logits(student, batch, texts)
    if result is None:
        return
    logits, rows = result
    teacher, labels, langs = batch.class_logprobs, batch.labels, list(batch.langs)
    if rows is not None:
        teacher, labels = teacher[rows.to(teacher.device)], labels[rows.to(labels.device)]
        langs = [langs[i] for i in rows.tolist()]
    metrics.add(langs, student_logits=logits, teacher_logprobs=teacher, labels=labels)


#: Where an evaluated model comes from: its final model under ``train.output``, the
#: pretrained ``model.path`` of a student that was not trained here, or ``--model PATH``.
TRAINED, MODEL_PATH, MODEL_OPTION = "trained", "model.path", "--model"


@dataclass(kw_only=True)
class EvalStudent:
    """A student to evaluate, and where it comes from (the report's source and cache columns)."""

    name: str  # its name in its config, or the NAME of --model NAME=PATH
    student: Student
    source: str  # TRAINED, MODEL_PATH or MODEL_OPTION
    path: str  # the directory (or hub name) its weights were loaded from
    config: str | None = None  # the config file it comes from
    trained_from: dict[str, Any] | None = None  # the cache it was trained from; None: not trained here
    output: Path | None = None  # its directory under train.output: training log and eval.json

    def describe(self) -> dict[str, Any]:
        """What the evaluation result says about the student's origin."""
        return {"name": self.name, "source": self.source, "path": self.path, "config": self.config,
                "trained_from": self.trained_from}


@dataclass(kw_only=True)
class EvalSummary:
    """The result of ``logitcache eval``: every student's result, keyed by its row in the report."""

    report: Path
    evaluated_on: dict[str, Any]  # the cache whose held-out records every student was evaluated on
    students: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"report": str(self.report), "evaluated_on": self.evaluated_on, "students": self.students}

    def format(self) -> str:
        lines = []
        for label, result in self.students.items():
            overall = result["metrics"].get("all") or {}
            lines.append(f"{label}: " + ", ".join(f"{k} {v:.4g}" for k, v in overall.items() if isinstance(v, float)))
        return "\n".join([*lines, f"report: {self.report}"])


def describe_cache(url: str, manifest: Manifest) -> dict[str, Any]:
    """A cache as a row of the report names it: path, kind, soft labels and bytes per token."""
    layout = manifest.layout
    size = bytes_per_token(manifest)
    return {"path": str(url), "kind": manifest.kind, "k": layout.k or None, "samples": layout.samples or None,
            "num_classes": layout.num_classes or None, "values": layout.value_codec,
            "bytes_per_token": None if size is None else round(size, 3), "records": manifest.total_records,
            "teacher": manifest.teacher.get("name_or_path")}


def check_same_vocabulary(url: str, manifest: Manifest, *, reference: str, reference_manifest: Manifest) -> None:
    """Refuse to evaluate students of the cache at ``url`` on the records of ``reference`` when
    the two caches' token ids mean other tokens (another teacher tokenizer) or their labels differ."""
    differences = diff_fields(vocabulary_identity(reference_manifest), vocabulary_identity(manifest))
    if differences:
        names = (reference_manifest.tokenizer.get("name_or_path"), manifest.tokenizer.get("name_or_path"))
        raise IncompatibleCacheError(
            f"cache {url} (tokenizer {names[1]}) was built with another tokenizer or labels than cache {reference} "
            f"(tokenizer {names[0]}), whose held-out records the students are evaluated on: "
            + "; ".join(differences) + " (first cache -> this one). Its students would read other token ids; "
            "evaluate them on their own cache, in a separate `logitcache eval`")


def load_students(cfg: JobConfig, *, manifest: Manifest | None = None, device: torch.device | None = None,
                  config: str | None = None) -> dict[str, EvalStudent]:
    """Each configured student: its final model from ``<train.output>/<name>/final``, or, when it
    was never trained and its config names a pretrained ``model.path``, that model as it is.

    ``manifest`` is the cache the students are evaluated on (default: ``cfg.cache``'s own).
    """
    own = CacheReader(cfg.cache).manifest
    manifest = manifest or own
    device = device or resolve_device(cfg.train.device)
    trained_from = describe_cache(cfg.cache, own)
    students = {}
    for student_cfg in cfg.students:
        output = Path(cfg.train.output) / student_cfg.name
        final = output / "final"
        if (final / "config.json").is_file():
            has_tokenizer = (final / "tokenizer_config.json").is_file()
            loaded = dataclasses.replace(student_cfg, model=StudentModelConfig(path=str(final)),
                                         tokenizer=str(final) if has_tokenizer else student_cfg.tokenizer)
            source, path, cache = TRAINED, str(final), trained_from
        elif student_cfg.model.path is not None:
            loaded, source, path, cache = student_cfg, MODEL_PATH, student_cfg.model.path, None
        else:
            raise StudentError(f"students[{student_cfg.name}]: no trained model at {final}; "
                               "run `logitcache train` with this config first, or set model.path to "
                               "evaluate a pretrained model as it is")
        students[student_cfg.name] = EvalStudent(
            name=student_cfg.name, source=source, path=path, config=config, trained_from=cache, output=output,
            student=build_student(loaded, manifest=manifest, device=device, seed=cfg.train.seed))
    return students


def load_final_students(cfg: JobConfig) -> dict[str, Student]:
    """Each configured student's model, as :func:`load_students` finds it."""
    return {name: entry.student for name, entry in load_students(cfg).items()}


def load_model_student(name: str, path: str, *, manifest: Manifest, device: torch.device) -> EvalStudent:
    """Any pretrained causal LM or classifier directory (or hub name), evaluated as it is; its
    tokenizer, when it has one, must be the cache's (as for any student)."""
    student_cfg = StudentConfig(name=name, model=StudentModelConfig(path=path))
    return EvalStudent(name=name, source=MODEL_OPTION, path=path,
                       student=build_student(student_cfg, manifest=manifest, device=device, seed=0))


def evaluate_configs(configs: Sequence[tuple[str, JobConfig]], *, models: Sequence[tuple[str, str]] = (),
                     report: str | None = None, progress: bool = True) -> EvalSummary:
    """Evaluate the students of every config (and each ``--model`` ``(name, path)``) together on
    the held-out split of the FIRST config's cache, and write one report.

    The other configs' caches must share the first one's tokenizer and kind of labels. A name
    given twice becomes ``<config stem>/<name>`` (``--model`` ones ``model/<name>``). The
    first config's students write their ``eval.json`` beside their model, as after training;
    the report (``report``, else the first config's ``eval.report`` or
    ``<train.output>/report``) holds the combined ``eval.json`` when there are several sources.
    """
    if not configs:
        raise ConfigError("logitcache eval: give at least one config")
    first = configs[0][1]
    reader = CacheReader(first.cache)
    device = resolve_device(first.train.device)
    groups: list[tuple[str, dict[str, EvalStudent]]] = []
    for path, cfg in configs:
        if cfg is not first:
            check_same_vocabulary(cfg.cache, CacheReader(cfg.cache).manifest, reference=first.cache,
                                  reference_manifest=reader.manifest)
        groups.append((Path(path).stem, load_students(cfg, manifest=reader.manifest, device=device, config=path)))
    if models:
        groups.append(("model", {name: load_model_student(name, path, manifest=reader.manifest, device=device)
                                 for name, path in models}))
    entries = _label_rows(groups)
    if not entries:
        raise ConfigError("students: no student to evaluate; configure students (`logitcache train` them "
                          "first) or add models with --model PATH")
    texts = _texts(first, entries)
    results = evaluate_students(first, {label: e.student for label, e in entries.items()}, texts=texts,
                                progress=progress)
    for label, entry in entries.items():
        results[label].update(entry.describe())
        if entry.source != TRAINED:  # its training settings in the config do not describe these weights
            info = results[label].get("info") or {}
            results[label]["info"] = {key: info[key] for key in ("parameters", "model_type") if key in info}
    firsts = [id(entry) for entry in groups[0][1].values()]
    own = {label for label, entry in entries.items() if id(entry) in firsts and entry.output is not None}
    report_dir = Path(report) if report else _report_dir(first)
    path = _write_report(first, entries, results, report_dir=report_dir, eval_json=own,
                         combined=len(configs) > 1 or bool(models))
    return EvalSummary(report=path, evaluated_on=describe_cache(first.cache, reader.manifest), students=results)


def _label_rows(groups: Sequence[tuple[str, dict[str, EvalStudent]]]) -> dict[str, EvalStudent]:
    """The report's row names: a student's own name where no other has it, else ``<group>/<name>``
    (and ``<group>-<i>/<name>`` where two configs share a file name too)."""
    counts = Counter(name for _, students in groups for name in students)
    stems = Counter(stem for stem, _ in groups)
    rows: dict[str, EvalStudent] = {}
    for index, (stem, students) in enumerate(groups, 1):
        prefix = stem if stems[stem] == 1 else f"{stem}-{index}"
        for name, entry in students.items():
            rows[name if counts[name] == 1 else f"{prefix}/{name}"] = entry
    return rows


def _texts(cfg: JobConfig, entries: dict[str, EvalStudent]) -> dict[str, StudentTexts]:
    """Classification students that read their own text column: their tokenization of it."""
    from logitcache.stages.train_students import own_texts  # train_students imports this module

    return {label: own_texts(cfg, e.student) for label, e in entries.items() if e.student.reads_text}


def _report_dir(cfg: JobConfig) -> Path:
    return Path(cfg.eval.report) if cfg.eval.report else Path(cfg.train.output) / "report"


def write_students_report(cfg: JobConfig, students: dict[str, Student], evaluation: dict[str, Any]) -> Path:
    """The markdown + PNG report of an evaluation of ``cfg``'s trained students, with each
    student's training curves; each student's ``eval.json`` beside its model."""
    output = Path(cfg.train.output)
    trained_from = describe_cache(cfg.cache, CacheReader(cfg.cache).manifest)
    entries = {name: EvalStudent(name=name, student=student, source=TRAINED, path=str(output / name / "final"),
                                 trained_from=trained_from, output=output / name)
               for name, student in students.items()}
    for name in evaluation:
        if name in entries:
            evaluation[name].setdefault("source", TRAINED)
            evaluation[name].setdefault("trained_from", trained_from)
    return _write_report(cfg, entries, evaluation, report_dir=_report_dir(cfg), eval_json=set(entries))


def _write_report(cfg: JobConfig, entries: dict[str, EvalStudent], evaluation: dict[str, Any], *,
                  report_dir: Path, eval_json: set[str], combined: bool = False) -> Path:
    """``report.md`` and its figures in ``report_dir`` (with the whole evaluation as ``eval.json``
    when ``combined``), and the ``eval.json`` of each student named in ``eval_json``."""
    curves = {}
    for label, entry in entries.items():
        log = None if entry.output is None else entry.output / "metrics.jsonl"
        curves[label] = read_metrics_jsonl(log) if entry.source == TRAINED and log and log.is_file() else []
        trained = [row for row in curves[label] if "lr" in row]
        if trained and label in evaluation:  # how much each student was trained on, side by side
            evaluation[label].setdefault("info", {}).update(steps=trained[-1]["step"], tokens=trained[-1]["tokens"])
    for label in sorted(eval_json & set(evaluation)):
        directory = entries[label].output
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "eval.json").write_text(json.dumps(evaluation[label], indent=2, default=str), encoding="utf-8")
    reader = CacheReader(cfg.cache)
    first = next(iter(evaluation.values()), {})
    split = first.get("split", "eval")
    notes = [f"cache: {cfg.cache} ({reader.manifest.kind}, {reader.manifest.total_records:,} records, "
             f"teacher {reader.manifest.teacher.get('name_or_path')})",
             f"evaluated on {first.get('records', 0):,} records of the "
             + ("held-out split" if split == "eval" else "whole cache: eval.held_out_fraction is 0, so these "
                "records were also trained on")
             + (f" (eval.held_out_fraction {cfg.eval.held_out_fraction})" if split == "eval" else "")]
    kinds = first.get("metric_kinds") or {}
    if kinds.get("note"):
        notes.append(kinds["note"] + (" (columns marked est.)" if kinds.get("kl_estimated") or
                                      kinds.get("top1_estimated") else ""))
    if (first.get("teacher") or {}).get("note"):
        notes.append(first["teacher"]["note"])
    if combined:
        notes.append("every student was evaluated on these same records, also those trained from another "
                     "cache (column cache) and those not trained here (column source)")
    report_dir.mkdir(parents=True, exist_ok=True)
    if combined:
        combined_json = {"evaluated_on": describe_cache(cfg.cache, reader.manifest), "students": evaluation}
        (report_dir / "eval.json").write_text(json.dumps(combined_json, indent=2, default=str), encoding="utf-8")
    return write_report(report_dir, title="logitcache students", students=evaluation, curves=curves, notes=notes)
