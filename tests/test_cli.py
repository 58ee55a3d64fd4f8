"""Tests of the click layer: version, help, inspect, verify, and the exit-code mapping."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from logitcache import __version__
from logitcache.cli import main
from logitcache.errors import ConfigError
from logitcache.storage_schemas.shard_writer import ShardWriter
from tests import fixtures_models
from tests.factories import make_block, make_layout, make_template


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def build_cache(root: Path, *, kind: str = "token_topk", units: int = 2) -> Path:
    layout = make_layout(kind, k=4)
    writer = ShardWriter(str(root), template=make_template(layout))
    for i in range(units):
        writer.commit(make_block(layout, records=6, seed=i, first_record=10 * i), unit_id=f"u{i:05d}")
    writer.update_stats(tokens_per_second=1234.5)
    return root


@pytest.fixture
def cache(tmp_path) -> Path:
    return build_cache(tmp_path / "cache")


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"logitcache {__version__}"


@pytest.mark.parametrize("command", [[], *([name] for name in main.commands)])
def test_every_command_has_help(command):
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_unknown_command_and_missing_argument_exit_2():
    assert run("no-such-command").exit_code == 2
    assert run("inspect").exit_code == 2


def test_inspect_text(cache):
    result = run("inspect", str(cache))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "token_topk" in out
    assert "float16" in out  # the value codec
    assert "bytes/token" in out
    for lang in ("en", "de", "ru", "zh", "ar", "hi"):
        assert f"\n  {lang} " in out
    assert "tail mass" in out
    assert "tokens_per_second" in out
    assert "vocab fingerprint vocab-fp-012)" in out  # the digits a refused student's error quotes
    assert "(zstd level 3)" in out


def test_inspect_json(cache):
    result = run("inspect", str(cache), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["kind"] == "token_topk"
    assert summary["layout"]["value_codec"] == "float16"
    assert summary["shards"] == 2 and summary["records"] == 12
    assert summary["bytes_per_token"] == pytest.approx(summary["bytes"] / summary["positions"], abs=1e-3)
    assert set(summary["langs"]) == {"en", "de", "ru", "zh", "ar", "hi"}
    example = summary["example"]
    assert len(example["topk_ids"]) == len(example["topk_probs"]) == 4
    assert example["tail_mass"] == pytest.approx(1 - sum(example["topk_probs"]), abs=1e-6)
    assert 0 < example["tail_mass"] < 1


@pytest.mark.parametrize("kind", ["token_topk_sampled", "sequence_probs"])
def test_inspect_other_kinds(tmp_path, kind):
    root = build_cache(tmp_path / "cache", kind=kind)
    result = run("inspect", str(root), "--json")
    assert result.exit_code == 0, result.output
    example = json.loads(result.output)["example"]
    if kind == "sequence_probs":
        assert sum(example["class_probs"]) == pytest.approx(1, abs=1e-2)
    else:
        assert len(example["sample_ids"]) == len(example["sample_counts"]) >= 1
    assert run("inspect", str(root)).exit_code == 0


def test_verify_healthy_cache(cache):
    result = run("verify", str(cache))
    assert result.exit_code == 0, result.output
    assert "OK" in result.output
    assert run("verify", str(cache), "--deep").exit_code == 0
    report = json.loads(run("verify", str(cache), "--json").output)
    assert report["ok"] is True and report["shards_checked"] == 2


def test_verify_flipped_byte_exits_1_and_names_the_shard(cache):
    shard = json.loads((cache / "manifest.json").read_text())["shards"][0]["path"]
    target = cache / shard
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    result = run("verify", str(cache))
    assert result.exit_code == 1
    assert shard in result.output
    assert "sha256" in result.output
    as_json = run("verify", str(cache), "--json")
    assert as_json.exit_code == 1
    assert json.loads(as_json.output)["problems"][0]["path"] == shard


def test_verify_unlisted_file_is_a_warning(cache):
    (cache / "_incomplete" / "part-u00007.parquet").write_bytes(b"partial")
    result = run("verify", str(cache))
    assert result.exit_code == 0
    assert "_incomplete/part-u00007.parquet" in result.output
    assert "warning" in result.output


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory, corpus_dir, tiny_causal_lm_dir) -> Path:
    """A cache built by stage one from a tiny teacher: top-8 float32 log-probs, two shards."""
    from logitcache.stages.build_cache import build_cache as stage_one
    from tests.stages.test_build_cache import job

    root = tmp_path_factory.mktemp("fidelity") / "cache"
    stage_one(job(root, corpus_dir, tiny_causal_lm_dir, corpus={"unit_documents": 25}), progress=False)
    return root


def test_verify_fidelity_exits_0_with_the_caches_teacher_and_1_with_another(teacher_cache, tmp_path,
                                                                           tiny_causal_lm_dir):
    from tests.stages.test_audit_fidelity import perturbed_copy

    fidelity = ("verify", str(teacher_cache), "--fidelity", "2", "--device", "cpu", "--no-progress")
    result = run(*fidelity)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK ") and "top-k agree" in result.output and "fidelity ok" in result.output
    data = json.loads(run(*fidelity, "--json").output)
    assert data["ok"] and data["shards_checked"] == 2 and data["fidelity"]["ok"]
    assert data["fidelity"]["records"] == 14 and len(data["fidelity"]["languages"]) == 7
    assert {"records", "positions", "topk_agreement", "max_abs_error", "mean_abs_error", "bound",
            "ok"} <= set(data["fidelity"]["languages"][0])

    other = str(perturbed_copy(tiny_causal_lm_dir, tmp_path / "perturbed"))
    as_json = run(*fidelity, "--teacher", other, "--json")
    assert as_json.exit_code == 1
    data = json.loads(as_json.output)["fidelity"]
    assert not data["ok"] and len(data["failed_languages"]) == 7 and data["weights_match"] is False
    record = data["bad_records"][0]
    assert {"record_id", "lang", "doc_key", "shard", "problems"} == set(record)
    text = run(*fidelity, "--teacher", other)
    assert text.exit_code == 1 and "fidelity FAILED" in text.output and f"record {record['record_id']}" in text.output


def test_verify_fidelity_options_without_it_and_a_teacher_of_another_vocabulary_exit_2(teacher_cache, tmp_path):
    result = run("verify", str(teacher_cache), "--teacher", "models/x")
    assert result.exit_code == 2 and "--teacher goes with --fidelity N" in result.output
    assert run("verify", str(teacher_cache), "--seed", "0").exit_code == 2
    tokenizer = fixtures_models.build_tiny_tokenizer(tmp_path / "tok", vocab_size=300)
    other = fixtures_models.build_tiny_causal_lm(tmp_path / "other", tokenizer)
    result = run("verify", str(teacher_cache), "--fidelity", "1", "--teacher", str(other), "--no-progress")
    assert result.exit_code == 2
    assert "error: teacher" in result.output and "is not the one the cache was built with" in result.output


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_not_a_cache_exits_2(tmp_path, command):
    result = run(command, str(tmp_path))
    assert result.exit_code == 2
    assert "error:" in result.output
    assert "not a logitcache cache" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_newer_format_version_says_upgrade(cache, command):
    data = json.loads((cache / "manifest.json").read_text())
    data["format_version"] = "9.0"
    (cache / "manifest.json").write_text(json.dumps(data))
    result = run(command, str(cache))
    assert result.exit_code == 2
    assert "9.0" in result.output and "upgrade" in result.output


def test_error_mapping_uses_the_exit_code_of_the_error():
    """Later commands get the same mapping for free: any LogitcacheError becomes its code."""

    @main.command("boom-for-test")
    def boom() -> None:
        raise ConfigError("students[0].loss.alpha: must be <= 1")

    try:
        result = run("boom-for-test")
    finally:
        main.commands.pop("boom-for-test")
    assert result.exit_code == 2
    assert result.output.strip() == "error: students[0].loss.alpha: must be <= 1"
    assert isinstance(result.exception, SystemExit)
    assert isinstance(main, click.Group)


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_under_json_an_error_is_a_json_object_on_stdout(tmp_path, command):
    result = CliRunner().invoke(main, [command, str(tmp_path), "--json"])
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "CacheFormatError" and error["exit_code"] == 2
    assert "not a logitcache cache" in error["message"]
    missing = CliRunner().invoke(main, [command, "--json"])  # a usage error after --json is known
    assert missing.exit_code == 2 and json.loads(missing.stdout)["error"]["type"] == "UsageError"


def test_under_json_a_build_with_failed_units_prints_its_summary(tmp_path, monkeypatch):
    from logitcache.stages import build_cache as build_stage

    def failing_build(cfg, **kwargs):
        summary = build_stage.BuildSummary(cache=cfg.cache, units_built=3,
                                           failed_units={"ab12-00004": "data/x.jsonl rows 40-49: teacher OOM"})
        raise build_stage.BuildIncompleteError(summary)

    monkeypatch.setattr(build_stage, "build_cache", failing_build)
    config = tmp_path / "job.yaml"
    config.write_text(f"cache: {tmp_path / 'cache'}\ncorpus: {{data_files: [x.jsonl]}}\nteacher: {{model: t}}\n")
    result = CliRunner().invoke(main, ["build", str(config), "--json", "--no-progress"])
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["error"]["type"] == "BuildIncompleteError" and "ab12-00004" in out["error"]["message"]
    assert out["summary"]["failed_units"] == {"ab12-00004": "data/x.jsonl rows 40-49: teacher OOM"}
    assert out["summary"]["units_built"] == 3


def test_inspect_a_corrupt_cache_still_summarises(cache):
    for shard in json.loads((cache / "manifest.json").read_text())["shards"]:
        (cache / shard["path"]).write_bytes(b"garbage")
    result = run("inspect", str(cache))
    assert result.exit_code == 0, result.output
    assert "token_topk" in result.output and "logitcache verify" in result.output
    summary = json.loads(run("inspect", str(cache), "--json").output)
    assert summary["example"] is None and "cannot be decoded" in summary["example_error"]


def test_every_command_has_help_and_a_line_in_the_readme():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    runner = CliRunner()
    for name in main.commands:
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, name
        assert f"| `logitcache {name}" in readme, f"README's command table lacks {name}"


@pytest.mark.parametrize("command", [["build", "job.yaml"], ["run"]])
def test_stage_one_refuses_to_run_once_per_torchrun_rank(command, tmp_path):
    result = CliRunner().invoke(main, command, env={"WORLD_SIZE": "2"})
    assert result.exit_code == 2
    assert "runs as one process (WORLD_SIZE is 2" in result.output and "executor.kind: dask" in result.output


def test_run_prints_its_whole_config_and_runs_nothing(tmp_path, monkeypatch):
    import yaml

    from logitcache.config import config_from_dict, config_to_dict
    from logitcache.stages.run_job import default_job

    monkeypatch.chdir(tmp_path)
    result = run("run", "--print-config", "--set", "train.steps=7")
    assert result.exit_code == 0, result.output
    printed = config_from_dict(yaml.safe_load(result.output))
    assert printed.train.steps == 7 and [s.name for s in printed.students] == [s["name"] for s in
                                                                                 default_job()["students"]]
    assert config_to_dict(printed)["soft_labels"] == config_to_dict(config_from_dict(default_job()))["soft_labels"]
    assert not (tmp_path / "runs").exists()


def test_logitcache_warnings_print_as_one_line_and_others_as_python_prints_them():
    import warnings

    from logitcache import cli
    from logitcache.stages import train_students

    ours = cli.format_warning("students[s].loss.alpha=1 on a top-k cache", UserWarning, train_students.__file__, 9)
    assert ours == "warning: students[s].loss.alpha=1 on a top-k cache\n"
    theirs = cli.format_warning("deprecated", UserWarning, warnings.__file__, 3)
    assert theirs.startswith(warnings.__file__) and "UserWarning: deprecated" in theirs
    assert cli.format_warning("old", DeprecationWarning, train_students.__file__, 9).startswith(train_students.__file__)
