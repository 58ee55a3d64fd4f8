"""Stage one: run the teacher once over the corpus and commit its soft labels to the cache.

The recipe, top to bottom:

1. take the cache's build lock: a second build into the same cache stops with a clear
   error, and the lock of a build that was killed is taken over;
2. ask the executor (this process, or a Dask cluster: ``executor.kind``) for the teacher's
   identity, loading it where the units will run, and derive the record layout (kind of
   label, narrowest id type for the vocabulary, k, codec, samples); open the cache with a
   manifest template that records teacher, tokenizer, corpus, windowing, soft-label and
   storage settings; a cache built with another configuration is refused (``overwrite``
   starts afresh);
3. stream the corpus as deterministic work units on this process (the driver); a unit already
   committed is skipped (its documents must still hash to what was committed), a unit whose
   source has grown by appended rows since it was committed builds only those rows
   (``pipeline/common/unit_plan``), every other unit goes to the executor, which cuts it into windows and labels it with the teacher; each
   labelled unit is committed here, as one shard, on a background thread while the next
   units run. Only the driver writes the manifest;
4. record the build's statistics (tokens/s, padding, entropy per language) in the manifest,
   and fail (exit 1) naming every unit that still failed after its retries, if any.

Killing the process at any moment loses at most the units in flight: a re-run skips what is
committed and produces the records an uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from tqdm.auto import tqdm

from logitcache.config import JobConfig, config_fingerprint_fields, config_to_dict
from logitcache.errors import ConfigError, CorpusError, IncompatibleCacheError, LogitcacheError
from logitcache.pipeline.capture.executor import Executor, make_executor
from logitcache.pipeline.capture.soft_labels import SoftLabelSpec
from logitcache.pipeline.capture.unit_task import TeacherFacts, UnitTask
from logitcache.pipeline.common.chat import chat_spec, require_chat_template
from logitcache.pipeline.common.committer import BackgroundCommitter
from logitcache.pipeline.common.corpus import (
    WorkUnit,
    describe_corpus,
    estimate_units,
    iter_work_units,
    resolve_sources,
)
from logitcache.pipeline.common.unit_plan import committed_parts, decide_units
from logitcache.pipeline.distill.advice import config_warnings
from logitcache.storage_schemas.id_codec import id_type_for_vocab
from logitcache.storage_schemas.layout import RecordLayout
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.lock import CacheLock
from logitcache.storage_schemas.manifest import MANIFEST_FILE, Manifest, ShardEntry
from logitcache.storage_schemas.shard_writer import ShardWriter
from logitcache.storage_schemas.verify import verify_cache

_KIND_OF_MODE = {"topk": "token_topk", "sampled": "token_sampled", "topk+sampled": "token_topk_sampled"}

#: positions per chunk through the LM head: about 2**27 float32 logits (512 MB) at a time
_CHUNK_LOGITS = 2**27


@dataclass(kw_only=True)
class BuildSummary:
    cache: str
    units_built: int = 0
    units_skipped: int = 0
    units_appended: int = 0  # of units_built: the rows appended to a unit committed while its source was shorter
    records: int = 0
    tokens: int = 0
    positions: int = 0
    bytes: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    forward_seconds: float = 0.0
    skipped_documents: dict[str, int] = field(default_factory=dict)
    failed_units: dict[str, str] = field(default_factory=dict)  # unit id -> where and why, after retries
    repaired_units: dict[str, str] = field(default_factory=dict)  # unit id -> its damage (--repair): built again
    unrepaired_units: list[str] = field(default_factory=list)  # taken out, but the corpus no longer has them
    cache_totals: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def padding_fraction(self) -> float:
        return 1 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "cache": self.cache, "units_built": self.units_built, "units_skipped": self.units_skipped,
            "units_appended": self.units_appended,
            "records": self.records, "tokens": self.tokens, "positions": self.positions,
            "bytes": self.bytes, "bytes_per_position": round(self.bytes / self.positions, 2) if self.positions else None,
            "seconds": round(self.seconds, 3), "tokens_per_second": round(self.tokens_per_second, 1),
            "padding_fraction": round(self.padding_fraction, 4),
            "skipped_documents": self.skipped_documents, "failed_units": self.failed_units,
            "repaired_units": self.repaired_units, "unrepaired_units": self.unrepaired_units,
            "cache_totals": self.cache_totals,
        }

    def to_text(self) -> str:
        if self.units_built == 0:
            head = f"cache {self.cache} is up to date: {self.units_skipped} unit(s) already committed, no teacher forward run"
        else:
            head = (f"built {self.units_built} unit(s) ({self.units_skipped} already committed) into {self.cache}: "
                    f"{self.records:,} records, {self.tokens:,} tokens in {self.seconds:.1f} s "
                    f"({self.tokens_per_second:,.0f} tokens/s, padding {self.padding_fraction:.1%})")
        lines = [head]
        if self.units_appended:
            lines.append(f"  {self.units_appended} of them: only the rows appended to a source since its last "
                         "unit was committed")
        if self.repaired_units:
            lines.append(f"  repaired: {len(self.repaired_units)} damaged or missing shard(s) taken out and their "
                         f"unit(s) built again: {', '.join(sorted(self.repaired_units))}")
        if self.unrepaired_units:
            lines.append(f"  not built again, since the corpus no longer holds them: {', '.join(self.unrepaired_units)}")
        if self.positions:
            lines.append(f"  shard bytes: {self.bytes:,} ({self.bytes / self.positions:.1f} bytes per labelled position)")
        if self.skipped_documents:
            skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped_documents.items()))
            lines.append(f"  skipped documents: {skipped}")
        totals = self.cache_totals
        if totals:
            lines.append(f"  cache now: {totals.get('shards', 0)} shards, {totals.get('records', 0):,} records, "
                         f"{totals.get('tokens', 0):,} tokens")
        return "\n".join(lines)


class BuildIncompleteError(LogitcacheError):
    """Some work units failed after every retry; every other unit was committed."""

    def __init__(self, summary: BuildSummary) -> None:
        self.summary = summary
        failed = summary.failed_units
        lines = [f"{len(failed)} work unit(s) failed after every retry; the {summary.units_built} other unit(s) "
                 f"of this run are committed to {summary.cache}. Fix the cause and run the same command again "
                 "to build only what is left:"]
        lines += [f"  {unit_id}: {why}" for unit_id, why in sorted(failed.items())]
        super().__init__("\n".join(lines))

    def details(self) -> dict[str, Any]:
        return {"summary": self.summary.to_dict()}


def record_layout(cfg: JobConfig, teacher: TeacherFacts) -> RecordLayout:
    labels = cfg.soft_labels
    if teacher.task == "sequence_classification":
        return RecordLayout(kind="sequence_probs", id_type=id_type_for_vocab(teacher.vocab_size),
                            vocab_size=teacher.vocab_size, value_codec=labels.values,
                            num_classes=teacher.num_classes)
    kind = _KIND_OF_MODE[labels.mode]
    if "topk" in labels.mode and labels.k > teacher.vocab_size:
        raise ConfigError(f"soft_labels.k: {labels.k} is larger than the teacher's vocabulary "
                          f"({teacher.vocab_size} tokens); set soft_labels.k to at most {teacher.vocab_size}")
    return RecordLayout(
        kind=kind, id_type=id_type_for_vocab(teacher.vocab_size), vocab_size=teacher.vocab_size,
        k=labels.k if "topk" in labels.mode else 0, value_codec=labels.values,
        samples=labels.samples if "sampled" in labels.mode else 0, entropy=labels.entropy,
        target_logprob=True,
    )


def keep_existing_columns(url: str, layout: RecordLayout) -> RecordLayout:
    """``layout`` without the columns that a cache at ``url``, with shards built before those
    columns existed, lacks (only ``target_logprob`` so far): a growing cache built by an older
    logitcache keeps growing, and its new shards read like its old ones. Any other difference
    is still refused by the shard writer; ``--overwrite`` builds every column."""
    location = CacheLocation(url)
    if not layout.target_logprob or not location.exists(MANIFEST_FILE):
        return layout
    existing = Manifest.load(location)
    if existing.shards and not existing.layout.target_logprob:
        return replace(layout, target_logprob=False)
    return layout


def manifest_template(cfg: JobConfig, teacher: TeacherFacts, layout: RecordLayout) -> Manifest:
    return Manifest(
        layout=layout, backend=cfg.storage.backend, storage=config_to_dict(cfg.storage),
        teacher=teacher.identity, tokenizer=teacher.tokenizer_info, corpus=describe_corpus(cfg.corpus),
        windows=config_to_dict(cfg.windows), soft_labels=config_to_dict(cfg.soft_labels),
        config=config_to_dict(cfg), fingerprint_fields=config_fingerprint_fields(cfg),
    )


def unit_task(cfg: JobConfig, teacher: TeacherFacts, layout: RecordLayout) -> UnitTask:
    """How every unit of this build is labelled, wherever it runs."""
    spec = SoftLabelSpec(
        mode=cfg.soft_labels.mode if layout.is_token_level else "topk",
        k=max(layout.k, 1), samples=max(layout.samples, 1), entropy=True,
        chunk_positions=max(16, min(4096, _CHUNK_LOGITS // max(teacher.vocab_size, 1))),
    )
    chat = chat_spec(cfg.corpus)
    if chat is not None:
        require_chat_template(chat, has_template=teacher.has_chat_template, fast=teacher.fast_tokenizer,
                              teacher=cfg.teacher.model)
    return UnitTask(teacher=cfg.teacher, windows=cfg.windows, spec=spec, layout=layout,
                    batch_tokens=cfg.teacher.batch_tokens, seed=cfg.soft_labels.seed, teacher_digest=teacher.digest,
                    chat=chat)


def _count(counts: dict[str, int], more: dict[str, int]) -> None:
    for reason, n in more.items():
        counts[reason] = counts.get(reason, 0) + n


def _forget_damaged(writer: ShardWriter, cache: str) -> dict[str, str]:
    """Check every committed shard as ``logitcache verify`` does and take the damaged or
    missing ones out of the cache, so this build labels their units again; unit id -> problem."""
    report = verify_cache(cache)
    problems: dict[str, str] = {}
    for problem in report.problems:
        problems.setdefault(problem.unit_id, f"{problem.path}: {problem.problem}")
    writer.forget_units(set(problems))
    return problems


def build_cache(cfg: JobConfig, *, overwrite: bool = False, repair: bool = False, progress: bool = True,
                executor: Executor | None = None) -> BuildSummary:
    """Stage one for ``cfg``; returns what was built. See the module docstring.

    ``repair`` first checks every committed shard (as ``logitcache verify`` does) and builds
    the units of the damaged or missing ones again. ``executor`` runs the units; by default
    the one ``cfg.executor`` names, made and closed here.
    """
    cfg.require_build_sections()
    for message in config_warnings(cfg):  # before the teacher's time is spent on a cache that would not serve
        warnings.warn(message, stacklevel=2)
    started = time.perf_counter()
    summary = BuildSummary(cache=cfg.cache)

    if not progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    with contextlib.ExitStack() as stack:
        if executor is None:
            executor = stack.enter_context(make_executor(cfg.executor))
        lock = stack.enter_context(CacheLock(cfg.cache))  # one build at a time per cache

        # 2. the teacher (loaded where the units run), the record layout and the cache
        teacher = executor.teacher_facts(cfg.teacher)
        layout = record_layout(cfg, teacher)
        if not overwrite:
            layout = keep_existing_columns(cfg.cache, layout)
        task = unit_task(cfg, teacher, layout)
        writer = ShardWriter(cfg.cache, template=manifest_template(cfg, teacher, layout), overwrite=overwrite)
        if repair and writer.committed_units:
            summary.repaired_units = _forget_damaged(writer, cfg.cache)
        committed = committed_parts(writer.manifest.shards) if writer.committed_units else {}
        if executor.name == "dask" and cfg.executor.shard_writer == "workers":
            task = replace(task, shards=writer.target())  # workers write their own shards
        bar = stack.enter_context(tqdm(desc="build", unit=" unit", total=estimate_units(cfg.corpus) if progress else None,
                                       disable=not progress, dynamic_ncols=True))

        # 3. the units still to build, in corpus order; committed ones are checked and skipped
        units_seen = 0

        def units_to_build() -> Iterator[WorkUnit]:
            nonlocal units_seen
            for decision in decide_units(iter_work_units(cfg.corpus), committed):
                units_seen += 1
                _count(summary.skipped_documents, decision.unit.skipped)
                if decision.action == "refuse":
                    raise IncompatibleCacheError(decision.reason)
                if decision.action == "skip":
                    summary.units_skipped += 1
                    bar.update(1)
                    continue
                summary.units_appended += decision.appended
                yield decision.todo

        def on_commit(entry: ShardEntry) -> None:
            summary.bytes += entry.bytes

        with BackgroundCommitter(writer, on_commit=on_commit) as committer:
            for outcome in executor.map_units(task, units_to_build()):
                bar.update(1)
                unit, labelled = outcome.unit, outcome.labelled
                if labelled is None:
                    summary.failed_units[unit.unit_id] = f"{unit.source} rows {unit.first_row}-" \
                                                         f"{unit.first_row + unit.num_rows - 1}: {outcome.error}"
                    continue
                stats = labelled.stats
                lock.ensure_held()
                if labelled.no_tokens:
                    _count(summary.skipped_documents, {"no_tokens": labelled.no_tokens})
                entry_stats = {
                    **stats, "unit_fingerprint": unit.fingerprint, "source": unit.source,
                    "first_row": unit.first_row, "num_rows": unit.num_rows, "skipped_documents": unit.skipped,
                    "documents": unit.num_documents, "text_bytes": unit.text_bytes,
                    "labelled_by": f"{labelled.host}:{labelled.pid}",
                }
                if labelled.staged is not None:
                    committer.submit_staged(labelled.staged, stats=entry_stats)
                else:
                    committer.submit(labelled.block, unit_id=unit.unit_id, stats=entry_stats)
                summary.units_built += 1
                summary.records += labelled.records
                summary.tokens += stats["tokens"]
                summary.positions += stats["positions"]
                summary.padded_tokens += stats["padded_tokens"]
                summary.forward_seconds += stats["forward_seconds"]
                elapsed = time.perf_counter() - started
                bar.set_postfix_str(f"{summary.tokens / elapsed:,.0f} tok/s, padding {summary.padding_fraction:.1%}")

        if not units_seen:
            raise _empty_corpus(cfg)
        summary.unrepaired_units = sorted(set(summary.repaired_units) - writer.committed_units
                                          - set(summary.failed_units))

        # 4. the build's statistics, under the lock like every manifest write; a re-run writes
        # them when a killed build could not, even with no unit left to build
        summary.seconds = time.perf_counter() - started
        manifest = writer.manifest
        summary.cache_totals = manifest.to_dict()["totals"]
        stale = bool(writer.committed_units) and manifest.stats.get("records") != manifest.total_records
        if summary.units_built or stale:
            lock.ensure_held()
            writer.update_stats(**_manifest_stats(manifest, summary))
    if summary.failed_units:
        raise BuildIncompleteError(summary)
    return summary


def _empty_corpus(cfg: JobConfig) -> CorpusError:
    """The error for a corpus without a single row: almost always the wrong files."""
    if cfg.corpus.name is not None:
        where = f"corpus.name: split {cfg.corpus.split!r} of {cfg.corpus.name!r}"
    else:
        where = "corpus.data_files: " + ", ".join(resolve_sources(cfg.corpus))
    return CorpusError(f"{where}: the corpus holds no documents (no rows at all); add documents, "
                       "or point the corpus at the files that hold them")


def _manifest_stats(manifest: Manifest, summary: BuildSummary) -> dict[str, Any]:
    """Cache-wide statistics from every shard's stats plus this run's throughput."""
    entropy_sum: dict[str, float] = {}
    entropy_n: dict[str, int] = {}
    padded = tokens = 0
    for shard in manifest.shards:
        for lang, value in shard.stats.get("entropy_sum", {}).items():
            entropy_sum[lang] = entropy_sum.get(lang, 0.0) + value
            entropy_n[lang] = entropy_n.get(lang, 0) + shard.stats.get("entropy_positions", {}).get(lang, 0)
        padded += shard.stats.get("padded_tokens", 0)
        tokens += shard.stats.get("tokens", 0)
    positions = manifest.total_positions
    return {
        "tokens": manifest.total_tokens, "records": manifest.total_records,
        "positions": positions, "bytes": manifest.total_bytes,
        "bytes_per_position": round(manifest.total_bytes / positions, 3) if positions else None,
        "padding_fraction": round(1 - tokens / padded, 5) if padded else 0.0,
        "mean_entropy_per_lang": {lang: round(entropy_sum[lang] / n, 5) for lang, n in sorted(entropy_n.items()) if n},
        "last_build": {
            "units_built": summary.units_built, "seconds": round(summary.seconds, 3),
            "tokens_per_second": round(summary.tokens_per_second, 1),
            "forward_seconds": round(summary.forward_seconds, 3),
            "skipped_documents": summary.skipped_documents,
        },
    }
