"""CPU time of stage one's parts, measured by wrapping the functions the stage calls.

Not a benchmark: ``bench_pipeline.py`` installs these wrappers so that one real
``build_cache`` run says where its time goes. :func:`install` replaces, in the modules that
call them, the functions of each part (``make_windows`` in ``unit_task``, ``label_positions``
in ``unit_labeler``, ``block_to_table`` in ``parquet_backend``, the writer's ``commit``, ...)
by wrappers that add the calling thread's CPU time (``time.thread_time``) and wall time to a
process-wide total per part. Thread CPU time, not wall time: on one core the committer
thread and the labelling thread take turns, and each part should count only its own work.
The totals are inclusive (a part counts the parts it calls); the report subtracts.

:func:`timed_label_work_unit` is the executors' ``task_fn``: ``label_work_unit`` with the
worker-side parts' totals of that unit, and the stand-in teacher's own CPU time, added to the
unit's statistics under ``"bench"``. They travel back to the driver with the labels, from
this process or from a Dask worker, and end up in the shard's manifest entry.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import logitcache.stages.build_cache as build_stage
from logitcache.pipeline.capture import unit_labeler, unit_task
from logitcache.pipeline.capture.unit_task import (
    LabelledUnit,
    UnitTask,
    label_work_unit,
    teacher_in_process,
)
from logitcache.pipeline.common import windows
from logitcache.pipeline.common.corpus import WorkUnit
from logitcache.storage_schemas import parquet_backend
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.manifest import Manifest
from logitcache.storage_schemas.shard_writer import ShardWriter

#: part -> (owner, attribute): module-level functions where their caller looks them up, methods on their class
WORKER_PARTS: dict[str, tuple[Any, str]] = {
    "tokenize_windows": (unit_task, "make_windows"),
    "tokenize": (windows, "tokenize"),
    "label_unit": (unit_task, "label_unit"),
    "label_windows": (unit_labeler, "label_windows"),
    "label_positions": (unit_labeler, "label_positions"),
}
DRIVER_PARTS: dict[str, tuple[Any, str]] = {
    "commit": (ShardWriter, "commit"),
    "parquet_write": (parquet_backend.ParquetBackend, "write"),
    "block_to_table": (parquet_backend, "block_to_table"),
    "fsync": (CacheLocation, "sync_tree"),
    "sha256": (CacheLocation, "digest"),
    "manifest_save": (Manifest, "save"),
}
READ_PART = "read"  # iter_work_units, as build_cache calls it: each next() is timed

_lock = threading.Lock()
_cpu: dict[str, float] = {}
_wall: dict[str, float] = {}
_installed = False


def _add(part: str, cpu: float, wall: float) -> None:
    with _lock:
        _cpu[part] = _cpu.get(part, 0.0) + cpu
        _wall[part] = _wall.get(part, 0.0) + wall


def _timed(part: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _add(part, time.thread_time() - cpu, time.perf_counter() - wall)

    wrapper.__bench_timed__ = True  # type: ignore[attr-defined]
    return wrapper


def _timed_iterator(part: str, fn: Callable[..., Iterator]) -> Callable[..., Iterator]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Iterator:
        items = fn(*args, **kwargs)
        while True:
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                _add(part, time.thread_time() - cpu, time.perf_counter() - wall)
            yield item

    wrapper.__bench_timed__ = True  # type: ignore[attr-defined]
    return wrapper


def _wrap(part: str, *, owner: Any, name: str, iterator: bool = False) -> None:
    fn = getattr(owner, name, None)
    if fn is None:
        raise RuntimeError(f"stage_timers: {getattr(owner, '__name__', owner)}.{name} is gone; update WORKER_PARTS / "
                           "DRIVER_PARTS to where stage one now calls that part")
    if getattr(fn, "__bench_timed__", False):
        return
    setattr(owner, name, (_timed_iterator if iterator else _timed)(part, fn))


def install() -> None:
    """Wrap every part in this process (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    for part, (owner, name) in {**WORKER_PARTS, **DRIVER_PARTS}.items():
        _wrap(part, owner=owner, name=name)
    _wrap(READ_PART, owner=build_stage, name="iter_work_units", iterator=True)


def snapshot() -> tuple[dict[str, float], dict[str, float]]:
    """(CPU seconds, wall seconds) per part so far in this process."""
    with _lock:
        return dict(_cpu), dict(_wall)


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {part: after[part] - before.get(part, 0.0) for part in after}


def stand_in_seconds(model: Any) -> tuple[float, float]:
    """The stand-in teacher's own CPU seconds so far, (body, head); zeros for any other model."""
    body = getattr(getattr(model, "model", None), "cpu_seconds", 0.0)
    head = getattr(model.get_output_embeddings(), "cpu_seconds", 0.0)
    return float(body), float(head)


def timed_label_work_unit(task: UnitTask, unit: WorkUnit) -> LabelledUnit:
    """``label_work_unit`` with this unit's worker-side CPU seconds per part in its stats."""
    install()
    model = teacher_in_process(task.teacher).model
    cpu0, _ = snapshot()
    (body0, head0), thread0 = stand_in_seconds(model), time.thread_time()
    labelled = label_work_unit(task, unit)
    cpu = delta(cpu0, snapshot()[0])
    body, head = stand_in_seconds(model)
    labelled.stats["bench"] = {
        "task": time.thread_time() - thread0,
        "stand_in_body": body - body0,
        "stand_in_head": head - head0,
        **{part: cpu.get(part, 0.0) for part in WORKER_PARTS},
    }
    return labelled
