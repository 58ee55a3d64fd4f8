"""RecordBlock: a batch of cache records as flat numpy arrays, and its Arrow form.

Both backends write a RecordBlock and read one back; stage one produces them and stage
two consumes them. Token-level columns are flat and token-major, with offsets, so that a
whole shard or row group is handled by a few vectorised numpy calls and never by a
Python loop over tokens:

- ``token_offsets[R+1]``: record r's tokens are ``input_ids[token_offsets[r]:token_offsets[r+1]]``;
- ``label_offsets[R+1]``: record r's labelled positions (its tokens after ``context_length``)
  are rows ``label_offsets[r]:label_offsets[r+1]`` of ``topk_ids`` / ``topk_logprobs`` /
  ``entropy`` / ``target_logprob`` (shape ``[P, k]`` / ``[P]``);
- ``sample_offsets[P+1]``: position p's draws are ``sample_ids[sample_offsets[p]:sample_offsets[p+1]]``.

``topk_logprobs`` and ``class_logprobs`` hold the *stored* values (codec output); use
:meth:`RecordBlock.decoded_topk_logprobs` for float32.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, fields, replace

import numpy as np
import pyarrow as pa

from logitcache.errors import CacheFormatError
from logitcache.storage_schemas.layout import SAMPLE_COUNT_TYPE, RecordLayout
from logitcache.storage_schemas.value_codecs import get_value_codec


@dataclass(kw_only=True, eq=False)
class RecordBlock:
    record_id: np.ndarray  # uint64 [R]
    doc_key: np.ndarray  # object (str) [R]
    lang: np.ndarray  # object (str) [R]
    token_offsets: np.ndarray  # int64 [R+1]
    input_ids: np.ndarray  # uint32 [T]
    context_length: np.ndarray | None = None  # uint32 [R] (token-level kinds)
    topk_ids: np.ndarray | None = None  # id type [P, k]
    topk_logprobs: np.ndarray | None = None  # codec storage type [P, k]
    sample_offsets: np.ndarray | None = None  # int64 [P+1]
    sample_ids: np.ndarray | None = None  # id type [S]
    sample_counts: np.ndarray | None = None  # uint16 [S]
    entropy: np.ndarray | None = None  # float16 [P]
    target_logprob: np.ndarray | None = None  # float16 [P], NaN at each record's last token
    class_logprobs: np.ndarray | None = None  # codec storage type [R, C]
    label: np.ndarray | None = None  # int32 [R], -1 = none

    @property
    def num_records(self) -> int:
        return len(self.record_id)

    @property
    def num_tokens(self) -> int:
        return int(self.token_offsets[-1] - self.token_offsets[0])

    @property
    def label_offsets(self) -> np.ndarray:
        """Offsets of each record's labelled positions in the position-major columns."""
        lengths = np.diff(self.token_offsets)
        if self.context_length is not None:
            lengths = lengths - self.context_length.astype(np.int64)
        out = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=out[1:])
        return out

    @property
    def num_positions(self) -> int:
        return int(self.label_offsets[-1])

    def decoded_topk_logprobs(self, layout: RecordLayout) -> np.ndarray:
        return get_value_codec(layout.value_codec).decode(self.topk_logprobs)

    def decoded_class_logprobs(self, layout: RecordLayout) -> np.ndarray:
        return get_value_codec(layout.value_codec).decode(self.class_logprobs)

    def lang_counts(self) -> dict[str, dict[str, int]]:
        """Per language: records and tokens."""
        out: dict[str, dict[str, int]] = {}
        tokens = np.diff(self.token_offsets)
        langs, inverse = np.unique(self.lang.astype(str), return_inverse=True)
        for i, lang in enumerate(langs.tolist()):
            mask = inverse == i
            out[lang] = {"records": int(mask.sum()), "tokens": int(tokens[mask].sum())}
        return out

    def column_names(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def equals(self, other: RecordBlock) -> bool:
        """Column-wise equality (offsets compared after rebasing to zero; NaN equals NaN)."""
        if self.column_names() != other.column_names():
            return False
        for name in self.column_names():
            a, b = getattr(self, name), getattr(other, name)
            if name.endswith("offsets"):
                a, b = a - a[0], b - b[0]
            if a.shape != b.shape or not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                return False
        return True

    @staticmethod
    def concat(blocks: list[RecordBlock]) -> RecordBlock:
        """Join blocks of one layout into one (offsets are re-based)."""
        if not blocks:
            raise ValueError("nothing to concatenate")
        out = {}
        for f in fields(RecordBlock):
            parts = [getattr(b, f.name) for b in blocks]
            if parts[0] is None:
                out[f.name] = None
            elif f.name.endswith("offsets"):
                out[f.name] = _concat_offsets(parts)
            else:
                out[f.name] = np.concatenate(parts)
        return RecordBlock(**out)

    def take_records(self, start: int, stop: int) -> RecordBlock:
        """Records ``start:stop`` as a new block (copies the slices)."""
        base = self.token_offsets[0]  # offsets need not start at zero
        t0, t1 = self.token_offsets[start] - base, self.token_offsets[stop] - base
        lab = self.label_offsets
        p0, p1 = lab[start], lab[stop]
        out = replace(
            self,
            record_id=self.record_id[start:stop], doc_key=self.doc_key[start:stop],
            lang=self.lang[start:stop], token_offsets=self.token_offsets[start:stop + 1] - (t0 + base),
            input_ids=self.input_ids[t0:t1],
        )
        if self.context_length is not None:
            out.context_length = self.context_length[start:stop]
        if self.topk_ids is not None:
            out.topk_ids = self.topk_ids[p0:p1]
            out.topk_logprobs = self.topk_logprobs[p0:p1]
        if self.entropy is not None:
            out.entropy = self.entropy[p0:p1]
        if self.target_logprob is not None:
            out.target_logprob = self.target_logprob[p0:p1]
        if self.sample_offsets is not None:
            s_base = self.sample_offsets[0]
            s0, s1 = self.sample_offsets[p0] - s_base, self.sample_offsets[p1] - s_base
            out.sample_offsets = self.sample_offsets[p0:p1 + 1] - (s0 + s_base)
            out.sample_ids = self.sample_ids[s0:s1]
            out.sample_counts = self.sample_counts[s0:s1]
        if self.class_logprobs is not None:
            out.class_logprobs = self.class_logprobs[start:stop]
            out.label = self.label[start:stop]
        return out

    def validate(self, layout: RecordLayout) -> None:
        """Check shapes and types against ``layout``; raise CacheFormatError naming the column."""
        r = self.num_records
        _expect(self.token_offsets.shape == (r + 1,), "token_offsets", f"shape ({r + 1},)")
        _expect(self.input_ids.shape == (self.num_tokens,), "input_ids", f"{self.num_tokens} tokens")
        for name in ("doc_key", "lang"):
            _expect(getattr(self, name).shape == (r,), name, f"{r} values")
        if layout.is_token_level:
            _expect(self.context_length is not None, "context_length", "a value per record")
            _expect(bool((self.context_length <= np.diff(self.token_offsets)).all()),
                    "context_length", "at most the record's length")
        p = self.num_positions
        if layout.has_topk:
            for name in ("topk_ids", "topk_logprobs"):
                arr = getattr(self, name)
                _expect(arr is not None and arr.shape == (p, layout.k), name, f"shape ({p}, {layout.k})")
            _expect(self.topk_ids.dtype == np.dtype(layout.id_type), "topk_ids", layout.id_type)
            storage = layout.value_storage_dtype
            _expect(self.topk_logprobs.dtype == storage, "topk_logprobs", storage.name)
        if layout.has_samples:
            _expect(self.sample_offsets is not None and self.sample_offsets.shape == (p + 1,),
                    "sample_offsets", f"shape ({p + 1},)")
            _expect(self.sample_ids.dtype == np.dtype(layout.id_type), "sample_ids", layout.id_type)
            num_samples = int(self.sample_offsets[-1] - self.sample_offsets[0])
            for name in ("sample_ids", "sample_counts"):
                _expect(getattr(self, name).shape == (num_samples,), name, f"{num_samples} values")
        if layout.entropy and layout.is_token_level:
            _expect(self.entropy is not None and self.entropy.shape == (p,), "entropy", f"shape ({p},)")
        if layout.target_logprob and layout.is_token_level:
            _expect(self.target_logprob is not None and self.target_logprob.shape == (p,),
                    "target_logprob", f"shape ({p},)")
        if layout.kind == "sequence_probs":
            _expect(self.class_logprobs is not None
                    and self.class_logprobs.shape == (r, layout.num_classes),
                    "class_logprobs", f"shape ({r}, {layout.num_classes})")
            _expect(self.label is not None and self.label.shape == (r,), "label", f"{r} values")


def _expect(ok: bool, column: str, what: str) -> None:
    if not ok:
        raise CacheFormatError(f"column {column!r} does not match the layout: expected {what}")


def _concat_offsets(parts: list[np.ndarray]) -> np.ndarray:
    pieces = [np.zeros(1, dtype=np.int64)]
    base = 0
    for offsets in parts:
        rebased = offsets.astype(np.int64) - offsets[0]
        pieces.append(rebased[1:] + base)
        base += int(rebased[-1])
    return np.concatenate(pieces)


# ---------------------------------------------------------------- Arrow conversion


_MAX_LIST_OFFSET = np.iinfo(np.int32).max


def _list_array(offsets: np.ndarray, values: pa.Array, list_type: pa.DataType) -> pa.ListArray:
    if len(offsets) and int(offsets[-1]) > _MAX_LIST_OFFSET:
        raise CacheFormatError(
            f"a shard may hold at most {_MAX_LIST_OFFSET:,} values per column, this one needs "
            f"{int(offsets[-1]):,}; use smaller work units (corpus.unit_documents)"
        )
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32), pa.int32()), values, type=list_type)


