"""Losses on vocab-sharded logits: the pick of the target logit, and the softmax shift.

Cross-entropy on logits sharded along the vocabulary (a column-parallel lm_head)
is computed as Megatron's vocab-parallel cross-entropy, from ops with rules
(`fxpar.passes.decompose_loss` writes it so):

    op                                   logits      target      output
    amax(detach(x), dim=V)               S(V)        -           Partial(max)  -> all_reduce_max
    sum(exp(x - max), dim=V)             S(V)        -           Partial(sum)  -> all_reduce
    gather(x - max, V, target)           S(V)        R           Partial(sum)  -> all_reduce

so only (N, 1) statistics cross ranks and the logits are never gathered. The
target pick is not `aten.gather` on the local columns, so its localize step
swaps the node's target for `fxpar::vocab_parallel_gather`: each rank picks
the targets in its vocabulary range and zeros elsewhere (a Partial sum), and
its backward scatters the gradient into this rank's columns only.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor

from fxpar._torch.c10d import resolve_process_group
from fxpar.core.errors import ShardingError
from fxpar.rules.registry import OpInfo, P, R, S, Strategy, norm_dim, register

aten = torch.ops.aten

__all__ = ["vocab_parallel_gather", "localize_gather"]


def _local_index(index: Tensor, cols: int, group_name: str) -> tuple[Tensor, Tensor]:
    """(index into this rank's columns, where it is valid) for a dim sharded in equal blocks."""
    start = resolve_process_group(group_name).rank() * cols
    shifted = index - start
    mask = (shifted >= 0) & (shifted < cols)
    return torch.where(mask, shifted, 0), mask


@torch.library.custom_op("fxpar::vocab_parallel_gather", mutates_args=())
def vocab_parallel_gather(x: Tensor, dim: int, index: Tensor, group_name: str) -> Tensor:
    """This rank's part of `gather(x, dim, index)` with `x` sharded along `dim`: a Partial value."""
    local, mask = _local_index(index, x.size(dim), group_name)
    return torch.gather(x, dim, local) * mask.to(x.dtype)


@vocab_parallel_gather.register_fake
def _(x, dim, index, group_name):
    return x.new_empty(index.shape)


def _vpg_setup(ctx, inputs, output):
    x, dim, index, group_name = inputs
    ctx.save_for_backward(index)
    ctx.shape, ctx.dim, ctx.group_name = x.shape, dim, group_name


def _vpg_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    local, mask = _local_index(index, ctx.shape[ctx.dim], ctx.group_name)
    gx = grad.new_zeros(ctx.shape).scatter_add(ctx.dim, local, grad * mask.to(grad.dtype))
    return gx, None, None, None


vocab_parallel_gather.register_autograd(_vpg_backward, setup_context=_vpg_setup)


def localize_gather(node: fx.Node, info, mesh) -> None:
    """A gather whose input is sharded along the gathered dim becomes the masked vocab-parallel pick."""
    x_places = info.input_placements[0]
    dim = norm_dim(node.args[1], node.args[0].meta["val"].ndim)
    dims = [m for m, p in enumerate(x_places) if p.is_shard(dim)]
    if not dims:
        return
    if len(dims) > 1:
        raise ShardingError(f"gather %{node.name}: its input is sharded along the gathered dim {dim} on "
                            f"{len(dims)} mesh dims; fxpar picks across one mesh dim: pin the others to Replicate")
    m = dims[0]
    group = mesh.group_names[m] if mesh.group_names else f"dryrun:{mesh.names[m]}"
    node.target = torch.ops.fxpar.vocab_parallel_gather.default
    node.args = (node.args[0], dim, node.args[2], group)
    node.kwargs = {}


def vocab_strategies(op: OpInfo, cur, dim: int) -> list[Strategy]:
    """gather along a sharded dim with a replicated index: each rank's pick is a Partial sum."""
    cx, ci = cur[0], cur[1]
    if cx is not None and cx.is_shard(dim) and ci is not None and ci.is_replicate():
        return [Strategy((S(dim), R), P)]
    return []


@register(torch.ops.fxpar.vocab_parallel_gather.default)
def vocab_parallel(op: OpInfo, cur) -> list[Strategy]:
    """The localized pick: vocab-sharded on its mesh dim; on the others rows follow (batch shards)."""
    x, idx = op.in_vals[0], op.in_vals[1]
    dim = norm_dim(op.args[1], x.ndim)
    out = vocab_strategies(op, cur, dim)
    c = cur[0]
    if c is not None and c.is_shard() and c.dim != dim and c.dim < idx.ndim:
        out.append(Strategy((S(c.dim), S(c.dim)), S(c.dim)))
    out.append(Strategy((R, R), R))
    return out
