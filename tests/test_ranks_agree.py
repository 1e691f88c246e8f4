"""Issue 14.4: ranks that disagree get an error or rank 0's model, never a silent wrong answer.

Before: with input_layout='full', ranks passing different inputs (a loader seeded per rank) got
a wrong result without a word, and so did ranks whose models were initialized with different
seeds. Now parameters and buffers that differ are broadcast from the mesh's first rank before
sharding (as DDP does; found by a fingerprint, so agreeing ranks move 32 B per tensor), and the
inputs are compared by a two-scalar fingerprint on the first run (and every run with check=True).
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


def _setup_traffic(names: tuple, differ: bool) -> dict:
    """Bytes of the c10d collectives issued while the parallel module is built, by kind (a dispatch mode sees
    each collective's tensors), and whether the module's parameters are rank 0's afterwards."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Traffic(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if func.namespace == "c10d" and name.startswith(("broadcast", "allreduce")):
                kind = "broadcast" if name.startswith("broadcast") else "allreduce"
                leaves = [t for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
                self.bytes[kind] = self.bytes.get(kind, 0) + sum(t.numel() * t.element_size() for t in leaves)
            return func(*args, **(kwargs or {}))

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=names)
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    model = MLPStack(dim=16, hidden=32).double()
    if differ and rank == 1:
        with torch.no_grad():
            next(model.parameters()).add_(1.0)  # one tensor differs on rank 1
    first = next(model.parameters()).detach().clone()
    x = torch.randn(8, 16, dtype=torch.float64)
    with Traffic() as t:
        pm = fxpar.parallelize(model, mesh, example_inputs=(x,))
    full = pm.full_state_dict()
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, first)
    return {"bytes": t.bytes, "tensors": len(list(model.parameters())) + len(list(model.buffers())),
            "first_nbytes": first.numel() * first.element_size(),
            "rank0_first": torch.equal(next(iter(full.values())), gathered[0])}


@pytest.mark.parametrize("differ", [False, True], ids=["agree", "one-differs"])
def test_set_up_moves_fingerprints_and_only_the_tensors_that_differ(differ):
    # DDP broadcasts the whole model at set-up; fxpar compares 16 B per tensor (two float64 sums) in one
    # all-reduce ([fp, -fp] under MAX: 32 B per tensor on the wire) and broadcasts what differs
    for r in rank_pool(2).run(_setup_traffic, ("dp",), differ):
        assert r["bytes"].get("allreduce", 0) == 32 * r["tensors"], r
        assert r["bytes"].get("broadcast", 0) == (r["first_nbytes"] if differ else 0), r
        assert r["rank0_first"], r
