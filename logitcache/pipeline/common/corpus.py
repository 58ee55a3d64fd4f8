"""The corpus part of stage one: documents from files or a hub dataset, cut into work units.

Documents are read with Hugging Face ``datasets`` in streaming mode, one source at a time
(each data file, or the one hub split), so a corpus larger than memory works and every
document knows its source and its 0-based row in that source. Only the rows of the unit being
built are held in memory.

Why units are ranges of rows per source: a unit is the grain of scheduling, retry and resume,
and it becomes one shard. Its id must name the same documents on every run, on every machine,
whatever happened to other files. So a unit is ``unit_documents`` consecutive *rows* of one
source, counting rows that are skipped: the boundaries depend only on row numbers, never on
skip decisions or on the other files. A corpus that grows by new files only adds
units with new ids (the id starts with a hash of the source), and each unit carries a
fingerprint of its content, so a re-run can tell that a file changed under a committed unit.
A file that grows by appended rows keeps its unit boundaries: its last unit, committed while
it was short, is completed by a *part* of that unit over the new rows only
(:meth:`WorkUnit.rows`, :func:`part_id`), so the committed rows are never labelled again.

Error policy. Problems of the corpus as a whole (a pattern that matches nothing, an unknown
file type, a configured column that a file does not have) are always a
:class:`~logitcache.errors.CorpusError` that names the file and says what exists. A bad
document (text that is not a string or is missing, a label that is not an integer, a line
that is not UTF-8 or not JSON) is a CorpusError naming file and row or line when
``corpus.on_bad_document`` is ``error``; with ``skip`` it is counted in the unit's
``skipped`` under its reason (missing_value, non_string, bad_label, bad_utf8, bad_json, and for
conversations bad_messages: an unknown role, an empty message). Empty or whitespace-only
texts are always skipped and counted as ``empty``, conversations without a message to label
as ``no_labelled_turn``. When ``datasets`` fails on a file without saying where (invalid UTF-8, a
malformed JSON line), the raw file is scanned line by line to find the line; in skip mode
that file is then read by this module itself, with the same row numbering, so unit
boundaries do not move. JSON files are read as JSON Lines by that fallback.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import difflib
import hashlib
import io
import json
import math
import os
import posixpath
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import fsspec
from fsspec.implementations.local import LocalFileSystem

from logitcache.config import CorpusConfig
from logitcache.errors import CorpusError, LogitcacheError
from logitcache.pipeline.common.chat import (
    ALWAYS_SKIPPED,
    BadConversation,
    chat_spec,
    parse_conversation,
)

__all__ = ["Document", "WorkUnit", "resolve_sources", "iter_work_units", "iter_source_units", "describe_corpus",
           "part_id", "whole_unit_id"]

LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_BATCH_ROWS = 256  # rows per batch pulled from datasets (batched iteration is ~5x faster)
_NOT_A_LABEL = object()
_SKIP_HINT = "or set corpus.on_bad_document: skip to skip and count such documents"


@dataclass(frozen=True, kw_only=True)
class Document:
    """One document as stage one sees it."""

    key: str  # id column value as str, or "sha256:" + 16 hex digits of the text's hash
    text: str
    lang: str  # language column value, or "und"
    label: int | None  # label column value, None without a label column or for null
    source: str  # the file (as resolved) or "hub:<name>/<config>/<split>"
    row: int  # 0-based row within the source, skipped rows included
    # a conversation (corpus.messages_column): ((role, content), ...); text is then its canonical JSON
    messages: tuple[tuple[str, str], ...] | None = None


@dataclass(kw_only=True)
class WorkUnit:
    """``num_rows`` consecutive rows of one source, starting at ``first_row``."""

    unit_id: str  # f"{source_tag}-{index:05d}"
    source: str
    index: int  # unit number within its source
    first_row: int
    num_rows: int  # rows covered, kept and skipped
    documents: list[Document]
    skipped: dict[str, int]  # reason -> count
    fingerprint: str  # sha256 over the kept documents and the skip counts
    skipped_rows: dict[int, str] = field(default_factory=dict, repr=False)  # row -> skip reason
    text_bytes: int = 0  # UTF-8 bytes of the kept documents' texts

    @property
    def num_documents(self) -> int:
        return len(self.documents)

    def rows(self, start: int, stop: int) -> WorkUnit:
        """The part of this unit over source rows ``[start, stop)`` as a unit of its own, with
        its own fingerprint: rows appended to a source after part of a unit was committed are
        built as such a part (see :func:`part_id`)."""
        if not self.first_row <= start <= stop <= self.first_row + self.num_rows:
            raise ValueError(f"rows {start}-{stop} are not within unit {self.unit_id} "
                             f"(rows {self.first_row}-{self.first_row + self.num_rows})")
        skipped_rows = {row: why for row, why in self.skipped_rows.items() if start <= row < stop}
        part = WorkUnit(unit_id=part_id(self.unit_id, first_row=start, unit_first_row=self.first_row),
                        source=self.source, index=self.index, first_row=start, num_rows=stop - start,
                        documents=[doc for doc in self.documents if start <= doc.row < stop],
                        skipped=dict(Counter(skipped_rows.values())), fingerprint="", skipped_rows=skipped_rows)
        return _finish(part)


def part_id(unit_id: str, *, first_row: int, unit_first_row: int) -> str:
    """The id of the part of unit ``unit_id`` that starts at source row ``first_row``: the unit's
    own id for a part that starts where the unit does, else ``<unit id>.r<first row>``."""
    return unit_id if first_row == unit_first_row else f"{unit_id}.r{first_row}"


def whole_unit_id(unit_id: str) -> str:
    """The id of the unit a part (:func:`part_id`) belongs to."""
    return unit_id.split(".r", 1)[0]


class _Bad(NamedTuple):
    """A row the raw reader cannot parse: reason (bad_utf8, bad_json), 1-based line, detail."""

    reason: str
    line: int
    detail: str


def source_tag(source: str) -> str:
    """First 10 hex digits of sha256(source): the prefix of its units' ids."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:10]


