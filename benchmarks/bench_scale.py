"""Stage one on Dask: the executor's overhead per unit against the local executor, and the
throughput of 1 and 2 worker processes.

Three executors build the same corpus into a fresh cache, ``--repeats`` times each:

- **local**: ``LocalExecutor`` in this process, torch at ``--threads`` intra-op threads;
- **dask x1**: a ``LocalCluster`` of 1 worker process (1 task thread, ``--threads`` torch threads);
- **dask x2**: 2 worker processes (1 task thread and ``--threads // 2`` torch threads each).

Worker torch threads are set the way the executor's own local cluster sets them
(``LOGITCACHE_TORCH_THREADS`` in the workers' environment).

Before the clock starts, every executor has its cluster up and its teacher loaded in every
worker (``client.run(teacher_in_process, ...)``), and one warm-up build over a small corpus has
run; those one-time costs (cluster start, teacher load) are timed separately. A timed run is
one ``build_cache(cfg, executor=...)`` call: corpus streaming, unit fingerprints and skip
checks on the driver, the unit's documents shipped to a worker, windows + teacher forward
there, the records shipped back, and the driver's commit (encode, write, fsync, sha256,
manifest) on its background thread. Seconds are medians.

- **overhead per unit** = (dask x1 s - local s) / units, with the ``tiny`` teacher, whose
  forward costs almost nothing, so the difference is what Dask adds (scheduling, pickling,
  transfers) at the same compute;
- **throughput** (tokens/s) of each executor with the ``110m`` teacher (a random Llama, the
  one of ``bench_build.py``), where the forward dominates;
- the **driver's share** per unit (corpus streaming + commit), measured on the local runs from
  the shard's ``write_seconds`` and a separate timing of ``iter_work_units``: the work that does
  not spread over workers, hence the ceiling of what more workers can give.

Usage (from the repository root)::

    python benchmarks/bench_scale.py [--teachers tiny,110m] [--quick] [--out FILE.md]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench_build import build_big_teacher, synthetic_docs, write_jsonl  # noqa: E402
from machine import cpu_model  # noqa: E402
from publish import command_line, publish  # noqa: E402

import logitcache  # noqa: E402
from logitcache.config import JobConfig, config_from_dict  # noqa: E402
from logitcache.pipeline.capture.executor import DaskExecutor, LocalExecutor  # noqa: E402
from logitcache.pipeline.capture.unit_task import THREADS_ENV, teacher_in_process  # noqa: E402
from logitcache.pipeline.common.corpus import iter_work_units  # noqa: E402
from logitcache.stages.build_cache import build_cache  # noqa: E402
from logitcache.storage_schemas.shard_reader import CacheReader  # noqa: E402
from tests.fixtures_models import build_tiny_causal_lm, build_tiny_tokenizer  # noqa: E402

EXECUTORS = ("local", "dask x1", "dask x2")


@dataclass
class Run:
    teacher: str
    executor: str
    units: int
    tokens: int
    setup_seconds: float  # cluster start + teacher load on every worker
    seconds: list[float] = field(default_factory=list)
    write_seconds: float = 0.0  # driver commit time per unit (local runs)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.median


def job(cache: Path, corpus: Path, model: Path, args: argparse.Namespace, *, executor: str) -> JobConfig:
    return config_from_dict({
        "cache": str(cache),
        "corpus": {"data_files": [str(corpus)], "lang_column": "lang", "id_column": "id",
                   "unit_documents": args.unit_documents},
        "teacher": {"model": str(model), "batch_tokens": args.batch_tokens, "device": "cpu", "dtype": "float32"},
        "windows": {"max_length": args.max_length},
        "soft_labels": {"k": args.k, "values": "float16"},
        "executor": {"kind": "local" if executor == "local" else "dask"},
    })


def make_executor(name: str, cfg: JobConfig, threads: int):
    """The executor, with its cluster up and the teacher loaded everywhere; and the seconds that took."""
    started = time.perf_counter()
    if name == "local":
        torch.set_num_threads(threads)
        executor = LocalExecutor()
        teacher_in_process(cfg.teacher)
        return executor, time.perf_counter() - started
    from distributed import Client, LocalCluster

    workers = 1 if name == "dask x1" else 2
    per_worker = max(1, threads // workers)
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           scheduler_kwargs={"dashboard": False},
                           env={THREADS_ENV: per_worker})
    client = Client(cluster)
    client.run(teacher_in_process, cfg.teacher)
    executor = DaskExecutor(cfg.executor, client=client)
    executor.owned = (client, cluster)
    return executor, time.perf_counter() - started


def close(executor) -> None:
    for thing in getattr(executor, "owned", ()):
        thing.close()


def timed_build(cfg: JobConfig, executor) -> tuple[float, float, int]:
    """Seconds of one build into a fresh cache, the mean commit seconds per unit, and the tokens."""
    shutil.rmtree(cfg.cache, ignore_errors=True)
    started = time.perf_counter()
    build_cache(cfg, progress=False, executor=executor)
    seconds = time.perf_counter() - started
    manifest = CacheReader(cfg.cache).manifest
    write = statistics.fmean(s.stats["write_seconds"] for s in manifest.shards)
    shutil.rmtree(cfg.cache, ignore_errors=True)
    return seconds, write, manifest.total_tokens


def streaming_seconds_per_unit(cfg: JobConfig) -> float:
    started = time.perf_counter()
    units = sum(1 for _ in iter_work_units(cfg.corpus))
    return (time.perf_counter() - started) / units


def measure(teacher: str, model: Path, corpus: Path, warmup: Path, work: Path, args) -> tuple[list[Run], float]:
    runs = []
    stream = 0.0
    for name in EXECUTORS:
        cfg = job(work / "cache", corpus, model, args, executor=name)
        executor, setup = make_executor(name, cfg, args.threads)
        try:
            build_cache(job(work / "warm", warmup, model, args, executor=name), progress=False, executor=executor)
            shutil.rmtree(work / "warm", ignore_errors=True)
            units = sum(1 for _ in iter_work_units(cfg.corpus))
            run = Run(teacher=teacher, executor=name, units=units, tokens=0, setup_seconds=setup)
            for _ in range(args.repeats):
                seconds, run.write_seconds, run.tokens = timed_build(cfg, executor)
                run.seconds.append(seconds)
            if name == "local":
                stream = streaming_seconds_per_unit(cfg)
        finally:
            close(executor)
        runs.append(run)
        print(f"  {teacher} {name}: {run.median:.2f} s for {run.units} units ({run.tokens_per_second:,.0f} tok/s), "
              f"setup {setup:.1f} s", flush=True)
    return runs, stream


def render(results: dict[str, tuple[list[Run], float]], args, command: str, seconds: float) -> str:
    lines = ["| teacher | executor | units | tokens | setup s | build s (median) | tokens/s | vs local |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for runs, _stream in results.values():
        local = runs[0]
        for run in runs:
            lines.append(f"| {run.teacher} | {run.executor} | {run.units} | {run.tokens:,} | {run.setup_seconds:.1f} | "
                         f"{run.median:.2f} | {run.tokens_per_second:,.0f} | {local.median / run.median:.2f}x |")
    lines.append("")
    for teacher, (runs, stream) in results.items():
        local, one = runs[0], runs[1]
        overhead = (one.median - local.median) / one.units
        driver = stream + local.write_seconds
        lines.append(f"- {teacher}: Dask overhead per unit (dask x1 - local) = {overhead * 1000:.1f} ms; driver share per "
                     f"unit = {driver * 1000:.1f} ms (corpus streaming {stream * 1000:.1f} ms + commit "
                     f"{local.write_seconds * 1000:.1f} ms), so the driver alone caps a build at about "
                     f"{1 / driver:,.0f} units/s = {local.tokens / local.units / driver:,.0f} tokens/s at "
                     f"{local.tokens / local.units:,.0f} tokens per unit")
    versions = {"python": platform.python_version(), "torch": torch.__version__, "logitcache": logitcache.__version__}
    import distributed
    versions["distributed"] = distributed.__version__
    lines += ["", f"- command: `{command}` ({seconds:.0f} s)",
              f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, CPU model {cpu_model()!r}; "
              f"{args.threads} torch threads in all (local: {args.threads}; dask x1: {args.threads} in its worker; "
              f"dask x2: {max(1, args.threads // 2)} per worker); {args.repeats} repeats",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", default="tiny,110m")
    parser.add_argument("--tiny-tokens", type=int, default=60_000)
    parser.add_argument("--big-tokens", type=int, default=12_000)
    parser.add_argument("--unit-documents", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny teacher, small corpus, 1 repeat: a smoke run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.teachers, args.tiny_tokens, args.repeats = "tiny", 6_000, 1
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        tmp = Path(tmp)
        tokenizer_dir = build_tiny_tokenizer(tmp / "tokenizer")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        warmup = write_jsonl(tmp / "warmup.jsonl", synthetic_docs(tokenizer, 500, seed=1)[0])
        for teacher in args.teachers.split(","):
            if teacher == "tiny":
                model, tokens = build_tiny_causal_lm(tmp / "tiny", tokenizer_dir), args.tiny_tokens
            elif teacher == "110m":
                model, tokens = build_big_teacher(tmp / "110m", tokenizer_dir, args.max_length), args.big_tokens
            else:
                parser.error(f"unknown teacher {teacher!r} (tiny, 110m)")
            corpus = write_jsonl(tmp / f"corpus-{teacher}.jsonl", synthetic_docs(tokenizer, tokens, seed=0)[0])
            results[teacher] = measure(teacher, model, corpus, warmup, tmp / f"work-{teacher}", args)
    report = render(results, args, command_line("bench_scale.py", argv), time.perf_counter() - started)
    publish(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
