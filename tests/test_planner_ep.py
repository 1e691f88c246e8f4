"""Expert parallelism as a searched dim: autoplan offers ep for models with experts, prices its token
all-to-alls and its expert memory, chooses it where it pays, and the plan it chooses runs exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fxpar
from fxpar.analysis.plan_io import ExpertsStyle, ResolvedPlan
from fxpar.ops.moe import moe_all_to_all_bytes, moe_experts
from fxpar.planner import PROFILES
from fxpar.testing import rank_pool
from tests.models import TitanMoEStack, mse

# Compute, not per-op overhead or link latency, dominates (as in a large MoE step): ep splits every op of
# the step by tokens, where tp splits only the experts' and projections' matmuls.
COMPUTE_BOUND = dataclasses.replace(PROFILES["h100"], name="compute-bound", peak_flops={torch.float32: 1e10},
                                    memory_bandwidth=1e10, op_overhead=0.0, intra_latency=1e-6,
                                    intra_bandwidth=1e10)
DIM, HIDDEN, EXPERTS, DEPTH = 16, 64, 8, 2


def _model() -> TitanMoEStack:
    torch.manual_seed(0)
    return TitanMoEStack(dim=DIM, hidden=HIDDEN, depth=DEPTH, num_experts=EXPERTS, top_k=1).double()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(8, 16, DIM, dtype=torch.float64), torch.randn(8, 16, DIM, dtype=torch.float64)


def test_ep_estimate_prices_the_token_exchange_and_the_expert_memory():
    model, (x, _) = _model(), _inputs()
    ep = fxpar.estimate(model, {"ep": 2}, example_inputs=(x,), device=COMPUTE_BOUND)
    dp = fxpar.estimate(model, {"dp": 2}, example_inputs=(x,), device=COMPUTE_BOUND)
    # two exchanges (dispatch, combine) per MoE layer, forward and backward, of this rank's 64 tokens
    sent = moe_all_to_all_bytes(8 * 16 // 2, 1, DIM, 8, 2)
    latency, bandwidth = COMPUTE_BOUND.link(True)
    assert ep.breakdown["ep_comm_s"] == pytest.approx(DEPTH * 2 * (2 * latency + sent / bandwidth), rel=1e-12)
    assert not dp.breakdown.get("ep_comm_s")
    # experts by index: each rank holds half of the expert weights, all of the rest
    expert = DEPTH * 3 * EXPERTS * HIDDEN * DIM * 8
    assert dp.breakdown["parameters"] - ep.breakdown["parameters"] == expert // 2
    assert "ep_comm" in ep.explain()


def _run(mesh_shape, names, kwargs):
    model, (x, y) = _model(), _inputs()
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), **kwargs)
    report = fxpar.verify(model, pm, x, target=y, loss_fn=mse, rtol=1e-10, atol=1e-13)
    ep = [n.kwargs.get("ep_size", 1) for n in pm.graph_module.graph.nodes if n.target is moe_experts]
    return report.ok, str(report.worst), ep


def test_autoplan_chooses_ep_where_it_pays_and_the_plan_runs():
    model, (x, _) = _model(), _inputs()
    dp = fxpar.estimate(model, {"dp": 2}, example_inputs=(x,), device=COMPUTE_BOUND)
    ep = fxpar.estimate(model, {"ep": 2}, example_inputs=(x,), device=COMPUTE_BOUND)
    tight = (dp.memory_gib + ep.memory_gib) / 2  # dp's whole experts do not fit, half of them do
    ap = fxpar.autoplan(model, 2, example_inputs=(x,), device=COMPUTE_BOUND, memory_gib=tight,
                        mixed_precision=False)
    assert dict(zip(ap.mesh_dim_names, ap.mesh_shape)) == {"ep": 2}, ap.explain()
    meshes = {tuple(c.mesh.items()) for c in ap.candidates}
    assert {(("ep", 2),), (("tp", 2),), (("fsdp", 2),)} <= meshes  # ep was compared with the other dims
    assert not any(c.fits for c in ap.candidates if c.mesh == {"dp": 2})
    assert ap.best.estimate.breakdown["ep_comm_s"] > 0 and ap.predicted_memory_gib <= tight
    # the plan is resolved (it used to fall back to the plan as compiled): it names the experts' placement
    assert isinstance(ap.plan, ResolvedPlan) and ap.plan.mesh == (("ep", 2),)
    assert {k: str(s) for k, s in ap.plan.tp if isinstance(s, ExpertsStyle)} == \
        {f"moes.{i}.experts": f"experts: experts by index over ep ({EXPERTS} / 2)" for i in range(DEPTH)}
    results = rank_pool(2).run(_run, ap.mesh_shape, ap.mesh_dim_names, ap.parallelize_kwargs(), timeout=300)
    for ok, worst, ep_sizes in results:
        assert ok, worst
        assert ep_sizes == [2] * DEPTH  # the experts really were split by index, tokens exchanged


def test_models_without_experts_get_no_ep_meshes():
    from tests.models import tiny_gpt2

    ap = fxpar.autoplan(tiny_gpt2(2, 32), 2, example_inputs=(torch.zeros(8, 16, dtype=torch.long),), device="h100")
    assert not any("ep" in c.mesh for c in ap.candidates)
