"""The demo corpus shipped with the package: well-formed, multilingual, multi-script, small."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib.resources import files

import pytest

SPLITS = ("train", "heldout")
KEYS = {"id", "lang", "topic", "text"}
SCRIPTS = {
    "latin": re.compile(r"[A-Za-z\u00C0-\u024F]"),
    "cyrillic": re.compile(r"[\u0400-\u04FF]"),
    "cjk": re.compile(r"[\u4E00-\u9FFF]"),
    "arabic": re.compile(r"[\u0600-\u06FF]"),
    "devanagari": re.compile(r"[\u0900-\u097F]"),
}


def _corpus_dir():
    return files("logitcache") / "data" / "demo_corpus"


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for split in SPLITS:
        raw = (_corpus_dir() / f"{split}.jsonl").read_bytes()
        lines = raw.decode("utf-8").splitlines()
        assert lines, split
        out[split] = []
        for n, line in enumerate(lines, 1):
            row = json.loads(line)
            assert isinstance(row, dict), (split, n)
            assert set(row) == KEYS, (split, n, sorted(row))
            assert all(isinstance(row[k], str) for k in KEYS), (split, n)
            out[split].append(row)
    return out


def _all(rows):
    return [r for split in SPLITS for r in rows[split]]


def test_rows_are_well_formed(rows):
    for r in _all(rows):
        assert r["text"].strip(), r["id"]
        assert r["topic"].strip(), r["id"]
        assert re.fullmatch(r"[a-z]{2}", r["lang"]), r["id"]
        assert re.fullmatch(rf"{r['lang']}-\d{{4}}", r["id"]), r["id"]


def test_ids_unique_across_splits(rows):
    ids = Counter(r["id"] for r in _all(rows))
    assert not [i for i, c in ids.items() if c > 1]


def test_no_duplicate_texts(rows):
    texts = Counter(r["text"] for r in _all(rows))
    assert not [t for t, c in texts.items() if c > 1]


def test_languages_and_split_sizes(rows):
    train = Counter(r["lang"] for r in rows["train"])
    held = Counter(r["lang"] for r in rows["heldout"])
    assert len(train) >= 8
    assert set(held) == set(train)
    for lang in train:
        assert train[lang] >= 50, lang
        assert held[lang] >= 5, lang


def test_scripts_present(rows):
    by_lang: dict[str, str] = {}
    for r in _all(rows):
        by_lang[r["lang"]] = by_lang.get(r["lang"], "") + r["text"]
    for script, pattern in SCRIPTS.items():
        # A language counts for a script when most of its letters are in that script.
        langs = [
            lang
            for lang, text in by_lang.items()
            if len(pattern.findall(text)) > 0.5 * sum(c.isalpha() for c in text)
        ]
        assert langs, script


def test_total_size_small():
    total = sum(len((_corpus_dir() / f"{s}.jsonl").read_bytes()) for s in SPLITS)
    assert total < 400 * 1024


def test_the_held_out_file_is_the_eval_split_of_the_default_job():
    import numpy as np

    from logitcache.pipeline.common.splits import is_held_out
    from logitcache.pipeline.common.windows import record_id_for
    from logitcache.stages.run_job import default_job

    fraction = default_job()["eval"]["held_out_fraction"]
    root = files("logitcache") / "data" / "demo_corpus"
    for name, expected in (("train.jsonl", False), ("heldout.jsonl", True)):
        ids = [json.loads(line)["id"] for line in (root / name).read_text(encoding="utf-8").splitlines()]
        keys = np.array([record_id_for(i, 0) for i in ids], dtype=np.uint64)
        assert (is_held_out(keys, fraction) == expected).all(), name
