"""Stage two: train every configured student from the cache, reading each batch once.

The recipe, top to bottom:

1. open the cache (its manifest says what the records hold) and check every student's loss
   against the cache kind, and its batch size against the shared batch, before anything
   heavy happens;
2. build or load each student and check that it can read this cache (same vocabulary, or
   its own text column for classification caches);
3. stream the cache's training split (everything but the held-out records) through a
   ``CacheDataset`` in a DataLoader; each batch is decoded once, moved to the device once
   and fed to every student still training; every student has its own optimizer, schedule,
   batch size (the shared batch whole, or cut into pieces of its ``batch_tokens``), gradient
   accumulation and JSONL log (``<output>/<student>/metrics.jsonl``);
4. every ``save_every`` batches (and at the end) save a checkpoint of all students and the
   reader's position; a later run with the same config resumes from the newest one exactly;
5. evaluate on the held-out split every ``eval_every`` steps and at the end, save each
   final model to ``<output>/<student>/final`` and write the report.

A shard whose bytes no longer match the manifest never reaches a student: by default the
reader checks each shard's sha256 before its first block and stops the run naming it;
``train.on_corrupt_shard: skip`` checks every shard up front instead and trains and
evaluates without the bad ones, naming them in a warning and counting them in the metrics
(see :mod:`logitcache.pipeline.distill.shard_checks`).

Under torchrun (``torchrun --nproc_per_node=N -m logitcache train CONFIG``) the same recipe
runs on every rank (see :mod:`logitcache.pipeline.distill.distributed`): the students start from
rank 0's weights, each rank reads its own windows of the cache, every step trains on the
union of the ranks' batches (gradients summed over ranks), and the ranks stop together when
all of them run dry. Rank 0 alone logs, draws bars, evaluates and writes checkpoints (with
every rank's reader state merged, so any world size resumes from them), final models and
the report.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from tqdm.auto import tqdm

from logitcache.config import JobConfig, config_to_dict
from logitcache.errors import ConfigError, CorruptShardError, LogitcacheError, StudentError
from logitcache.pipeline.common.corpus import paired_texts
from logitcache.pipeline.common.windows import record_id_for, tokenize
from logitcache.pipeline.distill.advice import ALPHA_WARNING, mean_topk_mass, topk_alpha_warning
from logitcache.pipeline.distill.checkpoints import (
    Checkpoint,
    CheckpointStore,
    check_resumable,
    restore_rng,
)
from logitcache.pipeline.distill.collate import (
    PackedBatches,
    SequenceBatch,
    SequencePacker,
    TokenBatch,
    TokenPacker,
    rows_for,
)
from logitcache.pipeline.distill.dataset import CacheDataset
from logitcache.pipeline.distill.distributed import Ranks, data_parallel, rank_seed
from logitcache.pipeline.distill.losses import check_loss_supported
from logitcache.pipeline.distill.shard_checks import (
    find_corrupt_shards,
    unwrap_worker_error,
    warn_skipped,
)
from logitcache.pipeline.distill.students import (
    Student,
    build_student,
    config_digest,
    shared_pad_id,
)
from logitcache.pipeline.distill.training import StudentRun, StudentTexts
from logitcache.stages.evaluate import evaluate_students, write_students_report
from logitcache.storage_schemas.manifest import Manifest
from logitcache.storage_schemas.shard_reader import CacheReader


@dataclass(kw_only=True)
class TrainSummary:
    output: str
    batches: int = 0
    resumed_from: int | None = None
    seconds: float = 0.0
    students: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> steps, tokens, eval
    report: str | None = None
    world_size: int = 1  # ranks that trained (torchrun); batches are per rank
    rank: int = 0  # the rank this summary is from; only rank 0's has evaluation and report
    skipped_shards: dict[str, str] = field(default_factory=dict)  # corrupt shard -> problem (on_corrupt_shard: skip)

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "batches": self.batches, "resumed_from": self.resumed_from,
                "seconds": round(self.seconds, 2), "students": self.students, "report": self.report,
                "world_size": self.world_size, "skipped_shards": self.skipped_shards}

    def format(self) -> str:
        ranks = f" per rank on {self.world_size} ranks" if self.world_size > 1 else ""
        lines = [f"trained {len(self.students)} student(s) over {self.batches} batches{ranks} in {self.seconds:.1f} s"
                 + (f" (resumed from batch {self.resumed_from})" if self.resumed_from else "")]
        for name, info in self.students.items():
            shown = _shown_metrics((info.get("eval") or {}).get("all") or {})
            lines.append(f"  {name}: {info['steps']} steps, {info['tokens']:,} tokens"
                         + (f"; held-out {shown}" if shown else ""))
        if self.skipped_shards:
            lines.append(f"skipped {len(self.skipped_shards)} corrupt shard(s): {', '.join(sorted(self.skipped_shards))}")
        if self.report:
            lines.append(f"report: {self.report}")
        return "\n".join(lines)


def _shown_metrics(overall: dict[str, Any]) -> str:
    """The headline held-out metrics of an evaluation, for a line of text."""
    return ", ".join(f"{k} {overall[k]:.4g}" for k in ("ce", "kl", "top1", "accuracy", "macro_f1")
                     if isinstance(overall.get(k), (int, float)))


def train_students(cfg: JobConfig, *, resume: bool = True, progress: bool = True) -> TrainSummary:
    """Train ``cfg.students`` from ``cfg.cache``; see the module docstring for the steps.

    Under torchrun every rank calls this and gets a summary; only rank 0's (``rank == 0``)
    holds the evaluation and the report."""
    cfg.require_train_sections()
    with data_parallel(cfg.train.device) as ranks:
        return _train(cfg, ranks=ranks, resume=resume, progress=progress)


@dataclass(kw_only=True)
class _TrainingRun:
    """What stage two holds from step to step, on one rank."""

    cfg: JobConfig
    ranks: Ranks
    progress: bool  # bars and messages on stderr (rank 0 only)
    started: float  # time.perf_counter() when the run began
    runs: dict[str, StudentRun]  # by student name, in the config's order
    texts: dict[str, StudentTexts]  # the classification students' own texts, by name
    skipped: dict[str, str]  # corrupt shard -> problem (on_corrupt_shard: skip)
    dataset: CacheDataset
    packer: TokenPacker | SequencePacker
    store: CheckpointStore
    digests: dict[str, str]  # student name -> config_digest
    configs: dict[str, dict[str, Any]]  # student name -> its config, for naming what changed
    batches: int = 0  # shared batches read on this rank, the checkpoints' count
    resumed_from: int | None = None
    logs: dict[str, TextIO] = field(default_factory=dict)  # metrics.jsonl by student name (rank 0 only)
    bars: dict[str, tqdm] = field(default_factory=dict)

    @property
    def output(self) -> Path:
        return Path(self.cfg.train.output)

    @property
    def done(self) -> bool:
        return all(run.done for run in self.runs.values())


def _train(cfg: JobConfig, *, ranks: Ranks, resume: bool, progress: bool) -> TrainSummary:
    training = _open_run(cfg, ranks=ranks, progress=progress and ranks.is_main)
    checkpoint = _shared_latest(training.store, ranks) if resume else None
    if checkpoint is not None:
        _resume(training, checkpoint)
    elif not resume and ranks.is_main:
        _remove_logs(training)
    loader = _open_loader(training)
    _open_logs(training, trim=resume)
    trained = not training.done  # False: a finished run, resumed
    stream = iter(loader) if trained else iter(())
    try:
        if trained:
            _train_until_done(training, stream)
    finally:
        for bar in training.bars.values():
            bar.close()
    return _finish(training, trained=trained)


def _open_run(cfg: JobConfig, *, ranks: Ranks, progress: bool) -> _TrainingRun:
    """Steps 1 and 2, and the reader of step 3 at the start of the training split."""
    started = time.perf_counter()
    # from_pretrained and save_pretrained (at every checkpoint) draw bars of their own, which
    # would break up the students' bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    train = cfg.train
    reader = CacheReader(cfg.cache)
    manifest = reader.manifest
    _check_cache(cfg, manifest)
    if ranks.is_main:
        _warn_about_settings(cfg, reader)
    length = _batch_length(cfg, manifest)
    shared_rows = rows_for(train.batch_tokens, length)
    pieces = [piece_rows(cfg, index, length=length) for index in range(len(cfg.students))]
    skipped = _corrupt_shards(cfg, reader, ranks) if train.on_corrupt_shard == "skip" else {}
    students = _build_students(cfg, manifest=manifest, ranks=ranks)
    texts = {s.name: own_texts(cfg, s) for s in students if s.reads_text}
    runs = {s.name: StudentRun.create(s, total_steps=train.steps, texts=texts.get(s.name), ranks=ranks,
                                      shared_rows=shared_rows, piece_rows=rows)
            for s, rows in zip(students, pieces, strict=True)}
    return _TrainingRun(
        cfg=cfg, ranks=ranks, progress=progress, started=started, runs=runs, texts=texts, skipped=skipped,
        digests={s.name: config_digest(s.cfg) for s in students},
        configs={s.name: config_to_dict(s.cfg) for s in students},
        dataset=_training_split(cfg, ranks=ranks, skipped=skipped), store=CheckpointStore(train.output),
        packer=_packer(cfg, manifest, students, device=ranks.device, rows=shared_rows, length=length))


def _check_cache(cfg: JobConfig, manifest: Manifest) -> None:
    """Refuse a cache without shards, and students whose loss needs what the cache lacks."""
    if not manifest.shards:
        raise ConfigError(f"cache: {cfg.cache} has no committed shards yet; run `logitcache build` first")
    for index, student_cfg in enumerate(cfg.students):
        try:
            check_loss_supported(student_cfg.loss, manifest.kind)
        except ConfigError as error:
            raise ConfigError(f"students[{index}].loss: {error}") from None


def _warn_about_settings(cfg: JobConfig, reader: CacheReader) -> None:
    """Warn about students whose soft-label setting was measured to distil badly (see
    :mod:`~logitcache.pipeline.distill.advice`); the cache's top-k mass is read only when a
    student's alpha could call for it."""
    kind = reader.manifest.kind
    if kind != "token_topk" or all(s.loss.alpha <= ALPHA_WARNING for s in cfg.students):
        return
    try:
        mass = mean_topk_mass(reader)
    except LogitcacheError:  # a damaged shard: the training reader reports or skips it, as configured
        return
    for student_cfg in cfg.students:
        message = topk_alpha_warning(student_cfg.loss, kind=kind, mass=mass, where=f"students[{student_cfg.name}]")
        if message is not None:
            warnings.warn(message, stacklevel=2)


