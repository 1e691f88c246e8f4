"""Reductions: sum and mean over dims, and softmax-like ops along a dim.

Summing over a sharded dim leaves each rank a partial sum (Partial); dims not
reduced keep their sharding (shifted when keepdim is False). A mean over a
sharded dim is not a plain partial sum of local means unless scaled, so it
gathers first. Softmax and norms along a dim need that dim whole.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Partial

from fxpar.rules.registry import OpInfo, P, R, S, Strategy, norm_dim, register

aten = torch.ops.aten


def _reduced_dims(op: OpInfo) -> list[int]:
    ndim = op.in_vals[0].ndim
    dims = op.arg(1, "dim", None)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return sorted(norm_dim(d, ndim) for d in dims)


def _keepdim(op: OpInfo) -> bool:
    return bool(op.arg(2, "keepdim", False))


def _reduce(op: OpInfo, cur, *, sum_like: bool) -> list[Strategy]:
    c = cur[0]
    reduced = _reduced_dims(op)
    keep = _keepdim(op) or op.out_val.ndim == op.in_vals[0].ndim
    out: list[Strategy] = []
    if c is not None and c.is_shard():
        if c.dim in reduced:
            if sum_like:
                out.append(Strategy((S(c.dim),), P))
        else:
            shift = 0 if keep else sum(1 for r in reduced if r < c.dim)
            out.append(Strategy((S(c.dim),), S(c.dim - shift)))
    if c is not None and c.is_partial():
        out.append(Strategy((P,), P))
    out.append(Strategy((R,), R))
    return out


@register(aten.sum.dim_IntList, aten.sum.default)
def sum_(op: OpInfo, cur) -> list[Strategy]:
    return _reduce(op, cur, sum_like=True)


@register(aten.mean.dim, aten.mean.default)
def mean(op: OpInfo, cur) -> list[Strategy]:
    return _reduce(op, cur, sum_like=False)


@register(aten.amax.default, aten.amin.default)
def amax(op: OpInfo, cur) -> list[Strategy]:
    """max of a Partial is not the max of the sum: only shard-following strategies. Over a sharded
    dim, the local max is a Partial(max) (all_reduce_max), but that transition has no gradient, so
    only for an input that carries none: a detached one (a softmax's shift) or an integer one."""
    strategies = [s for s in _reduce(op, cur, sum_like=False) if not s.inputs[0].is_partial()]
    c = cur[0]
    src = op.node.args[0]
    no_grad = not op.in_vals[0].dtype.is_floating_point or (
        isinstance(src, fx.Node) and src.target == aten.detach.default)
    if c is not None and c.is_shard() and c.dim in _reduced_dims(op) and no_grad:
        kind = "max" if op.node.target == aten.amax.default else "min"
        strategies.insert(0, Strategy((S(c.dim),), Partial(kind)))
    return strategies


@register(aten._softmax.default, aten._log_softmax.default, aten.softmax.int, aten.log_softmax.int, uneven=True)
def softmax(op: OpInfo, cur) -> list[Strategy]:
    c = cur[0]
    dim = norm_dim(op.args[1], op.in_vals[0].ndim)
    out: list[Strategy] = []
    if c is not None and c.is_shard() and c.dim != dim:
        out.append(Strategy((S(c.dim),), S(c.dim)))
    out.append(Strategy((R,), R))
    return out


@register(aten.cross_entropy_loss.default)
def cross_entropy(op: OpInfo, cur) -> list[Strategy]:
    """Loss over (N, C) logits: rows are independent, so a batch shard gives per-row losses
    ('none'), or partial sums ('sum'); a 'mean' (over non-ignored rows) needs every row."""
    reduction = op.arg(3, "reduction", 1)  # 0 none, 1 mean, 2 sum
    cl, ct = cur[0], cur[1]
    n_extra = len(cur) - 2
    out: list[Strategy] = []
    if cl is not None and cl.is_shard(0) and op.in_vals[0].ndim >= 2 and reduction in (0, 2):
        out.append(Strategy((S(0), S(0), *(R for _ in range(n_extra))), S(0) if reduction == 0 else P))
    out.append(Strategy(tuple(R for _ in cur), R))
    return out


@register(aten.pad.default, aten.constant_pad_nd.default)
def pad(op: OpInfo, cur) -> list[Strategy]:
    """Padding touches the last len(pad) / 2 dims; the others keep their sharding."""
    x = op.in_vals[0]
    n_padded = len(op.args[1]) // 2
    c = cur[0]
    out: list[Strategy] = []
    if c is not None and c.is_shard() and c.dim < x.ndim - n_padded:
        out.append(Strategy((S(c.dim),), S(c.dim)))
    out.append(Strategy((R,), R))
    return out
