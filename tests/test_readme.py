"""Every code block of README.md holds: the Python runs, the YAML is a valid job, the commands exist.

The Python blocks run in order in one namespace, as a reader would paste them, in a
directory whose ``runs/cache`` is a cache built by stage one from a tiny teacher with the
default soft labels (a top-k head and tail draws), so each recipe meets real shards.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml

from logitcache.cli import main
from logitcache.config import config_from_dict
from logitcache.stages.build_cache import build_cache
from logitcache.storage_schemas.records import sample_draw_rows
from logitcache.storage_schemas.shard_reader import CacheReader
from tests.readme_snippets import code_blocks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default_cache(tmp_path_factory, corpus_dir, tiny_causal_lm_dir) -> Path:
    """A cache of the default soft labels (mode topk+sampled), two shards, small row groups."""
    root = tmp_path_factory.mktemp("readme") / "cache"
    cfg = config_from_dict({
        "cache": str(root),
        "corpus": {"data_files": [str(Path(corpus_dir) / "*.jsonl")], "lang_column": "lang", "id_column": "id",
                   "unit_documents": 25},
        "teacher": {"model": str(tiny_causal_lm_dir), "batch_tokens": 400},
        "windows": {"max_length": 48, "stride": 8},
        "storage": {"row_group_tokens": 300},
    })
    assert cfg.soft_labels.mode == "topk+sampled"
    build_cache(cfg, progress=False)
    return root


def test_the_readme_has_the_blocks_these_tests_check():
    assert len(code_blocks("python")) >= 5
    assert len(code_blocks("yaml")) >= 3
    assert len(code_blocks("bash")) >= 4


def test_python_blocks_run_in_order(tmp_path, monkeypatch, default_cache, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "cache").symlink_to(default_cache, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    after: list[dict] = []  # what each block left, since later blocks reuse names
    for number, block in enumerate(code_blocks("python")):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as exc:  # name the block: the traceback's line numbers are the block's
            raise AssertionError(f"README.md python block {number} failed: {exc!r}\n{block}") from exc
        after.append(dict(namespace))

    # the decoding recipe (block 0) read record 0 of the first shard as logitcache reads it
    reader = CacheReader(str(default_cache))
    record = reader.read_shard(reader.shards[0]).take_records(0, 1)
    recipe, engines = after[0], after[1]
    np.testing.assert_array_equal(recipe["ids"], record.topk_ids)
    np.testing.assert_array_equal(recipe["logprobs"], record.decoded_topk_logprobs(reader.layout))
    draws, drawn = sample_draw_rows(record, reader.layout.samples)
    assert draws.shape[0] > 0
    np.testing.assert_array_equal(recipe["draws"], draws)
    np.testing.assert_array_equal(recipe["drawn"], np.flatnonzero(drawn))
    best = record.decoded_topk_logprobs(reader.layout).max(axis=1)
    np.testing.assert_array_equal(record.decoded_topk_logprobs(reader.layout)[
        np.arange(len(best)), (record.topk_ids == recipe["top1"][:, None]).argmax(axis=1)], best)
    np.testing.assert_array_equal(engines["ids"], record.topk_ids)  # from DuckDB's bytes
    # the pandas / DuckDB / polars block printed tokens per language
    out = capsys.readouterr().out
    assert "tokens" in out and "lang" in out
    # the repack block wrote a verified copy, and the stage-two block read the training split
    assert CacheReader("runs/cache-lz4").manifest.storage["compression"] == "lz4"
    assert namespace["state"]  # the reader's resume state
    assert namespace["trainer"].state.global_step == 2  # the Trainer block trained its steps


@pytest.mark.parametrize("number", range(len(code_blocks("yaml"))))
def test_yaml_blocks_are_valid_jobs(number):
    data = yaml.safe_load(code_blocks("yaml")[number])
    cfg = config_from_dict(data)  # unknown keys, types, choices and bounds are errors
    first_line = code_blocks("yaml")[number].splitlines()[0]
    if first_line.startswith("# logitcache build"):
        cfg.require_build_sections()
    if first_line.startswith("# logitcache train"):
        cfg.require_train_sections()


def command_lines() -> list[list[str]]:
    """Each ``logitcache ...`` command of the bash blocks, as argv after the program name."""
    lines = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words and words[0].endswith("logitcache"):
                    lines.append(words[1:])
    return lines


def test_bash_blocks_scripts_exist():
    scripts = [word for block in code_blocks("bash") for line in block.splitlines()
               for word in shlex.split(line, comments=True) if word.endswith((".sh", "/run"))]
    assert "scripts/install.sh" in scripts and ".ci/run" in scripts
    for script in scripts:
        assert (ROOT / script).is_file(), script


@pytest.mark.parametrize("argv", command_lines(), ids=lambda argv: " ".join(argv))
def test_bash_blocks_commands_and_options_exist(argv):
    if not argv:
        return
    assert argv[0] in main.commands, f"README runs `logitcache {argv[0]}`, which is no command"
    command = main.commands[argv[0]]
    known = {opt.split("=")[0] for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for word in argv[1:]:
        if word.startswith("--"):
            assert word.split("=")[0] in known, f"`logitcache {argv[0]}` has no option {word}"
    context = command.make_context(argv[0], [w for w in argv[1:]], resilient_parsing=True)
    assert context.command is command
