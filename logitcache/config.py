"""Typed configuration of one logitcache job, loaded from YAML with ``--set`` overrides.

A job (build a cache, train students from it, evaluate them) is described by one YAML file.
This module turns that file into typed dataclasses, so that the stages receive values that
are already checked, and it rejects a bad file before any teacher is loaded: every error is a
:class:`~logitcache.errors.ConfigError` whose message starts with the dotted path of the
field (``students[0].loss.temperature``) and says what is allowed, so a user can fix the
file without reading the source. The CLI maps these errors to exit code 2.

Conversion and checking are driven by the dataclasses' type hints and field metadata: one
generic validator (``_Section.__post_init__``) checks types, ``Literal`` choices and numeric
bounds for every field, whether the object came from YAML or was built in Python; each class
adds only its cross-field rules in ``_validate``.
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import difflib
import functools
import math
import operator
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal

import yaml

from logitcache.errors import ConfigError
from logitcache.storage_schemas.storage_settings import StorageSettings

__all__ = [
    "CorpusConfig", "TeacherConfig", "WindowsConfig", "SoftLabelsConfig", "StorageConfig",
    "ExecutorConfig", "StudentModelConfig", "LossConfig", "OptimizerConfig", "StudentConfig",
    "TrainConfig", "EvalConfig", "JobConfig", "config_from_dict", "config_to_dict",
    "parse_override", "apply_overrides", "load_config", "config_fingerprint_fields",
]

# Dotted path of the section being built, so that validators name fields as the user wrote them.
_location: contextvars.ContextVar[str] = contextvars.ContextVar("logitcache_config_location", default="")
_BOUND_SYMBOLS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_TESTS = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}
_NUMBER_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_STUDENT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_OVERRIDE_FORM = "expected key.path=value, e.g. soft_labels.k=32 or students.0.loss.alpha=0.3"


def _field(default: Any = MISSING, *, factory: Any = MISSING, one_or_many: bool = False, **bounds: Any) -> Any:
    """A dataclass field with numeric bounds (ge, gt, le, lt) that the generic validator checks."""
    metadata = {"bounds": bounds, "one_or_many": one_or_many}
    return field(default=default, default_factory=factory, metadata=metadata)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Section:
    """Base of every config dataclass: the single generic validator, then class rules."""

    def __post_init__(self) -> None:
        prefix = _location.get()
        hints = _type_hints(type(self))
        for spec in dataclasses.fields(self):
            path = _join(prefix, spec.name)
            value = _coerce(getattr(self, spec.name), hints[spec.name], path, spec.metadata.get("one_or_many", False))
            _check_bounds(value, spec.metadata.get("bounds", {}), path)
            setattr(self, spec.name, value)
        self._validate()

    def _validate(self) -> None:
        """Cross-field rules; subclasses override."""

    def _where(self, name: str = "") -> str:
        """Dotted path of one of this section's fields (or of the section itself)."""
        prefix = _location.get()
        if not name:
            return prefix or type(self).__name__
        return _join(prefix, name)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_bounds(value: Any, bounds: dict[str, Any], path: str) -> None:
    if not bounds or value is None:
        return
    if not all(_BOUND_TESTS[name](value, limit) for name, limit in bounds.items()):
        limits = " and ".join(f"{_BOUND_SYMBOLS[name]} {limit}" for name, limit in bounds.items())
        raise ConfigError(f"{path}: must be {limits}, got {_brief(value)}")


