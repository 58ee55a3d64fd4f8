"""Stage two's gradient sync across ranks: logitcache's explicit all-reduce against torch DDP.

Two processes (gloo on the CPU, ``--threads`` torch threads each) train the same random Llama
student for ``--steps`` optimizer steps of ``--accum`` micro-batches, with logitcache's loss
(``token_batch_loss``: the chunked head under activation checkpointing) scaled by each rank's
share of the union's labelled positions (``union_share``), gradient clipping and AdamW, as
``logitcache train`` does. Every arm starts from the same weights and reads the same batches
(synthetic top-k labels, different on each rank):

- **local**: no gradient sync (each rank steps on its own gradient): the compute floor;
- **logitcache**: ``Ranks.sum_gradients`` over all parameters after the last micro-batch
  (flattened buckets, one blocking all-reduce each): communication after the backward;
- **ddp**: ``DistributedDataParallel`` with bucketed all-reduce launched during the last
  micro-batch's backward (``no_sync`` for the others) and a comm hook that sums instead of
  averaging, so that it computes the same gradient as logitcache;
- **ddp+unused**: the same with ``find_unused_parameters=True``, which DDP needs as soon as the
  ranks' graphs may differ (a rank with nothing to learn runs a zero loss instead).

Reported per arm (rank 0, medians over the timed steps of all repeats): seconds per optimizer
step, the sync cost (the arm's step time minus local's at the same step, which ran next to
it: what communication adds that the backward does not hide), for logitcache the all-reduce
alone (``sum_gradients`` after a barrier, so without the wait for the slower rank), and the
largest absolute difference of the final weights between logitcache and each DDP arm and
between the two ranks. The arms run side by side: at every step each arm takes its optimizer
step, the order rotating from step to step, so that a slow moment of the machine falls on
every arm alike; the first step (warm-up) is not timed, and ``--repeats`` starts it all again
from the initial weights.

Usage (from the repository root)::

    python benchmarks/bench_ddp.py [--hidden 384] [--layers 6] [--vocab 16384] [--steps 16] [--accum 2] [--quick] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from machine import cpu_model  # noqa: E402

from logitcache.config import LossConfig, OptimizerConfig, StudentConfig, StudentModelConfig  # noqa: E402
from logitcache.pipeline.distill.collate import TokenBatch  # noqa: E402
from logitcache.pipeline.distill.distributed import Ranks  # noqa: E402
from logitcache.pipeline.distill.losses import IGNORE_INDEX  # noqa: E402
from logitcache.pipeline.distill.students import Student  # noqa: E402
from logitcache.pipeline.distill.training import make_optimizer, token_batch_loss, union_share  # noqa: E402

ARMS = ("local", "logitcache", "ddp", "ddp+unused")
WORLD = 2


@dataclass(frozen=True, kw_only=True)
class Setup:
    hidden: int
    layers: int
    vocab: int
    rows: int
    length: int
    k: int
    accum: int
    steps: int
    repeats: int
    threads: int
    chunk_tokens: int


def build_student(setup: Setup) -> Student:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=setup.hidden, intermediate_size=setup.hidden * 8 // 3,
                         num_hidden_layers=setup.layers, num_attention_heads=max(1, setup.hidden // 64),
                         vocab_size=setup.vocab, max_position_embeddings=setup.length, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    cfg = StudentConfig(name="bench", model=StudentModelConfig(config={"model_type": "llama"}),
                        loss=LossConfig(kind="forward_kl", alpha=0.5, chunk_tokens=setup.chunk_tokens))
    return Student(name="bench", cfg=cfg, model=model, tokenizer=None, task="causal_lm",
                   device=torch.device("cpu"), target_width=setup.vocab, pad_token_id=0)


def synthetic_batch(setup: Setup, *, seed: int) -> TokenBatch:
    """One record per row, every position but the last labelled, top-k over the full vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    rows, length, k = setup.rows, setup.length, setup.k
    input_ids = torch.randint(0, setup.vocab, (rows, length), generator=generator)
    label_mask = torch.ones(rows, length, dtype=torch.bool)
    label_mask[:, -1] = False
    hard = torch.full((rows, length), IGNORE_INDEX, dtype=torch.int64)
    hard[:, :-1] = input_ids[:, 1:]
    scores = torch.rand(rows, length, setup.vocab, generator=generator)
    topk_ids = scores.topk(k, dim=-1).indices  # k distinct ids per position
    kept = torch.softmax(torch.randn(rows, length, k, generator=generator), dim=-1) * 0.8  # 20% tail mass
    return TokenBatch(input_ids=input_ids, position_ids=torch.arange(length).expand(rows, length).contiguous(),
                      segment=torch.arange(rows, dtype=torch.int32)[:, None].expand(rows, length).contiguous(),
                      label_mask=label_mask, hard_targets=hard, topk_ids=topk_ids, topk_logprobs=kept.log(),
                      record_ids=torch.arange(rows).numpy().astype("uint64"), langs=["und"] * rows,
                      cursors=[(0, row, 0, 0) for row in range(rows)], tokens=rows * length)


