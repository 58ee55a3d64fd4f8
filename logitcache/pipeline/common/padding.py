"""Right-padding of token id sequences into one ``[B, W]`` batch and its attention mask.

Why it exists: both stages feed a model rows of different lengths. Stage one batches a work
unit's windows for the teacher (:func:`~logitcache.pipeline.capture.batches.collate`), stage
two a classification cache's records and the students' own texts
(:mod:`~logitcache.pipeline.distill.collate`, :mod:`~logitcache.pipeline.distill.training`).
They share this one function, so a row's layout is the same everywhere: its ids from column
0, ``pad_id`` after them, and an attention mask of 1 on the real tokens and 0 on padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["right_pad"]


def right_pad(sequences: Sequence[Sequence[int] | np.ndarray], *, pad_id: int,
              min_width: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask``, int64 ``[len(sequences), W]``, right-padded.

    ``W = max(min_width, longest sequence)``. The default of one column keeps a batch whose
    sequences are all empty (or that has none) a shape a model can run on; pass 0 for a
    width of exactly the longest sequence.
    """
    width = max(min_width, max((len(s) for s in sequences), default=0))
    input_ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, ids in enumerate(sequences):  # one numpy copy per sequence, not per token
        input_ids[row, :len(ids)] = ids
        attention_mask[row, :len(ids)] = 1
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)
