"""Row planes: how format 4 turns ``[n, k]`` rows of integers or floats into bytes, and back.

A Parquet top-k or sample column of format 4 holds, per record, the rows of its labelled
positions back to back. Each row of ``k`` elements of ``W`` bytes is written as ``W``
*planes* of ``k`` bytes: first the lowest byte of every element of the row, then the next
byte, and so on (little-endian byte order inside an element). Rows of ids are written as
*gaps*: each row is sorted ascending, its first element is kept and every other one is
replaced by its difference to the one before, modulo ``2**(8 W)``.

Why: a real teacher's top-k ids of a position, as a set, are mostly small gaps, whose high
bytes are zero; in their own plane those zeros cost zstd next to nothing, where interleaved
with the low bytes they cost more than the gap coding saves. On the top-64 of a trained
teacher (vocabulary 9,004, zstd 3) the ids take 75.5 bytes per position in rank order
(format 3) and 20.4 as ascending gaps in planes (BENCHMARKS.md, "Cache format 4"). Planes
inside each row, rather than inside a record, keep every row the same length, so a whole
row group decodes with a few vectorised numpy calls and no loop over records.

Decoding one row group is a widening copy, shift and OR per plane, and for gaps a running
sum along the row, several elements to a 64-bit word, on blocks of rows that stay in the
CPU cache. The encoding wraps modulo ``2**(8 W)``; decoding assumes what format 4
guarantees, rows in ascending id order, whose running sums are their ids and never wrap.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

#: rows per pass of the running sum and of the plane transforms: 4096 x k elements (512 KiB
#: of uint16 at k = 64) stay in the CPU cache across the passes over them, instead of
#: streaming a whole shard once per pass
_SUM_CHUNK_ROWS = 4096


def little_endian(dtype: np.dtype | str) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


def gaps_of(rows: np.ndarray) -> np.ndarray:
    """Each row's first element, then the differences to the previous one (wrapping)."""
    rows = np.asarray(rows)
    out = np.empty_like(rows)
    if rows.shape[-1]:
        out[..., 0] = rows[..., 0]
        np.subtract(rows[..., 1:], rows[..., :-1], out=out[..., 1:])  # unsigned: wraps
    return out


def running_sum_(rows: np.ndarray) -> np.ndarray:
    """Undo :func:`gaps_of` in place on a C-contiguous unsigned ``[n, k]`` array; returns it.

    Column by column over blocks of rows: over k columns this is faster than ``np.cumsum``
    along the last, contiguous axis, and it wraps modulo the element type as the gaps did.
    """
    n, k = rows.shape
    for start in range(0, n, _SUM_CHUNK_ROWS):
        chunk = rows[start:start + _SUM_CHUNK_ROWS]
        for j in range(1, k):
            np.add(chunk[:, j - 1], chunk[:, j], out=chunk[:, j])
    return rows


def pooled_empty(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """An uninitialised writable array in Arrow's memory pool rather than from ``malloc``.

    A decoded block is tens of MB; glibc serves that from fresh ``mmap`` pages every time
    (a page fault per 4 KiB on first write), where Arrow's pool keeps freed memory for the
    next block, which the reader asks for at once."""
    count = int(np.prod(shape))
    buffer = pa.allocate_buffer(max(count * np.dtype(dtype).itemsize, 1))
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)


def _unsigned(width: int) -> np.dtype:
    return np.dtype(f"<u{width}")


