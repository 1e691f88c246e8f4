"""bucket_grad_sync: data-parallel gradient all-reduces as asynchronous buckets.

Requires: collectives. Provides: grad_buckets.

After insert_collectives, a parameter replicated on a data-parallel dim and
used on batch-sharded activations passes through `grad_all_reduce` (its
gradient is partial on each rank). Issued one by one in the backward, those
all-reduces are many small, blocking calls. This pass removes the
`grad_all_reduce` nodes that sit directly on parameters and records, on each
parameter's node, the gradient synchronisation it needs and its bucket (with `Plan(sequence_parallel=True)` also the tp f of parameters read by
sequence-sharded activations: norm weights, row-parallel biases; always a tp f on an FSDP gather): buckets
of about `bucket_bytes` (default 25 MB, `options["bucket_bytes"]`) in reverse
order of first use, which is the order the backward produces gradients. The
runtime (`fxpar.runtime.grad_sync`) all-reduces a bucket asynchronously as soon as all
its gradients are accumulated, and waits for all of them at the end of the
backward, so communication overlaps the rest of the backward.

Before:  %gradallreduce_w = fxpar.grad_all_reduce(%w, '1', 'dp')
         %linear = aten.linear(%x, %gradallreduce_w)
After:   %linear = aten.linear(%x, %w)          # meta["fxpar"].grad_sync = GradSyncInfo(dims=("dp",), bucket=0)

On a dp x fsdp (HSDP) mesh the f sits on the parameter's FSDP gather instead: its backward all-reduced
the FULL gathered gradient over dp (fsdp times the bytes HSDP needs), and its forward, a clone, was what
autograd saved, so the runtime never re-gathered those weights (`pack_gathered` matches the gathered
tensor itself) and every block's full weights stayed alive from the forward to the backward. Both sums
are linear, so the f moves off the gather onto the shard, as FSDP2's HSDP does: the gather's backward
reduce-scatters over fsdp, and the runtime all-reduces the SHARD's gradient over dp (equal up to
summation order). A gather with casts after it (apply_mixed_precision) or a tensor-parallel f of its
own over it (sequence parallel) is the same chain; apply_mixed_precision cast such a parameter after
its f, so once the f is gone the casts fold into the gather's param_dtype / reduce_dtype, as on fsdp
alone (half the gathered bytes for bfloat16, and the gathered tensor is what autograd saves):

Under mixed precision the shard's dp sum runs in the dtype its reduce-scatter ran in (`GradSyncInfo.dtype`:
reduce_dtype, or param_dtype without one), and lands in the shard's dtype: FSDP2's HSDP reduces in
reduce_dtype on both dims and casts once, at the end. A plain data-parallel parameter's sum runs in
reduce_dtype, or without one in the dtype apply_mixed_precision cast it to, as torch's `replicate` does.

Before:  %fsdpgather_w = fxpar.fsdp_all_gather(%w, 0, 2, '2', 'fsdp')
         %gradallreduce_fsdpgather_w = fxpar.grad_all_reduce(%fsdpgather_w, '1', 'dp')
         %linear = aten.linear(%x, %gradallreduce_fsdpgather_w)
After:   %fsdpgather_w = fxpar.fsdp_all_gather(%w, 0, 2, '2', 'fsdp')
         %linear = aten.linear(%x, %fsdpgather_w)    # %w: grad_sync = GradSyncInfo(dims=("dp",), bucket=0)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from fxpar.core.pass_api import PassContext, PassResult, fx_pass
from fxpar.core.spec import GradSyncInfo, get_info, set_info
from fxpar.ops.collectives import COLLECTIVE_OPS
from fxpar.ops.kv_replicas import REPLICA_GRAD_SUM
from fxpar.ops.transitions import collective_args, set_fsdp_precision

DATA_DIMS = ("dp", "fsdp", "ep")
DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024
_F = torch.ops.fxpar.grad_all_reduce.default
_GATHER = torch.ops.fxpar.fsdp_all_gather.default
aten = torch.ops.aten  # ATen op names (aten._to_copy) are public op names, as in apply_mixed_precision


def _synced_source(f: fx.Node) -> fx.Node | None:
    """The parameter whose gradient the runtime may sum in place of the f `f`, or None.

    Below `f` only other fs, then the parameter itself or its one FSDP gather: the gather's backward
    (a reduce-scatter over fsdp) is linear and commutes with the sum over `f`'s dim, so the shard's
    gradient summed after it is the same sum. So is a kv weight copy's replica sum on tp (`replicate_kv_heads`
    under dp x tp, `fxpar.ops.kv_replicas`): the runtime sums over dp, once and in a bucket with the other
    weights, the gradient that sum has already added up over the copy's tp group. Any other collective in
    between (a local slice for a tensor-parallel use of a tied weight) reduces its own contribution already,
    and the runtime would sum that part a second time.
    """
    base = f.args[0]
    while base.op == "call_function" and base.target is _F:
        base = base.args[0]
    if base.op == "call_function" and base.target is _GATHER:
        base = base.args[0]
    if base.op == "call_function" and base.target is REPLICA_GRAD_SUM \
            and collective_args(base)["mesh_dim"] != collective_args(f)["mesh_dim"]:
        base = base.args[0]
    return base if base.op == "get_attr" else None


def _over_gather(f: fx.Node) -> bool:
    """Whether the f `f` sits (through other fs) on an FSDP gather: its sum moves onto the shard."""
    base = f.args[0]
    while base.op == "call_function" and base.target is _F:
        base = base.args[0]
    return base.op == "call_function" and base.target is _GATHER


def _fold_casts(gather: fx.Node, reduce_dtype: torch.dtype | None) -> None:
    """apply_mixed_precision's casts right after an FSDP gather (its f removed) -> the gather's own dtypes."""
    users = list(gather.users)
    if not users or len(gather.args) > 5 and gather.args[5] is not None:
        return
    dtypes = set()
    for u in users:
        info = get_info(u)
        if u.target is not aten._to_copy.default or info is None or \
                info.origin != "apply_mixed_precision" or set(u.kwargs) != {"dtype"}:
            return
        dtypes.add(u.kwargs["dtype"])
    if len(dtypes) != 1:
        return
    dtype = dtypes.pop()
    set_fsdp_precision(gather, param_dtype=dtype, reduce_dtype=reduce_dtype)
    gather.meta["val"] = gather.meta["val"].to(dtype)
    info = get_info(gather)
    set_info(gather, dataclasses.replace(info, spec=dataclasses.replace(info.spec, dtype=dtype)))
    for u in users:
        u.replace_all_uses_with(gather)
        gather.graph.erase_node(u)


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
    # Without it, a tp f on an FSDP gather (a q/k norm's weight read by head-sharded q and k) moves onto the
    # shard too, as the dp f does on HSDP: summed after the reduce-scatter, on the shard's bytes, and the
    # casts after it fold into the gather, which then moves param_dtype bytes (float32 under the f). The
    # same sum in another order (under mixed precision of bf16-exact parts in float32: on fsdp2 x tp2 each
    # order rounds once, bit-equal, tests/test_mixed_precision.py).
    # Group every data-parallel f by the parameter it leads to (through any collectives) and dim.
    groups: dict[tuple[fx.Node, str], list[tuple[fx.Node, bool]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not _F:
            continue
        dim = collective_args(node)["mesh_dim"]
        if dim not in dims and not (dim == "tp" and _over_gather(node)):
            continue
        base = node.args[0]
        while base.op == "call_function" and base.target in COLLECTIVE_OPS:
            base = base.args[0]
        if base.op == "get_attr":
            groups.setdefault((base, dim), []).append((node, _synced_source(node) is base))
    # A parameter is synced by the runtime on a dim only if every f of it on that dim sits directly on
    # it or on its FSDP gather (`_synced_source`).
    # And only if every use of it goes through such an f: the runtime's hook sees the parameter's
    # whole gradient, and a use replicated on the dim (a tied lm_head after a gathered batch) already
    # gives every rank its full gradient, which the runtime would sum over the dim again.
    synced: dict[fx.Node, list[str]] = {}
    gathers: set[fx.Node] = set()
    for (param, dim), fs in groups.items():
        if not all(only_f for _, only_f in fs) or not _every_use_reduced(param, dim):
            continue
        for node, _ in fs:
            if node.args[0].target is _GATHER:
                gathers.add(node.args[0])
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        synced.setdefault(param, []).append(dim)
    if not synced:
        return PassResult(gm, False)
    policy = ctx.options.get("mp_policy")
    for gather in gathers:
        if not any(u.target is _F for u in gather.users):  # every f on it gone (a tp one may stay)
            _fold_casts(gather, getattr(policy, "reduce_dtype", None))
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
        set_info(p, dataclasses.replace(info, grad_sync=GradSyncInfo(tuple(sorted(synced[p])), bucket,
                                                                     _sync_dtype(p, policy))))
    return PassResult(gm, True)


def _sync_dtype(param: fx.Node, policy) -> torch.dtype | None:
    """The dtype a parameter's gradient is summed over its data-parallel dims in (None: its own), as FSDP2's.

    An HSDP shard: its gather's reduce-scatter's. FSDP2's HSDP reduces in reduce_dtype on both dims and casts
    once, at the end, to the shard's dtype. The gather's backward reduce-scatters in reduce_dtype or, without
    one, in param_dtype (the gradient's dtype); the dp sum goes on in that dtype (no rounding in between,
    and param_dtype bytes on the wire where that is the narrower one).

    A plain data-parallel parameter (`policy` is the MixedPrecisionPolicy, or None): reduce_dtype, or
    without one the dtype it is computed in (param_dtype where apply_mixed_precision cast it), as torch's
    `replicate` (FSDP2 on a replicated mesh) reduces: a float32 parameter computed in bfloat16 sends
    bfloat16 gradients. Its gradient is the cast's backward (a bfloat16 value widened: narrowing it again
    is exact) and the sum lands in the parameter's dtype.
    """
    gathers = [u for u in param.users if u.op == "call_function" and u.target is _GATHER]
    if len(gathers) > 1:
        return None
    if gathers:
        args = collective_args(gathers[0])
        dtype = args.get("reduce_dtype") or args.get("param_dtype")
    elif policy is None:
        return None
    else:
        casts = _compute_dtypes(param)
        if casts is None or len(casts) > 1:
            return None  # some uses cast, some not (or to two dtypes): summed in its own dtype
        dtype = policy.reduce_dtype or (casts.pop() if casts else None)
    return dtype if dtype is not None and dtype != param.meta["val"].dtype else None


def _compute_dtypes(param: fx.Node) -> set[torch.dtype] | None:
    """The dtypes apply_mixed_precision casts `param` to at its compute uses (through collectives); set()
    where no use is cast, None where some are and some are not."""
    dtypes, uncast, frontier = set(), False, [param]
    while frontier:
        for u in frontier.pop().users:
            if u.op == "call_function" and u.target in COLLECTIVE_OPS:
                frontier.append(u)
            elif u.target is aten._to_copy.default and getattr(get_info(u), "origin", None) == "apply_mixed_precision":
                dtypes.add(u.kwargs["dtype"])
            else:
                uncast = True
    return None if dtypes and uncast else dtypes
