"""CacheLock: one build at a time writes into a cache, and a dead build does not block it.

Two builds committing into one cache at once would each rewrite the manifest from their own
copy, and the later rewrite would drop the other's shards. A build therefore holds
``CACHE/_lock`` for as long as it may write. The lock file says who holds it (host, pid,
a random token) and when it last proved to be alive: a thread rewrites its ``heartbeat``
every ``heartbeat_seconds`` (one :meth:`CacheLock.beat` each time).

A lock whose holder is gone is *stale* and is taken over:

- on the same host, at once, when the holder's process no longer exists (a killed build);
- from any host, when its heartbeat is older than ``stale_after`` seconds (a machine that
  died, a process on another host we cannot ask).

Creation is exclusive on a local disk (``O_CREAT | O_EXCL``). Object stores have no such
primitive through fsspec, so there the lock is written, read back after a short pause, and
held only if it still carries our token: two builds that start within the same instant
could both miss each other, which the docs state; the lock still turns the common case
(a second scheduled job starting while the first runs) into a clear error.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from logitcache.errors import LogitcacheError
from logitcache.storage_schemas.location import CacheLocation

LOCK_FILE = "_lock"


class CacheLockedError(LogitcacheError):
    """Another live build holds the cache's lock."""


class CacheLock:
    """Exclusive right to write into the cache at ``location`` (a context manager).

    ``clock`` (keyword-only) is the wall clock, in seconds since the epoch, that the lock
    stamps its heartbeats with and judges another holder's age by (``time.time``; holders
    on other hosts compare against it, so it must be wall time). Tests pass a clock they
    move by hand, so that staleness does not depend on how fast the machine runs; the pause
    between heartbeats (``heartbeat_seconds``) is always real time.
    """

    def __init__(self, location: CacheLocation | str, *, stale_after: float = 120.0,
                 heartbeat_seconds: float = 10.0, clock: Callable[[], float] = time.time) -> None:
        self.location = location if isinstance(location, CacheLocation) else CacheLocation(location)
        self.stale_after = stale_after
        self.heartbeat_seconds = heartbeat_seconds
        self.clock = clock
        self.token = uuid.uuid4().hex
        self.took_over: dict[str, Any] | None = None  # the stale lock this one replaced, if any
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        now = self.clock()
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "acquired": getattr(self, "_acquired", now), "heartbeat": now}

    def holder(self) -> dict[str, Any] | None:
        """The lock file's content, or None when there is none (an unreadable file counts as stale)."""
        try:
            return json.loads(self.location.read_bytes(LOCK_FILE).decode("utf-8"))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {"unreadable": True, "heartbeat": 0}

    def is_stale(self, holder: dict[str, Any]) -> bool:
        same_host = holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
        if same_host and not _process_alive(holder["pid"]):
            return True
        return self.clock() - float(holder.get("heartbeat", 0)) > self.stale_after

    def acquire(self) -> CacheLock:
        self.location.makedirs("")
        self._acquired = self.clock()
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return self
            holder = self.holder()
            if holder is None:
                continue  # released between our attempt and our look
            if not self.is_stale(holder):
                raise CacheLockedError(_locked_message(self.location, holder, self.stale_after, self.clock()))
            self.took_over = holder
            self.location.remove(LOCK_FILE)
        raise CacheLockedError(f"{self.location.url}: could not take the build lock ({LOCK_FILE}); "
                               "another build keeps taking it. Try again")

    def _create(self) -> bool:
        data = json.dumps(self._record()).encode("utf-8")
        if self.location.is_local:
            path = self.location.full(LOCK_FILE)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            return True
        if self.location.exists(LOCK_FILE):
            return False
        self.location.write_atomic(LOCK_FILE, data)
        time.sleep(0.2)  # let a racing writer's object land, then see whose token stayed
        holder = self.holder()
        return holder is not None and holder.get("token") == self.token

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="logitcache-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            if not self.beat():
                return  # taken over (we looked dead): the build will find out at its next commit

    def beat(self) -> bool:
        """One heartbeat, as the heartbeat thread runs it every ``heartbeat_seconds``: stamp the
        lock file with the clock's time if this lock still holds it. False, writing nothing,
        when it does not (another build took it over)."""
        holder = self.holder()
        if holder is None or holder.get("token") != self.token:
            return False
        self.location.write_atomic(LOCK_FILE, json.dumps(self._record()).encode("utf-8"))
        return True

    def ensure_held(self) -> None:
        """Raise when another build has taken the lock over (this one looked dead to it)."""
        holder = self.holder()
        if holder is None or holder.get("token") != self.token:
            raise CacheLockedError(
                f"{self.location.url}: this build lost its lock (its heartbeat was late by more than "
                f"{self.stale_after:.0f} s and another build took the cache over); stopping before it writes "
                "again. Committed shards are intact; run the build again when the other one has finished")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        holder = self.holder()
        if holder is not None and holder.get("token") == self.token:
            self.location.remove(LOCK_FILE)

    def __enter__(self) -> CacheLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _locked_message(location: CacheLocation, holder: dict[str, Any], stale_after: float, now: float) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("acquired", 0))))
    age = now - float(holder.get("heartbeat", 0))
    return (f"{location.url} is being written by another build (host {holder.get('host')}, pid {holder.get('pid')}, "
            f"since {since}, alive {age:.0f} s ago). Wait for it to finish; builds into one cache must not run at "
            f"once. If that build is dead on another machine, its lock is taken over once it has been silent for "
            f"{stale_after:.0f} s; if you are sure, delete {location.full(LOCK_FILE)}")
