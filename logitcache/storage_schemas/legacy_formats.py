"""Shards of formats 1 to 3 (Parquet) and Zarr shard version 1: read, and turned into format 4.

Caches built before format 4 stored each position's top-k in *rank order* (descending
log-probability), q8 values as differences between neighbouring levels, and sampled draws
as ``list<list<id>>`` unique ids with a ``sample_counts`` column. Their Parquet top-k columns
took three forms:

- format 1: ``list<fixed_size_list<type, k>>`` with nullable items;
- format 2: ``list<fixed_size_binary[k x element bytes]>``, one binary per position;
- format 3: one ``large_binary`` per record (its rows back to back), except a compressed
  column of 4-byte elements, which kept format 2's form.

Reading them costs a sort of every row by id, so training from an old cache is slower than
from a format 4 one, and ``logitcache repack OLD NEW`` rewrites it in format 4. The schemas
and tables of those formats are kept here (:func:`legacy_arrow_schema`,
:func:`legacy_table`) because ``verify`` checks old shards against them and the tests make
old shards with them.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa

from logitcache.errors import CacheFormatError
from logitcache.storage_schemas.layout import (
    SAMPLE_COUNT_TYPE,
    RecordLayout,
    base_fields,
    per_position_fields,
)
from logitcache.storage_schemas.records import (
    RecordBlock,
    base_columns,
    flat,
    list_array,
    per_position_columns,
    read_base_columns,
    read_per_position_columns,
    record_rows,
    record_rows_view,
    to_numpy,
    whole,
)
from logitcache.storage_schemas.row_planes import little_endian, running_sum_

#: Parquet majors whose shards this module reads.
LEGACY_MAJORS = (1, 2, 3)


# ---------------------------------------------------------------- row order and q8


def sort_topk_by_id(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[P, k]`` ids and their values, each row re-ordered by ascending id."""
    order = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(values, order, axis=1)


def to_format_4(block: RecordBlock, layout: RecordLayout) -> RecordBlock:
    """A block read from an older shard (rank order, q8 as level differences) in format 4's
    terms: top-k rows in ascending id order, q8 values as levels. Samples were already
    ascending unique ids with counts."""
    if not layout.has_topk or block.topk_ids is None:
        return block
    values = block.topk_logprobs
    if layout.value_codec == "q8":
        values = running_sum_(np.array(values, dtype=np.uint8, order="C"))
    ids, values = sort_topk_by_id(block.topk_ids, values)
    return replace(block, topk_ids=ids, topk_logprobs=values)


def to_format_3(block: RecordBlock, layout: RecordLayout) -> RecordBlock:
    """Inverse of :func:`to_format_4`: rows by descending log-probability (ties by id), q8
    as differences of levels modulo 256. Tests make old shards with it."""
    if not layout.has_topk or block.topk_ids is None:
        return block
    values = np.asarray(block.topk_logprobs)
    key = values.astype(np.int64) if layout.value_codec == "q8" else -values.astype(np.float64)
    order = np.argsort(key, axis=1, kind="stable")
    ids, values = np.take_along_axis(block.topk_ids, order, 1), np.take_along_axis(values, order, 1)
    if layout.value_codec == "q8":
        deltas = values.copy()
        np.subtract(values[:, 1:], values[:, :-1], out=deltas[:, 1:])
        values = deltas
    return replace(block, topk_ids=ids, topk_logprobs=values)


# ---------------------------------------------------------------- old schemas


def legacy_arrow_schema(layout: RecordLayout, major: int, *, per_position: frozenset[str] = frozenset()) -> pa.Schema:
    """The Arrow schema of a format ``major`` shard; in format 3 the top-k columns named in
    ``per_position`` hold one binary per position (format 2's form)."""
    if major not in LEGACY_MAJORS:
        raise ValueError(f"no legacy format {major}")
    format_1 = major == 1

    def listed(item: pa.DataType) -> pa.DataType:
        return pa.list_(item) if format_1 else pa.list_(pa.field("element", item, nullable=False))

    id_t = pa.from_numpy_dtype(layout.id_type)
    fields = base_fields(layout, nullable_items=format_1)
    if layout.has_topk:
        for name, dtype in layout.topk_dtypes.items():
            if format_1:
                column_t = listed(pa.list_(pa.from_numpy_dtype(dtype), layout.k))
            elif major == 2 or name in per_position:
                column_t = listed(pa.binary(layout.k * dtype.itemsize))
            else:
                column_t = pa.large_binary()
            fields.append(pa.field(name, column_t, nullable=False))
    if layout.has_samples:
        count_t = pa.from_numpy_dtype(SAMPLE_COUNT_TYPE)
        fields += [
            pa.field("sample_ids", listed(listed(id_t)), nullable=False),
            pa.field("sample_counts", listed(listed(count_t)), nullable=False),
        ]
    return pa.schema(fields + per_position_fields(layout, nullable_items=format_1))


