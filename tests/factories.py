"""Synthetic cache records for tests: small, seeded, any layout."""

from __future__ import annotations

import numpy as np

from logitcache.storage_schemas.layout import RecordLayout
from logitcache.storage_schemas.legacy_formats import sort_topk_by_id
from logitcache.storage_schemas.manifest import Manifest
from logitcache.storage_schemas.records import RecordBlock
from logitcache.storage_schemas.value_codecs import get_value_codec

LANGS = ("en", "de", "ru", "zh", "ar", "hi")


def make_layout(kind: str = "token_topk", *, k: int = 4, value_codec: str = "float16",
                vocab_size: int = 1000, samples: int = 6, entropy: bool = True,
                num_classes: int = 3, target_logprob: bool = False) -> RecordLayout:
    from logitcache.storage_schemas.id_codec import id_type_for_vocab

    return RecordLayout(
        kind=kind, id_type=id_type_for_vocab(vocab_size), vocab_size=vocab_size,
        k=k if kind in ("token_topk", "token_topk_sampled") else 0, value_codec=value_codec,
        samples=samples if kind in ("token_sampled", "token_topk_sampled") else 0,
        entropy=entropy and kind != "sequence_probs",
        num_classes=num_classes if kind == "sequence_probs" else 0,
        target_logprob=target_logprob and kind != "sequence_probs",
    )


def sorted_logprobs(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """Descending log-probs normalised over a larger vocabulary (tail mass > 0)."""
    weights = rng.dirichlet(np.ones(k + 1), size=rows)[:, :k]
    return np.log(-np.sort(-weights, axis=1)).astype(np.float32)


def random_draws(rng: np.random.Generator, layout: RecordLayout) -> tuple[np.ndarray, np.ndarray]:
    """One position's draws as a cache stores them: unique ascending ids and counts summing
    to ``layout.samples``; one position in ten (of a hybrid cache) has none (no tail mass)."""
    if layout.kind == "token_topk_sampled" and rng.random() < 0.1:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    unique = int(rng.integers(1, min(layout.samples, layout.vocab_size) + 1))
    ids = np.sort(rng.choice(layout.vocab_size, unique, replace=False))
    counts = 1 + rng.multinomial(layout.samples - unique, np.full(unique, 1 / unique))
    return ids, counts


def make_block(layout: RecordLayout, *, records: int = 7, max_len: int = 12, seed: int = 0,
               first_record: int = 0) -> RecordBlock:
    """A block of ``records`` random records in ``layout`` (some with left context)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, size=records)
    token_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(token_offsets[-1])
    block = RecordBlock(
        record_id=np.arange(first_record, first_record + records, dtype=np.uint64) * 7919 + 13,
        doc_key=np.array([f"doc-{first_record + i}" for i in range(records)], dtype=object),
        lang=np.array([LANGS[i % len(LANGS)] for i in range(records)], dtype=object),
        token_offsets=token_offsets,
        input_ids=rng.integers(0, layout.vocab_size, size=total).astype(np.uint32),
    )
    codec = get_value_codec(layout.value_codec)
    if layout.is_token_level:
        context = np.minimum(rng.integers(0, 3, size=records), lengths - 1).astype(np.uint32)
        block.context_length = context
        positions = int((lengths - context).sum())
        if layout.has_topk:
            ids = np.stack([rng.choice(layout.vocab_size, layout.k, replace=False) for _ in range(positions)]) \
                if positions else np.zeros((0, layout.k), dtype=np.int64)
            # stored as the cache stores them: each row in ascending id order
            ids, values = sort_topk_by_id(ids, codec.encode(sorted_logprobs(rng, positions, layout.k)))
            block.topk_ids, block.topk_logprobs = ids.astype(layout.id_type), values
        if layout.has_samples:
            draws = [random_draws(rng, layout) for _ in range(positions)]
            ids, counts = [d[0] for d in draws], [d[1] for d in draws]
            per_pos = [len(i) for i in ids]
            block.sample_offsets = np.concatenate([[0], np.cumsum(per_pos)]).astype(np.int64)
            block.sample_ids = np.concatenate([[], *ids]).astype(layout.id_type)
            block.sample_counts = np.concatenate([[], *counts]).astype(np.uint16)
        if layout.entropy:
            block.entropy = rng.uniform(0, 8, size=positions).astype(np.float16)
        if layout.target_logprob:
            target = -rng.exponential(3.0, size=positions)
            target[np.cumsum(lengths - context) - 1] = np.nan  # each record's last token
            block.target_logprob = target.astype(np.float16)
    else:
        logits = rng.normal(size=(records, layout.num_classes))
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        block.class_logprobs = codec.encode(logp.astype(np.float32))
        block.label = rng.integers(-1, layout.num_classes, size=records).astype(np.int32)
    return block


def make_template(layout: RecordLayout, *, backend: str = "parquet", storage: dict | None = None,
                  teacher: str = "tiny-teacher") -> Manifest:
    """A manifest template (no shards) as stage one would produce it."""
    from logitcache.config import StorageConfig, config_to_dict

    storage_cfg = StorageConfig(backend=backend, **(storage or {}))
    return Manifest(
        layout=layout, backend=backend, storage=config_to_dict(storage_cfg),
        teacher={"name_or_path": teacher, "revision": None, "dtype": "float32", "task": "causal_lm"},
        tokenizer={"name_or_path": teacher, "fingerprint": "tok-fp-1", "vocab_fingerprint": "vocab-fp-0123456789",
                   "vocab_size": layout.vocab_size},
        windows={"max_length": 12, "stride": 0},
        soft_labels={"mode": "topk", "k": layout.k, "values": layout.value_codec},
        fingerprint_fields={"soft_labels": {"k": layout.k}},
    )
