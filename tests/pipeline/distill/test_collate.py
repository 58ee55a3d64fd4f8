"""Packing records into fixed-shape batches: slots, targets, labels, order."""

from dataclasses import fields
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from logitcache.pipeline.distill.collate import SequencePacker, TokenPacker, row_pieces
from logitcache.pipeline.distill.losses import IGNORE_INDEX
from logitcache.storage_schemas.value_codecs import get_value_codec
from tests.factories import make_layout


def record(index: int, n: int, *, context: int = 0, k: int = 3, samples: int = 0, rng=None,
           value_codec: str = "float16"):
    """A record as the dataset hands it over: top-k in the stored types of a 50-id vocabulary."""
    rng = rng or np.random.default_rng(index)
    labelled = n - context
    logprobs = np.ascontiguousarray(np.sort(-4 * rng.random((labelled, k)).astype(np.float32), axis=1)[:, ::-1])
    rec = SimpleNamespace(
        record_id=1000 + index, lang=["en", "de"][index % 2], cursor=(0, 0, index, 99),
        input_ids=np.arange(n, dtype=np.int64) + 10 * index, context_length=context,
        topk_ids=rng.integers(0, 50, size=(labelled, k)).astype(np.uint8),
        topk_values=get_value_codec(value_codec).encode(logprobs),
        sample_offsets=None, sample_ids=None, sample_counts=None, class_logprobs=None, label=-1,
    )
    rec.topk_logprobs = get_value_codec(value_codec).decode(rec.topk_values)  # what decoding must give
    if samples:
        per = rng.integers(1, samples + 1, size=labelled)
        rec.sample_offsets = np.concatenate([[0], np.cumsum(per)])
        rec.sample_ids = rng.integers(0, 50, size=int(per.sum()))
        rec.sample_counts = rng.integers(1, 5, size=int(per.sum()))
    return rec


def test_records_are_packed_in_order_with_restarting_positions():
    layout = make_layout("token_topk", k=3, vocab_size=50)
    records = [record(0, 5), record(1, 4, context=2), record(2, 7), record(3, 3)]
    batches = list(TokenPacker(layout, rows=2, length=10).pack(records))
    # row 0: records 0 (5) + 1 (4) = 9 slots; record 2 (7) opens row 1; record 3 (3) fits after it
    assert len(batches) == 1
    batch = batches[0]
    assert batch.input_ids.shape == (2, 10) and batch.topk_ids.shape == (2, 10, 3)
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0]
    assert batch.position_ids[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    assert batch.segment[0].tolist() == [0] * 5 + [1] * 4 + [-1]
    assert batch.segment[1].tolist() == [2] * 7 + [3] * 3
    # record 1 has 2 context tokens: labels only on its last two slots
    assert batch.label_mask[0].tolist() == [True] * 5 + [False, False, True, True, False]
    assert batch.hard_targets[0, :5].tolist() == [1, 2, 3, 4, IGNORE_INDEX]
    assert batch.hard_targets[0, 5:].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 13, IGNORE_INDEX, IGNORE_INDEX]
    assert torch.equal(batch.topk_ids[0, 7:9], torch.from_numpy(records[1].topk_ids.astype(np.int64)))
    assert torch.isinf(batch.topk_logprobs[0, 9]).all()
    assert batch.tokens == 19 and batch.langs == ["en", "de", "en", "de"]
    assert [c[2] for c in batch.cursors] == [0, 1, 2, 3]
    assert batch.position_langs().tolist() == ["en"] * 5 + ["de"] * 2 + ["en"] * 7 + ["de"] * 3


def test_batches_split_where_rows_run_out_and_keep_every_record_once():
    layout = make_layout("token_topk", k=3, vocab_size=50)
    rng = np.random.default_rng(0)
    records = [record(i, int(rng.integers(1, 9)), rng=rng) for i in range(40)]
    batches = list(TokenPacker(layout, rows=3, length=8).pack(records))
    seen = [rid for b in batches for rid in b.record_ids.tolist()]
    assert seen == [r.record_id for r in records]
    for b in batches:
        assert b.input_ids.shape == (3, 8)
        assert int((b.segment >= 0).sum()) == b.tokens


def test_sampled_draws_are_spread_into_fixed_slots():
    layout = make_layout("token_sampled", samples=4, vocab_size=50)
    rec = record(0, 6, context=1, samples=4)
    batch = TokenPacker(layout, rows=1, length=8).collate([rec])
    assert batch.topk_ids is None and batch.sample_ids.shape == (1, 8, 4)
    for p in range(5):
        a, b = rec.sample_offsets[p], rec.sample_offsets[p + 1]
        assert batch.sample_ids[0, 1 + p, : b - a].tolist() == rec.sample_ids[a:b].tolist()
        assert batch.sample_counts[0, 1 + p, : b - a].tolist() == rec.sample_counts[a:b].tolist()
        assert batch.sample_counts[0, 1 + p, b - a:].sum() == 0
    assert batch.sample_counts[0, 0].sum() == 0  # context slot


