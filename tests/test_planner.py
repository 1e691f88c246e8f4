"""The planner: estimates read from compiled graphs, and autoplan's choice, which must run and verify."""

from __future__ import annotations

import math

import pytest
import torch

import fxpar
from fxpar.planner import PROFILES, DeviceProfile, estimate_module
from fxpar.testing import rank_pool
from tests.models import BlockStack, tiny_gpt2

IDS = torch.zeros(8, 16, dtype=torch.long)


def test_estimate_terms_follow_the_mesh():
    model = tiny_gpt2(4, 64)
    tp = fxpar.estimate(model, (2,), ("tp",), example_inputs=(IDS,), device="h100")
    fsdp = fxpar.estimate(model, {"fsdp": 2}, example_inputs=(IDS,), device="h100")
    dp = fxpar.estimate(model, {"dp": 2}, example_inputs=(IDS,), device="h100")
    pp = fxpar.estimate(model, {"pp": 2}, example_inputs=(IDS,), device="h100")
    assert tp.breakdown["tp_comm_s"] > 0 and not fsdp.breakdown["tp_comm_s"]
    assert fsdp.breakdown["fsdp_exposed_s"] > 0
    # tensor parallel halves the matmul work; the data dims halve the batch: both about halve compute
    assert tp.breakdown["compute_s"] < dp.breakdown["compute_s"] * 1.2
    # parameters: tp and fsdp shard them, dp does not
    assert fsdp.breakdown["parameters"] < 0.6 * dp.breakdown["parameters"]
    assert pp.breakdown["bubble"] == pytest.approx(1 / 3)  # 1f1b, 2 stages, 2 microbatches: (p-1)/(m+p-1)
    for e in (tp, fsdp, dp, pp):
        assert e.step_s > 0 and e.memory_gib > 0 and "step" in e.explain()


def test_estimate_memory_is_the_memory_model_plus_activations():
    model = tiny_gpt2(2, 32)
    report = fxpar.plan(model, {"fsdp": 2, "tp": 2}, example_inputs=(IDS,))
    est = estimate_module(report.module, report.mesh, "h100")
    (mem,) = report.memory()
    b = est.breakdown
    assert (b["parameters"], b["gradients"], b["optimizer"]) == (mem.parameters, mem.gradients, mem.optimizer)
    assert est.memory_gib * 2 ** 30 == pytest.approx(mem.total + b["activations"])


def test_checkpointing_trades_activations_for_recompute():
    model = BlockStack(depth=4, dim=32, hidden=128)
    x = torch.randn(8, 64, 32)
    report = fxpar.plan(model, {"dp": 2}, example_inputs=(x,))
    none, sel, full = (estimate_module(report.module, report.mesh, "h100", activation_checkpointing=ac)
                       for ac in (None, "selective", "full"))
    assert full.breakdown["activations"] < sel.breakdown["activations"] < none.breakdown["activations"]
    assert 0 == none.breakdown["recompute_s"] < sel.breakdown["recompute_s"] < full.breakdown["recompute_s"]


def test_the_links_inside_a_node_are_faster():
    model = tiny_gpt2(2, 32)
    slow = DeviceProfile("two-per-node", PROFILES["h100"].peak_flops, devices_per_node=1,
                         intra_bandwidth=450e9, inter_bandwidth=50e9)
    fast = PROFILES["h100"]
    a = fxpar.estimate(model, {"tp": 2}, example_inputs=(IDS,), device=fast)
    b = fxpar.estimate(model, {"tp": 2}, example_inputs=(IDS,), device=slow)
    assert b.breakdown["tp_comm_s"] > 2 * a.breakdown["tp_comm_s"]


