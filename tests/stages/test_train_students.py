"""Stage two end to end: tiny caches built by stage one, tiny students trained from them."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from logitcache.cli import main
from logitcache.config import config_from_dict
from logitcache.errors import ConfigError, StudentError
from logitcache.stages.build_cache import build_cache
from logitcache.stages.train_students import train_students
from logitcache.storage_schemas.shard_reader import CacheReader
from tests import fixtures_models

STUDENT = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}


def job_data(cache, corpus_dir, teacher_model, output, **sections):
    data = {
        "cache": str(cache),
        "corpus": {"data_files": [str(Path(corpus_dir) / "*.jsonl")], "lang_column": "lang", "id_column": "id",
                   "unit_documents": 10},
        "teacher": {"model": str(teacher_model), "batch_tokens": 400},
        "windows": {"max_length": 48},
        "soft_labels": {"mode": "topk", "k": 8, "values": "float16"},
        "storage": {"row_group_tokens": 200},
        "students": [
            {"name": "fkl", "model": {"config": STUDENT},
             "loss": {"kind": "forward_kl", "alpha": 0.7, "chunk_tokens": 64}, "optimizer": {"lr": 3e-3}},
            {"name": "rkl", "model": {"config": STUDENT}, "grad_accum": 2,
             "loss": {"kind": "reverse_kl", "temperature": 2.0, "tail": "renormalize"}, "optimizer": {"lr": 3e-3}},
        ],
        "train": {"steps": 8, "batch_tokens": 192, "output": str(output), "seed": 1, "shuffle_buffer": 64},
        "eval": {"held_out_fraction": 0.2},
    }
    for name, values in sections.items():
        data[name] = values if isinstance(values, list) else {**data.get(name, {}), **values}
    return data


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, corpus_dir, tiny_causal_lm_dir):
    root = tmp_path_factory.mktemp("topk")
    cfg = config_from_dict(job_data(root / "cache", corpus_dir, tiny_causal_lm_dir, root / "unused"))
    build_cache(cfg, progress=False)
    return root / "cache"


def test_many_students_train_in_one_pass_and_are_evaluated(tmp_path, topk_cache, corpus_dir, tiny_causal_lm_dir,
                                                          capsys):
    cfg = config_from_dict(job_data(topk_cache, corpus_dir, tiny_causal_lm_dir, tmp_path / "out"))
    summary = train_students(cfg, progress=True)
    bars = capsys.readouterr().err
    for name in ("fkl", "rkl"):  # a progress bar per student, run to its last step
        assert re.search(rf"{name}: 100%.*\b8/8\b", bars), bars[-2000:]
    out = tmp_path / "out"
    assert summary.students["fkl"]["steps"] == 8 and summary.students["rkl"]["steps"] == 8
    # rkl accumulates 2 batches per step, so it read twice the tokens fkl read
    assert summary.students["rkl"]["tokens"] > 1.5 * summary.students["fkl"]["tokens"]
    for name in ("fkl", "rkl"):
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        train_rows = [r for r in rows if "loss" in r]
        assert [r["step"] for r in train_rows] == list(range(1, 9))
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows)
        assert any("eval_ce" in r for r in rows)
        assert (out / name / "final" / "config.json").is_file()
        result = json.loads((out / name / "eval.json").read_text())
        langs = set(result["metrics"]) - {"all"}
        assert langs and langs <= {"en", "de", "es", "ru", "zh", "ar", "hi"}
        overall = result["metrics"]["all"]
        assert overall["positions"] > 0 and overall["ce"] > 0 and overall["kl"] >= 0 and 0 <= overall["top1"] <= 1
    report = Path(summary.report)
    text = report.read_text()
    assert "fkl" in text and "rkl" in text and "held-out" in text
    # how much each student trained on, side by side (rkl read twice fkl's tokens in its 8 steps)
    settings = text[text.index("## Students"):].splitlines()
    header = next(line for line in settings if line.startswith("| student | kind"))
    assert "| batch_tokens | grad_accum |" in header and header.endswith("| steps | tokens |")
    for name in ("fkl", "rkl"):
        row = next(line for line in settings if line.startswith(f"| {name} |"))
        assert row.endswith(f"| shared | {2 if name == 'rkl' else 1} | – | 8 | {summary.students[name]['tokens']:,} |")
    assert (report.parent / "loss_curves.png").is_file() and (report.parent / "per_language.png").is_file()


def test_kd_loss_goes_down(tmp_path, topk_cache, corpus_dir, tiny_causal_lm_dir):
    data = job_data(topk_cache, corpus_dir, tiny_causal_lm_dir, tmp_path / "out",
                    train={"steps": 40, "eval_every": 0})
    data["students"] = data["students"][:1]
    data["students"][0]["loss"]["alpha"] = 1.0
    train_students(config_from_dict(data), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "out" / "fkl" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in rows if "kd" in r]
    assert sum(kd[-5:]) / 5 < 0.8 * sum(kd[:5]) / 5


def final_weights(output: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(output / name / "final" / "model.safetensors")


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 2])
def test_an_interrupted_run_resumes_exactly(tmp_path, topk_cache, corpus_dir, tiny_causal_lm_dir, monkeypatch,
                                            workers):
    # with workers, the batches come from one lane per worker in turn; the resumed run must
    # take up the turn where the checkpoint left it, not at the first worker again
    train = {"save_every": 3, "num_workers": workers, "shuffle_buffer": 16}
    straight = config_from_dict(job_data(topk_cache, corpus_dir, tiny_causal_lm_dir, tmp_path / "a", train=train))
    from logitcache.pipeline.distill.dataset import CacheDataset

    assert CacheDataset(topk_cache, shuffle_buffer=16)._num_windows >= 2 * max(workers, 1)
    train_students(straight, progress=False)

    resumed = config_from_dict(job_data(topk_cache, corpus_dir, tiny_causal_lm_dir, tmp_path / "b", train=train))
    from logitcache.pipeline.distill import training

    calls = {"n": 0}
    original = training.StudentRun.train_on

    def dying(self, batch):
        calls["n"] += 1
        if calls["n"] == 11:  # the 6th batch: a checkpoint was saved after batch 3 (an odd turn)
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(training.StudentRun, "train_on", dying)
    with pytest.raises(KeyboardInterrupt):
        train_students(resumed, progress=False)
    monkeypatch.setattr(training.StudentRun, "train_on", original)
    summary = train_students(resumed, progress=False)
    assert summary.resumed_from == 3
    for name in ("fkl", "rkl"):
        a, b = final_weights(tmp_path / "a", name), final_weights(tmp_path / "b", name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def training_rows(output: Path, name: str) -> list[dict]:
    rows = [json.loads(line) for line in (output / name / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_a_students_batches_are_pieces_of_the_shared_batch(tmp_path, topk_cache, corpus_dir, tiny_causal_lm_dir):
    # shared batches of 192 tokens are 4 rows of 48; students of batch_tokens 96 take them as two
    # micro-batches of 2 rows, which (packing is greedy, in stream order) are exactly the batches
    # of a run whose shared batch is 96 tokens: the same steps, logs and weights, bit for bit
    train = {"eval_every": 3}
    pieces = job_data(topk_cache, corpus_dir, tiny_causal_lm_dir, tmp_path / "pieces", train=train)
    pieces["students"] = [dict(s, batch_tokens=96) for s in pieces["students"]]
    whole = job_data(topk_cache, corpus_dir, tiny_causal_lm_dir, tmp_path / "whole",
                     train={**train, "batch_tokens": 96})
    a = train_students(config_from_dict(pieces), progress=False)
    b = train_students(config_from_dict(whole), progress=False)
    assert (a.batches, b.batches) == (8, 16)  # rkl (2 micro-batches a step) needs 16 of 96 tokens
    for name in ("fkl", "rkl"):
        assert a.students[name]["steps"] == 8 and a.students[name]["tokens"] == b.students[name]["tokens"]
        assert training_rows(tmp_path / "pieces", name) == training_rows(tmp_path / "whole", name)
        x, y = final_weights(tmp_path / "pieces", name), final_weights(tmp_path / "whole", name)
        assert all(torch.equal(x[k], y[k]) for k in x), name


def test_micro_batches_that_do_not_divide_the_shared_batch_are_refused(tmp_path, topk_cache, corpus_dir,
                                                                      tiny_causal_lm_dir):
    data = job_data(topk_cache, corpus_dir, tiny_causal_lm_dir, tmp_path / "out")
    data["students"][1]["batch_tokens"] = 144  # 3 rows of 48 against the shared batch's 4
    with pytest.raises(ConfigError, match=r"students\[1\]\.batch_tokens: 144 .* 3 row\(s\) .* 4 rows .* 48, 96"):
        train_students(config_from_dict(data), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_run_killed_between_micro_batches_resumes_exactly(tmp_path, topk_cache, corpus_dir, tiny_causal_lm_dir,
                                                            monkeypatch):
    # micro-batches of 1 row, 4 per shared batch, 3 per step: steps end inside shared batches,
    # and every checkpoint (after each shared batch) holds a part of a step
    def job(output):
        data = job_data(topk_cache, corpus_dir, tiny_causal_lm_dir, output, train={"save_every": 1, "steps": 6})
        data["students"] = [dict(data["students"][0], batch_tokens=48, grad_accum=3)]
        return config_from_dict(data)

    train_students(job(tmp_path / "a"), progress=False)
    from logitcache.pipeline.distill import training

    calls = {"n": 0}
    original = training.StudentRun.train_on

    def dying(self, batch):
        calls["n"] += 1
        if calls["n"] == 11:  # the third micro-batch of shared batch 3
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(training.StudentRun, "train_on", dying)
    with pytest.raises(KeyboardInterrupt):
        train_students(job(tmp_path / "b"), progress=False)
    monkeypatch.setattr(training.StudentRun, "train_on", original)
    summary = train_students(job(tmp_path / "b"), progress=False)
    assert summary.resumed_from == 2
    assert training_rows(tmp_path / "a", "fkl") == training_rows(tmp_path / "b", "fkl")
    a, b = final_weights(tmp_path / "a", "fkl"), final_weights(tmp_path / "b", "fkl")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_each_batch_is_read_once_for_all_students(tmp_path, topk_cache, corpus_dir, tiny_causal_lm_dir, monkeypatch):
    reads = {"n": 0}
    original = CacheReader.read_block

    def counting(self, entry, index):
        reads["n"] += 1
        return original(self, entry, index)

    monkeypatch.setattr(CacheReader, "read_block", counting)
    counts = []
    for students in (1, 2):
        data = job_data(topk_cache, corpus_dir, tiny_causal_lm_dir, tmp_path / f"o{students}",
                        train={"steps": 6}, eval={"held_out_fraction": 0.2})
        data["students"] = [dict(data["students"][0], name=f"s{i}") for i in range(students)]
        reads["n"] = 0
        train_students(config_from_dict(data), progress=False)
        counts.append(reads["n"])
    assert counts[0] == counts[1] > 0


def test_incompatible_students_are_refused_before_training(tmp_path, topk_cache, corpus_dir, tiny_causal_lm_dir):
    other_tok = fixtures_models.build_tiny_tokenizer(tmp_path / "tok", vocab_size=300)
    data = job_data(topk_cache, corpus_dir, tiny_causal_lm_dir, tmp_path / "out")
    data["students"][1]["tokenizer"] = str(other_tok)
    with pytest.raises(StudentError, match="not the one the cache was built with"):
        train_students(config_from_dict(data), progress=False)
    assert not (tmp_path / "out" / "fkl" / "metrics.jsonl").exists()


def test_sampled_caches_take_only_their_estimator(tmp_path, corpus_dir, tiny_causal_lm_dir):
    data = job_data(tmp_path / "cache", corpus_dir, tiny_causal_lm_dir, tmp_path / "out",
                    soft_labels={"mode": "sampled", "samples": 16})
    build_cache(config_from_dict(data), progress=False)
    with pytest.raises(ConfigError, match=r"students\[1\]\.loss"):
        train_students(config_from_dict(data), progress=False)
    data["students"] = [data["students"][0]]
    data["train"]["steps"] = 3
    summary = train_students(config_from_dict(data), progress=False)
    assert summary.students["fkl"]["steps"] == 3
    assert (summary.students["fkl"]["eval"]["metrics"]["all"]["ce"] or 0) > 0


def test_cli_train_then_eval(tmp_path, topk_cache, corpus_dir, tiny_causal_lm_dir):
    data = job_data(topk_cache, corpus_dir, tiny_causal_lm_dir, tmp_path / "out", train={"steps": 3})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    runner = CliRunner()
    result = runner.invoke(main, ["train", str(path), "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["students"]["fkl"]["steps"] == 3
    result = runner.invoke(main, ["eval", str(path), "--no-progress", "--set", "eval.max_records=5"])
    assert result.exit_code == 0, result.output
    assert "fkl:" in result.output and "report:" in result.output
    result = runner.invoke(main, ["train", str(path), "--set", "students.0.tokenizer=/nowhere"])
    assert result.exit_code == 2 and "error:" in result.output


def parallel_corpus(root: Path) -> Path:
    """The tiny corpus plus a 'text_xx' column: the same documents, 'translated' (reversed words)."""
    docs = []
    for doc in fixtures_models.multilingual_texts():
        docs.append({**doc, "text_xx": " ".join(reversed(doc["text"].split()))})
    return fixtures_models.write_corpus(root, docs)


def test_cross_lingual_classification_student_reads_its_own_column(tmp_path, tiny_classifier_dir):
    corpus = parallel_corpus(tmp_path / "corpus")
    student_tok = fixtures_models.build_tiny_tokenizer(
        tmp_path / "student_tok", vocab_size=300,
        texts=[" ".join(reversed(d["text"].split())) for d in fixtures_models.multilingual_texts()])
    data = job_data(tmp_path / "cache", corpus, tiny_classifier_dir, tmp_path / "out",
                    teacher={"model": str(tiny_classifier_dir), "task": "sequence_classification",
                             "batch_tokens": 400},
                    students=[
                        {"name": "same", "model": {"config": STUDENT}, "loss": {"kind": "jsd", "alpha": 0.5}},
                        {"name": "xx", "model": {"config": STUDENT}, "tokenizer": str(student_tok),
                         "text_column": "text_xx", "loss": {"kind": "forward_kl", "alpha": 0.5}},
                    ])
    data["corpus"]["label_column"] = "label"
    build_cache(config_from_dict(data), progress=False)
    summary = train_students(config_from_dict(data), progress=False)
    for name in ("same", "xx"):
        overall = summary.students[name]["eval"]["metrics"]["all"]
        assert overall["records"] > 0 and overall["labelled"] > 0
        assert 0 <= overall["accuracy"] <= 1 and 0 <= overall["agreement"] <= 1
    assert summary.students["xx"].get("records_without_text", 0) == 0
    final = tmp_path / "out" / "xx" / "final"
    assert (final / "tokenizer.json").is_file()  # the student's own tokenizer travels with it


def test_an_empty_training_split_is_an_error_not_a_hang(tmp_path, topk_cache, corpus_dir, tiny_causal_lm_dir):
    data = job_data(topk_cache, corpus_dir, tiny_causal_lm_dir, tmp_path / "out",
                    train={"languages": ["en"]}, eval={"held_out_fraction": 0.999})
    with pytest.raises(StudentError, match="held out|ran dry|empty"):
        train_students(config_from_dict(data), progress=False)


def test_batches_are_pinned_on_a_gpu_unless_turned_off_and_never_on_the_cpu():
    from logitcache.stages.train_students import pins_memory

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert pins_memory(None, gpu) and pins_memory(True, gpu) and not pins_memory(False, gpu)
    assert not any(pins_memory(setting, cpu) for setting in (None, True, False))


def test_a_student_is_evaluated_in_micro_batches_of_its_size_with_the_same_results(tmp_path, topk_cache, corpus_dir,
                                                                                  tiny_causal_lm_dir, monkeypatch):
    from logitcache.pipeline.distill.students import build_student
    from logitcache.stages import evaluate

    data = job_data(topk_cache, corpus_dir, tiny_causal_lm_dir, tmp_path / "out")
    cfg = config_from_dict(data)
    manifest = CacheReader(topk_cache).manifest
    whole = build_student(cfg.students[0], manifest=manifest, device=torch.device("cpu"), seed=0)
    # the same name: the same initial weights
    pieces = build_student(dataclasses.replace(cfg.students[0], batch_tokens=48), manifest=manifest,
                           device=torch.device("cpu"), seed=0)
    seen = {"whole": [], "pieces": []}
    original = evaluate._token_eval

    def recording(student, batch, metrics):
        seen["pieces" if student is pieces else "whole"].append(batch.input_ids.shape[0])
        return original(student, batch, metrics)

    monkeypatch.setattr(evaluate, "_token_eval", recording)
    results = evaluate.evaluate_students(cfg, {"whole": whole, "pieces": pieces}, progress=False)
    assert set(seen["whole"]) == {4} and set(seen["pieces"]) == {1}  # rows of 48 tokens
    a, b = results["whole"]["metrics"], results["pieces"]["metrics"]
    assert a.keys() == b.keys()
    for lang in a:
        for key, value in a[lang].items():
            assert b[lang][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (lang, key)


def test_resuming_with_other_students_settings_or_steps_is_refused_naming_what_changed(tmp_path, topk_cache,
                                                                                      corpus_dir, tiny_causal_lm_dir):
    def job(**changes):
        data = job_data(topk_cache, corpus_dir, tiny_causal_lm_dir, tmp_path / "out", train={"steps": 3})
        data["students"][0]["loss"]["alpha"] = changes.pop("alpha", 0.7)
        if changes.pop("one_student", False):
            data["students"] = data["students"][:1]
        data["train"].update(changes)
        return config_from_dict(data)

    train_students(job(), progress=False)
    with pytest.raises(StudentError, match=r"config of fkl changed .*\(students\[fkl\]: loss\.alpha: 0\.7 -> 0\.3\); resume"):
        train_students(job(alpha=0.3), progress=False)
    with pytest.raises(StudentError, match=r"holds students \['fkl', 'rkl'\], the config lists \['fkl'\]"):
        train_students(job(one_student=True), progress=False)
    with pytest.raises(StudentError, match=r"train\.steps was 3 .* now 5; .*\(model\.path: <output>/<student>/final"):
        train_students(job(steps=5), progress=False)
    assert train_students(job(), progress=False).resumed_from  # the same job resumes (and is done)
    assert train_students(job(steps=5), resume=False, progress=False).students["fkl"]["steps"] == 5


def test_a_run_says_where_it_resumes_from_and_what_its_evaluations_give(tmp_path, topk_cache, corpus_dir,
                                                                        tiny_causal_lm_dir, capsys, monkeypatch):
    from logitcache.stages.train_students import interrupted_message

    data = job_data(topk_cache, corpus_dir, tiny_causal_lm_dir, tmp_path / "out",
                    train={"steps": 3, "save_every": 2, "eval_every": 2})
    cfg = config_from_dict(data)
    assert re.fullmatch(r"interrupted before the first checkpoint \(they are saved every 2 batches\); .* afresh",
                        interrupted_message(cfg))
    train_students(cfg, progress=True)
    err = capsys.readouterr().err
    assert re.search(r"fkl step 2: held-out ce \d", err) and re.search(r"rkl step 2: held-out ce \d", err)
    expected = r"\(batch 6: fkl at step 3, rkl at step 3\)"
    assert re.search(r"newest checkpoint is \S+step-000000006 " + expected + "; run the same command again",
                     interrupted_message(cfg))
    train_students(cfg, progress=True)
    assert re.search(r"resuming from \S+step-000000006 " + expected, capsys.readouterr().err)

    import logitcache.stages.train_students as stage

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "train_students", interrupted)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["train", str(path), "--no-progress"])
    assert result.exit_code == 130 and "run the same command again to resume" in result.output


def test_a_student_at_high_alpha_on_a_heavy_tailed_top_k_cache_is_warned_about(tmp_path, topk_cache, corpus_dir,
                                                                                tiny_causal_lm_dir):
    data = job_data(topk_cache, corpus_dir, tiny_causal_lm_dir, tmp_path / "out", train={"steps": 1})
    data["students"][0]["loss"]["alpha"] = 1.0  # the tiny random teacher's top 8 hold little of its mass
    with pytest.warns(UserWarning, match=r"students\[fkl\]\.loss\.alpha=1 on a top-k cache") as caught:
        train_students(config_from_dict(data), progress=False)
    assert not any("students[rkl]" in str(w.message) for w in caught)  # alpha 0.5: no warning
