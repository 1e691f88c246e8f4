"""Activation checkpointing at run time: the regions `checkpoint_activations` chose, run under
`torch.utils.checkpoint.checkpoint(use_reentrant=False)`.

`checkpointed_graph_module(gm)` builds, for training steps, a copy of `gm`
whose regions are outlined into submodules:

    %ac_0 = get_attr[target=ac_0]                      # the region's GraphModule
    %ckpt_0 = fxpar.runtime.checkpointing.run_region(%ac_0, 'full', %x, %w1, ...)
    %h = getitem(%ckpt_0, 0)                           # each value the rest of the graph uses

Parameters are the same tensor objects as `gm`'s (a region's get_attr reads
them from `gm`); the flat `gm` stays what checks, fingerprints and explain()
read. "full" saves only each region's inputs; "selective" also saves the
outputs of the ops in `SAVED_OPS` (torch's selective checkpoint contexts).
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from fxpar._torch.fx import copy_codegen
from fxpar.core.dataflow import attr_of
from fxpar.passes.checkpoint_activations import AC_KEY, CheckpointPlan

__all__ = ["checkpointed_graph_module", "run_region", "SAVED_OPS", "stage_for_run"]

aten = torch.ops.aten
SAVED_OPS = frozenset({
    aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
    aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.fxpar.all_reduce.default, torch.ops.fxpar.reduce_scatter.default, torch.ops.fxpar.all_to_all.default,
})
"""What "selective" keeps (torchtitan's op list, with fxpar's reducing collectives): matmuls, attention,
and the communication whose recomputation would cost bandwidth."""


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def run_region(region: fx.GraphModule, mode: str, *args: Any) -> tuple:
    """Runs one outlined region under non-reentrant checkpointing ('full' or 'selective')."""
    if not torch.is_grad_enabled():
        return region(*args)
    if mode == "selective":
        context_fn = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
        return checkpoint(region, *args, use_reentrant=False, context_fn=context_fn)
    return checkpoint(region, *args, use_reentrant=False)


def _outline(gm: fx.GraphModule, names: tuple[str, ...], objects: dict) -> tuple[fx.GraphModule, list, list]:
    """The region's GraphModule, its inputs (nodes of `gm` defined outside) and outputs (used outside)."""
    inside = {n for n in gm.graph.nodes if n.name in set(names)}
    ordered = [n for n in gm.graph.nodes if n in inside]
    inputs: list[fx.Node] = []
    for n in ordered:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    outputs = [n for n in ordered if any(u not in inside for u in n.users)]
    graph = fx.Graph()
    env = {a: graph.placeholder(a.name) for a in inputs}
    for n in ordered:
        env[n] = graph.node_copy(n, lambda a: env[a])
        if n.op in ("get_attr", "call_module"):
            objects[str(n.target)] = attr_of(gm, n.target)
    graph.output(tuple(env[o] for o in outputs))
    root = {str(n.target): attr_of(gm, n.target) for n in ordered if n.op in ("get_attr", "call_module")}
    return fx.GraphModule(root, graph, class_name="CheckpointRegion"), inputs, outputs


def checkpointed_graph_module(gm: fx.GraphModule) -> fx.GraphModule | None:
    """A copy of `gm` running its checkpoint regions through `run_region`, or None if it has none."""
    plan: CheckpointPlan | None = gm.meta.get(AC_KEY)
    if plan is None or not plan.regions:
        return None
    objects: dict[str, Any] = {}
    first_of: dict[str, tuple[int, fx.GraphModule, list, list]] = {}
    member: dict[str, int] = {}
    for i, region in enumerate(plan.regions):
        sub, inputs, outputs = _outline(gm, region.nodes, objects)
        first_of[region.nodes[0]] = (i, sub, inputs, outputs)
        for name in region.nodes:
            member[name] = i
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.name in first_of:
            i, sub, inputs, outputs = first_of[n.name]
            objects[f"ac_{i}"] = sub
            mod = graph.get_attr(f"ac_{i}")
            call = graph.call_function(run_region, (mod, plan.mode, *[env[a] for a in inputs]))
            for k, o in enumerate(outputs):
                env[o] = graph.call_function(operator.getitem, (call, k))
                env[o].meta = dict(o.meta)
            continue
        if n.name in member:
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
        if n.op in ("get_attr", "call_module"):
            objects[str(n.target)] = attr_of(gm, n.target)
    copy_codegen(gm.graph, graph)
    out = fx.GraphModule(objects, graph, class_name=type(gm).__name__)
    out.meta.update(gm.meta)
    return out


def stage_for_run(stage: fx.GraphModule, train: bool) -> fx.GraphModule:
    """A pipeline stage as a schedule runs it: for training, its checkpoint regions outlined
    (built once per stage graph, sharing the stage's parameters); else the stage itself."""
    if not train:
        return stage
    cached = stage.__dict__.get("_fxpar_checkpointed")
    if cached is None or cached[0] is not stage.code:
        cached = (stage.code, checkpointed_graph_module(stage) or stage)
        stage.__dict__["_fxpar_checkpointed"] = cached
    return cached[1]
