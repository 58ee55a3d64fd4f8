"""`logitcache run`: the embedded default end to end, shrunk by --set to stay fast."""

import json
from pathlib import Path

from click.testing import CliRunner

from logitcache.cli import main
from logitcache.config import config_from_dict
from logitcache.stages.run_job import default_job

SHRINK = [
    "demo_teacher.steps=40", "demo_teacher.hidden_size=64", "demo_teacher.num_layers=2",
    "demo_teacher.vocab_size=1024", "demo_teacher.batch_size=8",
    "train.steps=6", "train.batch_tokens=1024", "eval.max_records=200",
]


def corpus_langs() -> set[str]:
    from importlib import resources

    root = resources.files("logitcache") / "data" / "demo_corpus"
    langs = set()
    for name in ("train.jsonl", "heldout.jsonl"):
        for line in (root / name).read_text(encoding="utf-8").splitlines():
            langs.add(json.loads(line)["lang"])
    return langs


def test_the_default_job_validates_and_names_the_shipped_corpus():
    cfg = config_from_dict(default_job())
    assert cfg.teacher.model == cfg.demo_teacher.output
    assert len(cfg.students) >= 3 and any(s.loss.alpha == 0 for s in cfg.students)
    sizes = {s.model.config["hidden_size"] for s in cfg.students}
    assert len(sizes) >= 2
    assert Path(cfg.corpus.data_files[0]).parent.is_dir()


def test_run_with_no_config_goes_end_to_end_and_reuses_everything_the_second_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["run", "--no-progress"] + [item for pair in (("--set", s) for s in SHRINK) for item in pair]
    runner = CliRunner()
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "demo teacher: trained" in first.output and "DEMO teacher" in first.output
    report = tmp_path / "runs" / "demo" / "students" / "report" / "report.md"
    text = report.read_text(encoding="utf-8")
    for lang in corpus_langs():
        assert f"| {lang} |" in text or f"| {lang} " in text, lang
    for name in ("kd-small", "kd-medium", "ce-small"):
        assert name in text and name in first.output
    assert (report.parent / "per_language.png").is_file()

    second = runner.invoke(main, args)
    assert second.exit_code == 0, second.output
    assert "demo teacher: reused" in second.output
    assert "no teacher forward" in second.output
    assert "no training" in second.output
