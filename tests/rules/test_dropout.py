"""Dropout: identical masks on replicated values, independent masks per shard."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import fxpar
from fxpar.testing import rank_pool


class DropMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 64)
        self.down = nn.Linear(64, 16)

    def forward(self, x):
        h = F.dropout(F.relu(self.up(x)), p=0.5, training=True)  # sharded: (B, 64/tp)
        return F.dropout(self.down(h), p=0.5, training=True)      # replicated: (B, 16)


def _run() -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    model = DropMLP()
    x = torch.randn(32, 16) + 3.0  # relu keeps (almost) everything: zeros come from the mask
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,))
    targets = [n.target for n in pm.graph_module.graph.nodes if n.op == "call_function"]
    torch.manual_seed(1)
    captured = {}
    hidden = next(n for n in pm.graph_module.graph.nodes
                  if n.target == torch.ops.fxpar.sharded_dropout.default)
    from torch.fx import Interpreter

    class Spy(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is hidden:
                captured["mask"] = (out[1] != 0).float()
            return out

    xg = x.clone().requires_grad_()
    out = Spy(pm.graph_module).run(xg)
    out.sum().backward()
    return {"sharded_op": torch.ops.fxpar.sharded_dropout.default in targets,
            "mask": captured["mask"], "out": out.detach(), "grad_finite": bool(torch.isfinite(xg.grad).all())}


def test_sharded_dropout_masks_are_independent_and_replicated_ones_agree():
    r0, r1 = rank_pool(2).run(_run)
    assert r0["sharded_op"] and r1["sharded_op"]
    for r in (r0, r1):
        kept = r["mask"].mean().item()
        assert 0.4 < kept < 0.6, kept  # p = 0.5 on 32 x 32 elements
        assert r["grad_finite"]
    assert not torch.equal(r0["mask"], r1["mask"])  # shards draw different masks
    assert torch.equal(r0["out"], r1["out"])  # the replicated dropout dropped the same elements everywhere
