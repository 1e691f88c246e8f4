"""The gradient-dual invariant of fxpar graphs (`fxpar.analysis.invariants`' collectives check, its last part).

Every Replicate input of an op whose output is not Replicate on a mesh dim
comes through a reducing dual on that dim (grad_all_reduce, fsdp_all_gather,
sp_all_gather, or the runtime's bucketed gradient sync of a parameter:
DESIGN.md's last duality row, its gradient is partial on each rank), and no
partial gradient is reduced twice or a full one summed again (a gradient scaled
by the mesh size). Casts, views of a gathered value and the waits of issued
collectives (`fxpar.passes.async_tp`) are linear in the gradient: the walks go
through them.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxpar.analysis.local_run import _specs_of
from fxpar.core.dataflow import computes_no_value, differentiable
from fxpar.core.errors import GraphInvariantError, node_context
from fxpar.core.mesh import MeshInfo
from fxpar.core.spec import get_info, placements_str
from fxpar.ops.async_tp import WAIT_OP
from fxpar.ops.collectives import COLLECTIVE_OPS
from fxpar.ops.transitions import collective_args
from fxpar.rules import tensor_args

__all__ = ["check_grad_duals", "placed_ops", "runtime_synced"]

_aten = torch.ops.aten


def _outputs_replicate(info, m: int) -> bool:
    return all(s is None or s.placements[m].is_replicate() for s in _specs_of(info))


def _is_collective(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in COLLECTIVE_OPS


def placed_ops(gm: fx.GraphModule):
    """(node, info) of each op that computes under its sharding rule: not a collective, with the placements
    it needs on its inputs and a spec of its outputs."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or _is_collective(node) or node.target is operator.getitem:
            continue
        info = get_info(node)
        if info is not None and info.input_placements is not None and _specs_of(info):
            yield node, info


_VIEWS = (_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default)


_SP_GATHERS = (torch.ops.fxpar.sp_all_gather.default, torch.ops.fxpar.sp_all_gather_start.default)


def _is_view_of_gather(node: fx.Node) -> bool:
    """A reshape of a gathered value (sequence parallel's view of an sp_all_gather, or of the wait of an
    issued one): linear, so a sum of gradients commutes with it, and the duals are judged through it, as
    through a cast."""
    if node.op != "call_function" or node.target not in _VIEWS or not isinstance(node.args[0], fx.Node):
        return False
    src = node.args[0]
    if _is_wait(src) and isinstance(src.args[0], fx.Node):
        src = src.args[0]
    return src.op == "call_function" and src.target in _SP_GATHERS


def _is_wait(node: fx.Node) -> bool:
    """The wait of an issued collective (`fxpar.passes.async_tp`): its value is the issue's, its gradient the
    identity, so the duals are judged through it."""
    return node.op == "call_function" and node.target is WAIT_OP


def _is_cast(node: fx.Node) -> bool:
    """A dtype-only copy (mixed precision's casts): linear, so a sum of gradients commutes with it and
    the gradient duals are judged through it."""
    return node.op == "call_function" and node.target is _aten._to_copy.default \
        and set(node.kwargs) <= {"dtype"} and len(node.args) == 1




# Collectives whose backward sums the partial gradients of their output over their mesh dim.
_REDUCING_DUALS = frozenset({"grad_all_reduce", "fsdp_all_gather", "sp_all_gather"})


def runtime_synced(node: fx.Node) -> tuple[str, ...]:
    """Mesh dims on which the runtime all-reduces this parameter's gradient after the backward.

    (`bucket_grad_sync` moves data-parallel grad_all_reduce nodes off parameters
    into `meta["fxpar"].grad_sync`; the runtime syncs them in buckets.)
    """
    info = get_info(node) if node.op == "get_attr" else None
    sync = info.grad_sync if info is not None else None
    return sync.dims if sync is not None else ()


def _reduced_on(node: fx.Node, dim: str, mesh: MeshInfo | None = None, grads: set[fx.Node] | None = None) -> bool:
    """Whether `node`'s value reached this use through a reducing dual on mesh dim `dim`.

    Collectives on other mesh dims are walked through (their backward commutes
    with a sum over `dim`); one on `dim` that does not reduce ends the walk. A
    parameter whose gradient the runtime syncs on `dim` counts as reduced. With
    `mesh` and `grads`, so does a value computed replicated on `dim` from reduced
    values only, whose gradient is partial wherever it goes (`_partial_only`): the
    sum is taken at its inputs' duals (`insert_collectives._partial_gradient_cones`).
    """
    while _is_collective(node) or _is_cast(node) or _is_view_of_gather(node) or _is_wait(node):
        if _is_collective(node) and collective_args(node)["mesh_dim"] == dim:
            return COLLECTIVE_OPS[node.target] in _REDUCING_DUALS
        node = node.args[0]
    if dim in runtime_synced(node):
        return True
    if mesh is None or grads is None or node.op != "call_function" or dim not in mesh.names:
        return False
    info = get_info(node)
    m = mesh.names.index(dim)
    if info is None or not _specs_of(info) or not _outputs_replicate(info, m) or not _partial_only(node, m, dim):
        return False
    inputs = [a for a in tensor_args(node) if a in grads]
    return bool(inputs) and all(_reduced_on(a, dim, mesh, grads) for a in inputs)


