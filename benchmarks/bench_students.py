"""Stage two against online distillation: wall time for N students, and held-out quality.

The setting. A synthetic multilingual language with known entropy
(``benchmarks/synthetic_language.py``: four languages, each an order-2 Markov chain over its
own words, unequal shares of the corpus; a word-level tokenizer trained on it). A teacher
(Llama, hidden 192, 2 layers) is trained on its own corpus here, on the CPU, until its
held-out cross-entropy is close to the generator's (and far below the unigram entropy), then
saved with ``save_pretrained``. A second corpus (written as JSON Lines with columns id, text,
lang) is the distillation corpus: stage one (``build_cache``) caches the teacher's soft labels
on it, once per soft-label setting (top-k with k = 8, 32, 64; sampled with 64 draws). All
students have one architecture (Llama, hidden 64, 1 layer) and start from the same weights:
one initialisation is saved once and every student loads it by path.

(a) Wall time, for N = 1, 2, 4 identical KD students (the k = 64 cached student's config):

- **build s**: one ``build_cache`` call for the k = 64 cache (teacher load, tokenisation,
  forward, top-k, writing), paid once whatever N;
- **cached s**: one ``train_students`` call with the N students, which reads each batch once
  and feeds it to every student. The report gives the whole call and, separately, the part
  spent in its final held-out evaluation and report (timed by wrapping the stage's
  ``evaluate_students`` and ``write_students_report``); *cached train s* is the call minus
  that part, since the online runs do not evaluate. The students' own step time comes from
  the call's ``TrainSummary``;
- **online s**: N separate online runs (one per student, as without a cache), each loading
  the teacher, building its student and running, at every step, the teacher's forward
  (eval mode, ``torch.inference_mode``, full logits at the labelled positions) next to the
  student's forward / backward / AdamW step, with the dense forward KL of
  ``dense_distillation_loss`` against the teacher's full distribution. Every run is run and
  timed (none is extrapolated). The online runs get their batches' token ids ready-made in
  memory (collected from the same reader before the clock starts), so they pay no data
  loading at all, while the cached runs pay for reading and decoding the cache;
- **ratio** = online s / (build s + cached train s); also against the whole call, and the
  same ratio in CPU seconds of the process (``time.process_time``, all threads), which a
  busy shared machine disturbs less than wall time. For each N the cached call and its
  online runs run back to back, so slow drift of the machine's load hits both sides alike,
  ``--repeats`` times (default 2), and again (up to ``--max-repeats``, default 4) while the
  fastest repetition so far ran next to other processes using more than 0.25 cores (read
  from ``/proc/stat``, reported per timing); each side reports its fastest repetition. The
  k = 64 build is repeated the same way.

(b) Final held-out cross-entropy per token (nats) of students that differ only in the loss:
CE only (alpha = 0), online full-logit KD, cached top-k KD at k = 8, 32, 64 (tail bucket),
cached sampled KD (64 draws per position, the unbiased soft-CE estimator). All use the same
alpha (KD rows), temperature 1, optimizer, schedule, steps, batch tokens, initial weights and
batches (same records in the same order: the caches are built from one corpus with one
windowing, so the reader's order and held-out split, which depend on record ids and the
block layout, are the same; checked at run time). Every student, the online one included,
is evaluated by one ``evaluate_students`` call on the held-out split of the k = 64 cache:
*ce* is the cross-entropy of the true next token, *kl* is KL(teacher || student) over the
cached top 64 + a tail bucket, *top1* the agreement with the teacher's argmax. For scale the
table also gives the teacher itself (evaluated the same way as a "student"; its kl is the
check that the cached labels are its distributions), the Bayes-optimal CE of the generator
on the same tokens, and a unigram model fitted on the training split.

Usage (from the repository root)::

    python benchmarks/bench_students.py [--quick] [--out FILE.md]
    python benchmarks/bench_students.py --device cuda --size large --out FILE.md   # on a GPU

On a GPU (``--device cuda``) everything above runs there: the teacher is trained under bf16
autocast and labels (and, online, teaches) in bf16, as stage one runs it on a GPU, and every
student, cached or online, trains under bf16 autocast as stage two runs it; timings wait for
the device (``torch.cuda.synchronize``). ``--size large`` (4-layer teacher, 2-layer students of
hidden 256, 600 steps of 8192 tokens) is the setting meant for it.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # save_pretrained's shard bar

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from machine import cpu_model  # noqa: E402
from synthetic_language import (  # noqa: E402
    SyntheticLanguage,
    build_word_tokenizer,
)

import logitcache  # noqa: E402
import logitcache.stages.train_students as train_stage  # noqa: E402
from logitcache.config import JobConfig, StudentConfig, config_from_dict  # noqa: E402
from logitcache.pipeline.capture.teacher import load_teacher  # noqa: E402
from logitcache.pipeline.common.hf_models import base_model_of  # noqa: E402
from logitcache.pipeline.distill.collate import TokenPacker, rows_for  # noqa: E402
from logitcache.pipeline.distill.dataset import CacheDataset  # noqa: E402
from logitcache.pipeline.distill.losses import dense_distillation_loss  # noqa: E402
from logitcache.pipeline.distill.students import Student, build_student, cache_pad_id  # noqa: E402
from logitcache.pipeline.distill.training import lr_factor, make_optimizer  # noqa: E402
from logitcache.stages.build_cache import build_cache  # noqa: E402
from logitcache.stages.evaluate import evaluate_students  # noqa: E402
from logitcache.stages.train_students import train_students  # noqa: E402
from logitcache.storage_schemas.shard_reader import CacheReader  # noqa: E402

EXPECTED_GAP = 0.02  # cached KD's CE within 2% of online KD's
MAX_LENGTH = 128  # windows.max_length; documents are at most 121 tokens, so one window each


def log(message: str) -> None:
    print(f"{time.perf_counter() - _STARTED:7.1f}s {message}", file=sys.stderr, flush=True)


_STARTED = time.perf_counter()


# ---------------------------------------------------------------- settings


@dataclass
class Settings:
    teacher_hidden: int = 192
    teacher_layers: int = 2
    teacher_intermediate: int = 512
    teacher_steps: int = 400
    teacher_batch_rows: int = 32  # rows of MAX_LENGTH tokens per teacher-training batch
    teacher_lr: float = 3e-3
    teacher_docs: int = 7000  # the teacher's own training corpus
    student_hidden: int = 64
    student_layers: int = 1
    student_intermediate: int = 128
    steps: int = 200
    batch_tokens: int = 2048
    lr: float = 3e-3
    warmup: int = 20
    alpha: float = 0.5
    ks: tuple[int, ...] = (8, 32, 64)
    samples: int = 64
    ns: tuple[int, ...] = (1, 2, 4)
    repeats: int = 2  # repetitions of (a); each cell reports its fastest
    max_repeats: int = 4  # more repetitions while the fastest one was disturbed by other processes
    held_out: float = 0.05
    corpus_docs: int = 0  # 0: sized so that the students' steps read about one epoch of the training split
    seed: int = 0
    threads: int = 2
    device: str = "cpu"  # where the teachers and students run: cpu or cuda
    size: str = "tiny"

    @property
    def main_k(self) -> int:
        return max(self.ks)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def teacher_dtype(self) -> str:
        """bf16 on a GPU (what stage one picks there), float32 on the CPU."""
        return "bfloat16" if self.device == "cuda" else "float32"


#: --size large: a 4-layer teacher and 2-layer students, more steps and bigger batches; made
#: for a GPU (--device cuda), where tiny models leave the device idle.
LARGE = {"teacher_hidden": 512, "teacher_layers": 4, "teacher_intermediate": 1376, "teacher_steps": 1500,
         "teacher_batch_rows": 64, "teacher_lr": 1e-3, "teacher_docs": 40000, "student_hidden": 256, "student_layers": 2,
         "student_intermediate": 688, "steps": 600, "batch_tokens": 8192, "warmup": 50}


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU, as stage two's students; nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(s: Settings) -> str:
    if s.device == "cuda":
        return f"cuda ({torch.cuda.get_device_name()}), teacher {s.teacher_dtype}, students under bf16 autocast"
    return "cpu"


def settings_from_args(args: argparse.Namespace) -> Settings:
    s = Settings(**LARGE, size="large") if args.size == "large" else Settings()
    if args.quick:
        s = Settings(teacher_hidden=64, teacher_intermediate=128, teacher_steps=40, teacher_docs=600,
                     student_hidden=32, student_intermediate=64, steps=12, batch_tokens=1024, warmup=2,
                     held_out=0.1, repeats=1, max_repeats=1)
    s.device = args.device
    if s.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available here; use --device cpu")
    for name in ("steps", "batch_tokens", "teacher_steps", "alpha", "lr", "samples", "seed", "threads",
                 "corpus_docs", "repeats", "max_repeats"):
        value = getattr(args, name)
        if value is not None:
            setattr(s, name, value)
    if args.ks:
        s.ks = tuple(sorted(int(k) for k in args.ks.split(",")))
    if args.ns:
        s.ns = tuple(sorted(int(n) for n in args.ns.split(",")))
    return s


# ---------------------------------------------------------------- the teacher


def llama_config(vocab: int, tokenizer: Any, *, hidden: int, layers: int, intermediate: int):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "llama", vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=intermediate, max_position_embeddings=MAX_LENGTH,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)


def pack_rows(sequences: list[list[int]], length: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Greedy packing of token sequences into rows: (input_ids, position_ids, labels) each.

    Positions restart at every sequence and on the padding, which is how transformers' Llama
    keeps packed sequences apart when no attention mask is given (stage two packs the same
    way); labels are the next token of the same sequence, -100 elsewhere.
    """
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    current: list[list[int]] = []
    used = 0

    def flush() -> None:
        ids = np.zeros(length, dtype=np.int64)
        pos = np.zeros(length, dtype=np.int64)
        labels = np.full(length, -100, dtype=np.int64)
        at = 0
        for seq in current:
            n = len(seq)
            ids[at:at + n] = seq
            pos[at:at + n] = np.arange(n)
            labels[at:at + n - 1] = seq[1:]
            at += n
        pos[at:] = np.arange(length - at)
        rows.append((ids, pos, labels))

    for seq in sequences:
        if used + len(seq) > length:
            flush()
            current, used = [], 0
        current.append(seq)
        used += len(seq)
    if current:
        flush()
    return rows


