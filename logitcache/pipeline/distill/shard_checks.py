"""What stage two does about a committed shard whose bytes no longer match the manifest.

A shard can rot after it was committed: a flipped bit, a copy cut short, a file deleted.
Its labels must never reach a student silently, so stage two checks each shard (presence,
size, sha256) before it reads its first block, and then, as ``train.on_corrupt_shard`` says:

``stop`` (the default)
    the reader checks each shard the first time a process opens it and stops the run with
    :func:`corrupt_shard_error`: the shard, the problem and how to repair the cache.
``skip``
    every shard is checked before training starts (the ranks of a torchrun job share the
    work and all skip the same shards, so they still read disjoint parts of the same data);
    the bad ones are named in a warning, left out of training and evaluation, and counted
    in the metrics (``skipped_shards``).
"""

from __future__ import annotations

import logging

from logitcache.errors import CorruptShardError
from logitcache.storage_schemas.shard_reader import CacheReader

logger = logging.getLogger("logitcache")

#: how a DataLoader worker's exception arrives in the main process: its traceback, then this
_WORKER_TAIL = "CorruptShardError: "


def corrupt_shard_error(problem: str, *, cache: str) -> CorruptShardError:
    """The error that stops stage two at a bad shard: what is wrong and how to repair it."""
    return CorruptShardError(
        f"{problem.rstrip('.')}. Its labels would be wrong, so nothing was read from it. "
        f"Run `logitcache verify {cache}` to list every bad shard, then restore those files from a "
        "copy or build their units again (`logitcache build CONFIG --repair`); or set "
        "train.on_corrupt_shard: skip to train and evaluate without the bad shards."
    )


def unwrap_worker_error(error: CorruptShardError) -> CorruptShardError:
    """A CorruptShardError raised in a DataLoader worker carries the worker's traceback in its
    message; the user needs only the message."""
    text = str(error)
    if _WORKER_TAIL not in text:
        return error
    return CorruptShardError(text[text.rindex(_WORKER_TAIL) + len(_WORKER_TAIL):].strip())


def find_corrupt_shards(reader: CacheReader, *, rank: int = 0, world_size: int = 1) -> dict[str, str]:
    """``{shard path: problem}`` of the shards ``i % world_size == rank`` that fail their check."""
    bad = {}
    for index, entry in enumerate(reader.shards):
        if index % world_size != rank:
            continue
        try:
            reader.check_shard(entry)
        except CorruptShardError as error:
            bad[entry.path] = str(error)
    return bad


def warn_skipped(skipped: dict[str, str], *, cache: str, what: str) -> None:
    for path, problem in sorted(skipped.items()):
        logger.warning("skipping corrupt shard %s of %s in %s (train.on_corrupt_shard: skip): %s",
                       path, cache, what, problem)
