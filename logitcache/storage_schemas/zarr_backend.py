"""Zarr shards: one Zarr v3 group (a directory ``part-XXX.zarr``) per shard, token-major.

A shard holds the same information as a Parquet shard, as flat arrays indexed by record,
token, labelled position or sample, with offsets between the levels:

===================  ==========================  ============================================
array                shape, type                 meaning
===================  ==========================  ============================================
record_id            [R] uint64                  stable record id
doc_key, lang        [R] string (vlen utf-8)     document identity, language tag
record_offsets       [R+1] int64                 record r's tokens: ``input_ids[o[r]:o[r+1]]``
context_length       [R] uint32                  token-level kinds: left-context tokens
label_offsets        [R+1] int64                 token-level kinds: record r's positions
class_logprobs       [R, C] codec storage type   sequence_probs: class log-probabilities
label                [R] int32                   sequence_probs: gold label, -1 = none
block_offsets        [B+1] int64                 record indices that cut the shard's blocks
input_ids            [T] uint32                  tokens
topk_ids             [P, k] id type              top-k ids per labelled position
topk_logprobs        [P, k] codec storage type   their stored (encoded) log-probabilities
entropy              [P] float16                 teacher entropy per position (optional)
sample_offsets       [P+1] int64                 position p's draws: ``sample_ids[s[p]:s[p+1]]``
sample_ids           [S] id type                 drawn ids
sample_counts        [S] uint16                  how often each was drawn
===================  ==========================  ============================================

Blocks are cut by :func:`~logitcache.storage_schemas.records.block_cuts` with
``storage.row_group_tokens``, so block ``i`` of a Zarr shard holds the same records as row
group ``i`` of the Parquet shard of the same data. ``block_offsets``, ``record_offsets``
and ``label_offsets`` make any block (or record) readable without touching the rest.

Every array uses the v3 ``sharding_indexed`` codec: one shard object per array (the whole
array, rounded up to a multiple of the inner chunk), inner chunks of
``storage.chunk_tokens`` rows (fewer for a shorter array), each compressed with zstd at
``storage.compression_level`` (or not at all for ``compression: none``). A reader of a
slice fetches the shard index and only the inner chunks it needs. The group's attributes
hold, under ``"logitcache"``, the format name and version, the record layout and the
shard's metadata (config fingerprint, work unit).
"""

from __future__ import annotations

import json
import math

import numpy as np
import zarr
import zarr.storage
from zarr.codecs import ZstdCodec

from logitcache.config import StorageConfig
from logitcache.errors import CacheFormatError
from logitcache.storage_schemas.layout import SAMPLE_COUNT_TYPE, RecordLayout
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.records import RecordBlock, block_cuts
from logitcache.storage_schemas.value_codecs import get_value_codec

ATTRS_KEY = "logitcache"
FORMAT_NAME = "logitcache-zarr-shard"
FORMAT_VERSION = 1

#: What a corrupt or incomplete store can make zarr, numcodecs or numpy raise while reading.
_READ_ERRORS = (OSError, ValueError, KeyError, IndexError, RuntimeError)


def array_names(layout: RecordLayout) -> list[str]:
    """The arrays of a shard in ``layout``, in the order they are written."""
    names = ["record_id", "doc_key", "lang", "record_offsets", "block_offsets", "input_ids"]
    if layout.is_token_level:
        names += ["context_length", "label_offsets"]
    if layout.has_topk:
        names += ["topk_ids", "topk_logprobs"]
    if layout.has_samples:
        names += ["sample_offsets", "sample_ids", "sample_counts"]
    if layout.entropy and layout.is_token_level:
        names.append("entropy")
    if layout.kind == "sequence_probs":
        names += ["class_logprobs", "label"]
    return names


_DIMENSIONS = {
    "record_id": ("record",), "doc_key": ("record",), "lang": ("record",),
    "record_offsets": ("record_edge",), "label_offsets": ("record_edge",),
    "block_offsets": ("block_edge",), "context_length": ("record",), "label": ("record",),
    "class_logprobs": ("record", "class"), "input_ids": ("token",),
    "topk_ids": ("position", "k"), "topk_logprobs": ("position", "k"), "entropy": ("position",),
    "sample_offsets": ("position_edge",), "sample_ids": ("sample",), "sample_counts": ("sample",),
}


def _zero_based(offsets: np.ndarray) -> np.ndarray:
    offsets = np.asarray(offsets, dtype=np.int64)
    return offsets - offsets[0]


