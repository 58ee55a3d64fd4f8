"""verify --fidelity: the stored labels against a fresh forward of the teacher, on tiny teachers."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from logitcache.config import TeacherConfig
from logitcache.errors import IncompatibleCacheError
from logitcache.pipeline.capture.teacher import load_teacher
from logitcache.stages import audit_fidelity as audit_module
from logitcache.stages.audit_fidelity import DTYPE_TOLERANCE, audit_fidelity, sample_records
from logitcache.stages.build_cache import build_cache
from logitcache.storage_schemas.records import RecordBlock
from logitcache.storage_schemas.shard_reader import CacheReader
from logitcache.storage_schemas.shard_writer import ShardWriter
from logitcache.storage_schemas.verify import verify_cache
from tests import fixtures_models
from tests.stages.test_build_cache import job

LANGS = {"en", "de", "es", "ru", "zh", "ar", "hi"}


def perturbed_copy(model_dir: Path, out_dir: Path, *, scale: float = 0.02, seed: int = 1) -> Path:
    """The model of ``model_dir`` with every weight moved by N(0, scale), saved with save_pretrained."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    config = AutoConfig.from_pretrained(model_dir)
    classifier = any(arch.endswith("ForSequenceClassification") for arch in config.architectures or ())
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    model = auto.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(torch.randn(weight.shape, generator=generator) * scale)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    return out_dir


def audit(cache, **options):
    return audit_fidelity(str(cache), records_per_lang=options.pop("records_per_lang", 3), device="cpu",
                          progress=False, **options)


def rewrite_shards(cache: Path, edit) -> list[int]:
    """Rewrite every shard of ``cache`` with ``edit(block)`` applied, through the shard writer
    (so the manifest's sha256 and bytes are the new ones); the record ids ``edit`` returns."""
    reader = CacheReader(str(cache))
    writer = ShardWriter(str(cache), template=reader.manifest)
    edited = []
    for entry in list(reader.shards):
        block = reader.read_shard(entry)
        edited += edit(block)
        writer.forget_units({entry.unit_id})
        writer.commit(block, unit_id=entry.unit_id, stats=entry.stats)
    return edited


@pytest.fixture(scope="module")
def hybrid_cache(tmp_path_factory, corpus_dir, tiny_causal_lm_dir) -> Path:
    """The default soft labels (top-8 q8 head, 16 tail draws, entropy, target log-probs)."""
    root = tmp_path_factory.mktemp("fidelity") / "cache"
    build_cache(job(root, corpus_dir, tiny_causal_lm_dir, soft_labels={"mode": "topk+sampled", "k": 8,
                                                                      "samples": 16, "values": "q8"}),
                progress=False)
    return root


@pytest.fixture(scope="module")
def perturbed_teacher(tmp_path_factory, tiny_causal_lm_dir) -> Path:
    return perturbed_copy(tiny_causal_lm_dir, tmp_path_factory.mktemp("perturbed"))


def test_a_cache_checked_against_its_own_teacher_passes(hybrid_cache):
    report = audit(hybrid_cache)
    assert report.ok, report.to_text()
    assert {lang.lang for lang in report.languages} == LANGS
    assert report.weights_match is True and report.dtype == report.built_dtype == "float32"
    assert report.tolerance == DTYPE_TOLERANCE["float32"] and not report.bad_records
    for lang in report.languages:
        assert lang.records == 3 and lang.topk_agreement == 1.0
        assert set(lang.columns) == {"topk_logprobs", "topk_ids", "entropy", "target_logprob"}
        assert lang.labels.max_abs_error <= 1 / 32 + 1e-4  # q8 rounding, nothing more
        assert lang.draws.ok is not False
    assert any(lang.draws.ok for lang in report.languages)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] and data["records"] == 21 and data["languages"][0]["bound"] == pytest.approx(1 / 32 + 1e-4)
    text = report.to_text()
    assert "top-k agree" in text and "fidelity ok" in text


def test_a_perturbed_copy_of_the_teacher_fails_and_names_the_records(hybrid_cache, perturbed_teacher):
    report = audit(hybrid_cache, teacher=str(perturbed_teacher))
    assert not report.ok and report.weights_match is False
    assert set(report.failed_languages) == LANGS
    assert len(report.bad_records) == 21  # every sampled record is off
    bad = report.bad_records[0]
    assert bad.lang in LANGS and bad.shard.startswith("shards/part-")
    assert any(problem.startswith("top-k log-probs: ") and "beyond their bound" in problem for problem in bad.problems)
    assert "fidelity FAILED" in report.to_text() and f"record {bad.record_id}" in report.to_text()


