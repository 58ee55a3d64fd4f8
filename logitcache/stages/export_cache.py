"""Export: write a cache as a Hugging Face dataset that other training stacks read.

A cache is read by logitcache's own reader; other trainers (axolotl's KD plugin, a
``transformers`` Trainer with its own loss, a notebook) read Parquet files of plain columns
through ``datasets.load_dataset("parquet", ...)``. Rather than have every one of them learn
the cache format, an export writes the cache's records once more, decoded, as such a
dataset (the columns of each format: ``storage_schemas/export_tables``):

1. check DEST: an export of this cache in this format resumes, anything else there is
   refused (``overwrite`` replaces it);
2. for each shard of the cache that DEST does not hold yet (or holds from other bytes of the
   shard, e.g. before ``build --repair``): check the shard's size and sha256 against the
   manifest, then read it one block at a time and write its records to
   ``DEST/data/train-<unit>.parquet``, one row group per block, under a temporary name that
   is renamed when complete; then note it in ``DEST/logitcache-export.json``, with the
   shard's sha256;
3. remove the files of units the cache no longer lists, and write the dataset card
   ``DEST/README.md`` (features, provenance, what the columns mean, the alignment).

Files mirror the cache's shards one to one, so a killed export resumes with the same
command and skips finished shards, and an export of a cache that has grown since writes
only the new shards. Output files are deterministic: the same cache gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq
from tqdm.auto import tqdm

from logitcache.errors import ConfigError, CorruptShardError, IncompatibleCacheError
from logitcache.stages.export_card import format_notes, render_card
from logitcache.storage_schemas.export_tables import check_exportable, export_schema, export_table
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.manifest import ShardEntry, cache_identity
from logitcache.storage_schemas.shard_reader import CacheReader

STATE_FILE = "logitcache-export.json"
DATA_DIR = "data"
CARD_FILE = "README.md"
INCOMPLETE_DIR = ".incomplete"  # hidden: `datasets` skips it when it globs DEST
_STATE_FORMAT = "logitcache-export"
_STATE_VERSION = 1


@dataclass(kw_only=True)
class ExportedShard:
    """One cache shard as DEST holds it."""

    source_path: str
    source_sha256: str
    file: str  # relative to DEST
    records: int
    tokens: int
    bytes: int
    sha256: str


@dataclass(kw_only=True)
class ExportState:
    """What DEST holds: an export of which cache, in which format, of which shards."""

    format: str
    options: dict[str, Any]
    source: dict[str, str]  # url and identity (sha256 of the cache's identity)
    shards: dict[str, ExportedShard] = field(default_factory=dict)  # by unit id

    def to_json(self) -> str:
        data = {"format_name": _STATE_FORMAT, "version": _STATE_VERSION, **dataclasses.asdict(self)}
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def load(cls, dest: CacheLocation) -> ExportState:
        try:
            data = json.loads(dest.read_bytes(STATE_FILE).decode("utf-8"))
            if data.get("format_name") != _STATE_FORMAT:
                raise ValueError(f"format_name is {data.get('format_name')!r}")
            shards = {unit: ExportedShard(**entry) for unit, entry in data["shards"].items()}
            return cls(format=data["format"], options=data["options"], source=data["source"], shards=shards)
        except (ValueError, KeyError, TypeError) as exc:
            raise IncompatibleCacheError(f"{dest.full(STATE_FILE)} is not a logitcache export state ({exc}); "
                                         "use another DEST, or --overwrite to replace it") from exc

    def save(self, dest: CacheLocation) -> None:
        dest.write_atomic(STATE_FILE, self.to_json().encode("utf-8"))


@dataclass(kw_only=True)
class ExportSummary:
    """What one :func:`export_cache` call did."""

    source: str
    dest: str
    format: str
    kind: str
    shards_written: int = 0
    shards_skipped: int = 0  # already in DEST from an earlier, interrupted or older export
    files_removed: int = 0  # of units the cache no longer lists
    records: int = 0  # written this call
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    files: int = 0  # DEST's files afterwards
    total_records: int = 0
    total_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "tokens_per_second": round(self.tokens_per_second, 1)}

    def to_text(self) -> str:
        lines = [f"exported {self.source} -> {self.dest} (format {self.format}, {self.kind})"]
        if self.shards_written:
            lines.append(f"  shards written {self.shards_written:,}, already there {self.shards_skipped:,}; "
                         f"{self.records:,} records, {self.tokens:,} tokens in {self.seconds:.1f} s "
                         f"({self.tokens_per_second:,.0f} tokens/s)")
        elif self.shards_skipped:
            lines.append(f"  nothing to write: DEST already holds all {self.shards_skipped:,} shards")
        else:
            lines.append("  the cache has no committed shard yet: DEST holds its card only")
        if self.files_removed:
            lines.append(f"  removed {self.files_removed:,} files of units the cache no longer lists")
        lines.append(f"  {self.dest} now holds {self.files:,} files, {self.total_records:,} records, "
                     f"{self.total_bytes:,} bytes; load with "
                     f"datasets.load_dataset(\"parquet\", data_dir={json.dumps(self.dest)}, split=\"train\")")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def output_file(unit_id: str) -> str:
    """DEST-relative path of a unit's file (``datasets`` takes ``train-*`` for the train split)."""
    return f"{DATA_DIR}/train-{unit_id}.parquet"


