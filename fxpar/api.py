"""The public entry points: parallelize, default_passes, check.

    capture -> passes -> runtime module (fxpar.compiler.compile_model)

A mesh with a `pp` dim (size > 1) or a plan with `pp` runs as a pipeline: the
passes see the mesh without its pp dim (placements are per stage), the last
pass cuts this rank's graph into stages, and `fxpar.runtime.pipeline.PipelineModule`
runs them with torch's pipeline schedules.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from fxpar.analysis.module_checks import check_module, check_ranks
from fxpar.compiler import compile_model, default_passes
from fxpar.core.errors import PlanError
from fxpar.core.mesh import MeshInfo
from fxpar.core.plan import Plan
from fxpar.runtime.parallel_module import ParallelModule

__all__ = ["parallelize", "default_passes", "check"]


def parallelize(model: nn.Module, mesh: Any, *, example_inputs: tuple = (), example_kwargs: dict | None = None,
                plan: Plan | dict | None = None, passes: list | None = None,
                input_layout: str = "full", reshard_after_forward: bool = True, fsdp_unit: str = "block",
                check: bool | None = None, dump_dir: str | None = None, mp_policy: Any = None,
                activation_checkpointing: str | None = None, batch_norm_per_microbatch: bool = False,
                compile: bool | str = False, loss_fn: Any = None, example_target: Any = None,
                overlap: bool = True, offload_policy: Any = None) -> ParallelModule:
    """Compiles `model` for this rank of `mesh`.

    Args:
        model: the model; never modified. As DDP does, every rank starts from the parameters and
            buffers of the mesh's first rank (those that differ broadcast before sharding), so ranks whose models were
            initialized with different seeds agree.
        mesh: a torch DeviceMesh; dims are recognised by name (dp, fsdp, pp, tp;
            a 1-D mesh without names is tp).
        example_inputs: positional example inputs (full, as every rank passes them).
        example_kwargs: keyword example inputs.
        plan: a fxpar.Plan, a {module glob: style} dict (the tp part), or None
            to plan automatically.
        passes: the pass list (default: fxpar.default_passes()).
        input_layout: 'full' (every rank passes the same full inputs and gets the full outputs; checked
            by a fingerprint of the inputs on the first run, and on every run with check=True) or
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
        mp_policy: a `torch.distributed.fsdp.MixedPrecisionPolicy`, with FSDP2's meaning: parameters
            (and optimizer state) stay in their dtype, compute runs in `param_dtype` (FSDP gathers in
            it), gradients are reduced over fsdp and dp in `reduce_dtype` (else `param_dtype`),
            outputs cast to `output_dtype` if set (`fxpar.passes.apply_mixed_precision`).
        activation_checkpointing: None, 'full' (keep each block's input, recompute its forward in
            the backward) or 'selective' (keep matmul and attention outputs, recompute the rest)
            (`fxpar.passes.checkpoint_activations`).
        batch_norm_per_microbatch: in a pipeline, accept BatchNorm in training mode computing its
            statistics per microbatch (as torch.distributed.pipelining does; logged as a warning),
            and likewise other differentiable reductions over the batch dim (x - x.mean(0)).
            Default: a PlanError naming the module, since the unsplit model normalizes by the
            whole batch.
        compile: run this rank's rewritten graph through torch.compile: True for inductor (its C++
            backend on CPU, Triton on CUDA), or a backend name ('aot_eager', ...). The collectives are
            fxpar's custom ops, opaque to the compiler, and keep their gradient duals. Not yet for
            pipelines. Under compile, FSDP keeps gathered parameters for the backward
            (reshard_after_forward's saved-tensor hooks do not apply inside a compiled graph).
        overlap: with fsdp, issue each block's gather during the block before it, re-gather the
            block before during each block's backward, and wait each reduce-scatter one block late
            (`fxpar.passes.schedule_overlap`); False gathers and reduces where each value is used.
            Results are bit-equal either way. With tp, `fxpar.passes.AsyncTP()` in `passes=` (off in
            the default pipeline) runs the batch in 2 chunks whose all-reduces are issued async, each
            under the other chunk's compute; overlap=False turns that off too.

        loss_fn: capture `loss_fn(model(*inputs), target)` into the graph, so the passes see the loss:
            cross-entropy on a vocab-sharded head then runs on vocab shards (`Plan(loss_parallel=)`),
            and a batch-sharded loss is reduced exactly as the unsplit model's (a mean over the whole
            batch, ignored targets excluded). `pm.step(x, target=y)` then needs no loss_fn and returns
            that loss; `pm(x)` still returns the model's output (the model alone, compiled on first
            use, sharing the parameters). Not for pipelines yet (PlanError).
        example_target: an example target (with loss_fn), shaped like the real ones.

        offload_policy: a `torch.distributed.fsdp.CPUOffloadPolicy` (FSDP2's meaning): trainable
            parameter shards, their gradients and the optimizer state live on the CPU; each use copies
            the shard to the mesh's device before the FSDP all-gather, the reduce-scattered gradient
            comes back to the CPU (`fxpar.passes.offload_parameters`). Not with dp > 1 (use fsdp).

    Returns:
        A ParallelModule holding this rank's rewritten GraphModule.

    Raises:
        CaptureError, PlanError, ShardingError: naming the module and the fix.
    """
    if input_layout not in ("full", "local"):
        raise PlanError(f"input_layout={input_layout!r}: use 'full' (every rank passes the same full inputs) "
                        "or 'local' (each rank passes its own batch shard)")
    if activation_checkpointing not in (None, "full", "selective"):
        raise PlanError(f"activation_checkpointing={activation_checkpointing!r}: use None, 'full' (recompute each "
                        "block's forward in the backward) or 'selective' (keep matmul and attention outputs)")
    return compile_model(model, mesh, MeshInfo.from_device_mesh(mesh), example_inputs=example_inputs,
                         example_kwargs=example_kwargs, plan=plan, passes=passes, input_layout=input_layout,
                         reshard_after_forward=reshard_after_forward, fsdp_unit=fsdp_unit, check=check,
                         dump_dir=dump_dir, mp_policy=mp_policy, activation_checkpointing=activation_checkpointing,
                         batch_norm_per_microbatch=batch_norm_per_microbatch, compile=compile, loss_fn=loss_fn,
                         example_target=example_target, overlap=overlap, offload_policy=offload_policy)


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
    up with the same tensors and without a deadlock (`fxpar.analysis.p2p_check`). See
    `fxpar.analysis.invariants` for the full list.

    Args:
        pm: this rank's ParallelModule.
        ranks: every rank's ParallelModule of the same mesh, in rank order, when
            one process holds them all (`fxpar.testing.SimWorld`): then the
            collective order of every group and parameter ownership are checked
            across ranks too. (Across processes the same check runs at the
            first forward, by fingerprint: `fxpar.analysis.fingerprint`.)

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
