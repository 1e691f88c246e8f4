"""fuse_experts: each recognised experts module becomes one moe_experts node; anything else stays as captured."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

from fxpar._torch.placements import StridedShard
from fxpar.ops.moe import moe_experts
from fxpar.rules import OpInfo, lookup, tensor_args

from models import TitanMoEStack
from pass_harness import run_upto

R, P = Replicate(), Partial()


def _moe_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is moe_experts]


def test_titan_experts_fuse_into_one_node_per_layer():
    model = TitanMoEStack(depth=2).double()
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    gm = run_upto("fuse_experts", model, (x,), {"tp": 2})
    nodes = _moe_nodes(gm)
    assert len(nodes) == 2
    for i, node in enumerate(nodes):
        xs, idx, w, gate, up, down, num_experts, act = node.args
        assert [gate.target, up.target, down.target] == [f"moes.{i}.experts.w{j}" for j in (1, 3, 2)]
        assert num_experts == 4 and act == "silu"
        assert not idx.meta["val"].is_floating_point() and tuple(w.meta["val"].shape) == tuple(idx.meta["val"].shape)
    # the per-expert loop is gone: no matmul on expert weights remains
    assert not [n for n in gm.graph.nodes if n.target == torch.ops.aten.matmul.default]
    # the result is used, so dead-code elimination keeps it
    gm.graph.eliminate_dead_code()
    assert len(_moe_nodes(gm)) == 2
    # and it computes what the module did
    gm.recompile()
    torch.testing.assert_close(gm(x), model(x), rtol=1e-12, atol=1e-12)


class BiasedExperts(nn.Module):
    """Experts with a bias the fused node does not compute: must stay as captured."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 8, 16))
        self.w2 = nn.Parameter(torch.randn(4, 16, 8))
        self.w3 = nn.Parameter(torch.randn(4, 8, 16))
        self.b = nn.Parameter(torch.randn(16))

    def forward(self, x):
        idx = x[:, :2].abs().long() % 4
        out = torch.zeros_like(x)
        for e in range(4):
            coef = (idx == e).to(x.dtype).sum(-1, keepdim=True)
            out = out + coef * ((torch.nn.functional.silu(x @ self.w1[e].t()) * (x @ self.w3[e].t())) @ self.w2[e].t())
        return out + self.b


def test_unrecognised_experts_stay_as_captured():
    gm = run_upto("fuse_experts", BiasedExperts(), (torch.randn(6, 16),), {"tp": 2})
    assert not _moe_nodes(gm)


def test_moe_rule_strategies():
    model = TitanMoEStack(depth=1).double()
    gm = run_upto("fuse_experts", model, (torch.randn(2, 4, 16, dtype=torch.float64),), {"tp": 2})
    node = _moe_nodes(gm)[0]
    op = OpInfo(node, tuple(a.meta["val"] for a in tensor_args(node)), node.meta["val"], 2)
    rule = lookup(moe_experts)
    # experts by index (ep): tokens split, the exchange inside the node
    got = rule(op, (Shard(0), Shard(0), Shard(0), Shard(0), Shard(0), Shard(0)))
    assert got[0].inputs == (Shard(0),) * 6 and got[0].output == Shard(0)
    # each expert column / row parallel (tp): replicated tokens, partial output
    got = rule(op, (R, R, R, Shard(1), Shard(1), Shard(2)))
    assert got[0].inputs == (R, R, R, Shard(1), Shard(1), Shard(2)) and got[0].output == P
    # a fused [gate; up] weight is split section by section
    fused = rule(OpInfo(node, op.in_vals[:3] + (op.in_vals[3], op.in_vals[5]), op.out_val, 2),
                 (R, R, R, StridedShard(1, split_factor=2), Shard(2)))
    assert fused[0].output == P
    # tokens split over a data dim, experts replicated there
    got = rule(op, (Shard(0), Shard(0), Shard(0), R, R, R))
    assert got[0].inputs == (Shard(0), Shard(0), Shard(0), R, R, R) and got[0].output == Shard(0)
