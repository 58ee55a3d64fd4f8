"""Tests of verify_cache: healthy caches pass, every kind of damage is reported, never raised."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from logitcache.errors import CacheFormatError
from logitcache.storage_schemas.shard_writer import ShardWriter
from logitcache.storage_schemas.verify import VerifyReport, verify_cache
from tests.factories import make_block, make_layout, make_template

BACKENDS = [
    "parquet",
    pytest.param("zarr", marks=pytest.mark.skipif(
        importlib.util.find_spec("zarr") is None, reason="zarr is not installed")),
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def build_cache(root: Path, backend: str = "parquet", *, kind: str = "token_topk", units: int = 2) -> Path:
    layout = make_layout(kind, k=4)
    template = make_template(layout, backend=backend, storage={"row_group_tokens": 16})
    writer = ShardWriter(str(root), template=template)
    for i in range(units):
        writer.commit(make_block(layout, records=6, seed=i, first_record=10 * i), unit_id=f"u{i:05d}")
    return root


def manifest_of(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def largest_file(root: Path, rel: str) -> Path:
    """The shard's file, or the largest file inside a directory shard (Zarr)."""
    path = root / rel
    if path.is_file():
        return path
    return max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def problems_of(report: VerifyReport, path: str) -> list[str]:
    return [p.problem for p in report.problems if p.path == path]


@pytest.mark.parametrize("kind", ["token_topk", "token_topk_sampled", "sequence_probs"])
def test_healthy_cache_verifies(tmp_path, backend, kind):
    root = build_cache(tmp_path / "cache", backend, kind=kind)
    for deep in (False, True):
        report = verify_cache(str(root), deep=deep)
        assert report.ok, report.to_text()
        assert report.problems == [] and report.unlisted == []
        assert report.shards_checked == 2
        assert report.records == 12
        assert "OK" in report.to_text()


def test_flipped_byte_is_a_sha_mismatch(tmp_path, backend):
    root = build_cache(tmp_path / "cache", backend)
    shard = manifest_of(root)["shards"][1]["path"]
    target = largest_file(root, shard)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    report = verify_cache(str(root))
    assert not report.ok
    assert report.bad_shards == [shard]
    assert any("sha256 mismatch" in p for p in problems_of(report, shard))
    assert report.problems[0].unit_id == "u00001"
    assert shard in report.to_text()


def test_truncated_shard_is_a_size_mismatch(tmp_path, backend):
    root = build_cache(tmp_path / "cache", backend)
    shard = manifest_of(root)["shards"][0]["path"]
    target = largest_file(root, shard)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    report = verify_cache(str(root), deep=True)  # decoding a truncated file must not raise
    assert report.bad_shards == [shard]
    assert any("size mismatch" in p for p in problems_of(report, shard))


def test_missing_shard(tmp_path, backend):
    root = build_cache(tmp_path / "cache", backend)
    shard = manifest_of(root)["shards"][0]["path"]
    path = root / shard
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    report = verify_cache(str(root))
    assert problems_of(report, shard) == [
        "missing: the manifest lists it but it is not on disk"
    ]
    assert report.bad_shards == [shard]


def test_unlisted_files_are_reported_but_not_failures(tmp_path, backend):
    root = build_cache(tmp_path / "cache", backend)
    (root / "shards" / "part-stray.parquet").write_bytes(b"not listed")
    (root / "_incomplete" / "part-u00009.parquet").write_bytes(b"half written")
    report = verify_cache(str(root))
    assert report.ok
    assert report.unlisted == ["shards/part-stray.parquet", "_incomplete/part-u00009.parquet"]
    text = report.to_text()
    assert "shards/part-stray.parquet" in text and "_incomplete/part-u00009.parquet" in text


def test_deep_catches_an_edited_token_count(tmp_path, backend):
    root = build_cache(tmp_path / "cache", backend)
    data = manifest_of(root)
    data["shards"][0]["tokens"] += 1
    (root / "manifest.json").write_text(json.dumps(data))
    assert verify_cache(str(root)).ok  # the quick check does not decode
    report = verify_cache(str(root), deep=True)
    shard = data["shards"][0]["path"]
    assert report.bad_shards == [shard]
    assert any("tokens" in p for p in problems_of(report, shard))


def test_record_count_and_fingerprint_mismatches(tmp_path):
    root = build_cache(tmp_path / "cache")
    data = manifest_of(root)
    data["shards"][0]["records"] += 1
    data["config_fingerprint"] = "0" * 64
    (root / "manifest.json").write_text(json.dumps(data))
    report = verify_cache(str(root))
    first = problems_of(report, data["shards"][0]["path"])
    assert any("records" in p for p in first)
    assert any("config fingerprint" in p for p in first)
    assert any("config fingerprint" in p for p in problems_of(report, data["shards"][1]["path"]))


def test_shard_of_another_layout_is_a_schema_problem(tmp_path):
    root = build_cache(tmp_path / "cache")
    other = build_cache(tmp_path / "other", kind="token_topk_sampled", units=1)
    shard = manifest_of(root)["shards"][0]["path"]
    shutil.copy(other / manifest_of(other)["shards"][0]["path"], root / shard)
    report = verify_cache(str(root))
    assert any("schema differs" in p for p in problems_of(report, shard))


def test_garbage_shard_is_reported_not_raised(tmp_path):
    root = build_cache(tmp_path / "cache")
    shard = manifest_of(root)["shards"][0]["path"]
    size = (root / shard).stat().st_size
    (root / shard).write_bytes(b"\0" * size)
    report = verify_cache(str(root), deep=True)
    found = problems_of(report, shard)
    assert any("sha256 mismatch" in p for p in found)
    assert any("cannot be decoded" in p for p in found)


def test_shard_path_outside_shards_is_refused(tmp_path):
    root = build_cache(tmp_path / "cache", units=1)
    data = manifest_of(root)
    data["shards"][0]["path"] = "../elsewhere.parquet"
    (root / "manifest.json").write_text(json.dumps(data))
    report = verify_cache(str(root))
    assert any("not directly under shards/" in p.problem for p in report.problems)


def test_missing_or_broken_manifest_raises(tmp_path):
    with pytest.raises(CacheFormatError, match="not a logitcache cache"):
        verify_cache(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheFormatError, match="not valid JSON"):
        verify_cache(str(tmp_path))


def test_report_to_dict_is_json(tmp_path):
    root = build_cache(tmp_path / "cache", units=1)
    (root / "shards" / "part-stray.parquet").write_bytes(b"x")
    data = json.loads(json.dumps(verify_cache(str(root)).to_dict()))
    assert data["ok"] is True and data["unlisted"] == ["shards/part-stray.parquet"]