def legacy_table(block: RecordBlock, layout: RecordLayout, major: int, *,
                 per_position: frozenset[str] = frozenset()) -> pa.Table:
    """A format 4 ``block`` as a format ``major`` shard held it (rank order, q8 differences)."""
    old = to_format_3(block, layout)
    schema = legacy_arrow_schema(layout, major, per_position=per_position)
    types = {f.name: f.type for f in schema}
    lab = old.label_offsets
    columns = base_columns(old, layout, types)
    if layout.has_topk:
        for name in layout.topk_dtypes:
            rows = getattr(old, name)
            column_t = types[name]
            if pa.types.is_large_binary(column_t):
                columns[name] = record_rows(rows.view(np.uint8).reshape(len(rows), -1)
                                            if rows.size else np.zeros((0, 1), np.uint8), lab)
            elif pa.types.is_fixed_size_binary(column_t.value_type):
                le = np.ascontiguousarray(rows, dtype=little_endian(rows.dtype))
                binary = pa.Array.from_buffers(column_t.value_type, len(le), [None, pa.py_buffer(le)])
                columns[name] = list_array(lab, binary, column_t)
            else:
                values = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), layout.k)
                columns[name] = list_array(lab, values, column_t)
    if layout.has_samples:
        s_off = old.sample_offsets - old.sample_offsets[0]
        id_t = pa.from_numpy_dtype(layout.id_type)
        counts_t = pa.from_numpy_dtype(SAMPLE_COUNT_TYPE)
        for name, values in (("sample_ids", pa.array(old.sample_ids, id_t)),
                             ("sample_counts", pa.array(old.sample_counts, counts_t))):
            inner = list_array(s_off, values, types[name].value_type)
            columns[name] = list_array(lab, inner, types[name])
    columns.update(per_position_columns(old, layout, types))
    return pa.Table.from_arrays([columns[f.name].cast(f.type) for f in schema], schema=schema)


# ---------------------------------------------------------------- reading


def legacy_table_to_block(table: pa.Table, layout: RecordLayout) -> RecordBlock:
    """The format 4 block of a table read from a format 1, 2 or 3 shard."""
    expected = legacy_arrow_schema(layout, 3)
    missing = [n for n in expected.names if n not in table.column_names]
    if missing:
        raise CacheFormatError(f"shard lacks column(s) {', '.join(missing)} required by its layout")
    block = read_base_columns(table, layout)
    if layout.has_topk:
        label_offsets = block.label_offsets
        for name, dtype in layout.topk_dtypes.items():
            setattr(block, name, _topk_rows(table.column(name), name, dtype, layout.k, label_offsets))
    if layout.has_samples:
        _, per_pos = flat(table.column("sample_ids"))
        s_off, sids = flat(per_pos)
        _, per_pos_c = flat(table.column("sample_counts"))
        _, counts = flat(per_pos_c)
        block.sample_offsets, block.sample_ids, block.sample_counts = s_off, to_numpy(sids), to_numpy(counts)
    read_per_position_columns(table, layout, block)
    return to_format_4(block, layout)


def _topk_rows(column, name: str, dtype: np.dtype | str, k: int, label_offsets: np.ndarray) -> np.ndarray:
    """An old top-k column as a ``[P, k]`` array: one binary per record (format 3), one
    fixed-size binary per position (format 2, and format 3's split columns), or
    ``fixed_size_list`` rows (format 1)."""
    dtype = little_endian(dtype)
    row_bytes = k * dtype.itemsize
    arr = whole(column)
    if pa.types.is_large_binary(arr.type):
        return record_rows_view(arr, name, row_bytes, label_offsets).view(dtype).reshape(-1, k)
    _, rows = flat(arr)
    if not pa.types.is_fixed_size_binary(rows.type):
        return to_numpy(rows.flatten()).reshape(-1, k)
    if rows.type.byte_width != row_bytes:
        raise CacheFormatError(
            f"top-k rows of {rows.type.byte_width} bytes, but the layout says {k} x {dtype.name} "
            f"({row_bytes} bytes)"
        )
    if len(rows) == 0:
        return np.empty((0, k), dtype=dtype)
    data = rows.buffers()[1]
    start, size = rows.offset * rows.type.byte_width, len(rows) * rows.type.byte_width
    if data is None or data.size < start + size:
        raise CacheFormatError(f"top-k column holds fewer bytes than its {len(rows)} rows need")
    return np.frombuffer(data, dtype=dtype, count=len(rows) * k, offset=start).reshape(-1, k)

