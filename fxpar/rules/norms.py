"""Normalizations over trailing dims: layer_norm, rms_norm.

The statistics need the normalized dims whole; leading (batch, sequence) dims
may stay sharded. Weights and biases are Replicate (elementwise over the
normalized dims).
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
