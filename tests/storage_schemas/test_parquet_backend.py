"""How Parquet shards are opened: local shards through a memory map, other locations
through fsspec, and a broken file is a format error either way."""

import uuid

import pyarrow.parquet as pq
import pytest

from logitcache.errors import CacheFormatError
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.parquet_backend import ParquetBackend
from logitcache.storage_schemas.records import block_cuts
from logitcache.storage_schemas.storage_settings import StorageSettings
from tests.factories import make_block, make_layout

REL = "part-u0.parquet"
ROW_GROUP_TOKENS = 16


def write(location, block, layout, *, compression="zstd"):
    storage = StorageSettings(backend="parquet", row_group_tokens=ROW_GROUP_TOKENS, compression=compression)
    return ParquetBackend().write(location, REL, block, layout=layout, storage=storage,
                                  metadata={"config_fingerprint": "fp", "unit_id": "u0"})


def assert_blocks_read_back(location, block, layout, blocks):
    backend = ParquetBackend()
    cuts = block_cuts(block.token_offsets, ROW_GROUP_TOKENS)
    assert backend.num_blocks(location, REL) == blocks == len(cuts) - 1
    assert backend.read(location, REL, layout).equals(block)
    for index in range(blocks):
        assert backend.read_block(location, REL, layout, index).equals(block.take_records(cuts[index], cuts[index + 1]))


def test_local_shards_are_read_without_a_python_file_object(tmp_path, monkeypatch):
    layout = make_layout("token_topk_sampled", k=6, value_codec="q8")
    block = make_block(layout, records=20)
    location = CacheLocation(tmp_path)
    blocks = write(location, block, layout)

    def no_python_file(*args, **kwargs):
        raise AssertionError("a local shard was opened through a Python file object")

    monkeypatch.setattr(location, "open", no_python_file)
    assert_blocks_read_back(location, block, layout, blocks)


def test_a_block_outlives_its_shard_file(tmp_path):
    """What a read returns owns its memory: replacing the file (as ``--overwrite`` and a
    rebuilt unit do) or deleting it changes nothing in a block already read."""
    layout = make_layout(k=5, value_codec="float16")
    block = make_block(layout, records=9, seed=3)
    location = CacheLocation(tmp_path)
    write(location, block, layout)
    whole = ParquetBackend().read(location, REL, layout)
    first = ParquetBackend().read_block(location, REL, layout, 0)
    write(location, make_block(layout, records=9, seed=4), layout)  # renamed over the old file
    (tmp_path / REL).unlink()
    assert whole.equals(block)
    assert first.equals(block.take_records(0, len(first.record_id)))


def test_remote_shards_read_through_fsspec():
    location = CacheLocation(f"memory://parquet-test-{uuid.uuid4().hex}")
    assert not location.is_local
    layout = make_layout("token_topk", k=3, value_codec="q8")
    block = make_block(layout, records=11)
    try:
        assert_blocks_read_back(location, block, layout, write(location, block, layout))
    finally:
        location.remove("")


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing"])
def test_a_broken_local_file_is_a_format_error(tmp_path, damage):
    layout = make_layout()
    location = CacheLocation(tmp_path)
    write(location, make_block(layout, records=12), layout)
    path = tmp_path / REL
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2] if damage == "truncated" else b"")
    with pytest.raises(CacheFormatError, match=r"part-u0\.parquet"):
        ParquetBackend().read_block(location, REL, layout, 0)
    with pytest.raises(CacheFormatError, match=r"part-u0\.parquet"):
        ParquetBackend().num_blocks(location, REL)


@pytest.mark.parametrize(("compression", "codec"), [("zstd", "ZSTD"), ("lz4", "LZ4"), ("none", "UNCOMPRESSED")])
def test_every_column_takes_the_configured_compression(tmp_path, compression, codec):
    layout = make_layout("token_topk_sampled", k=4, value_codec="q8")
    block = make_block(layout, records=20)
    location = CacheLocation(tmp_path)
    blocks = write(location, block, layout, compression=compression)
    metadata = pq.ParquetFile(tmp_path / REL).metadata
    found = {metadata.row_group(g).column(c).compression
             for g in range(metadata.num_row_groups) for c in range(metadata.num_columns)}
    assert found == {codec}
    assert_blocks_read_back(location, block, layout, blocks)
