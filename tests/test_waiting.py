"""Polled waits on gloo (fxpar.ops.waiting): the same bits as torch's blocking functional collectives, a bounded
poll, c10d's errors passed on, and polling only where each local rank has a core."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

import fxpar
from fxpar.ops import waiting
from fxpar.testing import rank_pool
from tests.models import BlockStack, MLPStack, mse


class _Work:
    """A Work that never reports completion (gloo's reduce-scatter Work does this); `wait` counts its calls."""

    def __init__(self, error: Exception | None = None) -> None:
        self.waits, self.checks, self.error = 0, 0, error

    def is_completed(self) -> bool:
        self.checks += 1
        return False

    def wait(self) -> bool:
        self.waits += 1
        if self.error is not None:
            raise self.error
        return True


def test_poll_is_bounded_then_blocks(monkeypatch):
    monkeypatch.setenv(waiting.SPIN_ENV, "5")
    monkeypatch.setattr(waiting, "_host_has_a_free_core", lambda: True)
    work = _Work()
    t0 = time.perf_counter()
    waiting.poll(work)
    took = time.perf_counter() - t0
    assert work.waits == 1 and work.checks > 1  # polled, then c10d's wait once
    assert took >= 0.005  # the whole 5 ms budget was polled (no upper wall bound: timing is not asserted)


def test_busy_host_blocks_at_once(monkeypatch):
    monkeypatch.setenv(waiting.SPIN_ENV, "50")
    monkeypatch.setattr(waiting, "_host_has_a_free_core", lambda: False)
    work = _Work()
    waiting.poll(work)
    assert (work.checks, work.waits) == (1, 1)  # one completion check, then c10d's wait: no polling


def test_free_core_reads_the_runnable_count():
    assert isinstance(waiting._host_has_a_free_core(), bool)
    if os.path.exists("/proc/loadavg"):
        running = int(open("/proc/loadavg").read().split()[3].split("/")[0])
        assert running >= 1 and waiting._loadavg and waiting._loadavg[0] >= 0


def test_poll_passes_on_the_collectives_error(monkeypatch):
    monkeypatch.setenv(waiting.SPIN_ENV, "1")
    work = _Work(RuntimeError("[../third_party/gloo/...] Timed out waiting 1000ms for recv operation"))
    with pytest.raises(RuntimeError, match="Timed out"):
        waiting.poll(work)


@pytest.mark.parametrize("raw, seconds", [(None, 0.0), ("0", 0.0), ("2.5", 0.0025), ("junk", 0.0), ("-3", 0.0), ("10", 0.010)])
def test_spin_setting(monkeypatch, raw, seconds):
    if raw is None:
        monkeypatch.delenv(waiting.SPIN_ENV, raising=False)
    else:
        monkeypatch.setenv(waiting.SPIN_ENV, raw)
    assert waiting.spin_seconds() == pytest.approx(seconds)


def _collectives(polled: bool):
    os.environ[waiting.SPIN_ENV] = "10" if polled else "0"
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
        name = mesh.get_group("tp").group_name
        r, n = dist.get_rank(), dist.get_world_size()
        gen = torch.Generator().manual_seed(10 + r)
        x = torch.randn(64, 48, dtype=torch.float64, generator=gen)
        group = waiting.polled_group(name, x)
        out = {
            "polled": group is not None,
            "sum": waiting.all_reduce(x, "sum", name),
            "max": waiting.all_reduce(x, "max", name),
            "gather": waiting.all_gather(x[r:r + 3], n, name),
            "a2a": waiting.all_to_all_single(x[: 4 * n], [4] * n, [4] * n, name),
            "issued": waiting.wait(waiting.start_all_gather(x[:5], n, name)),
            "issued_sum": waiting.wait(waiting.start_all_reduce(x[:7], name)),
            "input_kept": torch.equal(x, torch.randn(64, 48, dtype=torch.float64,
                                                     generator=torch.Generator().manual_seed(10 + r))),
            "left": len(waiting._issued),
        }
        return out
    finally:
        os.environ.pop(waiting.SPIN_ENV, None)


def test_polled_collectives_equal_the_functional_ones_bit_for_bit():
    polled = rank_pool(2).run(_collectives, True)
    blocking = rank_pool(2).run(_collectives, False)
    for p, b in zip(polled, blocking):
        assert p["polled"] and not b["polled"]  # 2 ranks on 2 cores poll; FXPAR_WAIT_SPIN_MS=0 does not
        for key in ("sum", "max", "gather", "a2a", "issued", "issued_sum"):
            assert torch.equal(p[key], b[key]), key
        assert p["input_kept"] and p["left"] == 0 and b["left"] == 0
    assert torch.equal(polled[0]["sum"], polled[1]["sum"])  # every rank holds the same sum


def _oversubscribed():
    os.environ[waiting.SPIN_ENV] = "10"
    os.environ["LOCAL_WORLD_SIZE"] = str(len(os.sched_getaffinity(0)) + 1)
    waiting._gloo_groups.clear()
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
        name = mesh.get_group("tp").group_name
        x = torch.ones(8)
        return waiting.polled_group(name, x) is None, torch.equal(waiting.all_reduce(x, "sum", name), 2 * x)
    finally:
        os.environ.pop("LOCAL_WORLD_SIZE")
        os.environ.pop(waiting.SPIN_ENV, None)
        waiting._gloo_groups.clear()


def test_more_local_ranks_than_cores_blocks():
    assert rank_pool(2).run(_oversubscribed) == [(True, True), (True, True)]


def _train(mode: str, spin: str):
    os.environ[waiting.SPIN_ENV] = spin
    try:
        from torch.distributed.device_mesh import init_device_mesh

        torch.manual_seed(0)
        if mode == "tp":
            model = BlockStack(2, 16, 32).double()
            mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
            kwargs = {}
        else:
            model = MLPStack(16, 32, 3).double()
            mesh = init_device_mesh("cpu", (2,), mesh_dim_names=(mode,))
            kwargs = {"input_layout": "local"} if mode == "fsdp" else {}
        x, y = torch.randn(4, 8, 16, dtype=torch.float64), torch.randn(4, 8, 16, dtype=torch.float64)
        if mode != "tp":
            x, y = x.reshape(32, 16), y.reshape(32, 16)
        if mode == "fsdp":
            r = dist.get_rank()
            x, y = x.chunk(2)[r], y.chunk(2)[r]
        pm = fxpar.parallelize(model, mesh, example_inputs=(x,), **kwargs)
        opt = torch.optim.SGD(pm.parameters(), lr=0.1)
        losses = []
        for _ in range(2):
            opt.zero_grad()
            losses.append(pm.step(x, target=y, loss_fn=mse).detach())
            grads = [p.grad.detach().clone() for p in pm.parameters()]
            opt.step()
        return losses, grads, len(waiting._issued)
    finally:
        os.environ.pop(waiting.SPIN_ENV, None)


@pytest.mark.parametrize("mode", ["tp", "fsdp", "dp"])
def test_training_polled_equals_blocking(mode):
    """Two float64 steps (tp all-reduces; fsdp prefetched gathers; dp gradient buckets): polled and blocking
    waits give the same losses and gradients, bit for bit, and leave nothing issued."""
    pool = rank_pool(2)
    polled, blocking = pool.run(_train, mode, "10"), pool.run(_train, mode, "0")
    for (pl, pg, pleft), (bl, bg, bleft) in zip(polled, blocking):
        assert all(torch.equal(a, b) for a, b in zip(pl, bl))
        assert len(pg) == len(bg) and all(torch.equal(a, b) for a, b in zip(pg, bg))
        assert pleft == 0 and bleft == 0
