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

    def arrow_schema(self) -> pa.Schema:
        """Arrow schema of one format 4 Parquet shard of this layout.

        Each soft-label column holds one ``large_binary`` per record, whatever the vocabulary,
        codec or compression: the rows of its labelled positions back to back, each row in
        byte planes (see ``row_planes``). ``topk_ids``: a position's ``k`` ids ascending, as
        gaps; ``topk_logprobs``: their stored values, in the same order; ``sample_ids``: the
        ``samples`` draws of each position that has draws, ascending (a repeated id is a
        repeated draw), as gaps; ``undrawn_positions``: the record's labelled positions
        (counted from its first labelled one) without draws, because their tail held no
        probability. Field metadata says how to decode each binary column. No list item is
        nullable, which spares Parquet a definition level per value.
        """
        fields = base_fields(self, nullable_items=False)
        if self.has_topk:
            fields += [
                pa.field("topk_ids", pa.large_binary(), nullable=False,
                         metadata=_binary_metadata(f"{self.k} x {self.id_type} ids per position, ascending,"
                                                   f" as gaps", self.id_type)),
                pa.field("topk_logprobs", pa.large_binary(), nullable=False,
                         metadata=_binary_metadata(f"{self.k} x {self.value_storage_dtype.name} values "
                                                   f"({self.value_codec}) per position, in the order of "
                                                   "topk_ids", self.value_storage_dtype.name)),
            ]
        if self.has_samples:
            fields += [
                pa.field("sample_ids", pa.large_binary(), nullable=False,
                         metadata=_binary_metadata(f"{self.samples} x {self.id_type} draws per position "
                                                   "with draws, ascending, as gaps", self.id_type)),
                pa.field("undrawn_positions", pa.list_(pa.field("element", pa.uint32(), nullable=False)),
                         nullable=False),
            ]
        return pa.schema(fields + per_position_fields(self, nullable_items=False))


def _listed(item: pa.DataType, *, nullable_items: bool) -> pa.DataType:
    return pa.list_(item) if nullable_items else pa.list_(pa.field("element", item, nullable=False))


def base_fields(layout: RecordLayout, *, nullable_items: bool) -> list[pa.Field]:
    """The columns every format has first: identity, tokens, left context."""
    fields = [
        pa.field("record_id", pa.uint64(), nullable=False),
        pa.field("doc_key", pa.string(), nullable=False),
        pa.field("lang", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("input_ids", _listed(pa.uint32(), nullable_items=nullable_items), nullable=False),
    ]
    if layout.is_token_level:
        # leading positions of input_ids that are left context only (no stored labels)
        fields.append(pa.field("context_length", pa.uint32(), nullable=False))
    return fields


def per_position_fields(layout: RecordLayout, *, nullable_items: bool) -> list[pa.Field]:
    """The columns every format has last: entropy, target log-prob, class distributions."""
    fields = []
    if layout.entropy and layout.is_token_level:
        fields.append(pa.field("entropy", _listed(pa.float16(), nullable_items=nullable_items), nullable=False))
    if layout.target_logprob and layout.is_token_level:
        fields.append(pa.field("target_logprob", _listed(pa.float16(), nullable_items=nullable_items),
                               nullable=False))
    if layout.kind == "sequence_probs":
        value_t = layout.value_storage_type
        class_t = pa.list_(value_t if nullable_items else pa.field("element", value_t, nullable=False),
                           layout.num_classes)
        fields += [pa.field("class_logprobs", class_t, nullable=False),
                   pa.field("label", pa.int32(), nullable=False)]
    return fields


def _binary_metadata(rows: str, element_type: str) -> dict[str, str]:
    """Field metadata that lets any Parquet reader decode a binary column without logitcache."""
    width = np.dtype(element_type).itemsize
    planes = "one byte plane" if width == 1 else f"{width} byte planes (lowest byte first)"
    return {"logitcache.rows": rows, "logitcache.row_bytes": f"{planes} per row",
            "logitcache.decode": "README.md, 'Cache format': reading a shard elsewhere"}
