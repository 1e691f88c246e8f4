"""fxpar.analysis.p2p_check: every pp rank's sends and recvs, from torch's schedule IR, pair up without a deadlock.

Correct pipelines pass on every schedule fxpar maps (structure on torch's fake
backend, one process; one pp x tp pipeline on real gloo ranks, where every rank
derives the same transfers and torch's own schedule agrees). The simulator's
rules on hand-written transfers; the bug zoo (tests/bugzoo/test_swapped_stage_order.py)
plants the bugs it exists for.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

import fxpar
from fxpar.analysis.schedule import _StandInStage
from fxpar.analysis.schedule import schedule_order
from fxpar.analysis.p2p_check import CutTensor, P2POp, P2PWait, check_p2p, lower_order, p2p_schedule, simulate_p2p
from fxpar.core.stages import SCHEDULES, stage_ranks
from fxpar.testing import rank_pool
from models import MLPStack, mse

MEGATRON = {"layers.*.up": "colwise", "layers.*.down": "rowwise"}
RUNTIME_SCHEDULES = [name for name, spec in SCHEDULES.items() if spec.multi]


def _pipeline(make_fake_mesh, schedule: str, tp: int, microbatches: int = 4):
    per = SCHEDULES[schedule].stages_per_rank or 2
    mesh = make_fake_mesh((2, tp), ("pp", "tp"))
    plan = fxpar.Plan(MEGATRON if tp > 1 else None, schedule=schedule, microbatches=microbatches)
    return fxpar.parallelize(MLPStack(depth=2 * per), mesh, example_inputs=(torch.randn(8, 16),), plan=plan)


def _transfers(programs) -> dict[tuple[str, int, int], list[tuple]]:
    """(kind, from pp rank, to pp rank) -> the keys of its ops, in issue order."""
    out: dict[tuple[str, int, int], list[tuple]] = {}
    for r, events in programs.items():
        for ev in events:
            if isinstance(ev, P2POp):
                src, dst = (r, ev.peer) if ev.kind == "send" else (ev.peer, r)
                out.setdefault((ev.kind, src, dst), []).append(ev.key)
    return out


@pytest.mark.parametrize("tp", [1, 2], ids=["pp2", "pp2xtp2"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved_1f1b", "zbv"])
def test_correct_pipelines_pass_and_every_cut_crossing_ranks_carries_each_microbatch_both_ways(
        make_fake_mesh, schedule, tp):
    pm = _pipeline(make_fake_mesh, schedule, tp)
    fxpar.check(pm)
    split = pm.split
    placed = stage_ranks(split.schedule, split.num_stages, split.pp_size)
    crossing = [c for c in range(split.num_stages - 1) if placed[c] != placed[c + 1]]
    if schedule == "zbv":  # a V: stages 1 and 2 share pp rank 1 and pass values without a transfer
        assert crossing == [0, 2]
    transfers = _transfers(p2p_schedule(pm))
    m = split.microbatches
    for c in crossing:
        a, b = placed[c], placed[c + 1]
        acts = [("activation", c, i) for i in range(m)]
        grads = [("gradient", c + 1, i) for i in range(m)]
        assert [k for k in transfers[("send", a, b)] if k[1] == c and k[0] == "activation"] == acts
        assert [k for k in transfers[("recv", a, b)] if k[1] == c and k[0] == "activation"] == acts
        assert [k for k in transfers[("send", b, a)] if k[1] == c + 1 and k[0] == "gradient"] == grads
        assert [k for k in transfers[("recv", b, a)] if k[1] == c + 1 and k[0] == "gradient"] == grads
    assert sum(map(len, transfers.values())) == 4 * m * len(crossing)


@pytest.mark.parametrize("data", ["dp", "fsdp"])
def test_pipelines_with_data_parallelism_pass(make_fake_mesh, data):
    mesh = make_fake_mesh((2, 2), (data, "pp"))
    pm = fxpar.parallelize(MLPStack(depth=2), mesh, example_inputs=(torch.randn(8, 16),),
                           plan=fxpar.Plan(schedule="1f1b", microbatches=2))
    fxpar.check(pm)
    send = next(ev for ev in p2p_schedule(pm)[0] if isinstance(ev, P2POp) and ev.kind == "send")
    assert send.tensors[0].shape[1:] == ("16",)


def test_transfers_carry_the_cut_values_at_their_local_shapes(make_fake_mesh):
    pm = _pipeline(make_fake_mesh, "1f1b", 2)
    events = p2p_schedule(pm)[0]
    send = next(ev for ev in events if isinstance(ev, P2POp) and ev.kind == "send")
    recv = next(ev for ev in events if isinstance(ev, P2POp) and ev.kind == "recv")
    # Megatron blocks: the residual stream crosses the cut, before and after its backward all_reduce.
    assert [t.source for t in send.tensors] == [(0, 0), (0, 1)]
    assert all(t.shape[1:] == ("16",) and t.dtype == torch.float32 for t in send.tensors)
    assert (send.peer, send.what, send.stage, send.microbatch, send.action) == (1, "activation", 0, 0, "0SEND_F0")
    received = [t.source for t in recv.tensors]  # stage 1's inputs: the gradients of what stage 0 sent
    assert (recv.what, recv.stage, received) == ("gradient", 1, [(0, 0), (0, 1)])
    wait = next(ev for ev in events if isinstance(ev, P2PWait))
    assert wait.recv is recv and wait.action == "0B0"


@pytest.mark.parametrize("name", RUNTIME_SCHEDULES)
def test_the_lowering_is_torch_s_own_pipeline_order_with_comms(name):
    pp, per, m = 2, SCHEDULES[name].stages_per_rank or 2, 4
    stages = 2 * per
    placed = stage_ranks(name, stages, pp)
    sched = SCHEDULES[name].cls([_StandInStage(k, stages, pp, 0) for k in range(stages) if placed[k] == 0], m,
                                loss_fn=lambda out, target: out, scale_grads=False)
    assert lower_order(sched.pipeline_order, placed, stages, microbatches=m) == sched.pipeline_order_with_comms


def test_a_dry_run_pipeline_is_checked_without_process_groups():
    report = fxpar.plan(MLPStack(depth=8), {"pp": 4, "tp": 2}, example_inputs=(torch.randn(8, 16),),
                        plan=fxpar.Plan(MEGATRON, schedule="interleaved_1f1b", microbatches=8))
    fxpar.check(report.module)
    programs = p2p_schedule(report.module)
    assert sorted(programs) == [0, 1, 2, 3]
    assert {r: sum(isinstance(ev, P2POp) for ev in p) for r, p in programs.items()} == {0: 48, 1: 64, 2: 64, 3: 48}


# --------------------------------------------------------------------------- the simulator's rules


T = (CutTensor("h", (0, 0), ("4", "8"), torch.float32),)


def _send(peer, what, stage, tensors=T):
    return P2POp("send", peer, what, stage, 0, tensors, action=f"{stage}SEND")


def _recv(peer, what, stage, tensors=T):
    return P2POp("recv", peer, what, stage, 0, tensors, action=f"RECV from {stage}")


def test_pairs_in_a_consistent_order_pass_crossed_waits_deadlock_and_unreceived_sends_are_named():
    got_act, got_grad = _recv(0, "activation", 0), _recv(1, "gradient", 1)
    check = {0: [_send(1, "activation", 0), got_grad, P2PWait(got_grad, 3, "0B0")],
             1: [got_act, P2PWait(got_act, 1, "1F0"), _send(0, "gradient", 1)]}
    simulate_p2p(check)
    crossed = {0: [got_grad, P2PWait(got_grad, 1, "0B0"), _send(1, "activation", 0)],
               1: [got_act, P2PWait(got_act, 1, "1F0"), _send(0, "gradient", 1)]}
    with pytest.raises(fxpar.GraphInvariantError) as e:
        simulate_p2p(crossed, schedule="1f1b")
    msg = str(e.value)
    assert "pipeline transfers under schedule '1f1b' deadlock: no pp rank can go on" in msg
    assert ("pp rank 0 at step 1 (0B0) waits for its recv <- pp rank 1: stage 1 -> 0 gradients of microbatch 0 "
            "(posted by RECV from 1 at step 0); pp rank 1 has posted no matching send: it is stuck at step 1 (1F0) "
            "waiting for stage 0 -> 1 activations of microbatch 0 from pp rank 0") in msg
    assert "pp rank 1 at step 1 (1F0) waits for its recv <- pp rank 0" in msg
    orphan = {0: [_send(1, "activation", 0)], 1: []}
    with pytest.raises(fxpar.GraphInvariantError, match=r"pp rank 0 at the end of the step waits for its send -> pp "
                                                        r"rank 1: stage 0 -> 1 activations of microbatch 0 \(0SEND at "
                                                        r"step 0\) to be received; pp rank 1 finished its step without "
                                                        r"posting a matching recv"):
        simulate_p2p(orphan)


def test_a_pair_with_tensors_of_another_shape_is_named_with_both_sides():
    other = (CutTensor("x", (0, 0), ("8", "4"), torch.float32),)
    with pytest.raises(fxpar.GraphInvariantError, match=r"tensor 0 differs: pp rank 0 sends %h \[4, 8\] float32 but "
                                                        r"pp rank 1 receives into %x \[8, 4\] float32"):
        simulate_p2p({0: [_send(1, "activation", 0)], 1: [_recv(0, "activation", 0, other)]})


# --------------------------------------------------------------------------- real ranks


def _pp2_tp2_zbv() -> dict:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    torch.manual_seed(0)
    model = MLPStack(depth=4)
    x, target = torch.randn(8, 16), torch.randn(8, 16)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,),
                           plan=fxpar.Plan(MEGATRON, schedule="zbv", microbatches=4))
    fxpar.check(pm)
    check_p2p(pm)
    same_order = pm.pipeline_order() == schedule_order(pm.split)  # torch's schedule on real stages
    loss = pm.step(x, target=target, loss_fn=mse)  # the transfers the check derived do run
    programs = {r: [str(ev) if isinstance(ev, P2POp) else f"wait {ev.action}" for ev in p]
                for r, p in p2p_schedule(pm).items()}
    return {"same_order": same_order, "programs": programs, "loss": float(loss)}


def test_every_real_rank_derives_the_same_transfers_as_torch_s_schedule_runs_them():
    results = rank_pool(4).run(_pp2_tp2_zbv, timeout=120)
    assert all(r["same_order"] for r in results)
    assert all(r["programs"] == results[0]["programs"] for r in results)
    assert len({r["loss"] for r in results}) == 1
