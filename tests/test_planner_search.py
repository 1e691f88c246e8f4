"""The planner's searched dimensions: per-module styles (ILP on the captured graph), mixed precision
and activation checkpointing under a memory budget, and the plans they produce running exactly."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

import fxpar
from fxpar.capture import capture
from fxpar.dryrun import dry_mesh
from fxpar.planner import PROFILES, estimate_module
from fxpar.planner.solve import solve_choices, solver_available
from fxpar.planner.styles import choose_styles, replicated_modules, style_program, style_units
from fxpar.testing import rank_pool
from tests.models import BlockStack, tiny_gpt2

IDS = torch.zeros(8, 16, dtype=torch.long)
needs_scipy = pytest.mark.skipif(not solver_available(), reason="scipy is not installed here (a dependency of fxpar: "
                                                                "pip install -e .)")
# an H100 whose tp links are as slow as a CPU's gloo: sharding small modules costs more than it saves
SLOW_TP = dataclasses.replace(PROFILES["h100"], name="slow-links", intra_latency=2e-4, intra_bandwidth=1e9)


def test_style_units_are_the_megatron_pairs_and_the_lm_head():
    units = style_units(capture(tiny_gpt2(2, 32), (IDS,), None), 2)
    assert [u.modules for u in units] == [
        ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"),
        ("transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"),
        ("transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj"),
        ("transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"),
        ("lm_head",)]
    assert [u.gathers for u in units] == [False] * 4 + [True]


@needs_scipy
@pytest.mark.parametrize("left_gib", [None, 0.9, 0.6])
def test_style_ilp_equals_brute_force_on_a_graph(left_gib):
    captured = capture(tiny_gpt2(2, 32), (IDS,), None)
    units, program, left = style_program(captured, dry_mesh({"tp": 2}), SLOW_TP, budget_bytes=1e12, total_bytes=0.0)
    # replicating every unit is the fastest on slow links; a budget between the extremes forces a mix
    most = sum(max(c.memory for c in u.choices) for u in program)
    least = sum(min(c.memory for c in u.choices) for u in program)
    budget = {0: most * 2 if left_gib is None else least + left_gib * (most - least)}
    sol = solve_choices(program, None, budget)
    best = min(sum(u.choices[k].cost for u, k in zip(program, picks))
               for picks in itertools.product(range(2), repeat=len(program))
               if sum(u.choices[k].memory for u, k in zip(program, picks)) <= budget[0])
    assert sol.cost == pytest.approx(best, rel=1e-9)
    replicated = replicated_modules(units, sol)
    if left_gib is None:
        assert len(replicated) == sum(len(u.modules) for u in units)  # nothing limits: all replicated
    else:
        assert 0 < len(replicated) < sum(len(u.modules) for u in units)
        assert sol.memory[0] <= budget[0]


@needs_scipy
def test_fast_links_keep_the_megatron_plan():
    model = BlockStack(depth=2, dim=1024, hidden=4096)  # matmuls large enough to pay for NVLink all-reduces
    x = torch.randn(8, 1024, 1024)
    captured = capture(model, (x,), None)
    units, sol = choose_styles(captured, dry_mesh({"tp": 2}), PROFILES["h100"], budget_bytes=80 * 2 ** 30,
                               total_bytes=2 ** 30)
    assert units and replicated_modules(units, sol) == ()


def _run_plan(replicate):
    torch.manual_seed(0)
    model = tiny_gpt2(2, 32, dtype=torch.float64)
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    ids = torch.randint(0, 128, (8, 16))
    target = torch.randint(0, 128, (8, 16))
    plan = fxpar.Plan(tp=dict.fromkeys(replicate, "replicate"), auto_tp=True)
    pm = fxpar.parallelize(model, mesh, example_inputs=(ids,), plan=plan)
    styles = {m: str(s) for m, s in pm.plan.tp}

    def ce(out, t):
        logits = out if isinstance(out, torch.Tensor) else out.logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), t.reshape(-1))

    report = fxpar.verify(model, pm, ids, target=target, loss_fn=ce, rtol=1e-10, atol=1e-12)
    return report.ok, str(report.worst), styles


def test_a_style_ilp_plan_runs_and_verifies():
    """A plan that replicates some units (as the ILP writes it) and shards the rest, exact in float64."""
    units = style_units(capture(tiny_gpt2(2, 32, dtype=torch.float64), (IDS,), None), 2)
    replicate = (*units[0].modules, *units[3].modules)  # block 0's attention, block 1's MLP
    results = rank_pool(2).run(_run_plan, replicate, timeout=300)
    assert all(ok for ok, _, _ in results), results
    styles = results[0][2]
    assert all(styles.get(m) == "replicate" for m in replicate)
    assert styles.get(units[1].modules[0]) == "colwise" and styles.get(units[1].modules[1]) == "rowwise"


@needs_scipy
def test_autoplan_drops_a_tp_mesh_the_ilp_would_replicate_whole():
    """On slow links the ILP replicates every unit of tp2: that mesh would copy one rank's work, so it
    gets no ILP candidate (only the automatic plan's), and a data-parallel mesh wins."""
    model = tiny_gpt2(4, 64)
    ap = fxpar.autoplan(model, 2, example_inputs=(IDS,), device=SLOW_TP, mixed_precision=False)
    assert not [c for c in ap.candidates if c.replicate]
    assert "tp" not in ap.mesh_dim_names


def test_checkpointing_and_precision_are_chosen_under_a_tight_budget():
    model = BlockStack(depth=4, dim=64, hidden=256)
    x = torch.randn(8, 256, 64)
    free = fxpar.autoplan(model, 2, example_inputs=(x,), device="h100", mixed_precision=False)
    assert free.activation_checkpointing is None and free.mp_policy is None  # recompute only costs time
    # a budget below what the free choice needs, above what checkpointing needs: checkpointing wins
    tight_gib = free.predicted_memory_gib * 0.6
    tight = fxpar.autoplan(model, 2, example_inputs=(x,), device="h100", memory_gib=tight_gib, mixed_precision=False)
    assert tight.predicted_memory_gib <= tight_gib
    assert tight.activation_checkpointing is not None or tight.mesh_shape != free.mesh_shape
    # bfloat16 halves activations and doubles matmul throughput: chosen when allowed, and carried
    mp = fxpar.autoplan(model, 2, example_inputs=(x,), device="h100", memory_gib=tight_gib)
    assert mp.mp_policy is not None and mp.mp_policy.param_dtype == torch.bfloat16
    assert mp.mp_policy.reduce_dtype == torch.float32 and mp.predicted_step_s < tight.predicted_step_s
    assert "mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16" in mp.explain()
    assert "mixed precision: compute and activations in bfloat16" in mp.explain()
    kwargs = mp.parallelize_kwargs()
    assert kwargs["mp_policy"] is mp.mp_policy and kwargs["plan"] is mp.plan


def test_the_mixed_precision_estimate_matches_a_mixed_precision_compile():
    """Pricing a float32 compile as bfloat16 agrees with pricing the compile that ran apply_mixed_precision."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from fxpar.compiler import compile_model
    from fxpar.dryrun import _split_pp_dry

    model = BlockStack(depth=2, dim=64, hidden=256)
    x = torch.randn(8, 128, 64)
    mesh = {"fsdp": 2, "tp": 2}
    plain = compile_model(model, None, dry_mesh(mesh), example_inputs=(x,), check=False, split_pp=_split_pp_dry)
    mixed = compile_model(model, None, dry_mesh(mesh), example_inputs=(x,), check=False, split_pp=_split_pp_dry,
                          mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    priced = estimate_module(plain, dry_mesh(mesh), "h100", mp_dtype=torch.bfloat16)
    compiled = estimate_module(mixed, dry_mesh(mesh), "h100")
    base = estimate_module(plain, dry_mesh(mesh), "h100")
    for key in ("activations", "parameters", "optimizer"):
        # the compiled graph keeps a few float32 values (the casts of inputs and parameters)
        assert priced.breakdown[key] == pytest.approx(compiled.breakdown[key], rel=0.25), key
    assert priced.breakdown["activations"] < 0.6 * base.breakdown["activations"]
    assert priced.breakdown["compute_s"] == pytest.approx(compiled.breakdown["compute_s"], rel=0.25)
    assert priced.breakdown["compute_s"] < base.breakdown["compute_s"]


def test_pipeline_cuts_move_blocks_off_the_first_stage_under_memory():
    """1F1B's first stage keeps every microbatch's activations: a tight budget cuts it shorter."""
    from fxpar.planner.cuts import block_costs, memory_aware_cuts

    model = BlockStack(depth=4, dim=32, hidden=128)
    x = torch.randn(8, 64, 32)
    blocks = [f"blocks.{i}" for i in range(4)]
    costs = block_costs(capture(model, (x,), None), blocks)
    w, a = costs["blocks.0"][2], costs["blocks.0"][1]  # state and activation bytes of one block
    assert costs["blocks.3"][:2] == costs["blocks.0"][:2] and w > 0 and a > 0
    mesh = {"pp": 2}
    assert memory_aware_cuts(costs, blocks, mesh, microbatches=2, budget_bytes=1e12) == ["blocks.2"]  # by time
    # stage 0 holds both microbatches (w + a per block), stage 1 one (w + a / 2 per block)
    tight = 3 * (w + a / 2) * 1.01
    assert 2 * (w + a) > tight  # the time-balanced cut does not fit
    assert memory_aware_cuts(costs, blocks, mesh, microbatches=2, budget_bytes=tight) == ["blocks.1"]
    with pytest.raises(fxpar.PlanError, match="no cut of 4 units into 2 pipeline stages fits"):
        memory_aware_cuts(costs, blocks, mesh, microbatches=2, budget_bytes=3 * (w + a / 2) * 0.99)
    # the cut compiles as a plan, and the estimate's first stage holds less than the time-balanced one's
    recut = fxpar.plan(model, mesh, example_inputs=(x,), plan=fxpar.Plan(pp=["blocks.1"], schedule="1f1b",
                                                                         microbatches=2))
    balanced = fxpar.plan(model, mesh, example_inputs=(x,), plan=fxpar.Plan(schedule="1f1b", microbatches=2))
    assert estimate_module(recut.module, recut.mesh, "h100").memory_gib < \
        estimate_module(balanced.module, balanced.mesh, "h100").memory_gib
    # calibrated to the full estimate, the block model proposes the cut where the estimate fits, and
    # refuses (no compile) where no cut can
    e_bal = estimate_module(balanced.module, balanced.mesh, "h100").memory_gib
    e_cut = estimate_module(recut.module, recut.mesh, "h100").memory_gib
    assert memory_aware_cuts(costs, blocks, mesh, microbatches=2, budget_bytes=(e_bal + e_cut) / 2 * 2 ** 30,
                             calibrate_gib=e_bal) == ["blocks.1"]
    with pytest.raises(fxpar.PlanError):
        memory_aware_cuts(costs, blocks, mesh, microbatches=2, budget_bytes=0.8 * e_cut * 2 ** 30, calibrate_gib=e_bal)


def test_a_pipelines_memory_is_guessed_from_the_mesh_without_it():
    """autoplan skips compiling pipelines far over the budget by this guess: state as without pp, and the
    activations without checkpointing divided by the microbatches per stage (1F1B's first stage)."""
    from fxpar.planner.search import Candidate, _pipelined_memory

    model = BlockStack(depth=4, dim=64, hidden=256)
    x = torch.randn(8, 128, 64)
    flat, piped = {"fsdp": 4}, {"pp": 2, "fsdp": 2}
    r1 = fxpar.plan(model, flat, example_inputs=(x,))
    e1 = estimate_module(r1.module, r1.mesh, "h100")
    guess = _pipelined_memory(piped, flat, [Candidate(flat, estimate=e1)], 8)
    # 4 sequences per data rank, 2 stages: 4 microbatches, 2 in flight on the first stage
    r2 = fxpar.plan(model, piped, example_inputs=(x,), plan=fxpar.Plan(schedule="1f1b", microbatches=4))
    e2 = estimate_module(r2.module, r2.mesh, "h100")
    assert e2.memory_gib < e1.memory_gib
    assert guess == pytest.approx(e2.memory_gib, rel=0.02)  # 1927 against 1928 MiB
    assert _pipelined_memory(piped, flat, [], 8) is None  # nothing priced without pp: no guess
