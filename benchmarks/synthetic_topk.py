"""Synthetic but realistic top-k soft labels, for benchmarks (seeded, numpy only).

What a teacher's top-k labels look like, and how this module imitates it:

**Ids.** Frequent tokens appear in many positions' top-k, and rank higher there. Each
position's ids are a Gumbel-top-k sample without replacement from a Zipf(s=1.1) prior
over the vocabulary: token ``t`` (rank ``t + 1``; low ids are the frequent ones, as in
BPE vocabularies whose merges were learned in frequency order) gets the key
``-s * log(t + 1) + Gumbel noise`` and the row holds the k largest keys in key order.
By the Gumbel-max trick that ordered sample is a Plackett-Luce draw: the first id is
drawn with probability proportional to ``(t + 1) ** -s``, the next from the remaining
ids, and so on. Drawing ``vocab`` Gumbels per position would cost 150k random numbers per
token, so :func:`sample_topk_ids` draws the *same* distribution another way: ids are
drawn with replacement from the prior and repeats are dropped, which leaves each next
distinct id distributed proportionally to the prior over the ids not yet drawn.
:func:`gumbel_topk_ids_reference` is the literal Gumbel form, for checking on small
vocabularies.

**Log-probabilities.** Sorted descending with a heavy head: per row, weights ``r ** -a``
for ranks ``r = 1..k`` with ``a ~ U(0.8, 2.5)``, the top-1 weight multiplied by
``U(1, 8)``, then scaled so the top-k sum to ``1 - tail`` with ``tail ~ Beta(1.2, 6)``
(the probability of everything outside the top k). Stored as float32 log-probabilities,
normalised over the full vocabulary as the cache format requires.

**Records.** Windows of 64..512 tokens (uniform), each with a doc key (a content-hash-like
hex string), a language tag drawn from a few languages with skewed weights, uint32
``input_ids`` drawn from the same Zipf prior, ``context_length`` 0 (stride-0 windows, so
every token is a labelled position).

Not modelled: correlation between neighbouring positions or with the input tokens (a
real teacher's top-k at position t depends on the context); every position here is an
independent draw. Entropy estimates made on these ids are therefore properties of the
generator, not of any real teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ZIPF_S = 1.1
LANGS = ("en", "de", "fr", "zh", "ru", "ar")
LANG_WEIGHTS = (0.45, 0.15, 0.12, 0.12, 0.1, 0.06)


def zipf_prior(vocab_size: int, s: float = ZIPF_S) -> np.ndarray:
    """Probabilities ``(t + 1) ** -s / Z`` of token ids ``t = 0 .. vocab_size - 1`` (float64)."""
    weights = np.arange(1, vocab_size + 1, dtype=np.float64) ** -s
    return weights / weights.sum()


def _draw_from(rng: np.random.Generator, cdf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, rng.random(shape), side="right"), len(cdf) - 1)


def _first_distinct(draws: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first ``k`` distinct values in draw order; and a mask of rows that have k."""
    order = np.argsort(draws, axis=1, kind="stable")  # stable: first occurrence sorts first
    ordered = np.take_along_axis(draws, order, axis=1)
    repeat = np.zeros(draws.shape, dtype=bool)
    np.put_along_axis(repeat, order[:, 1:], ordered[:, 1:] == ordered[:, :-1], axis=1)
    keep = ~repeat
    ok = keep.sum(axis=1) >= k
    keep &= np.cumsum(keep, axis=1) <= k
    return draws[ok][keep[ok]].reshape(-1, k), ok


def sample_topk_ids(rng: np.random.Generator, rows: int, k: int, vocab_size: int,
                    s: float = ZIPF_S) -> np.ndarray:
    """``[rows, k]`` int64 ids: per row a Gumbel-top-k (Plackett-Luce) sample from Zipf(s)."""
    if k > vocab_size:
        raise ValueError(f"k={k} is larger than the vocabulary ({vocab_size})")
    cdf = np.cumsum(zipf_prior(vocab_size, s))
    cdf[-1] = 1.0
    out = np.empty((rows, k), dtype=np.int64)
    todo = np.arange(rows)
    draws_per_row = 2 * k + 16  # enough for all but a few rows; those are drawn again
    while len(todo):
        ids, ok = _first_distinct(_draw_from(rng, cdf, (len(todo), draws_per_row)), k)
        out[todo[ok]] = ids
        todo = todo[~ok]
        draws_per_row *= 2
    return out


