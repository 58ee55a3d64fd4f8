"""The Parquet tables of a cache exported for other trainers: one row per cache record.

A cache's shards pack their soft labels into binary columns that only logitcache (or the
README's numpy recipe) decodes. An export writes the same records as plain nested lists that
any Parquet reader, and so ``datasets.load_dataset("parquet", ...)``, reads as they are. Two
formats:

``axolotl``
    The columns axolotl's KD plugin reads from a pre-tokenized dataset: ``input_ids``,
    ``attention_mask``, ``labels`` (the record's tokens, ``-100`` where no hard target is
    due: positions 0 to ``context_length``), and per token ``j`` a row of ``W`` entries in
    ``target_token_ids`` / ``target_logprobs`` / ``target_mask``. Row ``j`` is the teacher's
    distribution over token ``j + 1`` (its output at position ``j``, as the cache stores it):
    axolotl's loss pairs it with the student's output at position ``j`` and shifts only
    ``labels``. Rows of left context hold padding (id 0, log-prob ``PAD_LOGPROB``, mask 0).
    What the ``W`` entries hold depends on the cache kind (:func:`target_width`):

    - ``token_topk``: the top-k ids in rank order with their log-probabilities;
    - ``token_sampled``: the distinct drawn ids, most drawn first, with ``log(count / n)``;
    - ``token_topk_sampled``: the top-k head, then the tail draws with
      ``log(tail_mass * count / n)``.

    Each entry's weight ``exp(logprob)`` makes axolotl's forward KL ``sum w (log w - log q)``
    the cache's own estimator: exact on the head, an unbiased estimate of the cross-entropy
    (and of forward KL's gradient) on the draws. With ``renormalize`` the entries of a row
    are scaled to sum to 1, as axolotl's own dataset loaders do. An entry whose log-prob is
    not finite (a teacher with fewer than ``k`` finite logits) or whose weight is 0 is masked.

``hf``
    The cache's own information, decoded: ``record_id``, ``doc_key``, ``lang``,
    ``input_ids``, ``context_length`` and, per labelled position (a record's tokens from
    ``context_length`` on; position ``i`` is token ``context_length + i`` and its labels are
    the distribution over the token after it), ``topk_ids`` / ``topk_logprobs`` in rank
    order, ``sample_ids`` / ``sample_counts`` (ascending ids), ``entropy`` and
    ``target_logprob``. Classifier caches: ``class_logprobs`` and ``label`` per record.

Everything is vectorised over a block of records (no Python loop over tokens).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from logitcache.errors import CacheFormatError, ConfigError
from logitcache.storage_schemas.layout import RecordLayout
from logitcache.storage_schemas.records import RecordBlock

EXPORT_FORMATS: tuple[str, ...] = ("axolotl", "hf")
IGNORE_INDEX = -100  # a label that is no hard target (Hugging Face's convention)
PAD_ID = 0
PAD_LOGPROB = -1e9  # what axolotl's KD collator pads target_logprobs with
_MAX_OFFSET = np.iinfo(np.int32).max

_INT_LIST = pa.list_(pa.int32())
_FLOAT_LIST = pa.list_(pa.float32())


def check_exportable(layout: RecordLayout, fmt: str) -> None:
    """Refuse a format this cache kind cannot be written in, saying what to do instead."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; known: {', '.join(EXPORT_FORMATS)}")
    if fmt == "axolotl" and not layout.is_token_level:
        raise ConfigError(
            "a sequence_probs (classifier) cache holds one class distribution per record, and "
            "axolotl's KD plugin distils next-token distributions only: export it with --format hf "
            "(columns class_logprobs and label)"
        )
    if layout.vocab_size > _MAX_OFFSET:
        raise ConfigError(f"vocabulary of {layout.vocab_size:,} ids does not fit the export's int32 ids")


def target_width(layout: RecordLayout) -> int:
    """Entries per row of the axolotl target columns: the top-k head, then room for the draws."""
    return (layout.k if layout.has_topk else 0) + (layout.samples if layout.has_samples else 0)


def export_schema(layout: RecordLayout, fmt: str) -> pa.Schema:
    """The Arrow schema of every file of an export of ``layout`` in ``fmt``."""
    if fmt == "axolotl":
        return pa.schema([
            ("input_ids", _INT_LIST), ("attention_mask", pa.list_(pa.int8())), ("labels", _INT_LIST),
            ("target_token_ids", pa.list_(_INT_LIST)), ("target_logprobs", pa.list_(_FLOAT_LIST)),
            ("target_mask", pa.list_(pa.list_(pa.int8()))),
        ])
    fields = [("record_id", pa.uint64()), ("doc_key", pa.string()), ("lang", pa.string()),
              ("input_ids", _INT_LIST)]
    if not layout.is_token_level:
        return pa.schema([*fields, ("class_logprobs", _FLOAT_LIST), ("label", pa.int32())])
    fields.append(("context_length", pa.int32()))
    if layout.has_topk:
        fields += [("topk_ids", pa.list_(_INT_LIST)), ("topk_logprobs", pa.list_(_FLOAT_LIST))]
    if layout.has_samples:
        fields += [("sample_ids", pa.list_(_INT_LIST)), ("sample_counts", pa.list_(_INT_LIST))]
    if layout.entropy:
        fields.append(("entropy", _FLOAT_LIST))
    if layout.target_logprob:
        fields.append(("target_logprob", _FLOAT_LIST))
    return pa.schema(fields)


