"""parallelize(..., compile=...): each rank's rewritten graph under torch.compile, equal to eager in float64."""

from __future__ import annotations

import pytest
import torch

import fxpar
from fxpar.testing import rank_pool
from tests.models import MLPStack, mse


def _compiled_vs_eager(shape, names, backend):
    torch.manual_seed(0)
    model = MLPStack(16, 32, 2).double()
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=names)
    x, y = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    eager = fxpar.parallelize(model, mesh, example_inputs=(x,))
    compiled = fxpar.parallelize(model, mesh, example_inputs=(x,), compile=backend)
    worst = 0.0
    for pm in (eager, compiled):
        pm.step(x, target=y, loss_fn=mse)
    for (n, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        worst = max(worst, float((a.grad - b.grad).abs().max() / a.grad.abs().max().clamp_min(1e-30)))
    out = float((eager(x) - compiled(x)).abs().max())
    report = fxpar.verify(model, compiled, x, target=y, loss_fn=mse)
    return out, worst, report.ok, compiled.compile_backend


@pytest.mark.parametrize("shape,names,backend", [((2,), ("tp",), True), ((2,), ("fsdp",), "aot_eager")],
                         ids=["tp2-inductor", "fsdp2-aot_eager"])
def test_compiled_graph_equals_eager_in_float64(shape, names, backend):
    for out, worst, ok, used in rank_pool(2).run(_compiled_vs_eager, shape, names, backend):
        assert out <= 1e-12 and worst <= 1e-10 and ok
        assert used == ("inductor" if backend is True else backend)


def test_pipelines_are_refused_with_the_way_out():
    with pytest.raises(fxpar.PlanError, match="compile=True does not run pipelines yet"):
        fxpar.plan(MLPStack(16, 32, 4), {"pp": 2}, example_inputs=(torch.randn(8, 16),))  # dry run: no compile
        fxpar.compiler.compile_model(MLPStack(16, 32, 4), None, fxpar.dryrun.dry_mesh({"pp": 2}),
                                     example_inputs=(torch.randn(8, 16),), compile=True,
                                     split_pp=fxpar.dryrun._split_pp_dry)