def docs_for_steps(lengths: list[int], s: Settings) -> int:
    """How many documents of these token counts (in this order) the students' steps consume,
    packed as stage two packs them (a record never straddles two rows of ``MAX_LENGTH``)."""
    rows = s.steps * rows_for(s.batch_tokens, MAX_LENGTH)
    row, used = 0, 0
    for index, n in enumerate(lengths):
        if used + n > MAX_LENGTH:
            row, used = row + 1, 0
            if row == rows:
                return index
        used += n
    raise SystemExit(f"{len(lengths)} documents fill fewer than the {rows} rows of {s.steps} steps")


def stack(rows):
    return [torch.from_numpy(np.stack(parts)) for parts in zip(*rows, strict=True)]


@torch.no_grad()
def packed_ce(model, rows, batch_rows: int = 32) -> float:
    total, count = 0.0, 0
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_rows):
        ids, pos, labels = (t.to(device) for t in stack(rows[start:start + batch_rows]))
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
        total += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    model.train()
    return total / max(count, 1)


def train_teacher(out_dir: Path, tokenizer_dir: Path, train_texts: list[str], eval_texts: list[str],
                  s: Settings) -> dict[str, float]:
    """Train the teacher on ``train_texts`` (packed rows, AdamW, warmup + cosine) and save it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = llama_config(len(tokenizer), tokenizer, hidden=s.teacher_hidden, layers=s.teacher_layers,
                          intermediate=s.teacher_intermediate)
    torch.manual_seed(s.seed)
    model = AutoModelForCausalLM.from_config(config).to(s.torch_device)
    train_rows = pack_rows(tokenizer(train_texts)["input_ids"], MAX_LENGTH)
    eval_rows = pack_rows(tokenizer(eval_texts)["input_ids"], MAX_LENGTH)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.teacher_lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, s.teacher_steps // 15)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, s.teacher_steps - warmup))
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    rng = np.random.default_rng([s.seed, 0x7EAC])
    order: list[int] = []
    started = time.perf_counter()
    model.train()
    for step in range(s.teacher_steps):
        if len(order) < s.teacher_batch_rows:
            order += rng.permutation(len(train_rows)).tolist()
        picked, order = order[:s.teacher_batch_rows], order[s.teacher_batch_rows:]
        ids, pos, labels = (t.to(s.torch_device) for t in stack([train_rows[i] for i in picked]))
        with autocast(s.torch_device):
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % max(1, s.teacher_steps // 5) == 0 or step + 1 == s.teacher_steps:
            log(f"teacher step {step + 1}/{s.teacher_steps}: train loss {float(loss.detach()):.3f}")
    synchronize(s.torch_device)
    seconds = time.perf_counter() - started
    ce = packed_ce(model, eval_rows)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    tokens = sum(int((r[2] != -100).sum()) for r in train_rows)
    return {"seconds": seconds, "ce_own_eval": ce, "params": model.num_parameters(), "corpus_tokens": tokens,
            "tokens_seen": s.teacher_steps * s.teacher_batch_rows * MAX_LENGTH}


# ---------------------------------------------------------------- jobs


def student_model_config(tokenizer: Any, vocab: int, s: Settings):
    return llama_config(vocab, tokenizer, hidden=s.student_hidden, layers=s.student_layers,
                        intermediate=s.student_intermediate)


def save_student_init(out_dir: Path, teacher_dir: Path, s: Settings) -> int:
    """One initialisation for every student (seeded), saved once; students load it by path."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    vocab = AutoConfig.from_pretrained(teacher_dir).vocab_size
    torch.manual_seed(s.seed + 1)
    model = AutoModelForCausalLM.from_config(student_model_config(tokenizer, vocab, s))
    model.save_pretrained(out_dir)  # no tokenizer: the students read the cached ids
    return model.num_parameters()


