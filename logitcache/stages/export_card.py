"""The dataset card (``README.md``) of an exported cache, and the notes an export reports.

The card is what the Hugging Face tools and a reader see first: its YAML front matter names
the data files and their features (``datasets.load_dataset(DEST)`` and axolotl's loader of
a local directory read it), and its prose says what produced the labels (teacher, tokenizer,
soft-label kind, k, codec, windows), what each column means, and how rows line up with
tokens. Everything in it comes from the cache's manifest, so the same cache gives the same
card.
"""

from __future__ import annotations

import yaml

from logitcache import __version__
from logitcache.storage_schemas.export_tables import (
    IGNORE_INDEX,
    PAD_LOGPROB,
    export_schema,
    features_yaml,
    target_width,
)
from logitcache.storage_schemas.layout import RecordLayout
from logitcache.storage_schemas.manifest import Manifest
from logitcache.storage_schemas.value_codecs import get_value_codec

_SAMPLED_SETTINGS = "kd_beta: 0 (forward KL), kd_temperature: 1 and kd_normalize_topk: false"


def format_notes(layout: RecordLayout, fmt: str, *, renormalize: bool) -> list[str]:
    """What a user of this export must know before training from it."""
    if fmt != "axolotl":
        return []
    if layout.kind == "token_sampled":
        return [f"targets are the teacher's draws, weighted log(count / draws): an unbiased estimate of the "
                f"cross-entropy, sound for axolotl with {_SAMPLED_SETTINGS}"]
    if layout.kind == "token_topk_sampled":
        return [f"targets are the exact top-{layout.k} head, then the tail draws weighted log(tail mass * count "
                f"/ draws): an unbiased estimate of the cross-entropy, sound for axolotl with {_SAMPLED_SETTINGS}"]
    if renormalize:
        return [f"each position's top-{layout.k} log-probabilities are renormalised over the {layout.k} ids "
                "(axolotl's convention); --format hf keeps the stored values"]
    return []


