"""Pipeline send/recv pairs, derived from torch's schedule IR and simulated: they match and cannot deadlock.

Every pp rank can see every stage's graph (other ranks' stages are
storage-free stand-ins), so one rank, or a dry run, derives what all pp ranks
of its pipeline will send and receive, without a process group:

    compute order  torch's schedule IR per pp rank (`fxpar.analysis.schedule.schedule_order`:
                   the schedule built on stand-in stages; GPipe and 1F1B as their
                   `_step_microbatches` run them)
    lowering       torch's `_add_send_recv` (`lower_order`), as `_PipelineScheduleRuntime`
                   lowers it into `pipeline_order_with_comms`: after F(s, i), SEND_F(s, i)
                   to rank(s+1) and RECV_F(s+1, i) there; after B or I(s, i), SEND_B(s, i)
                   to rank(s-1) and RECV_B(s-1, i) there; nothing between two stages on one
                   rank (V schedules). An order it cannot lower deadlocks in compute.
    tensors        (`stage_cuts`) SEND_F(s, i) sends stage s's outputs in order;
                   RECV_F(s, i) receives stage s's inputs in order; SEND_B(s, i) sends the
                   gradients of s's floating-point inputs, RECV_B(s, i) receives those of
                   its floating-point outputs (torch's PipelineStage: requires_grad =
                   is_floating_point); each tensor at its local shape and dtype, and
                   named by the cut value it is, (producing stage, output position)
                   from the split parent's wiring.
    run            (`simulate_p2p`) as `_PipelineScheduleRuntime._step_microbatches`:
                   SEND and RECV post isend / irecv and go on; F(s, i) waits for its
                   RECV_F, B and I(s, i) for their RECV_B; the step's end waits for every
                   send. Between two ranks, untagged point-to-point ops pair in the order
                   they are posted, per direction (gloo and NCCL). GPipe and 1F1B run
                   their own loops (`PipelineScheduleSingle`): they post the same
                   transfers in the same order per pair, but also wait for some sends
                   before the step's end (GPipe before its backwards, 1F1B at each fused
                   send/recv), which this model leaves out.

A pairing is correct when the k-th send from rank a to rank b and the k-th
recv on b from a are the same transfer (direction, sending stage,
microbatch) with the same tensors (count, cut value per position, local
shape, dtype), and the run ends with every rank done and every send
received. `check_p2p(pm)` checks all of it for a PipelineModule; a pipeline
from a hand-written compute order goes through `p2p_from_order` and
`simulate_p2p`.
"""

from __future__ import annotations

import logging
import operator
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx

from fxpar._torch.pipelining import ComputationType, add_reduce_grad, add_send_recv, add_unshard_reshard
from fxpar.analysis.schedule import schedule_order
from fxpar.core.errors import GraphInvariantError
from fxpar.core.spec import TensorSpec, get_info
from fxpar.core.stages import stage_ranks

__all__ = [
    "CutTensor",
    "StageCut",
    "P2POp",
    "P2PWait",
    "stage_cuts",
    "lower_order",
    "p2p_from_order",
    "p2p_schedule",
    "simulate_p2p",
    "check_p2p",
]

log = logging.getLogger(__name__)

_FIX_ORDER = ("every pp rank must run the stages the split gave it in torch's order for the schedule: keep "
              "split_stages' placement (fxpar.core.stages.stage_ranks) and torch's own schedule order")
_FIX_CUT = ("split_stages must give each stage exactly the previous stage's outputs as inputs, in the same order, "
            "at the same local shape and dtype: torch sends and receives them by position")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class CutTensor:
    """One tensor crossing a cut, as one side of the cut sees it.

    Attributes:
        name: the stage graph's node (an output value or an input placeholder).
        source: the cut value it is, (producing stage, output position), from the
            split parent's wiring; None for an input the previous stage does not feed.
        shape: its local shape, symbolic sizes as text.
        dtype: its dtype.
    """

    name: str
    source: tuple[int, int] | None
    shape: tuple[str, ...]
    dtype: torch.dtype | None

    def __str__(self) -> str:
        dtype = str(self.dtype).replace("torch.", "") if self.dtype is not None else "?"
        return f"%{self.name} [{', '.join(self.shape)}] {dtype}"


