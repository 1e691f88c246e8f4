"""Issue 14.7: a failed pipeline step raises on every rank, promptly, and the next step is exact.

Before: an exception in loss_fn (or a stage) on one rank left the others blocked in recv until
the process group's timeout, and the module was unusable after. Now the failing rank finishes the
schedule with stand-in zeros, every rank agrees on the failure after the schedule and raises a
ScheduleError naming the failing rank and the original exception, the step's gradients are
discarded, and the next step equals the unsplit model (float64, every gradient). Also: the
schedules cached per input shape are bounded.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

import fxpar
from fxpar.core.errors import ScheduleError
from fxpar.runtime.pipeline import MAX_SCHEDULES
from fxpar.testing import rank_pool

from tests.models import MLPStack


def _mse(out, target):
    return ((out - target) ** 2).mean()


class _Boom(Exception):
    pass


def _failing_loss(out, target):
    if torch.distributed.get_rank() == 1:
        raise _Boom("bad target on the last stage")
    return _mse(out, target)


def _run(mesh_shape: tuple, names: tuple) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    torch.manual_seed(0)
    model = MLPStack(depth=4, dim=16, hidden=32).double()
    ref = copy.deepcopy(model)
    x, target = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), plan=fxpar.Plan(schedule="1f1b"))
    t0 = time.perf_counter()
    error = None
    try:
        pm.step(x, target=target, loss_fn=_failing_loss)
    except ScheduleError as e:
        error = str(e)
    seconds = time.perf_counter() - t0
    grads_after_failure = [p.grad for p in pm.parameters() if p.grad is not None]
    loss = pm.step(x, target=target, loss_fn=_mse)
    ref_loss = _mse(ref(x), target)
    ref_loss.backward()
    grads = pm.full_grads()
    err = max(((grads[k] - p.grad).abs().max() / p.grad.abs().max()).item() for k, p in ref.named_parameters())
    return {"error": error, "seconds": seconds, "left": len(grads_after_failure),
            "loss": abs(loss.item() - ref_loss.item()), "grads": err}


@pytest.mark.parametrize("mesh_shape,names", [((2,), ("pp",)), ((2, 2), ("dp", "pp"))])
def test_loss_fn_failure_on_one_rank(mesh_shape, names):
    world = mesh_shape[0] * (mesh_shape[1] if len(mesh_shape) > 1 else 1)
    for rank, r in enumerate(rank_pool(world).run(_run, mesh_shape, names)):
        assert r["error"] is not None, r
        assert "failed on rank 1" in r["error"] and "_Boom" in r["error"] and "bad target" in r["error"], r
        assert r["seconds"] < 10, r
        assert r["left"] == 0, r  # the failed step's gradients were discarded
        assert max(r["loss"], r["grads"]) < 1e-12, r


def _stage_failure() -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    torch.manual_seed(0)
    model = MLPStack(depth=4, dim=16, hidden=32).double()
    ref = copy.deepcopy(model)
    x, target = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), plan=fxpar.Plan(schedule="gpipe"))
    # Make this rank's stage raise once, as a bug or a bad value in a stage's forward would.
    stage = pm.stage_modules[0]
    original = stage.forward
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if torch.distributed.get_rank() == 0 and calls["n"] == 2:
            raise RuntimeError("stage blew up")
        return original(*args)

    stage.forward = flaky
    t0 = time.perf_counter()
    error = None
    try:
        pm.step(x, target=target, loss_fn=_mse)
    except ScheduleError as e:
        error = str(e)
    seconds = time.perf_counter() - t0
    loss = pm.step(x, target=target, loss_fn=_mse)
    ref_loss = _mse(ref(x), target)
    ref_loss.backward()
    grads = pm.full_grads()
    err = max(((grads[k] - p.grad).abs().max() / p.grad.abs().max()).item() for k, p in ref.named_parameters())
    return {"error": error, "seconds": seconds, "loss": abs(loss.item() - ref_loss.item()), "grads": err}


def test_stage_forward_failure_on_one_rank():
    for r in rank_pool(2).run(_stage_failure):
        assert r["error"] is not None and "failed on rank 0" in r["error"] and "stage blew up" in r["error"], r
        assert r["seconds"] < 10, r
        assert max(r["loss"], r["grads"]) < 1e-12, r


def _many_shapes() -> int:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    model = MLPStack(depth=4, dim=16, hidden=32)
    pm = fxpar.parallelize(model, mesh, example_inputs=(torch.randn(8, 16),))
    for b in range(1, 13):
        pm(torch.randn(4 * b, 16))
    return len(pm._schedules)


def test_schedule_cache_is_bounded():
    assert rank_pool(2).run(_many_shapes) == [MAX_SCHEDULES, MAX_SCHEDULES]