class StudentLoss(torch.nn.Module):
    """The student's loss behind ``forward``, where DDP needs it."""

    def __init__(self, student: Student) -> None:
        super().__init__()
        self.model = student.model
        self._student = student

    def forward(self, batch: TokenBatch):
        return token_batch_loss(self._student, batch)


def sum_hook(group, bucket):
    """DDP's all-reduce without its division by the world size: the union's gradient is the
    sum of the ranks' shares."""
    return dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future().then(lambda f: f.value()[0])


def wrapped(arm: str, student: Student) -> torch.nn.Module:
    module = StudentLoss(student)
    if not arm.startswith("ddp"):
        return module
    from torch.nn.parallel import DistributedDataParallel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers, renamed in recent torch
        ddp = DistributedDataParallel(module, find_unused_parameters=arm == "ddp+unused", broadcast_buffers=False)
    ddp.register_comm_hook(None, sum_hook)
    return ddp


def micro_step(module: torch.nn.Module, batch: TokenBatch, *, ranks: Ranks, accum: int) -> None:
    """Forward, this rank's share of the union's loss, backward."""
    out = module(batch)
    kd_positions, ce_positions = ranks.sum_values([out.kd_positions, out.ce_positions])
    part = union_share(out, kd_positions=kd_positions, ce_positions=ce_positions, alpha=0.5)
    (part.total / accum).backward()


@dataclass(kw_only=True)
class Arm:
    """One arm's student, optimizer and (wrapped) loss module on this rank."""

    name: str
    student: Student
    optimizer: torch.optim.Optimizer
    module: torch.nn.Module
    step_seconds: list[float]
    sync_seconds: list[float]

    @classmethod
    def create(cls, name: str, *, setup: Setup, init: dict) -> Arm:
        student = build_student(setup)
        student.model.load_state_dict(init)
        optimizer = make_optimizer(student.model, OptimizerConfig(lr=1e-3, weight_decay=0.1))
        return cls(name=name, student=student, optimizer=optimizer, module=wrapped(name, student),
                   step_seconds=[], sync_seconds=[])

    def weights(self) -> dict:
        return {k: v.detach().clone() for k, v in self.student.model.state_dict().items()}


