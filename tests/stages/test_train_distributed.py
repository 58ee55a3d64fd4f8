"""Stage two under torchrun: real ``torchrun --nproc_per_node=2`` runs on the CPU (gloo).

Each run records, per rank, the batches it trained on and its final weights (see
``torchrun_train.py``), so the tests can check what the ranks read, that they keep the same
weights, and that those are the weights of one process training on the ranks' batches
concatenated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from logitcache.config import JobConfig, config_from_dict
from logitcache.pipeline.distill.collate import TokenBatch
from logitcache.pipeline.distill.dataset import CacheDataset
from logitcache.pipeline.distill.students import build_student
from logitcache.pipeline.distill.training import StudentRun
from logitcache.stages.build_cache import build_cache
from logitcache.stages.train_students import train_students
from logitcache.storage_schemas.shard_reader import CacheReader
from tests.stages.test_train_students import job_data
from tests.stages.torchrun_train import record

REPO = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("torchrun_train.py")
# 8 steps of fkl (1 batch per step) and rkl (2 batches per step): 16 batches per rank;
# a checkpoint every 3 batches, so most of them hold rkl's gradients from half a step
TRAIN = {"steps": 8, "save_every": 3, "shuffle_buffer": 16}
STUDENTS = ("fkl", "rkl")


def torchrun(*args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--monitor-interval=0.2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if expect_ok:
        assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def write_job(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def load_records(directory: Path) -> list[dict[str, Any]]:
    return [torch.load(directory / f"rank-{rank}.pt", weights_only=False) for rank in (0, 1)]


def final_weights(output: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(output / name / "final" / "model.safetensors")


def epoch_ids(batches: list[TokenBatch], epoch: int) -> list[int]:
    return [int(rid) for batch in batches for rid, cursor in zip(batch.record_ids, batch.cursors, strict=True)
            if cursor[0] == epoch]


def concatenated(a: TokenBatch, b: TokenBatch) -> TokenBatch:
    """One batch holding the rows of ``a`` then those of ``b`` (what one process would get)."""
    values: dict[str, Any] = {}
    for spec in dataclasses.fields(TokenBatch):
        x, y = getattr(a, spec.name), getattr(b, spec.name)
        if spec.name == "segment":  # b's records come after a's
            y = torch.where(y >= 0, y + len(a.record_ids), y)
        if x is None:
            values[spec.name] = None
        elif isinstance(x, torch.Tensor):
            values[spec.name] = torch.cat([x, y])
        elif isinstance(x, np.ndarray):
            values[spec.name] = np.concatenate([x, y])
        else:
            values[spec.name] = x + y
    return TokenBatch(**values)


def train_alone(cfg: JobConfig, name: str, batches: list[TokenBatch]) -> dict[str, torch.Tensor]:
    """Student ``name`` trained in this process on ``batches`` until its steps are done."""
    student_cfg = next(s for s in cfg.students if s.name == name)
    manifest = CacheReader(cfg.cache).manifest
    student = build_student(student_cfg, manifest=manifest, device=torch.device("cpu"), seed=cfg.train.seed)
    run = StudentRun.create(student, total_steps=cfg.train.steps)
    for batch in batches:
        if run.done:
            break
        run.train_on(batch)
    assert run.done
    return student.model.state_dict()


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, corpus_dir, tiny_causal_lm_dir) -> Path:
    root = tmp_path_factory.mktemp("ddp_cache")
    build_cache(config_from_dict(job_data(root / "cache", corpus_dir, tiny_causal_lm_dir, root / "unused")),
                progress=False)
    return root / "cache"


@pytest.fixture(scope="module")
def job(cache, corpus_dir, tiny_causal_lm_dir):
    """The job's config as a dict, training into ``output``."""
    def make(output: Path, **train: Any) -> dict[str, Any]:
        return job_data(cache, corpus_dir, tiny_causal_lm_dir, output, train={**TRAIN, **train})
    return make


@pytest.fixture(scope="module")
def straight(tmp_path_factory, job):
    """A 2-rank run, uninterrupted: (its config, its output, the ranks' records)."""
    root = tmp_path_factory.mktemp("ddp_straight")
    data = job(root / "out")
    torchrun(str(HELPER), str(write_job(root / "job.yaml", data)), str(root / "records"))
    return config_from_dict(data), root / "out", load_records(root / "records")


def test_ranks_read_disjoint_parts_whose_union_is_the_epoch(straight):
    cfg, _, records = straight
    for rank, rec in enumerate(records):
        assert len(rec["batches"]) == 16
        assert {c[1] % 2 for b in rec["batches"] for c in b.cursors} == {rank}  # windows g with g % 2 == rank
        assert max(c[0] for b in rec["batches"] for c in b.cursors) >= 1, "rank did not finish epoch 0"
    parts = [epoch_ids(rec["batches"], 0) for rec in records]
    everything = CacheDataset(cfg.cache, seed=cfg.train.seed, epochs=1, shuffle_buffer=cfg.train.shuffle_buffer,
                              split="train", held_out_fraction=cfg.eval.held_out_fraction, rank=0, world_size=1)
    epoch = sorted(r.record_id for r in everything)
    assert all(parts) and len(epoch) == len(set(epoch))
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == epoch  # every record once, none twice


