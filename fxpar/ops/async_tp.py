"""Asynchronous tensor-parallel all-reduce: an issue node, and torch's `wait_tensor` where the value is needed.

`fxpar::all_reduce` (fxpar.ops.collectives) sums a Partial value over its group
and waits inside itself. `fxpar.passes.async_tp` splits a graph's batch into
chunks and replaces each chunk's all-reduce by two nodes:

    %allreduce_start_linear_3_c0 = fxpar.all_reduce_start(%linear_3_nobias_c0, '0', 'tp')   # issue
    ... chunk 1 computes while chunk 0's sum is in flight ...
    %allreduce_linear_3_c0 = fxpar.ops.async_tp.wait_issued(%allreduce_start_linear_3_c0)     # wait

`all_reduce_start` issues c10d's `all_reduce(async_op=True)` on a copy of its input
(valid only after its wait; the Work is registered for torch's functional
`wait_tensor`) and returns it without waiting; the wait node calls torch's
`wait_tensor` on it. The gradient dual is `fxpar::all_reduce`'s (DESIGN.md,
Partial -> Replicate): identity, split over the two nodes (the issue's backward
and `wait_tensor`'s are both the identity), so the gradients are those of the
unsplit graph.

The issue op is one of `COLLECTIVE_OPS` under the name `all_reduce`: explain(),
the cost model and the collective-order fingerprint see it as the all-reduce it
is, at the place it is issued (its wait communicates nothing). It is marked
side-effecting like every fxpar collective.
"""

from __future__ import annotations

import torch
from torch import Tensor


from fxpar._torch.c10d import functional
from fxpar.ops import waiting
from fxpar.ops.collectives import (COLLECTIVE_OPS, _record, _reduce_scatter_bwd, _reduce_scatter_fake, _save_shard_args,
                                    _sp_all_gather_bwd, check_divides)

__all__ = ["ASYNC_OPS", "ISSUED_FORM", "WAIT_OP", "all_reduce_start", "reduce_scatter_start", "sp_all_gather_start",
           "wait_issued"]

_c10d = functional


@torch.library.custom_op("fxpar::all_reduce_start", mutates_args=())
def all_reduce_start(x: Tensor, group_name: str, mesh_dim: str) -> Tensor:
    """Partial -> Replicate, issued: the sum over the group, valid only after `wait_tensor`. Backward: identity."""
    _record("all_reduce", mesh_dim, x, "forward")
    return waiting.start_all_reduce(x, group_name)


@all_reduce_start.register_fake
def _(x, group_name, mesh_dim):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


all_reduce_start.register_autograd(lambda ctx, grad: (grad, None, None))

@torch.library.custom_op("fxpar::sp_all_gather_start", mutates_args=())
def sp_all_gather_start(x: Tensor, dim: int, group_size: int, group_name: str, mesh_dim: str) -> Tensor:
    """Shard(dim) -> Replicate, issued (sequence parallel's all-gather before a column-parallel matmul): valid
    only after `wait_tensor`. Backward: reduce-scatter along `dim`, as `fxpar::sp_all_gather`'s.

    The shards are gathered along dim 0 of the `.movedim(dim, 0)` view of the returned tensor, which is laid
    out with `dim` outermost (`_gathered_buffer`): the gathered value without a copy after the wait (its
    consumer reads it strided)."""
    _record("all_gather", mesh_dim, x, "forward")
    if dim == 0:
        return waiting.start_all_gather(x, group_size, group_name)
    out = _gathered_buffer(x, dim, group_size)
    waiting.start_all_gather(x.movedim(dim, 0), group_size, group_name, out=out.movedim(dim, 0))
    return out


def _gathered_buffer(x: Tensor, dim: int, n: int) -> Tensor:
    """An empty tensor of x's shape with dim `dim` n times as long, laid out with `dim` outermost (so that
    `.movedim(dim, 0)` of it is contiguous: c10d gathers into that view)."""
    moved = list(x.movedim(dim, 0).shape)
    moved[0] *= n
    layout = torch.empty(moved, device="meta").movedim(0, dim)  # its strides; meta: nothing allocated
    return torch.empty_strided(layout.shape, layout.stride(), dtype=x.dtype, device=x.device)


@sp_all_gather_start.register_fake
def _(x, dim, group_size, group_name, mesh_dim):
    if dim == 0:
        return x.new_empty((group_size * x.size(0), *x.shape[1:]))
    return _gathered_buffer(x, dim, group_size)


sp_all_gather_start.register_autograd(_sp_all_gather_bwd, setup_context=_save_shard_args)  # sp_all_gather's dual


@torch.library.custom_op("fxpar::reduce_scatter_start", mutates_args=())
def reduce_scatter_start(x: Tensor, dim: int, group_size: int, group_name: str, mesh_dim: str) -> Tensor:
    """Partial -> Shard(dim), issued (sequence parallel's reduce-scatter after a row-parallel matmul): valid
    only after `wait_tensor`. Backward: all-gather along `dim`, as `fxpar::reduce_scatter`'s."""
    _record("reduce_scatter", mesh_dim, x, "forward")
    check_divides(x, dim, group_size, "reduce_scatter")
    stacked = x if dim == 0 else torch.cat(x.chunk(group_size, dim=dim), dim=0)  # rank r's block r-th
    return waiting.start_reduce_scatter(stacked, group_size, group_name)


reduce_scatter_start.register_fake(_reduce_scatter_fake)
reduce_scatter_start.register_autograd(_reduce_scatter_bwd, setup_context=_save_shard_args)  # reduce_scatter's dual


def wait_issued(pending: Tensor) -> Tensor:
    """The wait node of an issued collective (`ops.waiting.wait`: polled on gloo, then torch's `wait_tensor`,
    or a gloo reduce-scatter's blocks summed into it); its autograd formula is the identity."""
    return waiting.wait(pending)


WAIT_OP = wait_issued

ASYNC_OPS = {
    torch.ops.fxpar.all_reduce_start.default: "all_reduce",
    torch.ops.fxpar.sp_all_gather_start.default: "sp_all_gather",
    torch.ops.fxpar.reduce_scatter_start.default: "reduce_scatter",
}
"""Issue ops whose value is valid only after their `WAIT_OP` node, by the collective they run (the name of the
fxpar collective they replace, with its arguments: `COLLECTIVE_OPS`' readers see that collective)."""

ISSUED_FORM = {
    torch.ops.fxpar.all_reduce.default: torch.ops.fxpar.all_reduce_start.default,
    torch.ops.fxpar.sp_all_gather.default: torch.ops.fxpar.sp_all_gather_start.default,
    torch.ops.fxpar.reduce_scatter.default: torch.ops.fxpar.reduce_scatter_start.default,
}
"""An fxpar collective -> its issue op (same arguments, same gradient dual)."""

COLLECTIVE_OPS.update(ASYNC_OPS)  # an issued all-reduce is an all-reduce to explain(), costs and fingerprints
for _op in (*ASYNC_OPS, wait_issued):
    torch.fx.node.has_side_effect(_op)
