"""checkpoint_activations: choose the regions whose activations are recomputed in the backward.

Requires: local_params (the finished, sharded graph). Provides: activation_checkpointing.
Runs after split_stages: in a pipeline each stage module gets its own plan (its blocks' regions).

`options["activation_checkpointing"]`:

    None         nothing recomputed
    "full"       each block (a transformer layer: `h.3`, `layers.7`, `core.errors.block_of`)
                 keeps only its inputs; its whole forward runs again in the backward
    "selective"  as torchtitan's selective policy: inside each block the outputs of matmuls
                 (mm, addmm, bmm) and attention (scaled_dot_product_attention) and of the
                 reducing collectives (all_reduce, reduce_scatter, all_to_all) are kept,
                 the cheap ops in between are recomputed

A region is a maximal run of consecutive call_function nodes of one block (a
run in graph order is convex: no path leaves and re-enters it, so outlining it
cannot form a cycle). The pass records the regions in
`gm.meta["activation_checkpointing"]` as a `CheckpointPlan`; the graph itself
is unchanged, so every check, fingerprint and explain() reads the same flat
graph. The runtime (`fxpar.runtime.checkpointing`) outlines each region into a
submodule called through `torch.utils.checkpoint.checkpoint(use_reentrant=False)`
for training steps.

Collectives inside a region run again during the backward's recomputation
("full": all of them; "selective": only the FSDP gathers, whose outputs are not kept).
Every rank recomputes the same regions in the same order, so the collective
order stays identical on all ranks; the static fingerprint (forward order) is
unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from fxpar.core.errors import PlanError, block_of
from fxpar.core.pass_api import PassContext, PassResult, fx_pass
from fxpar.core.spec import get_info
from fxpar.core.stages import stage_info

__all__ = ["checkpoint_activations", "CheckpointPlan", "CheckpointRegion", "AC_KEY", "AC_MODES"]

AC_KEY = "activation_checkpointing"
AC_MODES = ("full", "selective")


@dataclass(frozen=True)
class CheckpointRegion:
    """One recomputed region: the block it belongs to and its node names, in graph order."""

    block: str
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class CheckpointPlan:
    """What `checkpoint_activations` chose: the mode and the regions."""

    mode: str
    regions: tuple[CheckpointRegion, ...]


def _block(node: fx.Node) -> str | None:
    info = get_info(node)
    return block_of(info.module_fqn) if info is not None else None


@fx_pass(requires=("local_params",), provides=("activation_checkpointing",))
def checkpoint_activations(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    mode = ctx.options.get(AC_KEY)
    if mode is None:
        return PassResult(gm, False)
    if mode not in AC_MODES:
        raise PlanError(f"activation_checkpointing={mode!r}: use None, 'full' or 'selective'")
    split = stage_info(gm)
    if split is None and ctx.options.get("pp") is not None:
        raise PlanError("checkpoint_activations runs per pipeline stage: put it after split_stages in the pass "
                        "list (fxpar.default_passes() does)")
    if split is None:
        gm.meta[AC_KEY] = _plan(gm, mode)
        return PassResult(gm, True)
    # A pipeline: each stage recomputes its own blocks (cuts fall between blocks, so no region spans two).
    for k in range(split.num_stages):
        stage = gm.get_submodule(f"stage_{k}")
        stage.meta[AC_KEY] = _plan(stage, mode)
    gm.meta[AC_KEY] = CheckpointPlan(mode, ())
    return PassResult(gm, True)


def _plan(gm: fx.GraphModule, mode: str) -> CheckpointPlan:
    """The regions of one graph: maximal runs of consecutive call_function nodes of one block."""
    regions: list[CheckpointRegion] = []
    run: list[str] = []
    current = None
    for node in gm.graph.nodes:
        block = _block(node) if node.op == "call_function" else None
        if block != current or block is None:
            if current is not None and run:
                regions.append(CheckpointRegion(current, tuple(run)))
            run = []
        current = block
        if block is not None:
            run.append(node.name)
    if current is not None and run:
        regions.append(CheckpointRegion(current, tuple(run)))
    return CheckpointPlan(mode, tuple(r for r in regions if len(r.nodes) > 1))
