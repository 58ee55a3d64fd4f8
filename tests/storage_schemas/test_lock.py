"""CacheLock: one writer at a time; a dead holder's lock is taken over, a live one's is not.

Nothing here waits on wall time: ages are read off a clock the test moves by hand, the
heartbeat is a step (``CacheLock.beat``) the test runs itself, and the heartbeat thread is
seen to run that step through an event it sets.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import fsspec
import pytest

from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.lock import LOCK_FILE, CacheLock, CacheLockedError


class Clock:
    """A wall clock that moves only when told to (``now += seconds``), or by ``tick`` per reading."""

    def __init__(self, now: float = 1_700_000_000.0, tick: float = 0.0) -> None:
        self.now, self.tick = now, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def write_lock(path, **fields):
    record = {"host": socket.gethostname(), "pid": os.getpid(), "token": "other", "acquired": time.time(),
              "heartbeat": time.time(), **fields}
    (path / LOCK_FILE).write_text(json.dumps(record))


def test_a_second_lock_on_a_held_cache_is_refused_and_release_frees_it(tmp_path):
    first = CacheLock(str(tmp_path)).acquire()
    with pytest.raises(CacheLockedError, match=rf"being written by another build \(host .*, pid {os.getpid()}"):
        CacheLock(str(tmp_path)).acquire()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    with CacheLock(str(tmp_path)):
        assert (tmp_path / LOCK_FILE).exists()
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_lock_of_a_killed_process_is_taken_over_at_once(tmp_path):
    code = ("import sys; from logitcache.storage_schemas.lock import CacheLock; "
            f"CacheLock({str(tmp_path)!r}).acquire(); print('held', flush=True); sys.stdin.read()")
    # the holder lives until it is killed (it waits for its stdin to close), however slow the test
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CacheLockedError):
            CacheLock(str(tmp_path)).acquire()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        lock = CacheLock(str(tmp_path)).acquire()
        assert lock.took_over["pid"] == holder.pid
        lock.release()
    finally:
        holder.kill()
        holder.wait()


def test_a_remote_holder_is_stale_only_when_its_heartbeat_is_old(tmp_path):
    clock = Clock()
    write_lock(tmp_path, host="elsewhere", pid=1, heartbeat=clock.now - 5)
    with pytest.raises(CacheLockedError, match="host elsewhere"):
        CacheLock(str(tmp_path), stale_after=60, clock=clock).acquire()
    write_lock(tmp_path, host="elsewhere", pid=1, heartbeat=clock.now - 61)
    lock = CacheLock(str(tmp_path), stale_after=60, clock=clock).acquire()
    assert lock.took_over["host"] == "elsewhere"
    lock.release()


def test_the_heartbeat_keeps_a_long_build_alive_and_a_lost_lock_is_noticed(tmp_path):
    clock = Clock()
    # the heartbeat thread stays asleep through this test: the test beats, on a clock it moves
    lock = CacheLock(str(tmp_path), stale_after=0.5, heartbeat_seconds=3600, clock=clock).acquire()
    other = CacheLock(str(tmp_path), stale_after=0.5, clock=clock)
    clock.now += 0.6  # older than stale_after: without a heartbeat the lock would look dead ...
    assert other.is_stale(other.holder())
    assert lock.beat()  # ... but the heartbeat keeps the file fresh
    other_host = json.loads((tmp_path / LOCK_FILE).read_text())
    assert clock() - other_host["heartbeat"] < 0.5
    with pytest.raises(CacheLockedError):
        other.acquire()
    lock.ensure_held()
    write_lock(tmp_path, token="intruder")  # another build took it over
    with pytest.raises(CacheLockedError, match="lost its lock"):
        lock.ensure_held()
    assert not lock.beat()  # and a late heartbeat does not take it back
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "intruder"  # not ours to remove


def test_the_heartbeat_thread_beats_on_its_own(tmp_path, monkeypatch):
    beats, beaten = [], threading.Event()
    beat = CacheLock.beat

    def beat_and_tell(self):  # on the heartbeat thread: the lock file's heartbeat before and after
        before = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
        held = beat(self)
        beats.append((before, json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"], held))
        beaten.set()
        return held

    monkeypatch.setattr(CacheLock, "beat", beat_and_tell)
    lock = CacheLock(str(tmp_path), heartbeat_seconds=0.01, clock=Clock(tick=1.0)).acquire()  # each reading 1 s on
    try:
        # a safety limit against a hang only: the outcome is the beat itself, whenever it comes
        assert beaten.wait(timeout=60), "the heartbeat thread never beat in 60 s"
    finally:
        lock.release()
    before, after, held = beats[0]
    assert held and after > before


def test_object_storage_locks_by_token(tmp_path):
    url = f"memory://lock-{uuid.uuid4().hex[:8]}/cache"
    try:
        lock = CacheLock(url).acquire()
        with pytest.raises(CacheLockedError):
            CacheLock(url).acquire()
        lock.release()
        assert not CacheLocation(url).exists(LOCK_FILE)
    finally:
        fsspec.filesystem("memory").rm(url.removeprefix("memory://").split("/")[0], recursive=True)
