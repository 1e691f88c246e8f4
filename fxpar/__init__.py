"""fxpar: turn an existing PyTorch model into a parallel program by compiling its fx graph.

    pm = fxpar.parallelize(model, mesh, example_inputs=(x,))
    loss = pm.step(x, target=y, loss_fn=loss_fn)
    print(pm.explain())
    fxpar.verify(model, pm, x, target=y, loss_fn=loss_fn)

    report = fxpar.plan(model, mesh_shape={"dp": 8, "tp": 8}, example_inputs=(x,))   # dry run, no cluster
    print(report.explain()); fxpar.save_plan(report.plan, "plan.json")
"""

import types as _types

from fxpar.api import check, default_passes, parallelize
from fxpar.capture import capture
from fxpar.collectives import count_comms
from fxpar.errors import (
    CaptureError,
    FxparError,
    GraphInvariantError,
    PlanError,
    ScheduleError,
    ShardingError,
)
from fxpar.mesh import MeshInfo
from fxpar.pass_manager import Pass, PassContext, PassManager, PassResult, fx_pass
from fxpar.plan import Plan, TPStyle
from fxpar.plan_io import ResolvedPlan, load_plan, save_plan
from fxpar.runtime import ParallelModule
from fxpar.pipeline import PipelineModule
from fxpar.training import clip_grad_norm_, grad_norm
from fxpar.verify import BisectResult, VerifyReport, verify
from fxpar.dryrun import DryRunReport
from fxpar import viz  # pictures; matplotlib is imported only when a chart is drawn
from fxpar import plan as _plan_module
from fxpar.dryrun import plan as _dry_run


class _PlanModule(_types.ModuleType):
    """`fxpar.plan` is both the module of the Plan types and, called, the dry run `fxpar.dryrun.plan`.

    `fxpar.plan(model, mesh_shape=..., example_inputs=...)` reads as the verb it
    is; `fxpar.plan.Plan` and `from fxpar.plan import ...` keep working.
    """

    def __call__(self, *args, **kwargs):
        return _dry_run(*args, **kwargs)

    __call__.__doc__ = _dry_run.__doc__


_plan_module.__class__ = _PlanModule

__all__ = [
    "parallelize",
    "plan",
    "verify",
    "BisectResult",
    "check",
    "capture",
    "default_passes",
    "count_comms",
    "clip_grad_norm_",
    "grad_norm",
    "ParallelModule",
    "PipelineModule",
    "Plan",
    "TPStyle",
    "ResolvedPlan",
    "save_plan",
    "load_plan",
    "DryRunReport",
    "MeshInfo",
    "Pass",
    "PassContext",
    "PassResult",
    "PassManager",
    "fx_pass",
    "VerifyReport",
    "FxparError",
    "PlanError",
    "CaptureError",
    "ShardingError",
    "GraphInvariantError",
    "ScheduleError",
]
