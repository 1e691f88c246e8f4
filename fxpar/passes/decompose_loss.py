"""decompose_loss: write a captured cross-entropy as ops that run on vocab shards (loss parallel).

Requires: param_placements. Provides: loss_parallel.

`aten.cross_entropy_loss` on (N, V) logits needs every logit of a row, so on a
column-parallel lm_head (logits Shard(1) on tp) its rule would gather them:
(N, V) x (tp-1)/tp bytes per step. Written as Megatron's vocab-parallel
cross-entropy instead, only per-row statistics cross ranks:

    m    = amax(detach(x), 1, keepdim)      # Partial(max) -> all_reduce_max   (N, 1)
    z    = x - m                            # (N, V/tp)
    lse  = log(sum(exp(z), 1, keepdim))     # sum: Partial -> all_reduce       (N, 1)
    ok   = target != ignore_index
    zt   = gather(z, 1, (target * ok)[:, None])   # Partial -> all_reduce      (N, 1)
    rows = (lse - zt)[:, 0] * ok
    loss = sum(rows) / sum(ok)  (mean) | sum(rows) (sum) | rows (none)

The shift m is detached: log-softmax does not depend on it (its gradient is
zero), which is what lets its all-reduce be a max. Batch-sharded rows (dp,
fsdp) give the exact global mean the same way: the row sum and the count are
Partial sums over the data-parallel dims, all-reduced before the division.

`Plan(loss_parallel=None)` decomposes when the logits come from a vocab-sharded
projection (through views), or when the batch is split over dp / fsdp (the
rule of a whole cross_entropy's mean would gather the logits); True forces it (a PlanError when the head is not
vocab-sharded, or the loss has class weights or label smoothing); False
keeps `cross_entropy_loss` whole (its logits are gathered).

Before:  %ce = aten.cross_entropy_loss(%logits, %target)
After:   %ce_detach, %ce_max, %ce_shifted, %ce_exp, %ce_sumexp, %ce_lse, %ce_valid, %ce_safe, ...,
         %ce = aten.div.Tensor(%ce_sum, %ce_count)
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxpar.core.errors import PlanError, node_context
from fxpar.core.pass_api import PassContext, PassResult, fx_pass
from fxpar.core.spec import get_spec
from fxpar.passes._megatron import is_projection, proj_weight
from fxpar.passes.shard_inputs import DATA_DIMS

aten = torch.ops.aten

_VIEWS = (aten.view.default, aten.reshape.default, aten.slice.Tensor, aten._unsafe_view.default,
          aten.contiguous.default, aten.clone.default)


def _vocab_sharded(x: fx.Node, tp: int | None) -> bool:
    """Whether logits `x` come (through views) from a projection whose output features are tp-sharded."""
    if tp is None:
        return False
    cur = x
    while cur.op == "call_function" and cur.target in _VIEWS:
        cur = cur.args[0]
    if not is_projection(cur):
        return False
    spec = get_spec(proj_weight(cur))
    out_dim = 0 if cur.target == aten.linear.default else 1
    return spec is not None and spec.placements[tp].is_shard(out_dim)


def _why_not(node: fx.Node) -> str | None:
    """Why this cross_entropy_loss cannot be decomposed (None: it can)."""
    args = list(node.args) + [None] * (6 - len(node.args))
    weight = node.kwargs.get("weight", args[2])
    smoothing = node.kwargs.get("label_smoothing", args[5]) or 0.0
    x, t = node.args[0], node.args[1]
    if x.meta["val"].ndim != 2 or t.meta["val"].ndim != 1:
        return "its logits are not (N, C) with (N,) class-index targets"
    if t.meta["val"].dtype not in (torch.int64, torch.int32):
        return "its targets are probabilities, not class indices"
    if weight is not None:
        return "it has class weights"
    if smoothing:
        return "it uses label smoothing"
    return None


class _Builder:
    """Creates call_function nodes before `anchor`, each with its FakeTensor and the anchor's source info."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node) -> None:
        self.graph, self.anchor = graph, anchor

    def __call__(self, target, args: tuple, name: str) -> fx.Node:
        vals = fx.node.map_arg(args, lambda a: a.meta["val"])
        with self.graph.inserting_before(self.anchor):
            node = self.graph.create_node("call_function", target, args, name=f"{self.anchor.name}_{name}")
        node.meta["val"] = target(*vals)
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        return node


def _decompose(graph: fx.Graph, ce: fx.Node) -> None:
    args = list(ce.args) + [None] * (6 - len(ce.args))
    reduction = ce.kwargs.get("reduction", args[3] if args[3] is not None else 1)
    ignore = ce.kwargs.get("ignore_index", args[4] if args[4] is not None else -100)
    x, t = ce.args[0], ce.args[1]
    b = _Builder(graph, ce)
    shift = b(aten.amax.default, (b(aten.detach.default, (x,), "detach"), [1], True), "max")
    z = b(aten.sub.Tensor, (x, shift), "shifted")
    lse = b(aten.log.default, (b(aten.sum.dim_IntList, (b(aten.exp.default, (z,), "exp"), [1], True), "sumexp"),),
            "lse")
    valid = b(aten.ne.Scalar, (t, ignore), "valid")
    safe = b(aten.mul.Tensor, (t, valid), "safe_target")
    # The target's rows are the logits' rows (cross_entropy checks it): say so in the shapes (a view,
    # which also checks it at run time), so rows sharded alike on dp / fsdp pick locally.
    safe = b(aten.view.default, (safe, [b(aten.sym_size.int, (x, 0), "rows")]), "row_target")
    picked = b(aten.gather.default, (z, 1, b(aten.unsqueeze.default, (safe, 1), "index")), "target_logit")
    rows = b(aten.squeeze.dim, (b(aten.sub.Tensor, (lse, picked), "nll"), 1), "rows")
    rows = b(aten.mul.Tensor, (rows, valid), "masked")
    if reduction == 0:
        out = rows
    else:
        out = b(aten.sum.default, (rows,), "sum")
        if reduction == 1:
            out = b(aten.div.Tensor, (out, b(aten.sum.default, (valid,), "count")), "mean")
    ce.replace_all_uses_with(out)
    graph.erase_node(ce)


@fx_pass(requires=("param_placements",), provides=("loss_parallel",))
def decompose_loss(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    setting = ctx.plan.loss_parallel
    if setting is False:
        return PassResult(gm, False)
    tp = ctx.mesh.names.index("tp") if ctx.mesh.has("tp") and ctx.mesh.size("tp") > 1 else None
    # a batch split over data-parallel ranks: the decomposed mean reduces (N, 1) rows, not gathered logits
    batch_split = any(n in DATA_DIMS and s > 1 for n, s in zip(ctx.mesh.names, ctx.mesh.sizes))
    modified = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.cross_entropy_loss.default:
            continue
        sharded = _vocab_sharded(node.args[0], tp)
        why = _why_not(node)
        if why is None and not sharded and (setting or not batch_split):
            why = "its logits are not vocab-sharded (no column-parallel lm_head on tp)"
        if why is not None:
            if setting:
                raise PlanError(f"[decompose_loss] {node_context(node)}: loss_parallel=True but this "
                                f"cross_entropy cannot run on vocab shards: {why}; use Plan(loss_parallel=None) "
                                "to compute it on gathered logits, or shard the lm_head 'colwise'")
            continue
        _decompose(gm.graph, node)
        modified = True
    if modified:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)
