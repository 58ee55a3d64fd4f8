"""Tests of logitcache.config: loading, validation messages, overrides, round trip, fingerprint."""

from __future__ import annotations

import pytest

from logitcache.config import (
    JobConfig,
    LossConfig,
    StudentConfig,
    WindowsConfig,
    apply_overrides,
    config_fingerprint_fields,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
)
from logitcache.errors import ConfigError
from logitcache.storage_schemas.value_codecs import value_codec_names

FULL_YAML = """\
cache: runs/tiny/cache
corpus:
  data_files: ["corpus/*.jsonl"]
  text_column: text
  lang_column: lang
  id_column: id
teacher:
  model: tiny-teacher
  task: causal_lm
  dtype: auto
windows: {max_length: 128, stride: 16}
soft_labels:
  mode: topk+sampled
  k: 32
  samples: 20
  values: float32
storage: {backend: zarr, compression_level: 5}
executor: {kind: dask, address: "tcp://127.0.0.1:8786"}
students:
  - name: small
    model: {config: {model_type: llama, hidden_size: 64}}
    loss: {kind: jsd, temperature: 2, alpha: 1, beta: 0.25, tail: renormalize}
    optimizer: {lr: 3e-4, weight_decay: 0.1, betas: [0.9, 0.99]}
  - name: pretrained
    model: {path: some/model}
train: {steps: 10, batch_tokens: 256, output: runs/tiny/students, languages: [en, de], lang_alpha: 0.3}
eval: {held_out_fraction: 0.1, max_records: 5}
"""


def minimal(**sections):
    """The smallest valid build+train config, with some sections replaced."""
    data = {
        "cache": "cache",
        "corpus": {"data_files": ["a.jsonl"]},
        "teacher": {"model": "t"},
        "students": [{"name": "s", "model": {"path": "p"}}],
    }
    data.update(sections)
    return data


