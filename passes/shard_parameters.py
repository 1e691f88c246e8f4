"""shard_parameters: give this rank's GraphModule its local parameter shards.

Requires: specs. Provides: local_params.

For every parameter or buffer whose placements shard it, replaces the tensor
on the GraphModule with this rank's chunk (a new Parameter, contiguous, so the
full tensor can be freed): for each mesh dim m with Shard(d), chunk
`coordinate[m]` of `mesh.sizes[m]` along d. Replicated tensors stay as the
capture's private copies. Dry runs (no coordinate) keep full tensors.

Tied weights share one get_attr node (torch.export dedups them), so they are
sharded once and stay one Parameter object.

Before:  gm.up.weight: Parameter [64, 16]          # Shard(0) on tp=4
After:   gm.up.weight: Parameter [16, 16]          # rows 16*r .. 16*r+15 on rank r
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from fxpar.pass_manager import PassContext, PassResult, fx_pass
from fxpar.spec import get_spec

from fxpar.passes._graph import param_nodes


def local_chunk(t: torch.Tensor, placements, sizes, coordinate) -> torch.Tensor:
    """This rank's chunk of a full tensor."""
    for p, n, c in zip(placements, sizes, coordinate):
        if p.is_shard():
            t = t.chunk(n, dim=p.dim)[c]
    return t


@fx_pass(requires=("specs",), provides=("local_params",))
def shard_parameters(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    mesh = ctx.mesh
    if mesh.coordinate is None:
        return PassResult(gm, False)
    modified = False
    for node in param_nodes(gm):
        spec = get_spec(node)
        if spec is None or spec.is_replicated:
            continue
        mod_name, _, name = str(node.target).rpartition(".")
        owner = gm.get_submodule(mod_name)
        full = getattr(owner, name)
        local = local_chunk(full.detach(), spec.placements, mesh.sizes, mesh.coordinate).contiguous().clone()
        if isinstance(full, nn.Parameter):
            setattr(owner, name, nn.Parameter(local, requires_grad=full.requires_grad))
        else:
            owner.register_buffer(name, local)
        modified = True
    return PassResult(gm, modified)
