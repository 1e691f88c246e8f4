"""fxpar.check on reordered graphs: issue / wait pairs, the same collectives in the same order on every rank
(forward as the graph orders them, backward as the runtime issues them), in-flight bytes within the estimate.
Each invariant with a planted bug that check catches, naming the node, its module and the fix."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.fx as fx

import fxpar
from fxpar.analysis.overlap import check_issue_waits, check_overlap, in_flight_estimate, in_flight_peak
from fxpar.analysis.timeline import backward_order
from fxpar.core.spec import get_info, set_info
from fxpar.passes import schedule_overlap
from fxpar.testing.simulate import SimWorld

from tests.models import BlockStack, mse

PREFETCH = torch.ops.fxpar.fsdp_prefetch.default
GATHER = torch.ops.fxpar.fsdp_all_gather.default
X = torch.randn(8, 4, 32)


def _fsdp_world(passes=None):
    world = SimWorld({"fsdp": 2})
    return world.parallelize(BlockStack(), example_inputs=(X,), passes=passes)


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


# --------------------------------------------------------------------------- issue / wait pairs

def _functional_graph(early_use: bool, waited: bool = True) -> fx.GraphModule:
    """x -> all_reduce (issued) -> [relu of the pending value] -> wait_tensor -> mul, in torch's functional form."""
    c10d = torch.ops._c10d_functional
    g = fx.Graph()
    x = g.placeholder("x")
    pending = g.call_function(c10d.all_reduce.default, (x, "sum", "0"))
    early = g.call_function(torch.ops.aten.relu.default, (pending,)) if early_use else None
    out = g.call_function(c10d.wait_tensor.default, (pending,)) if waited else pending
    y = g.call_function(torch.ops.aten.mul.Tensor, (out, 2.0))
    g.output((y, early) if early is not None else y)
    return fx.GraphModule(torch.nn.Module(), g)


def test_functional_issue_and_wait_in_order_pass():
    check_issue_waits(_functional_graph(early_use=False))


def test_a_use_of_an_issued_value_before_its_wait_is_caught():
    with pytest.raises(fxpar.GraphInvariantError) as e:
        check_issue_waits(_functional_graph(early_use=True))
    msg = str(e.value)
    assert "relu.default at %relu" in msg and "reads %all_reduce" in msg and "before its wait %wait_tensor" in msg
    assert "in the root module" in msg and "move the wait up to just before the first use" in msg


def test_an_issued_collective_never_waited_is_caught():
    with pytest.raises(fxpar.GraphInvariantError, match=r"all_reduce.default at %all_reduce\w* .*no wait_tensor waits "
                                                        r"for.*add the wait_tensor"):
        check_issue_waits(_functional_graph(early_use=False, waited=False))


def _async_graph(read_issue: bool) -> fx.GraphModule:
    """x -> fxpar.all_reduce_start (issued) -> wait_issued -> mul; planted: the mul reads the issue, not the wait."""
    from fxpar.ops.async_tp import WAIT_OP

    g = fx.Graph()
    x = g.placeholder("x")
    issue = g.call_function(torch.ops.fxpar.all_reduce_start.default, (x, "0", "tp"), name="issue")
    wait = g.call_function(WAIT_OP, (issue,), name="wait")
    y = g.call_function(torch.ops.aten.mul.Tensor, (issue if read_issue else wait, 2.0), name="mul")
    g.output((y, wait))
    return fx.GraphModule(torch.nn.Module(), g)


def test_async_tp_and_functional_issues_share_one_check_and_one_message():
    check_issue_waits(_async_graph(read_issue=False))
    with pytest.raises(fxpar.GraphInvariantError) as e:
        check_issue_waits(_async_graph(read_issue=True))  # after the wait in graph order, still the issue's buffer
    msg = str(e.value)
    assert "mul.Tensor at %mul" in msg and "reads %issue, issued by fxpar.all_reduce_start.default at %issue" in msg
    assert "instead of its wait %wait's value" in msg
    assert "the collective is still in flight there" in msg and "rerun fxpar.passes.async_tp" in msg
    with pytest.raises(fxpar.GraphInvariantError) as f:
        check_issue_waits(_functional_graph(early_use=True))
    # the same format for both kinds: '<reader>: reads %<issued>, issued by <issue>, <where>: ... in flight there'
    assert str(f.value).split(": reads ")[1].split(", issued by ")[0] == "%all_reduce_default"
    assert "before its wait %wait_tensor_default: the collective is still in flight there" in str(f.value)


