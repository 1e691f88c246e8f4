"""Static invariants of fxpar graphs: checked after every pass, by `fxpar.check`, and across ranks.

Nothing here runs a collective. Which checks run on one graph depends on what
the passes so far provide (`check_graph(gm, mesh, provided)`):

    specs         every tensor value has a spec with one placement per mesh dim,
                  its global shape equal to meta["val"], its local shape equal to
                  the global shape divided by its shards; inputs and parameters
                  are never Partial
    collectives   every edge carries exactly the placements its consumer's
                  strategy needs; that strategy is one the op's sharding rule
                  allows for those inputs (so no Partial value reaches an op
                  that is not linear in it, and an op without a rule runs on
                  Replicate); graph outputs are Replicate; every collective's op
                  and arguments (dim, group size, group, mesh dim) are the
                  transition between its input's and its output's placements;
                  every communication is an fxpar collective with its backward
                  dual (no raw c10d ops); every Replicate input of an op whose
                  output is not Replicate on a mesh dim comes through a
                  reducing dual on that dim (grad_all_reduce, fsdp_all_gather,
                  or the runtime's bucketed gradient sync of a parameter:
                  DESIGN.md's last duality row, its gradient is partial on each
                  rank), and no partial gradient is reduced twice or a full one
                  summed again (a gradient scaled by the mesh size)
    local_shapes  the graph runs on local shapes: executed with FakeTensors of
                  each input's and parameter's local shape, every node produces
                  exactly the local shape its spec says (run once per compile,
                  when local_shapes is provided, and by check_module)
    local_params  every parameter and buffer tensor the GraphModule holds has
                  its spec's local shape (ranks with a coordinate only)

Pipelines (`check_pipeline`, from any one rank): the split parent calls its
stages in stage order, each stage sits on the pp rank torch's schedule runs
it on, every activation crossing a cut has the same placements and local
shape on both sides (and the final outputs are whole), and every pp rank's
sends and recvs, derived from torch's schedule IR, pair up with the same
tensors and without a deadlock (`fxpar.p2p_check`). Gradients cross cuts as
they are, so the dual checks leave a stage's received inputs and sent
outputs to the unsplit graph's check.

Across the ranks of a mesh (`check_ranks(pms)`, e.g. from the simulator):
every group's members issue the same collectives (op, mesh dim, local shape,
dtype, and which node) in the same order; every parameter has the same
placements on all its holders and each shard position of it has an owner.
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Placement, Shard, _StridedShard

from fxpar.collectives import BACKWARD_OF, COLLECTIVE_OPS, collective_args, transition_op
from fxpar.dataflow import differentiable
from fxpar.errors import FxparError, GraphInvariantError, ScheduleError, node_context
from fxpar.mesh import MeshInfo
from fxpar.rules import OpInfo, lookup, tensor_args
from fxpar.spec import TensorSpec, get_info, make_spec, placements_str, size_hint

__all__ = [
    "ALL_FACTS",
    "check_graph",
    "check_module",
    "check_ranks",
    "check_pipeline",
    "local_fake_run",
]

log = logging.getLogger(__name__)

ALL_FACTS = frozenset({"specs", "collectives", "local_shapes", "local_params"})
"""What a finished ParallelModule's graph provides; `fxpar.check` checks all of it."""

_RAW_COMM_NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd", "c10d", "_dtensor")
_FXPAR = torch.ops.fxpar


def _is_shard(p: Placement | None) -> bool:
    return isinstance(p, (Shard, _StridedShard))


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b))


def _hint_shape(shape) -> tuple[int, ...]:
    return tuple(size_hint(s) for s in shape)


def _fix(what: str) -> str:
    return f"; {what}" if what else ""


def _p(p: Placement | None) -> str:
    return placements_str([p])[1:-1] if p is not None else "-"


def _specs_of(info) -> tuple[TensorSpec | None, ...]:
    spec = info.spec if info is not None else None
    if isinstance(spec, TensorSpec):
        return (spec,)
    if isinstance(spec, tuple):
        return spec
    return ()


def _output_placements(info, m: int):
    """The node's output placement(s) on mesh dim m, shaped like a rule's Strategy.output."""
    spec = info.spec
    if isinstance(spec, TensorSpec):
        return spec.placements[m]
    return tuple(s.placements[m] if s is not None else None for s in spec)


def _outputs_replicate(info, m: int) -> bool:
    return all(s is None or s.placements[m].is_replicate() for s in _specs_of(info))


