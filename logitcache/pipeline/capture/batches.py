"""Token-budget batches of windows: packed rows, or one padded window per row.

Padding is compute spent on nothing, and a unit of many short windows and a few long ones
pads a lot when every row holds one window. So rows are *packed*: the unit's windows go into
rows first-fit decreasing (:func:`pack_rows`), several documents' windows to a row, no row
wider than the unit's longest window. Position ids restart at 0 at each window (and at the
row's padding), so the teacher reads each window as a sequence of its own; that each window
then attends only to itself is not assumed but checked once per teacher
(:mod:`~logitcache.pipeline.common.packed_attention`), and a teacher that cannot keep packed
windows apart gets one padded window per row instead, as does a sequence classifier (which
pools each row into one record).

Attention runs over a whole row (masked), so a token costs more in a wider row: a window
opens a row no wider than twice its own length (:func:`row_capacity`), and short windows
fill the gaps of longer ones' rows before they open rows of their own.

Either way the rows (packed fills, or windows) are then ordered by length, longest first,
and cut greedily into batches whose padded size ``rows x longest row`` stays within
``batch_tokens`` (:func:`plan_batches`); a batch is also cut where the next rows are so much
shorter that its padding would pass ``MAX_PADDING`` (``MAX_PACKED_PADDING`` for packed rows,
whose fills are close to each other). Only batching changes: the labels are gathered per window and the
unit's shard restores window order, so what is stored is the same whichever way the rows
were built (up to float rounding, as for another batch size).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from logitcache.pipeline.common.padding import right_pad


@dataclass(frozen=True, kw_only=True)
class Batch:
    """The rows of one forward and where each window sits in them."""

    indices: np.ndarray  # int64 [N]: the windows' positions in the unit's window list, row by row
    rows: np.ndarray  # int64 [N]: the row of each window
    starts: np.ndarray  # int64 [N]: the slot at which each window starts in its row
    lengths: np.ndarray  # int64 [N]: tokens of each window
    input_ids: torch.Tensor  # int64 [B, L], each row right-padded
    attention_mask: torch.Tensor | None  # int64 [B, L] of padded rows; None for packed ones
    position_ids: torch.Tensor | None = None  # int64 [B, L] of packed rows, from 0 at each window

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())

    def slots(self) -> tuple[np.ndarray, np.ndarray]:
        """Per slot, ``[B, L]`` int64 each: which of this batch's windows it holds (its place
        in ``indices``; -1 on padding) and its offset in that window."""
        width = self.input_ids.shape[1]
        window = np.full(self.input_ids.numel(), -1, dtype=np.int64)
        offset = np.zeros(self.input_ids.numel(), dtype=np.int64)
        first = np.zeros(len(self.lengths), dtype=np.int64)  # each window's first token, counted over all
        np.cumsum(self.lengths[:-1], out=first[1:])
        within = np.arange(int(self.lengths.sum())) - np.repeat(first, self.lengths)
        flat = np.repeat(self.rows * width + self.starts, self.lengths) + within
        window[flat] = np.repeat(np.arange(len(self.lengths)), self.lengths)
        offset[flat] = within
        return window.reshape(self.input_ids.shape), offset.reshape(self.input_ids.shape)

    def halves(self) -> tuple[Batch, Batch]:
        """The first and second half of the rows, at this batch's width."""
        half = self.num_rows // 2
        first = self.rows < half
        return self._take_rows(slice(0, half), first, 0), self._take_rows(slice(half, None), ~first, half)

    def _take_rows(self, rows: slice, windows: np.ndarray, shift: int) -> Batch:
        def part(tensor):
            return None if tensor is None else tensor[rows]

        return Batch(indices=self.indices[windows], rows=self.rows[windows] - shift, starts=self.starts[windows],
                     lengths=self.lengths[windows], input_ids=self.input_ids[rows],
                     attention_mask=part(self.attention_mask), position_ids=part(self.position_ids))


#: Largest padding fraction a batch may have when shorter rows could go to a batch of their own.
MAX_PADDING = 0.2
#: The same for packed rows, whose fills are close to each other: a tighter bound, paid for
#: by more (smaller) batches where the fills spread.
MAX_PACKED_PADDING = 0.02


