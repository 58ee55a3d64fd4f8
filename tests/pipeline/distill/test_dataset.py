import itertools
import json
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from logitcache.errors import ConfigError, CorruptShardError
from logitcache.pipeline.common.splits import is_held_out, split_keys
from logitcache.pipeline.distill.dataset import CacheDataset, CachedRecord
from logitcache.storage_schemas.records import RecordBlock
from logitcache.storage_schemas.shard_reader import CacheReader
from logitcache.storage_schemas.shard_writer import ShardWriter
from tests.factories import make_block, make_layout, make_template

KINDS = ["token_topk", "token_sampled", "token_topk_sampled", "sequence_probs"]


def build_cache(path, *, kind="token_topk", backend="parquet", shards=4, records=30, langs=None,
                value_codec="float16", row_group_tokens=40):
    """A cache of ``shards`` shards of ``records`` records, ~6 records per block."""
    layout = make_layout(kind, value_codec=value_codec)
    template = make_template(layout, backend=backend, storage={"row_group_tokens": row_group_tokens})
    writer = ShardWriter(str(path), template=template)
    for i in range(shards):
        block = make_block(layout, records=records, seed=i, first_record=1000 * i)
        if langs is not None:
            block.lang = np.array(langs(i, records), dtype=object)
        writer.commit(block, unit_id=f"u{i:03d}")
    return str(path)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return build_cache(tmp_path_factory.mktemp("cache") / "c", shards=5, records=40)


def all_ids(url):
    reader = CacheReader(url)
    return np.concatenate([reader.read_shard(s).record_id for s in reader.shards]).tolist()


def stream(ds, workers=None):
    """(cursor, record_id) of everything ``ds`` yields, directly or through a DataLoader."""
    source = ds if workers is None else DataLoader(ds, batch_size=None, num_workers=workers)
    return [(r.cursor, r.record_id) for r in source]


def consume(ds, count, *, workers):
    """Take ``count`` records through a DataLoader, observing each, then stop."""
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    taken = []
    for rec in itertools.islice(loader, count):
        ds.observe([rec.cursor])
        taken.append((rec.cursor, rec.record_id))
    return taken


def restored(url, state, **kwargs):
    ds = CacheDataset(url, seed=3, shuffle_buffer=20, **kwargs)
    ds.load_state_dict(json.loads(json.dumps(state)))
    return ds


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
@pytest.mark.parametrize("kind", KINDS)
def test_one_epoch_yields_every_record_once(tmp_path, backend, kind):
    url = build_cache(tmp_path / "c", kind=kind, backend=backend, shards=3, records=20)
    assert all(s.blocks > 2 for s in CacheReader(url).shards)
    ds = CacheDataset(url, seed=1, shuffle_buffer=15)
    got = stream(ds)
    assert Counter(i for _, i in got) == Counter(all_ids(url))
    assert ds.records_per_epoch() == len(got)
    assert [c for c, _ in got] == sorted(c for c, _ in got)  # one consumer: cursor order
    assert all(isinstance(r.record_id, int) for r in itertools.islice(ds, 3))
    if kind == "token_sampled":
        assert sorted(stream(ds, workers=2)) == got


def test_order_does_not_depend_on_consumers(cache):
    single = stream(CacheDataset(cache, seed=3, shuffle_buffer=20))
    assert len({c[1] for c, _ in single}) > 4  # several windows
    ranks = stream(CacheDataset(cache, seed=3, shuffle_buffer=20, rank=0, world_size=2)) + \
        stream(CacheDataset(cache, seed=3, shuffle_buffer=20, rank=1, world_size=2))
    assert sorted(ranks) == single
    workers = stream(CacheDataset(cache, seed=3, shuffle_buffer=20), workers=2)
    assert sorted(workers) == single
    both = [x for rank in (0, 1) for x in stream(
        CacheDataset(cache, seed=3, shuffle_buffer=20, rank=rank, world_size=2), workers=2)]
    assert sorted(both) == single