def write(tmp_path, text, name="job.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_full_yaml_loads_with_types_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path, FULL_YAML))
    assert cfg.cache == "runs/tiny/cache"
    assert cfg.corpus.data_files == ["corpus/*.jsonl"] and cfg.corpus.split == "train"
    assert cfg.corpus.on_bad_document == "error" and cfg.corpus.unit_documents == 1000
    assert cfg.teacher.batch_tokens == 16384 and cfg.teacher.trust_remote_code is False
    assert (cfg.windows.max_length, cfg.windows.stride) == (128, 16)
    assert (cfg.soft_labels.mode, cfg.soft_labels.k, cfg.soft_labels.values) == ("topk+sampled", 32, "float32")
    assert cfg.soft_labels.entropy is True  # unset: on in the sampled modes
    assert cfg.storage.backend == "zarr" and cfg.storage.compression == "zstd"
    assert cfg.storage.row_group_tokens == 262144 and cfg.storage.compression_level == 5
    assert cfg.executor.address == "tcp://127.0.0.1:8786" and cfg.executor.retries == 2
    small, pretrained = cfg.students
    assert isinstance(small, StudentConfig) and isinstance(small.loss, LossConfig)
    assert small.model.config == {"model_type": "llama", "hidden_size": 64}
    # ints are accepted for floats and become floats; 3e-4 (a string in YAML 1.1) is a number
    assert small.loss.temperature == 2.0 and isinstance(small.loss.temperature, float)
    assert small.loss.alpha == 1.0 and isinstance(small.loss.alpha, float)
    assert small.optimizer.lr == pytest.approx(3e-4) and small.optimizer.betas == [0.9, 0.99]
    assert pretrained.model.path == "some/model" and pretrained.model.config is None
    assert pretrained.loss == LossConfig() and pretrained.grad_accum == 1
    assert pretrained.optimizer.schedule == "cosine" and pretrained.optimizer.betas == [0.9, 0.95]
    assert cfg.train.languages == ["en", "de"] and cfg.train.lang_alpha == 0.3
    assert cfg.train.eval_every == 0 and cfg.train.device == "auto"
    assert cfg.eval.max_records == 5 and cfg.eval.report is None


def test_train_only_config_needs_no_corpus_or_teacher():
    cfg = config_from_dict({"cache": "c", "students": [{"name": "s", "model": {"path": "p"}}]})
    assert cfg.corpus is None and cfg.teacher is None
    cfg.require_train_sections()
    with pytest.raises(ConfigError, match=r"^corpus: required for `logitcache build`"):
        cfg.require_build_sections()
    with pytest.raises(ConfigError, match=r"^teacher: required for `logitcache build`"):
        config_from_dict({"cache": "c", "corpus": {"name": "ds"}}).require_build_sections()
    with pytest.raises(ConfigError, match=r"^students: at least one student"):
        config_from_dict({"cache": "c"}).require_train_sections()


def test_data_files_accepts_a_single_string():
    cfg = config_from_dict(minimal(corpus={"data_files": "one.jsonl"}))
    assert cfg.corpus.data_files == ["one.jsonl"]


def student(**fields):
    return [{"name": "s", "model": {"path": "p"}, **fields}]


INVALID = [
    # (config, expected pieces of the message)
    (minimal(corpus={"data_files": ["a"], "unit_documents": 0}), ["corpus.unit_documents: must be >= 1, got 0"]),
    (minimal(corpus={"data_files": ["a"], "on_bad_document": "ignore"}), ["corpus.on_bad_document: must be one of error, skip, got 'ignore'"]),
    (minimal(corpus={"data_files": ["a"], "name": "ds"}), ["corpus:", "corpus.data_files", "corpus.name", "got both"]),
    (minimal(corpus={"data_files": []}), ["corpus:", "corpus.data_files", "corpus.name", "got neither"]),
    (minimal(teacher={"model": "t", "task": "seq2seq"}), ["teacher.task: must be one of causal_lm, sequence_classification, got 'seq2seq'"]),
    (minimal(teacher={"model": "t", "dtype": "fp8"}), ["teacher.dtype: must be one of auto, float32, bfloat16, float16"]),
    (minimal(teacher={"model": "t", "batch_tokens": 0}), ["teacher.batch_tokens: must be >= 1, got 0"]),
    (minimal(teacher={"model": "t", "trust_remote_code": "yes"}), ["teacher.trust_remote_code: expected true or false, got 'yes'"]),
    (minimal(teacher={"task": "causal_lm"}), ["teacher.model: required field is missing"]),
    ({"corpus": {"name": "ds"}}, ["cache: required field is missing"]),
    (minimal(windows={"max_length": 1}), ["windows.max_length: must be >= 2, got 1"]),
    (minimal(windows={"max_length": 64, "stride": 64}), ["windows.stride: must be >= 0 and < windows.max_length (64), got 64"]),
    (minimal(windows={"stride": -1}), ["windows.stride", "windows.max_length", "got -1"]),
    (minimal(windows={"max_length": "abc"}), ["windows.max_length: expected an integer, got 'abc'"]),
    (minimal(windows={"max_length": True}), ["windows.max_length: expected an integer, got True"]),
    (minimal(windows={"max_length": 512.0}), ["windows.max_length: expected an integer, got 512.0"]),
    (minimal(soft_labels={"k": 0}), ["soft_labels.k: must be >= 1, got 0"]),
    (minimal(soft_labels={"samples": 0}), ["soft_labels.samples: must be >= 1, got 0"]),
    (minimal(soft_labels={"mode": "topp"}), ["soft_labels.mode: must be one of topk, sampled, topk+sampled, got 'topp'"]),
    (minimal(soft_labels={"values": "float8x"}), ["soft_labels.values: must be one of", "float32", "float16", "got 'float8x'"]),
    (minimal(storage={"backend": "hdf5"}), ["storage.backend: must be one of parquet, zarr, got 'hdf5'"]),
    (minimal(storage={"compression": "gzip"}), ["storage.compression: must be one of zstd, lz4, none, got 'gzip'"]),
    (minimal(storage={"compression_level": 23}), ["storage.compression_level: must be >= 1 and <= 22, got 23"]),
    (minimal(storage={"compression_level": 0}), ["storage.compression_level: must be >= 1 and <= 22, got 0"]),
    (minimal(storage={"row_group_tokens": 0}), ["storage.row_group_tokens: must be >= 1, got 0"]),
    (minimal(storage={"chunk_tokens": 0}), ["storage.chunk_tokens: must be >= 1, got 0"]),
    (minimal(executor={"kind": "ray"}), ["executor.kind: must be one of local, dask, got 'ray'"]),
    (minimal(executor={"kind": "dask", "n_workers": 0}), ["executor.n_workers: must be >= 1, got 0"]),
    (minimal(executor={"retries": -1}), ["executor.retries: must be >= 0, got -1"]),
    (minimal(executor={"address": "tcp://h:1"}), ["executor.address: only used with executor.kind: dask"]),
    (minimal(students=[{"name": "s", "model": {}}]), ["students[0].model:", "students[0].model.config", "students[0].model.path", "got neither"]),
    (minimal(students=[{"name": "s", "model": {"path": "p", "config": {"model_type": "llama"}}}]), ["students[0].model:", "got both"]),
    (minimal(students=[{"name": "s", "model": {"config": {"hidden_size": 8}}}]), ["students[0].model.config: must include model_type", "hidden_size"]),
    (minimal(students=[{"name": "s"}]), ["students[0].model: required field is missing"]),
    (minimal(students=[{"model": {"path": "p"}}]), ["students[0].name: required field is missing"]),
    (minimal(students=[{"name": "a/b", "model": {"path": "p"}}]), ["students[0].name: must be letters, digits", "got 'a/b'"]),
    (minimal(students=student() + student()), ["students[1].name: duplicate student name 's'"]),
    (minimal(students=student(grad_accum=0)), ["students[0].grad_accum: must be >= 1, got 0"]),
    (minimal(students=student(batch_tokens=0)), ["students[0].batch_tokens: must be >= 1, got 0"]),
    (minimal(students=student(batch_tokens=4096), train={"batch_tokens": 2048}),
     ["students[0].batch_tokens: 4096 is more than train.batch_tokens (2048)", "grad_accum"]),
    (minimal(students=student(loss={"temperature": 0})), ["students[0].loss.temperature: must be > 0, got 0.0"]),
    (minimal(students=student(loss={"kind": "kl"})), ["students[0].loss.kind: must be one of forward_kl, reverse_kl, jsd, tvd, soft_ce, got 'kl'"]),
    (minimal(students=student(loss={"alpha": 1.5})), ["students[0].loss.alpha: must be >= 0 and <= 1, got 1.5"]),
    (minimal(students=student(loss={"alpha": -0.1})), ["students[0].loss.alpha: must be >= 0 and <= 1, got -0.1"]),
    (minimal(students=student(loss={"beta": 1})), ["students[0].loss.beta: must be > 0 and < 1, got 1.0"]),
    (minimal(students=student(loss={"beta": 0})), ["students[0].loss.beta: must be > 0 and < 1, got 0.0"]),
    (minimal(students=student(loss={"tail": "drop"})), ["students[0].loss.tail: must be one of bucket, renormalize, got 'drop'"]),
    (minimal(students=student(loss={"chunk_tokens": 0})), ["students[0].loss.chunk_tokens: must be >= 1, got 0"]),
    (minimal(students=student(loss={"temperature": "hot"})), ["students[0].loss.temperature: expected a number, got 'hot'"]),
    (minimal(students=student(loss={"temperature": float("inf")})), ["students[0].loss.temperature: expected a finite number"]),
    (minimal(students=student(optimizer={"lr": 0})), ["students[0].optimizer.lr: must be > 0, got 0.0"]),
    (minimal(students=student(optimizer={"weight_decay": -1})), ["students[0].optimizer.weight_decay: must be >= 0, got -1.0"]),
    (minimal(students=student(optimizer={"betas": [0.9]})), ["students[0].optimizer.betas: expected two numbers, got [0.9]"]),
    (minimal(students=student(optimizer={"betas": [0.9, 1.0]})), ["students[0].optimizer.betas[1]: must be >= 0 and < 1, got 1.0"]),
    (minimal(students=student(optimizer={"betas": 0.9})), ["students[0].optimizer.betas: expected a list, got 0.9"]),
    (minimal(students=student(optimizer={"warmup_steps": -1})), ["students[0].optimizer.warmup_steps: must be >= 0, got -1"]),
    (minimal(students=student(optimizer={"schedule": "step"})), ["students[0].optimizer.schedule: must be one of cosine, constant, linear, got 'step'"]),
    (minimal(train={"steps": 0}), ["train.steps: must be >= 1, got 0"]),
    (minimal(train={"batch_tokens": 0}), ["train.batch_tokens: must be >= 1, got 0"]),
    (minimal(train={"eval_every": -1}), ["train.eval_every: must be >= 0, got -1"]),
    (minimal(train={"save_every": -1}), ["train.save_every: must be >= 0, got -1"]),
    (minimal(train={"num_workers": -1}), ["train.num_workers: must be >= 0, got -1"]),
    (minimal(train={"shuffle_buffer": -1}), ["train.shuffle_buffer: must be >= 0, got -1"]),
    (minimal(train={"lang_alpha": -0.1}), ["train.lang_alpha: must be >= 0 and <= 1, got -0.1"]),
    (minimal(train={"lang_alpha": 1.5}), ["train.lang_alpha: must be >= 0 and <= 1, got 1.5"]),
    (minimal(train={"lanes": 0}), ["train.lanes: must be >= 1, got 0"]),
    (minimal(train={"languages": []}), ["train.languages: must name at least one language"]),
    (minimal(train={"languages": "en"}), ["train.languages: expected a list, got 'en'"]),
    (minimal(train={"languages": ["en", 3]}), ["train.languages[1]: expected a string, got 3"]),
    (minimal(eval={"held_out_fraction": 1}), ["eval.held_out_fraction: must be >= 0 and < 1, got 1.0"]),
    (minimal(eval={"held_out_fraction": -0.1}), ["eval.held_out_fraction: must be >= 0 and < 1, got -0.1"]),
    (minimal(eval={"max_records": 0}), ["eval.max_records: must be >= 1, got 0"]),
    (minimal(cache=""), ["cache: must be a non-empty path"]),
    (minimal(windows=[1, 2]), ["windows: expected a mapping of settings, got [1, 2]"]),
]


@pytest.mark.parametrize(("data", "pieces"), INVALID, ids=[pieces[0].split(":")[0] for _, pieces in INVALID])
def test_invalid_config_names_field_and_allowed_values(data, pieces):
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    message = str(caught.value)
    assert message.startswith(pieces[0].split(":")[0] + ":") or message.startswith(pieces[0])
    for piece in pieces:
        assert piece in message


def test_codec_message_lists_the_registry():
    with pytest.raises(ConfigError) as caught:
        config_from_dict(minimal(soft_labels={"values": "float8x"}))
    assert ", ".join(value_codec_names()) in str(caught.value)


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match=r"^stride: must be >= 0 and < max_length \(8\), got 8"):
        WindowsConfig(max_length=8, stride=8)
    with pytest.raises(ConfigError, match=r"^temperature: must be > 0"):
        LossConfig(temperature=-1.0)
    assert LossConfig(temperature=2).temperature == 2.0


