"""Batches that DataLoader workers build in shared memory they reuse.

A DataLoader worker hands each batch to the training process through shared memory: when
the batch is queued, torch moves every tensor that is not shared yet into a new segment, a
copy into freshly faulted pages (on a VM, ~300 ns a token at k = 64: more than reading the
cache costs). So a worker packs into *slots* instead: shared segments it keeps, one batch
each, every tensor of the batch a view of its slot.

The first batch in a slot carries the slot's shared memory, which torch hands over as a
file descriptor (a socket round trip with an authentication handshake, per batch, if every
batch did it). The training process keeps that mapping for as long as the worker lives,
and says so in the slot's header; from then on the worker sends only the slot's key and
the tensors' offsets, so a reused slot costs neither side a page fault or a descriptor.
Mappings of workers that have exited are dropped when a new slot arrives.

A slot may be reused only once the training process is done with the batch in it, which
DataLoader has no way to say. So the training process builds a batch's tensors on a
``memoryview`` made for that batch alone: every tensor, and every view of one, holds it,
and when the last of them is gone a finalizer marks the slot free in the slot's own header.
The worker takes a free slot, or makes a new one while it has fewer than ``capacity``;
past that it packs into ordinary memory, which torch shares as it always did: a training
loop that keeps its batches costs speed, never correctness.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

#: bytes before the first array: int32 state at 0 (free or taken), int32 at 4 set by the
#: training process once it keeps the slot mapped (the worker then sends the key alone)
_HEADER = 64
_ALIGN = 64
_FREE, _TAKEN = 0, 1


@dataclass(frozen=True)
class ArraySpec:
    """One array of a batch: its field name, type, shape, and the value every batch starts
    from (``None``: the packer writes every element itself)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    fill: int | float | bool | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def new_arrays(specs: tuple[ArraySpec, ...]) -> dict[str, np.ndarray]:
    """The arrays of ``specs`` in ordinary memory, filled."""
    return {s.name: np.empty(s.shape, s.dtype) if s.fill is None else np.full(s.shape, s.fill, s.dtype)
            for s in specs}