def student_entry(name: str, init_dir: Path, s: Settings, *, alpha: float) -> dict[str, Any]:
    return {"name": name, "model": {"path": str(init_dir)},
            "loss": {"kind": "forward_kl", "alpha": alpha, "temperature": 1.0, "tail": "bucket"},
            "optimizer": {"lr": s.lr, "weight_decay": 0.0, "warmup_steps": s.warmup, "schedule": "cosine"}}


def job(cache: Path, corpus: Path, teacher_dir: Path, output: Path, s: Settings, *,
        soft_labels: dict[str, Any], students: list[dict[str, Any]] | None = None) -> JobConfig:
    return config_from_dict({
        "cache": str(cache),
        "corpus": {"data_files": [str(corpus)], "lang_column": "lang", "id_column": "id", "unit_documents": 2000},
        "teacher": {"model": str(teacher_dir), "device": s.device, "dtype": s.teacher_dtype, "batch_tokens": 8192},
        "windows": {"max_length": MAX_LENGTH, "stride": 0},
        "soft_labels": {"values": "float16", **soft_labels},
        "storage": {"row_group_tokens": 16384},
        "students": students or [],
        "train": {"steps": s.steps, "batch_tokens": s.batch_tokens, "output": str(output), "seed": s.seed,
                  "shuffle_buffer": 1024, "eval_every": 0, "save_every": 0, "num_workers": 0, "device": s.device},
        "eval": {"held_out_fraction": s.held_out},
    })


DISTURBED = 0.25  # CPU cores used by other processes, on average, above which a timing is disturbed


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores, steal included), from /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as stream:
            fields = [int(x) for x in stream.readline().split()[1:9]]
    except (OSError, ValueError):
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Clock:
    """Wall seconds, this process's CPU seconds (all threads), and the cores that the rest of
    the machine kept busy meanwhile (``others``: 0 on a quiet machine, 1 for another process
    running flat out on one core)."""

    def __init__(self) -> None:
        self.wall, self.cpu, self.busy = time.perf_counter(), time.process_time(), machine_busy_seconds()

    def stop(self) -> tuple[float, float, float]:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.wall
        cpu = time.process_time() - self.cpu
        others = max(0.0, (machine_busy_seconds() - self.busy - cpu) / max(wall, 1e-9))
        return wall, cpu, others


@dataclass
class Timer:
    """Wall and CPU seconds spent in the stage's final evaluation and report (wrapped functions)."""

    seconds: float = 0.0
    cpu: float = 0.0

    @contextlib.contextmanager
    def wrapping(self):
        originals = {name: getattr(train_stage, name) for name in ("evaluate_students", "write_students_report")}

        def timed(fn):
            def wrapper(*a, **kw):
                started, cpu = time.perf_counter(), time.process_time()
                try:
                    return fn(*a, **kw)
                finally:
                    self.seconds += time.perf_counter() - started
                    self.cpu += time.process_time() - cpu
            return wrapper

        for name, fn in originals.items():
            setattr(train_stage, name, timed(fn))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(train_stage, name, fn)


@dataclass
class CachedRun:
    whole: float
    eval_report: float
    cpu_whole: float
    cpu_eval_report: float
    student_steps: float  # sum over students of the seconds in their forward / backward / step
    tokens: int  # real tokens the first student read
    others: float  # cores other processes used meanwhile (see Clock)

    @property
    def train(self) -> float:
        return self.whole - self.eval_report

    @property
    def cpu_train(self) -> float:
        return self.cpu_whole - self.cpu_eval_report


@contextlib.contextmanager
def recording_batches(into: list[list[int]] | None):
    """Record the record ids of every batch the stage's loader yields (when ``into`` is a list)."""
    if into is None:
        yield
        return
    original = train_stage.PackedBatches

    class Recording(original):
        def __iter__(self):
            for batch in super().__iter__():
                into.append(batch.record_ids.tolist())
                yield batch

    train_stage.PackedBatches = Recording
    try:
        yield
    finally:
        train_stage.PackedBatches = original


def load_of(runs: list[OnlineRun]) -> float:
    """Cores other processes used during a set of online runs (time-weighted mean)."""
    return sum(x.others * x.seconds for x in runs) / max(sum(x.seconds for x in runs), 1e-9)


def more_needed(others: list[float], done: int, s: Settings) -> bool:
    """Whether to repeat a timing: fewer than --repeats so far, or the fastest so far was
    disturbed by other processes and --max-repeats allows another try."""
    if done < s.repeats:
        return True
    return done < s.max_repeats and any(not x <= DISTURBED for x in others)


def run_cached(cfg: JobConfig, record: list[list[int]] | None = None) -> CachedRun:
    shutil.rmtree(cfg.train.output, ignore_errors=True)
    timer = Timer()
    with timer.wrapping(), recording_batches(record):
        clock = Clock()
        summary = train_students(cfg, resume=False, progress=False)
        whole, cpu_whole, others = clock.stop()
    steps = sum(float(info["seconds"]) for info in summary.students.values())
    tokens = int(next(iter(summary.students.values()))["tokens"])
    return CachedRun(whole=whole, eval_report=timer.seconds, cpu_whole=cpu_whole, cpu_eval_report=timer.cpu,
                     student_steps=steps, tokens=tokens, others=others)


