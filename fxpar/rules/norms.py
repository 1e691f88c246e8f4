"""Normalizations over trailing dims: layer_norm, rms_norm; and batch_norm in eval mode.

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


@register(aten.batch_norm.default)
def batch_norm(op: OpInfo, cur) -> list[Strategy]:
    training = op.args[5] if len(op.args) > 5 else op.node.kwargs.get("training", True)
    c = cur[0]
    out: list[Strategy] = []
    if not training and c is not None and c.is_shard() and c.dim != 1:
        out.append(Strategy((S(c.dim), *(R for _ in op.in_vals[1:])), S(c.dim)))
    out.append(Strategy(tuple(R for _ in op.in_vals), R))
    return out
