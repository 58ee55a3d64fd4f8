"""Repack: rewrite a cache's shards with other storage settings, without the teacher.

The storage settings (backend, compression, block sizes) are chosen at build time, but
which ones pay depends on how the cache is used: zstd keeps an archived or shipped cache
small, while students train fastest from lz4 or uncompressed shards (docs/reader.md has
the rates). Running the teacher again to change them would waste the expensive part, so a
repack reads every committed shard of SOURCE and commits the same records into a new cache
at DEST, one work unit per shard as a build does:

1. take DEST's build lock (so no build writes into it meanwhile) and describe DEST as
   SOURCE's manifest with the new storage settings: same layout, teacher, tokenizer, corpus
   and config, so a later build with the new settings adds to DEST as it would have to
   SOURCE;
2. for each shard of SOURCE not yet in DEST: check its bytes against SOURCE's manifest
   (size and sha256: a corrupt shard must not come out with a fresh checksum), read it,
   and hand it to the background committer, which encodes and writes it while the next
   shard is read;
3. copy SOURCE's build statistics into DEST's manifest, with a note of the repack.

Records (ids, values, per-shard statistics) are unchanged: value codecs are not re-encoded,
only the bytes around them. A cache of an older format comes out in format 4, each top-k row
in id order (the same labels). A repack that is killed resumes, like a build,
with the shards not yet committed; a DEST that holds shards SOURCE does not describe is
refused (``overwrite`` replaces it). DEST may not be SOURCE: repack into a new directory,
then swap the two.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from logitcache.config import StorageConfig, config_to_dict
from logitcache.errors import ConfigError, IncompatibleCacheError
from logitcache.pipeline.common.committer import BackgroundCommitter
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.lock import CacheLock
from logitcache.storage_schemas.manifest import FORMAT_VERSION, Manifest, ShardEntry
from logitcache.storage_schemas.shard_reader import CacheReader
from logitcache.storage_schemas.shard_writer import ShardWriter


@dataclass(kw_only=True)
class RepackSummary:
    """What one :func:`repack_cache` call did."""

    source: str
    dest: str
    storage: dict[str, Any]  # DEST's storage settings, backend included
    shards_written: int = 0
    shards_skipped: int = 0  # already committed to DEST by an earlier, interrupted repack
    records: int = 0
    tokens: int = 0
    source_bytes: int = 0  # of the shards written this call
    dest_bytes: int = 0
    seconds: float = 0.0
    totals: dict[str, Any] = field(default_factory=dict)  # DEST's manifest totals afterwards

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "tokens_per_second": round(self.tokens_per_second, 1)}

    def to_text(self) -> str:
        settings = describe_storage(self.storage)
        lines = [f"repacked {self.source} -> {self.dest} ({settings})"]
        if not self.shards_written and not self.shards_skipped:
            lines.append("  SOURCE has no committed shard yet: DEST holds its description only")
        elif not self.shards_written:
            lines.append(f"  nothing to copy: DEST already holds all {self.shards_skipped:,} shards of SOURCE")
        else:
            lines.append(f"  shards written {self.shards_written:,}, already there {self.shards_skipped:,}; "
                         f"{self.records:,} records, {self.tokens:,} tokens in {self.seconds:.1f} s "
                         f"({self.tokens_per_second:,.0f} tokens/s)")
            ratio = self.dest_bytes / self.source_bytes if self.source_bytes else 0.0
            lines.append(f"  bytes of those shards: {self.source_bytes:,} -> {self.dest_bytes:,} ({ratio:.2f}x)")
        if self.totals:
            lines.append(f"  {self.dest} now holds {self.totals['shards']:,} shards, "
                         f"{self.totals['records']:,} records, {self.totals['bytes']:,} bytes")
        return "\n".join(lines)


def describe_storage(storage: dict[str, Any]) -> str:
    """The settings that apply to the backend, e.g. ``parquet, lz4, row groups of 262144 tokens``."""
    compression = storage["compression"]
    if compression == "zstd":
        compression = f"zstd level {storage['compression_level']}"
    if storage["backend"] == "zarr":
        return f"zarr, {compression}, chunks of {storage['chunk_tokens']} tokens"
    return f"{storage['backend']}, {compression}, row groups of {storage['row_group_tokens']} tokens"


def repacked_storage(source_storage: dict[str, Any], source_backend: str, changes: dict[str, Any]) -> StorageConfig:
    """SOURCE's storage settings with ``changes`` applied, validated as a config section."""
    known = {spec.name for spec in dataclasses.fields(StorageConfig)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ConfigError(f"storage: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    settings = {name: value for name, value in source_storage.items() if name in known}
    settings.setdefault("backend", source_backend)
    settings.update({name: value for name, value in changes.items() if value is not None})
    return StorageConfig(**settings)


def dest_template(source: Manifest, storage: StorageConfig) -> Manifest:
    """SOURCE's description with DEST's storage settings and no shards."""
    template = copy.deepcopy(source)
    settings = config_to_dict(storage)
    template.backend = storage.backend
    template.storage = settings
    if "storage" in template.fingerprint_fields:
        template.fingerprint_fields["storage"] = settings
    if "storage" in template.config:
        template.config["storage"] = settings
    template.shards = []
    template.stats = {}
    template.format_version = FORMAT_VERSION  # the writer's format, whatever SOURCE's was
    template.created_at = template.updated_at = time.time()
    return template


def _same_location(a: CacheLocation, b: CacheLocation) -> bool:
    return type(a.fs) is type(b.fs) and a.root.rstrip("/") == b.root.rstrip("/")


def _check_dest_shards(source: Manifest, dest: Manifest, *, dest_url: str) -> None:
    """A DEST shard must hold the records of SOURCE's shard of the same unit."""
    by_unit = {entry.unit_id: entry for entry in source.shards}
    for entry in dest.shards:
        mine = by_unit.get(entry.unit_id)
        if mine is None:
            problem = "SOURCE has no such unit"
        elif (mine.records, mine.tokens, mine.positions) != (entry.records, entry.tokens, entry.positions):
            problem = (f"{entry.records:,} records / {entry.tokens:,} tokens there, "
                       f"{mine.records:,} / {mine.tokens:,} in SOURCE")
        else:
            continue
        raise IncompatibleCacheError(
            f"{dest_url} holds unit {entry.unit_id} that SOURCE does not ({problem}): it is not an "
            "interrupted repack of this SOURCE. Use another DEST, or --overwrite to replace it."
        )


def repack_cache(source: str, dest: str, *, storage: dict[str, Any] | None = None, overwrite: bool = False,
                 progress: bool = True) -> RepackSummary:
    """Write SOURCE's records into a new cache at DEST with ``storage`` settings changed.

    ``storage`` maps StorageConfig fields (backend, compression, compression_level,
    row_group_tokens, chunk_tokens) to new values; the rest are SOURCE's. See the module
    docstring for the steps and guarantees.
    """
    started = time.perf_counter()
    reader = CacheReader(source)
    if _same_location(reader.location, CacheLocation(dest)):
        raise ConfigError(f"DEST is SOURCE ({source}): repack into a new directory, then swap the two")
    settings = repacked_storage(reader.manifest.storage, reader.manifest.backend, storage or {})
    summary = RepackSummary(source=source, dest=dest, storage=config_to_dict(settings))

    with contextlib.ExitStack() as stack:
        lock = stack.enter_context(CacheLock(dest))
        writer = ShardWriter(dest, template=dest_template(reader.manifest, settings), overwrite=overwrite)
        if writer.committed_units:
            _check_dest_shards(reader.manifest, writer.manifest, dest_url=dest)
        done = writer.committed_units
        todo: list[ShardEntry] = [entry for entry in reader.shards if entry.unit_id not in done]
        summary.shards_skipped = len(reader.shards) - len(todo)
        bar = stack.enter_context(tqdm(desc="repack", unit=" tok", unit_scale=True, dynamic_ncols=True,
                                       total=sum(entry.tokens for entry in todo), disable=not progress or not todo))

        def on_commit(entry: ShardEntry) -> None:
            summary.dest_bytes += entry.bytes

        with BackgroundCommitter(writer, on_commit=on_commit) as committer:
            for entry in todo:
                block = reader.read_shard(entry, verify=True)
                lock.ensure_held()
                # the build's statistics of the unit stay; the write time is DEST's own
                stats = {name: value for name, value in entry.stats.items() if name != "write_seconds"}
                committer.submit(block, unit_id=entry.unit_id, stats=stats)
                summary.shards_written += 1
                summary.records += entry.records
                summary.tokens += entry.tokens
                summary.source_bytes += entry.bytes
                bar.update(entry.tokens)

        summary.seconds = time.perf_counter() - started
        if summary.shards_written or "repack" not in writer.manifest.stats:  # or a killed repack's
            lock.ensure_held()
            stats = dict(reader.manifest.stats)
            stats["repack"] = {"source": source, "source_bytes": reader.manifest.total_bytes,
                               "seconds": round(summary.seconds, 3)}
            stats["bytes"] = writer.manifest.total_bytes
            positions = writer.manifest.total_positions
            stats["bytes_per_position"] = round(writer.manifest.total_bytes / positions, 3) if positions else None
            writer.update_stats(**stats)
        summary.totals = writer.manifest.to_dict()["totals"]
    return summary
