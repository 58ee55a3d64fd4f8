"""Top-k in stored types: the device-side widening equals the codecs' numpy decode exactly."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from logitcache.pipeline.distill.stored_topk import (
    StoredTopK,
    decode_values,
    decode_values_torch,
    id_bits,
    widen_ids,
    widen_topk,
)
from logitcache.storage_schemas.value_codecs import get_value_codec

logprob_rows = hnp.arrays(
    np.float32, st.tuples(st.integers(1, 6), st.integers(1, 70)),
    elements=st.floats(-40.0, 0.0, width=32, allow_nan=False),
)


@settings(max_examples=60, deadline=None)
@given(rows=logprob_rows, codec=st.sampled_from(["q8", "float16", "float32"]), sort=st.booleans())
def test_torch_arithmetic_decodes_exactly_what_the_numpy_codec_decodes(rows, codec, sort):
    if sort:  # top-k order; unsorted rows still round-trip (q8's deltas wrap modulo 256)
        # a copy: ascontiguousarray keeps the negative stride of a reversed 1 x 1 view
        rows = np.sort(rows, axis=1)[:, ::-1].copy()
    value_codec = get_value_codec(codec)
    stored = value_codec.encode(rows)
    expected = value_codec.decode(stored)
    in_torch = decode_values_torch(torch.from_numpy(stored), codec)
    assert in_torch.dtype == torch.float32
    assert torch.equal(in_torch, torch.from_numpy(expected))
    assert torch.equal(decode_values(torch.from_numpy(stored), codec), in_torch)


@pytest.mark.parametrize("id_type, vocab", [("uint8", 256), ("uint16", 65_536), ("uint32", 2**32)])
def test_ids_travel_as_bits_and_widen_to_their_unsigned_values(id_type, vocab):
    ids = np.array([0, 1, vocab // 2 - 1, vocab // 2, vocab - 1], dtype=id_type)  # both halves of the range
    bits = torch.from_numpy(id_bits(ids, id_type))
    assert bits.dtype in (torch.uint8, torch.int16, torch.int32)
    assert widen_ids(bits, id_type).tolist() == [int(i) for i in ids]


def test_unlabelled_slots_widen_to_no_mass():
    stored = StoredTopK("uint16", "q8")
    ids = torch.from_numpy(id_bits(np.full((1, 3, 2), 40_000, dtype=np.uint16), "uint16"))
    values = torch.from_numpy(get_value_codec("q8").encode(np.full((1, 3, 2), -1.0, dtype=np.float32)))
    mask = torch.tensor([[True, False, True]])
    wide_ids, logprobs = widen_topk(ids, values, mask, stored)
    assert wide_ids[0, :, 0].tolist() == [40_000, 0, 40_000]
    assert logprobs[0, 1].isneginf().all() and (logprobs[0, [0, 2]] == -1.0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_widening_on_the_gpu_equals_the_cpu():
    rng = np.random.default_rng(0)
    rows = np.sort(-10 * rng.random((64, 512, 64)).astype(np.float32), axis=-1)[..., ::-1]
    for codec in ("q8", "float16"):
        stored = torch.from_numpy(get_value_codec(codec).encode(np.ascontiguousarray(rows)))
        assert torch.equal(decode_values(stored.cuda(), codec).cpu(), decode_values(stored, codec))
    ids = torch.from_numpy(id_bits(rng.integers(0, 65_536, size=(64, 512, 64)).astype(np.uint16), "uint16"))
    assert torch.equal(widen_ids(ids.cuda(), "uint16").cpu(), widen_ids(ids, "uint16"))