@dataclass(frozen=True)
class SlotLayout:
    """Where each array of a batch lies in a slot."""

    specs: tuple[ArraySpec, ...]
    offsets: tuple[int, ...]
    nbytes: int

    @classmethod
    def of(cls, specs: tuple[ArraySpec, ...]) -> SlotLayout:
        offsets, end = [], _HEADER
        for spec in specs:
            offsets.append(end)
            end += -(-spec.nbytes // _ALIGN) * _ALIGN
        return cls(specs=specs, offsets=tuple(offsets), nbytes=end)


class _Slot:
    """One shared segment of a worker's ring."""

    def __init__(self, layout: SlotLayout, key: tuple[int, int, int]) -> None:
        shared = torch.empty(layout.nbytes, dtype=torch.uint8).share_memory_()
        self.key = key  # (worker pid, ring token, slot index)
        self.storage = shared.untyped_storage()
        self.memory = shared.numpy()
        self.memory[:_HEADER] = 0
        self.state = self.memory[:4].view(np.int32)
        self.mapped = self.memory[4:8].view(np.int32)
        self.arrays = {spec.name: _view(self.memory, spec, offset)
                       for spec, offset in zip(layout.specs, layout.offsets, strict=True)}

    def reduce(self, batch: Any) -> tuple:
        """How ``batch`` (a dataclass whose tensor fields view this slot) is pickled: the
        slot's key, its storage (shared by descriptor) until the training process has said
        that it keeps the slot mapped, where each field lies in it, and the other fields. A
        field that no longer views the slot (replaced after packing) is pickled as it is."""
        in_slot, others = [], {}
        base = self.memory.ctypes.data
        for spec_field in fields(batch):
            value = getattr(batch, spec_field.name)
            array = self.arrays.get(spec_field.name)
            if (array is not None and isinstance(value, torch.Tensor)
                    and value.data_ptr() == array.ctypes.data and tuple(value.shape) == array.shape
                    and value.is_contiguous() and value.dtype == _torch_dtype(array.dtype)):
                in_slot.append((spec_field.name, array.dtype.str, array.shape, array.ctypes.data - base))
            else:
                others[spec_field.name] = value
        storage = None if self.mapped[0] else self.storage
        return _rebuild, (type(batch), self.key, storage, tuple(in_slot), others)


class SlotRing:
    """A DataLoader worker's slots for batches of one layout."""

    def __init__(self, specs: tuple[ArraySpec, ...], *, capacity: int = 6) -> None:
        if capacity < 1:
            raise ValueError(f"a slot ring needs a capacity of at least 1, not {capacity}")
        self.layout = SlotLayout.of(specs)
        self.capacity = capacity
        self.token = int.from_bytes(os.urandom(8), "little")  # tells this ring's slots from any other's
        self.slots: list[_Slot] = []
        self.overflows = 0  # batches packed in ordinary memory because every slot was taken

    def take(self) -> tuple[dict[str, np.ndarray], _Slot | None]:
        """Filled arrays for the next batch, and the slot they are in (``None``: ordinary
        memory, every slot being still in use)."""
        slot = next((s for s in self.slots if s.state[0] == _FREE), None)
        if slot is None and len(self.slots) < self.capacity:
            slot = _Slot(self.layout, (os.getpid(), self.token, len(self.slots)))
            self.slots.append(slot)
        if slot is None:
            self.overflows += 1
            return new_arrays(self.layout.specs), None
        slot.state[0] = _TAKEN
        for spec in self.layout.specs:
            if spec.fill is not None:
                slot.arrays[spec.name].fill(spec.fill)
        return slot.arrays, slot


def _rebuild(cls: type, key: tuple[int, int, int], storage: torch.UntypedStorage | None, in_slot: tuple,
             others: dict[str, Any]) -> Any:
    """The batch in the receiving process: its slot fields are views of one memoryview made
    for this batch, whose end frees the slot."""
    memory = _slot_memory(key, storage)
    lease = memoryview(memory)
    tensors = {}
    for name, dtype, shape, offset in in_slot:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=_torch_dtype(dtype))
        else:
            tensors[name] = torch.frombuffer(lease, dtype=_torch_dtype(dtype), count=count,
                                             offset=offset).view(shape)
    finalizer = weakref.finalize(lease, _release, memory[:4].view(np.int32))
    finalizer.atexit = False
    return cls(**tensors, **others)


def _release(state: np.ndarray) -> None:
    state[0] = _FREE


_MAPPED: dict[tuple[int, int, int], np.ndarray] = {}  # slot key -> its bytes, mapped here
_MAPPED_LOCK = threading.Lock()
mappings_made = 0  # slots this process has mapped (tests read it to see slots being reused)


def _slot_memory(key: tuple[int, int, int], storage: torch.UntypedStorage | None) -> np.ndarray:
    """The bytes of the slot ``key``, mapped once and kept while its worker lives."""
    global mappings_made
    with _MAPPED_LOCK:
        memory = _MAPPED.get(key)
        if memory is not None:
            return memory
        if storage is None:
            raise RuntimeError(
                f"a batch from shared slot {key[2]} of DataLoader worker process {key[0]} arrived "
                "without the slot's memory, which this process never received: only the process "
                "that received the slot's first batch can unpickle its later ones")
        for old in [k for k in _MAPPED if not _alive(k[0])]:
            del _MAPPED[old]
        memory = _MAPPED[key] = _bytes_of(storage)
        mappings_made += 1
        memory[4:8].view(np.int32)[0] = 1  # the worker may now send the key alone
        return memory


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def _bytes_of(storage: torch.UntypedStorage) -> np.ndarray:
    """A uint8 array over ``storage`` that keeps it alive."""
    return torch.empty(0, dtype=torch.uint8).set_(storage).numpy()


def _view(memory: np.ndarray, spec: ArraySpec, offset: int) -> np.ndarray:
    return memory[offset:offset + spec.nbytes].view(spec.dtype).reshape(spec.shape)


_TORCH_DTYPES: dict[np.dtype, torch.dtype] = {}


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    found = _TORCH_DTYPES.get(dtype)
    if found is None:
        found = _TORCH_DTYPES[dtype] = torch.from_numpy(np.empty(0, dtype)).dtype
    return found