def source_of(reader: CacheReader) -> dict[str, str]:
    """Which cache this is: where it lives and what produced it (its storage settings aside:
    they do not change the records)."""
    identity = {name: value for name, value in cache_identity(reader.manifest).items()
                if name not in ("backend", "storage")}
    identity["config"] = {name: value for name, value in identity["config"].items() if name != "storage"}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    location = reader.location
    return {"url": location.root if location.is_local else location.url, "identity": digest}


def _same_location(a: CacheLocation, b: CacheLocation) -> bool:
    return type(a.fs) is type(b.fs) and a.root.rstrip("/") == b.root.rstrip("/")


def _mismatch(found: ExportState, wanted: ExportState) -> str | None:
    if found.format != wanted.format:
        return f"a --format {found.format} export"
    if found.options != wanted.options:
        return f"an export with other options ({found.options})"
    if found.source != wanted.source:
        return f"an export of another cache ({found.source.get('url')})"
    return None


def _clear(dest: CacheLocation) -> None:
    for rel in (DATA_DIR, INCOMPLETE_DIR, CARD_FILE, STATE_FILE):
        dest.remove(rel)


def open_state(dest: CacheLocation, wanted: ExportState, *, overwrite: bool) -> ExportState:
    """DEST's export state: resumed when it is an export of the same cache and format."""
    if overwrite:
        _clear(dest)
    elif dest.exists(STATE_FILE):
        found = ExportState.load(dest)
        problem = _mismatch(found, wanted)
        if problem:
            raise IncompatibleCacheError(f"{dest.url} holds {problem}, not a --format {wanted.format} export of "
                                         f"{wanted.source['url']}: use another DEST, or --overwrite to replace it")
        dest.remove(INCOMPLETE_DIR)  # what a killed export left half-written
        return found
    elif dest.exists(DATA_DIR) or dest.exists(CARD_FILE):
        raise IncompatibleCacheError(f"{dest.url} holds {DATA_DIR}/ or {CARD_FILE} but no {STATE_FILE}: it is not "
                                     "a logitcache export. Use another DEST, or --overwrite to replace them")
    dest.makedirs(DATA_DIR)
    wanted.save(dest)
    return wanted


def is_done(state: ExportState, entry: ShardEntry, dest: CacheLocation) -> bool:
    """DEST holds this shard's export, made from the bytes the manifest lists now."""
    done = state.shards.get(entry.unit_id)
    if done is None or done.source_sha256 != entry.sha256 or not dest.exists(done.file):
        return False
    return int(dest.fs.size(dest.full(done.file))) == done.bytes


