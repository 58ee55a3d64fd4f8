"""Packed capture: the windows of several documents share the teacher's rows, and the labels
are those of padded rows (up to float rounding), for every model family and attention kind."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from logitcache.config import TeacherConfig, WindowsConfig
from logitcache.pipeline.capture import teacher as teacher_module
from logitcache.pipeline.capture.batches import (
    MAX_PACKED_PADDING,
    collate_packed,
    pack_rows,
    plan_batches,
    plan_packed_batches,
    unit_batches,
)
from logitcache.pipeline.capture.soft_labels import SoftLabelSpec
from logitcache.pipeline.capture.teacher import PackedRows, Teacher, load_teacher
from logitcache.pipeline.capture.unit_labeler import TeacherOutOfMemoryError, label_unit
from logitcache.pipeline.common.windows import Window, make_windows
from logitcache.stages.build_cache import build_cache
from logitcache.stages.run_job import demo_corpus_dir
from logitcache.storage_schemas.shard_reader import CacheReader
from tests import fixtures_models
from tests.factories import make_layout
from tests.stages.test_build_cache import job

K = 8
SPEC = SoftLabelSpec(mode="topk", k=K, samples=1, entropy=True)
_OPT = {"ffn_dim": 64, "word_embed_proj_dim": 32}
FAMILIES = {"llama": {}, "qwen2": {}, "mistral": {}, "gpt2": {}, "gpt_neox": {}, "gemma2": {}, "phi": {},
            "opt": _OPT}
EAGER_ONLY = {"gemma2"}  # transformers has no SDPA attention for it
CASES = [(family, attn) for family in FAMILIES for attn in ("sdpa", "eager")
         if attn == "eager" or family not in EAGER_ONLY]


def documents(texts):
    return [SimpleNamespace(key=d["id"], text=d["text"], lang=d["lang"], label=None, messages=None) for d in texts]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("families")
    return {family: fixtures_models.build_tiny_causal_lm(root / family, tiny_tokenizer_dir, model_type=family,
                                                         **extra)
            for family, extra in FAMILIES.items()}


def teacher_of(model_dir, attn: str | None = None, task: str = "causal_lm") -> Teacher:
    teacher = load_teacher(TeacherConfig(model=str(model_dir), task=task, device="cpu", dtype="float32"))
    if attn is not None:
        teacher.model.set_attn_implementation(attn)
    return teacher


def unit_windows(teacher, *, max_length=40, stride=10):
    windows, _ = make_windows(documents(fixtures_models.multilingual_texts()), teacher.tokenizer,
                              WindowsConfig(max_length=max_length, stride=stride))
    return windows


def label(teacher, windows, packing, batch_tokens=300):
    layout = make_layout("token_topk", k=K, value_codec="float32", vocab_size=teacher.vocab_size,
                         target_logprob=True)
    return label_unit(teacher, windows, spec=SPEC, layout=layout, batch_tokens=batch_tokens, packing=packing,
                      seed=0, store_entropy=True)


def assert_same_labels(packed, padded, *, atol=1e-4):
    """Equal records: top-k ids (a swap at a tie of the k-th value allowed), their
    log-probabilities, entropy and target log-probability, NaN where each window ends."""
    assert packed.record_id.tolist() == padded.record_id.tolist()
    assert np.array_equal(packed.input_ids, padded.input_ids)
    same = (packed.topk_ids == padded.topk_ids).all(axis=1)
    for row in np.flatnonzero(~same):  # another id only where the k-th values tie
        for one, other in ((packed, padded), (padded, packed)):
            values = one.topk_logprobs[row]
            extra = ~np.isin(one.topk_ids[row], other.topk_ids[row])
            assert (values[extra] <= values.min() + atol).all()
    assert same.mean() > 0.99
    np.testing.assert_allclose(packed.topk_logprobs[same], padded.topk_logprobs[same], atol=atol, rtol=0)
    np.testing.assert_allclose(packed.entropy.astype(np.float32), padded.entropy.astype(np.float32),
                               atol=2e-3, rtol=1e-3)
    np.testing.assert_array_equal(np.isnan(packed.target_logprob), np.isnan(padded.target_logprob))
    np.testing.assert_allclose(packed.target_logprob.astype(np.float32), padded.target_logprob.astype(np.float32),
                               atol=2e-3, rtol=1e-3)


def assert_nan_at_window_ends(block):
    """The target log-prob is NaN at each window's last token and nowhere else."""
    ends = np.zeros(block.num_positions, dtype=bool)
    ends[block.label_offsets[1:] - 1] = True
    np.testing.assert_array_equal(np.isnan(block.target_logprob), ends)


