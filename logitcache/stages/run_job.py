"""``logitcache run``: the whole job in order — (demo teacher,) build, train, evaluate.

With no config the job is the embedded default (:func:`default_job`): the multilingual
sample corpus shipped in ``logitcache/data/demo_corpus``, a demo teacher trained from it
in the run, the cache built from that teacher, two KD students of different sizes and a
CE-only baseline of the same budget, and the report. Everything happens offline, under
``runs/demo/`` of the working directory. A second run finds the teacher, the cache and the
students in place: it runs no teacher forward and trains nothing, and says so.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from logitcache.config import JobConfig
from logitcache.pipeline.capture.demo_teacher import DemoTeacherResult, prepare_demo_teacher
from logitcache.stages.build_cache import BuildSummary, build_cache
from logitcache.stages.train_students import TrainSummary, train_students

_SMALL = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 4, "intermediate_size": 172, "max_position_embeddings": 512,
          "tie_word_embeddings": True}
_MEDIUM = {**_SMALL, "hidden_size": 128, "intermediate_size": 344}


def demo_corpus_dir() -> str:
    """Where the shipped sample corpus lies in the installed package."""
    return str(resources.files("logitcache") / "data" / "demo_corpus")


def default_job() -> dict[str, Any]:
    """The embedded default job of ``logitcache run`` (a plain dict, as if read from YAML)."""
    return copy.deepcopy({
        "cache": "runs/demo/cache",
        "corpus": {"data_files": [f"{demo_corpus_dir()}/*.jsonl"], "text_column": "text",
                   "lang_column": "lang", "id_column": "id", "unit_documents": 200},
        "demo_teacher": {"output": "runs/demo/teacher"},
        "teacher": {"model": "runs/demo/teacher", "batch_tokens": 4096},
        "windows": {"max_length": 128, "stride": 0},
        # no soft_labels: the defaults (top-8 head and 16 tail draws, docs/quality.md)
        "students": [
            {"name": "kd-small", "model": {"config": _SMALL},
             "loss": {"kind": "forward_kl", "alpha": 0.9}, "optimizer": {"lr": 3e-3, "warmup_steps": 20}},
            {"name": "kd-medium", "model": {"config": _MEDIUM},
             "loss": {"kind": "forward_kl", "alpha": 0.9}, "optimizer": {"lr": 2e-3, "warmup_steps": 20}},
            {"name": "ce-small", "model": {"config": _SMALL},
             "loss": {"kind": "forward_kl", "alpha": 0.0}, "optimizer": {"lr": 3e-3, "warmup_steps": 20}},
        ],
        "train": {"steps": 300, "batch_tokens": 2048, "output": "runs/demo/students", "seed": 0,
                  "shuffle_buffer": 512},
        "eval": {"held_out_fraction": 0.1},
    })


@dataclass(kw_only=True)
class RunSummary:
    demo_teacher: DemoTeacherResult | None = None
    build: BuildSummary | None = None
    train: TrainSummary | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"demo_teacher": None if self.demo_teacher is None else vars(self.demo_teacher),
                "build": None if self.build is None else self.build.to_dict(),
                "train": None if self.train is None else self.train.to_dict(), "notes": self.notes}


def run_job(cfg: JobConfig, *, overwrite: bool = False, resume: bool = True, progress: bool = True,
            echo: Callable[[str], None] = print) -> RunSummary:
    """Run every stage ``cfg`` has sections for, printing each stage's summary with ``echo``."""
    cfg.require_build_sections("logitcache run")
    cfg.require_train_sections("logitcache run")
    summary = RunSummary()
    if not progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if cfg.demo_teacher is not None:
        summary.demo_teacher = prepare_demo_teacher(cfg.demo_teacher, corpus=cfg.corpus,
                                                    held_out_fraction=cfg.eval.held_out_fraction,
                                                    progress=progress)
        echo(summary.demo_teacher.to_text())

    summary.build = build_cache(cfg, overwrite=overwrite, progress=progress)
    echo(summary.build.to_text())
    if summary.build.units_built == 0:  # the build summary says so too
        summary.notes.append("no teacher forward: every work unit was already in the cache")

    summary.train = train_students(cfg, resume=resume and not overwrite, progress=progress)
    if summary.train.resumed_from is not None and summary.train.batches == summary.train.resumed_from:
        summary.notes.append("no training: every student had finished its steps in an earlier run")
        echo(f"stage two: {summary.notes[-1]}")
    echo(summary.train.format())
    echo(format_language_table(summary.train))
    return summary


def format_language_table(train: TrainSummary) -> str:
    """Held-out perplexity and top-1 agreement with the teacher, per language, per student."""
    names = list(train.students)
    metrics = {name: (train.students[name].get("eval") or {}).get("metrics") or {} for name in names}
    langs = sorted({lang for m in metrics.values() for lang in m if lang != "all"}) + ["all"]
    token_kind = any("ppl" in (m.get("all") or {}) for m in metrics.values())
    first, second = ("ppl", "top1") if token_kind else ("accuracy", "agreement")
    header = f"{'lang':<6}" + "".join(f"{name + ' ' + first:>22}{name + ' ' + second:>22}" for name in names)
    lines = ["held-out evaluation, per language (" + ("perplexity; top-1 agreement with the teacher)"
             if token_kind else "accuracy; agreement with the teacher)"), header]
    for lang in langs:
        cells = []
        for name in names:
            row = metrics[name].get(lang) or {}
            a, b = row.get(first), row.get(second)
            cells.append(f"{a:>22.2f}" if isinstance(a, (int, float)) else f"{'-':>22}")
            cells.append(f"{b:>22.1%}" if isinstance(b, (int, float)) else f"{'-':>22}")
        lines.append(f"{lang:<6}" + "".join(cells))
    return "\n".join(lines)