def plan_batches(lengths: Sequence[int], *, batch_tokens: int, max_padding: float = MAX_PADDING) -> list[np.ndarray]:
    """Index groups of rows, longest first, each within ``batch_tokens`` once padded and
    within ``max_padding`` unless it is a single row.

    A row longer than the budget gets a batch of its own.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    groups: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])  # sorted: the first row is the longest
        rows = max(1, batch_tokens // max(longest, 1))
        # cut early where the rows get so much shorter that padding would pass max_padding
        real = np.cumsum(lengths[order[start:start + rows]])
        padded = longest * np.arange(1, len(real) + 1)
        fits = np.flatnonzero(1 - real / padded <= max_padding)
        rows = int(fits[-1]) + 1 if len(fits) else 1
        groups.append(order[start:start + rows])
        start += rows
    return groups


def pack_rows(lengths: Sequence[int]) -> list[np.ndarray]:
    """First-fit decreasing: the window indices of each row, each row at most as wide as the
    longest window.

    Windows are taken longest first (ties in window order) and each goes into the first row
    with room for it, so the rows are a pure function of the lengths. A window that fits no
    row opens one of :func:`row_capacity` for it, so that a short window's tokens do not pay
    for a row as wide as the longest window's.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    widest = int(lengths.max()) if len(lengths) else 0
    room = np.zeros(len(lengths), dtype=np.int64)  # free slots of each row opened so far
    members: list[list[int]] = []
    for index in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[index])
        fits = np.flatnonzero(room[:len(members)] >= n)
        if len(fits):
            row = int(fits[0])
        else:
            row = len(members)
            members.append([])
            room[row] = row_capacity(n, widest=widest)
        members[row].append(index)
        room[row] -= n
    return [np.array(row, dtype=np.int64) for row in members]


def row_capacity(length: int, *, widest: int) -> int:
    """``widest`` halved as often as ``length`` still fits: between ``length`` and twice it."""
    capacity = max(widest, length)
    while capacity // 2 >= length:
        capacity //= 2
    return capacity


def plan_packed_batches(lengths: Sequence[int], *, batch_tokens: int) -> list[list[np.ndarray]]:
    """Packed rows (:func:`pack_rows`), grouped into batches by their fill
    (:func:`plan_batches`, within :data:`MAX_PACKED_PADDING`): per batch, the window indices
    of each row."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        return []
    rows = pack_rows(lengths)
    fills = [int(lengths[row].sum()) for row in rows]
    groups = plan_batches(fills, batch_tokens=batch_tokens, max_padding=MAX_PACKED_PADDING)
    return [[rows[i] for i in group] for group in groups]


def collate(windows, indices: np.ndarray, *, pad_id: int) -> Batch:
    """The windows at ``indices``, one to a row, right-padded to the longest of them."""
    rows = [windows[i].input_ids for i in indices]
    input_ids, attention_mask = right_pad(rows, pad_id=pad_id, min_width=0)
    return Batch(indices=np.asarray(indices, dtype=np.int64), rows=np.arange(len(rows), dtype=np.int64),
                 starts=np.zeros(len(rows), dtype=np.int64), lengths=np.array([len(r) for r in rows], dtype=np.int64),
                 input_ids=input_ids, attention_mask=attention_mask)


def collate_packed(windows, rows: Sequence[np.ndarray], *, pad_id: int) -> Batch:
    """Rows of the windows at each entry of ``rows``, side by side, right-padded to the fullest
    row; position ids count from 0 at each window and again over each row's padding."""
    lengths = [np.array([len(windows[i].input_ids) for i in row], dtype=np.int64) for row in rows]
    width = max(int(n.sum()) for n in lengths)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    position_ids = np.zeros((len(rows), width), dtype=np.int64)
    starts = []
    for r, (row, sizes) in enumerate(zip(rows, lengths, strict=True)):
        begin = np.concatenate([[0], np.cumsum(sizes)])
        for i, start, n in zip(row, begin[:-1], sizes, strict=True):
            input_ids[r, start:start + n] = windows[i].input_ids
            position_ids[r, start:start + n] = np.arange(n)
        position_ids[r, begin[-1]:] = np.arange(width - begin[-1])
        starts.append(begin[:-1])
    return Batch(indices=np.concatenate(rows), rows=np.repeat(np.arange(len(rows)), [len(r) for r in rows]),
                 starts=np.concatenate(starts).astype(np.int64), lengths=np.concatenate(lengths),
                 input_ids=torch.from_numpy(input_ids), attention_mask=None,
                 position_ids=torch.from_numpy(position_ids))


def unit_batches(windows, *, batch_tokens: int, pad_id: int, packed: bool) -> Iterator[Batch]:
    """The batches of one unit's windows, in the order they run: packed rows when ``packed``,
    else one padded window per row."""
    lengths = np.array([len(w.input_ids) for w in windows], dtype=np.int64)
    if packed:
        for rows in plan_packed_batches(lengths, batch_tokens=batch_tokens):
            yield collate_packed(windows, rows, pad_id=pad_id)
        return
    for indices in plan_batches(lengths, batch_tokens=batch_tokens):
        yield collate(windows, indices, pad_id=pad_id)
