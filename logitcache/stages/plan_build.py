"""``logitcache plan``: what a build of a config would do now, without loading the teacher.

A scheduled pipeline asks this before it books a GPU: which work units a build would label
(whole, or only the rows appended to a source), which it would skip as committed, which it
would refuse because committed rows changed, and whether the cache accepts the config at
all. The corpus is read exactly as the build reads it (the same units and fingerprints, the
same decisions: ``pipeline/common/unit_plan``); tokens, bytes and time are estimated from
what the cache's committed shards and its last build measured.

What the plan cannot see without the teacher: a teacher whose weights or tokenizer changed
under the same path or hub name. The build itself still checks those and refuses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from logitcache.config import JobConfig, config_fingerprint_fields
from logitcache.pipeline.common.corpus import estimate_units, iter_work_units
from logitcache.pipeline.common.unit_plan import UnitDecision, committed_parts, decide_units
from logitcache.storage_schemas.fingerprint import diff_fields
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.manifest import MANIFEST_FILE, Manifest

#: exit code of ``logitcache plan`` when a build would have nothing to do
NOTHING_TO_DO_EXIT = 3


@dataclass(kw_only=True)
class Estimate:
    """What the units to build would add, at the rates the cache's committed shards show."""

    tokens: int
    positions: int
    bytes: int
    seconds: float | None  # None when no earlier build measured its throughput
    basis: str  # what the rates were measured on

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "positions": self.positions, "bytes": self.bytes,
                "seconds": None if self.seconds is None else round(self.seconds, 1), "basis": self.basis}


@dataclass(kw_only=True)
class BuildPlan:
    cache: str
    cache_exists: bool
    config_differences: list[str] = field(default_factory=list)  # fields the committed cache has otherwise
    to_build: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, str]] = field(default_factory=list)
    units_skipped: int = 0
    documents_to_build: int = 0
    text_bytes_to_build: int = 0
    skipped_documents: dict[str, int] = field(default_factory=dict)
    estimate: Estimate | None = None

    @property
    def would_refuse(self) -> bool:
        return bool(self.config_differences or self.refused)

    @property
    def nothing_to_do(self) -> bool:
        return not self.would_refuse and not self.to_build

    @property
    def exit_code(self) -> int:
        """1 when a build would be refused, 3 when it would have nothing to do, else 0."""
        if self.would_refuse:
            return 1
        return NOTHING_TO_DO_EXIT if self.nothing_to_do else 0

    @property
    def status(self) -> str:
        if self.would_refuse:
            return "refuse"
        return "up_to_date" if self.nothing_to_do else "build"

    def to_dict(self) -> dict[str, Any]:
        return {
            "cache": self.cache, "status": self.status, "exit_code": self.exit_code,
            "cache_exists": self.cache_exists, "config_differences": self.config_differences,
            "units_to_build": len(self.to_build),
            "units_appended": sum(1 for unit in self.to_build if unit["appended_to"]),
            "units_skipped": self.units_skipped, "units_refused": len(self.refused),
            "documents_to_build": self.documents_to_build, "text_bytes_to_build": self.text_bytes_to_build,
            "skipped_documents": self.skipped_documents,
            "estimate": None if self.estimate is None else self.estimate.to_dict(),
            "to_build": self.to_build, "refused": self.refused,
        }

    def to_text(self) -> str:
        if self.config_differences:
            return (f"a build would be refused: {self.cache} was built with a different configuration; fields that "
                    "differ (cache -> this config):\n  " + "\n  ".join(self.config_differences)
                    + "\nUse a new cache path, or build with --overwrite to discard the existing cache.")
        lines = []
        if self.refused:
            lines.append(f"a build would be refused: {len(self.refused)} committed unit(s) changed under the cache:")
            lines += [f"  {unit['reason']}" for unit in self.refused]
        elif self.nothing_to_do:
            lines.append(f"nothing to do: {self.cache} is up to date ({self.units_skipped} unit(s) committed)")
        else:
            appended = sum(1 for unit in self.to_build if unit["appended_to"])
            lines.append(f"a build would label {len(self.to_build)} unit(s) ({appended} of them rows appended to a "
                         f"committed unit) and skip {self.units_skipped} committed: "
                         f"{self.documents_to_build:,} documents, {self.text_bytes_to_build:,} bytes of text")
            lines.append(self._estimate_line())
        if self.skipped_documents:
            skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped_documents.items()))
            lines.append(f"  documents the corpus holds that no build labels: {skipped}")
        return "\n".join(lines)

    def _estimate_line(self) -> str:
        if self.estimate is None:
            return "  no estimate of tokens, bytes or time: the cache has no committed shard to measure rates on"
        est = self.estimate
        time = f", about {_duration(est.seconds)}" if est.seconds is not None else ""
        return f"  estimated: {est.tokens:,} tokens, {est.bytes:,} shard bytes{time} ({est.basis})"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan_build(cfg: JobConfig, *, progress: bool = True) -> BuildPlan:
    """What ``build_cache(cfg)`` would do now; see the module docstring."""
    cfg.require_build_sections("logitcache plan")
    location = CacheLocation(cfg.cache)
    manifest = Manifest.load(location) if location.exists(MANIFEST_FILE) else None
    plan = BuildPlan(cache=cfg.cache, cache_exists=manifest is not None)
    if manifest is not None and manifest.shards:
        plan.config_differences = diff_fields(manifest.fingerprint_fields, config_fingerprint_fields(cfg))
    committed = committed_parts(manifest.shards) if manifest is not None and not plan.config_differences else {}
    units = iter_work_units(cfg.corpus)
    total = estimate_units(cfg.corpus) if progress else None
    with tqdm(units, desc="plan", unit=" unit", total=total, disable=not progress, dynamic_ncols=True) as bar:
        for decision in decide_units(bar, committed):
            _add(plan, decision)
    if manifest is not None and plan.to_build:
        plan.estimate = _estimate(manifest, documents=plan.documents_to_build, text_bytes=plan.text_bytes_to_build)
    return plan