def _coerce(value: Any, hint: Any, path: str, one_or_many: bool = False) -> Any:
    """Check ``value`` against a type hint and return it normalised (ints to floats, copies)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        for option in inner[:-1]:  # the first type that takes the value; the last one's error otherwise
            try:
                return _coerce(value, option, path, one_or_many)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], path, one_or_many)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {', '.join(args)}, got {_brief(value)}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return _build(hint, {} if value is None else value, path)  # an empty YAML section means defaults
    if origin is list:
        if one_or_many and isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {_brief(value)}")
        return [_coerce(item, args[0], f"{path}[{index}]") for index, item in enumerate(value)]
    if hint is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {_brief(value)}")
        return copy.deepcopy(dict(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_brief(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_brief(value)}")
        return value
    if hint is float:
        # YAML 1.1 reads 3e-4 (no dot) as a string, so number-shaped strings are accepted.
        if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_brief(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {_brief(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_brief(value)}")
        return value
    raise TypeError(f"{path}: unsupported config type {hint!r}")  # a bug in this module


def _build(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping, reporting unknown and missing keys by path."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping of settings, got {_brief(data)}")
    specs = [spec for spec in dataclasses.fields(cls) if spec.init]
    names = [spec.name for spec in specs]
    for key in data:
        if key not in names:
            message = f"{_join(path, str(key))}: unknown key; valid keys: {', '.join(names)}"
            close = difflib.get_close_matches(str(key), names, n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
            raise ConfigError(message)
    for spec in specs:
        if spec.name not in data and spec.default is MISSING and spec.default_factory is MISSING:
            raise ConfigError(f"{_join(path, spec.name)}: required field is missing")
    token = _location.set(path)
    try:
        return cls(**data)
    finally:
        _location.reset(token)


@dataclass(kw_only=True)
class CorpusConfig(_Section):
    """Where the documents come from: local files or a Hugging Face hub dataset."""

    # Local paths or globs of the corpus (jsonl, parquet, ...); a single string is allowed.
    data_files: list[str] = _field(factory=list, one_or_many=True)
    name: str | None = None  # Hub dataset name, instead of data_files.
    config: str | None = None  # Hub dataset config name (used with name).
    split: str = "train"  # Dataset split to read.
    text_column: str = "text"  # Column holding the document text.
    lang_column: str | None = None  # Column holding a language tag; None tags every document "und".
    id_column: str | None = None  # Column holding a stable document id; None uses a content hash.
    label_column: str | None = None  # Column holding a hard label (sequence classification).
    # What to do with a document that cannot be read: fail the job, or skip and count it.
    on_bad_document: Literal["error", "skip"] = "error"
    # Documents per work unit (the unit of scheduling, retry and resume).
    unit_documents: int = _field(1000, ge=1)
    # Column holding a conversation (a list of {role, content}) to render with a chat template
    # instead of reading text_column; None reads plain texts.
    messages_column: str | None = None
    # Chat template (Jinja text, or the path of a file holding it) for messages_column; None uses
    # the teacher tokenizer's own.
    chat_template: str | None = None
    # Roles whose messages get soft labels in a conversation; the others are context only.
    label_roles: list[str] = _field(factory=lambda: ["assistant"], one_or_many=True)

    def _validate(self) -> None:
        if not self.label_roles or not all(isinstance(r, str) and r.strip() for r in self.label_roles):
            raise ConfigError(f"{self._where('label_roles')}: must name at least one role, got {self.label_roles!r}")
        if self.chat_template is not None and self.messages_column is None:
            raise ConfigError(f"{self._where('chat_template')}: applies to conversations only; set "
                              f"{self._where('messages_column')} too (the column holding the messages)")
        given = [name for name, present in (("data_files", bool(self.data_files)), ("name", self.name is not None)) if present]
        if len(given) != 1:
            got = "both" if given else "neither"
            raise ConfigError(
                f"{self._where()}: exactly one of {self._where('data_files')} (non-empty) "
                f"or {self._where('name')} must be given, got {got}"
            )


#: the placement strategies of accelerate's ``device_map`` (teacher.device_map)
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(kw_only=True)
class TeacherConfig(_Section):
    """The model whose soft labels are cached."""

    model: str  # Local path or hub name of the teacher.
    revision: str | None = None  # Hub revision (branch, tag or commit) to pin the teacher to.
    # Per-token next-token distributions, or one class distribution per sequence.
    task: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    # Compute dtype; auto is bfloat16 on GPU and float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"  # Torch device such as cpu or cuda:0; auto picks a GPU when there is one.
    # Spread the teacher's layers over the devices this process sees (accelerate), for a teacher
    # bigger than one device: auto, balanced, balanced_low_0, sequential, or a mapping of module
    # names to devices; None puts the whole teacher on teacher.device.
    device_map: str | dict[str, Any] | None = None
    batch_tokens: int = _field(16384, ge=1)  # Tokens per teacher forward batch (padding included).
    # Pack the windows of several documents into each forward row (each window attends only to
    # itself, so records do not change): auto packs when a check of the teacher at its first
    # use shows that it keeps packed windows apart, and pads otherwise; off pads every window.
    packing: Literal["auto", "off"] = "auto"
    trust_remote_code: bool = False  # Allow model code from the hub repository to run.

    def _validate(self) -> None:
        if self.device_map is None:
            return
        if isinstance(self.device_map, str) and self.device_map not in DEVICE_MAP_STRATEGIES:
            raise ConfigError(f"{self._where('device_map')}: must be one of {', '.join(DEVICE_MAP_STRATEGIES)} or a "
                              f"mapping of module names to devices, got {_brief(self.device_map)}")
        if self.device != "auto":
            raise ConfigError(f"{self._where('device')}: with {self._where('device_map')} the teacher's layers are "
                              f"placed by the map; leave teacher.device at auto, got {self.device!r}")


@dataclass(kw_only=True)
class WindowsConfig(_Section):
    """How documents are cut into fixed-length token windows."""

    max_length: int = _field(512, ge=2)  # Tokens per window.
    stride: int = 0  # Tokens shared by consecutive windows of one document (0 = no overlap).

    def _validate(self) -> None:
        if not 0 <= self.stride < self.max_length:
            raise ConfigError(
                f"{self._where('stride')}: must be >= 0 and < {self._where('max_length')} "
                f"({self.max_length}), got {self.stride}"
            )


#: What ``k``, ``samples``, ``values`` and ``entropy`` become when a config leaves them unset,
#: per mode. ``topk+sampled`` (the default mode) with these kept 91-99% of full-distribution
#: KD's gain by KL at alpha 0.5 and 1 in a low- and a high-entropy regime (three seeds), at
#: under 40 B/token, where top-k alone lost to hard labels at alpha 1
#: (``benchmarks/bench_quality.py``, docs/quality.md). In the modes that keep no top-k (or
#: draw nothing), the unused field keeps the top-k default.
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "topk": {"k": 64, "samples": 50, "values": "float16", "entropy": False},
    "sampled": {"k": 64, "samples": 50, "values": "float16", "entropy": True},
    "topk+sampled": {"k": 8, "samples": 16, "values": "q8", "entropy": True},
}


#: The value codec of a classifier's class distributions when ``soft_labels.values`` is unset.
CLASSIFIER_VALUES = "float16"


@dataclass(kw_only=True)
class SoftLabelsConfig(_Section):
    """What is kept of the teacher's distribution at each position."""

    # Top tokens kept per position; unset: 8 in mode topk+sampled, 64 in mode topk.
    k: int | None = _field(None, ge=1)
    # Keep the top k, sample from the distribution, or both (top-k head plus draws from the rest).
    mode: Literal["topk", "sampled", "topk+sampled"] = "topk+sampled"
    # Draws per position in the sampled modes; unset: 16 in mode topk+sampled, 50 in mode sampled.
    samples: int | None = _field(None, ge=1)
    # Value codec of the stored log-probabilities (see storage_schemas.value_codecs); unset: q8 in mode topk+sampled, float16 in mode topk and for classifiers.
    values: str | None = None
    # Also store the full distribution's entropy per position (what turns a sampled cache's
    # cross-entropy into a KL to the teacher); unset: on in the sampled modes, off in mode topk.
    entropy: bool | None = None
    seed: int = _field(0, ge=0)  # Seed of the sampled modes, so that a rebuild draws the same samples.

    def _validate(self) -> None:
        # imported here, not at the top: the codecs need numpy, which importing config does not
        from logitcache.storage_schemas.value_codecs import value_codec_names

        #: whether ``values`` was left unset (a classifier's job then stores float16: see JobConfig)
        self.values_defaulted = self.values is None
        for name, default in MODE_DEFAULTS[self.mode].items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        names = tuple(value_codec_names())
        if self.values not in names:
            raise ConfigError(f"{self._where('values')}: must be one of {', '.join(names)}, got {self.values!r}")


