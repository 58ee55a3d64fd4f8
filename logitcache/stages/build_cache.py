"""Stage one: run the teacher once over the corpus and commit its soft labels to the cache.

The recipe, top to bottom:

1. load the teacher (model, tokenizer, identity) and derive the record layout: the kind of
   label, the narrowest id type for its vocabulary, k, codec, samples;
2. open the cache with a manifest template that records teacher, tokenizer, corpus,
   windowing, soft-label and storage settings; a cache built with another configuration is
   refused (``overwrite`` starts afresh);
3. stream the corpus as deterministic work units; a unit already committed is skipped (its
   documents must still hash to what was committed), every other unit is cut into windows,
   labelled by the teacher and committed as one shard on a background thread while the next
   unit runs;
4. record the build's statistics (tokens/s, padding, entropy per language) in the manifest.

Killing the process at any moment loses at most the units in flight: a re-run skips what is
committed and produces the records an uninterrupted run would have.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from logitcache.config import JobConfig, config_fingerprint_fields, config_to_dict
from logitcache.errors import IncompatibleCacheError
from logitcache.pipeline.committer import BackgroundCommitter
from logitcache.pipeline.corpus import describe_corpus, estimate_units, iter_work_units
from logitcache.pipeline.soft_labels import SoftLabelSpec
from logitcache.pipeline.teacher import Teacher, load_teacher
from logitcache.pipeline.unit_labeler import label_unit, unit_seed
from logitcache.pipeline.windows import make_windows
from logitcache.storage_schemas.id_codec import id_type_for_vocab
from logitcache.storage_schemas.layout import RecordLayout
from logitcache.storage_schemas.manifest import Manifest, ShardEntry
from logitcache.storage_schemas.shard_writer import ShardWriter

_KIND_OF_MODE = {"topk": "token_topk", "sampled": "token_sampled", "topk+sampled": "token_topk_sampled"}

#: positions per chunk through the LM head: about 2**27 float32 logits (512 MB) at a time
_CHUNK_LOGITS = 2**27


@dataclass(kw_only=True)
class BuildSummary:
    cache: str
    units_built: int = 0
    units_skipped: int = 0
    records: int = 0
    tokens: int = 0
    positions: int = 0
    bytes: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    forward_seconds: float = 0.0
    skipped_documents: dict[str, int] = field(default_factory=dict)
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
            "records": self.records, "tokens": self.tokens, "positions": self.positions,
            "bytes": self.bytes, "bytes_per_position": round(self.bytes / self.positions, 2) if self.positions else None,
            "seconds": round(self.seconds, 3), "tokens_per_second": round(self.tokens_per_second, 1),
            "padding_fraction": round(self.padding_fraction, 4),
            "skipped_documents": self.skipped_documents, "cache_totals": self.cache_totals,
        }

    def to_text(self) -> str:
        if self.units_built == 0:
            head = f"cache {self.cache} is up to date: {self.units_skipped} unit(s) already committed, no teacher forward run"
        else:
            head = (f"built {self.units_built} unit(s) ({self.units_skipped} already committed) into {self.cache}: "
                    f"{self.records:,} records, {self.tokens:,} tokens in {self.seconds:.1f} s "
                    f"({self.tokens_per_second:,.0f} tokens/s, padding {self.padding_fraction:.1%})")
        lines = [head]
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


def record_layout(cfg: JobConfig, teacher: Teacher) -> RecordLayout:
    labels = cfg.soft_labels
    if teacher.task == "sequence_classification":
        return RecordLayout(kind="sequence_probs", id_type=id_type_for_vocab(teacher.vocab_size),
                            vocab_size=teacher.vocab_size, value_codec=labels.values,
                            num_classes=teacher.num_classes)
    kind = _KIND_OF_MODE[labels.mode]
    return RecordLayout(
        kind=kind, id_type=id_type_for_vocab(teacher.vocab_size), vocab_size=teacher.vocab_size,
        k=labels.k if "topk" in labels.mode else 0, value_codec=labels.values,
        samples=labels.samples if "sampled" in labels.mode else 0, entropy=labels.entropy,
    )


def manifest_template(cfg: JobConfig, teacher: Teacher, layout: RecordLayout) -> Manifest:
    return Manifest(
        layout=layout, backend=cfg.storage.backend, storage=config_to_dict(cfg.storage),
        teacher=teacher.identity, tokenizer=teacher.tokenizer_info, corpus=describe_corpus(cfg.corpus),
        windows=config_to_dict(cfg.windows), soft_labels=config_to_dict(cfg.soft_labels),
        config=config_to_dict(cfg), fingerprint_fields=config_fingerprint_fields(cfg),
    )


def _check_unchanged(entry: ShardEntry, fingerprint: str, unit_id: str, source: str) -> None:
    committed = entry.stats.get("unit_fingerprint")
    if committed is not None and committed != fingerprint:
        raise IncompatibleCacheError(
            f"work unit {unit_id} ({source}) was committed from different documents than the corpus "
            "holds now: a source file changed after it was built. Restore the file, add new data as "
            "new files instead, or rebuild with --overwrite"
        )


def build_cache(cfg: JobConfig, *, overwrite: bool = False, progress: bool = True) -> BuildSummary:
    """Stage one for ``cfg``; returns what was built. See the module docstring."""
    cfg.require_build_sections()
    started = time.perf_counter()
    summary = BuildSummary(cache=cfg.cache)

    if not progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    teacher = load_teacher(cfg.teacher)
    layout = record_layout(cfg, teacher)
    writer = ShardWriter(cfg.cache, template=manifest_template(cfg, teacher, layout), overwrite=overwrite)
    committed = {unit_id: writer.manifest.shard_for_unit(unit_id) for unit_id in writer.committed_units}
    spec = SoftLabelSpec(
        mode=cfg.soft_labels.mode if layout.is_token_level else "topk",
        k=max(layout.k, 1), samples=max(layout.samples, 1), entropy=True,
        chunk_positions=max(16, min(4096, _CHUNK_LOGITS // max(teacher.vocab_size, 1))),
    )

    bar = tqdm(desc="build", unit=" unit", total=estimate_units(cfg.corpus) if progress else None,
               disable=not progress, dynamic_ncols=True)

    def on_commit(entry: ShardEntry) -> None:
        summary.bytes += entry.bytes

    with BackgroundCommitter(writer, on_commit=on_commit) as committer:
        for unit in iter_work_units(cfg.corpus):
            for reason, count in unit.skipped.items():
                summary.skipped_documents[reason] = summary.skipped_documents.get(reason, 0) + count
            if unit.unit_id in committed:
                _check_unchanged(committed[unit.unit_id], unit.fingerprint, unit.unit_id, unit.source)
                summary.units_skipped += 1
                bar.update(1)
                continue
            windows, no_tokens = make_windows(unit.documents, teacher.tokenizer, cfg.windows, task=teacher.task)
            if no_tokens:
                summary.skipped_documents["no_tokens"] = summary.skipped_documents.get("no_tokens", 0) + no_tokens
            block, stats = label_unit(
                teacher, windows, spec=spec, layout=layout, batch_tokens=cfg.teacher.batch_tokens,
                seed=unit_seed(cfg.soft_labels.seed, unit.unit_id), store_entropy=layout.entropy,
            )
            committer.submit(block, unit_id=unit.unit_id, stats={
                **stats.to_dict(), "unit_fingerprint": unit.fingerprint, "source": unit.source,
                "first_row": unit.first_row, "num_rows": unit.num_rows, "skipped_documents": unit.skipped,
            })
            summary.units_built += 1
            summary.records += block.num_records
            summary.tokens += stats.tokens
            summary.positions += stats.positions
            summary.padded_tokens += stats.padded_tokens
            summary.forward_seconds += stats.forward_seconds
            bar.update(1)
            elapsed = time.perf_counter() - started
            bar.set_postfix_str(f"{summary.tokens / elapsed:,.0f} tok/s, padding {summary.padding_fraction:.1%}")
    bar.close()

    summary.seconds = time.perf_counter() - started
    manifest = writer.manifest
    summary.cache_totals = manifest.to_dict()["totals"]
    if summary.units_built:
        writer.update_stats(**_manifest_stats(manifest, summary))
    return summary


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
