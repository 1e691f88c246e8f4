"""split_linear_bias: add a row-parallel linear's bias after the reduction.

Requires: param_placements. Provides: canonical.

A row-parallel linear produces Partial sums; adding the (replicated) bias on
every rank would add it tp times (DESIGN.md pitfall). Splitting the bias into
its own add lets propagation put the all-reduce between the two, exactly where
Megatron adds it.

Before:  %y = aten.linear(%h, %down_weight, %down_bias)        # weight Shard(1)
After:   %y_nobias = aten.linear(%h, %down_weight)
         %y  = aten.add.Tensor(%y_nobias, %down_bias)
(and likewise addmm(bias, x, w) with w Shard(0) -> add(mm(x, w), bias): HF's Conv1D;
and conv2d(x, w, b) with w Shard(1) -> add(conv2d(x, w, None), view(b, [-1, 1, 1])))

With `Plan(sequence_parallel=True)`, a Conv1D's bias is added after the view that
restores (B, T, C) (the same elementwise sum): the Partial product then reaches
a 3-D add, where propagation reduce-scatters it along the sequence.

Before:  %y = aten.view(aten.addmm(%b, %x2d, %w), [B, T, C])
After:   %y = aten.add.Tensor(aten.view(aten.mm(%x2d, %w), [B, T, C]), %b)
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxpar.core.pass_api import PassContext, PassResult, fx_pass
from fxpar.core.spec import get_spec
from fxpar.rules.conv import CONVS

aten = torch.ops.aten


@fx_pass(requires=("param_placements",), provides=("canonical",))
def split_linear_bias(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    modified = False
    for node in list(gm.graph.nodes):
        if node.target == aten.linear.default and len(node.args) >= 3 and node.args[2] is not None:
            x, w, b = node.args[:3]
            target, args, reduced_dim = aten.linear.default, (x, w), 1
        elif node.target == aten.addmm.default and not node.kwargs:  # Conv1D: addmm(bias, x, w[in, out])
            b, x, w = node.args[:3]
            target, args, reduced_dim = aten.mm.default, (x, w), 0
        elif node.target in CONVS and len(node.args) >= 3 and node.args[2] is not None and not node.kwargs:
            x, w, b = node.args[:3]
            target, args, reduced_dim = node.target, (x, w, None, *node.args[3:]), 1
        else:
            continue
        w_spec = get_spec(w) if isinstance(w, fx.Node) else None
        if w_spec is None or not any(p.is_shard(reduced_dim) for p in w_spec.placements):
            continue
        with gm.graph.inserting_before(node):
            mm = gm.graph.create_node("call_function", target, args, name=f"{node.name}_nobias")
            mm.meta.update({k: v for k, v in node.meta.items() if k != "fxpar"})
            if target in CONVS:  # the bias broadcasts over the spatial dims: (Co,) -> (Co, 1, ..., 1)
                shape = [-1] + [1] * (w.meta["val"].ndim - 2)
                b_view = gm.graph.create_node("call_function", aten.view.default, (b, shape), name=f"{node.name}_bias")
                b_view.meta.update({k: v for k, v in node.meta.items() if k not in ("fxpar", "val")})
                b_view.meta["val"] = b.meta["val"].view(shape)
                b = b_view
        node.target = aten.add.Tensor
        node.args = (mm, b)
        modified = True
        if ctx.plan.sequence_parallel:
            _add_after_view(gm.graph, node)
    return PassResult(gm, modified)


def _add_after_view(graph: fx.Graph, add: fx.Node) -> None:
    """add(mm, b) whose only user is a view to more dims -> add(view(mm), b): the bias broadcasts alike."""
    (view,) = add.users if len(add.users) == 1 else (None,)
    if view is None or view.target not in (aten.view.default, aten.reshape.default) or view.args[0] is not add:
        return
    mm, b = add.args
    if view.meta["val"].ndim <= add.meta["val"].ndim or b.meta["val"].ndim != 1:
        return
    view.args = (mm, *view.args[1:])
    view.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
    add.args = (view, b)
    add.meta["val"] = view.meta["val"]
    view.append(add)  # the add now follows the view
