"""Finding Megatron's structure in a graph (not a pass; used by annotate_parameters).

A *pair* is a set of head projections A_i (linear or addmm) that read the same
input, and one sink projection B, such that everything between them (the
region) is made of ops that keep the heads/hidden dim independent (views,
transposes, elementwise ops, rotary slicing, attention) and B's input comes
from the region. Sharding the A_i column-wise and B row-wise then computes the
whole region on local shards with one all-reduce after B. MLPs (up/gate ->
down) and attention (q/k/v -> o) are both pairs. Found from the graph's
dataflow, not from module names.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fxpar._torch.fx import is_higher_order
from fxpar.core.spec import shape_key, size_key
from fxpar.rules import tensor_args
from fxpar.rules.conv import CONVS, conv_groups

aten = torch.ops.aten

PROJECTIONS = (aten.linear.default, aten.addmm.default, *CONVS)
# Ops that mix the sharded dim with others: a region containing one is not a pair.
_BARRIERS = {
    aten.embedding.default, aten.layer_norm.default, aten.rms_norm.default, aten.mm.default,
    aten.mean.dim, aten.sum.dim_IntList, aten.mean.default, aten.sum.default, aten.amax.default,
    aten.cumsum.default, aten.index.Tensor, aten.gather.default,
}


def is_projection(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in PROJECTIONS:
        # a grouped convolution mixes channels only within its groups: not a projection over them
        return node.target not in CONVS or conv_groups(node) == 1
    return _raw_weight_dims(node) is not None


def _is_weight(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr" and getattr(node.meta.get("val"), "ndim", 0) == 2


def _raw_weight_dims(node: fx.Node) -> tuple[fx.Node, fx.Node, int, int] | None:
    """(input, weight, weight's contracted dim, weight's output dim) of a matmul or einsum on a raw
    2-D parameter (`x @ self.w`, `torch.einsum("btk,kn->btn", x, self.w)`), else None."""
    if node.target == aten.matmul.default:
        x, w = node.args[:2]
        if _is_weight(w) and isinstance(x, fx.Node) and getattr(x.meta.get("val"), "ndim", 0) >= 2:
            return x, w, 0, 1
        return None
    if node.target != aten.einsum.default or len(node.args) < 2 or len(node.args[1]) != 2:
        return None
    eq = node.args[0].replace(" ", "")
    if "->" not in eq or "..." in eq:
        return None
    lhs, out = eq.split("->")
    subs = lhs.split(",")
    for wi in (1, 0):
        w, x = node.args[1][wi], node.args[1][1 - wi]
        ws, xs = subs[wi], subs[1 - wi]
        if not _is_weight(w) or len(ws) != 2 or not isinstance(x, fx.Node):
            continue
        kept = [i for i, c in enumerate(ws) if c in out]
        summed = [i for i, c in enumerate(ws) if c not in out and c in xs]
        # the x @ W form: one weight letter contracted with x's last, the other kept last in the output
        if len(kept) == 1 and len(summed) == 1 and xs[-1] == ws[summed[0]] and out[-1] == ws[kept[0]] \
                and xs[:-1] == out[:-1]:
            return x, w, summed[0], kept[0]
    return None


def _weight_first(node: fx.Node) -> bool:
    """linear(x, W[N, K]) and conv(x, W[Cout, Cin, *K]); addmm(b, x, W[K, N]) is the other way."""
    return node.target != aten.addmm.default


def proj_input(node: fx.Node) -> fx.Node:
    raw = _raw_weight_dims(node) if node.target not in PROJECTIONS else None
    if raw is not None:
        return raw[0]
    return node.args[0] if _weight_first(node) else node.args[1]


def proj_weight(node: fx.Node) -> fx.Node:
    raw = _raw_weight_dims(node) if node.target not in PROJECTIONS else None
    if raw is not None:
        return raw[1]
    return node.args[1] if _weight_first(node) else node.args[2]


def proj_weight_dims(node: fx.Node) -> tuple[int, int]:
    """(output-features dim, input-features dim) of the projection's weight."""
    raw = _raw_weight_dims(node) if node.target not in PROJECTIONS else None
    if raw is not None:
        return raw[3], raw[2]
    return (0, 1) if _weight_first(node) else (1, 0)