@pytest.mark.parametrize(("family", "attn"), CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_packed_labels_equal_padded_ones_for_each_family(family_dirs, family, attn):
    teacher = teacher_of(family_dirs[family], attn)
    windows = unit_windows(teacher)
    packed, packed_stats = label(teacher, windows, "auto")
    padded, padded_stats = label(teacher, windows, "off")
    assert packed_stats.packing == "packed" and padded_stats.packing == "padded"
    assert packed_stats.padded_tokens < padded_stats.padded_tokens
    assert any(w.context_length for w in windows)  # left context is skipped in packed rows too
    assert_same_labels(packed, padded)
    assert_nan_at_window_ends(packed)
    # a mask exactly for the classes that do not keep packed rows apart by their position ids
    assert (packed_stats.packing_mask is not None) == (family == "opt"), packed_stats.packing_mask


def test_a_teacher_the_probe_refuses_falls_back_to_padded_rows(monkeypatch, tiny_causal_lm_dir):
    def refuse(model, *, where, error, **kwargs):
        raise error(f"{where}: {type(model).__name__} lets the records packed into one row attend to each other")

    monkeypatch.setattr(teacher_module, "choose_packing_mask", refuse)
    teacher = teacher_of(tiny_causal_lm_dir)
    windows = unit_windows(teacher)
    block, stats = label(teacher, windows, "auto")
    assert stats.packing == "padded" and stats.packing_mask is None
    assert stats.packing_note.startswith("teacher: LlamaForCausalLM lets the records packed")
    assert stats.to_dict()["packing_note"] == stats.packing_note
    reference, reference_stats = label(teacher, windows, "off")
    assert stats.padded_tokens == reference_stats.padded_tokens
    assert_same_labels(block, reference, atol=0)


def test_a_teacher_that_leaks_across_packed_windows_is_refused_and_stays_correct(monkeypatch, tiny_causal_lm_dir):
    from transformers.models.llama import modeling_llama

    # one causal mask over the whole row, whatever the position ids say: padded rows are still
    # right (causal, padding only at the end), packed rows would see the windows before them
    monkeypatch.setattr(modeling_llama, "create_causal_mask", lambda *args, **kwargs: None)
    teacher = teacher_of(tiny_causal_lm_dir)
    windows = unit_windows(teacher)
    block, stats = label(teacher, windows, "auto")
    assert stats.packing == "padded" and "does not stop it" in stats.packing_note
    reference, _ = label(teacher, windows, "off")
    assert_same_labels(block, reference, atol=0)
    teacher.packing = PackedRows(ok=True)  # forced: the windows after the first of a row go wrong
    leaked, _ = label(teacher, windows, "auto")
    assert not np.allclose(leaked.topk_logprobs, reference.topk_logprobs, atol=1e-3)


def test_a_classifier_keeps_one_padded_record_per_row(tiny_classifier_dir):
    teacher = teacher_of(tiny_classifier_dir, task="sequence_classification")
    assert not teacher.packed_rows().ok
    windows, _ = make_windows(documents(fixtures_models.multilingual_texts()), teacher.tokenizer,
                              WindowsConfig(max_length=40), task="sequence_classification")
    layout = make_layout("sequence_probs", vocab_size=teacher.vocab_size, num_classes=3, value_codec="float32")
    block, stats = label_unit(teacher, windows, spec=SPEC, layout=layout, batch_tokens=300, packing="auto",
                              seed=0, store_entropy=False)
    assert stats.packing == "padded" and not stats.packing_note
    assert block.num_records == len(windows)


def test_a_row_that_does_not_fit_alone_names_its_packed_windows(monkeypatch, tiny_causal_lm_dir):
    original = Teacher.packed_hidden_states

    def out_of_memory(self, input_ids, position_ids):
        starts = (position_ids == 0) & (input_ids != self.pad_token_id)  # of windows, not of padding
        if len(input_ids) > 1 or int(starts.sum()) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, input_ids, position_ids)

    monkeypatch.setattr(Teacher, "packed_hidden_states", out_of_memory)
    teacher = teacher_of(tiny_causal_lm_dir)
    windows = [Window(record_id=i, doc_key=f"d{i}", lang="en", label=None, window_index=0,
                      input_ids=np.arange(n) + 4, context_length=0) for i, n in enumerate((16, 10, 5))]
    with pytest.raises(TeacherOutOfMemoryError, match=r"^one row of 15 tokens \(2 windows packed together\) "
                                                      r"does not fit the teacher's device memory even alone"):
        label(teacher, windows, "auto")


