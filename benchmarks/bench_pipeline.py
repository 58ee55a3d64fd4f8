"""Stage one's host side alone: what reading, tokenising, labelling, encoding and committing
cost per token when the teacher's forward costs nothing.

``bench_build.py`` compares a build with a real teacher's forward, where the forward dominates
on a CPU. On a GPU the forward and the top-k / sampling / entropy run on the device, and the
host must keep up: read and tokenise the corpus, cut windows, batch them, assemble and encode
the labels, write, hash and commit the shards. This benchmark measures that host work apart,
per core, by running the real stage-one code end to end (``build_cache`` with the local and
the Dask executor) with a stand-in teacher whose logits cost only memory traffic.

**The stand-in** (``standin_teacher.py``): a ``transformers`` causal LM saved with its own
code (``teacher.trust_remote_code: true``), so ``load_teacher`` loads it like any teacher, in
the driver or in a Dask worker, and its split-head check passes. Its body turns each
position's last three tokens into a table row and an offset; its head returns
``rows_a[a] + noise[c : c + V]``, full-vocabulary float32 logits (32,000 or 151,936 wide)
from two gathers: about 4 million distinct distributions of about 4 nats mean entropy, whose
top-k sets share frequent ids, so that the labels compress like a real teacher's. Nothing is
a matmul; the head's and body's own CPU time is counted and taken out.

**Corpus and tokenizer.** The shipped multilingual demo corpus (11 languages, 1,156
documents) is expanded to ``--tokens`` tokens for 32,000 logits (wider vocabularies label its
first documents, as many logits in all: ``tokens x 32000 / vocab``): each document joins 1 to 64 (log-uniform)
demo documents of one language, drawn with a seeded RNG, so that documents span 1 to
several windows of 512. The tokenizer is a byte-level BPE trained with ``tokenizers`` on
the demo corpus, asked for 32,000 tokens; a corpus this small stops the trainer at about
18,000 (every word of it one token, about 6 bytes per token; a real 32k tokenizer cuts such
text finer), and no tokenizer reaches 151,936 on it. Both teachers keep this tokenizer's ids
and only their logits are 32,000 or 151,936 wide: the vocabulary size enters where it
matters here, in the label computation and in the id type (uint16 / uint32).

**Settings** (``soft_labels``): *top-64* (mode topk, k 64, its default float16 values, no
stored entropy) and *default* (topk+sampled, top-8 + 16 draws from the tail, q8 values, stored
entropy); both store the target log-probability. Windows of 512, ``teacher.batch_tokens``
16384, ``corpus.unit_documents`` 100 (about 25k tokens per unit), parquet / zstd 3.

**Per core, local executor.** The process pins itself to one CPU (``sched_setaffinity``)
with one thread for torch, Arrow, BLAS and tokenizers, so the labelling thread and the
committer thread share that core. One ``build_cache`` call into a fresh cache is timed
after a warm-up build (imports, the teacher's load); the best of ``--repeats`` (lowest CPU
without the stand-in) is reported. Time comes from the process's CPU time and, per part, from the calling thread's
CPU time in wrappers around the functions stage one calls (``stage_timers.py``):

- *read*: ``iter_work_units`` (``datasets`` streaming, documents, unit fingerprints), driver;
- *tokenize*: the tokenizer call in ``make_windows`` (``windows.tokenize``); *windows*: the
  rest of ``make_windows`` (token arrays, spans, record ids);
- *batching*: ``label_windows`` minus ``label_positions`` minus the stand-in body (plan,
  collate, masks, next tokens, host copies);
- *labels from logits*: ``label_positions`` minus the stand-in head: the float32 log-softmax,
  top-k, tail sampling, entropy and target log-prob, on the CPU here, on the device in a GPU
  build;
- *assemble + encode*: ``label_unit`` minus ``label_windows`` (record assembly, id codec,
  value codec);
- *planes + Arrow*: ``block_to_table`` (format 4's row planes, Arrow arrays);
- *compress + write*: the rest of ``ParquetBackend.write`` (zstd, Parquet pages, file);
- *fsync*, *sha256*, *rename + manifest*: the rest of ``ShardWriter.commit``;
- *other*: process CPU not in any part (build glue, unit decisions, the committer handoff).

*Pipeline tok/s/core* = tokens / (process CPU - stand-in CPU): every part on one core, the
label computation included. *Host tok/s/core* leaves out the labels from logits too: what a
GPU build asks of its host per core. The library's own wall-clock statistics
(``UnitStats.forward_seconds``, the shard's ``write_seconds``) are reported beside them.

**Scaling, Dask executor.** ``executor.kind: dask`` with its own local cluster of
``n_workers`` 1 and 2 (``threads_per_worker`` 1, one torch thread per worker: the executor
would give a lone worker both cores' threads), teacher loaded in every worker and a warm-up
build first; the driver unpinned; ``--scaling`` names the (logits, setting) pairs. Wall time of a build
and the CPU time of the driver and of the workers (``client.run``): on 2 cores the driver's
read and commit run beside two workers, so *cores busy* says whether the machine, not the
design, is the limit.

Usage (from the repository root)::

    python benchmarks/bench_pipeline.py [--quick] [--vocab 32000,151936] [--k 64] [--tokens N]
        [--workers 1,2] [--scaling 32000:top-64] [--repeats 2] [--out FILE.md]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ["TOKENIZERS_PARALLELISM"] = "false"  # encode on the calling thread, counted as its CPU
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy / torch / tokenizers are imported

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from importlib.resources import files  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/bench_pipeline.py` puts benchmarks/ first
    sys.path.insert(0, str(ROOT))

import stage_timers  # noqa: E402
from machine import cpu_model  # noqa: E402
from publish import command_line, publish  # noqa: E402
from standin_teacher import save_standin  # noqa: E402

import logitcache  # noqa: E402
from logitcache.config import JobConfig, config_from_dict  # noqa: E402
from logitcache.pipeline.capture.executor import DaskExecutor, LocalExecutor  # noqa: E402
from logitcache.pipeline.capture.unit_task import THREADS_ENV, teacher_in_process  # noqa: E402
from logitcache.stages.build_cache import build_cache  # noqa: E402
from logitcache.storage_schemas.shard_reader import CacheReader  # noqa: E402
from tests.fixtures_models import build_tiny_tokenizer  # noqa: E402

TARGET_TOKENS_S = 250_000  # host tokens/s per core
TOKENIZER_VOCAB = 32_000  # asked of the BPE trainer
SMALL_VOCAB = 32_000  # wider vocabularies label a prefix of the corpus with as many logits
MAX_PIECES = 64  # a document joins 1..MAX_PIECES demo documents of one language
NO_SPACE_LANGS = ("ja", "zh")
SETTINGS: dict[str, dict[str, Any]] = {
    "top-64": {"mode": "topk"},  # k from --k; float16, no stored entropy (the mode's defaults)
    "default": {"mode": "topk+sampled", "k": 8, "samples": 16, "values": "q8"},
}
ALL_CPUS: list[int] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

# parts as the report groups them: (label, parts of Split)
GROUPS = (
    ("read + tokenize + windows", ("read", "tokenize", "windows")),
    ("batching", ("batching",)),
    ("labels from logits", ("labels",)),
    ("encode", ("assemble_encode", "planes_arrow")),
    ("write + commit", ("compress_write", "fsync", "sha256", "commit_rest")),
    ("other", ("other",)),
)
PART_LABELS = {
    "read": "read", "tokenize": "tokenize", "windows": "windows", "batching": "batching",
    "labels": "labels from logits", "assemble_encode": "assemble + encode", "planes_arrow": "planes + Arrow",
    "compress_write": "compress + write", "fsync": "fsync", "sha256": "sha256", "commit_rest": "rename + manifest",
    "other": "other",
}


# ---------------------------------------------------------------- assets


def demo_texts() -> dict[str, list[str]]:
    """The shipped demo corpus (train and held-out), texts by language."""
    corpus = files("logitcache") / "data" / "demo_corpus"
    by_lang: dict[str, list[str]] = {}
    for name in ("train.jsonl", "heldout.jsonl"):
        for line in (corpus / name).read_text(encoding="utf-8").splitlines():
            doc = json.loads(line)
            by_lang.setdefault(doc["lang"], []).append(doc["text"])
    return by_lang


def expand_corpus(tokenizer: Any, by_lang: dict[str, list[str]], *, tokens: int,
                  seed: int) -> tuple[list[dict], list[int]]:
    """Documents of 1..MAX_PIECES same-language demo texts until ``tokens`` tokens (as
    tokenised), and each one's token count."""
    rng = random.Random(seed)
    langs = sorted(by_lang)
    docs: list[dict] = []
    counts: list[int] = []
    while sum(counts) < tokens:
        lang = rng.choice(langs)
        pieces = round(math.exp(rng.uniform(0.0, math.log(MAX_PIECES))))
        joiner = "" if lang in NO_SPACE_LANGS else " "
        text = joiner.join(rng.choice(by_lang[lang]) for _ in range(pieces))
        docs.append({"id": f"{lang}-{len(docs):06d}", "lang": lang, "text": text})
        counts.append(len(tokenizer(text)["input_ids"]))
    return docs, counts


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as stream:
        for doc in docs:
            stream.write(json.dumps(doc, ensure_ascii=False) + "\n")
    return path