@dataclass(kw_only=True)
class StorageConfig(_Section):
    """How shards are laid out on disk."""

    backend: Literal["parquet", "zarr"] = StorageSettings.backend  # Shard file format.
    compression: Literal["zstd", "lz4", "none"] = StorageSettings.compression  # Compression codec of the shards: zstd is smallest, lz4 faster to read.
    compression_level: int = _field(StorageSettings.compression_level, ge=1, le=22)  # zstd level (lz4 has none).
    row_group_tokens: int = _field(StorageSettings.row_group_tokens, ge=1)  # Parquet row groups are cut at about this many tokens.
    chunk_tokens: int = _field(StorageSettings.chunk_tokens, ge=1)  # Zarr inner chunk length in tokens.

    def settings(self) -> StorageSettings:
        """These settings as the storage layer takes them."""
        return StorageSettings(**dataclasses.asdict(self))


@dataclass(kw_only=True)
class ExecutorConfig(_Section):
    """Where the build's work units run."""

    kind: Literal["local", "dask"] = "local"  # In this process, or on a Dask cluster.
    # Dask scheduler address (tcp://...); None with kind dask starts a local cluster.
    address: str | None = None
    n_workers: int = _field(2, ge=1)  # Worker processes of the local Dask cluster (when address is None).
    threads_per_worker: int = _field(1, ge=1)  # Threads (units at once) per local-cluster worker.
    retries: int = _field(2, ge=0)  # Times a failed work unit is retried before it is reported as failed.
    # Units submitted and not yet committed at a time; 0 means twice the cluster's worker threads.
    in_flight: int = _field(0, ge=0)
    # Dask resources every unit task needs, e.g. {GPU: 1} with workers started with --resources GPU=1.
    task_resources: dict[str, float] = _field(factory=dict)
    connect_timeout: float = _field(30.0, gt=0)  # Seconds to wait for the scheduler at address.
    # Who encodes, writes and hashes a Dask unit's shard: the worker that labelled it (into the
    # cache's _incomplete/, so workers must reach the cache location), or the driver.
    shard_writer: Literal["workers", "driver"] = "workers"

    def _validate(self) -> None:
        if self.address is not None and self.kind != "dask":
            raise ConfigError(f"{self._where('address')}: only used with {self._where('kind')}: dask, got kind {self.kind!r}")


