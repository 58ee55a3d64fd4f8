import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from logitcache.errors import ConfigError
from logitcache.storage_schemas.value_codecs import (
    Q8_STEP,
    VALUE_CODECS,
    get_value_codec,
    value_codec_names,
)

# log-probabilities as a teacher produces them: <= 0, sometimes very small, rows of k
logprob = st.floats(min_value=-80.0, max_value=0.0, width=32, allow_nan=False)
matrices = st.integers(1, 16).flatmap(
    lambda k: arrays(np.float32, st.tuples(st.integers(0, 20), st.just(k)), elements=logprob)
)


def sort_rows(a: np.ndarray) -> np.ndarray:
    return -np.sort(-a, axis=1)


@given(matrices)
def test_float32_is_exact(values):
    codec = get_value_codec("float32")
    assert np.array_equal(codec.decode(codec.encode(values)), values)


@given(matrices)
def test_float16_relative_error(values):
    codec = get_value_codec("float16")
    decoded = codec.decode(codec.encode(values))
    assert decoded.dtype == np.float32
    assert np.all(np.abs(decoded - values) <= np.abs(values) * 2.0**-11 + 1e-7)


@given(matrices, st.booleans())
def test_q8_error_bound_any_row_order(values, presort):
    if presort:
        values = sort_rows(values)
    codec = get_value_codec("q8")
    stored = codec.encode(values)
    assert stored.dtype == np.uint8
    decoded = codec.decode(stored)
    inside = values >= codec.exact_range
    assert np.all(np.abs(decoded - values)[inside] <= Q8_STEP / 2 + 1e-6)
    # below the range: clamped to the floor, a probability error under exp(floor)
    assert np.all(decoded[~inside] == np.float32(codec.exact_range))
    floor_prob = np.exp(codec.exact_range) * (1 + 1e-6)  # float32 rounding
    assert np.all(np.abs(np.exp(decoded) - np.exp(values))[~inside] <= floor_prob)


@given(matrices)
def test_q8_is_idempotent_on_its_levels(values):
    codec = get_value_codec("q8")
    once = codec.decode(codec.encode(values))
    assert np.array_equal(codec.decode(codec.encode(once)), once)


def test_q8_stores_levels_of_a_sixteenth_of_a_nat():
    stored = get_value_codec("q8").encode(np.array([[0.0, -0.5, -1.0, -20.0]], np.float32))
    assert stored.tolist() == [[0, 8, 16, 255]]


def test_q8_clamps_tiny_positive_logprobs():
    codec = get_value_codec("q8")
    assert codec.decode(codec.encode(np.array([[1e-6, -0.5]], np.float32)))[0, 0] == 0.0


@pytest.mark.parametrize("name", value_codec_names())
def test_nan_is_refused(name):
    with pytest.raises(ValueError, match="NaN"):
        get_value_codec(name).encode(np.array([[0.0, np.nan]], np.float32))


@pytest.mark.parametrize("name", value_codec_names())
def test_minus_infinity_decodes_to_a_probability_of_at_most_the_floor(name):
    codec = get_value_codec(name)
    decoded = codec.decode(codec.encode(np.array([[-0.1, -np.inf]], np.float32)))
    if codec.lossless:
        assert decoded[0, 1] == -np.inf
    else:
        assert np.exp(decoded[0, 1]) <= np.exp(codec.exact_range) * (1 + 1e-6)


def test_at_least_one_codec_of_one_byte_or_less():
    assert any(np.dtype(c.storage_dtype).itemsize <= 1 for c in VALUE_CODECS.values())


def test_unknown_codec_lists_the_known_ones():
    with pytest.raises(ConfigError, match="float16"):
        get_value_codec("float8x")


@settings(max_examples=50)
@given(matrices)
def test_tail_mass_stays_meaningful_after_q8(values):
    # rows normalised over a larger vocabulary: the decoded tail mass stays close
    rows = sort_rows(values)
    codec = get_value_codec("q8")
    decoded = codec.decode(codec.encode(rows))
    k = rows.shape[1]
    # each prob is off by at most a factor exp(±1/32), or by exp(floor) when clamped
    bound = k * np.exp(codec.exact_range) + (np.exp(Q8_STEP / 2) - 1) * np.exp(rows).sum(axis=1)
    assert np.all(np.abs(np.exp(decoded).sum(axis=1) - np.exp(rows).sum(axis=1)) <= bound + 1e-6)


@pytest.mark.parametrize("shape", [(10_000, 8), (3, 5_000, 4), (4_096, 1), (0, 64)])
def test_q8_decode_is_elementwise(shape):
    stored = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    expected = stored.astype(np.float32) * np.float32(-Q8_STEP)
    np.testing.assert_array_equal(get_value_codec("q8").decode(stored), expected)


# any float32 a teacher's log_softmax can give, with q8's clamp and float16's subnormals in reach
any_logprob = st.one_of(logprob, st.floats(min_value=-2.0**-13, max_value=0.0, width=32),
                        st.floats(min_value=-1e5, max_value=-80.0, width=32))


@pytest.mark.parametrize("name", list(VALUE_CODECS))
@given(values=arrays(np.float32, st.integers(0, 40), elements=any_logprob))
def test_error_bound_holds_for_every_value(name, values):
    codec = get_value_codec(name)
    with np.errstate(over="ignore"):  # float16 overflows to -inf beyond -65520: inf bound
        decoded = codec.decode(codec.encode(values)).astype(np.float64)
    bound = codec.error_bound(values)
    assert bound.shape == values.shape and bound.dtype == np.float64
    assert np.all(np.abs(decoded - values.astype(np.float64)) <= bound)


def test_error_bound_is_the_documented_one_inside_the_range():
    values = np.array([0.0, -0.5, -4.0, -15.0], dtype=np.float32)
    assert np.all(get_value_codec("float32").error_bound(values) == 0)
    np.testing.assert_allclose(get_value_codec("float16").error_bound(values[1:]), -values[1:] * 2.0**-11)
    assert np.all(get_value_codec("q8").error_bound(values) == Q8_STEP / 2)
    # q8 clamps below its range: the bound grows with the distance to the lowest level
    assert get_value_codec("q8").error_bound(np.array([-20.0]))[0] == pytest.approx(20 - 255 / 16)
    for name in ("float16", "q8"):
        assert get_value_codec(name).error_bound(np.array([-np.inf]))[0] == np.inf
    assert get_value_codec("float16").error_bound(np.array([-7e4]))[0] == np.inf
