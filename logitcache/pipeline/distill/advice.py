"""Warnings for soft-label settings measured to distil badly, before the work is spent.

A top-k cache keeps the teacher's k most likely ids; the rest of the distribution is one tail
bucket. With a peaked teacher that bucket is small and any k works. With a trained teacher of
high entropy it is not: in ``benchmarks/bench_quality.py``'s high-entropy regime (teacher
entropy 5.9 nats, top-64 mass 0.54, top-8 mass 0.30) students trained on top-k targets at
alpha 1 ended *worse than a student trained on hard labels alone* (by KL to the teacher,
-74% of full-distribution KD's gain at k=64, -244% at k=8, -32% at k=128), at alpha 0.5 they
kept only 12 to 32%, while the default top-8 head with 16 tail draws kept 95% and 91% (alpha
0.5 and 1, three seeds; BENCHMARKS.md, "Distillation quality"; docs/quality.md). So:

- at config time (:func:`config_warnings`, before a build or run spends the teacher's time),
  a job that builds a ``topk`` cache for a student whose KD weight ``alpha`` is above one
  half is warned that this may lose to hard labels, and told what to use instead;
- before training (:func:`topk_alpha_warning`), when the cache is a top-k one whose mean
  top-k mass is below ``MASS_WARNING`` (the teacher's tail is known to be heavy), such a
  student is warned again with the measured mass.

Nothing is refused: the measurement is of one family of teachers, and a user may know better.
"""

from __future__ import annotations

import numpy as np

from logitcache.config import JobConfig, LossConfig
from logitcache.storage_schemas.shard_reader import CacheReader

__all__ = ["ALPHA_WARNING", "INSTEAD", "MASS_WARNING", "config_warnings", "mean_topk_mass", "topk_alpha_warning"]

#: KD weights above this on a top-k cache with a heavy tail are warned about
ALPHA_WARNING = 0.5
#: mean top-k probability mass below which a top-k cache's tail counts as heavy
MASS_WARNING = 0.9
#: what the warnings recommend instead of top-k targets at a high alpha
INSTEAD = (f"a cache with tail draws (soft_labels.mode: topk+sampled, the default: k 8, samples 16, values q8), "
           f"or loss.alpha <= {ALPHA_WARNING:g}")


def config_warnings(cfg: JobConfig) -> list[str]:
    """What to tell a user whose job builds a top-k cache for students with a high KD weight:
    one message per such student, before anything runs (empty when nothing applies)."""
    labels = cfg.soft_labels
    if labels is None or labels.mode != "topk" or cfg.teacher is None or cfg.teacher.task != "causal_lm":
        return []
    return [f"students[{student.name}].loss.alpha={student.loss.alpha:g} with soft_labels.mode: topk "
            f"(k {labels.k}): on teachers of high entropy, top-k targets at alpha above {ALPHA_WARNING:g} were "
            "measured to train students worse than hard labels alone (docs/quality.md); "
            f"use {INSTEAD}"
            for student in cfg.students if student.loss.alpha > ALPHA_WARNING]


def mean_topk_mass(reader: CacheReader, *, positions: int = 65536) -> float | None:
    """Mean probability mass of the cached top-k over (about) the first ``positions`` labelled
    positions of the cache; None for a cache without top-k or without positions. Each shard is
    checked against its sha256 before a block of it is read (a corrupt shard raises
    :class:`~logitcache.errors.CorruptShardError`), so no damaged bytes are decoded here."""
    if not reader.layout.has_topk:
        return None
    total, count = 0.0, 0
    for _, _, block in reader.iter_blocks(verify=True):
        logprobs = block.decoded_topk_logprobs(reader.layout)
        if logprobs is None or not len(logprobs):
            continue
        mass = np.exp(logprobs.astype(np.float64)).sum(axis=1)
        total, count = total + float(mass.sum()), count + len(mass)
        if count >= positions:
            break
    return total / count if count else None


def topk_alpha_warning(loss: LossConfig, *, kind: str, mass: float | None, where: str) -> str | None:
    """What to tell a user whose student ``where`` trains with ``loss`` from a cache of ``kind``
    whose mean top-k mass is ``mass``; None when the setting was not measured to lose."""
    if kind != "token_topk" or mass is None or mass >= MASS_WARNING or loss.alpha <= ALPHA_WARNING:
        return None
    return (f"{where}.loss.alpha={loss.alpha:g} on a top-k cache whose top-k holds {mass:.0%} of the teacher's "
            f"probability on average: with such a heavy tail, top-k targets at alpha above {ALPHA_WARNING:g} were "
            "measured to train students worse than hard labels alone (docs/quality.md). "
            f"Use {INSTEAD}")