def resolve_sources(cfg: CorpusConfig) -> list[str]:
    """The sources of the corpus in reading order: sorted unique files, or the hub split."""
    if cfg.name is not None:
        return [f"hub:{cfg.name}/{cfg.config or 'default'}/{cfg.split}"]
    found: set[str] = set()
    for pattern in cfg.data_files:
        found.update(_expand(pattern))
    sources = sorted(found)
    for source in sources:
        _loader(source)
    return sources


def _expand(pattern: str) -> list[str]:
    try:
        fs, path = fsspec.core.url_to_fs(pattern)
        matches = fs.glob(path, detail=True)
    except (ValueError, ImportError, OSError) as error:
        raise CorpusError(f"corpus.data_files: cannot list {pattern!r}: {error}") from None
    files = [name for name, info in matches.items() if info.get("type") != "directory"]
    if not files:
        what = "only directories (use a glob such as dir/*.jsonl)" if matches else "no file"
        raise CorpusError(f"corpus.data_files: {pattern!r} matches {what}")
    if isinstance(fs, LocalFileSystem):
        return files
    return [fs.unstrip_protocol(name) for name in files]


def _loader(source: str) -> str:
    """The datasets builder for a source: json, parquet, csv, text, or hub."""
    if source.startswith("hub:"):
        return "hub"
    name = posixpath.basename(source).lower()
    compressed = name.endswith(COMPRESSIONS)
    if compressed:
        name = name.rsplit(".", 1)[0]
    extension = posixpath.splitext(name)[1]
    loader = LOADERS.get(extension)
    if loader is None or (compressed and loader == "parquet"):
        supported = ", ".join(LOADERS)
        raise CorpusError(
            f"{source}: unsupported file type {extension or '(no extension)'!r}; supported: {supported} "
            f"(all but .parquet also compressed with {', '.join(COMPRESSIONS)})"
        )
    return loader