def ascending_sum_(rows: np.ndarray) -> np.ndarray:
    """:func:`running_sum_` for rows whose running sums all fit the element type, as the gaps of
    ascending ids do (every running sum is an id of the row); in place, returns ``rows``.

    Several elements share one 64-bit word: a word's running sum is two or three shifted adds,
    and the words of a row are joined by adding the previous word's last element to every
    element of the next, so a row of 64 uint16 ids takes 15 column passes instead of 63. A
    sum that overflowed an element would carry into its neighbour, hence the precondition.
    """
    n, k = rows.shape
    bits = 8 * rows.dtype.itemsize
    lanes = 64 // bits
    if lanes < 2 or k % lanes or not rows.flags.c_contiguous or rows.dtype.byteorder == ">":
        return running_sum_(rows)
    words = rows.view(np.dtype("<u8"))  # element i of a word in its bits [i * bits, (i + 1) * bits)
    spread = np.uint64(sum(1 << (bits * lane) for lane in range(lanes)))
    last = np.uint64(64 - bits)
    scratch = np.empty(min(n, _SUM_CHUNK_ROWS), dtype=np.uint64)
    for start in range(0, n, _SUM_CHUNK_ROWS):
        chunk = words[start:start + _SUM_CHUNK_ROWS]
        shift = bits
        while shift < 64:
            chunk += chunk << np.uint64(shift)
            shift *= 2
        carry = scratch[:len(chunk)]
        for j in range(1, chunk.shape[1]):
            np.right_shift(chunk[:, j - 1], last, out=carry)
            np.multiply(carry, spread, out=carry)
            np.add(chunk[:, j], carry, out=chunk[:, j])
    return rows


def to_planes(rows: np.ndarray) -> np.ndarray:
    """``[n, k]`` elements of ``W`` bytes as ``[n, W * k]`` bytes: each row's planes."""
    rows = np.ascontiguousarray(rows, dtype=little_endian(rows.dtype))
    n, k = rows.shape
    width = rows.dtype.itemsize
    if width == 1:
        return rows.view(np.uint8)
    # byte w of every element by shifts over whole blocks of rows: contiguous passes, where a
    # byte transpose would move one byte at a time
    whole = rows.view(_unsigned(width))
    out = np.empty((n, width * k), dtype=np.uint8)
    for start in range(0, n, _SUM_CHUNK_ROWS):
        chunk = whole[start:start + _SUM_CHUNK_ROWS]
        target = out[start:start + _SUM_CHUNK_ROWS]
        shifted = chunk.copy()
        for w in range(width):
            if w:
                np.right_shift(chunk, 8 * w, out=shifted)
            np.copyto(target[:, w * k:(w + 1) * k], shifted, casting="unsafe")  # the low byte
    return out


def from_planes(data: np.ndarray, dtype: np.dtype | str, k: int) -> np.ndarray:
    """Inverse of :func:`to_planes`: ``[n, W * k]`` (or flat) bytes to ``[n, k]`` of ``dtype``.
    One-byte elements come back as a view of ``data`` (a row of one plane is the row itself)."""
    dtype = np.dtype(dtype)
    width = dtype.itemsize
    data = np.asarray(data, dtype=np.uint8).reshape(-1, width * k)
    n = data.shape[0]
    if width == 1:
        return data.view(dtype)
    out = pooled_empty((n, k), _unsigned(width))
    scratch = np.empty((min(n, _SUM_CHUNK_ROWS), k), dtype=out.dtype)
    for start in range(0, n, _SUM_CHUNK_ROWS):
        planes = data[start:start + _SUM_CHUNK_ROWS]
        target = out[start:start + _SUM_CHUNK_ROWS]
        np.copyto(target, planes[:, :k])
        byte = scratch[:len(target)]
        for w in range(1, width):
            np.copyto(byte, planes[:, w * k:(w + 1) * k])
            np.left_shift(byte, 8 * w, out=byte)
            np.bitwise_or(target, byte, out=target)
    out = out.view(little_endian(dtype))
    return out if dtype == out.dtype else out.astype(dtype)


def encode_id_rows(ids: np.ndarray) -> np.ndarray:
    """Rows of ids (each already ascending) as gap planes, ``[n, W * k]`` bytes."""
    return to_planes(gaps_of(ids))


def decode_id_rows(data: np.ndarray, dtype: np.dtype | str, k: int) -> np.ndarray:
    """Inverse of :func:`encode_id_rows`, for rows of ascending (or non-decreasing) ids, as
    format 4 stores them: the gaps of other rows may sum past the element type, which
    :func:`ascending_sum_` does not wrap (use :func:`running_sum_` for those)."""
    rows = from_planes(data, dtype, k)
    return ascending_sum_(rows if np.dtype(dtype).itemsize > 1 else rows.copy())  # a view: summed in a copy
