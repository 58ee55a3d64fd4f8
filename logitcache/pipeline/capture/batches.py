"""Token-budget batches of windows, sorted by length so padding stays small.

Inside a work unit, windows are ordered by length (longest first) and cut greedily into
batches whose padded size ``rows x longest row`` stays within ``batch_tokens``; a batch is
also cut where the next windows are so much shorter that its padding would pass
``MAX_PADDING`` (a unit of a few long and many short windows would otherwise pad the short
ones to the long ones' width). Padding stays small (the build reports it); the original order of the windows is restored when the unit's shard is
assembled, so batching never changes what is stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from logitcache.pipeline.common.padding import right_pad


@dataclass(frozen=True, kw_only=True)
class Batch:
    indices: np.ndarray  # positions of these windows in the unit's window list
    input_ids: torch.Tensor  # int64 [B, L], right-padded
    attention_mask: torch.Tensor  # int64 [B, L]
    lengths: np.ndarray  # int64 [B]

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())


#: Largest padding fraction a batch may have when shorter windows could go to a batch of their own.
MAX_PADDING = 0.2


def plan_batches(lengths: Sequence[int], *, batch_tokens: int) -> list[np.ndarray]:
    """Index groups, longest windows first, each within ``batch_tokens`` once padded.

    A window longer than the budget gets a batch of its own.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    groups: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])  # sorted: the first row is the longest
        rows = max(1, batch_tokens // max(longest, 1))
        # cut early where the rows get so much shorter that padding would pass MAX_PADDING
        real = np.cumsum(lengths[order[start:start + rows]])
        padded = longest * np.arange(1, len(real) + 1)
        fits = np.flatnonzero(1 - real / padded <= MAX_PADDING)
        rows = int(fits[-1]) + 1 if len(fits) else 1
        groups.append(order[start:start + rows])
        start += rows
    return groups


def collate(windows, indices: np.ndarray, *, pad_id: int) -> Batch:
    """The windows at ``indices``, right-padded to the longest of them."""
    rows = [windows[i].input_ids for i in indices]
    input_ids, attention_mask = right_pad(rows, pad_id=pad_id, min_width=0)
    return Batch(indices=np.asarray(indices), input_ids=input_ids, attention_mask=attention_mask,
                 lengths=np.array([len(r) for r in rows], dtype=np.int64))
