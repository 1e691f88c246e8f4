"""Issue 14.4 for pipelines: ranks that pass different inputs get a PlanError, not a wrong answer.

Before: a PipelineModule never compared its ranks' inputs; with a loader seeded per rank the
first stage's ranks and the last stage's target disagreed and the step returned a wrong loss
and wrong gradients without a word. Now the flat inputs and the target are fingerprinted over
every mesh dim (pp included) on the first run, and on every run with check=True, as
ParallelModule does.
"""

from __future__ import annotations

import pytest
import torch

import fxpar
from fxpar.core.errors import PlanError
from fxpar.testing import rank_pool

from tests.models import MLPStack


def _mse(out, target):
    return ((out - target) ** 2).mean()


def _attempt(fn) -> str | None:
    try:
        fn()
    except PlanError as e:
        return str(e)
    return None


def _inputs(mesh_shape: tuple, names: tuple, check: bool) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    torch.manual_seed(0)
    model = MLPStack(depth=4, dim=16, hidden=32).double()
    x, target = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    rank = torch.distributed.get_rank()
    torch.manual_seed(100 + rank)  # a loader seeded per rank
    y = torch.randn(8, 16, dtype=torch.float64)
    out = {}
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), check=check or None)
    out["first_forward"] = _attempt(lambda: pm(y))
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), check=check or None)
    out["first_target"] = _attempt(lambda: pm.step(x, target=y, loss_fn=_mse))
    # The same inputs pass; afterwards only check=True compares them.
    out["same"] = _attempt(lambda: pm.step(x, target=target, loss_fn=_mse))
    out["later_step"] = _attempt(lambda: pm.step(y, target=target, loss_fn=_mse))
    out["later_forward"] = _attempt(lambda: pm(y))
    return out


@pytest.mark.parametrize("mesh_shape,names", [((2,), ("pp",)), ((2, 2), ("dp", "pp"))])
def test_pipeline_refuses_different_inputs(mesh_shape, names):
    world = 1
    for s in mesh_shape:
        world *= s
    for r in rank_pool(world).run(_inputs, mesh_shape, names, False):
        assert r["first_forward"] is not None and "different inputs" in r["first_forward"], r
        assert "tensor input 0" in r["first_forward"], r
        assert r["first_target"] is not None and "tensor input 1" in r["first_target"], r  # the target
        assert r["same"] is None and r["later_step"] is None and r["later_forward"] is None, r
    for r in rank_pool(world).run(_inputs, mesh_shape, names, True):
        assert r["same"] is None, r
        assert r["later_step"] is not None and "different inputs" in r["later_step"], r
        assert r["later_forward"] is not None and "different inputs" in r["later_forward"], r
