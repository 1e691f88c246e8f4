"""Collective-order fingerprints: the schedule each rank's graph fixes, compared at the first forward."""

from __future__ import annotations

import pytest
import torch

import fxpar
from fxpar.analysis.fingerprint import collective_schedule, first_difference, schedule_fingerprint
from fxpar.testing.simulate import SimWorld
from models import MLPStack

MEGATRON = {"layers.*.up": "colwise", "layers.*.down": "rowwise"}


def _compiled(mesh=None, depth=2):
    world = SimWorld(mesh or {"tp": 2})
    x = torch.randn(4, 16)
    return world, world.parallelize(MLPStack(depth=depth), example_inputs=(x,), plan=MEGATRON), x


def test_the_schedule_lists_what_communicates_forward_then_the_duals_backward():
    world, pms, x = _compiled()
    sched = collective_schedule(pms[0].graph_module, pms[0].mesh_info)
    assert [(s.direction, s.op, s.node) for s in sched] == [
        ("forward", "all_reduce", "allreduce_linear_1_nobias"),
        ("forward", "all_reduce", "allreduce_linear_3_nobias"),
        ("backward", "all_reduce", "gradallreduce_add"),  # the f ops' duals, last first
        ("backward", "all_reduce", "gradallreduce_x"),
    ]
    assert all(s.mesh_dim == "tp" and s.dtype == "float32" and s.shape[-1] == "16" for s in sched)
    assert sched[0].module == "layers.0.down"


def test_ranks_of_a_group_have_equal_fingerprints_and_group_names_do_not_enter_them():
    world, pms, x = _compiled({"dp": 2, "tp": 2})
    prints = [schedule_fingerprint([s for s in collective_schedule(pm.graph_module, pm.mesh_info)
                                    if s.mesh_dim == "tp"]) for pm in pms]
    assert len(set(prints)) == 1  # ranks 0,1 and 2,3 are different tp groups, with different names


def test_first_difference_names_the_position_and_both_entries():
    world, pms, x = _compiled()
    a = collective_schedule(pms[0].graph_module, pms[0].mesh_info)
    assert first_difference(a, a) is None
    assert first_difference(a, a[:2]) == (2, a[2], None)
    assert first_difference(a, a[1:])[0] == 0


def test_exchange_passes_for_identical_graphs_and_runs_once():
    world, pms, x = _compiled()
    out = world.run(lambda r: (pms[r](x), pms[r]._fingerprint_checked)[1])
    assert out == [True, True]


def test_an_extra_collective_on_one_rank_fails_at_the_first_forward():
    world, pms, x = _compiled(depth=1)
    gm = pms[1].graph_module
    ar = next(n for n in gm.graph.nodes if n.target == torch.ops.fxpar.all_reduce.default)
    with gm.graph.inserting_after(ar):
        extra = gm.graph.call_function(torch.ops.fxpar.all_reduce.default, (ar, *ar.args[1:]))
    extra.meta.update(ar.meta)
    gm.recompile()
    with pytest.raises(fxpar.GraphInvariantError) as e:
        world.run(lambda r: pms[r](x))
    msg = str(e.value)
    assert "first difference at collective #1" in msg
    assert "group rank 0 at coordinate [0]: backward all_reduce(tp)" in msg and "at %gradallreduce_x" in msg
    assert "group rank 1 at coordinate [1]: forward all_reduce(tp)" in msg
    assert f"at %{extra.name} in 'layers.0.down'" in msg


def test_a_missing_collective_at_the_end_says_so():
    world, pms, x = _compiled(depth=1)
    gm = pms[1].graph_module
    f = next(n for n in gm.graph.nodes if n.target == torch.ops.fxpar.grad_all_reduce.default)
    f.replace_all_uses_with(f.args[0])
    gm.graph.erase_node(f)
    gm.recompile()
    with pytest.raises(fxpar.GraphInvariantError) as e:
        world.run(lambda r: pms[r](x))
    assert "(nothing: this rank has only 1 collectives on 'tp')" in str(e.value)