def corpus_tokens(vocab: int, args: argparse.Namespace) -> int:
    """Tokens labelled at ``vocab``: ``--tokens`` up to 32k logits, else as many logits in all."""
    return args.tokens if vocab <= SMALL_VOCAB else round(args.tokens * SMALL_VOCAB / vocab)


@dataclass
class Corpus:
    path: Path
    documents: int
    tokens: int
    text_bytes: int


@dataclass
class Assets:
    tokenizer_size: int
    warmup: Path
    corpora: dict[int, Corpus] = field(default_factory=dict)  # logits width -> its corpus
    teachers: dict[int, Path] = field(default_factory=dict)  # logits width -> model directory


def make_assets(workdir: Path, args: argparse.Namespace) -> Assets:
    from transformers import AutoTokenizer

    by_lang = demo_texts()
    tokenizer_dir = build_tiny_tokenizer(workdir / "tokenizer", vocab_size=TOKENIZER_VOCAB,
                                         texts=[t for texts in by_lang.values() for t in texts])
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs, counts = expand_corpus(tokenizer, by_lang, tokens=args.tokens, seed=args.seed)
    assets = Assets(tokenizer_size=len(tokenizer), warmup=write_jsonl(workdir / "warmup" / "warmup.jsonl", docs[:8]))
    cumulative = np.cumsum(counts)
    for vocab in args.vocab:
        wanted = corpus_tokens(vocab, args)
        n = min(len(docs), int(np.searchsorted(cumulative, wanted)) + 1)  # the first documents reaching it
        path = write_jsonl(workdir / f"corpus-{n}" / "corpus.jsonl", docs[:n])
        assets.corpora[vocab] = Corpus(path=path, documents=n, tokens=int(cumulative[n - 1]),
                                       text_bytes=sum(len(d["text"].encode("utf-8")) for d in docs[:n]))
        assets.teachers[vocab] = save_standin(workdir / f"standin-{vocab}", tokenizer_dir, vocab_size=vocab,
                                              seed=args.seed)
    return assets