def _build_students(cfg: JobConfig, *, manifest: Manifest, ranks: Ranks) -> list[Student]:
    """The students; under torchrun with rank 0's initial weights on every rank, and a torch
    RNG of its own per rank (for dropout)."""
    students = [build_student(s, manifest=manifest, device=ranks.device, seed=cfg.train.seed) for s in cfg.students]
    for student in students:
        ranks.broadcast_module(student.model)
    if ranks.distributed:
        torch.manual_seed(rank_seed(cfg.train.seed, ranks.rank))
    return students


def _training_split(cfg: JobConfig, *, ranks: Ranks, skipped: dict[str, str]) -> CacheDataset:
    train = cfg.train
    dataset = CacheDataset(cfg.cache, seed=train.seed, epochs=None, shuffle_buffer=train.shuffle_buffer,
                           split="train", held_out_fraction=cfg.eval.held_out_fraction,
                           languages=train.languages, lang_alpha=train.lang_alpha,
                           rank=ranks.rank, world_size=ranks.world_size,
                           verify=train.on_corrupt_shard == "stop", skip_shards=skipped, lanes=train.lanes)
    dataset.lanes_for(train.num_workers)  # refuses lanes the workers cannot share, before any work
    return dataset


def _resume(training: _TrainingRun, checkpoint: Checkpoint) -> None:
    """Every student, the reader and the torch RNG where ``checkpoint`` left them (refused
    when it was written for other students or another ``train.steps``)."""
    train, ranks = training.cfg.train, training.ranks
    check_resumable(checkpoint, digests=training.digests, configs=training.configs, steps=train.steps)
    for name, run in training.runs.items():
        run.student.model.load_state_dict(_saved_model(checkpoint.student_dir(name), run.student).state_dict())
        run.load_state_dict(checkpoint.run_state(name))
    training.dataset.load_state_dict(checkpoint.trainer["dataset"])
    if not restore_rng(checkpoint.trainer, rank=ranks.rank, world_size=ranks.world_size):
        torch.manual_seed(rank_seed(train.seed, ranks.rank, batches=checkpoint.batches))
    training.batches = training.resumed_from = checkpoint.batches
    if training.progress:
        tqdm.write(f"resuming from {_described(checkpoint)}", file=sys.stderr)


