"""The shard backends, by name. A backend is only an encoder/decoder of one shard.

Everything around a shard (where it is written, fsync and rename, hashing, the manifest
entry) is the shard writer's job, so adding a format means writing one class with the
methods of :class:`ShardBackend`.
"""

from __future__ import annotations

from typing import Protocol

import pyarrow as pa

from logitcache.errors import CacheFormatError
from logitcache.storage_schemas.layout import RecordLayout
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.parquet_backend import ParquetBackend
from logitcache.storage_schemas.records import RecordBlock
from logitcache.storage_schemas.storage_settings import StorageSettings
from logitcache.storage_schemas.zarr_backend import ZarrBackend


class ShardBackend(Protocol):
    name: str
    extension: str

    def write(
        self, location: CacheLocation, rel: str, block: RecordBlock, *,
        layout: RecordLayout, storage: StorageSettings, metadata: dict[str, str],
    ) -> int: ...

    def num_blocks(self, location: CacheLocation, rel: str) -> int: ...

    def num_records(self, location: CacheLocation, rel: str) -> int: ...

    def read_metadata(self, location: CacheLocation, rel: str) -> dict[str, str]: ...

    def read_block(self, location: CacheLocation, rel: str, layout: RecordLayout, index: int) -> RecordBlock: ...

    def read(self, location: CacheLocation, rel: str, layout: RecordLayout) -> RecordBlock: ...

    def arrow_schema(self, location: CacheLocation, rel: str) -> pa.Schema | None: ...


BACKENDS: dict[str, ShardBackend] = {"parquet": ParquetBackend(), "zarr": ZarrBackend()}


def get_backend(name: str) -> ShardBackend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise CacheFormatError(f"unknown storage backend {name!r}; known: {', '.join(BACKENDS)}") from None
