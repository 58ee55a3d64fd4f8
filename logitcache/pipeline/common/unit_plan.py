"""What a build must do with each work unit of the corpus, given what the cache has committed.

One decision per unit of the corpus as it is now, shared by the build (which labels the
units to build and stops at the first refusal) and by ``logitcache plan`` (which lists every
decision without loading the teacher):

- ``skip``: every row of the unit is committed, and its documents still hash to what was
  committed;
- ``build``: nothing of the unit is committed, or only its first rows are, because the
  source was shorter when it was built and has since grown by appended rows; then only the
  new rows are built, as a part of the unit (:meth:`WorkUnit.rows`);
- ``refuse``: committed rows changed under the cache (edited, removed or reordered), which
  no build can repair without ``--overwrite``.

A unit is committed as one shard or, after its source grew, as several parts that cover
consecutive rows from the unit's first row; each part's shard entry records its first row,
row count and fingerprint.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from logitcache.pipeline.common.corpus import WorkUnit, whole_unit_id
from logitcache.storage_schemas.manifest import ShardEntry

Action = Literal["skip", "build", "refuse"]
_CHANGED = ("it was committed from different documents than the corpus holds now: a source file changed after "
            "it was built")


@dataclass(frozen=True, kw_only=True)
class UnitDecision:
    action: Action
    unit: WorkUnit  # the unit as the corpus holds it now
    todo: WorkUnit | None = None  # for "build": the rows to label (the whole unit or its appended part)
    committed_rows: int = 0  # rows of the unit already in the cache
    reason: str = ""  # why a unit is refused

    @property
    def appended(self) -> bool:
        """A part over rows appended to the source after the unit's first rows were committed."""
        return self.action == "build" and self.committed_rows > 0


def committed_parts(entries: Iterable[ShardEntry]) -> dict[str, list[ShardEntry]]:
    """Unit id -> the shard entries of its committed parts, in row order."""
    parts: dict[str, list[ShardEntry]] = {}
    for entry in entries:
        parts.setdefault(whole_unit_id(entry.unit_id), []).append(entry)
    for group in parts.values():
        group.sort(key=lambda entry: entry.stats.get("first_row", 0))
    return parts


def decide_units(units: Iterable[WorkUnit], committed: dict[str, list[ShardEntry]]) -> Iterator[UnitDecision]:
    """One decision per unit of ``units`` against ``committed`` (:func:`committed_parts`)."""
    for unit in units:
        yield decide_unit(unit, committed.get(unit.unit_id, []))


def decide_unit(unit: WorkUnit, parts: list[ShardEntry]) -> UnitDecision:
    if not parts:
        return UnitDecision(action="build", unit=unit, todo=unit)
    end = unit.first_row + unit.num_rows
    row = unit.first_row
    for entry in parts:
        first, rows = entry.stats.get("first_row"), entry.stats.get("num_rows")
        if first is None or rows is None:  # entries without row ranges: the whole unit, by fingerprint
            return _whole(unit, entry)
        if first != row or first + rows > end:
            return _refuse(unit, entry, f"the source now has {end - unit.first_row} row(s) in this unit where "
                                        f"{first + rows - unit.first_row} were committed: rows were removed")
        committed = entry.stats.get("unit_fingerprint")
        if committed is not None and committed != unit.rows(first, first + rows).fingerprint:
            return _refuse(unit, entry, _CHANGED)
        row = first + rows
    if row == end:
        return UnitDecision(action="skip", unit=unit, committed_rows=unit.num_rows)
    return UnitDecision(action="build", unit=unit, todo=unit.rows(row, end), committed_rows=row - unit.first_row)


def _whole(unit: WorkUnit, entry: ShardEntry) -> UnitDecision:
    committed = entry.stats.get("unit_fingerprint")
    if committed is not None and committed != unit.fingerprint:
        return _refuse(unit, entry, _CHANGED)
    return UnitDecision(action="skip", unit=unit, committed_rows=unit.num_rows)


def _refuse(unit: WorkUnit, entry: ShardEntry, why: str) -> UnitDecision:
    return UnitDecision(action="refuse", unit=unit, reason=(
        f"work unit {entry.unit_id} ({unit.source}, rows from {entry.stats.get('first_row', unit.first_row)}): "
        f"{why}. Restore the file (rows may only be appended), add new data as new files instead, "
        "or rebuild with --overwrite"))
