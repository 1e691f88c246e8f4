"""einsum (multilinear: a sharded letter shards every operand holding it) and matmul on a raw 2-D weight."""

from __future__ import annotations

import torch
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

from test_rules import node_of, strategies

aten = torch.ops.aten
R, P = Replicate(), Partial()


def test_einsum_letters():
    x, w = torch.randn(2, 5, 8), torch.randn(8, 6)
    node = node_of(lambda x, w: torch.einsum("btd,dh->bth", x, w), x, w, target=aten.einsum.default)
    assert strategies(node, [R, Shard(1)])[0] == ((R, Shard(1)), Shard(2))       # colwise: h kept
    assert strategies(node, [Shard(2), R])[0] == ((Shard(2), Shard(0)), P)       # rowwise: d summed away
    assert strategies(node, [Shard(0), R])[0] == ((Shard(0), R), Shard(0))       # batch
    assert ((P, R), P) in strategies(node, [P, R])
    assert all(out != P for _, out in strategies(node, [P, P]))  # a product of two sums is not a sum
    # an equation fxpar does not parse (ellipsis) runs replicated
    e = node_of(lambda x, w: torch.einsum("...d,dh->...h", x, w), x, w, target=aten.einsum.default)
    assert strategies(e, [R, Shard(1)]) == [((R, R), R)]


def test_matmul_on_a_raw_weight():
    x, w = torch.randn(2, 5, 8), torch.randn(8, 6)
    node = node_of(lambda x, w: x @ w, x, w, target=aten.matmul.default)
    assert strategies(node, [R, Shard(1)])[0] == ((R, Shard(1)), Shard(2))
    assert ((Shard(2), Shard(0)), P) in strategies(node, [Shard(2), Shard(0)])
    assert strategies(node, [Shard(1), R])[0] == ((Shard(1), R), Shard(1))