def test_fsdp_wait_moved_before_its_issue_is_caught():
    pms = _fsdp_world()
    gm = pms[0].graph_module
    issue = _node(gm, "prefetch_blocks_2")
    _node(gm, "fsdpgather_blocks_2_up_weight").append(issue)  # block 2's first gathers now wait before the issue
    gm.graph.lint()
    with pytest.raises(fxpar.GraphInvariantError) as e:
        fxpar.check(pms[0])
    msg = str(e.value)
    assert "at %fsdpgather_blocks_2_" in msg and "before %prefetch_blocks_2 issues it" in msg
    assert "in module 'blocks.2" in msg and "rerun fxpar.passes.schedule_overlap" in msg


def test_units_issued_too_early_exceed_the_in_flight_estimate():
    pms = _fsdp_world()
    gm = pms[0].graph_module
    first = next(n for n in gm.graph.nodes if n.target is GATHER)
    for name in ("prefetch_blocks_2", "prefetch_blocks_3"):  # every block issued at the start: four in flight
        issue = _node(gm, name)
        first.append(issue)
        for s in issue.args[0]:
            issue.prepend(s)
    gm.graph.lint()
    assert in_flight_peak(gm)[0] > in_flight_estimate(gm)
    with pytest.raises(fxpar.GraphInvariantError) as e:
        check_overlap(gm)
    msg = str(e.value)
    assert "of gathered FSDP parameters in flight, over the estimate" in msg and "more than one unit early" in msg
    assert "in module 'blocks." in msg


# --------------------------------------------------------------------------- the same order on every rank

def test_reordered_graphs_agree_across_ranks():
    pms = _fsdp_world()
    fxpar.check(pms[0], ranks=pms)
    order = backward_order(pms[0])
    kinds = [label.split(" of ")[0] + (" re-gather" if "re-gather" in label else "") for _, label, _ in order
             if "fsdp" in label and " of blocks" in label]
    assert kinds.count("all_gather(fsdp) re-gather") == 4 and kinds.count("reduce_scatter(fsdp)") == 4


def test_a_prefetch_moved_on_one_rank_is_caught_across_ranks():
    pms = _fsdp_world()
    gm = pms[1].graph_module
    issue = _node(gm, "prefetch_blocks_1")
    _node(gm, "fsdpgather_blocks_0_norm_weight").prepend(issue)  # rank 1 issues block 1 before block 0's gather
    for s in issue.args[0]:
        issue.prepend(s)
    gm.graph.lint()
    fxpar.check(pms[1])  # on its own the graph is fine: two blocks in flight at most, each issued before its wait
    with pytest.raises(fxpar.GraphInvariantError) as e:
        fxpar.check(pms[0], ranks=pms)
    msg = str(e.value)
    assert "the ranks of group" in msg and "mesh dim 'fsdp'" in msg and "first difference at collective #0" in msg
    assert "rank 0: forward fsdp_all_gather(fsdp) [16] float32 at %fsdpgather_blocks_0_norm_weight in 'blocks.0" in msg
    assert "rank 1: forward all_gather(fsdp)" in msg and "at %prefetch_blocks_1 in 'blocks.0" in msg


def test_fsdp_units_tagged_differently_on_one_rank_are_caught_in_the_backward():
    """The runtime gathers and reduce-scatters a unit per fsdp_bucket tag: retagging block 3 as part of block 2
    on one rank leaves the forward fingerprint unchanged (same gathers, same issue nodes) but rank 1 would
    reduce-scatter two blocks at once while rank 0 reduce-scatters one: a hang."""
    pms = _fsdp_world([p for p in fxpar.default_passes() if p is not schedule_overlap])  # no prefetch: fewer nodes
    for n in pms[1].graph_module.graph.nodes:
        info = get_info(n)
        if n.target is GATHER and info.fsdp_bucket == "blocks.3":
            set_info(n, dataclasses.replace(info, fsdp_bucket="blocks.2"))
    with pytest.raises(fxpar.GraphInvariantError) as e:
        fxpar.check(pms[0], ranks=pms)
    msg = str(e.value)
    assert "issue different collectives in the backward, as the runtime runs it" in msg
    assert "rank 0: all_gather(fsdp) of blocks.3 (re-gather)" in msg
    assert "rank 1: all_gather(fsdp) of blocks.2 (re-gather)" in msg and "fsdp_bucket tags" in msg


