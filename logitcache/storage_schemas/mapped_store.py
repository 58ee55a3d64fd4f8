"""A read-only Zarr store for a local shard that hands out views of memory maps.

zarr's ``LocalStore`` reads every chunk into a new ``bytes`` object. A chunk is megabytes,
so glibc serves each with fresh pages from the kernel, which faults them in and zeroes
them on every read: at k=64 that was 80% of the page faults of a Zarr reader and about 40%
of its CPU time (BENCHMARKS.md, "Choices measured"). This store maps the file
instead and returns a zero-copy view of the bytes asked for, so the codecs decode straight
from the page cache. The view keeps its mapping alive; nothing is ever written through it.

Committed shards are never written in place: a shard directory is only ever removed
(its files unlinked) or replaced by a rename, and a mapping of an unlinked file stays
valid, so a mapping cannot see a file shrink under it. Writing still goes through
``LocalStore``.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import zarr.storage
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype


class MappedLocalStore(zarr.storage.LocalStore):
    """``LocalStore`` opened read-only whose ``get`` maps the file instead of reading it."""

    def __init__(self, root: str | os.PathLike, *, read_only: bool = True) -> None:
        if not read_only:
            raise ValueError("MappedLocalStore only reads; write through zarr.storage.LocalStore")
        super().__init__(root, read_only=True)

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        if not self._is_open:
            await self._open()
        try:
            return mapped_bytes(self.root / key, prototype or default_buffer_prototype(), byte_range)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]


def mapped_bytes(path: Path, prototype: BufferPrototype, byte_range: ByteRequest | None) -> Buffer:
    """The bytes of ``path`` in ``byte_range`` (all of them for ``None``), as a view of a
    read-only memory map. Ranges past the end are cut at the end, as ``LocalStore`` does."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        start, stop = _span(byte_range, size)
        if stop <= start:
            return prototype.buffer.from_bytes(b"")
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    return prototype.buffer.from_bytes(memoryview(mapping)[start:stop])


def _span(byte_range: ByteRequest | None, size: int) -> tuple[int, int]:
    if byte_range is None:
        return 0, size
    if isinstance(byte_range, RangeByteRequest):
        return min(byte_range.start, size), min(byte_range.end, size)
    if isinstance(byte_range, OffsetByteRequest):
        return min(byte_range.offset, size), size
    if isinstance(byte_range, SuffixByteRequest):
        return max(0, size - byte_range.suffix), size
    raise TypeError(f"unexpected byte range {byte_range!r}")
