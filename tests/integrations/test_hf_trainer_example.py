"""examples/train_with_hf_trainer.py as a user runs it: alone, and as two processes under
torchrun (gloo, CPU) that read disjoint parts of the cache and resume from a checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from logitcache.config import config_from_dict
from logitcache.integrations.transformers import READER_STATE_FILE
from logitcache.stages.build_cache import build_cache
from tests.stages.test_train_students import STUDENT, job_data

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "train_with_hf_trainer.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, corpus_dir, tiny_causal_lm_dir):
    root = tmp_path_factory.mktemp("example")
    build_cache(config_from_dict(job_data(root / "cache", corpus_dir, tiny_causal_lm_dir, root / "unused",
                                          soft_labels={"mode": "topk+sampled", "k": 4, "samples": 8})), progress=False)
    (root / "student.json").write_text(json.dumps(STUDENT), encoding="utf-8")
    return root


def run(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        "--monitor-interval=0.2"]
    result = subprocess.run([*launcher, str(EXAMPLE), *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def summary_of(result: subprocess.CompletedProcess) -> dict:
    """The example's JSON summary line (under torchrun the other rank's output may follow it)."""
    for line in reversed(result.stdout.strip().splitlines()):
        if line.startswith('{"steps"'):
            return json.loads(line)
    raise AssertionError(f"no summary line in the output:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def test_the_example_trains_and_saves_a_student(cache, tmp_path):
    out = tmp_path / "out"
    result = run(str(cache / "cache"), str(out), "--steps", "3", "--batch-tokens", "96",
                 "--student", str(cache / "student.json"))
    summary = summary_of(result)
    assert summary["steps"] == 3 and summary["kd"] is not None and summary["kd"] >= 0
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.hidden_size == STUDENT["hidden_size"]


def test_the_example_under_torchrun_reads_one_part_per_process_and_resumes(cache, tmp_path):
    out = tmp_path / "ddp"
    common = [str(cache / "cache"), str(out), "--batch-tokens", "96", "--student", str(cache / "student.json"),
              "--save-steps", "2", "--shuffle-buffer", "16"]
    run(*common, "--steps", "2", processes=2)
    state = json.loads((out / "checkpoint-2" / READER_STATE_FILE).read_text())
    assert state["coverage"] == [0, 1]  # both processes' progress, merged
    assert state["items"]["world_size"] == 2 and set(state["items"]["ranks"]) == {"0", "1"}
    resumed = summary_of(run(*common, "--steps", "4", "--resume", processes=2))
    assert resumed["steps"] == 4
    assert (out / "checkpoint-4" / READER_STATE_FILE).is_file() and (out / "final" / "config.json").is_file()


def test_the_own_loop_example_trains(cache):
    result = subprocess.run([sys.executable, str(REPO / "examples" / "own_training_loop.py"), str(cache / "cache"),
                             "--steps", "30", "--batch-tokens", "192"], cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(line.split()[3]) for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 30
    assert sum(losses[-5:]) < sum(losses[:5])  # it learns