def _block_arrays(block: RecordBlock, layout: RecordLayout, cuts: list[int]) -> dict[str, np.ndarray]:
    """The arrays of ``block`` as stored (offsets zero-based, values as given)."""
    value_dtype = get_value_codec(layout.value_codec).storage_dtype
    out: dict[str, np.ndarray] = {
        "record_id": np.asarray(block.record_id, dtype=np.uint64),
        "doc_key": np.asarray(block.doc_key, dtype=object),
        "lang": np.asarray(block.lang, dtype=object),
        "record_offsets": _zero_based(block.token_offsets),
        "block_offsets": np.asarray(cuts, dtype=np.int64),
        "input_ids": np.asarray(block.input_ids, dtype=np.uint32),
    }
    if layout.is_token_level:
        out["context_length"] = np.asarray(block.context_length, dtype=np.uint32)
        out["label_offsets"] = block.label_offsets
    if layout.has_topk:
        out["topk_ids"] = np.asarray(block.topk_ids, dtype=layout.id_type)
        out["topk_logprobs"] = np.asarray(block.topk_logprobs, dtype=value_dtype)
    if layout.has_samples:
        out["sample_offsets"] = _zero_based(block.sample_offsets)
        out["sample_ids"] = np.asarray(block.sample_ids, dtype=layout.id_type)
        out["sample_counts"] = np.asarray(block.sample_counts, dtype=SAMPLE_COUNT_TYPE)
    if layout.entropy and layout.is_token_level:
        out["entropy"] = np.asarray(block.entropy, dtype=np.float16)
    if layout.kind == "sequence_probs":
        out["class_logprobs"] = np.asarray(block.class_logprobs, dtype=value_dtype)
        out["label"] = np.asarray(block.label, dtype=np.int32)
    return out


