"""Right-padding token id sequences into a batch and its attention mask."""

import numpy as np
import pytest
import torch

from logitcache.pipeline.common.padding import right_pad


def test_right_pad_pads_after_the_ids_and_masks_them():
    ids, mask = right_pad([[1, 2], [3]], pad_id=9)
    assert ids.tolist() == [[1, 2], [3, 9]] and mask.tolist() == [[1, 1], [1, 0]]
    ids, mask = right_pad([np.arange(3), np.arange(1, 2), np.arange(2)], pad_id=-7, min_width=0)
    assert ids.tolist() == [[0, 1, 2], [1, -7, -7], [0, 1, -7]]
    assert mask.sum().item() == 6 and ids.dtype == mask.dtype == torch.int64


@pytest.mark.parametrize(("sequences", "min_width", "shape"), [
    ([], 1, (0, 1)), ([[], []], 1, (2, 1)),  # at least one column by default
    ([], 0, (0, 0)), ([[], []], 0, (2, 0)), ([[4]], 0, (1, 1)),  # exactly the longest
    ([[4, 5]], 3, (1, 3)),
])
def test_right_pad_width_is_the_longest_or_min_width(sequences, min_width, shape):
    ids, mask = right_pad(sequences, pad_id=0, min_width=min_width)
    assert tuple(ids.shape) == tuple(mask.shape) == shape
    assert int(mask.sum()) == sum(len(s) for s in sequences)
