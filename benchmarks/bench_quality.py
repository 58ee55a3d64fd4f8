"""Distillation quality by soft-label setting, in a low- and a high-entropy regime.

What a cache keeps of the teacher's distribution decides what a student can learn from it.
With a peaked teacher (low entropy) the top few ids hold nearly all the mass and any top-k
cache is close to the full distribution; with a trained teacher of high entropy (>= 4 nats,
top-64 mass near one half) a top-k cache drops half the mass into one tail bucket, and a
student trained on it at alpha 1 can end up worse than one trained on hard labels alone. This
benchmark measures that frontier: for each soft-label setting, how much of full-distribution
KD's gain a student keeps, against the bytes per token its cache costs.

The regimes (``benchmarks/synthetic_language.py``: order-2 Markov chains over disjoint word
lists, one word one token, known exact entropy):

- **low**: the language of ``bench_students`` (four languages, 380 words; generator entropy
  about 2.3 nats);
- **high**: four languages of 1,500 to 3,000 words (vocabulary over 9,000 ids) with flatter
  transitions (generator entropy about 4.6 nats); its trained teacher's own entropy is higher
  still, as a small teacher's is.

In each regime a Llama teacher is trained on its own corpus (``bench_students.train_teacher``),
a second corpus is cached once per soft-label setting (``build_cache``), and students of one
architecture, starting from the same weights for a given seed and reading the same batches in
the same order, train from each cache (``train_students``, all of one cache's students in one
pass). The reference is full-distribution KD: the teacher online at every step, its whole
log-softmax as the target (``bench_students.run_online``, the same optimizer, schedule and
batches). A CE-only student (alpha 0) is the floor.

Settings: top-k at each ``--ks`` with both tails (bucket, renormalize), at temperatures 1 and
2; sampled at each ``--samples`` (the unbiased estimator; T=1 only, which is all it supports);
hybrid top-k head plus tail draws (``--hybrid k:n[:codec]``, default ``8:16:q8``: the
soft labels a config gets by default); each at alpha 0.5 and 1 (``--alphas``),
over ``--seeds`` (student initialisation and data order; teacher and corpora fixed).

Evaluation, on the cache's held-out documents, each window on its own (right-padded, with an
attention mask): held-out CE of the true next token, KL(teacher || student) over the FULL
vocabulary (the teacher run again), top-1 agreement with the teacher's argmax, per language.
*Gain kept* is ``(m_ce_only - m) / (m_ce_only - m_full_kd)`` for m = KL and m = CE, with the
full-KD reference at the same alpha and temperature: 100% means as good as full KD, 0% no
better than no distillation, below 0 worse than no distillation. Figures are means over seeds
with half their range, (max - min) / 2, beside them as ±.

Usage (from the repository root)::

    python benchmarks/bench_quality.py [--quick] [--out FILE.md] [--regimes low,high]

``--quick`` (CPU: about 7 minutes on two otherwise idle cores) runs fewer settings (k 8 and
64, sampled 16, the default hybrid, T=1), one seed and fewer steps; its numbers show the
shape, not figures to quote.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from typing import Any  # noqa: E402

import bench_students as bs  # noqa: E402  (sets the offline environment, adds the repository to sys.path)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from publish import command_line, publish  # noqa: E402
from synthetic_language import SyntheticLanguage, build_word_tokenizer  # noqa: E402

from logitcache.config import JobConfig, StudentConfig  # noqa: E402
from logitcache.pipeline.distill.dataset import CacheDataset  # noqa: E402
from logitcache.stages.build_cache import build_cache  # noqa: E402
from logitcache.stages.train_students import train_students  # noqa: E402
from logitcache.storage_schemas.shard_reader import CacheReader  # noqa: E402

log = bs.log

#: (tag, words, document weight) per language of the high-entropy regime, and its chain's scales
HIGH_LANGS = (("ka", 3000, 0.35), ("bo", 2500, 0.30), ("si", 2000, 0.20), ("cu", 1500, 0.15))
REGIMES: dict[str, dict[str, Any]] = {
    "low": {},  # SyntheticLanguage.make's defaults: the language of bench_students
    "high": {"langs": HIGH_LANGS, "sigma1": 1.5, "sigma2": 1.0, "zipf": 1.0},
}


@dataclass
class Settings:
    regimes: tuple[str, ...] = ("low", "high")
    ks: tuple[int, ...] = (8, 32, 64, 128)
    samples: tuple[int, ...] = (8, 16, 32, 64)
    hybrid: tuple[tuple[int, int, str], ...] = ((8, 16, "q8"),)  # (k, draws, value codec; "" = ``values``)
    tails: tuple[str, ...] = ("bucket", "renormalize")
    alphas: tuple[float, ...] = (0.5, 1.0)
    temperatures: tuple[float, ...] = (1.0, 2.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    values: str = "float16"  # value codec of the top-k and sampled caches (mode topk's default)
    steps: int = 200
    batch_tokens: int = 2048
    epochs: float = 1.5  # passes over the distillation corpus's training split in ``steps``
    lr: float = 3e-3
    warmup: int = 20
    teacher_steps: int = 400
    teacher_docs: int = 7000
    threads: int = 2
    device: str = "cpu"  # where teachers and students run; on cuda as stage one and two run there (bf16)
    quick: bool = False
    caches_only: bool = False  # stop after each regime's teacher and caches (for bench_codecs --cache)

    def base(self, seed: int) -> bs.Settings:
        """bench_students' settings for the teacher, the job and the student initialisation."""
        return bs.Settings(teacher_steps=self.teacher_steps, teacher_docs=self.teacher_docs, steps=self.steps,
                           batch_tokens=self.batch_tokens, lr=self.lr, warmup=self.warmup, seed=seed,
                           threads=self.threads, held_out=0.05, device=self.device)