def export_table(block: RecordBlock, layout: RecordLayout, fmt: str, *, renormalize: bool = True) -> pa.Table:
    """``block``'s records as a table of :func:`export_schema` (``renormalize``: axolotl only)."""
    schema = export_schema(layout, fmt)
    if fmt == "axolotl":
        columns = _axolotl_columns(block, layout, renormalize=renormalize)
    else:
        columns = _hf_columns(block, layout)
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


def features_yaml(schema: pa.Schema) -> list[dict[str, Any]]:
    """The ``dataset_info.features`` of a dataset card for ``schema``, in the notation of
    ``datasets`` 4 and later (``list:`` for lists, ``dtype:`` for values)."""
    return [{"name": field.name, **_feature(field.type)} for field in schema]


_DTYPE_NAMES = {pa.float32(): "float32", pa.float64(): "float64", pa.string(): "string"}


def _feature(arrow_type: pa.DataType) -> dict[str, Any]:
    if pa.types.is_list(arrow_type):
        inner = _feature(arrow_type.value_type)
        return {"list": inner["dtype"] if set(inner) == {"dtype"} else inner}
    return {"dtype": _DTYPE_NAMES.get(arrow_type, str(arrow_type))}


# ---------------------------------------------------------------- shared pieces


def _offsets(offsets: np.ndarray) -> pa.Array:
    offsets = np.asarray(offsets, dtype=np.int64)
    offsets = offsets - offsets[0]
    if int(offsets[-1]) > _MAX_OFFSET:
        raise CacheFormatError(f"a block of {int(offsets[-1]):,} values is too large for one export row group; "
                               "repack the cache with smaller blocks (logitcache repack --row-group-tokens N)")
    return pa.array(offsets.astype(np.int32), pa.int32())


