"""Value codecs: how top-k log-probabilities become bytes, and back.

Each codec is a pair of pure, elementwise functions over ``[n, k]`` arrays of
log-probabilities, in any order (format 4 stores them in the ascending order of their ids;
see ``row_planes``). The log-probabilities
are always normalised over the teacher's FULL vocabulary, so whatever the codec, the tail
mass ``1 - sum(exp(logprobs))`` of a decoded row stays meaningful.

``float32``
    Lossless.
``float16``
    Half precision; relative error <= 2**-11 (about 0.05%) for log-probs >= -65504,
    written in byte planes (``row_planes``), which helps zstd on floats.
``q8``
    One byte per value. A log-prob ``lp`` is stored as the level
    ``q = clip(round(-lp / STEP), 0, 255)`` with ``STEP = 1/16`` nat, so
    ``|decoded - lp| <= STEP / 2 = 1/32`` for ``lp >= -255 * STEP = -15.9375``
    (a relative probability error of at most 3.2%). Smaller log-probs are stored as
    -15.9375: their probability (< 1.2e-7 each) is off by less than 1.2e-7. Decoding is
    ``-q / 16``. (Caches before format 4 stored, in rank order, the difference of each
    level to the previous one modulo 256; ``legacy_formats`` turns those back into levels.)

    Caveat: rounding to the nearest level can raise each probability by up to 3.2%, so a
    row whose true tail mass is smaller than that may decode to top-k probabilities summing
    to 1 or more (about 2% of positions on our synthetic data). Consumers that use the tail
    as a residual bucket must clamp it at a small positive value; stage two's losses do.

:meth:`ValueCodec.error_bound` gives, per value, the bound above (with q8's clamp and
float16's subnormals and overflow): how far a stored value may lie from the one the teacher
gave, which ``logitcache verify --fidelity`` holds a fresh forward to.

Codecs were chosen by measurement: see ``benchmarks/bench_codecs.py`` and BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from logitcache.errors import ConfigError


@dataclass(frozen=True)
class ValueCodec:
    """A named, pure encode/decode pair for ``[..., k]`` log-probability arrays."""

    name: str
    storage_dtype: str
    lossless: bool
    #: Largest |decoded - original| for inputs within ``exact_range`` (0 for lossless).
    max_abs_error: float
    #: Log-probs at or above this value obey ``max_abs_error``.
    exact_range: float

    def encode(self, logprobs: np.ndarray) -> np.ndarray:
        values = np.asarray(logprobs, dtype=np.float32)
        if np.isnan(values).any():
            raise ValueError("log-probabilities contain NaN; refusing to store them")
        return _ENCODERS[self.name](values)

    def decode(self, stored: np.ndarray) -> np.ndarray:
        return _DECODERS[self.name](np.asarray(stored))

    def error_bound(self, logprobs: np.ndarray) -> np.ndarray:
        """Per value, an upper bound on ``|decode(encode(lp)) - lp|`` (float64, the shape of
        ``logprobs``), for any ``lp``: inf where the codec cannot hold it (float16 beyond
        +-65520, -inf in every lossy codec), nan for nan."""
        return _BOUNDS[self.name](np.asarray(logprobs, dtype=np.float64))


Q8_STEP = 1.0 / 16.0
Q8_LEVELS = 256


def _encode_q8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(-values / Q8_STEP), 0, Q8_LEVELS - 1).astype(np.uint8)


def _decode_q8(stored: np.ndarray) -> np.ndarray:
    out = np.empty(np.shape(stored), dtype=np.float32)
    np.multiply(np.asarray(stored, dtype=np.uint8), np.float32(-Q8_STEP), out=out, casting="unsafe")
    return out


#: float16's rounding error below its smallest normal number (2**-14): half a subnormal step.
_F16_SUBNORMAL_ERROR = 2.0**-25
#: Magnitudes at or beyond which float16 rounds to infinity.
_F16_OVERFLOW = 65520.0


def _bound_float16(values: np.ndarray) -> np.ndarray:
    size = np.abs(values)
    bound = np.maximum(size * 2.0**-11, _F16_SUBNORMAL_ERROR)
    bound[size >= _F16_OVERFLOW] = np.inf
    return bound


def _bound_q8(values: np.ndarray) -> np.ndarray:
    # rounding to the nearest level, or the clamp to the lowest (and, for lp > 0, the highest) level
    lowest = -(Q8_LEVELS - 1) * Q8_STEP
    return np.maximum(Q8_STEP / 2, np.maximum(lowest - values, values))


_BOUNDS = {
    "float32": lambda v: np.where(np.isnan(v), np.nan, 0.0),
    "float16": _bound_float16,
    "q8": _bound_q8,
}

_ENCODERS = {
    "float32": lambda v: v,
    "float16": lambda v: v.astype(np.float16),
    "q8": _encode_q8,
}
_DECODERS = {
    "float32": lambda s: s.astype(np.float32, copy=False),
    "float16": lambda s: s.astype(np.float32),
    "q8": _decode_q8,
}

VALUE_CODECS: dict[str, ValueCodec] = {
    "float32": ValueCodec(
        name="float32", storage_dtype="float32", lossless=True, max_abs_error=0.0,
        exact_range=float("-inf"),
    ),
    "float16": ValueCodec(
        name="float16", storage_dtype="float16", lossless=False,
        # relative bound: |lp| * 2**-11; stated here for |lp| <= 32
        max_abs_error=32 * 2.0**-11, exact_range=-32.0,
    ),
    "q8": ValueCodec(
        name="q8", storage_dtype="uint8", lossless=False, max_abs_error=Q8_STEP / 2,
        exact_range=-(Q8_LEVELS - 1) * Q8_STEP,
    ),
}


def value_codec_names() -> tuple[str, ...]:
    return tuple(VALUE_CODECS)


def get_value_codec(name: str) -> ValueCodec:
    try:
        return VALUE_CODECS[name]
    except KeyError:
        raise ConfigError(
            f"unknown value codec {name!r}; valid codecs: {', '.join(VALUE_CODECS)}"
        ) from None
