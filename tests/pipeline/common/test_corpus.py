"""Tests of logitcache.pipeline.common.corpus: sources, readers, work units, skips and errors.

Every corpus here is a handful of tiny files written to tmp_path; nothing is loaded from a
hub (the hub path is checked with a monkeypatched ``datasets.load_dataset``).
"""

from __future__ import annotations

import hashlib
import json
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logitcache.config import CorpusConfig
from logitcache.errors import CorpusError
from logitcache.pipeline.common.corpus import (
    Document,
    WorkUnit,
    describe_corpus,
    iter_source_units,
    iter_work_units,
    paired_texts,
    resolve_sources,
)

TEXTS = [
    ("en", "The quick brown fox jumps over the lazy dog."),
    ("ru", "Съешь же ещё этих мягких французских булок."),
    ("zh", "敏捷的棕色狐狸跳过了懒狗。"),
    ("ar", "نص عربي قصير للاختبار."),
    ("hi", "यह एक छोटा हिंदी वाक्य है।"),
    ("ja", "絵文字もある 🎉🦊"),
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail on any host lookup: datasets swallows network errors, so record them and check."""
    attempts = []

    def refuse(host, *args, **kwargs):
        attempts.append(host)
        raise OSError(f"network disabled in tests (tried {host})")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
    assert not attempts, f"the test tried to reach {attempts}"


def rows(count: int, *, prefix: str = "d", labels: bool = True) -> list[dict]:
    out = []
    for i in range(count):
        lang, text = TEXTS[i % len(TEXTS)]
        row = {"id": f"{prefix}{i}", "text": f"{text} #{i}", "lang": lang}
        if labels:
            row["label"] = i % 3
        out.append(row)
    return out


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return str(path)


def write_lines(path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


def corpus(files, **kwargs) -> CorpusConfig:
    options = {"text_column": "text", "lang_column": "lang", "id_column": "id", "unit_documents": 10}
    options.update(kwargs)
    return CorpusConfig(data_files=[str(f) for f in (files if isinstance(files, list) else [files])], **options)


def documents(cfg: CorpusConfig) -> list[Document]:
    return [doc for unit in iter_work_units(cfg) for doc in unit.documents]


def test_jsonl_documents_carry_key_lang_label_source_and_row(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", rows(6))
    docs = documents(corpus(path, label_column="label"))
    assert [(d.key, d.lang, d.label, d.row) for d in docs] == [
        (f"d{i}", TEXTS[i][0], i % 3, i) for i in range(6)
    ]
    assert docs[2].text == "敏捷的棕色狐狸跳过了懒狗。 #2"
    assert {d.source for d in docs} == {path}


def test_parquet_csv_and_txt_are_read(tmp_path):
    records = rows(4)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "p.parquet")
    csv_text = "id,text,lang,label\n" + "".join(
        f'{r["id"]},"{r["text"]}",{r["lang"]},{r["label"]}\n' for r in records
    )
    (tmp_path / "c.csv").write_text(csv_text, encoding="utf-8")
    (tmp_path / "t.txt").write_text("".join(r["text"] + "\n" for r in records), encoding="utf-8")
    expected = [(r["id"], r["text"], r["lang"], r["label"]) for r in records]
    for name in ("p.parquet", "c.csv"):
        docs = documents(corpus(tmp_path / name, label_column="label"))
        assert [(d.key, d.text, d.lang, d.label) for d in docs] == expected, name
    docs = documents(CorpusConfig(data_files=[str(tmp_path / "t.txt")]))
    assert [d.text for d in docs] == [r["text"] for r in records]
    assert [d.row for d in docs] == [0, 1, 2, 3]
    assert {d.lang for d in docs} == {"und"}


def test_csv_keeps_text_like_values_as_strings(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('id,text,label\n1,42,\n2,NA,1\n3,"мульти\nстрока",2\n\n4,,0\n', encoding="utf-8")
    units = list(iter_work_units(corpus(path, lang_column=None, label_column="label")))
    docs = units[0].documents
    assert [(d.key, d.text, d.label) for d in docs] == [("1", "42", None), ("2", "NA", 1), ("3", "мульти\nстрока", 2)]
    assert units[0].skipped == {"empty": 1}
    assert units[0].num_rows == 4


def test_content_hash_keys_are_stable_and_lang_defaults_to_und(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "नमस्ते दुनिया"}, {"text": "مرحبا بالعالم"}])
    cfg = CorpusConfig(data_files=[path])
    first, second = documents(cfg), documents(cfg)
    digest = hashlib.sha256("नमस्ते दुनिया".encode()).hexdigest()[:16]
    assert first[0].key == f"sha256:{digest}"
    assert [d.key for d in first] == [d.key for d in second]
    assert [d.lang for d in first] == ["und", "und"]
    assert [d.label for d in first] == [None, None]


def test_globs_are_sorted_and_deduplicated(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.parquet"):
        if name.endswith("parquet"):
            pq.write_table(pa.Table.from_pylist(rows(2)), tmp_path / name)
        else:
            write_jsonl(tmp_path / name, rows(2))
    (tmp_path / "sub").mkdir()
    cfg = corpus([tmp_path / "*.jsonl", tmp_path / "a.jsonl", tmp_path / "*.parquet"])
    assert resolve_sources(cfg) == [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl", "c.parquet")]
    assert [d.source for d in documents(cfg)] == [str(tmp_path / n) for n in ("a.jsonl",) * 2 + ("b.jsonl",) * 2 + ("c.parquet",) * 2]


def test_units_are_row_ranges_with_stable_ids(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", rows(23))
    cfg = corpus(path)
    units = list(iter_work_units(cfg))
    tag = hashlib.sha256(path.encode()).hexdigest()[:10]
    assert [u.unit_id for u in units] == [f"{tag}-00000", f"{tag}-00001", f"{tag}-00002"]
    assert [(u.index, u.first_row, u.num_rows, len(u.documents)) for u in units] == [
        (0, 0, 10, 10), (1, 10, 10, 10), (2, 20, 3, 3)
    ]
    assert [d.row for d in units[2].documents] == [20, 21, 22]
    again = list(iter_work_units(cfg))
    assert [(u.unit_id, u.fingerprint) for u in again] == [(u.unit_id, u.fingerprint) for u in units]
    assert len({u.fingerprint for u in units}) == 3


def test_a_new_file_adds_units_and_leaves_old_ones_unchanged(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", rows(12))
    cfg = corpus(tmp_path / "*.jsonl")
    before = {u.unit_id: u.fingerprint for u in iter_work_units(cfg)}
    write_jsonl(tmp_path / "b.jsonl", rows(5, prefix="new"))
    after = {u.unit_id: u.fingerprint for u in iter_work_units(cfg)}
    assert len(before) == 2 and len(after) == 3
    assert {k: after[k] for k in before} == before


def test_a_changed_source_changes_the_fingerprint(tmp_path):
    records = rows(5)
    write_jsonl(tmp_path / "a.jsonl", records)
    (old,) = iter_work_units(corpus(tmp_path / "a.jsonl"))
    records[3]["text"] = "изменено"
    write_jsonl(tmp_path / "a.jsonl", records)
    (new,) = iter_work_units(corpus(tmp_path / "a.jsonl"))
    assert new.unit_id == old.unit_id and new.fingerprint != old.fingerprint


def test_empty_and_whitespace_texts_are_skipped_and_counted(tmp_path):
    records = rows(6)
    records[1]["text"] = ""
    records[4]["text"] = " \t\u3000\n"
    path = write_jsonl(tmp_path / "a.jsonl", records)
    (unit,) = iter_work_units(corpus(path))  # error mode: empty texts are not errors
    assert unit.skipped == {"empty": 2}
    assert unit.num_rows == 6
    assert [d.row for d in unit.documents] == [0, 2, 3, 5]


def test_skipped_rows_do_not_move_unit_boundaries(tmp_path):
    records = rows(25)
    for i in (0, 3, 11, 12, 24):
        records[i]["text"] = "   "
    units = list(iter_work_units(corpus(write_jsonl(tmp_path / "a.jsonl", records))))
    assert [(u.first_row, u.num_rows, len(u.documents), u.skipped) for u in units] == [
        (0, 10, 8, {"empty": 2}), (10, 10, 8, {"empty": 2}), (20, 5, 4, {"empty": 1})
    ]


def test_missing_column_names_file_and_existing_columns(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", rows(3))
    with pytest.raises(CorpusError) as caught:
        list(iter_work_units(corpus(path, lang_column="language_code")))
    message = str(caught.value)
    assert path in message and "'language_code'" in message and "corpus.lang_column" in message
    assert all(f"'{name}'" in message for name in ("id", "text", "lang", "label"))


def test_misspelt_column_gets_a_suggestion(tmp_path):
    pq.write_table(pa.Table.from_pylist(rows(3)), tmp_path / "a.parquet")
    with pytest.raises(CorpusError, match=r"did you mean 'text'\?"):
        list(iter_work_units(corpus(tmp_path / "a.parquet", text_column="txet")))


def test_non_string_text_errors_with_row_and_is_counted_in_skip_mode(tmp_path):
    records = rows(6)
    records[2]["text"] = 42
    records[4]["text"] = None
    path = write_jsonl(tmp_path / "a.jsonl", records)
    with pytest.raises(CorpusError) as caught:
        list(iter_work_units(corpus(path)))
    assert path in str(caught.value) and "row 2" in str(caught.value) and "on_bad_document" in str(caught.value)
    (unit,) = iter_work_units(corpus(path, on_bad_document="skip"))
    assert unit.skipped == {"missing_value": 1, "non_string": 1}
    assert [d.row for d in unit.documents] == [0, 1, 3, 5]


def test_a_list_text_is_non_string(tmp_path):
    records = rows(3)
    records[1]["text"] = ["a", "b"]
    (unit,) = iter_work_units(corpus(write_jsonl(tmp_path / "a.jsonl", records), on_bad_document="skip"))
    assert unit.skipped == {"non_string": 1}


def test_labels_must_be_integers(tmp_path):
    records = rows(4)
    records[1]["label"] = None
    records[2]["label"] = "positive"
    path = write_jsonl(tmp_path / "a.jsonl", records)
    with pytest.raises(CorpusError, match="row 2"):
        list(iter_work_units(corpus(path, label_column="label")))
    (unit,) = iter_work_units(corpus(path, label_column="label", on_bad_document="skip"))
    assert [(d.row, d.label) for d in unit.documents] == [(0, 0), (1, None), (3, 0)]
    assert unit.skipped == {"bad_label": 1}


def invalid_utf8_lines() -> list[bytes]:
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows(5)]
    lines[2] = lines[2].replace("狐狸".encode(), "狐狸".encode()[:4])  # a truncated CJK character
    with pytest.raises(UnicodeDecodeError):
        lines[2].decode("utf-8")
    return lines


def test_invalid_utf8_names_the_line_and_how_to_fix(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", invalid_utf8_lines())
    with pytest.raises(CorpusError) as caught:
        list(iter_work_units(corpus(path)))
    message = str(caught.value)
    assert f"{path}, line 3" in message and "UTF-8" in message and "on_bad_document: skip" in message


@pytest.mark.parametrize("unit_documents", [10, 2])
def test_invalid_utf8_is_skipped_with_other_rows_intact(tmp_path, unit_documents):
    path = write_lines(tmp_path / "a.jsonl", invalid_utf8_lines())
    skip = corpus(path, on_bad_document="skip", unit_documents=unit_documents)
    units = list(iter_work_units(skip))
    assert [(d.key, d.row) for u in units for d in u.documents] == [("d0", 0), ("d1", 1), ("d3", 3), ("d4", 4)]
    assert sum(u.num_rows for u in units) == 5
    assert [u.skipped for u in units if u.skipped] == [{"bad_utf8": 1}]
    assert documents(skip)[2].text == rows(5)[3]["text"]


def test_invalid_utf8_in_txt_and_csv(tmp_path):
    txt = write_lines(tmp_path / "a.txt", ["один".encode(), b"\xff\xfe", "二".encode(), b"", "तीन".encode()])
    with pytest.raises(CorpusError, match="line 2"):
        list(iter_work_units(CorpusConfig(data_files=[txt])))
    (unit,) = iter_work_units(CorpusConfig(data_files=[txt], on_bad_document="skip"))
    assert [(d.row, d.text) for d in unit.documents] == [(0, "один"), (2, "二"), (4, "तीन")]
    assert unit.skipped == {"bad_utf8": 1, "empty": 1}
    csv_path = write_lines(tmp_path / "a.csv", [b"id,text", b"1,ok", b'2,"bad \xff', b'multi"', b"3,fine"])
    with pytest.raises(CorpusError, match="line 3"):
        list(iter_work_units(corpus(csv_path, lang_column=None)))
    (unit,) = iter_work_units(corpus(csv_path, lang_column=None, on_bad_document="skip"))
    assert [(d.key, d.row) for d in unit.documents] == [("1", 0), ("3", 2)]
    assert unit.skipped == {"bad_utf8": 1}


def test_malformed_json_line(tmp_path):
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows(4)]
    lines[1] = b'{"id": "d1", "text": "unterminated'
    path = write_lines(tmp_path / "a.jsonl", lines)
    with pytest.raises(CorpusError) as caught:
        list(iter_work_units(corpus(path)))
    assert f"{path}, line 2" in str(caught.value) and "JSON" in str(caught.value)
    (unit,) = iter_work_units(corpus(path, on_bad_document="skip"))
    assert [(d.key, d.row) for d in unit.documents] == [("d0", 0), ("d2", 2), ("d3", 3)]
    assert unit.skipped == {"bad_json": 1}


def test_fallback_keeps_row_numbers_across_blank_lines(tmp_path):
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows(5)]
    lines[1:1] = [b"", b"   "]  # blank lines are not rows for datasets either
    lines[5] = b"{not json"
    path = write_lines(tmp_path / "a.jsonl", lines)
    good = write_jsonl(tmp_path / "b.jsonl", rows(5))
    expected = [(d.key, d.row) for d in documents(corpus(good))]
    got = [(d.key, d.row) for d in documents(corpus(path, on_bad_document="skip"))]
    assert got == [pair for pair in expected if pair[1] != 3]


def test_a_pattern_matching_nothing(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", rows(1))
    with pytest.raises(CorpusError, match=r"nope\*\.jsonl.*matches no file"):
        resolve_sources(corpus([tmp_path / "a.jsonl", tmp_path / "nope*.jsonl"]))


def test_an_unknown_extension(tmp_path):
    (tmp_path / "a.xml").write_text("<doc/>")
    with pytest.raises(CorpusError) as caught:
        resolve_sources(corpus(tmp_path / "a.xml"))
    assert "'.xml'" in str(caught.value) and ".jsonl" in str(caught.value) and ".parquet" in str(caught.value)


def test_compressed_jsonl_is_read(tmp_path):
    import gzip

    path = tmp_path / "a.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows(3))
    assert [d.key for d in documents(corpus(path))] == ["d0", "d1", "d2"]


def test_hub_dataset_builds_the_right_load_call(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(rows(3)).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = CorpusConfig(name="org/corpus", config="ru", split="validation", lang_column="lang", unit_documents=2)
    assert resolve_sources(cfg) == ["hub:org/corpus/ru/validation"]
    units = list(iter_work_units(cfg))
    assert calls == [(("org/corpus", "ru"), {"split": "validation", "streaming": True})]
    assert [u.num_rows for u in units] == [2, 1]
    assert units[0].documents[1].source == "hub:org/corpus/ru/validation"
    assert describe_corpus(cfg)["sources"] == [{"source": "hub:org/corpus/ru/validation", "loader": "hub", "bytes": None}]


def test_describe_corpus(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", rows(2))
    info = describe_corpus(corpus(tmp_path / "*.jsonl", label_column="label", unit_documents=7))
    size = (tmp_path / "a.jsonl").stat().st_size
    assert info["sources"] == [{"source": path, "loader": "json", "bytes": size}]
    assert info["total_bytes"] == size
    assert info["columns"] == {"text": "text", "lang": "lang", "id": "id", "label": "label"}
    assert info["unit_documents"] == 7
    json.dumps(info)


def test_units_of_one_source_and_an_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    assert list(iter_source_units(corpus(tmp_path / "empty.jsonl"), str(tmp_path / "empty.jsonl"))) == []
    unit = next(iter_source_units(corpus(tmp_path / "*.jsonl"), write_jsonl(tmp_path / "a.jsonl", rows(1))))
    assert isinstance(unit, WorkUnit) and unit.num_rows == 1


def test_a_bad_line_after_the_first_batches_keeps_all_boundaries(tmp_path):
    lines = [json.dumps({"id": i, "text": f"строка {i} 🙂"}, ensure_ascii=False).encode() for i in range(600)]
    lines[500] = lines[500].replace("с".encode(), b"\xd1")  # datasets fails only after yielding rows
    path = write_lines(tmp_path / "a.jsonl", lines)
    with pytest.raises(CorpusError, match="line 501"):
        list(iter_work_units(corpus(path, lang_column=None, unit_documents=100)))
    units = list(iter_work_units(corpus(path, lang_column=None, unit_documents=100, on_bad_document="skip")))
    assert [(u.first_row, u.num_rows) for u in units] == [(row, 100) for row in range(0, 600, 100)]
    assert [u.skipped for u in units] == [{}] * 5 + [{"bad_utf8": 1}]
    assert [d.row for u in units for d in u.documents] == [row for row in range(600) if row != 500]


def test_fsspec_urls_are_globbed_and_read():
    import uuid

    import fsspec

    memory = fsspec.filesystem("memory")
    root = f"/corpus-{uuid.uuid4().hex}"
    memory.pipe(f"{root}/b.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows(2)).encode())
    first = '{"text": "Привет"}\n'.encode()
    memory.pipe(f"{root}/a.jsonl", first)
    try:
        cfg = CorpusConfig(data_files=[f"memory://{root}/*.jsonl"])
        assert resolve_sources(cfg) == [f"memory://{root}/a.jsonl", f"memory://{root}/b.jsonl"]
        assert [d.text for d in documents(cfg)][:2] == ["Привет", rows(2)[0]["text"]]
        assert describe_corpus(cfg)["sources"][0]["bytes"] == len(first)
    finally:
        memory.rm(root, recursive=True)


def test_estimate_units_counts_rows_of_every_file_type(tmp_path):
    from logitcache.pipeline.common.corpus import estimate_units

    rows = [{"text": f"doc {i}", "lang": "en"} for i in range(23)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows[:12]), tmp_path / "b.parquet")
    (tmp_path / "c.csv").write_text("text,lang\n" + "".join(f"doc {i},en\n" for i in range(5)))
    (tmp_path / "d.txt").write_text("one\ntwo\nthree")  # no final line break
    cfg = CorpusConfig(data_files=[str(tmp_path / "*")], unit_documents=10)
    # 23 -> 3 units, 12 -> 2, 5 -> 1, 3 -> 1
    assert estimate_units(cfg) == 7
    assert estimate_units(CorpusConfig(name="some/dataset")) is None


@pytest.mark.parametrize("id_column", ["id", None])
def test_paired_texts_are_keyed_as_stage_one_keys_the_documents(tmp_path, id_column):
    records = rows(7, labels=False)
    for i, row in enumerate(records):
        row["text_xx"] = f"translated {i}"
    records[2]["text_xx"] = "  "  # blank: left out, as is a non-string
    records[4]["text_xx"] = 5
    pq.write_table(pa.Table.from_pylist(records[:3]), tmp_path / "a.parquet")
    jsonl = write_jsonl(tmp_path / "b.jsonl", records[3:])
    cfg = corpus([tmp_path / "a.parquet", jsonl], id_column=id_column)
    keys = [doc.key for doc in documents(cfg)]  # what stage one stores with each record
    paired = paired_texts(cfg, "text_xx", owner="students[x].text_column")
    assert paired == {keys[i]: f"translated {i}" for i in (0, 1, 3, 5, 6)}


def test_paired_texts_name_the_missing_column_and_refuse_plain_text(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", rows(3))
    with pytest.raises(CorpusError) as caught:
        paired_texts(corpus(path), "text_de", owner="students[x].text_column")
    message = str(caught.value)
    assert path in message and "'text_de'" in message and "students[x].text_column" in message
    txt = tmp_path / "b.txt"
    txt.write_text("one document\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="plain text file, which has no column 'text_de'"):
        paired_texts(corpus(txt, lang_column=None, id_column=None), "text_de", owner="students[x].text_column")
