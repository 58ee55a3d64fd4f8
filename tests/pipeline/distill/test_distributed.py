"""The ranks of stage two: torchrun's environment, and the collectives on a real 2-process gloo group."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from logitcache.errors import ConfigError
from logitcache.pipeline.distill import distributed
from logitcache.pipeline.distill.distributed import data_parallel, rank_seed

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in _TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_without_torchrun_it_is_one_process_and_collectives_are_identities(no_torchrun):
    with data_parallel("cpu") as ranks:
        assert not dist.is_initialized()
        assert (ranks.rank, ranks.world_size, ranks.is_main, ranks.distributed) == (0, 1, True, False)
        assert ranks.sum_values([1, 2.5]) == [1.0, 2.5]
        assert ranks.any(True) and not ranks.any(False)
        assert ranks.gather_objects({"a": 1}) == [{"a": 1}]
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.full((3,), 2.0)
        assert ranks.sum_gradients([p], extras=[4]) == [4.0]
        assert torch.equal(p.grad, torch.full((3,), 2.0))
        ranks.barrier()


def test_world_size_one_is_one_process(no_torchrun):
    no_torchrun.setenv("WORLD_SIZE", "1")
    with data_parallel("cpu") as ranks:
        assert not ranks.distributed and not dist.is_initialized()


@pytest.mark.parametrize(("env", "message"), [
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK is not"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "MASTER_ADDR and MASTER_PORT"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, r"RANK=2 is not in \[0, WORLD_SIZE=2\)"),
    ({"WORLD_SIZE": "two"}, "not an integer"),
])
def test_a_half_set_environment_is_a_clear_error(no_torchrun, env, message):
    for name, value in env.items():
        no_torchrun.setenv(name, value)
    with pytest.raises(ConfigError, match=message), data_parallel("cpu"):
        pass
    assert not dist.is_initialized()


def test_rank_seeds_differ_between_ranks_and_resumes():
    seeds = {rank_seed(0, r, batches=b) for r in range(4) for b in (0, 9)}
    assert len(seeds) == 8 and rank_seed(0, 1) == rank_seed(0, 1, batches=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _collectives_on_rank(rank: int, port: int) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    distributed.BUCKET_ELEMENTS = 5  # several buckets, and one parameter larger than a bucket
    with data_parallel("cpu") as ranks:
        assert dist.is_initialized() and (ranks.rank, ranks.world_size) == (rank, 2)
        assert ranks.any(rank == 1) and not ranks.any(False)
        assert ranks.sum_values([rank, 0.5]) == [1.0, 1.0]
        assert ranks.gather_objects(f"r{rank}") == ["r0", "r1"]

        module = torch.nn.Module()
        module.weight = torch.nn.Parameter(torch.full((2, 4), float(rank)))  # 8 elements
        module.bias = torch.nn.Parameter(torch.zeros(3))
        module.extra = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        module.unused = torch.nn.Parameter(torch.zeros(2))
        module.register_buffer("steps", torch.tensor([rank + 7]))
        ranks.broadcast_module(module)
        assert torch.equal(module.weight.detach(), torch.zeros(2, 4)) and int(module.steps) == 7

        module.weight.grad = torch.arange(8.0).view(2, 4) * (rank + 1)
        module.bias.grad = torch.ones(3) if rank == 1 else None  # missing on rank 0: zeros
        module.extra.grad = torch.full((2,), 0.25 * (rank + 1), dtype=torch.float64)
        extras = ranks.sum_gradients(module.parameters(), extras=[rank + 1.0, 2.0])
        assert extras == [3.0, 4.0]
        assert torch.equal(module.weight.grad, torch.arange(8.0).view(2, 4) * 3)
        assert torch.equal(module.bias.grad, torch.ones(3))
        assert module.extra.grad.dtype == torch.float64 and torch.equal(module.extra.grad, torch.full((2,), 0.75,
                                                                                                    dtype=torch.float64))
        assert module.unused.grad is None  # missing on every rank: stays missing
        ranks.barrier()
    assert not dist.is_initialized()  # the group it made is destroyed


def test_collectives_on_two_gloo_ranks():
    mp.spawn(_collectives_on_rank, args=(_free_port(),), nprocs=2, join=True)
