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
    out = _reduce(b, rows, valid, reduction)
    ce.replace_all_uses_with(out)
    graph.erase_node(ce)


_LOG_SOFTMAX = (aten.log_softmax.int, aten._log_softmax.default)
_NLL = (aten.nll_loss_nd.default, aten.nll_loss_forward.default, aten.nll_loss.default)


def _log_softmax_dim(node: fx.Node) -> int | None:
    """The normalized dim of a log_softmax that keeps its input's dtype (None: another node or a cast)."""
    if node.op != "call_function" or node.target not in _LOG_SOFTMAX:
        return None
    if node.target == aten.log_softmax.int:
        dtype = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
        if dtype is not None and dtype != node.args[0].meta["val"].dtype:
            return None
    elif node.args[2]:  # _log_softmax(x, dim, half_to_float=True)
        return None
    ndim = node.args[0].meta["val"].ndim
    return node.args[1] % ndim if ndim else None


def _decompose_log_softmax(graph: fx.Graph, ls: fx.Node, dim: int) -> fx.Node:
    """log_softmax(x, V) on vocab shards: x - max - log(sum(exp(x - max))), only (.., 1) statistics reduced."""
    x = ls.args[0]
    b = _Builder(graph, ls)
    shift = b(aten.amax.default, (b(aten.detach.default, (x,), "detach"), [dim], True), "max")
    z = b(aten.sub.Tensor, (x, shift), "shifted")
    lse = b(aten.log.default, (b(aten.sum.dim_IntList, (b(aten.exp.default, (z,), "exp"), [dim], True), "sumexp"),),
            "lse")
    out = b(aten.sub.Tensor, (z, lse), "log_probs")
    ls.replace_all_uses_with(out)
    graph.erase_node(ls)
    return out


def _nll_args(node: fx.Node) -> tuple[fx.Node | None, int, int]:
    """(class weight, reduction, ignore_index) of an nll_loss node, whatever its overload."""
    args = list(node.args) + [None] * (5 - len(node.args))
    weight = node.kwargs.get("weight", args[2])
    reduction = node.kwargs.get("reduction", args[3] if args[3] is not None else 1)
    ignore = node.kwargs.get("ignore_index", args[4] if args[4] is not None else -100)
    return weight, reduction, ignore


def _decompose_nll(graph: fx.Graph, nll: fx.Node) -> None:
    """nll_loss on vocab-sharded log-probs: the target pick (a Partial, reduced) masked and reduced."""
    _, reduction, ignore = _nll_args(nll)
    lp, t = nll.args[0], nll.args[1]
    b = _Builder(graph, nll)
    valid = b(aten.ne.Scalar, (t, ignore), "valid")
    safe = b(aten.mul.Tensor, (t, valid), "safe_target")
    safe = b(aten.view.default, (safe, [b(aten.sym_size.int, (lp, 0), "rows")]), "row_target")
    picked = b(aten.gather.default, (lp, 1, b(aten.unsqueeze.default, (safe, 1), "index")), "target_logp")
    rows = b(aten.mul.Tensor, (b(aten.neg.default, (b(aten.squeeze.dim, (picked, 1), "picked"),), "nll"), valid),
             "masked")
    out = _reduce(b, rows, valid, reduction)
    nll.replace_all_uses_with(out)
    graph.erase_node(nll)


def _decompose_log_softmax_losses(gm: fx.GraphModule, tp: int | None) -> bool:
    """Hand-written losses on a vocab-sharded head, run as vocab-parallel cross-entropy runs:

        nll_loss(log_softmax(logits, -1), t)          log_softmax and nll_loss both decomposed
        log_softmax(logits, -1).gather(-1, t[..., None])   log_softmax decomposed; the gather's rule
                                                       picks on vocab shards (`fxpar::vocab_parallel_gather`)

    A log_softmax over the vocabulary of a column-parallel head's logits (through views) is written
    as its max / sum-exp statistics, so the logits are never gathered; an nll_loss reading such
    log-probs (through views; (N, C) with (N,) targets, no class weights) becomes the masked pick.
    """
    log_probs: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        dim = _log_softmax_dim(node)
        x = node.args[0] if dim is not None else None
        if x is None or dim != x.meta["val"].ndim - 1 or not _vocab_sharded(x, tp):
            continue
        log_probs.add(_decompose_log_softmax(gm.graph, node, dim))
    if not log_probs:
        return False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _NLL:
            continue
        src = node.args[0]
        while src.op == "call_function" and src.target in _VIEWS:
            src = src.args[0]
        weight, _, _ = _nll_args(node)
        if src in log_probs and weight is None and node.args[0].meta["val"].ndim == 2 \
                and node.args[1].meta["val"].ndim == 1:
            _decompose_nll(gm.graph, node)
    return True


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
    modified |= _decompose_log_softmax_losses(gm, tp)
    if modified:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)


def _reduce(b, rows: fx.Node, valid: fx.Node, reduction: int) -> fx.Node:
    """Per-row losses reduced as the loss op's `reduction` says: 0 none, 1 mean over valid rows, 2 sum."""
    if reduction == 0:
        return rows
    out = b(aten.sum.default, (rows,), "sum")
    if reduction == 1:
        out = b(aten.div.Tensor, (out, b(aten.sum.default, (valid,), "count")), "mean")
    return out
