"""Label one work unit: its windows through the teacher, out as one RecordBlock.

The unit's windows are batched by a token budget (:mod:`~logitcache.pipeline.capture.batches`):
packed several to a row when ``teacher.packing`` is auto and the teacher keeps packed windows
apart (probed once, :meth:`~logitcache.pipeline.capture.teacher.Teacher.packed_rows`), else
one window per padded row. Padding costs compute and buys nothing, and many short windows
next to a few long ones pad a lot; packing changes only how the forward runs, since every
window attends only to itself and its labels are gathered by window. So only the labelled
positions (after each window's left context, inside the window: never another window's
tokens or padding) are gathered from the final hidden states and handed to
:func:`~logitcache.pipeline.capture.soft_labels.label_positions`, which runs the LM head, the
float32 log-softmax and the top-k / sampling / entropy in chunks on the device, together
with each position's actual next token when the layout stores the teacher's log-probability
of it (``target_logprob``; a window's last token has no next token in the window: NaN, even
where a packed row goes on with the next window). The unit's records come out in window
order whatever the batches were, so the shard is the same with packing on or off, up to the
float rounding that any other batching (another ``batch_tokens``) changes too.

Overlap: on CUDA the results of batch *i* are copied to pinned host memory with an event
recorded behind them; the host waits for that event (not for the whole stream) only after
batch *i+1* has been queued, so the GPU computes while the host assembles. On the CPU the
forward is synchronous; the overlap there comes from the build committing the previous
unit on another thread while this one is labelled.

Sampling is seeded per unit, from (soft_labels.seed, unit id), and the batches of a unit
are a pure function of its windows, so re-running a unit gives the same records.

Out of memory. A batch whose forward runs out of device memory is split by rows in two
halves and each is retried (recursively, down to one row), after the device cache is emptied
and the sampling generator rewound to where the batch started. The halves keep the batch's
rows in order and its width, and sampling draws one uniform per position in position order,
so the records are those of an unsplit run. A single row (one window, or the windows packed
into it) that still does not fit raises :class:`TeacherOutOfMemoryError`.
``UnitStats.oom_splits`` counts the splits.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from logitcache.errors import TeacherError
from logitcache.pipeline.capture.batches import Batch, unit_batches
from logitcache.pipeline.capture.soft_labels import (
    HostLabels,
    PositionLabelsNumpy,
    SoftLabelSpec,
    label_positions,
    logits_labels,
)
from logitcache.pipeline.capture.teacher import Teacher
from logitcache.pipeline.common.windows import Window
from logitcache.storage_schemas.id_codec import encode_ids
from logitcache.storage_schemas.layout import RecordLayout
from logitcache.storage_schemas.records import RecordBlock
from logitcache.storage_schemas.value_codecs import get_value_codec


@dataclass(kw_only=True)
class UnitStats:
    windows: int = 0
    tokens: int = 0
    positions: int = 0
    padded_tokens: int = 0
    batches: int = 0
    oom_splits: int = 0  # batches split in two after the device ran out of memory
    packing: str = "padded"  # packed: windows of several documents share rows; padded: one window a row
    packing_mask: str | None = None  # packed rows' explicit block mask, when the teacher needs one
    packing_note: str = ""  # why windows were not packed although teacher.packing is auto
    forward_seconds: float = 0.0
    entropy_sum: dict[str, float] = field(default_factory=dict)  # per language, over positions
    entropy_positions: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "windows": self.windows, "tokens": self.tokens, "positions": self.positions,
            "padded_tokens": self.padded_tokens, "batches": self.batches, "oom_splits": self.oom_splits,
            "packing": self.packing, **({"packing_mask": self.packing_mask} if self.packing_mask else {}),
            **({"packing_note": self.packing_note} if self.packing_note else {}),
            "forward_seconds": round(self.forward_seconds, 4),
            "entropy_sum": {k: round(v, 4) for k, v in self.entropy_sum.items()},
            "entropy_positions": dict(self.entropy_positions),
        }


#: The values of ``teacher.packing``.
PACKING = ("auto", "off")


class TeacherOutOfMemoryError(TeacherError):
    """One row alone (a window, or the windows packed into it) does not fit the device memory."""


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def unit_seed(base_seed: int, unit_id: str) -> int:
    digest = hashlib.blake2b(f"{base_seed}\x00{unit_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _labelled_slots(batch: Batch, windows: list[Window]) -> tuple[torch.Tensor, np.ndarray]:
    """``[B, L]`` bool: the slots to label (in their window, after its left context); and the
    window of each such slot, in row-major order (the order ``hidden[mask]`` takes them)."""
    window, offset = batch.slots()
    context = np.array([windows[i].context_length for i in batch.indices], dtype=np.int64)
    mask = (window >= 0) & (offset >= context[window])  # context[-1] on padding is masked anyway
    return torch.from_numpy(mask), batch.indices[window[mask]]


def _next_tokens(batch: Batch) -> torch.Tensor:
    """``[B, L]`` int64: each slot's next token in its own window; -1 at the window's last
    token (whatever follows it in a packed row) and on padding."""
    window, offset = batch.slots()
    ids = batch.input_ids.to(torch.int64)
    out = torch.full_like(ids, -1)
    out[:, :-1] = ids[:, 1:]
    last = np.append(batch.lengths, 0)[window] - 1  # window -1 (padding): -1, so never below
    out[torch.from_numpy(offset >= last)] = -1
    return out


def _packs(teacher: Teacher, layout: RecordLayout, packing: str, stats: UnitStats) -> bool:
    """Whether this unit's windows share rows: ``teacher.packing`` asks for it, the records
    are per token, and the teacher keeps packed windows apart (else a note says why not)."""
    if packing not in PACKING:
        raise ValueError(f"packing must be one of {', '.join(PACKING)}, got {packing!r}")
    if packing == "off" or layout.kind == "sequence_probs":
        return False
    probe = teacher.packed_rows()
    stats.packing = "packed" if probe.ok else "padded"
    stats.packing_mask, stats.packing_note = probe.mask_form, probe.note
    return probe.ok


#: One batch's results: the window of each labelled position (of each row, for sequence_probs)
#: and its labels (a ``[rows, classes]`` array of class log-probabilities, for sequence_probs).
BatchLabels = tuple[np.ndarray, PositionLabelsNumpy | np.ndarray]


def label_unit(
    teacher: Teacher, windows: list[Window], *, spec: SoftLabelSpec, layout: RecordLayout,
    batch_tokens: int, packing: str, seed: int, store_entropy: bool,
) -> tuple[RecordBlock, UnitStats]:
    """Run the teacher over ``windows`` and return their records in window order."""
    stats = UnitStats(windows=len(windows))
    lengths = np.array([len(w.input_ids) for w in windows], dtype=np.int64)
    per_batch = label_windows(teacher, windows, spec=spec, layout=layout, batch_tokens=batch_tokens,
                              packing=packing, seed=seed, stats=stats)
    block = _assemble(windows, lengths, per_batch, layout=layout, store_entropy=store_entropy)
    stats.tokens = block.num_tokens
    stats.positions = block.num_positions if layout.is_token_level else 0
    if layout.is_token_level and per_batch:
        _entropy_stats(per_batch, windows, stats)
    return block, stats


def label_windows(
    teacher: Teacher, windows: list[Window], *, spec: SoftLabelSpec, layout: RecordLayout,
    batch_tokens: int, packing: str, seed: int, stats: UnitStats, gather: list[np.ndarray] | None = None,
) -> list[BatchLabels]:
    """The teacher's labels of ``windows``, batch by batch (in batch order, not window order:
    :func:`in_window_order` restores it). ``packing`` is ``teacher.packing`` (auto: packed
    rows when the teacher allows them; off: padded rows). ``gather``, one ``[labelled
    positions, m]`` int64 array per window (-1 for none), asks for the log-probabilities of
    those ids too (``gathered_logprobs``). Counts batches, padding, splits and time into ``stats``."""
    batches = unit_batches(windows, batch_tokens=batch_tokens, pad_id=teacher.pad_token_id,
                           packed=_packs(teacher, layout, packing, stats))
    generator = torch.Generator(device=teacher.label_device).manual_seed(seed)

    per_batch: list[BatchLabels] = []
    pending: tuple[np.ndarray, HostLabels] | None = None

    def forward(batch: Batch) -> tuple[np.ndarray, HostLabels | np.ndarray]:
        if layout.kind == "sequence_probs":
            class_lp = teacher.class_logprobs(batch.input_ids, batch.attention_mask)
            return batch.indices, class_lp.float().cpu().numpy()
        mask, owners = _labelled_slots(batch, windows)
        targets = _next_tokens(batch)[mask] if layout.target_logprob else None
        ids = None if gather is None else torch.from_numpy(np.concatenate([gather[i] for i in batch.indices]))
        if teacher.split_head_ok:
            hidden = (teacher.packed_hidden_states(batch.input_ids, batch.position_ids) if batch.packed
                      else teacher.hidden_states(batch.input_ids, batch.attention_mask))
            labels = label_positions(hidden[mask.to(hidden.device)], teacher.head, spec, generator=generator,
                                     targets=targets, gather=ids)
        else:
            logits = (teacher.packed_logits(batch.input_ids, batch.position_ids) if batch.packed
                      else teacher.logits(batch.input_ids, batch.attention_mask))
            labels = logits_labels(logits[mask.to(logits.device)], spec, generator=generator, targets=targets,
                                   gather=ids)
        return owners, labels.start_host_copy()

    def run(batch: Batch) -> list[tuple[np.ndarray, HostLabels | np.ndarray]]:
        """The batch's results, split into parts as often as the device memory needs."""
        rewind = generator.get_state()
        try:
            done = [forward(batch)]
        except Exception as error:  # noqa: BLE001 - only out-of-memory errors are handled
            if not is_out_of_memory(error):
                raise
            if batch.num_rows == 1:
                raise _too_large(batch, error) from None
            del error  # drop its frames, which hold the batch's device tensors
            if teacher.device.type == "cuda":
                torch.cuda.empty_cache()
            generator.set_state(rewind)
            stats.oom_splits += 1
            first, second = batch.halves()
            return run(first) + run(second)
        stats.batches += 1
        stats.padded_tokens += batch.padded_tokens
        return done

    started = time.perf_counter()
    for batch in batches:
        for owners, result in run(batch):
            if isinstance(result, np.ndarray):  # sequence_probs: already on the host
                per_batch.append((owners, result))
                continue
            if pending is not None:
                per_batch.append((pending[0], pending[1].wait()))
            pending = (owners, result)
    if pending is not None:
        per_batch.append((pending[0], pending[1].wait()))
    stats.forward_seconds += time.perf_counter() - started
    return per_batch