QUICK = {"ks": (8, 64), "samples": (16,), "hybrid": ((8, 16, "q8"),), "tails": ("bucket",), "temperatures": (1.0,),
         "seeds": (0,), "steps": 80, "batch_tokens": 1024, "teacher_steps": 150, "teacher_docs": 2500, "warmup": 8}


# ---------------------------------------------------------------- what is measured


@dataclass(frozen=True)
class Setting:
    """One student's soft-label setting: a cache (``labels``) and a loss."""

    labels: str  # cache name: "topk-8", "sampled-16", "hybrid-8+16", or "full" (online) / "ce" (alpha 0)
    tail: str = "bucket"
    alpha: float = 1.0
    temperature: float = 1.0

    @property
    def name(self) -> str:
        parts = [self.labels]
        if self.labels.startswith("topk"):
            parts.append(self.tail)
        if self.labels != "ce":
            parts += [f"a{self.alpha:g}", f"T{self.temperature:g}"]
        return "-".join(parts).replace("+", "p").replace(".", "_")


def mass_ks(s: Settings) -> tuple[int, ...]:
    """The head sizes whose teacher mass the report states: every cached k, and 8 and 64."""
    return tuple(sorted({*s.ks, *(k for k, _, _ in s.hybrid), 8, 64}))


def soft_label_sets(s: Settings) -> dict[str, dict[str, Any]]:
    sets = {f"topk-{k}": {"mode": "topk", "k": k} for k in s.ks}
    sets.update({f"sampled-{n}": {"mode": "sampled", "samples": n, "k": 1} for n in s.samples})
    for k, n, codec in s.hybrid:
        name = f"hybrid-{k}+{n}" + (f"-{codec}" if codec else "")
        sets[name] = {"mode": "topk+sampled", "k": k, "samples": n, **({"values": codec} if codec else {})}
    return sets


def settings_of(labels: str, s: Settings) -> list[Setting]:
    """The students trained from one cache (the CE-only floor rides with the first cache)."""
    if labels.startswith("topk"):
        out = [Setting(labels, tail, a, t) for tail in s.tails for a in s.alphas for t in s.temperatures]
    else:
        out = [Setting(labels, "bucket", a, 1.0) for a in s.alphas]
    if labels == next(iter(soft_label_sets(s))):
        out.append(Setting("ce", alpha=0.0))
    return out


def student_entry(setting: Setting, init_dir: Path, s: Settings) -> dict[str, Any]:
    return {"name": setting.name, "model": {"path": str(init_dir)},
            "loss": {"kind": "forward_kl", "alpha": setting.alpha, "temperature": setting.temperature,
                     "tail": setting.tail},
            "optimizer": {"lr": s.lr, "weight_decay": 0.0, "warmup_steps": s.warmup, "schedule": "cosine"}}


# ---------------------------------------------------------------- evaluation


