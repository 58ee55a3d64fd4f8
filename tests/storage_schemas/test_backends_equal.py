"""The Parquet and Zarr backends store the same records: what one reads back, the other does."""

import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.storage_schemas.backends import get_backend
from logitcache.storage_schemas.layout import KINDS
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.records import block_cuts
from logitcache.storage_schemas.storage_settings import StorageSettings
from logitcache.storage_schemas.value_codecs import value_codec_names
from tests.factories import make_block, make_layout

METADATA = {"config_fingerprint": "fp-abc", "unit_id": "u7"}


def write_both(location, block, layout, **storage):
    """Write ``block`` with both backends; return {backend name: (rel, blocks written)}."""
    out = {}
    for name in ("parquet", "zarr"):
        backend = get_backend(name)
        cfg = StorageSettings(backend=name, **storage)
        rel = f"part-u7{backend.extension}"
        out[name] = rel, backend.write(location, rel, block, layout=layout, storage=cfg, metadata=METADATA)
    return out


def assert_backends_equal(location, block, layout, written, row_group_tokens):
    parquet, zarr = get_backend("parquet"), get_backend("zarr")
    (p_rel, p_blocks), (z_rel, z_blocks) = written["parquet"], written["zarr"]
    cuts = block_cuts(block.token_offsets, row_group_tokens)
    assert p_blocks == z_blocks == len(cuts) - 1
    assert parquet.num_blocks(location, p_rel) == zarr.num_blocks(location, z_rel) == p_blocks
    assert parquet.num_records(location, p_rel) == zarr.num_records(location, z_rel) == block.num_records
    assert parquet.read_metadata(location, p_rel) == zarr.read_metadata(location, z_rel)
    from_parquet, from_zarr = parquet.read(location, p_rel, layout), zarr.read(location, z_rel, layout)
    assert from_parquet.equals(from_zarr) and from_zarr.equals(block) and from_parquet.equals(block)
    for name in block.column_names():
        if not name.endswith("offsets"):
            assert getattr(from_zarr, name).dtype == getattr(from_parquet, name).dtype, name
    for index in range(p_blocks):
        want = block.take_records(cuts[index], cuts[index + 1])
        got_p = parquet.read_block(location, p_rel, layout, index)
        got_z = zarr.read_block(location, z_rel, layout, index)
        assert got_p.equals(got_z) and got_z.equals(want)
        assert np.array_equal(got_p.token_offsets, got_z.token_offsets)


@pytest.mark.parametrize("codec", value_codec_names())
@pytest.mark.parametrize("kind", KINDS)
def test_backends_read_back_the_same_records(tmp_path, kind, codec):
    layout = make_layout(kind, k=5, value_codec=codec)
    block = make_block(layout, records=23, max_len=11, seed=11)
    location = CacheLocation(tmp_path)
    written = write_both(location, block, layout, row_group_tokens=25, chunk_tokens=6)
    assert written["zarr"][1] > 2
    assert_backends_equal(location, block, layout, written, 25)


@pytest.mark.parametrize("kind", KINDS)
def test_backends_agree_on_an_empty_block(tmp_path, kind):
    layout = make_layout(kind)
    block = make_block(layout, records=0)
    location = CacheLocation(tmp_path)
    written = write_both(location, block, layout, row_group_tokens=10)
    assert_backends_equal(location, block, layout, written, 10)


@st.composite
def layouts_and_blocks(draw):
    kind = draw(st.sampled_from(KINDS))
    layout = make_layout(
        kind,
        k=draw(st.integers(1, 6)),
        value_codec=draw(st.sampled_from(value_codec_names())),
        vocab_size=draw(st.sampled_from([7, 200, 300, 65_536, 65_537, 150_000])),
        samples=draw(st.integers(1, 5)),
        entropy=draw(st.booleans()),
        num_classes=draw(st.integers(2, 6)),
    )  # k <= 6 < the smallest vocabulary, so every layout is valid
    block = make_block(layout, records=draw(st.integers(0, 12)), max_len=draw(st.integers(1, 9)),
                       seed=draw(st.integers(0, 2**16)))
    storage = {
        "row_group_tokens": draw(st.integers(1, 40)),
        "chunk_tokens": draw(st.integers(1, 16)),
        "compression": draw(st.sampled_from(["zstd", "lz4", "none"])),
    }
    return layout, block, storage


@settings(max_examples=25, deadline=None)
@given(layouts_and_blocks())
def test_backends_equal_on_random_layouts(case):
    layout, block, storage = case
    with tempfile.TemporaryDirectory() as tmp:
        location = CacheLocation(tmp)
        written = write_both(location, block, layout, **storage)
        assert_backends_equal(location, block, layout, written, storage["row_group_tokens"])
