"""Stage-one overhead: ``build_cache`` wall time over a bare teacher forward on the same batches.

For each teacher this measures:

- **build s**: one ``build_cache(config, progress=False)`` call, timed as a whole, into a fresh
  cache: teacher load, corpus streaming through ``datasets``, tokenisation and windowing, the
  forward with the chunked LM head + float32 log-softmax / top-k / entropy, record assembly,
  encoding and writing on the background committer thread, manifest statistics;
- **bare fwd s**: the same teacher (``load_teacher``, same config) over the same windows in the
  same batches (the build runs with ``teacher.packing: off``, one padded window per row;
  ``bench_packing.py`` measures packed rows), recreated exactly as the build makes them (``iter_work_units`` ->
  ``make_windows`` -> ``plan_batches`` -> ``collate`` with the pad id ``label_unit`` uses, one
  unit at a time); only ``teacher.model(input_ids=..., attention_mask=..., use_cache=False)``
  under ``torch.inference_mode()`` is timed (``use_cache=False`` as the build's forward). The
  batch tensors are on the device before the clock starts; on CUDA the device is synchronised
  before each clock read. The plain forward runs the LM head over every position, padding
  included, and keeps the full ``[B, L, V]`` logits; the build runs the head only over
  labelled positions;
- **overhead** = build s / bare fwd s, against the targets (<= 1.10 on CPU, <= 1.05 on GPU);
- where the build's time goes: ``BuildSummary.forward_seconds`` (``label_unit``'s batch loop:
  collate, body + head, log-softmax / top-k / entropy, copy to host) and the rest of the call;
  plus, timed separately on the main thread with the same calls, the teacher load, the corpus
  streaming (``iter_work_units``) and tokenisation + windowing (``make_windows``).
  ``--profile`` also runs one more build per teacher under cProfile (main thread only) and
  prints the cumulative time of the stage's parts.

Warm-up: before the timed runs, one build over a 4-document corpus (imports, kernels, the
process's memo of the teacher's weight hash) and one untimed bare batch. Builds and bare
forwards then alternate ``--repeats`` times; seconds are medians, and the overhead is the
median of the per-repetition ratios (each build paired with the bare forward right after it,
which cancels most of the slow drift of a shared machine). The plain forward also runs the LM
head over padding positions, which the build skips; the report estimates that part (head
seconds per position, timed alone, x padding positions) and gives the overhead without it too.

Teachers, built from ``tests/fixtures_models.py`` assets into a temporary directory:

- ``tiny``: ``build_tiny_causal_lm`` (Llama, hidden 32, 2 layers, vocab 400). Its forward costs
  almost nothing, so its overhead is the pipeline's own per-token cost, not a target number;
- ``110m``: a randomly initialised Llama, hidden 768, 12 layers, 12 heads, intermediate 2048,
  vocab 32000, tied embeddings (109.5M parameters), with the tiny tokenizer (400 tokens; the
  model's vocabulary only has to be at least as large). ``build_tiny_causal_lm`` cannot take
  shape overrides (its shape keys and ``**config`` collide in ``AutoConfig.for_model``), so this
  one is made here the same way: ``from_config`` + ``save_pretrained`` next to the tokenizer.

Corpus: a synthetic multilingual JSON Lines file: each document joins 1..16 (log-uniform)
``multilingual_texts()`` documents of one language, drawn with a seeded RNG, until the corpus
holds the requested number of tokens (``--tiny-tokens``, ``--big-tokens``). Torch threads are
set explicitly (``--threads``, default 2).

Usage (from the repository root)::

    python benchmarks/bench_build.py [--teachers tiny,110m] [--profile DIR] [--quick] [--out FILE.md]
    python benchmarks/bench_build.py --device cuda --dtype bfloat16 --batch-tokens 16384 --unit-documents 1000 --tiny-tokens 2000000 --big-tokens 2000000
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse  # noqa: E402
import cProfile  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/bench_build.py` puts benchmarks/ first
    sys.path.insert(0, str(ROOT))

from machine import cpu_model  # noqa: E402

import logitcache  # noqa: E402
from logitcache.config import JobConfig, config_from_dict  # noqa: E402
from logitcache.pipeline.capture.batches import collate, plan_batches  # noqa: E402
from logitcache.pipeline.capture.teacher import Teacher, load_teacher  # noqa: E402
from logitcache.pipeline.common.corpus import iter_work_units  # noqa: E402
from logitcache.pipeline.common.windows import make_windows  # noqa: E402
from logitcache.stages.build_cache import BuildSummary, build_cache  # noqa: E402
from tests.fixtures_models import (  # noqa: E402
    build_tiny_causal_lm,
    build_tiny_tokenizer,
    multilingual_texts,
)

TARGETS = {"cpu": 1.10, "cuda": 1.05}
BIG_SHAPE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "num_key_value_heads": 12, "intermediate_size": 2048, "vocab_size": 32000}
MAX_PIECES = 16  # a synthetic document joins 1..MAX_PIECES source texts


# ---------------------------------------------------------------- assets


def build_big_teacher(out_dir: Path, tokenizer_dir: Path, max_length: int, seed: int = 0) -> Path:
    """The ~110M Llama of the module docstring, randomly initialised, saved with the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        "llama", **BIG_SHAPE, max_position_embeddings=max(512, max_length), tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def synthetic_docs(tokenizer, target_tokens: int, seed: int) -> tuple[list[dict], int]:
    """Documents of 1..MAX_PIECES same-language texts until ``target_tokens`` (as tokenised)."""
    rng = random.Random(seed)
    by_lang: dict[str, list[str]] = {}
    for doc in multilingual_texts():
        by_lang.setdefault(doc["lang"], []).append(doc["text"])
    langs = sorted(by_lang)
    docs, total = [], 0
    while total < target_tokens:
        lang = rng.choice(langs)
        pieces = round(math.exp(rng.uniform(0.0, math.log(MAX_PIECES))))
        text = " ".join(rng.choice(by_lang[lang]) for _ in range(pieces))
        docs.append({"id": f"{lang}-{len(docs):06d}", "text": text, "lang": lang})
        total += len(tokenizer(text)["input_ids"])
    return docs, total


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as stream:
        for doc in docs:
            stream.write(json.dumps(doc, ensure_ascii=False) + "\n")
    return path


