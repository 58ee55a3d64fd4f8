"""One student's training state and its step on a batch: loss, accumulation, optimizer, schedule.

Stage two feeds every batch it reads to every student; each student keeps its own
:class:`StudentRun`: AdamW, a learning-rate schedule (linear warmup, then cosine or linear
decay to 10% of the peak, or constant), its own batch size (the shared batch whole, or cut
into row pieces of the student's ``batch_tokens``, each a micro-batch), gradient
accumulation over ``grad_accum`` micro-batches, and counters. A run's whole state (model aside, which is saved with
``save_pretrained``) round-trips through :meth:`StudentRun.state_dict`, including gradients
accumulated from a batch in the middle of an accumulation, so a resumed run takes exactly
the steps an uninterrupted one would.

Under torchrun (``ranks.distributed``) every rank runs the same steps on its own batches and
the run trains on their union: each rank scales its loss by its share of the union's
labelled positions (:func:`union_share`), gradients and the log window are summed over
ranks before each optimizer step, and the counters (tokens, positions) count all ranks.
Before a checkpoint, :meth:`StudentRun.gather_pending` sums the pending gradients onto rank
0 (the others' become empty), so the saved state is the union's, which any number of ranks
resumes: rank 0 loads it, the others start their share from zero.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from logitcache.config import LossConfig, OptimizerConfig
from logitcache.pipeline.common.padding import right_pad
from logitcache.pipeline.distill.collate import SequenceBatch, TokenBatch, row_pieces
from logitcache.pipeline.distill.distributed import Ranks
from logitcache.pipeline.distill.losses import (
    LossOutput,
    SparseTargets,
    distillation_loss,
    sequence_distillation_loss,
)
from logitcache.pipeline.distill.students import Student

#: Fraction of the peak learning rate that the cosine and linear schedules decay to.
FINAL_LR_FRACTION = 0.1
#: What the log window sums between optimizer steps; all of it adds up over ranks.
_WINDOW_KEYS = ("loss", "kd", "ce", "batches", "positions", "tokens", "kd_ce_batches")


def lr_factor(step: int, *, cfg: OptimizerConfig, total_steps: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * shape


def make_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-D parameters) get no weight decay."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def token_batch_loss(student: Student, batch: TokenBatch) -> LossOutput:
    """The student's loss on a packed batch: hidden states for all slots, then the chunked
    head + divergence on the labelled positions only."""
    batch = batch.decoded()  # a no-op unless the top-k are still in their stored types
    with student.autocast():
        hidden = student.hidden_states(batch.input_ids, batch.position_ids)
        return packed_distillation_loss(
            hidden, student.head, label_mask=batch.label_mask, hard_targets=batch.hard_targets,
            topk_ids=batch.topk_ids, topk_logprobs=batch.topk_logprobs, sample_ids=batch.sample_ids,
            sample_counts=batch.sample_counts, entropy=batch.entropy, loss=student.cfg.loss,
            vocab_size=student.target_width)


def packed_distillation_loss(hidden: Tensor, head: Callable[[Tensor], Tensor], *, label_mask: Tensor,
                             hard_targets: Tensor, topk_ids: Tensor | None = None,
                             topk_logprobs: Tensor | None = None, sample_ids: Tensor | None = None,
                             sample_counts: Tensor | None = None, entropy: Tensor | None = None,
                             loss: LossConfig, vocab_size: int) -> LossOutput:
    """The loss of packed rows from their hidden states ``[B, L, H]`` (or anything ``head``
    maps to logits) and the batch's ``[B, L, ...]`` teacher targets, on the labelled slots
    only: the one computation behind ``logitcache train`` and the training-stack integrations."""
    mask = label_mask

    def at_labels(tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else tensor[mask]

    targets = SparseTargets(topk_ids=at_labels(topk_ids), topk_logprobs=at_labels(topk_logprobs),
                            sample_ids=at_labels(sample_ids), sample_counts=at_labels(sample_counts),
                            kind=cache_kind_of(has_topk=topk_ids is not None, has_samples=sample_ids is not None))
    return distillation_loss(hidden[mask], head, targets, hard_targets[mask], cfg=loss, vocab_size=vocab_size,
                             teacher_entropy=at_labels(entropy))


def cache_kind_of(*, has_topk: bool, has_samples: bool) -> str:
    """The token-level cache kind whose batches carry top-k and/or draws."""
    if has_topk and has_samples:
        return "token_topk_sampled"
    return "token_topk" if has_topk else "token_sampled"


@dataclass(kw_only=True)
class StudentTexts:
    """A classification student's own tokenization of its text column, by record id."""

    ids_by_record: dict[int, np.ndarray]
    missing: int = 0  # cached records met in batches that had no text in the column

    def inputs(self, batch: SequenceBatch, *, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
        """(input_ids, attention_mask, rows kept) for the batch's records that have a text."""
        rows = [i for i, rid in enumerate(batch.record_ids.tolist()) if int(rid) in self.ids_by_record]
        self.missing += len(batch.record_ids) - len(rows)
        ids, mask = right_pad([self.ids_by_record[int(batch.record_ids[i])] for i in rows], pad_id=pad_id)
        return ids, mask, torch.tensor(rows, dtype=torch.int64)


def student_class_logits(student: Student, batch: SequenceBatch,
                         texts: StudentTexts | None) -> tuple[Tensor, Tensor | None] | None:
    """The student's class logits on a classification batch, and which batch rows they are
    for (None: all of them; a student with its own texts skips records without one). None
    when no record of the batch has a text."""
    rows = None
    if texts is None:
        input_ids, attention_mask = batch.input_ids, batch.attention_mask
    else:
        input_ids, attention_mask, rows = texts.inputs(batch, pad_id=student.pad_token_id)
        if rows.numel() == 0:
            return None
        input_ids, attention_mask = input_ids.to(student.device), attention_mask.to(student.device)
    with student.autocast():
        logits = student.class_logits(input_ids, attention_mask)
    return logits.float(), rows


def sequence_batch_loss(student: Student, batch: SequenceBatch, texts: StudentTexts | None) -> LossOutput | None:
    """The student's loss on a classification batch (None when none of its records has a text)."""
    result = student_class_logits(student, batch, texts)
    if result is None:
        return None
    logits, rows = result
    teacher, labels = batch.class_logprobs, batch.labels
    if rows is not None:
        teacher, labels = teacher[rows.to(teacher.device)], labels[rows.to(labels.device)]
    return sequence_distillation_loss(logits, teacher, labels, cfg=student.cfg.loss)


def union_share(out: LossOutput, *, kd_positions: float, ce_positions: float, alpha: float) -> LossOutput:
    """This rank's part of the loss of the union of all ranks' batches, which hold
    ``kd_positions`` labelled positions and ``ce_positions`` hard targets in all: the rank's
    means weighted by its share of each count, so that the parts (and their gradients) sum
    over ranks to the union's loss (and gradient)."""
    share = out.kd_positions / max(kd_positions, 1.0)
    kd = out.kd * share
    ce = out.ce * (out.ce_positions / max(ce_positions, 1.0))
    return LossOutput(total=alpha * kd + (1.0 - alpha) * ce, kd=kd, ce=ce,
                      kd_positions=out.kd_positions, ce_positions=out.ce_positions,
                      kd_logged=None if out.kd_logged is None else out.kd_logged * share,
                      kd_log_name=out.kd_log_name)


@dataclass(kw_only=True)
class StudentRun:
    """Training state of one student across batches (on one rank, see the module docstring)."""

    student: Student
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    texts: StudentTexts | None = None
    ranks: Ranks | None = None  # None: a single process
    shared_rows: int = 0  # rows of a shared batch (train.batch_tokens)
    piece_rows: int | None = None  # rows of this student's micro-batches (its batch_tokens); None: whole
    step: int = 0  # optimizer steps taken
    micro: int = 0  # batches accumulated since the last step
    tokens: int = 0  # tokens read by this student (all ranks) up to the last step
    seconds: float = 0.0  # time spent in this student's forward/backward/step
    window: dict[str, float] = field(default_factory=dict)  # sums over the current accumulation

    def __post_init__(self) -> None:
        if self.ranks is None:
            self.ranks = Ranks(device=self.student.device)

    @classmethod
    def create(cls, student: Student, *, total_steps: int, texts: StudentTexts | None = None,
               ranks: Ranks | None = None, shared_rows: int = 0, piece_rows: int | None = None) -> StudentRun:
        optimizer = make_optimizer(student.model, student.cfg.optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, cfg=student.cfg.optimizer, total_steps=total_steps))
        return cls(student=student, optimizer=optimizer, scheduler=scheduler, total_steps=total_steps, texts=texts,
                   ranks=ranks, shared_rows=shared_rows, piece_rows=piece_rows)

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def train_on_shared(self, batch: TokenBatch | SequenceBatch | None) -> Iterator[dict[str, float]]:
        """Train on one shared batch, whole or cut into this student's micro-batches of
        ``piece_rows`` rows, each a :meth:`train_on`; yields the log row of each optimizer step
        as it is taken (so the caller may evaluate the model between micro-batches). Pieces
        without tokens on every rank (the padding rows of a short batch) are no micro-batch,
        and the pieces past the run's last step are left untrained."""
        pieces = row_pieces(batch, rows=self.shared_rows, piece_rows=self.piece_rows)
        for piece in pieces:
            if self.done:
                return
            if len(pieces) > 1 and not self.ranks.any(piece is not None):  # padding rows on every rank
                continue
            row = self.train_on(piece)
            if row is not None:
                yield row

    def train_on(self, batch: TokenBatch | SequenceBatch | None) -> dict[str, float] | None:
        """Forward and backward on one batch; returns the step's log row when an optimizer step
        was taken, else None. Under torchrun every rank calls this for the same batch index,
        with None where its stream has run dry."""
        start = time.perf_counter()
        student = self.student
        out = None
        if isinstance(batch, TokenBatch):
            out = token_batch_loss(student, batch)
        elif batch is not None:
            out = sequence_batch_loss(student, batch, self.texts)
        if out is not None and not (out.kd_positions or out.ce_positions):
            out = None  # nothing to learn from (no labelled position): no loss, no gradient
        counted = out is not None  # whether the batch (of any rank) adds to the log's mean
        if self.ranks.distributed:
            out, counted = self._union_part(out)
        accum = student.cfg.grad_accum
        if out is not None:
            (out.total / accum).backward()
            # "kd" sums the logged divergence (a KL on every cache kind, see LossOutput.kd_logged);
            # batches that could only log a cross-entropy make the row say kd_ce instead
            for name, value in (("loss", out.total), ("kd", out.kd_for_log), ("ce", out.ce)):
                self.window[name] = self.window.get(name, 0.0) + float(value.detach())
            if out.kd_log_name == "kd_ce":
                self.window["kd_ce_batches"] = self.window.get("kd_ce_batches", 0.0) + 1
            self.window["positions"] = self.window.get("positions", 0.0) + out.kd_positions
        if counted and self.ranks.is_main:
            self.window["batches"] = self.window.get("batches", 0.0) + 1
        self.window["tokens"] = self.window.get("tokens", 0) + (0 if batch is None else batch.tokens)
        self.micro += 1
        row = None
        if self.micro == accum:
            if self.ranks.distributed:
                self.window = self._summed_window()
            torch.nn.utils.clip_grad_norm_(student.model.parameters(), 1.0)
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.micro = 0
            self.tokens += int(round(self.window.pop("tokens", 0)))
            batches = max(1.0, self.window.pop("batches", 0.0))
            row = {"step": self.step, **{k: self.window[k] / batches for k in ("loss", "kd", "ce") if k in self.window},
                   "lr": lr, "tokens": self.tokens, "positions": int(self.window.get("positions", 0))}
            if self.window.get("kd_ce_batches") and "kd" in row:
                row["kd_ce"] = row.pop("kd")
            self.window = {}
        self.seconds += time.perf_counter() - start
        if row is not None:
            row["seconds"] = round(self.seconds, 3)
        return row

    def _union_part(self, out: LossOutput | None) -> tuple[LossOutput | None, bool]:
        """This rank's share of the union batch's loss, and whether any rank had a loss."""
        mine = [0.0, 0.0, 0.0] if out is None else [out.kd_positions, out.ce_positions, 1.0]
        kd_positions, ce_positions, losses = self.ranks.sum_values(mine)
        if out is None:
            return None, losses > 0
        return union_share(out, kd_positions=kd_positions, ce_positions=ce_positions,
                           alpha=self.student.cfg.loss.alpha), True

    def _summed_window(self) -> dict[str, float]:
        """Sum the pending gradients and the log window over ranks (every rank gets the sums)."""
        sums = self.ranks.sum_gradients(self.student.model.parameters(),
                                        extras=[self.window.get(k, 0.0) for k in _WINDOW_KEYS])
        window = dict(zip(_WINDOW_KEYS, sums, strict=True))
        if not window["batches"]:  # no rank had a loss: log no loss, as one process would
            for key in ("loss", "kd", "ce"):
                del window[key]
        return window

    def gather_pending(self) -> None:
        """Before a checkpoint under torchrun: move the gradients and log window accumulated
        since the last step, summed over ranks, onto rank 0 (the other ranks' become empty),
        so that rank 0's :meth:`state_dict` is the whole run's and resumes with any world size."""
        if not self.ranks.distributed or not self.micro:
            return
        window = self._summed_window()
        if self.ranks.is_main:
            self.window = window
        else:
            self.window = {}
            self.student.model.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        grads = None
        if self.micro:
            grads = [None if p.grad is None else p.grad.detach().cpu().clone() for p in self.student.model.parameters()]
        return {"step": self.step, "micro": self.micro, "tokens": self.tokens, "seconds": self.seconds,
                "window": dict(self.window), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "pending_grads": grads}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a saved state; under torchrun its pending gradients and log window (the
        whole run's, see :meth:`gather_pending`) go to rank 0 only."""
        self.step, self.micro, self.tokens = state["step"], state["micro"], state["tokens"]
        self.seconds = state["seconds"]
        self.window = dict(state["window"]) if self.ranks.is_main else {}
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        grads = state.get("pending_grads")
        if grads is not None and self.ranks.is_main:
            for param, grad in zip(self.student.model.parameters(), grads, strict=True):
                param.grad = None if grad is None else grad.to(param.device)