def job_config(*, cache: Path, corpus: Path, model: Path, setting: str, executor: dict[str, Any],
               args: argparse.Namespace) -> JobConfig:
    labels = dict(SETTINGS[setting])
    if setting == "top-64":
        labels["k"] = args.k
    return config_from_dict({
        "cache": str(cache),
        "corpus": {"data_files": [str(corpus)], "lang_column": "lang", "id_column": "id",
                   "unit_documents": args.unit_documents},
        "teacher": {"model": str(model), "trust_remote_code": True, "device": "cpu", "dtype": "float32",
                    "batch_tokens": args.batch_tokens},
        "windows": {"max_length": args.max_length},
        "soft_labels": labels,
        "executor": executor,
    })


def setting_label(setting: str, args: argparse.Namespace) -> str:
    return f"top-{args.k} float16" if setting == "top-64" else "top-8 + 16 draws q8"


# ---------------------------------------------------------------- one build


@dataclass
class Run:
    """One timed ``build_cache`` call and what it reports."""

    wall_s: float
    cpu_s: float  # the driver process (with the local executor: everything)
    tokens: int
    units: int
    bytes: int
    worker: dict[str, float]  # summed over units: stage_timers' "bench" stats
    driver: dict[str, float]  # driver-side parts' CPU seconds
    forward_wall_s: float  # UnitStats.forward_seconds, summed
    write_wall_s: float  # the shards' write_seconds, summed
    worker_cpu_s: float = 0.0  # Dask: the worker processes' CPU seconds

    @property
    def stand_in_s(self) -> float:
        return self.worker.get("stand_in_body", 0.0) + self.worker.get("stand_in_head", 0.0)

    @property
    def total_cpu_s(self) -> float:
        return self.cpu_s + self.worker_cpu_s

    def split(self) -> dict[str, float]:
        """CPU seconds per part, each without the parts it calls (see the module docstring)."""
        w, d = self.worker, self.driver
        parts = {
            "read": d.get(stage_timers.READ_PART, 0.0),
            "tokenize": w["tokenize"],
            "windows": w["tokenize_windows"] - w["tokenize"],
            "batching": w["label_windows"] - w["label_positions"] - w["stand_in_body"],
            "labels": w["label_positions"] - w["stand_in_head"],
            "assemble_encode": w["label_unit"] - w["label_windows"],
            "planes_arrow": d["block_to_table"],
            "compress_write": d["parquet_write"] - d["block_to_table"],
            "fsync": d["fsync"],
            "sha256": d["sha256"],
            "commit_rest": d["commit"] - d["parquet_write"] - d["fsync"] - d["sha256"],
        }
        parts["other"] = self.total_cpu_s - self.stand_in_s - sum(parts.values())
        return parts

    @property
    def pipeline_cpu_s(self) -> float:
        return self.total_cpu_s - self.stand_in_s

    @property
    def host_cpu_s(self) -> float:
        return self.pipeline_cpu_s - self.split()["labels"]


