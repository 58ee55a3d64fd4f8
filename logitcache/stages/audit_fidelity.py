"""Fidelity audit: do a cache's stored labels still say what its teacher says?

``logitcache verify`` proves that every shard holds the bytes that were committed; it cannot
tell whether those bytes are what the teacher gives. A shard rewritten with other values and
hashed again, a teacher changed behind the same path, a build in another dtype: all pass it.
This stage (``logitcache verify --fidelity N``) samples N records per language (a pure
function of the manifest and the seed), runs the teacher again on the records' stored
``input_ids`` (each window exactly as the teacher saw it, so no tokenizer rebuilds inputs)
through stage one's own labelling code (:func:`~logitcache.pipeline.capture.unit_labeler.label_windows`),
and holds each stored label to the fresh one:

top-k (``token_topk``, ``token_topk_sampled``)
    every stored log-prob against the fresh log-prob of the same id, within the value codec's
    bound (:meth:`~logitcache.storage_schemas.value_codecs.ValueCodec.error_bound`) plus the
    dtype tolerance; every stored id must be in the fresh top-k, or tie with the fresh k-th
    log-prob within the tolerance (ids at the k-th boundary may swap).
``entropy``, ``target_logprob``
    the float16 columns against the fresh values, within float16's bound plus the tolerance.
sampled draws
    cannot be compared one by one. At a position with draws from the teacher's distribution
    (or, with a top-k head, from its tail), the draws' mean fresh log-prob has expectation
    ``-entropy`` (or the tail's expected log-prob), so per language the mean gap over drawn
    positions is zero up to sampling noise. It must lie within :data:`DRAW_STANDARD_ERRORS`
    standard errors, plus the tolerance times (1 + the draws' spread of log-probs), which
    bounds the shift a teacher within the tolerance can cause; with fewer than
    :data:`MIN_DRAWN_POSITIONS` drawn positions a language is not judged on its draws.
``sequence_probs``
    the class log-probs against a fresh forward, within the codec's bound plus the tolerance.

The dtype tolerance (:data:`DTYPE_TOLERANCE`) covers what a fresh forward may differ by
without the teacher being another one: in float32 only the order of sums (other batch
shapes); in bfloat16 or float16, rounding, chosen from a measurement of bf16 against float32
(docs/reliability.md). A teacher whose tokenizer vocabulary or logit width is not the
cache's is refused before any forward.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from logitcache.config import TeacherConfig
from logitcache.errors import ConfigError, IncompatibleCacheError
from logitcache.pipeline.capture.soft_labels import SoftLabelSpec
from logitcache.pipeline.capture.teacher import Teacher, load_teacher
from logitcache.pipeline.capture.unit_labeler import (
    UnitStats,
    class_rows,
    in_window_order,
    label_windows,
)
from logitcache.pipeline.common.windows import Window
from logitcache.storage_schemas.layout import RecordLayout
from logitcache.storage_schemas.manifest import Manifest
from logitcache.storage_schemas.records import RecordBlock, sample_draw_rows
from logitcache.storage_schemas.shard_reader import CacheReader
from logitcache.storage_schemas.value_codecs import get_value_codec

__all__ = ["DTYPE_TOLERANCE", "FidelityReport", "audit_fidelity", "sample_records"]

#: Nats a fresh log-prob may differ from the build's, by compute dtype (the larger of the
#: build's and the re-run's applies). bf16 against float32 measured at most 0.16 nats on the
#: stored top-64 of a tiny trained teacher and 0.07 on the demo teacher (docs/reliability.md).
DTYPE_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.25, "float16": 0.25}
#: How many standard errors the draws' mean gap may be off before a language fails.
DRAW_STANDARD_ERRORS = 6.0
#: Drawn positions a language needs before its draws are judged (the standard error must mean something).
MIN_DRAWN_POSITIONS = 30
#: Tail draws are judged at positions whose fresh tail holds at least this much probability
#: (below it the tail's expected log-prob is a difference of nearly equal float32 sums).
MIN_TAIL_MASS = 0.01
#: Logits per chunk through the head, as stage one: about 2**27 float32 (512 MB) at a time.
_CHUNK_LOGITS = 2**27
_DEFAULT_BATCH_TOKENS = 16384
_LISTED = 20  # bad records the text form lists
_WHAT = {"topk_logprobs": "top-k log-probs", "topk_ids": "top-k ids", "entropy": "entropy",
         "target_logprob": "target log-probs", "class_logprobs": "class log-probs"}


# ---------------------------------------------------------------- the report


@dataclass(kw_only=True)
class ColumnCheck:
    """One stored column of one language against the fresh forward."""

    values: int
    beyond: int  # values beyond their bound (ids: stored ids not in the fresh top-k)
    max_abs_error: float | None  # |stored - fresh| over the finite ones (None for ids)
    mean_abs_error: float | None
    bound: float | None  # the codec's bound inside its exact range plus the tolerance

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(kw_only=True)
class DrawCheck:
    """A language's draws against the fresh distribution (see the module docstring)."""

    positions: int  # drawn positions judged
    mean_gap: float | None  # mean of (draws' mean fresh log-prob - its fresh expectation)
    standard_error: float | None
    allowed: float | None  # DRAW_STANDARD_ERRORS standard errors + the tolerance's share
    ok: bool | None  # None: too few drawn positions to judge

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(kw_only=True)
class LanguageFidelity:
    lang: str
    records: int
    positions: int  # labelled positions checked (records, for sequence_probs)
    topk_agreement: float | None  # share of stored top-k ids in the fresh top-k (ties counted)
    columns: dict[str, ColumnCheck]
    draws: DrawCheck | None
    bad_records: int

    @property
    def ok(self) -> bool:
        return (self.bad_records == 0 and all(c.beyond == 0 for c in self.columns.values())
                and (self.draws is None or self.draws.ok is not False))

    @property
    def labels(self) -> ColumnCheck | None:
        """The soft labels' own column: top-k log-probs, or class log-probs."""
        return self.columns.get("topk_logprobs") or self.columns.get("class_logprobs")

    def to_dict(self) -> dict[str, Any]:
        labels = self.labels
        return {
            "lang": self.lang, "records": self.records, "positions": self.positions,
            "topk_agreement": self.topk_agreement,
            "max_abs_error": None if labels is None else labels.max_abs_error,
            "mean_abs_error": None if labels is None else labels.mean_abs_error,
            "bound": None if labels is None else labels.bound, "ok": self.ok, "bad_records": self.bad_records,
            "columns": {name: check.to_dict() for name, check in self.columns.items()},
            "draws": None if self.draws is None else self.draws.to_dict(),
        }


