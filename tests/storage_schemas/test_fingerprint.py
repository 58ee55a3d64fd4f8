from hypothesis import given
from hypothesis import strategies as st

from logitcache.storage_schemas.fingerprint import diff_fields, fingerprint

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=10,
)


def test_key_order_does_not_matter():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})


def test_values_matter():
    assert fingerprint({"k": 64}) != fingerprint({"k": 32})


def test_diff_names_nested_fields():
    old = {"teacher": {"model": "a", "dtype": "bf16"}, "k": 64}
    new = {"teacher": {"model": "b", "dtype": "bf16"}, "k": 64, "extra": 1}
    assert diff_fields(old, new) == ['extra: absent -> 1', 'teacher.model: "a" -> "b"']


@given(json_values, json_values)
def test_diff_is_empty_exactly_when_fingerprints_agree(a, b):
    assert (diff_fields(a, b) == []) == (fingerprint(a) == fingerprint(b))