def write_shard(reader: CacheReader, entry: ShardEntry, dest: CacheLocation, *, fmt: str,
                renormalize: bool) -> ExportedShard:
    """Check one shard against the manifest, then write its records to DEST block by block."""
    reader.check_shard(entry)  # a corrupt shard is refused by name before anything is written
    final = output_file(entry.unit_id)
    partial = f"{INCOMPLETE_DIR}/{final.rsplit('/', 1)[-1]}"
    provenance = {"format": fmt, "unit_id": entry.unit_id, "source_sha256": entry.sha256}
    schema = export_schema(reader.layout, fmt).with_metadata({"logitcache.export": json.dumps(provenance)})
    dest.makedirs(INCOMPLETE_DIR)
    records = 0
    try:
        with dest.open(partial, "wb") as sink, pq.ParquetWriter(sink, schema, compression="zstd") as writer:
            for index in range(entry.blocks):
                block = reader.read_block(entry, index)
                table = export_table(block, reader.layout, fmt, renormalize=renormalize)
                writer.write_table(table, row_group_size=max(1, len(table)))
                records += block.num_records
        if records != entry.records:
            raise CorruptShardError(f"shard {entry.path} holds {records} records, the manifest says {entry.records}")
        dest.sync_tree(partial)
        dest.rename(partial, final)
    finally:
        dest.remove(partial)
    size, sha256 = dest.digest(final)
    return ExportedShard(source_path=entry.path, source_sha256=entry.sha256, file=final, records=records,
                         tokens=entry.tokens, bytes=size, sha256=sha256)


def _remove_stale(state: ExportState, reader: CacheReader, dest: CacheLocation) -> int:
    listed = {entry.unit_id for entry in reader.shards}
    stale = [unit for unit in state.shards if unit not in listed]
    for unit in stale:
        dest.remove(state.shards.pop(unit).file)
    if stale:
        state.save(dest)
    return len(stale)


def export_cache(cache: str, dest: str, *, format: str = "axolotl", renormalize: bool = True,
                 overwrite: bool = False, progress: bool = True) -> ExportSummary:
    """Write CACHE's records as a Hugging Face Parquet dataset at DEST in ``format``
    (``axolotl`` or ``hf``; :mod:`~logitcache.storage_schemas.export_tables` has the columns).

    ``renormalize`` (axolotl only) scales each position's target entries to sum to 1, as
    axolotl's own dataset loaders do. See the module docstring for the steps and guarantees.
    """
    started = time.perf_counter()
    reader = CacheReader(cache)
    check_exportable(reader.layout, format)
    location = CacheLocation(dest)
    if _same_location(location, reader.location):
        raise ConfigError(f"DEST is the cache itself ({cache}): export into another directory")
    options = {"renormalize": bool(renormalize)} if format == "axolotl" else {}
    state = open_state(location, ExportState(format=format, options=options, source=source_of(reader)),
                       overwrite=overwrite)
    summary = ExportSummary(source=cache, dest=dest, format=format, kind=reader.manifest.kind,
                            notes=format_notes(reader.layout, format, renormalize=renormalize))
    summary.files_removed = _remove_stale(state, reader, location)
    todo = [entry for entry in reader.shards if not is_done(state, entry, location)]
    summary.shards_skipped = len(reader.shards) - len(todo)
    with tqdm(desc="export", unit=" tok", unit_scale=True, dynamic_ncols=True,
              total=sum(entry.tokens for entry in todo), disable=not progress or not todo) as bar:
        for entry in todo:
            written = write_shard(reader, entry, location, fmt=format, renormalize=renormalize)
            state.shards[entry.unit_id] = written
            state.save(location)
            summary.shards_written += 1
            summary.records += written.records
            summary.tokens += written.tokens
            summary.bytes += written.bytes
            bar.update(entry.tokens)
    location.remove(INCOMPLETE_DIR)
    location.write_atomic(CARD_FILE, render_card(reader.manifest, fmt=format, renormalize=renormalize,
                                                 source=state.source["url"]).encode("utf-8"))
    summary.files = len(state.shards)
    summary.total_records = sum(shard.records for shard in state.shards.values())
    summary.total_bytes = sum(shard.bytes for shard in state.shards.values())
    summary.seconds = time.perf_counter() - started
    return summary
