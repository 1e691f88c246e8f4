"""Rules for convolutional nets: conv1d / conv2d, batch_norm, pooling, BatchNorm's in-place counter."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

from test_rules import node_of, strategies

aten = torch.ops.aten
R, P = Replicate(), Partial()


def test_conv2d_strategies_are_megatrons_over_channels():
    w = torch.randn(8, 4, 3, 3)
    nb = node_of(lambda x, w: F.conv2d(x, w, padding=1), torch.randn(2, 4, 5, 5), w, target=aten.conv2d.default)
    # output channels (colwise), input channels (rowwise -> Partial), batch (dp), Partial in x, replicated
    assert strategies(nb, [R, Shard(0)])[0] == ((R, Shard(0)), Shard(1))
    assert ((Shard(1), Shard(1)), P) in strategies(nb, [Shard(1), Shard(1)])
    assert ((Shard(0), R), Shard(0)) in strategies(nb, [Shard(0), R])
    assert ((P, R), P) in strategies(nb, [P, R])
    assert strategies(nb, [R, R]) == [((R, R), R)]
    # with a bias, input-channel sharding is not offered (split_linear_bias adds it after the reduce)
    b = torch.randn(8)
    wb = node_of(lambda x, w, b: F.conv2d(x, w, b), torch.randn(2, 4, 5, 5), w, b, target=aten.conv2d.default)
    assert strategies(wb, [R, Shard(0), Shard(0)])[0] == ((R, Shard(0), Shard(0)), Shard(1))
    assert all(out != P for _, out in strategies(wb, [Shard(1), Shard(1), R]))


def test_conv1d_unbatched_and_grouped():
    w = torch.randn(6, 4, 3)
    un = node_of(lambda x, w: F.conv1d(x, w), torch.randn(4, 9), w, target=aten.conv1d.default)
    assert strategies(un, [R, Shard(0)])[0] == ((R, Shard(0)), Shard(0))  # channels are dim 0
    assert ((Shard(0), Shard(1)), P) in strategies(un, [Shard(0), Shard(1)])
    # a grouped conv mixes channels within groups: sharded by whole groups where they divide, no
    # input- or output-channel split across groups
    g = node_of(lambda x, w: F.conv1d(x, w, groups=2), torch.randn(2, 4, 9), torch.randn(6, 2, 3),
                target=aten.conv1d.default)
    assert strategies(g, [R, Shard(0)]) == [((Shard(1), Shard(0)), Shard(1)), ((R, R), R)]
    assert strategies(g, [Shard(1), R])[0] == ((Shard(1), Shard(0)), Shard(1))
    assert strategies(g, [R, Shard(0)], n=4) == [((R, R), R)]  # 2 groups on 4 ranks
    assert all(out != P for _, out in strategies(g, [Shard(1), Shard(1)]))
    assert strategies(g, [Shard(0), R])[0] == ((Shard(0), R), Shard(0))


def test_depthwise_conv_localizes_its_groups():
    """A depthwise conv sharded by groups runs groups / n on each rank (the localize step)."""
    from types import SimpleNamespace

    from fxpar.rules.registry import lookup_localize

    dw = node_of(lambda x, w, b: F.conv2d(x, w, b, padding=1, groups=8), torch.randn(2, 8, 5, 5),
                 torch.randn(8, 1, 3, 3), torch.randn(8), target=aten.conv2d.default)
    info = SimpleNamespace(input_placements=((Shard(1),), (Shard(0),), (Shard(0),)))
    lookup_localize(aten.conv2d.default)(dw, info, SimpleNamespace(sizes=(4,)))
    assert dw.args[6] == 2 and dw.args[4] == [1, 1] and not dw.kwargs


def test_batch_norm_channels_and_batch():
    x, w, b, rm, rv = torch.randn(4, 6, 3, 3), torch.randn(6), torch.randn(6), torch.zeros(6), torch.ones(6)

    def node(training):
        return node_of(lambda x, w, b, rm, rv: F.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training),
                       x, w, b, rm, rv, target=aten.batch_norm.default)

    ev = node(False)
    assert strategies(ev, [Shard(1), Shard(0), Shard(0), Shard(0), Shard(0)])[0] == \
        ((Shard(1), Shard(0), Shard(0), Shard(0), Shard(0)), Shard(1))
    # eval normalizes with running statistics: rows are independent, the batch stays sharded
    assert ((Shard(0), R, R, R, R), Shard(0)) in strategies(ev, [Shard(0), R, R, R, R])
    tr = node(True)
    # training: batch statistics need the whole batch (gathered), channels still shard
    assert all(out != Shard(0) for _, out in strategies(tr, [Shard(0), R, R, R, R]))
    assert strategies(tr, [R, Shard(0), Shard(0), Shard(0), Shard(0)])[0][1] == Shard(1)
    # ... but only where the running statistics are sharded themselves (their in-place update)
    assert all(out != Shard(1) for _, out in strategies(tr, [Shard(1), Shard(0), Shard(0), R, R]))
    # without affine parameters or running statistics
    bare = node_of(lambda x: F.batch_norm(x, None, None, training=True), x, target=aten.batch_norm.default)
    assert strategies(bare, [Shard(1)])[0] == ((Shard(1),), Shard(1))


def test_pooling_keeps_leading_dims():
    x = torch.randn(2, 4, 6, 6)
    mp = node_of(lambda x: F.max_pool2d(x, 2), x, target=aten.max_pool2d.default)
    assert strategies(mp, [Shard(1)])[0] == ((Shard(1),), Shard(1))
    assert strategies(mp, [Shard(0)])[0] == ((Shard(0),), Shard(0))
    assert all(out != Shard(2) for _, out in strategies(mp, [Shard(2)]))  # a spatial dim is pooled over
    assert all(out != P for _, out in strategies(mp, [P]))  # max is not linear
    ap = node_of(lambda x: F.adaptive_avg_pool2d(x, 1), x, target=aten.adaptive_avg_pool2d.default)
    assert ((P,), P) in strategies(ap, [P])  # averaging is
    assert strategies(ap, [Shard(1)])[0] == ((Shard(1),), Shard(1))
    a1 = node_of(lambda x: F.avg_pool1d(x, 2), torch.randn(2, 4, 6), target=aten.avg_pool1d.default)
    assert strategies(a1, [Shard(1)])[0] == ((Shard(1),), Shard(1))
    am = node_of(lambda x: F.adaptive_max_pool2d(x, 1, return_indices=True)[0], x,
                 target=aten.adaptive_max_pool2d.default)
    assert strategies(am, [Shard(1)])[0] == ((Shard(1),), (Shard(1), Shard(1)))  # values and indices


def test_inplace_add_keeps_self_placement():
    node = node_of(lambda x: x.clone().add_(1), torch.randn(4, 6), target=aten.add_.Tensor)
    assert strategies(node, [Shard(1)])[0] == ((Shard(1),), Shard(1))
    assert all(out != P for _, out in strategies(node, [P]))