def proj_out_features(node: fx.Node):
    return proj_weight(node).meta["val"].shape[proj_weight_dims(node)[0]]


def proj_in_features(node: fx.Node):
    return proj_weight(node).meta["val"].shape[proj_weight_dims(node)[1]]


def proj_bias(node: fx.Node) -> fx.Node | None:
    if node.target == aten.linear.default or node.target in CONVS:
        b = node.args[2] if len(node.args) > 2 else None
    elif node.target == aten.addmm.default:
        b = node.args[0]
    else:
        b = None
    return b if isinstance(b, fx.Node) else None


@dataclass
class Pair:
    heads: list[fx.Node]
    sink: fx.Node
    region: set[fx.Node] = field(default_factory=set)
    # heads whose output is split into k equal sections (fused qkv): head -> k
    fused: dict[fx.Node, int] = field(default_factory=dict)


def _region_op(node: fx.Node) -> bool:
    if node.op != "call_function" or is_projection(node):
        return False
    return node.target not in _BARRIERS or _head_local_norm(node)


_NORMS = (aten.layer_norm.default, aten.rms_norm.default)
_LAST_DIM_REDUCTIONS = (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default)
# ops between a head split and a norm that keep the head dim (D) last (unary: the walk follows args[0])
_HEAD_PRESERVING = (aten.view.default, aten.reshape.default, aten.transpose.int, aten.contiguous.default,
                    aten.clone.default, aten._to_copy.default, aten.to.dtype, aten.pow.Tensor_Scalar,
                    aten.square.default, aten.abs.default, aten.alias.default, aten.detach.default)


def _head_local_norm(node: fx.Node) -> bool:
    """A norm over the head dim only (Qwen3's q_norm / k_norm on (B, T, H, D)): it acts per head.

    True for a layer_norm / rms_norm over one trailing dim, or a mean / sum / amax over the last
    dim only (a decomposed RMSNorm's statistics), whose input comes, through unary ops that keep
    that dim last, from a view (..., H*D) -> (..., H, D) splitting a projection's features into
    heads of size D: sharding the heads then leaves each norm whole.
    """
    if node.target in _NORMS:
        if len(node.args[1]) != 1:
            return False
    elif node.target in _LAST_DIM_REDUCTIONS:
        ndim = node.args[0].meta["val"].ndim
        dims = node.args[1] if len(node.args) > 1 else None
        if not isinstance(dims, (list, tuple)) or [d % ndim for d in dims] != [ndim - 1]:
            return False
    else:
        return False
    d = node.args[0].meta["val"].shape[-1]
    cur = node.args[0]
    for _ in range(16):
        if cur.op != "call_function" or cur.target not in _HEAD_PRESERVING:
            return False
        if cur.target == aten.transpose.int:
            ndim = cur.meta["val"].ndim
            if ndim - 1 in {a % ndim for a in cur.args[1:3]}:
                return False
        if cur.target in (aten.view.default, aten.reshape.default):
            i, o = cur.args[0].meta["val"], cur.meta["val"]
            if o.ndim == i.ndim + 1 and shape_key(i.shape[:-1]) == shape_key(o.shape[:-2]):
                return size_key(o.shape[-1]) == size_key(d)
            if shape_key(i.shape[-1:]) != shape_key(o.shape[-1:]):
                return False
        cur = cur.args[0]
    return False


def _source(node: fx.Node) -> fx.Node:
    """Looks through views that only flatten leading dims (Conv1D's view(x, [-1, C]))."""
    while node.op == "call_function" and node.target in (aten.view.default, aten.reshape.default):
        node = node.args[0]
    return node


def find_pairs(gm: fx.GraphModule) -> list[Pair]:
    """Every Megatron pair in graph order."""
    pairs: list[Pair] = []
    claimed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if not is_projection(node) or node in claimed:
            continue
        pair = _grow(node)
        if pair is not None and not (set(pair.heads) | {pair.sink}) & claimed:
            pairs.append(pair)
            claimed |= set(pair.heads) | {pair.sink}
    return pairs


