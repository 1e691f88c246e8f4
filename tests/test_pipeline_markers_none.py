"""Issue 14.8: pipe_split() markers are cut points; None outputs pass through a pipeline.

Before: a model cut with torch.distributed.pipelining.pipe_split() and no blocks failed at pp=2
("use at most 0 stages"), and one whose blocks the cost model could cut was cut elsewhere,
ignoring the marker; a model returning None beside tensors failed with a ScheduleError.
Checked in float64 at pp=2 (GPipe and 1F1B): outputs, loss and every gradient against the
unsplit model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.distributed.pipelining import pipe_split

import fxpar
from fxpar.core.stages import stage_info
from fxpar.testing import rank_pool


class Marked(nn.Module):
    """No layer list: only the marker says where to cut (after `mid`, not between blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.mid = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mid(h))
        pipe_split()
        return self.out(h)


class ReturnsNone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x, None, {"aux": None, "twice": x * 2}


def _loss_marked(out, target):
    return ((out - target) ** 2).mean()


def _loss_none(out, target):
    x, nothing, extra = out
    assert nothing is None and extra["aux"] is None
    return ((x - target) ** 2).mean() + extra["twice"].mean()


def _run(which: str, schedule: str) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    torch.manual_seed(0)
    model = (Marked if which == "marked" else ReturnsNone)().double()
    loss_fn = _loss_marked if which == "marked" else _loss_none
    ref = copy.deepcopy(model)
    x = torch.randn(8, 8, dtype=torch.float64)
    target = torch.randn(8, 4 if which == "marked" else 8, dtype=torch.float64)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), plan=fxpar.Plan(schedule=schedule))
    stages = stage_info(pm.graph_module).stages
    out, ref_out = pm(x), ref(x)
    if which == "marked":
        out_err = (out - ref_out).abs().max().item()
    else:
        assert out[1] is None and out[2]["aux"] is None
        out_err = max((out[0] - ref_out[0]).abs().max().item(), (out[2]["twice"] - ref_out[2]["twice"]).abs().max().item())
    loss = pm.step(x, target=target, loss_fn=loss_fn)
    ref_loss = loss_fn(ref(x), target)
    ref_loss.backward()
    grads = pm.full_grads()
    grad_err = max(((grads[k] - p.grad).abs().max() / p.grad.abs().max()).item() for k, p in ref.named_parameters())
    return {"cut": stages[1].first_module, "out": out_err, "loss": abs(loss.item() - ref_loss.item()),
            "grads": grad_err}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipe_split_marker_is_the_cut(schedule):
    for r in rank_pool(2).run(_run, "marked", schedule):
        assert r["cut"] == "out", r
        assert max(r["out"], r["loss"], r["grads"]) < 1e-12, r


def test_none_outputs_pass_through_a_pipeline():
    for r in rank_pool(2).run(_run, "none", "1f1b"):
        assert max(r["out"], r["loss"], r["grads"]) < 1e-12, r