@dataclass(frozen=True)
class StageCut:
    """What a stage receives (its inputs) and sends on (its outputs), in torch's positional order."""

    inputs: tuple[CutTensor, ...] = ()
    outputs: tuple[CutTensor, ...] = ()


@dataclass(frozen=True)
class P2POp:
    """One send or recv a pp rank posts (a batch of tensors, one torch P2POp each).

    Attributes:
        kind: 'send' or 'recv'.
        peer: the pp rank on the other side.
        what: 'activation' (stage -> stage + 1) or 'gradient' (stage -> stage - 1).
        stage: the sending stage.
        microbatch: the microbatch.
        tensors: the tensors, in the order torch posts them.
        step: position in the rank's lowered schedule.
        action: torch's IR action that posts it ('0SEND_F1').
    """

    kind: str
    peer: int
    what: str
    stage: int
    microbatch: int
    tensors: tuple[CutTensor, ...] = ()
    step: int = 0
    action: str = ""

    @property
    def key(self) -> tuple[str, int, int]:
        return self.what, self.stage, self.microbatch

    def transfer(self) -> str:
        to = self.stage + 1 if self.what == "activation" else self.stage - 1
        return f"stage {self.stage} -> {to} {self.what}s of microbatch {self.microbatch}"

    def __str__(self) -> str:
        arrow = "->" if self.kind == "send" else "<-"
        return f"{self.kind} {arrow} pp rank {self.peer}: {self.transfer()} ({self.action} at step {self.step})"


@dataclass(frozen=True)
class P2PWait:
    """A compute action that cannot start before a recv the rank posted has its data."""

    recv: P2POp
    step: int
    action: str


# --------------------------------------------------------------------------- tensors of each cut


def _tensor(node: fx.Node, source: tuple[int, int] | None) -> CutTensor:
    info = get_info(node)
    spec = info.spec if info is not None and isinstance(info.spec, TensorSpec) else None
    val = node.meta.get("val")
    shape = spec.local_shape if spec is not None else tuple(getattr(val, "shape", ()))
    dtype = spec.dtype if spec is not None else getattr(val, "dtype", None)
    return CutTensor(node.name, source, tuple(str(s) for s in shape), dtype)


def stage_cuts(parent: fx.GraphModule) -> dict[int, StageCut]:
    """Every stage's inputs and outputs as torch transfers them, read from the split parent and stage graphs.

    A stage's output at position j is the cut value (stage, j); its input
    placeholder at position j is whatever the parent feeds there: (t, i) for
    `getitem(stage_t, i)`, None for anything else (a root input, a constant).
    """
    cuts: dict[int, StageCut] = {}
    calls = {str(n.target): n for n in parent.graph.nodes if n.op == "call_module"
             and str(n.target).startswith("stage_")}
    index = {name: int(name.rpartition("_")[2]) for name in calls}
    for name, call in calls.items():
        k = index[name]
        stage = parent.get_submodule(name)
        holders = [n for n in stage.graph.nodes if n.op == "placeholder"]
        inputs = []
        for holder, arg in zip(holders, call.args):
            source = None
            if isinstance(arg, fx.Node) and arg.target is operator.getitem and isinstance(arg.args[0], fx.Node) \
                    and str(arg.args[0].target) in index:
                source = (index[str(arg.args[0].target)], int(arg.args[1]))
            inputs.append(_tensor(holder, source))
        out = next((n for n in stage.graph.nodes if n.op == "output"), None)
        values = out.args[0] if out is not None else ()
        values = values if isinstance(values, (tuple, list)) else (values,)
        outputs = [_tensor(v, (k, j)) for j, v in enumerate(values) if isinstance(v, fx.Node)]
        cuts[k] = StageCut(tuple(inputs), tuple(outputs))
    return cuts


def _grads(tensors: Sequence[CutTensor]) -> tuple[CutTensor, ...]:
    return tuple(t for t in tensors if t.dtype is not None and (t.dtype.is_floating_point or t.dtype.is_complex))


# --------------------------------------------------------------------------- torch's IR