def render_card(manifest: Manifest, *, fmt: str, renormalize: bool, source: str) -> str:
    """The whole ``README.md`` of an export of ``manifest``'s cache in ``fmt``."""
    layout = manifest.layout
    front = {
        "configs": [{"config_name": "default",
                     "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}],
        "dataset_info": {"features": features_yaml(export_schema(layout, fmt))},
        "tags": ["knowledge-distillation", "logitcache"],
    }
    teacher = manifest.teacher.get("name_or_path", "?")
    sections = [
        "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---",
        f"# Soft labels of {teacher} ({fmt} format)",
        _summary(manifest, fmt),
        "## Provenance\n\n" + _provenance(manifest, source=source, fmt=fmt, renormalize=renormalize),
        "## Languages\n\n" + _languages(manifest),
        "## Columns\n\n" + (_axolotl_columns(layout, renormalize) if fmt == "axolotl" else _hf_columns(layout)),
        "## Alignment\n\n" + _alignment(layout, fmt),
        "## Use\n\n" + _use(fmt),
    ]
    notes = format_notes(layout, fmt, renormalize=renormalize)
    if notes:
        sections.insert(-1, "## Notes\n\n" + "\n".join(f"- {note}" for note in notes))
    return "\n\n".join(sections) + "\n"


def _summary(manifest: Manifest, fmt: str) -> str:
    languages = len(manifest.lang_totals())
    what = "class distributions" if manifest.kind == "sequence_probs" else "next-token soft labels"
    return (f"Teacher {what} over {manifest.total_records:,} records ({manifest.total_tokens:,} tokens, "
            f"{manifest.total_positions:,} labelled positions) in {languages} languages, computed once by "
            f"logitcache and exported in the `{fmt}` format: one Parquet file per cache shard under `data/`, "
            "one row per record (a window of one document, or one labelled chat turn).")


def _provenance(manifest: Manifest, *, source: str, fmt: str, renormalize: bool) -> str:
    layout, teacher, tokenizer = manifest.layout, manifest.teacher, manifest.tokenizer
    codec = get_value_codec(layout.value_codec)
    error = "lossless" if codec.lossless else f"error <= {codec.max_abs_error:g} nat"
    labels = [f"kind `{layout.kind}`"]
    if layout.has_topk:
        labels.append(f"top-k with k = {layout.k}")
    if layout.has_samples:
        labels.append(f"{layout.samples} draws per position" + (" from the tail" if layout.has_topk else ""))
    if layout.kind == "sequence_probs":
        labels.append(f"{layout.num_classes} classes")
    weights = teacher.get("weights_sha256") or ""
    rows = [
        ("teacher", f"`{teacher.get('name_or_path')}` (revision {teacher.get('revision') or 'none'}, "
                    f"dtype {teacher.get('dtype')}, task {teacher.get('task')}"
                    + (f", weights sha256 {weights[:16]}…" if weights else "") + ")"),
        ("tokenizer", f"`{tokenizer.get('name_or_path')}`, vocabulary {layout.vocab_size:,} ids "
                      f"(fingerprint {str(tokenizer.get('vocab_fingerprint') or tokenizer.get('fingerprint'))[:16]}…)"),
        ("soft labels", ", ".join(labels) + f"; log-probabilities at temperature 1, normalised over the full "
                                            f"vocabulary, stored with the `{layout.value_codec}` codec ({error})"),
        ("windows", f"max_length {manifest.windows.get('max_length')}, stride {manifest.windows.get('stride')}"
                    + (" (tokens of left context repeated from the previous window)"
                       if manifest.windows.get("stride") else "")),
        ("corpus", _sources(manifest)),
        ("produced by", f"logitcache {__version__}: `logitcache export {source} DEST --format {fmt}`"
                        + ("" if fmt != "axolotl" or renormalize else " --no-renormalize")
                        + f", from a cache of format {manifest.format_version}"),
    ]
    return "| | |\n| --- | --- |\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


def _sources(manifest: Manifest, shown: int = 5) -> str:
    sources = [f"`{source.get('source')}`" for source in manifest.corpus.get("sources", [])]
    if len(sources) > shown:
        sources = [*sources[:shown], f"and {len(sources) - shown:,} more files"]
    return ", ".join(sources) or "-"


def _languages(manifest: Manifest) -> str:
    lines = ["| language | records | tokens |", "| --- | ---: | ---: |"]
    lines += [f"| {lang} | {c['records']:,} | {c['tokens']:,} |" for lang, c in manifest.lang_totals().items()]
    return "\n".join(lines)


def _axolotl_columns(layout: RecordLayout, renormalize: bool) -> str:
    width = target_width(layout)
    if layout.kind == "token_topk":
        entries = f"the teacher's top-{layout.k} ids, most probable first"
    elif layout.kind == "token_sampled":
        entries = (f"the distinct ids of the teacher's {layout.samples} draws, most drawn first, each with "
                   "log(count / draws)")
    else:
        entries = (f"the teacher's top-{layout.k} ids, most probable first, then the distinct ids of its "
                   f"{layout.samples} draws from the tail, each with log(tail mass * count / draws)")
    scaled = ", scaled to sum to 1 per row" if renormalize else ", as the cache stores them"
    rows = [
        ("input_ids", "list<int32>", "the record's tokens (left context included)"),
        ("attention_mask", "list<int8>", "1 per token"),
        ("labels", "list<int32>", f"`input_ids`, with {IGNORE_INDEX} at tokens 0 to `context_length`: token j is "
                                  "the hard target of position j - 1, and left context has none"),
        ("target_token_ids", "list<list<int32>>", f"per token, {width} entries: {entries}"),
        ("target_logprobs", "list<list<float32>>", f"their log-probabilities{scaled}"),
        ("target_mask", "list<list<int8>>", "1 for each entry to train on, 0 for padding (id 0, log-prob "
                                            f"{PAD_LOGPROB:g}), on left context, and for entries without weight"),
    ]
    return _table(rows)


def _hf_columns(layout: RecordLayout) -> str:
    rows = [("record_id", "uint64", "stable id of (document, window)"),
            ("doc_key", "string", "source document identity"),
            ("lang", "string", "language tag (`und` when unknown)"),
            ("input_ids", "list<int32>", "the record's tokens")]
    if not layout.is_token_level:
        rows += [("class_logprobs", "list<float32>", f"the teacher's log-probabilities of the {layout.num_classes} "
                                                      "classes (decoded)"),
                 ("label", "int32", "the gold label, -1 when the corpus has none")]
        return _table(rows)
    rows.append(("context_length", "int32", "leading tokens that are left context only (no labels)"))
    if layout.has_topk:
        rows += [("topk_ids", "list<list<int32>>", f"per labelled position, the teacher's top-{layout.k} ids, "
                                                   "most probable first"),
                 ("topk_logprobs", "list<list<float32>>", "their log-probabilities, normalised over the full "
                                                          "vocabulary (decoded): the tail mass is 1 - sum(exp)")]
    if layout.has_samples:
        tail = " from the tail (the distribution without the top-k ids, renormalised)" if layout.has_topk else ""
        rows += [("sample_ids", "list<list<int32>>", f"per labelled position, the distinct ids of the teacher's "
                                                     f"{layout.samples} draws{tail}, ascending (empty: no tail mass)"),
                 ("sample_counts", "list<list<int32>>", "how often each was drawn")]
    if layout.entropy:
        rows.append(("entropy", "list<float32>", "per labelled position, the teacher's entropy (nats)"))
    if layout.target_logprob:
        rows.append(("target_logprob", "list<float32>", "per labelled position, the teacher's log-probability of "
                                                        "the actual next token (NaN at the record's last token)"))
    return _table(rows)


def _table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| column | type | meaning |", "| --- | --- | --- |"]
    return "\n".join(lines + [f"| `{name}` | {kind} | {meaning} |" for name, kind, meaning in rows])


def _alignment(layout: RecordLayout, fmt: str) -> str:
    if not layout.is_token_level:
        return "One class distribution per record, for the whole of `input_ids`."
    if fmt == "axolotl":
        return ("Row j of the target columns is the teacher's distribution over token j + 1 (its output at "
                "position j), the row axolotl's KD loss pairs with the student's output at position j; only "
                "`labels` is shifted, inside the loss. The first `context_length` tokens of a record (left "
                "context of a window with stride, or a chat turn's conversation) have `target_mask` 0; every "
                "later position has the teacher's labels, the last one too: its distribution is over the token "
                "that follows the record, which has no hard label.")
    return ("Labelled position i of a record is token `context_length + i`; its labels are the teacher's "
            "distribution over the token after it (so the last one predicts the token that follows the "
            "record). The per-position lists have `len(input_ids) - context_length` entries.")


def _use(fmt: str) -> str:
    load = ('```python\nimport datasets\n\ntrain = datasets.load_dataset("parquet", data_dir="DEST", '
            'split="train")\n```')
    if fmt != "axolotl":
        return load
    return load + ("\n\nWith axolotl's KD plugin, as a pre-tokenized dataset:\n\n```yaml\n"
                   "plugins:\n  - axolotl.integrations.kd.KDPlugin\nkd_trainer: true\nkd_ce_alpha: 0.1\n"
                   "kd_alpha: 0.9\nkd_temperature: 1.0\ndatasets:\n  - path: DEST\n    type:\n```")