def _listed(values: np.ndarray, offsets: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(_offsets(offsets), pa.array(values, value_type))


def _rows(matrix: np.ndarray, offsets: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """A list per record of the rows ``matrix[offsets[r]:offsets[r + 1]]`` (each a list of
    ``matrix.shape[1]`` values)."""
    n, width = matrix.shape
    inner = _listed(matrix.reshape(-1), np.arange(n + 1, dtype=np.int64) * width, value_type)
    return pa.ListArray.from_arrays(_offsets(offsets), inner)


def _token_columns(block: RecordBlock) -> dict[str, pa.Array]:
    return {"input_ids": _listed(block.input_ids.astype(np.int32), block.token_offsets, pa.int32())}


def _ranked_head(block: RecordBlock, layout: RecordLayout) -> tuple[np.ndarray, np.ndarray]:
    """``[P, k]`` int32 ids and float32 log-probs, each row in rank order (the cache stores
    id order; ties keep it)."""
    values = block.decoded_topk_logprobs(layout)
    order = np.argsort(-values, axis=1, kind="stable")
    ids = np.take_along_axis(block.topk_ids, order, axis=1).astype(np.int32)
    return ids, np.take_along_axis(values, order, axis=1)


def _dense_draws(block: RecordBlock, layout: RecordLayout) -> tuple[np.ndarray, np.ndarray]:
    """``[P, samples]`` int32 drawn ids and int64 counts, most drawn first (ties: ascending
    id), zero counts as padding."""
    s_off = block.sample_offsets - block.sample_offsets[0]
    per_position = np.diff(s_off)
    positions = len(per_position)
    slot = np.arange(int(s_off[-1])) - np.repeat(s_off[:-1], per_position)
    row = np.repeat(np.arange(positions), per_position)
    ids = np.zeros((positions, layout.samples), dtype=np.int32)
    counts = np.zeros((positions, layout.samples), dtype=np.int64)
    ids[row, slot] = block.sample_ids
    counts[row, slot] = block.sample_counts
    order = np.argsort(-counts, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(counts, order, axis=1)


# ---------------------------------------------------------------- axolotl


def axolotl_targets(block: RecordBlock, layout: RecordLayout, *,
                    renormalize: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per labelled position ``[P, W]``: int32 ids, float32 log-probs and the int8 mask of
    the entries axolotl should use (padding: id 0, ``PAD_LOGPROB``, mask 0)."""
    ids_parts, logprob_parts = [], []
    head_mass = None
    if layout.has_topk:
        head_ids, head_logprobs = _ranked_head(block, layout)
        ids_parts.append(head_ids)
        logprob_parts.append(head_logprobs.astype(np.float64))
        head_mass = np.exp(logprob_parts[0]).sum(axis=1)
    if layout.has_samples:
        draw_ids, counts = _dense_draws(block, layout)
        drawn = counts.sum(axis=1, keepdims=True)
        weights = counts / np.maximum(drawn, 1)
        if head_mass is not None:  # draws come from the tail, renormalised: scale by its mass
            weights = weights * np.clip(1.0 - head_mass, 0.0, 1.0)[:, None]
        with np.errstate(divide="ignore"):
            logprob_parts.append(np.log(weights))
        ids_parts.append(draw_ids)
    ids = np.concatenate(ids_parts, axis=1)
    logprobs = np.concatenate(logprob_parts, axis=1)
    mask = np.isfinite(logprobs)
    if renormalize:
        logprobs = logprobs - _masked_logsumexp(logprobs, mask)[:, None]
    return (np.where(mask, ids, PAD_ID).astype(np.int32),
            np.where(mask, logprobs, PAD_LOGPROB).astype(np.float32), mask.astype(np.int8))


def _masked_logsumexp(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row, ``log(sum(exp(values)))`` over the masked entries; 0 for a row with none."""
    peak = np.where(mask, values, -np.inf).max(axis=1, initial=-np.inf)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    total = np.where(mask, np.exp(np.where(mask, values, 0.0) - peak[:, None]), 0.0).sum(axis=1)
    with np.errstate(divide="ignore"):
        return np.where(total > 0, peak + np.log(np.where(total > 0, total, 1.0)), 0.0)


def label_token_index(block: RecordBlock) -> np.ndarray:
    """``[P]``: the index in ``block.input_ids`` of each labelled position's token."""
    lengths = np.diff(block.token_offsets)
    context = block.context_length.astype(np.int64)
    labelled = lengths - context
    lab = block.label_offsets
    starts = block.token_offsets[:-1] - block.token_offsets[0] + context
    return np.repeat(starts - lab[:-1], labelled) + np.arange(int(lab[-1]))


def _axolotl_columns(block: RecordBlock, layout: RecordLayout, *, renormalize: bool) -> dict[str, pa.Array]:
    tokens = block.num_tokens
    tok = block.token_offsets - block.token_offsets[0]
    at = label_token_index(block)
    ids, logprobs, mask = axolotl_targets(block, layout, renormalize=renormalize)
    width = ids.shape[1]
    full_ids = np.full((tokens, width), PAD_ID, dtype=np.int32)
    full_logprobs = np.full((tokens, width), PAD_LOGPROB, dtype=np.float32)
    full_mask = np.zeros((tokens, width), dtype=np.int8)
    full_ids[at], full_logprobs[at], full_mask[at] = ids, logprobs, mask
    # a hard target at token t + 1 for every labelled token t that is not its record's last
    last = np.zeros(tokens, dtype=bool)
    last[tok[1:][tok[1:] > tok[:-1]] - 1] = True
    followed = at[~last[at]] + 1
    labels = np.full(tokens, IGNORE_INDEX, dtype=np.int32)
    labels[followed] = block.input_ids[followed].astype(np.int32)
    return {
        **_token_columns(block),
        "attention_mask": _listed(np.ones(tokens, dtype=np.int8), tok, pa.int8()),
        "labels": _listed(labels, tok, pa.int32()),
        "target_token_ids": _rows(full_ids, tok, pa.int32()),
        "target_logprobs": _rows(full_logprobs, tok, pa.float32()),
        "target_mask": _rows(full_mask, tok, pa.int8()),
    }


# ---------------------------------------------------------------- hf


def _hf_columns(block: RecordBlock, layout: RecordLayout) -> dict[str, pa.Array]:
    columns: dict[str, pa.Array] = {
        "record_id": pa.array(block.record_id, pa.uint64()),
        "doc_key": pa.array(block.doc_key.tolist(), pa.string()),
        "lang": pa.array(block.lang.tolist(), pa.string()),
        **_token_columns(block),
    }
    if not layout.is_token_level:
        values = block.decoded_class_logprobs(layout)
        offsets = np.arange(block.num_records + 1) * layout.num_classes
        columns["class_logprobs"] = _listed(values.reshape(-1), offsets, pa.float32())
        columns["label"] = pa.array(block.label, pa.int32())
        return columns
    lab = block.label_offsets
    columns["context_length"] = pa.array(block.context_length.astype(np.int32), pa.int32())
    if layout.has_topk:
        ids, logprobs = _ranked_head(block, layout)
        columns["topk_ids"] = _rows(ids, lab, pa.int32())
        columns["topk_logprobs"] = _rows(logprobs, lab, pa.float32())
    if layout.has_samples:
        s_off = block.sample_offsets - block.sample_offsets[0]
        for name, values in (("sample_ids", block.sample_ids), ("sample_counts", block.sample_counts)):
            inner = _listed(values.astype(np.int32), s_off, pa.int32())
            columns[name] = pa.ListArray.from_arrays(_offsets(lab), inner)
    for name in ("entropy", "target_logprob"):
        if getattr(layout, name):
            columns[name] = _listed(getattr(block, name).astype(np.float32), lab, pa.float32())
    return columns