def _remove_logs(training: _TrainingRun) -> None:
    """A run started afresh (--no-resume) logs anew."""
    if training.output.exists():
        for name in training.runs:
            (training.output / name / "metrics.jsonl").unlink(missing_ok=True)


def _open_loader(training: _TrainingRun) -> torch.utils.data.DataLoader:
    if training.dataset.records_per_epoch() == 0:
        raise StudentError("the training split of the cache is empty (every record is held out or filtered "
                           "out by train.languages); lower eval.held_out_fraction or widen the filter")
    train = training.cfg.train
    return torch.utils.data.DataLoader(
        PackedBatches(training.dataset, training.packer),
        batch_size=None,
        num_workers=train.num_workers, pin_memory=pins_memory(train.pin_memory, training.ranks.device),
        persistent_workers=train.num_workers > 0)


def _open_logs(training: _TrainingRun, *, trim: bool) -> None:
    """Rank 0's metrics logs (with ``trim``, first cut back to the steps the run resumes
    from) and the progress bars."""
    output, runs = training.output, training.runs
    if training.ranks.is_main:
        if trim:  # what a killed run logged past its checkpoint is logged again
            for name, run in runs.items():
                _trim_log(output / name / "metrics.jsonl", step=run.step, done=run.done)
        training.logs = {name: _open_log(output / name) for name in runs}
    if training.skipped:
        for name, log in training.logs.items():
            _log(log, {"step": runs[name].step, "skipped_shards": len(training.skipped),
                       "skipped_shard_paths": sorted(training.skipped)})
    training.bars = {name: tqdm(total=training.cfg.train.steps, initial=run.step, desc=name, unit="step",
                                position=i, disable=not training.progress, dynamic_ncols=True)
                     for i, (name, run) in enumerate(runs.items())}


