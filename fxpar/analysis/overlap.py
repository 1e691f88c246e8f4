"""Overlapped collectives: what each issue node overlaps, and the checks that make reordering safe.

An issue node (`fxpar.fsdp_prefetch`, `fxpar.passes.schedule_overlap`) starts
the gather of an FSDP unit; the unit's `fsdp_all_gather` nodes wait on it.
Any collective issued as its own node and waited by another (torch's
functional collectives with `wait_tensor`, as AOT autograd and inductor see
them; async tp's issue and wait nodes) is checked by one check,
`check_issue_waits`: nothing but a wait reads the issued value before its
first wait (an async tp issue: ever; its one wait's value is read instead),
and every issued collective is waited. For a graph with FSDP issue nodes,
`check_overlap` also proves:

    1. every issued shard is a parameter whose gather (its wait) comes after the
       issue, and no shard is issued twice before its wait;
    2. every wait precedes the first use of its value (graph order);
    3. gathered bytes in flight stay within the estimate: at any node,
           in_flight(node) = sum over units issued or waited and not yet dead of unit bytes
       where a unit is dead after the last use of its waits; the estimate is the peak of
       the same walk without issue nodes (each unit from its first wait) plus the largest
       unit: FSDP2's prefetch of one unit (`in_flight_estimate`).

Every rank issues the same collectives in the same order after reordering:
`fxpar.analysis.fingerprint.collective_schedule` lists an issued gather at its
issue node (its waits communicate nothing) and the other FSDP gathers where
they stand, so the static cross-rank check and the run-time fingerprint
compare the reordered order (two blocks' gathers have the same shapes: only
the order tells them apart).

Issued tensor-parallel collectives (`fxpar.passes.async_tp`: `fxpar.all_reduce_start`,
and under sequence parallel `fxpar.sp_all_gather_start` and `fxpar.reduce_scatter_start`)
are checked by `check_issue_waits` too: each has exactly one user, its wait
(`fxpar.ops.async_tp.wait_issued`), and every wait waits on an issued
collective; so no op reads a value still in flight, and the wait precedes every
use of the value (graph order). The issue node is one of `COLLECTIVE_OPS` (as
the collective it replaces): the fingerprint lists it where it is issued, so
the cross-rank check compares the interleaved order.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxpar.core.errors import GraphInvariantError, node_context
from fxpar.core.fmt import fmt_bytes
from fxpar.core.spec import get_info, size_hint
from fxpar.ops.async_tp import ASYNC_OPS, WAIT_OP
from fxpar.ops.overlap import ISSUE_OPS
from fxpar.ops.transitions import collective_args

__all__ = ["issue_nodes", "issued_waits", "unit_bytes", "in_flight_peak", "in_flight_estimate", "check_overlap",
           "overlap_lines", "is_wait", "check_issue_waits", "async_issues"]

_GATHER = torch.ops.fxpar.fsdp_all_gather.default


def issue_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ISSUE_OPS]


def issued_waits(issue: fx.Node) -> list[fx.Node]:
    """The `fsdp_all_gather` nodes that wait on `issue`'s gather (one per shard it issues)."""
    return [u for s in issue.args[0] for u in s.users if u.target is _GATHER]


def _bytes(node: fx.Node) -> int:
    v = node.meta.get("val")
    return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0


def unit_bytes(waits: list[fx.Node]) -> int:
    """Bytes of the full (gathered) parameters of one unit on this rank."""
    return sum(_bytes(w) for w in waits)