def timed_build(cfg: JobConfig) -> tuple[float, float, float]:
    """(wall s, CPU s, other processes' cores) of one ``build_cache`` into a fresh cache."""
    shutil.rmtree(cfg.cache, ignore_errors=True)
    clock = Clock()
    build_cache(cfg, progress=False)
    return clock.stop()


# ---------------------------------------------------------------- online distillation


@dataclass
class OnlineBatch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    label_mask: torch.Tensor
    hard_targets: torch.Tensor
    record_ids: np.ndarray


def training_reader(cfg: JobConfig) -> tuple[CacheDataset, TokenPacker]:
    """The reader and packer ``train_students`` builds for ``cfg`` (same arguments, same pad id)."""
    reader = CacheReader(cfg.cache)
    manifest = reader.manifest
    train = cfg.train
    dataset = CacheDataset(cfg.cache, seed=train.seed, epochs=None, shuffle_buffer=train.shuffle_buffer,
                           split="train", held_out_fraction=cfg.eval.held_out_fraction,
                           languages=train.languages, lang_alpha=train.lang_alpha)
    length = int(manifest.windows.get("max_length") or cfg.windows.max_length)
    packer = TokenPacker(manifest.layout, rows=rows_for(train.batch_tokens, length), length=length,
                         pad_id=cache_pad_id(manifest))
    return dataset, packer


def first_batches(cfg: JobConfig, count: int, *, device: torch.device | None = None) -> list[OnlineBatch]:
    """The first ``count`` training batches of ``cfg``'s cache, token ids only (on ``device``)."""
    dataset, packer = training_reader(cfg)
    out = []
    device = device or torch.device("cpu")
    for batch in packer.pack(iter(dataset)):
        out.append(OnlineBatch(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
                               label_mask=batch.label_mask.to(device), hard_targets=batch.hard_targets.to(device),
                               record_ids=batch.record_ids))
        if len(out) == count:
            break
    return out


@dataclass
class OnlineRun:
    seconds: float  # the whole run: teacher load, student build, every step
    cpu: float  # CPU seconds of this process over the run
    teacher: float  # wall seconds in the teacher's forward (log-softmax included)
    setup: float  # wall seconds loading the teacher and building the student
    others: float  # cores other processes used meanwhile (see Clock)


def run_online(cfg: JobConfig, student_cfg: StudentConfig, batches: list[OnlineBatch]) -> tuple[OnlineRun, Student]:
    """One online-KD run: teacher forward at every step next to the student's step.

    Same optimizer (``make_optimizer``), schedule (``lr_factor``), clipping (1.0) and loss
    weighting as ``StudentRun``; the KD term is the dense forward KL of the student against
    the teacher's full distribution at the labelled positions (the positions the cache
    labels), from ``dense_distillation_loss``.
    """
    clock = Clock()
    started = time.perf_counter()
    teacher = load_teacher(cfg.teacher)
    manifest = CacheReader(cfg.cache).manifest
    student = build_student(student_cfg, manifest=manifest, device=torch.device(cfg.train.device),
                            seed=cfg.train.seed)
    width = student.target_width
    body, head = base_model_of(teacher.model), teacher.model.get_output_embeddings()
    optimizer = make_optimizer(student.model, student_cfg.optimizer)
    steps = cfg.train.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg=student_cfg.optimizer, total_steps=steps))
    setup = time.perf_counter() - started
    teacher_seconds = 0.0
    for batch in batches[:steps]:
        mask = batch.label_mask
        t0 = time.perf_counter()
        with torch.inference_mode():
            hidden = body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
            logits = head(hidden.last_hidden_state[mask])[:, :width]
            teacher_logprobs = torch.log_softmax(logits.float(), dim=-1)
        teacher_logprobs = teacher_logprobs.clone()  # a normal tensor, usable by autograd
        teacher_seconds += time.perf_counter() - t0
        with student.autocast():  # as the cached students: bf16 on a GPU, full precision on the CPU
            student_logits = student.head(student.hidden_states(batch.input_ids, batch.position_ids)[mask])
            out = dense_distillation_loss(student_logits, teacher_logprobs, batch.hard_targets[mask],
                                          cfg=student_cfg.loss)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(student.model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    seconds, cpu, others = clock.stop()
    run = OnlineRun(seconds=seconds, cpu=cpu, teacher=teacher_seconds, setup=setup, others=others)
    return run, student


# ---------------------------------------------------------------- references


def reference_numbers(cfg: JobConfig, language: SyntheticLanguage, tokenizer: Any) -> dict[str, float]:
    """Bayes-optimal and unigram CE on the held-out split's next-token targets, from the cache."""
    vocab = int(CacheReader(cfg.cache).manifest.layout.vocab_size)
    counts = np.zeros(vocab, dtype=np.float64)
    train = CacheDataset(cfg.cache, seed=0, epochs=1, shuffle_buffer=0, split="train",
                         held_out_fraction=cfg.eval.held_out_fraction)
    train_records = 0
    for record in train:
        counts += np.bincount(record.input_ids[1:], minlength=vocab)
        train_records += 1
    smoothed = (counts + 0.5) / (counts.sum() + 0.5 * vocab)
    heldout = CacheDataset(cfg.cache, seed=0, epochs=1, shuffle_buffer=0, split="eval",
                           held_out_fraction=cfg.eval.held_out_fraction)
    oracle, unigram, targets, records = 0.0, 0.0, 0, 0
    bos = tokenizer.bos_token_id
    for record in heldout:
        ids = record.input_ids
        if record.context_length != 0 or int(ids[0]) != bos:
            raise SystemExit(f"record {record.record_id}: expected one window per document starting with <bos>")
        words = tokenizer.convert_ids_to_tokens(ids[1:].tolist())
        oracle += float(language.token_nll(record.lang, language.word_ids(record.lang, words)).sum())
        unigram += float(-np.log(smoothed[ids[1:]]).sum())
        targets += len(ids) - 1
        records += 1
    train_p = counts / counts.sum()
    nz = train_p > 0
    return {"oracle_ce": oracle / targets, "unigram_ce": unigram / targets,
            "unigram_entropy": float(-(train_p[nz] * np.log(train_p[nz])).sum()),
            "heldout_records": records, "heldout_targets": targets, "train_records": train_records,
            "train_targets": int(counts.sum()), "train_tokens": int(counts.sum()) + train_records}


def load_student(cfg: JobConfig, name: str, path: Path, *, loss: dict | None = None) -> Student:
    student_cfg = StudentConfig(name=name, model={"path": str(path)}, loss=loss or {})
    return build_student(student_cfg, manifest=CacheReader(cfg.cache).manifest,
                         device=torch.device(cfg.train.device), seed=cfg.train.seed)


def same_order(cfgs: list[JobConfig], batches: int = 5) -> bool:
    """Whether the caches' readers give the same records in the same batches (first few)."""
    reference = None
    for cfg in cfgs:
        ids = [b.record_ids.tolist() for b in first_batches(cfg, batches)]
        if reference is None:
            reference = ids
        elif ids != reference:
            return False
    return True


# ---------------------------------------------------------------- report


def machine_lines(s: Settings) -> list[str]:
    import datasets
    import tokenizers
    import transformers

    model = cpu_model()
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "datasets": datasets.__version__,
                "tokenizers": tokenizers.__version__, "logitcache": logitcache.__version__}
    return [
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, CPU model {model!r}, "
        f"{platform.system()} {platform.release()}; device {device_name(s)}, torch.set_num_threads({s.threads})",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
    ]