def _partial_only(node: fx.Node, m: int, dim: str) -> bool:
    """Whether every gradient into `node` (replicated on mesh dim m) is partial on m: each use makes an
    output sharded on m from it taken Replicate, or is itself such a value (through casts, views and
    collectives on other dims)."""
    for u in node.users:
        if computes_no_value(u):
            continue
        if _is_cast(u) or _is_view_of_gather(u) or _is_wait(u) or \
                (_is_collective(u) and collective_args(u)["mesh_dim"] != dim):
            if not _partial_only(u, m, dim):
                return False
            continue
        info = get_info(u)
        if u.op != "call_function" or _is_collective(u) or info is None or info.input_placements is None \
                or not _specs_of(info):
            return False
        if _outputs_replicate(info, m):
            if not _partial_only(u, m, dim):
                return False
            continue
        if any(need is None or need[m] is None or not need[m].is_replicate()
               for a, need in zip(tensor_args(u), info.input_placements) if a is node):
            return False
    return True


def _source(node: fx.Node) -> fx.Node:
    """The value behind a chain of collectives (and dtype casts)."""
    while _is_collective(node) or _is_cast(node) or _is_wait(node):
        node = node.args[0]
    return node


def _only_feeds_output(node: fx.Node) -> bool:
    """A stage's copy of a value on its way out (contiguous / clone feeding only the output)."""
    return node.op == "call_function" and bool(node.users) and all(
        u.op == "output" or _only_feeds_output(u) for u in node.users) and node.target in (
        torch.ops.aten.contiguous.default, torch.ops.aten.clone.default, torch.ops.aten.alias.default)


def check_grad_duals(gm: fx.GraphModule, mesh: MeshInfo, boundary: frozenset[str] | None = None) -> None:
    """Partial gradients are reduced exactly once: where they arise, and only there.

    A Replicate input of an op whose output is not Replicate on mesh dim m gets
    a gradient that is only a partial sum on each rank: it must come through a
    reducing dual on m (grad_all_reduce, or fsdp_all_gather whose backward
    reduce-scatters). Conversely a reducing dual feeding an op whose output is
    Replicate on m would sum full gradients m times over.

    In a pipeline stage (`boundary` given: the names of placeholders fed by
    other stages) gradients cross the stage edges as they are: a value
    received from another stage may get its dual there, and one sent on may
    be used sharded there, so those two ends are not judged here (the
    unsplit graph was checked before split_stages cut it).
    """
    grads = differentiable(gm)
    for node, info in placed_ops(gm):
        for a, need in zip(tensor_args(node), info.input_placements):
            if need is None or a not in grads:
                continue
            for m, p in enumerate(need):
                if p is None or not p.is_replicate() or _outputs_replicate(info, m):
                    continue
                if _reduced_on(a, mesh.names[m], mesh, grads):
                    continue
                if boundary is not None and _source(a).op == "placeholder" and _source(a).name in boundary:
                    continue
                out = ", ".join(placements_str(s.placements) for s in _specs_of(info) if s is not None)
                raise GraphInvariantError(
                    f"{node_context(node)}: consumes %{a.name} as Replicate on mesh dim {mesh.names[m]!r} but its "
                    f"output is {out}, so each rank's gradient for %{a.name} is only a partial sum; %{a.name} must "
                    f"come through fxpar.grad_all_reduce on {mesh.names[m]!r} (identity forward, all-reduce "
                    "backward: the missing dual in the backward). Insert it with "
                    "fxpar.ops.transitions.insert_grad_all_reduce")
    reducers = []
    for node in gm.graph.nodes:
        if _is_collective(node) and COLLECTIVE_OPS[node.target] in _REDUCING_DUALS:
            reducers.append((node, collective_args(node)["mesh_dim"], COLLECTIVE_OPS[node.target]))
        for dim in runtime_synced(node):
            reducers.append((node, dim, "the runtime's gradient sync"))
    for node, dim, op in reducers:
        m = mesh.names.index(dim) if dim in mesh.names else None
        if m is None:
            continue  # _check_collectives reports it
        frontier = list(node.users)
        while frontier:
            u = frontier.pop()
            if _is_cast(u) or _is_view_of_gather(u) or _is_wait(u):
                frontier.extend(u.users)
                continue
            if _is_collective(u):
                if collective_args(u)["mesh_dim"] != dim:
                    frontier.extend(u.users)
                elif COLLECTIVE_OPS[u.target] in _REDUCING_DUALS:
                    raise GraphInvariantError(
                        f"{node_context(u)}: the gradient of %{node.name} is reduced twice on mesh dim {dim!r}: by "
                        f"{op} at %{node.name} and again by {COLLECTIVE_OPS[u.target]} at %{u.name} downstream of "
                        f"it (a gradient scaled by {mesh.sizes[m]} on the elements this use touches). Reduce each "
                        "use's partial gradient exactly once")
                continue
            u_info = get_info(u)
            if boundary is not None and u.op == "output":
                continue  # sent to the next stage, whose use decides
            if boundary is not None and _only_feeds_output(u):
                continue
            if u.op == "output" or (u_info is not None and _specs_of(u_info) and _outputs_replicate(u_info, m)
                                    and not _partial_only(u, m, dim)):
                raise GraphInvariantError(
                    f"{node_context(node)}: {op} on mesh dim {dim!r} feeds %{u.name}, whose output is Replicate on "
                    f"{dim!r}: that use already gives every rank the full gradient, and {op}'s backward sums it "
                    f"over the {mesh.sizes[m]} ranks again (a gradient scaled by {mesh.sizes[m]}). Give replicated "
                    "uses the value without the reducing dual")
