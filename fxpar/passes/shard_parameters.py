"""shard_parameters: give this rank's GraphModule its local parameter shards.

Requires: specs. Provides: local_params.

For every parameter or buffer whose placements shard it, replaces the tensor
on the GraphModule with this rank's chunk (a new Parameter, contiguous, so the
full tensor can be freed): for each mesh dim m with Shard(d), chunk
`coordinate[m]` of `mesh.sizes[m]` along d, as `torch.chunk` cuts it (an
uneven dim: ceil(size / n) rows, the last ranks fewer or none; see
`fxpar.core.spec.chunk_bounds`). Replicated tensors stay as the capture's
private copies. Dry runs (no coordinate) keep full tensors.

Tied weights share one get_attr node (torch.export dedups them), so they are
sharded once and stay one Parameter object.

Before:  gm.up.weight: Parameter [64, 16]          # Shard(0) on tp=4
After:   gm.up.weight: Parameter [16, 16]          # rows 16*r .. 16*r+15 on rank r
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from fxpar._torch.placements import StridedShard as _StridedShard
from fxpar.core.pass_api import PassContext, PassResult, fx_pass
from fxpar.core.spec import chunk, get_spec, shard_order
from fxpar.passes._graph import param_nodes


def local_chunk(t: torch.Tensor, placements, sizes, coordinate, names=None) -> torch.Tensor:
    """This rank's chunk of a full tensor, cut in `shard_order` (fsdp last)."""
    order = shard_order(names) if names is not None else range(len(placements))
    for m in order:
        p, n, c = placements[m], sizes[m], coordinate[m]
        if p.is_shard():
            t = chunk(t, n, p.dim, c)
        elif isinstance(p, _StridedShard):
            # section by section: chunk c of each of the split_factor sections
            t = torch.cat([sec.chunk(n, dim=p.dim)[c] for sec in t.chunk(p.split_factor, dim=p.dim)], dim=p.dim)
    return t


@fx_pass(requires=("specs",), provides=("local_params",))
def shard_parameters(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    mesh = ctx.mesh
    if mesh.coordinate is None:
        return PassResult(gm, False)
    modified = False
    modules = dict(gm.named_modules(remove_duplicate=False))  # get_submodule walks the path every call
    # Tied weights: every FQN naming the same tensor must name the new shard too.
    aliases: dict[int, list[str]] = {}
    for fqn, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        aliases.setdefault(id(t), []).append(fqn)
    for node in param_nodes(gm):
        spec = get_spec(node)
        if spec is None or all(p.is_replicate() for p in spec.placements):
            continue
        mod_name, _, name = str(node.target).rpartition(".")
        full = getattr(modules[mod_name], name)
        local = local_chunk(full.detach(), spec.placements, mesh.sizes, mesh.coordinate, mesh.names)
        # an empty uneven chunk keeps its parent's strides through contiguous(): give it its own
        local = local.contiguous().clone() if local.numel() else local.new_empty(local.shape)
        new = nn.Parameter(local, requires_grad=full.requires_grad) if isinstance(full, nn.Parameter) else local
        for fqn in aliases.get(id(full), [str(node.target)]):
            mod_name, _, attr = fqn.rpartition(".")
            mod = modules[mod_name]
            if isinstance(new, nn.Parameter):
                setattr(mod, attr, new)
            else:
                mod.register_buffer(attr, new)
        modified = True
    return PassResult(gm, modified)
