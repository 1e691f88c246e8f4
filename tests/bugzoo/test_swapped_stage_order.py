"""Bug: pipeline stages, or the values crossing a cut, in the wrong order.

A faulty split calls the stage modules in another order than their index
(each stage then runs on another stage's activations), places a stage on a pp
rank where torch's schedule does not run it, or gives a stage its inputs in
another order than the previous stage's outputs (torch sends them by
position: swapped silently when their shapes agree); a faulty schedule runs
one rank's stages in swapped order, or posts its sends in another order than
the peer posts the recvs. All are caught statically from one rank's (here a
dry run's) module: the first two by the stage checks, the others by deriving
every pp rank's sends and recvs from torch's schedule IR and simulating them
(`fxpar.analysis.p2p_check`).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from torch.distributed.pipelining.schedules import _Action, _ComputationType

import fxpar
from fxpar.analysis.schedule import schedule_order
from fxpar.analysis.p2p_check import P2POp, check_p2p, p2p_from_order, p2p_schedule, simulate_p2p
from fxpar.core.spec import get_info, set_info
from zoo import Block, Stack

F, B = _ComputationType.FORWARD, _ComputationType.FULL_BACKWARD


class SkipStack(nn.Module):
    """Blocks with a skip from the input to the output: two same-shape values cross every cut."""

    def __init__(self, depth: int = 2, d: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(d) for _ in range(depth)])

    def forward(self, x):
        h = x
        for layer in self.layers:
            h = layer(h)
        return h + x.mean(dim=-1, keepdim=True)


def _dry_run_pipeline(make_fake_mesh, model=None, schedule: str | None = None, depth: int = 4):
    mesh = make_fake_mesh((2,), ("pp",))
    plan = fxpar.Plan(schedule=schedule) if schedule else None
    return fxpar.parallelize(model or Stack(depth=depth), mesh, example_inputs=(torch.randn(8, 8),), plan=plan)


def test_stage_calls_in_the_wrong_order_are_caught_statically(make_fake_mesh):
    pm = _dry_run_pipeline(make_fake_mesh)
    fxpar.check(pm)
    calls = [n for n in pm.graph_module.graph.nodes if n.op == "call_module" and str(n.target).startswith("stage_")]
    calls[0].target, calls[1].target = calls[1].target, calls[0].target  # stage 1 runs first, on the inputs
    pm.graph_module.recompile()
    with pytest.raises(fxpar.ScheduleError, match=r"calls its stages in the order \[1, 0\], not 0..1 \(first out of "
                                                  r"place: %stage_0 calls stage_1\): a swapped stage order"):
        fxpar.check(pm)


def test_stage_placed_on_the_wrong_pp_rank_is_caught_statically(make_fake_mesh):
    pm = _dry_run_pipeline(make_fake_mesh)
    split = pm.split
    pm.split = dataclasses.replace(split, stages=tuple(dataclasses.replace(s, rank=1 - s.rank) for s in split.stages))
    with pytest.raises(fxpar.ScheduleError, match=r"stage 0 \(.*\) is assigned to pp rank 1, but torch's '\w+' "
                                                  r"schedule runs it on pp rank 0"):
        fxpar.check(pm)
    # The transfer check on its own sees it too: rank 0's schedule runs a stage it does not hold.
    with pytest.raises(fxpar.GraphInvariantError, match=r"pp rank 0 runs 0F0 at compute action #0 of torch's '1f1b' "
                                                        r"schedule, but the split placed stage 0 on pp rank 1"):
        check_p2p(pm)


def _swap_cut_values(pm, stage: int = 1) -> tuple[str, str]:
    """Gives stage `stage` its two inputs in the other order, the parent's call too: the same program, but
    its inputs no longer line up with the previous stage's outputs by position."""
    gm = pm.graph_module.get_submodule(f"stage_{stage}")
    a, b = [n for n in gm.graph.nodes if n.op == "placeholder"]
    a.prepend(b)
    gm.recompile()
    call = next(n for n in pm.graph_module.graph.nodes if n.target == f"stage_{stage}")
    call.args = (call.args[1], call.args[0])
    pm.graph_module.recompile()
    return a.name, b.name


