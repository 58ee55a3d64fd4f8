"""The work a process does for one work unit of stage one, wherever that process runs.

Both executors (in this process, or on a Dask worker) call :func:`label_work_unit` with a
:class:`UnitTask`, the small picklable description of *how* to label (teacher config,
windowing, soft-label spec, record layout, batch budget, seed), and a
:class:`~logitcache.pipeline.common.corpus.WorkUnit`, *what* to label. The result carries the
unit's :class:`~logitcache.storage_schemas.records.RecordBlock` and statistics, never its
text, so only labels travel back to the driver that commits them; with ``UnitTask.shards``
set (Dask workers, ``executor.shard_writer: workers``) the worker also encodes, writes, fsyncs
and hashes the unit's shard under the cache's ``_incomplete/``, and only the shard's entry
(:class:`~logitcache.storage_schemas.shard_writer.StagedShard`) travels back.

The teacher is loaded once per process and kept (:func:`teacher_in_process`): a Dask worker
that runs many units loads the weights once, and checks once whether the teacher keeps
windows packed into one row apart (``teacher.packing``). The kept teacher is keyed by its
config and by the size and modification time of the files of a local model directory, so a
long-lived worker notices a teacher replaced on disk. The driver records the identity of the teacher it
was told about (:class:`TeacherFacts`); a worker whose teacher differs (other weights behind
the same path on another machine) refuses to label rather than mixing two teachers in one
cache.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from logitcache.config import TeacherConfig, WindowsConfig, config_to_dict
from logitcache.errors import TeacherError
from logitcache.pipeline.capture.soft_labels import SoftLabelSpec
from logitcache.pipeline.capture.teacher import Teacher, load_teacher
from logitcache.pipeline.capture.unit_labeler import label_unit, unit_seed
from logitcache.pipeline.common.chat import ChatSpec, require_chat_template
from logitcache.pipeline.common.corpus import WorkUnit
from logitcache.pipeline.common.windows import make_windows
from logitcache.storage_schemas.fingerprint import fingerprint
from logitcache.storage_schemas.layout import RecordLayout
from logitcache.storage_schemas.records import RecordBlock
from logitcache.storage_schemas.shard_writer import ShardTarget, StagedShard, stage_shard

__all__ = ["TeacherFacts", "UnitTask", "LabelledUnit", "teacher_in_process", "teacher_facts_in_process",
           "label_work_unit"]

#: torch intra-op threads for unit tasks in this process, when set (the local Dask cluster sets
#: it for its workers: dask starts worker processes with OMP_NUM_THREADS=1, before torch loads)
THREADS_ENV = "LOGITCACHE_TORCH_THREADS"
_lock = threading.Lock()
_kept: dict[str, tuple[Teacher, TeacherFacts]] = {}  # at most one teacher per process


@dataclass(frozen=True, kw_only=True)
class TeacherFacts:
    """What the driver needs to know about the teacher without holding its weights."""

    task: str
    vocab_size: int
    num_classes: int
    identity: dict[str, Any]
    tokenizer_info: dict[str, Any]
    split_head_ok: bool
    has_chat_template: bool = False  # the tokenizer brings its own chat template
    fast_tokenizer: bool = True  # character offsets are available (conversations need them)

    @classmethod
    def of(cls, teacher: Teacher) -> TeacherFacts:
        tokenizer = teacher.tokenizer
        return cls(task=teacher.task, vocab_size=teacher.vocab_size, num_classes=teacher.num_classes,
                   identity=dict(teacher.identity), tokenizer_info=dict(teacher.tokenizer_info),
                   split_head_ok=teacher.split_head_ok,
                   has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
                   fast_tokenizer=bool(getattr(tokenizer, "is_fast", False)))

    @functools.cached_property
    def digest(self) -> str:
        """Changes when the weights, tokenizer or dtype differ (device placement does not count)."""
        return fingerprint({"identity": self.identity, "tokenizer": self.tokenizer_info})


@dataclass(frozen=True, kw_only=True)
class UnitTask:
    """How to label any unit of one build; sent once with every task, so keep it small."""

    teacher: TeacherConfig
    windows: WindowsConfig
    spec: SoftLabelSpec
    layout: RecordLayout
    batch_tokens: int
    seed: int  # soft_labels.seed; each unit samples from unit_seed(seed, unit_id)
    teacher_digest: str  # TeacherFacts.digest the driver wrote into the manifest
    chat: ChatSpec | None = None  # how conversations are rendered and labelled (corpus.messages_column)
    shards: ShardTarget | None = None  # set: the process that labels a unit stages its shard there


@dataclass(kw_only=True)
class LabelledUnit:
    """One unit's records (or, when its labeller staged them, their shard) and the statistics
    its shard entry records."""

    unit_id: str
    block: RecordBlock | None
    stats: dict[str, Any]  # UnitStats.to_dict()
    no_tokens: int  # documents that produced no tokens at all
    host: str = field(default_factory=lambda: os.uname().nodename)
    pid: int = field(default_factory=os.getpid)
    staged: StagedShard | None = None  # the shard written under the cache's _incomplete/, instead of block

    @property
    def records(self) -> int:
        return self.staged.records if self.staged is not None else self.block.num_records


def _model_files_signature(model: str) -> list[tuple[str, int, int]] | None:
    local = Path(os.path.expanduser(model))
    if not local.is_dir():
        return None
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in local.iterdir() if p.is_file())


def _apply_thread_setting() -> None:
    wanted = os.environ.get(THREADS_ENV, "")
    if wanted.isdigit() and int(wanted) > 0 and torch.get_num_threads() != int(wanted):
        torch.set_num_threads(int(wanted))


def _kept_teacher(cfg: TeacherConfig) -> tuple[Teacher, TeacherFacts]:
    _apply_thread_setting()
    key = fingerprint({"config": config_to_dict(cfg), "files": _model_files_signature(cfg.model)})
    with _lock:
        kept = _kept.get(key)
        if kept is None:
            _kept.clear()  # one teacher per process: a new build's teacher replaces the last
            teacher = load_teacher(cfg)
            if cfg.packing == "auto":
                teacher.packed_rows()  # probed once here, not by the first unit's thread
            kept = _kept[key] = (teacher, TeacherFacts.of(teacher))
        return kept


def teacher_in_process(cfg: TeacherConfig) -> Teacher:
    """The teacher of ``cfg``, loaded on first use in this process and kept for later units."""
    return _kept_teacher(cfg)[0]


def teacher_facts_in_process(cfg: TeacherConfig) -> TeacherFacts:
    return _kept_teacher(cfg)[1]


def label_work_unit(task: UnitTask, unit: WorkUnit) -> LabelledUnit:
    """Cut ``unit`` into windows, run the teacher over them and return the records."""
    teacher, facts = _kept_teacher(task.teacher)
    if facts.digest != task.teacher_digest:
        raise TeacherError(
            f"the teacher loaded for unit {unit.unit_id} on {os.uname().nodename} (pid {os.getpid()}) differs "
            f"from the one this build started with (teacher {task.teacher.model!r}, weights sha256 "
            f"{facts.identity.get('weights_sha256')}): every worker must see the same model files")
    if task.chat is not None:
        require_chat_template(task.chat, has_template=facts.has_chat_template, fast=facts.fast_tokenizer,
                              teacher=task.teacher.model)
    windows, no_tokens = make_windows(unit.documents, teacher.tokenizer, task.windows, task=teacher.task,
                                      chat=task.chat)
    block, stats = label_unit(
        teacher, windows, spec=task.spec, layout=task.layout, batch_tokens=task.batch_tokens,
        packing=task.teacher.packing, seed=unit_seed(task.seed, unit.unit_id), store_entropy=task.layout.entropy,
    )
    if task.shards is None:
        return LabelledUnit(unit_id=unit.unit_id, block=block, stats=stats.to_dict(), no_tokens=no_tokens)
    staged = stage_shard(task.shards, block, unit_id=unit.unit_id)  # only the shard's entry travels back
    return LabelledUnit(unit_id=unit.unit_id, block=None, staged=staged, stats=stats.to_dict(), no_tokens=no_tokens)
