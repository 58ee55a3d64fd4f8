"""Parquet shards: one file per shard, one row group per block of about ``row_group_tokens``.

Column encodings were chosen by measurement (``benchmarks/bench_codecs.py``): zstd (or lz4,
or nothing, as ``storage.compression`` says) on every column, dictionary encoding only for
``doc_key`` and ``lang``, and, when compressing, BYTE_STREAM_SPLIT for the sampled ids,
entropy, target log-probability and class values and for top-k rows of 4-byte elements (see :func:`_split_columns`).

A top-k column holds one binary value per record, the record's rows back to back (format 3,
see ``layout.RecordLayout.arrow_schema``): Arrow reads it at close to the speed of a copy,
where one fixed-size binary per position (format 2) cost it a level and a value per
position, about twice the read time of an uncompressed shard (BENCHMARKS.md, "Cache format
3"). Byte stream splitting applies to fixed-size values only, so a column it helps (4-byte
elements, compressed) keeps format 2's form: :func:`position_row_columns`. The file's
key-value metadata carries the record layout, the config fingerprint and the work unit, so a
shard describes itself even away from its manifest.

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
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.records import (
    RecordBlock,
    block_cuts,
    block_to_table,
    table_to_block,
)
from logitcache.storage_schemas.storage_settings import StorageSettings

METADATA_PREFIX = "logitcache."

#: Columns whose numeric values get BYTE_STREAM_SPLIT when the shard is compressed.
_SPLIT_COLUMNS = ("sample_ids", "entropy", "target_logprob", "class_logprobs")


def _split_columns(schema: pa.Schema, layout: RecordLayout) -> list[str]:
    """Parquet leaf paths of the columns to split into byte streams."""
    out = []
    for name in _SPLIT_COLUMNS:
        if name not in schema.names:
            continue
        path, leaf_type = name, schema.field(name).type
        while pa.types.is_list(leaf_type) or pa.types.is_fixed_size_list(leaf_type):
            path, leaf_type = f"{path}.list.element", leaf_type.value_type
        # every integer is at least 32 bits in Parquet (uint8 and uint16 become INT32), so
        # splitting helps even one-byte values: their three zero planes compress to nothing
        if pa.types.is_integer(leaf_type) or pa.types.is_floating(leaf_type):
            out.append(path)
    # A top-k row is split into one stream per byte of the row (that byte of that rank,
    # across positions). Measured at k=64 (bench_codecs data): for 4-byte elements it
    # lets zstd drop the near-constant high bytes of uint32 ids (131.6 -> 111.9 bytes per
    # token at a 150k vocabulary) and of float32 values (225.1 -> 192.8); for 1- and 2-byte
    # elements it made the output larger (float16 values 57.2 -> 73.8) and reading slower.
    # (:func:`position_row_columns` picks those columns: the top-k columns stored per position)
    out += [f"{name}.list.element" for name in layout.topk_dtypes
            if name in schema.names and pa.types.is_list(schema.field(name).type)]
    return out


def position_row_columns(layout: RecordLayout, compression: str) -> frozenset[str]:
    """The top-k columns that a shard compressed with ``compression`` stores as one binary
    row per position, for Parquet to split into byte streams: 4-byte elements, compressed."""
    if not layout.has_topk or compression == "none":
        return frozenset()
    return frozenset(name for name, dtype in layout.topk_dtypes.items() if dtype.itemsize >= 4)


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
        table = block_to_table(block, layout, position_rows=position_row_columns(layout, storage.compression))
        file_metadata = {f"{METADATA_PREFIX}{k}": v for k, v in metadata.items()}
        file_metadata[f"{METADATA_PREFIX}layout"] = json.dumps(layout.to_dict())
        schema = table.schema.with_metadata(file_metadata)
        cuts = block_cuts(block.token_offsets, storage.row_group_tokens)
        compressed = storage.compression != "none"
        with location.open(rel, "wb") as sink, pq.ParquetWriter(
            sink, schema,
            compression=PARQUET_CODECS[storage.compression],
            compression_level=storage.compression_level if storage.compression == "zstd" else None,
            use_dictionary=["doc_key", "lang"],
            # without compression splitting only costs time: the planes are stored as they are
            use_byte_stream_split=_split_columns(schema, layout) if compressed else False,
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
        return {k[len(prefix):].decode(): v.decode() for k, v in raw.items() if k.startswith(prefix)}

    def read_block(self, location: CacheLocation, rel: str, layout: RecordLayout, index: int) -> RecordBlock:
        with self._opened(location, rel) as shard:
            return table_to_block(shard.read_row_group(index), layout)

    def read(self, location: CacheLocation, rel: str, layout: RecordLayout) -> RecordBlock:
        with self._opened(location, rel) as shard:
            return table_to_block(shard.read(), layout)
