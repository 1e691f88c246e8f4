"""Rules on uneven shards (torch.chunk's rows: whole heads that do not divide tp, `unflatten_heads`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor.placement_types import Replicate, Shard

from test_rules import node_of, strategies

aten = torch.ops.aten
R = Replicate()


def test_view_keeps_an_uneven_shard_only_whole():
    x = torch.randn(2, 5, 3, 4)
    # (B, T, H, D) -> (B*T, H, D): the heads dim (3 on tp=2, uneven) is kept whole
    keep = node_of(lambda x: x.view(10, 3, 4), x, target=aten.view.default)
    assert strategies(keep, [Shard(2)])[0] == ((Shard(2),), Shard(1))
    # (B, T, H, D) -> (B, T, H*D): merged with D, a chunk of heads is no longer a chunk of the dim
    merge = node_of(lambda x: x.view(2, 5, 12), x, target=aten.view.default)
    assert strategies(merge, [Shard(2)]) == [((R,), R)]
    # an even split keeps its old rule: (B, T, 12) -> (B, T, 3, 4) at tp=3 is Shard(2)
    split = node_of(lambda x: x.view(2, 5, 3, 4), torch.randn(2, 5, 12), target=aten.view.default)
    assert strategies(split, [Shard(2)], n=3)[0] == ((Shard(2),), Shard(2))


def test_sdpa_does_not_cut_uneven_heads_of_unequal_counts():
    q, kv = torch.randn(1, 6, 4, 8), torch.randn(1, 3, 4, 8)
    node = node_of(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), q, kv, kv,
                   target=aten.scaled_dot_product_attention.default)
    # 6 q heads and 3 kv heads on 4 ranks: torch.chunk gives 2,2,2,0 and 1,1,1,0 but 3 kv heads on
    # tp=2 would be 2,1 against q's 3,3: not the kv heads of the q chunks
    assert all(out != Shard(1) for _, out in strategies(node, [Shard(1), Shard(1), Shard(1)], n=2))
    same = node_of(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), kv, kv, kv,
                   target=aten.scaled_dot_product_attention.default)
    assert strategies(same, [Shard(1), Shard(1), Shard(1)], n=2)[0][1] == Shard(1)


def test_view_merges_or_splits_an_uneven_shard_where_torch_chunk_agrees():
    # 3 kv heads repeated twice, on tp=4: chunks of 1 kv head are chunks of 2 of the 6 merged heads
    kv = torch.randn(2, 3, 2, 5, 4)
    merge = node_of(lambda x: x.view(2, 6, 5, 4), kv, target=aten.view.default)
    assert strategies(merge, [Shard(1)], n=4)[0] == ((Shard(1),), Shard(1))
    # on tp=2 they are not: 2 kv heads (4 merged) against torch.chunk's 3 of 6
    assert strategies(merge, [Shard(1)], n=2) == [((R,), R)]
    # and back: 6 heads split as (3, 2) on tp=4
    split = node_of(lambda x: x.view(2, 3, 2, 5, 4), torch.randn(2, 6, 5, 4), target=aten.view.default)
    assert strategies(split, [Shard(1)], n=4)[0] == ((Shard(1),), Shard(1))
