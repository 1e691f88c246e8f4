"""Random cases on real gloo ranks: the simulator's verdicts hold there, and pipelines get random cases too.

Drawn in the driver (ranks drawing their own examples would issue different
collectives and hang), sent to a warm gloo pool, compiled there by the public
`fxpar.parallelize` on a real DeviceMesh, checked statically and verified in
float64. Meshes include pp (pipelines need real ranks: their transfers are
process-group sends and receives the simulator does not carry).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings

import fxpar
from fxpar.testing import rank_pool
from fxpar.testing.strategies import build_model, cases, make_inputs

EXAMPLES = int(os.environ.get("FXPAR_GLOO_EXAMPLES", "6"))


def _mse(out, target):
    return ((out - target) ** 2).mean()


def _run(case) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    names, sizes = zip(*case.mesh)
    mesh = init_device_mesh("cpu", sizes, mesh_dim_names=names)
    model = build_model(case.model, seed=case.seed)
    x, target = make_inputs(case)
    try:
        pm = fxpar.parallelize(model, mesh, example_inputs=(x,), plan=case.fxpar_plan())
    except fxpar.ShardingError as e:
        return {"error": str(e)}
    fxpar.check(pm)
    report = fxpar.verify(model, pm, x, target=target, loss_fn=_mse, rtol=1e-10)
    return {"ok": report.ok, "report": str(report)}


@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
@given(cases(mesh_dims=("tp", "dp", "fsdp", "pp"), max_world=4, max_blocks=3))
def test_random_cases_on_real_gloo_ranks(case):
    _check_on_gloo(case)


@pytest.mark.slow  # CI's slow run
@settings(max_examples=int(os.environ.get("FXPAR_GLOO_SLOW_EXAMPLES", "60")), suppress_health_check=[HealthCheck.too_slow])
@given(cases(mesh_dims=("tp", "dp", "fsdp", "pp"), max_world=8, max_blocks=4))
def test_more_random_cases_on_real_gloo_ranks(case):
    _check_on_gloo(case)


def _check_on_gloo(case):
    world = 1
    for _, s in case.mesh:
        world *= s
    results = rank_pool(world).run(_run, case, timeout=120)
    for rank, r in enumerate(results):
        if case.expected_error:
            assert case.expected_error in r.get("error", ""), (case, r)
        else:
            assert "error" not in r and r["ok"], f"rank {rank} {case}:\n{r}"
