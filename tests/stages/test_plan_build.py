"""``logitcache plan``: what a build would do, checked against what the build then does."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from logitcache.cli import main
from logitcache.config import config_to_dict
from logitcache.stages.build_cache import build_cache
from logitcache.stages.plan_build import NOTHING_TO_DO_EXIT, plan_build
from tests import fixtures_models
from tests.stages.test_build_cache import job


@pytest.fixture
def corpus(tmp_path, multilingual_texts):
    return fixtures_models.write_corpus(tmp_path / "corpus", multilingual_texts[:24], parts=1)


def append(corpus, docs) -> None:
    with open(corpus / "part-0.jsonl", "a", encoding="utf-8") as stream:
        stream.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)


def write_config(tmp_path, cfg) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg), allow_unicode=True), encoding="utf-8")
    return str(path)


def test_a_plan_lists_what_the_build_then_does(tmp_path, corpus, multilingual_texts, tiny_causal_lm_dir):
    cfg = job(tmp_path / "cache", corpus, tiny_causal_lm_dir)
    fresh = plan_build(cfg, progress=False)
    assert (fresh.status, fresh.exit_code, len(fresh.to_build), fresh.estimate) == ("build", 0, 3, None)
    assert fresh.documents_to_build == 24 and "no estimate" in fresh.to_text()
    first = build_cache(cfg, progress=False)

    up_to_date = plan_build(cfg, progress=False)
    assert (up_to_date.status, up_to_date.exit_code, up_to_date.units_skipped) == ("up_to_date", NOTHING_TO_DO_EXIT, 3)
    assert "nothing to do" in up_to_date.to_text()

    append(corpus, multilingual_texts[24:40])
    grown = plan_build(cfg, progress=False)
    planned = [(u["unit_id"], u["first_row"], u["num_rows"], u["appended_to"]) for u in grown.to_build]
    unit_two = planned[0][3]
    assert planned[0][1:] == (24, 6, unit_two) and planned[1][1:] == (30, 10, None)
    assert grown.to_dict()["units_appended"] == 1 and grown.units_skipped == 2
    estimate = grown.estimate
    built = build_cache(cfg, progress=False)
    assert built.units_built == 2 and built.units_appended == 1
    assert 0.6 * built.tokens <= estimate.tokens <= 1.6 * built.tokens  # same languages, similar lengths
    assert estimate.bytes > 0 and estimate.seconds is not None and "tokens per byte" in estimate.basis
    assert first.tokens > 0


def test_a_plan_names_changed_units_and_other_configs_without_building(tmp_path, corpus, multilingual_texts,
                                                                        tiny_causal_lm_dir):
    cfg = job(tmp_path / "cache", corpus, tiny_causal_lm_dir)
    build_cache(cfg, progress=False)
    other = job(tmp_path / "cache", corpus, tiny_causal_lm_dir, soft_labels={"k": 4})
    refused = plan_build(other, progress=False)
    assert refused.exit_code == 1 and any("soft_labels.k" in d for d in refused.config_differences)

    edited = list(multilingual_texts[:24])
    edited[3] = {**edited[3], "text": "changed text"}
    edited[13] = {**edited[13], "text": "changed again"}
    fixtures_models.write_corpus(corpus, edited, parts=1)
    changed = plan_build(cfg, progress=False)
    assert changed.status == "refuse" and len(changed.refused) == 2 and changed.units_skipped == 1
    assert all("changed" in unit["reason"] for unit in changed.refused)


def test_plan_command_exit_codes_and_json(tmp_path, corpus, tiny_causal_lm_dir):
    config = write_config(tmp_path, job(tmp_path / "cache", corpus, tiny_causal_lm_dir))
    runner = CliRunner()
    result = runner.invoke(main, ["plan", config, "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["units_to_build"] == 3
    assert runner.invoke(main, ["build", config, "--no-progress"]).exit_code == 0
    again = runner.invoke(main, ["plan", config, "--no-progress"])
    assert again.exit_code == NOTHING_TO_DO_EXIT and "nothing to do" in again.output
    bad = runner.invoke(main, ["plan", config, "--json", "--set", "soft_labels.k=0"])
    assert bad.exit_code == 2
    assert json.loads(bad.output)["error"]["type"] == "ConfigError"