def lower_order(order: Mapping[int, Sequence], stage_to_rank: Mapping[int, int], num_stages: int,
                *, microbatches: int | None = None, schedule: str = "") -> dict[int, list]:
    """Each pp rank's compute order with its sends and recvs, lowered as torch lowers it.

    The chain of `_PipelineScheduleRuntime._prepare_schedule_with_comms`:
    `_add_unshard_reshard` and `_add_reduce_grad` per rank, then
    `_add_send_recv` across ranks (its placement of recvs depends on the
    actions before them), so a runtime schedule's result equals its
    `pipeline_order_with_comms`.

    Args:
        order: per pp rank, torch `_Action`s (None for idle steps).
        stage_to_rank: the pp rank of each stage, as torch's schedule places them.
        num_stages: S.
        microbatches: M (default: one more than the largest microbatch index).
        schedule: the schedule's name, for messages.

    Returns:
        Per pp rank, compute and communication actions in issue order.

    Raises:
        GraphInvariantError: the compute order deadlocks (torch cannot place its
            sends and recvs), naming each stuck rank's next action and what it waits for.
    """

    if microbatches is None:
        microbatches = 1 + max((p.microbatch_index or 0 for actions in order.values() for a in actions
                                if a is not None for p in (a.sub_actions or (a,))), default=0)
    pending = {r: add_reduce_grad(add_unshard_reshard(list(actions)), microbatches)
               for r, actions in order.items() if any(a is not None for a in actions)}
    total = {r: sum(a.is_compute_op for a in actions) for r, actions in pending.items()}
    try:
        lowered = add_send_recv(pending, stage_to_rank=lambda s: stage_to_rank[s], num_stages=num_stages)
    except AssertionError as e:
        # _add_send_recv pops each rank's actions as it places them: what is left is where every rank stopped.
        lines = []
        for r, rest in sorted(pending.items()):
            head = next((a for a in rest if a is not None and a.is_compute_op), None)
            if head is None:
                continue
            pos = total[r] - sum(a.is_compute_op for a in rest)
            lines.append(f"  pp rank {r} at its compute action #{pos} ({head}): "
                         f"{_needs(head, stage_to_rank, num_stages)}")
        name = f" '{schedule}'" if schedule else ""
        raise GraphInvariantError(
            f"the pipeline schedule{name} deadlocks: torch's _add_send_recv cannot place its sends and recvs "
            f"({e}); no pp rank can run its next compute action:\n" + "\n".join(lines) + f"\nfix: {_FIX_ORDER}"
        ) from None
    for r in order:
        lowered.setdefault(r, [])
    return lowered


def _needs(action: Any, stage_to_rank: Mapping[int, int], num_stages: int) -> str:
    parts = action.sub_actions or (action,)
    wants = []
    for p in parts:
        kind, s, i = p.computation_type.value, p.stage_index, p.microbatch_index
        if kind == "F" and s > 0:
            wants.append(f"stage {s - 1}'s activations of microbatch {i} (from {s - 1}F{i} on pp rank "
                         f"{stage_to_rank[s - 1]})")
        elif kind in ("B", "I") and s < num_stages - 1:
            wants.append(f"stage {s + 1}'s gradients of microbatch {i} (from {s + 1}B{i} or {s + 1}I{i} on "
                         f"pp rank {stage_to_rank[s + 1]})")
    return "waits for " + " and ".join(wants) if wants else "waits"


