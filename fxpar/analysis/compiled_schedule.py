"""Under compile=True: each compiled graph's collectives as inductor scheduled them, and the kernels under each.

A compiled ParallelModule runs neither its fx graph's order nor the eager runtime's
FSDP prefetch: its graphs reach inductor with their collectives as torch's
functional collectives (`fxpar.ops.traceable`, `fxpar.ops.traceable_fsdp`: an
issue node and a `wait_tensor`), and inductor fuses the compute around them into
kernels and moves issues and waits (`fxpar._torch.inductor.overlap_comms`; in an
FSDP backward `fxpar.ops.traceable_fsdp.prefetch_fsdp_gathers` first). What runs
is inductor's final kernel order. A `ScheduleRecorder`, appended to inductor's
reordering passes when the module compiles a graph (`add_schedule_recorder`),
changes nothing and keeps, per compiled graph (the forward at the first call, the
backward at the first backward), each collective with

    its op and mesh dim (the group name among its arguments), its payload bytes per rank (its input),
    the FSDP unit or module it belongs to (the fx node its kernel was traced from: the kernel's stack
    trace names the node of the lowered graph, whose `node.meta["fxpar"]` says), its issue and its wait
    in the kernel order, and the compute kernels between them: what runs while it is in flight.

It also keeps the whole kernel order (`CompiledSchedule.steps`): each kernel's kind, op, modules and its
(FLOPs, memory bytes) by `fxpar.analysis.cost.kernel_cost` of the post-grad nodes inductor fused into it,
from which `fxpar.analysis.timeline.rank_timeline` draws the compiled step.

`compiled_schedule_lines` is explain()'s section; `collective_order` of a schedule is what
`fxpar.verify.compiled_order` compares across ranks. Recording needs inductor's scheduler to run, so the
module's compiles skip inductor's FX graph cache (FSDP graphs bypass it anyway: their post-grad pass is a
plain callable).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Mapping

import torch.fx as fx

from fxpar._torch.inductor import ScheduledNode, graph_role, scheduled_nodes
from fxpar.analysis.cost import evaluate, kernel_cost
from fxpar.core.fmt import fmt_bytes
from fxpar.core.spec import get_info
from fxpar.ops.traceable_fsdp import fsdp_gather_unit

__all__ = ["CompiledCollective", "CompiledKernel", "CompiledSchedule", "ScheduleRecorder", "add_schedule_recorder",
           "compiled_schedules", "compiled_schedule_lines"]

log = logging.getLogger(__name__)

PASSES = "reorder_for_compute_comm_overlap_passes"
_TRACED = re.compile(r'File "<eval_with_key>[^"]*", line \d+, in forward\n\s*(\w+)\s*=')


@dataclass(frozen=True)
class CompiledCollective:
    """One collective of a compiled graph, from its issue to its wait in inductor's kernel order.

    Attributes:
        op: torch's functional collective ('all_gather_into_tensor', 'reduce_scatter_tensor', 'all_reduce').
        mesh_dim: the mesh dim of its group ('' if the group is not one of the mesh's).
        nbytes: its payload per rank (the bytes of its input).
        what: the FSDP unit ('blocks.1') or the module its collective belongs to.
        issue, wait: the scheduler nodes ('op28'; wait '' if none waits in this graph).
        issue_at, wait_at: their positions among the graph's kernels (views and no-op nodes not counted).
        kernels: the compute kernels between issue and wait ('op12 extern_kernels.mm', 'op13').
        modules: the modules those kernels compute, in order.
    """

    op: str
    mesh_dim: str
    nbytes: int
    what: str
    issue: str
    wait: str
    issue_at: int
    wait_at: int
    kernels: tuple[str, ...]
    modules: tuple[str, ...]


@dataclass(frozen=True)
class CompiledKernel:
    """One kernel of a compiled graph's order (no-op view kernels left out).

    Attributes:
        name: the scheduler node ('op12').
        kind: 'compute', 'collective' (its issue) or 'wait'.
        op: the kernel ('extern_kernels.mm'; '' for a generated kernel).
        modules: the modules it computes (or the FSDP unit it packs / unpacks).
        cost: its (FLOPs, memory bytes) at the compiled sizes (`fxpar.analysis.cost.kernel_cost`), None where
            the post-grad nodes it came from are unknown or not costable.
    """

    name: str
    kind: str
    op: str
    modules: tuple[str, ...] = ()
    cost: tuple[float, float] | None = None


@dataclass(frozen=True)
class CompiledSchedule:
    """One compiled graph as inductor ordered it: 'forward', 'backward' or 'inference'."""

    role: str
    kernels: int
    collectives: tuple[CompiledCollective, ...]
    order: tuple  # its collectives as `fxpar._torch.inductor.collective_order` lists them: (op, sizes, args)
    ops: tuple = ()  # every kernel's op in order ('' for a generated kernel): extern calls, collectives, waits
    steps: tuple[CompiledKernel, ...] = ()  # every kernel in order, positions as CompiledCollective's issue_at


def _labels(graph: fx.GraphModule) -> dict[str, str]:
    """Node name -> what it belongs to: its FSDP unit for a unit's gather, else its module FQN."""
    out = {}
    for node in graph.graph.nodes:
        info = get_info(node)
        if info is None:
            continue
        unit = node.target is fsdp_gather_unit
        out[node.name] = (f"fsdp unit {info.fsdp_bucket}" if unit and info.fsdp_bucket else info.module_fqn) or "<root>"
    return out


def build_schedule(nodes: list[ScheduledNode], role: str, labels: Mapping[str, str],
                   dims: Mapping[str, str]) -> CompiledSchedule:
    """The collectives of one kernel order, each with its wait and the compute kernels between (module docstring)."""
    kernels = [n for n in nodes if n.kind != "nop"]

    def traced(n: ScheduledNode) -> tuple[str, ...]:  # the lowered graph's nodes it was traced from
        names = [m for trace in n.origins for m in _TRACED.findall(trace)]
        return tuple(dict.fromkeys(labels[m] for m in names if m in labels))

    def what(n: ScheduledNode) -> tuple[str, ...]:  # a kernel's modules, or the FSDP unit it packs / unpacks
        return n.modules or traced(n)

    pending: dict[str, int] = {}  # output buffer of an issued collective -> its position
    waited: dict[int, int] = {}
    for i, n in enumerate(kernels):
        if n.kind == "collective":
            for b in n.writes:
                pending[b] = i
        elif n.kind == "wait":
            for b in n.reads & pending.keys():
                waited.setdefault(pending.pop(b), i)
    out = []
    for i, n in enumerate(kernels):
        if n.kind != "collective":
            continue
        end = waited.get(i, i)
        under = [k for k in kernels[i + 1:end] if k.kind == "compute"]
        owner = traced(n) or n.modules
        dim = next((dims[a] for a in n.args if a in dims), "")
        out.append(CompiledCollective(
            n.op.split(".")[-2] if n.op.count(".") >= 2 else n.op, dim, n.nbytes,
            owner[0].removeprefix("fsdp unit ") if owner else "?", n.name, kernels[end].name if i in waited else "",
            i, end, tuple(f"{k.name} {k.op}".strip() for k in under),
            tuple(dict.fromkeys(m for k in under for m in what(k)))))
    order = tuple((n.op, n.sizes, n.args) for n in kernels if n.kind == "collective")
    steps = tuple(CompiledKernel(k.name, k.kind, k.op, what(k), k.cost) for k in kernels)
    return CompiledSchedule(role, sum(k.kind == "compute" for k in kernels), tuple(out), order,
                            tuple(k.op for k in kernels), steps)


def _kernel_cost(nodes) -> tuple[float, float] | None:
    """(FLOPs, memory bytes) of the kernel fusing `nodes` (post-grad nodes at static sizes), or None."""
    try:
        cost = kernel_cost(nodes)
        return evaluate(cost.flops, {}), evaluate(cost.mem_bytes, {})
    except Exception as e:  # noqa: BLE001 -- it runs inside inductor's compile and only observes: a kernel it
        # cannot cost (a symbolic size, an op whose arguments the cost model does not know) takes the timeline's
        # documented fallback instead of failing the user's compile
        log.debug("compiled kernel of %s not costed: %r", [n.name for n in nodes], e)
        return None


class ScheduleRecorder:
    """An entry of inductor's `reorder_for_compute_comm_overlap_passes` that changes nothing: it keeps the graph's
    final kernel order (it runs last) as a CompiledSchedule in `into`, by role (the latest compile wins)."""

    def __init__(self, labels: Mapping[str, str], dims: Mapping[str, str], into: dict) -> None:
        self.labels, self.dims, self.into = dict(labels), dict(dims), into

    def __call__(self, snodes: list) -> list:
        role = graph_role()
        self.into[role] = build_schedule(scheduled_nodes(snodes, _kernel_cost), role, self.labels, self.dims)
        return snodes


def _group_dims(pm) -> dict[str, str]:
    mesh = getattr(pm, "mesh", None)
    if mesh is None:
        return {}
    return {mesh.get_group(d).group_name: d for d, n in zip(pm.mesh_info.names, pm.mesh_info.sizes) if n > 1}


def compiled_schedules(pm) -> dict:
    """The module's recorded schedules by role ({} before its first compile)."""
    return pm.__dict__.setdefault("compiled_schedules", {})


def add_schedule_recorder(options: dict, pm, graph: fx.GraphModule) -> None:
    """Adds a ScheduleRecorder of `graph` (the lowered graph torch.compile traces) to inductor `options`."""
    options[PASSES] = [*options.get(PASSES, ()), ScheduleRecorder(_labels(graph), _group_dims(pm),
                                                                   compiled_schedules(pm))]
    options["fx_graph_cache"] = False  # a cache hit would skip the scheduler, and the recorder with it


def _modules(modules: tuple[str, ...]) -> str:
    return ", ".join(modules[:4]) + (f", ... ({len(modules)} modules)" if len(modules) > 4 else "")


def compiled_schedule_lines(pm) -> list[str]:
    """explain()'s section for a compiled module: per compiled graph, each collective and the kernels under it."""
    backend = getattr(pm, "compile_backend", None)
    head = ["", f"Compiled schedule (torch.compile backend {backend!r}; the eager runtime's overlap, FSDP prefetch "
                "and issued tp all-reduces, does not run inside compiled graphs):"]
    if backend != "inductor":
        return head + ["  no scheduler reorders the collectives: they run in the graph's order, each waited where "
                       "it is issued"]
    schedules = compiled_schedules(pm)
    if not schedules:
        return head + ["  not recorded yet: each graph is compiled at its first call (the backward at the first "
                       "backward); run one pm.step(...) (or a forward), then explain() shows the order inductor "
                       "scheduled"]
    out = head + ["  inductor's kernel order after its comm reordering; a collective is in flight from its issue "
                  "to its wait, and the compute kernels between run under it:"]
    roles = [r for r in ("forward", "backward", "inference") if r in schedules]
    if "forward" in schedules and "backward" not in schedules:
        roles.append("backward")
    for role in roles:
        s = schedules.get(role)
        if s is None:
            out.append(f"  {role}: not compiled yet (compiled at the first backward)")
            continue
        n = len(s.collectives)
        out.append(f"  {role} graph: {s.kernels} compute kernels, {n} collective{'s' if n != 1 else ''}")
        for c in s.collectives:
            extern = [k.split(" ", 1)[1].split(".")[-1] for k in c.kernels if " " in k]
            mm = f" ({len(extern)} extern: {', '.join(extern)})" if extern else ""
            under = f"under it {len(c.kernels)} compute kernels{mm} of {_modules(c.modules) or '?'}" if c.kernels \
                else "nothing under it (waited at once)"
            wait = f"waited at {c.wait} (kernel {c.wait_at})" if c.wait else "not waited in this graph"
            out.append(f"    {c.op}({c.mesh_dim or '?'}) of {c.what} ({fmt_bytes(c.nbytes)}): issued at {c.issue} "
                       f"(kernel {c.issue_at}), {wait}: {under}")
    return out
