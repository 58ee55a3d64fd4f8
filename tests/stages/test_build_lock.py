"""Two builds into one cache: the second is refused while the first runs, and the cache stays whole."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from logitcache.errors import LogitcacheError
from logitcache.stages.build_cache import build_cache
from logitcache.storage_schemas.lock import LOCK_FILE, CacheLock, CacheLockedError
from logitcache.storage_schemas.shard_reader import CacheReader
from logitcache.storage_schemas.verify import verify_cache
from tests.stages.test_build_cache import job, read_all, sorted_by_record


def test_a_build_into_a_locked_cache_is_refused_and_touches_nothing(tmp_path, corpus_dir, tiny_causal_lm_dir):
    cfg = job(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir)
    build_cache(cfg, progress=False)
    before = (tmp_path / "cache" / "manifest.json").read_bytes()
    (tmp_path / "cache" / "_incomplete" / "part-in-flight.parquet").write_bytes(b"another build's shard")
    with CacheLock(str(tmp_path / "cache")):
        with pytest.raises(CacheLockedError) as caught:
            build_cache(cfg, progress=False, overwrite=True)
        assert isinstance(caught.value, LogitcacheError) and caught.value.exit_code == 1
    assert (tmp_path / "cache" / "manifest.json").read_bytes() == before
    assert (tmp_path / "cache" / "_incomplete" / "part-in-flight.parquet").exists()  # the holder's work is safe
    assert not (tmp_path / "cache" / LOCK_FILE).exists()
    assert build_cache(cfg, progress=False).units_built == 0  # and the lock is free again


def test_two_builds_started_together_leave_one_whole_cache(tmp_path, corpus_dir, tiny_causal_lm_dir):
    reference = job(tmp_path / "reference", corpus_dir, tiny_causal_lm_dir)
    build_cache(reference, progress=False)
    config = tmp_path / "job.yaml"
    data = yaml.safe_load((tmp_path / "reference" / "manifest.json").read_text())["config"]
    data["cache"] = str(tmp_path / "cache")
    config.write_text(yaml.safe_dump(data))
    command = [sys.executable, "-m", "logitcache", "build", str(config), "--no-progress"]
    # the same torch thread count as the reference build, so that float sums match bit for bit
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    builds = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for _ in range(2)]
    # communicate, not wait: a build blocked on a full stderr pipe never ends (300 s: a hang guard only)
    stderrs = [b.communicate(timeout=300)[1] for b in builds]
    for build, stderr in zip(builds, stderrs, strict=True):
        code = build.returncode
        assert code == 0 or (code == 1 and "being written by another build" in stderr), stderr[-2000:]
    assert verify_cache(str(tmp_path / "cache"), deep=True).ok
    assert sorted_by_record(read_all(tmp_path / "cache")[1]).equals(sorted_by_record(read_all(tmp_path / "reference")[1]))
    assert len(CacheReader(str(tmp_path / "cache")).manifest.shards) == len(CacheReader(str(tmp_path / "reference")).manifest.shards)