def p2p_from_order(order: Mapping[int, Sequence], stage_to_rank: Mapping[int, int], num_stages: int,
                   cuts: Mapping[int, StageCut] | None = None, *, microbatches: int | None = None,
                   schedule: str = "") -> dict[int, list[P2POp | P2PWait]]:
    """Every pp rank's sends, recvs and recv-waits in issue order, from a compute order.

    Args:
        order: per pp rank, torch `_Action`s (torch's schedule IR, compute only).
        stage_to_rank: the pp rank of each stage, as torch's schedule places them
            (each PipelineStage resolves its peers by it).
        num_stages: S.
        cuts: each stage's inputs and outputs (`stage_cuts`); without it,
            transfers carry no tensors and only their order is checked.
        microbatches: M (default: from the order).
        schedule: the schedule's name, for messages.

    Returns:
        Per pp rank, `P2POp`s (posted) and `P2PWait`s (a compute action waiting
        for a recv), in the order the rank reaches them; feed to `simulate_p2p`.

    Raises:
        GraphInvariantError: the compute order deadlocks (see `lower_order`).
    """
    C = ComputationType

    cuts = cuts or {}
    none = StageCut()
    lowered = lower_order(order, stage_to_rank, num_stages, microbatches=microbatches, schedule=schedule)
    programs: dict[int, list[P2POp | P2PWait]] = {}
    for r, actions in lowered.items():
        events: list[P2POp | P2PWait] = []
        posted: dict[tuple[str, int, int], P2POp] = {}
        for step, action in enumerate(actions):
            for a in action.sub_actions or (action,):
                ct, s, i = a.computation_type, a.stage_index, a.microbatch_index
                cut = cuts.get(s, none)
                op = None
                if ct == C.SEND_F:
                    op = P2POp("send", stage_to_rank[s + 1], "activation", s, i, cut.outputs, step, str(action))
                elif ct == C.RECV_F:
                    op = P2POp("recv", stage_to_rank[s - 1], "activation", s - 1, i, cut.inputs, step, str(action))
                elif ct == C.SEND_B:
                    op = P2POp("send", stage_to_rank[s - 1], "gradient", s, i, _grads(cut.inputs), step, str(action))
                elif ct == C.RECV_B:
                    op = P2POp("recv", stage_to_rank[s + 1], "gradient", s + 1, i, _grads(cut.outputs), step,
                               str(action))
                elif ct == C.FORWARD and s > 0 and stage_to_rank[s - 1] != r:
                    events.append(P2PWait(posted[("activation", s - 1, i)], step, str(action)))
                elif ct in (C.FULL_BACKWARD, C.BACKWARD_INPUT) and s < num_stages - 1 and stage_to_rank[s + 1] != r:
                    events.append(P2PWait(posted[("gradient", s + 1, i)], step, str(action)))
                if op is not None:
                    events.append(op)
                    if op.kind == "recv":
                        posted[op.key] = op
        programs[r] = events
    return programs


# --------------------------------------------------------------------------- simulation


def _name(r: int, names: Mapping[int, str] | None) -> str:
    return names.get(r, f"pp rank {r}") if names else f"pp rank {r}"