@dataclass(kw_only=True)
class BadRecord:
    record_id: int
    lang: str
    doc_key: str
    shard: str
    problems: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(kw_only=True)
class FidelityReport:
    """What :func:`audit_fidelity` found; ``ok`` when every language is within its bounds."""

    url: str
    kind: str
    teacher: str  # the model re-run
    dtype: str  # its compute dtype
    built_dtype: str | None  # the dtype the manifest records for the build
    device: str
    tolerance: float
    records_per_lang: int
    seed: int
    weights_match: bool | None  # teacher weights sha256 equals the manifest's (None: unknown)
    languages: list[LanguageFidelity] = field(default_factory=list)
    bad_records: list[BadRecord] = field(default_factory=list)
    skipped_shards: list[str] = field(default_factory=list)  # failed plain verification: not sampled

    @property
    def ok(self) -> bool:
        return all(lang.ok for lang in self.languages)

    @property
    def failed_languages(self) -> list[str]:
        return [lang.lang for lang in self.languages if not lang.ok]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "url": self.url, "kind": self.kind, "teacher": self.teacher, "dtype": self.dtype,
            "built_dtype": self.built_dtype, "device": self.device, "tolerance": self.tolerance,
            "records_per_lang": self.records_per_lang, "seed": self.seed, "weights_match": self.weights_match,
            "records": sum(lang.records for lang in self.languages),
            "failed_languages": self.failed_languages,
            "languages": [lang.to_dict() for lang in self.languages],
            "bad_records": [bad.to_dict() for bad in self.bad_records],
            "skipped_shards": self.skipped_shards,
        }

    def to_text(self) -> str:
        records = sum(lang.records for lang in self.languages)
        lines = [f"fidelity: {records} record(s) in {len(self.languages)} language(s) (up to "
                 f"{self.records_per_lang} each, seed {self.seed}) run again through {self.teacher} "
                 f"({self.dtype} on {self.device}; built in {self.built_dtype or 'unknown'}), "
                 f"tolerance {self.tolerance:g} nats"]
        if self.weights_match is False:
            lines.append("  note: the teacher's weights are not the ones the manifest records (weights sha256 differs)")
        if self.skipped_shards:
            lines.append(f"  not sampled (they fail the checks above): {', '.join(self.skipped_shards)}")
        lines += _table(self.languages)
        if self.bad_records:
            shown = self.bad_records[:_LISTED]
            lines.append(f"bad records ({len(self.bad_records)}" + (f", the first {_LISTED}" if len(shown)
                                                                    < len(self.bad_records) else "") + "):")
            lines += [f"  {b.lang}  record {b.record_id} (doc {b.doc_key}, {b.shard}): {'; '.join(b.problems)}"
                      for b in shown]
        lines.append(self._verdict())
        return "\n".join(lines)

    def _verdict(self) -> str:
        if not self.languages:
            return "fidelity: nothing to check (no records)"
        if self.ok:
            return "fidelity ok: every sampled record agrees with the teacher within the bounds"
        draws = [lang.lang for lang in self.languages if lang.draws is not None and lang.draws.ok is False]
        parts = [f"{len(self.bad_records)} record(s) beyond the bounds"] if self.bad_records else []
        if draws:
            parts.append(f"draws off the teacher's distribution in {', '.join(draws)}")
        return f"fidelity FAILED in {', '.join(self.failed_languages)}: {'; '.join(parts)}"


