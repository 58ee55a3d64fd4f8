"""Storage faults in stage one: a full disk or a permission error at every step of a commit.

Each fault is injected from here (monkeypatching the step) on the third unit, after two
units are committed. The write must stop with a CacheWriteError (exit 1 through the CLI)
that names the cache, the step and says the committed shards are intact; the manifest on
disk must be byte for byte the one before the failing unit, ``verify`` must pass with
nothing half-written left behind, and the next run (fault removed) must finish the cache so
that it equals an uninterrupted build.
"""

from __future__ import annotations

import errno
import functools
import json
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from logitcache.cli import main
from logitcache.config import config_to_dict
from logitcache.errors import CacheWriteError
from logitcache.pipeline.common.committer import BackgroundCommitter
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.parquet_backend import ParquetBackend
from logitcache.storage_schemas.records import RecordBlock
from logitcache.storage_schemas.shard_reader import CacheReader
from logitcache.storage_schemas.shard_writer import ShardWriter
from logitcache.storage_schemas.verify import verify_cache
from logitcache.storage_schemas.zarr_backend import ZarrBackend
from tests.factories import make_block, make_layout, make_template
from tests.stages.test_build_cache import job, read_all, sorted_by_record

BACKENDS = {"parquet": ParquetBackend, "zarr": ZarrBackend}
ERRORS = {
    "ENOSPC": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "EACCES": lambda: PermissionError(errno.EACCES, "Permission denied"),
}
#: the step of a commit each fault hits, and the words the error must use for it
STEPS = {"write": "writing shard", "fsync": "fsync", "rename": "rename", "manifest": "manifest.json"}


