"""torch.distributed.pipelining internals: the schedule IR (actions) and what fxpar reads or sets on schedules."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping
from torch.distributed.pipelining.schedules import (
    _Action,
    _add_reduce_grad,
    _add_send_recv,
    _add_unshard_reshard,
    _ComputationType,
)

__all__ = [
    "ContiguousGradStage",
    "Action",
    "ComputationType",
    "add_send_recv",
    "add_reduce_grad",
    "add_unshard_reshard",
    "stage_to_rank_mapping",
    "pipeline_order",
    "forward_actions_only",
    "set_loss_fn",
    "PIPE_SPLIT",
]

# Waits for: a public schedule IR (torch.distributed.pipelining documents the action strings, not the types).
Action = _Action
ComputationType = _ComputationType
add_send_recv = _add_send_recv
add_reduce_grad = _add_reduce_grad
add_unshard_reshard = _add_unshard_reshard

# Waits for: a public name for the op torch.distributed.pipelining.pipe_split() records in a graph.
PIPE_SPLIT = torch.ops.pippy._pipe_split.default


def stage_to_rank_mapping(pp_size: int, num_stages: int, *, style: str) -> dict[int, int]:
    """Stage index -> pp rank as torch's schedules place stages ('loop' or 'v').

    Waits for: a public placement helper (schedules compute it privately)."""
    return generate_stage_to_rank_mapping(pp_size, num_stages, style=style)


def pipeline_order(sched: Any) -> dict[int, list]:
    """A schedule's compute actions per rank (single-stage schedules build theirs on demand)."""
    order = getattr(sched, "pipeline_order", None)
    return order if order else sched._get_pipeline_order()


def forward_actions_only(sched: Any) -> None:
    """Makes a V-shaped schedule run forward only: its own order with the backward actions left out.

    torch's V schedules (ZB-V, DualPipeV) list backward actions even without a
    loss and fail on them; the forward actions in the schedule's order,
    lowered with torch's own send/recv pass, are a valid forward pipeline.
    Waits for: a forward-only mode of torch's multi-stage schedules.
    """
    forward = {
        rank: [part for a in actions if a is not None for part in (a.sub_actions or (a,))
               if part.computation_type == _ComputationType.FORWARD]
        for rank, actions in sched.pipeline_order.items()
    }
    sched.pipeline_order_with_comms = _add_send_recv(
        forward, stage_to_rank=lambda s: sched.stage_index_to_group_rank[s], num_stages=sched._num_stages)


def set_loss_fn(sched: Any, loss_fn: Callable) -> None:
    """Points a cached schedule's loss wrapper at this call's loss function.

    Waits for: a public way to change a schedule's loss between steps."""
    sched._loss_fn.loss_fn = loss_fn


class ContiguousGradStage(PipelineStage):
    """torch's PipelineStage, sending input gradients as contiguous tensors.

    Autograd may return a strided gradient (through a transpose or an expand, as in
    nn.Transformer's decoder); point-to-point transfers need dense buffers, and the previous
    stage's receive buffer is contiguous. (`bwd_cache` is torch's per-microbatch store of the
    input gradients get_bwd_send_ops sends.) Waits for: a public hook on the gradients a stage sends.
    """

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list:
        grads = self.bwd_cache.get(bwd_chunk_id)
        if grads is not None:
            self.bwd_cache[bwd_chunk_id] = tuple(
                g.contiguous() if isinstance(g, torch.Tensor) else g for g in grads)
        return super().get_bwd_send_ops(bwd_chunk_id)
