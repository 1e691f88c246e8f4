"""Training utilities over shards: the global gradient norm and clipping equal the unsplit model's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fxpar
from fxpar.testing import rank_pool

from tests.models import tiny_gpt2

transformers = pytest.importorskip("transformers")


def ce(out, target):
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


def _norms(shape, names, plan_kwargs) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=names)
    torch.manual_seed(0)
    model = tiny_gpt2(dtype=torch.float64)
    ids, target = torch.randint(0, 128, (4, 8)), torch.randint(0, 128, (4, 8))
    plan = fxpar.Plan(auto_tp=True, **plan_kwargs)
    pm = fxpar.parallelize(model, mesh, example_inputs=(ids,), plan=plan)
    pm.step(ids, target=target, loss_fn=ce)
    got = {p: fxpar.grad_norm(pm, p).item() for p in (2.0, float("inf"))}
    clipped = fxpar.clip_grad_norm_(pm, 0.1).item()
    after = fxpar.grad_norm(pm).item()
    ref = copy.deepcopy(model)
    ce(ref(ids), target).backward()
    want = {p: torch.nn.utils.get_total_norm([q.grad for q in ref.parameters()], p).item() for p in (2.0, float("inf"))}
    return {"got": got, "want": want, "clipped": clipped, "after": after}


@pytest.mark.parametrize("shape,names,plan_kwargs", [
    ((2, 2), ("dp", "tp"), {}),
    ((2, 2), ("pp", "tp"), {"schedule": "1f1b", "microbatches": 2}),
], ids=["dp2xtp2", "pp2xtp2"])
def test_global_grad_norm_and_clipping(shape, names, plan_kwargs):
    for r in rank_pool(4).run(_norms, shape, names, plan_kwargs, timeout=240):
        for p in r["want"]:
            assert abs(r["got"][p] - r["want"][p]) <= 1e-10 * r["want"][p], r
        assert abs(r["clipped"] - r["want"][2.0]) <= 1e-10 * r["want"][2.0]
        assert abs(r["after"] - 0.1) < 1e-6, r
