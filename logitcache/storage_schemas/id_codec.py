"""Token-id types: the narrowest unsigned integer that holds a vocabulary, and nothing narrower.

Ids are stored in the narrowest of uint8 / uint16 / uint32 that can hold every id of the
teacher's vocabulary (ids run from 0 to vocab_size - 1). Two widely used distillation
tools store ids in a fixed 16- or 17-bit field and wrap larger ids silently; here a
vocabulary that does not fit, or an id outside the vocabulary, is always an error.
"""

from __future__ import annotations

import numpy as np

from logitcache.errors import LogitcacheError, VocabularyTooLargeError

#: Candidate id types, narrowest first, by name as written in manifests.
ID_TYPES: tuple[str, ...] = ("uint8", "uint16", "uint32")


def id_type_for_vocab(vocab_size: int) -> str:
    """Name of the narrowest unsigned type holding ids ``0 .. vocab_size - 1``."""
    if not isinstance(vocab_size, (int, np.integer)) or isinstance(vocab_size, bool):
        raise TypeError(f"vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size < 1:
        raise VocabularyTooLargeError(f"vocab_size must be >= 1, got {vocab_size}")
    for name in ID_TYPES:
        if vocab_size - 1 <= np.iinfo(name).max:
            return name
    raise VocabularyTooLargeError(
        f"a vocabulary of {vocab_size:,} tokens does not fit the widest id type "
        f"(uint32, at most {np.iinfo('uint32').max + 1:,} ids); logitcache refuses to wrap ids"
    )


def encode_ids(ids: np.ndarray, *, id_type: str, vocab_size: int) -> np.ndarray:
    """Cast ``ids`` to ``id_type`` after checking every id lies in ``[0, vocab_size)``.

    The check is what makes the cast safe: an id that would wrap is an error that names it.
    """
    if id_type not in ID_TYPES:
        raise ValueError(f"unknown id type {id_type!r}; expected one of {', '.join(ID_TYPES)}")
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
    if ids.size:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise LogitcacheError(
                f"token id {bad} is outside the vocabulary [0, {vocab_size}); the teacher's "
                "output does not match its declared vocab_size"
            )
    if vocab_size - 1 > np.iinfo(id_type).max:
        raise VocabularyTooLargeError(
            f"id type {id_type} cannot hold a vocabulary of {vocab_size:,} tokens"
        )
    return ids.astype(id_type, copy=False)
