"""Corrupt shards in stage two: a byte flipped, a file cut short or gone, after commit.

The labels of such a shard must never reach a student. ``logitcache train`` stops before
reading it, naming the shard and the repair; with ``train.on_corrupt_shard: skip`` it trains
and evaluates without it, warns, and counts it in the metrics. A spy on the reader proves
that no block of the bad shard was ever read.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from logitcache.cli import main
from logitcache.config import config_from_dict
from logitcache.stages.build_cache import build_cache
from logitcache.storage_schemas.shard_reader import CacheReader
from logitcache.storage_schemas.verify import verify_cache
from tests.stages.test_train_students import job_data

# cache order (shuffle_buffer 0), so the first shard is the first one read
TRAIN = {"steps": 4, "shuffle_buffer": 0, "save_every": 0}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, corpus_dir, tiny_causal_lm_dir):
    """Pristine caches by backend (built on first use)."""

    @functools.cache
    def get(backend: str) -> Path:
        root = tmp_path_factory.mktemp(f"pristine-{backend}")
        data = job_data(root / "cache", corpus_dir, tiny_causal_lm_dir, root / "unused", storage={"backend": backend})
        build_cache(config_from_dict(data), progress=False)
        return root / "cache"

    return get


def _largest_file(path: Path) -> Path:
    if path.is_file():
        return path
    return max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def corrupt(cache: Path, how: str) -> str:
    """Damage the first shard of ``cache`` and return its path as the manifest lists it."""
    entry = CacheReader(str(cache)).shards[0]
    target = cache / entry.path
    if how == "missing":
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        return entry.path
    victim = _largest_file(target)
    data = bytearray(victim.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01  # one bit
    else:  # truncated
        data = data[: len(data) // 2]
    victim.write_bytes(bytes(data))
    return entry.path


def setup_job(tmp_path: Path, cache: Path, corpus_dir, model, **train) -> Path:
    local = tmp_path / "cache"
    shutil.copytree(cache, local)
    data = job_data(local, corpus_dir, model, tmp_path / "out", train={**TRAIN, **train})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def reads(monkeypatch):
    """The shard paths whose blocks were read in this process."""
    seen: list[str] = []
    original = CacheReader.read_block

    def spy(self, entry, index):
        seen.append(entry.path)
        return original(self, entry, index)

    monkeypatch.setattr(CacheReader, "read_block", spy)
    return seen


@pytest.mark.parametrize(("backend", "how"), [
    ("parquet", "flip"), ("zarr", "flip"), ("parquet", "truncated"), ("zarr", "missing"),
])
def test_train_stops_before_a_corrupt_shard_reaches_a_student(tmp_path, caches, corpus_dir, tiny_causal_lm_dir,
                                                              reads, backend, how):
    path = setup_job(tmp_path, caches(backend), corpus_dir, tiny_causal_lm_dir)
    bad = corrupt(tmp_path / "cache", how)
    assert not verify_cache(str(tmp_path / "cache")).ok
    result = CliRunner().invoke(main, ["train", "--no-progress", str(path)])
    assert result.exit_code == 1, result.output
    message = result.output
    assert message.startswith("error: shard " + bad), message
    assert {"flip": "sha256", "truncated": "bytes, the manifest says", "missing": "is missing"}[how] in message
    assert f"logitcache verify {tmp_path / 'cache'}" in message
    assert "logitcache build CONFIG --repair" in message and "on_corrupt_shard: skip" in message
    assert "Traceback" not in message
    assert bad not in reads  # no block of the bad shard was read
    for student in ("fkl", "rkl"):
        log = tmp_path / "out" / student / "metrics.jsonl"
        assert not log.exists() or not any("loss" in json.loads(line) for line in log.read_text().splitlines())


def test_a_worker_process_stops_with_the_same_clean_message(tmp_path, caches, corpus_dir, tiny_causal_lm_dir):
    path = setup_job(tmp_path, caches("parquet"), corpus_dir, tiny_causal_lm_dir, num_workers=2)
    bad = corrupt(tmp_path / "cache", "flip")
    result = CliRunner().invoke(main, ["train", "--no-progress", str(path)])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: shard " + bad) and "sha256" in result.output, result.output
    assert "Traceback" not in result.output and "DataLoader worker" not in result.output


@pytest.mark.parametrize(("backend", "how", "workers"), [("parquet", "flip", 0), ("zarr", "truncated", 2)])
def test_skip_trains_and_evaluates_without_the_corrupt_shard_and_counts_it(tmp_path, caches, corpus_dir,
                                                                           tiny_causal_lm_dir, reads, caplog,
                                                                           backend, how, workers):
    path = setup_job(tmp_path, caches(backend), corpus_dir, tiny_causal_lm_dir,
                     on_corrupt_shard="skip", num_workers=workers)
    bad = corrupt(tmp_path / "cache", how)
    runner = CliRunner()
    with caplog.at_level(logging.WARNING, logger="logitcache"):
        result = runner.invoke(main, ["train", "--no-progress", "--json", str(path)])
    assert result.exit_code == 0, result.output
    assert any(bad in r.getMessage() and "skipping corrupt shard" in r.getMessage() for r in caplog.records)
    summary = json.loads(result.output)
    assert list(summary["skipped_shards"]) == [bad]
    out = tmp_path / "out"
    assert json.loads((out / "train_summary.json").read_text())["skipped_shards"].keys() == {bad}
    for student in ("fkl", "rkl"):
        rows = [json.loads(line) for line in (out / student / "metrics.jsonl").read_text().splitlines()]
        assert rows[0]["skipped_shards"] == 1 and rows[0]["skipped_shard_paths"] == [bad]
        assert sum("loss" in row for row in rows) == TRAIN["steps"]
        assert json.loads((out / student / "eval.json").read_text())["skipped_shards"] == [bad]
    assert bad not in reads  # main process (workers=0: every read); workers read the other shards only

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="logitcache"):
        evaluated = runner.invoke(main, ["eval", "--no-progress", "--json", str(path)])
    assert evaluated.exit_code == 0, evaluated.output
    assert any(bad in r.getMessage() for r in caplog.records)
    assert json.loads(evaluated.output)["students"]["fkl"]["skipped_shards"] == [bad]
    assert bad not in reads


def test_eval_stops_at_a_corrupt_shard_by_default(tmp_path, caches, corpus_dir, tiny_causal_lm_dir):
    path = setup_job(tmp_path, caches("parquet"), corpus_dir, tiny_causal_lm_dir)
    runner = CliRunner()
    assert runner.invoke(main, ["train", "--no-progress", str(path)]).exit_code == 0
    # every shard damaged, so the held-out records of one of them are certainly read
    for entry in CacheReader(str(tmp_path / "cache")).shards:
        victim = tmp_path / "cache" / entry.path
        victim.write_bytes(victim.read_bytes()[:-7])
    result = runner.invoke(main, ["eval", "--no-progress", str(path)])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: shard shards/part-") and "logitcache verify" in result.output


@pytest.mark.parametrize(("backend", "how"), [("parquet", "flip"), ("zarr", "missing")])
def test_build_repair_labels_the_damaged_units_again_and_keeps_the_rest(tmp_path, caches, corpus_dir,
                                                                        tiny_causal_lm_dir, backend, how):
    pristine = caches(backend)
    path = setup_job(tmp_path, pristine, corpus_dir, tiny_causal_lm_dir)
    data = yaml.safe_load(path.read_text())
    data["storage"] = {**data.get("storage", {}), "backend": backend}
    path.write_text(yaml.safe_dump(data))
    cache = tmp_path / "cache"
    bad = corrupt(cache, how)
    unit = next(e.unit_id for e in CacheReader(str(pristine)).shards if e.path == bad)
    kept = {e.unit_id: e.sha256 for e in CacheReader(str(cache)).manifest.shards if e.path != bad}

    plain = CliRunner().invoke(main, ["build", str(path), "--no-progress"])
    assert plain.exit_code == 0 and "up to date" in plain.output  # a plain build trusts the manifest
    assert not verify_cache(str(cache)).ok
    result = CliRunner().invoke(main, ["build", str(path), "--no-progress", "--repair"])
    assert result.exit_code == 0, result.output
    assert f"repaired: 1 damaged or missing shard(s) taken out and their unit(s) built again: {unit}" in result.output
    assert "built 1 unit(s)" in result.output
    assert verify_cache(str(cache)).ok
    after = {e.unit_id: e for e in CacheReader(str(cache)).manifest.shards}
    before = {e.unit_id: e for e in CacheReader(str(pristine)).manifest.shards}
    assert after.keys() == before.keys()
    assert all(after[u].sha256 == sha for u, sha in kept.items())  # the others were not touched
    assert (after[unit].records, after[unit].tokens) == (before[unit].records, before[unit].tokens)
    again = CliRunner().invoke(main, ["build", str(path), "--no-progress", "--repair"])
    assert again.exit_code == 0 and "up to date" in again.output and "repaired" not in again.output
    both = CliRunner().invoke(main, ["build", str(path), "--repair", "--overwrite"])
    assert both.exit_code == 2 and "give one of them" in both.output