def _units(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Every FSDP unit's waits, in graph order: issued units by their issue node, the others one gather each."""
    issued = {w: i for i in issue_nodes(gm) for w in issued_waits(i)}
    units, seen = [], set()
    for node in gm.graph.nodes:
        if node.target is not _GATHER or node in seen:
            continue
        issue = issued.get(node)
        waits = issued_waits(issue) if issue is not None else [node]
        seen.update(waits)
        units.append(waits)
    return units


def in_flight_estimate(gm: fx.GraphModule) -> int:
    """The waiting schedule's peak plus one unit: what prefetching one unit ahead (FSDP2's default) may add."""
    sizes = [unit_bytes(u) for u in _units(gm)]
    return in_flight_peak(gm, issued=False)[0] + max(sizes, default=0)


def in_flight_peak(gm: fx.GraphModule, *, issued: bool = True) -> tuple[int, fx.Node | None]:
    """(most gathered bytes in flight at once, the node where that is reached), walking graph order.

    A unit is in flight from its issue node (`issued=False`: from its first wait, the schedule without
    overlap) to the last use of its waits.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    starts = {w: i for i in issue_nodes(gm) for w in issued_waits(i)} if issued else {}
    events: list[tuple[int, int]] = []  # (position, +bytes at start / -bytes after last use)
    for waits in _units(gm):
        first = min(order[w] for w in waits)
        start = order[starts[waits[0]]] if waits[0] in starts else first
        last = max((order[u] for w in waits for u in w.users), default=first)
        events += [(start, unit_bytes(waits)), (last + 1, -unit_bytes(waits))]
    nodes = list(gm.graph.nodes)
    live = peak = 0
    where = None
    for pos, delta in sorted(events):  # frees before allocations at one position
        live += delta
        if live > peak:
            peak, where = live, nodes[min(pos, len(nodes) - 1)]
    return peak, where


_WAIT_NAMES = ("wait_tensor", "wait_issued")


def is_wait(node: fx.Node) -> bool:
    """A node that waits for a collective issued by its first argument (`wait_tensor` and its wrappers)."""
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", "") or str(node.target)
    return any(name == w or name.startswith(f"{w}.") or str(node.target).endswith(f"{w}.default")
               for w in _WAIT_NAMES)


def _issues_functional(node: fx.Node) -> bool:
    """A torch functional collective that returns its result without waiting (it needs a `wait_tensor`)."""
    return node.op == "call_function" and getattr(node.target, "namespace", None) == "_c10d_functional" \
        and not is_wait(node)


def _issued(node: fx.Node) -> bool:
    """A node whose value is valid only after a wait: a torch functional collective, an async tp issue, or
    anything a wait waits on."""
    return _issues_functional(node) or (node.op == "call_function" and node.target in ASYNC_OPS) \
        or any(is_wait(u) for u in node.users)


def check_issue_waits(gm: fx.GraphModule) -> None:
    """No op reads an issued collective's value while it is in flight, and every issued collective is waited.

    One check for every issue / wait pair (a wait node, `is_wait`, names its issued value as its first
    argument): torch's functional collectives with `wait_tensor` (as AOT autograd and inductor see them)
    and async tp's issued collectives (`fxpar.ops.async_tp.ASYNC_OPS`, waited by `wait_issued`):

        functional   nothing but a wait reads the value before its first wait (after it, the buffer is complete)
        async tp     exactly one wait and no other reader: ops read the wait's value (the issue's is a copy
                     that is complete only at the wait); every `wait_issued` waits on an async issue

    Raises:
        GraphInvariantError: one format: '<reader>: reads %<issued>, issued by <issue>, <where>: the collective
            is still in flight there; <fix>' (or the issue never waited, or the wait on something not issued).
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is WAIT_OP:
            src = node.args[0] if node.args else None
            if not isinstance(src, fx.Node) or src.target not in ASYNC_OPS:
                raise GraphInvariantError(f"{node_context(node)}: waits on {src}, which is not an issued "
                                          f"collective; {_fix(node)}")
        if not _issued(node):
            continue
        values = [u for u in node.users if u.target is operator.getitem] or [node]  # a coalesced list: each item
        if not any(is_wait(u) for v in values for u in v.users):
            wait = "wait_issued" if node.target in ASYNC_OPS else "wait_tensor"
            raise GraphInvariantError(f"{node_context(node)}: issues a collective that no {wait} waits for: its "
                                      f"result is never complete and its buffer is read while in flight; {_fix(node)}")
        strict = node.target in ASYNC_OPS
        for value in values:
            waits = [u for u in value.users if is_wait(u)]
            if not waits:
                continue
            first = min(waits, key=order.__getitem__)
            early = [u for u in value.users if not is_wait(u) and (strict or order[u] < order[first])]
            if early:
                where = f"before its wait %{first.name}" if order[early[0]] < order[first] else \
                    f"instead of its wait %{first.name}'s value"
                raise GraphInvariantError(f"{node_context(early[0])}: reads %{value.name}, issued by "
                                          f"{node_context(node)}, {where}: the collective is still in flight there, "
                                          f"writing that buffer; {_fix(node)}")
            if strict and len(waits) != 1:
                raise GraphInvariantError(f"{node_context(node)}: issued collective with {len(waits)} waits "
                                          f"(expected 1); {_fix(node)}")


def _fix(node: fx.Node) -> str:
    if node.target in ASYNC_OPS or node.target is WAIT_OP:
        return "read the wait's value instead; rerun fxpar.passes.async_tp on the graph before it, or pass overlap=False"
    return ("the wait must come before every other use of an issued collective's value: a pass moved the wait "
            "late or a use early (move the wait up to just before the first use; add the wait_tensor if missing)")


