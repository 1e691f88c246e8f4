"""Issue 14.4: ranks that disagree get an error or rank 0's model, never a silent wrong answer.

Before: with input_layout='full', ranks passing different inputs (a loader seeded per rank) got
a wrong result without a word, and so did ranks whose models were initialized with different
seeds. Now parameters and buffers are broadcast from the mesh's first rank before sharding (as
DDP does), and the inputs are compared by a two-scalar fingerprint on the first run (and every
run with check=True).
"""

from __future__ import annotations

import copy

import pytest
import torch

import fxpar
from fxpar.core.errors import PlanError
from fxpar.runtime.agreement import input_fingerprint
from fxpar.testing import rank_pool

from tests.models import MLPStack


def _mse(out, target):
    return ((out - target) ** 2).mean()


def _seeds(names: tuple) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=names)
    rank = torch.distributed.get_rank()
    torch.manual_seed(100 + rank)  # each rank its own initialization
    model = MLPStack(dim=16, hidden=32).double()
    torch.manual_seed(0)
    x, target = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,))
    # The reference is rank 0's model.
    ref = copy.deepcopy(model)
    state = [p.detach().clone() for p in ref.parameters()]
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, state)
    with torch.no_grad():
        for p, v in zip(ref.parameters(), gathered[0]):
            p.copy_(v)
    loss = pm.step(x, target=target, loss_fn=_mse)
    ref_loss = _mse(ref(x), target)
    ref_loss.backward()
    grads = pm.full_grads()
    err = max(((grads[k] - p.grad).abs().max() / p.grad.abs().max()).item() for k, p in ref.named_parameters())
    return {"loss": abs(loss.item() - ref_loss.item()), "grads": err}


@pytest.mark.parametrize("dim", ["tp", "dp"])
def test_models_initialized_with_different_seeds_start_from_rank_0(dim):
    for r in rank_pool(2).run(_seeds, (dim,)):
        assert max(r["loss"], r["grads"]) < 1e-12, r


def _inputs(names: tuple, check: bool) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=names)
    torch.manual_seed(0)
    model = MLPStack(dim=16, hidden=32).double()
    x = torch.randn(8, 16, dtype=torch.float64)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), check=check or None)
    out = {}
    pm(x)  # the same inputs: fine
    rank = torch.distributed.get_rank()
    torch.manual_seed(rank)  # a loader seeded per rank
    y = torch.randn(8, 16, dtype=torch.float64)
    try:
        pm(y)
        out["later"] = None
    except PlanError as e:
        out["later"] = str(e)
    # A fresh module: the first run is always checked.
    pm2 = fxpar.parallelize(model, mesh, example_inputs=(x,))
    try:
        pm2.step(y, target=y, loss_fn=_mse)
        out["first"] = None
    except PlanError as e:
        out["first"] = str(e)
    return out


@pytest.mark.parametrize("dim", ["tp", "dp"])
def test_different_inputs_are_refused(dim):
    for r in rank_pool(2).run(_inputs, (dim,), False):
        assert r["first"] is not None and "different inputs" in r["first"], r
        assert r["later"] is None  # after the first run, only check=True compares
    for r in rank_pool(2).run(_inputs, (dim,), True):
        assert r["later"] is not None and "different inputs" in r["later"], r


def test_fingerprint_sees_swapped_rows():
    x = torch.randn(4, 3)
    assert not torch.equal(input_fingerprint((x,), {}), input_fingerprint((x.flip(0),), {}))
