"""`logitcache eval`: students of several configs, pretrained models and one report to compare them."""

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from logitcache.cli import main
from logitcache.config import config_from_dict
from logitcache.stages.build_cache import build_cache
from logitcache.stages.train_students import train_students
from logitcache.storage_schemas.summary import summarize_cache
from tests import fixtures_models
from tests.pipeline.distill.test_report import table
from tests.stages.test_train_students import STUDENT, job_data

EVAL = ["--no-progress", "--set", "eval.max_records=6"]


def student(name, alpha=0.5):
    return {"name": name, "model": {"config": STUDENT}, "loss": {"kind": "forward_kl", "alpha": alpha},
            "optimizer": {"lr": 3e-3}}


def write_job(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, corpus_dir, tiny_causal_lm_dir):
    """Two configs over two caches of one corpus and teacher, a top-k and a sampled one, whose
    students are trained; both have a student called 'kd'."""
    root = tmp_path_factory.mktemp("jobs")
    topk = job_data(root / "topk-cache", corpus_dir, tiny_causal_lm_dir, root / "topk-out",
                    students=[student("kd"), student("ce", alpha=0.0)], train={"steps": 2})
    sampled = job_data(root / "sampled-cache", corpus_dir, tiny_causal_lm_dir, root / "sampled-out",
                       soft_labels={"mode": "sampled", "samples": 16}, students=[student("kd", alpha=1.0)],
                       train={"steps": 2})
    for data in (topk, sampled):
        cfg = config_from_dict(data)
        build_cache(cfg, progress=False)
        train_students(cfg, progress=False)
    return {"root": root, "topk": write_job(root / "topk.yaml", topk),
            "sampled": write_job(root / "sampled.yaml", sampled), "data": topk}


def invoke(*args):
    return CliRunner().invoke(main, ["eval", *map(str, args), *EVAL])


