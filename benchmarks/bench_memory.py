"""Peak memory of stage one and of stage two's reader at 1x and 10x corpus size.

Stage one streams the corpus as work units and keeps at most one labelled unit waiting for
the writer, so its peak memory should depend on the unit size, not on the corpus size.
Stage two's reader holds one shuffle window (about ``shuffle_buffer`` records) plus the
blocks it is decoding, so its peak should follow ``shuffle_buffer``, not the cache size.

Each measurement runs in a fresh Python process, and the peak resident set size comes from
the kernel (``os.wait4`` rusage ``ru_maxrss``) when that process ends:

- **build**: ``logitcache build`` of a synthetic multilingual corpus (``bench_build.py``'s
  generator), with the tiny teacher of the tests, ``--unit-documents`` documents per unit;
- **read**: one epoch of ``PackedBatches(CacheDataset(cache, shuffle_buffer=B), TokenPacker)``
  in process, for each ``B`` of ``--buffers``.

Its baseline is a process that only imports the same modules (torch, transformers,
logitcache), so *+MB* is what the work itself adds.

Usage (from the repository root)::

    python benchmarks/bench_memory.py [--tokens 100000] [--scale 10] [--out FILE.md]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench_build import synthetic_docs, write_jsonl  # noqa: E402
from machine import cpu_model  # noqa: E402
from publish import command_line, publish  # noqa: E402

from tests.fixtures_models import build_tiny_causal_lm, build_tiny_tokenizer  # noqa: E402

REPORT_PEAK = ("import atexit, resource, sys\n"
               "atexit.register(lambda: print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
               "file=sys.stderr, flush=True))\n")
BUILD = "import sys\nfrom logitcache.cli import main\nmain(args=sys.argv[1:], prog_name='logitcache')\n"
IMPORTS = "import torch, transformers, logitcache.cli, logitcache.pipeline.distill.dataset, logitcache.pipeline.distill.collate"
READ = """
import sys
from logitcache.pipeline.distill.collate import PackedBatches, TokenPacker, rows_for
from logitcache.pipeline.distill.dataset import CacheDataset
from logitcache.storage_schemas.shard_reader import CacheReader
dataset = CacheDataset(sys.argv[1], seed=0, epochs=1, shuffle_buffer=int(sys.argv[2]))
manifest = CacheReader(sys.argv[1]).manifest
packer = TokenPacker(manifest.layout, rows=rows_for(16384, 256), length=256, pad_id=0)
tokens = sum(int(b.label_mask.sum()) for b in PackedBatches(dataset, packer))
print(tokens)
"""


def peak_mb(code: str, args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(peak RSS in MB, seconds, stdout) of ``python -c code args``; the child reports its own
    ``ru_maxrss`` (RUSAGE_SELF: every thread of the process) when it exits."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", REPORT_PEAK + code, *args], capture_output=True, text=True, env=env)
    peaks = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("MAXRSS ")]
    if done.returncode != 0 or not peaks:
        raise RuntimeError(f"{code[:60]!r} {args} failed:\n{done.stderr[-3000:]}")
    return int(peaks[-1]) / 1024, time.perf_counter() - started, done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000, help="tokens of the 1x corpus")
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--unit-documents", type=int, default=64)
    parser.add_argument("--buffers", default="1024,8192")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    buffers = [int(b) for b in args.buffers.split(",")]
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        tmp = Path(tmp)
        tokenizer_dir = build_tiny_tokenizer(tmp / "tokenizer")
        model = build_tiny_causal_lm(tmp / "teacher", tokenizer_dir)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        docs, _ = synthetic_docs(tokenizer, args.tokens * args.scale, seed=0)
        sizes = {"1x": None, f"{args.scale}x": None}
        one_x = []
        total = 0
        for doc in docs:  # the 1x corpus is the first tenth (by tokens) of the 10x one
            one_x.append(doc)
            total += len(tokenizer(doc["text"])["input_ids"])
            if total >= args.tokens:
                break
        sizes["1x"], sizes[f"{args.scale}x"] = one_x, docs
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        baseline, _, _ = peak_mb(IMPORTS, [], env)
        for name, corpus_docs in sizes.items():
            corpus = write_jsonl(tmp / name / "corpus.jsonl", corpus_docs)
            config = tmp / name / "job.yaml"
            config.write_text(yaml.safe_dump({
                "cache": str(tmp / name / "cache"),
                "corpus": {"data_files": [str(corpus)], "lang_column": "lang", "id_column": "id",
                           "unit_documents": args.unit_documents},
                "teacher": {"model": str(model), "batch_tokens": 4096, "device": "cpu", "dtype": "float32"},
                "windows": {"max_length": 256},
                "soft_labels": {"k": 32, "values": "float16"},
            }))
            build_mb, build_s, _ = peak_mb(BUILD, ["build", "--no-progress", str(config)], env)
            manifest = json.loads((tmp / name / "cache" / "manifest.json").read_text())
            units = len(manifest["shards"])
            tokens = sum(s["tokens"] for s in manifest["shards"])
            reads = []
            for buffer in buffers:
                read_mb, read_s, out = peak_mb(READ, [str(tmp / name / "cache"), str(buffer)], env)
                reads.append((buffer, read_mb, read_s, int(out.strip())))
            rows.append((name, tokens, units, build_mb, build_s, reads))
            print(f"  {name}: {tokens:,} tokens in {units} units: build peak {build_mb:.0f} MB ({build_s:.1f} s); "
                  + "; ".join(f"read buffer {b}: {m:.0f} MB" for b, m, _, _ in reads), flush=True)

    head = "| corpus | tokens | units | build peak MB (+MB) | " + " | ".join(
        f"read peak MB, buffer {b} (+MB)" for b in buffers) + " |"
    lines = [head, "|---|---:|---:|---:|" + "---:|" * len(buffers)]
    for name, tokens, units, build_mb, _, reads in rows:
        lines.append(f"| {name} | {tokens:,} | {units} | {build_mb:.0f} (+{build_mb - baseline:.0f}) | "
                     + " | ".join(f"{m:.0f} (+{m - baseline:.0f})" for _, m, _, _ in reads) + " |")
    command = command_line("bench_memory.py", argv)
    lines += ["", f"- baseline (a process that only imports torch, transformers, logitcache): {baseline:.0f} MB",
              f"- command: `{command.strip()}` ({time.perf_counter() - started:.0f} s)",
              f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, CPU model {cpu_model()!r}, "
              f"Python {platform.python_version()}; unit of {args.unit_documents} documents, windows of 256, top-32 float16"]
    report = "\n".join(lines) + "\n"
    publish(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
