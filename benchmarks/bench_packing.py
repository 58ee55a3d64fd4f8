"""Stage one with packed rows against padded rows: padding and tokens/s, same corpora, same teacher.

For each corpus, ``build_cache`` runs with ``teacher.packing: auto`` (the windows of several
documents share a row; the teacher is probed first) and with ``teacher.packing: off`` (one
window per row, padded), ``--repeats`` times each, alternating, after one warm-up build per
corpus. Reported per corpus and mode: the padding fraction (``1 - tokens / padded_tokens``
over the build's forward batches), the number of batches, the whole build's tokens/s (by wall
time, and by the process's CPU time) and the forward loop's (``BuildSummary.forward_seconds``),
best of the repetitions; and how far the
packed build's labels are from the padded one's (top-k ids of each position, max |log-prob|
difference): they differ by float rounding only.

Corpora:

- ``demo``: the shipped sample corpus (``logitcache/data/demo_corpus``, both files) with the
  settings of ``logitcache run``'s embedded job: windows of 128, ``teacher.batch_tokens``
  4096, ``corpus.unit_documents`` 200;
- ``skewed``: ``--skewed-docs`` documents, each one text of the demo corpus, except every
  50th, which joins 40 of them (about 1,550 tokens, four windows of 512): many short
  documents and a few long ones; windows of 512, ``teacher.batch_tokens`` 4096, units of 500.

Teacher: a randomly initialised Llama (hidden ``--hidden``, ``--layers`` layers, 4 heads,
intermediate 688) with a byte-level BPE tokenizer of 2,000 tokens trained on the demo corpus,
both built from ``tests/fixtures_models.py`` into a temporary directory. Soft labels: top-8
with entropy, float32 values (so the two modes' labels can be compared exactly). Torch
threads are set explicitly (``--threads``, default 2).

Usage (from the repository root)::

    python benchmarks/bench_packing.py [--repeats 3] [--corpora demo,skewed] [--quick] [--out FILE.md]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/bench_packing.py` puts benchmarks/ first
    sys.path.insert(0, str(ROOT))

from machine import cpu_model  # noqa: E402

from logitcache.config import JobConfig, config_from_dict  # noqa: E402
from logitcache.stages.build_cache import build_cache  # noqa: E402
from logitcache.stages.run_job import demo_corpus_dir  # noqa: E402
from logitcache.storage_schemas.records import RecordBlock  # noqa: E402
from logitcache.storage_schemas.shard_reader import CacheReader  # noqa: E402
from tests.fixtures_models import build_tiny_causal_lm, build_tiny_tokenizer  # noqa: E402

MODES = ("auto", "off")
LONG_EVERY, LONG_PIECES = 50, 40  # the skewed corpus: every 50th document joins 40 texts


@dataclass(frozen=True)
class Corpus:
    name: str
    files: list[str]
    max_length: int
    batch_tokens: int
    unit_documents: int


@dataclass
class Run:
    """The best of one corpus and mode's repetitions."""

    corpus: str
    mode: str
    tokens: int = 0
    padding: float = 0.0
    batches: int = 0
    packing: str = ""
    build_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    forward_s: list[float] = field(default_factory=list)

    @property
    def build_tps(self) -> float:
        return self.tokens / min(self.build_s)

    @property
    def forward_tps(self) -> float:
        return self.tokens / min(self.forward_s)

    @property
    def cpu_tps(self) -> float:
        return self.tokens / min(self.cpu_s)


