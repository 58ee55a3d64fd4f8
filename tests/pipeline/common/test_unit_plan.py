"""Tests of logitcache.pipeline.common.unit_plan (and WorkUnit.rows): which rows of a corpus
a build must label, given the shard entries a cache has committed."""

from __future__ import annotations

import pytest

from logitcache.pipeline.common.corpus import iter_work_units, part_id, whole_unit_id
from logitcache.pipeline.common.unit_plan import committed_parts, decide_units
from logitcache.storage_schemas.manifest import ShardEntry
from tests.pipeline.common.test_corpus import corpus, rows, write_jsonl


def entry_for(unit) -> ShardEntry:
    """The shard entry a build commits for ``unit`` (only the fields planning reads matter)."""
    return ShardEntry(path=f"shards/part-{unit.unit_id}.parquet", unit_id=unit.unit_id, records=1, tokens=1,
                      positions=1, bytes=1, sha256="0" * 64, blocks=1, stats={
                          "unit_fingerprint": unit.fingerprint, "first_row": unit.first_row,
                          "num_rows": unit.num_rows})


def decisions(cfg, entries):
    return list(decide_units(iter_work_units(cfg), committed_parts(entries)))


def test_a_part_of_a_unit_hashes_as_the_unit_it_was_when_the_file_was_shorter(tmp_path):
    records = rows(23)
    records[21]["text"] = "  "  # a skipped row inside the part that was committed
    path = write_jsonl(tmp_path / "a.jsonl", records)
    short = list(iter_work_units(corpus(path)))
    records += rows(5, prefix="new")
    records[25]["text"] = ""
    write_jsonl(tmp_path / "a.jsonl", records)
    grown = list(iter_work_units(corpus(path)))
    assert [u.unit_id for u in grown] == [u.unit_id for u in short]
    assert grown[2].num_rows == 8 and grown[2].fingerprint != short[2].fingerprint
    head = grown[2].rows(20, 23)
    assert (head.unit_id, head.fingerprint, head.skipped) == (short[2].unit_id, short[2].fingerprint, {"empty": 1})
    tail = grown[2].rows(23, 28)
    assert tail.unit_id == f"{short[2].unit_id}.r23" and whole_unit_id(tail.unit_id) == short[2].unit_id
    assert [d.row for d in tail.documents] == [23, 24, 26, 27] and tail.skipped == {"empty": 1}
    assert grown[2].rows(20, 28).fingerprint == grown[2].fingerprint
    with pytest.raises(ValueError, match="not within"):
        grown[2].rows(19, 23)


def test_appended_rows_build_only_a_part_and_a_second_growth_another(tmp_path):
    records = rows(13)
    path = write_jsonl(tmp_path / "a.jsonl", records)
    cfg = corpus(path)
    entries = [entry_for(d.todo) for d in decisions(cfg, [])]
    assert [e.stats["num_rows"] for e in entries] == [10, 3]

    write_jsonl(tmp_path / "a.jsonl", records + rows(4, prefix="x"))
    first = decisions(cfg, entries)
    assert [d.action for d in first] == ["skip", "build"]
    part = first[1].todo
    assert first[1].appended and first[1].committed_rows == 3
    assert (part.unit_id, part.first_row, part.num_rows) == (part_id(entries[1].unit_id, first_row=13,
                                                                     unit_first_row=10), 13, 4)
    entries.append(entry_for(part))

    write_jsonl(tmp_path / "a.jsonl", records + rows(4, prefix="x") + rows(5, prefix="y"))
    second = decisions(cfg, entries)
    assert [(d.action, d.committed_rows) for d in second] == [("skip", 10), ("build", 7), ("build", 0)]
    assert [(d.todo.first_row, d.todo.num_rows) for d in second[1:]] == [(17, 3), (20, 2)]
    entries += [entry_for(d.todo) for d in second[1:]]
    assert [d.action for d in decisions(cfg, entries)] == ["skip", "skip", "skip"]


def test_an_edited_or_shortened_committed_row_is_refused(tmp_path):
    records = rows(15)
    path = write_jsonl(tmp_path / "a.jsonl", records)
    cfg = corpus(path)
    entries = [entry_for(d.todo) for d in decisions(cfg, [])]

    edited = [dict(r) for r in records] + rows(3, prefix="x")
    edited[12]["text"] = "edited"
    write_jsonl(tmp_path / "a.jsonl", edited)
    refused = decisions(cfg, entries)[1]
    assert refused.action == "refuse" and "changed" in refused.reason and entries[1].unit_id in refused.reason

    write_jsonl(tmp_path / "a.jsonl", records[:13])
    shortened = decisions(cfg, entries)[1]
    assert shortened.action == "refuse" and "removed" in shortened.reason


def test_an_entry_without_row_ranges_is_judged_by_its_whole_fingerprint(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", rows(5))
    cfg = corpus(path)
    (unit,) = iter_work_units(cfg)
    legacy = entry_for(unit)
    legacy.stats = {"unit_fingerprint": unit.fingerprint}
    assert [d.action for d in decisions(cfg, [legacy])] == ["skip"]
    write_jsonl(tmp_path / "a.jsonl", rows(6))
    assert [d.action for d in decisions(cfg, [legacy])] == ["refuse"]
