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
                  transition between its input's and its output's placements
                  (the identity forwards, grad_all_reduce and replica_grad_sum,
                  keep their input's placement);
                  every communication is an fxpar collective with its backward
                  dual (no raw c10d ops); every Replicate input of an op whose
                  output is not Replicate on a mesh dim comes through a
                  reducing dual on that dim (grad_all_reduce, fsdp_all_gather,
                  or the runtime's bucketed gradient sync of a parameter:
                  DESIGN.md's last duality row, its gradient is partial on each
                  rank), and no partial gradient is reduced twice or a full one
                  summed again (a gradient scaled by the mesh size;
                  `fxpar.analysis.grad_duals`)
    local_shapes  the graph runs on local shapes: executed with FakeTensors of
                  each input's and parameter's local shape, every node produces
                  exactly the local shape its spec says (run once per compile,
                  when local_shapes is provided, and by check_module)
    local_params  every parameter and buffer tensor the GraphModule holds has
                  its spec's local shape (ranks with a coordinate only)

Whole modules, pipelines and all ranks of a mesh: `fxpar.analysis.module_checks`.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Placement, Shard

from fxpar._torch.dispatch import has_autograd_kernel
from fxpar._torch.placements import StridedShard as _StridedShard
from fxpar.analysis.grad_duals import _is_collective, _outputs_replicate, check_grad_duals, placed_ops, runtime_synced
from fxpar.analysis.local_run import _hint_shape, local_fake_run
from fxpar.core.errors import FxparError, GraphInvariantError, node_context
from fxpar.core.mesh import MeshInfo
from fxpar.analysis.overlap import check_overlap
from fxpar.core.spec import TensorSpec, get_info, make_spec, placements_str, rank_local_shape
from fxpar.ops.collectives import BACKWARD_OF, COLLECTIVE_OPS
from fxpar.ops.transitions import collective_args, transition_op
from fxpar.rules import OpInfo, lookup, tensor_args

__all__ = ["ALL_FACTS", "check_graph", "local_fake_run", "runtime_synced"]

log = logging.getLogger(__name__)

ALL_FACTS = frozenset({"specs", "collectives", "local_shapes", "local_params"})
"""What a finished ParallelModule's graph provides; `fxpar.check` checks all of it."""

_RAW_COMM_NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd", "c10d", "_dtensor")
_FXPAR = torch.ops.fxpar
_aten = torch.ops.aten  # ATen op names (aten._to_copy) are public op names, not torch internals


def _is_shard(p: Placement | None) -> bool:
    return isinstance(p, (Shard, _StridedShard))


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b))


def _fix(what: str) -> str:
    return f"; {what}" if what else ""


def _p(p: Placement | None) -> str:
    return placements_str([p])[1:-1] if p is not None else "-"


def _output_placements(info, m: int):
    """The node's output placement(s) on mesh dim m, shaped like a rule's Strategy.output."""
    spec = info.spec
    if isinstance(spec, TensorSpec):
        return spec.placements[m]
    return tuple(s.placements[m] if s is not None else None for s in spec)


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
                                          "(a pass added it without meta['fxpar']; use fxpar.core.spec.set_info)")
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
                            f"{partial[0]!r}; insert the transition with fxpar.ops.transitions.insert_transition")
            raise GraphInvariantError(
                f"{node_context(node)}: input %{a.name} is {placements_str(have) if have else 'unplaced'} "
                f"but {what} needs {placements_str(need) if need else 'a placement'} ({hint})")


def _check_rules(gm: fx.GraphModule, mesh: MeshInfo) -> None:
    """Every op computes with a strategy its sharding rule lists for exactly those inputs."""
    for node, info in placed_ops(gm):
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
            not p.is_replicate() and not (mesh.names[m] in ("dp", "fsdp", "ep") and p == Shard(0))
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
    if op in ("fsdp_all_gather", "sp_all_gather"):
        op = "all_gather"  # the transition of an all_gather; its backward is the fused reduce_scatter
    if op == "grad_all_reduce":
        if a != b or not a.is_replicate():
            raise GraphInvariantError(
                f"{node_context(node)}: grad_all_reduce must see Replicate on both sides on {mesh_dim!r}, found "
                f"{_p(a)} -> {_p(b)}")
        return
    if op == "replica_grad_sum":  # identity forward on a kv weight's copy (fxpar.ops.kv_replicas)
        replicas = args["replicas"]
        if a != b or a.is_partial() or replicas < 1 or mesh.sizes[m] % replicas:
            raise GraphInvariantError(
                f"{node_context(node)}: replica_grad_sum of %{x.name} with replicas={replicas} over mesh dim "
                f"{mesh_dim!r} ({mesh.sizes[m]} ranks), {_p(a)} -> {_p(b)}: it must keep its input's placement and "
                "sum over groups that divide the mesh dim; it is replicate_kv_heads' node, which writes it so: "
                "insert it only through fxpar.passes.replicate_kv_heads")
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
            f"is {want or 'no collective'}; expected {want or 'none'} (see fxpar.ops.transitions.transition_op)")
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
            if op not in BACKWARD_OF or not has_autograd_kernel(node.target):
                raise GraphInvariantError(f"{node_context(node)}: collective {op} has no registered backward dual")
            _check_collective(node, mesh)
            continue
        ns = getattr(node.target, "namespace", None)
        mod = getattr(node.target, "__module__", "") or ""
        if ns in _RAW_COMM_NAMESPACES or mod.startswith("torch.distributed"):
            raise GraphInvariantError(
                f"{node_context(node)}: raw communication op {node.target} in the graph; its gradient has no fxpar "
                "dual (the backward would be missing or wrong). Create communication with "
                "fxpar.ops.transitions.insert_transition / insert_grad_all_reduce")


# --------------------------------------------------------------------------- local shapes


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
        # an uneven shard's rows are this rank's chunk, fewer than the (padded) spec's on the last ranks
        if isinstance(t, torch.Tensor) and tuple(t.shape) != _hint_shape(spec.local_shape) and \
                tuple(t.shape) != rank_local_shape(spec, mesh.sizes, mesh.coordinate, mesh.names):
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
        check_grad_duals(gm, mesh, boundary)
    if "local_shapes" in provided and "local_params" not in provided:
        # Once per compile, right after shapes are localized (it is the costliest check);
        # check_module runs it again on the finished graph.
        local_fake_run(gm)
    if "local_params" in provided:
        _check_local_params(gm, mesh)
        check_overlap(gm)  # issue nodes before their waits, waits before uses, in-flight bytes within the estimate
