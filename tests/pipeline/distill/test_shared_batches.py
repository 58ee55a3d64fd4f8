"""DataLoader workers pack batches into shared slots they reuse, never under a live batch."""

import gc
import os
import pickle
from dataclasses import fields
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers the reductions of shared tensors)

from logitcache.pipeline.distill import shared_batches
from logitcache.pipeline.distill.collate import PackedBatches, TokenPacker
from tests.factories import make_layout
from tests.pipeline.distill.test_collate import record


def records(count: int, *, samples: int = 0) -> list:
    rng = np.random.default_rng(7)
    return [record(i, int(rng.integers(2, 9)), context=int(i % 3 == 0), samples=samples, rng=rng)
            for i in range(count)]


def assert_same_batch(got, want) -> None:
    for spec in fields(want):
        a, b = getattr(got, spec.name), getattr(want, spec.name)
        if isinstance(b, torch.Tensor):
            # NaN (per-position columns on unlabelled slots) counts as equal to NaN
            same = torch.equal(a, b) or (a.is_floating_point() and a.shape == b.shape
                                         and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
            assert a.dtype == b.dtype and same, spec.name
        elif isinstance(b, np.ndarray):
            assert np.array_equal(a, b), spec.name
        else:
            assert a == b, spec.name


def loader(packer, data, *, slots: int):
    return torch.utils.data.DataLoader(PackedBatches(data, packer, slots=slots), batch_size=None,
                                       num_workers=1, multiprocessing_context="fork")


@pytest.mark.parametrize(("kind", "decode"), [("token_topk", False), ("token_topk", True),
                                              ("token_topk_sampled", False)])
def test_worker_batches_equal_in_process_batches_and_reuse_their_slots(kind, decode):
    layout = make_layout(kind, k=3, samples=4, vocab_size=50)
    packer = TokenPacker(layout, rows=2, length=10, pad_id=1, decode=decode)
    data = records(60, samples=4 if layout.has_samples else 0)
    want = list(packer.pack(data))
    assert len(want) > 10
    made = shared_batches.mappings_made
    got = 0
    for index, batch in enumerate(loader(packer, data, slots=3)):
        assert_same_batch(batch, want[index])
        got += 1
        del batch  # dropped before the next one arrives: its slot is free again
    assert got == len(want)
    assert shared_batches.mappings_made - made <= 3  # three slots went round, not one per batch


def test_batches_a_training_loop_keeps_are_never_overwritten():
    layout = make_layout("token_topk", k=3, vocab_size=50)
    packer = TokenPacker(layout, rows=2, length=10, decode=False)
    data = records(60)
    want = list(packer.pack(data))
    kept, views = [], []
    for index, batch in enumerate(loader(packer, data, slots=2)):
        if index % 2:
            kept.append((index, batch))
        else:  # only a view of one tensor outlives the batch
            views.append((index, batch.topk_logprobs[1, 2:]))
        del batch
        gc.collect()
    for index, batch in kept:
        assert_same_batch(batch, want[index])
    for index, view in views:
        assert torch.equal(view, want[index].topk_logprobs[1, 2:])


def test_a_slot_is_free_once_the_last_view_of_its_batch_is_gone():
    layout = make_layout("token_topk", k=3, vocab_size=50)
    packer = TokenPacker(layout, rows=2, length=10, decode=False)
    ring = packer.slot_ring(capacity=1)
    batch = packer.collate(records(2), ring=ring)
    ring_slot = ring.slots[0]
    received = pickle.loads(ForkingPickler.dumps(batch))
    assert_same_batch(received, batch)
    del batch
    view = received.input_ids[0]
    del received
    gc.collect()
    assert ring_slot.state[0] == 1  # a view is alive: still taken
    arrays, slot = ring.take()
    assert slot is None and ring.overflows == 1  # full ring: ordinary memory
    del view
    gc.collect()
    assert ring_slot.state[0] == 0
    assert ring.take()[1] is ring_slot


def test_a_field_replaced_after_packing_is_pickled_by_value():
    layout = make_layout("token_topk", k=3, vocab_size=50)
    packer = TokenPacker(layout, rows=2, length=10, decode=False)
    batch = packer.collate(records(2), ring=packer.slot_ring(capacity=1))
    batch.hard_targets = batch.hard_targets.clone().fill_(5)
    received = pickle.loads(ForkingPickler.dumps(batch))
    assert_same_batch(received, batch)


def test_a_ring_needs_a_slot():
    with pytest.raises(ValueError, match="capacity of at least 1"):
        shared_batches.SlotRing((), capacity=0)


def _storage_sent(batch) -> bool:
    """Whether pickling ``batch`` now would carry its slot's shared memory."""
    _, args = batch.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
    return args[2] is not None


def test_a_slot_mapped_by_the_receiver_is_sent_by_key_alone():
    layout = make_layout("token_topk", k=3, vocab_size=50)
    packer = TokenPacker(layout, rows=2, length=10, decode=False)
    ring = packer.slot_ring(capacity=1)
    data = records(12)
    first = packer.collate(data[:2], ring=ring)
    assert _storage_sent(first)  # nobody has mapped the slot yet
    received = pickle.loads(ForkingPickler.dumps(first))
    del first, received
    gc.collect()
    second = packer.collate(data[2:4], ring=ring)
    assert second.__dict__["_slot"] is ring.slots[0]
    assert not _storage_sent(second)
    assert_same_batch(pickle.loads(ForkingPickler.dumps(second)), packer.collate(data[2:4]))


def test_a_slot_key_without_its_mapping_is_a_clear_error(monkeypatch):
    layout = make_layout("token_topk", k=3, vocab_size=50)
    packer = TokenPacker(layout, rows=2, length=10, decode=False)
    ring = packer.slot_ring(capacity=1)
    first = packer.collate(records(2), ring=ring)
    pickle.loads(ForkingPickler.dumps(first))
    del first
    gc.collect()
    second = packer.collate(records(2), ring=ring)
    monkeypatch.setattr(shared_batches, "_MAPPED", {})  # as in a process that never saw the slot
    with pytest.raises(RuntimeError, match="never received"):
        pickle.loads(ForkingPickler.dumps(second))


def test_the_slots_of_exited_workers_are_unmapped():
    layout = make_layout("token_topk", k=3, vocab_size=50)
    packer = TokenPacker(layout, rows=2, length=10, decode=False)
    data = records(30)
    epoch = loader(packer, data, slots=2)  # workers not persistent: each epoch has its own
    for batch in epoch:
        del batch
    first_worker = {key[0] for key in shared_batches._MAPPED} - {os.getpid()}
    assert len(first_worker) == 1
    for batch in epoch:
        del batch
    workers = {key[0] for key in shared_batches._MAPPED} - {os.getpid()}
    assert len(workers) == 1 and workers != first_worker