# --------------------------------------------------------------------------- in-flight bytes vs the runtime (2 gloo ranks)

def _gathered_peaks():
    from fxpar.runtime.fsdp_state import peak_gathered_bytes, reset_peak_gathered_bytes

    torch.manual_seed(0)
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("fsdp",))
    x, y = torch.randn(8, 4, 32, dtype=torch.float64), torch.randn(8, 4, 32, dtype=torch.float64)
    out = {}
    for name, kwargs in {"overlap": {}, "waiting": {"overlap": False}, "param": {"fsdp_unit": "param"}}.items():
        pm = fxpar.parallelize(BlockStack().double(), mesh, example_inputs=(x,), **kwargs)
        fxpar.check(pm)
        pm.step(x, target=y, loss_fn=mse)  # warm: the first step also exchanges fingerprints
        reset_peak_gathered_bytes()
        pm.step(x, target=y, loss_fn=mse)
        gm = pm.graph_module
        out[name] = dict(runtime=peak_gathered_bytes(), peak=in_flight_peak(gm)[0], estimate=in_flight_estimate(gm),
                         issues=sum(n.target is PREFETCH for n in gm.graph.nodes))
    return out


def test_gathered_bytes_the_runtime_holds_stay_within_the_estimate():
    from fxpar.testing import rank_pool

    for r in rank_pool(2).run(_gathered_peaks):
        assert r["overlap"]["issues"] == 3 and r["waiting"]["issues"] == 0
        for name, p in r.items():
            # the whole step, forward and backward (re-gathered block + the one prefetched under it)
            assert 0 < p["runtime"] <= p["estimate"], (name, p)
            assert p["peak"] <= p["estimate"], (name, p)
        # one float64 block of BlockStack is 65.75 KiB: the backward holds one block re-gathered at a time
        assert r["overlap"]["runtime"] == r["waiting"]["runtime"]


# --------------------------------------------------------------------------- a pipeline: stages differ per pp rank

def _pipeline_gathers_swapped(plant: bool) -> dict:
    import torch.distributed as dist

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2, 2), mesh_dim_names=("fsdp", "pp"))
    torch.manual_seed(0)
    x, y = torch.randn(8, 4, 32, dtype=torch.float64), torch.randn(8, 4, 32, dtype=torch.float64)
    pm = fxpar.parallelize(BlockStack().double(), mesh, example_inputs=(x,))
    stages = [getattr(s, "graph_module", s) for s in pm.stage_modules]
    names = [[n.name for n in gm.graph.nodes if n.target is GATHER] for gm in stages]
    fxpar.check(pm)
    if plant and dist.get_rank() >= 2:  # fsdp rank 1 of each pp stage (mesh (fsdp, pp)) gathers two weights swapped
        for gm in stages:
            a, b = [n for n in gm.graph.nodes if n.target is GATHER][:2]
            b.args[0].append(b)  # b right after its shard, ahead of a: still valid on this rank alone
            gm.graph.lint()
            gm.recompile()
        fxpar.check(pm)
    try:
        loss = float(pm.step(x, target=y, loss_fn=mse))
        error = ""
    except fxpar.GraphInvariantError as e:
        loss, error = None, str(e)
    return dict(rank=dist.get_rank(), coordinate=list(pm.mesh_info.coordinate), gathers=names, loss=loss, error=error)


@pytest.mark.slow  # 4 gloo ranks, twice
def test_a_pipeline_whose_stages_differ_per_rank_is_compared_within_each_group():
    from fxpar.testing import rank_pool

    clean = rank_pool(4).run(_pipeline_gathers_swapped, False, timeout=300)
    assert all(r["error"] == "" and r["loss"] == clean[0]["loss"] for r in clean)
    by_pp = {r["rank"] % 2: r["gathers"] for r in clean}  # mesh (fsdp, pp): the pp coordinate is rank % 2
    assert by_pp[0] != by_pp[1] and all(by_pp.values())  # the pp ranks run different stages, each with gathers
    planted = rank_pool(4).run(_pipeline_gathers_swapped, True, timeout=300)
    for r in planted:  # every rank of every fsdp group stops before the step runs, naming the first difference
        assert "collective order differs across the ranks of mesh dim 'fsdp'" in r["error"], r
        # a pipeline's FSDP gathers are not issued early: their order shows in their reduce-scatter duals
        assert "backward reduce_scatter(fsdp)" in r["error"] and "at %fsdpgather_" in r["error"] and r["loss"] is None
