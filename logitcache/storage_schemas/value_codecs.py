"""Value codecs: how top-k log-probabilities become bytes, and back.

Each codec is a pair of pure functions over ``[n, k]`` arrays of log-probabilities sorted
in descending order along the last axis (the order top-k produces). The log-probabilities
are always normalised over the teacher's FULL vocabulary, so whatever the codec, the tail
mass ``1 - sum(exp(logprobs))`` of a decoded row stays meaningful.

``float32``
    Lossless.
``float16``
    Half precision; relative error <= 2**-11 (about 0.05%) for log-probs >= -65504,
    written with Parquet's BYTE_STREAM_SPLIT encoding, which helps zstd on floats.
``q8``
    One byte per value. A log-prob ``lp`` is quantized to the level
    ``q = clip(round(-lp / STEP), 0, 255)`` with ``STEP = 1/16`` nat, so
    ``|decoded - lp| <= STEP / 2 = 1/32`` for ``lp >= -255 * STEP = -15.9375``
    (a relative probability error of at most 3.2%). Smaller log-probs are stored as
    -15.9375: their probability (< 1.2e-7 each) is off by less than 1.2e-7.
    The byte stored is the difference to the previous level in the row, modulo 256. For
    sorted rows these differences are small and compress several-fold under zstd; the
    modulo makes the transform exact for rows in any order.

    Caveat: rounding to the nearest level can raise each probability by up to 3.2%, so a
    row whose true tail mass is smaller than that may decode to top-k probabilities summing
    to 1 or more (about 2% of positions on our synthetic data). Consumers that use the tail
    as a residual bucket must clamp it at a small positive value; stage two's losses do.

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


Q8_STEP = 1.0 / 16.0
Q8_LEVELS = 256


def _encode_q8(values: np.ndarray) -> np.ndarray:
    levels = np.clip(np.rint(-values / Q8_STEP), 0, Q8_LEVELS - 1).astype(np.uint8)
    if levels.ndim == 0 or levels.shape[-1] == 0:
        return levels
    deltas = np.empty_like(levels)
    deltas[..., 0] = levels[..., 0]
    np.subtract(levels[..., 1:], levels[..., :-1], out=deltas[..., 1:])  # wraps modulo 256
    return deltas


#: rows per pass of q8's running sum: 4096 x k levels (256 KiB at k = 64) stay in the CPU
#: cache across the k column passes, instead of streaming a whole shard k times
_Q8_CHUNK_ROWS = 4096


def _decode_q8(stored: np.ndarray) -> np.ndarray:
    stored = np.asarray(stored, dtype=np.uint8)
    out = np.empty(stored.shape, dtype=np.float32)
    if stored.ndim == 0 or stored.shape[-1] == 0:
        np.multiply(stored, np.float32(-Q8_STEP), out=out, casting="unsafe")
        return out
    k = stored.shape[-1]
    rows_in, rows_out = stored.reshape(-1, k), out.reshape(-1, k)
    scratch = np.empty((min(_Q8_CHUNK_ROWS, len(rows_in)), k), dtype=np.uint8)
    for start in range(0, len(rows_in), _Q8_CHUNK_ROWS):
        levels = scratch[:len(rows_in[start:start + _Q8_CHUNK_ROWS])]
        np.copyto(levels, rows_in[start:start + _Q8_CHUNK_ROWS])
        # a running sum column by column (wrapping modulo 256) undoes the deltas; over k
        # columns this is faster than np.cumsum along the last, contiguous axis
        for j in range(1, k):
            np.add(levels[:, j - 1], levels[:, j], out=levels[:, j])
        np.multiply(levels, np.float32(-Q8_STEP), out=rows_out[start:start + len(levels)], casting="unsafe")
    return out


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
