"""summarize_cache: what a cache holds, from its manifest plus one decoded example.

The summary is a plain, JSON-serialisable dict (``logitcache inspect --json`` prints it);
:func:`format_summary` renders it for people. Everything except ``example`` comes from
the manifest; the example is one labelled position decoded from the first block of the
first non-empty shard, so inspecting a large cache reads one block, not the cache.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from logitcache.errors import CorruptShardError
from logitcache.storage_schemas.layout import RecordLayout
from logitcache.storage_schemas.manifest import Manifest, ShardEntry
from logitcache.storage_schemas.records import RecordBlock

_DIGITS = 6


def summarize_cache(url: str) -> dict[str, Any]:
    """Summary of the cache at ``url``; raises CacheFormatError when it is not a readable cache."""
    from logitcache.storage_schemas.shard_reader import CacheReader

    reader = CacheReader(url)
    manifest = reader.manifest
    layout = manifest.layout
    records, positions, size = manifest.total_records, manifest.total_positions, manifest.total_bytes
    per_record = size / records if records else None
    per_token = bytes_per_token(manifest)
    return {
        "url": reader.location.url,
        "kind": manifest.kind,
        "format": manifest.format,
        "format_version": manifest.format_version,
        "teacher": dict(manifest.teacher),
        "tokenizer": {
            "name": manifest.tokenizer.get("name_or_path"),
            "fingerprint": manifest.tokenizer.get("fingerprint"),
            # what a student's tokenizer is checked against (the error quotes its first 12 digits)
            "vocab_fingerprint": manifest.tokenizer.get("vocab_fingerprint"),
            "vocab_size": manifest.tokenizer.get("vocab_size", layout.vocab_size),
        },
        "layout": layout.to_dict(),
        "windows": dict(manifest.windows),
        "backend": manifest.backend,
        "compression": manifest.storage.get("compression"),
        "compression_level": manifest.storage.get("compression_level"),
        "shards": len(manifest.shards),
        "records": records,
        "tokens": manifest.total_tokens,
        "positions": positions,
        "bytes": size,
        "bytes_per_token": _round(per_token, 3),
        "bytes_per_record": _round(per_record, 3),
        "bytes_per_token_unit": "labelled position" if layout.is_token_level else "record",
        "langs": manifest.lang_totals(),
        "stats": dict(manifest.stats),
        "created_at": manifest.created_at,
        "updated_at": manifest.updated_at,
        **_example_or_error(reader),
    }


def bytes_per_token(manifest: Manifest) -> float | None:
    """Shard bytes per labelled position of a token cache, per record of a sequence cache (which
    has no labelled tokens); None while the cache is empty."""
    size = manifest.total_bytes
    count = manifest.total_positions if manifest.layout.is_token_level else manifest.total_records
    return size / count if count else None


def _example_or_error(reader) -> dict[str, Any]:
    """``{"example": ...}``, or, when its shard cannot be decoded, the error beside a None."""
    try:
        return {"example": _example(reader)}
    except CorruptShardError as exc:  # inspect still shows the manifest; verify says more
        return {"example": None, "example_error": str(exc)}


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def _example(reader) -> dict[str, Any] | None:
    """One labelled position (or record, for sequence_probs) from the first non-empty shard."""
    layout = reader.layout
    for entry in reader.shards:
        if entry.records == 0 or (layout.is_token_level and entry.positions == 0):
            continue
        for index in range(entry.blocks):  # the first block nearly always has one
            block = reader.read_block(entry, index)
            found = _example_in_block(block, layout, entry)
            if found is not None:
                return found
    return None


def _example_in_block(block: RecordBlock, layout: RecordLayout, entry: ShardEntry) -> dict[str, Any] | None:
    if block.num_records == 0:
        return None
    if not layout.is_token_level:
        probs = [round(float(p), _DIGITS) for p in np.exp(block.decoded_class_logprobs(layout)[0])]
        return {
            **_record_fields(block, 0, entry),
            "tokens": int(block.token_offsets[1] - block.token_offsets[0]),
            "class_probs": probs,
            "predicted": int(np.argmax(probs)),
            "label": int(block.label[0]),
        }
    label_offsets = block.label_offsets
    has_labels = np.flatnonzero(np.diff(label_offsets) > 0)
    if has_labels.size == 0:
        return None
    r = int(has_labels[0])
    row = int(label_offsets[r])  # the record's first labelled position
    start, stop = int(block.token_offsets[r]), int(block.token_offsets[r + 1])
    position = int(block.context_length[r])  # index of that position inside the record
    example: dict[str, Any] = {
        **_record_fields(block, r, entry),
        "position": position,
        "record_tokens": stop - start,
        "input_token_id": int(block.input_ids[start + position]),
        "next_token_id": int(block.input_ids[start + position + 1]) if start + position + 1 < stop else None,
    }
    if layout.has_topk:
        logprobs = block.decoded_topk_logprobs(layout)[row]
        rank = np.argsort(-logprobs, kind="stable")  # stored in id order; shown by rank
        probs = [round(float(p), _DIGITS) for p in np.exp(logprobs[rank])]
        example["topk_ids"] = [int(i) for i in block.topk_ids[row][rank]]
        example["topk_probs"] = probs
        example["tail_mass"] = round(1.0 - sum(probs), _DIGITS)
    if layout.has_samples:
        s0, s1 = int(block.sample_offsets[row]), int(block.sample_offsets[row + 1])
        example["sample_ids"] = [int(i) for i in block.sample_ids[s0:s1]]
        example["sample_counts"] = [int(c) for c in block.sample_counts[s0:s1]]
    if block.entropy is not None:
        example["entropy"] = round(float(block.entropy[row]), 4)
    if block.target_logprob is not None and np.isfinite(float(block.target_logprob[row])):
        example["target_logprob"] = round(float(block.target_logprob[row]), 4)
    return example


def _record_fields(block: RecordBlock, r: int, entry: ShardEntry) -> dict[str, Any]:
    return {
        "shard": entry.path,
        "record_id": int(block.record_id[r]),
        "doc_key": str(block.doc_key[r]),
        "lang": str(block.lang[r]),
    }


# ---------------------------------------------------------------- text form


def format_summary(summary: dict[str, Any]) -> str:
    """``logitcache inspect`` output: aligned key/value lines, a language table, the example."""
    layout = summary["layout"]
    teacher = summary["teacher"]
    tokenizer = summary["tokenizer"]
    parts = [f"k={layout['k']}"] if layout.get("k") else []
    if layout.get("samples"):
        parts.append(f"samples={layout['samples']}")
    if layout.get("num_classes"):
        parts.append(f"classes={layout['num_classes']}")
    parts += [f"values {layout['value_codec']}", f"ids {layout['id_type']}"]
    if layout.get("entropy"):
        parts.append("entropy")
    if layout.get("target_logprob"):
        parts.append("target log-prob")
    compression = summary.get("compression") or "none"
    if compression == "zstd" and summary.get("compression_level") is not None:
        compression = f"{compression} level {summary['compression_level']}"
    token_level = summary["kind"] != "sequence_probs"
    rows = [
        ("cache", summary["url"]),
        ("kind", summary["kind"]),
        ("format", f"{summary['format']} {summary['format_version']}"),
        ("teacher", _teacher_text(teacher)),
        ("tokenizer", f"{tokenizer.get('name')} (vocab {_num(tokenizer.get('vocab_size'))}, "
                      f"fingerprint {str(tokenizer.get('fingerprint'))[:16]}"
                      + (f", vocab fingerprint {tokenizer['vocab_fingerprint'][:12]}"
                         if tokenizer.get("vocab_fingerprint") else "") + ")"),
        ("layout", ", ".join(parts)),
        ("codec", layout["value_codec"]),
        ("backend", f"{summary['backend']} ({compression})"),
        ("shards", _num(summary["shards"])),
        ("records", _num(summary["records"])),
        ("tokens", _num(summary["tokens"])),
    ]
    if token_level:
        rows.append(("positions", _num(summary["positions"])))
    rows.append(("bytes", _num(summary["bytes"])))
    if token_level:
        rows.append(("bytes/token", _float(summary["bytes_per_token"])))
    rows.append(("bytes/record", _float(summary["bytes_per_record"])))
    for key, value in sorted(summary.get("stats", {}).items()):
        if isinstance(value, (int, float, str, bool)) or value is None:
            rows.append((f"stats.{key}", _float(value) if isinstance(value, float) else str(value)))
    width = max(len(key) for key, _ in rows)
    lines = [f"{key:<{width}}  {value}" for key, value in rows]
    lines += ["", "languages:", *_lang_table(summary["langs"], summary["tokens"])]
    if summary.get("example_error"):
        lines += ["", f"example: cannot be decoded ({summary['example_error']}); "
                      "run `logitcache verify` on the cache"]
    else:
        lines += ["", *_example_text(summary.get("example"))]
    return "\n".join(lines)


def _teacher_text(teacher: dict[str, Any]) -> str:
    name = teacher.get("name_or_path") or teacher.get("name") or "?"
    extra = [f"{k} {teacher[k]}" for k in ("revision", "dtype", "task") if teacher.get(k)]
    return f"{name} ({', '.join(extra)})" if extra else str(name)


def _num(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _float(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.2f}"


def _lang_table(langs: dict[str, dict[str, int]], total_tokens: int) -> list[str]:
    if not langs:
        return ["  (no records)"]
    order = sorted(langs.items(), key=lambda item: (-item[1].get("tokens", 0), item[0]))
    rows = [("lang", "records", "tokens", "share")]
    for lang, counts in order:
        share = counts.get("tokens", 0) / total_tokens if total_tokens else 0.0
        rows.append((lang, _num(counts.get("records", 0)), _num(counts.get("tokens", 0)), f"{share:.1%}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return ["  " + "  ".join(
        cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
    ) for row in rows]


def _example_text(example: dict[str, Any] | None) -> list[str]:
    if example is None:
        return ["example: none (the cache holds no labelled positions)"]
    head = (f"example: record {example['record_id']} ({example['doc_key']}, {example['lang']}) "
            f"in {example['shard']}")
    if "class_probs" in example:
        probs = ", ".join(f"{p:.6f}" for p in example["class_probs"])
        label = example["label"] if example["label"] >= 0 else "none"
        return [head, f"  class probs  [{probs}]", f"  predicted    {example['predicted']}",
                f"  label        {label}"]
    nxt = example.get("next_token_id")
    lines = [head, f"  position {example['position']} of {example['record_tokens']}, input token "
                   f"{example['input_token_id']}, next token {'(end)' if nxt is None else nxt}"]
    if "topk_ids" in example:
        lines.append("  top-k   id        prob")
        for rank, (tid, prob) in enumerate(zip(example["topk_ids"], example["topk_probs"], strict=True), start=1):
            lines.append(f"  {rank:>5}   {tid:<8}  {prob:.6f}")
        lines.append(f"  tail mass {example['tail_mass']:.6f}")
    if "sample_ids" in example:
        pairs = ", ".join(f"{i}x{c}" for i, c in zip(example["sample_ids"], example["sample_counts"], strict=True))
        lines.append(f"  samples (id x count)  {pairs}")
    if "entropy" in example:
        lines.append(f"  entropy {example['entropy']:.4f} nats")
    if "target_logprob" in example:
        lines.append(f"  log-prob of the next token {example['target_logprob']:.4f}")
    return lines
