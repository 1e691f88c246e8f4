"""fxpar.ops.transitions.inference_graph_module: the forward without its backward-only markers."""

from __future__ import annotations

import torch

import fxpar
from fxpar.ops.collectives import COLLECTIVE_OPS
from fxpar.ops.transitions import inference_graph_module
from models import GatedMLP

GRAD_ALL_REDUCE = torch.ops.fxpar.grad_all_reduce.default


def _comms(gm) -> list[str]:
    return [COLLECTIVE_OPS[n.target] for n in gm.graph.nodes if n.op == "call_function" and n.target in COLLECTIVE_OPS]


def test_drops_only_grad_all_reduce_and_shares_parameters(make_fake_mesh):
    mesh = make_fake_mesh((4,), ("tp",))
    model = torch.nn.Sequential(GatedMLP(16, 64), GatedMLP(16, 64))
    pm = fxpar.parallelize(model, mesh, example_inputs=(torch.randn(2, 5, 16),))
    gm = pm.graph_module
    inf = inference_graph_module(gm)
    inf.graph.lint()
    assert _comms(gm) == ["grad_all_reduce", "all_reduce"] * 2
    assert _comms(inf) == ["all_reduce"] * 2
    assert not any(n.target is GRAD_ALL_REDUCE for n in inf.graph.nodes)
    assert {id(p) for p in inf.parameters()} == {id(p) for p in gm.parameters()}
    assert len(gm.graph.nodes) - len(inf.graph.nodes) == 2  # the original graph is untouched
    # The same values, at the example size and at another (symbolic) batch / sequence size.
    for x in (torch.randn(2, 5, 16), torch.randn(3, 7, 16)):
        with torch.no_grad():
            torch.testing.assert_close(inf(x), gm(x), rtol=0, atol=0)


def test_no_grad_forward_runs_it_and_sees_updated_parameters(make_fake_mesh):
    mesh = make_fake_mesh((4,), ("tp",))
    model = torch.nn.Sequential(GatedMLP(16, 64), GatedMLP(16, 64))
    pm = fxpar.parallelize(model, mesh, example_inputs=(torch.randn(2, 5, 16),))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        before = pm(x)
        inf = pm._inference_graph()
        assert pm._inference_graph() is inf  # built once
        for p in pm.parameters():  # an optimizer step updates parameters in place
            p.mul_(0.5)
        after = pm(x)
    assert not any(n.target is GRAD_ALL_REDUCE for n in inf.graph.nodes)
    torch.testing.assert_close(after, pm.graph_module(x).detach(), rtol=0, atol=0)
    assert not torch.equal(before, after)