@dataclass(kw_only=True)
class StudentModelConfig(_Section):
    """A student architecture from scratch (config) or a pretrained one (path); exactly one."""

    config: dict[str, Any] | None = None  # A transformers config as a mapping; must include model_type.
    path: str | None = None  # Local path or hub name of a pretrained model.

    def _validate(self) -> None:
        if (self.config is None) == (self.path is None):
            got = "both" if self.config is not None else "neither"
            raise ConfigError(
                f"{self._where()}: exactly one of {self._where('config')} or {self._where('path')} "
                f"must be given, got {got}"
            )
        if self.config is not None and not isinstance(self.config.get("model_type"), str):
            raise ConfigError(
                f"{self._where('config')}: must include model_type (a transformers model type such as 'llama'); "
                f"keys given: {', '.join(map(str, self.config)) or 'none'}"
            )


@dataclass(kw_only=True)
class LossConfig(_Section):
    """The distillation loss of one student."""

    # Divergence between teacher and student distributions.
    kind: Literal["forward_kl", "reverse_kl", "jsd", "tvd", "soft_ce"] = "forward_kl"
    temperature: float = _field(1.0, gt=0)  # Softening temperature of the distillation term.
    # Weight of the distillation term; 1 - alpha weighs the hard-label cross-entropy.
    alpha: float = _field(0.5, ge=0, le=1)
    beta: float = _field(0.5, gt=0, lt=1)  # Mixture weight of the Jensen-Shannon divergence (kind jsd).
    # Probability mass outside the cached tokens: one tail bucket, or renormalise the kept ones.
    tail: Literal["bucket", "renormalize"] = "bucket"
    # Positions per loss chunk, bounding the memory of full-vocabulary logits.
    chunk_tokens: int = _field(4096, ge=1)


@dataclass(kw_only=True)
class OptimizerConfig(_Section):
    """AdamW and its learning-rate schedule."""

    lr: float = _field(3e-4, gt=0)  # Peak learning rate.
    weight_decay: float = _field(0.0, ge=0)  # Decoupled weight decay.
    betas: list[float] = _field(factory=lambda: [0.9, 0.95])  # Adam betas, two numbers in [0, 1).
    warmup_steps: int = _field(0, ge=0)  # Steps of linear warmup.
    schedule: Literal["cosine", "constant", "linear"] = "cosine"  # Decay after warmup.

    def _validate(self) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"{self._where('betas')}: expected two numbers, got {self.betas!r}")
        for index, beta in enumerate(self.betas):
            _check_bounds(beta, {"ge": 0, "lt": 1}, f"{self._where('betas')}[{index}]")


