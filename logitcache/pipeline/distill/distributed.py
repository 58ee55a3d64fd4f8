"""Stage two across ranks: the process group torchrun sets up, and the few collectives training needs.

``torchrun --nproc_per_node=N -m logitcache train CONFIG`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT`` in their environment.
:func:`data_parallel` joins them into one process group (gloo on the CPU; nccl on CUDA,
each rank on ``cuda:LOCAL_RANK``) and hands out a :class:`Ranks`, the only door to it.
Without those variables (or with ``WORLD_SIZE=1``) it is a single process: every
collective of :class:`Ranks` is then the identity and nothing is initialised.

Why not ``DistributedDataParallel``. Gradients are summed over ranks explicitly, once per
optimizer step, by :meth:`Ranks.sum_gradients` (flattened into buckets of one dtype, one
all-reduce per bucket). The explicit sum

- is exact: each rank scales its loss by its share of the labelled positions of all ranks'
  batches together (see ``StudentRun``), so the summed gradient is the gradient of the union
  batch, what one process would compute on the ranks' batches concatenated;
- leaves accumulation local: pending gradients stay ordinary ``.grad`` tensors, which a
  checkpoint can sum onto rank 0 and any world size can resume from;
- tolerates a rank with nothing to add (its stream ran dry, a classification student found
  no text in its batch): that rank adds zeros, and no rank waits on a collective the others
  skip, because every rank makes the same calls in the same order;
- leaves a gradient that no rank computed missing, as one process would, so AdamW skips it.

DDP (the loss behind a wrapper's ``forward``, ``no_sync`` for accumulation, a comm hook that
sums) computes the same weights, but only with a stand-in zero loss on every rank that has
nothing to learn, ``find_unused_parameters=True`` because the ranks' graphs then differ,
buffer syncing off (its collectives inside ``forward`` would not pair up when a dry rank
skips a micro-batch), gradients cleared by hand after a step without any loss, and this
explicit sum still for checkpoints; and it keeps a bucket copy of every gradient per student.
What it would add, the all-reduce overlapping the backward, gained nothing measurable on
the CPU (``benchmarks/bench_ddp.py``; docs/scale.md says what changes on GPUs).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from logitcache.errors import ConfigError
from logitcache.pipeline.common.hf_models import resolve_device

#: Elements per all-reduce of flattened gradients (64 MiB of float32).
BUCKET_ELEMENTS = 1 << 24
#: How long a rank waits in a collective before the run fails. Longer than torch's defaults
#: (10 minutes for nccl): the other ranks wait while rank 0 evaluates or writes a checkpoint.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=1)
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True, kw_only=True)
class Ranks:
    """This process's place among the ranks of a run, and the collectives between them."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device  # where this rank trains
    comm_device: torch.device | None = None  # where collective tensors live (None: single process)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, evaluates and writes checkpoints and final models."""
        return self.rank == 0

    def sum_values(self, values: Sequence[float]) -> list[float]:
        """Each value summed over ranks (float64)."""
        if not self.distributed:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on at least one rank."""
        return self.sum_values([1.0 if flag else 0.0])[0] > 0

    def sum_gradients(self, parameters: Iterable[Tensor], *, extras: Sequence[float] = ()) -> list[float]:
        """Replace every parameter's ``.grad`` by its sum over ranks, and return ``extras``
        summed over ranks. A missing gradient counts as zeros; one missing on every rank
        stays missing (so the optimizer skips that parameter, as it would in one process)."""
        params = [p for p in parameters if p.requires_grad]
        if not self.distributed:
            return [float(v) for v in extras]
        present = self.sum_values([float(p.grad is not None) for p in params] + [float(v) for v in extras])
        summed = [p for p, count in zip(params, present, strict=False) if count > 0]
        for bucket in _buckets(summed):
            flat = torch.cat([_grad_or_zeros(p).reshape(-1) for p in bucket]).to(self.comm_device)
            dist.all_reduce(flat)
            offset = 0
            for p in bucket:
                p.grad = flat[offset:offset + p.numel()].view(p.shape).to(p.device)
                offset += p.numel()
        return present[len(params):]

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers."""
        if not self.distributed:
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def rank_seed(seed: int, rank: int, *, batches: int = 0) -> int:
    """Seed of one rank's torch RNG (dropout): stable, different between ranks."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0rank{rank}\0{batches}".encode()).digest()[:8], "little")


@contextlib.contextmanager
def data_parallel(device_name: str) -> Iterator[Ranks]:
    """The ranks of this run: joined from torchrun's environment (and the group destroyed on
    exit), or a single process. ``device_name`` is ``train.device``; under torchrun a CUDA
    device becomes ``cuda:LOCAL_RANK``. A process group that the caller initialised already
    is used as it is and left alone."""
    environment = {name: os.environ.get(name) for name in _ENV}
    joined = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if joined else _env_int(environment, "WORLD_SIZE", default=1)
    if world <= 1:
        yield Ranks(device=resolve_device(device_name))
        return
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={world} asks for {world} ranks, but this torch build has no "
                          "torch.distributed; install a torch with distributed support")
    rank = dist.get_rank() if joined else _env_int(environment, "RANK", default=None)
    local_rank = _env_int(environment, "LOCAL_RANK", default=0 if joined else None)
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is not in [0, WORLD_SIZE={world}); start stage two with torchrun")
    device = _rank_device(resolve_device(device_name), local_rank=local_rank, world=world)
    if not joined:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise ConfigError(f"WORLD_SIZE={world} is set but {' and '.join(missing)} {verb} not; start stage two "
                              "with torchrun (e.g. torchrun --nproc_per_node=2 -m logitcache train CONFIG)")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=PROCESS_GROUP_TIMEOUT)
    comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    try:
        yield Ranks(rank=rank, world_size=world, local_rank=local_rank, device=device, comm_device=comm_device)
    finally:
        if not joined and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(environment: dict[str, str | None], name: str, *, default: int | None) -> int:
    value = environment.get(name)
    if value is None or value == "":
        if default is None:
            raise ConfigError(f"WORLD_SIZE is set but {name} is not; start stage two with torchrun "
                              "(e.g. torchrun --nproc_per_node=2 -m logitcache train CONFIG)")
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"the environment variable {name}={value!r} is not an integer") from None


def _rank_device(device: torch.device, *, local_rank: int, world: int) -> torch.device:
    """A CUDA device per rank: ``cuda:LOCAL_RANK``; the CPU is shared."""
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ConfigError(f"train.device: {device} names one GPU, but torchrun started {world} ranks, each "
                          "on its own GPU (cuda:LOCAL_RANK); use auto or cuda")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(f"LOCAL_RANK={local_rank} but this machine has {count} GPU(s); start at most "
                          f"{count} processes per node (torchrun --nproc_per_node={count})")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _grad_or_zeros(parameter: Tensor) -> Tensor:
    return torch.zeros_like(parameter) if parameter.grad is None else parameter.grad


def _buckets(parameters: list[Tensor]) -> Iterator[list[Tensor]]:
    """Runs of parameters of one dtype and device, each about BUCKET_ELEMENTS at most."""
    bucket: list[Tensor] = []
    size = 0
    for p in parameters:
        fits = bucket and (p.dtype, p.device) == (bucket[0].dtype, bucket[0].device)
        if bucket and (not fits or size + p.numel() > BUCKET_ELEMENTS):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket
