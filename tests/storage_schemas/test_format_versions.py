"""Format 2 Parquet shards (top-k as fixed-size binary rows) and the format 1 shards still read.

A format 1 shard is made here the way format 1 wrote one: the same file metadata, with the
top-k columns as ``list<fixed_size_list<type, k>>`` and nullable list items.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logitcache.errors import CacheFormatError
from logitcache.storage_schemas.layout import KINDS, RecordLayout
from logitcache.storage_schemas.manifest import FORMAT_VERSION, READABLE_MAJORS
from logitcache.storage_schemas.records import RecordBlock, block_to_table, table_to_block
from logitcache.storage_schemas.shard_reader import CacheReader
from logitcache.storage_schemas.shard_writer import ShardWriter
from logitcache.storage_schemas.verify import verify_cache
from tests.factories import make_block, make_layout, make_template


def format_1_table(block: RecordBlock, layout: RecordLayout) -> pa.Table:
    """``block`` as a format 1 Parquet shard held it."""
    table = block_to_table(block, layout)
    schema = layout.arrow_schema(format_1=True)
    columns = []
    for field in schema:
        if field.name in ("topk_ids", "topk_logprobs"):
            rows = getattr(block, field.name)
            per_position = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), layout.k)
            offsets = pa.array(block.label_offsets.astype(np.int32))
            columns.append(pa.ListArray.from_arrays(offsets, per_position))
        else:
            columns.append(table.column(field.name).cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def rewrite_as_format_1(cache: Path, layout: RecordLayout, blocks: list[RecordBlock]) -> None:
    """Turn every shard of a Parquet cache into a format 1 shard and mark the cache 1.0."""
    manifest = json.loads((cache / "manifest.json").read_text())
    for entry, block in zip(manifest["shards"], blocks, strict=True):
        path = cache / entry["path"]
        metadata = pq.read_schema(path).metadata
        table = format_1_table(block, layout)
        pq.write_table(table.replace_schema_metadata(metadata), path, row_group_size=max(block.num_records, 1))
        data = path.read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), blocks=1)
    manifest["format_version"] = "1.0"
    (cache / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("codec", ["float32", "float16", "q8"])
def test_a_format_1_table_reads_as_the_same_block(kind, codec):
    layout = make_layout(kind, value_codec=codec, vocab_size=70_000)  # uint32 ids
    block = make_block(layout, records=9)
    assert table_to_block(format_1_table(block, layout), layout).equals(block)


def test_top_k_rows_decode_without_logitcache(tmp_path):
    # the field metadata's promise: k little-endian values of the id (or storage) type per row
    layout = make_layout("token_topk", k=5, value_codec="float16", vocab_size=50_000)
    block = make_block(layout, records=6)
    pq.write_table(block_to_table(block, layout), tmp_path / "s.parquet")
    table = pq.read_table(tmp_path / "s.parquet")
    field = table.schema.field("topk_ids")
    assert field.metadata[b"logitcache.row"] == b"5 x little-endian uint16"
    rows = table.column("topk_ids").combine_chunks().flatten()
    ids = np.frombuffer(b"".join(rows.to_pylist()), dtype="<u2").reshape(-1, 5)
    np.testing.assert_array_equal(ids, block.topk_ids)
    values = table.column("topk_logprobs").combine_chunks().flatten()
    stored = np.frombuffer(b"".join(values.to_pylist()), dtype="<f2").reshape(-1, 5)
    np.testing.assert_array_equal(stored, block.topk_logprobs)


def test_top_k_rows_of_another_width_are_a_format_error():
    layout = make_layout("token_topk", k=4)
    table = block_to_table(make_block(layout), layout)
    wider = make_layout("token_topk", k=5)
    with pytest.raises(CacheFormatError, match="top-k rows of 8 bytes, but the layout says 5 x uint16"):
        table_to_block(table, wider)


def _build(root: Path, layout: RecordLayout, units: int) -> list[RecordBlock]:
    writer = ShardWriter(str(root), template=make_template(layout))
    blocks = [make_block(layout, records=5, seed=i, first_record=10 * i) for i in range(units)]
    for i, block in enumerate(blocks):
        writer.commit(block, unit_id=f"u{i:05d}")
    return blocks


@pytest.mark.parametrize("kind", ["token_topk", "token_topk_sampled"])
def test_a_format_1_cache_is_read_and_verified(tmp_path, kind):
    layout = make_layout(kind, value_codec="q8")
    blocks = _build(tmp_path / "c", layout, units=2)
    rewrite_as_format_1(tmp_path / "c", layout, blocks)
    reader = CacheReader(str(tmp_path / "c"))
    assert reader.manifest.format_version == "1.0"
    for entry, block in zip(reader.shards, blocks, strict=True):
        assert reader.read_block(entry, 0).equals(block)
    report = verify_cache(str(tmp_path / "c"), deep=True)
    assert report.ok, report.to_text()


def test_adding_to_a_format_1_cache_writes_format_2_and_marks_the_cache(tmp_path):
    layout = make_layout("token_topk", value_codec="q8")
    blocks = _build(tmp_path / "c", layout, units=2)
    rewrite_as_format_1(tmp_path / "c", layout, blocks)
    writer = ShardWriter(str(tmp_path / "c"), template=make_template(layout))
    assert writer.committed_units == {"u00000", "u00001"}
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["format_version"] == "1.0"
    added = make_block(layout, records=4, seed=9, first_record=90)
    writer.commit(added, unit_id="u00002")
    reader = CacheReader(str(tmp_path / "c"))
    assert reader.manifest.format_version == FORMAT_VERSION
    schemas = [pq.read_schema(tmp_path / "c" / e.path).field("topk_ids").type for e in reader.shards]
    assert [pa.types.is_fixed_size_binary(t.value_type) for t in schemas] == [False, False, True]
    for entry, block in zip(reader.shards, [*blocks, added], strict=True):
        assert reader.read_shard(entry, verify=True).equals(block)
    assert verify_cache(str(tmp_path / "c"), deep=True).ok


def test_a_shard_of_neither_format_is_a_schema_problem(tmp_path):
    layout = make_layout("token_topk", value_codec="q8")
    blocks = _build(tmp_path / "c", layout, units=1)
    path = tmp_path / "c" / CacheReader(str(tmp_path / "c")).shards[0].path
    metadata = pq.read_schema(path).metadata
    table = format_1_table(blocks[0], layout)
    flattened = table.set_column(  # ids as a flat list per record: no format ever wrote this
        table.schema.get_field_index("topk_ids"), "topk_ids",
        pa.ListArray.from_arrays(pa.array((blocks[0].label_offsets * layout.k).astype(np.int32)),
                                 pa.array(blocks[0].topk_ids.reshape(-1))))
    pq.write_table(flattened.replace_schema_metadata(metadata), path)
    problems = [p.problem for p in verify_cache(str(tmp_path / "c")).problems]
    assert any("schema differs" in p and "topk_ids" in p for p in problems), problems


def test_a_major_version_older_than_any_read_is_refused(tmp_path):
    layout = make_layout()
    _build(tmp_path / "c", layout, units=0)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    manifest["format_version"] = f"{min(READABLE_MAJORS) - 1}.3"
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheFormatError, match="older than this logitcache reads .*rebuild the cache"):
        CacheReader(str(tmp_path / "c"))


@pytest.mark.parametrize(("vocab_size", "codec", "compression", "split"), [
    (70_000, "q8", "zstd", {"topk_ids"}),  # uint32 ids: their high bytes compress away once split
    (70_000, "float32", "zstd", {"topk_ids", "topk_logprobs"}),
    (70_000, "float32", "lz4", {"topk_ids", "topk_logprobs"}),  # any compression, same rule
    (1_000, "float16", "zstd", set()),  # 2-byte elements: splitting made them larger
    (70_000, "float32", "none", set()),  # nothing to gain without compression
])
def test_top_k_rows_are_split_into_byte_streams_where_it_pays(tmp_path, vocab_size, codec, compression, split):
    layout = make_layout("token_topk", value_codec=codec, vocab_size=vocab_size)
    writer = ShardWriter(str(tmp_path / "c"), template=make_template(layout, storage={"compression": compression}))
    entry = writer.commit(make_block(layout), unit_id="u0")
    columns = pq.ParquetFile(tmp_path / "c" / entry.path).metadata.row_group(0)
    encodings = {columns.column(i).path_in_schema.split(".")[0]: columns.column(i).encodings
                 for i in range(columns.num_columns)}
    assert {name for name in ("topk_ids", "topk_logprobs") if "BYTE_STREAM_SPLIT" in encodings[name]} == split