def test_autoplan_compares_every_mesh_and_explains_the_winner():
    model = tiny_gpt2(4, 64)
    ap = fxpar.autoplan(model, 4, example_inputs=(IDS,), device="h100")
    shapes = {(c.mesh.get("tp", 1), c.mesh.get("pp", 1)) for c in ap.candidates}
    assert {(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)} <= shapes  # every (tp, pp) of 4 devices
    assert (1, 4) not in shapes  # 4 blocks: two or more per stage
    winner = (ap.best.mesh.get("tp", 1), ap.best.mesh.get("pp", 1))
    splits = {tuple(sorted(c.mesh.items())) for c in ap.candidates
              if (c.mesh.get("tp", 1), c.mesh.get("pp", 1)) == winner}
    assert len(splits) >= min(2, 4 // (winner[0] * winner[1]))  # the winner's data splits were compared
    fits = [c for c in ap.candidates if c.fits]
    assert ap.predicted_step_s == min(c.estimate.step_s for c in fits)
    assert math.prod(ap.mesh_shape) == 4 and ap.predicted_memory_gib <= ap.memory_budget_gib
    text = ap.explain()
    assert "chosen:" in text and "runner-up" in text
    # the dry run takes the AutoPlan as it is
    report = fxpar.plan(model, ap, example_inputs=(IDS,))
    assert dict(zip(report.mesh.names, report.mesh.sizes)) == dict(zip(ap.mesh_dim_names, ap.mesh_shape))


def test_a_budget_nothing_fits_is_refused_with_the_closest():
    with pytest.raises(fxpar.PlanError, match="no plan of 2 devices fits .* closest"):
        fxpar.autoplan(tiny_gpt2(2, 32), 2, example_inputs=(IDS,), device="h100", memory_gib=1e-6)


def _run_chosen(mesh_shape, names, plan):
    torch.manual_seed(0)
    model = tiny_gpt2(2, 32, dtype=torch.float64)
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    ids = torch.randint(0, 128, (8, 16))
    target = torch.randint(0, 128, (8, 16))
    pm = fxpar.parallelize(model, mesh, example_inputs=(ids,), plan=plan)

    def ce(out, t):
        logits = out if isinstance(out, torch.Tensor) else out.logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), t.reshape(-1))

    report = fxpar.verify(model, pm, ids, target=target, loss_fn=ce)
    return report.ok, report.worst


@pytest.mark.parametrize("world", [2, 4])
def test_the_chosen_plan_runs_and_verifies(world):
    model = tiny_gpt2(2, 32, dtype=torch.float64)
    ap = fxpar.autoplan(model, world, example_inputs=(torch.zeros(8, 16, dtype=torch.long),), device="h100")
    results = rank_pool(world).run(_run_chosen, ap.mesh_shape, ap.mesh_dim_names, ap.plan, timeout=300)
    assert all(ok for ok, _ in results), results


def test_local_device_is_measured():
    from fxpar.planner import measure_local

    local = measure_local(seconds=0.2)
    assert local.flops(torch.float32) > 1e8 and local.memory_bandwidth > 1e8
    assert 0 < local.intra_latency < 1.0 and local.intra_bandwidth > 1e6


def test_unknown_device_names_the_known_ones():
    with pytest.raises(fxpar.PlanError, match="h100"):
        fxpar.estimate(tiny_gpt2(2, 32), {"tp": 2}, example_inputs=(IDS,), device="tpu9")


@pytest.mark.slow
def test_llama3_8b_on_64_h100_plan_fits_and_beats_the_hand_plans():
    """Llama-3 8B (meta, bf16, 8,192-token sequences, one per device) on 64 H100s: within 80 GiB, and no
    slower than torchtitan's hand plans (fsdp64; fsdp8 x tp8) as estimated. How long planning takes is
    measured in benchmarks/planner_speed.py (PLANNER_SPEED.md), not asserted here."""
    from examples.llama_dryrun import llama3_8b

    model, args = llama3_8b()
    ap = fxpar.autoplan(model, 64, example_inputs=args, device="h100", memory_gib=80)
    assert ap.predicted_memory_gib <= 80
    for mesh in ({"fsdp": 64}, {"fsdp": 8, "tp": 8}):
        hand = [c.estimate.step_s for c in ap.candidates if c.mesh == mesh and c.estimate and c.fits]
        assert all(ap.predicted_step_s <= s for s in hand)


def test_command_line_plans_and_saves(tmp_path, capsys):
    from pathlib import Path

    from fxpar.cli import main

    example = Path(__file__).resolve().parents[1] / "examples" / "gpt2_dryrun.py"
    out = tmp_path / "plan.json"
    assert main(["plan", "--auto", "--world", "2", "--device", "h100", f"{example}:gpt2_tiny",
                 "--save-plan", str(out)]) == 0
    text = capsys.readouterr().out
    assert "chosen:" in text and "mesh: " in text
    assert fxpar.load_plan(out, any_mesh=True) is not None
