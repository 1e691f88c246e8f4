"""Tensor-parallel MLPs on real gloo ranks: outputs and every gradient equal to the unsplit model."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import fxpar
from fxpar.testing import rank_pool
from models import Chain, Flattening, GatedMLP, MLPStack, NoRuleOp, mse

MEGATRON = {"layers.*.up": "colwise", "layers.*.down": "rowwise"}

CASES = {
    # name: (model factory, plan, input shape)
    "megatron_pair": (lambda: MLPStack(dim=16, hidden=32, depth=2), MEGATRON, (4, 5, 16)),
    "megatron_no_bias": (lambda: MLPStack(dim=16, hidden=32, depth=2, bias=False, act="silu"), MEGATRON, (3, 16)),
    "rowwise_first": (lambda: Chain([16, 16, 16]), {"layers.0": "rowwise", "layers.1": "colwise"}, (4, 16)),
    "three_layers": (lambda: Chain([16, 32, 32, 16]),
                     {"layers.0": "colwise", "layers.1": "rowwise", "layers.2": "colwise"}, (2, 3, 16)),
    "replicated_middle": (lambda: Chain([16, 32, 32, 16]),
                          {"layers.0": "colwise", "layers.1": "replicate", "layers.2": "rowwise"}, (4, 16)),
    "all_colwise": (lambda: Chain([16, 32, 16]), {"layers.*": "colwise"}, (4, 16)),
    "gated_auto": (lambda: nn.Sequential(GatedMLP(16, 32), GatedMLP(16, 32)), None, (2, 3, 16)),
    "views_auto": (lambda: Flattening(16, 32), None, (2, 3, 16)),
    "op_without_rule": (lambda: NoRuleOp(16, 32), {"up": "colwise", "down": "rowwise"}, (4, 16)),
}


def _run_case(name: str, dtype: torch.dtype) -> dict:
    factory, plan, shape = CASES[name]
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    model = factory().to(dtype)
    x = torch.randn(*shape, dtype=dtype)
    target = torch.randn(*shape[:-1], 16, dtype=dtype)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), plan=plan)
    fxpar.check(pm)
    report = fxpar.verify(model, pm, x, target=target, loss_fn=mse)
    # Input gradients too: the f op's backward all-reduce must make them full.
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    mse(model(xa), target).backward()
    with fxpar.count_comms() as comms:
        mse(pm(xb), target).backward()
    input_grad = ((xb.grad - xa.grad).abs().max() / xa.grad.abs().max()).item()
    return {
        "ok": report.ok,
        "report": str(report),
        "names": sorted(t.name for t in report.tensors),
        "input_grad_err": float(input_grad),
        "comms": [(c.op, c.direction) for c in comms],
    }


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_outputs_and_gradients_match(name, tp, dtype):
    results = rank_pool(tp).run(_run_case, name, dtype)
    for rank, r in enumerate(results):
        assert r["ok"], f"rank {rank}:\n{r['report']}"
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        assert r["input_grad_err"] <= tol, f"rank {rank}: input gradient off by {r['input_grad_err']}"
    model = CASES[name][0]()
    n_params = len(list(model.named_parameters()))
    assert len([n for n in results[0]["names"] if n.startswith("grad ") and not n.startswith("grad input")]) == n_params
    assert all(r["names"] == results[0]["names"] for r in results)


def test_megatron_pair_communicates_one_allreduce_each_way():
    results = rank_pool(2).run(_run_case, "megatron_pair", torch.float64)
    # two blocks: per block one forward all-reduce (row-parallel output) and one backward
    # all-reduce (the f op on the block input); nothing else.
    assert sorted(results[0]["comms"]) == sorted([("all_reduce", "forward"), ("all_reduce", "backward")] * 2)