def _train_until_done(training: _TrainingRun, stream: Iterator[TokenBatch | SequenceBatch]) -> None:
    """Step 3 and the checkpoints of step 4: every batch to every student still training,
    until all of them are done or (on every rank) the stream runs dry."""
    save_every = training.cfg.train.save_every
    while True:
        try:
            batch = next(stream, None)
        except CorruptShardError as error:  # from a DataLoader worker: drop its traceback
            raise unwrap_worker_error(error) from None
        if not training.ranks.any(batch is not None):  # under torchrun: a dry rank goes on adding nothing
            return
        _train_step(training, batch)
        if save_every and training.batches % save_every == 0:
            _save_checkpoint(training)
        if training.done:
            return


def _train_step(training: _TrainingRun, batch: TokenBatch | SequenceBatch | None) -> None:
    """One shared batch (None: this rank has run dry) for every student still training."""
    if batch is not None:
        training.dataset.observe(batch.cursors)
        batch = batch.to(training.ranks.device, non_blocking=True).decoded()  # top-k widened on the device
    training.batches += 1
    for name, run in training.runs.items():
        if run.done:
            continue
        for row in run.train_on_shared(batch):
            if training.ranks.is_main:
                _record_step(training, name, row)


def _record_step(training: _TrainingRun, name: str, row: dict[str, Any]) -> None:
    """On rank 0: log an optimizer step of student ``name``, move its bar, evaluate if due."""
    _log(training.logs[name], row)
    bar = training.bars[name]
    bar.update(1)
    bar.set_postfix_str(f"loss {row['loss']:.4f}" if "loss" in row else "")
    _evaluate_periodically(training, name, step=row["step"])


def _evaluate_periodically(training: _TrainingRun, name: str, *, step: int) -> None:
    """Evaluate student ``name`` on the held-out split every ``eval_every`` steps before the
    last (the final evaluation comes with the final models)."""
    cfg = training.cfg
    if not (cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps):
        return
    results = _evaluate_into(cfg, {name: training.runs[name].student}, training.logs, steps={name: step},
                             texts=training.texts, skipped=training.skipped)
    if training.progress:
        shown = _shown_metrics(results[name]["metrics"].get("all") or {})
        tqdm.write(f"{name} step {step}: held-out {shown}", file=sys.stderr)


def _save_checkpoint(training: _TrainingRun) -> None:
    """Step 4, on every rank (rank 0 writes): all students and the reader's position."""
    ranks, runs = training.ranks, training.runs
    for run in runs.values():
        run.gather_pending()
    trainer = {"dataset": training.dataset.state_dict(), "train_steps": training.cfg.train.steps,
               "configs": training.configs,
               "students": {n: {"config_digest": training.digests[n], "step": r.step} for n, r in runs.items()}}
    if ranks.distributed:
        gathered = ranks.gather_objects((trainer["dataset"], torch.get_rng_state().tolist()))
        trainer["dataset"] = CacheDataset.merge_states(state for state, _ in gathered)
        trainer["rank_rng"] = [rng for _, rng in gathered]
        trainer["world_size"] = ranks.world_size
    if ranks.is_main:
        training.store.save(batches=training.batches, trainer=trainer,
                            runs={n: (r.student, r) for n, r in runs.items()})


