"""Export: a cache as a Hugging Face Parquet dataset, row for row the cache's records,
streamed shard by shard, resumable, and refused where nothing sound can be written."""

import json
import shutil

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from logitcache.cli import main
from logitcache.errors import ConfigError, CorruptShardError, IncompatibleCacheError
from logitcache.stages import export_cache as export_stage
from logitcache.stages.build_cache import build_cache
from logitcache.stages.export_cache import STATE_FILE, export_cache
from logitcache.stages.repack_cache import repack_cache
from logitcache.storage_schemas.records import RecordBlock
from logitcache.storage_schemas.shard_reader import CacheReader
from tests.stages.test_build_cache import job

KINDS = {
    "topk-float32": {"mode": "topk", "k": 8, "values": "float32", "entropy": True},
    "hybrid-q8": {"mode": "topk+sampled", "k": 4, "samples": 6, "values": "q8", "entropy": True},
    "sampled": {"mode": "sampled", "samples": 6},
}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, corpus_dir, tiny_causal_lm_dir, tiny_classifier_dir) -> dict:
    """One cache per kind, with left context (stride 8), 6 shards each."""
    root = tmp_path_factory.mktemp("export-caches")
    out = {}
    for name, labels in KINDS.items():
        cfg = job(root / name, corpus_dir, tiny_causal_lm_dir, soft_labels=labels,
                  windows={"max_length": 48, "stride": 8})
        build_cache(cfg, progress=False)
        out[name] = root / name
    cfg = job(root / "classifier", corpus_dir, tiny_classifier_dir, teacher={"task": "sequence_classification"})
    build_cache(cfg, progress=False)
    out["classifier"] = root / "classifier"
    return out


def cache_records(cache) -> tuple[CacheReader, RecordBlock]:
    reader = CacheReader(str(cache))
    return reader, RecordBlock.concat([reader.read_shard(entry) for entry in reader.shards])


def load(cache, dest, tmp_path) -> datasets.Dataset:
    """DEST's files in the cache's shard order, as ``datasets`` reads them."""
    files = [str(dest / export_stage.output_file(entry.unit_id)) for entry in CacheReader(str(cache)).shards]
    return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))


def ranked(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-values, axis=1, kind="stable")  # most probable first, ties in id order
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(values, order, axis=1)


def record_slices(block: RecordBlock, r: int) -> tuple[np.ndarray, int, slice]:
    tokens = block.input_ids[block.token_offsets[r]:block.token_offsets[r + 1]]
    lab = block.label_offsets
    return tokens, int(block.context_length[r]), slice(int(lab[r]), int(lab[r + 1]))


def test_axolotl_rows_hold_the_distribution_over_the_next_token(tmp_path, caches):
    name = "topk-float32"
    export_cache(str(caches[name]), str(tmp_path / "out"), format="axolotl", renormalize=False, progress=False)
    reader, block = cache_records(caches[name])
    rows = load(caches[name], tmp_path / "out", tmp_path)
    assert rows.num_rows == block.num_records
    values = block.decoded_topk_logprobs(reader.layout)
    with_context = 0
    for r, row in enumerate(rows):
        tokens, context, labelled = record_slices(block, r)
        with_context += context > 0
        length = len(tokens)
        assert row["input_ids"] == tokens.tolist() and row["attention_mask"] == [1] * length
        assert row["labels"] == [-100] * (context + 1) + tokens[context + 1:].tolist()
        mask = np.asarray(row["target_mask"])
        assert mask.shape == (length, 8)
        assert not mask[:context].any() and mask[context:].all()  # every labelled position, the last one too
        want_ids, want_values = ranked(block.topk_ids[labelled], values[labelled])
        np.testing.assert_array_equal(np.asarray(row["target_token_ids"])[context:], want_ids)
        # exactly: the export writes the decoded float32 values (q8 too: the hybrid test)
        np.testing.assert_array_equal(np.asarray(row["target_logprobs"], np.float32)[context:], want_values)
        assert np.asarray(row["target_token_ids"])[:context].max(initial=0) == 0
    assert with_context > 0  # stride 8 gave windows with left context


def test_axolotl_renormalises_each_row_by_default(tmp_path, caches):
    export_cache(str(caches["topk-float32"]), str(tmp_path / "out"), format="axolotl", progress=False)
    reader, block = cache_records(caches["topk-float32"])
    rows = load(caches["topk-float32"], tmp_path / "out", tmp_path)
    values = block.decoded_topk_logprobs(reader.layout).astype(np.float64)
    for r, row in enumerate(rows):
        _, context, labelled = record_slices(block, r)
        _, want = ranked(block.topk_ids[labelled], values[labelled])
        want = want - np.log(np.exp(want).sum(axis=1, keepdims=True))
        got = np.asarray(row["target_logprobs"], np.float64)[context:]
        np.testing.assert_allclose(got, want, atol=1e-6)
        np.testing.assert_allclose(np.exp(got).sum(axis=1), 1.0, atol=1e-5)


