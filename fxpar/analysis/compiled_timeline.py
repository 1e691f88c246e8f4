"""A compiled module's step as a timeline: inductor's kernel order, and which collective runs under which kernels.

A compiled module (`parallelize(..., compile=True)`, inductor) runs neither its fx graph's order nor the
eager runtime's FSDP schedule. Once its graphs have run, `fxpar.analysis.timeline.rank_timeline` draws
inductor's kernel order as `fxpar.analysis.compiled_schedule.ScheduleRecorder` kept it
(`CompiledSchedule.steps`): the forward graph, then (a training step) the backward graph, on two clocks,
c (the compute lane) and m (the communication lane):

    compute kernel k      on the compute lane: [c, c + t(k)],
                          t(k) = Max(FLOPs(K) / F, Mem(K) / B) of the post-grad nodes K inductor
                          fused into k (`fxpar.analysis.cost.kernel_cost`: their FLOPs, the bytes the
                          kernel reads from and writes outside K)                      (`_kernel_times`)
                          a kernel with no costable nodes takes the mean time of its graph's costed
                          kernels (1 us if none is)
    collective issue      on the comm lane from max(c, m) for bytes / L (its recorded payload per rank)
    its wait              moves c to max(c, its end); its Overlap is the compute clock's window from
                          the issue to the wait, with the compute kernels between them in the kernel
                          order: exactly those explain()'s compiled schedule lists under it (a
                          collective not waited in its graph has none)                 (`compiled_timeline`)

with F, B, L the `DeviceModel`'s FLOP/s, memory and mesh bandwidths. Names are qualified by graph
('forward.op12', 'backward.op30': inductor numbers each graph's kernels from op0). Compute outside the
compiled graphs (a loss given to `pm.step(..., loss_fn=)`, the optimizer) is not drawn.
"""

from __future__ import annotations

from typing import Mapping

from fxpar.analysis.cost import DeviceModel
from fxpar.analysis.timeline_bars import Bar, Overlap, Timeline

__all__ = ["compiled_roles", "compiled_timeline"]

_UNCOSTED_S = 1e-6  # a compiled kernel's time when no kernel of its graph could be costed


def compiled_roles(schedules: Mapping, backward: bool) -> list[str]:
    """The recorded graphs one step runs, in order: forward and backward (training), or the inference one."""
    if backward and "forward" in schedules:
        return ["forward", "backward"] if "backward" in schedules else ["forward"]
    first = ("inference", "forward") if not backward else ("inference",)
    return next(([r] for r in first if r in schedules), [])


def _kernel_times(s, device: DeviceModel) -> list[float]:
    """Seconds of each kernel of a compiled schedule: Max(FLOPs / F, Mem / B) of its cost, the mean of the
    graph's costed kernels where it has none (0 for collectives and waits)."""
    times = [max(k.cost[0] / device.flops, k.cost[1] / device.mem_bandwidth) if k.cost is not None else None
             for k in s.steps]
    known = [t for t, k in zip(times, s.steps) if t is not None and k.kind == "compute"]
    fallback = sum(known) / len(known) if known else _UNCOSTED_S
    return [(fallback if t is None else t) if k.kind == "compute" else 0.0 for t, k in zip(times, s.steps)]


def compiled_timeline(schedules: Mapping, roles: list[str], device: DeviceModel, title: str,
                      backward: bool) -> Timeline:
    """The compiled step of the module docstring: each recorded graph's kernels in inductor's order.

    Args:
        schedules: the module's recorded CompiledSchedules by role (`compiled_schedules(pm)`).
        roles: the graphs to draw, in order (`compiled_roles`).
        device: the device the kernel and collective times are estimated for.
        title: the timeline's title so far (model and mesh); the graphs drawn are added.
        backward: whether a training step was asked for (the title says when its backward is missing).
    """
    bars: list[Bar] = []
    overlaps: list[Overlap] = []
    c = m = 0.0
    first = -1
    for role in roles:
        s = schedules[role]
        if role == "backward":
            first = len(bars)
        direction = "backward" if role == "backward" else "forward"
        issued = {x.issue_at: x for x in s.collectives}
        waited: dict[int, list] = {}
        for x in s.collectives:
            if x.wait:
                waited.setdefault(x.wait_at, []).append(x)
        ran: list[tuple[str, tuple[str, ...]]] = []  # the compute kernels so far: (qualified name, modules)
        flight: dict[int, tuple[Bar, int, float]] = {}  # issue position -> (its bar, len(ran), c at its issue)
        for i, (k, t) in enumerate(zip(s.steps, _kernel_times(s, device))):
            name = f"{role}.{k.name}"
            if k.kind == "compute":
                ran.append((name, k.modules))
                if t > 0:
                    bars.append(Bar("compute", f"{k.name} {k.op}".strip(), direction, c, c + t, name,
                                    k.modules[0] if k.modules else ""))
                    c += t
            elif i in issued:
                x = issued[i]
                t0 = max(c, m)
                bar = Bar("comm", f"{x.op}({x.mesh_dim or '?'}) of {x.what} ({role} graph)",
                          "issued" if x.kernels or not x.wait else "collective", t0,
                          t0 + x.nbytes / device.mesh_bandwidth, name, x.what, x.nbytes)
                bars.append(bar)
                m = bar.end
                flight[i] = (bar, len(ran), c)
            reached = c  # the wait kernel's start: the windows of all it waits for end here
            for x in waited.get(i, ()):
                bar, since, issued_at = flight.pop(x.issue_at)
                under = ran[since:]
                overlaps.append(Overlap(bar.label, bar.node, name, issued_at, reached,
                                        tuple(n for n, _ in under),
                                        tuple(dict.fromkeys(mod for _, mods in under for mod in mods))))
                if bar.end > c:
                    bars.append(Bar("compute", f"wait {bar.label}", "wait", c, bar.end, name, x.what))
                    c = bar.end
    graphs = " and ".join(roles)
    title += f"; inductor's kernel order of the compiled {graphs} graph{'s' if len(roles) > 1 else ''} " \
             "(explain()'s compiled schedule)"
    if backward and roles == ["forward"]:
        title += ", the backward not compiled yet (at the first backward)"
    elif backward and roles == ["inference"]:
        title += ", no training step run yet (its graphs are compiled at the first pm.step)"
    return Timeline(title, ("compute", "comm"), tuple(bars), tuple(overlaps), False, first)