def demo_texts() -> list[str]:
    return [json.loads(line)["text"] for path in sorted(Path(demo_corpus_dir()).glob("*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_skewed(path: Path, docs: int, seed: int) -> Path:
    """Short documents (one demo text each) and, every LONG_EVERY-th, a long one."""
    rng = random.Random(seed)
    texts = demo_texts()
    with open(path, "w", encoding="utf-8") as stream:
        for i in range(docs):
            pieces = LONG_PIECES if i % LONG_EVERY == 0 else 1
            text = " ".join(rng.choice(texts) for _ in range(pieces))
            stream.write(json.dumps({"id": f"doc-{i:06d}", "text": text, "lang": "und"}, ensure_ascii=False) + "\n")
    return path


def job(cache: Path, corpus: Corpus, model: Path, mode: str) -> JobConfig:
    return config_from_dict({
        "cache": str(cache),
        "corpus": {"data_files": corpus.files, "id_column": "id", "lang_column": "lang",
                   "unit_documents": corpus.unit_documents},
        "teacher": {"model": str(model), "batch_tokens": corpus.batch_tokens, "packing": mode, "device": "cpu"},
        "windows": {"max_length": corpus.max_length},
        "soft_labels": {"mode": "topk", "k": 8, "values": "float32", "entropy": True},
    })


def records(cache: Path) -> RecordBlock:
    reader = CacheReader(str(cache))
    return RecordBlock.concat([reader.read_shard(entry) for entry in reader.shards])


def build_once(cfg: JobConfig, run: Run) -> RecordBlock:
    shutil.rmtree(cfg.cache, ignore_errors=True)
    started, cpu = time.perf_counter(), time.process_time()
    summary = build_cache(cfg, progress=False)
    run.build_s.append(time.perf_counter() - started)
    run.cpu_s.append(time.process_time() - cpu)
    run.forward_s.append(summary.forward_seconds)
    run.tokens, run.padding = summary.tokens, summary.padding_fraction
    shards = CacheReader(str(cfg.cache)).shards
    run.batches = sum(entry.stats["batches"] for entry in shards)
    run.packing = ", ".join(sorted({entry.stats.get("packing", "padded") for entry in shards}))
    block = records(Path(cfg.cache))
    shutil.rmtree(cfg.cache, ignore_errors=True)
    return block


def label_gap(packed: RecordBlock, padded: RecordBlock) -> tuple[float, float]:
    """Share of positions whose top-k ids agree, and the max |log-prob| gap where they do."""
    assert packed.record_id.tolist() == padded.record_id.tolist(), "record order differs"
    same = (packed.topk_ids == padded.topk_ids).all(axis=1)
    gap = np.abs(packed.topk_logprobs[same].astype(np.float64) - padded.topk_logprobs[same]).max()
    return float(same.mean()), float(gap)


def measure(corpus: Corpus, model: Path, workdir: Path, repeats: int, log) -> tuple[list[Run], tuple]:
    runs = {mode: Run(corpus=corpus.name, mode=mode) for mode in MODES}
    log(f"[{corpus.name}] warm-up build")
    build_once(job(workdir / "warmup", corpus, model, "auto"), Run(corpus.name, "auto"))
    blocks = {}
    for rep in range(repeats):
        for mode in MODES:
            blocks[mode] = build_once(job(workdir / f"cache-{mode}", corpus, model, mode), runs[mode])
            log(f"[{corpus.name}] {mode} {rep + 1}/{repeats}: {runs[mode].build_s[-1]:.2f} s, "
                f"padding {runs[mode].padding:.2%}, {runs[mode].batches} batches")
    return list(runs.values()), label_gap(blocks["auto"], blocks["off"])


def render(results: list[tuple[Corpus, list[Run], tuple]], args, command: str, params: int, seconds: float) -> str:
    import transformers

    out = [
        f"Command: `{command}`",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, CPU model {cpu_model()!r}, "
        f"{platform.system()} {platform.release()}; torch.set_num_threads({args.threads}); "
        f"torch {torch.__version__}, transformers {transformers.__version__}",
        f"- teacher: random Llama, hidden {args.hidden}, {args.layers} layers, vocab 2000, "
        f"{params / 1e6:.2f}M parameters, float32, sdpa; top-8 + entropy, float32 values; "
        f"best of {args.repeats} alternating builds per mode; whole benchmark {seconds:.0f} s",
        "",
        "| corpus | windows, batch tokens, unit docs | packing | rows | tokens | padding | batches "
        "| build tok/s | tok per CPU-s | forward tok/s | build s (best) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for corpus, runs, _ in results:
        for r in runs:
            out.append(f"| {corpus.name} | {corpus.max_length}, {corpus.batch_tokens}, {corpus.unit_documents} "
                       f"| {r.mode} | {r.packing} | {r.tokens:,} | {r.padding:.2%} | {r.batches} "
                       f"| {r.build_tps:,.0f} | {r.cpu_tps:,.0f} | {r.forward_tps:,.0f} | {min(r.build_s):.2f} |")
    out += ["", "Packed against padded labels (float rounding only):", ""]
    for corpus, runs, (agree, gap) in results:
        by_mode = {r.mode: r for r in runs}
        speedup = by_mode["auto"].build_tps / by_mode["off"].build_tps
        cpu_speedup = by_mode["auto"].cpu_tps / by_mode["off"].cpu_tps
        out.append(f"- {corpus.name}: top-8 ids equal at {agree:.4%} of positions, max |log-prob| gap "
                   f"{gap:.1e} there; with packing, build tokens/s x{speedup:.2f}, per CPU-second x{cpu_speedup:.2f}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="teacher hidden size")
    parser.add_argument("--layers", type=int, default=4, help="teacher layers")
    parser.add_argument("--skewed-docs", type=int, default=1200, help="documents of the skewed corpus")
    parser.add_argument("--repeats", type=int, default=3, help="builds per corpus and mode (best is kept)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0, help="skewed corpus RNG seed")
    parser.add_argument("--corpora", default="demo,skewed", help="comma-separated: demo, skewed")
    parser.add_argument("--quick", action="store_true", help="smoke run: 600 skewed docs, 1 repetition")
    parser.add_argument("--out", metavar="FILE", help="also write the markdown report here")
    args = parser.parse_args(argv)
    if args.quick:
        args.skewed_docs, args.repeats = 600, 1
    torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_packing.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"{time.perf_counter() - started:7.1f}s {message}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
        workdir = Path(tmp)
        tokenizer = build_tiny_tokenizer(workdir / "tokenizer", vocab_size=2000, texts=demo_texts())
        model = build_tiny_causal_lm(workdir / "teacher", tokenizer, hidden_size=args.hidden,
                                     num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                                     intermediate_size=688)
        params = _parameters(model)
        corpora = [
            Corpus("demo", [str(p) for p in sorted(Path(demo_corpus_dir()).glob("*.jsonl"))], 128, 4096, 200),
            Corpus("skewed", [str(write_skewed(workdir / "skewed.jsonl", args.skewed_docs, args.seed))], 512, 4096, 500),
        ]
        wanted = {name.strip() for name in args.corpora.split(",")}
        results = []
        for corpus in [c for c in corpora if c.name in wanted]:
            runs, gap = measure(corpus, model, workdir, args.repeats, log)
            results.append((corpus, runs, gap))
    report = render(results, args, command, params, time.perf_counter() - started)
    print(report)
    if args.out:
        Path(args.out).write_text(report, encoding="utf-8")
    return 0


def _parameters(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).num_parameters()


if __name__ == "__main__":
    raise SystemExit(main())
