"""The compile path: capture, the pass pipeline, and the runtime module that runs the result.

    capture -> shard_inputs -> annotate_parameters -> apply_fsdp -> split_linear_bias
            -> decompose_loss -> propagate_sharding -> insert_collectives -> apply_mixed_precision -> localize_shapes -> bucket_grad_sync
            -> shard_parameters -> schedule_overlap -> split_stages -> ParallelModule / PipelineModule

`parallelize` (real process groups) and dry runs (`fxpar.plan`, sizes only)
both compile through `compile_model`, so a dry run's plan is the plan a real
run makes. The invariant checks are handed to the pass manager here.
"""

from __future__ import annotations

import copy
import logging
import functools
import warnings
from typing import Any, Callable, Iterable

import torch.fx as fx
import torch.nn as nn

from fxpar import passes as P
from fxpar.analysis.invariants import check_graph
from fxpar.analysis.plan_io import MODEL_KEY, ModelFingerprint, check_plan_fits
from fxpar.analysis.precision import batch_split_narrowings, warn_narrowed_parameters
from fxpar.capture import capture
from fxpar.compiler import pass_manager
from fxpar.compiler.pass_manager import GraphCheck, PassContext
from fxpar.core.errors import PlanError
from fxpar.core.mesh import MeshInfo
from fxpar.core.plan import Plan, as_plan
from fxpar.core.stages import split_pp_mesh
from fxpar.runtime.init_weights import compute_buffers
from fxpar.runtime.offload import offload_parameters_to_host
from fxpar.runtime.materialize import allocate_local, fake_copy, has_meta, mesh_device, meta_skeleton
from fxpar.runtime.agreement import broadcast_state
from fxpar.runtime.parallel_module import ParallelModule
from fxpar.runtime.pipeline import PipelineModule

__all__ = ["compile_model", "default_passes", "PassManager", "DEFAULT_CHECKS", "SUPPORTED_DIMS"]

log = logging.getLogger(__name__)

SUPPORTED_DIMS = ("tp", "pp", "dp", "fsdp", "ep")

DEFAULT_CHECKS: tuple[GraphCheck, ...] = (check_graph,)
"""What runs after every pass when checks are on: fxpar's graph invariants."""


class PassManager(pass_manager.PassManager):
    """`fxpar.PassManager`: the pass manager with fxpar's invariant checks as its default checks.

    The base class (`fxpar.compiler.pass_manager.PassManager`) knows no analysis; this is
    where the checks are handed to it.
    """

    def __init__(self, passes: list, *, checks: Iterable[GraphCheck] = DEFAULT_CHECKS, **kwargs: Any) -> None:
        super().__init__(passes, checks=checks, **kwargs)
_SUPPORTED_DIMS = SUPPORTED_DIMS


def default_passes(plan: Plan | None = None) -> list:
    """The built-in pipeline as a list users can edit and pass back through `passes=`."""
    return [
        P.fuse_experts,
        P.shard_inputs,
        P.annotate_parameters,
        P.unflatten_heads,  # a no-op unless attention heads do not divide tp
        P.replicate_kv_heads,  # a no-op unless grouped-query attention has fewer kv heads than tp
        P.apply_fsdp,
        P.split_linear_bias,
        P.decompose_loss,  # a no-op without a captured cross-entropy on a vocab-sharded head
        P.propagate_sharding,
        P.insert_collectives,
        P.apply_mixed_precision,  # a no-op without mp_policy
        P.localize_shapes,
        P.bucket_grad_sync,
        P.shard_parameters,
        P.schedule_overlap,  # a no-op without fsdp (or with offload_policy)
        P.async_tp,  # off (chunks=1) until measured faster; AsyncTP() splits the batch for tp overlap
        P.offload_parameters,  # a no-op without offload_policy
        P.split_stages,  # a no-op without a pipeline
        P.checkpoint_activations,  # a no-op without activation_checkpointing; per stage in a pipeline
    ]


def _check_mesh(mesh_info: MeshInfo, plan: Plan) -> None:
    unsupported = [n for n, s in zip(mesh_info.names, mesh_info.sizes) if n not in SUPPORTED_DIMS and s > 1]
    if unsupported:
        raise PlanError(
            f"mesh {mesh_info} has dims {unsupported} this version of fxpar does not parallelize yet "
            f"(supported: {SUPPORTED_DIMS}); use a mesh with only {SUPPORTED_DIMS} or size 1 on the others"
        )


