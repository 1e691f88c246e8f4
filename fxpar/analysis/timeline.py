"""A rank's step as a timeline: compute and communication lanes, and which collective runs under which ops.

One training step of this rank's graph, replayed in graph order on two lanes
(a compute stream and a communication stream, as a GPU runs them):

    compute op n          on the compute lane, from its clock c:   [c, c + t(n)]
                          t(n) = Max(FLOPs / F, Mem / B)  (fxpar.analysis.cost, `DeviceModel`),
                          or the measured seconds of `profile[n.name]` when given;
                          the backward replays the ops in reverse at 2 t(n)
    blocking collective   on the comm lane from max(c, m) for bytes / L; both clocks move to its end
                          (an all_reduce, a tp all_gather, an unissued FSDP gather, their duals, and the
                          all-to-alls inside a MoE node on ep: counts and dispatch before it, combine after)
    issued collective     an FSDP unit's gather starts at its issue node (`fsdp_prefetch`) at max(c, m),
                          the compute lane runs on; the unit's first wait moves c to max(c, its end)
    dp bucket             a data-parallel gradient bucket (`bucket_grad_sync`) starts when the backward
                          has produced its last gradient (after the backward of its parameters' first
                          use); the step ends when every bucket is done
    FSDP backward         as fxpar.runtime.fsdp_buckets runs it (`_FsdpBackward`): each unit re-gathered
                          (reshard_after_forward) before the first backward op that unpacks one of its
                          parameters, blocking unless prefetched; with overlap scheduled, unit u-1's
                          re-gather is issued once half of unit u's gradients are in, and unit u's
                          reduce-scatter, issued at its last gradient, is waited when unit u-2's
                          re-gather is issued (half-way through unit u-1's backward), else when unit
                          u-1's is issued (one in flight) or at the end of the backward

with L = `DeviceModel.mesh_bandwidth` and bytes each rank's payload (as
`explain()` counts it). An `Overlap` is the window from an issue to its wait:
the collective and the compute ops that run inside it. A pipeline (pp > 1)
is drawn per pp rank from torch's action order (`fxpar.analysis.schedule.simulate_schedule`),
each forward taking the stage's estimated time per microbatch, each backward
twice that, and each send of an activation or gradient over a cut on that
rank's comm lane while its next action computes.

A compiled module (`parallelize(..., compile=True)`, inductor) whose graphs have run is drawn from
inductor's recorded kernel order instead (`fxpar.analysis.compiled_timeline`); before its first run,
or with a measured `profile`, its eager graph is replayed as above and the title says so.

The times are a model, for the picture and the text (`Timeline.text()`),
not a promise; `profile` puts measured times in their place
(`measure_profile(pm, *inputs, target=..., loss_fn=...)`, fxpar.analysis.profile, times
each node of a real step on this rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.fx as fx

from fxpar.analysis.cost import DeviceModel, evaluate, example_sizes, node_cost
from fxpar.analysis.collective_info import collectives, moe_collectives
from fxpar.analysis.compiled_schedule import compiled_schedules
from fxpar.analysis.compiled_timeline import compiled_roles, compiled_timeline
from fxpar.analysis.fsdp import bucket_groups
from fxpar.analysis.overlap import issued_waits, unit_bytes
from fxpar.analysis.profile import measure_profile
from fxpar.analysis.schedule import schedule_order, simulate_schedule
from fxpar.analysis.timeline_bars import KIND_COLORS, Bar, Overlap, Timeline
from fxpar.core.spec import FSDP_ROOT_UNIT, TensorSpec, get_info
from fxpar.core.stages import stage_info
from fxpar.ops.collectives import COLLECTIVE_OPS
from fxpar.ops.moe import moe_experts
from fxpar.ops.overlap import ISSUE_OPS

__all__ = ["Bar", "Overlap", "Timeline", "rank_timeline", "backward_order", "measure_profile", "KIND_COLORS"]

_GATHER = torch.ops.fxpar.fsdp_all_gather.default


def rank_timeline(pm, *, device: DeviceModel | None = None, profile: Mapping[str, float] | None = None,
                  backward: bool = True) -> Timeline:
    """This rank's step as a Timeline (a pipeline: every pp rank's, from the schedule).

    A module compiled with inductor (`parallelize(..., compile=True)`) whose graphs have run is drawn from
    inductor's recorded kernel order (`fxpar.analysis.compiled_timeline`); before its first run, and
    with a measured `profile` (times of the eager graph's nodes), its eager graph is replayed and the title
    says so.

    Args:
        pm: a ParallelModule (a dry run's `report.module` too).
        device: the device the times are estimated for (default: `DeviceModel()`).
        profile: measured seconds per forward node name (a node missing from it is estimated;
            '<name>.backward' gives its backward, else twice the forward).
        backward: include the backward (a training step); False: a forward alone.
    """
    device = device or DeviceModel()
    split = stage_info(pm.graph_module)
    if split is not None:
        return _pipeline(pm, split, device)
    gm = pm.graph_module
    model = gm.meta["fxpar"].model_class if "fxpar" in gm.meta else type(pm).__name__
    mesh = ", ".join(f"{k}={v}" for k, v in zip(pm.mesh_info.names, pm.mesh_info.sizes))
    title = f"{model} on ({mesh}), one {'training step' if backward else 'forward'}"
    backend = getattr(pm, "compile_backend", None)
    if backend == "inductor" and profile is None:
        schedules = compiled_schedules(pm)
        roles = compiled_roles(schedules, backward)
        if roles:
            return compiled_timeline(schedules, roles, device, title, backward)
        title += ("; the eager graph replayed: inductor's compiled kernel order is shown once the module has run "
                  "(its first forward / pm.step compiles and records its graphs)")
    elif backend is not None:  # no scheduler reorders (aot_eager, ...), or measured times of the eager nodes
        title += f"; the eager graph replayed (compiled with {backend!r}" + (
            ": measured times are of the eager graph's nodes, the compiled kernel order is drawn without profile="
            if backend == "inductor" else ": its collectives run in the graph's order") + ")"
    return _eager_timeline(pm, device, profile, backward, title)


def _eager_timeline(pm, device: DeviceModel, profile: Mapping[str, float] | None, backward: bool,
                    title: str) -> Timeline:
    gm = pm.graph_module
    return _Replay(gm, pm.mesh_info, device, example_sizes(gm), dict(profile or {}),
                   reshard_after_forward=getattr(pm, "reshard_after_forward", True),
                   keep_root=getattr(pm, "offload_policy", None) is None).run(backward, title)

def backward_order(pm) -> list[tuple[tuple[str, ...], str, int]]:
    """The backward's collectives in the order this rank issues them at run time: FSDP re-gathers and
    per-unit reduce-scatters (`_FsdpBackward`), dp gradient buckets, the other duals; each as
    (mesh dims, label, bytes). The comm lane runs in issue order. [] for a pipeline (its FSDP gathers
    once per step: `StepGather`).

    Ranks of a group must agree on it: the runtime buckets FSDP parameters by the graph's `fsdp_bucket`
    tags, which the forward's collective fingerprint does not see (`fxpar.analysis.module_checks.check_ranks`).
    """
    if stage_info(pm.graph_module) is not None:
        return []
    t = _eager_timeline(pm, DeviceModel(), None, True, "")  # the eager runtime's order, compiled or not
    out = []
    for b in sorted((b for b in t.bars[t.backward_from:] if b.lane == "comm"), key=lambda b: b.start):
        dims = b.label.split("(", 1)[1].split(")", 1)[0] if "(" in b.label else ""
        out.append((tuple(d.strip() for d in dims.split(",")), b.label, b.nbytes))
    return out


class _Replay:
    """The two-clock walk of the module docstring over one graph."""

    def __init__(self, gm, mesh, device, hints, profile, *, reshard_after_forward: bool = True,
                 keep_root: bool = True):
        self.gm, self.device, self.hints, self.profile = gm, device, hints, profile
        self.reshard_after_forward = reshard_after_forward
        self.keep_root = keep_root  # the root unit is kept from the forward (not under CPU offload: no buckets)
        self.payload = {c.node: c for c in collectives(gm, mesh)}
        self.bars: list[Bar] = []
        self.overlaps: list[Overlap] = []
        self.c = self.m = 0.0
        # FSDP gathers run as one collective per unit (fxpar.runtime.fsdp_buckets): the unit's first gather
        # carries the unit's bytes forward, and its first dual met in the backward the unit's reduce-scatter
        self.unit: dict[str, int] = {}
        self.unit_bytes: dict[int, list[int]] = {}
        self.units: list[_Unit] = []
        gathers = {n.args[0]: n for n in gm.graph.nodes if n.target is _GATHER}
        for i, (args, members) in enumerate(bucket_groups([gm])):
            for _, param in members:
                c = self.payload[gathers[param].name]
                self.unit[c.node] = i
                fwd_bwd = self.unit_bytes.setdefault(i, [0, 0])
                fwd_bwd[0] += c.forward_bytes
                fwd_bwd[1] += c.backward_bytes
            first = gathers[members[0][1]]
            name = getattr(get_info(first), "fsdp_bucket", None) or str(first.args[0].target)
            # the root unit is a registered bucket even of one parameter (it is what keeps it gathered)
            self.units.append(_Unit(i, name, args[3], tuple(str(p.target) for _, p in members),
                                    len(members) > 1 or name == FSDP_ROOT_UNIT,
                                    get_info(first).module_fqn if get_info(first) is not None else ""))
        self.units_done: set[tuple[str, int]] = set()
        self.forward_time: dict[fx.Node, float] = {}  # the backward reuses the forward's estimate

    def _unit_first(self, node: fx.Node, direction: str) -> int | None:
        """The bytes of `node`'s FSDP unit if it is the unit's first collective this way, 0 if not; None: no unit."""
        i = self.unit.get(node.name)
        if i is None:
            return None
        if (direction, i) in self.units_done:
            return 0
        self.units_done.add((direction, i))
        return self.unit_bytes[i][direction == "backward"]

    def _compute_time(self, node: fx.Node, direction: str) -> float:
        if direction == "backward" and f"{node.name}.backward" in self.profile:
            return float(self.profile[f"{node.name}.backward"])
        t = self.forward_time.get(node)
        if t is None:
            if node.name in self.profile:
                t = float(self.profile[node.name])
            else:
                cost = node_cost(node)
                t = max(evaluate(cost.flops, self.hints) / self.device.flops,
                        evaluate(cost.mem_bytes, self.hints) / self.device.mem_bandwidth)
            self.forward_time[node] = t
        return 2 * t if direction == "backward" else t

    def _comm(self, label: str, nbytes: float, *, node: str = "", module: str = "", kind: str = "collective",
              start: float | None = None, block: bool = True, key: str = "") -> Bar:
        t0 = max(self.c if start is None else start, self.m)
        dur = float(self.profile.get(key or node or label, nbytes / self.device.mesh_bandwidth))
        bar = Bar("comm", label, kind, t0, t0 + dur, node, module, int(nbytes))
        self.bars.append(bar)
        self.m = bar.end
        if block:
            if bar.start > self.c:
                self.bars.append(Bar("compute", f"wait {label}", "wait", self.c, bar.start, node, module))
            self.c = bar.end
        return bar

    def _op(self, node: fx.Node, direction: str) -> None:
        """A compute op; a MoE node on ep between its exchanges (counts, dispatch | op | combine; duals reversed)."""
        exchanges = moe_collectives(node) if node.target is moe_experts else []
        if direction == "backward":
            exchanges = [c for c in reversed(exchanges) if c.backward_op]
        for c in exchanges:
            if c.note.startswith("combine") == (direction == "forward"):
                continue  # after the op
            self._moe_comm(c, direction)
        self._compute(node, direction)
        for c in exchanges:
            if c.note.startswith("combine") == (direction == "forward"):
                self._moe_comm(c, direction)

    def _moe_comm(self, c, direction: str) -> None:
        nbytes = c.forward_bytes if direction == "forward" else c.backward_bytes
        name = c.note.split(" ")[0]
        self._comm(f"all_to_all({c.mesh_dim}) %{c.node} {name}" + (" (dual)" if direction == "backward" else ""),
                   nbytes, node=c.node, module=c.module, key=f"{c.node}.{name}" + (
                       ".backward" if direction == "backward" else ""))

    def _compute(self, node: fx.Node, direction: str) -> None:
        t = self._compute_time(node, direction)
        if t <= 0:
            return
        info = get_info(node)
        self.bars.append(Bar("compute", node.name, direction, self.c, self.c + t, node.name,
                             info.module_fqn if info is not None else ""))
        self.c += t

    def _wait(self, until: float, label: str, node: str) -> None:
        if until > self.c:
            self.bars.append(Bar("compute", f"wait {label}", "wait", self.c, until, node))
            self.c = until

    def run(self, backward: bool, title: str) -> Timeline:
        nodes = list(self.gm.graph.nodes)
        issued: dict[fx.Node, tuple[fx.Node, Bar]] = {}
        for node in nodes:
            if node.op != "call_function":
                continue
            if node.target in ISSUE_OPS:
                waits = issued_waits(node)
                info = get_info(node)
                unit = info.fsdp_bucket if info is not None and info.fsdp_bucket else node.name
                mesh_dim = node.args[4]
                bar = self._comm(f"all_gather({mesh_dim}) of {unit}", unit_bytes(waits), node=node.name,
                                 module=info.module_fqn if info is not None else "", kind="issued", block=False)
                for w in waits:
                    issued[w] = (node, bar)
            elif node in issued:
                self._close(*issued.pop(node), node)
            elif node.target in COLLECTIVE_OPS:
                c = self.payload.get(node.name)
                unit = self._unit_first(node, "forward")
                nbytes = unit if unit is not None else c.forward_bytes if c is not None else 0
                if nbytes:
                    what = f"of {get_info(node).fsdp_bucket or node.args[0].target}" if unit is not None \
                        else f"%{node.name}"
                    op = "all_gather" if c.op == "fsdp_all_gather" else c.op  # as the issued ones print
                    self._comm(f"{op}({c.mesh_dim}) {what}", nbytes, node=node.name, module=c.module)
            else:
                self._op(node, "forward")
        first = len(self.bars) if backward else -1
        if backward:
            self._backward(nodes)
        return Timeline(title, ("compute", "comm"), tuple(self.bars), tuple(self.overlaps), bool(self.profile), first)

    def _close(self, issue: fx.Node, bar: Bar, wait: fx.Node) -> None:
        """The first wait of an issued unit: the window [issue, wait] and the ops that ran in it."""
        if any(o.issue == f"%{issue.name}" for o in self.overlaps):
            return
        start, end = bar.start, self.c
        ops = [b for b in self.bars if b.lane == "compute" and b.kind == "forward" and b.start >= start
               and b.end <= end + 1e-15]
        modules = tuple(dict.fromkeys(b.module or "<root>" for b in ops))
        self.overlaps.append(Overlap(bar.label, f"%{issue.name}", f"%{wait.name}", start, end,
                                     tuple(b.node for b in ops), modules))
        self._wait(bar.end, bar.label, wait.name)

    def _backward(self, nodes: list[fx.Node]) -> None:
        """Ops in reverse at twice their time, the duals that communicate, FSDP's re-gathers and
        reduce-scatters as the runtime issues them (`_FsdpBackward`), dp buckets as they fill."""
        overlap = any(n.target in ISSUE_OPS for n in nodes)
        fsdp = _FsdpBackward(self, nodes, overlap)
        first_use: dict[str, fx.Node] = {}
        for node in nodes:
            for a in node.all_input_nodes:
                if a.op == "get_attr":
                    first_use.setdefault(str(a.target), node)
        waiting: dict[tuple, list[int]] = {}  # bucket -> [parameters still to finish, bytes]
        bucket_of: dict[str, tuple] = {}
        for node in nodes:
            info = get_info(node)
            sync = info.grad_sync if info is not None and node.op == "get_attr" else None
            if sync and isinstance(info.spec, TensorSpec) and str(node.target) not in bucket_of:
                key = bucket_of[str(node.target)] = (sync.bucket, sync.dims)
                entry = waiting.setdefault(key, [0, 0])
                entry[0] += 1
                entry[1] += info.spec.nbytes(local=True)
        buckets: list[Bar] = []
        for node in reversed(nodes):
            if node.op != "call_function" or node.target in ISSUE_OPS:
                continue
            if node.target is _GATHER and node.name in self.unit:
                fsdp.gradient(node)
            elif node.target in COLLECTIVE_OPS:
                c = self.payload.get(node.name)
                if c is not None and c.backward_op and c.backward_bytes:
                    self._comm(f"{c.backward_op}({c.mesh_dim}) %{node.name} (dual)", c.backward_bytes,
                               node=node.name, module=c.module, key=f"{node.name}.backward")
            else:
                fsdp.needs(node)
                self._op(node, "backward")
            for a in node.all_input_nodes:  # its gradient is complete after the backward of its first use
                key = bucket_of.get(str(a.target)) if a.op == "get_attr" else None
                if key is None or first_use.get(str(a.target)) is not node:
                    continue
                waiting[key][0] -= 1
                if waiting[key][0] == 0:
                    buckets.append(self._comm(f"grad all_reduce({', '.join(key[1])}) bucket {key[0]}",
                                              waiting[key][1], kind="bucket", block=False))
        fsdp.finish()
        for bar in buckets:  # the window is the all-reduce in flight; the step waits for it at the end
            self._window(bar, "its last gradient", "the end of the backward", bar.start, bar.end)
        if buckets:
            self._wait(self.m, "gradient buckets", "")

    def _window(self, bar: Bar, issue: str, wait: str, start: float, end: float) -> None:
        """An Overlap of the backward: `bar` in flight from `start` to `end`, the backward ops that start in it."""
        ops = [b for b in self.bars if b.lane == "compute" and b.kind == "backward" and start <= b.start < end]
        self.overlaps.append(Overlap(bar.label, issue, wait, start, end, tuple(b.node for b in ops),
                                     tuple(dict.fromkeys(b.module or "<root>" for b in ops))))


@dataclass(frozen=True)
class _Unit:
    """An FSDP unit (`fxpar.analysis.fsdp.bucket_groups`): the parameters the runtime gathers as one collective."""

    index: int
    name: str
    mesh_dim: str
    params: tuple[str, ...]
    bucketed: bool  # two or more parameters: a registered bucket (fxpar.runtime.fsdp_buckets); one: the plain op
    module: str


class _FsdpBackward:
    """FSDP's backward as `fxpar.runtime.fsdp_buckets` runs it, replayed in reverse graph order.

        re-gather        (reshard_after_forward) a unit is gathered again before the first backward op
                         that uses one of its gathered parameters (directly or through a view): autograd
                         unpacks it there. Not through a collective: grad_all_reduce (dp x fsdp) returns
                         a clone, which autograd saves as it is (fxpar.runtime.fsdp_state.pack_gathered
                         knows only gathered tensors and their views). Blocking, unless it was prefetched:
        prefetch         with overlap scheduled, once half of unit u's parameters have their gradient,
                         the reduce-scatter in flight (unit u+1's) is waited, then the re-gather of the
                         unit before it (u-1, bucketed ones) is issued; its first use waits on it. The
                         window is the rest of u's backward.
        reduce-scatter   when a unit's last gradient is in, the reduce-scatter issued before it, if still
                         in flight, is waited (one in flight), then the unit's own is issued (with
                         overlap: not waited, so it runs under the next unit's backward until that
                         unit's prefetch; without: blocking). The end of the backward waits for the last.
    A unit of one parameter (fsdp_unit='param', or a lone parameter) takes the plain op's path: its
    re-gather and its reduce-scatter (at its gather's dual) both block. The root unit (`FSDP_ROOT_UNIT`,
    apply_fsdp) is never re-gathered: the runtime keeps it from the forward, as FSDP2's root; its
    reduce-scatter is a bucket's, when its last gradient is in.
    """

    def __init__(self, replay: "_Replay", nodes: list[fx.Node], overlap: bool) -> None:
        self.r, self.overlap = replay, overlap
        self.regather = replay.reshard_after_forward
        units = replay.units
        self.of_gather = {n: units[replay.unit[n.name]] for n in nodes
                          if n.target is _GATHER and n.name in replay.unit}
        # also the other gathers of a parameter gathered once per use (a tied weight)
        param_unit = {p: u for u in units for p in u.params}
        for n in nodes:
            if n.target is _GATHER and n not in self.of_gather and str(n.args[0].target) in param_unit:
                self.of_gather[n] = param_unit[str(n.args[0].target)]
        self.uses: dict[fx.Node, set[int]] = {}  # node -> units whose gathered parameters its backward unpacks
        for g, u in self.of_gather.items():
            frontier = list(g.users)
            while frontier:
                n = frontier.pop()
                if _is_view(n):
                    frontier.extend(n.users)
                elif n.op == "call_function" and n.target not in COLLECTIVE_OPS:
                    self.uses.setdefault(n, set()).add(u.index)
        bucketed = [u for u in units if u.bucketed and u.name != FSDP_ROOT_UNIT]  # the root is no one's prev
        self.prev = {u.index: p for p, u in zip(bucketed, bucketed[1:])}
        self.done: set[int] = set()  # re-gathered in this backward
        self.pending: dict[int, tuple[Bar, float]] = {}  # prefetched re-gathers not yet waited (bar, issued at)
        self.prefetch_at: dict[int, int] = {}  # unit -> gradients after which it prefetches its prev's re-gather
        self.grads: dict[int, set[str]] = {}
        self.in_flight: tuple | None = None  # the reduce-scatter issued and not yet waited: (unit, bar, issued at)

    def _bytes(self, u: _Unit, direction: str) -> int:
        return self.r.unit_bytes[u.index][direction == "backward"]

    def needs(self, node: fx.Node) -> None:
        """Before `node`'s backward: re-gather (or wait for) every unit it unpacks that is not gathered yet."""
        if not self.regather:
            return
        for i in sorted(self.uses.get(node, ())):
            if i in self.done:
                continue
            self.done.add(i)
            u = self.r.units[i]
            if u.name == FSDP_ROOT_UNIT and self.r.keep_root:
                continue  # kept gathered from the forward (fxpar.runtime.fsdp_buckets: `keep`)
            label = f"all_gather({u.mesh_dim}) of {u.name} (re-gather)"
            bar, start = self.pending.pop(i, (None, 0.0))
            if bar is None:
                self.r._comm(label, self._bytes(u, "forward"), module=u.module, key=f"{u.name}.regather")
            else:
                self.r._window(bar, f"half of "
                               f"{self.r.units[self._next(i)].name}'s gradients", f"%{node.name} (backward)",
                               start, self.r.c)
                self.r._wait(bar.end, label, node.name)
            if self.overlap and u.bucketed and u.index in self.prev:
                self.prefetch_at[u.index] = -(-len(u.params) // 2)

    def _next(self, i: int) -> int:
        return next(k for k, p in self.prev.items() if p.index == i)

    def gradient(self, gather: fx.Node) -> None:
        """The dual of an FSDP gather: its parameter's gradient is in."""
        u = self.of_gather[gather]
        if not u.bucketed:  # the plain op: a blocking reduce-scatter of this parameter's gradient
            c = self.r.payload.get(gather.name)
            if c is not None and c.backward_bytes:
                self.r._comm(f"reduce_scatter({u.mesh_dim}) of {u.name} (dual)", c.backward_bytes,
                             node=gather.name, module=u.module, key=f"{gather.name}.backward")
            return
        got = self.grads.setdefault(u.index, set())
        got.add(str(gather.args[0].target))
        if len(got) == self.prefetch_at.get(u.index):
            p = self.prev[u.index]
            if self.regather:  # the runtime waits the reduce-scatter in flight before it issues the re-gather
                self._drain(f"{p.name}'s re-gather")
            if self.regather and p.index not in self.done and p.index not in self.pending:
                self.pending[p.index] = (self.r._comm(f"all_gather({p.mesh_dim}) of {p.name} (re-gather)",
                                                      self._bytes(p, "forward"), module=p.module, kind="regather",
                                                      block=False, key=f"{p.name}.regather"), self.r.c)
        if len(got) == len(u.params):
            self._flush(u, gather.name)

    def _flush(self, u: _Unit, node: str) -> None:
        self._drain(f"{u.name}'s reduce-scatter")
        label = f"reduce_scatter({u.mesh_dim}) of {u.name} (dual)"
        bar = self.r._comm(label, self._bytes(u, "backward"), node=node, module=u.module, key=f"{u.name}.backward",
                           kind="reduce_scatter" if self.overlap else "collective", block=not self.overlap)
        if self.overlap:
            self.in_flight = (u, bar, self.r.c)

    def _drain(self, until: str) -> None:
        if self.in_flight is None:
            return
        u, bar, start = self.in_flight
        self.in_flight = None
        self.r._window(bar, f"{u.name}'s last gradient", until, start, self.r.c)
        self.r._wait(bar.end, bar.label, "")

    def finish(self) -> None:
        """The end of the backward: units missing a gradient flush, and the last reduce-scatter is waited."""
        for u in self.r.units:
            if u.bucketed and 0 < len(self.grads.get(u.index, ())) < len(u.params):
                self._flush(u, "")
        self._drain("the end of the backward")


def _is_view(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "is_view", False) is True


def _pipeline(pm, split, device: DeviceModel) -> Timeline:
    """Every pp rank's actions from torch's order, scaled by the stages' estimated times."""
    entries, bubble = simulate_schedule(schedule_order(split), split.num_stages)
    mb = max(split.microbatches, 1)
    unit = sum(s.time_value for s in split.stages) / len(split.stages) / mb or 1.0
    bars, lanes = [], []
    for r in range(split.pp_size):
        lanes += [f"pp{r} compute", f"pp{r} comm"]
    comm_free = {r: 0.0 for r in range(split.pp_size)}
    for e in sorted(entries, key=lambda e: (e.start, e.rank)):
        kind = "forward" if e.kind == "F" else "backward"
        start, end = e.start * unit, e.end * unit
        bars.append(Bar(f"pp{e.rank} compute", f"{e.kind}{e.stage}.{e.microbatch}", kind, start, end,
                        module=split.stages[e.stage].first_module))
        # an activation goes forward over the cut after the stage, its gradient back over the cut before it
        cut = e.stage + 1 if e.kind == "F" else e.stage if e.kind in ("B", "I") else None
        if cut is None or not 0 < cut < split.num_stages:
            continue
        receiver = cut if e.kind == "F" else cut - 1
        if split.stages[receiver].rank == e.rank:
            continue  # the next stage runs on this rank (V schedules): a hand-over, no transfer
        nbytes = split.stages[cut].recv_bytes_value / mb
        t0 = max(end, comm_free[e.rank])
        what = "activation" if e.kind == "F" else "gradient"
        bar = Bar(f"pp{e.rank} comm", f"send {what} {e.stage}->{cut if e.kind == 'F' else cut - 1} mb {e.microbatch}",
                  "p2p", t0, t0 + nbytes / device.mesh_bandwidth, nbytes=int(nbytes))
        comm_free[e.rank] = bar.end
        bars.append(bar)
    title = (f"{split.schedule}: {split.num_stages} stages on {split.pp_size} pp ranks, {split.microbatches} "
             f"microbatches" + (f", bubble {bubble:.1%}" if bubble is not None else ""))
    return Timeline(title, tuple(lanes), tuple(bars), ())
