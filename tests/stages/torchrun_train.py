"""Stage two under torchrun, recording what each rank trained on: a helper of
test_train_distributed.py, started as a script by torchrun (or in-process by ``record``).

    torchrun --nproc_per_node=2 tests/stages/torchrun_train.py CONFIG RECORD_DIR [DIE_AT_BATCH]

runs ``train_students`` on CONFIG and writes ``RECORD_DIR/rank-<rank>.pt`` on every rank:
the batches the rank fed to its students, in order, and each student's final weights on
that rank. With DIE_AT_BATCH every rank writes its record and then raises just before
training on that batch (of this process, counted from 1), as a crash would.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from logitcache.config import JobConfig, load_config
from logitcache.pipeline.distill import training
from logitcache.stages.train_students import TrainSummary, train_students


class SimulatedCrash(RuntimeError):
    pass


def record(cfg: JobConfig, record_file: Path, *, die_at: int | None = None) -> TrainSummary:
    """Train ``cfg`` in this process (one rank of many, or alone) and record what it read."""
    batches: list[Any] = []
    runs: list[training.StudentRun] = []
    original_train_on, original_post_init = training.StudentRun.train_on, training.StudentRun.__post_init__

    def save() -> None:
        record_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"rank": int(os.environ.get("RANK", 0)), "batches": batches,
                    "weights": {run.student.name: {k: v.detach().clone() for k, v in
                                                   run.student.model.state_dict().items()} for run in runs}},
                   record_file)

    def train_on(self, batch):
        if not batches or batches[-1] is not batch:  # the loop gives one batch to every student
            if die_at is not None and len(batches) + 1 == die_at:
                save()
                if torch.distributed.is_initialized():  # no rank is torn down before its record is saved
                    torch.distributed.barrier()
                raise SimulatedCrash(f"simulated crash before batch {die_at}")
            batches.append(batch)
        return original_train_on(self, batch)

    def post_init(self):
        original_post_init(self)
        runs.append(self)

    training.StudentRun.train_on, training.StudentRun.__post_init__ = train_on, post_init
    try:
        summary = train_students(cfg, progress=False)
    finally:
        training.StudentRun.train_on, training.StudentRun.__post_init__ = original_train_on, original_post_init
    save()
    return summary


def main(argv: list[str]) -> None:
    config, record_dir = argv[0], Path(argv[1])
    die_at = int(argv[2]) if len(argv) > 2 else None
    record(load_config(config), record_dir / f"rank-{os.environ.get('RANK', '0')}.pt", die_at=die_at)


if __name__ == "__main__":
    main(sys.argv[1:])
