"""Bug: a tensor is cut along the wrong dim (a collective's dim argument, or a parameter shard).

Caught statically: the collective's arguments are not the transition between its
input's and output's placements; the parameter's local shape is not its spec's.
A shard cut along the right dim but at the wrong position (rank 1 holding rank 0's
rows) has the right shapes everywhere: only numbers show it, and verify names it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxpar
from zoo import MEGATRON, Stack, compiled, fxpar_ops, mse, nodes, recompile


def test_wrong_dim_in_a_shard_collective_is_caught_statically():
    # Row-parallel first layer: the replicated input is sliced along its last dim ('shard', no communication).
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    world, pms, x, _ = compiled(model, plan={"0": "rowwise", "2": "colwise"})
    for pm in pms:
        (shard,) = nodes(pm.graph_module, fxpar_ops.shard.default)
        assert shard.args[1] == 1
        shard.args = (shard.args[0], 0, *shard.args[2:])  # dim 0 divides too: a silent wrong slice
    recompile(*pms)
    with pytest.raises(fxpar.GraphInvariantError,
                       match=r"shard with dim=0 but its input is R and its output S\(1\) on mesh dim 'tp': "
                             r"expected dim=1 \(a wrong shard dim\)"):
        fxpar.check(pms[0])


def test_parameter_sharded_along_the_wrong_dim_is_caught_statically():
    world, pms, x, _ = compiled(Stack(d=8, h=8), plan=MEGATRON)  # square weights: both cuts divide
    full = torch.cat([p.graph_module.get_submodule("layers.0.up").weight.detach() for p in pms], dim=0)
    for pm in pms:
        up = pm.graph_module.get_submodule("layers.0.up")
        coord = pm.mesh_info.coordinate[0]
        up.weight = nn.Parameter(full.chunk(2, dim=1)[coord].clone())  # columns instead of rows
    with pytest.raises(fxpar.GraphInvariantError,
                       match=r"holds 'layers.0.up.weight' with shape \[8, 4\] but its placements \[S\(0\)\] of "
                             r"\[8, 8\] give local shape \[4, 8\] \(sharded along the wrong dim"):
        fxpar.check(pms[0])


def test_shard_at_the_wrong_position_is_caught_numerically_and_bisect_names_the_parameter():
    model = Stack()
    world, pms, x, y = compiled(model, plan=MEGATRON)
    with torch.no_grad():  # rank 1 holds rank 0's rows: every shape is right
        pms[1].graph_module.get_submodule("layers.0.up").weight.copy_(
            pms[0].graph_module.get_submodule("layers.0.up").weight)
    fxpar.check(pms[1], ranks=pms)  # nothing static to see
    reports = world.run(lambda r: fxpar.verify(model, pms[r], x, target=y, loss_fn=mse, bisect=True))
    report = reports[0]
    assert not report.ok
    assert report["param layers.0.up.weight"].ok is False
    found = report.bisect
    assert found.node == "layers_0_up_weight" and found.direction == "forward"
    assert found.placements == "[S(0)]" and "shard_parameters" in found.origin
    assert "first diverging value: %layers_0_up_weight" in str(report)
