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

from dataclasses import dataclass, fields, replace

import numpy as np
import pyarrow as pa

from logitcache.errors import CacheFormatError
from logitcache.storage_schemas.layout import RecordLayout
from logitcache.storage_schemas.row_planes import (
    decode_id_rows,
    encode_id_rows,
    from_planes,
    to_planes,
)
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
            _expect(bool((self.topk_ids[:, 1:] > self.topk_ids[:, :-1]).all()), "topk_ids",
                    "each position's ids in ascending order (sort each row by id, its values with "
                    "it: logitcache.storage_schemas.legacy_formats.sort_topk_by_id)")
        if layout.has_samples:
            _expect(self.sample_offsets is not None and self.sample_offsets.shape == (p + 1,),
                    "sample_offsets", f"shape ({p + 1},)")
            _expect(self.sample_ids.dtype == np.dtype(layout.id_type), "sample_ids", layout.id_type)
            num_samples = int(self.sample_offsets[-1] - self.sample_offsets[0])
            for name in ("sample_ids", "sample_counts"):
                _expect(getattr(self, name).shape == (num_samples,), name, f"{num_samples} values")
            _check_draws(self, layout.samples)
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


def _check_draws(block: RecordBlock, samples: int) -> None:
    """Each position's ids ascending and unique, their counts summing to ``samples`` (or 0:
    a position whose tail held no probability has no draws)."""
    s_off = block.sample_offsets - block.sample_offsets[0]
    ids = block.sample_ids.astype(np.int64)
    if ids.size:
        starts = np.zeros(ids.size, dtype=bool)
        starts[s_off[:-1][np.diff(s_off) > 0]] = True
        _expect(bool((np.diff(ids)[~starts[1:]] > 0).all()), "sample_ids",
                "each position's drawn ids unique and ascending")
        _expect(bool((block.sample_counts > 0).all()), "sample_counts", "positive counts")
    totals = draws_per_position(block)
    _expect(bool(np.isin(totals, (0, samples)).all()), "sample_counts",
            f"counts summing to {samples} (or 0) at every position")


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


def list_array(offsets: np.ndarray, values: pa.Array, list_type: pa.DataType) -> pa.ListArray:
    if len(offsets) and int(offsets[-1]) > _MAX_LIST_OFFSET:
        raise CacheFormatError(
            f"a shard may hold at most {_MAX_LIST_OFFSET:,} values per column, this one needs "
            f"{int(offsets[-1]):,}; use smaller work units (corpus.unit_documents)"
        )
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32), pa.int32()), values, type=list_type)


