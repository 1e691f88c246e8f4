"""Convolutions and pooling: conv1d / conv2d / conv3d, max / avg / adaptive pooling.

A convolution y = conv(x, W) (+ b) with x (N, Cin, *S), W (Cout, Cin/groups, *K)
is a matmul over the channel dim, applied at every spatial position. With
groups == 1 the exact strategies on one mesh dim are Megatron's, with the
channel dim in the role of the feature dim:

    x          W      b        y
    R          S(0)   S(0)     S(1)      output channels (colwise)
    S(1)       S(1)   none     P         input channels (rowwise; a bias is added after the reduce)
    S(0)       R      R        S(0)      batch sharded (data parallel)
    P          R      none     P         linear in x
    R          R      R        R

(the channel dim is 0 for an unbatched input). A grouped convolution (groups = g > 1,
depthwise when g == channels) mixes channels within its groups only, so it shards by
groups where g divides by the mesh size: each rank holds g / n whole groups, their
input channels, output channels and bias, and runs a conv with g / n groups
(`_localize_conv` rewrites the argument):

    x          W      b        y
    S(1)       S(0)   S(0)     S(1)      groups (channels) sharded; no communication
Pooling acts on the trailing spatial dims: any other dim keeps its shard, and
average pooling (linear) passes a Partial through; max pooling does not.
"""

from __future__ import annotations

import torch

from fxpar.rules.registry import OpInfo, P, R, S, Strategy, register

aten = torch.ops.aten

CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)


def conv_groups(node) -> int:
    """The `groups` argument of a conv1d / conv2d / conv3d node."""
    return node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)


def _localize_conv(node, info, mesh) -> None:
    """A grouped conv sharded by groups runs its local groups: groups / n for each mesh dim that shards them."""
    groups = conv_groups(node)
    if groups == 1:
        return
    n = 1
    for m, p in enumerate(info.input_placements[1]):
        if p.is_shard(0):
            n *= mesh.sizes[m]
    if n == 1:
        return
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = (None, None, None, 1, 0, 1, 1)  # an int stands for every spatial dim
    args = [node.args[i] if i < len(node.args) else node.kwargs.get(names[i], defaults[i]) for i in range(7)]
    args[6] = groups // n
    node.args, node.kwargs = tuple(args), {}


@register(*CONVS, localize=_localize_conv)
def conv(op: OpInfo, cur) -> list[Strategy]:
    x_val, w_val = op.in_vals[0], op.in_vals[1]
    has_bias = len(op.in_vals) == 3
    cdim = x_val.ndim - w_val.ndim + 1  # 1 for (N, C, *S), 0 for an unbatched (C, *S)
    cx, cw = cur[0], cur[1]
    out: list[Strategy] = []

    def strat(x, w, b, y):
        return Strategy((x, w, b) if has_bias else (x, w), y)

    groups = conv_groups(op.node)
    if groups > 1 and groups % op.mesh_size == 0 and (cw is not None and cw.is_shard(0)
                                                      or cx is not None and cx.is_shard(cdim)):
        out.append(strat(S(cdim), S(0), S(0), S(cdim)))
    if groups == 1:
        if cw is not None and cw.is_shard(0):
            out.append(strat(R, S(0), S(0), S(cdim)))
        if not has_bias and (cw is not None and cw.is_shard(1) or cx is not None and cx.is_shard(cdim)):
            out.append(strat(S(cdim), S(1), None, P))
        if cx is not None and cx.is_partial() and not has_bias:
            out.append(strat(P, R, None, P))
    if cx is not None and cx.is_shard() and cx.dim < cdim:
        out.append(strat(S(cx.dim), R, R, S(cx.dim)))
    out.append(strat(R, R, R, R))
    return out


_POOLS = {
    # op: (spatial dims, linear in its input)
    aten.max_pool1d.default: (1, False),
    aten.max_pool2d.default: (2, False),
    aten.max_pool3d.default: (3, False),
    aten.avg_pool1d.default: (1, True),
    aten.avg_pool2d.default: (2, True),
    aten.avg_pool3d.default: (3, True),
    aten.adaptive_avg_pool1d.default: (1, True),
    aten.adaptive_avg_pool2d.default: (2, True),
    aten.adaptive_avg_pool3d.default: (3, True),
    aten.adaptive_max_pool1d.default: (1, False),
    aten.adaptive_max_pool2d.default: (2, False),
    aten.adaptive_max_pool3d.default: (3, False),
    aten.max_pool2d_with_indices.default: (2, False),
    aten.max_pool3d_with_indices.default: (3, False),
}


@register(*_POOLS)
def pool(op: OpInfo, cur) -> list[Strategy]:
    spatial, linear = _POOLS[op.node.target]
    first_spatial = op.in_vals[0].ndim - spatial
    n_out = len(op.out_val) if isinstance(op.out_val, (tuple, list)) else None

    def wrap(p):  # (values, indices) for the ops that also return indices
        return tuple(p for _ in range(n_out)) if n_out is not None else p

    c = cur[0]
    out: list[Strategy] = []
    if c is not None and c.is_shard() and c.dim < first_spatial:
        out.append(Strategy((S(c.dim),), wrap(S(c.dim))))
    if c is not None and c.is_partial() and linear and n_out is None:
        out.append(Strategy((P,), P))
    out.append(Strategy((R,), wrap(R)))
    return out
