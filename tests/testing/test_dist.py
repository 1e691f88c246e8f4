"""Tests for the multi-rank gloo harness in ``fxpar.testing.dist``."""

from __future__ import annotations

import importlib.util
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import fxpar.testing.dist as harness
from fxpar.testing.dist import RankError, RankPool, rank_pool, run_ranks


# Functions run on the ranks: module level so they pickle by reference.
def _rank_info(tag: str, *, suffix: str = "") -> tuple[str, int, int]:
    return tag + suffix, dist.get_rank(), dist.get_world_size()


def _all_reduce_rank() -> torch.Tensor:
    t = torch.tensor([dist.get_rank() + 1.0, 1.0])
    dist.all_reduce(t)
    return t


def _raise_on_rank1() -> int:
    if dist.get_rank() == 1:
        raise ValueError("bad value on purpose")
    return dist.get_rank()


def _all_reduce_on_rank0_only() -> int:
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))
    return dist.get_rank()


def _raise_on_rank1_others_all_reduce() -> int:
    if dist.get_rank() == 1:
        raise KeyError("rank 1 never joins")
    dist.all_reduce(torch.ones(1))
    return dist.get_rank()


def _exit_on_rank1() -> int:
    if dist.get_rank() == 1:
        os._exit(3)
    return dist.get_rank()


def _mesh_all_reduce(
    shape: tuple[int, ...], names: tuple[str, ...], over: str
) -> tuple[list[int], torch.Tensor]:
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t, group=mesh.get_group(over))
    return list(mesh.get_coordinate()), t


def _num_threads() -> int:
    return torch.get_num_threads()


def _return_local_lambda():
    return lambda: None


def _expect_ok(pool: RankPool) -> None:
    n = pool.world_size
    for t in pool.run(_all_reduce_rank):
        assert torch.equal(t, torch.tensor([n * (n + 1) / 2, float(n)]))


def test_results_ordered_by_rank() -> None:
    pool = rank_pool(4)
    assert pool.run(_rank_info, "x", suffix="!") == [("x!", r, 4) for r in range(4)]


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_reduce_sum(world_size: int) -> None:
    results = rank_pool(world_size).run(_all_reduce_rank)
    assert len(results) == world_size
    assert all(type(t) is torch.Tensor for t in results)
    _expect_ok(rank_pool(world_size))


def test_rank_error_names_rank_type_and_traceback() -> None:
    pool = rank_pool(2)
    with pytest.raises(RankError) as info:
        pool.run(_raise_on_rank1)
    msg = str(info.value)
    assert "rank 1" in msg and "ValueError" in msg and "bad value on purpose" in msg
    assert "Traceback (most recent call last)" in msg and "_raise_on_rank1" in msg
    assert info.value.failed_ranks == [1] and info.value.missing_ranks == []
    _expect_ok(pool)


def test_mismatched_collective_fails_at_timeout() -> None:
    pool = rank_pool(2)
    start = time.perf_counter()
    with pytest.raises(RankError, match="rank 0") as info:
        pool.run(_all_reduce_on_rank0_only, timeout=2)
    assert 1.5 < time.perf_counter() - start < 15
    assert info.value.failed_ranks == [0]
    _expect_ok(pool)


def test_ranks_stuck_after_a_failure_are_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "FAILURE_GRACE", 0.2)
    pool = rank_pool(4)
    start = time.perf_counter()
    with pytest.raises(RankError, match="KeyError") as info:
        pool.run(_raise_on_rank1_others_all_reduce)  # the others would wait 60 s
    assert time.perf_counter() - start < 10
    assert info.value.failed_ranks == [1] and info.value.missing_ranks == [0, 2, 3]
    _expect_ok(pool)


def test_driver_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "DEADLINE_GRACE", 0.2)
    pool = rank_pool(2)
    start = time.perf_counter()
    with pytest.raises(RankError, match="timed out") as info:
        pool.run(time.sleep, 60, timeout=0.3)
    assert time.perf_counter() - start < 10
    assert info.value.missing_ranks == [0, 1]
    _expect_ok(pool)


def test_dead_rank_is_reported() -> None:
    pool = rank_pool(2)
    with pytest.raises(RankError, match="exit code 3") as info:
        pool.run(_exit_on_rank1)
    assert info.value.failed_ranks == [1]
    _expect_ok(pool)


def test_unpicklable_result_is_a_rank_error() -> None:
    pool = rank_pool(2)
    with pytest.raises(RankError, match="(?i)pickle"):
        pool.run(_return_local_lambda)
    _expect_ok(pool)


def test_device_mesh_2x2_and_other_meshes_on_consecutive_runs() -> None:
    pool = rank_pool(4)
    for _ in range(2):
        results = pool.run(_mesh_all_reduce, (2, 2), ("dp", "tp"), "tp")
        assert [coord for coord, _ in results] == [[0, 0], [0, 1], [1, 0], [1, 1]]
        # tp groups are the rows [0, 1] and [2, 3]
        assert [t.item() for _, t in results] == [1.0, 1.0, 5.0, 5.0]
        results = pool.run(_mesh_all_reduce, (2, 2), ("dp", "tp"), "dp")  # dp: columns
        assert [t.item() for _, t in results] == [2.0, 4.0, 2.0, 4.0]
        results = pool.run(_mesh_all_reduce, (1, 4), ("pp", "tp"), "tp")
        assert [t.item() for _, t in results] == [6.0] * 4
        results = pool.run(_mesh_all_reduce, (4,), ("world",), "world")
        assert [t.item() for _, t in results] == [6.0] * 4


def test_own_pool_threads_and_close() -> None:
    with RankPool(2, threads_per_rank=2) as pool:
        assert pool.run(_num_threads) == [2, 2]
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(_num_threads)
    pool.close()  # idempotent


def test_run_ranks_one_shot() -> None:
    assert run_ranks(_rank_info, 3, "y") == [("y", r, 3) for r in range(3)]


def _has_modules(names: list[str]) -> list[bool]:
    return [name in sys.modules for name in names]


def test_fresh_ranks_start_with_the_preloaded_modules() -> None:
    names = ["torch._functorch.partitioners", "networkx"]  # the harness's own preload: fxpar's capture
    if importlib.util.find_spec("transformers") is not None:
        names.append("transformers.models.gpt2.modeling_gpt2")  # tests/conftest.py's preload
    with RankPool(2) as pool:  # fresh ranks that have run nothing yet
        assert pool.run(_has_modules, names) == [[True] * len(names)] * 2
    with pytest.raises(RuntimeError, match="call it first"):  # the forkserver already runs
        harness.preload("json")
