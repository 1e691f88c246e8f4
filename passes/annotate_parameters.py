"""annotate_parameters: give every parameter its placements from the plan.

Requires: captured. Provides: param_placements.

Each get_attr node gets a `NodeInfo(role="param")` whose spec places it on the
mesh: on `tp`, by its module's style (explicit plan keys first, then, when the
plan is automatic, Megatron pairs found in the graph); Replicate on every
other mesh dim. How a style shards a tensor depends on how the graph uses it:

    used as              colwise     rowwise
    linear weight [N,K]  Shard(0)    Shard(1)
    linear bias [N]      Shard(0)    Replicate

Before:  %up_weight = get_attr[target=up.weight]
After:   same node, meta["fxpar"].spec.placements == (Shard(0),), local shape [N/tp, K]

Raises ShardingError when a sharded dim does not divide by the mesh size,
naming the module and the sizes that would work.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Replicate, Shard

from fxpar.errors import PlanError, ShardingError
from fxpar.pass_manager import PassContext, PassResult, fx_pass
from fxpar.plan import TPStyle
from fxpar.spec import NodeInfo, divides, make_spec, set_info

from fxpar.passes._graph import module_fqns, param_nodes, uses_as
from fxpar.passes._megatron import find_mlp_pairs

aten = torch.ops.aten


def _placement_for(node: fx.Node, style: TPStyle, module: str) -> Shard | Replicate:
    if style.kind == "replicate":
        return Replicate()
    uses = uses_as(node)
    kinds = {(t, i) for t, i in uses}
    name = str(node.target).rpartition(".")[2]
    if kinds and all(t == aten.linear.default and i == 1 for t, i in kinds):
        return Shard(0) if style.kind == "colwise" else Shard(1)
    if kinds and all(t == aten.linear.default and i == 2 for t, i in kinds):
        return Shard(0) if style.kind == "colwise" else Replicate()
    if not uses:
        return Replicate()
    used_by = sorted({str(t) for t, _ in kinds})
    raise PlanError(
        f"style '{style}' on module '{module}': fxpar does not know how to shard its parameter '{name}' "
        f"(used by {used_by}); '{style}' applies to Linear-like modules. Map '{module}' to 'replicate' or "
        "to a style for its kind"
    )


def _auto_styles(gm: fx.GraphModule, taken: set[str], tp: int) -> dict[str, TPStyle]:
    """Megatron pairs found in the graph, for modules the plan does not name."""
    styles: dict[str, TPStyle] = {}
    for heads, sink in find_mlp_pairs(gm):
        nodes = [*heads, sink]
        mods = [str(n.args[1].target).rpartition(".")[0] for n in nodes if n.args[1].op == "get_attr"]
        if len(mods) != len(nodes) or any(m in taken for m in mods):
            continue
        hidden = heads[0].args[1].meta["val"].shape[0]
        if divides(hidden, tp) is not True:
            continue  # stays replicated; explain() lists it as unsharded
        for h in heads:
            styles[str(h.args[1].target).rpartition(".")[0]] = TPStyle("colwise")
        styles[str(sink.args[1].target).rpartition(".")[0]] = TPStyle("rowwise")
    return styles


def _divisors(size: int, limit: int = 64) -> list[int]:
    return [d for d in range(2, limit + 1) if size % d == 0]


@fx_pass(requires=("captured",), provides=("param_placements",))
def annotate_parameters(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    mesh = ctx.mesh
    styles = ctx.plan.resolve_tp(module_fqns(gm)) if ctx.plan.tp else {}
    if styles and not mesh.has("tp"):
        raise PlanError(f"the plan has tensor-parallel styles but the mesh {mesh.names} has no 'tp' dim; "
                        "name a mesh dim 'tp' or drop the tp part of the plan")
    tp_dim = mesh.names.index("tp") if mesh.has("tp") else None
    if ctx.plan.auto_tp and tp_dim is not None:
        styles = {**_auto_styles(gm, set(styles), mesh.sizes[tp_dim]), **styles}
    for node in param_nodes(gm):
        fqn = str(node.target)
        module = fqn.rpartition(".")[0]
        style = styles.get(module)
        placements = [Replicate() for _ in mesh.names]
        if style is not None and tp_dim is not None:
            p = _placement_for(node, style, module)
            if isinstance(p, Shard):
                size = node.meta["val"].shape[p.dim]
                n = mesh.sizes[tp_dim]
                if divides(size, n) is not True:
                    raise ShardingError(
                        f"'{style}' on module '{module}': dim {p.dim} of parameter '{fqn}' has size {size}, "
                        f"which does not divide by tp={n}; use tp in {_divisors(int(size))} "
                        f"or map '{module}' to 'replicate' in the plan"
                    )
            placements[tp_dim] = p
        spec = make_spec(node.meta["val"], tuple(placements), mesh.sizes)
        extra = {"style": str(style)} if style is not None else {}
        set_info(node, NodeInfo(spec=spec, module_fqn=module, role="param", param_fqn=fqn,
                                origin="annotate_parameters", extra=extra))
    return PassResult(gm, True)