def test_one_config_writes_what_it_wrote_before(jobs):
    out = jobs["root"] / "topk-out"
    result = invoke(jobs["topk"], "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data["students"]) == {"kd", "ce"}  # no config prefix for a single config
    assert data["report"] == str(out / "report" / "report.md")
    for name in ("kd", "ce"):
        written = json.loads((out / name / "eval.json").read_text())
        assert written["metrics"] == data["students"][name]["metrics"]
        assert written["source"] == "trained" and written["trained_from"]["path"] == str(jobs["root"] / "topk-cache")
        assert written["info"]["loss"] == "forward_kl"
    assert not (out / "report" / "eval.json").exists()  # the combined result is for several sources
    text = (out / "report" / "report.md").read_text()
    results = table(text, "Results (token)")
    assert [row["student"] for row in results] == ["kd", "ce", "*teacher*"]  # the cache holds the teacher's CE
    assert results[1]["ΔCE vs CE-only"] == "+0.000"
    assert float(results[2]["CE"]) == pytest.approx(data["students"]["kd"]["metrics"]["all"]["teacher_ce"], abs=1e-3)
    plain = invoke(jobs["topk"])
    assert plain.exit_code == 0 and "kd: " in plain.output and f"report: {out / 'report' / 'report.md'}" in plain.output


def test_students_of_two_caches_are_evaluated_on_the_first_ones_records_in_one_table(jobs, tmp_path):
    root = jobs["root"]
    before = (root / "sampled-out" / "kd" / "eval.json").read_text()
    result = invoke(jobs["topk"], jobs["sampled"], "--json", "--report", tmp_path / "report")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    students = data["students"]
    # 'kd' is in both configs: named after its config; 'ce' is not
    assert list(students) == ["topk/kd", "ce", "sampled/kd"]
    assert data["evaluated_on"]["path"] == str(root / "topk-cache")
    assert len({s["records"] for s in students.values()}) == 1 and students["ce"]["records"] > 0
    topk, sampled = students["topk/kd"]["trained_from"], students["sampled/kd"]["trained_from"]
    assert (topk["path"], topk["kind"], topk["k"]) == (str(root / "topk-cache"), "token_topk", 8)
    assert (sampled["path"], sampled["kind"], sampled["samples"]) == (str(root / "sampled-cache"), "token_sampled", 16)
    for cache in (topk, sampled):  # as `logitcache inspect` gives it
        assert cache["bytes_per_token"] == pytest.approx(summarize_cache(cache["path"])["bytes_per_token"], abs=1e-3)
    assert students["sampled/kd"]["config"] == str(jobs["sampled"])
    # two students trained differently give different metrics on the same records
    assert students["topk/kd"]["metrics"]["all"]["ce"] != students["sampled/kd"]["metrics"]["all"]["ce"]
    # the sampled config's own evaluation (on its own cache) is left as it was
    assert (root / "sampled-out" / "kd" / "eval.json").read_text() == before
    combined = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert list(combined["students"]) == list(students)
    rows = table((tmp_path / "report" / "report.md").read_text(), "Results (token)")
    assert [(r["student"], r["cache"], r["labels"]) for r in rows] == [
        ("topk/kd", "C1", "top-k 8"), ("ce", "C1", "top-k 8"), ("sampled/kd", "C2", "16 samples"),
        ("*teacher*", "–", "–")]
    assert all(r["source"] == "trained" for r in rows[:-1])


def test_a_cache_of_another_tokenizer_is_refused_naming_both(jobs, tmp_path, corpus_dir):
    tokenizer = fixtures_models.build_tiny_tokenizer(tmp_path / "tok", vocab_size=300)
    teacher = fixtures_models.build_tiny_causal_lm(tmp_path / "teacher", tokenizer)
    data = job_data(tmp_path / "other-cache", corpus_dir, teacher, tmp_path / "other-out",
                    students=[student("kd")])
    build_cache(config_from_dict(data), progress=False)
    result = invoke(jobs["topk"], write_job(tmp_path / "other.yaml", data))
    assert result.exit_code == 2, result.output
    message = result.output
    assert "error:" in message and str(tmp_path / "other-cache") in message
    assert str(jobs["root"] / "topk-cache") in message
    assert "tokenizer.vocab_fingerprint" in message and "tokenizer.vocab_size: 400 -> 300" in message
    # and a model of that tokenizer given with --model is refused as any such student is
    result = invoke(jobs["topk"], "--model", f"other={teacher}")
    assert result.exit_code == 2 and "is not the one the cache was built with" in result.output


def test_a_student_with_model_path_is_evaluated_untrained_and_one_without_is_an_error(jobs, tmp_path,
                                                                                      tiny_causal_lm_dir):
    data = dict(jobs["data"], train={**jobs["data"]["train"], "output": str(tmp_path / "out")},
                students=[{"name": "pretrained", "model": {"path": str(tiny_causal_lm_dir)}}])
    result = invoke(write_job(tmp_path / "pre.yaml", data), "--json")
    assert result.exit_code == 0, result.output
    entry = json.loads(result.output)["students"]["pretrained"]
    assert entry["source"] == "model.path" and entry["path"] == str(tiny_causal_lm_dir)
    assert entry["trained_from"] is None and set(entry["info"]) == {"parameters", "model_type"}
    # the teacher itself, as it is: its own labels back (KL near 0, the same top-1)
    overall = entry["metrics"]["all"]
    assert overall["positions"] > 0 and overall["kl"] < 0.01 and overall["top1"] > 0.99
    assert (tmp_path / "out" / "pretrained" / "eval.json").is_file()
    row = table((tmp_path / "out" / "report" / "report.md").read_text(), "Results (token)")[0]
    assert row["source"] == "model.path: not trained here" and row["cache"] == "–"

    data["students"].append(student("never-trained"))
    result = invoke(write_job(tmp_path / "pre.yaml", data))
    assert result.exit_code == 2
    assert "students[never-trained]: no trained model at" in result.output
    assert "run `logitcache train`" in result.output and "model.path" in result.output


def test_models_given_with_the_model_option_join_the_table(jobs, tmp_path, tiny_causal_lm_dir,
                                                          tiny_causal_lm_padded_dir):
    result = invoke(jobs["topk"], "--model", f"teacher-copy={tiny_causal_lm_dir}", "--model",
                    tiny_causal_lm_padded_dir, "--model", f"kd={tiny_causal_lm_dir}", "--json",
                    "--report", tmp_path)
    assert result.exit_code == 0, result.output
    students = json.loads(result.output)["students"]
    padded = Path(tiny_causal_lm_padded_dir).name
    # a --model NAME that a config's student has too is named after where it comes from
    assert list(students) == ["topk/kd", "ce", "teacher-copy", padded, "model/kd"]
    for label in ("teacher-copy", padded, "model/kd"):
        assert students[label]["source"] == "--model" and students[label]["config"] is None
        assert students[label]["metrics"]["all"]["ce"] > 0
    for label in ("teacher-copy", "model/kd"):  # the teacher's own weights: its own top-1 back
        assert students[label]["metrics"]["all"]["top1"] > 0.99
    assert students[padded]["metrics"]["all"]["top1"] < 0.5  # other (random) weights with padding rows
    assert students[padded]["path"] == str(tiny_causal_lm_padded_dir)
    rows = table((tmp_path / "report.md").read_text(), "Results (token)")
    assert [r["source"] for r in rows] == ["trained", "trained", *["--model: not trained here"] * 3, "teacher"]
    for lang, values in students["teacher-copy"]["metrics"].items():  # the teacher as a student: its own CE
        assert values["ce"] == pytest.approx(values["teacher_ce"], abs=2e-3), lang
    # --model alone needs a config for the cache, and any students it has join in
    result = CliRunner().invoke(main, ["eval", "--model", str(tiny_causal_lm_dir)])
    assert result.exit_code == 2 and "Missing argument" in result.output
