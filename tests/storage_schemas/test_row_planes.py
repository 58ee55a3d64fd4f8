import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from logitcache.storage_schemas.row_planes import (
    ascending_sum_,
    decode_id_rows,
    encode_id_rows,
    from_planes,
    gaps_of,
    running_sum_,
    to_planes,
)

dtypes = st.sampled_from([np.uint8, np.uint16, np.uint32, np.float16, np.float32])
matrices = st.tuples(dtypes, st.integers(0, 30), st.integers(1, 12)).flatmap(
    lambda t: arrays(t[0], (t[1], t[2])))


@settings(deadline=None)
@given(matrices)
def test_planes_round_trip_any_type(rows):
    data = to_planes(rows)
    assert data.dtype == np.uint8 and data.shape == (rows.shape[0], rows.dtype.itemsize * rows.shape[1])
    back = from_planes(data, rows.dtype, rows.shape[1])
    assert np.array_equal(back.view(np.uint8), np.ascontiguousarray(rows).view(np.uint8))  # NaN bits too


@settings(deadline=None)
@given(st.sampled_from([np.uint8, np.uint16, np.uint32]), st.integers(0, 20), st.integers(1, 70), st.booleans(),
       st.integers(0, 2**32 - 1))
def test_id_rows_round_trip(dtype, n, k, distinct, seed):
    # ascending rows (distinct ids, top-k) or non-decreasing ones (repeated draws), up to the
    # type's largest id, at widths that fill 64-bit words and widths that do not
    rng = np.random.default_rng(seed)
    top = int(np.iinfo(dtype).max)
    if distinct and k <= top + 1:
        ids = np.stack([np.sort(rng.choice(top + 1, k, replace=False)) for _ in range(n)]) if n else np.zeros((0, k))
    else:
        ids = np.sort(rng.integers(0, top, size=(n, k), endpoint=True), axis=1)
    ids = ids.astype(dtype)
    assert np.array_equal(decode_id_rows(encode_id_rows(ids), dtype, k), ids)


@settings(deadline=None)
@given(st.sampled_from([np.uint8, np.uint16, np.uint32]), st.integers(0, 20), st.integers(1, 70),
       st.integers(0, 2**32 - 1))
def test_running_sum_undoes_gaps_of_rows_in_any_order(dtype, n, k, seed):
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, np.iinfo(dtype).max, size=(n, k), endpoint=True).astype(dtype)
    assert np.array_equal(running_sum_(gaps_of(rows)), rows)


def test_ascending_sum_equals_the_wrapping_sum_across_words_and_chunks():
    rng = np.random.default_rng(3)
    ids = np.sort(np.stack([rng.choice(65_536, 64, replace=False) for _ in range(9000)]), axis=1).astype(np.uint16)
    gaps = gaps_of(ids)
    assert np.array_equal(ascending_sum_(gaps.copy()), running_sum_(gaps.copy()))
    assert np.array_equal(ascending_sum_(gaps.copy()), ids)


def test_planes_put_each_byte_of_a_row_together():
    rows = np.array([[0x0102, 0x0304]], dtype=np.uint16)
    assert to_planes(rows).tolist() == [[0x02, 0x04, 0x01, 0x03]]


def test_ascending_ids_become_small_gaps():
    ids = np.array([[5, 300, 301, 70_000]], dtype=np.uint32)
    gaps = from_planes(encode_id_rows(ids), np.uint32, 4)
    assert gaps.tolist() == [[5, 295, 1, 69_699]]


def test_running_sum_crosses_chunks():
    rows = np.random.default_rng(0).integers(0, 9, size=(10_000, 5)).astype(np.uint16)
    assert np.array_equal(running_sum_(rows.copy()), np.cumsum(rows, axis=1, dtype=np.uint16))


def test_read_only_bytes_decode_without_being_written():
    # shards are memory-mapped read-only: decoding must not write into their bytes
    for dtype in (np.uint8, np.uint16):
        ids = np.array([[1, 5, 9, 200], [0, 2, 3, 4]], dtype=dtype)
        data = encode_id_rows(ids).copy()
        data.flags.writeable = False
        before = data.copy()
        assert np.array_equal(decode_id_rows(data, dtype, 4), ids)
        assert np.array_equal(data, before)
        assert np.array_equal(from_planes(data, dtype, 4), gaps_of(ids))