def _is_collective(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in COLLECTIVE_OPS


# --------------------------------------------------------------------------- specs


def _check_spec(node: fx.Node, spec: TensorSpec, val, mesh: MeshInfo) -> None:
    if len(spec.placements) != mesh.ndim:
        raise GraphInvariantError(f"{node_context(node)}: spec has {len(spec.placements)} placements "
                                  f"for a {mesh.ndim}-D mesh {mesh}")
    if not _same_shape(spec.shape, tuple(val.shape)):
        raise GraphInvariantError(f"{node_context(node)}: spec shape {spec.shape} != value shape {tuple(val.shape)}")
    for p in spec.placements:
        if _is_shard(p) and not 0 <= p.dim < len(spec.shape):
            raise GraphInvariantError(f"{node_context(node)}: placement {_p(p)} of a {len(spec.shape)}-D tensor")
    want = make_spec(val, spec.placements, mesh.sizes)
    if not _same_shape(want.local_shape, spec.local_shape):
        raise GraphInvariantError(f"{node_context(node)}: local shape {spec.local_shape} does not match "
                                  f"{placements_str(spec.placements)} of {tuple(val.shape)} (expected {want.local_shape})")


def _check_specs(gm: fx.GraphModule, mesh: MeshInfo) -> None:
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op not in ("placeholder", "get_attr", "call_function"):
            continue
        if node.op == "get_attr" and not node.users:
            continue
        info = get_info(node)
        if isinstance(val, torch.Tensor):
            if info is None or not isinstance(info.spec, TensorSpec):
                raise GraphInvariantError(f"{node_context(node)}: tensor value without a placement spec "
                                          "(a pass added it without meta['fxpar']; use fxpar.spec.set_info)")
            _check_spec(node, info.spec, val, mesh)
            if node.op in ("placeholder", "get_attr") and any(p.is_partial() for p in info.spec.placements):
                raise GraphInvariantError(f"{node_context(node)}: inputs and parameters cannot be Partial")
        elif isinstance(val, (tuple, list)) and info is not None and isinstance(info.spec, tuple):
            for v, s in zip(val, info.spec):
                if isinstance(v, torch.Tensor) and s is not None:
                    _check_spec(node, s, v, mesh)


# --------------------------------------------------------------------------- edges and rules


def _check_edges(gm: fx.GraphModule, mesh: MeshInfo) -> None:
    for node in gm.graph.nodes:
        info = get_info(node)
        if _is_collective(node):
            if info is None or info.spec is None:
                raise GraphInvariantError(f"{node_context(node)}: collective without a spec")
            continue
        if info is None or info.input_placements is None:
            continue
        args = tensor_args(node)
        if len(args) != len(info.input_placements):
            raise GraphInvariantError(f"{node_context(node)}: {len(args)} tensor inputs but "
                                      f"{len(info.input_placements)} recorded input placements")
        for a, need in zip(args, info.input_placements):
            a_info = get_info(a)
            have = a_info.spec.placements if a_info and isinstance(a_info.spec, TensorSpec) else None
            if have is not None and need is not None and tuple(have) == tuple(need):
                continue
            what = "a graph output" if node.op == "output" else "the op's strategy"
            hint = "a missing or wrong collective"
            if have is not None and need is not None:
                partial = [mesh.names[m] for m, (h, n) in enumerate(zip(have, need)) if h.is_partial() and n != h]
                if partial:
                    reach = "reaches a graph output" if node.op == "output" else \
                        f"reaches {getattr(node.target, '__name__', node.target)}, which is not linear in it"
                    hint = (f"a Partial value {reach}: a dropped all_reduce (or reduce_scatter) on mesh dim "
                            f"{partial[0]!r}; insert the transition with fxpar.collectives.insert_transition")
            raise GraphInvariantError(
                f"{node_context(node)}: input %{a.name} is {placements_str(have) if have else 'unplaced'} "
                f"but {what} needs {placements_str(need) if need else 'a placement'} ({hint})")


def _check_rules(gm: fx.GraphModule, mesh: MeshInfo) -> None:
    """Every op computes with a strategy its sharding rule lists for exactly those inputs."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or _is_collective(node) or node.target is operator.getitem:
            continue
        info = get_info(node)
        if info is None or info.input_placements is None or not _specs_of(info):
            continue
        args = tensor_args(node)
        if len(args) != len(info.input_placements):
            continue  # _check_edges reports it
        rule = lookup(node.target)
        in_vals = tuple(a.meta["val"] for a in args)
        for m in range(mesh.ndim):
            need = tuple(p[m] if p is not None else None for p in info.input_placements)
            out = _output_placements(info, m)
            if rule is None:
                if all(p is None or p.is_replicate() for p in need) and _outputs_replicate(info, m):
                    continue
                allowed = "it has no sharding rule, so it must run on Replicate inputs (the fallback)"
            else:
                try:
                    options = rule(OpInfo(node, in_vals, node.meta["val"], mesh.sizes[m]), need)
                except Exception:  # noqa: BLE001 - a rule that cannot answer is not this check's finding
                    log.debug("rule %s failed on %s", rule.__name__, node.name, exc_info=True)
                    continue
                if any(tuple(s.inputs) == need and _same_output(s.output, out) for s in options):
                    continue
                listed = "; ".join(f"({', '.join(_p(p) for p in s.inputs)}) -> {_out_str(s.output)}"
                                   for s in options)
                allowed = f"its rule {rule.__name__} allows, for these inputs: {listed}"
            ins = ", ".join(f"%{a.name} {_p(p)}" for a, p in zip(args, need))
            partial = [a.name for a, p in zip(args, need) if p is not None and p.is_partial()]
            lead = (f"a Partial value (%{partial[0]}) reaches an op that is not linear in it on mesh dim "
                    f"{mesh.names[m]!r}" if partial else f"placements on mesh dim {mesh.names[m]!r} no rule allows")
            raise GraphInvariantError(
                f"{node_context(node)}: {lead}: inputs {ins} -> output {_out_str(out)}, but {allowed}. "
                "Reduce the Partial input first (all_reduce) or pick a strategy the rule lists")


def _same_output(a, b) -> bool:
    if isinstance(a, tuple) or isinstance(b, tuple):
        a = a if isinstance(a, tuple) else (a,)
        b = b if isinstance(b, tuple) else (b,)
        return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))
    return a == b


def _out_str(out) -> str:
    if isinstance(out, tuple):
        return "(" + ", ".join(_p(p) for p in out) + ")"
    return _p(out)


def _check_outputs(gm: fx.GraphModule, mesh: MeshInfo) -> None:
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    if out is None:
        return
    _check_outputs_of(tensor_args(out), mesh)


def _check_outputs_of(values: Sequence[fx.Node], mesh: MeshInfo) -> None:
    for a in values:
        info = get_info(a)
        spec = info.spec if info is not None else None
        # A batch-sharded output may stay sharded on the data-parallel dims (the runtime gathers it).
        bad = isinstance(spec, TensorSpec) and any(
            not p.is_replicate() and not (mesh.names[m] in ("dp", "fsdp") and p == Shard(0))
            for m, p in enumerate(spec.placements))
        if bad:
            raise GraphInvariantError(
                f"{node_context(a)}: graph output %{a.name} is {placements_str(spec.placements)}; outputs must be "
                "Replicate, or Shard(0) on dp / fsdp (every rank returns the full value, gathered by the "
                "runtime): gather or reduce it before the output")


# --------------------------------------------------------------------------- collectives


def _expected_args(op: str, src: Placement, dst: Placement) -> dict:
    if op == "all_gather":
        return {"dim": src.dim, "split_factor": getattr(src, "split_factor", 1)}
    if op in ("shard", "reduce_scatter"):
        out = {"dim": dst.dim}
        if op == "shard":
            out["split_factor"] = getattr(dst, "split_factor", 1)
        return out
    if op == "all_to_all":
        return {"src_dim": src.dim, "dst_dim": dst.dim}
    return {}


def _check_collective(node: fx.Node, mesh: MeshInfo) -> None:
    op = COLLECTIVE_OPS[node.target]
    args = collective_args(node)
    for a in node.target._schema.arguments:
        if a.name not in args and a.has_default_value():
            args[a.name] = a.default_value
    mesh_dim = args.get("mesh_dim")
    if mesh_dim not in mesh.names:
        raise GraphInvariantError(f"{node_context(node)}: {op} on mesh dim {mesh_dim!r}, which the mesh {mesh} "
                                  "does not have")
    m = mesh.names.index(mesh_dim)
    if "group_size" in args and args["group_size"] != mesh.sizes[m]:
        raise GraphInvariantError(f"{node_context(node)}: {op} says group_size={args['group_size']} but mesh dim "
                                  f"{mesh_dim!r} has {mesh.sizes[m]} ranks")
    if mesh.group_names is not None and args["group_name"] != mesh.group_names[m]:
        raise GraphInvariantError(
            f"{node_context(node)}: {op} on group {args['group_name']!r} but this rank's group for mesh dim "
            f"{mesh_dim!r} is {mesh.group_names[m]!r}; a graph compiled for another rank or mesh "
            "(compile on every rank, never copy graphs between ranks)")
    x = node.args[0]
    src_info, dst_info = get_info(x), get_info(node)
    src = src_info.spec if src_info is not None else None
    dst = dst_info.spec if dst_info is not None else None
    if not isinstance(src, TensorSpec) or not isinstance(dst, TensorSpec):
        raise GraphInvariantError(f"{node_context(node)}: {op} of %{x.name} without placement specs on both sides")
    for k in range(mesh.ndim):
        if k != m and src.placements[k] != dst.placements[k]:
            raise GraphInvariantError(
                f"{node_context(node)}: {op} on mesh dim {mesh_dim!r} changes mesh dim {mesh.names[k]!r} too "
                f"({placements_str(src.placements)} -> {placements_str(dst.placements)}); one collective moves "
                "one mesh dim")
    a, b = src.placements[m], dst.placements[m]
    if op == "fsdp_all_gather":
        op = "all_gather"  # the transition of an all_gather; its backward is the fused reduce_scatter
    if op == "grad_all_reduce":
        if a != b or not a.is_replicate():
            raise GraphInvariantError(
                f"{node_context(node)}: grad_all_reduce must see Replicate on both sides on {mesh_dim!r}, found "
                f"{_p(a)} -> {_p(b)}")
        return
    try:
        want = transition_op(a, b)
    except FxparError:
        want = None
    if op == "fsdp_all_gather" and want == "all_gather" and a == Shard(0):
        want = op  # the FSDP parameter gather: all_gather forward, reduce_scatter backward
    if want != op:
        raise GraphInvariantError(
            f"{node_context(node)}: {op} between {_p(a)} and {_p(b)} on mesh dim {mesh_dim!r}, but that transition "
            f"is {want or 'no collective'}; expected {want or 'none'} (see fxpar.collectives.transition_op)")
    for name, value in _expected_args("all_gather" if op == "fsdp_all_gather" else op, a, b).items():
        have = args.get(name, 1 if name == "split_factor" else None)
        if have != value:
            raise GraphInvariantError(
                f"{node_context(node)}: {op} with {name}={have} but its input is {_p(a)} and its output {_p(b)} "
                f"on mesh dim {mesh_dim!r}: expected {name}={value} (a wrong shard dim)")


def _check_collectives(gm: fx.GraphModule, mesh: MeshInfo) -> None:
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if _is_collective(node):
            op = COLLECTIVE_OPS[node.target]
            if op not in BACKWARD_OF or not torch._C._dispatch_has_kernel_for_dispatch_key(
                    node.target._schema.name, "Autograd"):
                raise GraphInvariantError(f"{node_context(node)}: collective {op} has no registered backward dual")
            _check_collective(node, mesh)
            continue
        ns = getattr(node.target, "namespace", None)
        mod = getattr(node.target, "__module__", "") or ""
        if ns in _RAW_COMM_NAMESPACES or mod.startswith("torch.distributed"):
            raise GraphInvariantError(
                f"{node_context(node)}: raw communication op {node.target} in the graph; its gradient has no fxpar "
                "dual (the backward would be missing or wrong). Create communication with "
                "fxpar.collectives.insert_transition / insert_grad_all_reduce")


# --------------------------------------------------------------------------- gradient duals


# Collectives whose backward sums the partial gradients of their output over their mesh dim.
_REDUCING_DUALS = frozenset({"grad_all_reduce", "fsdp_all_gather"})


def _runtime_synced(node: fx.Node) -> tuple[str, ...]:
    """Mesh dims on which the runtime all-reduces this parameter's gradient after the backward.

    (`bucket_grad_sync` moves data-parallel grad_all_reduce nodes off parameters
    into `meta["fxpar"].extra["grad_sync"]`; the runtime syncs them in buckets.)
    """
    info = get_info(node) if node.op == "get_attr" else None
    sync = info.extra.get("grad_sync") if info is not None else None
    return tuple(sync.get("dims", ())) if isinstance(sync, dict) else ()


def _reduced_on(node: fx.Node, dim: str) -> bool:
    """Whether `node`'s value reached this use through a reducing dual on mesh dim `dim`.

    Collectives on other mesh dims are walked through (their backward commutes
    with a sum over `dim`); one on `dim` that does not reduce ends the walk. A
    parameter whose gradient the runtime syncs on `dim` counts as reduced.
    """
    while _is_collective(node):
        if collective_args(node)["mesh_dim"] == dim:
            return COLLECTIVE_OPS[node.target] in _REDUCING_DUALS
        node = node.args[0]
    return dim in _runtime_synced(node)


def _source(node: fx.Node) -> fx.Node:
    """The value behind a chain of collectives."""
    while _is_collective(node):
        node = node.args[0]
    return node


def _only_feeds_output(node: fx.Node) -> bool:
    """A stage's copy of a value on its way out (contiguous / clone feeding only the output)."""
    return node.op == "call_function" and bool(node.users) and all(
        u.op == "output" or _only_feeds_output(u) for u in node.users) and node.target in (
        torch.ops.aten.contiguous.default, torch.ops.aten.clone.default, torch.ops.aten.alias.default)


def _check_grad_duals(gm: fx.GraphModule, mesh: MeshInfo, boundary: frozenset[str] | None = None) -> None:
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
    for node in gm.graph.nodes:
        if node.op != "call_function" or _is_collective(node) or node.target is operator.getitem:
            continue
        info = get_info(node)
        if info is None or info.input_placements is None or not _specs_of(info):
            continue
        for a, need in zip(tensor_args(node), info.input_placements):
            if need is None or a not in grads:
                continue
            for m, p in enumerate(need):
                if p is None or not p.is_replicate() or _outputs_replicate(info, m):
                    continue
                if _reduced_on(a, mesh.names[m]):
                    continue
                if boundary is not None and _source(a).op == "placeholder" and _source(a).name in boundary:
                    continue
                out = ", ".join(placements_str(s.placements) for s in _specs_of(info) if s is not None)
                raise GraphInvariantError(
                    f"{node_context(node)}: consumes %{a.name} as Replicate on mesh dim {mesh.names[m]!r} but its "
                    f"output is {out}, so each rank's gradient for %{a.name} is only a partial sum; %{a.name} must "
                    f"come through fxpar.grad_all_reduce on {mesh.names[m]!r} (identity forward, all-reduce "
                    "backward: the missing dual in the backward). Insert it with "
                    "fxpar.collectives.insert_grad_all_reduce")
    reducers = []
    for node in gm.graph.nodes:
        if _is_collective(node) and COLLECTIVE_OPS[node.target] in _REDUCING_DUALS:
            reducers.append((node, collective_args(node)["mesh_dim"], COLLECTIVE_OPS[node.target]))
        for dim in _runtime_synced(node):
            reducers.append((node, dim, "the runtime's gradient sync"))
    for node, dim, op in reducers:
        m = mesh.names.index(dim) if dim in mesh.names else None
        if m is None:
            continue  # _check_collectives reports it
        frontier = list(node.users)
        while frontier:
            u = frontier.pop()
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
            if u.op == "output" or (u_info is not None and _specs_of(u_info) and _outputs_replicate(u_info, m)):
                raise GraphInvariantError(
                    f"{node_context(node)}: {op} on mesh dim {dim!r} feeds %{u.name}, whose output is Replicate on "
                    f"{dim!r}: that use already gives every rank the full gradient, and {op}'s backward sums it "
                    f"over the {mesh.sizes[m]} ranks again (a gradient scaled by {mesh.sizes[m]}). Give replicated "
                    "uses the value without the reducing dual")


# --------------------------------------------------------------------------- local shapes


class _LocalRun(fx.Interpreter):
    """Runs a graph on FakeTensors of local shapes and checks each node against its spec."""

    def __init__(self, gm: fx.GraphModule, mode) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.mode = mode

    def _fake(self, node: fx.Node, fallback: torch.Tensor | None = None):
        # Called inside the FakeTensorMode: torch.empty makes a FakeTensor.
        spec = get_info(node).spec if get_info(node) is not None else None
        if isinstance(spec, TensorSpec):
            return torch.empty(_hint_shape(spec.local_shape), dtype=spec.dtype)
        if fallback is not None:
            return torch.empty(_hint_shape(fallback.shape), dtype=fallback.dtype)
        return None

    def placeholder(self, target, args, kwargs):
        node = self._node
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return self._fake(node, val)
        if isinstance(val, torch.SymInt):
            return size_hint(val)
        return val

    def get_attr(self, target, args, kwargs):
        real = super().get_attr(target, args, kwargs)
        if isinstance(real, torch.Tensor):
            return self._fake(self._node, real)
        return real

    def call_module(self, target, args, kwargs):
        if str(target).startswith("_guards"):
            return None  # the capture's input-shape guard: checks global example shapes, not ours
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node):
        self._node = n
        try:
            out = super().run_node(n)
        except GraphInvariantError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below
            from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

            if isinstance(e, (DataDependentOutputException, DynamicOutputShapeException, NotImplementedError)):
                raise _Unsupported(n) from e
            ins = ", ".join(_describe_local(a) for a in n.all_input_nodes)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GraphInvariantError(
                f"{node_context(n)}: does not run on this rank's local shapes: {type(e).__name__}: {first}. "
                f"Inputs: {ins}. A shape argument still holds a global size (localize it in the op's rule) "
                "or a placement does not match the tensor") from None
        if n.op in ("call_function", "call_module") and get_info(n) is not None:
            vals = out if isinstance(out, (tuple, list)) else (out,)
            for v, spec in zip(vals, _specs_of(get_info(n))):
                if isinstance(v, torch.Tensor) and spec is not None:
                    want = _hint_shape(spec.local_shape)
                    if tuple(v.shape) != want:
                        raise GraphInvariantError(
                            f"{node_context(n)}: computes local shape {list(v.shape)} on this rank but its spec "
                            f"{placements_str(spec.placements)} of global {list(_hint_shape(spec.shape))} says "
                            f"{list(want)}: local and global shapes disagree (a shape argument or collective "
                            "argument that was not localized, or a wrong placement)")
        return out


