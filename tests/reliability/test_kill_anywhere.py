"""Kill anywhere: SIGKILL ``logitcache build`` and ``logitcache train`` at many moments, then resume.

Property-style but deterministic: for each phase of a build (tokenizing, teacher forward,
value encoding, backend write, rename, manifest commit, the committer, the lock) and of a
training run (a step, a checkpoint half written, a metrics row), ``kill_at.py`` kills a real
CLI process at the N-th call of that phase's function, N drawn from a seeded RNG over the
number of calls an uninterrupted run makes; a few more kills land at random wall-clock
moments. After each kill the same command runs again, and the result must be exactly what an
uninterrupted run produced (same thread count: float sums depend on it), with no work redone
beyond the units in flight, no stale lock and no leftover file.

All runs of one stage share one helper process (``kill_at.py`` forks a child per run), so the
~5 s of importing torch is paid once per stage rather than once per kill.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from logitcache.storage_schemas.records import RecordBlock
from logitcache.storage_schemas.shard_reader import CacheReader
from logitcache.storage_schemas.verify import verify_cache
from tests.stages.test_train_students import job_data

REPO = Path(__file__).resolve().parents[2]
SEED = 7
UNITS = 6  # 2 corpus files x 25 documents, 10 documents per unit

#: (phase, target, when, match, kills): the build's kill points
BUILD_KILLS = [
    ("tokenize", "logitcache.pipeline.common.windows:tokenize", "before", None, 1),
    ("forward", "logitcache.pipeline.capture.teacher:Teacher.hidden_states", "before", None, 2),
    ("encode", "logitcache.storage_schemas.value_codecs:ValueCodec.encode", "before", None, 1),
    ("write", "logitcache.storage_schemas.parquet_backend:ParquetBackend.write", "after", None, 2),
    ("rename", "logitcache.storage_schemas.location:CacheLocation.rename", "after", None, 2),
    ("manifest", "logitcache.storage_schemas.manifest:Manifest.save", "before", None, 2),
    ("manifest", "logitcache.storage_schemas.manifest:Manifest.save", "after", None, 1),
    ("manifest-rename", "os:replace", "before", "manifest.json", 1),  # temp manifest written, not renamed
    ("committer", "logitcache.pipeline.common.committer:BackgroundCommitter._commit", "before", None, 1),
    ("stats", "logitcache.storage_schemas.shard_writer:ShardWriter.update_stats", "before", None, 1),
    ("lock", "logitcache.storage_schemas.lock:CacheLock._create", "after", None, 1),
]
TIMED_KILLS = 2

#: the training run's kill points
TRAIN_KILLS = [
    ("step", "logitcache.pipeline.distill.training:StudentRun.train_on", "before", None, 2),
    ("checkpoint", "logitcache.pipeline.distill.students:Student.save", "after", None, 2),  # between a checkpoint's files
    ("checkpoint-prune", "logitcache.pipeline.distill.checkpoints:CheckpointStore._prune", "before", None, 1),
    ("metrics-row", "logitcache.stages.train_students:_log", "after", None, 1),
    ("metrics-torn", "logitcache.stages.train_students:_log", "torn", None, 1),
]

STUDENT = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}


def run_plan(tmp: Path, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    plan, result = tmp / "plan.json", tmp / "result.json"
    plan.write_text(json.dumps({"seed": SEED, "steps": steps}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LOGITCACHE_TORCH_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "tests.reliability.kill_at", str(plan), str(result)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(result.read_text())


def assert_killed(where: str, killed: dict[str, Any]) -> None:
    """A kill point must be reached; a timed kill may come after a (short) run has finished."""
    if where.startswith("timed") and killed["exit_code"] == 0:
        return
    assert killed["signal"] == 9, f"{where}: not killed: exit {killed['exit_code']}\n{killed['stderr']}"


def expand(kills: list[tuple]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{phase}/{when}#{i}", {"target": target, "when": when, "n": None, "match": match})
            for phase, target, when, match, times in kills for i in range(times)]


# ------------------------------------------------------------------------------------ build


@pytest.fixture(scope="module")
def build_runs(tmp_path_factory, corpus_dir, tiny_causal_lm_dir):
    tmp = tmp_path_factory.mktemp("kill_build")
    config = tmp / "job.yaml"
    config.write_text(yaml.safe_dump({
        "cache": str(tmp / "unused"),
        "corpus": {"data_files": [str(corpus_dir / "*.jsonl")], "lang_column": "lang", "id_column": "id",
                   "unit_documents": 10},
        "teacher": {"model": str(tiny_causal_lm_dir), "batch_tokens": 256},
        "windows": {"max_length": 48},
        "soft_labels": {"k": 8, "mode": "topk+sampled", "samples": 16, "values": "q8", "entropy": True},
    }))

    def build(cache: Path) -> list[str]:
        return ["build", "--no-progress", "--json", str(config), "--set", f"cache={cache}"]

    counted = sorted({(target, match) for _, target, _, match, _ in BUILD_KILLS}, key=str)
    steps: list[dict[str, Any]] = [{"name": "reference", "argv": build(tmp / "reference"), "count": counted}]
    cases = expand(BUILD_KILLS) + [(f"timed#{i}", None) for i in range(TIMED_KILLS)]
    for index, (name, kill) in enumerate(cases):
        cache = tmp / f"cache{index}"
        killed = {"name": name, "argv": build(cache), "snapshot": str(cache)}
        killed.update({"kill": kill} if kill else {"kill_after_seconds": None})
        steps += [killed, {"name": f"{name} resumed", "argv": build(cache), "snapshot": str(cache)}]
    results = run_plan(tmp, steps)
    reference = results[0]
    assert reference["exit_code"] == 0, reference["stderr"]
    pairs = [(name, tmp / f"cache{i}", results[1 + 2 * i], results[2 + 2 * i]) for i, (name, _) in enumerate(cases)]
    return tmp / "reference", reference, pairs


def sorted_records(cache: Path) -> RecordBlock:
    reader = CacheReader(str(cache))
    block = RecordBlock.concat([reader.read_shard(entry, verify=True) for entry in reader.shards])
    order = np.argsort(block.record_id, kind="stable")
    return RecordBlock.concat([block.take_records(int(i), int(i) + 1) for i in order])


def cache_stats(cache: Path) -> dict[str, Any]:
    """The manifest's cache-wide statistics, less the last run's own throughput."""
    stats = dict(CacheReader(str(cache)).manifest.stats)
    stats.pop("last_build", None)
    return stats


def test_the_reference_build_reaches_every_kill_point(build_runs):
    _, reference, _ = build_runs
    assert json.loads(reference["stdout"])["units_built"] == UNITS
    for phase, target, _, match, _ in BUILD_KILLS:
        key = target if match is None else f"{target}[{match}]"
        assert reference["counts"].get(key, 0) >= 1, f"{phase}: {key} is never called by a build"


def test_every_killed_build_resumes_to_the_uninterrupted_cache(build_runs):
    reference_cache, _, pairs = build_runs
    expected = sorted_records(reference_cache)
    expected_sha = [(e.unit_id, e.sha256) for e in CacheReader(str(reference_cache)).shards]
    expected_stats = cache_stats(reference_cache)
    for name, cache, killed, resumed in pairs:
        where = f"{name} (N={killed['n']}, t={killed['kill_after_seconds']})"
        assert_killed(where, killed)
        assert resumed["exit_code"] == 0, f"{where}: the re-run failed\n{resumed['stderr']}"
        assert sorted_records(cache).equals(expected), where
        assert [(e.unit_id, e.sha256) for e in CacheReader(str(cache)).shards] == expected_sha, where
        assert cache_stats(cache) == expected_stats, where
        report = verify_cache(str(cache), deep=True)
        assert report.ok and not report.unlisted, f"{where}: {report.to_text()}"


def test_a_resumed_build_redoes_only_the_units_not_committed(build_runs):
    _, _, pairs = build_runs
    for name, _, killed, resumed in pairs:
        committed = killed["snapshot"]["units"] or []
        summary = json.loads(resumed["stdout"])
        assert summary["units_skipped"] == len(committed), name
        assert summary["units_built"] == UNITS - len(committed), name


def test_the_lock_of_a_killed_build_is_taken_over_and_released(build_runs):
    _, _, pairs = build_runs
    for name, _, killed, resumed in pairs:
        holder = killed["snapshot"]["lock"]
        if not name.startswith("timed"):  # a timed kill may land before the lock is taken
            assert holder is not None, f"{name}: the killed build did not hold the lock"
        assert resumed["snapshot"]["lock"] is None, f"{name}: a lock is left after the re-run"
        leftovers = [f for f in resumed["snapshot"]["files"] if f != "manifest.json" and not f.startswith("shards/")]
        assert not leftovers, f"{name}: files left behind: {leftovers}"


def test_kills_land_in_every_phase_and_at_several_moments(build_runs):
    _, _, pairs = build_runs
    killed_in = {name.split("#")[0] for name, _, killed, _ in pairs if killed["signal"] == 9}
    assert {f"{phase}/{when}" for phase, _, when, *_ in BUILD_KILLS} <= killed_in
    committed_at_kill = {len(killed["snapshot"]["units"] or []) for *_, killed, _ in pairs}
    assert len(committed_at_kill) >= 3, committed_at_kill  # early, middle and late kills


# ------------------------------------------------------------------------------------ train


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory, corpus_dir, tiny_causal_lm_dir):
    tmp = tmp_path_factory.mktemp("kill_train")
    students = [
        {"name": "fkl", "model": {"config": STUDENT}, "loss": {"kind": "forward_kl", "alpha": 0.7},
         "optimizer": {"lr": 3e-3}},
        {"name": "rkl", "model": {"config": STUDENT}, "grad_accum": 2,
         "loss": {"kind": "reverse_kl", "temperature": 2.0}, "optimizer": {"lr": 3e-3}},
    ]
    data = job_data(tmp / "cache", corpus_dir, tiny_causal_lm_dir, tmp / "unused", students=students,
                    train={"save_every": 3, "eval_every": 4})
    config = tmp / "job.yaml"
    config.write_text(yaml.safe_dump(data))

    def train(output: Path) -> list[str]:
        return ["train", "--no-progress", "--json", str(config), "--set", f"train.output={output}"]

    counted = sorted({(target, match) for _, target, _, match, _ in TRAIN_KILLS}, key=str)
    steps: list[dict[str, Any]] = [{"name": "cache", "argv": ["build", "--no-progress", str(config)]},
                                   {"name": "reference", "argv": train(tmp / "reference"), "count": counted}]
    cases = expand(TRAIN_KILLS) + [("timed#0", None)]
    for index, (name, kill) in enumerate(cases):
        killed = {"name": name, "argv": train(tmp / f"out{index}")}
        killed.update({"kill": kill} if kill else {"kill_after_seconds": None})
        steps += [killed, {"name": f"{name} resumed", "argv": train(tmp / f"out{index}")}]
    results = run_plan(tmp, steps)[1:]
    assert results[0]["exit_code"] == 0, results[0]["stderr"]
    pairs = [(name, tmp / f"out{i}", results[1 + 2 * i], results[2 + 2 * i]) for i, (name, _) in enumerate(cases)]
    return tmp / "reference", results[0], pairs


def final_weights(output: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(output / name / "final" / "model.safetensors")


def metrics_rows(output: Path, name: str) -> list[dict[str, Any]]:
    """The student's metrics log, less wall-clock seconds (the only field a kill may change)."""
    rows = [json.loads(line) for line in (output / name / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_every_killed_training_run_resumes_to_the_uninterrupted_students(train_runs):
    reference, reference_result, pairs = train_runs
    expected_steps = {n: s["steps"] for n, s in json.loads(reference_result["stdout"])["students"].items()}
    assert expected_steps == {"fkl": 8, "rkl": 8}
    for name, output, killed, resumed in pairs:
        where = f"{name} (N={killed['n']}, t={killed['kill_after_seconds']})"
        assert_killed(where, killed)
        assert resumed["exit_code"] == 0, f"{where}: the re-run failed\n{resumed['stderr']}"
        summary = json.loads(resumed["stdout"])
        assert {n: s["steps"] for n, s in summary["students"].items()} == expected_steps, where
        for student in expected_steps:
            a, b = final_weights(reference, student), final_weights(output, student)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{where}: {student}"


def test_the_metrics_log_has_each_step_once_after_a_kill(train_runs):
    reference, _, pairs = train_runs
    for student in ("fkl", "rkl"):
        expected = metrics_rows(reference, student)
        assert [r["step"] for r in expected if "loss" in r] == list(range(1, 9))
        for name, output, killed, _ in pairs:
            # every row, loss and evaluation alike, once and as an uninterrupted run wrote it
            assert metrics_rows(output, student) == expected, f"{name} (N={killed['n']}): {student}"


def test_training_kills_land_in_every_phase(train_runs):
    _, _, pairs = train_runs
    killed_in = {name.split("#")[0] for name, _, killed, _ in pairs if killed["signal"] == 9}
    assert {f"{phase}/{when}" for phase, _, when, *_ in TRAIN_KILLS} <= killed_in
