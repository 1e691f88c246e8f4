"""Pipeline schedules read, never run: torch's action order, its simulation, and the stages report.

One simulator serves explain(), dry runs, the timeline picture and the
planner. Every rank runs its compute actions in the schedule's order; an
action starts when its rank is free and its inputs exist:

    F(s, i)           after F(s-1, i)
    B(s, i), I(s, i)  after F(s, i) and the B or I of (s+1, i)
    W(s, i)           after I(s, i)

with durations F = I = W = 1 and B = I + W = 2 (backward costs twice the
forward), an overlapped F/B pair taking the sum of its parts, and no
communication time (`simulate_schedule`). The bubble fraction is
1 - busy / (ranks x makespan) (`bubble_fraction`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sympy

import torch.nn as nn

from fxpar._torch.pipelining import Action, ComputationType
from fxpar.core.fmt import fmt_bytes, fmt_flops
from fxpar.core.stages import SCHEDULES, PipelineSplitInfo, stage_info, stage_ranks

__all__ = [
    "TimelineEntry",
    "schedule_order",
    "simulate_schedule",
    "bubble_fraction",
    "schedule_lines",
    "explain_stages",
    "pipeline_order_of",
]


@dataclass(frozen=True)
class TimelineEntry:
    """One compute action of a simulated pipeline schedule.

    Attributes:
        rank: the pp rank running it.
        kind: 'F' forward, 'B' full backward, 'I' input backward, 'W' weight backward.
        stage: the stage index.
        microbatch: the microbatch index.
        start, end: simulated time, in units of one stage forward.
    """

    rank: int
    kind: str
    stage: int
    microbatch: int
    start: float
    end: float




class _StandInStage:
    """What torch's schedule constructors read from a PipelineStage, without a process group."""

    def __init__(self, index: int, num_stages: int, pp_size: int, rank: int) -> None:
        self.stage_index = index
        self.num_stages = num_stages
        self.group_size = pp_size
        self.group_rank = rank
        self.is_first = index == 0
        self.is_last = index == num_stages - 1
        self.stage_index_to_group_rank: dict[int, int] = {}
        self.submod = nn.Module()


def _single_stage_order(name: str, pp: int, m: int) -> dict[int, list]:
    """GPipe and 1F1B as torch's schedules run them (their own `_get_pipeline_order` is a sketch)."""
    F, B = ComputationType.FORWARD, ComputationType.FULL_BACKWARD
    order = {}
    for r in range(pp):
        if name == "gpipe":
            actions = [Action(r, F, i) for i in range(m)] + [Action(r, B, i) for i in range(m)]
        else:  # Schedule1F1B._step_microbatches: min(m, S - s) forwards, then B/F pairs, then the rest
            warmup = min(m, pp - r)
            actions = [Action(r, F, i) for i in range(warmup)]
            f, b = warmup, 0
            while b < m:
                actions.append(Action(r, B, b))
                b += 1
                if f < m:
                    actions.append(Action(r, F, f))
                    f += 1
        order[r] = actions
    return order


def schedule_order(split) -> dict[int, list]:
    """torch's compute actions per pp rank for a training step of this split, without a process group.

    Args:
        split: the PipelineSplitInfo of a compiled module.

    Returns:
        {pp rank: [torch _Action or None, ...]} as torch's schedule orders them.
    """
    spec = SCHEDULES[split.schedule]
    if not spec.multi:
        return _single_stage_order(split.schedule, split.pp_size, split.microbatches)
    ranks = stage_ranks(split.schedule, split.num_stages, split.pp_size)
    stages = [_StandInStage(k, split.num_stages, split.pp_size, 0) for k in range(split.num_stages)
              if ranks[k] == 0]
    sched = spec.cls(stages, split.microbatches, loss_fn=lambda out, target: out, scale_grads=False)
    return dict(sched.pipeline_order)


def simulate_schedule(order: dict[int, list], num_stages: int) -> tuple[list[TimelineEntry], float | None]:
    """Start and end of every compute action, with equal stage times: the timeline and its bubble fraction.

    Every rank runs its actions in the schedule's order; an action starts when
    its rank is free and its inputs exist: F(s, i) after
    F(s-1, i); B or I(s, i) after F(s, i) and the B or I of (s+1, i); W after
    I; F = I = W = 1, B = 2, an overlapped action takes the sum of its parts;
    each rank runs its actions in order.

    Returns:
        (entries, 1 - busy / (ranks x makespan)); ([], None) if the order cannot be simulated.
    """
    durations = {"F": 1.0, "I": 1.0, "W": 1.0, "B": 2.0}
    done: dict[tuple[str, int, int], float] = {}
    queues = {r: [a for a in actions if a is not None] for r, actions in order.items()}
    free = {r: 0.0 for r in queues}
    entries: list[TimelineEntry] = []

    def deps(kind: str, s: int, i: int) -> list[tuple[str, int, int]] | None:
        if kind == "F":
            return [("F", s - 1, i)] if s > 0 else []
        if kind in ("B", "I"):
            return [("F", s, i)] + ([("BI", s + 1, i)] if s < num_stages - 1 else [])
        if kind == "W":
            return [("I", s, i)]
        return None

    def finished(key: tuple[str, int, int]) -> float | None:
        if key[0] == "BI":
            return done.get(("B", key[1], key[2]), done.get(("I", key[1], key[2])))
        return done.get(key)

    progress = True
    while progress and any(queues.values()):
        progress = False
        for r, q in queues.items():
            while q:
                parts = list(q[0].sub_actions) if q[0].sub_actions else [q[0]]
                ready, blocked, work = free[r], False, []
                for p in parts:
                    kind = p.computation_type.value
                    d = deps(kind, p.stage_index, p.microbatch_index)
                    if d is None:  # REDUCE_GRAD and the like take no time here
                        continue
                    times = [finished(k) for k in d]
                    if any(t is None for t in times):
                        blocked = True
                        break
                    ready = max([ready, *times])
                    work.append(p)
                if blocked:
                    break
                t = ready
                for p in work:
                    kind = p.computation_type.value
                    entries.append(TimelineEntry(r, kind, p.stage_index, p.microbatch_index, t, t + durations[kind]))
                    t += durations[kind]
                    done[(kind, p.stage_index, p.microbatch_index)] = t
                free[r] = t
                q.pop(0)
                progress = True
    if any(queues.values()) or not free:
        return [], None
    makespan = max(free.values())
    busy = sum(e.end - e.start for e in entries)
    return entries, (1.0 - busy / (len(free) * makespan) if makespan > 0 else 0.0)


