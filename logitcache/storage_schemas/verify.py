"""verify_cache: check every committed shard of a cache against its manifest.

The manifest is the only thing a reader trusts, so verification asks, for every shard it
lists, whether the bytes on disk are still the bytes that were committed and whether they
still describe what the manifest says:

- the shard is present, has the manifest's size and sha256;
- its schema is the layout's (Parquet: the Arrow schema, metadata ignored; every backend:
  the layout stored in the shard's own metadata);
- its record and block counts equal the manifest's;
- its metadata carries the manifest's config fingerprint (and its own work unit).

``deep=True`` also decodes every block and recounts records, tokens, labelled positions
and per-language counts, and checks that every token id lies inside the vocabulary and
that no stored value is NaN (``target_logprob`` is NaN at each record's last token by
design: that token has no next token in the record).

Files the manifest does not list (in ``shards/``, and anything left in ``_incomplete/``)
are reported as *unlisted*: readers ignore them and a later build overwrites or removes
them, so they are a warning, not a failure.

A bad shard never raises: every problem is collected into the :class:`VerifyReport`. Only
a cache whose manifest cannot be read raises :class:`~logitcache.errors.CacheFormatError`.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from logitcache.storage_schemas.layout import RecordLayout
from logitcache.storage_schemas.legacy_formats import LEGACY_MAJORS, legacy_arrow_schema
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.manifest import (
    INCOMPLETE_DIR,
    MANIFEST_FILE,
    SHARDS_DIR,
    Manifest,
    ShardEntry,
)
from logitcache.storage_schemas.parquet_backend import SHARD_FORMAT, shard_format
from logitcache.storage_schemas.value_codecs import get_value_codec


@dataclass
class ShardProblem:
    """One thing wrong with one shard the manifest lists."""

    path: str  # as listed in the manifest, relative to the cache root
    unit_id: str
    problem: str


@dataclass
class VerifyReport:
    """What :func:`verify_cache` found. ``ok`` is true when no listed shard has a problem."""

    url: str
    shards_checked: int = 0
    problems: list[ShardProblem] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)  # paths relative to the cache root
    deep: bool = False
    kind: str = ""
    records: int = 0  # totals of the manifest
    tokens: int = 0
    positions: int = 0
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_shards(self) -> list[str]:
        return list(dict.fromkeys(p.path for p in self.problems))

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}

    def to_text(self) -> str:
        """A report for people: OK with counts, or one line per problem and unlisted file."""
        mode = "deep" if self.deep else "quick"
        lines = []
        for problem in self.problems:
            lines.append(f"BAD  {problem.path} (unit {problem.unit_id}): {problem.problem}")
        for path in self.unlisted:
            lines.append(f"warning: unlisted file {path} (not in the manifest; readers ignore it)")
        if self.ok:
            lines.append(
                f"OK   {self.url}: {self.shards_checked} shard(s), {self.records:,} records, "
                f"{self.tokens:,} tokens, {self.bytes:,} bytes ({mode} check)"
            )
        else:
            lines.append(
                f"FAILED {self.url}: {len(self.problems)} problem(s) in {len(self.bad_shards)} of "
                f"{self.shards_checked} shard(s) ({mode} check); `logitcache build CONFIG --repair` builds "
                "their units again (or restore the files from a copy)"
            )
        return "\n".join(lines)


def verify_cache(url: str, *, deep: bool = False) -> VerifyReport:
    """Check every shard the manifest at ``url`` lists; see the module docstring.

    Raises CacheFormatError when the manifest is missing or unreadable (or names an unknown
    backend); every problem of a shard is reported in the returned report instead.
    """
    from logitcache.storage_schemas.backends import get_backend

    location = CacheLocation(url)
    manifest = Manifest.load(location)
    backend = get_backend(manifest.backend)
    report = VerifyReport(
        url=location.url, deep=deep, kind=manifest.kind, records=manifest.total_records,
        tokens=manifest.total_tokens, positions=manifest.total_positions, bytes=manifest.total_bytes,
    )
    seen_paths: set[str] = set()
    seen_units: set[str] = set()
    for entry in manifest.shards:
        report.shards_checked += 1
        found: list[str] = []
        if entry.unit_id in seen_units:
            found.append(f"work unit {entry.unit_id} is listed more than once in the manifest")
        seen_units.add(entry.unit_id)
        norm = posixpath.normpath(entry.path)
        if norm in seen_paths:
            found.append("shard path is listed more than once in the manifest")
        seen_paths.add(norm)
        if posixpath.dirname(norm) != SHARDS_DIR:
            found.append(f"path is not directly under {SHARDS_DIR}/; refusing to read it")
        else:
            found += _check_shard(location, backend, manifest, entry, deep=deep)
        report.problems += [ShardProblem(entry.path, entry.unit_id, text) for text in found]
    report.unlisted = _unlisted(location, seen_paths)
    return report


# ---------------------------------------------------------------- per shard


def _check_shard(location: CacheLocation, backend, manifest: Manifest, entry: ShardEntry, *,
                 deep: bool) -> list[str]:
    """Problems of one listed shard, as sentences; never raises for a bad shard."""
    try:
        present = location.exists(entry.path)
    except OSError as exc:
        return [f"cannot be checked ({exc})"]
    if not present:
        return ["missing: the manifest lists it but it is not on disk"]
    problems: list[str] = []
    try:
        size, sha256 = location.digest(entry.path)
    except OSError as exc:
        return [f"cannot be read ({exc})"]
    if size != entry.bytes:
        problems.append(
            f"size mismatch: {size:,} bytes on disk, the manifest says {entry.bytes:,} "
            "(truncated or rewritten)"
        )
    elif sha256 != entry.sha256:
        problems.append("sha256 mismatch: its bytes changed after it was committed")
    # A corrupt file can make the decoders raise almost anything (Arrow, Zarr, numpy, our
    # own CacheFormatError): whatever it is, it is a finding about this shard.
    try:
        problems += _check_structure(location, backend, manifest, entry)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"cannot be decoded: {_describe(exc)}")
        return problems
    if deep:
        try:
            problems += _check_contents(location, backend, manifest.layout, entry)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"cannot be decoded: {_describe(exc)}")
    return problems


def _describe(exc: BaseException) -> str:
    text = str(exc) or "no message"
    return f"{type(exc).__name__}: {text}"


def _check_structure(location: CacheLocation, backend, manifest: Manifest, entry: ShardEntry) -> list[str]:
    """Schema, layout, counts and fingerprint as the shard itself states them."""
    problems: list[str] = []
    layout = manifest.layout
    schema = backend.arrow_schema(location, entry.path)
    if schema is not None:
        expected = layout.arrow_schema()
        # shards of formats 1 to 3 (kept when a build added newer shards to the cache) are still read
        older = [legacy_arrow_schema(layout, major, per_position=split)
                 for major in LEGACY_MAJORS for split in _old_split_forms(layout)]
        forms = [expected] if shard_format(schema) == SHARD_FORMAT else older
        if not any(schema.equals(form, check_metadata=False) for form in forms):
            problems.append(f"schema differs from the layout's: {_schema_diff(schema, expected)}")
    metadata = backend.read_metadata(location, entry.path)
    stored_layout = metadata.get("layout")
    if stored_layout is None:
        if schema is None:  # the schema was not checked either way: say so
            problems.append("shard metadata has no record layout")
    else:
        try:
            as_dict = json.loads(stored_layout)
        except json.JSONDecodeError:
            as_dict = None
        if as_dict != layout.to_dict():
            problems.append(f"layout in shard metadata ({stored_layout}) differs from the manifest's")
    fp = metadata.get("config_fingerprint")
    if fp != manifest.config_fingerprint:
        problems.append(
            f"config fingerprint {_short(fp)} in shard metadata differs from the manifest's "
            f"{_short(manifest.config_fingerprint)}: written by another build"
        )
    unit = metadata.get("unit_id")
    if unit is not None and unit != entry.unit_id:
        problems.append(f"shard metadata says it holds unit {unit}, the manifest says {entry.unit_id}")
    records = backend.num_records(location, entry.path)
    if records != entry.records:
        problems.append(f"holds {records:,} records, the manifest says {entry.records:,}")
    blocks = backend.num_blocks(location, entry.path)
    if blocks != entry.blocks:
        problems.append(f"holds {blocks:,} blocks, the manifest says {entry.blocks:,}")
    return problems


def _old_split_forms(layout: RecordLayout) -> list[frozenset[str]]:
    """Format 3 kept a row per position for the top-k columns of 4-byte elements when compressed."""
    wide = frozenset(name for name, dtype in layout.topk_dtypes.items() if dtype.itemsize >= 4)
    return [frozenset(), wide] if wide else [frozenset()]


def _short(fp: str | None) -> str:
    return "none" if not fp else fp[:12]


def _schema_diff(actual, expected) -> str:
    parts = []
    for f in expected:
        if f.name not in actual.names:
            parts.append(f"missing column {f.name}")
        elif not actual.field(f.name).equals(f):
            parts.append(f"{f.name} is {actual.field(f.name).type}, expected {f.type}")
    extra = [name for name in actual.names if name not in expected.names]
    if extra:
        parts.append(f"unexpected column(s) {', '.join(extra)}")
    if not parts:
        parts.append(f"column order {actual.names}, expected {expected.names}")
    return "; ".join(parts)


def _check_contents(location: CacheLocation, backend, layout: RecordLayout, entry: ShardEntry) -> list[str]:
    """Decode every block; recount and check ids and values."""
    problems: list[str] = []
    records = tokens = positions = 0
    langs: dict[str, dict[str, int]] = {}
    bad_ids: set[str] = set()
    nan_columns: set[str] = set()
    codec = get_value_codec(layout.value_codec)
    for index in range(backend.num_blocks(location, entry.path)):
        block = backend.read_block(location, entry.path, layout, index)
        block.validate(layout)
        records += block.num_records
        tokens += block.num_tokens
        if layout.is_token_level:
            positions += block.num_positions
        for lang, counts in block.lang_counts().items():
            slot = langs.setdefault(lang, {"records": 0, "tokens": 0})
            slot["records"] += counts["records"]
            slot["tokens"] += counts["tokens"]
        for name in ("input_ids", "topk_ids", "sample_ids"):
            ids = getattr(block, name)
            if ids is not None and ids.size and int(ids.max()) >= layout.vocab_size:
                bad_ids.add(name)
        if block.topk_logprobs is not None and np.isnan(codec.decode(block.topk_logprobs)).any():
            nan_columns.add("topk_logprobs")
        if block.entropy is not None and np.isnan(block.entropy.astype(np.float32)).any():
            nan_columns.add("entropy")
        if block.target_logprob is not None and _target_nan_inside(block):
            nan_columns.add("target_logprob (before a record's last token)")
        if block.class_logprobs is not None and np.isnan(codec.decode(block.class_logprobs)).any():
            nan_columns.add("class_logprobs")
        if block.label is not None and block.label.size and (
            int(block.label.min()) < -1 or int(block.label.max()) >= layout.num_classes
        ):
            bad_ids.add("label")
    for name, counted, listed in (("records", records, entry.records), ("tokens", tokens, entry.tokens),
                                  ("positions", positions, entry.positions)):
        if counted != listed:
            problems.append(f"decoded {counted:,} {name}, the manifest says {listed:,}")
    listed_langs = {lang: {"records": int(c.get("records", 0)), "tokens": int(c.get("tokens", 0))}
                    for lang, c in entry.langs.items()}
    if langs != listed_langs:
        problems.append(
            f"per-language counts {json.dumps(langs, sort_keys=True)} differ from the manifest's "
            f"{json.dumps(listed_langs, sort_keys=True)}"
        )
    for name in sorted(bad_ids):
        limit = f"[-1, {layout.num_classes})" if name == "label" else f"[0, {layout.vocab_size})"
        problems.append(f"{name} holds values outside {limit}")
    for name in sorted(nan_columns):
        problems.append(f"{name} holds NaN")
    return problems


def _target_nan_inside(block) -> bool:
    """Whether ``target_logprob`` is NaN anywhere but at a record's last token (which has no
    next token in the record, so NaN is what it holds there)."""
    nan = np.isnan(block.target_logprob.astype(np.float32))
    ends = block.label_offsets[1:][np.diff(block.label_offsets) > 0] - 1
    nan[ends] = False
    return bool(nan.any())


# ---------------------------------------------------------------- unlisted files


def _unlisted(location: CacheLocation, listed: set[str]) -> list[str]:
    """Files readers never see: unlisted shards, _incomplete/ leftovers, temp manifests."""
    out = [f"{SHARDS_DIR}/{name}" for name in location.listdir(SHARDS_DIR)
           if f"{SHARDS_DIR}/{name}" not in listed]
    out += [f"{INCOMPLETE_DIR}/{name}" for name in location.listdir(INCOMPLETE_DIR)]
    out += location.leftover_temporaries(MANIFEST_FILE)
    return out
