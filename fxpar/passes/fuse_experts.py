"""fuse_experts: replace each Mixture-of-Experts experts module by one `moe_experts` node.

Requires: captured. Provides: experts_fused.

An experts module computes, for tokens x (T, H) routed to experts idx (T, k)
with weights w (T, k), out[t] = sum_j w[t, j] FFN_{idx[t, j]}(x[t]) on stacked
3-D expert weights. Its captured form (sort by expert, histogram, grouped
matmuls, un-permute, sum over k) couples the rows of the batch, so no rule can
shard it piece by piece; as one node (`fxpar.ops.moe.moe_experts`) it is
per-token, and its rule (`fxpar.rules.moe`) shards the experts by feature (tp)
or by index (ep) with the tokens split over the data dims.

Recognised modules (by their parameters, from the graph's get_attr FQNs):

    Hugging Face (Mixtral, Qwen2/3-MoE, ...)   gate_up_proj (E, 2I, H) [gate; up], down_proj (E, H, I)
    torchtitan GroupedExperts                  w1 (E, I, H) gate, w3 (E, I, H) up, w2 (E, H, I) down

The module's nodes (every call_function whose module stack is the experts
module or below it) must read exactly the tokens, the routing indices and the
routing weights, use exactly those parameters and one activation, and produce
one value of x's shape; anything else (biases, clamps, transposed layouts) is
left as captured: replicated experts, exact.

Before:  %sort = aten.sort(%reshape_6) ... %grouped_mm_fallback(...) ... %to_14 = aten.to(%sum_2)
After:   %moe_experts = fxpar.ops.moe.moe_experts(%view_3, %getitem_1, %div_, %gate_up_proj, None,
                                                  %down_proj, 4, 'silu')
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from fxpar.core.errors import module_fqn_of
from fxpar.core.pass_api import PassContext, PassResult, fx_pass
from fxpar.ops.moe import moe_experts
from fxpar.rules import tensor_args

log = logging.getLogger(__name__)
aten = torch.ops.aten

# (gate, up, down) parameter names of each recognised layout; up None: gate is the fused [gate; up]
_LAYOUTS = (("gate_up_proj", None, "down_proj"), ("w1", "w3", "w2"))
_ACTS = {aten.silu.default: "silu", aten.gelu.default: "gelu", aten.relu.default: "relu"}


def _expert_modules(gm: fx.GraphModule) -> dict[str, dict[str, fx.Node]]:
    """module FQN -> {param name: get_attr node} for modules holding a recognised set of 3-D weights."""
    params: dict[str, dict[str, fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and isinstance(node.meta.get("val"), torch.Tensor):
            mod, _, name = str(node.target).rpartition(".")
            params.setdefault(mod, {})[name] = node
    found = {}
    for mod, named in params.items():
        for layout in _LAYOUTS:
            names = {n for n in layout if n}
            if names == set(named) and all(named[n].meta["val"].ndim == 3 for n in names):
                found[mod] = named
    return found


def _in_module(node: fx.Node, mod: str) -> bool:
    fqn = module_fqn_of(node)
    return fqn == mod or fqn.startswith(mod + ".")


def _match(gm: fx.GraphModule, mod: str, named: dict[str, fx.Node]) -> tuple | None:
    """(region nodes, output node, x, idx, weights, gate, up, down, act) or None with the reason logged."""
    region = [n for n in gm.graph.nodes if n.op == "call_function" and _in_module(n, mod)]
    members = set(region)
    external = []
    for n in region:
        for a in tensor_args(n):
            if a not in members and a not in external:
                external.append(a)
    params = [a for a in external if a.op == "get_attr"]
    inputs = [a for a in external if a.op != "get_attr"]
    # Size arithmetic (SymInt nodes) the export shares with later layers stays; tensors must not leak.
    outputs = [n for n in region if any(u not in members for u in n.users) and isinstance(n.meta.get("val"), torch.Tensor)]
    acts = {_ACTS[n.target] for n in region if n.target in _ACTS}

    def skip(why: str) -> None:
        log.info("fuse_experts: %s stays as captured: %s", mod, why)

    if set(params) != set(named.values()):
        return skip("it reads other parameters or buffers")
    if len(outputs) != 1 or len(acts) != 1 or len(inputs) != 3:
        return skip(f"{len(outputs)} outputs, activations {sorted(acts)}, {len(inputs)} tensor inputs")
    ints = [a for a in inputs if not a.meta["val"].is_floating_point()]
    floats = [a for a in inputs if a.meta["val"].is_floating_point()]
    if len(ints) != 1 or len(floats) != 2 or any(a.meta["val"].ndim != 2 for a in inputs):
        return skip("its inputs are not tokens (T, H), indices (T, k) and weights (T, k)")
    idx = ints[0]
    k = idx.meta["val"].shape[1]
    wts = [a for a in floats if a.meta["val"].shape[1] == k and a.meta["val"].shape[0] == idx.meta["val"].shape[0]]
    xs = [a for a in floats if a not in wts[:1]]
    if not wts or len(xs) != 1:
        return skip("its inputs are not tokens (T, H), indices (T, k) and weights (T, k)")
    x, w = xs[0], wts[0]
    layout = next(lay for lay in _LAYOUTS if {n for n in lay if n} == set(named))
    gate, up, down = (named[n] if n else None for n in layout)
    e, f, h = gate.meta["val"].shape
    hidden = x.meta["val"].shape[1]
    inter = f if up is not None else f // 2
    shapes_ok = (h == hidden and tuple(down.meta["val"].shape) == (e, hidden, inter)
                 and (up is None or tuple(up.meta["val"].shape) == (e, inter, hidden)))
    out = outputs[0]
    if not shapes_ok or tuple(out.meta["val"].shape) != tuple(x.meta["val"].shape):
        return skip("its weights are not (E, I, H) / (E, H, I) for tokens of width H")
    return region, out, x, idx, w, gate, up, down, acts.pop()


@fx_pass(requires=("captured",), provides=("experts_fused",))
def fuse_experts(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    modified = False
    for mod, named in _expert_modules(gm).items():
        m = _match(gm, mod, named)
        if m is None:
            continue
        region, out, x, idx, w, gate, up, down, act = m
        with gm.graph.inserting_before(out):
            xv, wv = x.meta["val"], w.meta["val"]
            if wv.dtype != xv.dtype:
                # The routing weights widen to the tokens' dtype inside the module anyway; widened here, a
                # partial gradient (tp) is summed before it narrows back (rounding parts, then adding, is
                # not rounding the sum).
                w = gm.graph.call_function(aten.to.dtype, (w, xv.dtype))
                w.meta["val"] = wv.to(xv.dtype)
                w.meta["nn_module_stack"] = out.meta.get("nn_module_stack")
            node = gm.graph.call_function(
                moe_experts, (x, idx, w, gate, up, down, int(gate.meta["val"].shape[0]), act))
        for key in ("val", "nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in out.meta:
                node.meta[key] = out.meta[key]
        out.replace_all_uses_with(node)
        for n in reversed(region):
            if not n.users:
                gm.graph.erase_node(n)
        modified = True
    if modified:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)