@dataclass
class Results:
    settings: Settings
    command: str
    language: str = ""
    teacher: dict[str, float] = field(default_factory=dict)
    student_params: int = 0
    refs: dict[str, float] = field(default_factory=dict)
    corpus_docs: int = 0
    builds: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # name -> (wall, CPU, others)
    build_reps: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)  # every build
    disturbed: list[str] = field(default_factory=list)  # reported timings that other load disturbed
    cached: dict[int, CachedRun] = field(default_factory=dict)  # N -> best repetition
    online: dict[int, list[OnlineRun]] = field(default_factory=dict)  # N -> its N runs, best repetition
    cached_reps: dict[int, list[CachedRun]] = field(default_factory=dict)  # N -> every repetition
    online_reps: dict[int, list[list[OnlineRun]]] = field(default_factory=dict)
    quality: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: dict[str, float] = field(default_factory=dict)  # (b) row -> training s
    identical_copies: dict[int, bool] = field(default_factory=dict)
    same_order: bool = False
    online_same_batches: bool = False
    load: tuple[float, float] = (0.0, 0.0)
    seconds: float = 0.0


def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render(r: Results) -> str:
    s = r.settings
    t = r.teacher
    refs = r.refs
    kd_rows = [q for q in r.quality if q["kind"] == "cached KD"]
    online = next(q for q in r.quality if q["kind"] == "online KD")
    ce_only = next(q for q in r.quality if q["kind"] == "CE only")
    build_s, build_cpu, build_others = r.builds[f"topk k={s.main_k}"]
    out = [
        f"Command: `{r.command}`",
        "",
        *machine_lines(s),
        f"- whole benchmark {r.seconds:.0f} s; load average (1 min) {r.load[0]:.2f} at the start, "
        f"{r.load[1]:.2f} at the end ((a) reports the best of {s.repeats} repetition(s) of each "
        "measurement, the rest are single runs)",
        "",
        "**Settings.**",
        "",
        f"- language: `benchmarks/synthetic_language.py`, seed {s.seed}: {r.language}; order-2 Markov "
        f"chains, documents of 16..120 words, word-level tokenizer of {t['vocab']} tokens (one word = one "
        f"token, `<bos>` first); windows.max_length {MAX_LENGTH}, so each document is one record",
        f"- teacher: Llama, hidden {s.teacher_hidden}, {s.teacher_layers} layers, intermediate "
        f"{s.teacher_intermediate}, {t['params'] / 1e6:.2f}M parameters; trained here for {s.teacher_steps} "
        f"steps x {s.teacher_batch_rows} packed rows of {MAX_LENGTH} ({t['tokens_seen'] / 1e6:.2f}M slots) "
        f"on its own corpus of {t['corpus_tokens']:,} target tokens, AdamW lr {s.teacher_lr}, in "
        f"{t['seconds']:.0f} s; CE {t['ce_own_eval']:.3f} nats on its own held-out documents",
        f"- distillation corpus: {r.corpus_docs:,} documents (sized so that the students' steps read "
        f"about one epoch of the training split); cache held-out split "
        f"(eval.held_out_fraction {s.held_out}): {refs['heldout_records']:,} records, "
        f"{refs['heldout_targets']:,} next-token targets; training split {refs['train_records']:,} records, "
        f"{refs['train_targets']:,} targets; caches: float16 values, parquet/zstd",
        f"- students: Llama, hidden {s.student_hidden}, {s.student_layers} layer(s), intermediate "
        f"{s.student_intermediate}, {r.student_params / 1e6:.3f}M parameters, one saved initialisation "
        f"for all; {s.steps} steps x train.batch_tokens {s.batch_tokens} (packed rows of {MAX_LENGTH}; "
        f"each student read {r.cached[s.ns[0]].tokens:,} tokens, "
        f"{r.cached[s.ns[0]].tokens / max(refs['train_tokens'], 1):.2f} epochs of the training split); AdamW lr {s.lr}, {s.warmup} warmup steps, cosine to "
        f"10%, clip 1.0; KD students: forward KL, T = 1, alpha {s.alpha}; train.seed {s.seed}, "
        f"shuffle_buffer 1024",
        f"- same data for all: the caches' readers give identical batches (first 5 compared): "
        f"{'yes' if r.same_order else 'NO'}; the online runs' {s.steps} batches are the ones the "
        f"k={s.main_k} cached run trained on (every batch's record ids compared): "
        f"{'yes' if r.online_same_batches else 'NO'}",
        "",
        f"**(a) Wall time, N identical KD students** (cached: top-k k={s.main_k}). *build s*: one "
        "`build_cache` of that cache (paid once for any N). *cached whole s*: one `train_students` call "
        "with N students (each batch read once, fed to all); *eval+report s*: its final held-out "
        "evaluation and report; *cached train s* = whole - eval+report; *students' steps s*: the part "
        "of it in the students' forward / backward / optimizer steps (the rest is reading the cache, "
        "checkpoints, saving). *online s*: N separate online runs (each: teacher load + student build "
        "+ at every step the teacher's forward and the student's step; batches ready-made in memory, "
        "so no data loading, and no evaluation), every run timed, summed; *teacher fwd s*: the part of "
        "those runs in the teacher's forward; *online student s*: the rest after the setup (teacher "
        "load, student build), i.e. the students' steps, to compare with the cached students' steps. "
        "*ratio* = online / (build + cached train); *ratio (whole)* = online / (build + cached whole); "
        "*ratio (CPU)*: the same in CPU seconds of this process (all threads). *other load*: CPU cores "
        "that other processes kept busy during the cached call / the online runs (from /proc/stat; "
        f"above {DISTURBED} the timing is disturbed). For each N the cached call and then its N online "
        f"runs ran back to back, {s.repeats} times (more, up to {s.max_repeats}, while the fastest "
        "repetition so far was disturbed); each side reports its fastest repetition (the cached call "
        "with the least cached train s, the set of N online runs with the least total), since other "
        "load only ever slows a run. The build likewise.",
        "",
        "| N | build s | cached whole s | eval+report s | cached train s | students' steps s | online s "
        "| online runs s | teacher fwd s | online student s | ratio | ratio (whole) | ratio (CPU) "
        "| other load |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = {}
    disturbed = []
    for n in s.ns:
        c, runs = r.cached[n], r.online[n]
        online_s = sum(x.seconds for x in runs)
        ratio = online_s / (build_s + c.train)
        ratios[n] = ratio
        cpu_ratio = sum(x.cpu for x in runs) / (build_cpu + c.cpu_train)
        if not (c.others <= DISTURBED and load_of(runs) <= DISTURBED):
            disturbed.append(f"N={n}")
        out.append(f"| {n} | {build_s:.1f} | {c.whole:.1f} | {c.eval_report:.1f} | {c.train:.1f} "
                   f"| {c.student_steps:.1f} | {online_s:.1f} | {', '.join(f'{x.seconds:.1f}' for x in runs)} "
                   f"| {sum(x.teacher for x in runs):.1f} | {sum(x.seconds - x.setup - x.teacher for x in runs):.1f} "
                   f"| **{ratio:.2f}** | {online_s / (build_s + c.whole):.2f} | {cpu_ratio:.2f} "
                   f"| {c.others:.2f} / {load_of(runs):.2f} |")
    if not build_others <= DISTURBED:
        disturbed.append("the build")
    r.disturbed = disturbed
    other_builds = ", ".join(f"{name} {wall:.1f} s" for name, (wall, _, _) in r.builds.items())
    copies = ", ".join(f"N={n}: {'yes' if ok else 'NO'}" for n, ok in r.identical_copies.items())
    all_runs = [x for n in s.ns for x in r.online[n]]
    per_run = sum(x.seconds for x in all_runs) / len(all_runs)
    teacher_share = sum(x.teacher for x in all_runs) / sum(x.seconds for x in all_runs)
    lo, hi = min(s.ns), max(s.ns)
    builds = r.build_reps[f"topk k={s.main_k}"]
    reps = "; ".join(
        f"N={n}: " + ", ".join(f"{c.train:.1f} / {sum(x.seconds for x in o):.1f} ({c.others:.2f} / {load_of(o):.2f})"
                               for c, o in zip(r.cached_reps[n], r.online_reps[n], strict=True))
        for n in s.ns)
    out += [
        "",
        "Every repetition, cached train s / online s (other load, cores): " + reps + ". Builds of the "
        f"k={s.main_k} cache: " + ", ".join(f"{w:.1f} s ({o:.2f})" for w, _, o in builds) + ".",
        "",
        f"Builds of every cache used in (b) (fastest): {other_builds}. The N copies of one student in a "
        f"cached run end with identical held-out CE (a check that every student saw every batch): {copies}.",
    ]
    marginal = (r.cached[hi].train - r.cached[lo].train) / (hi - lo) if hi > lo else 0.0
    if marginal > 0:
        out += ["", f"Where the ratio goes: an online run took {per_run:.1f} s on average ({100 * teacher_share:.0f}% "
                f"of it in the teacher's forward); each extra cached student added {marginal:.1f} s to the cached "
                f"call (N={lo} to N={hi}), so for large N the ratio approaches {per_run / marginal:.1f} "
                f"(online run / extra cached student), and the one build is amortised over N."]
    out += [
        "",
        "**(b) Held-out quality** after the same training, all evaluated by one `evaluate_students` call on "
        f"the held-out split of the k={s.main_k} cache. *ce*: cross-entropy of the true next token (nats "
        "per token); *vs online*: (ce - online KD's ce) / online KD's ce; *KD gain kept*: (CE-only ce - "
        "ce) / (CE-only ce - online ce), the share of online KD's improvement over CE only; *kl*: "
        f"KL(teacher || student) over the cached top {s.main_k} + tail bucket; *top1*: agreement with the "
        "teacher's argmax; *train s*: that student's training time (cached: its `train_students` call "
        "minus evaluation and report; online: the online run).",
        "",
        "| student | soft labels | alpha | ce | ppl | vs online | KD gain kept | kl | top1 | train s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    gain = ce_only["ce"] - online["ce"]
    for q in r.quality:
        if q["kind"] == "reference":
            continue
        rel = (q["ce"] - online["ce"]) / online["ce"]
        kept = (ce_only["ce"] - q["ce"]) / gain if abs(gain) > 1e-9 else float("nan")
        train_s = r.train_seconds.get(q["name"])
        out.append(f"| {q['name']} | {q['labels']} | {q['alpha']} | {q['ce']:.4f} | {q['ppl']:.2f} "
                   f"| {100 * rel:+.2f}% | {fmt(100 * kept, 0)}% | {fmt(q['kl'])} | {fmt(q['top1'])} "
                   f"| {fmt(train_s, 1)} |")
    teacher_q = next(q for q in r.quality if q["name"] == "teacher")
    out += [
        f"| *teacher* | (itself) | - | {teacher_q['ce']:.4f} | {teacher_q['ppl']:.2f} | - | - "
        f"| {fmt(teacher_q['kl'], 4)} | {fmt(teacher_q['top1'])} | {t['seconds']:.0f} |",
        f"| *generator (Bayes-optimal)* | - | - | {refs['oracle_ce']:.4f} | {math.exp(refs['oracle_ce']):.2f} "
        "| - | - | - | - | - |",
        f"| *unigram (fitted on train split)* | - | - | {refs['unigram_ce']:.4f} "
        f"| {math.exp(refs['unigram_ce']):.2f} | - | - | - | - | - |",
        "",
        f"Generator's expected next-word entropy along the distillation corpus: {refs['entropy']:.3f} nats; "
        f"unigram entropy of the training split's targets: {refs['unigram_entropy']:.3f} nats.",
        "",
        "**Expectations in this run.**",
        "",
    ]
    worst = max(kd_rows, key=lambda q: q["ce"])
    within = [q for q in kd_rows if q["ce"] <= online["ce"] * (1 + EXPECTED_GAP)]
    held_kd = len(within) == len(kd_rows)
    rel_text = ", ".join(f"{q['labels']} {100 * (q['ce'] - online['ce']) / online['ce']:+.2f}%" for q in kd_rows)
    out.append(f"- Cached KD within 2% of online KD's held-out CE: **{'held' if held_kd else 'did not hold'}** "
               f"for {len(within)} of {len(kd_rows)} cached students ({rel_text}; worst: {worst['labels']}).")
    if abs(gain) > 1e-9:
        out.append(f"- For scale: online KD improved on CE only by {gain:.4f} nats "
                   f"({100 * gain / ce_only['ce']:.2f}%); teacher {teacher_q['ce']:.4f}, generator "
                   f"{refs['oracle_ce']:.4f}, unigram {refs['unigram_ce']:.4f}.")
    ns = list(s.ns)
    grows = all(ratios[a] < ratios[b] for a, b in zip(ns, ns[1:], strict=False))
    chain = " < ".join(f"{ratios[n]:.2f}" for n in ns) if grows else ", ".join(
        f"N={n}: {ratios[n]:.2f}" for n in ns)
    out.append(f"- Ratio online / (build + cached train) grows with N: **{'held' if grows else 'did not hold'}** "
               f"({chain}).")
    if r.disturbed:
        out.append(f"- Caution: other processes kept more than {DISTURBED} cores busy during the reported timing "
                   f"of {', '.join(r.disturbed)} in every one of its repetitions; those wall times are inflated "
                   "(rerun on a quiet machine).")
    else:
        out.append(f"- Every reported timing of (a) ran while other processes kept at most {DISTURBED} cores busy.")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny teacher and students, 12 steps (numbers not quotable)")
    parser.add_argument("--out", metavar="FILE", help="also write the markdown report here")
    parser.add_argument("--workdir", metavar="DIR", help="keep everything here instead of a temporary directory")
    parser.add_argument("--steps", type=int, help="student steps (default 200; quick 12)")
    parser.add_argument("--batch-tokens", type=int, help="train.batch_tokens (default 2048; quick 1024)")
    parser.add_argument("--teacher-steps", type=int, help="teacher training steps (default 400; quick 40)")
    parser.add_argument("--corpus-docs", type=int, help="documents in the distillation corpus (default: about "
                        "one epoch of the students' steps)")
    parser.add_argument("--alpha", type=float, help="loss.alpha of the KD students (default 0.5)")
    parser.add_argument("--lr", type=float, help="students' peak learning rate (default 3e-3)")
    parser.add_argument("--ks", help="comma-separated k of the cached top-k students (default 8,32,64)")
    parser.add_argument("--samples", type=int, help="draws per position of the sampled cache (default 64)")
    parser.add_argument("--ns", help="comma-separated student counts of (a) (default 1,2,4)")
    parser.add_argument("--repeats", type=int, help="repetitions of (a), each cell reporting its fastest "
                        "(default 2; quick 1)")
    parser.add_argument("--max-repeats", type=int, help="repeat a timing of (a) up to this many times while "
                        f"its fastest repetition had other processes using more than {DISTURBED} cores "
                        "(default 4; quick 1)")
    parser.add_argument("--seed", type=int, help="seed of the language, corpora and initialisations (default 0)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the teachers and students run (default cpu); on cuda the teacher runs in "
                        "bf16 and the students under bf16 autocast, online and cached alike")
    parser.add_argument("--size", choices=("tiny", "large"), default="tiny",
                        help="tiny (default: CPU-sized) or large (4-layer teacher, 2-layer students of "
                        "hidden 256, 600 steps of 8192 tokens: for --device cuda)")
    args = parser.parse_args(argv)
    s = settings_from_args(args)
    torch.set_num_threads(s.threads)
    command = "python benchmarks/bench_students.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    results = Results(settings=s, command=command.strip())
    load_start = os.getloadavg()[0]
    started = time.perf_counter()

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="bench_students-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)

        # 1. the language, its corpora, the tokenizer
        language = SyntheticLanguage.make(s.seed)
        results.language = language.describe()
        teacher_docs = language.documents(s.teacher_docs, seed=s.seed * 100 + 1, prefix="t")
        teacher_eval = language.documents(max(100, s.teacher_docs // 20), seed=s.seed * 100 + 2, prefix="te")
        if s.corpus_docs:
            docs = language.documents(s.corpus_docs, seed=s.seed * 100 + 3, prefix="d")
        else:
            mean_tokens = (language.min_words + language.max_words) / 2 + 1
            pool = language.documents(math.ceil(2 * s.steps * s.batch_tokens / mean_tokens / (1 - s.held_out)),
                                      seed=s.seed * 100 + 3, prefix="d")
            docs = pool[:math.ceil(docs_for_steps([len(d.words) + 1 for d in pool], s) / (1 - s.held_out))]
        results.corpus_docs = len(docs)
        tokenizer_dir = build_word_tokenizer(
            work / "tokenizer", [d.text for d in teacher_docs] + [" ".join(language.vocabulary)])
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        corpus = work / "corpus" / "corpus.jsonl"
        corpus.parent.mkdir(parents=True, exist_ok=True)
        with open(corpus, "w", encoding="utf-8") as stream:
            for doc in docs:
                stream.write(json.dumps(doc.to_json()) + "\n")
        log(f"language: {results.language}; {len(tokenizer)} tokens; teacher corpus {len(teacher_docs)} docs, "
            f"distillation corpus {len(docs)} docs")

        # 2. the teacher
        teacher_dir = work / "teacher"
        log(f"training the teacher ({s.teacher_steps} steps)")
        results.teacher = train_teacher(teacher_dir, tokenizer_dir, [d.text for d in teacher_docs],
                                        [d.text for d in teacher_eval], s)
        results.teacher["vocab"] = len(tokenizer)
        log(f"teacher: CE {results.teacher['ce_own_eval']:.3f} on its held-out docs "
            f"(generator {np.mean(np.concatenate([language.token_nll(d.lang, d.words) for d in teacher_eval])):.3f})")

        # 3. stage one, once per soft-label setting
        caches: dict[str, JobConfig] = {}
        labels = {f"topk k={k}": {"mode": "topk", "k": k} for k in s.ks}
        labels[f"sampled n={s.samples}"] = {"mode": "sampled", "samples": s.samples, "k": 1}
        for name, soft in labels.items():
            slug = name.replace(" ", "-").replace("=", "")
            cfg = job(work / f"cache-{slug}", corpus, teacher_dir, work / "unused", s, soft_labels=soft)
            # the cache of (a) is built --repeats times (the same cache again), the fastest reported;
            # more times (up to --max-repeats) while the fastest build was disturbed by other load
            times: list[tuple[float, float, float]] = []
            timed = soft.get("k") == s.main_k and soft["mode"] == "topk"
            while not times or (timed and more_needed([min(times)[2]], len(times), s)):
                log(f"build_cache {name}" + (f" (repetition {len(times) + 1})" if times else ""))
                times.append(timed_build(cfg))
                log(f"build_cache {name}: {times[-1][0]:.1f} s (other processes: {times[-1][2]:.2f} cores)")
            results.builds[name] = min(times)
            results.build_reps[name] = times
            caches[name] = cfg
        main_name = f"topk k={s.main_k}"
        main_cfg = caches[main_name]
        results.same_order = same_order(list(caches.values()))
        results.refs = reference_numbers(main_cfg, language, tokenizer)
        results.refs["entropy"] = language.conditional_entropy(docs)
        log(f"references: generator CE {results.refs['oracle_ce']:.3f}, unigram CE {results.refs['unigram_ce']:.3f}; "
            f"same batches in every cache: {results.same_order}")

        # 4. one initialisation for all students
        init_dir = work / "student-init"
        results.student_params = save_student_init(init_dir, teacher_dir, s)

        # 5. (a) for each N: one train_students call with N identical KD students from the k=max
        # cache, then N separate online runs (teacher at every step), back to back
        log(f"collecting {s.steps} training batches for the online runs")
        batches = first_batches(main_cfg, s.steps, device=s.torch_device)
        if len(batches) < s.steps:
            raise SystemExit(f"the reader gave {len(batches)} batches, fewer than {s.steps} steps")
        online_cfg = StudentConfig(**student_entry("online-kd", init_dir, s, alpha=s.alpha))
        online_student = None
        final_dirs: dict[str, Path] = {}
        for n in s.ns:
            names = [f"kd-k{s.main_k}-{i}" for i in range(n)]
            rep = 0
            while rep == 0 or more_needed([results.cached[n].others, load_of(results.online[n])], rep, s):
                out_dir = work / f"cached-N{n}-r{rep}"
                cfg = job(main_cfg.cache, corpus, teacher_dir, out_dir, s, soft_labels=labels[main_name],
                          students=[student_entry(name, init_dir, s, alpha=s.alpha) for name in names])
                tag = f"(a) N={n} repetition {rep + 1}"
                log(f"{tag}: train_students with {n} student(s)")
                first = n == s.ns[0] and rep == 0
                seen: list[list[int]] | None = [] if first else None
                run = run_cached(cfg, record=seen)
                results.cached_reps.setdefault(n, []).append(run)
                if seen is not None:
                    results.online_same_batches = seen[:s.steps] == [b.record_ids.tolist() for b in batches]
                ces = [json.loads((out_dir / name / "eval.json").read_text())["metrics"]["all"]["ce"]
                       for name in names]
                results.identical_copies[n] = results.identical_copies.get(n, True) and max(ces) - min(ces) < 1e-6
                log(f"{tag}: cached {run.whole:.1f} s (eval+report {run.eval_report:.1f} s, students' steps "
                    f"{run.student_steps:.1f} s; other processes {run.others:.2f} cores)")
                if first:
                    final_dirs[f"KD top-k k={s.main_k}"] = out_dir / names[0] / "final"
                runs = []
                for i in range(n):
                    online, student = run_online(main_cfg, online_cfg, batches)
                    runs.append(online)
                    log(f"{tag}: online run {i + 1}/{n}: {online.seconds:.1f} s (teacher forward "
                        f"{online.teacher:.1f} s; other processes {online.others:.2f} cores)")
                    if online_student is None:
                        online_student = student
                results.online_reps.setdefault(n, []).append(runs)
                # best of the repetitions, each side on its own (other load only ever slows a run)
                results.cached[n] = min(results.cached_reps[n], key=lambda c: c.train)
                results.online[n] = min(results.online_reps[n], key=lambda runs: sum(x.seconds for x in runs))
                rep += 1
        results.train_seconds[f"KD top-k k={s.main_k}"] = results.cached[s.ns[0]].train
        results.train_seconds["online KD"] = min(x.seconds for n in s.ns for x in results.online[n])
        del batches

        # 7. (b) the other cached students
        variants: list[tuple[str, str, float]] = [("CE only", main_name, 0.0)]
        variants += [(f"KD top-k k={k}", f"topk k={k}", s.alpha) for k in s.ks if k != s.main_k]
        variants += [(f"KD sampled n={s.samples}", f"sampled n={s.samples}", s.alpha)]
        for label, cache_name, alpha in variants:
            slug = label.replace(" ", "-").replace("=", "").lower()
            cfg = job(caches[cache_name].cache, corpus, teacher_dir, work / f"b-{slug}", s,
                      soft_labels=labels[cache_name], students=[student_entry(slug, init_dir, s, alpha=alpha)])
            log(f"(b) cached: {label}")
            run = run_cached(cfg)
            final_dirs[label] = work / f"b-{slug}" / slug / "final"
            results.train_seconds[label] = run.train

        # 8. one evaluation of everything on the main cache's held-out split
        students: dict[str, Student] = {}
        order = ["CE only", "online KD", *[f"KD top-k k={k}" for k in s.ks], f"KD sampled n={s.samples}"]
        for label in order:
            if label == "online KD":
                students[label] = online_student
            else:
                students[label] = load_student(main_cfg, label.replace(" ", "_").replace("=", ""), final_dirs[label])
        students["teacher"] = load_student(main_cfg, "teacher", teacher_dir)
        log("evaluating every student on the held-out split")
        evaluation = evaluate_students(main_cfg, students, progress=False)
        describe = {"CE only": ("none (alpha 0)", 0.0), "online KD": ("live teacher, full", s.alpha)}
        for label in order:
            overall = evaluation[label]["metrics"]["all"]
            if label.startswith("KD top-k"):
                labels_text, kind = f"cached top-{label.split('=')[1]}", "cached KD"
            elif label.startswith("KD sampled"):
                labels_text, kind = f"cached sampled, {s.samples} draws", "cached KD"
            else:
                labels_text, kind = describe[label][0], label
            results.quality.append({"name": label, "labels": labels_text, "kind": kind,
                                    "alpha": 0.0 if label == "CE only" else s.alpha, **overall})
        overall = evaluation["teacher"]["metrics"]["all"]
        results.quality.append({"name": "teacher", "labels": "-", "kind": "reference", "alpha": "-", **overall})

    results.seconds = time.perf_counter() - started
    results.load = (load_start, os.getloadavg()[0])
    report = render(results)
    print(report)
    if args.out:
        Path(args.out).write_text(report, encoding="utf-8")
    log(f"done in {results.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