def _sum_stats(cache: str) -> tuple[dict[str, float], float, float, int, int, int]:
    manifest = CacheReader(cache).manifest
    worker: dict[str, float] = {}
    forward = write = 0.0
    for shard in manifest.shards:
        for part, seconds in shard.stats["bench"].items():
            worker[part] = worker.get(part, 0.0) + seconds
        forward += shard.stats["forward_seconds"]
        write += shard.stats["write_seconds"]
    return worker, forward, write, manifest.total_tokens, len(manifest.shards), manifest.total_bytes


def timed_build(cfg: JobConfig, executor: Any, *, worker_cpu: Any = None) -> Run:
    """One build into a fresh cache; ``worker_cpu()``, when given, reads the workers' CPU seconds."""
    shutil.rmtree(cfg.cache, ignore_errors=True)
    driver0, _ = stage_timers.snapshot()
    workers0 = worker_cpu() if worker_cpu else 0.0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    build_cache(cfg, progress=False, executor=executor)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    workers = worker_cpu() - workers0 if worker_cpu else 0.0
    driver = stage_timers.delta(driver0, stage_timers.snapshot()[0])
    worker, forward, write, tokens, units, size = _sum_stats(cfg.cache)
    shutil.rmtree(cfg.cache, ignore_errors=True)
    return Run(wall_s=wall, cpu_s=cpu, tokens=tokens, units=units, bytes=size, worker=worker, driver=driver,
               forward_wall_s=forward, write_wall_s=write, worker_cpu_s=workers)


# ---------------------------------------------------------------- executors


def one_core() -> None:
    """This process on one CPU, with one thread for torch and Arrow."""
    if ALL_CPUS:
        os.sched_setaffinity(0, {ALL_CPUS[0]})
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)


def all_cores() -> None:
    if ALL_CPUS:
        os.sched_setaffinity(0, set(ALL_CPUS))