def _nth(n: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")


def _compare(send: tuple[int, P2POp, int], recv: tuple[int, P2POp, int], names, context: str) -> None:
    """Raises unless the k-th send and the k-th recv on one rank pair carry the same transfer and tensors."""
    (src, s, n), (dst, r, _) = send, recv
    a, b = _name(src, names), _name(dst, names)
    if s.key != r.key:
        raise GraphInvariantError(
            f"pipeline transfers{context} pair up wrongly between {a} and {b}: the {_nth(n)} send from {a} to {b} "
            f"is {s.transfer()} ({s.action} at step {s.step}), but {b}'s {_nth(n)} recv from {a} expects "
            f"{r.transfer()} ({r.action} at step {r.step}): point-to-point ops pair in the order they are posted, "
            f"so data would reach the wrong stage or microbatch (silently where shapes agree); fix: {_FIX_ORDER}")
    what = f"{s.transfer()} ({a} {s.action} at step {s.step} -> {b} {r.action} at step {r.step})"
    sent, got = s.tensors, r.tensors
    if len(sent) != len(got):
        raise GraphInvariantError(
            f"pipeline transfer{context} {what}: {a} sends {len(sent)} tensor(s) [{', '.join(map(str, sent))}] but "
            f"{b} receives {len(got)} [{', '.join(map(str, got))}]; fix: {_FIX_CUT}")
    for j, (x, y) in enumerate(zip(sent, got)):
        if x.source != y.source:
            producer = s.stage if s.what == "activation" else r.stage
            fed = (f"stage {y.source[0]}'s output {y.source[1]}" if y.source is not None
                   else "a value that is not the previous stage's output")
            mine = f"stage {x.source[0]}'s output {x.source[1]}" if x.source is not None else "another value"
            raise GraphInvariantError(
                f"pipeline transfer{context} {what}: tensor {j} is {mine} ({x}) on {a}'s side, but on {b}'s side "
                f"position {j} is {y} and the split parent's graph wires it to {fed}: the cut values of stage "
                f"{producer} are in a different order on the two sides (torch matches them by position, so "
                f"they would be swapped); fix: {_FIX_CUT}")
        if x.shape != y.shape or x.dtype != y.dtype:
            raise GraphInvariantError(
                f"pipeline transfer{context} {what}: tensor {j} differs: {a} sends {x} but {b} receives into "
                f"{y}; fix: {_FIX_CUT}")


def simulate_p2p(programs: Mapping[int, Sequence[P2POp | P2PWait]], *, schedule: str = "",
                 names: Mapping[int, str] | None = None) -> None:
    """Runs every pp rank's transfers: sends and recvs pair up, with the same tensors, and nothing deadlocks.

    A rank posts its ops in order without blocking and stops at a `P2PWait`
    until that recv has met its send; at the end of its program it waits
    until every send it posted has been received. The k-th send from a to b
    meets the k-th recv on b from a.

    Args:
        programs: per pp rank, its events in issue order (`p2p_from_order`, `p2p_schedule`).
        schedule: the schedule's name, for messages.
        names: how to call each pp rank in messages (default 'pp rank r').

    Raises:
        GraphInvariantError: a pair that differs in transfer or tensors (naming
            both ops), an op naming a rank without a program, or a deadlock
            (naming each stuck rank's op and the peer's side of it).
    """
    context = f" under schedule '{schedule}'" if schedule else ""
    pc = {r: 0 for r in programs}
    sends: dict[tuple[int, int], deque] = {}
    recvs: dict[tuple[int, int], deque] = {}
    counts: dict[tuple[str, int, int], int] = {}
    matched: set[int] = set()
    unmatched_sends: dict[int, list[P2POp]] = {r: [] for r in programs}

    def post(r: int, op: P2POp) -> None:
        if op.peer not in programs:
            raise GraphInvariantError(f"{_name(r, names)}'s {op} names {_name(op.peer, names)}, which is not in the "
                                      f"pipeline (pp ranks {sorted(programs)}); fix: {_FIX_ORDER}")
        pair = (r, op.peer) if op.kind == "send" else (op.peer, r)
        n = counts[(op.kind, *pair)] = counts.get((op.kind, *pair), 0) + 1
        (sends if op.kind == "send" else recvs).setdefault(pair, deque()).append((r, op, n))
        if op.kind == "send":
            unmatched_sends[r].append(op)
        s_q, r_q = sends.get(pair), recvs.get(pair)
        while s_q and r_q:
            send, recv = s_q.popleft(), r_q.popleft()
            _compare(send, recv, names, context)
            matched.add(id(send[1]))
            matched.add(id(recv[1]))
            unmatched_sends[send[0]].remove(send[1])

    progress = True
    while progress:
        progress = False
        for r, events in programs.items():
            while pc[r] < len(events):
                ev = events[pc[r]]
                if isinstance(ev, P2PWait):
                    if id(ev.recv) not in matched:
                        break
                else:
                    post(r, ev)
                pc[r] += 1
                progress = True
    stuck = {r for r in programs if pc[r] < len(programs[r]) or unmatched_sends[r]}
    if not stuck:
        return
    lines = []
    for r in sorted(stuck):
        if pc[r] < len(programs[r]):
            ev = programs[r][pc[r]]
            op = ev.recv
            head = (f"{_name(r, names)} at step {ev.step} ({ev.action}) waits for its recv <- "
                    f"{_name(op.peer, names)}: {op.transfer()} (posted by {op.action} at step {op.step})")
            other = _peer_side(op.peer, r, "send", sends, programs, pc, unmatched_sends, names)
        else:
            op = unmatched_sends[r][0]
            head = (f"{_name(r, names)} at the end of the step waits for its send -> {_name(op.peer, names)}: "
                    f"{op.transfer()} ({op.action} at step {op.step}) to be received")
            other = _peer_side(op.peer, r, "recv", recvs, programs, pc, unmatched_sends, names)
        lines.append(f"  {head}; {other}")
    raise GraphInvariantError(f"pipeline transfers{context} deadlock: no pp rank can go on:\n" + "\n".join(lines)
                              + f"\nfix: {_FIX_ORDER}")


def _peer_side(q: int, r: int, kind: str, queues, programs, pc, unmatched_sends, names) -> str:
    """What the peer has done about the transfer a stuck rank waits for."""
    pair = (q, r) if kind == "send" else (r, q)
    waiting = queues.get(pair)
    who = _name(q, names)
    if waiting:
        _, op, _ = waiting[0]
        return f"{who}'s first unmatched {kind} on that pair is {op.transfer()} ({op.action} at step {op.step})"
    if pc[q] < len(programs[q]):
        ev = programs[q][pc[q]]
        return (f"{who} has posted no matching {kind}: it is stuck at step {ev.step} ({ev.action}) waiting for "
                f"{ev.recv.transfer()} from {_name(ev.recv.peer, names)}")
    return f"{who} finished its step without posting a matching {kind}"


# --------------------------------------------------------------------------- a PipelineModule


def _rank_names(pm: Any, pp_size: int) -> dict[int, str] | None:
    """'pp rank c (rank g)' where this module's pp group is known."""
    group = getattr(pm, "pp_group", None)
    if group is None:
        return None
    try:
        import torch.distributed as dist

        ranks = dist.get_process_group_ranks(group)
    except Exception:  # noqa: BLE001 - names are a courtesy; the check runs without them
        return None
    if len(ranks) != pp_size:
        return None
    return {c: f"pp rank {c} (rank {g})" for c, g in enumerate(ranks)}


def _check_placement(order: Mapping[int, Sequence], split: Any) -> None:
    """Each pp rank's schedule runs only stages the split placed on it (the runtime builds just those)."""
    for r, actions in sorted(order.items()):
        for pos, action in enumerate(actions):
            for a in (action.sub_actions or (action,)) if action is not None else ():
                placed = split.stages[a.stage_index].rank
                if placed != r:
                    raise GraphInvariantError(
                        f"pp rank {r} runs {a} at compute action #{pos} of torch's '{split.schedule}' schedule, but "
                        f"the split placed stage {a.stage_index} on pp rank {placed}: that rank holds no such stage "
                        f"and its neighbours' sends to it never meet a recv; fix: {_FIX_ORDER}")


def p2p_schedule(pm: Any, *, order: Mapping[int, Sequence] | None = None) -> dict[int, list[P2POp | P2PWait]]:
    """Every pp rank's transfers for one training step of a PipelineModule, without a process group.

    Args:
        pm: a PipelineModule (any rank's, or a dry run's).
        order: the compute order to lower (default: torch's order for the
            split's schedule, `fxpar.analysis.schedule.schedule_order`).

    Returns:
        Per pp rank, its `P2POp`s and `P2PWait`s in issue order.

    Raises:
        GraphInvariantError: a stage the schedule runs on a rank the split did
            not put it on, or a compute order that deadlocks.
    """
    split = pm.split
    if order is None:
        order = schedule_order(split)
    _check_placement(order, split)
    placed = stage_ranks(split.schedule, split.num_stages, split.pp_size)
    return p2p_from_order(order, placed, split.num_stages, stage_cuts(pm.graph_module),
                          microbatches=split.microbatches, schedule=split.schedule)


def check_p2p(pm: Any, *, order: Mapping[int, Sequence] | None = None) -> None:
    """Checks that a pipeline's send/recv pairs match under its schedule and cannot deadlock.

    Derives every pp rank's transfers from torch's schedule IR (`p2p_schedule`)
    and simulates them (`simulate_p2p`). Runs from any one rank, or a dry run.

    Args:
        pm: a PipelineModule.
        order: a compute order to check instead of the schedule's own.

    Raises:
        GraphInvariantError: naming the pp ranks, the first stuck or mismatched
            operation on each side, and the likely fix.
    """
    programs = p2p_schedule(pm, order=order)
    simulate_p2p(programs, schedule=pm.split.schedule, names=_rank_names(pm, pm.split.pp_size))
    log.debug("pipeline transfers match: %s", {r: sum(isinstance(e, P2POp) for e in p) for r, p in programs.items()})
