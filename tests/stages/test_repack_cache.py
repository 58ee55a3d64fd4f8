"""Repack: the same records under other storage settings, resumable, and a cache builds can extend."""

import json

import pyarrow.parquet as pq
import pytest

from logitcache.cli import main
from logitcache.errors import ConfigError, CorruptShardError, IncompatibleCacheError
from logitcache.stages.build_cache import build_cache
from logitcache.stages.repack_cache import repack_cache
from logitcache.storage_schemas.shard_reader import CacheReader
from logitcache.storage_schemas.verify import verify_cache
from tests import fixtures_models
from tests.stages.test_build_cache import job, read_all


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, multilingual_texts):
    """30 documents now; the test that grows the corpus copies it first."""
    return fixtures_models.write_corpus(tmp_path_factory.mktemp("corpus"), multilingual_texts[:30], parts=1)


@pytest.fixture(scope="module")
def source(tmp_path_factory, corpus, tiny_causal_lm_dir):
    """A default-storage (Parquet, zstd) cache of 3 units, with entropy and sampled draws."""
    cache = tmp_path_factory.mktemp("source") / "cache"
    cfg = job(cache, corpus, tiny_causal_lm_dir,
              soft_labels={"mode": "topk+sampled", "samples": 6, "values": "float16", "entropy": True})
    build_cache(cfg, progress=False)
    return cache


def same_records(a, b) -> bool:
    (_, want), (_, got) = read_all(a), read_all(b)
    return got.equals(want)


@pytest.mark.parametrize("changes", [{"compression": "lz4"}, {"compression": "none", "row_group_tokens": 64},
                                     {"backend": "zarr", "compression": "lz4", "chunk_tokens": 32}])
def test_a_repack_holds_the_same_records_under_the_new_settings(tmp_path, source, changes):
    summary = repack_cache(str(source), str(tmp_path / "dest"), storage=changes, progress=False)
    src, dest = CacheReader(str(source)).manifest, CacheReader(str(tmp_path / "dest")).manifest
    assert summary.shards_written == len(src.shards) == 3 and summary.shards_skipped == 0
    assert summary.tokens == src.total_tokens and summary.dest_bytes == dest.total_bytes
    assert same_records(source, tmp_path / "dest")
    assert verify_cache(str(tmp_path / "dest"), deep=True).ok
    # the new settings, and everything else as the source says
    assert dest.backend == changes.get("backend", "parquet")
    assert {name: dest.storage[name] for name in changes} == changes
    assert dest.storage["compression_level"] == src.storage["compression_level"]
    assert dest.fingerprint_fields["storage"] == dest.storage == dest.config["storage"]
    for name in ("layout", "teacher", "tokenizer", "corpus", "windows", "soft_labels"):
        assert getattr(dest, name) == getattr(src, name), name
    for got, want in zip(dest.shards, src.shards, strict=True):
        assert (got.unit_id, got.records, got.tokens, got.positions, got.langs) == \
            (want.unit_id, want.records, want.tokens, want.positions, want.langs)
        assert {k: v for k, v in got.stats.items() if k != "write_seconds"} == \
            {k: v for k, v in want.stats.items() if k != "write_seconds"}
    assert dest.stats["mean_entropy_per_lang"] == src.stats["mean_entropy_per_lang"]
    assert dest.stats["bytes"] == dest.total_bytes and dest.stats["repack"]["source"] == str(source)


def test_the_shards_really_use_the_new_compression(tmp_path, source):
    repack_cache(str(source), str(tmp_path / "dest"), storage={"compression": "none"}, progress=False)
    codecs = set()
    for entry in CacheReader(str(tmp_path / "dest")).shards:
        meta = pq.ParquetFile(tmp_path / "dest" / entry.path).metadata
        codecs |= {meta.row_group(0).column(i).compression for i in range(meta.num_columns)}
    assert codecs == {"UNCOMPRESSED"}


