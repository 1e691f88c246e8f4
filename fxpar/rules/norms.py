"""Normalizations: layer_norm, rms_norm over trailing dims; batch_norm per channel.

The statistics need the normalized dims whole; leading (batch, sequence) dims
may stay sharded. Weights and biases are Replicate (elementwise over the
normalized dims).

batch_norm in eval mode normalizes each example by the running statistics: any
dim but the channels (dim 1) may stay sharded, the batch included. In training
mode its statistics are over the batch: it runs on whole values (global
statistics, as the unsplit model).
"""

from __future__ import annotations

import torch

from fxpar.rules.registry import OpInfo, R, S, Strategy, register

aten = torch.ops.aten


@register(aten.layer_norm.default, aten.rms_norm.default)
def layer_norm(op: OpInfo, cur) -> list[Strategy]:
    x = op.in_vals[0]
    first_normalized = x.ndim - len(op.args[1])
    n_params = len(op.in_vals) - 1
    c = cur[0]
    out: list[Strategy] = []
    if c is not None and c.is_shard() and c.dim < first_normalized:
        out.append(Strategy((S(c.dim), *(R for _ in range(n_params))), S(c.dim)))
    out.append(Strategy(tuple(R for _ in op.in_vals), R))
    return out


def _batch_norm_slots(op: OpInfo) -> list[int]:
    """Argument positions (1 weight, 2 bias, 3 running_mean, 4 running_var) that hold tensors."""
    return [i for i in (1, 2, 3, 4) if op.arg(i, ("weight", "bias", "running_mean", "running_var")[i - 1]) is not None]


@register(aten.batch_norm.default)
def batch_norm(op: OpInfo, cur) -> list[Strategy]:
    """batch_norm(x (N, C, *S), weight, bias, running_mean, running_var, training, ...).

    Statistics are per channel, over the batch and spatial dims:

        x      params (C,)   y
        S(1)   S(0)          S(1)    channels sharded (tp): exact in training and eval
        S(d)   R             S(d)    batch (or any d != 1) sharded, eval with running statistics only
        R      R             R       (training under dp: the batch is gathered, global statistics)

    In training the running statistics are updated in place; sharded by channel,
    each rank updates its own slice.
    """
    slots = _batch_norm_slots(op)
    n_params = len(slots)
    training = op.arg(5, "training", False)
    has_stats = 3 in slots
    # Training writes the running statistics in place: a slice taken here would be a copy and the
    # update lost, so channels shard only where the buffers themselves are sharded.
    stats_sharded = all(c is not None and c.is_shard(0) for s, c in zip(slots, cur[1:]) if s in (3, 4))
    cx = cur[0]
    out: list[Strategy] = []
    if op.in_vals[0].ndim >= 2 and (not training or stats_sharded) and (
            cx is not None and cx.is_shard(1) or any(c is not None and c.is_shard(0) for c in cur[1:])):
        out.append(Strategy((S(1), *(S(0) for _ in range(n_params))), S(1)))
    if cx is not None and cx.is_shard() and cx.dim != 1 and not training and has_stats and op.in_vals[0].ndim >= 2:
        out.append(Strategy((S(cx.dim), *(R for _ in range(n_params))), S(cx.dim)))
    out.append(Strategy(tuple(R for _ in op.in_vals), R))
    return out
