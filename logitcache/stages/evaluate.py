"""Evaluate students on the cache's held-out split, per language, and write the report.

The held-out split is chosen by record-id hash (``eval.held_out_fraction``), so training
never saw it and every run and every student sees the same records. Token caches give,
per language: cross-entropy and perplexity of the student on the next token, KL(teacher ||
student) over the cached top-k plus one tail bucket, and top-1 agreement with the teacher.
Classification caches give accuracy and macro-F1 against gold labels (where the corpus has
them), agreement with the teacher, and KL to its class distribution.

``logitcache eval CONFIG`` loads each student's final model from ``<output>/<student>/final``
and writes ``eval.json`` next to it; training calls :func:`evaluate_students` directly with
the models in memory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from logitcache.config import JobConfig, StudentModelConfig
from logitcache.errors import StudentError
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
    token_metrics,
)
from logitcache.pipeline.distill.report import read_metrics_jsonl, write_report
from logitcache.pipeline.distill.shard_checks import find_corrupt_shards, warn_skipped
from logitcache.pipeline.distill.students import (
    Student,
    build_student,
    describe_student,
    shared_pad_id,
)
from logitcache.pipeline.distill.training import StudentTexts, student_class_logits
from logitcache.storage_schemas.shard_reader import CacheReader


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
    return {name: {"kind": kind, "metrics": accumulators[name].summary(), "records": records, "split": split,
                   "info": describe_student(student), "skipped_shards": sorted(skipped)}
            for name, student in students.items()}


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
    topk_ids = None if batch.topk_ids is None else batch.topk_ids[mask]
    topk_lp = None if batch.topk_logprobs is None else batch.topk_logprobs[mask]
    hard = batch.hard_targets[mask]
    chunk = student.cfg.loss.chunk_tokens
    for start in range(0, hidden.shape[0], chunk):
        stop = start + chunk
        with student.autocast():
            logits = student.head(hidden[start:stop])
        values = token_metrics(logits.float(), topk_ids=None if topk_ids is None else topk_ids[start:stop],
                               topk_logprobs=None if topk_lp is None else topk_lp[start:stop],
                               hard_targets=hard[start:stop])
        metrics.add(langs[start:stop], values)


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


def load_final_students(cfg: JobConfig) -> dict[str, Student]:
    """Each configured student's final model from ``<train.output>/<name>/final``."""
    reader = CacheReader(cfg.cache)
    device = resolve_device(cfg.train.device)
    students = {}
    for student_cfg in cfg.students:
        final = Path(cfg.train.output) / student_cfg.name / "final"
        if not (final / "config.json").is_file():
            raise StudentError(f"students[{student_cfg.name}]: no trained model at {final}; "
                               "run `logitcache train` with this config first")
        has_tokenizer = (final / "tokenizer_config.json").is_file()
        loaded = dataclasses.replace(student_cfg, model=StudentModelConfig(path=str(final)),
                                     tokenizer=str(final) if has_tokenizer else student_cfg.tokenizer)
        students[student_cfg.name] = build_student(loaded, manifest=reader.manifest, device=device,
                                                   seed=cfg.train.seed)
    return students


def write_students_report(cfg: JobConfig, students: dict[str, Student], evaluation: dict[str, Any]) -> Path:
    """The markdown + PNG report of an evaluation, with each student's training curves."""
    output = Path(cfg.train.output)
    report_dir = Path(cfg.eval.report) if cfg.eval.report else output / "report"
    curves = {}
    for name in students:
        log = output / name / "metrics.jsonl"
        curves[name] = read_metrics_jsonl(log) if log.is_file() else []
        trained = [row for row in curves[name] if "lr" in row]
        if trained and name in evaluation:  # how much each student was trained on, side by side
            evaluation[name].setdefault("info", {}).update(steps=trained[-1]["step"], tokens=trained[-1]["tokens"])
    for name, result in evaluation.items():
        (output / name).mkdir(parents=True, exist_ok=True)
        (output / name / "eval.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    reader = CacheReader(cfg.cache)
    split = next(iter(evaluation.values()), {}).get("split", "eval")
    notes = [f"cache: {cfg.cache} ({reader.manifest.kind}, {reader.manifest.total_records:,} records, "
             f"teacher {reader.manifest.teacher.get('name_or_path')})",
             f"evaluated on {next(iter(evaluation.values()), {}).get('records', 0):,} records of the "
             + ("held-out split" if split == "eval" else "whole cache: eval.held_out_fraction is 0, so these "
                "records were also trained on")
             + (f" (eval.held_out_fraction {cfg.eval.held_out_fraction})" if split == "eval" else "")]
    return write_report(report_dir, title="logitcache students", students=evaluation, curves=curves, notes=notes)