def _little_endian(dtype: np.dtype | str) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


def _binary_rows(matrix: np.ndarray, row_type: pa.FixedSizeBinaryType) -> pa.Array:
    """Each row of ``matrix`` as one fixed-size binary value (its bytes, little-endian)."""
    rows = np.ascontiguousarray(matrix, dtype=_little_endian(matrix.dtype))
    return pa.Array.from_buffers(row_type, len(rows), [None, pa.py_buffer(rows)])


def _record_rows(matrix: np.ndarray, label_offsets: np.ndarray) -> pa.Array:
    """One ``large_binary`` per record: the rows of ``matrix`` (little-endian) of its labelled
    positions ``label_offsets[r]:label_offsets[r + 1]``, back to back (no copy when the rows
    are already contiguous little-endian)."""
    rows = np.ascontiguousarray(matrix, dtype=_little_endian(matrix.dtype))
    row_bytes = rows.shape[1] * rows.itemsize
    offsets = (np.asarray(label_offsets, dtype=np.int64) - label_offsets[0]) * row_bytes
    return pa.Array.from_buffers(pa.large_binary(), len(offsets) - 1,
                                 [None, pa.py_buffer(offsets), pa.py_buffer(rows)])


def _fixed_rows(matrix: np.ndarray, row_type: pa.FixedSizeListType) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), row_type.value_type), type=row_type)


