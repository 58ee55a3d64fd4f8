"""What one cache's records hold: the kind of soft label and the types of its columns.

A :class:`RecordLayout` is written into the manifest and into every shard's metadata; the
Arrow schema of a Parquet shard and the array set of a Zarr shard are both derived from
it, so the two backends cannot drift apart.

Kinds:

``token_topk``
    per position, the teacher's top-k next-token ids and their log-probabilities.
``token_sampled``
    per position, ids drawn from the teacher's distribution and how often each was drawn
    (the unbiased sparse estimator of "Sparse Logit Sampling", Anshumann et al., 2025).
``token_topk_sampled``
    an exact top-k head plus draws from the remaining tail.
``sequence_probs``
    per record, the full class distribution of a sequence classifier, as log-probabilities
    through the value codec (plus the gold label when the corpus has one, -1 otherwise).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from logitcache.errors import CacheFormatError
from logitcache.storage_schemas.id_codec import ID_TYPES
from logitcache.storage_schemas.value_codecs import get_value_codec

KINDS: tuple[str, ...] = ("token_topk", "token_sampled", "token_topk_sampled", "sequence_probs")

#: The type of a sample count: 50 draws per position never need more than 16 bits.
SAMPLE_COUNT_TYPE = "uint16"


@dataclass(frozen=True, kw_only=True)
class RecordLayout:
    """The columns of one cache's records.

    kind: one of :data:`KINDS`.
    id_type: token-id type, from :func:`~logitcache.storage_schemas.id_codec.id_type_for_vocab`.
    vocab_size: the teacher's vocabulary size (ids lie in ``[0, vocab_size)``).
    k: top-k width (0 for kinds without a top-k head).
    value_codec: name of the codec of the top-k log-probabilities (or class probabilities).
    samples: draws per position for sampled kinds (0 otherwise).
    entropy: whether a per-position teacher entropy column is stored.
    num_classes: classes of a ``sequence_probs`` cache (0 otherwise).
    target_logprob: whether a per-position column holds the teacher's log-probability of the
        record's actual next token (token-level kinds; NaN at a record's last token, which
        has no next token in the record). Caches built before this column existed lack it,
        and a missing column means "not available".
    """

    kind: str
    id_type: str
    vocab_size: int
    k: int = 0
    value_codec: str = "float32"
    samples: int = 0
    entropy: bool = False
    num_classes: int = 0
    target_logprob: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CacheFormatError(f"unknown cache kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.id_type not in ID_TYPES:
            raise CacheFormatError(f"unknown id type {self.id_type!r}; known: {', '.join(ID_TYPES)}")
        get_value_codec(self.value_codec)
        if self.has_topk and self.k < 1:
            raise CacheFormatError(f"kind {self.kind} needs k >= 1, got {self.k}")
        if self.has_samples and self.samples < 1:
            raise CacheFormatError(f"kind {self.kind} needs samples >= 1, got {self.samples}")
        if self.kind == "sequence_probs" and self.num_classes < 2:
            raise CacheFormatError(f"kind sequence_probs needs num_classes >= 2, got {self.num_classes}")
        if self.has_topk and self.k > self.vocab_size:
            raise CacheFormatError(f"k={self.k} is larger than the vocabulary ({self.vocab_size})")

    @property
    def has_topk(self) -> bool:
        return self.kind in ("token_topk", "token_topk_sampled")

    @property
    def has_samples(self) -> bool:
        return self.kind in ("token_sampled", "token_topk_sampled")

    @property
    def is_token_level(self) -> bool:
        return self.kind != "sequence_probs"

    @property
    def value_storage_type(self) -> pa.DataType:
        return pa.from_numpy_dtype(self.value_storage_dtype)

    def to_dict(self) -> dict:
        """The layout as the manifest and shard metadata hold it. Columns added after format 3
        (``target_logprob``) appear only when stored, so the layout, and with it the cache's
        identity and fingerprint, of a cache built before them is unchanged."""
        out = asdict(self)
        if not self.target_logprob:
            del out["target_logprob"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> RecordLayout:
        return cls(**data)

    @property
    def value_storage_dtype(self) -> np.dtype:
        return np.dtype(get_value_codec(self.value_codec).storage_dtype)

    @property
    def topk_dtypes(self) -> dict[str, np.dtype]:
        """The element type of each top-k column: ids, and the codec's stored values."""
        return {"topk_ids": np.dtype(self.id_type), "topk_logprobs": self.value_storage_dtype}

    def arrow_schema(self, *, format_1: bool = False, position_rows: Collection[str] = ()) -> pa.Schema:
        """Arrow schema of one Parquet shard of this layout.

        A top-k column holds one ``large_binary`` per record: the rows of its labelled
        positions back to back, each row the position's ``k`` ids (or stored values) as
        little-endian ``id_type`` (or codec storage type), in rank order. Parquet then reads
        a record's labels as one value, close to a plain copy. The top-k columns named in
        ``position_rows`` hold one fixed-size binary per position instead (``list<binary[k x
        element bytes]>``, format 2's form of every top-k column), which Parquet can split
        into byte streams (see ``parquet_backend``). No list item is nullable, which spares
        Parquet a definition level per value. ``format_1`` gives the schema of format 1 shards
        (top-k as ``list<fixed_size_list<type, k>>``, nullable items), which readers still accept.
        """
        def listed(item: pa.DataType) -> pa.DataType:
            return pa.list_(item) if format_1 else pa.list_(pa.field("element", item, nullable=False))

        id_t = pa.from_numpy_dtype(self.id_type)
        value_t = self.value_storage_type
        fields = [
            pa.field("record_id", pa.uint64(), nullable=False),
            pa.field("doc_key", pa.string(), nullable=False),
            pa.field("lang", pa.dictionary(pa.int32(), pa.string()), nullable=False),
            pa.field("input_ids", listed(pa.uint32()), nullable=False),
        ]
        if self.is_token_level:
            # leading positions of input_ids that are left context only (no stored labels)
            fields.append(pa.field("context_length", pa.uint32(), nullable=False))
        if self.has_topk and format_1:
            fields += [
                pa.field("topk_ids", listed(pa.list_(id_t, self.k)), nullable=False),
                pa.field("topk_logprobs", listed(pa.list_(value_t, self.k)), nullable=False),
            ]
        elif self.has_topk:
            unknown = set(position_rows) - set(self.topk_dtypes)
            if unknown:
                raise ValueError(f"position_rows names no top-k column: {', '.join(sorted(unknown))}")
            for name, dtype in self.topk_dtypes.items():
                per_position = name in position_rows
                column_t = listed(pa.binary(self.k * dtype.itemsize)) if per_position else pa.large_binary()
                fields.append(pa.field(name, column_t, nullable=False,
                                       metadata=_row_metadata(dtype.name, self.k, per_position=per_position)))
        if self.has_samples:
            count_t = pa.from_numpy_dtype(SAMPLE_COUNT_TYPE)
            fields += [
                pa.field("sample_ids", listed(listed(id_t)), nullable=False),
                pa.field("sample_counts", listed(listed(count_t)), nullable=False),
            ]
        if self.entropy and self.is_token_level:
            fields.append(pa.field("entropy", listed(pa.float16()), nullable=False))
        if self.target_logprob and self.is_token_level:
            fields.append(pa.field("target_logprob", listed(pa.float16()), nullable=False))
        if self.kind == "sequence_probs":
            class_t = pa.list_(value_t, self.num_classes) if format_1 else pa.list_(
                pa.field("element", value_t, nullable=False), self.num_classes)
            fields += [
                pa.field("class_logprobs", class_t, nullable=False),
                pa.field("label", pa.int32(), nullable=False),
            ]
        return pa.schema(fields)


def _row_metadata(element_type: str, k: int, *, per_position: bool) -> dict[str, str]:
    """Field metadata that lets any Parquet reader decode top-k rows without logitcache."""
    value = "one row per labelled position" if per_position else "the record's rows, one per labelled position"
    return {"logitcache.row": f"{k} x little-endian {element_type}", "logitcache.value": value}
