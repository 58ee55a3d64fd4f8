"""ShardWriter: the only code that adds shards to a cache, one work unit at a time.

A shard becomes visible in four steps, each leaving a cache whose committed shards all
read and verify if the process dies right after it:

1. the backend writes the shard under ``_incomplete/`` (never read by anyone);
2. its bytes are fsynced and hashed;
3. it is renamed into ``shards/`` (a shard there but not in the manifest is "unlisted":
   reported by ``verify``, ignored by readers, overwritten when its unit is built again);
4. the manifest, now listing it (shards sorted by unit id) with rows, tokens, bytes, sha256 and per-language counts,
   replaces the old one atomically. This is the commit point.

Opening a writer on an existing cache checks that it was built with the same identity
(layout, backend, storage settings, teacher, tokenizer, config fingerprint fields) and
refuses otherwise, naming each field that differs. A cache with no committed shard yet
takes the new identity (nothing would be lost). ``overwrite=True`` starts afresh, but the
old cache is discarded only when the first new shard commits: a build that fails before
that leaves it untouched.

A storage error on the way (a full disk, a permission or read-only error: any ``OSError``)
raises :class:`~logitcache.errors.CacheWriteError`, which says what failed, where, and that
the shards committed before it are intact: the unit's staging files (and its renamed but
unlisted shard) are removed on a best-effort basis, the manifest on disk is the previous one,
and a later build with the same configuration continues with the units not yet committed.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from logitcache.errors import CacheWriteError, IncompatibleCacheError
from logitcache.storage_schemas.backends import get_backend
from logitcache.storage_schemas.fingerprint import diff_fields, fingerprint
from logitcache.storage_schemas.layout import RecordLayout
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.manifest import (
    FORMAT_VERSION,
    INCOMPLETE_DIR,
    MANIFEST_FILE,
    SHARDS_DIR,
    Manifest,
    ShardEntry,
    cache_identity,
)
from logitcache.storage_schemas.records import RecordBlock
from logitcache.storage_schemas.storage_settings import StorageSettings

_UNIT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def _named_once(differences: list[str]) -> list[str]:
    """A cache's identity holds the storage settings twice (as the cache uses them, and among
    the config's fingerprint fields): a difference in both is named once."""
    shown = set(differences)
    return [d for d in differences if not (d.startswith("config.") and d.removeprefix("config.") in shown)]


def shard_name(unit_id: str, extension: str) -> str:
    if not _UNIT_ID.match(unit_id):
        raise ValueError(
            f"work unit id {unit_id!r} must be 1-128 letters, digits, '.', '_' or '-' "
            "(it names the shard file)"
        )
    return f"part-{unit_id}{extension}"


@dataclass(frozen=True, kw_only=True)
class ShardTarget:
    """Where and how a cache's shards are written: all a process needs to stage one."""

    url: str
    backend: str
    storage: StorageSettings
    layout: RecordLayout
    config_fingerprint: str


@dataclass(frozen=True, kw_only=True)
class StagedShard:
    """A shard written, fsynced and hashed under ``_incomplete/``, not yet committed: what a
    worker hands back to the build instead of its records."""

    unit_id: str
    name: str  # its file name in shards/
    staging: str  # its path under _incomplete/, relative to the cache
    records: int
    tokens: int
    positions: int
    bytes: int
    sha256: str
    blocks: int
    langs: dict[str, dict[str, int]]
    write_seconds: float
    config_fingerprint: str