def schedule_lines(pm) -> list[str]:
    """The simulated schedule of a pipelined module, for explain()."""
    split = stage_info(pm.graph_module)
    if split is None:
        return []
    entries, bubble = simulate_schedule(schedule_order(split), split.num_stages)
    if bubble is None:
        return []
    makespan = max(e.end for e in entries)
    return ["", f"Schedule '{split.schedule}' simulated from torch's own action order ({split.pp_size} pp ranks, "
            f"{split.microbatches} microbatches, equal stage times, backward = 2 x forward): bubble fraction "
            f"{bubble:.3f}, step = {makespan:g} forward-stage times"]


def bubble_fraction(pipeline_order: dict[int, list], num_stages: int) -> float | None:
    """Idle fraction of a schedule's compute actions, simulated with equal stage times (None: not simulable)."""
    return simulate_schedule(pipeline_order, num_stages)[1]


def explain_stages(split: PipelineSplitInfo, *, pipeline_order: dict | None = None) -> list[str]:
    """The stages section of explain(): cuts, cost and parameters per stage, bytes per cut, bubble."""
    how = "balanced by the cost model" if split.balanced else "at the plan's cut points"
    def readable(expr: Any) -> Any:  # input_ids.size(0) instead of s70
        if not hasattr(expr, "xreplace"):
            return expr
        return expr.xreplace({s: sympy.Symbol(split.size_names[str(s)]) for s in expr.free_symbols
                              if str(s) in split.size_names})

    sizes = ", ".join(f"{split.size_names.get(k, k)}={v}" for k, v in
                      sorted(split.example_sizes.items(), key=lambda kv: str(kv[0])))
    lines = [f"Pipeline: {split.num_stages} stages on pp={split.pp_size} ({split.stages_per_rank} per rank), "
             f"schedule '{split.schedule}', {split.microbatches} microbatches; cuts {how}"
             + (f"; costs at {sizes}" if sizes else "")]
    total_time = sum(s.time_value for s in split.stages) or 1.0
    for s in split.stages:
        start = f"cut before '{s.cut_before}'" if s.cut_before else "start"
        lines.append(
            f"  stage {s.index} (pp rank {s.rank}): {start}; modules {s.first_module or '<root>'} .. "
            f"{s.last_module or '<root>'}; {s.num_nodes} nodes; {fmt_flops(s.flops_value)} "
            f"(flops = {readable(s.flops)}); time share {s.time_value / total_time:.3f}; "
            f"params {fmt_bytes(s.param_bytes)} ({len(s.params)} tensors)")
    for s in split.stages[1:]:
        lines.append(f"  cut {s.index - 1}->{s.index} before '{s.cut_before}': {fmt_bytes(s.recv_bytes_value)} "
                     f"of activations per step (bytes = {readable(s.recv_bytes)}; {', '.join(s.inputs) or 'nothing'})")
    lines.append(f"  balance: max / mean stage time = {split.balance_ratio:.3f}")
    for fqn, stages in split.tied:
        lines.append(f"  tied weight '{fqn}' held by stages {list(stages)}: gradients summed over its owners")
    p, m, v = split.pp_size, split.microbatches, split.stages_per_rank
    bubble = bubble_fraction(pipeline_order, split.num_stages) if pipeline_order else None
    if bubble is not None:
        lines.append(f"  expected bubble fraction: {bubble:.3f} (torch's '{split.schedule}' order simulated with "
                     "equal stage times, backward = 2 x forward)")
    else:
        formula = (p - 1) / (v * m + p - 1)
        lines.append(f"  expected bubble fraction: {formula:.3f} ((p-1)/(v*m+p-1), p={p}, v={v}, m={m})")
    return lines


def pipeline_order_of(pm: Any) -> dict | None:
    """torch's compute-action order of a pipelined module's schedule, or None (not a pipeline, no process group)."""
    order = getattr(pm, "pipeline_order", None)  # PipelineModule's; plain modules have none
    if order is None or getattr(pm, "mesh", None) is None:
        return None
    return order()