def job_config(cache: Path, corpus: Path, model: Path, args: argparse.Namespace) -> JobConfig:
    return config_from_dict({
        "cache": str(cache),
        "corpus": {"data_files": [str(corpus)], "lang_column": "lang", "id_column": "id",
                   "unit_documents": args.unit_documents},
        # padded rows, so that the bare forward can run the build's batches as plain forwards
        "teacher": {"model": str(model), "batch_tokens": args.batch_tokens, "device": args.device,
                    "dtype": args.dtype, "packing": "off"},
        "windows": {"max_length": args.max_length, "stride": args.stride},
        "soft_labels": {"k": args.k, "values": args.values},
    })


# ---------------------------------------------------------------- measurements


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Plan:
    """The build's batches, recreated, and what recreating them cost (main thread)."""

    batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    units: int = 0
    windows: int = 0
    num_batches: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    corpus_s: float = 0.0
    windows_s: float = 0.0
    collate_s: float = 0.0


def plan_like_build(cfg: JobConfig, teacher: Teacher) -> Plan:
    """Units, windows and batches exactly as ``build_cache`` / ``label_unit`` make them."""
    plan = Plan()
    started = time.perf_counter()
    units = list(iter_work_units(cfg.corpus))
    plan.corpus_s = time.perf_counter() - started
    for unit in units:
        started = time.perf_counter()
        windows, _ = make_windows(unit.documents, teacher.tokenizer, cfg.windows, task=teacher.task)
        plan.windows_s += time.perf_counter() - started
        plan.units += 1
        plan.windows += len(windows)
        started = time.perf_counter()
        lengths = np.array([len(w.input_ids) for w in windows], dtype=np.int64)
        for indices in plan_batches(lengths, batch_tokens=cfg.teacher.batch_tokens):
            batch = collate(windows, indices, pad_id=teacher.pad_token_id)
            plan.tokens += batch.real_tokens
            plan.padded_tokens += batch.padded_tokens
            plan.batches.append((batch.input_ids.to(teacher.device), batch.attention_mask.to(teacher.device)))
            plan.num_batches += 1
        plan.collate_s += time.perf_counter() - started
    return plan


