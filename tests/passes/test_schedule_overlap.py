"""schedule_overlap: one fsdp_prefetch issue node per FSDP unit after the first, right after the first gather of
the unit before; kept by dead-code elimination; checked (issue before wait, wait before use, bytes in flight);
listed in the collective fingerprint at its issue point, so ranks that reorder differently are caught."""

from __future__ import annotations

import pytest
import torch

import fxpar
from fxpar.analysis.fingerprint import collective_schedule
from fxpar.analysis.overlap import check_overlap, in_flight_estimate, in_flight_peak
from fxpar.testing.simulate import SimWorld
from pass_harness import calls, position, run_upto
from models import MLPStack

PREFETCH = torch.ops.fxpar.fsdp_prefetch.default
GATHER = torch.ops.fxpar.fsdp_all_gather.default


def _graph(**options):
    return run_upto("schedule_overlap", MLPStack(16, 32, 4), (torch.randn(8, 16),), {"fsdp": 2}, **options)


def _waits(issue):
    return [u for s in issue.args[0] for u in s.users if u.target is GATHER]


def test_one_issue_per_block_after_the_first_gather_of_the_block_before():
    gm = _graph()
    gm.graph.lint()
    issues = calls(gm, PREFETCH)
    assert [n.name for n in issues] == ["prefetch_layers_1", "prefetch_layers_2", "prefetch_layers_3"]
    gathers = calls(gm, GATHER)
    assert len(gathers) == 16
    pos = position(gm)
    for k, issue in enumerate(issues):
        waits = _waits(issue)
        assert len(waits) == 4 and all(pos[w] > pos[issue] for w in waits)
        assert {w.meta["fxpar"].fsdp_bucket for w in waits} == {f"layers.{k + 1}"}
        block_before = [g for g in gathers if g.meta["fxpar"].fsdp_bucket == f"layers.{k}"]
        assert pos[block_before[0]] < pos[issue] < pos[block_before[1]] or pos[issue] < min(pos[w] for w in waits)
        assert issue.meta["fxpar"].origin == "schedule_overlap"
    check_overlap(gm)


def test_issue_nodes_survive_dead_code_elimination():
    gm = _graph()
    gm.graph.eliminate_dead_code()
    assert len(calls(gm, PREFETCH)) == 3


def test_off_without_fsdp_with_overlap_false_and_per_parameter_units():
    assert not calls(_graph(overlap=False), PREFETCH)
    assert len(calls(_graph(fsdp_unit="param"), PREFETCH)) == 15  # 16 parameters: all but the first
    tp = run_upto("schedule_overlap", MLPStack(16, 32, 4), (torch.randn(8, 16),), {"tp": 2})
    assert not calls(tp, PREFETCH)


def test_fingerprint_lists_each_gather_where_it_communicates():
    gm = _graph()
    forward = [s for s in collective_schedule(gm, fxpar.dryrun.dry_mesh({"fsdp": 2})) if s.direction == "forward"]
    # block 0's gathers where they stand (nothing issues them earlier), the later blocks at their issue nodes
    block0 = set(calls(gm, GATHER)[:4])
    expected = [n.name for n in gm.graph.nodes if n in block0 or n.target is PREFETCH]
    assert [s.node for s in forward] == expected
    assert expected[0] == "fsdpgather_layers_0_up_weight" and expected[1] == "prefetch_layers_1"


def test_check_refuses_a_wait_before_its_issue_and_a_prefetch_two_blocks_early():
    gm = _graph()
    peak, _ = in_flight_peak(gm)
    assert 0 < peak <= in_flight_estimate(gm)
    issues = calls(gm, PREFETCH)
    issues[0].append(issues[2])  # block 3's gather issued where block 1's is: three blocks in flight
    with pytest.raises(fxpar.GraphInvariantError, match="in flight, over the estimate"):
        check_overlap(gm)
    gm = _graph()
    issue = calls(gm, PREFETCH)[0]
    pos = position(gm)
    max(_waits(issue), key=pos.__getitem__).append(issue)  # after its waits: they would gather by themselves
    with pytest.raises(fxpar.GraphInvariantError, match="before %prefetch_layers_1 issues it"):
        check_overlap(gm)


def test_ranks_that_reorder_differently_are_caught_across_ranks():
    world = SimWorld({"fsdp": 2})
    pms = world.parallelize(MLPStack(16, 32, 4), example_inputs=(torch.randn(8, 16),))
    fxpar.check(pms[0], ranks=pms)
    gm = pms[1].graph_module
    issue = calls(gm, PREFETCH)[0]
    calls(gm, GATHER)[0].prepend(issue)  # rank 1 issues block 1's gather before gathering block 0: same shapes
    fxpar.check(pms[1])  # a valid schedule on its own
    with pytest.raises(fxpar.GraphInvariantError, match="collective"):
        fxpar.check(pms[0], ranks=pms)
