"""The collectives of a rewritten graph, with their payload bytes per step and their backward duals.

What explain() lists and the timeline, the cost model and the benchmarks price: each fxpar collective node
(`COLLECTIVE_OPS`) with its mesh dim, group size, module and the bytes each rank puts into it forward and in its
backward dual, and the all-to-alls a fused MoE node issues inside itself on ep (`moe_collectives`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from fxpar.analysis.fingerprint import moe_ep_exchanges
from fxpar.core.spec import TensorSpec, get_info
from fxpar.ops.collectives import BACKWARD_OF, COLLECTIVE_OPS
from fxpar.ops.moe import moe_experts
from fxpar.ops.transitions import collective_args, dual_copies

__all__ = ["CollectiveInfo", "collectives", "moe_collectives"]

_FORWARD_SILENT = frozenset({"shard", "grad_all_reduce", "replica_grad_sum"})
"""Collectives that communicate only in their backward (a local slice or the identity forward)."""


@dataclass(frozen=True)
class CollectiveInfo:
    """One collective node of a rewritten graph, as explain() reports it."""

    node: str
    op: str
    mesh_dim: str
    group_size: int
    module: str
    forward_bytes: int
    backward_op: str | None
    backward_bytes: int
    note: str = ""  # what a collective inside an op is ('counts', 'dispatch' or 'combine' of a MoE node)


def _payload(op: str, spec: TensorSpec, n: int) -> int:
    """Bytes each rank puts into `op` whose *output* has `spec`."""
    local = spec.nbytes(local=True)
    if op in ("all_gather", "sp_all_gather"):
        return local // n
    if op == "reduce_scatter":
        return local * n
    return local


def moe_collectives(node: fx.Node) -> list[CollectiveInfo]:
    """The ep all-to-alls inside one `moe_experts` node (fxpar.ops.moe), each with its backward dual; [] off ep."""
    exchanges = moe_ep_exchanges(node)
    if not exchanges:
        return []
    info, n, dim = get_info(node), node.kwargs["ep_size"], node.kwargs.get("ep_mesh_dim", "ep")
    dual = {e.name: e for e in exchanges if e.direction == "backward"}
    return [CollectiveInfo(node.name, "all_to_all", dim, n, info.module_fqn if info is not None else "", e.nbytes,
                           "all_to_all" if e.name in dual else None, dual[e.name].nbytes if e.name in dual else 0,
                           note=e.name + (" (balanced routing)" if e.name == "combine" else ""))
            for e in exchanges if e.direction == "forward"]


def collectives(gm: fx.GraphModule, mesh, *, moe: bool = False) -> list[CollectiveInfo]:
    """Every fxpar collective in graph order, with bytes per step at the example sizes.

    With moe=True, also the all-to-alls a `moe_experts` node issues inside itself on ep (`moe_collectives`).
    """
    out = []
    for node in gm.graph.nodes:
        if moe and node.op == "call_function" and node.target is moe_experts:
            out.extend(moe_collectives(node))
            continue
        if node.op != "call_function" or node.target not in COLLECTIVE_OPS:
            continue
        op = COLLECTIVE_OPS[node.target]
        args = collective_args(node)
        info = get_info(node)
        n = mesh.size(args["mesh_dim"])
        spec = info.spec
        fwd = 0 if op in _FORWARD_SILENT else _payload(op, spec, n or 1)
        # integer values (ids, masks) carry no gradient: their duals never run
        bwd_op = BACKWARD_OF[op] if spec.dtype.is_floating_point else None
        # The backward op carries the gradient of this node's output (for shard / reduce_scatter:
        # the gathered gradient's local input is this node's local output; for replica_grad_sum: a
        # buffer of one such gradient per kv head, `dual_copies`).
        bwd = spec.nbytes(local=True) * dual_copies(node) if bwd_op else 0
        out.append(CollectiveInfo(node.name, op, args["mesh_dim"], n, info.module_fqn, fwd, bwd_op, bwd))
    return out
