"""Format 4 Parquet shards, and the shards of formats 1 to 3 (and Zarr version 1) still read.

Older shards are made here the way those formats wrote them (``legacy_formats.legacy_table``:
rank order, q8 as level differences, their schemas), with the same file metadata minus the
``shard_format`` key that format 4 added.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from logitcache.errors import CacheFormatError
from logitcache.storage_schemas.layout import KINDS, RecordLayout
from logitcache.storage_schemas.legacy_formats import (
    LEGACY_MAJORS,
    legacy_table,
    legacy_table_to_block,
    to_format_3,
    to_format_4,
)
from logitcache.storage_schemas.manifest import FORMAT_VERSION, READABLE_MAJORS
from logitcache.storage_schemas.records import RecordBlock, block_to_table, table_to_block
from logitcache.storage_schemas.shard_reader import CacheReader
from logitcache.storage_schemas.shard_writer import ShardWriter
from logitcache.storage_schemas.verify import verify_cache
from tests.factories import make_block, make_layout, make_template

WIDE = frozenset({"topk_ids", "topk_logprobs"})  # format 3 kept these per position when split


def rewrite_in_format(cache: Path, layout: RecordLayout, blocks: list[RecordBlock], major: int) -> None:
    """Turn every shard of a Parquet cache into a shard of format ``major`` and mark the
    cache ``major``.0."""
    manifest = json.loads((cache / "manifest.json").read_text())
    for entry, block in zip(manifest["shards"], blocks, strict=True):
        path = cache / entry["path"]
        metadata = dict(pq.read_schema(path).metadata)
        del metadata[b"logitcache.shard_format"]
        table = legacy_table(block, layout, major)
        pq.write_table(table.replace_schema_metadata(metadata), path, row_group_size=max(block.num_records, 1))
        data = path.read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), blocks=1)
    manifest["format_version"] = f"{major}.0"
    (cache / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("codec", ["float32", "float16", "q8"])
@pytest.mark.parametrize(("major", "per_position"), [(1, frozenset()), (2, frozenset()), (3, frozenset()),
                                                     (3, WIDE)])
def test_an_older_table_reads_as_the_same_format_4_block(kind, codec, major, per_position):
    layout = make_layout(kind, value_codec=codec, vocab_size=70_000)
    block = make_block(layout, records=9)
    table = legacy_table(block, layout, major, per_position=per_position)
    assert legacy_table_to_block(table, layout).equals(block)


@pytest.mark.parametrize("codec", ["float16", "q8"])
def test_the_old_rank_order_is_descending_and_q8_old_values_are_differences(codec):
    layout = make_layout("token_topk", k=6, value_codec=codec)
    block = make_block(layout, records=5)
    old = to_format_3(block, layout)
    decoded = np.cumsum(old.topk_logprobs, axis=1, dtype=np.uint8) if codec == "q8" else old.topk_logprobs
    lp = decoded.astype(np.float32) * (-1 / 16 if codec == "q8" else 1)
    assert (np.diff(lp, axis=1) <= 0).all()
    assert to_format_4(old, layout).equals(block)


def test_format_4_rows_decode_without_logitcache(tmp_path):
    # the field metadata's promise: per record, rows of k values in byte planes; ids as gaps
    layout = make_layout("token_topk", k=5, value_codec="float16", vocab_size=50_000)
    block = make_block(layout, records=6)
    pq.write_table(block_to_table(block, layout), tmp_path / "s.parquet")
    table = pq.read_table(tmp_path / "s.parquet")
    per_record = table.column("topk_ids").to_pylist()
    assert [len(v) for v in per_record] == (np.diff(block.label_offsets) * 5 * 2).tolist()
    planes = np.frombuffer(b"".join(per_record), np.uint8).reshape(-1, 2, 5).astype(np.uint16)
    ids = np.cumsum(planes[:, 0] | planes[:, 1] << 8, axis=1, dtype=np.uint16)
    np.testing.assert_array_equal(ids, block.topk_ids)
    raw = np.frombuffer(b"".join(table.column("topk_logprobs").to_pylist()), np.uint8).reshape(-1, 2, 5)
    values = np.ascontiguousarray(raw.transpose(0, 2, 1)).view("<f2")[..., 0]
    np.testing.assert_array_equal(values, block.topk_logprobs)


def test_top_k_rows_of_another_width_are_a_format_error():
    layout = make_layout("token_topk", k=4)
    block = make_block(layout)
    wider = make_layout("token_topk", k=5)
    with pytest.raises(CacheFormatError, match="top-k rows of 8 bytes, but the layout says 5 x uint16"):
        legacy_table_to_block(legacy_table(block, layout, 2), wider)
    positions = int(np.diff(block.label_offsets)[0])
    with pytest.raises(CacheFormatError, match=f"topk_ids of record 0 holds {positions * 8} bytes, but its "
                                                f"{positions} rows need {positions * 10}"):
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


def test_an_older_table_read_as_format_4_is_a_format_error():
    layout = make_layout("token_topk", vocab_size=70_000)
    table = legacy_table(make_block(layout), layout, 2)
    with pytest.raises(CacheFormatError, match="format 4 stores large_binary: the shard is of an older format"):
        table_to_block(table, layout)


def _build(root: Path, layout: RecordLayout, units: int) -> list[RecordBlock]:
    writer = ShardWriter(str(root), template=make_template(layout))
    blocks = [make_block(layout, records=5, seed=i, first_record=10 * i) for i in range(units)]
    for i, block in enumerate(blocks):
        writer.commit(block, unit_id=f"u{i:05d}")
    return blocks


@pytest.mark.parametrize("major", LEGACY_MAJORS)
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


@pytest.mark.parametrize("major", LEGACY_MAJORS)
def test_adding_to_an_older_format_cache_writes_format_4_and_marks_the_cache(tmp_path, major):
    layout = make_layout("token_topk", value_codec="q8")
    blocks = _build(tmp_path / "c", layout, units=2)
    rewrite_in_format(tmp_path / "c", layout, blocks, major)
    writer = ShardWriter(str(tmp_path / "c"), template=make_template(layout))
    assert writer.committed_units == {"u00000", "u00001"}
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["format_version"] == f"{major}.0"
    added = make_block(layout, records=4, seed=9, first_record=90)
    writer.commit(added, unit_id="u00002")
    reader = CacheReader(str(tmp_path / "c"))
    assert reader.manifest.format_version == FORMAT_VERSION == "4.0"
    formats = [(pq.read_schema(tmp_path / "c" / e.path).metadata or {}).get(b"logitcache.shard_format")
               for e in reader.shards]
    assert formats == [None, None, b"4"]
    for entry, block in zip(reader.shards, [*blocks, added], strict=True):
        assert reader.read_shard(entry, verify=True).equals(block)
    assert verify_cache(str(tmp_path / "c"), deep=True).ok


def test_a_shard_of_no_format_is_a_schema_problem(tmp_path):
    layout = make_layout("token_topk", value_codec="q8")
    blocks = _build(tmp_path / "c", layout, units=1)
    path = tmp_path / "c" / CacheReader(str(tmp_path / "c")).shards[0].path
    metadata = pq.read_schema(path).metadata
    table = block_to_table(blocks[0], layout)
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


@pytest.mark.parametrize("codec", ["float16", "q8"])
def test_a_zarr_version_1_shard_is_read_in_id_order(tmp_path, codec):
    layout = make_layout("token_topk_sampled", value_codec=codec)
    writer = ShardWriter(str(tmp_path / "c"), template=make_template(layout, backend="zarr"))
    block = make_block(layout, records=6)
    entry = writer.commit(block, unit_id="u0")
    old = to_format_3(block, layout)
    group = zarr.open_group(str(tmp_path / "c" / entry.path), mode="r+")
    group["topk_ids"][...] = old.topk_ids
    group["topk_logprobs"][...] = old.topk_logprobs
    attrs = dict(group.attrs["logitcache"])
    group.attrs["logitcache"] = {**attrs, "format_version": 1}
    back = CacheReader(str(tmp_path / "c")).read_shard(entry)
    assert back.equals(block)


@pytest.mark.parametrize("vocab_size", [1_000, 70_000])
@pytest.mark.parametrize("compression", ["zstd", "lz4", "none"])
def test_no_soft_label_column_is_split_by_parquet(tmp_path, vocab_size, compression):
    # the planes are the column's own; Parquet's byte stream split is for nothing a
    # FIXED_LEN_BYTE_ARRAY reader might not know
    layout = make_layout("token_topk_sampled", value_codec="float32", vocab_size=vocab_size, target_logprob=True)
    writer = ShardWriter(str(tmp_path / "c"), template=make_template(layout, storage={"compression": compression}))
    entry = writer.commit(make_block(layout), unit_id="u0")
    columns = pq.ParquetFile(tmp_path / "c" / entry.path).metadata.row_group(0)
    split = [columns.column(i).path_in_schema for i in range(columns.num_columns)
             if "BYTE_STREAM_SPLIT" in columns.column(i).encodings]
    assert split == []
    assert CacheReader(str(tmp_path / "c")).read_shard(entry, verify=True).equals(make_block(layout))
    assert verify_cache(str(tmp_path / "c"), deep=True).ok