def block_to_table(block: RecordBlock, layout: RecordLayout, *, position_rows: Collection[str] = ()) -> pa.Table:
    """The Arrow table of ``block`` in ``layout``'s schema (no per-token Python loops); the
    top-k columns named in ``position_rows`` hold one binary row per position, the others
    one binary value per record (see ``RecordLayout.arrow_schema``)."""
    block.validate(layout)
    schema = layout.arrow_schema(position_rows=position_rows)
    types = {f.name: f.type for f in schema}
    tok = block.token_offsets - block.token_offsets[0]
    lab = block.label_offsets
    id_t = pa.from_numpy_dtype(layout.id_type)
    columns: dict[str, pa.Array] = {
        "record_id": pa.array(block.record_id, pa.uint64()),
        "doc_key": pa.array(block.doc_key.tolist(), pa.string()),
        "lang": pa.array(block.lang.tolist(), pa.string()).dictionary_encode(),
        "input_ids": _list_array(tok, pa.array(block.input_ids, pa.uint32()), types["input_ids"]),
    }
    if layout.is_token_level:
        columns["context_length"] = pa.array(block.context_length, pa.uint32())
    if layout.has_topk:
        for name in ("topk_ids", "topk_logprobs"):
            rows = getattr(block, name)
            columns[name] = (_list_array(lab, _binary_rows(rows, types[name].value_type), types[name])
                             if name in position_rows else _record_rows(rows, lab))
    if layout.has_samples:
        s_off = block.sample_offsets - block.sample_offsets[0]
        counts_t = pa.from_numpy_dtype(SAMPLE_COUNT_TYPE)
        for name, values in (("sample_ids", pa.array(block.sample_ids, id_t)),
                             ("sample_counts", pa.array(block.sample_counts, counts_t))):
            per_position = _list_array(s_off, values, types[name].value_type)
            columns[name] = _list_array(lab, per_position, types[name])
    if layout.entropy and layout.is_token_level:
        columns["entropy"] = _list_array(lab, pa.array(block.entropy.astype(np.float16), pa.float16()),
                                         types["entropy"])
    if layout.target_logprob and layout.is_token_level:
        values = pa.array(block.target_logprob.astype(np.float16), pa.float16())
        columns["target_logprob"] = _list_array(lab, values, types["target_logprob"])
    if layout.kind == "sequence_probs":
        columns["class_logprobs"] = _fixed_rows(block.class_logprobs, types["class_logprobs"])
        columns["label"] = pa.array(block.label, pa.int32())
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def _whole(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """One array of a column; combine_chunks copies even a single chunk, so avoid it then."""
    if not isinstance(column, pa.ChunkedArray):
        return column
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _flat(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(zero-based int64 offsets, flattened child values) of a list column."""
    arr = _whole(column)
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    return offsets - offsets[0], arr.flatten()


def _numpy(arr: pa.Array) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False)


def _topk_rows(column: pa.ChunkedArray, name: str, dtype: np.dtype | str, k: int,
               label_offsets: np.ndarray) -> np.ndarray:
    """A top-k column as a ``[P, k]`` array, viewed in place where its form allows: one
    binary value per record (format 3), one fixed-size binary per position (format 2, and
    format 3's byte-stream-split columns), or ``fixed_size_list`` rows (format 1)."""
    dtype = _little_endian(dtype)
    row_bytes = k * dtype.itemsize
    arr = _whole(column)
    if pa.types.is_large_binary(arr.type):
        return _record_rows_view(arr, name, dtype, k, label_offsets)
    _, rows = _flat(arr)
    if not pa.types.is_fixed_size_binary(rows.type):
        return _numpy(rows.flatten()).reshape(-1, k)
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


def _record_rows_view(arr: pa.Array, name: str, dtype: np.dtype, k: int, label_offsets: np.ndarray) -> np.ndarray:
    """The ``[P, k]`` rows of a column of one binary value per record, after checking that
    each value holds exactly its record's labelled positions."""
    row_bytes = k * dtype.itemsize
    offsets_buffer, data = arr.buffers()[1], arr.buffers()[2]
    offsets = np.frombuffer(offsets_buffer, dtype="<i8", count=len(arr) + 1, offset=arr.offset * 8)
    need = np.diff(np.asarray(label_offsets, dtype=np.int64)) * row_bytes  # the same table's records
    wrong = np.flatnonzero(np.diff(offsets) != need)
    if wrong.size:
        bad = int(wrong[0])
        raise CacheFormatError(
            f"{name} of record {bad} holds {int(offsets[bad + 1] - offsets[bad])} bytes, but its "
            f"{int(need[bad] // row_bytes)} labelled positions need {int(need[bad])} "
            f"({k} x {dtype.name} per position)"
        )
    positions = int(need.sum()) // row_bytes
    if positions == 0:
        return np.empty((0, k), dtype=dtype)
    if data is None or data.size < int(offsets[-1]):
        raise CacheFormatError(f"{name} holds fewer bytes than its {len(arr)} records need")
    return np.frombuffer(data, dtype=dtype, count=positions * k, offset=int(offsets[0])).reshape(-1, k)


def table_to_block(table: pa.Table, layout: RecordLayout) -> RecordBlock:
    """Inverse of :func:`block_to_table`; raises CacheFormatError on a schema mismatch."""
    expected = layout.arrow_schema()
    missing = [n for n in expected.names if n not in table.column_names]
    if missing:
        raise CacheFormatError(f"shard lacks column(s) {', '.join(missing)} required by its layout")
    tok, ids = _flat(table.column("input_ids"))
    lang = _whole(table.column("lang"))
    if isinstance(lang.type, pa.DictionaryType):
        lang = lang.dictionary_decode()
    block = RecordBlock(
        record_id=_numpy(_whole(table.column("record_id"))),
        doc_key=np.asarray(table.column("doc_key").to_pylist(), dtype=object),
        lang=np.asarray(lang.to_pylist(), dtype=object),
        token_offsets=tok,
        input_ids=_numpy(ids),
    )
    if layout.is_token_level:
        block.context_length = _numpy(_whole(table.column("context_length")))
    if layout.has_topk:
        label_offsets = block.label_offsets
        for name, dtype in layout.topk_dtypes.items():
            setattr(block, name, _topk_rows(table.column(name), name, dtype, layout.k, label_offsets))
    if layout.has_samples:
        _, per_pos = _flat(table.column("sample_ids"))
        s_off, sids = _flat(per_pos)
        _, per_pos_c = _flat(table.column("sample_counts"))
        _, counts = _flat(per_pos_c)
        block.sample_offsets, block.sample_ids, block.sample_counts = s_off, _numpy(sids), _numpy(counts)
    if layout.entropy and layout.is_token_level:
        _, ent = _flat(table.column("entropy"))
        block.entropy = _numpy(ent)
    if layout.target_logprob and layout.is_token_level:
        _, target = _flat(table.column("target_logprob"))
        block.target_logprob = _numpy(target)
    if layout.kind == "sequence_probs":
        rows = _whole(table.column("class_logprobs"))
        block.class_logprobs = _numpy(rows.flatten()).reshape(-1, layout.num_classes)
        block.label = _numpy(_whole(table.column("label")))
    return block


def block_cuts(token_offsets: np.ndarray, target_tokens: int) -> list[int]:
    """Record indices that cut records into blocks of about ``target_tokens`` tokens.

    Returns ``[0, c1, ..., R]``; a block closes at the first record boundary at or past the
    target, so every block but the last holds at least ``target_tokens`` tokens (or is one
    long record). Both backends use these cuts, so a shard's blocks are the same whichever
    backend stores it.
    """
    num_records = len(token_offsets) - 1
    if num_records <= 0:
        return [0, 0]
    rebased = token_offsets - token_offsets[0]
    cuts, start_tokens = [0], 0
    while cuts[-1] < num_records:
        nxt = int(np.searchsorted(rebased, start_tokens + target_tokens, side="left"))
        nxt = min(max(nxt, cuts[-1] + 1), num_records)
        cuts.append(nxt)
        start_tokens = int(rebased[nxt])
    return cuts
