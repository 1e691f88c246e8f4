"""Collective transitions as graph edits: which op moves a placement to another, what it costs, and the
helpers that insert fxpar's collective nodes (`fxpar.ops.collectives`) into a graph.

Split from `fxpar.ops.collectives`, which defines the ops and runs them; this module only builds and
reads graphs, and never communicates.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Partial, Placement, Replicate, Shard

from fxpar._torch.fx import copy_codegen
from fxpar._torch.placements import StridedShard as _StridedShard
from fxpar.core.errors import ShardingError
from fxpar.ops.collectives import BACKWARD_OF
from fxpar.ops.kv_replicas import REPLICA_GRAD_SUM

__all__ = [
    "transition_op",
    "op_cost",
    "transition_cost",
    "insert_transition",
    "insert_grad_all_reduce",
    "insert_sp_all_gather",
    "insert_fsdp_all_gather",
    "set_fsdp_precision",
    "collective_args",
    "dual_copies",
    "inference_graph_module",
]


# --------------------------------------------------------------------------- transitions


def transition_op(src: Placement, dst: Placement) -> str | None:
    """The op that moves a tensor from `src` to `dst` on one mesh dim (None: nothing to do).

    Raises:
        ShardingError: for transitions no rule may ask for (into Partial).
    """
    if src == dst:
        return None
    if isinstance(src, _StridedShard) and not isinstance(dst, Replicate) or isinstance(dst, _StridedShard) \
            and not isinstance(src, Replicate):
        raise ShardingError(f"no transition from {src} to {dst}: a strided shard only gathers or is cut from a replica")
    if isinstance(dst, Replicate):
        if isinstance(src, Partial):
            return "all_reduce_max" if src.reduce_op == "max" else "all_reduce"
        return "all_gather"
    if isinstance(src, Partial) and src.reduce_op != "sum":
        raise ShardingError(f"no transition from {src} to {dst}: a Partial({src.reduce_op}) value only all-reduces")
    if isinstance(dst, (Shard, _StridedShard)):
        if isinstance(src, Replicate):
            return "shard"
        if isinstance(src, Partial):
            return "reduce_scatter"
        return "all_to_all"
    raise ShardingError(f"no transition from {src} to {dst}: a Partial value can only come from an op's rule")


# Ring algorithms: all_reduce moves 2(n-1)/n of the tensor per rank, gathers and scatters (n-1)/n,
# all_to_all (n-1)/n of the local shard.
_FORWARD_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_reduce_max": lambda n: 2 * (n - 1) / n,
                   "all_gather": lambda n: (n - 1) / n,
                   "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n / n,
                   "shard": lambda n: 0.0, "grad_all_reduce": lambda n: 0.0,
                   "fsdp_all_gather": lambda n: (n - 1) / n, "sp_all_gather": lambda n: (n - 1) / n}


def op_cost(op: str, n: int, nbytes: float, *, with_backward: bool) -> float:
    """Bytes per rank that `op` on a global tensor of `nbytes` moves, forward (+ backward)."""
    cost = _FORWARD_FACTOR[op](n) * nbytes
    if with_backward and BACKWARD_OF[op]:
        cost += _FORWARD_FACTOR[BACKWARD_OF[op]](n) * nbytes
    return cost


def transition_cost(src: Placement, dst: Placement, n: int, nbytes: float, *, with_backward: bool) -> float:
    """The cost of one transition; infinite where no transition exists."""
    try:
        op = transition_op(src, dst)
    except ShardingError:
        return float("inf")
    return 0.0 if op is None else op_cost(op, n, nbytes, with_backward=with_backward)


def _make_node(graph: fx.Graph, op: str, x: fx.Node, args: tuple, name: str) -> fx.Node:
    target = getattr(torch.ops.fxpar, op).default
    return graph.create_node("call_function", target, (x, *args), name=name)


def insert_transition(
    graph: fx.Graph,
    x: fx.Node,
    src: Placement,
    dst: Placement,
    *,
    mesh_dim: int,
    mesh_dim_name: str,
    group_size: int,
    group_name: str,
    label: str,
    full_size: int | None = None,
) -> fx.Node | None:
    """Inserts the node that moves `x` from `src` to `dst` (`full_size`: an uneven all_gather's dim size)."""
    op = transition_op(src, dst)
    if op is None:
        return None
    if op in ("all_reduce", "all_reduce_max"):
        return _make_node(graph, op, x, (group_name, mesh_dim_name), f"{op.replace('_', '')}_{label}")
    if op == "all_to_all":
        return _make_node(graph, op, x, (src.dim, dst.dim, group_size, group_name, mesh_dim_name), f"alltoall_{label}")
    strided = src if op == "all_gather" else dst
    dim = strided.dim
    prefix = {"all_gather": "allgather", "shard": "shard", "reduce_scatter": "reducescatter"}[op]
    args = (dim, group_size, group_name, mesh_dim_name)
    if isinstance(strided, _StridedShard):
        args = (*args, strided.split_factor)
    if full_size is not None:
        if op not in ("all_gather", "shard") or isinstance(strided, _StridedShard):
            raise ShardingError(f"{op} of an uneven shard of {label}: only all_gather and shard take uneven shards")
        args = (*args, 1, int(full_size))
    return _make_node(graph, op, x, args, f"{prefix}_{label}")


def insert_grad_all_reduce(graph: fx.Graph, x: fx.Node, *, mesh_dim_name: str, group_name: str, label: str) -> fx.Node:
    """Inserts Megatron's f: identity forward, all-reduce of the gradient backward."""
    return _make_node(graph, "grad_all_reduce", x, (group_name, mesh_dim_name), f"gradallreduce_{label}")


def insert_sp_all_gather(graph: fx.Graph, x: fx.Node, *, dim: int, mesh_dim_name: str, group_size: int,
                         group_name: str, label: str) -> fx.Node:
    """Inserts the gather of a sequence shard for a sharded consumer (reduce_scatter of its gradient backward)."""
    return _make_node(graph, "sp_all_gather", x, (dim, group_size, group_name, mesh_dim_name), f"spgather_{label}")


def insert_fsdp_all_gather(graph: fx.Graph, param: fx.Node, *, dim: int, mesh_dim_name: str, group_size: int,
                           group_name: str, full_size: int | None = None) -> fx.Node:
    """Inserts the gather of an FSDP-sharded parameter (reduce-scatter of its gradient backward).

    `full_size`: the gathered size of `dim` when it does not divide by `group_size` (uneven, padded shards).
    """
    args = (dim, group_size, group_name, mesh_dim_name)
    if full_size is not None:
        args = (*args, None, None, int(full_size))
    return _make_node(graph, "fsdp_all_gather", param, args, f"fsdpgather_{param.name}")


def set_fsdp_precision(node: fx.Node, *, param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None) -> None:
    """Makes an `fsdp_all_gather` node gather in `param_dtype` and reduce its gradient in `reduce_dtype`."""
    assert node.target is torch.ops.fxpar.fsdp_all_gather.default, node
    node.args = (*node.args[:5], param_dtype, reduce_dtype, *node.args[7:])


def collective_args(node: fx.Node) -> dict:
    """The named arguments of an fxpar collective node."""
    schema = node.target._schema
    return {a.name: v for a, v in zip(schema.arguments, node.args)}


def dual_copies(node: fx.Node) -> int:
    """How many gradients of its output's local shape the backward dual of collective `node` puts in.

    One for every collective but `replica_grad_sum`, whose dual all-reduces a zero buffer of
    group_size // replicas slots holding this rank's gradient in its kv head's slot (`fxpar.ops.kv_replicas`).
    """
    if node.target is not REPLICA_GRAD_SUM:
        return 1
    args = collective_args(node)
    return args["group_size"] // args["replicas"]


# --------------------------------------------------------------------------- inference


_GRAD_ONLY = (torch.ops.fxpar.grad_all_reduce.default, REPLICA_GRAD_SUM)
"""Collectives that are the identity forward: they exist for their backward only."""


def inference_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` to run without autograd: the backward-only markers bypassed.

    `grad_all_reduce` (and a kv weight copy's `replica_grad_sum`) is the identity
    forward, but a custom op may not return its input, so it copies it; without a
    backward (under `torch.no_grad()`) that copy is all it does. The copy's graph
    uses the marker's input directly; every other node, collectives included, is
    kept, so every rank still issues the same collectives in the same order.
    Parameters and buffers are the same tensor objects as `gm`'s (updated in
    place by optimizers and `load_state_dict`, so they stay shared); node and
    module metadata are shallow copies.

    Use it only where no gradient is needed: its outputs carry no Megatron "f",
    so their gradients would be partial on each rank.
    """
    graph = fx.Graph(owning_module=None, tracer_cls=gm.graph._tracer_cls)
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _GRAD_ONLY:
            env[node] = env[node.args[0]]
            continue
        env[node] = graph.node_copy(node, lambda a: env[a])
    copy_codegen(gm.graph, graph)  # the capture's pytree in/out handling
    out = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    out.meta.update(gm.meta)
    return out