@pytest.mark.parametrize("packed", [True, False])
def test_batches_split_by_rows_keep_their_width_and_windows(tiny_causal_lm_dir, packed):
    teacher = teacher_of(tiny_causal_lm_dir)
    windows = unit_windows(teacher)
    batch = next(unit_batches(windows, batch_tokens=400, pad_id=0, packed=packed))
    first, second = batch.halves()
    assert first.num_rows + second.num_rows == batch.num_rows
    assert first.input_ids.shape[1] == second.input_ids.shape[1] == batch.input_ids.shape[1]
    assert np.concatenate([first.indices, second.indices]).tolist() == batch.indices.tolist()
    extra = "position_ids" if packed else "attention_mask"
    assert torch.equal(torch.cat([getattr(first, extra), getattr(second, extra)]), getattr(batch, extra))
    for part in (first, second):
        window, offset = part.slots()
        for j, index in enumerate(part.indices):
            row, start, n = part.rows[j], part.starts[j], part.lengths[j]
            assert part.input_ids[row, start:start + n].tolist() == windows[index].input_ids.tolist()
            assert (window[row, start:start + n] == j).all() and offset[row, start:start + n].tolist() == list(range(n))


def test_collate_packed_restarts_positions_per_window_and_padding():
    windows = [SimpleNamespace(input_ids=np.arange(n) + 10 * n) for n in (3, 2, 4, 1)]
    batch = collate_packed(windows, [np.array([2, 3]), np.array([0, 1])], pad_id=-1)
    assert batch.input_ids.tolist() == [[40, 41, 42, 43, 10], [30, 31, 32, 20, 21]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert batch.packed and batch.attention_mask is None
    assert batch.real_tokens == 10 and batch.padded_tokens == 10
    short = collate_packed(windows, [np.array([2]), np.array([1])], pad_id=-1)
    assert short.input_ids.tolist() == [[40, 41, 42, 43], [20, 21, -1, -1]]
    assert short.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 1]]
    window, _ = short.slots()
    assert window.tolist() == [[0, 0, 0, 0], [1, 1, -1, -1]]


@given(st.lists(st.integers(1, 200), min_size=1, max_size=120), st.integers(1, 2000))
def test_packed_rows_hold_each_window_once_within_the_longest(lengths, budget):
    lengths = np.array(lengths)
    rows = pack_rows(lengths)
    assert sorted(np.concatenate(rows).tolist()) == list(range(len(lengths)))
    assert all(lengths[row].sum() <= lengths.max() for row in rows)
    assert all(lengths[row].tolist() == sorted(lengths[row].tolist(), reverse=True) for row in rows)
    batches = plan_packed_batches(lengths, batch_tokens=budget)
    assert sorted(np.concatenate([np.concatenate(b) for b in batches]).tolist()) == list(range(len(lengths)))
    for batch in batches:
        fills = [int(lengths[row].sum()) for row in batch]
        assert len(batch) == 1 or (len(batch) * max(fills) <= budget
                                   and 1 - sum(fills) / (len(batch) * max(fills)) <= MAX_PACKED_PADDING)