def _too_large(batch: Batch, error: BaseException) -> TeacherOutOfMemoryError:
    """The error for a single row that does not fit the device memory."""
    what = f"one window of {int(batch.lengths[0])} tokens"
    if len(batch.lengths) > 1:
        what = f"one row of {batch.real_tokens} tokens ({len(batch.lengths)} windows packed together)"
    return TeacherOutOfMemoryError(
        f"{what} does not fit the teacher's device memory even alone "
        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
        "lower windows.max_length (and teacher.batch_tokens), or use a smaller teacher.dtype "
        "or a device with more memory")


def in_window_order(per_batch: list[BatchLabels], name: str, width: int | None = None) -> np.ndarray:
    """Field ``name`` of the batches' position labels, concatenated in window order (each
    window's positions in order); ``width`` shapes the empty result of no batches."""
    owners = np.concatenate([o for o, _ in per_batch]) if per_batch else np.zeros(0, np.int64)
    order = np.argsort(owners, kind="stable")  # window order; positions stay in order inside
    parts = [getattr(labels, name) for _, labels in per_batch]
    if not parts:
        return np.zeros((0, width) if width else (0,))
    return np.concatenate(parts)[order]


def class_rows(per_batch: list[BatchLabels], *, windows: int, num_classes: int) -> np.ndarray:
    """sequence_probs: the ``[windows, classes]`` float32 class log-probabilities in window order."""
    rows = np.zeros((windows, num_classes), dtype=np.float32)
    for indices, class_lp in per_batch:
        rows[indices] = class_lp
    return rows