def _columns(cfg: CorpusConfig, loader: str) -> dict[str, str | None]:
    """Config key -> column name for the columns a source must have."""
    text = "text" if loader == "text" else cfg.text_column
    if cfg.messages_column is not None:
        if loader in ("text", "csv"):
            raise CorpusError(f"corpus.messages_column: conversations need JSON or Parquet files (a list of "
                              f"{{role, content}} per row); the {loader} file type has no such column")
        text = None
    names = (text, cfg.lang_column, cfg.id_column, cfg.label_column, cfg.messages_column)
    keys = ("text_column", "lang_column", "id_column", "label_column", "messages_column")
    return dict(zip(keys, names, strict=True))


def _check_columns(columns: dict[str, str | None], source: str, present: list[str]) -> None:
    for key, name in columns.items():
        if name is not None and name not in present:
            close = difflib.get_close_matches(name, present, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            have = ", ".join(map(repr, present)) or "none"
            field_name = key if "." in key else f"corpus.{key}"
            raise CorpusError(f"{source}: no column {name!r} ({field_name}); its columns are {have}{hint}")


def _builder_options(cfg: CorpusConfig, loader: str) -> dict[str, Any]:
    if loader == "csv":
        # Keep text-like columns as strings ("42", "NA" and "" are texts); only an empty label is null.
        as_text = [cfg.text_column, cfg.id_column, cfg.lang_column]
        na_values = {cfg.label_column: [""]} if cfg.label_column else None
        return {"converters": {name: str for name in as_text if name}, "keep_default_na": False,
                "na_values": na_values}
    if loader == "json":
        try:  # datasets >= 5 may turn files that look like agent traces into other columns
            from datasets.packaged_modules.json.json import JsonConfig
        except ImportError:
            return {}
        if "parse_agent_traces" in {spec.name for spec in dataclasses.fields(JsonConfig)}:
            return {"parse_agent_traces": False}
    return {}


def _open_dataset(cfg: CorpusConfig, source: str, loader: str) -> Any:
    import datasets  # imported here: it is slow to import and only stage one needs it

    # Every load_dataset call would otherwise ping S3 to count a download of the builder
    # ("json", "csv", ...): a network round trip per file, seconds when offline. An explicit
    # HF_UPDATE_DOWNLOAD_COUNTS in the environment is respected.
    if "HF_UPDATE_DOWNLOAD_COUNTS" not in os.environ:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    if loader == "hub":
        return datasets.load_dataset(cfg.name, cfg.config, split=cfg.split, streaming=True)
    return datasets.load_dataset(loader, data_files=[source], split="train", streaming=True,
                                 **_builder_options(cfg, loader))


def _dataset_rows(cfg: CorpusConfig, source: str, loader: str, *,
                  extra: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """The source's rows through datasets, as dicts of the configured columns (and ``extra``
    ones, named by what asks for them)."""
    columns = {**_columns(cfg, loader), **(extra or {})}
    wanted = list(dict.fromkeys(name for name in columns.values() if name is not None))
    dataset = _open_dataset(cfg, source, loader)
    checked = dataset.features is not None
    if checked:
        _check_columns(columns, source, list(dataset.features))
    for batch in dataset.iter(batch_size=_BATCH_ROWS):
        if not checked:
            _check_columns(columns, source, list(batch))
            checked = True
        for values in zip(*(batch[name] for name in wanted), strict=True):
            yield dict(zip(wanted, values, strict=True))


def paired_texts(cfg: CorpusConfig, column: str, *, owner: str) -> dict[str, str]:
    """Document key -> the text of ``column``, for every row whose document stage one would key.

    Keys are computed exactly as stage one computes them (id column, or the hash of the
    teacher's text column), so a student reading another column (a translation, say) can be
    joined to the cached records of the same documents. Rows whose ``column`` is empty or not a
    string are left out; the caller reports records left without a text. ``owner`` names the
    config field in errors.
    """
    out: dict[str, str] = {}
    for source in resolve_sources(cfg):
        loader = _loader(source)
        if loader == "text":
            raise CorpusError(f"{owner}: {source} is a plain text file, which has no column {column!r}")
        columns = _columns(cfg, loader)
        for row, record in enumerate(_dataset_rows(cfg, source, loader, extra={owner: column})):
            doc = _document(record, columns, source, row, label_roles=cfg.label_roles)
            value = record.get(column)
            if isinstance(doc, Document) and isinstance(value, str) and value.strip():
                out[doc.key] = value
    return out


def _rows(cfg: CorpusConfig, source: str, loader: str) -> Iterator[tuple[int, dict[str, Any] | _Bad]]:
    """(row, record) of a source; falls back to the raw reader where datasets cannot say where."""
    row = 0
    try:
        for record in _dataset_rows(cfg, source, loader):
            yield row, record
            row += 1
        return
    except LogitcacheError:
        raise
    except Exception as error:  # datasets, pyarrow and pandas raise many kinds, without the row
        failure = error
    if loader in ("hub", "parquet"):
        raise CorpusError(f"{source}: cannot be read: {type(failure).__name__}: {failure}") from failure
    first_bad, has_rows = _scan(source, loader, cfg.label_column)
    if not has_rows:  # datasets fails on an empty JSON file; there is nothing to read
        return
    if first_bad is None:
        raise CorpusError(f"{source}: cannot be read: {type(failure).__name__}: {failure}") from failure
    if cfg.on_bad_document == "error":
        fix = "re-encode the file as UTF-8" if first_bad.reason == "bad_utf8" else "fix that line"
        raise CorpusError(f"{source}, line {first_bad.line}: {first_bad.detail}; {fix}, {_SKIP_HINT}")
    checked = row > 0
    for raw_row, record in _raw_rows(source, loader, cfg.label_column):
        if raw_row < row:
            continue
        if not checked and isinstance(record, dict):
            _check_columns(_columns(cfg, loader), source, list(record))
            checked = True
        yield raw_row, record


def _scan(source: str, loader: str, label_column: str | None) -> tuple[_Bad | None, bool]:
    """The first unreadable row of a file (or None), and whether it has rows at all."""
    has_rows = False
    for _, record in _raw_rows(source, loader, label_column):
        if isinstance(record, _Bad):
            return record, True
        has_rows = True
    return None, has_rows


def _raw_rows(source: str, loader: str, label_column: str | None) -> Iterator[tuple[int, dict[str, Any] | _Bad]]:
    """Read a json/text/csv file without datasets, numbering rows as datasets does."""
    with fsspec.open(source, "rb", compression="infer") as handle:
        if loader == "csv":
            yield from _raw_csv(handle, source, label_column)
        else:
            yield from _raw_lines(handle, loader)


def _raw_lines(handle: Any, loader: str) -> Iterator[tuple[int, dict[str, Any] | _Bad]]:
    row = 0
    for line_number, raw in enumerate(handle, start=1):
        if line_number == 1 and raw.startswith(codecs.BOM_UTF8) and loader == "json":
            raw = raw[len(codecs.BOM_UTF8):]
        # pyarrow skips blank JSON lines; the text builder splits on universal newlines
        pieces = ([raw] if raw.strip() else []) if loader == "json" else _text_pieces(raw)
        for piece in pieces:
            yield row, _parse_piece(piece, loader, line_number)
            row += 1


def _text_pieces(raw: bytes) -> list[bytes]:
    """Rows of one raw line as the text builder sees them: universal newlines, one row each."""
    body = raw[:-1] if raw.endswith(b"\n") else raw
    body = body[:-1] if body.endswith(b"\r") else body
    return body.split(b"\r")


def _parse_piece(piece: bytes, loader: str, line_number: int) -> dict[str, Any] | _Bad:
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError as error:
        return _Bad("bad_utf8", line_number, f"invalid UTF-8 ({error.reason} at byte {error.start} of the line)")
    if loader == "text":
        return {"text": text}
    try:
        value = json.loads(text)
    except ValueError as error:
        return _Bad("bad_json", line_number, f"malformed JSON ({error})")
    if not isinstance(value, dict):
        return _Bad("bad_json", line_number, f"expected a JSON object, got {type(value).__name__}")
    return value


def _raw_csv(handle: Any, source: str, label_column: str | None) -> Iterator[tuple[int, dict[str, Any] | _Bad]]:
    stream = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(stream)
    header: list[str] | None = None
    row, last_line = 0, 0
    for fields in reader:
        first_line, last_line = last_line + 1, reader.line_num
        if not fields:  # pandas skips blank lines
            continue
        if any("\udc80" <= char <= "\udcff" for value in fields for char in value):  # escaped bad bytes
            record: dict[str, Any] | _Bad = _Bad("bad_utf8", first_line, "invalid UTF-8")
        elif header is None:
            header = fields
            continue
        else:
            record = dict(zip(header, fields, strict=False))  # short rows: missing values
            if label_column in record:
                record[label_column] = _csv_label(record[label_column])
        if header is None:
            raise CorpusError(f"{source}, line {first_line}: the CSV header is not valid UTF-8; re-encode the file as UTF-8")
        yield row, record
        row += 1


def _csv_label(value: str) -> Any:
    """A CSV label as pandas reads it: empty is null, numbers are numbers, else the string."""
    if value == "":
        return None
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    return value


def _document(record: dict[str, Any], columns: dict[str, str | None], source: str, row: int, *,
              label_roles: Sequence[str] = ("assistant",)) -> Document | tuple[str, str]:
    """The document of one row, or (skip reason, explanation)."""
    messages = None
    if columns.get("messages_column") is not None:
        try:
            messages = parse_conversation(record.get(columns["messages_column"]), column=columns["messages_column"],
                                          label_roles=label_roles)
        except BadConversation as bad:
            return bad.reason, bad.detail
        text = json.dumps(messages, ensure_ascii=False, separators=(",", ":"))
    else:
        text_column = columns["text_column"]
        text = record.get(text_column)
        if text is None:
            return "missing_value", f"no text in column {text_column!r}"
        if not isinstance(text, str):
            return "non_string", f"column {text_column!r} holds {_brief(text)} ({type(text).__name__}), expected a string"
        if not text.strip():
            return "empty", "empty text"
    lang = "und"
    if columns["lang_column"] is not None:
        value = record.get(columns["lang_column"])
        if value is not None and not isinstance(value, str):
            return "non_string", f"column {columns['lang_column']!r} holds {_brief(value)}, expected a language tag"
        lang = value or "und"
    if columns["id_column"] is None:
        key = "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    else:
        value = record.get(columns["id_column"])
        if value is None or value == "":
            return "missing_value", f"no id in column {columns['id_column']!r}"
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return "non_string", f"column {columns['id_column']!r} holds {_brief(value)}, expected a string or integer id"
        key = str(value)
    label = None
    if columns["label_column"] is not None:
        value = record.get(columns["label_column"])
        label = _label(value)
        if label is _NOT_A_LABEL:
            return "bad_label", f"column {columns['label_column']!r} holds {_brief(value)}, expected an integer or null"
    return Document(key=key, text=text, lang=lang, label=label, source=source, row=row, messages=messages)


def _label(value: Any) -> Any:
    """An integer label, None for null, or _NOT_A_LABEL."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    # bools are ints; integer columns with gaps come back from pandas/pyarrow as floats
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return int(value)
    return _NOT_A_LABEL


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fingerprint(documents: list[Document], skipped: dict[str, int]) -> str:
    digest = hashlib.sha256()
    for doc in documents:
        line = json.dumps([doc.key, doc.text, doc.lang, doc.label], ensure_ascii=False, separators=(",", ":"))
        digest.update(line.encode("utf-8", "surrogatepass") + b"\n")
    digest.update(json.dumps({"skipped": skipped}, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


def _finish(unit: WorkUnit) -> WorkUnit:
    unit.skipped = dict(sorted(unit.skipped.items()))
    unit.fingerprint = _fingerprint(unit.documents, unit.skipped)
    unit.text_bytes = sum(len(doc.text.encode("utf-8", "surrogatepass")) for doc in unit.documents)
    return unit


def iter_source_units(cfg: CorpusConfig, source: str) -> Iterator[WorkUnit]:
    """The work units of one source, in order; the last one may be short."""
    loader = _loader(source)
    columns = _columns(cfg, loader)
    tag, size = source_tag(source), cfg.unit_documents
    unit: WorkUnit | None = None
    for row, record in _rows(cfg, source, loader):
        if unit is None or row // size != unit.index:
            if unit is not None:
                yield _finish(unit)
            index = row // size
            unit = WorkUnit(unit_id=f"{tag}-{index:05d}", source=source, index=index, first_row=row,
                            num_rows=0, documents=[], skipped={}, fingerprint="")
        unit.num_rows += 1
        # _Bad rows only come in skip mode: in error mode _rows raised on the first one
        bad = isinstance(record, _Bad)
        outcome = (record.reason, record.detail) if bad else _document(record, columns, source, row,
                                                                      label_roles=cfg.label_roles)
        if isinstance(outcome, Document):
            unit.documents.append(outcome)
            continue
        reason, detail = outcome
        if reason not in ALWAYS_SKIPPED and cfg.on_bad_document == "error":
            raise CorpusError(f"{source}, row {row} (counting from 0): {detail}; fix the data {_SKIP_HINT}")
        unit.skipped[reason] = unit.skipped.get(reason, 0) + 1
        unit.skipped_rows[row] = reason
    if unit is not None:
        yield _finish(unit)


def iter_work_units(cfg: CorpusConfig) -> Iterator[WorkUnit]:
    """All work units of the corpus: each source in order, cut into ranges of rows."""
    for source in resolve_sources(cfg):
        yield from iter_source_units(cfg, source)


def _size(source: str) -> int:
    fs, path = fsspec.core.url_to_fs(source)
    return fs.size(path)


def _estimate_rows(source: str) -> int | None:
    """Rows of a file, cheaply: Parquet metadata, or a count of line breaks (None for the hub)."""
    loader = _loader(source)
    if loader == "hub":
        return None
    if loader == "parquet":
        import pyarrow.parquet as pq

        with fsspec.open(source, "rb") as handle:
            return pq.ParquetFile(handle).metadata.num_rows
    lines, last = 0, b"\n"
    with fsspec.open(source, "rb", compression="infer") as handle:
        while chunk := handle.read(1 << 22):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    lines += last != b"\n"  # a last line without a line break
    return max(lines - 1, 0) if loader == "csv" else lines


def estimate_units(cfg: CorpusConfig) -> int | None:
    """About how many work units the corpus has, for a progress bar's ETA; None if unknown.

    Counts line breaks, so blank lines in a JSONL file make it an overestimate.
    """
    total = 0
    for source in resolve_sources(cfg):
        rows = _estimate_rows(source)
        if rows is None:
            return None
        total += -(-rows // cfg.unit_documents)
    return total


def describe_corpus(cfg: CorpusConfig) -> dict[str, Any]:
    """The corpus for the manifest: its sources (with byte sizes of files), columns, unit size."""
    entries = []
    for source in resolve_sources(cfg):
        loader = _loader(source)
        size = None if loader == "hub" else _size(source)
        entries.append({"source": source, "loader": loader, "bytes": size})
    out = {
        "sources": entries,
        "total_bytes": sum(entry["bytes"] or 0 for entry in entries),
        "columns": {name: getattr(cfg, f"{name}_column") for name in ("text", "lang", "id", "label")},
        "unit_documents": cfg.unit_documents,
        "on_bad_document": cfg.on_bad_document,
    }
    chat = chat_spec(cfg)
    if chat is not None:
        out["columns"] = {**out["columns"], "text": None, "messages": cfg.messages_column}
        template = ("the teacher tokenizer's" if chat.template is None
                    else "sha256:" + hashlib.sha256(chat.template.encode("utf-8")).hexdigest())
        out["chat"] = {"label_roles": list(chat.label_roles), "chat_template": template}
    return out