def record_rows(rows: np.ndarray, row_offsets: np.ndarray) -> pa.Array:
    """One ``large_binary`` per record: the byte rows ``rows[row_offsets[r]:row_offsets[r + 1]]``
    (``[n, row_bytes]`` uint8) back to back, without a copy when ``rows`` is contiguous."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    row_bytes = rows.shape[1] if rows.ndim == 2 else 0
    offsets = (np.asarray(row_offsets, dtype=np.int64) - row_offsets[0]) * row_bytes
    return pa.Array.from_buffers(pa.large_binary(), len(offsets) - 1,
                                 [None, pa.py_buffer(offsets), pa.py_buffer(rows)])


def record_rows_view(arr: pa.Array, name: str, row_bytes: int, row_offsets: np.ndarray) -> np.ndarray:
    """The ``[n, row_bytes]`` uint8 rows of a column of one binary value per record, viewed in
    place, after checking that record ``r`` holds exactly ``row_offsets[r + 1] - row_offsets[r]``
    rows."""
    offsets_buffer, data = arr.buffers()[1], arr.buffers()[2]
    offsets = np.frombuffer(offsets_buffer, dtype="<i8", count=len(arr) + 1, offset=arr.offset * 8)
    need = np.diff(np.asarray(row_offsets, dtype=np.int64)) * row_bytes
    wrong = np.flatnonzero(np.diff(offsets) != need)
    if wrong.size:
        bad = int(wrong[0])
        raise CacheFormatError(
            f"{name} of record {bad} holds {int(offsets[bad + 1] - offsets[bad])} bytes, but its "
            f"{int(need[bad] // row_bytes)} rows need {int(need[bad])} ({row_bytes} bytes per row)"
        )
    rows = int(need.sum()) // row_bytes
    if rows == 0:
        return np.empty((0, row_bytes), dtype=np.uint8)
    if data is None or data.size < int(offsets[-1]):
        raise CacheFormatError(f"{name} holds fewer bytes than its {len(arr)} records need")
    return np.frombuffer(data, dtype=np.uint8, count=rows * row_bytes, offset=int(offsets[0])).reshape(rows, row_bytes)


def base_columns(block: RecordBlock, layout: RecordLayout, types: dict[str, pa.DataType]) -> dict[str, pa.Array]:
    """The identity, token and context columns, as every format stores them."""
    tok = block.token_offsets - block.token_offsets[0]
    columns: dict[str, pa.Array] = {
        "record_id": pa.array(block.record_id, pa.uint64()),
        "doc_key": pa.array(block.doc_key.tolist(), pa.string()),
        "lang": pa.array(block.lang.tolist(), pa.string()).dictionary_encode(),
        "input_ids": list_array(tok, pa.array(block.input_ids, pa.uint32()), types["input_ids"]),
    }
    if layout.is_token_level:
        columns["context_length"] = pa.array(block.context_length, pa.uint32())
    return columns


def per_position_columns(block: RecordBlock, layout: RecordLayout,
                         types: dict[str, pa.DataType]) -> dict[str, pa.Array]:
    """Entropy, target log-prob and class columns, as every format stores them."""
    lab = block.label_offsets
    columns: dict[str, pa.Array] = {}
    for name in ("entropy", "target_logprob"):
        if name in types:
            values = pa.array(getattr(block, name).astype(np.float16), pa.float16())
            columns[name] = list_array(lab, values, types[name])
    if layout.kind == "sequence_probs":
        values = pa.array(block.class_logprobs.reshape(-1), types["class_logprobs"].value_type)
        columns["class_logprobs"] = pa.FixedSizeListArray.from_arrays(values, type=types["class_logprobs"])
        columns["label"] = pa.array(block.label, pa.int32())
    return columns


def block_to_table(block: RecordBlock, layout: RecordLayout) -> pa.Table:
    """The format 4 Arrow table of ``block`` (see ``RecordLayout.arrow_schema``), with no
    per-token Python loops."""
    block.validate(layout)
    schema = layout.arrow_schema()
    types = {f.name: f.type for f in schema}
    lab = block.label_offsets
    columns = base_columns(block, layout, types)
    if layout.has_topk:
        columns["topk_ids"] = record_rows(encode_id_rows(block.topk_ids), lab)
        columns["topk_logprobs"] = record_rows(to_planes(block.topk_logprobs), lab)
    if layout.has_samples:
        draws, drawn = sample_draw_rows(block, layout.samples)
        columns["sample_ids"] = record_rows(encode_id_rows(draws), _drawn_offsets(drawn, lab))
        undrawn = np.flatnonzero(~drawn)
        per_record = np.searchsorted(undrawn, lab)  # undrawn positions before each record
        local = (undrawn - np.repeat(lab[:-1], np.diff(per_record))).astype(np.uint32)
        columns["undrawn_positions"] = list_array(per_record, pa.array(local, pa.uint32()),
                                                  types["undrawn_positions"])
    columns.update(per_position_columns(block, layout, types))
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def _drawn_offsets(drawn: np.ndarray, label_offsets: np.ndarray) -> np.ndarray:
    """Offsets of each record's drawn positions among all drawn positions."""
    before = np.zeros(len(drawn) + 1, dtype=np.int64)
    np.cumsum(drawn, out=before[1:])
    return before[label_offsets]


def sample_draw_rows(block: RecordBlock, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(``[D, samples]`` ascending draws of the D positions with draws, ``[P]`` has-draws mask)
    from the block's unique ids and counts."""
    drawn = draws_per_position(block) > 0
    draws = np.repeat(block.sample_ids, block.sample_counts.astype(np.int64)).reshape(-1, samples)
    return draws, drawn


def draws_per_position(block: RecordBlock) -> np.ndarray:
    """``[P]`` int64: the sum of each position's sample counts."""
    s_off = block.sample_offsets - block.sample_offsets[0]
    position = np.repeat(np.arange(len(s_off) - 1), np.diff(s_off))
    return np.bincount(position, weights=block.sample_counts, minlength=len(s_off) - 1).astype(np.int64)


def _samples_from_draws(draws: np.ndarray, drawn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample_offsets [P+1], unique ids, counts) from ascending ``[D, s]`` draws: run lengths."""
    d, s = draws.shape
    first = np.ones((d, s), dtype=bool)
    if s > 1:
        np.not_equal(draws[:, 1:], draws[:, :-1], out=first[:, 1:])
    starts = np.flatnonzero(first.reshape(-1))
    ids = draws.reshape(-1)[starts]
    counts = np.diff(np.append(starts, d * s)).astype(np.uint16)
    per_position = np.zeros(len(drawn), dtype=np.int64)
    per_position[drawn] = first.sum(axis=1)
    offsets = np.zeros(len(drawn) + 1, dtype=np.int64)
    np.cumsum(per_position, out=offsets[1:])
    return offsets, ids, counts


def whole(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """One array of a column; combine_chunks copies even a single chunk, so avoid it then."""
    if not isinstance(column, pa.ChunkedArray):
        return column
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def flat(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(zero-based int64 offsets, flattened child values) of a list column."""
    arr = whole(column)
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    return offsets - offsets[0], arr.flatten()


def to_numpy(arr: pa.Array) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False)


