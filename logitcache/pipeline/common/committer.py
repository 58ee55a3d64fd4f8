"""Commit shards on a background thread, so encoding and writing overlap the next forward.

The teacher runs on the calling thread; each finished unit is handed to one writer thread
that encodes, writes, fsyncs, hashes and commits it (torch and zstd release the GIL, so the
two really run at once). At most ``max_pending`` units wait for the writer: memory stays
bounded however large the corpus, and a slow disk slows the build instead of filling RAM.
The first error on the writer thread (a full disk, a permission error) is raised on the
calling thread at its next ``submit`` or at ``close``; units committed before it stay.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from logitcache.storage_schemas.manifest import ShardEntry
from logitcache.storage_schemas.records import RecordBlock
from logitcache.storage_schemas.shard_writer import ShardWriter, StagedShard


class BackgroundCommitter:
    def __init__(
        self, writer: ShardWriter, *, max_pending: int = 1,
        on_commit: Callable[[ShardEntry], None] | None = None,
    ) -> None:
        self.writer = writer
        self.max_pending = max_pending
        self.on_commit = on_commit
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="logitcache-commit")
        self._pending: deque[Future] = deque()

    def _commit(self, block: RecordBlock, unit_id: str, stats: dict[str, Any]) -> ShardEntry:
        entry = self.writer.commit(block, unit_id=unit_id, stats=stats)
        if self.on_commit is not None:
            self.on_commit(entry)
        return entry

    def submit(self, block: RecordBlock, *, unit_id: str, stats: dict[str, Any]) -> None:
        self._queue(self._commit, block, unit_id, stats)

    def submit_staged(self, staged: StagedShard, *, stats: dict[str, Any]) -> None:
        """Commit a shard that a worker has already written and hashed (rename + manifest only)."""
        self._queue(self._commit_staged, staged, stats)

    def _commit_staged(self, staged: StagedShard, stats: dict[str, Any]) -> ShardEntry:
        entry = self.writer.commit_staged(staged, stats=stats)
        if self.on_commit is not None:
            self.on_commit(entry)
        return entry

    def _queue(self, fn: Callable[..., ShardEntry], *args: Any) -> None:
        while len(self._pending) >= self.max_pending:
            self._pending.popleft().result()  # re-raises the writer's error here
        self._pending.append(self._pool.submit(fn, *args))

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BackgroundCommitter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # already failing: let the in-flight commit finish or fail quietly
            self._pool.shutdown(wait=True, cancel_futures=True)
