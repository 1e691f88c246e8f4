"""The gradient sum of a weight slice replicated within groups of a mesh dim (grouped-query attention's kv heads).

Grouped-query attention with more tensor-parallel ranks than kv heads (Qwen2.5-7B: 4 kv heads at tp=8)
holds each kv head on the g = tp / kv_heads ranks whose q heads attend to it (Megatron-LM's and vLLM's
layout; `fxpar.passes.replicate_kv_heads`): rank r holds kv head j(r) = r // g of the k / v projection,
and computes k_r = x W_j(r)^T locally, with no forward communication.

The dual. Let L be the loss, rank r's attention the only consumer of its copy k_r. The model's k_j is
used by the q heads of every rank of group j = {r : r // g = j}, so

    dL/dW_j = sum_{r in group j} (dL/dk_r)^T x  =  sum_{r in group j} G_r,

where G_r is the weight gradient autograd leaves on rank r (its own q heads' share). Every rank of
group j must hold that sum (their copies stay equal under any optimizer). `replica_grad_sum` is the
identity forward; backward it sums G over the group: rank r writes G_r into slot j(r) of a zero buffer
of kv_heads = tp / g slots and all-reduces it over the whole tp group (slot j then holds the sum over
group j), then keeps its slot. (A subgroup all-reduce of one slot over g ranks would move kv_heads
times fewer bytes; it needs process groups for the sub-groups, which fxpar's mesh does not create.)

The input gradient needs nothing new: dL/dx = sum_r (dL/dk_r) W_j(r) over all tp ranks is the k
branch's share of the usual Megatron "f" all-reduce at the attention's replicated input.

The op is one of `COLLECTIVE_OPS` under the name `replica_grad_sum`, its dual an `all_reduce` of the
buffer: (group_size // replicas) x the weight shard's bytes over its mesh dim, nothing forward
(`fxpar.ops.transitions.dual_copies`). explain(), the timeline, the cost model, the collective-order
fingerprint and the invariant checks see it as the collective it is. (`fxpar.ops` imports this module
first, so the tables hold it before any reader copies them.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxpar.ops.collectives import BACKWARD_OF, COLLECTIVE_OPS, _all_reduce, _group_rank, _record

__all__ = ["replica_grad_sum", "REPLICA_GRAD_SUM"]


@torch.library.custom_op("fxpar::replica_grad_sum", mutates_args=())
def replica_grad_sum(x: Tensor, replicas: int, group_size: int, group_name: str, mesh_dim: str) -> Tensor:
    """Identity forward; backward, the gradient summed over the `replicas` consecutive ranks sharing x."""
    return x.clone()


@replica_grad_sum.register_fake
def _(x, replicas, group_size, group_name, mesh_dim):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.replicas, ctx.group_size, ctx.group_name, ctx.mesh_dim = inputs[1:]


def _backward(ctx, grad):
    slot = _group_rank(ctx.group_name) // ctx.replicas
    buf = grad.new_zeros((ctx.group_size // ctx.replicas, *grad.shape))
    buf[slot] = grad
    _record("all_reduce", ctx.mesh_dim, buf, "backward")
    return _all_reduce(buf, ctx.group_name)[slot], None, None, None, None


replica_grad_sum.register_autograd(_backward, setup_context=_setup)
REPLICA_GRAD_SUM = torch.ops.fxpar.replica_grad_sum.default
torch.fx.node.has_side_effect(REPLICA_GRAD_SUM)
COLLECTIVE_OPS[REPLICA_GRAD_SUM] = "replica_grad_sum"  # identity forward; its dual all-reduces over mesh_dim
BACKWARD_OF["replica_grad_sum"] = "all_reduce"
