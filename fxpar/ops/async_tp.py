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
from fxpar.ops.collectives import COLLECTIVE_OPS, _record

__all__ = ["ASYNC_OPS", "WAIT_OP", "all_reduce_start", "wait_issued"]

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

def wait_issued(pending: Tensor) -> Tensor:
    """The wait node of an issued collective: polled on gloo (`ops.waiting`), then torch's `wait_tensor`
    (its autograd formula is the identity)."""
    return waiting.wait(pending)


WAIT_OP = wait_issued

ASYNC_OPS = {torch.ops.fxpar.all_reduce_start.default: "all_reduce"}
"""Issue ops whose value is valid only after their `WAIT_OP` node, by the collective they run."""

COLLECTIVE_OPS.update(ASYNC_OPS)  # an issued all-reduce is an all-reduce to explain(), costs and fingerprints
for _op in (*ASYNC_OPS, wait_issued):
    torch.fx.node.has_side_effect(_op)