def gumbel_topk_ids_reference(rng: np.random.Generator, rows: int, k: int, vocab_size: int,
                              s: float = ZIPF_S) -> np.ndarray:
    """The literal form (``vocab_size`` Gumbels per row); same distribution, small vocabularies only."""
    keys = -s * np.log(np.arange(1, vocab_size + 1, dtype=np.float64)) + rng.gumbel(size=(rows, vocab_size))
    top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def sample_topk_logprobs(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """``[rows, k]`` float32 log-probabilities, descending, summing (in prob) to ``1 - tail``."""
    alpha = rng.uniform(0.8, 2.5, size=(rows, 1))
    weights = np.arange(1, k + 1, dtype=np.float64)[None, :] ** -alpha
    weights[:, 0] *= rng.uniform(1.0, 8.0, size=rows)
    tail = rng.beta(1.2, 6.0, size=(rows, 1))
    probs = weights / weights.sum(axis=1, keepdims=True) * (1.0 - tail)
    return np.log(probs).astype(np.float32)


@dataclass(frozen=True)
class SyntheticRecords:
    """Record-level columns (RecordBlock field names) plus per-position labels."""

    record_id: np.ndarray  # uint64 [R]
    doc_key: np.ndarray  # object (str) [R]
    lang: np.ndarray  # object (str) [R]
    token_offsets: np.ndarray  # int64 [R+1]
    input_ids: np.ndarray  # uint32 [T]
    context_length: np.ndarray  # uint32 [R], all zero
    topk_ids: np.ndarray  # int64 [T, k]
    topk_logprobs: np.ndarray  # float32 [T, k], descending
    seed: int

    @property
    def num_tokens(self) -> int:
        return int(self.token_offsets[-1])

    def with_k(self, k: int) -> SyntheticRecords:
        """The same records with the first ``k`` ids of each row (a top-k sample of a top-K one)
        and freshly drawn log-probs for ``k`` (their shape depends on k)."""
        return SyntheticRecords(
            record_id=self.record_id, doc_key=self.doc_key, lang=self.lang,
            token_offsets=self.token_offsets, input_ids=self.input_ids,
            context_length=self.context_length,
            topk_ids=np.ascontiguousarray(self.topk_ids[:, :k]),
            topk_logprobs=sample_topk_logprobs(np.random.default_rng([self.seed, k]), self.num_tokens, k),
            seed=self.seed,
        )


def record_lengths(rng: np.random.Generator, tokens: int, min_len: int = 64,
                   max_len: int = 512) -> np.ndarray:
    """Window lengths ~ U(min_len, max_len) summing to exactly ``tokens`` (the last is cut)."""
    lengths = rng.integers(min_len, max_len + 1, size=tokens // min_len + 1)
    ends = np.cumsum(lengths)
    count = int(np.searchsorted(ends, tokens, side="left")) + 1
    lengths = lengths[:count].copy()
    lengths[-1] -= int(ends[count - 1]) - tokens
    return lengths


def make_records(*, tokens: int, k: int, vocab_size: int, seed: int = 0,
                 min_len: int = 64, max_len: int = 512) -> SyntheticRecords:
    """``tokens`` labelled positions in windows of ``min_len..max_len`` tokens."""
    rng = np.random.default_rng(seed)
    lengths = record_lengths(rng, tokens, min_len, max_len)
    records = len(lengths)
    token_offsets = np.zeros(records + 1, dtype=np.int64)
    np.cumsum(lengths, out=token_offsets[1:])
    cdf = np.cumsum(zipf_prior(vocab_size))
    cdf[-1] = 1.0
    lang_index = rng.choice(len(LANGS), size=records, p=LANG_WEIGHTS)
    return SyntheticRecords(
        record_id=rng.integers(0, 2**64, size=records, dtype=np.uint64),
        doc_key=np.array([f"{h:016x}" for h in rng.integers(0, 2**64, size=records, dtype=np.uint64).tolist()], dtype=object),
        lang=np.array([LANGS[i] for i in lang_index], dtype=object),
        token_offsets=token_offsets,
        input_ids=_draw_from(rng, cdf, (tokens,)).astype(np.uint32),
        context_length=np.zeros(records, dtype=np.uint32),
        topk_ids=sample_topk_ids(rng, tokens, k, vocab_size),
        topk_logprobs=sample_topk_logprobs(np.random.default_rng([seed, k]), tokens, k),
        seed=seed,
    )


# ---------------------------------------------------------------- information content


def marginal_entropy_bits(ids: np.ndarray, vocab_size: int) -> float:
    """Empirical entropy (bits) of the pooled id histogram: the cost per id of a coder that
    treats ids as independent draws from their overall frequency."""
    counts = np.bincount(ids.reshape(-1), minlength=vocab_size).astype(np.float64)
    freq = counts[counts > 0] / counts.sum()
    return float(-(freq * np.log2(freq)).sum())


def sequence_entropy_bits(ids: np.ndarray, vocab_size: int, s: float = ZIPF_S) -> float:
    """Mean ``-log2 P(row)`` (bits per row) of ordered rows under the generator itself.

    This is the Monte Carlo estimate of the true entropy of one position's ordered top-k id
    list, so no lossless coding of these ids can average fewer bits per row, even one that
    knows the generator exactly.
    """
    prior = zipf_prior(vocab_size, s)
    p = prior[ids]  # [rows, k]
    removed = np.cumsum(p, axis=1) - p  # prior mass already drawn before each id
    return float(-(np.log2(p) - np.log2(1.0 - removed)).sum(axis=1).mean())
