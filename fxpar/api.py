"""The public entry points: parallelize, default_passes, check.

    capture -> annotate_parameters -> split_linear_bias -> propagate_sharding
            -> insert_collectives -> localize_shapes -> shard_parameters -> split_stages -> run

A mesh with a `pp` dim (size > 1) or a plan with `pp` runs as a pipeline: the
passes see the mesh without its pp dim (placements are per stage), the last
pass cuts this rank's graph into stages, and `fxpar.pipeline.PipelineModule`
runs them with torch's pipeline schedules.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from fxpar.capture import capture
from fxpar.errors import PlanError
from fxpar.invariants import check_module, check_ranks
from fxpar.mesh import MeshInfo
from fxpar.pass_manager import PassContext, PassManager
from fxpar.plan import Plan, as_plan
from fxpar.runtime import ParallelModule

__all__ = ["parallelize", "compile_model", "default_passes", "check"]

_SUPPORTED_DIMS = ("tp", "pp", "dp", "fsdp")


def default_passes(plan: Plan | None = None) -> list:
    """The built-in pipeline as a list users can edit and pass back through `passes=`."""
    from fxpar import passes as P

    return [
        P.shard_inputs,
        P.annotate_parameters,
        P.apply_fsdp,
        P.split_linear_bias,
        P.propagate_sharding,
        P.insert_collectives,
        P.localize_shapes,
        P.bucket_grad_sync,
        P.shard_parameters,
        P.split_stages,  # a no-op without a pipeline
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
                input_layout: str = "full", reshard_after_forward: bool = True, fsdp_unit: str = "block",
                check: bool | None = None, dump_dir: str | None = None,
                batch_norm_per_microbatch: bool = False) -> ParallelModule:
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
        input_layout: 'full' (every rank passes the same full inputs and gets the full outputs) or
            'local' (each rank passes its own slice of the batch on the dp / fsdp dims, and gets its
            slice of the outputs back).
        reshard_after_forward: with fsdp, free gathered parameters after the forward and gather
            them again in the backward (lower memory, one more all-gather per parameter).
        fsdp_unit: with fsdp, 'block' (default) gathers and reduce-scatters the parameters of one
            block (a transformer layer) in one collective each, as FSDP2 does per wrapped block;
            'param' one collective per parameter (one parameter gathered at a time).
        check: run fxpar's invariant checks after every pass (default: off, or FXPAR_CHECK=1; the
            test suite turns them on). `fxpar.check(pm)` runs them on demand.
        dump_dir: write the graph after every pass into this folder.
        batch_norm_per_microbatch: in a pipeline, accept BatchNorm in training mode computing its
            statistics per microbatch (as torch.distributed.pipelining does; logged as a warning).
            Default: a PlanError naming the module, since the unsplit model normalizes by the
            whole batch.

    Returns:
        A ParallelModule holding this rank's rewritten GraphModule.

    Raises:
        CaptureError, PlanError, ShardingError: naming the module and the fix.
    """
    if input_layout not in ("full", "local"):
        raise PlanError(f"input_layout={input_layout!r}: use 'full' (every rank passes the same full inputs) "
                        "or 'local' (each rank passes its own batch shard)")
    return compile_model(model, mesh, MeshInfo.from_device_mesh(mesh), example_inputs=example_inputs,
                         example_kwargs=example_kwargs, plan=plan, passes=passes, input_layout=input_layout,
                         reshard_after_forward=reshard_after_forward, fsdp_unit=fsdp_unit, check=check,
                         dump_dir=dump_dir, batch_norm_per_microbatch=batch_norm_per_microbatch)