def read_base_columns(table: pa.Table, layout: RecordLayout) -> RecordBlock:
    tok, ids = flat(table.column("input_ids"))
    lang = whole(table.column("lang"))
    if isinstance(lang.type, pa.DictionaryType):
        lang = lang.dictionary_decode()
    block = RecordBlock(
        record_id=to_numpy(whole(table.column("record_id"))),
        doc_key=np.asarray(table.column("doc_key").to_pylist(), dtype=object),
        lang=np.asarray(lang.to_pylist(), dtype=object),
        token_offsets=tok,
        input_ids=to_numpy(ids),
    )
    if layout.is_token_level:
        block.context_length = to_numpy(whole(table.column("context_length")))
    return block


def read_per_position_columns(table: pa.Table, layout: RecordLayout, block: RecordBlock) -> None:
    if layout.entropy and layout.is_token_level:
        block.entropy = to_numpy(flat(table.column("entropy"))[1])
    if layout.target_logprob and layout.is_token_level:
        block.target_logprob = to_numpy(flat(table.column("target_logprob"))[1])
    if layout.kind == "sequence_probs":
        rows = whole(table.column("class_logprobs"))
        block.class_logprobs = to_numpy(rows.flatten()).reshape(-1, layout.num_classes)
        block.label = to_numpy(whole(table.column("label")))


def table_to_block(table: pa.Table, layout: RecordLayout) -> RecordBlock:
    """Inverse of :func:`block_to_table`; raises CacheFormatError on a schema mismatch."""
    expected = layout.arrow_schema()
    missing = [n for n in expected.names if n not in table.column_names]
    if missing:
        raise CacheFormatError(f"shard lacks column(s) {', '.join(missing)} required by its layout")
    for name in ("topk_ids", "topk_logprobs", "sample_ids"):
        if name in expected.names and not pa.types.is_large_binary(table.schema.field(name).type):
            raise CacheFormatError(f"column {name!r} is {table.schema.field(name).type}, format 4 stores "
                                   "large_binary: the shard is of an older format")
    block = read_base_columns(table, layout)
    lab = block.label_offsets
    id_dtype = np.dtype(layout.id_type)
    if layout.has_topk:
        k = layout.k
        ids = record_rows_view(whole(table.column("topk_ids")), "topk_ids", id_dtype.itemsize * k, lab)
        block.topk_ids = decode_id_rows(ids, id_dtype, k)
        value_dtype = layout.value_storage_dtype
        values = record_rows_view(whole(table.column("topk_logprobs")), "topk_logprobs", value_dtype.itemsize * k, lab)
        block.topk_logprobs = from_planes(values, value_dtype, k)
    if layout.has_samples:
        undrawn_offsets, undrawn = flat(table.column("undrawn_positions"))
        drawn = np.ones(int(lab[-1]), dtype=bool)
        local = to_numpy(undrawn).astype(np.int64)
        position = local + np.repeat(lab[:-1], np.diff(undrawn_offsets))
        if local.size and (local.min() < 0 or (position >= np.repeat(lab[1:], np.diff(undrawn_offsets))).any()):
            raise CacheFormatError("undrawn_positions names a position outside its record")
        drawn[position] = False
        raw = record_rows_view(whole(table.column("sample_ids")), "sample_ids",
                               id_dtype.itemsize * layout.samples, _drawn_offsets(drawn, lab))
        draws = decode_id_rows(raw, id_dtype, layout.samples)
        block.sample_offsets, block.sample_ids, block.sample_counts = _samples_from_draws(draws, drawn)
    read_per_position_columns(table, layout, block)
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
