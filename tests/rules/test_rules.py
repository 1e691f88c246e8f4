"""The sharding rule table, op family by op family, on captured tiny functions."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

import fxpar
from fxpar.rules import OpInfo, lookup, tensor_args
from fxpar.rules.views import view_dim

aten = torch.ops.aten
R, P = Replicate(), Partial()


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def node_of(fn, *args, target):
    gm = fxpar.capture(Fn(fn), args, dynamic=False)
    return next(n for n in gm.graph.nodes if n.target == target)


def strategies(node, cur, n=2):
    op = OpInfo(node, tuple(a.meta["val"] for a in tensor_args(node)), node.meta["val"], n)
    return [(s.inputs, s.output) for s in lookup(node.target)(op, tuple(cur))]


def test_linear_strategies_are_megatrons():
    w, b = torch.randn(8, 4), torch.randn(8)
    node = node_of(lambda x, w, b: torch.nn.functional.linear(x, w, b), torch.randn(2, 3, 4), w, b,
                   target=aten.linear.default)
    got = strategies(node, [R, Shard(0), Shard(0)])
    assert got[0] == ((R, Shard(0), Shard(0)), Shard(2))
    assert got[-1] == ((R, R, R), R)
    # with a bias, row parallel is not offered (the bias would be added n times)
    assert all(out != P for _, out in strategies(node, [Shard(2), Shard(1), R]))
    nb = node_of(lambda x, w: torch.nn.functional.linear(x, w), torch.randn(2, 3, 4), w, target=aten.linear.default)
    assert ((Shard(2), Shard(1)), P) in strategies(nb, [Shard(2), Shard(1)])
    # batch-sharded input with replicated weights stays batch-sharded (data parallel)
    assert ((Shard(0), R), Shard(0)) in strategies(nb, [Shard(0), R])


def test_batch_norm_keeps_the_batch_sharded_in_eval_mode_only():
    """Eval mode normalizes each example by running statistics: dp keeps its shard (a dp x pp pipeline
    refused BatchNorm-eval models at step before: the gathered outputs were not batch-split)."""
    def bn(training):
        return lambda x, w, b, m, v: torch.nn.functional.batch_norm(x, m, v, w, b, training=training)

    args = (torch.randn(4, 3, 5), torch.randn(3), torch.randn(3), torch.zeros(3), torch.ones(3))
    ev = node_of(bn(False), *args, target=aten.batch_norm.default)
    assert strategies(ev, [Shard(0), R, R, R, R])[0] == ((Shard(0), R, R, R, R), Shard(0))
    assert strategies(ev, [Shard(2), R, R, R, R])[0] == ((Shard(2), R, R, R, R), Shard(2))
    # channels sharded: statistics per channel, parameters and running statistics sharded with them
    assert strategies(ev, [Shard(1), R, R, R, R])[0] == ((Shard(1), *[Shard(0)] * 4), Shard(1))
    tr = node_of(bn(True), *args, target=aten.batch_norm.default)
    assert strategies(tr, [Shard(0), R, R, R, R]) == [((R, R, R, R, R), R)]  # batch statistics: whole batch


def test_pointwise_broadcasting_and_linearity():
    node = node_of(lambda x, b: x + b, torch.randn(4, 6), torch.randn(6), target=aten.add.Tensor)
    s = strategies(node, [Shard(1), R])
    assert s[0] == ((Shard(1), Shard(0)), Shard(1))
    s = strategies(node, [Shard(0), R])
    assert s[0] == ((Shard(0), R), Shard(0))  # b broadcasts along dim 0: stays replicated
    # Partial + Replicate has no local rule; Partial + Partial does
    assert all(out != P for _, out in strategies(node, [P, R]))
    assert ((P, P), P) in strategies(node, [P, P])
    mul = node_of(lambda x, y: x * y, torch.randn(4, 6), torch.randn(4, 6), target=aten.mul.Tensor)
    assert ((P, R), P) in strategies(mul, [P, R])
    assert all(out != P for _, out in strategies(mul, [P, P]))
    gelu = node_of(torch.nn.functional.gelu, torch.randn(4, 6), target=aten.gelu.default)
    assert [out for _, out in strategies(gelu, [P])] == [R]
    # adding a scalar to a Partial would add it n times
    adds = node_of(lambda x: x + 1.0, torch.randn(4, 6), target=aten.add.Tensor)
    assert all(out != P for _, out in strategies(adds, [P]))


def test_view_dim_mapping():
    assert view_dim((2, 3, 8), (6, 8), 0, 2) == 0       # merge with d outermost
    assert view_dim((2, 3, 8), (6, 8), 1, 3) is None     # inner dim of a merge
    assert view_dim((2, 3, 8), (2, 3, 2, 4), 2, 2) == 2  # split, 2 % 2 == 0
    assert view_dim((2, 3, 8), (2, 3, 2, 4), 2, 4) is None
    assert view_dim((6, 8), (2, 3, 8), 0, 2) == 0
    assert view_dim((4, 6), (6, 4), 0, 2) is None


def test_view_shape_argument_is_localized(make_fake_mesh):
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16, bias=False)
            self.out = nn.Linear(16, 16, bias=False)

        def forward(self, x):
            h = self.proj(x).view(2, 5, 4, 4)  # (B, T, heads, head_dim)
            h = torch.relu(h)
            return self.out(h.view(2, 5, 16))

    mesh = make_fake_mesh((2,), ("tp",))
    pm = fxpar.parallelize(Heads(), mesh, example_inputs=(torch.randn(2, 5, 16),),
                           plan={"proj": "colwise", "out": "rowwise"})
    views = [n for n in pm.graph_module.graph.nodes if n.target == aten.view.default]
    assert [list(v.args[1]) for v in views] == [[2, 5, 2, 4], [2, 5, 8]]
    fxpar.check(pm)


def test_reductions():
    node = node_of(lambda x: x.sum(dim=1), torch.randn(4, 6), target=aten.sum.dim_IntList)
    assert ((Shard(1),), P) in strategies(node, [Shard(1)])
    assert ((Shard(0),), Shard(0)) in strategies(node, [Shard(0)])
    mean = node_of(lambda x: x.mean(dim=1), torch.randn(4, 6), target=aten.mean.dim)
    assert all(out != P for _, out in strategies(mean, [Shard(1)]))
    sm = node_of(lambda x: torch.softmax(x, dim=-1), torch.randn(4, 6), target=aten.softmax.int)
    assert strategies(sm, [Shard(1)]) == [((R,), R)]
    assert ((Shard(0),), Shard(0)) in strategies(sm, [Shard(0)])