def measure_local(*, vocab: int, setting: str, assets: Assets, workdir: Path, args: argparse.Namespace) -> Run:
    """Best (lowest pipeline CPU) of ``--repeats`` builds on one core with the local executor."""
    one_core()
    model = assets.teachers[vocab]
    executor = LocalExecutor(task_fn=stage_timers.timed_label_work_unit)
    local = {"kind": "local"}
    build_cache(job_config(cache=workdir / "warm", corpus=assets.warmup, model=model, setting=setting,
                           executor=local, args=args), progress=False, executor=executor)
    shutil.rmtree(workdir / "warm", ignore_errors=True)
    cfg = job_config(cache=workdir / "cache", corpus=assets.corpora[vocab].path, model=model, setting=setting,
                     executor=local, args=args)
    runs = []
    for repeat in range(args.repeats):
        runs.append(timed_build(cfg, executor))
        log(f"  local {vocab} {setting} #{repeat + 1}: {runs[-1].wall_s:.1f} s wall, pipeline "
            f"{runs[-1].tokens / runs[-1].pipeline_cpu_s:,.0f} tok/s/core, host "
            f"{runs[-1].tokens / runs[-1].host_cpu_s:,.0f} tok/s/core")
    return min(runs, key=lambda r: r.pipeline_cpu_s)


def _worker_threads(n: int) -> None:
    """In a Dask worker: torch intra-op threads for unit tasks (read by ``unit_task`` per unit)."""
    os.environ[THREADS_ENV] = str(n)


def _process_cpu() -> float:
    return time.process_time()


def measure_dask(*, vocab: int, setting: str, workers: int, assets: Assets, workdir: Path,
                 args: argparse.Namespace) -> Run:
    """Best (lowest wall) of ``--repeats`` builds through ``DaskExecutor``'s own local cluster."""
    all_cores()
    model = assets.teachers[vocab]
    dask = {"kind": "dask", "n_workers": workers, "threads_per_worker": 1}
    cfg = job_config(cache=workdir / "cache", corpus=assets.corpora[vocab].path, model=model, setting=setting,
                     executor=dask, args=args)
    started = time.perf_counter()
    executor = DaskExecutor(cfg.executor, task_fn=stage_timers.timed_label_work_unit)
    try:
        client = executor.client
        client.run(_worker_threads, 1)
        client.run(teacher_in_process, cfg.teacher)
        build_cache(job_config(cache=workdir / "warm", corpus=assets.warmup, model=model, setting=setting,
                               executor=dask, args=args), progress=False, executor=executor)
        shutil.rmtree(workdir / "warm", ignore_errors=True)
        log(f"  dask x{workers}: cluster, teachers and warm-up {time.perf_counter() - started:.1f} s")

        def worker_cpu() -> float:
            return sum(client.run(_process_cpu).values())

        runs = []
        for repeat in range(args.repeats):
            runs.append(timed_build(cfg, executor, worker_cpu=worker_cpu))
            log(f"  dask x{workers} {vocab} {setting} #{repeat + 1}: {runs[-1].wall_s:.1f} s wall, "
                f"{runs[-1].tokens / runs[-1].wall_s:,.0f} tok/s")
    finally:
        executor.close()
    return min(runs, key=lambda r: r.wall_s)


# ---------------------------------------------------------------- report


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:,.0f}" if seconds > 0 else "-"


def _us(seconds: float, tokens: int) -> str:
    return f"{1e6 * seconds / tokens:.2f}"


