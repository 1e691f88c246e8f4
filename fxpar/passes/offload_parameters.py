"""offload_parameters: parameters in host memory, copied to the compute device at each use.

Requires: local_params (the sharded graph). Provides: offload.

`options["offload_policy"]` is a `torch.distributed.fsdp.CPUOffloadPolicy` (FSDP2's meaning):
the sharded parameters, their gradients and the optimizer state live on the CPU
(`fxpar.runtime.offload.offload_parameters_to_host` moves the shards after compiling;
pinned with `pin_memory=True` where an accelerator exists), so the optimizer steps on the CPU.
In the graph, every trainable parameter's get_attr is followed by a copy to the
device the graph computes on, before anything else reads it (before the FSDP all-gather,
so only the shard crosses the host link):

Before:  %w = get_attr[target=h.0.mlp.c_fc.weight]                  # shard, on the device
         %fsdpgather_w = fxpar.fsdp_all_gather(%w, 0, 2, '1', 'fsdp', ...)
After:   %w = get_attr[target=h.0.mlp.c_fc.weight]                  # shard, on the CPU at run time
         %h2d_w = aten._to_copy(%w, device=cuda:0, non_blocking=True)
         %fsdpgather_w = fxpar.fsdp_all_gather(%h2d_w, 0, 2, '1', 'fsdp', ...)

The copy's backward (autograd of `_to_copy`) returns the gradient to the parameter's
device: the reduce-scattered gradient shard comes back to the CPU and accumulates in
`.grad` there. With offload, FSDP gathers run one per parameter (the per-block buckets
of `fxpar.runtime.fsdp_buckets` gather the registered device shards; a copied shard is
gathered on its own). On a CPU mesh the copy is a host-to-host copy of one shard.

Data parallelism's gradient all-reduce runs on `.grad` after the backward
(`bucket_grad_sync`), on the host with offload, which a device backend (NCCL) cannot
do: a mesh with dp > 1 is refused with a PlanError; use fsdp instead of dp.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from fxpar.core.errors import PlanError
from fxpar.core.pass_api import PassContext, PassResult, fx_pass
from fxpar.core.spec import NodeInfo, get_info, set_info

__all__ = ["offload_parameters", "OFFLOAD_KEY"]

OFFLOAD_KEY = "offload_policy"
"""The key of `options` and of `gm.meta` holding the CPUOffloadPolicy."""

aten = torch.ops.aten


@fx_pass(requires=("local_params",), provides=("offload",))
def offload_parameters(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    policy = ctx.options.get(OFFLOAD_KEY)
    if policy is None:
        return PassResult(gm, False)
    if not hasattr(policy, "pin_memory"):
        raise PlanError(f"offload_policy={policy!r}: use torch.distributed.fsdp.CPUOffloadPolicy(pin_memory=...)")
    if ctx.options.get("pp") is not None:
        raise PlanError("offload_policy with a pipeline (pp) is not supported yet; use a mesh without pp "
                        "(fsdp, tp), or drop offload_policy")
    if ctx.mesh.size("dp") > 1:
        raise PlanError(f"offload_policy with dp={ctx.mesh.size('dp')}: data-parallel gradients are all-reduced "
                        "on .grad, which lives on the CPU with offload; shard with fsdp instead of dp "
                        "(a mesh dim named 'fsdp'), or drop offload_policy")
    pin = bool(policy.pin_memory)
    copies = 0
    for node in list(gm.graph.nodes):
        info = get_info(node)
        val = node.meta.get("val")
        if node.op != "get_attr" or info is None or info.role != "param" or not node.users \
                or not isinstance(val, torch.Tensor) or not val.requires_grad:
            continue
        with gm.graph.inserting_after(node):
            copy = gm.graph.create_node("call_function", aten._to_copy.default, (node,),
                                        {"device": val.device, "non_blocking": pin}, name=f"h2d_{node.name}")
        copy.meta["val"] = val
        set_info(copy, NodeInfo(spec=info.spec, input_placements=(info.spec.placements,), module_fqn=info.module_fqn,
                                origin="offload_parameters", note="CPU offload: shard copied to the device"))
        for user in list(node.users):
            if user is not copy:
                user.replace_input_with(node, copy)
        copies += 1
    gm.meta[OFFLOAD_KEY] = dataclasses.replace(policy) if dataclasses.is_dataclass(policy) else policy
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, True)