def test_a_record_longer_than_the_batch_length_is_an_error():
    layout = make_layout("token_topk", k=3, vocab_size=50)
    with pytest.raises(ValueError, match="more than the batch length"):
        list(TokenPacker(layout, rows=2, length=4).pack([record(0, 5)]))


def test_sequence_batches_pad_one_record_per_row():
    layout = make_layout("sequence_probs", num_classes=3, vocab_size=50)
    records = [SimpleNamespace(record_id=i, lang="en", cursor=(0, 0, i, 3), input_ids=np.arange(n) + 1,
                               class_logprobs=np.log(np.full(3, 1 / 3, dtype=np.float32)), label=i - 1)
               for i, n in enumerate([3, 5, 2])]
    (batch,) = list(SequencePacker(layout, rows=4, pad_id=0).pack(records))
    assert batch.input_ids.shape == (3, 5)
    assert batch.attention_mask.sum(1).tolist() == [3, 5, 2]
    assert batch.labels.tolist() == [-1, 0, 1]
    assert batch.tokens == 10


def test_row_pieces_of_a_packed_batch_are_the_batches_a_smaller_packer_makes():
    # packing is greedy in stream order, so the pieces of a 4-row batch are 2-row batches
    layout = make_layout("token_topk_sampled", k=3, vocab_size=50, samples=4)
    rng = np.random.default_rng(0)
    records = [record(i, int(rng.integers(2, 9)), context=int(i % 3 == 0), samples=4) for i in range(40)]
    big = next(iter(TokenPacker(layout, rows=4, length=10).pack(records)))
    small = list(TokenPacker(layout, rows=2, length=10).pack(records))[:2]
    pieces = row_pieces(big, rows=4, piece_rows=2)
    assert len(pieces) == 2
    for piece, expected in zip(pieces, small, strict=True):
        for name in ("input_ids", "position_ids", "label_mask", "hard_targets", "topk_ids", "topk_logprobs",
                     "sample_ids", "sample_counts"):
            assert torch.equal(getattr(piece, name), getattr(expected, name)), name
        assert piece.tokens == expected.tokens
        # records stay whole (segment indexes them): the languages of the piece's positions hold
        assert piece.position_langs().tolist() == expected.position_langs().tolist()
    assert pieces[0].input_ids.data_ptr() == big.input_ids.data_ptr()  # a view, no copy
    assert sum(p.tokens for p in pieces) == big.tokens


def test_row_pieces_of_padding_rows_are_none_and_their_count_follows_the_rows():
    layout = make_layout("token_topk", k=3, vocab_size=50)
    # the last batch of a stream: records in rows 0..2 of 5, rows 3 and 4 all padding
    short = TokenPacker(layout, rows=5, length=6).collate([record(0, 5), record(1, 4), record(2, 6)])
    pieces = row_pieces(short, rows=5, piece_rows=2)
    assert [None if p is None else p.input_ids.shape[0] for p in pieces] == [2, 2, None]
    assert [p.tokens for p in pieces[:2]] == [9, 6]
    assert pieces[1].row_tokens.tolist() == [6, 0]
    assert row_pieces(None, rows=5, piece_rows=2) == [None, None, None]  # a dry rank keeps in step
    assert row_pieces(short, rows=5, piece_rows=None) == [short] == row_pieces(short, rows=5, piece_rows=5)


def test_row_pieces_of_a_sequence_batch_keep_their_records():
    layout = make_layout("sequence_probs", num_classes=3, vocab_size=50)
    records = [SimpleNamespace(record_id=i, lang=["en", "de"][i % 2], cursor=(0, 0, i, 3),
                               input_ids=np.arange(n) + 1, class_logprobs=np.log(np.full(3, 1 / 3, dtype=np.float32)),
                               label=i % 3) for i, n in enumerate([3, 5, 2])]
    (batch,) = list(SequencePacker(layout, rows=3, pad_id=0).pack(records))
    first, second = row_pieces(batch, rows=3, piece_rows=2)
    assert first.record_ids.tolist() == [0, 1] and second.record_ids.tolist() == [2]
    assert first.langs == ["en", "de"] and second.labels.tolist() == [2]
    assert (first.tokens, second.tokens) == (8, 2)
    assert torch.equal(second.class_logprobs, batch.class_logprobs[2:])
    # a short classification batch has fewer rows: the pieces past them are None
    assert row_pieces(batch, rows=6, piece_rows=2)[2] is None


