"""CacheLock: one writer at a time; a dead holder's lock is taken over, a live one's is not."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import fsspec
import pytest

from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.lock import LOCK_FILE, CacheLock, CacheLockedError


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
    code = ("import sys, time; from logitcache.storage_schemas.lock import CacheLock; "
            f"CacheLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
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
    write_lock(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - 5)
    with pytest.raises(CacheLockedError, match="host elsewhere"):
        CacheLock(str(tmp_path), stale_after=60).acquire()
    write_lock(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - 61)
    lock = CacheLock(str(tmp_path), stale_after=60).acquire()
    assert lock.took_over["host"] == "elsewhere"
    lock.release()


def test_the_heartbeat_keeps_a_long_build_alive_and_a_lost_lock_is_noticed(tmp_path):
    lock = CacheLock(str(tmp_path), stale_after=0.5, heartbeat_seconds=0.05).acquire()
    time.sleep(0.6)  # older than stale_after, but the heartbeat has kept the file fresh
    other = CacheLock(str(tmp_path), stale_after=0.5)
    other_host = json.loads((tmp_path / LOCK_FILE).read_text())
    assert time.time() - other_host["heartbeat"] < 0.5
    with pytest.raises(CacheLockedError):
        other.acquire()
    lock.ensure_held()
    write_lock(tmp_path, token="intruder")  # another build took it over
    with pytest.raises(CacheLockedError, match="lost its lock"):
        lock.ensure_held()
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "intruder"  # not ours to remove


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
