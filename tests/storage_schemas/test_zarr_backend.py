import json
import shutil
import uuid

import numpy as np
import pytest
import zarr
import zarr.storage

from logitcache.errors import CacheFormatError
from logitcache.storage_schemas.backends import get_backend
from logitcache.storage_schemas.layout import KINDS
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.mapped_store import MappedLocalStore
from logitcache.storage_schemas.records import RecordBlock, block_cuts
from logitcache.storage_schemas.storage_settings import StorageSettings
from logitcache.storage_schemas.value_codecs import value_codec_names
from logitcache.storage_schemas.zarr_backend import ZarrBackend, array_names
from tests.factories import make_block, make_layout

REL = "shards/part-u0.zarr"
METADATA = {"config_fingerprint": "fp-123", "unit_id": "u0"}


def storage(**kw) -> StorageSettings:
    return StorageSettings(**{"backend": "zarr", "row_group_tokens": 16, "chunk_tokens": 8, **kw})


def write(location, block, layout, cfg=None, rel=REL):
    return ZarrBackend().write(location, rel, block, layout=layout, storage=cfg or storage(), metadata=METADATA)


def assert_same_dtypes(got: RecordBlock, want: RecordBlock) -> None:
    for name in want.column_names():
        assert getattr(got, name).dtype == getattr(want, name).dtype, name


def test_registered_under_its_name():
    backend = get_backend("zarr")
    assert isinstance(backend, ZarrBackend)
    assert (backend.name, backend.extension) == ("zarr", ".zarr")


@pytest.mark.parametrize("codec", value_codec_names())
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_whole_and_per_block(tmp_path, kind, codec):
    layout = make_layout(kind, k=3, value_codec=codec)
    block = make_block(layout, records=17, max_len=9, seed=3)
    location = CacheLocation(tmp_path)
    backend = ZarrBackend()
    num_blocks = write(location, block, layout)
    cuts = block_cuts(block.token_offsets, 16)
    assert num_blocks == len(cuts) - 1 > 2
    assert backend.num_blocks(location, REL) == num_blocks
    assert backend.num_records(location, REL) == 17
    whole = backend.read(location, REL, layout)
    assert whole.equals(block)
    assert_same_dtypes(whole, block)
    for index in range(num_blocks):
        part = backend.read_block(location, REL, layout, index)
        assert part.equals(block.take_records(cuts[index], cuts[index + 1]))
        assert part.token_offsets[0] == 0
        if part.sample_offsets is not None:
            assert part.sample_offsets[0] == 0
    assert RecordBlock.concat(
        [backend.read_block(location, REL, layout, i) for i in range(num_blocks)]
    ).equals(block)


def test_metadata_round_trip(tmp_path):
    layout = make_layout("token_topk_sampled", k=2)
    location = CacheLocation(tmp_path)
    write(location, make_block(layout), layout)
    metadata = ZarrBackend().read_metadata(location, REL)
    assert json.loads(metadata.pop("layout")) == layout.to_dict()
    assert metadata == METADATA
    assert ZarrBackend().arrow_schema(location, REL) is None


@pytest.mark.parametrize("kind", KINDS)
def test_zero_record_block(tmp_path, kind):
    layout = make_layout(kind)
    block = make_block(layout, records=0)
    location = CacheLocation(tmp_path)
    backend = ZarrBackend()
    assert write(location, block, layout) == 1
    assert backend.num_blocks(location, REL) == 1
    assert backend.num_records(location, REL) == 0
    assert backend.read(location, REL, layout).equals(block)
    assert backend.read_block(location, REL, layout, 0).equals(block)


def test_zero_position_block(tmp_path):
    """Records that are all left context: tokens but no labelled positions."""
    layout = make_layout("token_topk_sampled", k=3)
    block = make_block(layout, records=4, max_len=5)
    block.context_length = np.diff(block.token_offsets).astype(np.uint32)
    block.topk_ids = block.topk_ids[:0]
    block.topk_logprobs = block.topk_logprobs[:0]
    block.entropy = block.entropy[:0]
    block.sample_offsets = np.zeros(1, dtype=np.int64)
    block.sample_ids, block.sample_counts = block.sample_ids[:0], block.sample_counts[:0]
    block.validate(layout)
    assert block.num_positions == 0 and block.num_tokens > 0
    location = CacheLocation(tmp_path)
    backend = ZarrBackend()
    num_blocks = write(location, block, layout, storage(row_group_tokens=4))
    assert backend.read(location, REL, layout).equals(block)
    for index in range(num_blocks):
        assert backend.read_block(location, REL, layout, index).num_positions == 0


def test_offsets_not_starting_at_zero_are_rebased(tmp_path):
    layout = make_layout("token_sampled")
    block = make_block(layout, records=6)
    block.token_offsets = block.token_offsets + 100
    block.sample_offsets = block.sample_offsets + 7
    location = CacheLocation(tmp_path)
    write(location, block, layout)
    back = ZarrBackend().read(location, REL, layout)
    assert back.equals(block)
    assert back.token_offsets[0] == 0 and back.sample_offsets[0] == 0


