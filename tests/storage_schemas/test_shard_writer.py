import json

import numpy as np
import pytest

from logitcache.errors import CacheFormatError, IncompatibleCacheError
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.manifest import FORMAT_VERSION, READABLE_MAJORS, Manifest
from logitcache.storage_schemas.shard_reader import CacheReader
from logitcache.storage_schemas.shard_writer import ShardWriter
from tests.factories import make_block, make_layout, make_template

BACKENDS = ["parquet", "zarr"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def test_commit_and_read_back(tmp_path, backend):
    layout = make_layout("token_topk", k=4)
    writer = ShardWriter(str(tmp_path / "c"), template=make_template(layout, backend=backend))
    blocks = [make_block(layout, records=5, seed=i, first_record=10 * i) for i in range(3)]
    for i, block in enumerate(blocks):
        entry = writer.commit(block, unit_id=f"u{i:05d}")
        assert entry.records == 5 and entry.tokens == block.num_tokens
        assert entry.positions == block.num_positions
        assert sum(c["tokens"] for c in entry.langs.values()) == block.num_tokens
    reader = CacheReader(str(tmp_path / "c"))
    assert [s.unit_id for s in reader.shards] == ["u00000", "u00001", "u00002"]
    assert reader.manifest.total_tokens == sum(b.num_tokens for b in blocks)
    for entry, block in zip(reader.shards, blocks, strict=True):
        reader.check_shard(entry)
        assert reader.read_shard(entry, verify=True).equals(block)
        assert entry.path.startswith("shards/part-")
    assert CacheLocation(tmp_path / "c").listdir("_incomplete") == []


def test_blocks_follow_row_group_tokens(tmp_path, backend):
    layout = make_layout("token_topk_sampled", k=3)
    template = make_template(layout, backend=backend, storage={"row_group_tokens": 20})
    writer = ShardWriter(str(tmp_path / "c"), template=template)
    block = make_block(layout, records=20, max_len=10)
    entry = writer.commit(block, unit_id="u0")
    assert entry.blocks > 2
    reader = CacheReader(str(tmp_path / "c"))
    parts = [b for _, _, b in reader.iter_blocks(verify=True)]
    assert len(parts) == entry.blocks
    assert all(p.num_tokens >= 20 for p in parts[:-1])
    from logitcache.storage_schemas.records import RecordBlock

    assert RecordBlock.concat(parts).equals(block)


def test_empty_unit_is_committed(tmp_path, backend):
    layout = make_layout("token_topk")
    writer = ShardWriter(str(tmp_path / "c"), template=make_template(layout, backend=backend))
    entry = writer.commit(make_block(layout, records=0), unit_id="empty")
    assert entry.records == 0
    assert CacheReader(str(tmp_path / "c")).read_shard(entry, verify=True).num_records == 0


def test_reopen_keeps_committed_units(tmp_path):
    layout = make_layout()
    ShardWriter(str(tmp_path / "c"), template=make_template(layout)).commit(make_block(layout), unit_id="a")
    again = ShardWriter(str(tmp_path / "c"), template=make_template(layout))
    assert again.committed_units == {"a"}
    with pytest.raises(ValueError, match="already committed"):
        again.commit(make_block(layout), unit_id="a")


def test_different_config_is_refused_with_the_fields(tmp_path):
    layout = make_layout(k=4)
    ShardWriter(str(tmp_path / "c"), template=make_template(layout)).commit(make_block(layout), unit_id="a")
    other = make_template(make_layout(k=8), teacher="another-teacher")
    with pytest.raises(IncompatibleCacheError) as err:
        ShardWriter(str(tmp_path / "c"), template=other)
    message = str(err.value)
    assert "layout.k: 4 -> 8" in message
    assert "teacher.name_or_path" in message and "--overwrite" in message
    # the refused build touched nothing
    assert len(CacheReader(str(tmp_path / "c")).shards) == 1


def test_overwrite_replaces_the_cache_at_the_first_commit(tmp_path):
    layout = make_layout(k=4)
    url = str(tmp_path / "c")
    old = make_block(layout)
    ShardWriter(url, template=make_template(layout)).commit(old, unit_id="a")
    fresh = ShardWriter(url, template=make_template(make_layout(k=8)), overwrite=True)
    assert fresh.committed_units == set()
    # nothing committed yet: the old cache is still whole
    reader = CacheReader(url)
    assert reader.layout.k == 4 and reader.read_shard(reader.shards[0], verify=True).equals(old)
    new = make_block(make_layout(k=8), seed=3)
    fresh.commit(new, unit_id="b")
    reader = CacheReader(url)
    assert reader.layout.k == 8 and [s.unit_id for s in reader.shards] == ["b"]
    assert CacheLocation(url).listdir("shards") == ["part-b.parquet"]


def test_overwrite_that_commits_nothing_keeps_the_old_cache(tmp_path):
    layout = make_layout(k=4)
    url = str(tmp_path / "c")
    ShardWriter(url, template=make_template(layout)).commit(make_block(layout), unit_id="a")
    ShardWriter(url, template=make_template(make_layout(k=8)), overwrite=True)  # then the build fails
    reader = CacheReader(url)
    assert reader.layout.k == 4 and len(reader.shards) == 1
    reader.check_shard(reader.shards[0])


def test_a_cache_without_shards_takes_a_new_config(tmp_path):
    # e.g. a first build that failed on a misspelt column before committing anything
    url = str(tmp_path / "c")
    ShardWriter(url, template=make_template(make_layout(k=4)))
    writer = ShardWriter(url, template=make_template(make_layout(k=8)))
    writer.commit(make_block(make_layout(k=8)), unit_id="a")
    assert CacheReader(url).layout.k == 8


def test_unit_id_must_be_a_safe_file_name(tmp_path):
    layout = make_layout()
    writer = ShardWriter(str(tmp_path / "c"), template=make_template(layout))
    with pytest.raises(ValueError, match="unit id"):
        writer.commit(make_block(layout), unit_id="../escape")


def test_block_not_matching_layout_is_refused(tmp_path):
    layout = make_layout(k=4)
    writer = ShardWriter(str(tmp_path / "c"), template=make_template(layout))
    with pytest.raises(CacheFormatError, match="topk_ids"):
        writer.commit(make_block(make_layout(k=5)), unit_id="a")


def test_fsspec_memory_location(backend):
    layout = make_layout("token_topk")
    url = f"memory://lc-test-{backend}/cache"
    writer = ShardWriter(url, template=make_template(layout, backend=backend), overwrite=True)
    block = make_block(layout)
    writer.commit(block, unit_id="m0")
    reader = CacheReader(url)
    assert reader.read_shard(reader.shards[0], verify=True).equals(block)


# ------------------------------------------------------------------ versions


def _edit_manifest(path, **changes):
    data = json.loads((path / "manifest.json").read_text())
    data.update(changes)
    (path / "manifest.json").write_text(json.dumps(data))


def test_newer_major_version_is_refused(tmp_path):
    layout = make_layout()
    ShardWriter(str(tmp_path / "c"), template=make_template(layout))
    _edit_manifest(tmp_path / "c", format_version=f"{max(READABLE_MAJORS) + 1}.0")
    with pytest.raises(CacheFormatError, match="upgrade logitcache"):
        CacheReader(str(tmp_path / "c"))


def test_newer_minor_version_is_read(tmp_path):
    layout = make_layout()
    ShardWriter(str(tmp_path / "c"), template=make_template(layout))
    major = FORMAT_VERSION.split(".")[0]
    _edit_manifest(tmp_path / "c", format_version=f"{major}.9", some_future_field=1)
    assert CacheReader(str(tmp_path / "c")).manifest.format_version == f"{major}.9"


def test_other_kind_is_refused(tmp_path):
    layout = make_layout("token_topk")
    ShardWriter(str(tmp_path / "c"), template=make_template(layout))
    with pytest.raises(CacheFormatError, match="token_topk labels, but sequence_probs"):
        CacheReader(str(tmp_path / "c"), expected_kind="sequence_probs")


def test_not_a_cache(tmp_path):
    with pytest.raises(CacheFormatError, match="not a logitcache cache"):
        CacheReader(str(tmp_path))


def test_manifest_round_trip(tmp_path):
    layout = make_layout("token_sampled")
    writer = ShardWriter(str(tmp_path / "c"), template=make_template(layout))
    writer.commit(make_block(layout), unit_id="a")
    writer.update_stats(tokens_per_second=123.0)
    loaded = Manifest.load(CacheLocation(tmp_path / "c"))
    assert loaded.to_dict() == writer.manifest.to_dict()
    assert loaded.stats["tokens_per_second"] == 123.0
    assert loaded.to_dict()["totals"]["records"] == 7


# ------------------------------------------------------------ crash consistency


class Injected(RuntimeError):
    pass


def _fail(*_args, **_kwargs):
    raise Injected("injected failure")


def _torn_write(original):
    def write(self, location, rel, block, **kwargs):
        original(self, location, rel, block, **kwargs)
        for sub, size in list(location.files_under(rel)):  # leave half of every file
            path = location.full(f"{rel}/{sub}" if sub else rel)
            with open(path, "r+b") as fh:
                fh.truncate(size // 2)
        raise Injected("killed mid-write")

    return write


STEPS = ["backend.write", "torn write", "sync_tree", "digest", "rename", "manifest write", "manifest rename"]


@pytest.mark.parametrize("step", STEPS)
def test_failure_at_any_step_leaves_a_valid_cache(tmp_path, monkeypatch, backend, step):
    from logitcache.storage_schemas import location as location_mod
    from logitcache.storage_schemas.backends import get_backend

    layout = make_layout("token_topk")
    url = str(tmp_path / "c")
    first, second = make_block(layout, seed=1), make_block(layout, seed=2, first_record=100)
    ShardWriter(url, template=make_template(layout, backend=backend)).commit(first, unit_id="u0")
    writer = ShardWriter(url, template=make_template(layout, backend=backend))

    backend_cls = type(get_backend(backend))
    with monkeypatch.context() as patch:
        if step == "backend.write":
            patch.setattr(backend_cls, "write", _fail)
        elif step == "torn write":
            patch.setattr(backend_cls, "write", _torn_write(backend_cls.write))
        elif step == "sync_tree":
            patch.setattr(location_mod.CacheLocation, "sync_tree", _fail)
        elif step == "digest":
            patch.setattr(location_mod.CacheLocation, "digest", _fail)
        elif step == "rename":
            patch.setattr(location_mod.CacheLocation, "rename", _fail)
        elif step == "manifest write":

            def torn_manifest(self, rel, data):
                with open(self.full(rel) + ".tmp-torn", "wb") as fh:
                    fh.write(data[: len(data) // 2])
                raise Injected("killed while writing the manifest")

            patch.setattr(location_mod.CacheLocation, "write_atomic", torn_manifest)
        elif step == "manifest rename":
            real_replace = location_mod.os.replace

            def replace(src, dst):
                if str(dst).endswith("manifest.json"):
                    raise Injected("killed before the manifest rename")
                return real_replace(src, dst)

            patch.setattr(location_mod.os, "replace", replace)
        with pytest.raises(Injected):
            writer.commit(second, unit_id="u1")

    # what a reader sees now: exactly the first shard, intact
    reader = CacheReader(url)
    assert [s.unit_id for s in reader.shards] == ["u0"]
    reader.check_shard(reader.shards[0])
    assert reader.read_shard(reader.shards[0]).equals(first)

    # the next run cleans up, redoes only the lost unit, and the cache is whole
    resumed = ShardWriter(url, template=make_template(layout, backend=backend))
    assert resumed.committed_units == {"u0"}
    resumed.commit(second, unit_id="u1")
    reader = CacheReader(url)
    assert [s.unit_id for s in reader.shards] == ["u0", "u1"]
    for entry, block in zip(reader.shards, [first, second], strict=True):
        assert reader.read_shard(entry, verify=True).equals(block)
    assert CacheLocation(url).listdir("_incomplete") == []
    assert sorted(CacheLocation(url).listdir("shards")) == sorted(
        e.path.split("/")[1] for e in reader.shards
    )
    assert np.all(reader.manifest.total_records == 14)