@pytest.mark.parametrize(
    ("section", "key", "expected"),
    [
        ("soft_labels", "kk", "soft_labels.kk: unknown key; valid keys: k, mode, samples, values, entropy, seed; did you mean 'k'?"),
        ("windows", "max_lenght", "did you mean 'max_length'?"),
        (None, "studnets", "studnets: unknown key; valid keys: cache, corpus, teacher, windows"),
    ],
)
def test_unknown_key_lists_valid_keys_and_suggests(section, key, expected):
    data = minimal()
    if section is None:
        data[key] = []
    else:
        data[section] = {key: 1}
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    assert expected in str(caught.value)
    if section is None:
        assert "did you mean 'students'?" in str(caught.value)


def test_unknown_key_far_from_all_names_has_no_suggestion():
    with pytest.raises(ConfigError) as caught:
        config_from_dict(minimal(storage={"zzzzzz": 1}))
    assert "valid keys: backend, compression" in str(caught.value)
    assert "did you mean" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("soft_labels.k=32", ["soft_labels", "k"], 32),
        ("students.0.optimizer.lr=1.5e-4", ["students", "0", "optimizer", "lr"], 1.5e-4),
        ("soft_labels.entropy=true", ["soft_labels", "entropy"], True),
        ("teacher.revision=null", ["teacher", "revision"], None),
        ("train.languages=[en, de]", ["train", "languages"], ["en", "de"]),
        ("students[1].loss.alpha=0.3", ["students", "1", "loss", "alpha"], 0.3),
        ("cache=s3://bucket/a=b", ["cache"], "s3://bucket/a=b"),
    ],
)
def test_parse_override(text, path, value):
    assert parse_override(text) == (path, value)


