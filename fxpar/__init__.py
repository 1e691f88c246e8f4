"""fxpar: turn an existing PyTorch model into a parallel program by compiling its fx graph.

    pm = fxpar.parallelize(model, mesh, example_inputs=(x,))
    loss = pm.step(x, target=y, loss_fn=loss_fn)
    print(pm.explain())
    fxpar.verify(model, pm, x, target=y, loss_fn=loss_fn)
"""

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
from fxpar.runtime import ParallelModule
from fxpar.training import clip_grad_norm_, grad_norm
from fxpar.verify import VerifyReport, verify

__all__ = [
    "parallelize",
    "verify",
    "check",
    "capture",
    "default_passes",
    "count_comms",
    "clip_grad_norm_",
    "grad_norm",
    "ParallelModule",
    "Plan",
    "TPStyle",
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
