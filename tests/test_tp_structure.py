"""Plan, collective-count and shard-size tests on torch's fake backend (no processes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxpar
from fxpar.ops.collectives import COLLECTIVE_OPS
from fxpar.analysis.explain import collectives, param_memory
from models import Chain, Flattening, GatedMLP, MLPStack

fxpar_ops = torch.ops.fxpar
MEGATRON = {"layers.*.up": "colwise", "layers.*.down": "rowwise"}


def count(gm, op) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == op)


def comm_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in COLLECTIVE_OPS]


@pytest.mark.parametrize("tp", [2, 4, 8, 64])
def test_megatron_pair_has_one_allreduce_and_f_on_its_input(make_fake_mesh, tp):
    mesh = make_fake_mesh((tp,), ("tp",))
    model = MLPStack(dim=64, hidden=128, depth=1, residual=False)
    pm = fxpar.parallelize(model, mesh, example_inputs=(torch.randn(4, 64),), plan=MEGATRON)
    gm = pm.graph_module
    comms = comm_nodes(gm)
    assert [COLLECTIVE_OPS[n.target] for n in comms] == ["grad_all_reduce", "all_reduce"]
    f, ar = comms
    # f sits on the pair's input and feeds the column-parallel linear.
    assert f.args[0].op == "placeholder"
    up = next(u for u in f.users)
    assert up.target == torch.ops.aten.linear.default and str(up.args[1].target) == "layers.0.up.weight"
    # the all-reduce reduces the row-parallel matmul, before the bias is added.
    assert ar.args[0].target == torch.ops.aten.linear.default and len(ar.args[0].args) == 2
    (bias_add,) = ar.users
    assert bias_add.target == torch.ops.aten.add.Tensor and str(bias_add.args[1].target) == "layers.0.down.bias"
    # nothing else communicates: parameters keep their shards.
    assert {tuple(p.shape) for p in pm.parameters()} == {(128 // tp, 64), (128 // tp,), (64, 128 // tp), (64,)}


def test_collectives_survive_dead_code_elimination(make_fake_mesh):
    mesh = make_fake_mesh((2,), ("tp",))
    pm = fxpar.parallelize(MLPStack(depth=2), mesh, example_inputs=(torch.randn(3, 16),), plan=MEGATRON)
    gm = pm.graph_module
    before = len(comm_nodes(gm))
    # An extra all_reduce whose result nobody uses must survive DCE too.
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_after(x):
        gm.graph.call_function(fxpar_ops.all_reduce.default, (x, "0", "tp"))
    gm.graph.eliminate_dead_code()
    assert len(comm_nodes(gm)) == before + 1


@pytest.mark.parametrize("tp", [2, 4])
def test_param_bytes_per_rank_are_one_over_tp_of_sharded_layers(make_fake_mesh, tp):
    mesh = make_fake_mesh((tp,), ("tp",))
    model = MLPStack(dim=32, hidden=64, depth=3, bias=False)
    pm = fxpar.parallelize(model, mesh, example_inputs=(torch.randn(2, 32),), plan=MEGATRON)
    full, local = param_memory(pm.graph_module)
    assert full == sum(p.numel() * p.element_size() for p in model.parameters())
    assert local * tp == full
    assert local == sum(p.numel() * p.element_size() for p in pm.parameters())
    assert f"({1 / tp:.3f} of the model)" in pm.explain()


def test_replicated_layer_in_the_middle(make_fake_mesh):
    mesh = make_fake_mesh((4,), ("tp",))
    model = Chain([16, 32, 32, 16])
    plan = {"layers.0": "colwise", "layers.1": "replicate", "layers.2": "rowwise"}
    pm = fxpar.parallelize(model, mesh, example_inputs=(torch.randn(2, 16),), plan=plan)
    shapes = [tuple(p.shape) for p in pm.parameters()]
    assert shapes == [(8, 16), (8,), (32, 32), (32,), (16, 8), (16,)]
    ops = [COLLECTIVE_OPS[n.target] for n in comm_nodes(pm.graph_module)]
    # gather before the replicated layer, slice after it (free), reduce at the end.
    assert ops.count("all_gather") == 1 and ops.count("all_reduce") == 1


def test_rowwise_first_shards_the_input_locally(make_fake_mesh):
    mesh = make_fake_mesh((2,), ("tp",))
    model = Chain([16, 16, 16])
    pm = fxpar.parallelize(model, mesh, example_inputs=(torch.randn(2, 16),),
                           plan={"layers.0": "rowwise", "layers.1": "colwise"})
    ops = [COLLECTIVE_OPS[n.target] for n in comm_nodes(pm.graph_module)]
    assert ops[0] == "shard"  # the replicated input is sliced, no communication forward
    assert "all_reduce" in ops and "all_gather" in ops


def test_automatic_plan_finds_mlp_pairs(make_fake_mesh):
    mesh = make_fake_mesh((4,), ("tp",))
    model = nn.Sequential(GatedMLP(16, 64), GatedMLP(16, 64))
    pm = fxpar.parallelize(model, mesh, example_inputs=(torch.randn(2, 5, 16),))
    text = pm.explain()
    for i in (0, 1):
        assert f"{i}.gate: colwise" in text and f"{i}.up: colwise" in text and f"{i}.down: rowwise" in text
    ops = [COLLECTIVE_OPS[n.target] for n in comm_nodes(pm.graph_module)]
    assert ops == ["grad_all_reduce", "all_reduce"] * 2


def test_views_of_batch_dims_keep_sharding(make_fake_mesh):
    mesh = make_fake_mesh((4,), ("tp",))
    pm = fxpar.parallelize(Flattening(), mesh, example_inputs=(torch.randn(2, 3, 16),),
                           plan={"mlp.up": "colwise", "mlp.down": "rowwise"})
    ops = [COLLECTIVE_OPS[n.target] for n in comm_nodes(pm.graph_module)]
    assert ops == ["grad_all_reduce", "all_reduce"]


def test_explain_lists_plan_collectives_memory_and_fallbacks(make_fake_mesh):
    mesh = make_fake_mesh((2,), ("tp",))
    pm = fxpar.parallelize(MLPStack(depth=1), mesh, example_inputs=(torch.randn(4, 16),), plan=MEGATRON)
    text = pm.explain()
    assert "layers.0.up: colwise" in text and "layers.0.down: rowwise" in text
    assert "fwd all_reduce(tp, n=2) 256 B" in text  # 4 x 16 float32
    assert "bwd all_reduce 256 B" in text
    assert "Fallbacks (ops without a sharding rule, run replicated): 0" in text
    info = collectives(pm.graph_module, pm.mesh_info)
    assert [c.op for c in info] == ["grad_all_reduce", "all_reduce"]


def test_op_without_rule_falls_back_and_is_listed(make_fake_mesh):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(8, 16)
            self.down = nn.Linear(16, 8)

        def forward(self, x):
            h = self.up(x)
            h = torch.logcumsumexp(h, dim=-1)  # no rule: must gather, run replicated
            return self.down(h)

    mesh = make_fake_mesh((2,), ("tp",))
    pm = fxpar.parallelize(Odd(), mesh, example_inputs=(torch.randn(2, 8),), plan={"up": "colwise", "down": "rowwise"})
    text = pm.explain()
    assert "Fallbacks (ops without a sharding rule, run replicated): 1" in text and "logcumsumexp" in text
    fxpar.check(pm)


def test_user_model_is_not_modified(make_fake_mesh):
    mesh = make_fake_mesh((2,), ("tp",))
    model = MLPStack(depth=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = {k: id(v) for k, v in model.named_parameters()}
    pm = fxpar.parallelize(model, mesh, example_inputs=(torch.randn(2, 16),), plan=MEGATRON)
    for p in pm.parameters():
        p.data.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert ids == {k: id(v) for k, v in model.named_parameters()}