def optimizer_step(arm: Arm, micro_batches: list[TokenBatch], *, ranks: Ranks, accum: int) -> None:
    """One optimizer step of ``arm`` on this rank's micro-batches, timed from a barrier."""
    parameters = list(arm.student.model.parameters())
    dist.barrier()
    start = time.perf_counter()
    for index, batch in enumerate(micro_batches):
        if arm.name.startswith("ddp") and index < len(micro_batches) - 1:
            with arm.module.no_sync():
                micro_step(arm.module, batch, ranks=ranks, accum=accum)
        else:
            micro_step(arm.module, batch, ranks=ranks, accum=accum)
    synced = time.perf_counter()
    if arm.name == "logitcache":
        dist.barrier()  # the wait for the slower rank, which any sync has, apart from the all-reduce itself
        synced = time.perf_counter()
        ranks.sum_gradients(parameters)
    arm.sync_seconds.append(time.perf_counter() - synced)
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    arm.optimizer.step()
    arm.optimizer.zero_grad(set_to_none=True)
    arm.step_seconds.append(time.perf_counter() - start)


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def across_ranks(weights: dict) -> float:
    """Largest |rank 0 - rank 1| over the weights (on every rank)."""
    worst = torch.zeros((), dtype=torch.float64)
    for tensor in weights.values():
        theirs = tensor.clone()
        dist.broadcast(theirs, src=0)
        worst = torch.maximum(worst, (tensor - theirs).abs().max().double())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def rank_main(rank: int, setup: Setup, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(setup.threads)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    ranks = Ranks(rank=rank, world_size=WORLD, device=torch.device("cpu"), comm_device=torch.device("cpu"))
    init = build_student(setup).model.state_dict()
    batches = [[synthetic_batch(setup, seed=(rank * 1000 + step) * 100 + micro) for micro in range(setup.accum)]
               for step in range(setup.steps + 1)]
    times = {arm: [] for arm in ARMS}
    syncs = {arm: [] for arm in ARMS}
    weights = {}
    for _ in range(setup.repeats):
        arms = [Arm.create(name, setup=setup, init=init) for name in ARMS]
        for step, micro_batches in enumerate(batches):
            for arm in arms[step % len(arms):] + arms[:step % len(arms)]:  # each arm first in turn
                optimizer_step(arm, micro_batches, ranks=ranks, accum=setup.accum)
        for arm in arms:
            times[arm.name] += arm.step_seconds[1:]  # the first step warms up
            syncs[arm.name] += arm.sync_seconds[1:]
            weights[arm.name] = arm.weights()
    spread = {arm: across_ranks(weights[arm]) for arm in ARMS}
    if rank == 0:
        queue.put({"times": times, "syncs": syncs, "spread": spread,
                   "vs_logitcache": {arm: max_difference(weights[arm], weights["logitcache"]) for arm in ARMS},
                   "parameters": sum(v.numel() for v in init.values())})
    dist.destroy_process_group()


def measure(setup: Setup) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(rank_main, args=(setup, port, queue), nprocs=WORLD, join=True, start_method="spawn")
    return queue.get()


def report(setup: Setup, result: dict, *, seconds: float, load: tuple[float, float]) -> str:
    times = result["times"]
    lines = [f"student: Llama, hidden {setup.hidden}, {setup.layers} layers, vocab {setup.vocab:,}, "
             f"{result['parameters'] / 1e6:.1f} M parameters ({result['parameters'] * 4 / 2**20:.0f} MiB of float32 "
             f"gradients); {WORLD} ranks x {setup.accum} micro-batches of {setup.rows} x {setup.length} tokens per step, "
             f"top-{setup.k}, chunk_tokens {setup.chunk_tokens}; {setup.steps} timed steps x {setup.repeats} repeats; "
             f"{setup.threads} torch thread(s) per rank",
             f"machine: {cpu_model()}, {os.cpu_count()} CPUs; Python {platform.python_version()}, torch {torch.__version__}; "
             f"{seconds:.0f} s in all; 1-minute load average {load[0]:.1f} before, {load[1]:.1f} after", "",
             "| arm | s / step | min - max s | sync cost s / step | sync share | all-reduce s "
             "| max abs diff vs logitcache | max abs diff between ranks |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arm in ARMS:
        step = statistics.median(times[arm])
        # paired: the arm's step minus local's step of the same step index, which ran next to it
        cost = statistics.median(a - b for a, b in zip(times[arm], times["local"], strict=True))
        inside = f"{statistics.median(result['syncs'][arm]):.3f}" if arm == "logitcache" else "-"
        diff = "-" if arm == "local" else f"{result['vs_logitcache'][arm]:.1e}"
        lines.append(f"| {arm} | {step:.3f} | {min(times[arm]):.2f} - {max(times[arm]):.2f} | {cost:+.3f} | "
                     f"{cost / step:.1%} | {inside} | {diff} | {result['spread'][arm]:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="a tiny student and 2 steps: a smoke run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.vocab, args.length, args.steps, args.repeats = 64, 2, 1024, 64, 2, 1
    setup = Setup(hidden=args.hidden, layers=args.layers, vocab=args.vocab, rows=args.rows, length=args.length,
                  k=args.k, accum=args.accum, steps=args.steps, repeats=args.repeats, threads=args.threads,
                  chunk_tokens=args.chunk_tokens)
    started, load = time.perf_counter(), os.getloadavg()[0]
    result = measure(setup)
    text = report(setup, result, seconds=time.perf_counter() - started, load=(load, os.getloadavg()[0]))
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
