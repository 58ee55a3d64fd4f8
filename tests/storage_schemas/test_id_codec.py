import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from logitcache.errors import LogitcacheError, VocabularyTooLargeError
from logitcache.storage_schemas.id_codec import encode_ids, id_type_for_vocab


@pytest.mark.parametrize(
    ("vocab", "expected"),
    [(1, "uint8"), (256, "uint8"), (257, "uint16"), (32000, "uint16"), (65536, "uint16"),
     (65537, "uint32"), (131073, "uint32"), (151936, "uint32"), (2**32, "uint32")],
)
def test_narrowest_type(vocab, expected):
    assert id_type_for_vocab(vocab) == expected


def test_vocabulary_too_large_names_its_size():
    with pytest.raises(VocabularyTooLargeError, match="4,294,967,297"):
        id_type_for_vocab(2**32 + 1)


def test_id_outside_vocabulary_is_an_error_not_a_wrap():
    # 2**17 + 5 would wrap to 5 in a 17-bit field
    with pytest.raises(LogitcacheError, match="131077"):
        encode_ids(np.array([3, 2**17 + 5]), id_type="uint16", vocab_size=65536)


def test_negative_id_is_an_error():
    with pytest.raises(LogitcacheError, match="-1"):
        encode_ids(np.array([-1, 3]), id_type="uint16", vocab_size=100)


def test_type_too_narrow_for_vocab_is_an_error():
    with pytest.raises(VocabularyTooLargeError):
        encode_ids(np.array([1]), id_type="uint16", vocab_size=70000)


@given(st.integers(1, 2**32), st.data())
def test_ids_round_trip_exactly(vocab, data):
    id_type = id_type_for_vocab(vocab)
    ids = np.array(data.draw(st.lists(st.integers(0, vocab - 1), max_size=20)), dtype=np.int64)
    encoded = encode_ids(ids, id_type=id_type, vocab_size=vocab)
    assert encoded.dtype == np.dtype(id_type)
    assert np.array_equal(encoded.astype(np.int64), ids)
