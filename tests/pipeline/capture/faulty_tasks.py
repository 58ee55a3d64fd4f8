"""Unit task functions that fail on purpose, for the executor tests.

Each wraps the real :func:`label_work_unit` and misbehaves for one unit only, keyed by a
marker file so that the fault happens the intended number of times even though Dask may
run the task in any worker process (files are the only state the processes share).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from logitcache.pipeline.capture.unit_task import label_work_unit


def die_once(task, unit, *, unit_id: str, marker: str):
    """SIGKILL the worker process the first time ``unit_id`` runs."""
    if unit.unit_id == unit_id and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return label_work_unit(task, unit)


def fail_while_marked(task, unit, *, unit_id: str, marker: str):
    """Raise for ``unit_id`` for as long as ``marker`` exists; count the attempts in it."""
    if unit.unit_id == unit_id and os.path.exists(marker):
        with open(marker, "a") as fh:
            fh.write("attempt\n")
        raise RuntimeError(f"injected failure for {unit_id}")
    return label_work_unit(task, unit)


def fail_first_attempts(task, unit, *, unit_id: str, counter: str, failures: int):
    """Raise for the first ``failures`` attempts at ``unit_id``, then label it."""
    if unit.unit_id == unit_id:
        with open(counter, "a") as fh:
            fh.write("attempt\n")
        if len(Path(counter).read_text().splitlines()) <= failures:
            raise RuntimeError(f"injected transient failure for {unit_id}")
    return label_work_unit(task, unit)


def die_while_writing(task, unit, *, unit_id: str, marker: str):
    """SIGKILL the worker process in the middle of staging ``unit_id``'s shard, the first time:
    after the shard's bytes are written under _incomplete/, before its entry goes back."""
    from logitcache.pipeline.capture import unit_task

    if unit.unit_id != unit_id or os.path.exists(marker):
        return label_work_unit(task, unit)
    real = unit_task.stage_shard

    def write_then_die(*args, **kwargs):
        staged = real(*args, **kwargs)
        Path(marker).write_text(staged.staging)
        os.kill(os.getpid(), signal.SIGKILL)

    unit_task.stage_shard = write_then_die
    try:
        return label_work_unit(task, unit)
    finally:
        unit_task.stage_shard = real