def test_a_short_window_does_not_open_a_row_as_wide_as_the_longest():
    lengths = np.array([512] + [40] * 30)
    rows = pack_rows(lengths)
    assert rows[0].tolist() == [0]  # the long window fills its row alone
    assert all(lengths[row].sum() <= 64 for row in rows[1:])  # 40-token windows open rows of 64


# ------------------------------------------------------------------ padding of whole corpora


def skewed_docs(count=600, seed=0):
    """Many short documents (one demo text each) and, every 50th, a long one of 40 texts."""
    rng = random.Random(seed)
    texts = [row["text"] for row in demo_rows()]
    return [{"id": f"d{i:05d}", "lang": "und", "text": " ".join(rng.choice(texts) for _ in range(40 if i % 50 == 0 else 1))}
            for i in range(count)]


def demo_rows():
    from pathlib import Path

    return [json.loads(line) for path in sorted(Path(demo_corpus_dir()).glob("*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize(("corpus", "max_length", "unit_documents"), [("demo", 128, 200), ("skewed", 512, 200)])
def test_packing_leaves_at_most_two_percent_padding(tmp_path, tiny_causal_lm_dir, corpus, max_length,
                                                    unit_documents):
    rows = demo_rows() if corpus == "demo" else skewed_docs()
    fixtures_models.write_corpus(tmp_path / "corpus", rows, parts=1)
    cfg = job(tmp_path / "cache", tmp_path / "corpus", tiny_causal_lm_dir,
              corpus={"unit_documents": unit_documents}, teacher={"batch_tokens": 4096},
              windows={"max_length": max_length})
    summary = build_cache(cfg, progress=False)
    shards = CacheReader(str(tmp_path / "cache")).shards
    assert {entry.stats["packing"] for entry in shards} == {"packed"}
    assert summary.padding_fraction <= 0.02, summary.padding_fraction
    assert all(1 - entry.stats["tokens"] / entry.stats["padded_tokens"] <= 0.02 for entry in shards)
    # the same units' windows one to a row, batched as with teacher.packing off, pad far more
    teacher = teacher_of(tiny_causal_lm_dir)
    real = padded = 0
    for start in range(0, len(rows), unit_documents):
        windows = make_windows(documents(rows[start:start + unit_documents]), teacher.tokenizer, cfg.windows)[0]
        lengths = np.array([len(w.input_ids) for w in windows])
        real += lengths.sum()
        padded += sum(len(group) * lengths[group].max() for group in plan_batches(lengths, batch_tokens=4096))
    assert real == summary.tokens and 1 - real / padded > max(0.03, 3 * summary.padding_fraction)


def test_a_build_with_packing_off_writes_the_packed_build_s_records(tmp_path, corpus_dir, tiny_causal_lm_dir):
    builds = {}
    for packing in ("auto", "off"):
        cfg = job(tmp_path / packing, corpus_dir, tiny_causal_lm_dir, teacher={"packing": packing},
                  soft_labels={"entropy": True})
        build_cache(cfg, progress=False)
        reader = CacheReader(str(tmp_path / packing))
        assert {entry.stats["packing"] for entry in reader.shards} == {"packed" if packing == "auto" else "padded"}
        builds[packing] = [reader.read_shard(entry) for entry in reader.shards]
    for packed, padded in zip(builds["auto"], builds["off"], strict=True):
        assert_same_labels(packed, padded)
        assert_nan_at_window_ends(packed)


def test_the_teacher_is_probed_once(monkeypatch, tiny_causal_lm_dir):
    calls = []
    original = teacher_module.choose_packing_mask

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(teacher_module, "choose_packing_mask", counted)
    teacher = teacher_of(tiny_causal_lm_dir)
    windows = unit_windows(teacher)
    for _ in range(2):
        label(teacher, windows, "auto")
    assert len(calls) == 1 and teacher.packed_rows() == PackedRows(ok=True)