def check_overlap(gm: fx.GraphModule) -> None:
    """The checks in the module docstring (`check_issue_waits`, then the FSDP issue nodes').

    Raises:
        GraphInvariantError: naming the issue or wait node at fault and the fix.
    """
    check_issue_waits(gm)
    issues = issue_nodes(gm)
    if not issues:
        return
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    fix = "; rerun fxpar.passes.schedule_overlap on the graph without its issue nodes, or pass overlap=False"
    issued: dict[fx.Node, fx.Node] = {}
    for issue in issues:
        for s in issue.args[0]:
            if not isinstance(s, fx.Node) or s.op != "get_attr":
                raise GraphInvariantError(f"{node_context(issue)}: issues a gather of {s}, not of a parameter{fix}")
            if s in issued:
                raise GraphInvariantError(f"{node_context(issue)}: issues the gather of {s.target} again, already "
                                          f"issued by %{issued[s].name} before its wait{fix}")
            issued[s] = issue
            waits = [u for u in s.users if u.target is _GATHER]
            if len(waits) != 1:
                raise GraphInvariantError(f"{node_context(issue)}: {s.target} has {len(waits)} gathers to wait on "
                                          f"its issued gather (expected 1){fix}")
            if order[waits[0]] < order[issue]:
                raise GraphInvariantError(f"{node_context(waits[0])}: waits on the gather of {s.target} before "
                                          f"%{issue.name} issues it{fix}")
    for issue in issues:
        for w in issued_waits(issue):
            early = [u for u in w.users if order[u] < order[w]]
            if early:
                raise GraphInvariantError(f"{node_context(early[0])}: uses %{w.name} before its wait{fix}")
    peak, where = in_flight_peak(gm)
    bound = in_flight_estimate(gm)
    if peak > bound:
        raise GraphInvariantError(
            f"{node_context(where)}: {fmt_bytes(peak)} of gathered FSDP parameters in flight, over the estimate of "
            f"{fmt_bytes(bound)} (the waiting schedule's peak plus one unit): a unit is issued more than one unit early{fix}")


def async_issues(gm: fx.GraphModule) -> list[fx.Node]:
    """The issued tp collectives of `gm` (`fxpar.ops.async_tp.ASYNC_OPS`), in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ASYNC_OPS]


def _compute_between(nodes: list[fx.Node], start: int, end: int) -> tuple[list[fx.Node], str]:
    """The ops strictly between two positions and the modules they belong to (for explain)."""
    compute = [n for n in nodes[start + 1:end] if n.op == "call_function" and n.target is not _GATHER
               and n.target not in ISSUE_OPS and n.target not in ASYNC_OPS and n.target is not WAIT_OP]
    modules: list[str] = []
    for n in compute:
        info = get_info(n)
        fqn = info.module_fqn if info is not None and info.module_fqn else "<root>"
        if fqn not in modules:
            modules.append(fqn)
    shown = ", ".join(modules[:4]) + (f", ... ({len(modules)} modules)" if len(modules) > 4 else "")
    return compute, shown or "nothing"


def _async_lines(gm: fx.GraphModule) -> list[str]:
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    out = []
    for issue in async_issues(gm):
        wait = next(iter(issue.users))
        compute, shown = _compute_between(nodes, order[issue], order[wait])
        a = collective_args(issue)
        src = issue.args[0].meta.get("val") if isinstance(issue.args[0], fx.Node) else None
        nbytes = _local_bytes(issue.args[0]) if isinstance(issue.args[0], fx.Node) else 0
        out.append(f"  {ASYNC_OPS[issue.target]}({a.get('mesh_dim')}) of %{issue.args[0].name} ({fmt_bytes(nbytes)}) "
                   f"issued at %{issue.name}, waited at %{wait.name}: overlaps {len(compute)} ops of {shown}"
                   if src is not None else f"  %{issue.name}: waited at %{wait.name}")
    return out


def _local_bytes(node: fx.Node) -> int:
    info = get_info(node)
    spec = info.spec if info is not None else None
    if spec is not None and hasattr(spec, "local_shape"):
        numel = 1
        for s in spec.local_shape:
            numel *= size_hint(s)
        return numel * spec.dtype.itemsize
    return _bytes(node)


def overlap_lines(gm: fx.GraphModule) -> list[str]:
    """explain(): for each issue node, the collective it starts and the computation it runs under."""
    issues = issue_nodes(gm)
    tp = _async_lines(gm)
    if tp:
        tp = ["", "Tensor-parallel overlap (fxpar.passes.async_tp: the batch in chunks, each chunk's all-reduce "
                  "(sequence parallel: gather, reduce-scatter) issued async; overlap=False to turn off):", *tp]
    if not issues:
        return tp
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes = list(gm.graph.nodes)
    out = ["", "Overlap (fxpar.passes.schedule_overlap; overlap=False to turn off):"]
    for issue in issues:
        waits = issued_waits(issue)
        first = min(waits, key=order.__getitem__)
        between = nodes[order[issue] + 1:order[first]]
        compute = [n for n in between if n.op == "call_function" and n.target is not _GATHER
                   and n.target not in ISSUE_OPS]
        modules = []
        for n in compute:
            info = get_info(n)
            fqn = info.module_fqn if info is not None and info.module_fqn else "<root>"
            if fqn not in modules:
                modules.append(fqn)
        info = get_info(issue)
        unit = info.fsdp_bucket if info is not None and info.fsdp_bucket else issue.name
        shown = ", ".join(modules[:4]) + (f", ... ({len(modules)} modules)" if len(modules) > 4 else "")
        out.append(f"  all_gather(fsdp) of {unit} ({fmt_bytes(unit_bytes(waits))}) issued at %{issue.name}, "
                   f"waited at %{first.name}: overlaps {len(compute)} ops of {shown or 'nothing'}")
    peak, _ = in_flight_peak(gm)
    out.append(f"  gathered parameters in flight: peak {fmt_bytes(peak)} (estimate {fmt_bytes(in_flight_estimate(gm))})")
    return out + tp
