"""Format 3 Parquet shards (top-k as one binary value per record, or per position where
Parquet splits them into byte streams) and the shards of formats 1 and 2 that are still read.

Older shards are made here the way those formats wrote them: the same file metadata, with
the top-k columns as ``list<fixed_size_list<type, k>>`` and nullable list items (format 1),
or as one fixed-size binary per position (format 2).
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


def format_2_table(block: RecordBlock, layout: RecordLayout) -> pa.Table:
    """``block`` as a format 2 Parquet shard held it: every top-k column a row per position."""
    return block_to_table(block, layout, position_rows=layout.topk_dtypes)


def rewrite_in_format(cache: Path, layout: RecordLayout, blocks: list[RecordBlock], major: int) -> None:
    """Turn every shard of a Parquet cache into a shard of format ``major`` (1 or 2) and mark
    the cache ``major``.0."""
    manifest = json.loads((cache / "manifest.json").read_text())
    for entry, block in zip(manifest["shards"], blocks, strict=True):
        path = cache / entry["path"]
        metadata = pq.read_schema(path).metadata
        table = (format_1_table if major == 1 else format_2_table)(block, layout)
        pq.write_table(table.replace_schema_metadata(metadata), path, row_group_size=max(block.num_records, 1))
        data = path.read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), blocks=1)
    manifest["format_version"] = f"{major}.0"
    (cache / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("codec", ["float32", "float16", "q8"])
def test_a_format_1_table_reads_as_the_same_block(kind, codec):
    layout = make_layout(kind, value_codec=codec, vocab_size=70_000)  # uint32 ids
    block = make_block(layout, records=9)
    assert table_to_block(format_1_table(block, layout), layout).equals(block)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("codec", ["float32", "float16", "q8"])
def test_a_format_2_table_reads_as_the_same_block(kind, codec):
    layout = make_layout(kind, value_codec=codec, vocab_size=70_000)
    block = make_block(layout, records=9)
    table = format_2_table(block, layout)
    if layout.has_topk:
        assert pa.types.is_fixed_size_binary(table.schema.field("topk_ids").type.value_type)
    assert table_to_block(table, layout).equals(block)


def test_top_k_rows_decode_without_logitcache(tmp_path):
    # the field metadata's promise: k little-endian values of the id (or storage) type per
    # row, one value per record (its positions' rows) or one per position
    layout = make_layout("token_topk", k=5, value_codec="float16", vocab_size=50_000)
    block = make_block(layout, records=6)
    pq.write_table(block_to_table(block, layout, position_rows={"topk_logprobs"}), tmp_path / "s.parquet")
    table = pq.read_table(tmp_path / "s.parquet")
    field = table.schema.field("topk_ids")
    assert field.metadata[b"logitcache.row"] == b"5 x little-endian uint16"
    assert field.metadata[b"logitcache.value"] == b"the record's rows, one per labelled position"
    per_record = table.column("topk_ids").to_pylist()
    assert [len(v) for v in per_record] == (np.diff(block.label_offsets) * 5 * 2).tolist()
    ids = np.frombuffer(b"".join(per_record), dtype="<u2").reshape(-1, 5)
    np.testing.assert_array_equal(ids, block.topk_ids)
    values_field = table.schema.field("topk_logprobs")
    assert values_field.metadata[b"logitcache.value"] == b"one row per labelled position"
    values = table.column("topk_logprobs").combine_chunks().flatten()
    stored = np.frombuffer(b"".join(values.to_pylist()), dtype="<f2").reshape(-1, 5)
    np.testing.assert_array_equal(stored, block.topk_logprobs)


def test_top_k_rows_of_another_width_are_a_format_error():
    layout = make_layout("token_topk", k=4)
    block = make_block(layout)
    wider = make_layout("token_topk", k=5)
    with pytest.raises(CacheFormatError, match="top-k rows of 8 bytes, but the layout says 5 x uint16"):
        table_to_block(format_2_table(block, layout), wider)
    positions = int(np.diff(block.label_offsets)[0])
    with pytest.raises(CacheFormatError, match=f"topk_ids of record 0 holds {positions * 8} bytes, but its "
                                                f"{positions} labelled positions need {positions * 10}"):
        table_to_block(block_to_table(block, layout), wider)


def test_a_record_value_of_the_wrong_length_is_a_format_error():
    layout = make_layout("token_topk", k=4, value_codec="q8")
    block = make_block(layout, records=5)
    table = block_to_table(block, layout)
    values = table.column("topk_logprobs").to_pylist()
    values[3] = values[3][:-1]  # one byte short: a shard damaged or written by another tool
    table = table.set_column(table.schema.get_field_index("topk_logprobs"), table.schema.field("topk_logprobs"),
                             pa.array(values, pa.large_binary()))
    with pytest.raises(CacheFormatError, match="topk_logprobs of record 3 holds"):
        table_to_block(table, layout)


def _build(root: Path, layout: RecordLayout, units: int) -> list[RecordBlock]:
    writer = ShardWriter(str(root), template=make_template(layout))
    blocks = [make_block(layout, records=5, seed=i, first_record=10 * i) for i in range(units)]
    for i, block in enumerate(blocks):
        writer.commit(block, unit_id=f"u{i:05d}")
    return blocks


@pytest.mark.parametrize("major", [1, 2])
@pytest.mark.parametrize("kind", ["token_topk", "token_topk_sampled"])
def test_an_older_format_cache_is_read_and_verified(tmp_path, kind, major):
    layout = make_layout(kind, value_codec="q8")
    blocks = _build(tmp_path / "c", layout, units=2)
    rewrite_in_format(tmp_path / "c", layout, blocks, major)
    reader = CacheReader(str(tmp_path / "c"))
    assert reader.manifest.format_version == f"{major}.0"
    for entry, block in zip(reader.shards, blocks, strict=True):
        assert reader.read_block(entry, 0).equals(block)
    report = verify_cache(str(tmp_path / "c"), deep=True)
    assert report.ok, report.to_text()


@pytest.mark.parametrize("major", [1, 2])
def test_adding_to_an_older_format_cache_writes_format_3_and_marks_the_cache(tmp_path, major):
    layout = make_layout("token_topk", value_codec="q8")
    blocks = _build(tmp_path / "c", layout, units=2)
    rewrite_in_format(tmp_path / "c", layout, blocks, major)
    writer = ShardWriter(str(tmp_path / "c"), template=make_template(layout))
    assert writer.committed_units == {"u00000", "u00001"}
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["format_version"] == f"{major}.0"
    added = make_block(layout, records=4, seed=9, first_record=90)
    writer.commit(added, unit_id="u00002")
    reader = CacheReader(str(tmp_path / "c"))
    assert reader.manifest.format_version == FORMAT_VERSION == "3.0"
    schemas = [pq.read_schema(tmp_path / "c" / e.path).field("topk_ids").type for e in reader.shards]
    assert [pa.types.is_large_binary(t) for t in schemas] == [False, False, True]
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
    # a split column keeps a row per position (byte streams need fixed-size values); the
    # others hold one value per record
    schema = pq.read_schema(tmp_path / "c" / entry.path)
    assert {name for name in ("topk_ids", "topk_logprobs") if pa.types.is_list(schema.field(name).type)} == split
    assert {name for name in ("topk_ids", "topk_logprobs")
            if pa.types.is_large_binary(schema.field(name).type)} == {"topk_ids", "topk_logprobs"} - split
    assert CacheReader(str(tmp_path / "c")).read_shard(entry, verify=True).equals(make_block(layout))
    assert verify_cache(str(tmp_path / "c"), deep=True).ok
