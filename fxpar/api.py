"""The public entry points: parallelize, default_passes, check.

    capture -> annotate_parameters -> split_linear_bias -> propagate_sharding
            -> insert_collectives -> localize_shapes -> shard_parameters -> run
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from fxpar.capture import capture
from fxpar.errors import PlanError
from fxpar.invariants import check_graph
from fxpar.mesh import MeshInfo
from fxpar.pass_manager import PassContext, PassManager
from fxpar.plan import Plan, as_plan
from fxpar.runtime import ParallelModule

__all__ = ["parallelize", "default_passes", "check"]

_SUPPORTED_DIMS = ("tp",)


def default_passes(plan: Plan | None = None) -> list:
    """The built-in pipeline as a list users can edit and pass back through `passes=`."""
    from fxpar import passes as P

    return [
        P.annotate_parameters,
        P.split_linear_bias,
        P.propagate_sharding,
        P.insert_collectives,
        P.localize_shapes,
        P.shard_parameters,
    ]


def _check_mesh(mesh_info: MeshInfo, plan: Plan) -> None:
    unsupported = [n for n, s in zip(mesh_info.names, mesh_info.sizes) if n not in _SUPPORTED_DIMS and s > 1]
    if unsupported:
        raise PlanError(
            f"mesh {mesh_info} has dims {unsupported} this version of fxpar does not parallelize yet "
            f"(supported: {_SUPPORTED_DIMS}); use a mesh with only {_SUPPORTED_DIMS} or size 1 on the others"
        )


def parallelize(model: nn.Module, mesh: Any, *, example_inputs: tuple = (), example_kwargs: dict | None = None,
                plan: Plan | dict | None = None, passes: list | None = None,
                input_layout: str = "full", check: bool | None = None,
                dump_dir: str | None = None) -> ParallelModule:
    """Compiles `model` for this rank of `mesh`.

    Args:
        model: the model; never modified.
        mesh: a torch DeviceMesh; dims are recognised by name (dp, fsdp, pp, tp;
            a 1-D mesh without names is tp).
        example_inputs: positional example inputs (full, as every rank passes them).
        example_kwargs: keyword example inputs.
        plan: a fxpar.Plan, a {module glob: style} dict (the tp part), or None
            to plan automatically.
        passes: the pass list (default: fxpar.default_passes()).
        input_layout: 'full' (every rank passes the same full inputs).
        check: run invariant checks after every pass (default: on; FXPAR_CHECK=0 turns off).
        dump_dir: write the graph after every pass into this folder.

    Returns:
        A ParallelModule holding this rank's rewritten GraphModule.

    Raises:
        CaptureError, PlanError, ShardingError: naming the module and the fix.
    """
    if input_layout != "full":
        raise PlanError(f"input_layout={input_layout!r}: only 'full' is supported until data parallelism lands")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    mesh_info = MeshInfo.from_device_mesh(mesh)
    plan = as_plan(plan)
    _check_mesh(mesh_info, plan)
    gm = capture(model, example_inputs, example_kwargs)
    ctx = PassContext(mesh=mesh_info, plan=plan, device_mesh=mesh, options={"input_layout": input_layout})
    manager = PassManager(passes if passes is not None else default_passes(plan), check=check, dump_dir=dump_dir)
    gm = manager.run(gm, ctx)
    return ParallelModule(gm, mesh=mesh, mesh_info=mesh_info, plan=plan, history=manager.history,
                          example_args=example_inputs, example_kwargs=example_kwargs)


def check(pm: ParallelModule) -> None:
    """Static checks on a ParallelModule's graph, without running collectives.

    Raises:
        GraphInvariantError: naming the first node that breaks an invariant.
    """
    check_graph(pm.graph_module, pm.mesh_info, frozenset({"specs", "collectives"}))