def _add(plan: BuildPlan, decision: UnitDecision) -> None:
    for reason, n in decision.unit.skipped.items():
        plan.skipped_documents[reason] = plan.skipped_documents.get(reason, 0) + n
    if decision.action == "skip":
        plan.units_skipped += 1
    elif decision.action == "refuse":
        plan.refused.append({"unit_id": decision.unit.unit_id, "source": decision.unit.source,
                             "reason": decision.reason})
    else:
        todo = decision.todo
        plan.to_build.append({
            "unit_id": todo.unit_id, "source": todo.source, "first_row": todo.first_row, "num_rows": todo.num_rows,
            "documents": todo.num_documents, "text_bytes": todo.text_bytes,
            "appended_to": decision.unit.unit_id if decision.appended else None,
        })
        plan.documents_to_build += todo.num_documents
        plan.text_bytes_to_build += todo.text_bytes


def _estimate(manifest: Manifest, *, documents: int, text_bytes: int) -> Estimate | None:
    """Tokens from text bytes (or documents, for shards that did not record their text bytes),
    positions and shard bytes per token from the committed shards, time from the last build."""
    shards = manifest.shards
    tokens = sum(s.tokens for s in shards)
    if not shards or not tokens:
        return None
    measured = [s for s in shards if "text_bytes" in s.stats]
    if measured and sum(s.stats["text_bytes"] for s in measured):
        rate = sum(s.tokens for s in measured) / sum(s.stats["text_bytes"] for s in measured)
        new_tokens, per = round(text_bytes * rate), f"{rate:.3f} tokens per byte of text"
    else:
        docs = sum(s.stats.get("documents", s.stats.get("num_rows", 0) - sum(s.stats.get("skipped_documents", {}).values()))
                   for s in shards)
        rate = tokens / max(docs, 1)
        new_tokens, per = round(documents * rate), f"{rate:.1f} tokens per document"
    positions = round(new_tokens * sum(s.positions for s in shards) / tokens)
    new_bytes = round(new_tokens * sum(s.bytes for s in shards) / tokens)
    speed = manifest.stats.get("last_build", {}).get("tokens_per_second") or 0
    seconds = new_tokens / speed if speed else None
    basis = f"{per}, {len(shards)} committed shard(s)"
    if seconds is not None:
        basis += f", {speed:,.0f} tokens/s in the last build"
    return Estimate(tokens=new_tokens, positions=positions, bytes=new_bytes, seconds=seconds, basis=basis)
