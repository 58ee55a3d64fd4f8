"""Tests of the warnings about soft-label settings measured to distil badly."""

from __future__ import annotations

import numpy as np
import pytest

from logitcache.config import LossConfig, config_from_dict
from logitcache.pipeline.distill.advice import (
    MASS_WARNING,
    config_warnings,
    mean_topk_mass,
    topk_alpha_warning,
)
from logitcache.storage_schemas.shard_reader import CacheReader
from logitcache.storage_schemas.shard_writer import ShardWriter
from logitcache.storage_schemas.value_codecs import get_value_codec
from tests.factories import make_block, make_layout, make_template


def write_cache(path, layout, blocks):
    writer = ShardWriter(str(path), template=make_template(layout))
    for index, block in enumerate(blocks):
        writer.commit(block, unit_id=f"u{index:05d}")
    return CacheReader(str(path))


def test_mean_topk_mass_is_the_mean_over_the_cached_positions(tmp_path):
    layout = make_layout(k=4, value_codec="float32")
    blocks = [make_block(layout, records=9, seed=seed, first_record=9 * seed) for seed in range(3)]
    expected = np.concatenate([np.exp(b.topk_logprobs).sum(1) for b in blocks]).mean()
    assert mean_topk_mass(write_cache(tmp_path / "c", layout, blocks)) == pytest.approx(expected, rel=1e-6)


def test_mean_topk_mass_reads_only_about_the_positions_it_is_asked_for(tmp_path):
    layout = make_layout(k=4, value_codec="float32")
    blocks = [make_block(layout, records=9, seed=seed, first_record=9 * seed) for seed in range(3)]
    first = np.exp(blocks[0].topk_logprobs).sum(1)
    reader = write_cache(tmp_path / "c", layout, blocks)
    assert mean_topk_mass(reader, positions=1) == pytest.approx(first.mean(), rel=1e-6)


def test_a_peaked_cache_and_a_sampled_cache_have_no_mass_to_warn_about(tmp_path):
    layout = make_layout(k=4, value_codec="float16")
    block = make_block(layout, records=5)
    peaked = np.log(np.tile([0.97, 0.01, 0.005, 0.004], (len(block.topk_ids), 1))).astype(np.float32)
    block.topk_logprobs = get_value_codec("float16").encode(peaked)
    assert mean_topk_mass(write_cache(tmp_path / "peaked", layout, [block])) > MASS_WARNING
    sampled = make_layout("token_sampled")
    assert mean_topk_mass(write_cache(tmp_path / "sampled", sampled, [make_block(sampled)])) is None


@pytest.mark.parametrize(("alpha", "kind", "mass", "warned"), [
    (1.0, "token_topk", 0.54, True),
    (0.9, "token_topk", 0.30, True),
    (0.5, "token_topk", 0.30, False),   # alpha 0.5 still gained over hard labels alone
    (1.0, "token_topk", 0.95, False),   # a peaked teacher: the tail bucket is small
    (1.0, "token_topk_sampled", 0.30, False),  # tail draws carry the tail
    (1.0, "token_sampled", None, False),
    (1.0, "token_topk", None, False),   # nothing read: nothing to say
])
def test_top_k_targets_at_high_alpha_with_a_heavy_tail_are_warned_about(alpha, kind, mass, warned):
    message = topk_alpha_warning(LossConfig(alpha=alpha), kind=kind, mass=mass, where="students[s]")
    assert (message is not None) == warned
    if warned:
        assert f"students[s].loss.alpha={alpha:g}" in message
        assert f"{mass:.0%}" in message and "topk+sampled" in message and "alpha <= 0.5" in message


def job(mode, *alphas, task="causal_lm"):
    return config_from_dict({
        "cache": "c", "corpus": {"data_files": ["a.jsonl"]}, "teacher": {"model": "t", "task": task},
        "soft_labels": {"mode": mode},
        "students": [{"name": f"s{i}", "model": {"path": "p"}, "loss": {"alpha": a}} for i, a in enumerate(alphas)]})


def test_a_top_k_build_for_high_alpha_students_is_warned_about_at_config_time():
    messages = config_warnings(job("topk", 0.9, 0.5, 1.0))
    assert len(messages) == 2
    assert "students[s0].loss.alpha=0.9" in messages[0] and "students[s2].loss.alpha=1" in messages[1]
    assert all("soft_labels.mode: topk+sampled" in m and "alpha <= 0.5" in m and "(k 64)" in m for m in messages)


@pytest.mark.parametrize(("mode", "alphas", "task"), [
    ("topk+sampled", (1.0,), "causal_lm"),   # the default: tail draws carry the tail
    ("sampled", (1.0,), "causal_lm"),
    ("topk", (0.5, 0.0), "causal_lm"),
    ("topk", (1.0,), "sequence_classification"),  # class distributions are stored whole
])
def test_settings_not_measured_to_lose_get_no_config_warning(mode, alphas, task):
    assert config_warnings(job(mode, *alphas, task=task)) == []