@torch.inference_mode()
def bare_forward(teacher: Teacher, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    synchronize(teacher.device)
    started = time.perf_counter()
    for input_ids, attention_mask in batches:
        output = teacher.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        del output
    synchronize(teacher.device)
    return time.perf_counter() - started


@torch.inference_mode()
def head_seconds_per_position(teacher: Teacher, rows: int, repeats: int = 3) -> float:
    """Seconds per position of the LM head alone (fresh output each call, as in a forward)."""
    head = teacher.model.get_output_embeddings()
    hidden = torch.randn(rows, head.weight.shape[1], device=teacher.device, dtype=teacher.dtype)
    head(hidden)
    times = []
    for _ in range(repeats):
        synchronize(teacher.device)
        started = time.perf_counter()
        head(hidden)
        synchronize(teacher.device)
        times.append(time.perf_counter() - started)
    return statistics.median(times) / rows


def timed_build(cfg: JobConfig) -> tuple[float, BuildSummary]:
    shutil.rmtree(cfg.cache, ignore_errors=True)
    started = time.perf_counter()
    summary = build_cache(cfg, progress=False)
    seconds = time.perf_counter() - started
    shutil.rmtree(cfg.cache, ignore_errors=True)
    return seconds, summary


# cProfile entries (file suffix or "~" for builtins, function name substring) -> label
PROFILE_PARTS = [
    ("build_cache.py", "build_cache", "build_cache (whole call)"),
    ("teacher.py", "load_teacher", "load_teacher"),
    ("teacher.py", "check_split_head", "  of which check_split_head"),
    ("corpus.py", "iter_work_units", "corpus streaming (iter_work_units)"),
    ("corpus.py", "_dataset_rows", "  of which datasets rows"),
    ("corpus.py", "_fingerprint", "  of which unit fingerprints"),
    ("windows.py", "make_windows", "make_windows"),
    ("windows.py", "tokenize", "  of which tokenizer"),
    ("unit_labeler.py", "label_unit", "label_unit"),
    ("batches.py", "collate", "  collate"),
    ("teacher.py", "hidden_states", "  body forward (hidden_states)"),
    ("teacher.py", "head", "  LM head (head)"),
    ("~", "torch.log_softmax", "  log_softmax"),
    ("~", "torch.topk", "  topk"),
    ("soft_labels.py", "_entropy", "  entropy"),
    ("unit_labeler.py", "_assemble", "  _assemble"),
    ("unit_labeler.py", "_entropy_stats", "  _entropy_stats"),
    ("committer.py", "submit", "committer.submit (waits for the previous unit)"),
    ("committer.py", "close", "committer.close (waits for the last unit)"),
    ("shard_writer.py", "__init__", "ShardWriter open"),
    ("shard_writer.py", "update_stats", "manifest update_stats"),
    ("build_cache.py", "_manifest_stats", "_manifest_stats"),
]


def profile_build(cfg: JobConfig, path: Path) -> list[tuple[str, float, int]]:
    shutil.rmtree(cfg.cache, ignore_errors=True)
    profiler = cProfile.Profile()
    profiler.enable()
    build_cache(cfg, progress=False)
    profiler.disable()
    shutil.rmtree(cfg.cache, ignore_errors=True)
    profiler.dump_stats(str(path))
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    rows = []
    for suffix, name, label in PROFILE_PARTS:
        cum, calls = 0.0, 0
        for (filename, _, func), (_, ncalls, _, cumtime, _) in stats.items():
            builtin = suffix == "~" and filename == "~" and name in func
            if builtin or (suffix != "~" and filename.endswith(suffix) and func == name):
                cum, calls = cum + cumtime, calls + ncalls
        rows.append((label, cum, calls))
    return rows


@dataclass
class Result:
    teacher: str
    params: int
    device: str
    dtype: str
    corpus_docs: int
    plan: Plan
    summary: BuildSummary
    build_s: list[float]
    bare_s: list[float]
    forward_s: list[float]
    load_s: float
    pad_head_s: float  # estimated LM-head time of the bare forward on padding positions
    profile: list[tuple[str, float, int]] | None = None

    @property
    def build(self) -> float:
        return statistics.median(self.build_s)

    @property
    def bare(self) -> float:
        return statistics.median(self.bare_s)

    @property
    def forward(self) -> float:
        return statistics.median(self.forward_s)

    @property
    def forward_minus_bare(self) -> float:
        """Median over repetitions of forward seconds minus the paired bare forward."""
        return statistics.median(f - b for f, b in zip(self.forward_s, self.bare_s, strict=True))

    @property
    def rest(self) -> float:
        """Median over repetitions of build seconds minus that build's forward seconds."""
        return statistics.median(b - f for b, f in zip(self.build_s, self.forward_s, strict=True))

    @property
    def overhead(self) -> float:
        """Median of the per-repetition ratios (each build is paired with the bare forward after it)."""
        return statistics.median(b / f for b, f in zip(self.build_s, self.bare_s, strict=True))

    @property
    def overhead_no_pad(self) -> float:
        return statistics.median(b / (f - self.pad_head_s) for b, f in zip(self.build_s, self.bare_s, strict=True))


def measure(name: str, model_dir: Path, corpus: Path, warmup_corpus: Path, workdir: Path,
            docs: int, args: argparse.Namespace, log) -> Result:
    cfg = job_config(workdir / f"cache-{name}", corpus, model_dir, args)
    log(f"[{name}] warm-up build ({warmup_corpus.name})")
    timed_build(job_config(workdir / f"cache-{name}-warmup", warmup_corpus, model_dir, args))

    started = time.perf_counter()
    teacher = load_teacher(cfg.teacher)
    load_s = time.perf_counter() - started
    plan = plan_like_build(cfg, teacher)
    params = teacher.model.num_parameters()
    log(f"[{name}] {params / 1e6:.1f}M params, {plan.tokens:,} tokens, {plan.windows} windows, "
        f"{plan.num_batches} batches, {plan.units} units; warm-up bare batch")
    bare_forward(teacher, plan.batches[:1])

    build_s, bare_s, forward_s = [], [], []
    summary = BuildSummary(cache=cfg.cache)
    for rep in range(args.repeats):
        seconds, summary = timed_build(cfg)
        if (summary.tokens, summary.padded_tokens) != (plan.tokens, plan.padded_tokens):
            raise SystemExit(f"[{name}] the recreated batches differ from the build's: build "
                             f"{summary.tokens}/{summary.padded_tokens} tokens/padded, bare "
                             f"{plan.tokens}/{plan.padded_tokens}")
        build_s.append(seconds)
        forward_s.append(summary.forward_seconds)
        bare_s.append(bare_forward(teacher, plan.batches))
        log(f"[{name}] repeat {rep + 1}/{args.repeats}: build {seconds:.2f} s (forward "
            f"{summary.forward_seconds:.2f} s), bare forward {bare_s[-1]:.2f} s, "
            f"overhead {seconds / bare_s[-1]:.3f}")
    pad_head_s = head_seconds_per_position(teacher, min(args.batch_tokens, 4096)) * (
        plan.padded_tokens - plan.tokens)
    result = Result(teacher=name, params=params, device=str(teacher.device),
                    dtype=str(teacher.dtype).removeprefix("torch."), corpus_docs=docs, plan=plan,
                    summary=summary, build_s=build_s, bare_s=bare_s, forward_s=forward_s, load_s=load_s,
                    pad_head_s=pad_head_s)
    del teacher, plan.batches[:]
    if args.profile:
        log(f"[{name}] profiled build")
        result.profile = profile_build(cfg, Path(args.profile) / f"build-{name}.prof")
    return result


# ---------------------------------------------------------------- report


def machine_lines(args: argparse.Namespace) -> list[str]:
    import datasets
    import tokenizers
    import transformers

    device = f"device {args.device}"
    if args.device.startswith("cuda") and torch.cuda.is_available():
        device += f" ({torch.cuda.get_device_name(torch.device(args.device))})"
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "datasets": datasets.__version__,
                "tokenizers": tokenizers.__version__, "logitcache": logitcache.__version__}
    return [
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, CPU model {cpu_model()!r}, "
        f"{platform.system()} {platform.release()}; {device}; "
        f"torch.set_num_threads({args.threads}) (torch reports {torch.get_num_threads()} intra-op threads)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
    ]


