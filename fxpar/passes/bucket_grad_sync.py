"""bucket_grad_sync: data-parallel gradient all-reduces as asynchronous buckets.

Requires: collectives. Provides: grad_buckets.

After insert_collectives, a parameter replicated on a data-parallel dim and
used on batch-sharded activations passes through `grad_all_reduce` (its
gradient is partial on each rank). Issued one by one in the backward, those
all-reduces are many small, blocking calls. This pass removes the
`grad_all_reduce` nodes that sit directly on parameters and records, on each
parameter's node, the gradient synchronisation it needs and its bucket (with `Plan(sequence_parallel=True)` also the tp f of parameters read by
sequence-sharded activations: norm weights, row-parallel biases): buckets
of about `bucket_bytes` (default 25 MB, `options["bucket_bytes"]`) in reverse
order of first use, which is the order the backward produces gradients. The
runtime (`fxpar.runtime.grad_sync`) all-reduces a bucket asynchronously as soon as all
its gradients are accumulated, and waits for all of them at the end of the
backward, so communication overlaps the rest of the backward.

Before:  %gradallreduce_w = fxpar.grad_all_reduce(%w, '1', 'dp')
         %linear = aten.linear(%x, %gradallreduce_w)
After:   %linear = aten.linear(%x, %w)          # meta["fxpar"].grad_sync = GradSyncInfo(dims=("dp",), bucket=0)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from fxpar.core.pass_api import PassContext, PassResult, fx_pass
from fxpar.core.spec import GradSyncInfo, get_info, set_info
from fxpar.ops.collectives import COLLECTIVE_OPS
from fxpar.ops.transitions import collective_args

DATA_DIMS = ("dp", "fsdp", "ep")
DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024
_F = torch.ops.fxpar.grad_all_reduce.default


def _every_use_reduced(param: fx.Node, dim: str) -> bool:
    """Whether every use of `param` reaches its consumer through a grad_all_reduce on `dim`."""
    frontier = list(param.users)
    while frontier:
        u = frontier.pop()
        if u.op == "call_function" and u.target in COLLECTIVE_OPS:
            if u.target is _F and collective_args(u)["mesh_dim"] == dim:
                continue
            frontier.extend(u.users)
        elif isinstance(u.meta.get("val"), torch.Tensor) or u.op == "output":
            return False  # a tensor computed from the parameter without the reduction: its gradient is whole
    return True


@fx_pass(requires=("collectives",), provides=("grad_buckets",))
def bucket_grad_sync(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    cap = int(ctx.options.get("bucket_bytes", DEFAULT_BUCKET_BYTES))
    # Under sequence parallel a replicated parameter read by sequence-sharded activations (a norm's
    # weight, a row-parallel bias) has a partial gradient on tp as a dp parameter has on dp: one
    # small f per parameter, bucketed the same way (the sum is the same sum, bit for bit).
    dims = DATA_DIMS + (("tp",) if getattr(ctx.plan, "sequence_parallel", False) else ())
    # Group every data-parallel f by the parameter it leads to (through any collectives) and dim.
    groups: dict[tuple[fx.Node, str], list[tuple[fx.Node, bool]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not _F:
            continue
        dim = collective_args(node)["mesh_dim"]
        if dim not in dims:
            continue
        base, only_f = node.args[0], True
        while base.op == "call_function" and base.target in COLLECTIVE_OPS:
            only_f = only_f and base.target is _F
            base = base.args[0]
        if base.op == "get_attr":
            groups.setdefault((base, dim), []).append((node, only_f))
    # A parameter is synced by the runtime on a dim only if every f of it on that dim sits directly on
    # it: an f behind another collective (a local slice for a tensor-parallel use of a tied weight)
    # reduces its own contribution already, and the runtime would sum that part a second time.
    # And only if every use of it goes through such an f: the runtime's hook sees the parameter's
    # whole gradient, and a use replicated on the dim (a tied lm_head after a gathered batch) already
    # gives every rank its full gradient, which the runtime would sum over the dim again.
    synced: dict[fx.Node, list[str]] = {}
    for (param, dim), fs in groups.items():
        if not all(only_f for _, only_f in fs) or not _every_use_reduced(param, dim):
            continue
        for node, _ in fs:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        synced.setdefault(param, []).append(dim)
    if not synced:
        return PassResult(gm, False)
    # The backward produces gradients roughly in reverse order of first use.
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first_use = {p: min(order[u] for u in p.users) for p in synced}
    bucket, filled = 0, 0
    for p in sorted(synced, key=lambda p: -first_use[p]):
        nbytes = get_info(p).spec.nbytes(local=True)
        if filled and filled + nbytes > cap:
            bucket, filled = bucket + 1, 0
        filled += nbytes
        info = get_info(p)
        set_info(p, dataclasses.replace(info, grad_sync=GradSyncInfo(tuple(sorted(synced[p])), bucket)))
    return PassResult(gm, True)
