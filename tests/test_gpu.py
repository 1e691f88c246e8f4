"""CUDA paths: the same compiled programs on GPU tensors (skipped on machines without CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import fxpar
from fxpar.testing import run_ranks
from models import MLPStack, mse

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; the CPU suite covers the logic"),
]


def _run(device_type: str) -> dict:
    torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    mesh = torch.distributed.device_mesh.init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    model = MLPStack(dim=32, hidden=64, depth=2).cuda()
    x, target = torch.randn(4, 32, device="cuda"), torch.randn(4, 32, device="cuda")
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,))
    report = fxpar.verify(model, pm, x, target=target, loss_fn=mse)
    return {"ok": report.ok, "report": str(report), "device": str(next(pm.parameters()).device)}


def test_tensor_parallel_on_nccl_world_size_1():
    (r,) = run_ranks(_run, 1, "cuda", backend="nccl")
    assert r["ok"], r["report"]
    assert r["device"].startswith("cuda")


def test_tensor_parallel_on_gloo_with_cuda_tensors():
    results = run_ranks(_run, 2, "cuda", backend="gloo")
    for r in results:
        assert r["ok"], r["report"]


def _offload(offload: bool) -> dict:
    from torch.distributed.fsdp import CPUOffloadPolicy

    torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    mesh = torch.distributed.device_mesh.init_device_mesh("cuda", (dist.get_world_size(),), mesh_dim_names=("fsdp",))
    torch.manual_seed(0)
    model = MLPStack(dim=32, hidden=64, depth=2).cuda().double()
    x, target = torch.randn(4, 32, device="cuda", dtype=torch.float64), torch.randn(4, 32, device="cuda",
                                                                                   dtype=torch.float64)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,),
                           offload_policy=CPUOffloadPolicy(pin_memory=True) if offload else None)
    loss = pm.step(x, target=target, loss_fn=mse)
    # This rank's gradient shards (both runs shard alike): full_grads() would gather the offloaded host
    # gradients over nccl, which takes CUDA tensors only.
    return {"loss": loss.cpu(), "grads": {k: p.grad.cpu() for k, p in pm.named_parameters()},
            "param_devices": {str(p.device) for p in pm.parameters()},
            "grad_devices": {str(p.grad.device) for p in pm.parameters()},
            "pinned": all(p.is_pinned() for p in pm.parameters())}


def test_cpu_offload_on_cuda_equals_no_offload():
    n = min(2, torch.cuda.device_count())
    base = run_ranks(_offload, n, False, backend="nccl")
    off = run_ranks(_offload, n, True, backend="nccl")
    for b, o in zip(base, off):
        assert o["param_devices"] == {"cpu"} and o["grad_devices"] == {"cpu"} and o["pinned"]
        assert b["param_devices"] != {"cpu"}
        assert torch.equal(b["loss"], o["loss"])
        assert b["grads"].keys() == o["grads"].keys() and b["grads"]
        for k in b["grads"]:
            torch.testing.assert_close(o["grads"][k], b["grads"][k], rtol=1e-12, atol=0)