def render(results: list[Result], args: argparse.Namespace, command: str, seconds: float) -> str:
    target_key = "cuda" if args.device.startswith("cuda") else "cpu"
    target = TARGETS[target_key]
    out = [
        f"Command: `{command}`",
        "",
        *machine_lines(args),
        f"- settings: k={args.k}, values {args.values}, windows max_length {args.max_length} "
        f"stride {args.stride}, teacher.batch_tokens {args.batch_tokens}, corpus.unit_documents "
        f"{args.unit_documents}, parquet/zstd (defaults); {args.repeats} alternating build / "
        "bare-forward repetition(s) after a warm-up: seconds are medians, *overhead* is the median "
        f"of the per-repetition ratios build / bare; whole benchmark {seconds:.0f} s",
        "",
        "| teacher | params | dtype | docs | units | windows | batches | tokens | padding "
        "| build s | bare fwd s | overhead | build tok/s | bare tok/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        p = r.plan
        out.append(
            f"| {r.teacher} | {r.params / 1e6:.2f}M | {r.dtype} | {r.corpus_docs} | {p.units} "
            f"| {p.windows} | {p.num_batches} | {p.tokens:,} "
            f"| {r.summary.padding_fraction:.1%} | {r.build:.2f} | {r.bare:.2f} | **{r.overhead:.3f}** "
            f"| {p.tokens / r.build:,.0f} | {p.tokens / r.bare:,.0f} |")
    out += [
        "",
        "Where the build's time goes (seconds, medians): *forward* = `BuildSummary.forward_seconds` "
        "(collate, body + LM head over labelled positions only, log-softmax / top-k / entropy, "
        "copy to host); *forward - bare* = what that loop costs beyond the plain forward (median "
        "of the per-repetition differences); *rest* = build minus its forward (likewise). *load*, *corpus* and *tokenize + windows* are the same calls "
        "timed on their own on the main thread, outside the build (one run each): teacher load, "
        "`iter_work_units` (datasets streaming, documents, fingerprints), `make_windows` "
        "(tokenizer + windows); they are part of *rest*. The plain forward also runs the LM head "
        "over padding positions, which the build skips: *bare head on padding* estimates that "
        "(head seconds per position, timed alone, x padding positions), and the last column is "
        "the overhead against a bare forward without it.",
        "",
        "| teacher | build s | forward s | forward - bare s | rest s | rest % of build "
        "| load s | corpus s | tokenize + windows s | bare head on padding s | overhead w/o padding head |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        out.append(
            f"| {r.teacher} | {r.build:.2f} | {r.forward:.2f} | {r.forward_minus_bare:+.2f} "
            f"| {r.rest:.2f} | {r.rest / r.build:.1%} | {r.load_s:.2f} | {r.plan.corpus_s:.2f} "
            f"| {r.plan.windows_s:.2f} | {r.pad_head_s:.2f} | {r.overhead_no_pad:.3f} |")
    for r in results:
        if r.profile is None:
            continue
        out += ["", f"cProfile of one more build, teacher {r.teacher} (main thread; cumulative "
                "seconds; the committer thread shows only as the main thread's waits):", "",
                "| part | cumulative s | calls |", "|---|---:|---:|"]
        out += [f"| {label} | {cum:.2f} | {calls} |" for label, cum, calls in r.profile]
    out += ["", f"Against the target (overhead <= {target:.2f} on {target_key.upper()}):", ""]
    for r in results:
        verdict = "meets" if r.overhead <= target else "misses"
        note = (" (a teacher this small measures the pipeline's own cost per token; the target "
                "is meant for real teachers)" if r.params < 10_000_000 else "")
        out.append(f"- {r.teacher}: overhead {r.overhead:.3f}, {verdict} the target{note}; "
                   "individual repetitions " + ", ".join(
                       f"{b / f:.3f}" for b, f in zip(r.build_s, r.bare_s, strict=True))
                   + f"; {r.overhead_no_pad:.3f} against the bare forward without its LM head "
                   "on padding positions.")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--teachers", default="tiny,110m", help="comma-separated: tiny, 110m")
    parser.add_argument("--tiny-tokens", type=int, default=200_000, help="corpus tokens for the tiny teacher")
    parser.add_argument("--big-tokens", type=int, default=16_000, help="corpus tokens for the 110M teacher")
    parser.add_argument("--k", type=int, default=64, help="soft_labels.k")
    parser.add_argument("--values", default="float16", help="soft_labels.values (value codec)")
    parser.add_argument("--max-length", type=int, default=512, help="windows.max_length")
    parser.add_argument("--stride", type=int, default=0, help="windows.stride")
    parser.add_argument("--batch-tokens", type=int, default=4096,
                        help="teacher.batch_tokens (the library default is 16384; on 2 CPU cores "
                        "larger batches gain nothing and pad more on a corpus this small)")
    parser.add_argument("--unit-documents", type=int, default=32, help="corpus.unit_documents")
    parser.add_argument("--device", default="cpu", help="teacher.device (cpu, cuda, cuda:N)")
    parser.add_argument("--dtype", default="auto", help="teacher.dtype (auto, float32, bfloat16, float16)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=3, help="alternating build / bare repetitions")
    parser.add_argument("--seed", type=int, default=0, help="corpus RNG seed")
    parser.add_argument("--profile", metavar="DIR", help="also profile one build per teacher with "
                        "cProfile, writing DIR/build-<teacher>.prof")
    parser.add_argument("--workdir", metavar="DIR", help="keep assets here instead of a temporary directory")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 20k / 1.5k tokens, 1 repetition (numbers too small to quote)")
    parser.add_argument("--out", metavar="FILE", help="also write the markdown report here")
    args = parser.parse_args(argv)
    if args.quick:
        args.tiny_tokens, args.big_tokens, args.repeats = 20_000, 1_500, 1
    teachers = [t.strip() for t in args.teachers.split(",") if t.strip()]
    if unknown := set(teachers) - {"tiny", "110m"}:
        parser.error(f"--teachers: unknown {', '.join(sorted(unknown))}; use tiny and/or 110m")
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_build.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"{time.perf_counter() - started:7.1f}s {message}", file=sys.stderr, flush=True)

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="bench_build-") as tmp:
        workdir = Path(args.workdir or tmp)
        tokenizer_dir = build_tiny_tokenizer(workdir / "tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        results = []
        for name in teachers:
            if name == "tiny":
                model_dir = build_tiny_causal_lm(workdir / "teacher-tiny", tokenizer_dir)
                target_tokens = args.tiny_tokens
            else:
                model_dir = build_big_teacher(workdir / "teacher-110m", tokenizer_dir, args.max_length)
                target_tokens = args.big_tokens
            docs, tokens = synthetic_docs(tokenizer, target_tokens, args.seed)
            corpus = write_jsonl(workdir / f"corpus-{name}" / "corpus.jsonl", docs)
            warmup = write_jsonl(workdir / f"corpus-{name}-warmup" / "warmup.jsonl", docs[:4])
            log(f"[{name}] corpus: {len(docs)} documents, {tokens:,} tokens")
            results.append(measure(name, model_dir, corpus, warmup, workdir, len(docs), args, log))
        report = render(results, args, command, time.perf_counter() - started)
    print(report)
    if args.out:
        Path(args.out).write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
