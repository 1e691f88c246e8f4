"""Matmuls on raw nn.Parameters of a custom module (`x @ self.w`, `torch.einsum`, `F.linear(x, self.w)`),
planned automatically: each parameter takes the part its projection plays (colwise up, rowwise down,
the raw bias with its features), though both live in one module. Equal to one process in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor.placement_types import Shard

import fxpar
from fxpar.core.spec import get_spec
from fxpar.testing import rank_pool
from models import RawParamStack, mse

MESHES = {"tp2": ((2,), ("tp",)), "dp2xtp2": ((2, 2), ("dp", "tp"))}


def _run(kind: str, dims, names) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", dims, mesh_dim_names=names)
    torch.manual_seed(0)
    model = RawParamStack(kind).double()
    x, t = torch.randn(4, 5, 16, dtype=torch.double), torch.randn(4, 5, 16, dtype=torch.double)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,))
    fxpar.check(pm)
    report = fxpar.verify(model, pm, x, target=t, loss_fn=mse)
    with fxpar.count_comms() as comms:
        mse(pm(x), t).backward()
    tp = names.index("tp")
    placements = {str(n.target): str(get_spec(n).placements[tp]) for n in pm.graph_module.graph.nodes
                  if n.op == "get_attr" and get_spec(n) is not None}
    return {"ok": report.ok, "report": str(report), "placements": placements, "explain": pm.explain(),
            "fwd_tp_all_reduce": sum(1 for c in comms if c.op == "all_reduce" and c.direction == "forward")}


@pytest.mark.parametrize("mesh", sorted(MESHES))
@pytest.mark.parametrize("kind", ["matmul", "einsum", "linear"])
def test_raw_parameter_pairs_are_sharded(kind, mesh):
    dims, names = MESHES[mesh]
    results = rank_pool(math.prod(dims)).run(_run, kind, dims, names)
    for rank, r in enumerate(results):
        assert r["ok"], f"rank {rank}:\n{r['report']}"
    r = results[0]
    up, down = (str(Shard(0)), str(Shard(1))) if kind == "linear" else (str(Shard(1)), str(Shard(0)))
    for b in range(2):
        p = {k.rpartition(".")[2]: v for k, v in r["placements"].items() if k.startswith(f"blocks.{b}.")}
        assert p == {"w_up": up, "w_down": down, "b_up": str(Shard(0))}, p
    assert r["fwd_tp_all_reduce"] == 2  # one per block
    assert "w_up colwise, w_down rowwise" in r["explain"]
    assert "Fallbacks (ops without a sharding rule, run replicated): 0" in r["explain"]
