"""The bad-input matrix: every input a user can get wrong, through the CLI as a user runs it.

Each row of the table in docs/reliability.md ("Bad input") is one test here. A test runs the
real command (``CliRunner`` on :func:`logitcache.cli.main`) and checks what a user sees: the
exit code (2 for bad usage, config or input; 0 where a counted skip is the documented
behaviour), that the message names the problem and the fix (file and line/row for corpus
problems, the dotted field path for config problems), and, where a cache already exists,
that the failing command left the committed cache as it was (same manifest bytes, verify ok).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from logitcache.cli import main
from logitcache.storage_schemas.manifest import FORMAT_VERSION
from logitcache.storage_schemas.shard_reader import CacheReader
from logitcache.storage_schemas.verify import verify_cache
from tests import fixtures_models

STUDENT = {"name": "s0", "model": {"config": {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1,
                                             "num_attention_heads": 2, "intermediate_size": 32}}}


def cli(*args: str):
    """Run ``logitcache ARGS`` as a user would; stderr and stdout together in ``.output``."""
    return CliRunner().invoke(main, [str(arg) for arg in args])


def base_config(*, cache: Path, data_files: str, model: Path, **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "cache": str(cache),
        "corpus": {"data_files": [data_files], "lang_column": "lang", "id_column": "id", "unit_documents": 25},
        "teacher": {"model": str(model), "batch_tokens": 512},
        "windows": {"max_length": 48},
        "soft_labels": {"k": 4},
        "students": [STUDENT],
        "train": {"steps": 1, "batch_tokens": 64, "output": str(cache.parent / "students"), "shuffle_buffer": 0},
        "eval": {"max_records": 2},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values} if isinstance(values, dict) else values
    return data


def write_config(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, allow_unicode=True) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def committed(tmp_path_factory, corpus_dir, tiny_causal_lm_dir) -> Path:
    """A cache built once from the multilingual corpus (2 units), to be copied by each test."""
    root = tmp_path_factory.mktemp("committed")
    config = write_config(root / "job.yaml", base_config(cache=root / "cache", data_files=str(corpus_dir / "*.jsonl"),
                                                       model=tiny_causal_lm_dir))
    result = cli("build", "--no-progress", config)
    assert result.exit_code == 0, result.output
    return root / "cache"


class Job:
    """A copy of the committed cache plus a config pointing at it, for one failing command."""

    def __init__(self, tmp_path: Path, committed: Path, corpus_dir: Path, teacher: Path) -> None:
        self.root = tmp_path
        self.cache = tmp_path / "cache"
        shutil.copytree(committed, self.cache)
        self.manifest = self.cache / "manifest.json"
        self.before = self.manifest.read_bytes()
        self.data = base_config(cache=self.cache, data_files=str(corpus_dir / "*.jsonl"), model=teacher)

    def config(self, data: Any = None, name: str = "job.yaml") -> Path:
        return write_config(self.root / name, self.data if data is None else data)

    def assert_untouched(self) -> None:
        assert self.manifest.read_bytes() == self.before, "the failing command changed the committed manifest"
        assert verify_cache(str(self.cache), deep=True).ok


@pytest.fixture
def job(tmp_path, committed, corpus_dir, tiny_causal_lm_dir) -> Job:
    return Job(tmp_path, committed, corpus_dir, tiny_causal_lm_dir)


def fresh_config(tmp_path: Path, data_files: Path | str, model: Path, **sections: Any) -> Path:
    """A config for a first build (no cache yet) over ``data_files``."""
    data = base_config(cache=tmp_path / "cache", data_files=str(data_files), model=model, **sections)
    return write_config(tmp_path / "job.yaml", data)


def assert_names(output: str, *parts: str) -> None:
    for part in parts:
        assert part in output, f"{part!r} not in the message:\n{output}"
    assert "Traceback" not in output


# ----------------------------------------------------------------------------- corpus rows


def test_empty_corpus_is_an_error(job):
    empty = job.root / "corpus" / "part-0.jsonl"
    empty.parent.mkdir()
    empty.write_text("")
    job.data["corpus"]["data_files"] = [str(job.root / "corpus" / "*.jsonl")]
    result = cli("build", "--no-progress", job.config())
    assert result.exit_code == 2
    assert_names(result.output, "error: corpus.data_files", "no documents", str(empty))
    job.assert_untouched()


def test_a_glob_that_matches_nothing_is_an_error(job):
    job.data["corpus"]["data_files"] = [str(job.root / "nowhere" / "*.jsonl")]
    result = cli("build", "--no-progress", job.config())
    assert result.exit_code == 2
    assert_names(result.output, "corpus.data_files", "matches no file")
    job.assert_untouched()


def test_empty_documents_are_skipped_and_counted(tmp_path, multilingual_texts, tiny_causal_lm_dir):
    rows = [*multilingual_texts[:6], {"id": "e1", "text": "", "lang": "en"},
            {"id": "e2", "text": "  \n\t ", "lang": "en"}]
    path = fresh_config(tmp_path, write_jsonl(tmp_path / "corpus" / "part-0.jsonl", rows), tiny_causal_lm_dir)
    result = cli("build", "--no-progress", "--json", path)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["skipped_documents"] == {"empty": 2}
    keys = {str(key) for shard in CacheReader(str(tmp_path / "cache")).shards
            for key in CacheReader(str(tmp_path / "cache")).read_shard(shard).doc_key}
    assert keys == {doc["id"] for doc in multilingual_texts[:6]}
    again = cli("build", "--no-progress", path)  # a re-run counts them too, in words
    assert again.exit_code == 0
    assert_names(again.output, "up to date", "skipped documents: 2 empty")


def test_a_10_mb_document_is_cut_into_windows(tmp_path):
    from transformers import AutoTokenizer

    from logitcache.pipeline.common.windows import window_spans

    # A teacher whose tokenizer has one token per 103-byte word keeps the forward pass over
    # 10 MB at ~100k tokens (seconds on 2 cores); the reading, tokenising and windowing of a
    # 10 MB JSON line are exercised in full.
    word = " " + "Supercalifragilisticexpialidocious" * 3
    tokenizer_dir = fixtures_models.build_tiny_tokenizer(tmp_path / "tokenizer", texts=[word * 50] * 20)
    teacher = fixtures_models.build_tiny_causal_lm(tmp_path / "teacher", tokenizer_dir, hidden_size=16,
                                                   num_hidden_layers=1, num_attention_heads=2,
                                                   num_key_value_heads=1, intermediate_size=16)
    words, tail = divmod(10_000_000, len(word))
    text = word * words + "7" * tail
    assert len(text.encode("utf-8")) == 10_000_000
    small = "a short neighbour"
    rows = [{"id": "huge", "text": text, "lang": "en"}, {"id": "small", "text": small, "lang": "en"}]
    max_length = 512
    path = fresh_config(tmp_path, write_jsonl(tmp_path / "corpus" / "big.jsonl", rows), teacher,
                        windows={"max_length": max_length}, soft_labels={"k": 1})
    result = cli("build", "--no-progress", "--json", path)
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    assert len(tokenizer.tokenize(word * 3)) == 3  # one token per word: count them without tokenising 10 MB
    tokens = 1 + words + len(tokenizer.tokenize("7" * tail))  # <bos>, the words, the digits
    assert tokens > 50 * max_length
    windows = len(window_spans(tokens, max_length=max_length, stride=0))
    summary = json.loads(result.output)
    assert summary["records"] == windows + 1
    assert summary["tokens"] == tokens + len(tokenizer(small)["input_ids"])
    reader = CacheReader(str(tmp_path / "cache"))
    block = reader.read_shard(reader.shards[0])
    lengths = sorted(int(n) for key, n in zip(block.doc_key, block.token_offsets[1:] - block.token_offsets[:-1],
                                                strict=True) if key == "huge")
    assert len(lengths) == windows and lengths[1:] == [max_length] * (windows - 1)  # only the last one is short
    assert verify_cache(str(tmp_path / "cache"), deep=True).ok


def test_mixed_scripts_and_emoji_build(tmp_path, tiny_causal_lm_dir):
    from transformers import AutoTokenizer

    texts = ["Hello, 世界! Привет, мир. مرحبا بالعالم नमस्ते 🌍🚀👩‍👩‍👧‍👦",
             "🙂" * 40, "e\u0301 combining, \u200b zero width, \U0001F1E9\U0001F1EA flags, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
             "RTL \u202e reversed \u202c and CJK 漢字かなカナ한국어"]
    rows = [{"id": f"m{i}", "text": text, "lang": "mul"} for i, text in enumerate(texts)]
    path = fresh_config(tmp_path, write_jsonl(tmp_path / "corpus" / "mixed.jsonl", rows), tiny_causal_lm_dir,
                        windows={"max_length": 512})  # one window per document
    result = cli("build", "--no-progress", "--json", path)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["skipped_documents"] == {}
    reader = CacheReader(str(tmp_path / "cache"))
    block = reader.read_shard(reader.shards[0])
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    decoded = {str(block.doc_key[r]): tokenizer.decode(block.input_ids[block.token_offsets[r]:block.token_offsets[r + 1]],
                                                       skip_special_tokens=True)
               for r in range(block.num_records)}
    assert decoded == {row["id"]: row["text"] for row in rows}  # every byte survives the round trip


def _with_bad_utf8(path: Path, good: list[dict[str, Any]]) -> Path:
    lines = [json.dumps(row, ensure_ascii=False).encode("utf-8") for row in good]
    lines.insert(2, b'{"id": "bad", "text": "caf\xe9 cr\xe8me", "lang": "fr"}')  # latin-1 bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_invalid_utf8_is_an_error_naming_file_and_line(job, multilingual_texts):
    bad = _with_bad_utf8(job.root / "more" / "bad.jsonl", multilingual_texts[:5])
    job.data["corpus"]["data_files"] = [job.data["corpus"]["data_files"][0], str(bad)]
    result = cli("build", "--no-progress", job.config())
    assert result.exit_code == 2
    assert_names(result.output, f"{bad}, line 3", "invalid UTF-8", "re-encode the file as UTF-8",
                 "corpus.on_bad_document: skip")
    job.assert_untouched()


def test_invalid_utf8_is_skipped_and_counted_with_skip(tmp_path, multilingual_texts, tiny_causal_lm_dir):
    bad = _with_bad_utf8(tmp_path / "corpus" / "bad.jsonl", multilingual_texts[:5])
    path = fresh_config(tmp_path, bad, tiny_causal_lm_dir, corpus={"on_bad_document": "skip"})
    result = cli("build", "--no-progress", "--json", path)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["skipped_documents"] == {"bad_utf8": 1}
    assert CacheReader(str(tmp_path / "cache")).manifest.total_records >= 5


@pytest.mark.parametrize(("column", "value", "suggestion"), [("text_column", "txt", "did you mean 'text'?"),
                                                            ("lang_column", "language", "its columns are")])
def test_a_missing_or_misspelt_column_is_an_error(job, column, value, suggestion):
    job.data["corpus"][column] = value
    refused = cli("build", "--no-progress", job.config())  # into the existing cache: another config
    assert refused.exit_code == 2
    assert_names(refused.output, f"config.corpus.{column}", "--overwrite")
    result = cli("build", "--no-progress", "--overwrite", job.config())
    assert result.exit_code == 2
    assert_names(result.output, f"no column {value!r} (corpus.{column})", "part-0.jsonl", suggestion)
    job.assert_untouched()  # --overwrite discards the old cache only when a new shard commits


def _non_string_corpus(path: Path, good: list[dict[str, Any]]) -> Path:
    rows = [*good[:3], {"id": "n1", "text": 42, "lang": "en"}, *good[3:5], {"id": "n2", "text": None, "lang": "en"}]
    return write_jsonl(path, rows)


def test_a_non_string_text_is_an_error_naming_file_and_row(job, multilingual_texts):
    bad = _non_string_corpus(job.root / "more" / "numbers.jsonl", multilingual_texts)
    job.data["corpus"]["data_files"] = [job.data["corpus"]["data_files"][0], str(bad)]
    result = cli("build", "--no-progress", job.config())
    assert result.exit_code == 2
    assert_names(result.output, str(bad), "row 3", "column 'text' holds 42 (int), expected a string",
                 "corpus.on_bad_document: skip")
    job.assert_untouched()


def test_a_non_string_text_is_skipped_and_counted_with_skip(tmp_path, multilingual_texts, tiny_causal_lm_dir):
    bad = _non_string_corpus(tmp_path / "corpus" / "numbers.jsonl", multilingual_texts)
    path = fresh_config(tmp_path, bad, tiny_causal_lm_dir, corpus={"on_bad_document": "skip"})
    result = cli("build", "--no-progress", "--json", path)
    assert result.exit_code == 0, result.output
    skipped = json.loads(result.output)["skipped_documents"]
    assert sum(skipped.values()) == 2 and set(skipped) <= {"non_string", "missing_value"}


# ----------------------------------------------------------------------------- teacher and students


def test_a_teacher_path_that_does_not_exist_is_an_error(job):
    missing = job.root / "no-such-teacher"
    job.data["teacher"]["model"] = str(missing)
    result = cli("build", "--no-progress", job.config())
    assert result.exit_code == 2
    assert_names(result.output, "teacher.model", str(missing), "does not exist")
    job.assert_untouched()


def test_k_larger_than_the_vocabulary_is_an_error(job):
    result = cli("build", "--no-progress", "--overwrite", job.config(), "--set", "soft_labels.k=100000")
    assert result.exit_code == 2
    assert_names(result.output, "soft_labels.k: 100000 is larger than the teacher's vocabulary (400 tokens)",
                 "set soft_labels.k to at most 400")
    job.assert_untouched()  # refused before --overwrite discarded anything


def test_a_tokenizer_student_mismatch_is_an_error(job, tmp_path):
    other = fixtures_models.build_tiny_tokenizer(tmp_path / "other-tokenizer", vocab_size=300)
    job.data["students"] = [{**STUDENT, "tokenizer": str(other)}]
    result = cli("train", "--no-progress", job.config())
    assert result.exit_code == 2
    assert_names(result.output, "students[s0]", "tokenizer", "not the one the cache was built with",
                 "Use the teacher's tokenizer")
    job.assert_untouched()


def test_a_student_vocabulary_smaller_than_the_tokenizer_is_an_error(job):
    small = {**STUDENT, "model": {"config": {**STUDENT["model"]["config"], "vocab_size": 100}}}
    job.data["students"] = [small]
    result = cli("train", "--no-progress", job.config())
    assert result.exit_code == 2
    assert_names(result.output, "students[s0]", "smaller than the cache's tokenizer", "set vocab_size >= 400")
    job.assert_untouched()


# ----------------------------------------------------------------------------- config rows


@pytest.mark.parametrize("temperature", ["0", "-1"])
def test_a_temperature_not_above_zero_is_an_error(job, temperature):
    result = cli("train", "--no-progress", job.config(), "--set", f"students.0.loss.temperature={temperature}")
    assert result.exit_code == 2
    assert_names(result.output, "students[0].loss.temperature: must be > 0")
    job.assert_untouched()


def test_an_unknown_config_key_is_an_error(job):
    job.data["soft_label"] = job.data.pop("soft_labels")
    result = cli("build", "--no-progress", job.config())
    assert result.exit_code == 2
    assert_names(result.output, "soft_label: unknown key", "did you mean 'soft_labels'?")
    job.assert_untouched()


def test_set_of_an_unknown_key_is_an_error(job):
    result = cli("build", "--no-progress", job.config(), "--set", "windows.strid=4")
    assert result.exit_code == 2
    assert_names(result.output, "windows.strid: unknown key", "did you mean 'stride'?")
    job.assert_untouched()


def test_a_negative_stride_is_an_error(job):
    result = cli("build", "--no-progress", job.config(), "--set", "windows.stride=-4")
    assert result.exit_code == 2
    assert_names(result.output, "windows.stride: must be >= 0")
    job.assert_untouched()


@pytest.mark.parametrize(("text", "expected"), [("cache: [unclosed\n", "invalid YAML"),
                                                ("- just\n- a list\n", "top level must be a mapping"),
                                                ("\x00\x01 binary", "invalid YAML")])
def test_a_config_file_that_is_not_yaml_is_an_error(job, text, expected):
    path = job.config(text, name="bad.yaml")
    result = cli("build", "--no-progress", path)
    assert result.exit_code == 2
    assert_names(result.output, str(path), expected)
    job.assert_untouched()


def test_a_config_file_that_does_not_exist_is_an_error(tmp_path):
    result = cli("build", "--no-progress", tmp_path / "missing.yaml")
    assert result.exit_code == 2
    assert_names(result.output, "missing.yaml", "config file not found")


# ----------------------------------------------------------------------------- chat corpora


def _chat_job(root: Path, teacher: Path, rows: list[Any], **corpus: Any) -> Path:
    data = base_config(cache=root / "chat-cache", data_files=str(write_jsonl(root / "chat" / "c.jsonl", rows)),
                       model=teacher)
    data["corpus"] = {**data["corpus"], "messages_column": "messages", **corpus}
    return write_config(root / "chat.yaml", data)


CHAT_ROWS = [{"id": "c0", "lang": "en", "messages": [{"role": "user", "content": "Hello there"},
                                                    {"role": "assistant", "content": "Hi, how can I help?"}]},
             {"id": "c1", "lang": "en", "messages": [{"role": "user", "content": "What is 2+2?"},
                                                    {"role": "bot", "content": "4"}]},
             {"id": "c2", "lang": "en", "messages": [{"role": "user", "content": "Anyone?"},
                                                    {"role": "assistant", "content": ""}]}]


def test_a_conversation_with_an_unknown_role_or_an_empty_message_is_an_error(tmp_path, tiny_tokenizer_dir):
    teacher = fixtures_models.build_tiny_chat_lm(tmp_path / "lm", tiny_tokenizer_dir)
    result = cli("build", "--no-progress", _chat_job(tmp_path, teacher, CHAT_ROWS))
    assert result.exit_code == 2
    assert_names(result.output, "c.jsonl", "row 1", "messages[1]: unknown role 'bot'", "corpus.on_bad_document: skip")
    skipped = cli("build", "--no-progress", _chat_job(tmp_path, teacher, CHAT_ROWS, on_bad_document="skip"))
    assert skipped.exit_code == 0, skipped.output
    assert "skipped documents: 2 bad_messages" in skipped.output


def test_a_chat_corpus_without_a_chat_template_is_an_error(tmp_path, tiny_tokenizer_dir):
    teacher = fixtures_models.build_tiny_chat_lm(tmp_path / "lm", tiny_tokenizer_dir, template=None)
    result = cli("build", "--no-progress", _chat_job(tmp_path, teacher, CHAT_ROWS[:1]))
    assert result.exit_code == 2
    assert_names(result.output, "has no chat template", "corpus.chat_template")
    assert not (tmp_path / "chat-cache" / "shards").exists() or not any((tmp_path / "chat-cache" / "shards").iterdir())


def test_a_changed_committed_row_is_refused_and_appended_rows_are_built(tmp_path, tiny_causal_lm_dir,
                                                                       multilingual_texts):
    corpus = write_jsonl(tmp_path / "data" / "part-0.jsonl", multilingual_texts[:30])
    config = write_config(tmp_path / "job.yaml", base_config(cache=tmp_path / "cache", data_files=str(corpus),
                                                             model=tiny_causal_lm_dir))
    assert cli("build", "--no-progress", config).exit_code == 0
    write_jsonl(corpus, multilingual_texts[:40])  # rows appended: only they are built
    grown = cli("build", "--no-progress", config)
    assert grown.exit_code == 0 and "rows appended" in grown.output
    before = (tmp_path / "cache" / "manifest.json").read_bytes()
    edited = [dict(row) for row in multilingual_texts[:40]]
    edited[27]["text"] = "an edited row"
    write_jsonl(corpus, edited)
    result = cli("build", "--no-progress", config)
    assert result.exit_code == 2
    assert_names(result.output, "part-0.jsonl", "a source file changed", "rows may only be appended", "--overwrite")
    assert (tmp_path / "cache" / "manifest.json").read_bytes() == before


# ----------------------------------------------------------------------------- cache format


@pytest.mark.parametrize("command", ["build", "train", "inspect", "verify"])
def test_a_cache_of_a_newer_format_version_is_refused(job, command):
    manifest = json.loads(job.manifest.read_text())
    newer = f"{int(FORMAT_VERSION.split('.')[0]) + 1}.0"
    manifest["format_version"] = newer
    job.manifest.write_text(json.dumps(manifest))
    job.before = job.manifest.read_bytes()
    args = [command, "--no-progress", job.config()] if command in ("build", "train") else [command, job.cache]
    result = cli(*args)
    assert result.exit_code == 2
    assert_names(result.output, "manifest.json", f"cache format version {newer} is newer", "upgrade logitcache")
    assert job.manifest.read_bytes() == job.before


def test_every_row_of_the_docs_table_is_a_test_here():
    import re

    page = (Path(__file__).parents[2] / "docs" / "reliability.md").read_text(encoding="utf-8")
    section = page.split("## Bad input", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"\| `(test_\w+)` \|", section))
    here = {name for name in globals() if name.startswith("test_") and name != "test_every_row_of_the_docs_table_is_a_test_here"}
    assert named == here
