"""localize_shapes: rewrite global sizes baked into op arguments to local ones.

Requires: collectives. Provides: local_shapes.

Exported graphs carry global constants in shape arguments (`view(x, [8, 4,
16])`); after sharding, each rank's tensor is smaller. Ops whose rule
registers a `localize` function get their arguments rewritten from the node's
output spec (sharded entries divided by the mesh sizes, -1 kept). A
`sym_size` read of a sharded dim is scaled back up to the global size, so
shape arithmetic downstream stays global and is localized where it is used.

Before:  %view = aten.view.default(%h, [8, 64])        # output Shard(1) on tp=4
After:   %view = aten.view.default(%h, [8, 16])
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxpar.core.pass_api import PassContext, PassResult, fx_pass
from fxpar.core.spec import TensorSpec, get_info, get_spec
from fxpar.rules import lookup_localize

aten = torch.ops.aten


@fx_pass(requires=("collectives",), provides=("local_shapes",))
def localize_shapes(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    sizes = ctx.mesh.sizes
    modified = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten.sym_size.int:
            spec = get_spec(node.args[0])
            if spec is None:
                continue
            factor = 1
            for p, n in zip(spec.placements, sizes):
                if p.is_shard(node.args[1] % len(spec.shape)):
                    factor *= n
            if factor > 1:
                with gm.graph.inserting_after(node):
                    scaled = gm.graph.call_function(operator.mul, (node, factor))
                node.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
                scaled.meta["val"] = node.meta.get("val")
                modified = True
            continue
        localize = lookup_localize(node.target)
        info = get_info(node)
        if localize is not None and info is not None and info.spec is not None:
            before = (node.args, node.kwargs)
            localize(node, info, ctx.mesh)
            modified |= before != (node.args, node.kwargs)
    return PassResult(gm, modified)
