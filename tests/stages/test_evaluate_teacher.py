"""`logitcache eval` beside the teacher: its own held-out CE, and KL estimated on sampled caches."""

from dataclasses import replace

import numpy as np
import pytest

from logitcache.config import config_from_dict
from logitcache.pipeline.distill.dataset import CacheDataset
from logitcache.stages import build_cache as build_module
from logitcache.stages.build_cache import build_cache
from logitcache.stages.evaluate import evaluate_configs
from tests import fixtures_models
from tests.pipeline.distill.test_report import table
from tests.stages.test_train_students import job_data


def cache_job(root, name, corpus_dir, teacher, **soft_labels):
    data = job_data(root / f"{name}-cache", corpus_dir, teacher, root / f"{name}-out",
                    soft_labels={"values": "float32", **soft_labels}, students=[])
    return config_from_dict(data)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, corpus_dir, tiny_causal_lm_dir, tiny_tokenizer_dir):
    """One corpus and teacher: a top-k cache with k = V (dense), a sampled cache with entropy,
    and another student model (another seed) to evaluate on both."""
    root = tmp_path_factory.mktemp("teacher-eval")
    dense = cache_job(root, "dense", corpus_dir, tiny_causal_lm_dir, mode="topk", k=400)
    sampled = cache_job(root, "sampled", corpus_dir, tiny_causal_lm_dir, mode="sampled", samples=64, entropy=True)
    for cfg in (dense, sampled):
        build_cache(cfg, progress=False)
    other = fixtures_models.build_tiny_causal_lm(root / "other", tiny_tokenizer_dir, seed=7)
    return {"root": root, "dense": dense, "sampled": sampled, "other": str(other)}


def evaluate(cfg, model, report):
    return evaluate_configs([("job.yaml", cfg)], models=[("other", model)], report=str(report), progress=False)


def test_estimated_kl_of_a_sampled_cache_is_close_to_the_exact_kl_of_a_dense_cache(caches, tmp_path):
    exact = evaluate(caches["dense"], caches["other"], tmp_path / "dense").students["other"]
    estimate = evaluate(caches["sampled"], caches["other"], tmp_path / "sampled").students["other"]
    assert exact["kl_estimated"] is False and estimate["kl_estimated"] is True and estimate["top1_estimated"] is True
    kl, est = exact["metrics"]["all"]["kl"], estimate["metrics"]["all"]["kl"]
    assert kl > 0.05  # the two models differ, so "close" means something
    assert est == pytest.approx(kl, abs=0.1 * kl)
    assert estimate["metrics"]["all"]["ce"] == pytest.approx(exact["metrics"]["all"]["ce"], rel=1e-6)
    results = table((tmp_path / "sampled" / "report.md").read_text(), "Results (token)")
    assert "KL (est.)" in results[0] and "top-1 % (est.)" in results[0]


def test_the_teachers_ce_per_language_is_the_mean_of_minus_target_logprob_on_held_out_positions(caches, tmp_path):
    cfg = caches["sampled"]
    result = evaluate(cfg, caches["other"], tmp_path).students["other"]
    held_out = CacheDataset(cfg.cache, seed=cfg.train.seed, epochs=1, shuffle_buffer=0, split="eval",
                            held_out_fraction=cfg.eval.held_out_fraction, rank=0, world_size=1)
    sums, counts = {}, {}
    for record in held_out:
        values = record.target_logprob.astype(np.float64)
        values = values[np.isfinite(values)]
        sums[record.lang] = sums.get(record.lang, 0.0) - values.sum()
        counts[record.lang] = counts.get(record.lang, 0) + values.size
    assert set(counts) == set(result["metrics"]) - {"all"}
    for lang, n in counts.items():
        assert result["metrics"][lang]["teacher_ce"] == pytest.approx(sums[lang] / n, rel=1e-5)
        assert result["metrics"][lang]["teacher_ppl"] == pytest.approx(np.exp(sums[lang] / n), rel=1e-5)
    overall = sum(sums.values()) / sum(counts.values())
    assert result["metrics"]["all"]["teacher_ce"] == pytest.approx(overall, rel=1e-5)
    assert result["teacher"]["ce"] == "stored"


def test_a_cache_without_the_column_says_not_stored(caches, tmp_path, monkeypatch):
    plain = build_module.record_layout
    monkeypatch.setattr(build_module, "record_layout", lambda cfg, t: replace(plain(cfg, t), target_logprob=False))
    cfg = cache_job(tmp_path, "old", caches["dense"].corpus.data_files[0].rsplit("/", 1)[0],
                    caches["dense"].teacher.model, mode="sampled", samples=4, entropy=False)
    build_cache(cfg, progress=False)
    result = evaluate(cfg, caches["other"], tmp_path / "report").students["other"]
    assert result["teacher"]["ce"] == "not stored" and "teacher_ce" not in result["metrics"]["all"]
    assert result["metrics"]["all"]["kl"] is None and "soft_labels.entropy: true" in result["metric_kinds"]["note"]
    text = (tmp_path / "report" / "report.md").read_text()
    teacher = table(text, "Results (token)")[-1]
    assert teacher["student"] == "*teacher*" and teacher["CE"] == "not stored" and teacher["PPL"] == "not stored"
    assert "KL unavailable" in text