def _finish(training: _TrainingRun, *, trained: bool) -> TrainSummary:
    """The last checkpoint (unless the run was finished already), then step 5 on rank 0."""
    ranks, runs, texts = training.ranks, training.runs, training.texts
    if not training.done:
        raise StudentError(f"the cache's training split ran dry after {training.batches} batches (every record held out "
                           "or filtered out by train.languages?); lower eval.held_out_fraction or widen the filter")
    if trained:
        _save_checkpoint(training)
    missing = dict(zip(texts, ranks.sum_values([runs[n].texts.missing for n in texts]), strict=True))
    ranks.barrier()  # the final checkpoint is complete before any rank returns
    if not ranks.is_main:
        return _summary(training, students={n: {"steps": r.step, "tokens": r.tokens} for n, r in runs.items()})
    return _publish(training, missing=missing)


def _publish(training: _TrainingRun, *, missing: dict[str, float]) -> TrainSummary:
    """Step 5 (rank 0): final models, their evaluation, the report and ``train_summary.json``."""
    cfg, output, runs = training.cfg, training.output, training.runs
    finals = {name: run.student for name, run in runs.items()}
    for name, student in finals.items():
        student.save(output / name / "final")
    evaluation = _evaluate_into(cfg, finals, training.logs, steps={n: r.step for n, r in runs.items()},
                                texts=training.texts, skipped=training.skipped)
    for log in training.logs.values():
        log.close()
    students = {}
    for name, run in runs.items():
        students[name] = {"steps": run.step, "tokens": run.tokens, "seconds": round(run.seconds, 2),
                          "final": str(output / name / "final"), "eval": evaluation.get(name)}
        if missing.get(name):
            students[name]["records_without_text"] = int(missing[name])
    summary = _summary(training, students=students, report=str(write_students_report(cfg, finals, evaluation)))
    (output / "train_summary.json").write_text(json.dumps(summary.to_dict(), indent=2, default=str), encoding="utf-8")
    return summary


def _summary(training: _TrainingRun, *, students: dict[str, dict[str, Any]], report: str | None = None) -> TrainSummary:
    return TrainSummary(output=str(training.output), batches=training.batches, resumed_from=training.resumed_from,
                        seconds=time.perf_counter() - training.started, students=students, report=report,
                        world_size=training.ranks.world_size, rank=training.ranks.rank,
                        skipped_shards=training.skipped)


def interrupted_message(cfg: JobConfig) -> str:
    """What an interrupted ``logitcache train`` tells its user: where it can resume from."""
    checkpoint = CheckpointStore(cfg.train.output).latest()
    if checkpoint is None:
        every = (f"every {cfg.train.save_every} batches" if cfg.train.save_every
                 else "only at the end (train.save_every: 0)")
        return (f"interrupted before the first checkpoint (they are saved {every}); running the same "
                "command again starts afresh")
    return f"interrupted; the newest checkpoint is {_described(checkpoint)}; run the same command again to resume from it"


def _described(checkpoint: Checkpoint) -> str:
    """A checkpoint for people: where it is, and how far each student got."""
    steps = ", ".join(f"{name} at step {info.get('step')}"
                      for name, info in checkpoint.trainer.get("students", {}).items())
    return f"{checkpoint.path} (batch {checkpoint.batches}: {steps})"


def piece_rows(cfg: JobConfig, index: int, *, length: int) -> int | None:
    """Rows of student ``index``'s micro-batches (None: the shared batch whole); they must
    divide the shared batch's rows, so that every micro-batch has the same size."""
    tokens = cfg.students[index].batch_tokens
    shared = rows_for(cfg.train.batch_tokens, length)
    if tokens is None or rows_for(tokens, length) >= shared:
        return None
    rows = rows_for(tokens, length)
    if shared % rows:
        fits = ", ".join(str(d * length) for d in range(1, shared) if shared % d == 0)
        raise ConfigError(
            f"students[{index}].batch_tokens: {tokens} makes micro-batches of {rows} row(s) of {length} tokens, "
            f"which do not divide the shared batch's {shared} rows (train.batch_tokens {cfg.train.batch_tokens}); "
            f"use one of {fits}, or null for the whole batch")
    return rows


def pins_memory(setting: bool | None, device: torch.device) -> bool:
    """Whether the loader pins its batches: ``train.pin_memory``, or on a GPU by default; never
    for a CPU trainer, which has no copy to speed up."""
    return device.type == "cuda" and setting is not False