@dataclass(kw_only=True)
class StudentConfig(_Section):
    """One student trained from the cache."""

    name: str  # Unique name; also the student's output directory under train.output.
    model: StudentModelConfig  # Architecture or pretrained weights.
    # Tokenizer path or hub name; None uses the model path's tokenizer, or the cache's token ids
    # as they are for a student built from a config (its vocabulary must cover the teacher's).
    tokenizer: str | None = None
    # Classification caches only: the student reads this column of the corpus (e.g. the parallel
    # text in another language) instead of the teacher's tokens; rows join cache records by
    # document key, so the student's tokenizer is free. None trains on the cached tokens.
    text_column: str | None = None
    loss: LossConfig = field(default_factory=LossConfig)  # Distillation loss.
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # Optimizer and schedule.
    # Tokens per batch of this student: each shared batch (train.batch_tokens, read once for all
    # students) is cut into equal row pieces of this many tokens (rounded down to whole rows), one
    # micro-batch each (also in evaluation); their rows must divide the shared batch's. null takes the
    # shared batch whole.
    batch_tokens: int | None = _field(None, ge=1)
    grad_accum: int = _field(1, ge=1)  # Micro-batches accumulated per optimizer step.

    def _validate(self) -> None:
        if not _STUDENT_NAME.fullmatch(self.name):
            raise ConfigError(
                f"{self._where('name')}: must be letters, digits, '_', '-' or '.' (not first), "
                f"since it names a directory, got {self.name!r}"
            )


@dataclass(kw_only=True)
class TrainConfig(_Section):
    """Stage two: training the students."""

    steps: int = _field(1000, ge=1)  # Optimizer steps per student.
    # Tokens per batch, shared by every student: whole rows of the cache's windows.max_length, rounded down (at least one row).
    batch_tokens: int = _field(16384, ge=1)
    output: str = "runs/students"  # Directory of the students' checkpoints and logs.
    seed: int = _field(0, ge=0)  # Seed of initialisation and data order.
    eval_every: int = _field(0, ge=0)  # Steps between evaluations; 0 evaluates only at the end.
    save_every: int = _field(0, ge=0)  # Batches between checkpoints; 0 saves only at the end.
    num_workers: int = _field(0, ge=0)  # DataLoader worker processes.
    # Reading lanes per rank, taken in turn (null: one per worker). Fixed, the batch order is the same for any worker count that divides it.
    lanes: int | None = _field(None, ge=1)
    shuffle_buffer: int = _field(4096, ge=0)  # Records held for streaming shuffle; 0 reads in cache order.
    languages: list[str] | None = None  # Train only on these language tags; None uses all.
    # Language sampling weights p ~ n**alpha; 1 samples by size, smaller values favour small languages.
    lang_alpha: float = _field(1.0, ge=0, le=1)
    device: str = "auto"  # Torch device; auto picks a GPU when there is one.
    # Batches in page-locked host memory, copied to the GPU without blocking; null: on when training on a GPU (no use on the CPU).
    pin_memory: bool | None = None
    # A shard whose bytes no longer match the manifest (changed, truncated, missing): stop the run, or skip it (warned, counted in the metrics).
    on_corrupt_shard: Literal["stop", "skip"] = "stop"

    def _validate(self) -> None:
        if self.languages is not None and not self.languages:
            raise ConfigError(f"{self._where('languages')}: must name at least one language, or be null for all")


@dataclass(kw_only=True)
class EvalConfig(_Section):
    """Evaluation of the students against the teacher's cached labels."""

    # Fraction of cached records held out from training for evaluation.
    held_out_fraction: float = _field(0.02, ge=0, lt=1)
    # Evaluate on at most this many held-out records; None uses all.
    max_records: int | None = _field(None, ge=1)
    report: str | None = None  # Report directory; None uses <train.output>/report.