def _skeleton(model: nn.Module, *, required: bool) -> nn.Module | None:
    """The model's structure on meta for pm.init_weights / fxpar.checkpoint (None if it cannot be copied)."""
    try:
        return meta_skeleton(model)
    except Exception as e:  # deepcopy of arbitrary user attributes: any type
        if required:
            raise PlanError(f"a meta-device {type(model).__name__} must be deep-copyable (fxpar keeps its structure "
                            f"to compute buffers and initialize shards): {type(e).__name__}: {e}") from e
        log.debug("no meta skeleton of %s (%s): init_weights and save_hf unavailable", type(model).__name__, e)
        return None


def compile_model(model: nn.Module, mesh: Any, mesh_info: MeshInfo, *, example_inputs: tuple = (),
                  example_kwargs: dict | None = None, plan: Plan | dict | None = None, passes: list | None = None,
                  input_layout: str = "full", reshard_after_forward: bool = True, fsdp_unit: str = "block",
                  check: bool | None = None, dump_dir: str | None = None, split_pp: Callable | None = None,
                  progress: Callable[[str], None] | None = None,
                  captured: fx.GraphModule | None = None, mp_policy: Any = None,
                  activation_checkpointing: str | None = None, batch_norm_per_microbatch: bool = False,
                  compile: bool | str = False, loss_fn: Callable | None = None,
                  example_target: Any = None, overlap: bool = True, offload_policy: Any = None) -> ParallelModule:
    """The compile path `parallelize` and dry runs (`fxpar.plan`) share: capture, passes, module.

    A dry run passes `mesh=None` and a `MeshInfo` built from sizes, so it
    runs exactly the passes parallelize runs; collectives are inserted on
    'dryrun:<dim>' groups and never run.

    Args:
        mesh: the torch DeviceMesh, or None for a dry run.
        mesh_info: the mesh as passes see it (with its pp dim, if any).
        split_pp: `(mesh, mesh_info) -> (spmd mesh, spmd MeshInfo, PipelineMeshInfo)` for a
            pipelined mesh (default: `fxpar.core.stages.split_pp_mesh`, which needs a DeviceMesh).
        progress: called with 'capture', then 'passes', as each long step starts.
        captured: the model's capture, reused (copied) instead of capturing again: the in-process
            simulator compiles every rank of a mesh from one capture.
        loss_fn, example_target: capture `loss_fn(model(*inputs), target)` into the graph (the
            module's graph returns the loss; its forward compiles the model alone on first use).
        The others: as `parallelize`.
    """
    settings = dict(locals())  # every argument, to compile the other train / eval mode the same way
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    plan = as_plan(plan)
    _check_mesh(mesh_info, plan)
    check_plan_fits(plan, model, mesh_info)  # a saved plan: the same model structure and mesh
    # A pipeline compiles each stage for the mesh without its pp dim.
    pipelined = (mesh_info.size("pp") > 1 or plan.pp is not None or plan.schedule is not None)
    spmd_mesh, spmd_info, pp_info = (split_pp or split_pp_mesh)(mesh, mesh_info) if pipelined \
        else (mesh, mesh_info, None)
    backend = ("inductor" if compile is True else compile) or None
    if backend is not None and not isinstance(backend, str):
        raise PlanError(f"compile={compile!r}: use True (inductor), False, or a torch.compile backend name")
    if backend is not None and pipelined:
        raise PlanError("compile=True does not run pipelines yet (their stages run under torch's schedules); "
                        "use compile=False with pp, or a mesh without pp")
    if pipelined and input_layout != "full":
        raise PlanError(f"input_layout={input_layout!r}: a pipeline takes the same full inputs on every rank "
                        "(input_layout='full')")
    if loss_fn is not None and pipelined:
        raise PlanError("a captured loss (parallelize(..., loss_fn=)) is not pipelined yet: with pp, pass the "
                        "loss to pm.step(x, target=y, loss_fn=fn) instead (it runs on the last stage)")
    if loss_fn is not None and example_target is None:
        raise PlanError("loss_fn= needs example_target= (a target shaped like the real ones) to capture the loss")
    if progress is not None:
        progress("capture")
    # A model on meta (larger than one rank) is captured as FakeTensors on the mesh's device and gets only
    # its local shards allocated after the passes (fxpar.runtime.materialize).
    on_meta = mesh is not None and captured is None and has_meta(model)
    if on_meta and pipelined:
        raise PlanError("a model on the meta device cannot be pipelined yet; build it on a real device, or use a "
                        "mesh without pp (dp, fsdp, tp)")
    skeleton = _skeleton(model, required=on_meta) if mesh is not None else None
    if captured is None:
        gm = capture(fake_copy(skeleton, mesh_device(mesh)) if on_meta else model, example_inputs, example_kwargs,
                     loss_fn=loss_fn, target=example_target)
        if not on_meta:
            broadcast_state(gm, mesh)  # as DDP: every rank starts from the first rank's parameters and buffers
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # pytree's LeafSpec deprecation, from deepcopy
            gm = copy.deepcopy(captured)
    gm.meta[MODEL_KEY] = ModelFingerprint.of(model)  # what a saved plan is checked against
    if progress is not None:
        progress("passes")
    options = {"input_layout": input_layout, "pp": pp_info, "fsdp_unit": fsdp_unit, "mp_policy": mp_policy,
               "activation_checkpointing": activation_checkpointing,
               "batch_norm_per_microbatch": batch_norm_per_microbatch, "overlap": overlap,
               "offload_policy": offload_policy, "compile": backend}
    ctx = PassContext(mesh=spmd_info, plan=plan, device_mesh=spmd_mesh, options=options)
    manager = PassManager(passes if passes is not None else default_passes(plan), check=check, dump_dir=dump_dir)
    gm = manager.run(gm, ctx)
    if pipelined:
        pipe = PipelineModule(gm, mesh=mesh, mesh_info=spmd_info, plan=plan, history=manager.history,
                              pp_dim=mesh_info.names.index("pp") if mesh_info.has("pp") else None,
                              example_args=example_inputs, example_kwargs=example_kwargs,
                              reshard_after_forward=reshard_after_forward)
        pipe.check_inputs = check is True
        return pipe
    data_dims = [d for d, name in enumerate(mesh_info.names) if name in ("dp", "fsdp") and mesh_info.sizes[d] > 1]
    if data_dims:  # a parameter cast down, its gradient rounded per data shard
        warn_narrowed_parameters(batch_split_narrowings(gm, data_dims), "data-parallel shards")
    if on_meta:
        allocate_local(gm, mesh_device(mesh))
    if offload_policy is not None and mesh is not None:
        offload_parameters_to_host(gm, pin_memory=bool(offload_policy.pin_memory))
    pm = ParallelModule(gm, mesh=mesh, mesh_info=mesh_info, plan=plan, history=manager.history,
                        example_args=example_inputs, example_kwargs=example_kwargs, input_layout=input_layout,
                        reshard_after_forward=reshard_after_forward, compile_backend=backend,
                        offload_policy=offload_policy)
    pm.set_source_model(skeleton)
    pm.check_inputs = check is True
    if captured is None and not on_meta:
        pm.recompile_for_mode = functools.partial(_graph_in_mode, settings)
    if loss_fn is not None:
        pm.compile_model_graph = functools.partial(_graph_without_loss, settings)
    if on_meta:
        compute_buffers(pm)
    return pm


def _graph_without_loss(settings: dict) -> fx.GraphModule:
    """This rank's graph of the model alone (its output, not the captured loss), compiled as `settings` say."""
    return compile_model(**{**settings, "progress": None, "loss_fn": None, "example_target": None,
                            "captured": None}).graph_module


def _graph_in_mode(settings: dict, mode: bool) -> fx.GraphModule:
    """This rank's graph of the model captured in `mode` (train / eval), compiled as `settings` say.

    The user's model is put in `mode` for the capture only; every submodule's own flag is restored.
    """
    model = settings["model"]
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(mode)
    except NotImplementedError as e:  # an exported GraphModule given as the model
        raise PlanError(f"{type(model).__name__} cannot switch to {'train' if mode else 'eval'} mode ({e}); "
                        "parallelize the model in the mode it will run in") from e
    try:
        return compile_model(**{**settings, "progress": None}).graph_module
    finally:
        for m, flag in flags:
            m.training = flag
