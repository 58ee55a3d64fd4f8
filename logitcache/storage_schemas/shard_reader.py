"""CacheReader: read committed shards, whole or one block at a time, as numpy arrays.

The reader trusts the manifest and nothing else: only listed shards are read, each
through its backend, into a :class:`RecordBlock` of flat arrays (``[positions, k]`` ids
and values) with no per-token Python loop. ``verify=True`` checks a shard's size and
sha256 against the manifest before its labels are handed out.
"""

from __future__ import annotations

from collections.abc import Iterator

from logitcache.errors import CacheFormatError, CorruptShardError
from logitcache.storage_schemas.backends import get_backend
from logitcache.storage_schemas.layout import RecordLayout
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.manifest import Manifest, ShardEntry
from logitcache.storage_schemas.records import RecordBlock


class CacheReader:
    """Read-only view of a cache. Example::

        reader = CacheReader("runs/cache")
        for entry in reader.shards:
            block = reader.read_shard(entry, verify=True)
            logprobs = block.decoded_topk_logprobs(reader.layout)  # float32 [P, k]
    """

    def __init__(self, url: str, *, expected_kind: str | None = None) -> None:
        self.location = CacheLocation(url)
        self.manifest = Manifest.load(self.location, expected_kind=expected_kind)
        self.backend = get_backend(self.manifest.backend)

    @property
    def layout(self) -> RecordLayout:
        return self.manifest.layout

    @property
    def shards(self) -> list[ShardEntry]:
        return self.manifest.shards

    def check_shard(self, entry: ShardEntry) -> None:
        """Raise CorruptShardError unless the shard's bytes match the manifest."""
        where = f"shard {entry.path} (unit {entry.unit_id}) of {self.location.url}"
        if not self.location.exists(entry.path):
            raise CorruptShardError(f"{where} is missing: the manifest lists it but it is not on disk")
        size, sha256 = self.location.digest(entry.path)
        if size != entry.bytes:
            raise CorruptShardError(
                f"{where} has {size} bytes, the manifest says {entry.bytes}: truncated or rewritten after commit"
            )
        if sha256 != entry.sha256:
            raise CorruptShardError(f"{where} fails its sha256 check: its bytes changed after commit")

    def _guarded(self, entry: ShardEntry, read):
        try:
            return read()
        except CacheFormatError as exc:
            raise CorruptShardError(f"shard {entry.path} cannot be decoded: {exc}") from exc

    def read_shard(self, entry: ShardEntry, *, verify: bool = False) -> RecordBlock:
        if verify:
            self.check_shard(entry)
        block = self._guarded(entry, lambda: self.backend.read(self.location, entry.path, self.layout))
        if block.num_records != entry.records:
            raise CorruptShardError(
                f"shard {entry.path} holds {block.num_records} records, the manifest says {entry.records}"
            )
        return block

    def read_block(self, entry: ShardEntry, index: int) -> RecordBlock:
        if not 0 <= index < entry.blocks:
            raise IndexError(f"shard {entry.path} has {entry.blocks} blocks, asked for {index}")
        return self._guarded(
            entry, lambda: self.backend.read_block(self.location, entry.path, self.layout, index)
        )

    def iter_blocks(self, *, verify: bool = False) -> Iterator[tuple[ShardEntry, int, RecordBlock]]:
        """Every block of every committed shard, in manifest order."""
        for entry in self.shards:
            if verify:
                self.check_shard(entry)
            for index in range(entry.blocks):
                yield entry, index, self.read_block(entry, index)