def test_a_shard_edited_and_hashed_again_passes_verify_but_fails_fidelity(hybrid_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(hybrid_cache, cache)

    def shift_two_records(block: RecordBlock) -> list[int]:
        labels = block.label_offsets
        values = block.topk_logprobs.copy()
        for r in (0, 2):  # three q8 levels (0.19 nats) lower, where there is room
            rows = slice(labels[r], labels[r + 1])
            values[rows] = np.minimum(values[rows].astype(np.int64) + 3, 255).astype(np.uint8)
        block.topk_logprobs = values
        return [int(block.record_id[0]), int(block.record_id[2])]

    edited = set(rewrite_shards(cache, shift_two_records))
    assert verify_cache(str(cache), deep=True).ok
    report = audit(cache, records_per_lang=1000)  # every record
    assert not report.ok
    assert {bad.record_id for bad in report.bad_records} == edited
    assert all("top-k log-probs" in " ".join(bad.problems) for bad in report.bad_records)


def test_a_bf16_teacher_passes_within_its_tolerance_and_fails_clearly_below_it(hybrid_cache):
    report = audit(hybrid_cache, dtype="bfloat16")
    assert report.dtype == "bfloat16" and report.built_dtype == "float32"
    assert report.tolerance == DTYPE_TOLERANCE["bfloat16"]
    assert report.ok, report.to_text()
    tight = audit(hybrid_cache, dtype="bfloat16", tolerance=1e-4)
    assert not tight.ok and tight.bad_records
    assert "beyond their bound" in tight.to_text() and "tolerance 0.0001 nats" in tight.to_text()


def test_a_teacher_of_another_vocabulary_is_refused_before_any_forward(hybrid_cache, tmp_path, monkeypatch):
    tokenizer = fixtures_models.build_tiny_tokenizer(tmp_path / "tok", vocab_size=300)
    other = fixtures_models.build_tiny_causal_lm(tmp_path / "other", tokenizer)

    def no_forward(*args, **kwargs):
        raise AssertionError("the teacher ran")

    monkeypatch.setattr(audit_module, "label_windows", no_forward)
    with pytest.raises(IncompatibleCacheError, match="is not the one the cache was built with"):
        audit(hybrid_cache, teacher=str(other))


def test_records_are_sampled_per_language_deterministically(hybrid_cache):
    reader = CacheReader(str(hybrid_cache))
    first, shards = sample_records(reader, per_lang=2, seed=0)
    again, _ = sample_records(reader, per_lang=2, seed=0)
    other, _ = sample_records(reader, per_lang=2, seed=1)
    assert first.record_id.tolist() == again.record_id.tolist() != other.record_id.tolist()
    assert sorted(first.lang.tolist()) == sorted([lang for lang in LANGS for _ in range(2)])
    assert len(shards) == 14 and all(path.startswith("shards/") for path in shards)
    everything, _ = sample_records(reader, per_lang=1000, seed=0)  # fewer than 1000: all of them
    assert everything.num_records == reader.manifest.total_records
    assert sample_records(reader, per_lang=2, seed=0, skip=[e.path for e in reader.shards]) == (None, [])


def test_draws_from_the_teacher_pass_and_draws_off_its_distribution_fail(tmp_path, corpus_dir, tiny_causal_lm_dir):
    cache = tmp_path / "cache"
    build_cache(job(cache, corpus_dir, tiny_causal_lm_dir, soft_labels={"mode": "sampled", "samples": 16,
                                                                       "entropy": True}), progress=False)
    report = audit(cache, records_per_lang=6)
    assert report.ok, report.to_text()
    assert all(lang.topk_agreement is None and lang.labels is None for lang in report.languages)
    judged = [lang.draws for lang in report.languages if lang.draws.ok is not None]
    assert judged and all(draws.positions >= 30 and abs(draws.mean_gap) <= draws.allowed for draws in judged)

    teacher = load_teacher(TeacherConfig(model=str(tiny_causal_lm_dir), dtype="float32", device="cpu"))

    def least_likely_draws(block: RecordBlock) -> list[int]:
        """Every position's draws all on the id the teacher finds least likely there."""
        worst = []
        for r in range(block.num_records):
            ids = torch.from_numpy(block.input_ids[block.token_offsets[r]:block.token_offsets[r + 1]].astype(np.int64))
            logits = teacher.logits(ids[None], torch.ones_like(ids)[None])[0, int(block.context_length[r]):]
            worst.append(logits.argmin(dim=-1).numpy())
        worst = np.concatenate(worst)
        block.sample_offsets = np.arange(len(worst) + 1, dtype=np.int64)
        block.sample_ids = worst.astype(block.sample_ids.dtype)
        block.sample_counts = np.full(len(worst), 16, dtype=np.uint16)
        return []

    rewrite_shards(cache, least_likely_draws)
    assert verify_cache(str(cache), deep=True).ok
    report = audit(cache, records_per_lang=6)
    assert not report.ok and not report.bad_records  # the other columns are intact
    off = [lang for lang in report.languages if lang.draws.ok is False]
    assert off and all(lang.draws.mean_gap < -lang.draws.allowed for lang in off)
    assert set(report.failed_languages) == {lang.lang for lang in off}
    assert "draws off the teacher's distribution" in report.to_text()


def test_a_classifier_cache_passes_with_its_teacher_and_fails_with_a_perturbed_one(tmp_path, corpus_dir,
                                                                                  tiny_classifier_dir):
    cache = tmp_path / "cache"
    build_cache(job(cache, corpus_dir, tiny_classifier_dir, teacher={"task": "sequence_classification"},
                    corpus={"label_column": "label"}, soft_labels={"values": "float16"}), progress=False)
    report = audit(cache)
    assert report.ok, report.to_text()
    assert report.kind == "sequence_probs" and {lang.lang for lang in report.languages} == LANGS
    assert all(set(lang.columns) == {"class_logprobs"} and lang.positions == lang.records for lang in report.languages)
    perturbed = perturbed_copy(tiny_classifier_dir, tmp_path / "perturbed", scale=0.05)
    report = audit(cache, teacher=str(perturbed))
    assert not report.ok and report.bad_records
    assert all(problem.startswith("class log-probs: ") for bad in report.bad_records for problem in bad.problems)
