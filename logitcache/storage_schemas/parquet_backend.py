"""Parquet shards: one file per shard, one row group per block of about ``row_group_tokens``.

Column encodings were chosen by measurement (``benchmarks/bench_codecs.py``): zstd (or lz4,
or nothing, as ``storage.compression`` says) on every column, dictionary encoding only for
``doc_key`` and ``lang``, and Parquet's BYTE_STREAM_SPLIT only for the class values of a
float32 or q8 classifier cache, when compressing. The soft-label columns split their own
bytes into planes (format 4, see ``row_planes`` and ``layout.RecordLayout.arrow_schema``),
so their physical type is one binary per record whatever the vocabulary, codec and
compression, which every Parquet reader reads; float16 columns are not split by Parquet,
because some readers (polars) cannot read split FIXED_LEN_BYTE_ARRAY columns.

The file's key-value metadata carries the record layout, the shard format, the config
fingerprint and the work unit, so a shard describes itself even away from its manifest.
Shards of formats 1 to 3 (no ``shard_format`` key) are read through ``legacy_formats``.

A shard on a local disk is read through a memory map (see :meth:`ParquetBackend._opened`):
read through a Python file object, every block landed first in a fresh ``bytes`` object,
whose pages the kernel faulted in and zeroed on every read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.errors import CacheFormatError
from logitcache.storage_schemas.layout import RecordLayout
from logitcache.storage_schemas.legacy_formats import legacy_table_to_block
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.records import (
    RecordBlock,
    block_cuts,
    block_to_table,
    table_to_block,
)
from logitcache.storage_schemas.storage_settings import StorageSettings

METADATA_PREFIX = "logitcache."

#: The format of the shards this module writes (file metadata ``logitcache.shard_format``).
SHARD_FORMAT = "4"


def _split_columns(schema: pa.Schema) -> list[str]:
    """Parquet leaf paths of the columns to split into byte streams: class values of 4 bytes
    (float32) or stored as Parquet INT32 (q8 levels); never FIXED_LEN_BYTE_ARRAY (float16)."""
    if "class_logprobs" not in schema.names:
        return []
    value_t = schema.field("class_logprobs").type.value_type
    return [] if pa.types.is_float16(value_t) else ["class_logprobs.list.element"]


#: ``storage.compression`` -> Parquet codec. lz4 is the block format without framing
#: (Parquet's LZ4_RAW), which every current Parquet reader knows.
PARQUET_CODECS = {"zstd": "zstd", "lz4": "lz4_raw", "none": "none"}


class ParquetBackend:
    name = "parquet"
    extension = ".parquet"

    def write(
        self, location: CacheLocation, rel: str, block: RecordBlock, *,
        layout: RecordLayout, storage: StorageSettings, metadata: dict[str, str],
    ) -> int:
        """Write ``block`` to ``rel``; return the number of row groups written."""
        table = block_to_table(block, layout)
        file_metadata = {f"{METADATA_PREFIX}{k}": v for k, v in metadata.items()}
        file_metadata[f"{METADATA_PREFIX}layout"] = json.dumps(layout.to_dict())
        file_metadata[f"{METADATA_PREFIX}shard_format"] = SHARD_FORMAT
        schema = table.schema.with_metadata(file_metadata)
        cuts = block_cuts(block.token_offsets, storage.row_group_tokens)
        compressed = storage.compression != "none"
        with location.open(rel, "wb") as sink, pq.ParquetWriter(
            sink, schema,
            compression=PARQUET_CODECS[storage.compression],
            compression_level=storage.compression_level if storage.compression == "zstd" else None,
            use_dictionary=["doc_key", "lang"],
            # without compression splitting only costs time: the planes are stored as they are
            use_byte_stream_split=_split_columns(schema) if compressed else False,
            write_statistics=["record_id"],
            store_schema=True,
        ) as writer:
            for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
                rows = table.slice(start, stop - start).cast(schema)
                writer.write_table(rows, row_group_size=max(stop - start, 1))
        return len(cuts) - 1

    @contextmanager
    def _opened(self, location: CacheLocation, rel: str) -> Iterator[pq.ParquetFile]:
        """The shard as a ParquetFile; Arrow and I/O errors become CacheFormatError.

        A local shard is memory-mapped: Arrow then decodes straight from the page cache.
        Through a Python file object (what fsspec gives) each read is copied into a new
        ``bytes`` object first; at k=64 the kernel's page faults for those took about 40%
        of the reader's CPU time (BENCHMARKS.md, "Choices measured").
        Shards are never written in place after commit (only removed, or replaced by a
        rename), so a mapping cannot see a file shrink under it."""
        try:
            source = pa.memory_map(location.full(rel), "r") if location.is_local else location.open(rel, "rb")
            with source:
                yield pq.ParquetFile(source)
        except (pa.ArrowInvalid, OSError) as exc:
            raise CacheFormatError(f"{location.full(rel)}: not a readable Parquet shard ({exc})") from exc

    def num_blocks(self, location: CacheLocation, rel: str) -> int:
        with self._opened(location, rel) as shard:
            return shard.num_row_groups

    def num_records(self, location: CacheLocation, rel: str) -> int:
        with self._opened(location, rel) as shard:
            return shard.metadata.num_rows

    def arrow_schema(self, location: CacheLocation, rel: str) -> pa.Schema:
        with self._opened(location, rel) as shard:
            return shard.schema_arrow

    def read_metadata(self, location: CacheLocation, rel: str) -> dict[str, str]:
        raw = self.arrow_schema(location, rel).metadata or {}
        prefix = METADATA_PREFIX.encode()
        out = {k[len(prefix):].decode(): v.decode() for k, v in raw.items() if k.startswith(prefix)}
        out.pop("shard_format", None)  # the format, not the shard's own metadata (see shard_format)
        return out

    def read_block(self, location: CacheLocation, rel: str, layout: RecordLayout, index: int) -> RecordBlock:
        with self._opened(location, rel) as shard:
            return _decoder(shard)(shard.read_row_group(index), layout)

    def read(self, location: CacheLocation, rel: str, layout: RecordLayout) -> RecordBlock:
        with self._opened(location, rel) as shard:
            return _decoder(shard)(shard.read(), layout)


def shard_format(schema: pa.Schema) -> str:
    """The format of a shard from its schema's metadata: "4", or "3" for any older one."""
    raw = schema.metadata or {}
    return raw.get(f"{METADATA_PREFIX}shard_format".encode(), b"3").decode()


def _decoder(shard: pq.ParquetFile):
    return table_to_block if shard_format(shard.schema_arrow) == SHARD_FORMAT else legacy_table_to_block