def test_axolotl_sampled_targets_are_the_draws_weighted_by_frequency(tmp_path, caches):
    export_cache(str(caches["sampled"]), str(tmp_path / "out"), format="axolotl", renormalize=False, progress=False)
    _, block = cache_records(caches["sampled"])
    rows = load(caches["sampled"], tmp_path / "out", tmp_path)
    s_off = block.sample_offsets
    for r, row in enumerate(rows):
        _, context, labelled = record_slices(block, r)
        ids, logprobs = np.asarray(row["target_token_ids"]), np.asarray(row["target_logprobs"], np.float64)
        mask = np.asarray(row["target_mask"]).astype(bool)
        assert ids.shape[1] == 6 and not mask[:context].any()
        for i, p in enumerate(range(labelled.start, labelled.stop)):
            drawn = slice(int(s_off[p]), int(s_off[p + 1]))
            entries = mask[context + i]
            counts = np.rint(np.exp(logprobs[context + i][entries]) * 6).astype(int)
            got = dict(zip(ids[context + i][entries].tolist(), counts.tolist(), strict=True))
            assert got == dict(zip(block.sample_ids[drawn].tolist(), block.sample_counts[drawn].tolist(), strict=True))


def test_axolotl_hybrid_targets_are_the_head_then_the_tail_draws(tmp_path, caches):
    export_cache(str(caches["hybrid-q8"]), str(tmp_path / "out"), format="axolotl", renormalize=False,
                 progress=False)
    reader, block = cache_records(caches["hybrid-q8"])
    rows = load(caches["hybrid-q8"], tmp_path / "out", tmp_path)
    values, s_off = block.decoded_topk_logprobs(reader.layout), block.sample_offsets
    for r, row in enumerate(rows):
        _, context, labelled = record_slices(block, r)
        ids, logprobs = np.asarray(row["target_token_ids"]), np.asarray(row["target_logprobs"], np.float32)
        mask = np.asarray(row["target_mask"]).astype(bool)
        assert ids.shape[1] == 4 + 6
        head_ids, head_values = ranked(block.topk_ids[labelled], values[labelled])
        np.testing.assert_array_equal(ids[context:, :4], head_ids)
        np.testing.assert_array_equal(logprobs[context:, :4], head_values)
        for i, p in enumerate(range(labelled.start, labelled.stop)):
            tail = max(0.0, 1.0 - float(np.exp(values[p].astype(np.float64)).sum()))
            drawn = slice(int(s_off[p]), int(s_off[p + 1]))
            draws = zip(block.sample_ids[drawn], block.sample_counts[drawn], strict=True)
            want = {int(t): tail * int(c) / 6 for t, c in draws}
            tail_mask = mask[context + i, 4:]
            weights = np.exp(logprobs[context + i, 4:][tail_mask].astype(np.float64))
            got = dict(zip(ids[context + i, 4:][tail_mask].tolist(), weights.tolist(), strict=True))
            assert got.keys() == {t for t, w in want.items() if w > 0}
            np.testing.assert_allclose([got[t] for t in got], [want[t] for t in got], rtol=1e-5)


@pytest.mark.parametrize("name", ["topk-float32", "hybrid-q8"])
def test_hf_rows_are_the_cache_records_decoded(tmp_path, caches, name):
    summary = export_cache(str(caches[name]), str(tmp_path / "out"), format="hf", progress=False)
    reader, block = cache_records(caches[name])
    assert summary.total_records == block.num_records and summary.shards_written == len(reader.shards)
    rows = load(caches[name], tmp_path / "out", tmp_path)
    values = block.decoded_topk_logprobs(reader.layout)
    for r, row in enumerate(rows):
        tokens, context, labelled = record_slices(block, r)
        assert (row["record_id"], row["doc_key"], row["lang"]) == \
            (int(block.record_id[r]), block.doc_key[r], block.lang[r])
        assert row["input_ids"] == tokens.tolist() and row["context_length"] == context
        want_ids, want_values = ranked(block.topk_ids[labelled], values[labelled])
        np.testing.assert_array_equal(np.asarray(row["topk_ids"]), want_ids)
        np.testing.assert_array_equal(np.asarray(row["topk_logprobs"], np.float32), want_values)
        np.testing.assert_array_equal(np.asarray(row["entropy"], np.float32), block.entropy[labelled])
        np.testing.assert_array_equal(np.asarray(row["target_logprob"], np.float32),
                                      block.target_logprob[labelled].astype(np.float32))
        if reader.layout.has_samples:
            s_off = block.sample_offsets
            for i, p in enumerate(range(labelled.start, labelled.stop)):
                drawn = slice(int(s_off[p]), int(s_off[p + 1]))
                assert row["sample_ids"][i] == block.sample_ids[drawn].tolist()
                assert row["sample_counts"][i] == block.sample_counts[drawn].tolist()