def test_cut_values_in_swapped_order_are_caught_though_the_parent_graph_is_still_right(make_fake_mesh):
    pm = _dry_run_pipeline(make_fake_mesh, SkipStack(), schedule="gpipe")
    fxpar.check(pm)
    first, second = _swap_cut_values(pm)
    # Each edge of the parent graph still agrees (placements, local shapes): only torch's positional transfer breaks.
    with pytest.raises(fxpar.GraphInvariantError) as e:
        fxpar.check(pm)
    msg = str(e.value)
    assert msg.startswith("pipeline transfer under schedule 'gpipe' stage 0 -> 1 activations of microbatch 0 "
                          "(pp rank 0 (rank 0) 0SEND_F0 at step 2 -> pp rank 1 (rank 1) 1RECV_F0 at step 1): "
                          f"tensor 0 is stage 0's output 0 (%{first} [s77, 8] float32) on pp rank 0 (rank 0)'s side, "
                          f"but on pp rank 1 (rank 1)'s side position 0 is %{second} [s77, 8] float32 and the split "
                          "parent's graph wires it to stage 0's output 1"), msg
    assert "the cut values of stage 0 are in a different order on the two sides" in msg
    assert "fix: split_stages must give each stage exactly the previous stage's outputs as inputs, in the same order" \
        in msg


def test_a_cut_value_received_as_another_dtype_is_caught(make_fake_mesh):
    pm = _dry_run_pipeline(make_fake_mesh, SkipStack(), schedule="1f1b")
    holder = [n for n in pm.graph_module.get_submodule("stage_1").graph.nodes if n.op == "placeholder"][1]
    info = get_info(holder)
    set_info(holder, dataclasses.replace(info, spec=dataclasses.replace(info.spec, dtype=torch.bfloat16)))
    with pytest.raises(fxpar.GraphInvariantError, match=r"stage 0 -> 1 activations of microbatch 0 .*: tensor 1 "
                                                        r"differs: pp rank 0 \(rank 0\) sends %contiguous_add "
                                                        r"\[s77, 8\] float32 but pp rank 1 \(rank 1\) receives "
                                                        r"into %add \[s77, 8\] bfloat16"):
        fxpar.check(pm)


def test_one_rank_running_its_stages_in_swapped_order_deadlocks_and_names_both_sides(make_fake_mesh):
    pm = _dry_run_pipeline(make_fake_mesh, schedule="interleaved_1f1b")
    order = schedule_order(pm.split)
    check_p2p(pm, order=order)
    # pp rank 1 holds stages 1 and 3: it runs stage 3's first forward before stage 1's.
    ops = order[1]
    i, j = ops.index(_Action(1, F, 0)), ops.index(_Action(3, F, 0))
    ops[i], ops[j] = ops[j], ops[i]
    with pytest.raises(fxpar.GraphInvariantError) as e:
        check_p2p(pm, order=order)
    msg = str(e.value)
    assert "the pipeline schedule 'interleaved_1f1b' deadlocks" in msg
    assert "pp rank 0 at its compute action #2 (2F0): waits for stage 1's activations of microbatch 0 " \
           "(from 1F0 on pp rank 1)" in msg
    assert "pp rank 1 at its compute action #0 (3F0): waits for stage 2's activations of microbatch 0 " \
           "(from 2F0 on pp rank 0)" in msg
    assert "fix: every pp rank must run the stages the split gave it in torch's order" in msg


def test_sends_posted_in_another_order_than_the_peer_receives_are_caught(make_fake_mesh):
    pm = _dry_run_pipeline(make_fake_mesh, schedule="gpipe", depth=2)
    programs = p2p_schedule(pm)
    simulate_p2p(programs)
    sends = [k for k, ev in enumerate(programs[0]) if isinstance(ev, P2POp) and ev.kind == "send"]
    programs[0][sends[0]], programs[0][sends[1]] = programs[0][sends[1]], programs[0][sends[0]]
    with pytest.raises(fxpar.GraphInvariantError, match=r"pair up wrongly between pp rank 0 and pp rank 1: the 1st "
                                                        r"send from pp rank 0 to pp rank 1 is stage 0 -> 1 activations "
                                                        r"of microbatch 1 \(0SEND_F1 at step 4\), but pp rank 1's 1st "
                                                        r"recv from pp rank 0 expects stage 0 -> 1 activations of "
                                                        r"microbatch 0"):
        simulate_p2p(programs)


def test_a_hand_written_order_with_a_rank_s_stages_swapped_is_refused_by_torch_s_lowering():
    stage_to_rank = {0: 0, 1: 1, 2: 0, 3: 1}
    order = {0: [_Action(0, F, 0), _Action(2, F, 0), _Action(2, B, 0), _Action(0, B, 0)],
             1: [_Action(1, F, 0), _Action(3, F, 0), _Action(3, B, 0), _Action(1, B, 0)]}
    simulate_p2p(p2p_from_order(order, stage_to_rank, 4))
    order[1][0], order[1][1] = order[1][1], order[1][0]  # swapped: stage 3 before stage 1
    with pytest.raises(fxpar.GraphInvariantError, match=r"deadlocks(.|\n)*pp rank 1 at its compute action #0 \(3F0\)"):
        p2p_from_order(order, stage_to_rank, 4)