def own_texts(cfg: JobConfig, student: Student) -> StudentTexts:
    """A classification student's tokenization of its text column, keyed by cached record id."""
    if cfg.corpus is None:
        raise ConfigError(f"students[{student.name}].text_column: needs the corpus section, to read the column from")
    texts = paired_texts(cfg.corpus, student.cfg.text_column, owner=f"students[{student.name}].text_column")
    keys = list(texts)
    encoded = tokenize(student.tokenizer, [texts[k] for k in keys])
    limit = cfg.windows.max_length
    return StudentTexts(ids_by_record={record_id_for(key, 0): np.asarray(ids[:limit], dtype=np.int64)
                                       for key, ids in zip(keys, encoded, strict=True)})


def _batch_length(cfg: JobConfig, manifest) -> int:
    """Slots per row of a packed batch: the cache's window length."""
    return int(manifest.windows.get("max_length") or cfg.windows.max_length)


def _packer(cfg: JobConfig, manifest, students: list[Student], *, device: torch.device, rows: int,
            length: int) -> TokenPacker | SequencePacker:
    layout = manifest.layout
    pad_id = shared_pad_id(students)
    if layout.is_token_level:
        # top-k leave the workers in their stored types, a quarter of the bytes at k = 64, and
        # are widened on the GPU; a CPU trainer leaves the widening to its workers, if it has any
        decode = device.type == "cpu" and cfg.train.num_workers > 0
        return TokenPacker(layout, rows=rows, length=length, pad_id=pad_id, decode=decode)
    return SequencePacker(layout, rows=rows, pad_id=pad_id)


def _shared_latest(store: CheckpointStore, ranks: Ranks) -> Checkpoint | None:
    """The newest checkpoint, which every rank must see the same."""
    checkpoint = store.latest()
    seen = ranks.gather_objects(None if checkpoint is None else checkpoint.path.name)
    if len(set(seen)) > 1:
        raise StudentError(f"the ranks see different newest checkpoints under {store.root} ({seen}, by rank); "
                           "train.output must be one directory that every rank shares (a shared filesystem)")
    return checkpoint


def _saved_model(directory: Path, student: Student):
    return type(student.model).from_pretrained(directory).to(student.device)


def _open_log(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    return open(directory / "metrics.jsonl", "a", encoding="utf-8")


def _trim_log(path: Path, *, step: int, done: bool) -> None:
    """Keep only the rows a run resumed at ``step`` will not write again, so that each step is
    logged once however often a run is killed: training rows up to ``step``, evaluations before
    it (and at it, unless training is over: the final evaluation runs again); a row torn by the
    kill, and every other row at or past ``step``, goes."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # half a row: the process died while writing it
        if not isinstance(row, dict):
            continue
        at, evaluation = row.get("step", 0), any(key.startswith("eval_") for key in row)
        if at < step or (at == step and ("lr" in row or (evaluation and not done))):
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def _log(stream, row: dict[str, Any]) -> None:
    stream.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}) + "\n")
    stream.flush()


def _corrupt_shards(cfg: JobConfig, reader: CacheReader, ranks: Ranks) -> dict[str, str]:
    """Every corrupt shard of the cache; under torchrun each rank checks its share and all
    ranks get the same answer, so they skip the same shards."""
    found: dict[str, str] = {}
    for part in ranks.gather_objects(find_corrupt_shards(reader, rank=ranks.rank, world_size=ranks.world_size)):
        found.update(part)
    if ranks.is_main:
        warn_skipped(found, cache=cfg.cache, what="training and evaluation")
    if len(found) == len(reader.shards):
        raise CorruptShardError(f"every shard of {cfg.cache} is corrupt, nothing is left to train on; "
                                f"run `logitcache verify {cfg.cache}`, then `logitcache build CONFIG --repair`")
    return found


def _evaluate_into(cfg: JobConfig, students: dict[str, Student], logs, *, steps: dict[str, int],
                   texts: dict[str, StudentTexts], skipped: dict[str, str]) -> dict[str, Any]:
    results = evaluate_students(cfg, students, texts=texts, progress=False, skipped=skipped)
    for name, result in results.items():
        overall = result["metrics"].get("all") or {}
        row: dict[str, Any] = {"step": steps[name]}
        row.update({f"eval_{k}": v for k, v in overall.items() if isinstance(v, (int, float))})
        _log(logs[name], row)
    return results