def _grow(start: fx.Node) -> Pair | None:
    src = _source(proj_input(start))
    heads, region, frontier, sink = [start], set(), [start], None
    while frontier:
        cur = frontier.pop()
        for user in cur.users:
            if user in region or user in heads:
                continue
            if is_projection(user):
                if proj_input(user) is not cur or sink not in (None, user):
                    return None  # used as a weight, or two different sinks
                sink = user
                continue
            if not _region_op(user) or user.op == "output":
                return None
            region.add(user)
            frontier.append(user)
            for other in tensor_args(user):
                if other in region or other in heads:
                    continue
                for proj in _projections_behind(other):
                    if _source(proj_input(proj)) is not src:
                        return None  # a different structure feeds this region
                    if proj not in heads:
                        heads.append(proj)
                        frontier.append(proj)
    if sink is None:
        return None
    pair = Pair(heads, sink, region)
    for h in heads:
        k = _fused_sections(h, region)
        if k:
            pair.fused[h] = k
    return pair


def _projections_behind(node: fx.Node, limit: int = 64) -> list[fx.Node]:
    """Projections reached walking backward from `node` through region ops (k and v behind attention)."""
    found, seen, stack = [], set(), [node]
    while stack and len(seen) < limit:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if is_projection(cur):
            found.append(cur)
        elif _region_op(cur) and not _is_hop(cur):
            stack.extend(tensor_args(cur))
    return found


def _is_hop(node: fx.Node) -> bool:
    return is_higher_order(node.target)


def _fused_sections(head: fx.Node, region: set[fx.Node]) -> int | None:
    """k if head's output reaches (through views) a split into k equal sections along its features."""
    cur = head
    while True:
        users = [u for u in cur.users if u in region]
        if len(users) != 1:
            return None
        u = users[0]
        if u.target in (aten.view.default, aten.reshape.default):
            i, o = cur.meta["val"], u.meta["val"]
            # qkv.view(B, T, 3, H, D) (then unbind or permute): k sections as a dim of their own
            if o.ndim == i.ndim + 2 and shape_key(i.shape[:-1]) == shape_key(o.shape[:-3]) \
                    and isinstance(o.shape[-3], int) and o.shape[-3] > 1:
                return o.shape[-3]
            cur = u
            continue
        if u.target in (aten.split.Tensor, aten.chunk.default):  # split(qkv, C, -1), chunk(qkv, 3, -1)
            sections = u.meta["val"]
            sizes = {size_key(s.shape[-1]) for s in sections}
            dim = u.args[2] if len(u.args) > 2 else u.kwargs.get("dim", 0)
            if len(sizes) == 1 and dim in (-1, cur.meta["val"].ndim - 1) and len(sections) > 1:
                return len(sections)
        return None


def heads_of(head: fx.Node, region: set[fx.Node]) -> list:
    """Head counts of the views (…, F) -> (…, H, D) downstream of one head projection."""
    counts, seen, frontier = [], set(), [head]
    while frontier:
        cur = frontier.pop()
        for u in cur.users:
            if u not in region or u in seen:
                continue
            seen.add(u)
            if u.target in (aten.view.default, aten.reshape.default):
                i, o = u.args[0].meta["val"], u.meta["val"]
                # (..., F) -> (..., H, D): the feature dim split into heads
                if o.ndim == i.ndim + 1 and shape_key(i.shape[:-1]) == shape_key(o.shape[:-2]):
                    counts.append(o.shape[-2])
                    continue
                # (..., k*H*D) -> (..., k, H, D): fused sections viewed at once
                if o.ndim == i.ndim + 2 and shape_key(i.shape[:-1]) == shape_key(o.shape[:-3]):
                    counts.append(o.shape[-2])
                    continue
            if u.target in (aten.split.Tensor, aten.chunk.default):
                for g in u.users:
                    frontier.append(g)
                continue
            if u.target in (aten.view.default, aten.reshape.default, aten.transpose.int, aten.permute.default,
                            operator.getitem):
                frontier.append(u)
    return counts