def test_wide_vocabulary_ids_round_trip(tmp_path):
    layout = make_layout("token_topk_sampled", k=2, vocab_size=1 << 20)
    assert layout.id_type == "uint32"
    block = make_block(layout, records=3)
    block.topk_ids[0] = [70_000, (1 << 20) - 1]
    position = int(np.flatnonzero(np.diff(block.sample_offsets) > 0)[0])
    block.sample_ids[block.sample_offsets[position + 1] - 1] = (1 << 20) - 1  # its largest id
    location = CacheLocation(tmp_path)
    write(location, block, layout)
    back = ZarrBackend().read(location, REL, layout)
    assert back.equals(block) and back.topk_ids.dtype == np.uint32


def test_memory_location_round_trip():
    url = f"memory://zarr-test-{uuid.uuid4().hex}"
    location = CacheLocation(url)
    assert not location.is_local
    layout = make_layout("token_topk_sampled", k=3, value_codec="q8")
    block = make_block(layout, records=9)
    backend = ZarrBackend()
    try:
        num_blocks = write(location, block, layout)
        assert location.isdir(REL)
        assert backend.read(location, REL, layout).equals(block)
        cuts = block_cuts(block.token_offsets, 16)
        for index in range(num_blocks):
            assert backend.read_block(location, REL, layout, index).equals(
                block.take_records(cuts[index], cuts[index + 1])
            )
        assert backend.read_metadata(location, REL)["unit_id"] == "u0"
        size, digest = location.digest(REL)
        assert size > 0 and len(digest) == 64
    finally:
        location.remove("")


@pytest.mark.parametrize("missing", ["topk_ids", "record_offsets", "block_offsets", "sample_counts"])
def test_shard_missing_an_array_is_a_format_error(tmp_path, missing):
    layout = make_layout("token_topk_sampled")
    location = CacheLocation(tmp_path)
    write(location, make_block(layout), layout)
    shutil.rmtree(tmp_path / REL / missing)
    backend = ZarrBackend()
    with pytest.raises(CacheFormatError, match=rf"part-u0\.zarr.*{missing}"):
        backend.read(location, REL, layout)
    with pytest.raises(CacheFormatError, match=r"part-u0\.zarr"):
        backend.read_block(location, REL, layout, 0)


def test_missing_or_foreign_or_broken_shard_is_a_format_error(tmp_path):
    layout = make_layout()
    location = CacheLocation(tmp_path)
    backend = ZarrBackend()
    with pytest.raises(CacheFormatError, match="nothing-here.zarr"):
        backend.read(location, "nothing-here.zarr", layout)
    with pytest.raises(CacheFormatError, match="nothing-here.zarr"):
        backend.num_blocks(location, "nothing-here.zarr")
    zarr.create_group(zarr.storage.LocalStore(str(tmp_path / "foreign.zarr")), attributes={"x": 1})
    with pytest.raises(CacheFormatError, match="not a logitcache Zarr shard"):
        backend.read_metadata(location, "foreign.zarr")
    write(location, make_block(layout), layout)
    (tmp_path / REL / "zarr.json").write_text("{not json")
    with pytest.raises(CacheFormatError, match=r"part-u0\.zarr"):
        backend.read(location, REL, layout)


def test_corrupt_chunk_bytes_are_a_format_error(tmp_path):
    layout = make_layout()
    location = CacheLocation(tmp_path)
    write(location, make_block(layout, records=20), layout, storage(chunk_tokens=1000))
    (shard,) = (p for p in (tmp_path / REL / "topk_ids" / "c").rglob("*") if p.is_file())
    data = bytearray(shard.read_bytes())
    data[:8] = b"\xff" * 8  # the first inner chunk's zstd frame header
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheFormatError, match=r"part-u0\.zarr"):
        ZarrBackend().read(location, REL, layout)


def test_block_index_out_of_range(tmp_path):
    layout = make_layout()
    location = CacheLocation(tmp_path)
    num_blocks = write(location, make_block(layout), layout)
    with pytest.raises(CacheFormatError, match=f"block {num_blocks}"):
        ZarrBackend().read_block(location, REL, layout, num_blocks)
    with pytest.raises(CacheFormatError, match="block -1"):
        ZarrBackend().read_block(location, REL, layout, -1)


def test_layout_mismatch_is_a_format_error(tmp_path):
    layout = make_layout("token_topk", k=4)
    location = CacheLocation(tmp_path)
    write(location, make_block(layout), layout)
    with pytest.raises(CacheFormatError, match="topk_ids"):
        ZarrBackend().read(location, REL, make_layout("token_topk", k=5))


def _array_meta(tmp_path, name: str) -> dict:
    return json.loads((tmp_path / REL / name / "zarr.json").read_text())


