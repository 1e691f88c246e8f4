"""Attention variants planned automatically at tp: a fused qkv split by chunk, q/k norms over head_dim.

Each is sharded by heads (qkv / q, k, v colwise, out rowwise; the q/k norms run per head on local
heads), equal to one process in float64 (outputs, every gradient, the input gradient), with exactly
one forward all-reduce per pair (attention, MLP).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor.placement_types import Shard

import fxpar
from fxpar._torch.placements import StridedShard
from fxpar.core.spec import get_spec
from fxpar.testing import rank_pool
from models import DecomposedQKNormAttention, FusedChunkAttention, mse

MODELS = {
    "chunk": (lambda: FusedChunkAttention(), 2),  # (factory, forward all-reduces)
    "chunk_rms_norm": (lambda: FusedChunkAttention(qk_norm="rms"), 2),
    "chunk_layer_norm": (lambda: FusedChunkAttention(qk_norm="layer"), 2),
    "decomposed_qk_norm": (lambda: DecomposedQKNormAttention(), 1),
}


def _run(name: str) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    model = MODELS[name][0]().double()
    x, t = torch.randn(2, 5, 32, dtype=torch.double), torch.randn(2, 5, 32, dtype=torch.double)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,))
    fxpar.check(pm)
    report = fxpar.verify(model, pm, x, target=t, loss_fn=mse)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    mse(model(xa), t).backward()
    with fxpar.count_comms() as comms:
        mse(pm(xb), t).backward()
    placements = {str(n.target): get_spec(n).placements[0] for n in pm.graph_module.graph.nodes
                  if n.op == "get_attr" and get_spec(n) is not None}
    explain = pm.explain()
    return {"ok": report.ok, "report": str(report),
            "input_grad_err": ((xb.grad - xa.grad).abs().max() / xa.grad.abs().max()).item(),
            "fwd_all_reduce": sum(1 for c in comms if c.op == "all_reduce" and c.direction == "forward"),
            "placements": {k: str(v) for k, v in placements.items()},
            "no_fallbacks": "Fallbacks (ops without a sharding rule, run replicated): 0" in explain}


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_attention_variant_sharded_by_heads(name, tp):
    results = rank_pool(tp).run(_run, name)
    for rank, r in enumerate(results):
        assert r["ok"], f"rank {rank}:\n{r['report']}"
        assert r["input_grad_err"] <= 1e-10, f"rank {rank}: input gradient off by {r['input_grad_err']}"
        assert r["no_fallbacks"]
    r = results[0]
    assert r["fwd_all_reduce"] == MODELS[name][1]
    p = r["placements"]
    if name.startswith("chunk"):
        assert p["qkv.weight"] == str(StridedShard(0, split_factor=3)), p["qkv.weight"]  # q, k, v sections
        assert p["out.weight"] == str(Shard(1))
    else:
        assert p["q.weight"] == p["k.weight"] == p["v.weight"] == str(Shard(0))
        assert p["o.weight"] == str(Shard(1))