def _partial_write(original, error):
    """A backend write that leaves half a shard behind, as a disk filling up would, then fails."""

    def write(self, location, rel, block, **kwargs):
        original(self, location, rel, block, **kwargs)
        files = sorted(location.files_under(rel), key=lambda item: -item[1])
        path = os.path.join(location.full(rel), files[0][0]) if files[0][0] else location.full(rel)
        with open(path, "r+b") as handle:
            handle.truncate(files[0][1] // 2)
        raise error()

    return write


def inject(monkeypatch, *, step: str, backend: str, error: str, after: int = 0) -> None:
    """Make ``step`` raise ``error`` on every call after the first ``after`` calls."""
    if step == "write":
        owner, name = BACKENDS[backend], "write"
        failing = _partial_write(BACKENDS[backend].write, ERRORS[error])
    else:  # the manifest write fails before its os.replace, as a full disk would make it
        owner, name = CacheLocation, {"fsync": "sync_tree", "rename": "rename", "manifest": "write_atomic"}[step]

        def failing(self, *args, **kwargs):
            raise ERRORS[error]()

    calls = {"n": 0}
    kept = getattr(owner, name)

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            return failing(self, *args, **kwargs)
        return kept(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, counted)


def check_message(message: str, *, cache: str, step: str, error: str, committed: int) -> None:
    assert cache in message
    assert STEPS[step] in message
    assert error in message
    assert f"The {committed} shard(s) committed before it are intact" in message
    assert "run the same command again" in message
    assert "Traceback" not in message


def check_intact(cache: str, *, manifest_before: bytes, units: list[str]) -> None:
    assert (Path(cache) / "manifest.json").read_bytes() == manifest_before
    report = verify_cache(cache, deep=True)
    assert report.ok, report.to_text()
    assert report.unlisted == []  # the half-written shard was removed
    assert [s.unit_id for s in CacheReader(cache).shards] == units


# ---------------------------------------------------------------- the shard writer, every step


@pytest.mark.parametrize("error", sorted(ERRORS))
@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_failed_commit_keeps_the_cache_and_the_next_writer_continues(tmp_path, monkeypatch, backend, step, error):
    layout = make_layout("token_topk", k=4)
    template = make_template(layout, backend=backend)
    cache = str(tmp_path / "cache")
    blocks = [make_block(layout, records=5, seed=i, first_record=10 * i) for i in range(4)]
    writer = ShardWriter(cache, template=template)
    for i in range(2):
        writer.commit(blocks[i], unit_id=f"u{i}")
    before = (tmp_path / "cache" / "manifest.json").read_bytes()

    with monkeypatch.context() as patch:
        inject(patch, step=step, backend=backend, error=error)
        with pytest.raises(CacheWriteError) as failure:
            writer.commit(blocks[2], unit_id="u2")
    check_message(str(failure.value), cache=cache, step=step, error=error, committed=2)
    assert isinstance(failure.value.__cause__, OSError)
    check_intact(cache, manifest_before=before, units=["u0", "u1"])
    assert writer.committed_units == {"u0", "u1"}  # the writer's own view did not move either

    resumed = ShardWriter(cache, template=template)  # the next run, fault gone
    assert resumed.committed_units == {"u0", "u1"}
    for i in (2, 3):
        resumed.commit(blocks[i], unit_id=f"u{i}")
    reader = CacheReader(cache)
    assert [s.unit_id for s in reader.shards] == ["u0", "u1", "u2", "u3"]
    for entry, block in zip(reader.shards, blocks, strict=True):
        assert reader.read_shard(entry, verify=True).equals(block)
    assert verify_cache(cache, deep=True).ok


def test_a_failed_first_write_into_a_fresh_cache_is_a_clear_error(tmp_path, monkeypatch):
    def denied(self, rel):
        raise PermissionError(errno.EACCES, "Permission denied", self.full(rel))

    monkeypatch.setattr(CacheLocation, "makedirs", denied)
    with pytest.raises(CacheWriteError, match=r"preparing the cache directory failed \(EACCES.*writable"):
        ShardWriter(str(tmp_path / "cache"), template=make_template(make_layout()))


def test_the_committer_raises_the_writer_error_on_the_calling_thread(tmp_path, monkeypatch):
    layout = make_layout("token_topk", k=4)
    cache = str(tmp_path / "cache")
    writer = ShardWriter(cache, template=make_template(layout))
    inject(monkeypatch, step="write", backend="parquet", error="ENOSPC", after=1)
    with pytest.raises(CacheWriteError) as failure, BackgroundCommitter(writer) as committer:  # noqa: PT012
        for i in range(4):
            committer.submit(make_block(layout, records=3, seed=i, first_record=5 * i), unit_id=f"u{i}", stats={})
    check_message(str(failure.value), cache=cache, step="write", error="ENOSPC", committed=1)
    assert [s.unit_id for s in CacheReader(cache).shards] == ["u0"]


# ---------------------------------------------------------------- a real build, through the CLI


def _config(directory: Path, corpus_dir: Path, model: Path, backend: str) -> Path:
    path = directory / "job.yaml"
    cfg = job(directory / "cache", corpus_dir, model, storage={"backend": backend})
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return path


def _records(cache: Path) -> RecordBlock:
    return sorted_by_record(read_all(cache)[1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_dir, tiny_causal_lm_dir):
    """Uninterrupted builds, by backend (built on first use)."""

    @functools.cache
    def get(backend: str) -> RecordBlock:
        directory = tmp_path_factory.mktemp(f"reference-{backend}")
        path = _config(directory, corpus_dir, tiny_causal_lm_dir, backend)
        result = CliRunner().invoke(main, ["build", "--no-progress", str(path)])
        assert result.exit_code == 0, result.output
        return _records(directory / "cache")

    return get


@pytest.mark.parametrize(("backend", "step", "error"), [
    ("parquet", "write", "ENOSPC"), ("zarr", "write", "ENOSPC"), ("parquet", "manifest", "EACCES"),
])
def test_build_stops_on_a_storage_fault_and_the_next_run_continues(tmp_path, monkeypatch, corpus_dir,
                                                                   tiny_causal_lm_dir, reference,
                                                                   backend, step, error):
    path = _config(tmp_path, corpus_dir, tiny_causal_lm_dir, backend)
    cache = str(tmp_path / "cache")
    runner = CliRunner()
    # two units commit, the third fails (the manifest is also saved once when the build opens the cache)
    with monkeypatch.context() as patch:
        inject(patch, step=step, backend=backend, error=error, after=3 if step == "manifest" else 2)
        failed = runner.invoke(main, ["build", "--no-progress", str(path)])
    assert failed.exit_code == 1, failed.output
    assert failed.output.startswith("error: cannot write to cache"), failed.output
    check_message(failed.output, cache=cache, step=step, error=error, committed=2)
    report = verify_cache(cache, deep=True)
    assert report.ok and report.unlisted == []
    assert len(CacheReader(cache).shards) == 2

    resumed = runner.invoke(main, ["build", "--no-progress", "--json", str(path)])
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads(resumed.output)
    assert summary["units_skipped"] == 2 and summary["units_built"] == 4
    assert verify_cache(cache, deep=True).ok
    assert _records(tmp_path / "cache").equals(reference(backend))
