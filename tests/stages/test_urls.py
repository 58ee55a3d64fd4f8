"""fsspec URLs end to end: a corpus and a cache on ``memory://`` (object storage's stand-in)
and ``file://`` give the cache a local build gives, and stage two trains from it."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest

from logitcache.config import config_from_dict
from logitcache.pipeline.distill.dataset import CacheDataset
from logitcache.stages.build_cache import build_cache
from logitcache.stages.train_students import train_students
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.manifest import Manifest
from logitcache.storage_schemas.shard_reader import CacheReader
from logitcache.storage_schemas.verify import verify_cache
from tests.stages.test_build_cache import job, read_all, sorted_by_record
from tests.stages.test_train_students import job_data


@pytest.fixture
def memory_root():
    root = f"/lc-{uuid.uuid4().hex[:12]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture
def memory_corpus(corpus_dir, memory_root) -> str:
    fs = fsspec.filesystem("memory")
    for path in sorted(Path(corpus_dir).glob("*.jsonl")):
        fs.pipe(f"{memory_root}/corpus/{path.name}", path.read_bytes())
    return f"memory://{memory_root}/corpus"


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
def test_a_corpus_and_cache_on_memory_urls_build_the_local_cache(tmp_path, corpus_dir, tiny_causal_lm_dir,
                                                                  memory_corpus, memory_root, monkeypatch, backend):
    local = job(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir, storage={"backend": backend})
    build_cache(local, progress=False)
    url = f"memory://{memory_root}/cache"
    remote = job(url, corpus_dir, tiny_causal_lm_dir, storage={"backend": backend},
                 corpus={"data_files": [f"{memory_corpus}/*.jsonl"]})

    # the commit point: whenever the manifest is written, each shard it lists is already in
    # place under shards/ with the size it records (uploaded before the manifest names it)
    saves = []
    original_save = Manifest.save

    def checked_save(self, location: CacheLocation) -> None:
        for shard in self.shards:
            assert location.exists(shard.path), f"manifest lists {shard.path} before it was uploaded"
            assert location.digest(shard.path)[0] == shard.bytes
        saves.append(len(self.shards))
        original_save(self, location)

    monkeypatch.setattr(Manifest, "save", checked_save)
    summary = build_cache(remote, progress=False)
    assert summary.units_built >= 4 and saves[-1] == summary.units_built
    monkeypatch.undo()

    assert sorted_by_record(read_all(url)[1]).equals(sorted_by_record(read_all(tmp_path / "cache")[1]))
    assert verify_cache(url, deep=True).ok
    assert not fsspec.filesystem("memory").ls(f"{memory_root}/cache/_incomplete")
    assert build_cache(remote, progress=False).units_skipped == summary.units_built  # resume works there too

    dataset = CacheDataset(url, seed=3, epochs=1, shuffle_buffer=16)
    ids = [record.record_id for record in dataset]
    assert sorted(ids) == sorted(read_all(url)[1].record_id.tolist())


def test_file_urls_work_like_paths(tmp_path, corpus_dir, tiny_causal_lm_dir):
    build_cache(job(tmp_path / "plain", corpus_dir, tiny_causal_lm_dir), progress=False)
    build_cache(job(f"file://{tmp_path}/url", corpus_dir, tiny_causal_lm_dir,
                    corpus={"data_files": [f"file://{corpus_dir}/*.jsonl"]}), progress=False)
    got, want = CacheReader(f"file://{tmp_path}/url").manifest, CacheReader(str(tmp_path / "plain")).manifest
    assert [(s.unit_id, s.sha256) for s in got.shards] == [(s.unit_id, s.sha256) for s in want.shards]


def test_students_train_from_a_cache_on_a_url(tmp_path, corpus_dir, tiny_causal_lm_dir, memory_corpus, memory_root):
    url = f"memory://{memory_root}/cache"
    data = job_data(url, corpus_dir, tiny_causal_lm_dir, tmp_path / "out")
    data["corpus"]["data_files"] = [f"{memory_corpus}/*.jsonl"]
    data["students"] = data["students"][:1]
    data["train"]["steps"] = 3
    cfg = config_from_dict(data)
    build_cache(cfg, progress=False)
    summary = train_students(cfg, progress=False)
    assert summary.students["fkl"]["steps"] == 3 and summary.students["fkl"]["eval"]["metrics"]["all"]["positions"] > 0
