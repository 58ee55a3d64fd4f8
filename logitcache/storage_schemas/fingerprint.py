"""Fingerprints: stable hashes of configurations, and the fields in which two configs differ.

A cache records the fingerprint of everything that shapes its labels (teacher, tokenizer,
windowing, soft-label parameters, layout, storage settings). A later build may add to the
cache only when its own fingerprint is equal; otherwise it is refused with the list of
differing fields, which :func:`diff_fields` computes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint(value: Any) -> str:
    """sha256 (hex) of the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def diff_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths at which ``old`` and ``new`` differ, with both values, sorted."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{path}: absent -> {canonical_json(new[key])}")
            elif key not in new:
                out.append(f"{path}: {canonical_json(old[key])} -> absent")
            else:
                out.extend(diff_fields(old[key], new[key], path))
        return out
    if canonical_json(old) != canonical_json(new):
        return [f"{prefix or '<root>'}: {canonical_json(old)} -> {canonical_json(new)}"]
    return []