@dataclass(kw_only=True)
class DemoTeacherConfig(_Section):
    """A small causal LM that `logitcache run` trains from the corpus when no teacher exists.

    For demos and tests only: it makes the whole job run offline. The tokenizer (byte-level
    BPE) and the model are trained on the corpus documents outside the held-out split and
    saved with save_pretrained to ``output``; a later run with the same settings reuses them.
    """

    output: str = "runs/demo/teacher"  # Directory the demo teacher is saved to; teacher.model must name it.
    vocab_size: int = _field(2048, ge=300)  # Tokenizer vocabulary (byte-level BPE) trained on the corpus.
    hidden_size: int = _field(128, ge=8)  # Width of the demo teacher (a Llama model).
    num_layers: int = _field(3, ge=1)  # Transformer layers of the demo teacher.
    num_heads: int = _field(4, ge=1)  # Attention heads; must divide hidden_size.
    seq_length: int = _field(128, ge=8)  # Tokens per training sequence (documents are concatenated).
    batch_size: int = _field(16, ge=1)  # Sequences per training step.
    steps: int = _field(250, ge=1)  # Training steps (AdamW, cosine schedule).
    lr: float = _field(2e-3, gt=0)  # Peak learning rate.
    dropout: float = _field(0.1, ge=0, lt=1)  # Attention dropout, against memorising a small corpus.
    seed: int = _field(0, ge=0)  # Seed of the tokenizer sample order, init and batches.

    def _validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{self._where('num_heads')}: must divide hidden_size ({self.hidden_size}), got {self.num_heads}")


@dataclass(kw_only=True)
class JobConfig(_Section):
    """One job: a cache, how to build it, and the students to train from it."""

    cache: str  # Path or fsspec URL of the cache directory.
    corpus: CorpusConfig | None = None  # Documents to build from; needed by build only.
    teacher: TeacherConfig | None = None  # Teacher model; needed by build only.
    windows: WindowsConfig = field(default_factory=WindowsConfig)  # Windowing of documents.
    # What is kept of the teacher's distributions.
    soft_labels: SoftLabelsConfig = field(default_factory=SoftLabelsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)  # Shard layout.
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)  # Where the build runs.
    students: list[StudentConfig] = field(default_factory=list)  # Students to train from the cache.
    train: TrainConfig = field(default_factory=TrainConfig)  # Training settings shared by all students.
    eval: EvalConfig = field(default_factory=EvalConfig)  # Evaluation settings.
    # Train a small demo teacher from the corpus first (logitcache run); None uses teacher.model as is.
    demo_teacher: DemoTeacherConfig | None = None

    def _validate(self) -> None:
        if not self.cache:
            raise ConfigError(f"{self._where('cache')}: must be a non-empty path or URL")
        if (self.teacher is not None and self.teacher.task == "sequence_classification"
                and getattr(self.soft_labels, "values_defaulted", False)):
            # a classifier's cache holds whole class distributions: the mode's top-k codec does not apply
            self.soft_labels.values = CLASSIFIER_VALUES
        seen: set[str] = set()
        for index, student in enumerate(self.students):
            if student.name in seen:
                raise ConfigError(f"{self._where('students')}[{index}].name: duplicate student name {student.name!r}; names must be unique")
            seen.add(student.name)
            if student.batch_tokens is not None and student.batch_tokens > self.train.batch_tokens:
                raise ConfigError(
                    f"{self._where('students')}[{index}].batch_tokens: {student.batch_tokens} is more than "
                    f"train.batch_tokens ({self.train.batch_tokens}); a student's batches are pieces of the "
                    "shared batch, so for bigger steps raise its grad_accum (or train.batch_tokens)")
        if (self.corpus is not None and self.corpus.messages_column is not None and self.teacher is not None
                and self.teacher.task != "causal_lm"):
            raise ConfigError(f"{self._where('corpus.messages_column')}: conversations are labelled per token; "
                              f"teacher.task must be causal_lm, got {self.teacher.task!r}")
        if self.demo_teacher is not None and self.teacher is not None and self.teacher.model != self.demo_teacher.output:
            raise ConfigError(
                f"{self._where('teacher.model')}: with demo_teacher, must be demo_teacher.output "
                f"({self.demo_teacher.output!r}), got {self.teacher.model!r}")

    def require_build_sections(self, command: str = "logitcache build") -> None:
        """Raise ConfigError unless the sections that building a cache needs are present."""
        for name in ("corpus", "teacher"):
            if getattr(self, name) is None:
                raise ConfigError(f"{name}: required for `{command}`")

    def require_train_sections(self, command: str = "logitcache train") -> None:
        """Raise ConfigError unless at least one student is configured."""
        if not self.students:
            raise ConfigError(f"students: at least one student is required for `{command}`")