def test_moving_a_batch():
    layout = make_layout("token_topk", k=3, vocab_size=50)
    batch = TokenPacker(layout, rows=1, length=6).collate([record(0, 4)])
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.record_ids is batch.record_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory needs an accelerator)")
def test_pinned_batches_keep_their_values_and_move_without_blocking():
    layout = make_layout("token_topk", k=3, vocab_size=50)
    batch = TokenPacker(layout, rows=2, length=6, decode=False).collate([record(0, 4), record(1, 5)])
    pinned = batch.pin_memory()
    tensors = [f.name for f in fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)]
    assert all(getattr(pinned, name).is_pinned() for name in tensors)
    assert all(torch.equal(getattr(pinned, name), getattr(batch, name)) for name in tensors)
    on_gpu = pinned.to("cuda", non_blocking=True).decoded()
    torch.cuda.synchronize()
    want = batch.decoded()
    assert torch.equal(on_gpu.topk_ids.cpu(), want.topk_ids)
    assert torch.equal(on_gpu.topk_logprobs.cpu(), want.topk_logprobs)


@pytest.mark.parametrize("value_codec", ["q8", "float16", "float32"])
@pytest.mark.parametrize("vocab_size", [50, 40_000, 70_000])
def test_every_slot_without_a_label_carries_no_mass_and_ids_are_widened(value_codec, vocab_size):
    """The top-k outputs start uninitialised: context, padding and unused rows must all be filled,
    and ids above the signed range of their transport type come back unsigned."""
    layout = make_layout("token_topk", k=3, vocab_size=vocab_size, value_codec=value_codec)
    records = [record(i, n, context=c, value_codec=value_codec)
               for i, (n, c) in enumerate([(6, 2), (5, 0), (8, 3), (2, 1)])]
    for rec in records:  # ids near the top of the vocabulary: their stored bits are negative as signed
        rec.topk_ids = (vocab_size - 1 - rec.topk_ids.astype(np.int64)).astype(layout.id_type)
    # garbage in the allocator's free memory would show up below if a slot were left unfilled
    for _ in range(3):
        np.full((3, 12, 3), 777, dtype=np.int64), np.full((3, 12, 3), 5.0, dtype=np.float32)
    batch = next(TokenPacker(layout, rows=3, length=12).pack(records))  # row 2 stays unused
    unlabelled = ~batch.label_mask
    assert batch.stored is None and batch.topk_ids.dtype == torch.int64 and batch.topk_logprobs.dtype == torch.float32
    assert (batch.topk_ids[unlabelled] == 0).all()
    assert torch.isneginf(batch.topk_logprobs[unlabelled]).all()
    assert not unlabelled[2].logical_not().any()  # the unused row: nothing labelled
    labelled_ids = torch.cat([torch.from_numpy(r.topk_ids.astype(np.int64)) for r in records])
    assert torch.equal(batch.topk_ids[batch.label_mask], labelled_ids)
    assert torch.equal(batch.topk_logprobs[batch.label_mask], torch.cat([torch.from_numpy(r.topk_logprobs) for r in records]))


@pytest.mark.parametrize("value_codec", ["q8", "float16", "float32"])
def test_stored_batches_are_a_fraction_of_the_bytes_and_decode_to_the_same_batch(value_codec):
    layout = make_layout("token_topk", k=8, vocab_size=40_000, value_codec=value_codec)
    rng = np.random.default_rng(5)
    records = [record(i, int(rng.integers(2, 9)), context=1, k=8, rng=rng, value_codec=value_codec)
               for i in range(12)]
    for rec in records:
        rec.topk_ids = rng.integers(0, 40_000, size=rec.topk_ids.shape).astype(np.uint16)
    decoded = list(TokenPacker(layout, rows=2, length=16).pack(records))
    stored = list(TokenPacker(layout, rows=2, length=16, decode=False).pack(records))
    assert len(stored) == len(decoded) > 1
    for s, d in zip(stored, decoded, strict=True):
        assert s.stored is not None and s.topk_ids.dtype == torch.int16
        assert s.topk_logprobs.dtype == {"q8": torch.uint8, "float16": torch.float16, "float32": torch.float32}[value_codec]
        wide_bytes = d.topk_ids.nbytes + d.topk_logprobs.nbytes
        # uint16 + uint8 against int64 + float32: 3 of 12 bytes; with float16 values 4, float32 6
        assert s.topk_ids.nbytes + s.topk_logprobs.nbytes == wide_bytes * {"q8": 3, "float16": 4, "float32": 6}[value_codec] // 12
        before = s.topk_ids.clone(), s.topk_logprobs.clone()
        again = s.to("cpu").decoded()
        assert torch.equal(s.topk_ids, before[0]) and torch.equal(s.topk_logprobs, before[1])  # left as stored
        assert again.stored is None and again.decoded() is again
        for name in ("input_ids", "position_ids", "segment", "label_mask", "hard_targets", "topk_ids", "topk_logprobs"):
            assert torch.equal(getattr(again, name), getattr(d, name)), name