def test_ranks_train_the_union_of_their_batches(straight):
    cfg, output, records = straight
    for name in STUDENTS:
        ranks = [rec["weights"][name] for rec in records]
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0]), f"{name}: ranks differ"
        saved = final_weights(output, name)
        assert all(torch.equal(saved[k], ranks[0][k]) for k in saved)
        union = [concatenated(a, b) for a, b in zip(records[0]["batches"], records[1]["batches"], strict=True)]
        assert max_difference(train_alone(cfg, name, union), ranks[0]) < 1e-5
        # ...and not the weights of rank 0's batches alone: the check above can fail
        assert max_difference(train_alone(cfg, name, records[0]["batches"]), ranks[0]) > 1e-3

    # rank 0 alone logs, one row per step, counting the tokens of both ranks
    rows = [json.loads(line) for line in (output / "fkl" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    both = sum(rec["batches"][i].tokens for rec in records for i in range(8))
    assert train_rows[-1]["tokens"] == both
    trainer = json.loads(sorted((output / "checkpoints").glob("step-*"))[-1].joinpath("trainer.json").read_text())
    assert trainer["world_size"] == 2 and len(trainer["rank_rng"]) == 2
    assert trainer["dataset"]["coverage"] == [0, 1]  # every rank's reader state, merged


def test_a_crashed_run_resumes_exactly_under_torchrun_and_alone(tmp_path, straight, job):
    _, straight_output, _ = straight
    data = job(tmp_path / "out")
    path = write_job(tmp_path / "job.yaml", data)
    # both ranks crash before their 5th batch; the newest checkpoint is after batch 3, in the
    # middle of an rkl step
    crashed = torchrun(str(HELPER), str(path), str(tmp_path / "records"), "5", expect_ok=False)
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr + crashed.stdout
    assert [p.name for p in (tmp_path / "out" / "checkpoints").glob("step-*")] == ["step-000000003"]
    before = load_records(tmp_path / "records")
    shutil.copytree(tmp_path / "out", tmp_path / "alone")

    # the documented command resumes on 2 ranks: the weights of the uninterrupted run, bit for bit
    resumed = torchrun("-m", "logitcache", "train", str(path), "--no-progress", "--json")
    printed = json.loads(resumed.stdout)  # rank 0 alone prints
    assert printed["resumed_from"] == 3 and printed["world_size"] == 2
    for name in STUDENTS:
        a, b = final_weights(straight_output, name), final_weights(tmp_path / "out", name)
        assert all(torch.equal(a[k], b[k]) for k in a), name

    # one process resumes the same checkpoint: it reads exactly what the 2 ranks had not
    alone = dict(data, train={**data["train"], "output": str(tmp_path / "alone")})
    summary = record(config_from_dict(alone), tmp_path / "records-alone" / "rank-0.pt")
    assert summary.resumed_from == 3 and summary.world_size == 1
    assert all(summary.students[name]["steps"] == 8 for name in STUDENTS)
    after = torch.load(tmp_path / "records-alone" / "rank-0.pt", weights_only=False)["batches"]
    read_before = epoch_ids(before[0]["batches"][:3], 0) + epoch_ids(before[1]["batches"][:3], 0)
    read_after = epoch_ids(after, 0)
    assert read_after and max(c[0] for b in after for c in b.cursors) >= 1
    cfg = config_from_dict(data)
    everything = CacheDataset(cfg.cache, seed=cfg.train.seed, epochs=1, shuffle_buffer=cfg.train.shuffle_buffer,
                              split="train", held_out_fraction=cfg.eval.held_out_fraction, rank=0, world_size=1)
    assert sorted(read_before + read_after) == sorted(r.record_id for r in everything)


def test_a_rank_with_nothing_to_read_adds_nothing_and_stalls_nobody(tmp_path, job):
    # one shuffle window for the whole cache: rank 1 has nothing to read, ever
    data = job(tmp_path / "ddp", shuffle_buffer=100_000, save_every=0, steps=4)
    # and a student of micro-batches (3 per step, 2 per shared batch): its empty pieces keep in step
    data["students"].append(dict(data["students"][0], name="pieces", batch_tokens=96, grad_accum=3))
    torchrun("-m", "logitcache", "train", str(write_job(tmp_path / "job.yaml", data)), "--no-progress")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): the same float reductions
    try:
        train_students(config_from_dict(dict(data, train={**data["train"], "output": str(tmp_path / "alone")})),
                       progress=False)
    finally:
        torch.set_num_threads(threads)
    for name in (*STUDENTS, "pieces"):
        a, b = final_weights(tmp_path / "ddp", name), final_weights(tmp_path / "alone", name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