def stage_shard(target: ShardTarget, block: RecordBlock, *, unit_id: str,
                location: CacheLocation | None = None, committed: int | None = None) -> StagedShard:
    """Steps 1 and 2 of a commit (module docstring) wherever this runs: the shard of ``block``
    written under ``_incomplete/`` with a name of its own (another attempt at the same unit
    never writes into it), fsynced and hashed. Raises CacheWriteError on a storage error,
    after removing what it wrote (``committed``: the cache's committed shards, for its message)."""
    location = location or CacheLocation(target.url)
    backend = get_backend(target.backend)
    layout = target.layout
    block.validate(layout)
    name = shard_name(unit_id, backend.extension)
    staging = f"{INCOMPLETE_DIR}/{uuid.uuid4().hex[:12]}-{name}"
    started = time.perf_counter()
    step = f"writing shard {name} of unit {unit_id}"
    try:
        num_blocks = backend.write(location, staging, block, layout=layout, storage=target.storage,
                                   metadata={"config_fingerprint": target.config_fingerprint, "unit_id": unit_id})
        step = f"syncing shard {name} of unit {unit_id} to disk (fsync)"
        location.sync_tree(staging)
        size, sha256 = location.digest(staging)
    except OSError as exc:
        with contextlib.suppress(OSError):
            location.remove(staging)
        raise storage_failure(exc, url=location.url, what=step, committed=committed) from exc
    return StagedShard(unit_id=unit_id, name=name, staging=staging, records=block.num_records,
                       tokens=block.num_tokens, positions=block.num_positions if layout.is_token_level else 0,
                       bytes=size, sha256=sha256, blocks=num_blocks, langs=block.lang_counts(),
                       write_seconds=round(time.perf_counter() - started, 4),
                       config_fingerprint=target.config_fingerprint)


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def storage_failure(exc: OSError, *, url: str, what: str, committed: int | None) -> CacheWriteError:
    """A CacheWriteError for ``exc``: what failed, where, what is safe and what to do."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno is not None and exc.errno in errno.errorcode:
        reason = f"{errno.errorcode[exc.errno]}: {reason}"
    if getattr(exc, "filename", None):
        reason += f" ({exc.filename})"
    if exc.errno in _FULL:
        fix = "Free disk space (or quota) there, or point `cache` at a larger disk,"
    elif exc.errno in _DENIED or isinstance(exc, PermissionError):
        fix = ("Make the cache directory writable by this user (the build writes shards/, "
               "_incomplete/ and manifest.json),")
    else:
        fix = "Fix the storage problem,"
    return CacheWriteError(
        f"cannot write to cache {url}: {what} failed ({reason}). "
        f"The {'' if committed is None else f'{committed} '}shard(s) committed before it are intact and the manifest "
        "lists only those. "
        f"{fix} then run the same command again: it continues with the units not yet committed."
    )


class ShardWriter:
    """Commits :class:`RecordBlock` shards into the cache at ``url``.

    ``template`` is a manifest with no shards that describes the cache to write (layout,
    backend, teacher, tokenizer, ...). Example::

        writer = ShardWriter("runs/cache", template=manifest_template)
        if "u00000" not in writer.committed_units:
            writer.commit(block, unit_id="u00000")
    """

    def __init__(self, url: str, *, template: Manifest, overwrite: bool = False) -> None:
        self.location = CacheLocation(url)
        self.backend = get_backend(template.backend)
        self.storage = StorageSettings.from_manifest(template.storage)
        fresh = copy.deepcopy(template)
        fresh.shards = []
        fresh.config_fingerprint = fingerprint(cache_identity(fresh))
        # an existing cache is replaced only when the first new shard commits, so a build
        # that fails before that (bad corpus, bad teacher) leaves the old cache as it was
        self._replace_on_commit = False
        extends_existing = False
        existing = Manifest.load(self.location) if self.location.exists(MANIFEST_FILE) else None
        if existing is not None and overwrite:
            self._replace_on_commit = bool(existing.shards)
            self.manifest = existing if existing.shards else fresh
        elif existing is not None:
            differences = _named_once(diff_fields(cache_identity(existing), cache_identity(fresh)))
            if differences and existing.shards:
                raise IncompatibleCacheError(
                    f"{self.location.url} was built with a different configuration; "
                    "fields that differ (cache -> this build):\n  " + "\n  ".join(differences)
                    + "\nUse a new cache path, or --overwrite to discard the existing cache."
                )
            if differences:  # no shard committed yet: nothing to lose, start with this config
                self.manifest = fresh
            else:
                existing.config = fresh.config
                existing.corpus = {**existing.corpus, **fresh.corpus}
                self.manifest = existing
                # the new description is saved with the next commit: a build that fails
                # before one (bad corpus row, bad teacher) leaves the manifest's bytes as they were
                extends_existing = True
        else:
            self.manifest = fresh
        self._template = fresh
        try:
            self.location.makedirs(SHARDS_DIR)
            self.location.remove(INCOMPLETE_DIR)  # leftovers of a killed run: never trusted
            self.location.makedirs(INCOMPLETE_DIR)
            for leftover in self.location.leftover_temporaries(MANIFEST_FILE):  # a save cut short by a kill
                self.location.remove(leftover)
            if not self._replace_on_commit and not extends_existing:
                self.manifest.save(self.location)
        except OSError as exc:
            raise storage_failure(exc, url=self.location.url, what="preparing the cache directory",
                                  committed=len(self.committed_units)) from exc

    def _replace_existing(self) -> None:
        """Discard the old cache (``overwrite``): its manifest first, then its shards."""
        self.manifest = self._template
        self.manifest.save(self.location)
        self.location.remove(SHARDS_DIR)
        self.location.makedirs(SHARDS_DIR)
        self._replace_on_commit = False

    @property
    def committed_units(self) -> set[str]:
        """Units committed to the cache this writer adds to (none when it will overwrite)."""
        if self._replace_on_commit:
            return set()
        return {s.unit_id for s in self.manifest.shards}

    def commit(self, block: RecordBlock, *, unit_id: str, stats: dict[str, Any] | None = None) -> ShardEntry:
        """Write, fsync, hash and rename one shard, then commit it to the manifest."""
        if unit_id in self.committed_units:
            raise ValueError(f"work unit {unit_id!r} is already committed to {self.location.url}")
        return self.commit_staged(self.stage(block, unit_id=unit_id), stats=stats)

    def target(self) -> ShardTarget:
        """Where and how the shards of this cache are written, for writers elsewhere (a worker
        that stages its unit's shard with :func:`stage_shard`)."""
        manifest = self._template if self._replace_on_commit else self.manifest  # what the next commit makes
        return ShardTarget(url=self.location.url, backend=manifest.backend, storage=self.storage,
                           layout=manifest.layout, config_fingerprint=manifest.config_fingerprint)

    def stage(self, block: RecordBlock, *, unit_id: str) -> StagedShard:
        """Steps 1 and 2 here: the shard written under ``_incomplete/``, fsynced and hashed."""
        return stage_shard(self.target(), block, unit_id=unit_id, location=self.location,
                           committed=0 if self._replace_on_commit else len(self.manifest.shards))

    def commit_staged(self, staged: StagedShard, *, stats: dict[str, Any] | None = None) -> ShardEntry:
        """Steps 3 and 4 for a shard staged here or by a worker: checked to be where and as large
        as it was staged, renamed into ``shards/`` and committed to the manifest."""
        unit_id = staged.unit_id
        if unit_id in self.committed_units:
            raise ValueError(f"work unit {unit_id!r} is already committed to {self.location.url}")
        if self._replace_on_commit:
            try:
                self._replace_existing()
            except OSError as exc:
                raise storage_failure(exc, url=self.location.url, what="discarding the old cache (--overwrite)",
                                      committed=len(self.committed_units)) from exc
        final = f"{SHARDS_DIR}/{staged.name}"
        step = f"moving shard {staged.name} of unit {unit_id} into {SHARDS_DIR}/ (rename)"
        try:
            self._check_staged(staged)
            self.location.rename(staged.staging, final)
        except OSError as exc:
            self._discard(staged.staging)
            raise storage_failure(exc, url=self.location.url, what=step,
                                  committed=len(self.manifest.shards)) from exc
        entry = ShardEntry(
            unit_id=unit_id, path=final, records=staged.records, tokens=staged.tokens, positions=staged.positions,
            bytes=staged.bytes, sha256=staged.sha256, blocks=staged.blocks, langs=staged.langs,
            stats={"write_seconds": staged.write_seconds, **(stats or {})},
        )
        # units may finish in any order (a Dask build); the manifest lists them by unit id so
        # that a cache's shard order, and so a reader's order, does not depend on who built it
        self.manifest.shards.append(entry)
        self.manifest.shards.sort(key=lambda shard: shard.unit_id)
        # a shard of this version joins an older cache: readers of the older version would
        # not read it, so the cache now says it needs this one
        previous_version, self.manifest.format_version = self.manifest.format_version, FORMAT_VERSION
        try:
            self.manifest.save(self.location)
        except OSError as exc:  # the manifest on disk is still the previous one
            self.manifest.shards.remove(entry)
            self.manifest.format_version = previous_version
            self._discard(final)
            raise storage_failure(exc, url=self.location.url,
                                  what=f"saving {MANIFEST_FILE} to commit unit {unit_id}",
                                  committed=len(self.manifest.shards)) from exc
        return entry

    def _check_staged(self, staged: StagedShard) -> None:
        """A staged shard must still be there, as large as its writer measured it (a second
        attempt at a unit, or a cleanup, may have removed or replaced it since)."""
        if staged.config_fingerprint != self.manifest.config_fingerprint:
            raise IncompatibleCacheError(f"shard {staged.name} of unit {staged.unit_id} was staged for another "
                                         "configuration of this cache; build the unit again")
        if not self.location.exists(staged.staging):
            raise FileNotFoundError(errno.ENOENT, "the staged shard is gone", staged.staging)
        size = self.location.fs.du(self.location.full(staged.staging), total=True)
        if size != staged.bytes:
            raise OSError(errno.EIO, f"the staged shard has {size} bytes, its writer wrote {staged.bytes}",
                          staged.staging)

    def forget_units(self, unit_ids: set[str]) -> list[ShardEntry]:
        """Take ``unit_ids`` out of the manifest (saved at once, so readers stop using them),
        then remove their shard files: the next commits of those units replace them. How a
        shard that went missing or bad after its commit is repaired."""
        gone = [entry for entry in self.manifest.shards if entry.unit_id in unit_ids]
        if not gone or self._replace_on_commit:
            return []
        kept = [entry for entry in self.manifest.shards if entry.unit_id not in unit_ids]
        self.manifest.shards, before = kept, self.manifest.shards
        try:
            self.manifest.save(self.location)
        except OSError as exc:
            self.manifest.shards = before
            raise storage_failure(exc, url=self.location.url, what=f"saving {MANIFEST_FILE} without the damaged "
                                  "shards", committed=len(before)) from exc
        for entry in gone:
            self._discard(entry.path)
        return gone

    def _discard(self, rel: str) -> None:
        """Remove an uncommitted shard if the storage lets us (it frees space; readers ignore it anyway)."""
        with contextlib.suppress(OSError):
            self.location.remove(rel)

    def update_stats(self, **stats: Any) -> None:
        """Merge build statistics (throughput, padding...) into the manifest and save it."""
        if self._replace_on_commit:
            self._replace_existing()
        self.manifest.stats.update(stats)
        try:
            self.manifest.save(self.location)
        except OSError as exc:
            raise storage_failure(exc, url=self.location.url, what=f"saving the build statistics to {MANIFEST_FILE}",
                                  committed=len(self.manifest.shards)) from exc