def test_builds_with_the_new_settings_extend_the_repacked_cache(tmp_path, corpus, tiny_causal_lm_dir,
                                                                multilingual_texts):
    grown = tmp_path / "corpus"
    grown.mkdir()
    (grown / "part-0.jsonl").write_bytes((corpus / "part-0.jsonl").read_bytes())
    labels = {"k": 8, "values": "float32"}
    build_cache(job(tmp_path / "cache", grown, tiny_causal_lm_dir, soft_labels=labels), progress=False)
    repack_cache(str(tmp_path / "cache"), str(tmp_path / "fast"), storage={"compression": "lz4"}, progress=False)
    (grown / "part-9.jsonl").write_text(
        "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in multilingual_texts[30:]), encoding="utf-8")
    # the source's settings are refused there, naming the storage field
    with pytest.raises(IncompatibleCacheError, match="compression"):
        build_cache(job(tmp_path / "fast", grown, tiny_causal_lm_dir, soft_labels=labels), progress=False)
    summary = build_cache(job(tmp_path / "fast", grown, tiny_causal_lm_dir, soft_labels=labels,
                              storage={"compression": "lz4"}), progress=False)
    assert summary.units_skipped == 3 and summary.units_built == 2
    # and equal a build of the grown corpus from scratch with the same settings
    build_cache(job(tmp_path / "fresh", grown, tiny_causal_lm_dir, soft_labels=labels,
                    storage={"compression": "lz4"}), progress=False)
    assert same_records(tmp_path / "fresh", tmp_path / "fast")
    assert verify_cache(str(tmp_path / "fast"), deep=True).ok


def test_a_killed_repack_resumes_with_the_shards_left(tmp_path, source, monkeypatch):
    read_shard, calls = CacheReader.read_shard, []

    def dies_on_the_third(self, entry, **kwargs):
        calls.append(entry.unit_id)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process stops here, with the second shard maybe committed
        return read_shard(self, entry, **kwargs)

    monkeypatch.setattr(CacheReader, "read_shard", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        repack_cache(str(source), str(tmp_path / "dest"), storage={"compression": "lz4"}, progress=False)
    monkeypatch.setattr(CacheReader, "read_shard", read_shard)
    committed = len(CacheReader(str(tmp_path / "dest")).shards)
    assert committed in (1, 2)  # the first commit was waited for before the second was handed over
    again = repack_cache(str(source), str(tmp_path / "dest"), storage={"compression": "lz4"}, progress=False)
    assert (again.shards_skipped, again.shards_written) == (committed, 3 - committed)
    assert same_records(source, tmp_path / "dest")
    finished = repack_cache(str(source), str(tmp_path / "dest"), storage={"compression": "lz4"}, progress=False)
    assert (finished.shards_skipped, finished.shards_written) == (3, 0)


def test_a_corrupt_source_shard_stops_the_repack_before_it_gets_a_new_checksum(tmp_path, source):
    copy = tmp_path / "source"
    repack_cache(str(source), str(copy), progress=False)  # a copy to damage (same settings)
    second = CacheReader(str(copy)).shards[1]
    data = bytearray((copy / second.path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / second.path).write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="sha256"):
        repack_cache(str(copy), str(tmp_path / "dest"), storage={"compression": "none"}, progress=False)
    assert [e.unit_id for e in CacheReader(str(tmp_path / "dest")).shards] == [CacheReader(str(copy)).shards[0].unit_id]


def test_refusals(tmp_path, source, corpus, tiny_causal_lm_dir):
    with pytest.raises(ConfigError, match="DEST is SOURCE"):
        repack_cache(str(source), str(source) + "/", storage={"compression": "lz4"}, progress=False)
    with pytest.raises(ConfigError, match="unknown setting.*shard_tokens"):
        repack_cache(str(source), str(tmp_path / "a"), storage={"shard_tokens": 5}, progress=False)
    with pytest.raises(ConfigError, match="compression"):
        repack_cache(str(source), str(tmp_path / "a"), storage={"compression": "gzip"}, progress=False)
    # another cache at DEST (another configuration): refused with the fields that differ
    other = job(tmp_path / "other", corpus, tiny_causal_lm_dir)
    build_cache(other, progress=False)
    with pytest.raises(IncompatibleCacheError, match="soft_labels"):
        repack_cache(str(source), str(tmp_path / "other"), progress=False)
    assert repack_cache(str(source), str(tmp_path / "other"), overwrite=True, progress=False).shards_written == 3
    # the storage settings are in the identity twice (as used, and among the config's fields): named once
    with pytest.raises(IncompatibleCacheError) as caught:
        repack_cache(str(source), str(tmp_path / "other"), storage={"compression": "lz4"}, progress=False)
    assert str(caught.value).count("storage.compression") == 1
    assert same_records(source, tmp_path / "other")


def test_a_dest_with_units_the_source_lacks_is_refused(tmp_path, multilingual_texts, tiny_causal_lm_dir):
    small, large = tmp_path / "small", tmp_path / "large"
    fixtures_models.write_corpus(small, multilingual_texts[:10], parts=1)
    fixtures_models.write_corpus(large, multilingual_texts[:20], parts=1)
    for corpus in (small, large):  # one configuration, two corpora: the same cache identity
        build_cache(job(tmp_path / f"cache-{corpus.name}", corpus, tiny_causal_lm_dir), progress=False)
    repack_cache(str(tmp_path / "cache-large"), str(tmp_path / "dest"), progress=False)
    with pytest.raises(IncompatibleCacheError, match="not an interrupted repack"):
        repack_cache(str(tmp_path / "cache-small"), str(tmp_path / "dest"), progress=False)


def test_cli_repack(tmp_path, source):
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["repack", str(source), str(tmp_path / "dest"), "--compression", "lz4",
                                       "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["shards_written"] == 3 and report["storage"]["compression"] == "lz4"
    text = CliRunner().invoke(main, ["repack", str(source), str(tmp_path / "dest"), "--compression", "lz4",
                                     "--no-progress"])
    assert text.exit_code == 0 and "already holds all 3 shards" in text.output
    bad = CliRunner().invoke(main, ["repack", str(source), str(source), "--compression", "lz4"])
    assert bad.exit_code == 2 and "DEST is SOURCE" in bad.output


@pytest.mark.parametrize("major", [1, 2, 3])
def test_an_older_format_cache_repacks_into_format_4_without_the_teacher(tmp_path, major):
    from tests.factories import make_layout
    from tests.storage_schemas.test_format_versions import _build, rewrite_in_format

    layout = make_layout("token_topk", value_codec="q8")
    blocks = _build(tmp_path / "old", layout, units=2)
    rewrite_in_format(tmp_path / "old", layout, blocks, major)
    repack_cache(str(tmp_path / "old"), str(tmp_path / "new"), progress=False)
    reader = CacheReader(str(tmp_path / "new"))
    assert reader.manifest.format_version.startswith("4.")
    for entry, block in zip(reader.shards, blocks, strict=True):
        metadata = pq.read_schema(tmp_path / "new" / entry.path).metadata
        assert metadata[b"logitcache.shard_format"] == b"4"
        assert reader.read_shard(entry, verify=True).equals(block)  # the same labels, in id order
    assert verify_cache(str(tmp_path / "new"), deep=True).ok


def test_a_repack_to_and_from_object_storage_urls(tmp_path, source):
    import uuid

    import fsspec

    root = f"/lc-repack-{uuid.uuid4().hex[:12]}"
    try:
        remote = f"memory://{root}/cache"
        repack_cache(str(source), remote, storage={"backend": "zarr", "compression": "lz4"}, progress=False)
        assert verify_cache(remote, deep=True).ok
        repack_cache(remote, str(tmp_path / "back"), storage={"backend": "parquet", "compression": "zstd"},
                     progress=False)
        assert same_records(source, tmp_path / "back")
        # the round trip restores the source's identity: a build with its config would extend it
        assert CacheReader(str(tmp_path / "back")).manifest.config_fingerprint == \
            CacheReader(str(source)).manifest.config_fingerprint
    finally:
        fsspec.filesystem("memory").rm(root, recursive=True)