def compile_model(model: nn.Module, mesh: Any, mesh_info: MeshInfo, *, example_inputs: tuple = (),
                  example_kwargs: dict | None = None, plan: Plan | dict | None = None, passes: list | None = None,
                  input_layout: str = "full", reshard_after_forward: bool = True, fsdp_unit: str = "block",
                  check: bool | None = None, dump_dir: str | None = None, split_pp: Callable | None = None,
                  progress: Callable[[str], None] | None = None,
                  batch_norm_per_microbatch: bool = False) -> ParallelModule:
    """The compile path `parallelize` and dry runs (`fxpar.dryrun.plan`) share: capture, passes, module.

    A dry run passes `mesh=None` and a `MeshInfo` built from sizes, so it
    runs exactly the passes parallelize runs; collectives are inserted on
    'dryrun:<dim>' groups and never run.

    Args:
        mesh: the torch DeviceMesh, or None for a dry run.
        mesh_info: the mesh as passes see it (with its pp dim, if any).
        split_pp: `(mesh, mesh_info) -> (spmd mesh, spmd MeshInfo, PipelineMeshInfo)` for a
            pipelined mesh (default: `fxpar.pipeline.split_pp_mesh`, which needs a DeviceMesh).
        progress: called with 'capture', then 'passes', as each long step starts.
        The others: as `parallelize`.
    """
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    plan = as_plan(plan)
    _check_mesh(mesh_info, plan)
    from fxpar.pipeline import PipelineModule, split_pp_mesh
    from fxpar.plan_io import MODEL_KEY, ModelFingerprint, check_plan_fits

    check_plan_fits(plan, model, mesh_info)  # a saved plan: the same model structure and mesh
    # A pipeline compiles each stage for the mesh without its pp dim.
    pipelined = (mesh_info.size("pp") > 1 or plan.pp is not None or plan.schedule is not None)
    spmd_mesh, spmd_info, pp_info = (split_pp or split_pp_mesh)(mesh, mesh_info) if pipelined \
        else (mesh, mesh_info, None)
    if pipelined and input_layout != "full":
        raise PlanError(f"input_layout={input_layout!r}: a pipeline takes the same full inputs on every rank "
                        "(input_layout='full')")
    if progress is not None:
        progress("capture")
    gm = capture(model, example_inputs, example_kwargs)
    gm.meta[MODEL_KEY] = ModelFingerprint.of(model)  # what a saved plan is checked against
    if progress is not None:
        progress("passes")
    options = {"input_layout": input_layout, "pp": pp_info, "fsdp_unit": fsdp_unit,
               "batch_norm_per_microbatch": batch_norm_per_microbatch}
    ctx = PassContext(mesh=spmd_info, plan=plan, device_mesh=spmd_mesh, options=options)
    manager = PassManager(passes if passes is not None else default_passes(plan), check=check, dump_dir=dump_dir)
    gm = manager.run(gm, ctx)
    if pipelined:
        return PipelineModule(gm, mesh=mesh, mesh_info=spmd_info, plan=plan, history=manager.history,
                              pp_dim=mesh_info.names.index("pp") if mesh_info.has("pp") else None,
                              example_args=example_inputs, example_kwargs=example_kwargs,
                              reshard_after_forward=reshard_after_forward)
    return ParallelModule(gm, mesh=mesh, mesh_info=mesh_info, plan=plan, history=manager.history,
                          example_args=example_inputs, example_kwargs=example_kwargs, input_layout=input_layout,
                          reshard_after_forward=reshard_after_forward)


def check(pm: ParallelModule, *, ranks: list | None = None) -> None:
    """Static checks on a ParallelModule's graph, without running collectives.

    On this rank: placements on every edge consistent with each op's rule (no
    Partial value reaches a non-linear op), local shapes consistent with global
    shapes and placements (the graph is run on FakeTensors of local shapes),
    every collective the right transition with its backward dual, every
    replicated input of a sharded op behind grad_all_reduce, parameter shards
    of the right shape. For a PipelineModule (any rank's, or a dry run's),
    also its stages: called in order, placed where torch's schedule runs them,
    agreeing on every cut, and every pp rank's sends and recvs under the
    chosen schedule, derived from torch's schedule IR and simulated, pairing
    up with the same tensors and without a deadlock (`fxpar.p2p_check`). See
    `fxpar.invariants` for the full list.

    Args:
        pm: this rank's ParallelModule.
        ranks: every rank's ParallelModule of the same mesh, in rank order, when
            one process holds them all (`fxpar.testing.SimWorld`): then the
            collective order of every group and parameter ownership are checked
            across ranks too. (Across processes the same check runs at the
            first forward, by fingerprint: `fxpar.fingerprint`.)

    Raises:
        GraphInvariantError: naming the first node that breaks an invariant, or a
            pipeline's first send or recv that does not meet its partner (the pp
            ranks, the op on each side, the likely fix).
        ScheduleError: pipeline stages called out of order, placed on another pp
            rank than the schedule's, or disagreeing on a cut's placements.
    """
    if ranks is not None:
        check_ranks(list(ranks))
        return
    check_module(pm)
