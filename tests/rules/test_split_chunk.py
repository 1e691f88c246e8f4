"""chunk and unbind: sections keep the shard of every other dim; a fused projection's strided shard splits."""

from __future__ import annotations

import torch
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

from fxpar._torch.placements import StridedShard
from test_rules import node_of, strategies

aten = torch.ops.aten
R, P = Replicate(), Partial()


def test_chunk_follows_other_dims_and_strided_sections():
    node = node_of(lambda x: x.chunk(3, dim=-1)[0] * 1, torch.randn(2, 5, 12), target=aten.chunk.default)
    three = (Shard(0), Shard(0), Shard(0))
    assert ((Shard(0),), three) in strategies(node, [Shard(0)])
    assert all(out[0] != Shard(2) for _, out in strategies(node, [Shard(2)]))  # the chunked dim itself
    # q, k, v sections of a fused projection sharded section by section: each section Shard(2)
    strided = StridedShard(2, split_factor=3)
    assert strategies(node, [strided])[0] == ((strided,), (Shard(2), Shard(2), Shard(2)))
    assert ((P,), (P, P, P)) in strategies(node, [P])


def test_unbind_drops_its_dim():
    node = node_of(lambda x: x.unbind(2)[0] * 1, torch.randn(2, 5, 3, 4, 8), target=aten.unbind.int)
    assert strategies(node, [Shard(3)])[0] == ((Shard(3),), (Shard(2), Shard(2), Shard(2)))
    assert strategies(node, [Shard(0)])[0] == ((Shard(0),), (Shard(0), Shard(0), Shard(0)))
    assert all(out[0] != Shard(2) for _, out in strategies(node, [Shard(2)]))
    assert ((P,), (P, P, P)) in strategies(node, [P])