def test_a_zarr_cache_exports_the_same_rows(tmp_path, caches):
    zarr = tmp_path / "zarr"
    repack_cache(str(caches["hybrid-q8"]), str(zarr), storage={"backend": "zarr", "chunk_tokens": 64}, progress=False)
    for cache, dest in ((caches["hybrid-q8"], tmp_path / "from-parquet"), (zarr, tmp_path / "from-zarr")):
        export_cache(str(cache), str(dest), format="axolotl", progress=False)
    for name in file_bytes(tmp_path / "from-parquet"):
        want, got = (pq.read_table(tmp_path / dest / "data" / name) for dest in ("from-parquet", "from-zarr"))
        assert got.equals(want)


def test_a_classifier_cache_exports_as_hf_and_is_refused_for_axolotl(tmp_path, caches):
    with pytest.raises(ConfigError, match="--format hf"):
        export_cache(str(caches["classifier"]), str(tmp_path / "axolotl"), format="axolotl", progress=False)
    assert not (tmp_path / "axolotl").exists()
    export_cache(str(caches["classifier"]), str(tmp_path / "out"), format="hf", progress=False)
    reader, block = cache_records(caches["classifier"])
    rows = load(caches["classifier"], tmp_path / "out", tmp_path)
    np.testing.assert_array_equal(np.asarray(rows["class_logprobs"], np.float32), block.decoded_class_logprobs(reader.layout))
    assert rows["label"] == block.label.tolist()


