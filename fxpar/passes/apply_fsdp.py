"""apply_fsdp: shard parameters along the `fsdp` mesh dim and gather them where used.

Requires: param_placements. Provides: fsdp_params.

Each parameter with a dim 0 (after any tensor-parallel split) is stored as
Shard(0) on `fsdp`; a `fsdp_all_gather` node right after its get_attr rebuilds
the full (tensor-parallel local) parameter for its users, and its backward
reduce-scatters the gradient: the design's all_gather + grad_all_reduce pair,
fused. A dim 0 that does not divide by fsdp is sharded unevenly, as FSDP2
does: rank i holds chunk i of torch.chunk (ceil(rows / fsdp) rows, the last
ranks fewer or none), the gather carries the full row count (`full_size`),
pads each chunk for the collective and strips the padding. Scalars, fused
(strided) dim 0s and symbolic sizes stay Replicate on fsdp (their gradient is
all-reduced like data parallel's) and explain() says so.

Before:  %w = get_attr[target=up.weight]                  # [R] on fsdp
         %linear = aten.linear(%x, %w)
After:   %w = get_attr[target=up.weight]                  # [S(0)] on fsdp: 1/fsdp of the rows
         ...
         %fsdpgather_w = fxpar.fsdp_all_gather(%w, 0, 2, '1', 'fsdp')   # [R], just before its first use
         %linear = aten.linear(%x, %fsdpgather_w)

Shards are cut tensor-parallel first and fsdp second (`shard_parameters`), so
gathering over fsdp yields exactly this rank's tensor-parallel shard.

Each gather node records its communication unit in `fsdp_bucket`
(`options["fsdp_unit"]`): 'block' (the default) names the block its
parameter belongs to (`h.3`, `layers.7`; other modules by their FQN), and the
runtime gathers and reduce-scatters consecutive gathers of one block as one
collective (`fxpar.runtime.fsdp_buckets`), as FSDP2 does per wrapped block; 'param'
keeps one collective per parameter (least memory: one parameter gathered at a
time instead of one block).

The root unit (fsdp_unit='block', a model with blocks, no pp): the parameters
outside any block (`wte`, `wpe`, `ln_f`) and the weights used in several
blocks (a tied `lm_head`) are one unit, `FSDP_ROOT_UNIT` ("<root>"), as FSDP2's
`fully_shard(model)` after `fully_shard` per block: one gather node per
parameter (a tied weight's one gather serves all its uses), all of them
consecutive before the first use of any, so they are one collective. The
runtime keeps that unit gathered from the forward to the backward (FSDP2's
root has post_forward_mesh_info = None: it would be re-gathered at once at the
start of the backward) and reduce-scatters it once, when its last gradient is
in. Under pp the old units stay: the root's parameters live on different
stages (the first holds wte, the last ln_f), and each stage gathers once per
step anyway (`StepGather`). A model with no block keeps one unit per module.
Under CPU offload the unit forms (a tied weight gathered once, its gradient
summed before one reduce-scatter, as without offload) but is not kept: the
runtime gathers device copies one by one and re-gathers them in the backward.
A parameter read by an op that runs replicated on fsdp (GPT-2's position
lookup `wpe(arange(T))`, whose indices are not batch-sharded) stays in its
unit when that op's value only feeds batch-sharded work and the unit's
reduce-scatter of it moves no more bytes than the all-reduce it saves (T at
least half the table's rows): its gradient is then each rank's batch share,
summed by the unit's reduce-scatter
(`insert_collectives._partial_gradient_cones`). FSDP2's root holds wpe always;
fxpar's does at full context, without a plain gather of the table or an
all-reduce of the lookup's gradient (2 collectives per step fewer).

         %fsdpgather_wte = fxpar.fsdp_all_gather(%wte, ...)     # <root>, consecutive:
         %fsdpgather_wpe = fxpar.fsdp_all_gather(%wpe, ...)     # one collective
         %fsdpgather_ln_f_weight = fxpar.fsdp_all_gather(%ln_f_weight, ...)
         %embedding = aten.embedding(%fsdpgather_wte, %ids)
         ... blocks, each gathered before its first use ...
         %linear = aten.linear(%ln_f, %fsdpgather_wte)          # lm_head: the same gather
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx
from torch.distributed.tensor.placement_types import Shard

from fxpar.core.errors import PlanError, block_of, module_fqn_of
from fxpar.core.pass_api import PassContext, PassResult, fx_pass
from fxpar.core.spec import FSDP_ROOT_UNIT, NodeInfo, divides, get_info, make_spec, set_info, update_info
from fxpar.ops.transitions import insert_fsdp_all_gather
from fxpar.passes._graph import param_nodes


def _unit(module_fqn: str) -> str:
    """The block a module belongs to (`transformer.h.3.attn` -> `transformer.h.3`), else the module."""
    return block_of(module_fqn) or module_fqn or FSDP_ROOT_UNIT


@fx_pass(requires=("param_placements",), provides=("fsdp_params",))
def apply_fsdp(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    mesh = ctx.mesh
    if not mesh.has("fsdp") or mesh.size("fsdp") == 1:
        return PassResult(gm, False)
    f = mesh.index("fsdp")
    n = mesh.sizes[f]
    group = mesh.group_names[f] if mesh.group_names else "dryrun:fsdp"
    unit = ctx.options.get("fsdp_unit", "block")
    if unit not in ("block", "param"):
        raise PlanError(f"fsdp_unit={unit!r}: use 'block' (one gather per block) or 'param' (one per parameter)")
    sharded_params = []  # (get_attr, info, tp-local spec, even), in graph order
    for node in param_nodes(gm):
        info = get_info(node)
        if info is None or not node.users or not node.meta["val"].requires_grad:
            continue
        spec = info.spec
        # dim 0 must have a static size (an uneven one is padded) and carry no strided (fused-section)
        # shard, whose gather would reorder it
        even = divides(spec.local_shape[0], n) if spec.local_shape else False
        why = None
        if not spec.local_shape:
            why = "not sharded on fsdp: a scalar"
        elif any(not p.is_replicate() and not p.is_shard() and p.dim == 0 for p in spec.placements):
            why = "not sharded on fsdp: dim 0 carries fused sections"
        elif any(p.is_shard() and p.dim == 0 and divides(spec.shape[0], mesh.sizes[m]) is not True
                 for m, p in enumerate(spec.placements) if m != f):
            # a tensor-parallel cut of dim 0 that is itself uneven: its rows differ by rank, even where the
            # padded local size divides by fsdp (3 rows at tp=2: 2 and 1, split over fsdp=2 as 1+1 and 1+0)
            why = f"not sharded on fsdp: dim 0 is cut unevenly by another mesh dim ({spec.shape[0]} rows)"
        elif even is not True and not isinstance(spec.local_shape[0], int):
            why = f"not sharded on fsdp: dim 0 of local size {spec.local_shape[0]} does not divide by fsdp={n}"
        if why is not None:
            update_info(node, style=f"{info.style or 'replicate (default)'}; {why}")
            continue
        sharded = list(spec.placements)
        sharded[f] = Shard(0)
        style = info.style
        if not even:
            rows = spec.local_shape[0]
            style = f"{style or 'replicate (default)'}; fsdp shards dim 0 unevenly: {rows} rows in chunks of " \
                    f"{-(-rows // n)} over fsdp={n}, padded in the collectives"
        set_info(node, dataclasses.replace(info, spec=make_spec(node.meta["val"], tuple(sharded), mesh.sizes),
                                           style=style))
        sharded_params.append((node, info, spec, even))
    if not sharded_params:
        return PassResult(gm, True)
    order = {x: i for i, x in enumerate(gm.graph.nodes)}
    uses = {node: _uses_by_block(node) for node, *_ in sharded_params}
    # FSDP2's root group: only beside blocks (a model without any is left per module, as before) and not
    # under pp, whose stages each hold part of the root's parameters (a stage gathers once per step there)
    in_block = any(block_of(info.module_fqn) for _, info, _, _ in sharded_params)
    rooted = unit == "block" and in_block and ctx.options.get("pp") is None
    root = [p for p in sharded_params if rooted and (block_of(p[1].module_fqn) is None or len(uses[p[0]]) > 1)]
    if root:
        # one gather per root parameter, all of them together before the first use of any of them: one
        # collective, and a tied weight gathered once for all its uses
        first = min((u for p in root for u in p[0].users), key=order.__getitem__)
        for node, *_ in root:
            if order[node] > order[first]:
                first.prepend(node)  # a get_attr has no inputs: it may move up
        for node, info, spec, even in root:
            with gm.graph.inserting_before(first):
                gathered = _gather(gm, node, spec, even, n, group)
            set_info(gathered, NodeInfo(spec=spec, module_fqn=info.module_fqn, role="param",
                                        param_fqn=info.param_fqn, origin="apply_fsdp", fsdp_bucket=FSDP_ROOT_UNIT))
            for u in list(node.users):
                if u is not gathered:
                    u.replace_input_with(node, gathered)
    kept = {p[0] for p in root}
    for node, info, spec, even in sharded_params:
        if node in kept:
            continue
        for users in uses[node].values():
            # Gather right before the first use, so a gathered parameter lives only as long as its layer.
            first = min(users, key=order.__getitem__)
            with gm.graph.inserting_before(first):
                gathered = _gather(gm, node, spec, even, n, group)
            # role "param": downstream it is the parameter (its tp shard must not be gathered either).
            # A weight used in several blocks (tied wte / lm_head) is gathered once per block, on its own
            # (fsdp_unit='param', or under pp).
            bucket = _unit(info.module_fqn) if unit == "block" and len(uses[node]) == 1 else None
            set_info(gathered, NodeInfo(spec=spec, module_fqn=info.module_fqn, role="param",
                                        param_fqn=info.param_fqn, origin="apply_fsdp", fsdp_bucket=bucket))
            for u in users:
                u.replace_input_with(node, gathered)
    return PassResult(gm, True)


def _gather(gm: fx.GraphModule, node: fx.Node, spec, even, n: int, group: str) -> fx.Node:
    gathered = insert_fsdp_all_gather(gm.graph, node, dim=0, mesh_dim_name="fsdp", group_size=n,
                                      group_name=group, full_size=None if even else spec.local_shape[0])
    gathered.meta["val"] = node.meta["val"]
    return gathered


def _uses_by_block(node: fx.Node) -> dict[str, list[fx.Node]]:
    """The users of a parameter grouped by block: one group, or one per block for a weight used in several.

    Each group gets its own gather, so each use's backward reduce-scatters its gradient right away
    instead of holding the full (tensor-parallel local) gradient of the last use's backward until the
    first use's, and the gathered weight is not held between its uses in the forward (GPT-2's tied
    wte / lm_head: from the embedding to the logits, and back)."""
    groups: dict[str, list[fx.Node]] = {}
    for u in node.users:
        groups.setdefault(_unit(module_fqn_of(u)), []).append(u)
    return groups