def _chunking(shape: tuple[int, ...], chunk_rows: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(inner chunk shape, shard shape): rows along axis 0, the whole array in one shard.

    Zarr wants chunks of at least one row, so an empty array gets one-row chunks.
    """
    rows = max(1, min(chunk_rows, shape[0]))
    shard_rows = max(1, math.ceil(shape[0] / rows)) * rows
    rest = tuple(max(1, n) for n in shape[1:])
    return (rows, *rest), (shard_rows, *rest)


def _store(location: CacheLocation, rel: str, *, read_only: bool):
    path = location.full(rel)
    if location.is_local:
        return zarr.storage.LocalStore(path, read_only=read_only)
    # FsspecStore needs an async filesystem; from_mapper wraps a sync one (memory://, ...)
    # in fsspec's AsyncFileSystemWrapper, and makes an async twin of an async one (s3, gcs).
    return zarr.storage.FsspecStore.from_mapper(location.fs.get_mapper(path), read_only=read_only)


class ZarrBackend:
    name = "zarr"
    extension = ".zarr"

    # ------------------------------------------------------------------ writing

    def write(
        self, location: CacheLocation, rel: str, block: RecordBlock, *,
        layout: RecordLayout, storage: StorageConfig, metadata: dict[str, str],
    ) -> int:
        """Write ``block`` as a Zarr group at ``rel``; return the number of blocks."""
        block.validate(layout)
        cuts = block_cuts(block.token_offsets, storage.row_group_tokens)
        arrays = _block_arrays(block, layout, cuts)
        compressors = [ZstdCodec(level=storage.compression_level)] if storage.compression == "zstd" else None
        attributes = {ATTRS_KEY: {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "layout": layout.to_dict(),
            "metadata": {str(k): str(v) for k, v in metadata.items()},
        }}
        group = zarr.create_group(_store(location, rel, read_only=False), overwrite=True,
                                  attributes=attributes)
        for name in array_names(layout):
            data = arrays[name]
            chunks, shards = _chunking(data.shape, storage.chunk_tokens)
            array = group.create_array(
                name, shape=data.shape, dtype=str if data.dtype == object else data.dtype,
                chunks=chunks, shards=shards, compressors=compressors,
                dimension_names=_DIMENSIONS[name],
            )
            if data.size:
                array[...] = data
        return len(cuts) - 1

    # ------------------------------------------------------------------ reading

    def _group(self, location: CacheLocation, rel: str) -> zarr.Group:
        try:
            group = zarr.open_group(_store(location, rel, read_only=True), mode="r",
                                    zarr_format=3, use_consolidated=False)
            attrs = group.attrs.get(ATTRS_KEY)
        except _READ_ERRORS as exc:
            raise CacheFormatError(f"{location.full(rel)}: not a readable Zarr shard ({exc})") from exc
        if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
            raise CacheFormatError(f"{location.full(rel)}: not a logitcache Zarr shard (no {ATTRS_KEY!r} attributes)")
        version = attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise CacheFormatError(
                f"{location.full(rel)}: Zarr shard format version {version}, this logitcache reads "
                f"version {FORMAT_VERSION}"
            )
        return group

    @staticmethod
    def _array(location: CacheLocation, rel: str, group: zarr.Group, name: str) -> zarr.Array:
        try:
            return group[name]
        except _READ_ERRORS as exc:
            raise CacheFormatError(f"{location.full(rel)}: shard lacks array {name!r} ({exc})") from exc

    def num_blocks(self, location: CacheLocation, rel: str) -> int:
        group = self._group(location, rel)
        return self._array(location, rel, group, "block_offsets").shape[0] - 1

    def num_records(self, location: CacheLocation, rel: str) -> int:
        group = self._group(location, rel)
        return self._array(location, rel, group, "record_id").shape[0]

    def read_metadata(self, location: CacheLocation, rel: str) -> dict[str, str]:
        """The metadata given to :meth:`write`, plus ``"layout"`` (JSON), as Parquet has it."""
        attrs = self._group(location, rel).attrs[ATTRS_KEY]
        out = {str(k): str(v) for k, v in (attrs.get("metadata") or {}).items()}
        if "layout" in attrs:
            out["layout"] = json.dumps(attrs["layout"])
        return out

    def arrow_schema(self, location: CacheLocation, rel: str) -> None:
        """Zarr shards have no Arrow schema; their layout is checked through the metadata."""
        return None

    def read_block(self, location: CacheLocation, rel: str, layout: RecordLayout, index: int) -> RecordBlock:
        group = self._group(location, rel)
        try:
            cuts = self._array(location, rel, group, "block_offsets")
            if not 0 <= index < cuts.shape[0] - 1:
                raise CacheFormatError(
                    f"{location.full(rel)}: block {index} unreadable (the shard has "
                    f"{cuts.shape[0] - 1} blocks)"
                )
            start, stop = (int(c) for c in cuts[index:index + 2])
            return self._read_records(location, rel, group, layout, start, stop)
        except _READ_ERRORS as exc:
            raise CacheFormatError(f"{location.full(rel)}: block {index} unreadable ({exc})") from exc

    def read(self, location: CacheLocation, rel: str, layout: RecordLayout) -> RecordBlock:
        group = self._group(location, rel)
        try:
            return self._read_records(location, rel, group, layout, 0, None)
        except _READ_ERRORS as exc:
            raise CacheFormatError(f"{location.full(rel)}: unreadable ({exc})") from exc

    def _read_records(
        self, location: CacheLocation, rel: str, group: zarr.Group, layout: RecordLayout,
        start: int, stop: int | None,
    ) -> RecordBlock:
        """Records ``start:stop`` (``stop=None``: to the end), reading only their slices."""

        def get(name: str) -> zarr.Array:
            return self._array(location, rel, group, name)

        edge = slice(start, None if stop is None else stop + 1)
        rows = slice(start, stop)
        tok = np.asarray(get("record_offsets")[edge], dtype=np.int64)
        if tok.shape[0] == 0:
            raise CacheFormatError(f"{location.full(rel)}: record_offsets is empty or too short")
        t0, t1 = int(tok[0]), int(tok[-1])
        block = RecordBlock(
            record_id=get("record_id")[rows],
            doc_key=get("doc_key")[rows].astype(object),
            lang=get("lang")[rows].astype(object),
            token_offsets=tok - t0,
            input_ids=get("input_ids")[t0:t1],
        )
        if layout.is_token_level:
            block.context_length = get("context_length")[rows]
            lab = np.asarray(get("label_offsets")[edge], dtype=np.int64)
            if lab.shape != tok.shape:
                raise CacheFormatError(f"{location.full(rel)}: label_offsets and record_offsets differ in length")
            p0, p1 = int(lab[0]), int(lab[-1])
            if layout.has_topk:
                block.topk_ids = get("topk_ids")[p0:p1]
                block.topk_logprobs = get("topk_logprobs")[p0:p1]
            if layout.has_samples:
                smp = np.asarray(get("sample_offsets")[p0:p1 + 1], dtype=np.int64)
                if smp.shape[0] == 0:
                    raise CacheFormatError(f"{location.full(rel)}: sample_offsets is too short")
                s0, s1 = int(smp[0]), int(smp[-1])
                block.sample_offsets = smp - s0
                block.sample_ids = get("sample_ids")[s0:s1]
                block.sample_counts = get("sample_counts")[s0:s1]
            if layout.entropy:
                block.entropy = get("entropy")[p0:p1]
        else:
            block.class_logprobs = get("class_logprobs")[rows]
            block.label = get("label")[rows]
        try:
            block.validate(layout)
        except CacheFormatError as exc:
            raise CacheFormatError(f"{location.full(rel)}: {exc}") from exc
        return block