@dataclass
class Sums:
    """Per-language sums over held-out positions."""

    positions: dict[str, int] = field(default_factory=dict)
    values: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, lang: str, **values: float) -> None:
        slot = self.values.setdefault(lang, {})
        for key, value in values.items():
            slot[key] = slot.get(key, 0.0) + float(value)

    def count(self, lang: str, n: int) -> None:
        self.positions[lang] = self.positions.get(lang, 0) + n

    def mean(self, key: str, lang: str | None = None) -> float:
        langs = [lang] if lang else list(self.values)
        total = sum(self.values[x].get(key, 0.0) for x in langs)
        return total / max(1, sum(self.positions.get(x, 0) for x in langs))


def heldout_batches(cache: str, held_out: float, device: torch.device, rows: int = 32):
    """The held-out records, one window per row, right-padded: (langs, input_ids, attention_mask)."""
    records = list(CacheDataset(cache, seed=0, epochs=1, shuffle_buffer=0, split="eval",
                                held_out_fraction=held_out))
    records.sort(key=lambda r: int(r.record_id))
    for start in range(0, len(records), rows):
        part = records[start:start + rows]
        width = max(len(r.input_ids) for r in part)
        ids = torch.zeros((len(part), width), dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for row, record in enumerate(part):
            ids[row, :len(record.input_ids)] = torch.from_numpy(record.input_ids.astype(np.int64))
            mask[row, :len(record.input_ids)] = 1
        yield [r.lang for r in part], ids.to(device), mask.to(device)


@torch.inference_mode()
def evaluate(cache: str, held_out: float, teacher: Any, students: dict[str, Any],
             ks: tuple[int, ...]) -> tuple[Sums, dict[str, Sums]]:
    """Teacher facts and every student's CE, full-vocabulary KL and top-1 agreement, per language
    (in float32, on the teacher's device)."""
    teacher_sums, student_sums = Sums(), {name: Sums() for name in students}
    device = next(teacher.parameters()).device
    for langs, ids, mask in heldout_batches(cache, held_out, device):
        logp = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.float(), -1)
        targets = ids[:, 1:]
        valid = mask[:, 1:].bool()  # position t predicts token t + 1 of the same window
        logp = logp[:, :-1]
        p = logp.exp()
        top1 = logp.argmax(-1)
        entropy = -(p * logp).sum(-1)
        sorted_p = p.sort(-1, descending=True).values
        mass = {k: sorted_p[..., :k].sum(-1) for k in ks}
        t_nll = -logp.gather(-1, targets[..., None])[..., 0]
        for row, lang in enumerate(langs):
            v = valid[row]
            teacher_sums.count(lang, int(v.sum()))
            teacher_sums.add(lang, ce=t_nll[row][v].sum(), entropy=entropy[row][v].sum(),
                             **{f"mass{k}": m[row][v].sum() for k, m in mass.items()})
        for name, model in students.items():
            logq = torch.log_softmax(model.to(device)(input_ids=ids, attention_mask=mask).logits.float(), -1)[:, :-1]
            logq = logq[..., :logp.shape[-1]]
            kl = (p * (logp - logq)).sum(-1)
            nll = -logq.gather(-1, targets[..., None])[..., 0]
            agree = (logq.argmax(-1) == top1).float()
            sums = student_sums[name]
            for row, lang in enumerate(langs):
                v = valid[row]
                sums.count(lang, int(v.sum()))
                sums.add(lang, ce=nll[row][v].sum(), kl=kl[row][v].sum(), top1=agree[row][v].sum())
    return teacher_sums, student_sums


# ---------------------------------------------------------------- one regime


@dataclass
class RegimeResult:
    name: str
    language: str = ""
    vocab: int = 0
    generator_entropy: float = 0.0
    teacher: dict[str, float] = field(default_factory=dict)
    teacher_sums: Sums | None = None
    bytes_per_token: dict[str, float] = field(default_factory=dict)
    # (setting name, seed) -> Sums
    students: dict[tuple[str, int], Sums] = field(default_factory=dict)
    settings: dict[str, Setting] = field(default_factory=dict)
    seconds: float = 0.0


