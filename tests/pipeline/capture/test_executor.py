"""Stage one on a real ``dask.distributed`` cluster (2 worker processes) against the local executor."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import cloudpickle
import pytest
import torch

from logitcache.errors import LogitcacheError
from logitcache.pipeline.capture.executor import (
    DaskExecutor,
    ExecutorError,
    make_executor,
    preserved_environment,
)
from logitcache.pipeline.capture.unit_task import THREADS_ENV
from logitcache.pipeline.common.corpus import iter_work_units
from logitcache.stages.build_cache import BuildIncompleteError, build_cache
from logitcache.storage_schemas.shard_reader import CacheReader
from logitcache.storage_schemas.verify import verify_cache
from tests.pipeline.capture import faulty_tasks
from tests.stages.test_build_cache import job, read_all, sorted_by_record

distributed = pytest.importorskip("distributed")
cloudpickle.register_pickle_by_value(faulty_tasks)  # workers need not import the tests package

_SAMPLED = {"mode": "topk+sampled", "k": 4, "samples": 16, "values": "float32"}
# Float sums depend on how many threads split them, so the bytes of two builds match only
# at equal thread counts: the local cluster that the executor starts gives each of its 2
# workers half the cores, and the reference build and the test cluster use as many.
_THREADS = max(1, (os.cpu_count() or 1) // 2)


@pytest.fixture(scope="module")
def client():
    with preserved_environment(), distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  scheduler_kwargs={"dashboard": False},
                                  env={THREADS_ENV: _THREADS}) as cluster, \
            distributed.Client(cluster) as dask_client:
        yield dask_client


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory, corpus_dir, tiny_causal_lm_dir) -> Path:
    """The reference: the same job built by the local executor."""
    cache = tmp_path_factory.mktemp("local") / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(_THREADS)
    try:
        build_cache(job(cache, corpus_dir, tiny_causal_lm_dir, soft_labels=_SAMPLED), progress=False)
    finally:
        torch.set_num_threads(threads)
    return cache


def assert_same_cache(cache: Path, reference: Path) -> None:
    """Same units, each committed once, with the same records (and the same shard bytes)."""
    got, want = CacheReader(str(cache)).manifest, CacheReader(str(reference)).manifest
    assert [s.unit_id for s in got.shards] == [s.unit_id for s in want.shards]
    assert len({s.unit_id for s in got.shards}) == len(got.shards)
    assert [(s.records, s.tokens, s.sha256) for s in got.shards] == [(s.records, s.tokens, s.sha256) for s in want.shards]
    assert sorted_by_record(read_all(cache)[1]).equals(sorted_by_record(read_all(reference)[1]))
    assert verify_cache(str(cache), deep=True).ok


def dask_job(cache, corpus_dir, model, **executor):
    return job(cache, corpus_dir, model, soft_labels=_SAMPLED, executor={"kind": "dask", **executor})


def unit_ids(cfg) -> list[str]:
    return [unit.unit_id for unit in iter_work_units(cfg.corpus)]


def test_a_local_dask_cluster_from_the_config_builds_the_local_executors_cache(tmp_path, corpus_dir,
                                                                                tiny_causal_lm_dir, local_cache):
    cfg = dask_job(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir, n_workers=2)
    environment = dict(os.environ)
    with make_executor(cfg.executor) as executor:
        summary = build_cache(cfg, progress=False, executor=executor)
        threads = executor.client.run(torch.get_num_threads)
    assert dict(os.environ) == environment  # dask's worker settings do not leak into the driver
    assert list(threads.values()) == [_THREADS, _THREADS]  # each worker has its share of the cores
    assert summary.units_built == len(unit_ids(cfg)) >= 4
    assert_same_cache(tmp_path / "cache", local_cache)


def test_a_killed_worker_process_loses_no_unit(tmp_path, corpus_dir, tiny_causal_lm_dir, local_cache, client):
    cfg = dask_job(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir)
    victim = unit_ids(cfg)[1]
    marker = tmp_path / "killed"
    task_fn = functools.partial(faulty_tasks.die_once, unit_id=victim, marker=str(marker))
    pids_before = set(client.run(lambda: __import__("os").getpid()).values())
    with DaskExecutor(cfg.executor, client=client, task_fn=task_fn) as executor:
        summary = build_cache(cfg, progress=False, executor=executor)
    assert marker.exists() and int(marker.read_text()) in pids_before  # a worker really died
    assert summary.units_built == len(unit_ids(cfg)) and not summary.failed_units
    assert_same_cache(tmp_path / "cache", local_cache)


def test_workers_write_their_shards_and_one_killed_while_writing_lists_nothing_half_written(
        tmp_path, corpus_dir, tiny_causal_lm_dir, local_cache, client):
    cfg = dask_job(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir)
    victim = unit_ids(cfg)[2]
    marker = tmp_path / "killed-while-writing"
    task_fn = functools.partial(faulty_tasks.die_while_writing, unit_id=victim, marker=str(marker))
    with DaskExecutor(cfg.executor, client=client, task_fn=task_fn) as executor:
        summary = build_cache(cfg, progress=False, executor=executor)
    leftover = tmp_path / "cache" / marker.read_text()  # the dead worker's staged shard, never committed
    assert "_incomplete" in str(leftover) and not summary.failed_units
    assert summary.units_built == len(unit_ids(cfg))
    manifest = CacheReader(str(tmp_path / "cache")).manifest
    hosts = {entry.stats["labelled_by"] for entry in manifest.shards}
    assert all(not host.endswith(f":{os.getpid()}") for host in hosts)  # the workers labelled and wrote them
    assert_same_cache(tmp_path / "cache", local_cache)


def test_the_driver_writes_the_shards_when_asked(tmp_path, corpus_dir, tiny_causal_lm_dir, local_cache, client):
    cfg = dask_job(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir, shard_writer="driver")
    with DaskExecutor(cfg.executor, client=client) as executor:
        build_cache(cfg, progress=False, executor=executor)
    assert_same_cache(tmp_path / "cache", local_cache)


def test_a_unit_that_keeps_failing_is_reported_and_the_rest_commits(tmp_path, corpus_dir, tiny_causal_lm_dir,
                                                                    local_cache, client):
    cfg = dask_job(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir, retries=1)
    units = unit_ids(cfg)
    victim = units[2]
    marker = tmp_path / "failing"
    marker.write_text("")
    task_fn = functools.partial(faulty_tasks.fail_while_marked, unit_id=victim, marker=str(marker))
    with DaskExecutor(cfg.executor, client=client, task_fn=task_fn) as executor, \
            pytest.raises(BuildIncompleteError) as caught:
        build_cache(cfg, progress=False, executor=executor)
    error = caught.value
    assert error.exit_code == 1 and isinstance(error, LogitcacheError)
    assert victim in str(error) and "RuntimeError: injected failure" in str(error) and "run the same command" in str(error)
    assert len(marker.read_text().splitlines()) == 2  # the first try and one retry
    committed = [s.unit_id for s in CacheReader(str(tmp_path / "cache")).manifest.shards]
    assert sorted(committed) == sorted(u for u in units if u != victim)

    marker.unlink()  # the cause is fixed: a re-run builds only what is left
    with DaskExecutor(cfg.executor, client=client) as executor:
        summary = build_cache(cfg, progress=False, executor=executor)
    assert (summary.units_built, summary.units_skipped) == (1, len(units) - 1)
    assert_same_cache(tmp_path / "cache", local_cache)


def test_a_transient_failure_is_retried(tmp_path, corpus_dir, tiny_causal_lm_dir, local_cache, client):
    cfg = dask_job(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir, retries=2)
    counter = tmp_path / "attempts"
    task_fn = functools.partial(faulty_tasks.fail_first_attempts, unit_id=unit_ids(cfg)[0],
                                counter=str(counter), failures=2)
    with DaskExecutor(cfg.executor, client=client, task_fn=task_fn) as executor:
        summary = build_cache(cfg, progress=False, executor=executor)
    assert len(counter.read_text().splitlines()) == 3 and not summary.failed_units
    assert_same_cache(tmp_path / "cache", local_cache)


def test_an_unreachable_scheduler_is_a_clear_error(tmp_path, corpus_dir, tiny_causal_lm_dir):
    cfg = dask_job(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir, address="tcp://127.0.0.1:9", connect_timeout=1)
    with pytest.raises(ExecutorError, match=r"cannot reach a Dask scheduler at tcp://127.0.0.1:9"):
        build_cache(cfg, progress=False)
    assert not (tmp_path / "cache").exists()
