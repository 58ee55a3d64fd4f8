"""Top-k labels in the cache's stored types, from the reader to the device, widened there.

At k = 64 a labelled position carries 64 ids and 64 values. Widened on the host (int64 ids,
float32 log-probs: 768 bytes a position) they cost more to pack and to move through a
DataLoader worker's shared memory than reading them from the cache did; in their stored
types (uint16 ids and q8 bytes for a 32k vocabulary: 192 bytes) they are a quarter of that.
So the packer copies the stored bytes into the batch, and :func:`widen_topk` turns them into
int64 ids and float32 log-probs wherever the batch is by then: after ``batch.to("cuda")``
that is a few elementwise kernels on the GPU.

Torch has no full support for uint16 and uint32, so ids travel as the *bits* of their
stored type in the signed type of the same width (uint16 -> int16, uint32 -> int32; uint8
stays uint8) and are masked back to unsigned when widened: no copy on the host, exact on
every device. Values travel as the codec stores them, and are decoded by the codec's numpy
decoder on the CPU and by the same arithmetic in torch elsewhere; a test holds the two equal
bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from logitcache.storage_schemas.value_codecs import Q8_STEP, get_value_codec

#: the numpy type whose bits carry each stored id type through torch
_ID_TRANSPORT = {"uint8": np.uint8, "uint16": np.int16, "uint32": np.int32}
_ID_MASK = {"uint8": 0xFF, "uint16": 0xFFFF, "uint32": 0xFFFFFFFF}


@dataclass(frozen=True)
class StoredTopK:
    """How a batch's top-k tensors are stored: its cache's id type and value codec."""

    id_type: str
    value_codec: str

    @property
    def id_transport_dtype(self) -> np.dtype:
        return np.dtype(_ID_TRANSPORT[self.id_type])

    @property
    def value_dtype(self) -> np.dtype:
        return np.dtype(get_value_codec(self.value_codec).storage_dtype)


def id_bits(ids: np.ndarray, id_type: str) -> np.ndarray:
    """``ids`` of ``id_type`` viewed as their transport type (no copy)."""
    return np.asarray(ids, dtype=id_type).view(_ID_TRANSPORT[id_type])


def widen_ids(bits: Tensor, id_type: str) -> Tensor:
    """int64 ids from the transport bits of ``id_type``, on the tensor's device."""
    wide = bits.to(torch.int64)
    if bits.dtype != torch.uint8:
        wide.bitwise_and_(_ID_MASK[id_type])
    return wide


def decode_values(stored: Tensor, value_codec: str) -> Tensor:
    """float32 log-probabilities from the codec's stored values, on the tensor's device, in
    new memory (the caller may write to it without touching ``stored``)."""
    if stored.device.type == "cpu":
        source = stored.numpy()
        decoded = get_value_codec(value_codec).decode(source)
        return torch.from_numpy(decoded.copy() if np.may_share_memory(decoded, source) else decoded)
    return decode_values_torch(stored, value_codec)


def decode_values_torch(stored: Tensor, value_codec: str) -> Tensor:
    """:func:`decode_values`' arithmetic off the CPU, in torch wherever the tensor is."""
    if value_codec == "q8":  # levels of 1/16 nat below zero
        return stored.to(torch.float32).mul_(-Q8_STEP)
    return stored.to(torch.float32, copy=True)  # float32 values too: never an alias of ``stored``


def widen_topk(ids: Tensor, values: Tensor, label_mask: Tensor, stored: StoredTopK) -> tuple[Tensor, Tensor]:
    """``[..., k]`` int64 ids and float32 log-probs; slots outside ``label_mask`` (context,
    padding) get id 0 and log-probability -inf, i.e. no mass."""
    wide_ids = widen_ids(ids, stored.id_type)
    logprobs = decode_values(values, stored.value_codec)
    unlabelled = ~label_mask.unsqueeze(-1)
    return wide_ids.masked_fill_(unlabelled, 0), logprobs.masked_fill_(unlabelled, float("-inf"))
