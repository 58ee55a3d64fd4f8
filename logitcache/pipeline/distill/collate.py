"""Turn a stream of cached records into fixed-shape batches for the students.

Token caches are *packed*: records are laid one after another into ``rows`` rows of
``length`` tokens, in stream order (a record never straddles two rows, and the records of
a batch are a contiguous run of the stream, which is what lets the reader's resume state
stay a prefix of each shuffle window). Position ids restart at 0 for each record, and the
padding at the end of a row restarts them too, so models that read packed sequences from
position ids (``transformers``' causal masks do, when no attention mask is passed) never
let one record attend to another; students whose model class does not are given an explicit
mask (:mod:`~logitcache.pipeline.common.packed_attention`). Everything is a fixed shape, ``[B, L]`` and
``[B, L, k]``, so a GPU sees the same kernels every step.

Per slot the batch says whether it has a teacher label (``label_mask``: a labelled position
of a record, not left context, not padding) and the hard next-token target
(``hard_targets``: the record's next token at labelled positions, ``IGNORE_INDEX`` = -100 at
a record's last token, on context and on padding). Top-k ids and float32 log-probs are
``[B, L, k]``; sampled ids and counts are ``[B, L, S]`` padded with count 0. Where the cache
stores them, the teacher's entropy and its log-probability of the next token are float32
``[B, L]``, NaN on slots without a label (and the latter at a record's last token).

A packer made with ``decode=False`` leaves the top-k in the cache's stored types (id bits
and codec values, see :mod:`~logitcache.pipeline.distill.stored_topk`): a quarter of the bytes to
copy and to ship out of a DataLoader worker at k = 64. :meth:`TokenBatch.decoded` widens
them wherever the batch is, typically on the GPU after ``batch.to(device)``.

Classification caches are not packed (a classifier pools one sequence per row): one
record per row, right-padded, with an attention mask.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from logitcache.pipeline.common.padding import right_pad
from logitcache.pipeline.distill.dataset import round_robin
from logitcache.pipeline.distill.losses import IGNORE_INDEX
from logitcache.pipeline.distill.shared_batches import ArraySpec, SlotRing, new_arrays
from logitcache.pipeline.distill.stored_topk import StoredTopK, id_bits, widen_topk
from logitcache.storage_schemas.layout import RecordLayout


@dataclass(kw_only=True)
class _Movable:
    """Tensors of a batch that move together: ``to(device)`` and DataLoader pinning."""

    def _map(self, fn) -> Any:
        values = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            values[spec.name] = fn(value) if isinstance(value, Tensor) else value
        return type(self)(**values)

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Any:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Any:
        return self._map(lambda t: t.pin_memory())

    def attach_slot(self, slot: Any) -> None:
        """Say that this batch's tensors are views of ``slot`` of a worker's ring: it is then
        pickled as a reference to the slot (see :mod:`~logitcache.pipeline.distill.shared_batches`)."""
        self.__dict__["_slot"] = slot

    def __reduce_ex__(self, protocol: int) -> Any:
        slot = self.__dict__.get("_slot")
        if slot is not None:
            return slot.reduce(self)
        return super().__reduce_ex__(protocol)


@dataclass(kw_only=True)
class TokenBatch(_Movable):
    """Packed records of a token-level cache."""

    input_ids: Tensor  # int64 [B, L]
    position_ids: Tensor  # int64 [B, L], restarting per record
    segment: Tensor  # int32 [B, L]: index of the slot's record in ``record_ids``, -1 on padding
    label_mask: Tensor  # bool [B, L]
    hard_targets: Tensor  # int64 [B, L], IGNORE_INDEX where none
    topk_ids: Tensor | None = None  # int64 [B, L, k] (stored form: the stored ids' bits)
    topk_logprobs: Tensor | None = None  # float32 [B, L, k] (stored form: the codec's values)
    sample_ids: Tensor | None = None  # int64 [B, L, S]
    sample_counts: Tensor | None = None  # float32 [B, L, S]
    entropy: Tensor | None = None  # float32 [B, L], teacher entropy (nats)
    target_logprob: Tensor | None = None  # float32 [B, L], teacher log-prob of the next token
    record_ids: np.ndarray  # uint64 [R]
    langs: list[str]  # [R]
    cursors: list[tuple[int, int, int, int]]  # the reader's resume cursors of the R records
    tokens: int  # real (non-padding) tokens
    row_tokens: np.ndarray | None = None  # int64 [B]: real tokens per row (counted without the device)
    stored: StoredTopK | None = None  # set while the top-k are in the cache's stored types

    @property
    def slots(self) -> int:
        return int(self.input_ids.numel())

    def decoded(self) -> TokenBatch:
        """This batch with int64 top-k ids and float32 log-probs, computed on the device the
        tensors are on (itself when already decoded)."""
        if self.stored is None or self.topk_ids is None:
            return self
        ids, logprobs = widen_topk(self.topk_ids, self.topk_logprobs, self.label_mask, self.stored)
        return replace(self, topk_ids=ids, topk_logprobs=logprobs, stored=None)

    def position_langs(self) -> np.ndarray:
        """The language of each labelled position, in ``label_mask`` order."""
        segment = self.segment[self.label_mask].cpu().numpy()
        return np.asarray(self.langs, dtype=object)[segment]

    def row_slice(self, start: int, stop: int) -> TokenBatch:
        """Rows ``start:stop`` as a batch of their own (views, on the batch's device). Records
        and cursors stay whole, since ``segment`` indexes them; ``tokens`` counts the rows'."""
        rows = slice(start, stop)
        values = {name: None if getattr(self, name) is None else getattr(self, name)[rows]
                  for name in _TOKEN_ROW_TENSORS}
        if self.row_tokens is None:
            return replace(self, **values, tokens=int((self.segment[rows] >= 0).sum()))
        row_tokens = self.row_tokens[rows]
        return replace(self, **values, tokens=int(row_tokens.sum()), row_tokens=row_tokens)


@dataclass(kw_only=True)
class SequenceBatch(_Movable):
    """One record per row of a classification cache."""

    input_ids: Tensor  # int64 [B, L]
    attention_mask: Tensor  # int64 [B, L]
    class_logprobs: Tensor  # float32 [B, C]
    labels: Tensor  # int64 [B], -1 = no gold label
    record_ids: np.ndarray  # uint64 [B]
    langs: list[str]
    cursors: list[tuple[int, int, int, int]]
    tokens: int
    row_tokens: np.ndarray | None = None  # int64 [B]: tokens per record (counted without the device)

    def decoded(self) -> SequenceBatch:
        """Itself: class log-probabilities are packed as float32 (they are few)."""
        return self

    def row_slice(self, start: int, stop: int) -> SequenceBatch:
        """Records ``start:stop`` as a batch of their own (views, on the batch's device)."""
        rows = slice(start, stop)
        mask = self.attention_mask[rows]
        row_tokens = None if self.row_tokens is None else self.row_tokens[rows]
        return replace(self, input_ids=self.input_ids[rows], attention_mask=mask,
                       class_logprobs=self.class_logprobs[rows], labels=self.labels[rows],
                       record_ids=self.record_ids[rows], langs=self.langs[rows], cursors=self.cursors[rows],
                       tokens=int(mask.sum() if row_tokens is None else row_tokens.sum()), row_tokens=row_tokens)


_TOKEN_ROW_TENSORS = ("input_ids", "position_ids", "segment", "label_mask", "hard_targets", "topk_ids",
                      "topk_logprobs", "sample_ids", "sample_counts", "entropy", "target_logprob")


def row_pieces(batch: TokenBatch | SequenceBatch | None, *, rows: int,
               piece_rows: int | None) -> list[TokenBatch | SequenceBatch | None]:
    """A batch of (at most) ``rows`` rows cut into ``ceil(rows / piece_rows)`` pieces of
    ``piece_rows`` rows, in order (None, or at least ``rows``: the batch whole). A piece with
    no tokens (the padding rows of a short token batch, rows past a short classification
    batch, or no batch at all) is None. The count depends on ``rows`` only, so ranks whose
    batches differ in size still take the same number of pieces."""
    if piece_rows is None or piece_rows >= rows:
        return [batch]
    starts = range(0, rows, piece_rows)
    if batch is None:
        return [None] * len(starts)
    pieces = (batch.row_slice(start, start + piece_rows) for start in starts)  # past the last row: empty
    return [piece if piece.tokens else None for piece in pieces]


def rows_for(batch_tokens: int, length: int) -> int:
    """Rows of ``length`` slots in a batch of about ``batch_tokens`` tokens (at least one)."""
    return max(1, batch_tokens // length)


class TokenPacker:
    """Packs records of ``layout`` into ``TokenBatch``es of ``rows x length`` slots; with
    ``decode=False`` their top-k stay in the stored types (see :meth:`TokenBatch.decoded`)."""

    def __init__(self, layout: RecordLayout, *, rows: int, length: int, pad_id: int = 0,
                 decode: bool = True) -> None:
        if not layout.is_token_level:
            raise ValueError(f"TokenPacker packs token-level caches, not {layout.kind}")
        self.layout, self.rows, self.length, self.pad_id = layout, rows, length, pad_id
        self.decode = decode
        self.stored = StoredTopK(layout.id_type, layout.value_codec) if layout.has_topk else None
        self._stored_specs = self.array_specs(decoded=False)

    def pack(self, records: Iterable[Any], *, ring: SlotRing | None = None) -> Iterator[TokenBatch]:
        """Batches of the records in stream order (the last one may hold fewer rows' worth),
        in ``ring``'s shared memory when one is given."""
        pending: list[Any] = []
        row, used = 0, 0
        for record in records:
            n = len(record.input_ids)
            if n > self.length:
                raise ValueError(
                    f"record {record.record_id} has {n} tokens, more than the batch length "
                    f"{self.length}; use a length of at least the cache's windows.max_length")
            if used + n > self.length:
                row, used = row + 1, 0
                if row == self.rows:
                    yield self.collate(pending, ring=ring)
                    pending, row = [], 0
            pending.append(record)
            used += n
        if pending:
            yield self.collate(pending, ring=ring)

    def array_specs(self, *, decoded: bool) -> tuple[ArraySpec, ...]:
        """The arrays of a batch, with the value each starts from; top-k in their stored
        types, or widened (``decoded``)."""
        rows, length, layout = self.rows, self.length, self.layout
        specs = [ArraySpec("input_ids", np.dtype(np.int64), (rows, length), self.pad_id),
                 ArraySpec("position_ids", np.dtype(np.int64), (rows, length)),
                 ArraySpec("segment", np.dtype(np.int32), (rows, length), -1),
                 ArraySpec("label_mask", np.dtype(bool), (rows, length), False),
                 ArraySpec("hard_targets", np.dtype(np.int64), (rows, length), IGNORE_INDEX)]
        if self.stored is not None:  # left as they are: labelled slots are copied in, the rest zeroed
            ids, values = ((np.int64, np.float32) if decoded
                           else (self.stored.id_transport_dtype, self.stored.value_dtype))
            specs += [ArraySpec("topk_ids", np.dtype(ids), (rows, length, layout.k)),
                      ArraySpec("topk_logprobs", np.dtype(values), (rows, length, layout.k))]
        if layout.has_samples:
            specs += [ArraySpec("sample_ids", np.dtype(np.int64), (rows, length, layout.samples), 0),
                      ArraySpec("sample_counts", np.dtype(np.float32), (rows, length, layout.samples), 0)]
        for name in self.per_position_columns:
            specs.append(ArraySpec(name, np.dtype(np.float32), (rows, length), np.nan))
        return tuple(specs)

    @property
    def per_position_columns(self) -> tuple[str, ...]:
        """The optional float columns of one value per labelled position that the cache stores."""
        layout = self.layout
        return tuple(name for name, stored in (("entropy", layout.entropy),
                                               ("target_logprob", layout.target_logprob)) if stored)

    def slot_ring(self, *, capacity: int = 6) -> SlotRing:
        """Reusable shared memory for the batches of this packer, for a DataLoader worker."""
        return SlotRing(self.array_specs(decoded=self.decode), capacity=capacity)

    def collate(self, records: Sequence[Any], *, ring: SlotRing | None = None) -> TokenBatch:
        """One batch of ``records`` (which must fit ``rows x length`` when laid in order), in
        ``ring``'s shared memory when one is given."""
        rows, length, layout = self.rows, self.length, self.layout
        slot = None
        if ring is not None:
            arrays, slot = ring.take()
        else:
            arrays = new_arrays(self._stored_specs)
        if slot is not None and self.decode and self.stored is not None:
            stored_arrays = new_arrays(tuple(s for s in self._stored_specs if s.name.startswith("topk_")))
        else:
            stored_arrays = arrays
        input_ids, position_ids, segment = arrays["input_ids"], arrays["position_ids"], arrays["segment"]
        label_mask, hard = arrays["label_mask"], arrays["hard_targets"]
        topk_ids, topk_values = stored_arrays.get("topk_ids"), stored_arrays.get("topk_logprobs")
        sample_ids, sample_counts = arrays.get("sample_ids"), arrays.get("sample_counts")
        per_position = [(name, arrays[name]) for name in self.per_position_columns]

        row, used, tokens = 0, 0, 0
        ends = np.zeros(rows, dtype=np.int64)
        for index, record in enumerate(records):
            n = len(record.input_ids)
            if used + n > length:
                ends[row] = used
                row, used = row + 1, 0
            if row >= rows:
                raise ValueError(f"{len(records)} records do not fit {rows} rows of {length} tokens")
            start, stop, first = used, used + n, used + record.context_length
            input_ids[row, start:stop] = record.input_ids
            position_ids[row, start:stop] = np.arange(n)
            segment[row, start:stop] = index
            label_mask[row, first:stop] = True
            hard[row, first:stop - 1] = record.input_ids[record.context_length + 1:]
            if topk_ids is not None:
                _fill_unlabelled(topk_ids[row, start:first], topk_values[row, start:first])  # left context
                topk_ids[row, first:stop] = id_bits(record.topk_ids, layout.id_type)
                topk_values[row, first:stop] = record.topk_values
            if sample_ids is not None:
                _scatter_samples(record, sample_ids[row, first:stop], sample_counts[row, first:stop])
            for name, array in per_position:
                values = getattr(record, name, None)
                if values is not None:  # else NaN: not available
                    array[row, first:stop] = values
            used, tokens = stop, tokens + n
        ends[row] = used
        for r in range(rows):  # padding is its own segment of restarting positions
            position_ids[r, ends[r]:] = np.arange(length - ends[r])
            if topk_ids is not None:
                _fill_unlabelled(topk_ids[r, ends[r]:], topk_values[r, ends[r]:])

        batch = TokenBatch(
            **{name: torch.from_numpy(array) for name, array in {**arrays, **stored_arrays}.items()},
            record_ids=np.array([r.record_id for r in records], dtype=np.uint64),
            langs=[r.lang for r in records], cursors=[tuple(r.cursor) for r in records], tokens=tokens,
            row_tokens=ends, stored=self.stored,
        )
        if self.decode:
            batch = batch.decoded()
            if stored_arrays is not arrays:  # the widened top-k go into the slot, not new memory
                batch = replace(batch, topk_ids=torch.from_numpy(arrays["topk_ids"]).copy_(batch.topk_ids),
                                topk_logprobs=torch.from_numpy(arrays["topk_logprobs"]).copy_(batch.topk_logprobs))
        if slot is not None:
            batch.attach_slot(slot)
        return batch


def _fill_unlabelled(ids: np.ndarray, values: np.ndarray) -> None:
    """Stored slots with no label (context, padding) hold zeros, so batches are reproducible
    byte for byte; decoding gives them id 0 and log-probability -inf, i.e. no mass."""
    ids.fill(0)
    values.fill(0)


def _scatter_samples(record: Any, ids_out: np.ndarray, counts_out: np.ndarray) -> None:
    """Spread a record's flat (offsets, ids, counts) draws into ``[positions, S]`` slots."""
    offsets = record.sample_offsets
    per_position = np.diff(offsets)
    if per_position.size == 0:
        return
    if per_position.max(initial=0) > ids_out.shape[1]:
        raise ValueError(f"record {record.record_id} has a position with {per_position.max()} distinct "
                         f"draws, more than the cache's samples ({ids_out.shape[1]})")
    position = np.repeat(np.arange(per_position.size), per_position)
    column = np.arange(offsets[-1] - offsets[0]) - np.repeat(offsets[:-1] - offsets[0], per_position)
    ids_out[position, column] = record.sample_ids
    counts_out[position, column] = record.sample_counts


class SequencePacker:
    """One record per row, ``rows`` rows per batch, right-padded to the longest record."""

    def __init__(self, layout: RecordLayout, *, rows: int, pad_id: int = 0) -> None:
        if layout.kind != "sequence_probs":
            raise ValueError(f"SequencePacker batches sequence_probs caches, not {layout.kind}")
        self.layout, self.rows, self.pad_id = layout, rows, pad_id

    def pack(self, records: Iterable[Any]) -> Iterator[SequenceBatch]:
        pending: list[Any] = []
        for record in records:
            pending.append(record)
            if len(pending) == self.rows:
                yield self.collate(pending)
                pending = []
        if pending:
            yield self.collate(pending)

    def collate(self, records: Sequence[Any]) -> SequenceBatch:
        input_ids, attention_mask = right_pad([r.input_ids for r in records], pad_id=self.pad_id)
        return SequenceBatch(
            input_ids=input_ids, attention_mask=attention_mask,
            class_logprobs=torch.from_numpy(np.stack([r.class_logprobs for r in records]).astype(np.float32)),
            labels=torch.tensor([int(r.label) for r in records], dtype=torch.int64),
            record_ids=np.array([r.record_id for r in records], dtype=np.uint64),
            langs=[r.lang for r in records], cursors=[tuple(r.cursor) for r in records],
            tokens=int(attention_mask.sum()), row_tokens=attention_mask.sum(1).numpy(),
        )


class PackedBatches(torch.utils.data.IterableDataset):
    """The batches of a packer over a record dataset, built inside the DataLoader workers.

    ``dataset`` stays reachable as ``.dataset`` in the main process, where the training loop
    reports consumed batches to it (``dataset.observe(batch.cursors)``, once per batch) for
    exact resume. Each batch is packed from the records of one of the dataset's lanes, and
    batches come from the lanes in turn (``CacheDataset.lane_streams``), so the sequence of
    batches does not depend on the number of workers that share the lanes.
    Inside a DataLoader worker, token batches are packed into the worker's ring of reusable
    shared memory (:mod:`~logitcache.pipeline.distill.shared_batches`), kept across epochs.
    """

    def __init__(self, dataset: Any, packer: TokenPacker | SequencePacker, *, slots: int = 6) -> None:
        super().__init__()
        self.dataset, self.packer, self.slots = dataset, packer, slots
        self._ring: SlotRing | None = None

    def __iter__(self) -> Iterator[TokenBatch | SequenceBatch]:
        lanes = self.dataset.lane_streams() if hasattr(self.dataset, "lane_streams") else [iter(self.dataset)]
        if isinstance(self.packer, TokenPacker) and self.slots and torch.utils.data.get_worker_info() is not None:
            if self._ring is None:
                self._ring = self.packer.slot_ring(capacity=self.slots)
            return round_robin([self.packer.pack(lane, ring=self._ring) for lane in lanes])
        return round_robin([self.packer.pack(lane) for lane in lanes])
