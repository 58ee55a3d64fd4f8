"""MappedLocalStore returns what zarr's LocalStore returns, as views of memory maps."""

import asyncio

import numpy as np
import pytest
import zarr.storage
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype

from logitcache.storage_schemas.mapped_store import MappedLocalStore


def get(store, key, byte_range=None):
    buffer = asyncio.run(store.get(key, default_buffer_prototype(), byte_range))
    return None if buffer is None else buffer.to_bytes()


byte_ranges = st.one_of(
    st.none(),
    st.tuples(st.integers(0, 80), st.integers(0, 80)).map(lambda r: RangeByteRequest(min(r), max(r))),
    st.integers(0, 80).map(OffsetByteRequest),
    st.integers(0, 80).map(SuffixByteRequest),
)


@settings(max_examples=60, deadline=None)
@given(content=st.binary(max_size=64), byte_range=byte_ranges)
def test_same_bytes_as_local_store(tmp_path_factory, content, byte_range):
    root = tmp_path_factory.mktemp("store")
    (root / "c").mkdir()
    (root / "c" / "0").write_bytes(content)
    want = get(zarr.storage.LocalStore(root, read_only=True), "c/0", byte_range)
    assert get(MappedLocalStore(root), "c/0", byte_range) == want


def test_missing_keys_and_directories_are_absent(tmp_path):
    (tmp_path / "c").mkdir()
    store = MappedLocalStore(tmp_path)
    assert get(store, "nothing") is None
    assert get(store, "c") is None
    assert get(store, "nothing/deeper") is None


def test_partial_values(tmp_path):
    (tmp_path / "a").write_bytes(b"0123456789")
    store = MappedLocalStore(tmp_path)
    got = asyncio.run(store.get_partial_values(
        default_buffer_prototype(), [("a", RangeByteRequest(2, 5)), ("b", None), ("a", SuffixByteRequest(3))]))
    assert [None if b is None else b.to_bytes() for b in got] == [b"234", None, b"789"]


def test_views_are_read_only_and_outlive_the_file(tmp_path):
    data = np.arange(4096, dtype=np.uint32).tobytes()
    (tmp_path / "a").write_bytes(data)
    buffer = asyncio.run(MappedLocalStore(tmp_path).get("a", default_buffer_prototype(), RangeByteRequest(8, 4008)))
    array = buffer.as_numpy_array()
    assert not array.flags.writeable
    (tmp_path / "a").unlink()
    assert array.tobytes() == data[8:4008]


def test_refuses_to_be_writable(tmp_path):
    with pytest.raises(ValueError, match="only reads"):
        MappedLocalStore(tmp_path, read_only=False)
    assert MappedLocalStore(tmp_path).read_only
