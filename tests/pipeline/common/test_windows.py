from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from logitcache.config import WindowsConfig
from logitcache.pipeline.capture.batches import MAX_PADDING, collate, plan_batches
from logitcache.pipeline.common.windows import make_windows, record_id_for, window_spans


@given(st.integers(0, 300), st.integers(2, 40), st.data())
def test_every_position_is_labelled_exactly_once(n, max_length, data):
    stride = data.draw(st.integers(0, max_length - 1))
    spans = window_spans(n, max_length=max_length, stride=stride)
    labelled = np.zeros(n, dtype=int)
    for start, stop, context in spans:
        assert stop - start <= max_length
        assert context <= stop - start
        labelled[start + context:stop] += 1
    assert np.all(labelled == 1)
    if spans:
        assert spans[0][2] == 0 and all(c == stride for _, _, c in spans[1:])


def test_stride_gives_left_context():
    assert window_spans(10, max_length=4, stride=1) == [(0, 4, 0), (3, 7, 1), (6, 10, 1)]
    assert window_spans(10, max_length=4, stride=0) == [(0, 4, 0), (4, 8, 0), (8, 10, 0)]


class CharTokenizer:
    """Stands in for a tokenizer: one id per character, a BOS of 1."""

    def __call__(self, texts, **_kwargs):
        return {"input_ids": [[1] + [ord(c) % 97 + 2 for c in t] if t else [] for t in texts]}


def doc(key, text, lang="en", label=None):
    return SimpleNamespace(key=key, text=text, lang=lang, label=label)


def test_make_windows_keeps_document_order_and_ids():
    docs = [doc("a", "x" * 9), doc("b", "yy", "ru"), doc("c", "")]
    windows, no_tokens = make_windows(docs, CharTokenizer(), WindowsConfig(max_length=4, stride=1))
    assert no_tokens == 1
    assert [(w.doc_key, w.window_index, w.context_length) for w in windows] == [
        ("a", 0, 0), ("a", 1, 1), ("a", 2, 1), ("b", 0, 0)]
    assert sum(len(w.input_ids) - w.context_length for w in windows if w.doc_key == "a") == 10  # BOS + 9 chars
    assert windows[0].record_id == record_id_for("a", 0) != record_id_for("a", 1)


def test_classification_keeps_one_truncated_window():
    windows, _ = make_windows([doc("a", "x" * 9, label=2)], CharTokenizer(),
                              WindowsConfig(max_length=4), task="sequence_classification")
    assert len(windows) == 1 and len(windows[0].input_ids) == 4 and windows[0].label == 2


@given(st.lists(st.integers(1, 60), min_size=1, max_size=50), st.integers(1, 200))
def test_batches_cover_each_window_once_within_budget(lengths, budget):
    groups = plan_batches(lengths, batch_tokens=budget)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    for group in groups:
        longest = max(lengths[i] for i in group)
        assert len(group) * longest <= budget or len(group) == 1


def test_sorted_batching_keeps_padding_small():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=400)
    groups = plan_batches(lengths, batch_tokens=4096)
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert 1 - lengths.sum() / padded < 0.05


def test_a_few_long_windows_do_not_pad_many_short_ones():
    lengths = np.array([128] + [20] * 30)  # all would fit one 4096-token batch padded to 128
    groups = plan_batches(lengths, batch_tokens=4096)
    assert len(groups) == 2 and groups[0].tolist() == [0]
    for group in groups:
        width = max(lengths[i] for i in group)
        assert len(group) == 1 or 1 - lengths[group].sum() / (len(group) * width) <= MAX_PADDING


def test_collate_pads_and_masks():
    windows = [SimpleNamespace(input_ids=np.arange(n)) for n in (3, 1, 2)]
    batch = collate(windows, np.array([0, 2, 1]), pad_id=-7)
    assert batch.input_ids.tolist() == [[0, 1, 2], [0, 1, -7], [0, -7, -7]]
    assert batch.attention_mask.sum().item() == 6 == batch.real_tokens
    assert batch.padded_tokens == 9


@pytest.mark.parametrize("max_length", [2, 5])
def test_record_ids_are_stable(max_length):
    assert record_id_for("doc-1", 0) == record_id_for("doc-1", 0)
    assert 0 <= record_id_for("doc-1", max_length) < 2**64
