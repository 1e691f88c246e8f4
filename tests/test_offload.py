"""CPU offload with FSDP2's CPUOffloadPolicy: shards, gradients and optimizer state on the host.

On this CPU-only machine the mesh device is the CPU, so the copies are host-to-host: these tests
check the graph (one copy per trainable parameter, before its FSDP gather), the placement of
parameters, gradients and optimizer state, gradients equal to no offload in float64, and the memory
report. tests/test_gpu.py runs the same step on CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.fsdp import CPUOffloadPolicy

import fxpar
from fxpar.core.errors import PlanError
from fxpar.testing import rank_pool

from tests.models import tiny_gpt2

transformers = pytest.importorskip("transformers")

aten = torch.ops.aten
GATHER = torch.ops.fxpar.fsdp_all_gather.default


def ce(out, target):
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


def test_graph_copies_each_shard_before_its_gather():
    model = tiny_gpt2(n_layer=2, n_embd=32)
    ids = torch.randint(0, 128, (4, 16))
    report = fxpar.plan(model, {"fsdp": 2}, example_inputs=(ids,), offload_policy=CPUOffloadPolicy(pin_memory=False))
    gm = report.graph_module
    copies = [n for n in gm.graph.nodes if n.op == "call_function" and n.name.startswith("h2d_")]
    params = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.users and n.meta["val"].requires_grad}
    assert copies and {c.args[0].target for c in copies} == params
    for c in copies:
        assert c.target is aten._to_copy.default and c.kwargs["device"] == c.args[0].meta["val"].device
        assert list(c.args[0].users) == [c]  # nothing reads the host shard but its copy
    gathers = [n for n in gm.graph.nodes if n.target is GATHER]
    assert gathers and all(g.args[0].name.startswith("h2d_") for g in gathers)
    gm.graph.eliminate_dead_code()
    assert len([n for n in gm.graph.nodes if n.name.startswith("h2d_")]) == len(copies)
    memory = report.memory()[0]
    assert memory.offload and memory.host == memory.parameters + memory.gradients + memory.optimizer
    assert memory.device_peak < memory.peak
    text = report.explain()
    assert "CPU offload: host" in text and "device peak" in text


def test_offload_with_dp_or_pp_is_refused():
    model = tiny_gpt2(n_layer=2, n_embd=32)
    ids = torch.randint(0, 128, (4, 16))
    with pytest.raises(PlanError, match="fsdp instead of dp"):
        fxpar.plan(model, {"dp": 2}, example_inputs=(ids,), offload_policy=CPUOffloadPolicy())
    with pytest.raises(PlanError, match="pipeline"):
        fxpar.plan(model, {"pp": 2}, example_inputs=(ids,), offload_policy=CPUOffloadPolicy())


def _offload_step(shape, names) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=names)
    torch.manual_seed(0)
    model = tiny_gpt2(n_layer=2, n_embd=32, dtype=torch.float64)
    ids, target = torch.randint(0, 128, (4, 16)), torch.randint(0, 128, (4, 16))
    out = {}
    for policy in (None, CPUOffloadPolicy(pin_memory=True)):
        pm = fxpar.parallelize(model, mesh, example_inputs=(ids,), offload_policy=policy)
        loss = pm.step(ids, target=target, loss_fn=ce)
        opt = torch.optim.AdamW(pm.parameters())
        opt.step()
        out[policy is not None] = {
            "loss": loss, "grads": pm.full_grads(),
            "devices": {str(p.device) for p in pm.parameters()} | {str(p.grad.device) for p in pm.parameters()}
            | {str(v.device) for s in opt.state.values() for k, v in s.items() if k != "step"},
            "after": pm.full_state_dict(),
            "copies": sum(n.name.startswith("h2d_") for n in pm.graph_module.graph.nodes),
        }
    base, off = out[False], out[True]
    return {
        "loss_equal": torch.equal(base["loss"], off["loss"]),
        "grads_equal": base["grads"].keys() == off["grads"].keys()
        and all(torch.equal(base["grads"][k], off["grads"][k]) for k in base["grads"]),
        "step_equal": all(torch.equal(base["after"][k], off["after"][k]) for k in base["after"]),
        "devices": off["devices"], "copies": off["copies"], "base_copies": base["copies"],
    }


@pytest.mark.parametrize("shape,names", [((2,), ("fsdp",)), ((2,), ("tp",))], ids=["fsdp2", "tp2"])
def test_offload_gradients_and_step_equal_no_offload_float64(shape, names):
    for r in rank_pool(2).run(_offload_step, shape, names, timeout=300):
        assert r["loss_equal"] and r["grads_equal"] and r["step_equal"], r
        assert r["devices"] == {"cpu"}
        assert r["copies"] > 0 and r["base_copies"] == 0