def _entropy_stats(per_batch, windows: list[Window], stats: UnitStats) -> None:
    for owners, labels in per_batch:
        if labels.entropy is None or not len(owners):
            continue
        langs = np.array([windows[i].lang for i in owners], dtype=object)
        for lang in np.unique(langs):
            values = labels.entropy[langs == lang]
            stats.entropy_sum[lang] = stats.entropy_sum.get(lang, 0.0) + float(values.sum())
            stats.entropy_positions[lang] = stats.entropy_positions.get(lang, 0) + int(values.size)


def _ragged_take(offsets: np.ndarray, values: list[np.ndarray], order: np.ndarray):
    """Reorder ragged rows: rows ``order`` of (offsets, *values), with new offsets."""
    lengths = np.diff(offsets)[order]
    new_offsets = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    gather = np.repeat(offsets[:-1][order] - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    return new_offsets, [v[gather] for v in values]


def _assemble(windows: list[Window], lengths: np.ndarray, per_batch, *, layout: RecordLayout,
              store_entropy: bool) -> RecordBlock:
    n = len(windows)
    token_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=token_offsets[1:])
    block = RecordBlock(
        record_id=np.array([w.record_id for w in windows], dtype=np.uint64),
        doc_key=np.array([w.doc_key for w in windows], dtype=object),
        lang=np.array([w.lang for w in windows], dtype=object),
        token_offsets=token_offsets,
        input_ids=(np.concatenate([w.input_ids for w in windows]) if n else np.zeros(0)).astype(np.uint32),
    )
    codec = get_value_codec(layout.value_codec)
    if layout.kind == "sequence_probs":
        block.class_logprobs = codec.encode(class_rows(per_batch, windows=n, num_classes=layout.num_classes))
        block.label = np.array([-1 if w.label is None else w.label for w in windows], dtype=np.int32)
        return block

    block.context_length = np.array([w.context_length for w in windows], dtype=np.uint32)
    owners = np.concatenate([o for o, _ in per_batch]) if per_batch else np.zeros(0, np.int64)
    order = np.argsort(owners, kind="stable")  # window order; positions stay in order inside
    labels = [lab for _, lab in per_batch]

    if layout.has_topk:
        ids = in_window_order(per_batch, "topk_ids", layout.k)
        block.topk_ids = encode_ids(ids.astype(np.int64), id_type=layout.id_type, vocab_size=layout.vocab_size).reshape(-1, layout.k)
        values = in_window_order(per_batch, "topk_logprobs", layout.k).astype(np.float32)
        block.topk_logprobs = codec.encode(values).reshape(-1, layout.k)
    if layout.has_samples:
        offsets, sample_ids, sample_counts = _concat_ragged(labels)
        offsets, (sample_ids, sample_counts) = _ragged_take(offsets, [sample_ids, sample_counts], order)
        block.sample_offsets = offsets
        block.sample_ids = encode_ids(sample_ids, id_type=layout.id_type, vocab_size=layout.vocab_size)
        if sample_counts.size and int(sample_counts.max()) > np.iinfo(np.uint16).max:
            raise ValueError("a sample count exceeds 65535; lower soft_labels.samples")
        block.sample_counts = sample_counts.astype(np.uint16)
    if store_entropy:
        block.entropy = in_window_order(per_batch, "entropy").astype(np.float16)
    if layout.target_logprob:
        # float16, like entropy: half the bytes of float32, and its rounding (at most 2**-11
        # relative, 0.004 nats at a log-probability of -10) averages out in a held-out CE
        block.target_logprob = in_window_order(per_batch, "target_logprob").astype(np.float16)
    return block


def _concat_ragged(labels: list[PositionLabelsNumpy]):
    offsets, ids, counts, base = [np.zeros(1, dtype=np.int64)], [], [], 0
    for lab in labels:
        offsets.append(lab.sample_offsets[1:] - lab.sample_offsets[0] + base)
        base += int(lab.sample_offsets[-1] - lab.sample_offsets[0])
        ids.append(lab.sample_ids)
        counts.append(lab.sample_counts)
    if not ids:
        return np.concatenate(offsets), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(offsets), np.concatenate(ids), np.concatenate(counts)
