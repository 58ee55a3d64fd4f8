"""Out of device memory in stage one: a batch too large is split and retried, not fatal.

The device is simulated on the CPU: the teacher's forward, on padded or packed rows (or its
LM head, after the sampling uniforms were drawn) raises an out-of-memory error for inputs
above a size. The
build must split those batches until they fit, count the splits, and write exactly the
cache an unsplit build writes; a window that does not fit alone is a clear error.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from logitcache.cli import main
from logitcache.pipeline.capture.teacher import Teacher
from logitcache.stages.build_cache import build_cache
from logitcache.storage_schemas.shard_reader import CacheReader
from tests.reliability.test_storage_faults import _records
from tests.stages.test_build_cache import _cli_config, job

# topk+sampled in float32: every value and every draw must match, not only the top-k ids
LABELS = {"mode": "topk+sampled", "samples": 16, "values": "float32"}
ERRORS = {
    "torch": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "runtime": lambda: RuntimeError("CUDA error: out of memory"),
}


def limit(monkeypatch, *, where: str, above: int, error: str = "torch") -> list[int]:
    """Make the teacher's ``where`` raise out-of-memory for inputs of more than ``above``
    tokens (forward) or positions (head); return the sizes that did fit."""
    fitted: list[int] = []
    names = {"forward": ("hidden_states", "packed_hidden_states"), "head": ("head",)}[where]

    def guard(original):
        def guarded(self, *args):
            size = args[0].numel() if where == "forward" else args[0].shape[0]
            if size > above:
                raise ERRORS[error]()
            fitted.append(size)
            return original(self, *args)
        return guarded

    for name in names:  # padded rows and packed ones
        monkeypatch.setattr(Teacher, name, guard(getattr(Teacher, name)))
    return fitted


@pytest.fixture(scope="module")
def unsplit(tmp_path_factory, corpus_dir, tiny_causal_lm_dir):
    root = tmp_path_factory.mktemp("unsplit")
    build_cache(job(root / "cache", corpus_dir, tiny_causal_lm_dir, soft_labels=LABELS), progress=False)
    return _records(root / "cache")


@pytest.mark.parametrize(("where", "above", "error"), [("forward", 100, "torch"), ("head", 60, "runtime")])
def test_a_batch_too_large_for_the_device_is_split_and_labels_are_unchanged(
        tmp_path, monkeypatch, corpus_dir, tiny_causal_lm_dir, unsplit, where, above, error):
    fitted = limit(monkeypatch, where=where, above=above, error=error)
    cfg = job(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir, soft_labels=LABELS)
    assert cfg.teacher.batch_tokens == 400  # batches of up to 8 windows of 48 tokens
    build_cache(cfg, progress=False)
    assert fitted and max(fitted) <= above
    shards = CacheReader(str(tmp_path / "cache")).shards
    assert all(shard.stats["oom_splits"] > 0 for shard in shards), [shard.stats["oom_splits"] for shard in shards]
    assert {shard.stats["packing"] for shard in shards} == {"packed"}  # split by rows of packed windows
    assert _records(tmp_path / "cache").equals(unsplit)


def test_a_window_that_does_not_fit_alone_is_a_clear_error(tmp_path, monkeypatch, corpus_dir, tiny_causal_lm_dir):
    limit(monkeypatch, where="forward", above=30)  # windows reach 48 tokens; loading checks 16
    path = _cli_config(tmp_path, corpus_dir, tiny_causal_lm_dir)
    result = CliRunner().invoke(main, ["build", "--no-progress", str(path)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: one window of") and "does not fit" in result.output
    assert "windows.max_length" in result.output and "teacher.batch_tokens" in result.output
    assert "Traceback" not in result.output


def test_other_runtime_errors_are_not_retried(tmp_path, monkeypatch, corpus_dir, tiny_causal_lm_dir):
    calls = []

    def broken(self, *args):
        calls.append(1)
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(Teacher, "hidden_states", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        build_cache(job(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir), progress=False)
    assert len(calls) == 1