@pytest.mark.parametrize("text", ["nokey", "=3", "a..b=1", "a.=1"])
def test_parse_override_rejects_malformed(text):
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override(text)


def test_apply_overrides_sets_values_and_copies():
    data = minimal()
    result = apply_overrides(
        data,
        [
            "soft_labels.k=4",
            "windows.max_length=64",
            "students.0.loss.alpha=0.3",
            "train.languages=[en]",
            "soft_labels.entropy=false",
            "teacher.revision=null",
        ],
    )
    assert "soft_labels" not in data and data["students"][0] == {"name": "s", "model": {"path": "p"}}
    cfg = config_from_dict(result)
    assert cfg.soft_labels.k == 4 and cfg.windows.max_length == 64
    assert cfg.students[0].loss.alpha == 0.3 and cfg.train.languages == ["en"]
    assert cfg.soft_labels.entropy is False and cfg.teacher.revision is None


def test_override_of_unknown_key_is_reported_with_its_path():
    with pytest.raises(ConfigError, match=r"^students\[0\]\.loss\.alpah: unknown key.*did you mean 'alpha'"):
        load_config(None, ["students.0.loss.alpah=0.3"], default=minimal())


@pytest.mark.parametrize(
    ("override", "pieces"),
    [
        ("students.1.name=x", ["index 1 is out of range", "students has 1 entry"]),
        ("students.first.name=x", ["students is a list", "'first'"]),
        ("cache.sub=x", ["cache is 'cache', not a mapping"]),
    ],
)
def test_apply_overrides_rejects_bad_paths(override, pieces):
    with pytest.raises(ConfigError) as caught:
        apply_overrides(minimal(), [override])
    for piece in pieces:
        assert piece in str(caught.value)


