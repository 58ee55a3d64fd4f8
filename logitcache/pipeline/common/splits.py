"""Which split a record falls in: the held-out (evaluation) split is a pure function of a
hash of the record's document, so it is the same for every seed, run and machine, for the
demo teacher that stage one trains and for the students of stage two alike. The same 64-bit
mixing function seeds the stage-two reader's shuffles.
"""

from __future__ import annotations

import numpy as np

from logitcache.pipeline.common.windows import record_id_for

__all__ = ["is_held_out", "mix64", "split_keys", "unit_interval"]


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 of each value: a 64-bit hash spreading nearby ids over the whole range."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def unit_interval(hashes: np.ndarray) -> np.ndarray:
    """Each 64-bit hash as a float in [0, 1) (its top 53 bits)."""
    return (hashes >> np.uint64(11)).astype(np.float64) * 2.0**-53


def is_held_out(keys: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each split key (see :func:`split_keys`) is in the held-out (eval) split; depends
    on the key alone, so the split is the same for every seed, run and machine."""
    return unit_interval(mix64(np.asarray(keys, dtype=np.uint64))) < fraction


def split_keys(doc_keys: np.ndarray) -> np.ndarray:
    """The key that places a record in the train or held-out split: its document's first
    record id, so all windows of one document fall on the same side (a long document split
    across both would leak its text into evaluation)."""
    return np.fromiter((record_id_for(str(key), 0) for key in doc_keys), dtype=np.uint64, count=len(doc_keys))
