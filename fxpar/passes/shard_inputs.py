"""shard_inputs: lay the inputs out over the data-parallel mesh dims.

Requires: captured. Provides: input_placements.

On the `dp` and `fsdp` mesh dims every tensor input is split along its batch
dim (dim 0). With `input_layout="full"` (the default) every rank passes the
full batch and the graph keeps its own slice: a `shard` node right after the
placeholder (no communication; its backward gathers an input gradient). With
`input_layout="local"` each rank passes its own slice and the placeholder
already holds Shard(0). On every other mesh dim inputs are Replicate.

Before:  %x = placeholder[target=x]
After:   %x = placeholder[target=x]                          # [R] full batch
         %shard_x = fxpar.shard(%x, 0, 2, '1', 'dp')          # [S(0)] this rank's rows

A global batch that does not divide by the data-parallel size is a
ShardingError here (static sizes) or at run time (symbolic sizes).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Replicate, Shard

from fxpar.core.errors import PlanError, ShardingError, node_context
from fxpar.core.pass_api import PassContext, PassResult, fx_pass
from fxpar.core.spec import NodeInfo, divides, make_spec, set_info
from fxpar.ops.transitions import insert_transition

DATA_DIMS = ("dp", "fsdp", "ep")  # ep borrows the data ranks: tokens split, experts by index


@fx_pass(requires=("captured",), provides=("input_placements",))
def shard_inputs(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    mesh = ctx.mesh
    layout = ctx.options.get("input_layout", "full")
    if layout not in ("full", "local"):
        raise PlanError(f"input_layout={layout!r}: use 'full' (every rank passes the whole batch) or 'local'")
    data = [m for m, name in enumerate(mesh.names) if name in DATA_DIMS and mesh.sizes[m] > 1]
    modified = False
    for node in list(gm.graph.nodes):
        val = node.meta.get("val")
        if node.op != "placeholder" or not isinstance(val, torch.Tensor):
            continue
        replicate = [Replicate() for _ in mesh.names]
        batched = data and val.ndim >= 1
        if batched:
            n = 1
            for m in data:
                n *= mesh.sizes[m]
            if divides(val.shape[0], n) is False:
                raise ShardingError(
                    f"{node_context(node)}: the batch ({val.shape[0]}) does not divide by the data-parallel "
                    f"size {n} ({', '.join(mesh.names[m] for m in data)}); use a global batch that is a multiple "
                    f"of {n}")
        if batched and layout == "local":
            placements = list(replicate)
            for m in data:
                placements[m] = Shard(0)
            set_info(node, NodeInfo(spec=make_spec(val, tuple(placements), mesh.sizes), role="input",
                                    origin="shard_inputs"))
            continue
        set_info(node, NodeInfo(spec=make_spec(val, tuple(replicate), mesh.sizes), role="input",
                                origin="shard_inputs"))
        if not batched:
            continue
        cur, placements = node, list(replicate)
        # The capture's input guard (`_guards_fn`) checks the global shapes the user passes: it keeps
        # reading the placeholder; every other use reads this rank's rows.
        users = [u for u in node.users if not (u.op == "call_module" and str(u.target).startswith("_guards"))]
        anchor = node
        for m in data:
            with gm.graph.inserting_after(anchor):
                group = mesh.group_names[m] if mesh.group_names else f"dryrun:{mesh.names[m]}"
                new = insert_transition(gm.graph, cur, Replicate(), Shard(0), mesh_dim=m,
                                        mesh_dim_name=mesh.names[m], group_size=mesh.sizes[m], group_name=group,
                                        label=node.name)
            placements[m] = Shard(0)
            new.meta["val"] = val
            set_info(new, NodeInfo(spec=make_spec(val, tuple(placements), mesh.sizes), role="collective",
                                   origin="shard_inputs"))
            cur = anchor = new
        for u in users:
            u.replace_input_with(node, cur)
        modified = True
    return PassResult(gm, modified)