def test_round_trip_through_plain_dict(tmp_path):
    cfg = load_config(write(tmp_path, FULL_YAML))
    plain = config_to_dict(cfg)
    assert isinstance(plain["students"][0]["loss"], dict)
    again = config_from_dict(plain)
    assert again == cfg
    assert config_to_dict(again) == plain
    minimal_cfg = config_from_dict({"cache": "c"})
    assert config_from_dict(config_to_dict(minimal_cfg)) == minimal_cfg


def test_config_does_not_alias_input():
    data = minimal(students=[{"name": "s", "model": {"config": {"model_type": "llama"}}}])
    cfg = config_from_dict(data)
    data["students"][0]["model"]["config"]["model_type"] = "gpt2"
    data["corpus"]["data_files"].append("b.jsonl")
    assert cfg.students[0].model.config == {"model_type": "llama"}
    assert cfg.corpus.data_files == ["a.jsonl"]


def test_empty_yaml_section_means_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "cache: c\nwindows:\nstorage:\n"))
    assert cfg.windows == WindowsConfig()


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as caught:
        load_config(missing)
    assert str(missing) in str(caught.value)


def test_yaml_syntax_error_gives_line(tmp_path):
    path = write(tmp_path, "cache: c\nwindows:\n  max_length: [1, 2\n  stride: 0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message and "invalid YAML" in message
    assert "line 4" in message


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping.*got list"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_load_without_path_uses_default_and_overrides():
    default = {"cache": "c"}
    cfg = load_config(None, ["soft_labels.k=4"], default=default)
    assert cfg.soft_labels.k == 4 and default == {"cache": "c"}
    with pytest.raises(ConfigError, match="no config file"):
        load_config(None)


def test_fingerprint_excludes_data_files_and_tracks_k():
    base = config_from_dict(minimal())
    grown = config_from_dict(minimal(corpus={"data_files": ["a.jsonl", "b.jsonl"]}))
    other_k = config_from_dict(minimal(soft_labels={"k": 4}))
    other_executor = config_from_dict(minimal(executor={"kind": "dask", "n_workers": 8}))
    unpacked = config_from_dict(minimal(teacher={"model": "t", "packing": "off"}))  # only how the forward batches run
    fingerprint = config_fingerprint_fields(base)
    assert "data_files" not in fingerprint["corpus"]
    assert set(fingerprint) == {"corpus", "teacher", "windows", "soft_labels", "storage"}
    assert set(fingerprint["teacher"]) == {"model", "revision", "task", "dtype"}
    assert config_fingerprint_fields(grown) == fingerprint
    assert config_fingerprint_fields(other_executor) == fingerprint
    assert config_fingerprint_fields(unpacked) == fingerprint
    assert config_fingerprint_fields(other_k) != fingerprint
    assert config_fingerprint_fields(other_k)["soft_labels"]["k"] == 4


@pytest.mark.parametrize(("mode", "expected"), [
    ("topk+sampled", {"k": 8, "samples": 16, "values": "q8", "entropy": True}),
    ("topk", {"k": 64, "values": "float16", "entropy": False}),
    ("sampled", {"samples": 50, "entropy": True}),
])
def test_unset_soft_label_fields_take_the_modes_defaults(mode, expected):
    labels = config_from_dict(minimal(soft_labels={"mode": mode})).soft_labels
    assert {name: getattr(labels, name) for name in expected} == expected


def test_the_default_mode_is_a_top_k_head_with_tail_draws():
    labels = config_from_dict(minimal()).soft_labels
    assert (labels.mode, labels.k, labels.samples, labels.values) == ("topk+sampled", 8, 16, "q8")


def test_explicit_soft_label_fields_win_over_the_modes_defaults():
    labels = config_from_dict(minimal(soft_labels={"mode": "topk+sampled", "k": 4, "values": "float16",
                                                   "entropy": False})).soft_labels
    assert (labels.k, labels.samples, labels.values, labels.entropy) == (4, 16, "float16", False)


def test_job_config_is_keyword_only():
    with pytest.raises(TypeError):
        JobConfig("cache")  # type: ignore[misc]


def test_a_classifiers_class_distributions_default_to_float16_whatever_the_mode():
    teacher = {"model": "t", "task": "sequence_classification"}
    assert config_from_dict(minimal(teacher=teacher)).soft_labels.values == "float16"
    chosen = config_from_dict(minimal(teacher=teacher, soft_labels={"values": "q8"}))
    assert chosen.soft_labels.values == "q8"
