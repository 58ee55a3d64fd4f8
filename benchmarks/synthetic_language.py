"""A seeded synthetic "multilingual" language with known entropy, and a word-level tokenizer.

Not a benchmark: ``bench_students.py`` uses it to get a corpus that a small teacher can learn
on a CPU in about a minute, so that distilling from that teacher means something, and whose
true next-token distribution is known exactly, so that cross-entropies can be put next to
the best any model could do.

The language. A few languages, each with its own word list (words are syllable strings over
a consonant set no other language uses, so no word belongs to two languages). Text of
language ``l`` is an order-2 Markov chain over its words: the log-probability of word ``w``
after ``(a, b)`` (the word two back and the previous word) is, up to normalisation,

    bias_l[w] + prev1_l[b, w] + prev2_l[a, w]

``bias`` is a Zipf-shaped log-frequency (exponent ``zipf``) over a random permutation of the
words; ``prev1`` and ``prev2`` are random low-rank matrices (rank ``rank1`` / ``rank2``,
entries scaled to standard deviation ``sigma1`` / ``sigma2``). An extra row of each stands
for "no word" (``a`` and ``b`` at the start of a document), so the first words come from the
same formula. With the defaults the next word's entropy is about 2.3 nats, against a unigram
entropy over all languages of about 5.3 nats: there is real context to learn and real uncertainty
left. Documents pick a language by ``weights`` (unequal, as real corpora are) and a length
uniformly in ``[min_words, max_words]``; text is the words joined by single spaces.

Exact quantities. :meth:`SyntheticLanguage.token_nll` gives the true negative log-likelihood
of each word of a document given everything before it, under the mixture over languages (the
language is not given to a model: the first word pays ``-log weight_l`` on top of its
probability within language ``l``; the word lists are disjoint, so after it the language is
known). Its mean over a held-out set is the Bayes-optimal cross-entropy: no model can do
better on average. :meth:`conditional_entropy` is the same model's expected entropy of the
next word along generated text.

The tokenizer. :func:`build_word_tokenizer` trains a ``tokenizers`` WordLevel model on the
text (whitespace split, so one word is one token), adds ``<pad> <bos> <eos> <unk>`` as ids
0-3 and a post-processor that prepends ``<bos>``, and saves it as a ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
# one consonant set per language (disjoint, so words never collide across languages), shared vowels
_CONSONANTS = ("ptkmn", "bdgrl", "sfvzh", "cjqwy", "xr", "tl")
_VOWELS = "aeiou"
_DEFAULT_LANGS = (("ka", 120, 0.40), ("bo", 100, 0.30), ("si", 90, 0.20), ("cu", 70, 0.10))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _low_rank(rng: np.random.Generator, rows: int, cols: int, rank: int, sigma: float) -> np.ndarray:
    """A random ``rows x cols`` matrix of the given rank, entries of standard deviation ``sigma``."""
    left = rng.standard_normal((rows, rank))
    right = rng.standard_normal((rank, cols))
    return (left @ right) * (sigma / math.sqrt(rank))


@dataclass
class Language:
    """One language: its words and the order-2 chain over them (see the module docstring)."""

    tag: str
    words: list[str]
    bias: np.ndarray  # [W] log-frequency
    prev1: np.ndarray  # [W + 1, W]: contribution of the previous word (row W: none)
    prev2: np.ndarray  # [W + 1, W]: contribution of the word two back (row W: none)

    @property
    def size(self) -> int:
        return len(self.words)

    def logprobs(self, two_back: np.ndarray, previous: np.ndarray) -> np.ndarray:
        """Next-word log-probabilities ``[n, W]`` after word indices (``W`` = no word)."""
        return _log_softmax(self.bias + self.prev1[previous] + self.prev2[two_back])


@dataclass
class Document:
    id: str
    lang: str
    words: list[int]  # indices into the language's word list
    text: str

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "text": self.text, "lang": self.lang}


@dataclass
class SyntheticLanguage:
    """A mixture of :class:`Language` s with document-level language weights."""

    languages: list[Language]
    weights: np.ndarray  # [L], sums to 1
    min_words: int = 16
    max_words: int = 120
    _by_tag: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _word_index: list[dict[str, int]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_tag = {lang.tag: i for i, lang in enumerate(self.languages)}
        self._word_index = [{w: i for i, w in enumerate(lang.words)} for lang in self.languages]

    @classmethod
    def make(cls, seed: int = 0, *, langs: Sequence[tuple[str, int, float]] = _DEFAULT_LANGS,
             rank1: int = 24, rank2: int = 12, sigma1: float = 2.0, sigma2: float = 1.5, zipf: float = 1.0,
             min_words: int = 16, max_words: int = 120) -> SyntheticLanguage:
        """``langs``: (tag, number of words, document weight) per language."""
        if len(langs) > len(_CONSONANTS):
            raise ValueError(f"at most {len(_CONSONANTS)} languages")
        rng = np.random.default_rng([seed, 0x5EED])
        languages = []
        for index, (tag, size, _) in enumerate(langs):
            syllables = [c + v for c in _CONSONANTS[index] for v in _VOWELS]
            words: list[str] = []
            seen: set[str] = set()
            while len(words) < size:
                length = int(rng.integers(1, 4))
                word = "".join(syllables[int(i)] for i in rng.integers(0, len(syllables), length))
                if word not in seen:
                    seen.add(word)
                    words.append(word)
            bias = -zipf * np.log(1.0 + rng.permutation(size).astype(np.float64))
            languages.append(Language(
                tag=tag, words=words, bias=bias,
                prev1=_low_rank(rng, size + 1, size, rank1, sigma1),
                prev2=_low_rank(rng, size + 1, size, rank2, sigma2)))
        weights = np.array([w for _, _, w in langs], dtype=np.float64)
        return cls(languages=languages, weights=weights / weights.sum(), min_words=min_words, max_words=max_words)

    # ------------------------------------------------------------------ facts

    @property
    def tags(self) -> list[str]:
        return [lang.tag for lang in self.languages]

    @property
    def vocabulary(self) -> list[str]:
        return [w for lang in self.languages for w in lang.words]

    def describe(self) -> str:
        parts = [f"{lang.tag} ({lang.size} words, weight {w:.2f})" for lang, w in zip(self.languages, self.weights, strict=True)]
        return ", ".join(parts)

    # ------------------------------------------------------------------ sampling

    def documents(self, count: int, *, seed: int, prefix: str = "doc") -> list[Document]:
        """``count`` documents drawn with a generator seeded by ``seed`` (ids ``<prefix>-<n>``)."""
        rng = np.random.default_rng([seed, 0xD0C5])
        langs = rng.choice(len(self.languages), size=count, p=self.weights)
        lengths = rng.integers(self.min_words, self.max_words + 1, size=count)
        docs: list[Document | None] = [None] * count
        for li, lang in enumerate(self.languages):
            rows = np.flatnonzero(langs == li)
            if rows.size == 0:
                continue
            words = self._sample_chain(lang, lengths[rows], rng)
            for row, seq in zip(rows.tolist(), words, strict=True):
                text = " ".join(lang.words[i] for i in seq)
                docs[row] = Document(id=f"{prefix}-{row:06d}", lang=lang.tag, words=seq, text=text)
        return [d for d in docs if d is not None]

    @staticmethod
    def _sample_chain(lang: Language, lengths: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
        """Sample ``len(lengths)`` word sequences of language ``lang`` at once (step by step)."""
        n, longest, none = len(lengths), int(lengths.max()), lang.size
        out = np.zeros((n, longest), dtype=np.int64)
        two_back = np.full(n, none)
        previous = np.full(n, none)
        for t in range(longest):
            logp = lang.logprobs(two_back, previous)
            gumbel = -np.log(-np.log(rng.random(logp.shape)))  # Gumbel-max: a draw from softmax
            word = np.argmax(logp + gumbel, axis=-1)
            out[:, t] = word
            two_back, previous = previous, word
        return [out[i, :length].tolist() for i, length in enumerate(lengths.tolist())]

    # ------------------------------------------------------------------ exact likelihoods

    def word_ids(self, lang: str, words: Iterable[str]) -> list[int]:
        index = self._word_index[self._by_tag[lang]]
        return [index[w] for w in words]

    def token_nll(self, lang: str, words: Sequence[int]) -> np.ndarray:
        """True -log p of each word given the words before it, language unknown (see the docstring)."""
        li = self._by_tag[lang]
        language = self.languages[li]
        seq = np.asarray(words, dtype=np.int64)
        if seq.size == 0:
            return np.zeros(0)
        none = language.size
        two_back = np.concatenate([[none, none], seq[:-2]])[: seq.size]
        previous = np.concatenate([[none], seq[:-1]])
        logp = language.logprobs(two_back, previous)
        nll = -logp[np.arange(seq.size), seq]
        nll[0] -= math.log(self.weights[li])  # p(first word) = weight_l * p_l(first word)
        return nll

    def conditional_entropy(self, docs: Sequence[Document]) -> float:
        """Mean entropy (nats) of the true next-word distribution over the positions of ``docs``
        (the first word's includes the choice of language)."""
        total, count = 0.0, 0
        for doc in docs:
            li = self._by_tag[doc.lang]
            language = self.languages[li]
            seq = np.asarray(doc.words, dtype=np.int64)
            none = language.size
            two_back = np.concatenate([[none, none], seq[:-2]])[: seq.size]
            previous = np.concatenate([[none], seq[:-1]])
            logp = language.logprobs(two_back, previous)
            entropy = -(np.exp(logp) * logp).sum(axis=-1)
            total += float(entropy.sum())
            count += seq.size
        # the first word's distribution is the mixture over languages: add its language entropy
        first = -float((self.weights * np.log(self.weights)).sum())
        return (total + first * len(docs)) / max(count, 1)


def build_word_tokenizer(out_dir: str | os.PathLike[str], texts: Iterable[str]) -> Path:
    """Train a word-level tokenizer on ``texts`` (see the module docstring); returns ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    backend = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1, show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    out = Path(out_dir)
    tokenizer.save_pretrained(out)
    return out
