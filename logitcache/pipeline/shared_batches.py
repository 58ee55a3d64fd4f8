"""Batches that DataLoader workers build in shared memory they reuse.

A DataLoader worker hands each batch to the training process through shared memory: when
the batch is queued, torch moves every tensor that is not shared yet into a new segment, a
copy into freshly faulted pages (on a VM, ~300 ns a token at k = 64: more than reading the
cache costs). So a worker packs into *slots* instead: shared segments it keeps, one batch
each, every tensor of the batch a view of its slot. Queuing such a batch sends the slot's
descriptor and the tensors' offsets; the training process keeps the mapping of the slots it
has seen, so a reused slot costs neither side a page fault.

A slot may be reused only once the training process is done with the batch in it, which
DataLoader has no way to say. So the training process builds a batch's tensors on a
``memoryview`` made for that batch alone: every tensor, and every view of one, holds it,
and when the last of them is gone a finalizer marks the slot free in the slot's own header.
The worker takes a free slot, or makes a new one while it has fewer than ``capacity``;
past that it packs into ordinary memory, which torch shares as it always did: a training
loop that keeps its batches costs speed, never correctness.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

_HEADER = 64  # bytes before the first array; the first 4 hold the slot's state
_ALIGN = 64
_FREE, _TAKEN = 0, 1
#: the slots whose mappings the training process keeps, so that a reused slot is not mapped
#: again: the newest this many, in at most this many bytes (a ring that is gone leaves at most
#: that much shared memory mapped until newer slots push it out)
KEPT_MAPPINGS = 16
KEPT_BYTES = 256 * 2**20


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

    def __init__(self, layout: SlotLayout) -> None:
        shared = torch.empty(layout.nbytes, dtype=torch.uint8).share_memory_()
        self.storage = shared.untyped_storage()
        self.memory = shared.numpy()
        self.state = self.memory[:4].view(np.int32)
        self.arrays = {spec.name: _view(self.memory, spec, offset)
                       for spec, offset in zip(layout.specs, layout.offsets, strict=True)}

    def reduce(self, batch: Any) -> tuple:
        """How ``batch`` (a dataclass whose tensor fields view this slot) is pickled: the
        slot's storage (shared by descriptor), where each field lies in it, and the other
        fields. A field that no longer views the slot (replaced after packing) is pickled as
        it is."""
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
        return _rebuild, (type(batch), self.storage, tuple(in_slot), others)


class SlotRing:
    """A DataLoader worker's slots for batches of one layout."""

    def __init__(self, specs: tuple[ArraySpec, ...], *, capacity: int = 6) -> None:
        if capacity < 1:
            raise ValueError(f"a slot ring needs a capacity of at least 1, not {capacity}")
        self.layout = SlotLayout.of(specs)
        self.capacity = capacity
        self.slots: list[_Slot] = []
        self.overflows = 0  # batches packed in ordinary memory because every slot was taken

    def take(self) -> tuple[dict[str, np.ndarray], _Slot | None]:
        """Filled arrays for the next batch, and the slot they are in (``None``: ordinary
        memory, every slot being still in use)."""
        slot = next((s for s in self.slots if s.state[0] == _FREE), None)
        if slot is None and len(self.slots) < self.capacity:
            slot = _Slot(self.layout)
            self.slots.append(slot)
        if slot is None:
            self.overflows += 1
            return new_arrays(self.layout.specs), None
        slot.state[0] = _TAKEN
        for spec in self.layout.specs:
            if spec.fill is not None:
                slot.arrays[spec.name].fill(spec.fill)
        return slot.arrays, slot


def _rebuild(cls: type, storage: torch.UntypedStorage, in_slot: tuple, others: dict[str, Any]) -> Any:
    """The batch in the receiving process: its slot fields are views of one memoryview made
    for this batch, whose end frees the slot."""
    memory = _kept_mapping(storage)
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


_KEPT: OrderedDict[int, np.ndarray] = OrderedDict()
_KEPT_LOCK = threading.Lock()
mappings_made = 0  # slots this process has mapped (tests read it to see slots being reused)


def _kept_mapping(storage: torch.UntypedStorage) -> np.ndarray:
    """``storage``'s bytes, kept mapped across batches (see ``KEPT_MAPPINGS``): while this
    process holds it, torch finds the storage in its cache when the same slot arrives again
    instead of mapping it anew."""
    global mappings_made
    key = storage.data_ptr()
    with _KEPT_LOCK:
        memory = _KEPT.get(key)
        if memory is None:
            memory = _bytes_of(storage)
            _KEPT[key] = memory
            mappings_made += 1
            while len(_KEPT) > 1 and (len(_KEPT) > KEPT_MAPPINGS
                                      or sum(m.nbytes for m in _KEPT.values()) > KEPT_BYTES):
                _KEPT.popitem(last=False)
        else:
            _KEPT.move_to_end(key)
        return memory


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
