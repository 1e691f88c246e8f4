"""Issue 14.2: BatchNorm in training mode is exact under dp and refused (or explicitly allowed) in a pipeline.

Under dp batch_norm has no sharding rule, so it runs on the gathered batch: global statistics,
every gradient and the running statistics as in the unsplit model. In a pipeline with several
microbatches it would use each microbatch's statistics (1.4 relative gradient error, float64, pp=2,
2 microbatches): parallelize raises a PlanError naming the module and the ways out.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import fxpar
from fxpar.testing import rank_pool
from models import BNStack, mse


def test_batch_norm_in_training_mode_in_a_pipeline_is_a_plan_error(make_fake_mesh):
    mesh = make_fake_mesh((2,), ("pp",))
    with pytest.raises(fxpar.PlanError, match=r"BatchNorm 'blocks\.0\.1'.*training mode.*2 microbatches") as e:
        fxpar.parallelize(BNStack().train(), mesh, example_inputs=(torch.randn(8, 8),),
                          plan=fxpar.Plan(pp=["blocks.1"]))
    assert "eval" in str(e.value) and "batch_norm_per_microbatch=True" in str(e.value)
    assert "microbatches=1" in str(e.value)


def test_batch_norm_per_microbatch_is_an_explicit_opt_in_that_warns(make_fake_mesh, caplog):
    mesh = make_fake_mesh((2,), ("pp",))
    with caplog.at_level(logging.WARNING, logger="fxpar.passes.split_stages"):
        fxpar.parallelize(BNStack().train(), mesh, example_inputs=(torch.randn(8, 8),),
                          plan=fxpar.Plan(pp=["blocks.1"]), batch_norm_per_microbatch=True)
    assert any("blocks.0.1" in r.getMessage() and "batch_norm_per_microbatch" in r.getMessage()
               for r in caplog.records)


def _bn_step(shape, names, plan, train: bool) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=names)
    torch.manual_seed(0)
    model = BNStack().double().train(train)
    x, target = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), plan=plan)
    loss = pm.step(x, target=target, loss_fn=mse)
    ref = copy.deepcopy(model)
    ref_loss = mse(ref(x), target)
    ref_loss.backward()
    grads, state = pm.full_grads(), pm.full_state_dict()
    errs = {k: ((grads[k] - p.grad).abs().max() / p.grad.abs().max()).item() for k, p in ref.named_parameters()}
    # running statistics: updated once per step from the whole batch, as in the unsplit model
    stats = {k: (state[k] - b).abs().max().item() for k, b in ref.named_buffers() if k in state}
    return {"loss_err": abs(loss.item() - ref_loss.item()) / ref_loss.item(), "errs": errs, "stats": stats}


@pytest.mark.parametrize("case", ["dp2_train", "pp2_one_microbatch_train", "pp2_eval"])
def test_batch_norm_numerics_equal_the_unsplit_model(case):
    if case == "dp2_train":
        args = ((2,), ("dp",), None, True)
    elif case == "pp2_one_microbatch_train":
        args = ((2,), ("pp",), fxpar.Plan(pp=["blocks.1"], microbatches=1, schedule="gpipe"), True)
    else:
        args = ((2,), ("pp",), fxpar.Plan(pp=["blocks.1"]), False)
    for r in rank_pool(2).run(_bn_step, *args):
        assert r["loss_err"] < 1e-12, r
        assert max(r["errs"].values()) < 1e-10, r
        # (in a pipeline, the running statistics were updated twice on the first step before stages
        # got static metadata: torch's metadata inference ran every stage once more)
        assert max(r["stats"].values(), default=0.0) < 1e-12, r


class _Centered(torch.nn.Module):
    """Blocks that subtract the batch mean (a batch-coupled op without a BatchNorm module)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(dim, dim) for _ in range(2)])

    def forward(self, x):
        for block in self.blocks:
            h = block(x)
            x = x + (h - h.mean(dim=0, keepdim=True))
        return x


def test_a_reduction_over_the_batch_in_a_pipeline_is_a_plan_error(make_fake_mesh, caplog):
    """Found by tests/test_property_issue14.py: x - x.mean(0) at pp=2 gave gradients 100% off, silently."""
    mesh = make_fake_mesh((2,), ("pp",))
    x = torch.randn(8, 8)
    with pytest.raises(fxpar.PlanError, match=r"aten\.mean\.dim at %mean in module '<root>' reduces over the "
                                              r"batch dim in a pipeline with 2 microbatches") as e:
        fxpar.parallelize(_Centered(), mesh, example_inputs=(x,), plan=fxpar.Plan(pp=["blocks.1"]))
    assert "microbatches=1" in str(e.value) and "batch_norm_per_microbatch=True" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="fxpar.passes.split_stages"):
        fxpar.parallelize(_Centered(), mesh, example_inputs=(x,), plan=fxpar.Plan(pp=["blocks.1"]),
                          batch_norm_per_microbatch=True)
    assert any("reduces over the batch dim" in r.getMessage() for r in caplog.records)
