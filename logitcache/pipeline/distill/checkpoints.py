"""Checkpoints of a stage-two run: every student and the reader's position, saved as one unit.

A checkpoint is a directory ``<output>/checkpoints/step-<batches>/`` holding, per student,
the model (``save_pretrained``) and its run state (optimizer, schedule, counters, pending
gradients), plus ``trainer.json``: the batches read, the reader's resume state, the torch
RNG state (under torchrun, every rank's, as ``rank_rng``) and a digest of each student's
config. Under torchrun only rank 0 writes, after the ranks' pending gradients and reader
states are gathered to it (see ``StudentRun.gather_pending``, ``CacheDataset.merge_states``).
It is written under a temporary name and renamed into place, so a run killed while saving
leaves the previous checkpoint as the latest complete one. Only the newest ``keep``
checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logitcache.errors import StudentError
from logitcache.storage_schemas.fingerprint import diff_fields

_STEP_DIR = re.compile(r"^step-(\d{9})$")
TRAINER_FILE = "trainer.json"
RUN_STATE_FILE = "run_state.pt"


@dataclass(kw_only=True)
class Checkpoint:
    path: Path
    batches: int
    trainer: dict[str, Any]

    def student_dir(self, name: str) -> Path:
        return self.path / name

    def run_state(self, name: str) -> dict[str, Any]:
        return torch.load(self.path / name / RUN_STATE_FILE, map_location="cpu", weights_only=False)


class CheckpointStore:
    """Save and find the checkpoints under ``<output>/checkpoints``."""

    def __init__(self, output: str | os.PathLike[str], *, keep: int = 2) -> None:
        self.root = Path(output) / "checkpoints"
        self.keep = keep

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None."""
        if not self.root.is_dir():
            return None
        found = sorted((int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)))
        for batches, path in reversed(found):
            try:
                trainer = json.loads((path / TRAINER_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # not complete (cannot happen after the rename, but a user may have edited it)
            return Checkpoint(path=path, batches=batches, trainer=trainer)
        return None

    def save(self, *, batches: int, trainer: dict[str, Any], runs: dict[str, Any]) -> Path:
        """Write one checkpoint; ``runs`` maps student name -> (Student, StudentRun)."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{batches:09d}"
        tmp = self.root / f".tmp-{final.name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for name, (student, run) in runs.items():
            student.save(tmp / name)
            torch.save(run.state_dict(), tmp / name / RUN_STATE_FILE)
        state = {**trainer, "batches": batches, "torch_rng": torch.get_rng_state().tolist()}
        (tmp / TRAINER_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._prune()
        return final

    def _prune(self) -> None:
        found = sorted((int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)))
        for _, path in found[: max(0, len(found) - self.keep)]:
            shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob(".tmp-step-*"):
            shutil.rmtree(path, ignore_errors=True)


def restore_rng(trainer: dict[str, Any], *, rank: int = 0, world_size: int = 1) -> bool:
    """Restore this process's torch RNG from a checkpoint's trainer state: its own rank's when
    the checkpoint was written by as many ranks (``rank_rng``), else the writer's (rank 0's)
    on rank 0. False when there is none for this rank: the caller seeds it afresh."""
    per_rank = trainer.get("rank_rng")
    if per_rank is not None and len(per_rank) == world_size:
        state = per_rank[rank]
    elif rank == 0 and "torch_rng" in trainer:
        state = trainer["torch_rng"]
    else:
        return False
    torch.set_rng_state(torch.tensor(state, dtype=torch.uint8))
    return True


_AFRESH = "or start afresh (--no-resume, or another train.output)"


def check_resumable(checkpoint: Checkpoint, *, digests: dict[str, str], configs: dict[str, dict[str, Any]],
                    steps: int) -> None:
    """Refuse to resume a checkpoint written for other students (names or configs, naming the
    settings that changed) or for another ``train.steps`` (the schedules decay over it)."""
    saved = checkpoint.trainer.get("students", {})
    if set(saved) != set(digests):
        raise StudentError(
            f"{checkpoint.path}: this checkpoint holds students {sorted(saved)}, the config lists "
            f"{sorted(digests)}; resume with the same students, {_AFRESH}")
    changed = sorted(name for name, digest in digests.items() if saved[name].get("config_digest") != digest)
    if changed:
        before = checkpoint.trainer.get("configs", {})  # absent from checkpoints of older versions
        details = [f"students[{name}]: {', '.join(diff_fields(before[name], configs[name]))}" for name in changed
                   if name in before]
        raise StudentError(
            f"{checkpoint.path}: the config of {', '.join(changed)} changed since this checkpoint"
            + (f" ({'; '.join(details)})" if details else "") + f"; resume with the same settings, {_AFRESH}")
    saved_steps = checkpoint.trainer.get("train_steps")
    if saved_steps is not None and saved_steps != steps:
        raise StudentError(
            f"{checkpoint.path}: train.steps was {saved_steps} when this checkpoint was written, now {steps}; "
            "the learning-rate schedules decay over train.steps, so resuming would make them jump. Keep "
            f"train.steps {saved_steps}, {_AFRESH}; to train a finished student further, start a new run "
            "from its final model (model.path: <output>/<student>/final)")