def test_arrays_are_sharded_with_inner_chunks(tmp_path):
    layout = make_layout("token_topk_sampled", k=3)
    block = make_block(layout, records=30, max_len=12)
    location = CacheLocation(tmp_path)
    write(location, block, layout, storage(chunk_tokens=8, compression_level=7))
    assert sorted(p.name for p in (tmp_path / REL).iterdir() if p.is_dir()) == sorted(array_names(layout))
    group_meta = json.loads((tmp_path / REL / "zarr.json").read_text())
    assert group_meta["zarr_format"] == 3 and group_meta["node_type"] == "group"
    assert group_meta["attributes"]["logitcache"]["layout"] == layout.to_dict()
    positions = block.num_positions
    for name, rows, width in [("topk_ids", positions, [3]), ("input_ids", block.num_tokens, []),
                              ("entropy", positions, []), ("record_id", 30, [])]:
        meta = _array_meta(tmp_path, name)
        assert meta["shape"] == [rows, *width]
        (codec,) = meta["codecs"]
        assert codec["name"] == "sharding_indexed"
        inner = codec["configuration"]["chunk_shape"]
        assert inner == [8, *width]
        shard_shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
        assert shard_shape == [-(-rows // 8) * 8, *width]  # the whole array in one shard
        inner_codecs = {c["name"]: c.get("configuration") for c in codec["configuration"]["codecs"]}
        blosc = inner_codecs["blosc"]  # multi-byte numbers: zstd behind a byte shuffle
        assert (blosc["cname"], blosc["clevel"], blosc["shuffle"]) == ("zstd", 7, "shuffle")
        assert len([p for p in (tmp_path / REL / name / "c").rglob("*") if p.is_file()]) == 1
    assert _array_meta(tmp_path, "topk_ids")["data_type"] == layout.id_type
    assert _array_meta(tmp_path, "doc_key")["data_type"] == "string"
    doc_codecs = _array_meta(tmp_path, "doc_key")["codecs"][0]["configuration"]["codecs"]
    assert {c["name"]: c.get("configuration") for c in doc_codecs}["zstd"]["level"] == 7


def test_lz4_compression(tmp_path):
    """lz4 through Blosc for every array, multi-byte numbers behind a byte shuffle."""
    layout = make_layout("token_topk_sampled", k=3, value_codec="q8")
    location = CacheLocation(tmp_path)
    block = make_block(layout, records=30)
    write(location, block, layout, storage(compression="lz4"))
    for name, shuffle in [("topk_ids", "shuffle"), ("topk_logprobs", "noshuffle"), ("record_id", "shuffle")]:
        codecs = _array_meta(tmp_path, name)["codecs"][0]["configuration"]["codecs"]
        blosc = {c["name"]: c.get("configuration") for c in codecs}["blosc"]
        assert (blosc["cname"], blosc["shuffle"]) == ("lz4", shuffle), name
    assert ZarrBackend().read(location, REL, layout).equals(block)


def test_no_compression(tmp_path):
    layout = make_layout()
    location = CacheLocation(tmp_path)
    block = make_block(layout)
    write(location, block, layout, storage(compression="none"))
    codecs = _array_meta(tmp_path, "topk_logprobs")["codecs"][0]["configuration"]["codecs"]
    assert [c["name"] for c in codecs] == ["bytes"]
    assert ZarrBackend().read(location, REL, layout).equals(block)


def test_same_block_gives_same_bytes(tmp_path):
    layout = make_layout("token_topk_sampled")
    block = make_block(layout, records=12)
    location = CacheLocation(tmp_path)
    write(location, block, layout, rel="a.zarr")
    write(location, block, layout, rel="b.zarr")
    other = make_layout("token_topk")
    write(location, make_block(other, records=3), other, rel="b.zarr")  # overwrite, then again
    assert not (tmp_path / "b.zarr" / "sample_ids").exists()
    write(location, block, layout, rel="b.zarr")
    assert location.digest("a.zarr") == location.digest("b.zarr")


def test_read_block_fetches_only_its_slices(tmp_path, monkeypatch):
    layout = make_layout("token_topk", k=8, value_codec="float32")
    block = make_block(layout, records=60, max_len=12)
    location = CacheLocation(tmp_path)
    num_blocks = write(location, block, layout, storage(row_group_tokens=40, chunk_tokens=8,
                                                        compression="none"))
    assert num_blocks >= 8
    fetched = []
    original = MappedLocalStore.get  # what reads a local shard

    async def counting_get(self, key, prototype=None, byte_range=None):
        buf = await original(self, key, prototype, byte_range)
        if "/c/" in key and buf is not None:  # chunk data, not metadata
            fetched.append(len(buf))
        return buf

    monkeypatch.setattr(MappedLocalStore, "get", counting_get)
    backend = ZarrBackend()
    backend.read(location, REL, layout)
    whole = sum(fetched)
    fetched.clear()
    backend.read_block(location, REL, layout, num_blocks // 2)
    assert sum(fetched) < whole / 3
