"""Stage one end to end, on the tiny multilingual corpus and tiny teachers of conftest."""

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from logitcache.config import config_from_dict
from logitcache.errors import IncompatibleCacheError
from logitcache.pipeline.capture.teacher import load_teacher
from logitcache.stages.build_cache import build_cache
from logitcache.storage_schemas.records import RecordBlock
from logitcache.storage_schemas.shard_reader import CacheReader
from logitcache.storage_schemas.value_codecs import get_value_codec
from logitcache.storage_schemas.verify import verify_cache
from tests import fixtures_models


def job(cache, corpus_path, model, **sections):
    data = {
        "cache": str(cache),
        "corpus": {"data_files": [str(Path(corpus_path) / "*.jsonl")], "lang_column": "lang",
                   "id_column": "id", "unit_documents": 10},
        "teacher": {"model": str(model), "batch_tokens": 400},
        "windows": {"max_length": 48, "stride": 0},
        "soft_labels": {"mode": "topk", "k": 8, "values": "float32"},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return config_from_dict(data)


def read_all(cache) -> tuple[CacheReader, RecordBlock]:
    reader = CacheReader(str(cache))
    blocks = [reader.read_shard(e, verify=True) for e in reader.shards]
    return reader, RecordBlock.concat(blocks)


def sorted_by_record(block: RecordBlock) -> RecordBlock:
    order = np.argsort(block.record_id, kind="stable")
    return RecordBlock.concat([block.take_records(int(i), int(i) + 1) for i in order])


@pytest.mark.parametrize(
    ("backend", "codec", "max_length", "stride"),
    [("parquet", "float32", 48, 0), ("zarr", "float32", 48, 12), ("parquet", "q8", 512, 0),
     ("zarr", "float16", 32, 31)],
)
def test_labels_equal_a_plain_full_logit_forward(tmp_path, corpus_dir, tiny_causal_lm_dir,
                                                 backend, codec, max_length, stride):
    cfg = job(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir, storage={"backend": backend},
              soft_labels={"values": codec, "entropy": True},
              windows={"max_length": max_length, "stride": stride})
    summary = build_cache(cfg, progress=False)
    assert summary.units_built == 6 and summary.units_skipped == 0  # 2 files x (10 + 10 + 5)
    reader, block = read_all(tmp_path / "cache")
    assert verify_cache(str(tmp_path / "cache"), deep=True).ok
    assert {entry.stats["packing"] for entry in reader.shards} == {"packed"}  # teacher.packing: auto
    teacher = load_teacher(cfg.teacher)
    values = block.decoded_topk_logprobs(reader.layout)
    bound = get_value_codec(codec).max_abs_error + 1e-4
    labels = block.label_offsets
    rng = np.random.default_rng(0)
    checked = 0
    for r in rng.choice(block.num_records, size=min(25, block.num_records), replace=False):
        tokens = block.input_ids[block.token_offsets[r]:block.token_offsets[r + 1]].astype(np.int64)
        context = int(block.context_length[r])
        assert len(tokens) <= max_length
        ids = torch.from_numpy(tokens)[None]
        logp = torch.log_softmax(teacher.logits(ids, torch.ones_like(ids)).float()[0], -1)[context:]
        ref_lp, ref_ids = torch.topk(logp, 8, dim=-1)
        ref_ids, order = ref_ids.sort(dim=-1)  # the cache stores each row in id order
        ref_lp = ref_lp.gather(-1, order)
        got_ids = block.topk_ids[labels[r]:labels[r + 1]].astype(np.int64)
        got_lp = values[labels[r]:labels[r + 1]]
        np.testing.assert_array_equal(got_ids, ref_ids.numpy())
        np.testing.assert_allclose(got_lp, ref_lp.numpy(), atol=bound, rtol=0)
        entropy = -(logp.exp() * logp).sum(-1).numpy()
        np.testing.assert_allclose(block.entropy[labels[r]:labels[r + 1]].astype(np.float32), entropy, rtol=2e-3, atol=2e-3)
        checked += 1
    assert checked > 10
    # every document token is labelled exactly once across its windows
    per_doc = {}
    for r in range(block.num_records):
        per_doc.setdefault(block.doc_key[r], 0)
        per_doc[block.doc_key[r]] += int(labels[r + 1] - labels[r])
    tokenizer = teacher.tokenizer
    texts = {d["id"]: d["text"] for d in fixtures_models.multilingual_texts()}
    for key, count in per_doc.items():
        assert count == len(tokenizer(texts[key])["input_ids"])
    manifest = reader.manifest
    assert set(manifest.lang_totals()) == {"en", "de", "es", "ru", "zh", "ar", "hi"}
    assert set(manifest.stats["mean_entropy_per_lang"]) == set(manifest.lang_totals())
    assert 0 <= manifest.stats["padding_fraction"] < 0.5


def test_sampled_counts_follow_the_teacher(tmp_path, corpus_dir, tiny_causal_lm_dir):
    cfg = job(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir,
              soft_labels={"mode": "sampled", "samples": 64})
    build_cache(cfg, progress=False)
    _, block = read_all(tmp_path / "cache")
    teacher = load_teacher(cfg.teacher)
    labels, offsets = block.label_offsets, block.sample_offsets
    # per position, sum_i count_i/N * log q_i estimates E_q[log q] = -entropy without bias
    errors = []
    for r in range(0, block.num_records, 3):
        tokens = torch.from_numpy(block.input_ids[block.token_offsets[r]:block.token_offsets[r + 1]].astype(np.int64))[None]
        logq = torch.log_softmax(teacher.logits(tokens, torch.ones_like(tokens)).float()[0], -1).numpy()
        for p_local, p in enumerate(range(labels[r], labels[r + 1])):
            ids = block.sample_ids[offsets[p]:offsets[p + 1]].astype(np.int64)
            counts = block.sample_counts[offsets[p]:offsets[p + 1]].astype(np.float64)
            assert counts.sum() == 64
            row = logq[p_local].astype(np.float64)
            estimate = (counts / 64 * row[ids]).sum()
            errors.append(estimate - (np.exp(row) * row).sum())
    errors = np.asarray(errors)
    z = errors.mean() / (errors.std(ddof=1) / np.sqrt(len(errors)))
    assert len(errors) > 500 and abs(z) < 4, z
    # a biased sampler (always the argmax) would be far off
    assert np.mean(np.abs(errors)) < 0.5


def test_resume_skips_committed_units_and_matches(tmp_path, corpus_dir, tiny_causal_lm_dir):
    cfg = job(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir)
    full = job(tmp_path / "full", corpus_dir, tiny_causal_lm_dir)
    build_cache(full, progress=False)
    reader = CacheReader(str(tmp_path / "full"))
    # a cache holding only the first two units, as a killed run would leave it
    from logitcache.storage_schemas.shard_writer import ShardWriter

    build_cache(cfg, progress=False)
    writer = ShardWriter(str(tmp_path / "cache"), template=reader.manifest)
    writer.manifest.shards = writer.manifest.shards[:2]
    writer.manifest.save(writer.location)
    second = build_cache(cfg, progress=False)
    assert second.units_skipped == 2 and second.units_built == 4
    third = build_cache(cfg, progress=False)
    assert third.units_built == 0 and "no teacher forward" in third.to_text()
    assert sorted_by_record(read_all(tmp_path / "cache")[1]).equals(sorted_by_record(read_all(tmp_path / "full")[1]))


def test_grown_corpus_builds_only_new_units(tmp_path, multilingual_texts, tiny_causal_lm_dir):
    corpus = tmp_path / "corpus"
    fixtures_models.write_corpus(corpus, multilingual_texts[:30], parts=1)
    cfg = job(tmp_path / "cache", corpus, tiny_causal_lm_dir)
    assert build_cache(cfg, progress=False).units_built == 3
    before = {e.unit_id: e.sha256 for e in CacheReader(str(tmp_path / "cache")).shards}
    (corpus / "part-9.jsonl").write_text(
        "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in multilingual_texts[30:]), encoding="utf-8")
    grown = build_cache(cfg, progress=False)
    assert grown.units_skipped == 3 and grown.units_built == 2
    after = {e.unit_id: e.sha256 for e in CacheReader(str(tmp_path / "cache")).shards}
    assert {k: after[k] for k in before} == before and len(after) == 5


def test_rows_appended_to_a_file_build_only_the_new_rows(tmp_path, multilingual_texts, tiny_causal_lm_dir):
    corpus = tmp_path / "corpus"
    fixtures_models.write_corpus(corpus, multilingual_texts[:24], parts=1)
    cfg = job(tmp_path / "cache", corpus, tiny_causal_lm_dir)
    assert build_cache(cfg, progress=False).units_built == 3  # rows 0-9, 10-19, 20-23
    before = {e.unit_id: e.sha256 for e in CacheReader(str(tmp_path / "cache")).shards}
    with open(corpus / "part-0.jsonl", "a", encoding="utf-8") as stream:
        stream.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in multilingual_texts[24:33])
    grown = build_cache(cfg, progress=False)
    assert (grown.units_skipped, grown.units_built, grown.units_appended) == (2, 2, 1)
    assert "appended" in grown.to_text()
    reader, block = read_all(tmp_path / "cache")
    after = {e.unit_id: e for e in reader.shards}
    assert {k: after[k].sha256 for k in before} == before
    appended = [e for e in after.values() if e.unit_id not in before]
    assert sorted((e.stats["first_row"], e.stats["num_rows"]) for e in appended) == [(24, 6), (30, 3)]
    assert build_cache(cfg, progress=False).units_built == 0

    fresh_cfg = job(tmp_path / "fresh", corpus, tiny_causal_lm_dir)
    build_cache(fresh_cfg, progress=False)
    grown_block, fresh_block = sorted_by_record(block), sorted_by_record(read_all(tmp_path / "fresh")[1])
    assert np.array_equal(grown_block.record_id, fresh_block.record_id)
    assert np.array_equal(grown_block.input_ids, fresh_block.input_ids)
    assert np.array_equal(grown_block.topk_ids, fresh_block.topk_ids)
    np.testing.assert_allclose(grown_block.topk_logprobs, fresh_block.topk_logprobs, atol=1e-5)


def test_changed_source_under_a_committed_unit_is_refused(tmp_path, multilingual_texts, tiny_causal_lm_dir):
    corpus = tmp_path / "corpus"
    fixtures_models.write_corpus(corpus, multilingual_texts[:20], parts=1)
    cfg = job(tmp_path / "cache", corpus, tiny_causal_lm_dir)
    build_cache(cfg, progress=False)
    fixtures_models.write_corpus(corpus, multilingual_texts[5:25], parts=1)
    with pytest.raises(IncompatibleCacheError, match="changed"):
        build_cache(cfg, progress=False)


def test_different_config_is_refused_and_overwrite_works(tmp_path, corpus_dir, tiny_causal_lm_dir):
    build_cache(job(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir), progress=False)
    other = job(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir, soft_labels={"k": 4},
                windows={"max_length": 32})
    with pytest.raises(IncompatibleCacheError) as err:
        build_cache(other, progress=False)
    assert "soft_labels.k" in str(err.value) and "windows.max_length" in str(err.value)
    assert CacheReader(str(tmp_path / "cache")).layout.k == 8  # untouched
    assert build_cache(other, overwrite=True, progress=False).units_built == 6
    assert CacheReader(str(tmp_path / "cache")).layout.k == 4


def test_sequence_classifier_stores_class_distributions(tmp_path, corpus_dir, tiny_classifier_dir):
    cfg = job(tmp_path / "cache", corpus_dir, tiny_classifier_dir,
              teacher={"task": "sequence_classification"}, corpus={"label_column": "label"})
    build_cache(cfg, progress=False)
    reader, block = read_all(tmp_path / "cache")
    assert reader.manifest.kind == "sequence_probs"
    probs = np.exp(block.decoded_class_logprobs(reader.layout))
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert block.num_records == 50 and set(block.label.tolist()) <= {0, 1, 2}
    teacher = load_teacher(cfg.teacher)
    r = 3
    tokens = torch.from_numpy(block.input_ids[block.token_offsets[r]:block.token_offsets[r + 1]].astype(np.int64))[None]
    reference = teacher.class_logprobs(tokens, torch.ones_like(tokens))[0].numpy()
    np.testing.assert_allclose(block.class_logprobs[r], reference, atol=1e-4)


def _cli_config(tmp_path, corpus_dir, model, unit_documents=4) -> Path:
    cfg = {
        "cache": str(tmp_path / "cache"),
        "corpus": {"data_files": [str(Path(corpus_dir) / "*.jsonl")], "lang_column": "lang",
                   "id_column": "id", "unit_documents": unit_documents},
        "teacher": {"model": str(model), "batch_tokens": 256},
        "windows": {"max_length": 48},
        "soft_labels": {"k": 8, "mode": "topk+sampled", "samples": 16, "values": "q8"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


#: ``python -c`` code running the CLI whose commit thread, once it has committed its
#: ``{units}``-th unit, writes "committed" to file descriptor ``{fd}`` and waits there until
#: the process is killed: no later unit can commit, while the teacher goes on with the next
PAUSE_AFTER_COMMITS = """
import os, sys, threading
from logitcache.cli import main
from logitcache.pipeline.common.committer import BackgroundCommitter
commit = BackgroundCommitter._commit
def commit_then_wait(self, *args, **kwargs):
    entry = commit(self, *args, **kwargs)
    if len(self.writer.committed_units) == {units}:
        os.write({fd}, b"committed")
        threading.Event().wait()
    return entry
BackgroundCommitter._commit = commit_then_wait
main(sys.argv[1:], prog_name="logitcache")
"""


def test_sigkill_and_resume_equals_an_uninterrupted_build(tmp_path, corpus_dir, tiny_causal_lm_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "logitcache", "build", "--no-progress"]
    path = _cli_config(tmp_path, corpus_dir, tiny_causal_lm_dir)
    told, tell = os.pipe()
    with (tmp_path / "killed.stderr").open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-c", PAUSE_AFTER_COMMITS.format(units=2, fd=tell), "build",
                                    "--no-progress", str(path)], env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                   pass_fds=(tell,))
    os.close(tell)
    try:
        # a safety limit against a hang only: the build is killed when it says so, however slow
        if not select.select([told], [], [], 300)[0]:
            pytest.fail("the build neither reached its second commit nor ended in 300 s")
        message = os.read(told, 64)  # b"" if the build ended without saying it
        assert message == b"committed", \
            f"the build ended (exit {process.wait()}) before its second commit: {(tmp_path / 'killed.stderr').read_text()}"
        process.send_signal(signal.SIGKILL)
    finally:
        os.close(told)
        process.kill()
        process.wait()
    partial = CacheReader(str(tmp_path / "cache")).shards
    assert len(partial) == 2  # of 14: 2 files x 7 units of 4 documents
    done = subprocess.run([*command, "--json", str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["units_skipped"] == len(partial)
    assert summary["units_built"] == 14 - len(partial)
    assert verify_cache(str(tmp_path / "cache"), deep=True).ok

    reference = tmp_path / "ref"
    reference.mkdir()
    ref_path = _cli_config(reference, corpus_dir, tiny_causal_lm_dir)
    subprocess.run([*command, str(ref_path)], env=env, check=True, capture_output=True, timeout=300)
    assert sorted_by_record(read_all(tmp_path / "cache")[1]).equals(sorted_by_record(read_all(reference / "cache")[1]))


def test_cli_build_refuses_a_different_config_with_exit_2(tmp_path, corpus_dir, tiny_causal_lm_dir):
    from click.testing import CliRunner

    from logitcache.cli import main

    path = _cli_config(tmp_path, corpus_dir, tiny_causal_lm_dir, unit_documents=25)
    runner = CliRunner()
    first = runner.invoke(main, ["build", "--no-progress", str(path)])
    assert first.exit_code == 0, first.output
    assert "built 2 unit(s)" in first.output
    refused = runner.invoke(main, ["build", "--no-progress", str(path), "--set", "soft_labels.k=4"])
    assert refused.exit_code == 2
    assert "soft_labels.k" in refused.output and "--overwrite" in refused.output
    bad = runner.invoke(main, ["build", str(path), "--set", "soft_labels.kk=4"])
    assert bad.exit_code == 2 and "did you mean" in bad.output


def test_a_failed_build_loses_nothing(tmp_path, corpus_dir, tiny_causal_lm_dir):
    from logitcache.errors import CorpusError

    cfg = job(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir)
    build_cache(cfg, progress=False)
    before = {e.unit_id: e.sha256 for e in CacheReader(str(tmp_path / "cache")).shards}
    typo = job(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir, corpus={"text_column": "txt"})
    with pytest.raises(CorpusError, match="did you mean 'text'"):
        build_cache(typo, overwrite=True, progress=False)
    assert {e.unit_id: e.sha256 for e in CacheReader(str(tmp_path / "cache")).shards} == before
    assert verify_cache(str(tmp_path / "cache")).ok


def test_a_typo_in_a_first_build_does_not_block_the_fixed_config(tmp_path, corpus_dir, tiny_causal_lm_dir):
    from logitcache.errors import CorpusError

    typo = job(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir, corpus={"text_column": "txt"})
    with pytest.raises(CorpusError):
        build_cache(typo, progress=False)
    fixed = job(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir)
    assert build_cache(fixed, progress=False).units_built == 6


@pytest.mark.parametrize(("mode", "backend"), [("topk", "parquet"), ("sampled", "zarr"), ("topk+sampled", "parquet")])
def test_target_logprob_is_the_teachers_log_prob_of_the_next_token(tmp_path, corpus_dir, tiny_causal_lm_dir,
                                                                   mode, backend):
    cfg = job(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir, storage={"backend": backend},
              soft_labels={"mode": mode, "samples": 4}, windows={"max_length": 32, "stride": 8})
    build_cache(cfg, progress=False)
    reader, block = read_all(tmp_path / "cache")
    assert reader.layout.target_logprob and reader.manifest.to_dict()["layout"]["target_logprob"] is True
    assert verify_cache(str(tmp_path / "cache"), deep=True).ok
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir).eval()
    labels = block.label_offsets
    for r in np.random.default_rng(1).choice(block.num_records, size=12, replace=False):
        tokens = torch.from_numpy(block.input_ids[block.token_offsets[r]:block.token_offsets[r + 1]].astype(np.int64))
        context = int(block.context_length[r])
        with torch.no_grad():  # a dense reference: the full logits of the plain model
            logp = torch.log_softmax(model(tokens[None]).logits[0].double(), -1)
        want = logp[torch.arange(len(tokens) - 1), tokens[1:]][context:].numpy()
        got = block.target_logprob[labels[r]:labels[r + 1]].astype(np.float64)
        assert np.isnan(got[-1])  # the window's last token has no next token in the window
        np.testing.assert_allclose(got[:-1], want, rtol=1e-3, atol=2e-3)


def test_a_cache_built_before_target_logprob_keeps_growing_without_it(tmp_path):
    from dataclasses import replace

    from logitcache.stages.build_cache import keep_existing_columns
    from logitcache.storage_schemas.shard_writer import ShardWriter
    from tests.factories import make_block, make_layout, make_template

    old = make_layout("token_topk")
    new = replace(old, target_logprob=True)
    assert keep_existing_columns(str(tmp_path / "fresh"), new) == new
    writer = ShardWriter(str(tmp_path / "old"), template=make_template(old))
    assert keep_existing_columns(str(tmp_path / "old"), new) == new  # no shard yet: nothing to keep
    writer.commit(make_block(old), unit_id="u0")
    assert keep_existing_columns(str(tmp_path / "old"), new) == old


def test_a_teacher_placed_by_a_device_map_builds_the_same_records(tmp_path, corpus_dir, tiny_causal_lm_dir):
    build_cache(job(tmp_path / "whole", corpus_dir, tiny_causal_lm_dir), progress=False)
    placed = job(tmp_path / "placed", corpus_dir, tiny_causal_lm_dir, teacher={"device_map": "auto"})
    build_cache(placed, progress=False)
    whole, mapped = sorted_by_record(read_all(tmp_path / "whole")[1]), sorted_by_record(read_all(tmp_path / "placed")[1])
    assert np.array_equal(whole.topk_ids, mapped.topk_ids)
    np.testing.assert_allclose(whole.topk_logprobs, mapped.topk_logprobs, atol=1e-5)