def config_from_dict(data: Mapping[str, Any]) -> JobConfig:
    """Build and validate a JobConfig from plain data (as read from YAML)."""
    return _build(JobConfig, data, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of any config dataclass, serialisable to YAML/JSON; round-trips through config_from_dict."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``key.path=value`` into its path parts and a YAML-parsed value.

    List indices are path parts of digits (``students.0.loss.alpha=0.3``); the bracket form of
    error messages (``students[0].loss.alpha``) is accepted too.
    """
    key, separator, value_text = text.partition("=")
    key = re.sub(r"\[(\d+)\]", r".\1", key.strip())
    path = key.split(".")
    if not separator or not key or any(not part.strip() for part in path):
        raise ConfigError(f"--set {text!r}: {_OVERRIDE_FORM}")
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({error})") from None
    return [part.strip() for part in path], value


def _display(path: Sequence[str]) -> str:
    shown = ""
    for part in path:
        shown += f"[{part}]" if part.isdigit() and shown else _join(shown, part)
    return shown


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with each ``key.path=value`` override applied in order."""
    result = copy.deepcopy(dict(data))
    for text in overrides:
        path, value = parse_override(text)
        node: Any = result
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit():
                    raise ConfigError(f"--set {text!r}: {_display(path[:depth]) or 'config'} is a list; expected an index, got {part!r}")
                index = int(part)
                if index >= len(node):
                    raise ConfigError(
                        f"--set {text!r}: index {index} is out of range; {_display(path[:depth])} has {len(node)} {'entry' if len(node) == 1 else 'entries'}"
                    )
                key: Any = index
            elif isinstance(node, dict):
                key = part
                if not last and node.get(key) is None:
                    node[key] = {}
            else:
                raise ConfigError(f"--set {text!r}: {_display(path[:depth])} is {_brief(node)}, not a mapping or list")
            if last:
                node[key] = value
            else:
                node = node[key]
    return result


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: Sequence[str] = (),
    *,
    default: Mapping[str, Any] | None = None,
) -> JobConfig:
    """Read a job's YAML file (or ``default`` when path is None), apply overrides, validate."""
    if path is None:
        if default is None:
            raise ConfigError("no config file given and no default configuration")
        data: Any = copy.deepcopy(dict(default))
    else:
        try:
            with open(path, encoding="utf-8") as stream:
                data = yaml.safe_load(stream)
        except FileNotFoundError:
            raise ConfigError(f"{os.fspath(path)}: config file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{os.fspath(path)}: is a directory, expected a YAML config file") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error)
            raise ConfigError(f"{os.fspath(path)}{where}: invalid YAML: {problem}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"{os.fspath(path)}: the top level must be a mapping of section names to settings, "
                f"got {type(data).__name__}"
            )
    return config_from_dict(apply_overrides(data, overrides))


def config_fingerprint_fields(cfg: JobConfig) -> dict[str, Any]:
    """The settings that decide whether a later build may add to an existing cache.

    corpus.data_files is left out on purpose: a corpus may grow between builds. Settings that
    change only how or where the work runs (executor, device, batch sizes) are left out too.
    """
    corpus = None
    if cfg.corpus is not None:
        names = ("text_column", "lang_column", "id_column", "unit_documents", "name", "config", "split")
        if cfg.corpus.messages_column is not None:  # only then: caches of plain texts keep their identity
            names += ("messages_column", "chat_template", "label_roles")
        corpus = {name: getattr(cfg.corpus, name) for name in names}
    teacher = None
    if cfg.teacher is not None:
        teacher = {name: getattr(cfg.teacher, name) for name in ("model", "revision", "task", "dtype")}
    return {
        "corpus": corpus,
        "teacher": teacher,
        "windows": config_to_dict(cfg.windows),
        "soft_labels": config_to_dict(cfg.soft_labels),
        "storage": config_to_dict(cfg.storage),
    }