def test_order_depends_on_seed_and_epoch_only(cache):
    def ids(**kw):
        return [r.record_id for r in CacheDataset(cache, shuffle_buffer=20, **kw)]

    assert ids(seed=3) == ids(seed=3)
    assert ids(seed=3) != ids(seed=4)
    two = CacheDataset(cache, seed=3, shuffle_buffer=20, epochs=2)
    by_epoch = [[r.record_id for r in two if r.cursor[0] == e] for e in (0, 1)]
    assert by_epoch[0] == ids(seed=3) and by_epoch[1] != by_epoch[0]
    assert sorted(by_epoch[1]) == sorted(by_epoch[0])
    # a small buffer still moves records across the whole cache, not within a shard only
    first_window = [r for r in CacheDataset(cache, seed=3, shuffle_buffer=20) if r.cursor[1] == 0]
    assert len({i // 1000 for i in (r.record_id // 7919 for r in first_window)}) > 1


def test_no_shuffle_buffer_reads_in_cache_order(cache):
    assert [r.record_id for r in CacheDataset(cache, shuffle_buffer=0, seed=9)] == all_ids(cache)


def test_records_are_shuffled_within_a_window(cache):
    position = {i: p for p, i in enumerate(all_ids(cache))}
    got = list(CacheDataset(cache, seed=3, shuffle_buffer=10**6))
    assert {r.cursor[1] for r in got} == {0} and got[0].cursor[3] == len(position)
    places = np.array([position[r.record_id] for r in got])
    assert np.mean(np.diff(places) == 1) < 0.2  # not runs of whole blocks


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize(("workers", "world"), [(1, 1), (3, 1), (0, 2), (2, 2)])
def test_resume_mid_epoch_is_exact(cache, workers, world):
    epoch = set(stream(CacheDataset(cache, seed=3, shuffle_buffer=20)))
    ds = CacheDataset(cache, seed=3, shuffle_buffer=20)
    first = consume(ds, len(epoch) // 2, workers=2)
    state = ds.state_dict()
    assert state["open_epochs"]  # mid-epoch: some windows partly consumed
    rest = [x for rank in range(world)
            for x in stream(restored(cache, state, rank=rank, world_size=world), workers=workers)]
    assert len(first) + len(rest) == len(epoch)
    assert set(first) | set(rest) == epoch


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_resume_twice_with_other_worker_counts(cache):
    epoch = set(stream(CacheDataset(cache, seed=3, shuffle_buffer=20)))
    ds = CacheDataset(cache, seed=3, shuffle_buffer=20)
    taken = consume(ds, 50, workers=2)
    ds = restored(cache, ds.state_dict())
    taken += consume(ds, 70, workers=3)
    ds = restored(cache, ds.state_dict())
    taken += consume(ds, 10**6, workers=0)
    assert len(taken) == len(epoch) and set(taken) == epoch
    assert ds.state_dict()["first_open_epoch"] == 1 and ds.state_dict()["open_epochs"] == {}
    assert list(ds) == []  # epochs=1 and the epoch is done


def test_resume_across_epochs(cache):
    full = set(stream(CacheDataset(cache, seed=3, shuffle_buffer=20, epochs=2)))
    ds = CacheDataset(cache, seed=3, shuffle_buffer=20, epochs=2)
    taken = consume(ds, 260, workers=2)  # into the second epoch
    state = ds.state_dict()
    assert state["first_open_epoch"] in (0, 1) and "1" in state["open_epochs"]
    taken += stream(restored(cache, state, epochs=2), workers=1)
    assert len(taken) == len(full) and set(taken) == full


def test_merged_rank_states_resume_on_one_rank(cache):
    full = set(stream(CacheDataset(cache, seed=3, shuffle_buffer=20, epochs=2)))
    taken, states = [], []
    for rank, count in ((0, 130), (1, 55)):  # rank 0 is into its second epoch, rank 1 is not
        ds = CacheDataset(cache, seed=3, shuffle_buffer=20, epochs=2, rank=rank, world_size=2)
        taken += consume(ds, count, workers=2)
        states.append(json.loads(json.dumps(ds.state_dict())))
    assert [s["first_open_epoch"] for s in states] == [1, 0]
    # a rank's own state resumes that rank
    alone = restored(cache, states[1], rank=1, world_size=2, epochs=2)
    assert len(stream(alone)) == sum(1 for c, _ in full if c[1] % 2 == 1) - 55
    with pytest.raises(ConfigError, match="merge_states"):
        restored(cache, states[0])
    with pytest.raises(ConfigError, match="not all ranks"):
        CacheDataset.merge_states(states[:1])
    merged = CacheDataset.merge_states(states)
    taken += stream(restored(cache, merged, epochs=2), workers=2)
    assert len(taken) == len(full) and set(taken) == full


def endless(cache, **kwargs):
    return CacheDataset(cache, seed=3, shuffle_buffer=20, epochs=None, **kwargs)


def take(ds, count, *, workers, observe=False):
    """The first ``count`` (cursor, record_id) of ``ds`` through a DataLoader of ``workers``."""
    taken = []
    for rec in itertools.islice(DataLoader(ds, batch_size=None, num_workers=workers), count):
        if observe:
            ds.observe([rec.cursor])
        taken.append((rec.cursor, rec.record_id))
    return taken


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_with_fixed_lanes_the_order_is_the_same_for_any_worker_count(cache):
    assert CacheDataset(cache, seed=3, shuffle_buffer=20)._num_windows >= 8
    count = 2 * len(stream(CacheDataset(cache, seed=3, shuffle_buffer=20)))  # into the third epoch
    orders = {workers: take(endless(cache, lanes=4), count, workers=workers) for workers in (0, 1, 2, 4)}
    assert orders[0] == orders[1] == orders[2] == orders[4]
    # the lanes take turns: consecutive records come from different windows
    assert len({cursor[1] for cursor, _ in orders[0][:4]}) == 4
    # without lanes each worker count has its own order (a lane per worker), same records
    assert take(endless(cache), count, workers=2) != take(endless(cache), count, workers=4)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize(("lanes", "before", "after"), [(None, 2, 2), (None, 3, 3), (4, 2, 4), (4, 4, 0)])
def test_a_resumed_stream_goes_on_in_the_same_order(cache, lanes, before, after):
    straight = take(endless(cache, lanes=lanes), 300, workers=before)
    ds = endless(cache, lanes=lanes)
    first = take(ds, 117, workers=before, observe=True)
    state = json.loads(json.dumps(ds.state_dict()))
    assert state["items"] == {"world_size": 1, "ranks": {"0": 117}}
    again = endless(cache, lanes=lanes)
    again.load_state_dict(state)
    assert first + take(again, 300 - 117, workers=after) == straight


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_packed_batches_take_the_lanes_in_turn_and_resume_in_order(cache):
    from logitcache.pipeline.distill.collate import PackedBatches, TokenPacker

    reader = CacheReader(cache)
    longest = max(int(np.diff(reader.read_shard(s).token_offsets).max()) for s in reader.shards)
    packer = TokenPacker(reader.manifest.layout, rows=2, length=longest + 3)

    def batches(ds, count, *, workers, observe=False):
        got = []
        loader = DataLoader(PackedBatches(ds, packer), batch_size=None, num_workers=workers)
        for batch in itertools.islice(loader, count):
            if observe:
                ds.observe(batch.cursors)
            got.append(batch.record_ids.tolist())
        return got

    straight = batches(endless(cache, lanes=4), 120, workers=0)
    assert batches(endless(cache, lanes=4), 120, workers=2) == straight
    assert batches(endless(cache, lanes=4), 120, workers=4) == straight
    ds = endless(cache, lanes=4)
    first = batches(ds, 41, workers=2, observe=True)
    again = endless(cache, lanes=4)
    again.load_state_dict(ds.state_dict())
    assert first + batches(again, 120 - 41, workers=4) == straight


def test_lanes_the_workers_cannot_share_are_refused(cache):
    ds = endless(cache, lanes=4)
    assert ds.lanes_for(0) == ds.lanes_for(2) == 4
    assert ds.lanes_for(8) == 4  # more workers than lanes: the extra ones idle
    with pytest.raises(ConfigError, match="4 reading lanes cannot be shared evenly by 3 DataLoader workers"):
        ds.lanes_for(3)
    with pytest.raises(ConfigError, match="lanes must be an int >= 1"):
        endless(cache, lanes=0)


def test_the_turn_survives_merged_rank_states_of_the_same_world_size(cache):
    states = []
    for rank in (0, 1):
        ds = endless(cache, rank=rank, world_size=2)
        take(ds, 10 + rank, workers=0, observe=True)
        states.append(ds.state_dict())
    merged = CacheDataset.merge_states(states)
    assert merged["items"] == {"world_size": 2, "ranks": {"0": 10, "1": 11}}
    for rank in (0, 1):
        resumed = endless(cache, rank=rank, world_size=2)
        resumed.load_state_dict(merged)
        assert resumed._items == 10 + rank
    alone = endless(cache)
    alone.load_state_dict(merged)  # another world size regroups the windows: no turn to keep
    assert alone._items == 0


def test_state_of_another_order_is_refused(cache, tmp_path):
    state = CacheDataset(cache, seed=3).state_dict()
    with pytest.raises(ConfigError, match="seed: state 3, dataset 4"):
        CacheDataset(cache, seed=4).load_state_dict(state)
    other = build_cache(tmp_path / "other", shards=6, records=40)
    with pytest.raises(ConfigError, match="shards: state '5 shards"):
        CacheDataset(other, seed=3).load_state_dict(state)
    with pytest.raises(ConfigError, match="split"):
        CacheDataset(cache, seed=3, split="train", held_out_fraction=0.1).load_state_dict(state)
    with pytest.raises(ConfigError, match="not a CacheDataset state"):
        CacheDataset(cache).load_state_dict({"epoch": 1})


def test_held_out_split(tmp_path):
    url = build_cache(tmp_path / "c", shards=5, records=80)
    everything = Counter(all_ids(url))
    train = [r.record_id for r in CacheDataset(url, split="train", held_out_fraction=0.25)]
    held = [r.record_id for r in CacheDataset(url, split="eval", held_out_fraction=0.25, seed=1)]
    assert Counter(train) + Counter(held) == everything
    assert not set(train) & set(held)
    assert 0.17 < len(held) / len(everything) < 0.33
    assert sorted(r.record_id for r in CacheDataset(url, split="eval", held_out_fraction=0.25, seed=7)) \
        == sorted(held)
    reader = CacheReader(url)
    block = RecordBlock.concat([reader.read_shard(s) for s in reader.shards])
    key_of = dict(zip(block.record_id.tolist(), split_keys(block.doc_key).tolist(), strict=True))
    assert is_held_out(np.array([key_of[r] for r in held], dtype=np.uint64), 0.25).all()
    with pytest.raises(ConfigError, match="held_out_fraction > 0"):
        CacheDataset(url, split="eval")


def test_all_windows_of_a_document_fall_on_the_same_side(tmp_path):
    layout = make_layout("token_topk", value_codec="float16")
    writer = ShardWriter(str(tmp_path / "c"), template=make_template(layout, storage={"row_group_tokens": 40}))
    block = make_block(layout, records=120, seed=5)
    block.doc_key = np.array([f"doc-{i // 4}" for i in range(120)], dtype=object)  # 4 windows per document
    writer.commit(block, unit_id="u000")
    url = str(tmp_path / "c")
    doc_of = dict(zip(block.record_id.tolist(), block.doc_key.tolist(), strict=True))
    train = {doc_of[r.record_id] for r in CacheDataset(url, split="train", held_out_fraction=0.3)}
    held = {doc_of[r.record_id] for r in CacheDataset(url, split="eval", held_out_fraction=0.3)}
    assert train and held and not train & held


def test_language_filter(cache):
    ds = CacheDataset(cache, languages=["de", "en"], seed=2, shuffle_buffer=20)
    got = list(ds)
    reader = CacheReader(cache)
    block = RecordBlock.concat([reader.read_shard(s) for s in reader.shards])
    expected = block.record_id[np.isin(block.lang.astype(str), ["de", "en"])].tolist()
    assert sorted(r.record_id for r in got) == sorted(expected)
    assert {r.lang for r in got} == {"de", "en"}
    assert ds.records_per_epoch() == len(expected)
    with pytest.raises(ConfigError, match=r"\['xx'\] are not in the cache.*en \("):
        CacheDataset(cache, languages=["en", "xx"])


def test_windows_without_kept_records_are_not_read_and_close_the_epoch(tmp_path):
    url = build_cache(tmp_path / "c", shards=4, records=20,
                      langs=lambda i, n: ["en" if i % 2 else "de"] * n)
    for entry in CacheReader(url).shards[::2]:  # the "de" shards
        (tmp_path / "c" / entry.path).rename(tmp_path / entry.path.replace("/", "_"))
    ds = CacheDataset(url, languages=["en"], shuffle_buffer=0)
    got = stream(ds)
    assert len(got) == 40
    ds.observe(torch.tensor([c for c, _ in got]))  # a collated [B, 4] batch of cursors
    assert ds.state_dict()["first_open_epoch"] == 1 and ds.state_dict()["open_epochs"] == {}


def test_language_sampling(tmp_path):
    url = build_cache(tmp_path / "c", shards=4, records=75,
                      langs=lambda i, n: ["de"] * n if i == 0 else ["en"] * n)  # 75 de, 225 en
    ds = CacheDataset(url, lang_alpha=0.5, seed=5, shuffle_buffer=30)
    weights = ds.language_weights()
    assert weights["de"] == pytest.approx(np.sqrt(75) / (np.sqrt(75) + np.sqrt(225)))
    got = [(r.record_id, r.lang) for r in ds]
    counts = Counter(lang for _, lang in got)
    assert counts["de"] == pytest.approx(weights["de"] * 300, abs=20)  # ~110 draws of 75 records
    assert counts["en"] == pytest.approx(weights["en"] * 300, abs=20)
    per_record = Counter(i for i, lang in got if lang == "de")
    assert set(per_record.values()) == {1, 2} and len(per_record) == 75
    assert max(Counter(i for i, lang in got if lang == "en").values()) == 1
    same = CacheDataset(url, lang_alpha=0.5, seed=5, shuffle_buffer=30)
    assert got == [(r.record_id, r.lang) for r in same]
    again = stream(CacheDataset(url, lang_alpha=0.5, seed=5, shuffle_buffer=30), workers=2)
    assert sorted(again) == stream(ds)
    assert CacheDataset(url, lang_alpha=1.0).language_weights()["de"] == pytest.approx(0.25)


@pytest.mark.parametrize("kind", ["token_topk_sampled", "sequence_probs"])
def test_records_hold_the_decoded_columns(tmp_path, kind):
    url = build_cache(tmp_path / "c", kind=kind, shards=2, records=25, value_codec="q8")
    reader = CacheReader(url)
    block = RecordBlock.concat([reader.read_shard(s) for s in reader.shards])
    layout = reader.layout
    row_of = {int(i): r for r, i in enumerate(block.record_id)}
    tok, lab = block.token_offsets, block.label_offsets
    for rec in CacheDataset(url, seed=4, shuffle_buffer=10):
        assert isinstance(rec, CachedRecord)
        r = row_of[rec.record_id]
        p0, p1 = lab[r], lab[r + 1]
        assert rec.input_ids.dtype == np.int64
        np.testing.assert_array_equal(rec.input_ids, block.input_ids[tok[r]:tok[r + 1]])
        assert rec.lang == block.lang[r]
        if kind == "sequence_probs":
            assert rec.context_length == 0 and rec.topk_ids is None and rec.sample_ids is None
            assert rec.class_logprobs.dtype == np.float32
            np.testing.assert_array_equal(rec.class_logprobs, block.decoded_class_logprobs(layout)[r])
            assert rec.label == block.label[r]
            continue
        assert rec.context_length == block.context_length[r]
        assert len(rec.topk_ids) == len(rec.input_ids) - rec.context_length == p1 - p0
        assert rec.topk_ids.dtype == np.dtype(layout.id_type) and rec.topk_values.dtype == block.topk_logprobs.dtype
        np.testing.assert_array_equal(rec.topk_ids, block.topk_ids[p0:p1])
        np.testing.assert_array_equal(rec.topk_values, block.topk_logprobs[p0:p1])
        np.testing.assert_array_equal(rec.decoded_topk_logprobs(), block.decoded_topk_logprobs(layout)[p0:p1])
        s0, s1 = block.sample_offsets[p0], block.sample_offsets[p1]
        np.testing.assert_array_equal(rec.sample_offsets, block.sample_offsets[p0:p1 + 1] - s0)
        np.testing.assert_array_equal(rec.sample_ids, block.sample_ids[s0:s1])
        np.testing.assert_array_equal(rec.sample_counts, block.sample_counts[s0:s1])
        np.testing.assert_array_equal(rec.entropy, block.entropy[p0:p1].astype(np.float32))
        assert rec.label == -1


def test_endless_and_counted_epochs(cache):
    n = len(all_ids(cache))
    endless = list(itertools.islice(CacheDataset(cache, epochs=None, shuffle_buffer=20), int(2.5 * n)))
    assert Counter(r.cursor[0] for r in endless) == {0: n, 1: n, 2: n // 2}
    assert set(Counter(r.record_id for r in endless).values()) == {2, 3}
    two = list(CacheDataset(cache, epochs=2, shuffle_buffer=20))
    assert Counter(r.record_id for r in two) == Counter(all_ids(cache) * 2)


def test_endless_stream_of_an_empty_share_stops(tmp_path, monkeypatch):
    # one block per shard and no shuffling: rank 0 of 2 always gets the "de" shards only
    url = build_cache(tmp_path / "c", shards=4, records=10, row_group_tokens=10**6,
                      langs=lambda i, n: ["en" if i % 2 else "de"] * n)
    planned = []  # the epochs the stream went through: a stream that spins plans one after another
    plan = CacheDataset._plan

    def plan_or_stop(self, epoch):
        planned.append(epoch)
        if len(planned) > 100:
            raise AssertionError(f"the stream is still going after {len(planned)} epochs that gave it nothing")
        return plan(self, epoch)

    monkeypatch.setattr(CacheDataset, "_plan", plan_or_stop)
    result = list(CacheDataset(url, epochs=None, shuffle_buffer=0, languages=["en"], rank=0, world_size=2))
    assert result == [] and planned
    monkeypatch.undo()
    other = CacheDataset(url, epochs=None, shuffle_buffer=0, languages=["en"], rank=1, world_size=2)
    assert len(list(itertools.islice(other, 50))) == 50


def test_dataset_pickles_without_its_reader(cache):
    ds = CacheDataset(CacheReader(cache), seed=3, shuffle_buffer=20)
    before = [r.record_id for r in ds]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._reader is None and [r.record_id for r in clone] == before
    assert len(pickle.dumps(ds)) < 20_000


def test_verify_refuses_a_corrupt_shard(tmp_path):
    url = build_cache(tmp_path / "c", shards=2, records=20)
    entry = CacheReader(url).shards[1]
    path = tmp_path / "c" / entry.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="sha256"):
        list(CacheDataset(url, verify=True, shuffle_buffer=0))


def test_an_endless_stream_over_an_empty_split_stops_instead_of_spinning(cache):
    reader = CacheReader(cache)
    keys = split_keys(np.concatenate([reader.read_shard(s).doc_key for s in reader.shards]))
    fraction = float(np.nextafter(1.0, 0.0))  # holds out every record
    assert is_held_out(keys, fraction).all()
    ds = CacheDataset(cache, seed=1, epochs=None, shuffle_buffer=20, split="train", held_out_fraction=fraction)
    assert list(ds) == []