class _Unsupported(Exception):
    def __init__(self, node: fx.Node) -> None:
        super().__init__(node.name)
        self.node = node


def _describe_local(a: fx.Node) -> str:
    info = get_info(a)
    spec = info.spec if info is not None else None
    if isinstance(spec, TensorSpec):
        return f"%{a.name} {placements_str(spec.placements)} local {list(_hint_shape(spec.local_shape))}"
    return f"%{a.name}"


def local_fake_run(gm: fx.GraphModule) -> bool:
    """Runs `gm` on FakeTensors of local shapes (no data, no communication) and checks every node.

    Returns:
        True if the whole graph ran; False if an op cannot run on FakeTensors
        (data-dependent shapes): the check is then partial.

    Raises:
        GraphInvariantError: naming the first node that fails on local shapes or
            produces a local shape its spec does not say.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, torch.no_grad():
        runner = _LocalRun(gm, mode)
        try:
            runner.run(*[None for _ in placeholders], enable_io_processing=False)
        except _Unsupported as e:
            log.debug("local-shape check stopped at %s (not runnable on fake tensors)", e.node.name)
            return False
    return True


def _check_local_params(gm: fx.GraphModule, mesh: MeshInfo) -> None:
    if mesh.coordinate is None:
        return  # dry runs keep full tensors
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not node.users:
            continue
        info = get_info(node)
        spec = info.spec if info is not None else None
        if not isinstance(spec, TensorSpec):
            continue
        t = _fetch(gm, str(node.target))
        if isinstance(t, torch.Tensor) and tuple(t.shape) != _hint_shape(spec.local_shape):
            raise GraphInvariantError(
                f"{node_context(node)}: this rank holds {str(node.target)!r} with shape {list(t.shape)} but its "
                f"placements {placements_str(spec.placements)} of {list(_hint_shape(spec.shape))} give local "
                f"shape {list(_hint_shape(spec.local_shape))} (sharded along the wrong dim, or not sharded)")


def _fetch(gm: fx.GraphModule, target: str):
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


# --------------------------------------------------------------------------- entry points


def check_graph(gm: fx.GraphModule, mesh: MeshInfo, provided: frozenset[str], *,
                boundary: frozenset[str] | None = None) -> None:
    """Checks the invariants of what `provided` says the passes so far have established.

    Args:
        gm: a graph module being compiled (or compiled).
        mesh: the mesh it is compiled for.
        provided: the facts provided so far (see the module docstring).
        boundary: for one stage of a pipeline, the names of its placeholders
            fed by other stages (None: a whole graph).

    Raises:
        GraphInvariantError: naming the first node that breaks an invariant, its
            module and source line, what was expected and found, and the fix.
    """
    if "specs" in provided:
        _check_specs(gm, mesh)
    if "collectives" in provided:
        _check_edges(gm, mesh)
        if boundary is None:  # a stage's outputs go to the next stage: check_pipeline matches them
            _check_outputs(gm, mesh)
        _check_collectives(gm, mesh)
        _check_rules(gm, mesh)
        _check_grad_duals(gm, mesh, boundary)
    if "local_shapes" in provided and "local_params" not in provided:
        # Once per compile, right after shapes are localized (it is the costliest check);
        # check_module runs it again on the finished graph.
        local_fake_run(gm)
    if "local_params" in provided:
        _check_local_params(gm, mesh)


def _graph_modules(pm) -> list[fx.GraphModule]:
    stages = getattr(pm, "stage_modules", None)
    if stages:
        return [getattr(s, "graph_module", s) for s in stages]
    return [pm.graph_module]


def _stage_boundaries(pm) -> dict[int, frozenset[str]]:
    """For a pipelined module: id(stage module) -> names of its placeholders fed by other stages."""
    if getattr(pm, "stage_modules", None) is None:
        return {}
    parent = pm.graph_module
    out = {}
    for call in parent.graph.nodes:
        if call.op != "call_module" or not str(call.target).startswith("stage_"):
            continue
        stage = parent.get_submodule(str(call.target))
        holders = [n for n in stage.graph.nodes if n.op == "placeholder"]
        fed = {h.name for h, a in zip(holders, call.args) if not (isinstance(a, fx.Node) and a.op == "placeholder")}
        out[id(stage)] = frozenset(fed)
    return out


def _local_signature(gm: fx.GraphModule, mesh: MeshInfo) -> tuple:
    """What the local-shape run depends on: the code (group names aside) and every spec."""
    code = gm.code
    for m, group in enumerate(mesh.group_names or ()):
        code = code.replace(repr(group), repr(mesh.names[m]))
    specs = []
    for n in gm.graph.nodes:
        for spec in _specs_of(get_info(n)):
            if spec is not None:
                specs.append((n.name, str(spec), str(spec.local_shape)))
    return code, tuple(specs)


def check_pipeline(pm) -> None:
    """Static checks of a pipelined module's stage structure (from any one rank).

    The split parent calls stage_0 .. stage_{S-1} in stage order, each stage
    runs on the pp coordinate torch's schedule places it on, the stages agree
    on each activation crossing a cut, and every pp rank's sends and recvs
    under the schedule pair up without a deadlock (`fxpar.p2p_check.check_p2p`).

    Raises:
        ScheduleError: naming the stage at fault (order, placement, a cut's placements).
        GraphInvariantError: naming the pp ranks and the first transfer that does not
            meet its partner, or the deadlock.
    """
    split = getattr(pm, "split", None)
    if split is None:
        return
    calls = [n for n in pm.graph_module.graph.nodes if n.op == "call_module" and str(n.target).startswith("stage_")]
    order = [int(str(n.target).rpartition("_")[2]) for n in calls]
    if order != list(range(split.num_stages)):
        first = next((n for n, k in zip(calls, order) if k != calls.index(n)), calls[0] if calls else None)
        where = f" (first out of place: %{first.name} calls {first.target})" if first is not None else ""
        raise ScheduleError(
            f"the pipeline's parent graph calls its stages in the order {order}, not 0..{split.num_stages - 1}"
            f"{where}: a swapped stage order feeds each stage another stage's activations; split_stages must "
            "emit the stage calls in stage order")
    try:
        from fxpar.pipeline import stage_ranks

        placed = stage_ranks(split.schedule, split.num_stages, split.pp_size)
    except Exception:  # noqa: BLE001 - a schedule torch cannot place is split_stages' error to raise
        placed = None
    if placed is not None:
        for st in split.stages:
            if placed.get(st.index) != st.rank:
                raise ScheduleError(
                    f"stage {st.index} ({st.first_module}..{st.last_module}) is assigned to pp rank {st.rank}, but "
                    f"torch's '{split.schedule}' schedule runs it on pp rank {placed.get(st.index)}: the ranks would "
                    "send activations to a stage that is not there (deadlock)")
    _check_stage_edges(pm)
    from fxpar.p2p_check import check_p2p

    check_p2p(pm)


def _stage_value(stage: fx.GraphModule, index: int) -> fx.Node | None:
    """The node a stage returns at flat output position `index`."""
    out = next((n for n in stage.graph.nodes if n.op == "output"), None)
    if out is None:
        return None
    flat = [a for a in (out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],))]
    return flat[index] if index < len(flat) and isinstance(flat[index], fx.Node) else None


def _check_stage_edges(pm) -> None:
    """Every activation crossing a cut has the same placements and local shape on both sides."""
    parent = pm.graph_module
    mesh = pm.mesh_info
    for call in parent.graph.nodes:
        if call.op != "call_module" or not str(call.target).startswith("stage_"):
            continue
        consumer = parent.get_submodule(str(call.target))
        holders = [n for n in consumer.graph.nodes if n.op == "placeholder"]
        for holder, arg in zip(holders, call.args):
            if not (isinstance(arg, fx.Node) and arg.target is operator.getitem
                    and arg.args[0].op == "call_module"):
                continue
            producer = parent.get_submodule(str(arg.args[0].target))
            sent = _stage_value(producer, arg.args[1])
            a, b = (get_info(sent) if sent is not None else None), get_info(holder)
            if a is None or b is None or not isinstance(a.spec, TensorSpec) or not isinstance(b.spec, TensorSpec):
                continue
            if tuple(a.spec.placements) != tuple(b.spec.placements) or \
                    not _same_shape(a.spec.local_shape, b.spec.local_shape):
                raise ScheduleError(
                    f"{arg.args[0].target} sends %{sent.name} as {placements_str(a.spec.placements)} local "
                    f"{list(a.spec.local_shape)} but {call.target} receives it as %{holder.name} "
                    f"{placements_str(b.spec.placements)} local {list(b.spec.local_shape)}: the stages disagree on "
                    "an activation crossing the cut")
    out = next((n for n in parent.graph.nodes if n.op == "output"), None)
    for arg in (out.all_input_nodes if out is not None else ()):
        if arg.target is operator.getitem and arg.args[0].op == "call_module":
            sent = _stage_value(parent.get_submodule(str(arg.args[0].target)), arg.args[1])
            if sent is not None:
                _check_outputs_of([sent], mesh)


def check_module(pm, *, _seen: set | None = None) -> None:
    """Every single-rank check on a ParallelModule (what `fxpar.check(pm)` runs).

    Raises:
        GraphInvariantError: naming the first node that breaks an invariant, or a
            pipeline's first send or recv that does not meet its partner.
        ScheduleError: for a pipeline whose stages do not fit together.
    """
    check_pipeline(pm)
    boundaries = _stage_boundaries(pm)
    for gm in _graph_modules(pm):
        check_graph(gm, pm.mesh_info, ALL_FACTS, boundary=boundaries.get(id(gm)))
        if _seen is not None:
            # Ranks whose graphs differ only in group names and parameter values share one local run.
            key = _local_signature(gm, pm.mesh_info)
            if key in _seen:
                continue
            _seen.add(key)
        local_fake_run(gm)


# --------------------------------------------------------------------------- across ranks


def check_ranks(pms: Sequence) -> None:
    """Checks the ParallelModules of all ranks of one mesh together (rank order).

    Runs `check_module` on each, then: every group's members issue the same
    collectives in the same order; every parameter has the same placements
    on every rank that holds it and each of its shard positions has an
    owner. (A pipeline's sends and recvs are checked by `check_module`: every
    rank sees every stage.)

    Raises:
        GraphInvariantError: naming the first differing collective, with every
            member's version of it, or the parameter and ranks at fault.
    """
    from fxpar.fingerprint import collective_schedule, first_difference

    seen: set = set()
    for pm in pms:
        check_module(pm, _seen=seen)
    meshes = [pm.mesh_info for pm in pms]
    if any(m.coordinate is None or m.group_names is None for m in meshes):
        raise GraphInvariantError("check_ranks needs every rank's ParallelModule with its coordinate and groups "
                                  "(a dry-run mesh has neither)")
    schedules = []
    for pm in pms:
        sched = []
        for gm in _graph_modules(pm):
            sched.extend(collective_schedule(gm, pm.mesh_info))
        schedules.append(sched)
    mesh0 = meshes[0]
    for m, dim in enumerate(mesh0.names):
        members: dict[str, list[int]] = {}
        for r, mi in enumerate(meshes):
            members.setdefault(mi.group_names[m], []).append(r)
        for group, ranks in members.items():
            seqs = {r: [s for s in schedules[r] if s.mesh_dim == dim] for r in ranks}
            base = ranks[0]
            for r in ranks[1:]:
                diff = first_difference(seqs[base], seqs[r])
                if diff is None:
                    continue
                i, a, b = diff
                raise GraphInvariantError(
                    f"the ranks of group {group!r} (mesh dim {dim!r}, ranks {ranks}) issue different collectives: "
                    f"first difference at collective #{i} on that group:\n"
                    f"  rank {base}: {a if a is not None else '(none: its schedule ends here)'}\n"
                    f"  rank {r}: {b if b is not None else '(none: its schedule ends here)'}\n"
                    "at run time these ranks would hang or silently combine unrelated tensors; every rank of a "
                    "group must run the same graph (a pass made a rank-dependent edit?)")
    _check_ownership(pms)


def _check_ownership(pms: Sequence) -> None:
    """Every parameter: the same placements on all holders, every shard position owned."""
    holders: dict[str, dict[int, tuple]] = {}
    for r, pm in enumerate(pms):
        for gm in _graph_modules(pm):
            for node in gm.graph.nodes:
                info = get_info(node)
                if node.op != "get_attr" or info is None or not isinstance(info.spec, TensorSpec):
                    continue
                if not node.users:
                    continue
                holders.setdefault(str(node.target), {})[r] = (tuple(info.spec.placements), node)
    mesh = pms[0].mesh_info
    for fqn, by_rank in holders.items():
        layouts = {pl for pl, _ in by_rank.values()}
        if len(layouts) > 1:
            lines = [f"  rank {r}: {placements_str(pl)}" for r, (pl, _) in sorted(by_rank.items())]
            raise GraphInvariantError(f"parameter {fqn!r} is laid out differently on the ranks that hold it:\n"
                                      + "\n".join(lines)
                                      + "\nits shards would not fit together; all ranks must plan it alike")
        (placements,) = layouts
        sharding = [m for m, p in enumerate(placements) if _is_shard(p)]
        if not sharding:
            continue
        owned = {tuple(pms[r].mesh_info.coordinate[m] for m in sharding) for r in by_rank}
        need = math.prod(mesh.sizes[m] for m in sharding)
        if len(owned) != need:
            node = next(iter(by_rank.values()))[1]
            missing = sorted(set(_grid([mesh.sizes[m] for m in sharding])) - owned)
            raise GraphInvariantError(
                f"{node_context(node)}: parameter {fqn!r} ({placements_str(placements)}) has shard positions "
                f"{missing} on mesh dims {[mesh.names[m] for m in sharding]} that no rank owns")


def _grid(sizes: Sequence[int]) -> Iterable[tuple[int, ...]]:
    if not sizes:
        yield ()
        return
    for i in range(sizes[0]):
        for rest in _grid(sizes[1:]):
            yield (i, *rest)