def corpus_size(language: SyntheticLanguage, s: Settings) -> int:
    """Documents whose training split the students' steps read about ``s.epochs`` times."""
    mean_tokens = (language.min_words + language.max_words) / 2 + 1
    rows = s.steps * bs.rows_for(s.batch_tokens, bs.MAX_LENGTH)
    # greedy packing fills rows of MAX_LENGTH with whole documents: about MAX_LENGTH // mean per row
    per_row = max(1, int(bs.MAX_LENGTH // mean_tokens))
    return math.ceil(rows * per_row / s.epochs / 0.95)


def run_regime(name: str, work: Path, s: Settings) -> RegimeResult:
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    result = RegimeResult(name=name)
    base = s.base(0)
    language = SyntheticLanguage.make(0, **REGIMES[name])
    result.language = language.describe()
    teacher_docs = language.documents(s.teacher_docs, seed=1, prefix="t")
    teacher_eval = language.documents(max(100, s.teacher_docs // 20), seed=2, prefix="te")
    docs = language.documents(corpus_size(language, s), seed=3, prefix="d")
    result.generator_entropy = language.conditional_entropy(docs)
    tokenizer_dir = build_word_tokenizer(work / "tokenizer", [d.text for d in teacher_docs]
                                         + [" ".join(language.vocabulary)])
    corpus = work / "corpus" / "corpus.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text("".join(json.dumps(d.to_json()) + "\n" for d in docs), encoding="utf-8")
    log(f"[{name}] {result.language}; {len(docs)} distillation documents; generator entropy "
        f"{result.generator_entropy:.2f} nats")

    teacher_dir = work / "teacher"
    log(f"[{name}] training the teacher ({s.teacher_steps} steps)")
    result.teacher = bs.train_teacher(teacher_dir, tokenizer_dir, [d.text for d in teacher_docs],
                                      [d.text for d in teacher_eval], base)
    result.vocab = int(AutoModelForCausalLM.from_pretrained(teacher_dir).config.vocab_size)

    caches: dict[str, JobConfig] = {}
    for labels, soft in soft_label_sets(s).items():
        cfg = bs.job(work / f"cache-{labels}", corpus, teacher_dir, work / "unused", base,
                     soft_labels={"values": s.values, **soft})
        log(f"[{name}] build_cache {labels}")
        build_cache(cfg, progress=False)
        manifest = CacheReader(str(cfg.cache)).manifest
        result.bytes_per_token[labels] = manifest.total_bytes / max(1, manifest.total_tokens)
        caches[labels] = cfg
    if s.caches_only:
        result.seconds = time.perf_counter() - started
        return result
    first = next(iter(caches.values()))
    if not bs.same_order(list(caches.values())):
        raise SystemExit(f"[{name}] the caches' readers give different batches; the comparison would be unfair")

    models: dict[str, Any] = {}
    for seed in s.seeds:
        seeded = s.base(seed)
        init_dir = work / f"init-{seed}"
        bs.save_student_init(init_dir, teacher_dir, seeded)
        for labels, cfg in caches.items():
            settings = settings_of(labels, s)
            out = work / f"students-{labels}-{seed}"
            job = bs.job(cfg.cache, corpus, teacher_dir, out, seeded, soft_labels=soft_label_sets(s)[labels],
                         students=[student_entry(x, init_dir, s) for x in settings])
            log(f"[{name}] seed {seed}: train_students from {labels} ({len(settings)} students)")
            shutil.rmtree(out, ignore_errors=True)
            train_students(job, resume=False, progress=False)
            for x in settings:
                result.settings[x.name] = x
                models[f"{x.name}@{seed}"] = AutoModelForCausalLM.from_pretrained(out / x.name / "final").float().eval()
        # the reference: the teacher online, its full distribution as the target, same batches
        job = bs.job(first.cache, corpus, teacher_dir, work / "unused", seeded,
                     soft_labels=soft_label_sets(s)[next(iter(caches))])
        batches = bs.first_batches(job, s.steps)
        for alpha in s.alphas:
            for temperature in s.temperatures:
                x = Setting("full", alpha=alpha, temperature=temperature)
                log(f"[{name}] seed {seed}: online full-distribution KD {x.name}")
                entry = student_entry(x, init_dir, s)
                _, student = bs.run_online(job, StudentConfig(**entry), batches)
                result.settings[x.name] = x
                models[f"{x.name}@{seed}"] = student.model.float().eval()

    log(f"[{name}] evaluating {len(models)} students on the held-out split")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).float().to(base.torch_device).eval()
    result.teacher_sums, sums = evaluate(str(first.cache), base.held_out, teacher, models, mass_ks(s))
    for key, value in sums.items():
        setting, seed = key.rsplit("@", 1)
        result.students[(setting, int(seed))] = value
    result.seconds = time.perf_counter() - started
    return result


# ---------------------------------------------------------------- report


def over_seeds(r: RegimeResult, setting: str, key: str, lang: str | None = None) -> list[float]:
    return [sums.mean(key, lang) for (name, _), sums in sorted(r.students.items()) if name == setting]


def kept(r: RegimeResult, x: Setting, key: str, lang: str | None = None) -> list[float]:
    """Gain kept per seed, against the CE-only floor and the full-KD reference of that seed."""
    ref = Setting("full", alpha=x.alpha, temperature=x.temperature).name
    out = []
    for seed in sorted({seed for (_, seed) in r.students}):
        floor = r.students[(Setting("ce", alpha=0.0).name, seed)].mean(key, lang)
        full = r.students[(ref, seed)].mean(key, lang)
        value = r.students[(x.name, seed)].mean(key, lang)
        out.append(100.0 * (floor - value) / (floor - full) if floor != full else math.nan)
    return out


def cell(values: list[float], digits: int = 3) -> str:
    if not values or any(math.isnan(v) for v in values):
        return "-"
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ±{(max(values) - min(values)) / 2:.{digits}f}"


def regime_section(r: RegimeResult, s: Settings) -> list[str]:
    t = r.teacher_sums
    masses = ", ".join(f"top-{k} {t.mean(f'mass{k}'):.2f}" for k in mass_ks(s))
    lines = [f"### Regime: {r.name}", "",
             f"{r.language}; vocabulary {r.vocab:,}. Generator entropy {r.generator_entropy:.2f} nats. Teacher "
             f"({r.teacher['params'] / 1e6:.2f} M parameters, {s.teacher_steps} steps): held-out CE "
             f"{t.mean('ce'):.3f}, mean entropy {t.mean('entropy'):.2f} nats, mean mass {masses}. "
             f"({r.seconds / 60:.1f} min.)", ""]
    for temperature in s.temperatures:
        lines += [f"T = {temperature:g}. CE and KL in nats per token; *kept*: share of full KD's gain over "
                  "CE only (KL-based / CE-based).", "",
                  "| soft labels | tail | B/token | " + " | ".join(
                      f"a={a:g} CE | a={a:g} KL | a={a:g} top-1 | a={a:g} kept KL / CE" for a in s.alphas) + " |",
                  "|---|---|---:|" + "---:|---:|---:|---:|" * len(s.alphas)]
        rows: list[tuple[str, str, str]] = [("ce", "-", "-")]
        rows += [(labels, tail, f"{r.bytes_per_token[labels]:.1f}") for labels in r.bytes_per_token
                 for tail in (s.tails if labels.startswith("topk") else ("-",))
                 if labels.startswith("topk") or temperature == 1.0]
        rows.append(("full", "-", f"{4 * r.vocab:,} (float32, online)"))
        for labels, tail, size in rows:
            cells = []
            for alpha in s.alphas:
                x = Setting(labels, tail if tail != "-" else "bucket",
                            0.0 if labels == "ce" else alpha, 1.0 if labels == "ce" else temperature)
                if x.name not in r.settings:
                    cells += ["-"] * 4
                    continue
                ce, kl, top1 = (over_seeds(r, x.name, key) for key in ("ce", "kl", "top1"))
                share = "-" if labels in ("ce", "full") else f"{cell(kept(r, x, 'kl'), 0)}% / {cell(kept(r, x, 'ce'), 0)}%"
                cells += [cell(ce), cell(kl), cell(top1, 3), share]
            lines.append(f"| {labels} | {tail} | {size} | " + " | ".join(cells) + " |")
        lines.append("")
    langs = sorted(t.positions)
    lines += ["Gain kept by KL per language (T = 1, tail bucket), mean over seeds:", "",
              "| soft labels | alpha | " + " | ".join(langs) + " |", "|---|---:|" + "---:|" * len(langs)]
    for labels in r.bytes_per_token:
        for alpha in s.alphas:
            x = Setting(labels, "bucket", alpha, 1.0)
            if x.name in r.settings:
                lines.append(f"| {labels} | {alpha:g} | " + " | ".join(
                    f"{cell(kept(r, x, 'kl', lang), 0)}%" for lang in langs) + " |")
    return lines + [""]


def render(results: list[RegimeResult], s: Settings, command: str) -> str:
    lines = ["## Distillation quality by soft-label setting", "",
             f"`{command}`", "",
             f"Students: Llama hidden 64, 1 layer, {s.steps} steps of {s.batch_tokens} tokens (about "
             f"{s.epochs:g} epochs of the training split), lr {s.lr:g}, forward KL; seeds {list(s.seeds)} "
             f"(± is half the range over seeds); values {s.values}; {bs.cpu_model()}, {s.threads} threads, "
             f"device {s.device}.", ""]
    for r in results:
        lines += regime_section(r, s)
    return "\n".join(lines)


def hybrid_spec(spec: str) -> tuple[int, int, str]:
    """``k:draws`` or ``k:draws:codec`` -> (k, draws, codec or "")."""
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise SystemExit(f"--hybrid: {spec!r} is not k:draws or k:draws:codec")
    return int(parts[0]), int(parts[1]), parts[2] if len(parts) == 3 else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer settings, one seed, fewer steps (~7 min on 2 idle cores)")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--workdir", type=Path, help="keep everything here instead of a temporary directory")
    parser.add_argument("--regimes", help="comma-separated regimes (default low,high)")
    parser.add_argument("--ks", help="comma-separated top-k sizes (default 8,32,64,128; none for no top-k cache)")
    parser.add_argument("--samples", help="comma-separated draws per position of the sampled caches (default "
                        "8,16,32,64; none for no sampled cache)")
    parser.add_argument("--hybrid", help="comma-separated k:draws[:codec] of hybrid caches (default 8:16:q8; none for no hybrid cache; codec: "
                        "that cache's value codec instead of --values)")
    parser.add_argument("--tails", help="comma-separated tails of the top-k students (default bucket,renormalize)")
    parser.add_argument("--alphas", help="comma-separated loss.alpha values (default 0.5,1)")
    parser.add_argument("--temperatures", help="comma-separated temperatures of the top-k students (default 1,2)")
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--steps", type=int, help="student steps (default 200; quick 80)")
    parser.add_argument("--batch-tokens", type=int, help="train.batch_tokens (default 2048; quick 1024)")
    parser.add_argument("--teacher-steps", type=int, help="teacher training steps (default 400; quick 150)")
    parser.add_argument("--values", help="value codec of every cache (default float16, the config's default)")
    parser.add_argument("--threads", type=int, help="torch threads (default 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where teachers and students run (default cpu); on cuda the teacher labels in bf16 "
                        "and students train under bf16 autocast, as the stages run there; evaluation in float32")
    parser.add_argument("--caches-only", action="store_true",
                        help="only train each regime's teacher and build its caches under --workdir (a trained "
                        "teacher's real outputs, e.g. for bench_codecs.py --cache), then list them")
    args = parser.parse_args(argv)
    if args.caches_only and not args.workdir:
        parser.error("--caches-only needs --workdir: the caches are what it leaves behind")
    s = Settings(**QUICK, quick=True) if args.quick else Settings()
    parse = {"regimes": str, "ks": int, "samples": int, "tails": str, "alphas": float, "temperatures": float,
             "seeds": int}
    for key, kind in parse.items():
        value = getattr(args, key)
        if value:
            setattr(s, key, () if value == "none" else tuple(kind(x) for x in value.split(",")))
    if args.hybrid:
        s.hybrid = () if args.hybrid == "none" else tuple(hybrid_spec(spec) for spec in args.hybrid.split(","))
    s = replace(s, steps=args.steps or s.steps, threads=args.threads or s.threads, device=args.device,
                batch_tokens=args.batch_tokens or s.batch_tokens, teacher_steps=args.teacher_steps or s.teacher_steps,
                values=args.values or s.values, caches_only=args.caches_only)
    if s.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available here; use --device cpu")
    unknown = set(s.regimes) - set(REGIMES)
    if unknown:
        raise SystemExit(f"--regimes: unknown {sorted(unknown)}; choose from {sorted(REGIMES)}")
    torch.set_num_threads(s.threads)
    command = command_line("bench_quality.py", argv)
    with tempfile.TemporaryDirectory(prefix="bench_quality-") as tmp:
        root = args.workdir or Path(tmp)
        results = []
        for regime in s.regimes:
            work = root / regime
            work.mkdir(parents=True, exist_ok=True)
            results.append(run_regime(regime, work, s))
    publish(render_caches(results, root) if s.caches_only else render(results, s, command), args.out)
    return 0


def render_caches(results: list[RegimeResult], root: Path) -> str:
    """The caches --caches-only built: where they are, and their size."""
    lines = ["| regime | language | vocab | cache | B/token |", "|---|---|---:|---|---:|"]
    for r in results:
        for labels, size in r.bytes_per_token.items():
            lines.append(f"| {r.name} | {r.language} | {r.vocab} | `{root / r.name / f'cache-{labels}'}` | {size:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