def _table(languages: list[LanguageFidelity]) -> list[str]:
    def num(value: float | None, fmt: str = ".4f") -> str:
        return "-" if value is None else format(value, fmt)

    def column(lang: LanguageFidelity, name: str) -> str:
        check = lang.columns.get(name)
        return "-" if check is None else num(check.max_abs_error)

    rows = [("lang", "records", "positions", "top-k agree", "max err", "mean err", "bound", "entropy", "target",
             "draws", "ok")]
    for lang in languages:
        labels, draws = lang.labels, lang.draws
        errors = (None, None, None) if labels is None else (labels.max_abs_error, labels.mean_abs_error, labels.bound)
        rows.append((lang.lang, str(lang.records), str(lang.positions),
                     "-" if lang.topk_agreement is None else f"{lang.topk_agreement:.2%}",
                     num(errors[0]), num(errors[1]), num(errors[2], ".4g"),
                     column(lang, "entropy"), column(lang, "target_logprob"),
                     "-" if draws is None or draws.ok is None else ("ok" if draws.ok else "OFF"),
                     "yes" if lang.ok else "NO"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    cells = [[cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
             for row in rows]
    return ["  " + "  ".join(row) for row in cells]


# ---------------------------------------------------------------- the recipe


def audit_fidelity(cache: str, *, records_per_lang: int, teacher: str | None = None, dtype: str | None = None,
                   device: str = "auto", seed: int = 0, tolerance: float | None = None,
                   skip_shards: Collection[str] = (), progress: bool = True) -> FidelityReport:
    """Run the teacher again on ``records_per_lang`` sampled records per language of ``cache``
    and compare the stored labels with the fresh ones (see the module docstring).

    ``teacher`` replaces the model the manifest names, ``dtype`` the build's compute dtype,
    ``tolerance`` (nats) the dtype tolerance; shards in ``skip_shards`` are not sampled.
    Raises IncompatibleCacheError (exit 2) for a teacher of another vocabulary.
    """
    if not progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    reader = CacheReader(cache)
    manifest, layout = reader.manifest, reader.layout
    cfg = teacher_config(manifest, teacher=teacher, dtype=dtype, device=device)
    model = load_teacher(cfg)
    check_vocabulary(model, manifest)
    built = manifest.teacher.get("dtype")
    run_dtype = str(model.identity["dtype"])
    tol = tolerance if tolerance is not None else max(DTYPE_TOLERANCE.get(built, 0.0), DTYPE_TOLERANCE[run_dtype])
    recorded, fresh_sha = manifest.teacher.get("weights_sha256"), model.identity.get("weights_sha256")
    report = FidelityReport(
        url=reader.location.url, kind=layout.kind, teacher=cfg.model, dtype=run_dtype, built_dtype=built,
        device=str(model.device), tolerance=tol, records_per_lang=records_per_lang, seed=seed,
        weights_match=None if recorded is None or fresh_sha is None else recorded == fresh_sha,
        skipped_shards=[e.path for e in reader.shards if e.path in set(skip_shards)],
    )
    block, shards = sample_records(reader, per_lang=records_per_lang, seed=seed, skip=skip_shards)
    if block is None:
        return report
    fresh = fresh_labels(model, block, layout=layout, batch_tokens=cfg.batch_tokens, progress=progress)
    checks, owner = compare(block, fresh, layout=layout, tolerance=tol)
    report.languages = _languages(block, layout, checks, owner, fresh, tol)
    report.bad_records = _bad_records(block, shards, checks, owner)
    return report


def teacher_config(manifest: Manifest, *, teacher: str | None, dtype: str | None, device: str) -> TeacherConfig:
    """The teacher the manifest records (or ``teacher``), in the build's dtype (or ``dtype``)."""
    recorded = manifest.teacher
    built = manifest.config.get("teacher") or {}  # the build's resolved teacher section
    task = recorded.get("task") or ("causal_lm" if manifest.layout.is_token_level else "sequence_classification")
    model = teacher or recorded.get("name_or_path") or built.get("model")
    if not model:
        raise ConfigError("the cache's manifest names no teacher; give the one it was built with: --teacher PATH")
    return TeacherConfig(
        model=model,
        revision=None if teacher else recorded.get("revision"), task=task,
        dtype=dtype or recorded.get("dtype") or "auto", device=device,
        batch_tokens=int(built.get("batch_tokens") or _DEFAULT_BATCH_TOKENS),
        trust_remote_code=bool(built.get("trust_remote_code", False)),
    )


def check_vocabulary(teacher: Teacher, manifest: Manifest) -> None:
    """Refuse a teacher whose token ids (or classes) mean something else than the cache's."""
    cached, fresh = manifest.tokenizer, teacher.tokenizer_info
    key = "vocab_fingerprint" if cached.get("vocab_fingerprint") else "fingerprint"
    name = teacher.identity.get("name_or_path")
    if cached.get(key) != fresh.get(key):
        raise IncompatibleCacheError(
            f"teacher {name!r}: its tokenizer ({fresh.get('vocab_size')} tokens, {key.replace('_', ' ')} "
            f"{str(fresh.get(key))[:12]}) is not the one the cache was built with ({cached.get('vocab_size')} tokens, "
            f"{str(cached.get(key))[:12]}): the stored token ids would mean other tokens. Give the cache's "
            "teacher with --teacher")
    layout = manifest.layout
    if layout.is_token_level and teacher.vocab_size != layout.vocab_size:
        raise IncompatibleCacheError(
            f"teacher {name!r}: its logits are {teacher.vocab_size} ids wide, the cache's vocabulary is "
            f"{layout.vocab_size}: it is not the model the cache was built with; give that one with --teacher")
    if not layout.is_token_level and teacher.num_classes != layout.num_classes:
        raise IncompatibleCacheError(
            f"teacher {name!r}: it has {teacher.num_classes} classes, the cache {layout.num_classes}; "
            "give the classifier the cache was built with --teacher")


# ---------------------------------------------------------------- sampling


def sample_records(reader: CacheReader, *, per_lang: int, seed: int,
                   skip: Collection[str] = ()) -> tuple[RecordBlock | None, list[str]]:
    """``per_lang`` records of each language (all of a language with fewer), chosen from the
    manifest's per-shard counts by a generator seeded with (seed, language), read from only the
    shards that hold them (each checked against its sha256 first); with each record's shard.
    ``(None, [])`` when no listed shard holds a record."""
    entries = [entry for entry in reader.shards if entry.path not in skip]
    wanted = _wanted(entries, per_lang=per_lang, seed=seed)
    pieces: list[RecordBlock] = []
    shards: list[str] = []
    for entry in entries:
        want = wanted.get(entry.path)
        if not want:
            continue
        reader.check_shard(entry)
        seen: Counter[str] = Counter()
        left = sum(len(ranks) for ranks in want.values())
        for index in range(entry.blocks):
            block = reader.read_block(entry, index)
            keep = []
            for row, lang in enumerate(block.lang.tolist()):
                if seen[lang] in want.get(lang, ()):
                    keep.append(row)
                seen[lang] += 1
            pieces += [block.take_records(row, row + 1) for row in keep]
            shards += [entry.path] * len(keep)
            left -= len(keep)
            if left <= 0:
                break
    return (RecordBlock.concat(pieces) if pieces else None), shards


def _wanted(entries, *, per_lang: int, seed: int) -> dict[str, dict[str, set[int]]]:
    """shard path -> language -> ranks (among that language's records in the shard) to read."""
    langs = sorted({lang for entry in entries for lang in entry.langs})
    wanted: dict[str, dict[str, set[int]]] = {}
    for lang in langs:
        counts = np.array([int(entry.langs.get(lang, {}).get("records", 0)) for entry in entries], dtype=np.int64)
        total = int(counts.sum())
        rng = np.random.default_rng([seed, zlib.crc32(lang.encode("utf-8"))])
        picks = np.sort(rng.choice(total, size=min(per_lang, total), replace=False))
        starts = np.concatenate([[0], np.cumsum(counts)])
        shard_of = np.searchsorted(starts, picks, side="right") - 1
        for pick, shard in zip(picks.tolist(), shard_of.tolist(), strict=True):
            wanted.setdefault(entries[shard].path, {}).setdefault(lang, set()).add(pick - int(starts[shard]))
    return wanted


# ---------------------------------------------------------------- the fresh forward


@dataclass(kw_only=True)
class FreshLabels:
    """The teacher's labels of the sampled records, in record order."""

    topk_logprobs: np.ndarray | None = None  # [P, k] float32: the fresh top-k values
    entropy: np.ndarray | None = None  # [P]
    target_logprob: np.ndarray | None = None  # [P]
    gathered: np.ndarray | None = None  # [P, k + samples]: fresh log-probs of the stored ids, NaN for none
    class_logprobs: np.ndarray | None = None  # [R, C]


def fresh_labels(teacher: Teacher, block: RecordBlock, *, layout: RecordLayout, batch_tokens: int,
                 progress: bool = True) -> FreshLabels:
    """Stage one's labelling of ``block``'s windows, a few batches at a time (for the progress
    bar), with the fresh log-probs of the ids the records store."""
    windows = records_as_windows(block)
    lookups = None
    if layout.is_token_level:
        lookups = np.split(stored_ids(block, layout), block.label_offsets[1:-1])
    spec = SoftLabelSpec(mode="topk", k=max(layout.k, 1), samples=1, entropy=True,
                         chunk_positions=max(16, min(4096, _CHUNK_LOGITS // max(teacher.vocab_size, 1))))
    stats = UnitStats()
    parts: list[dict[str, np.ndarray]] = []
    with tqdm(total=len(windows), desc="fidelity", unit=" record", disable=not progress, dynamic_ncols=True) as bar:
        for start, stop in _chunks(block.token_offsets, 4 * batch_tokens):
            # padded rows: a forward independent of the packing a build may have used
            per_batch = label_windows(teacher, windows[start:stop], spec=spec, layout=layout, batch_tokens=batch_tokens,
                                      packing="off", seed=0, stats=stats,
                                      gather=None if lookups is None else lookups[start:stop])
            if layout.is_token_level:
                parts.append({"topk_logprobs": in_window_order(per_batch, "topk_logprobs", spec.k),
                              "entropy": in_window_order(per_batch, "entropy"),
                              "gathered": in_window_order(per_batch, "gathered_logprobs", lookups[start].shape[1])})
                if layout.target_logprob:
                    parts[-1]["target_logprob"] = in_window_order(per_batch, "target_logprob")
            else:
                parts.append({"class_logprobs": class_rows(per_batch, windows=stop - start,
                                                           num_classes=layout.num_classes)})
            bar.update(stop - start)
    return FreshLabels(**{name: np.concatenate([part[name] for part in parts]) for name in parts[0]})


def records_as_windows(block: RecordBlock) -> list[Window]:
    """The stored records as the windows stage one labelled (the window index, which only
    names a record id, is not stored: 0)."""
    offsets = block.token_offsets
    context = block.context_length
    return [Window(record_id=int(block.record_id[r]), doc_key=str(block.doc_key[r]), lang=str(block.lang[r]),
                   label=None if block.label is None else int(block.label[r]), window_index=0,
                   input_ids=block.input_ids[offsets[r]:offsets[r + 1]].astype(np.int64),
                   context_length=0 if context is None else int(context[r]))
            for r in range(block.num_records)]


def stored_ids(block: RecordBlock, layout: RecordLayout) -> np.ndarray:
    """``[P, k + samples]`` int64: per labelled position its stored top-k ids, then its draws
    (-1 at positions without draws)."""
    parts = []
    if layout.has_topk:
        parts.append(block.topk_ids.astype(np.int64))
    if layout.has_samples:
        draws, drawn = sample_draw_rows(block, layout.samples)
        rows = np.full((block.num_positions, layout.samples), -1, dtype=np.int64)
        rows[drawn] = draws
        parts.append(rows)
    return np.concatenate(parts, axis=1)


def _chunks(token_offsets: np.ndarray, tokens: int) -> list[tuple[int, int]]:
    """Record ranges of about ``tokens`` tokens (at least one record each)."""
    out, start, records = [], 0, len(token_offsets) - 1
    while start < records:
        stop = int(np.searchsorted(token_offsets, token_offsets[start] + tokens, side="right")) - 1
        stop = min(max(stop, start + 1), records)
        out.append((start, stop))
        start = stop
    return out


# ---------------------------------------------------------------- comparing


@dataclass(kw_only=True)
class _Check:
    """One column, per row (labelled position, or record for sequence_probs) and value."""

    ok: np.ndarray  # bool [rows, w]
    error: np.ndarray | None  # float64 [rows, w] |stored - fresh|; None for ids
    bound: float | None  # the nominal bound (ColumnCheck.bound)


def _deviation(stored: np.ndarray, fresh: np.ndarray, *, codec: str, tolerance: float) -> _Check:
    stored, fresh = np.asarray(stored, np.float64), np.asarray(fresh, np.float64)
    if stored.ndim == 1:
        stored, fresh = stored[:, None], fresh[:, None]
    same = (stored == fresh) | (np.isnan(stored) & np.isnan(fresh))  # NaN: a record's last token has no target
    value_codec = get_value_codec(codec)
    with np.errstate(invalid="ignore"):
        error = np.where(same, 0.0, np.abs(stored - fresh))
        ok = same | (error <= value_codec.error_bound(fresh) + tolerance)
    return _Check(ok=ok, error=error, bound=value_codec.max_abs_error + tolerance)


def compare(block: RecordBlock, fresh: FreshLabels, *, layout: RecordLayout,
            tolerance: float) -> tuple[dict[str, _Check], np.ndarray]:
    """Each stored column against the fresh labels; and the record of each row."""
    if not layout.is_token_level:
        checks = {"class_logprobs": _deviation(block.decoded_class_logprobs(layout), fresh.class_logprobs,
                                               codec=layout.value_codec, tolerance=tolerance)}
        return checks, np.arange(block.num_records)
    owner = np.repeat(np.arange(block.num_records), np.diff(block.label_offsets))
    checks: dict[str, _Check] = {}
    if layout.has_topk:
        at_stored = fresh.gathered[:, :layout.k]
        checks["topk_logprobs"] = _deviation(block.decoded_topk_logprobs(layout), at_stored,
                                             codec=layout.value_codec, tolerance=tolerance)
        # in the fresh top-k, or tied with its k-th value: at_stored >= k-th is both at once
        kth = fresh.topk_logprobs.min(axis=1, initial=np.inf)
        checks["topk_ids"] = _Check(ok=at_stored >= kth[:, None] - tolerance, error=None, bound=None)
    for name in ("entropy", "target_logprob"):
        stored = getattr(block, name)
        if stored is not None and getattr(fresh, name) is not None:
            checks[name] = _deviation(stored, getattr(fresh, name), codec="float16", tolerance=tolerance)
    return checks, owner


def _column(check: _Check, rows: np.ndarray) -> ColumnCheck:
    ok = check.ok[rows]
    summary = ColumnCheck(values=int(ok.size), beyond=int((~ok).sum()), max_abs_error=None, mean_abs_error=None,
                          bound=check.bound)
    if check.error is not None:
        error = check.error[rows]
        error = error[np.isfinite(error)]
        if error.size:
            summary.max_abs_error, summary.mean_abs_error = float(error.max()), float(error.mean())
    return summary


def _bad_rows(checks: dict[str, _Check], rows: int) -> np.ndarray:
    bad = np.zeros(rows, dtype=bool)
    for check in checks.values():
        bad |= ~check.ok.all(axis=1)
    return bad


def _languages(block: RecordBlock, layout: RecordLayout, checks: dict[str, _Check], owner: np.ndarray,
               fresh: FreshLabels, tolerance: float) -> list[LanguageFidelity]:
    bad_record = np.bincount(owner[_bad_rows(checks, len(owner))], minlength=block.num_records) > 0
    langs = block.lang.astype(str)
    out = []
    for lang in sorted(set(langs.tolist())):
        records = langs == lang
        rows = records[owner]
        agreement = checks.get("topk_ids")
        out.append(LanguageFidelity(
            lang=lang, records=int(records.sum()), positions=int(rows.sum()),
            topk_agreement=None if agreement is None else float(agreement.ok[rows].mean()),
            columns={name: _column(check, rows) for name, check in checks.items()},
            draws=_draw_check(fresh, layout, rows, tolerance) if layout.has_samples else None,
            bad_records=int(bad_record[records].sum()),
        ))
    return out


def _draw_check(fresh: FreshLabels, layout: RecordLayout, rows: np.ndarray, tolerance: float) -> DrawCheck:
    """The draws' mean fresh log-prob against its fresh expectation, over the drawn ``rows``."""
    draws = fresh.gathered[rows, layout.k:]
    expected = -fresh.entropy[rows].astype(np.float64)
    judged = ~np.isnan(draws[:, 0])  # positions with draws
    if layout.has_topk:  # draws from the tail: E_tail[log p] = (-H - sum_top p log p) / tail mass
        top = fresh.topk_logprobs[rows].astype(np.float64)
        mass = 1.0 - np.exp(top).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            expected = (expected - (np.exp(top) * top).sum(axis=1)) / mass
        judged &= mass >= MIN_TAIL_MASS
    n = int(judged.sum())
    if n < MIN_DRAWN_POSITIONS:
        return DrawCheck(positions=n, mean_gap=None, standard_error=None, allowed=None, ok=None)
    draws = draws[judged].astype(np.float64)
    gaps = draws.mean(axis=1) - expected[judged]
    mean_gap = float(gaps.mean())
    standard_error = float(gaps.std(ddof=1) / np.sqrt(n))
    spread = float(np.sqrt(draws.var(axis=1).mean()))
    allowed = DRAW_STANDARD_ERRORS * standard_error + tolerance * (1 + spread)
    return DrawCheck(positions=n, mean_gap=mean_gap, standard_error=standard_error, allowed=allowed,
                     ok=bool(abs(mean_gap) <= allowed))  # a NaN or infinite gap fails


def _bad_records(block: RecordBlock, shards: list[str], checks: dict[str, _Check],
                 owner: np.ndarray) -> list[BadRecord]:
    out = []
    for r in np.unique(owner[_bad_rows(checks, len(owner))]).tolist():
        rows = owner == r
        problems = [_problem(name, check.ok[rows], None if check.error is None else check.error[rows])
                    for name, check in checks.items() if not check.ok[rows].all()]
        out.append(BadRecord(record_id=int(block.record_id[r]), lang=str(block.lang[r]), doc_key=str(block.doc_key[r]),
                             shard=shards[r], problems=problems))
    return out


def _problem(name: str, ok: np.ndarray, error: np.ndarray | None) -> str:
    """What is wrong with one column of one record, in a few words."""
    what = f"{_WHAT[name]}: {int((~ok).sum())} of {ok.size}"
    if error is None:
        return f"{what} not in the fresh top-k"
    worst = error[~ok]
    worst = worst[np.isfinite(worst)]
    if not worst.size:  # NaN on one side only
        return f"{what} NaN where the fresh value is not, or the reverse"
    return f"{what} beyond their bound (worst |stored - fresh| {float(worst.max()):.4f})"