def local_tables(results: dict[tuple[int, str], Run], args: argparse.Namespace) -> list[str]:
    lines = [
        "| vocab | soft labels | tokens | units | B/position | wall s | CPU s | stand-in CPU s "
        "| pipeline tok/s/core | host tok/s/core | host >= 250k? |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (vocab, setting), r in results.items():
        host = r.tokens / r.host_cpu_s
        lines.append(
            f"| {vocab:,} | {setting_label(setting, args)} | {r.tokens:,} | {r.units} | {r.bytes / r.tokens:.1f} "
            f"| {r.wall_s:.2f} | {r.cpu_s:.2f} | {r.stand_in_s:.2f} | {_rate(r.tokens, r.pipeline_cpu_s)} "
            f"| **{host:,.0f}** | {'yes' if host >= TARGET_TOKENS_S else 'no'} |")
    lines += ["", "CPU microseconds per token by part (share of the host side, i.e. without labels from logits):", ""]
    header = "| vocab | soft labels | " + " | ".join(label for label, _ in GROUPS) + " | host total |"
    lines += [header, "|---:|---|" + "---:|" * (len(GROUPS) + 1)]
    for (vocab, setting), r in results.items():
        split, host = r.split(), r.host_cpu_s
        cells = []
        for label, parts in GROUPS:
            seconds = sum(split[p] for p in parts)
            share = "" if label == "labels from logits" else f" ({seconds / host:.0%})"
            cells.append(_us(seconds, r.tokens) + share)
        lines.append(f"| {vocab:,} | {setting_label(setting, args)} | " + " | ".join(cells)
                     + f" | {_us(host, r.tokens)} |")
    lines += ["", "Every part (CPU microseconds per token; the library's own wall-clock statistics last):", ""]
    names = list(PART_LABELS)
    lines += ["| vocab | soft labels | " + " | ".join(PART_LABELS[n] for n in names)
              + " | stand-in | forward_seconds (wall) | write_seconds (wall) |",
              "|---:|---|" + "---:|" * (len(names) + 3)]
    for (vocab, setting), r in results.items():
        split = r.split()
        lines.append(f"| {vocab:,} | {setting_label(setting, args)} | "
                     + " | ".join(_us(split[n], r.tokens) for n in names)
                     + f" | {_us(r.stand_in_s, r.tokens)} | {r.forward_wall_s:.2f} s | {r.write_wall_s:.2f} s |")
    return lines


def dask_table(results: dict[tuple[int, str, int], Run], args: argparse.Namespace) -> list[str]:
    lines = ["| vocab | soft labels | workers | tokens | wall s | tokens/s | speed-up | driver CPU s "
             "| workers CPU s | of which stand-in | cores busy |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (vocab, setting, workers), r in results.items():
        base = results.get((vocab, setting, min(args.workers)))
        speedup = f"{base.wall_s / r.wall_s:.2f}x" if base else "-"
        lines.append(f"| {vocab:,} | {setting_label(setting, args)} | {workers} | {r.tokens:,} | {r.wall_s:.2f} "
                     f"| {_rate(r.tokens, r.wall_s)} | {speedup} | {r.cpu_s:.2f} | {r.worker_cpu_s:.2f} "
                     f"| {r.stand_in_s:.2f} | {r.total_cpu_s / r.wall_s:.2f} |")
    return lines


def verdict_lines(results: dict[tuple[int, str], Run], args: argparse.Namespace) -> list[str]:
    lines = []
    for (vocab, setting), r in results.items():
        split, host = r.split(), r.host_cpu_s
        host_parts = {label: sum(split[p] for p in parts) for label, parts in GROUPS if label != "labels from logits"}
        top = max(host_parts, key=host_parts.get)
        rate = r.tokens / host
        lines.append(f"- {vocab:,} / {setting_label(setting, args)}: host side {rate:,.0f} tokens/s per core, "
                     f"{'meets' if rate >= TARGET_TOKENS_S else 'misses'} the {TARGET_TOKENS_S:,} target; largest "
                     f"host part: {top} ({host_parts[top] / host:.0%}); labels from logits on the CPU "
                     f"{_rate(r.tokens, split['labels'])} tokens/s per core alone")
    return lines


def machine_lines(args: argparse.Namespace, load: tuple[list[float], list[float]]) -> list[str]:
    import datasets
    import distributed
    import tokenizers
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "datasets": datasets.__version__,
                "tokenizers": tokenizers.__version__, "pyarrow": pa.__version__,
                "distributed": distributed.__version__, "logitcache": logitcache.__version__}
    before, after = (", ".join(f"{x:.2f}" for x in values) for values in load)
    return [f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, CPU model {cpu_model()!r}, "
            f"{platform.system()} {platform.release()}; load average {before} at the start, {after} at the end",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]


def render(*, local: dict, dask: dict, assets: Assets, args: argparse.Namespace, command: str, seconds: float,
           load: tuple[list[float], list[float]]) -> str:
    corpora = "; ".join(f"{v:,} logits: {c.documents:,} documents, {c.tokens:,} tokens, "
                        f"{c.text_bytes / c.tokens:.2f} bytes per token" for v, c in assets.corpora.items())
    out = [f"Command: `{command}` ({seconds:.0f} s)", "", *machine_lines(args, load),
           f"- corpus (the expanded demo corpus, or its first documents): {corpora}",
           f"- tokenizer: byte-level BPE trained on the demo corpus, asked for {TOKENIZER_VOCAB:,} tokens, "
           f"reached {assets.tokenizer_size:,}; the stand-in's logits are wider",
           f"- windows {args.max_length}, teacher.batch_tokens {args.batch_tokens}, corpus.unit_documents "
           f"{args.unit_documents}, parquet / zstd 3; best of {args.repeats} builds after a warm-up", ""]
    if local:
        out += ["Local executor, one pinned core (pipeline: every part; host: without labels from logits):", "",
                *local_tables(local, args), "", *verdict_lines(local, args)]
    if dask:
        out += ["", "Dask executor, local cluster, 1 task thread and 1 torch thread per worker (best wall of "
                f"{args.repeats}); the driver unpinned:", "", *dask_table(dask, args)]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- main


_started = time.perf_counter()


def log(message: str) -> None:
    print(f"{time.perf_counter() - _started:7.1f}s {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--vocab", default="32000,151936", help="stand-in logits widths, comma-separated")
    parser.add_argument("--k", type=int, default=64, help="k of the top-k setting")
    parser.add_argument("--settings", default="top-64,default", help="soft-label settings: top-64, default")
    parser.add_argument("--tokens", type=int, default=200_000,
                        help="corpus tokens at 32k logits; wider vocabularies label its first documents, "
                        "as many logits in all (tokens x 32000 / vocab)")
    parser.add_argument("--workers", default="1,2", help="Dask worker processes to compare; none to skip")
    parser.add_argument("--scaling", default="32000:top-64",
                        help="vocab:setting pairs measured with Dask, comma-separated; all for every pair")
    parser.add_argument("--repeats", type=int, default=2, help="timed builds per measurement")
    parser.add_argument("--unit-documents", type=int, default=100, help="corpus.unit_documents")
    parser.add_argument("--max-length", type=int, default=512, help="windows.max_length")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="teacher.batch_tokens")
    parser.add_argument("--seed", type=int, default=0, help="corpus and stand-in seed")
    parser.add_argument("--workdir", metavar="DIR", help="keep assets here instead of a temporary directory")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 32k logits, 12k tokens, 1 repeat (numbers too small to quote)")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab, args.tokens, args.repeats, args.unit_documents = "32000", 12_000, 1, 10
    args.vocab = [int(v) for v in args.vocab.split(",") if v.strip()]
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if unknown := set(args.settings) - set(SETTINGS):
        parser.error(f"--settings: unknown {', '.join(sorted(unknown))}; use {', '.join(SETTINGS)}")
    args.workers = [] if args.workers == "none" else [int(w) for w in args.workers.split(",") if w.strip()]
    if args.scaling == "all":
        args.scaling = [(v, s) for v in args.vocab for s in args.settings]
    else:
        pairs = [p.split(":") for p in args.scaling.split(",") if p.strip()]
        args.scaling = [(int(v), s) for v, s in pairs if int(v) in args.vocab and s in args.settings]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stage_timers.install()
    load0 = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="bench_pipeline-") as tmp:
        workdir = Path(args.workdir or tmp)
        assets = make_assets(workdir, args)
        log(f"corpora: {[(v, c.tokens) for v, c in assets.corpora.items()]}; tokenizer {assets.tokenizer_size:,}")
        local: dict[tuple[int, str], Run] = {}
        for vocab in args.vocab:
            for setting in args.settings:
                local[vocab, setting] = measure_local(vocab=vocab, setting=setting, assets=assets,
                                                      workdir=workdir / "local", args=args)
        dask: dict[tuple[int, str, int], Run] = {}
        for vocab, setting in args.scaling:
            for workers in args.workers:
                dask[vocab, setting, workers] = measure_dask(vocab=vocab, setting=setting, workers=workers,
                                                             assets=assets, workdir=workdir / "dask", args=args)
        report = render(local=local, dask=dask, assets=assets, args=args,
                        command=command_line("bench_pipeline.py", argv), seconds=time.perf_counter() - _started,
                        load=(load0, list(os.getloadavg())))
    publish(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
