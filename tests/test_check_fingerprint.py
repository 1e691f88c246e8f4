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


# --------------------------------------------------------------------------- MoE token exchange (issue 17)


@pytest.fixture(scope="module")
def moe_ranks():
    """TitanMoEStack on ep=2 in one process: each rank's module, fresh per test (`_moe()`)."""
    from models import TitanMoEStack

    def make():
        torch.manual_seed(0)
        x = torch.randn(4, 4, 16, dtype=torch.float64)
        world = SimWorld({"ep": 2})
        return world, world.parallelize(TitanMoEStack().double(), example_inputs=(x,)), x
    return make


def _moe_nodes(pm):
    from fxpar.ops.moe import moe_experts

    return [n for n in pm.graph_module.graph.nodes if n.target is moe_experts]


def test_the_schedule_lists_the_all_to_alls_inside_each_moe_node(moe_ranks):
    world, pms, x = moe_ranks()
    sched = [s for s in collective_schedule(pms[0].graph_module, pms[0].mesh_info) if s.op == "all_to_all"]
    # per node: counts, dispatch, combine forward; the duals of combine and dispatch backward, last node first
    assert [(s.direction, s.node, s.splits.split(":")[0]) for s in sched] == [
        ("forward", "moe_experts", "counts"), ("forward", "moe_experts", "dispatch"),
        ("forward", "moe_experts", "combine"),
        ("forward", "moe_experts_1", "counts"), ("forward", "moe_experts_1", "dispatch"),
        ("forward", "moe_experts_1", "combine"),
        ("backward", "moe_experts_1", "combine"), ("backward", "moe_experts_1", "dispatch"),
        ("backward", "moe_experts", "combine"), ("backward", "moe_experts", "dispatch")]
    assert all(s.mesh_dim == "ep" and s.group == pms[0].mesh_info.group_names[0] for s in sched)
    assert sched[0].shape == ("4",) and sched[0].dtype == "int64" and "2 counts to each of 2" in sched[0].splits
    assert sched[1].shape[1] == "16" and sched[1].dtype == "float64" and "2 of 4 experts" in sched[1].splits
    assert sched[2].shape == ("R", "16")
    fxpar.check(pms[0], ranks=pms)  # the ranks agree (at run time on gloo: tests/test_moe.py, test_comm_volume.py)


def test_a_rank_whose_moe_node_skips_the_exchange_is_caught_by_check_and_at_the_first_forward(moe_ranks):
    world, pms, x = moe_ranks()
    node = _moe_nodes(pms[1])[1]
    node.kwargs = {}  # rank 1 computes moes.1 with its own experts only, exchanging nothing
    pms[1].graph_module.recompile()
    with pytest.raises(fxpar.GraphInvariantError) as e:
        fxpar.check(pms[0], ranks=pms)
    msg = str(e.value)
    assert "issue different collectives" in msg and "mesh dim 'ep'" in msg
    assert "rank 0: forward all_to_all(ep) [4] int64 splits counts" in msg and "at %moe_experts_1" in msg
    assert "rank 1: forward all_gather(ep)" in msg or "rank 1: backward" in msg, msg
    with pytest.raises(fxpar.GraphInvariantError, match="collective order differs across the ranks of mesh dim 'ep'"):
        world.run(lambda r: pms[r](x))


def test_a_rank_with_another_expert_count_or_group_is_caught_naming_the_node(moe_ranks):
    world, pms, x = moe_ranks()
    node = _moe_nodes(pms[1])[0]
    node.args = (*node.args[:6], 8, *node.args[7:])  # num_experts 4 -> 8 on rank 1 only
    with pytest.raises(fxpar.GraphInvariantError) as e:
        fxpar.check(pms[0], ranks=pms)
    assert "%moe_experts" in str(e.value) and "routes over num_experts=8" in str(e.value)
    assert "moes.0.experts" in str(e.value) and "recompile the module" in str(e.value)

    world, pms, x = moe_ranks()
    node = _moe_nodes(pms[1])[0]
    node.kwargs = {**node.kwargs, "ep_group": "not-the-ep-group"}
    with pytest.raises(fxpar.GraphInvariantError,
                       match=r"exchanges tokens on group 'not-the-ep-group', but this rank's 'ep' group is"):
        fxpar.check(pms[0], ranks=pms)
