"""fxpar: turn an existing PyTorch model into a parallel program by compiling its fx graph.

    pm = fxpar.parallelize(model, mesh, example_inputs=(x,))
    loss = pm.step(x, target=y, loss_fn=loss_fn)
    print(pm.explain())
    fxpar.verify(model, pm, x, target=y, loss_fn=loss_fn)

    report = fxpar.plan(model, mesh_shape={"dp": 8, "tp": 8}, example_inputs=(x,))   # dry run, no cluster
    print(report.explain()); fxpar.save_plan(report.plan, "plan.json")
"""

from fxpar.core.errors import CaptureError, FxparError, GraphInvariantError, PlanError, ScheduleError, ShardingError
from fxpar.core.mesh import MeshInfo
from fxpar.core.pass_api import Pass, PassContext, PassResult, fx_pass
from fxpar.core.plan import Plan, TPStyle
from fxpar.capture import capture
from fxpar.ops.collectives import count_comms
from fxpar.analysis.plan_io import ResolvedPlan, load_plan, save_plan
from fxpar.runtime.parallel_module import ParallelModule
from fxpar.runtime.pipeline import PipelineModule
from fxpar.runtime.training import clip_grad_norm_, grad_norm
from fxpar.compiler import PassManager, default_passes
from fxpar.api import check, parallelize
from fxpar.dryrun import DryRunReport, plan  # `fxpar.plan(...)` is the dry run; the plan types live in fxpar.core.plan
from fxpar.verify import BisectResult, VerifyReport, verify  # binds fxpar.verify to the function
from fxpar.planner import AutoPlan, Estimate, autoplan, estimate
from fxpar import checkpoint  # fxpar.checkpoint.load_hf / save_hf
from fxpar import viz  # pictures; matplotlib is imported only when a chart is drawn

__all__ = [
    "parallelize",
    "autoplan",
    "estimate",
    "AutoPlan",
    "Estimate",
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
