"""Rules for the ops a vocab-parallel cross-entropy decomposes into (fxpar.rules.loss, .reductions, .indexing)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

import fxpar
from fxpar.ops.collectives import COLLECTIVE_OPS
from fxpar.rules import OpInfo, lookup, tensor_args
from fxpar.testing import SimWorld

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


def test_gather_along_a_sharded_dim_is_a_partial_pick():
    node = node_of(lambda x, i: torch.gather(x, 1, i), torch.randn(6, 8), torch.randint(0, 8, (6, 1)),
                   target=aten.gather.default)
    assert strategies(node, [Shard(1), R])[0] == ((Shard(1), R), P)
    # rows sharded alike pick locally; a sharded index along the picked dim has no local rule
    assert ((Shard(0), Shard(0)), Shard(0)) in strategies(node, [Shard(0), Shard(0)])
    assert all(out != P for _, out in strategies(node, [Shard(1), Shard(0)]))


def test_amax_over_a_sharded_dim_is_partial_max_only_without_gradient():
    x = torch.randn(6, 8)
    detached = node_of(lambda x: torch.amax(x.detach(), 1, keepdim=True), x, target=aten.amax.default)
    assert strategies(detached, [Shard(1)])[0] == ((Shard(1),), Partial("max"))
    # a max that carries a gradient would get none through all_reduce_max: it gathers instead
    plain = node_of(lambda x: torch.amax(x, 1, keepdim=True), x, target=aten.amax.default)
    assert all(not out.is_partial() for _, out in strategies(plain, [Shard(1)]))
    # along another dim the shard follows
    assert ((Shard(0),), Shard(0)) in strategies(plain, [Shard(0)])


def test_vocab_parallel_gather_forward_and_backward_equal_gather():
    """Each rank's masked pick sums to gather's value; its gradient lands in its own columns only."""
    torch.manual_seed(0)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 8, (5, 1))
    ref = torch.gather(x, 1, idx)
    (ref * torch.arange(1.0, 6.0, dtype=torch.float64)[:, None]).sum().backward()
    with SimWorld({"tp": 2}) as world:
        def run(rank):
            local = x.detach().chunk(2, dim=1)[rank].clone().requires_grad_()
            out = torch.ops.fxpar.vocab_parallel_gather(local, 1, idx, world.mesh_info(rank).group_names[0])
            (out * torch.arange(1.0, 6.0, dtype=torch.float64)[:, None]).sum().backward()
            return out.detach(), local.grad

        (o0, g0), (o1, g1) = world.run(run)
    torch.testing.assert_close(o0 + o1, ref.detach(), rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([g0, g1], dim=1), x.grad, rtol=0, atol=0)


def test_new_collectives_survive_dead_code_elimination():
    for op in (torch.ops.fxpar.all_reduce_max.default, torch.ops.fxpar.sp_all_gather.default):
        assert op in COLLECTIVE_OPS
        g = torch.fx.Graph()
        x = g.placeholder("x")
        args = ("g", "tp") if op is torch.ops.fxpar.all_reduce_max.default else (1, 2, "g", "tp")
        g.call_function(op, (x, *args))
        g.output(x)
        g.eliminate_dead_code()
        assert any(n.target is op for n in g.nodes), op
