"""Every job config in examples/ loads and validates, names its command, and has the sections it needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from logitcache.config import load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_the_examples_are_there() -> None:
    names = {path.name for path in EXAMPLES}
    assert {"tiny.yaml", "hub_causal_lm_gpu.yaml", "cross_lingual_sentiment.yaml", "sampled_kd.yaml"} <= names
    readme = (ROOT / "examples" / "README.md").read_text(encoding="utf-8")
    missing = [name for name in sorted(names) if name not in readme]
    assert not missing, f"examples/README.md has no line for {missing}"


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_loads_and_names_its_command(path: Path) -> None:
    relative = path.relative_to(ROOT).as_posix()
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#"), f"{relative}: the first line must be a comment giving the command that runs it"
    assert "logitcache " in first and relative in first, (
        f"{relative}: the first line must give the command that runs it, e.g. '# logitcache run {relative}'; got {first!r}")
    cfg = load_config(path)  # validates every field: unknown keys, types, choices, bounds
    cfg.require_build_sections()
    cfg.require_train_sections()


def test_sampled_example_uses_only_what_a_sampled_cache_supports() -> None:
    cfg = load_config(ROOT / "examples" / "sampled_kd.yaml")
    assert cfg.soft_labels.mode == "sampled"
    assert all(s.loss.kind == "forward_kl" and s.loss.temperature == 1.0 for s in cfg.students)
