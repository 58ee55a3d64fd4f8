"""Where stage one's work units run: in this process, or as tasks on a Dask cluster.

The build (``stages/build_cache.py``) reads the corpus, decides which units still need
labels and commits every finished shard itself; an executor only turns units into labelled
units (:func:`~logitcache.pipeline.capture.unit_task.label_work_unit`) and hands each back as a
:class:`UnitOutcome` as soon as it is done. Both executors share that one function, so a
cache is the same record for record whichever ran it.

- :class:`LocalExecutor` runs units one after the other in this process (the default). An
  error stops the build at once, as any other error of a local run.
- :class:`DaskExecutor` submits one ``dask.distributed`` task per unit to a scheduler at
  ``executor.address`` or to a local cluster of ``executor.n_workers`` processes. Each worker
  process loads the teacher once and keeps it. At most ``in_flight`` tasks wait at a time
  (twice the worker threads by default), so the driver's memory stays bounded whatever the
  corpus size. ``task_resources`` (e.g. ``{GPU: 1}``) annotates every task, so that a worker
  started with ``--resources GPU=1`` runs one unit at a time. A task that raises is retried
  ``executor.retries`` times; a worker that dies has its tasks rescheduled by Dask. A unit that
  still fails comes back as an outcome with its error, and every other unit goes on; the build
  reports the failures at the end and exits non-zero, so a re-run builds what is left.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from logitcache.config import ExecutorConfig, TeacherConfig
from logitcache.errors import LogitcacheError
from logitcache.pipeline.capture.unit_task import (
    THREADS_ENV,
    LabelledUnit,
    TeacherFacts,
    UnitTask,
    label_work_unit,
    teacher_facts_in_process,
)
from logitcache.pipeline.common.corpus import WorkUnit

__all__ = ["ExecutorError", "UnitOutcome", "Executor", "LocalExecutor", "DaskExecutor", "make_executor"]

TaskFunction = Callable[[UnitTask, WorkUnit], LabelledUnit]


class ExecutorError(LogitcacheError):
    """The executor cannot run: no scheduler at the address, a cluster that does not start."""


@dataclass(kw_only=True)
class UnitOutcome:
    """A unit and either its labels or, after every retry, the error that stopped it."""

    unit: WorkUnit
    labelled: LabelledUnit | None = None
    error: str | None = None  # "ExceptionType: message" of the last attempt


class Executor(Protocol):
    name: str

    def teacher_facts(self, cfg: TeacherConfig) -> TeacherFacts: ...

    def map_units(self, task: UnitTask, units: Iterable[WorkUnit]) -> Iterator[UnitOutcome]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Units one at a time in this process; the teacher is loaded here once."""

    name = "local"

    def __init__(self, *, task_fn: TaskFunction = label_work_unit) -> None:
        self.task_fn = task_fn

    def teacher_facts(self, cfg: TeacherConfig) -> TeacherFacts:
        return teacher_facts_in_process(cfg)

    def map_units(self, task: UnitTask, units: Iterable[WorkUnit]) -> Iterator[UnitOutcome]:
        for unit in units:
            yield UnitOutcome(unit=unit, labelled=self.task_fn(task, unit))

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DaskExecutor:
    """One ``dask.distributed`` task per unit (see the module docstring).

    Give ``client`` to use a client of your own (it is left open on close); otherwise one is
    made from ``cfg``: connected to ``cfg.address``, or to a local cluster started here and
    shut down on close.
    """

    name = "dask"

    def __init__(self, cfg: ExecutorConfig, *, client: Any = None, task_fn: TaskFunction = label_work_unit) -> None:
        from distributed import Client, LocalCluster

        self.cfg = cfg
        self.task_fn = task_fn
        self._cluster = None
        self._own_client = client is None
        if client is not None:
            self.client = client
        elif cfg.address:
            try:
                self.client = Client(cfg.address, timeout=cfg.connect_timeout)
            except (OSError, TimeoutError) as error:
                raise ExecutorError(
                    f"executor.address: cannot reach a Dask scheduler at {cfg.address} ({error}); start one "
                    "(`dask scheduler`, then `dask worker ADDRESS` on each machine) or remove executor.address "
                    "to run a local cluster") from None
        else:
            threads = max(1, (os.cpu_count() or 1) // cfg.n_workers)
            with preserved_environment():
                self._cluster = self._local_cluster(LocalCluster, cfg, threads)
            self.client = Client(self._cluster)

    @staticmethod
    def _local_cluster(cluster_class: Any, cfg: ExecutorConfig, threads: int) -> Any:
        return cluster_class(
                n_workers=cfg.n_workers, threads_per_worker=cfg.threads_per_worker, processes=True,
                dashboard_address=None, scheduler_kwargs={"dashboard": False},
                resources=dict(cfg.task_resources) or None,
                # dask starts workers with numeric libraries pinned to one thread; the teacher's
                # forward should use this worker's share of the cores instead
                env={THREADS_ENV: threads},
            )

    @property
    def worker_threads(self) -> int:
        return max(1, sum(self.client.nthreads().values()))

    def _submit(self, fn: Callable, *args: Any, key: str) -> Any:
        return self.client.submit(fn, *args, key=key, pure=False, retries=self.cfg.retries,
                                  resources=dict(self.cfg.task_resources) or None)

    def teacher_facts(self, cfg: TeacherConfig) -> TeacherFacts:
        """Load the teacher on one worker and return what the manifest records about it."""
        future = self._submit(teacher_facts_in_process, cfg, key=f"logitcache-teacher-{uuid.uuid4().hex[:12]}")
        try:
            return future.result()
        finally:
            future.release()

    def map_units(self, task: UnitTask, units: Iterable[WorkUnit]) -> Iterator[UnitOutcome]:
        from distributed import as_completed

        build = uuid.uuid4().hex[:12]
        limit = self.cfg.in_flight or 2 * self.worker_threads
        waiting: dict[str, WorkUnit] = {}
        done = as_completed()
        for unit in units:
            future = self._submit(self.task_fn, task, unit, key=f"logitcache-unit-{unit.unit_id}-{build}")
            waiting[future.key] = unit
            done.add(future)
            while done.count() >= limit:
                yield self._outcome(next(done), waiting)
        for future in done:
            yield self._outcome(future, waiting)

    @staticmethod
    def _outcome(future: Any, waiting: dict[str, WorkUnit]) -> UnitOutcome:
        unit = waiting.pop(future.key)
        try:
            if future.status == "finished":
                return UnitOutcome(unit=unit, labelled=future.result())
            if future.status == "error":
                error = future.exception()
                return UnitOutcome(unit=unit, error=f"{type(error).__name__}: {error}")
            return UnitOutcome(unit=unit, error=f"the task was {future.status} (its worker or the scheduler went away)")
        finally:
            future.release()

    def close(self) -> None:
        with preserved_environment():
            if self._own_client:
                self.client.close()
            if self._cluster is not None:
                self._cluster.close()

    def __enter__(self) -> DaskExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def preserved_environment() -> Iterator[None]:
    """Undo what dask's nannies write into this process's environment (OMP_NUM_THREADS=1 and
    friends, meant for the workers), so that later subprocesses of the driver are unaffected."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        if dict(os.environ) != saved:
            os.environ.clear()
            os.environ.update(saved)


def make_executor(cfg: ExecutorConfig) -> LocalExecutor | DaskExecutor:
    """The executor ``cfg`` asks for."""
    return DaskExecutor(cfg) if cfg.kind == "dask" else LocalExecutor()
