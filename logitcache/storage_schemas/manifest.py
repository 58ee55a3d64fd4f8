"""The manifest: the single source of truth about what a cache holds.

``manifest.json`` lists the committed shards (with rows, tokens, bytes, sha256 and
per-language counts), the record layout, and the identity of everything that produced the
labels: teacher, tokenizer, corpus, windowing, soft-label parameters and storage settings,
plus the resolved configuration. A shard that the manifest does not list does not exist
for readers. The file is replaced atomically after every commit.

Versioning: ``format_version`` is ``MAJOR.MINOR``. Readers accept any minor version of
the major versions they read (minor versions only add optional fields) and refuse a newer
major version with an error that says to upgrade logitcache. Major versions:

1. the first format;
2. Parquet shards store each position's top-k ids and values as one fixed-size binary
   (little-endian) instead of a ``fixed_size_list``, and no list item is nullable, which
   makes them several times faster to read (BENCHMARKS.md). Readers still read format 1
   shards, each shard by its own schema; a build that adds shards to a format 1 cache
   writes format 2 shards and marks the cache 2.0. Zarr shards did not change.
3. Parquet shards store a record's top-k ids and values as one binary value per record
   (its positions' rows back to back), which halves the read time of an uncompressed
   shard; columns that Parquet splits into byte streams (4-byte elements, compressed) keep
   format 2's row per position. Shards of formats 1 and 2 are still read, and a build that
   adds to such a cache writes format 3 shards and marks it 3.0, as above.
4. Every soft-label column is one binary per record whatever the vocabulary, codec and
   compression: a position's top-k ids ascending, as gaps in byte planes, their values in
   the same order (q8 as plain levels), and sampled draws as ascending gap rows; about a
   third fewer bytes on real teacher outputs (BENCHMARKS.md, "Cache format 4"). Zarr shards
   (version 2) store the top-k in the same id order. Shards of formats 1 to 3 are read
   through ``legacy_formats``; a build that adds to such a cache writes format 4 shards and
   marks it 4.0.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from logitcache.errors import CacheFormatError
from logitcache.storage_schemas.layout import RecordLayout
from logitcache.storage_schemas.location import CacheLocation

FORMAT_NAME = "logitcache"
FORMAT_VERSION = "4.0"
#: Major versions this logitcache reads.
READABLE_MAJORS = (1, 2, 3, 4)
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
INCOMPLETE_DIR = "_incomplete"


@dataclass(kw_only=True)
class ShardEntry:
    """One committed shard, as the manifest describes it."""

    unit_id: str  # the work unit this shard holds
    path: str  # relative to the cache root, e.g. shards/part-u00000.parquet
    records: int
    tokens: int
    positions: int  # labelled positions (tokens minus left context)
    bytes: int
    sha256: str
    blocks: int  # Parquet row groups / Zarr record blocks
    langs: dict[str, dict[str, int]] = field(default_factory=dict)  # lang -> records, tokens
    stats: dict[str, Any] = field(default_factory=dict)  # producer statistics (time, entropy…)

    @classmethod
    def from_dict(cls, data: dict) -> ShardEntry:
        return cls(**data)


@dataclass(kw_only=True)
class Manifest:
    """Everything a reader or a later build needs to know about a cache."""

    layout: RecordLayout
    backend: str
    storage: dict[str, Any]  # backend settings: compression, level, block sizes
    teacher: dict[str, Any]  # name_or_path, revision, weights_sha256, dtype, task
    tokenizer: dict[str, Any]  # name_or_path, fingerprint, vocab_size
    corpus: dict[str, Any] = field(default_factory=dict)  # identity and per-unit fingerprints
    windows: dict[str, Any] = field(default_factory=dict)  # max_length, stride
    soft_labels: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the resolved job config
    fingerprint_fields: dict[str, Any] = field(default_factory=dict)
    config_fingerprint: str = ""
    shards: list[ShardEntry] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)  # build throughput etc.
    format: str = FORMAT_NAME
    format_version: str = FORMAT_VERSION
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    @property
    def kind(self) -> str:
        return self.layout.kind

    @property
    def total_records(self) -> int:
        return sum(s.records for s in self.shards)

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def total_positions(self) -> int:
        return sum(s.positions for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def lang_totals(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for shard in self.shards:
            for lang, counts in shard.langs.items():
                slot = out.setdefault(lang, {"records": 0, "tokens": 0})
                for key in slot:
                    slot[key] += int(counts.get(key, 0))
        return dict(sorted(out.items()))

    def shard_for_unit(self, unit_id: str) -> ShardEntry | None:
        return next((s for s in self.shards if s.unit_id == unit_id), None)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = self.kind
        data["layout"] = self.layout.to_dict()
        data["totals"] = {
            "records": self.total_records, "tokens": self.total_tokens,
            "positions": self.total_positions, "bytes": self.total_bytes,
            "shards": len(self.shards), "langs": self.lang_totals(),
        }
        order = ["format", "format_version", "kind"]
        return {**{k: data[k] for k in order}, **{k: v for k, v in data.items() if k not in order}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "manifest") -> Manifest:
        check_format(data, source=source)
        known = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            kwargs["layout"] = RecordLayout.from_dict(data["layout"])
            kwargs["shards"] = [ShardEntry.from_dict(s) for s in data.get("shards", [])]
            return cls(**kwargs)
        except (KeyError, TypeError) as exc:
            raise CacheFormatError(f"{source}: malformed manifest ({exc})") from exc

    # -------------------------------------------------------------- storage

    def save(self, location: CacheLocation) -> None:
        """Replace the manifest atomically (temporary file, fsync, rename)."""
        self.updated_at = time.time()
        location.write_atomic(MANIFEST_FILE, self.to_json().encode("utf-8"))

    @classmethod
    def load(cls, location: CacheLocation, *, expected_kind: str | None = None) -> Manifest:
        source = location.full(MANIFEST_FILE)
        if not location.exists(MANIFEST_FILE):
            raise CacheFormatError(
                f"{location.url} is not a logitcache cache: {MANIFEST_FILE} not found "
                "(build one with `logitcache build CONFIG`)"
            )
        try:
            data = json.loads(location.read_bytes(MANIFEST_FILE).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CacheFormatError(f"{source}: manifest is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise CacheFormatError(f"{source}: manifest must be a JSON object")
        manifest = cls.from_dict(data, source=source)
        if expected_kind is not None and manifest.kind != expected_kind:
            raise CacheFormatError(
                f"{source}: cache holds {manifest.kind} labels, but {expected_kind} was expected"
            )
        return manifest


def check_format(data: dict[str, Any], *, source: str = "manifest") -> None:
    """Refuse manifests of another format or of a major version this logitcache does not read."""
    if data.get("format") != FORMAT_NAME:
        raise CacheFormatError(f"{source}: not a logitcache manifest (format={data.get('format')!r})")
    version = str(data.get("format_version", ""))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise CacheFormatError(f"{source}: unreadable format_version {version!r}") from None
    if major > max(READABLE_MAJORS):
        raise CacheFormatError(
            f"{source}: cache format version {version} is newer than this logitcache "
            f"understands ({FORMAT_VERSION}); upgrade logitcache to read it"
        )
    if major not in READABLE_MAJORS:
        raise CacheFormatError(
            f"{source}: cache format version {version} is older than this logitcache reads "
            f"(majors {', '.join(map(str, READABLE_MAJORS))}); rebuild the cache"
        )


def cache_identity(manifest: Manifest) -> dict[str, Any]:
    """What must be equal for a build to add shards to an existing cache.

    Shards, statistics and the resolved config (which includes the corpus file list, free
    to grow between runs) are left out; the layout, backend, storage settings, teacher,
    tokenizer and the config's fingerprint fields are in.
    """
    return {
        "layout": manifest.layout.to_dict(),
        "backend": manifest.backend,
        "storage": manifest.storage,
        "teacher": manifest.teacher,
        "tokenizer": manifest.tokenizer,
        "config": manifest.fingerprint_fields,
    }


def vocabulary_identity(manifest: Manifest) -> dict[str, Any]:
    """What must be equal for students of one cache to be evaluated on another's records.

    The token ids must mean the same tokens (the teacher tokenizer's token-to-id mapping,
    compared by its fingerprint) and the labels must be of the same kind: token-level, or
    the same number of classes. Teacher, soft-label parameters and storage may differ: they
    shape what a student learned, not what the records mean.
    """
    layout = manifest.layout
    identity: dict[str, Any] = {
        "labels": "token" if layout.is_token_level else "sequence",
        "tokenizer": {"vocab_fingerprint": manifest.tokenizer.get("vocab_fingerprint"),
                      "vocab_size": manifest.tokenizer.get("vocab_size", layout.vocab_size)},
    }
    if not layout.is_token_level:
        identity["num_classes"] = layout.num_classes
    return identity