def test_the_card_names_the_files_and_their_features(tmp_path, caches):
    export_cache(str(caches["hybrid-q8"]), str(tmp_path / "out"), format="axolotl", progress=False)
    card = (tmp_path / "out" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*.parquet"}]
    first = sorted((tmp_path / "out" / "data").glob("train-*.parquet"))[0]
    features = datasets.Features._from_yaml_list(front["dataset_info"]["features"])
    assert features == datasets.Features.from_arrow_schema(pq.read_schema(first))
    for words in ("token_topk_sampled", "k = 4", "q8", "stride 8", "distribution over token j + 1", "kd_beta: 0"):
        assert words in card
    # the card is what `load_dataset(DEST)` (and axolotl, for a local directory) reads
    rows = datasets.load_dataset(str(tmp_path / "out"), split="train", cache_dir=str(tmp_path / "hf"))
    assert rows.num_rows == CacheReader(str(caches["hybrid-q8"])).manifest.total_records
    assert not (tmp_path / "out" / ".incomplete").exists()


def file_bytes(dest) -> dict:
    return {path.name: path.read_bytes() for path in sorted((dest / "data").iterdir())}


def test_an_interrupted_export_resumes_with_the_shards_left_and_the_same_bytes(tmp_path, caches, monkeypatch):
    cache = str(caches["hybrid-q8"])
    export_cache(cache, str(tmp_path / "whole"), format="axolotl", progress=False)
    write_shard, calls = export_stage.write_shard, []

    def dies_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return write_shard(*args, **kwargs)

    monkeypatch.setattr(export_stage, "write_shard", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        export_cache(cache, str(tmp_path / "out"), format="axolotl", progress=False)
    monkeypatch.setattr(export_stage, "write_shard", write_shard)
    (tmp_path / "out" / ".incomplete").mkdir(exist_ok=True)
    (tmp_path / "out" / ".incomplete" / "train-half.parquet").write_bytes(b"half a file")
    summary = export_cache(cache, str(tmp_path / "out"), format="axolotl", progress=False)
    assert (summary.shards_skipped, summary.shards_written) == (2, 4)
    assert file_bytes(tmp_path / "out") == file_bytes(tmp_path / "whole")
    assert not (tmp_path / "out" / ".incomplete").exists()

    # a file lost with its state entry is written again, the others skipped
    state = json.loads((tmp_path / "out" / STATE_FILE).read_text())
    unit, entry = sorted(state["shards"].items())[-1]
    (tmp_path / "out" / entry["file"]).unlink()
    del state["shards"][unit]
    (tmp_path / "out" / STATE_FILE).write_text(json.dumps(state))
    again = export_cache(cache, str(tmp_path / "out"), format="axolotl", progress=False)
    assert (again.shards_skipped, again.shards_written) == (5, 1)
    assert file_bytes(tmp_path / "out") == file_bytes(tmp_path / "whole")
    done = export_cache(cache, str(tmp_path / "out"), format="axolotl", progress=False)
    assert (done.shards_skipped, done.shards_written) == (6, 0)


def test_a_cache_that_grew_or_shrank_adds_or_removes_only_those_files(tmp_path, caches):
    cache = tmp_path / "cache"
    shutil.copytree(caches["topk-float32"], cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    whole = list(manifest["shards"])
    (cache / "manifest.json").write_text(json.dumps({**manifest, "shards": whole[:-1]}))
    export_cache(str(cache), str(tmp_path / "out"), format="hf", progress=False)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    grown = export_cache(str(cache), str(tmp_path / "out"), format="hf", progress=False)
    assert (grown.shards_skipped, grown.shards_written, grown.files) == (5, 1, 6)
    (cache / "manifest.json").write_text(json.dumps({**manifest, "shards": whole[1:]}))
    shrunk = export_cache(str(cache), str(tmp_path / "out"), format="hf", progress=False)
    assert (shrunk.files_removed, shrunk.shards_written, shrunk.files) == (1, 0, 5)
    assert len(list((tmp_path / "out" / "data").iterdir())) == 5


def test_a_dest_of_another_cache_or_format_is_refused_unless_overwritten(tmp_path, caches):
    dest = str(tmp_path / "out")
    export_cache(str(caches["topk-float32"]), dest, format="axolotl", progress=False)
    with pytest.raises(IncompatibleCacheError, match="another cache"):
        export_cache(str(caches["hybrid-q8"]), dest, format="axolotl", progress=False)
    with pytest.raises(IncompatibleCacheError, match="--format axolotl export"):
        export_cache(str(caches["topk-float32"]), dest, format="hf", progress=False)
    with pytest.raises(IncompatibleCacheError, match="other options"):
        export_cache(str(caches["topk-float32"]), dest, format="axolotl", renormalize=False, progress=False)
    replaced = export_cache(str(caches["hybrid-q8"]), dest, format="hf", overwrite=True, progress=False)
    assert replaced.shards_written == 6 and replaced.format == "hf"
    (tmp_path / "plain" / "data").mkdir(parents=True)
    with pytest.raises(IncompatibleCacheError, match="not a logitcache export"):
        export_cache(str(caches["hybrid-q8"]), str(tmp_path / "plain"), format="hf", progress=False)
    with pytest.raises(ConfigError, match="the cache itself"):
        export_cache(str(caches["hybrid-q8"]), str(caches["hybrid-q8"]), format="hf", progress=False)


def test_a_corrupt_source_shard_is_refused_by_name(tmp_path, caches):
    cache = tmp_path / "cache"
    shutil.copytree(caches["topk-float32"], cache)
    second = CacheReader(str(cache)).shards[1]
    data = bytearray((cache / second.path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (cache / second.path).write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=second.path):
        export_cache(str(cache), str(tmp_path / "out"), format="axolotl", progress=False)
    assert [p.name for p in (tmp_path / "out" / "data").iterdir()] == \
        [export_stage.output_file(CacheReader(str(cache)).shards[0].unit_id).split("/")[-1]]


def test_an_export_to_an_object_storage_url(tmp_path, caches):
    import uuid

    import fsspec

    root = f"/lc-export-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("memory")
    try:
        export_cache(str(caches["hybrid-q8"]), f"memory://{root}/out", format="axolotl", progress=False)
        export_cache(str(caches["hybrid-q8"]), str(tmp_path / "local"), format="axolotl", progress=False)
        for name, data in file_bytes(tmp_path / "local").items():
            assert fs.cat_file(f"{root}/out/data/{name}") == data
        assert fs.exists(f"{root}/out/README.md") and not fs.exists(f"{root}/out/.incomplete")
    finally:
        fs.rm(root, recursive=True)


def test_cli_export(tmp_path, caches):
    result = CliRunner().invoke(main, ["export", str(caches["hybrid-q8"]), str(tmp_path / "out"),
                                       "--format", "axolotl", "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["shards_written"] == 6 and summary["kind"] == "token_topk_sampled"
    assert any("kd_beta: 0" in note for note in summary["notes"])
    text = CliRunner().invoke(main, ["export", str(caches["hybrid-q8"]), str(tmp_path / "out"),
                                     "--format", "axolotl", "--no-progress"])
    assert text.exit_code == 0 and "nothing to write" in text.output
    refused = CliRunner().invoke(main, ["export", str(caches["classifier"]), str(tmp_path / "c"), "--format", "axolotl"])
    assert refused.exit_code == 2 and "--format hf" in refused.output
