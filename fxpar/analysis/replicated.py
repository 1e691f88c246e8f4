"""Parameters left whole on tp, each with the reason, for explain() (issue 17).

A parameter is replicated on tp when its module is in no tensor-parallel style (the planner found
no column / row-parallel pair for it, or the plan says 'replicate'), or when its style keeps it
whole (a row-parallel bias). The reason comes, in this order, from the planner's own note (heads
or sizes that do not divide), the plan, or the op that reads the parameter:

    norm weights / biases     norms see whole hidden vectors (sequence parallel shards tokens)
    row-parallel biases       added once, after the block's all-reduce
    routers                   every rank scores every expert
    projections / convs       in no column / row-parallel pair the planner found
    tables, raw tensors       looked up / added / concatenated with whole activations
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from fxpar.core.dataflow import attr_of
from fxpar.core.fmt import fmt_bytes
from fxpar.core.spec import TensorSpec, get_info

aten = torch.ops.aten

_NORMS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
          aten.group_norm.default, aten.native_group_norm.default}
_PROJ = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default, aten.einsum.default,
         aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default}
_THROUGH_ROLES = ("collective", "marker", "view")
_CASTS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.t.default, aten.view.default,
          aten.reshape.default, aten.expand.default, aten.unsqueeze.default, aten.permute.default,
          aten.transpose.int}
_SCORES = {aten.softmax.int, aten._softmax.default, aten.sigmoid.default, aten._to_copy.default, aten.to.dtype,
           aten.to.dtype_layout}


@dataclass(frozen=True)
class ReplicatedInfo:
    """One parameter whole on every tp rank: its original FQN, shape, bytes and why."""

    fqn: str
    shape: tuple[int, ...]
    nbytes: int
    reason: str


def _readers(node: fx.Node, depth: int = 4) -> list[fx.Node]:
    """The compute ops reading `node`, through collectives, markers, views and casts."""
    out = []
    for user in node.users:
        info = get_info(user)
        passthrough = (info is not None and info.role in _THROUGH_ROLES) or user.target in _CASTS
        if passthrough and depth > 0:
            out.extend(_readers(user, depth - 1))
        else:
            out.append(user)
    return out


def _feeds_topk(node: fx.Node, depth: int = 3) -> bool:
    """Whether `node` is scored for a top-k (through softmax / sigmoid / casts): a router's logits."""
    return depth >= 0 and any(u.target == aten.topk.default or (u.target in _SCORES and _feeds_topk(u, depth - 1))
                              for u in node.users)


def _is_rms_scale(mul: fx.Node, depth: int = 4) -> bool:
    """A decomposed RMSNorm's `weight * x * rsqrt(...)`: an rsqrt among the other operand's producers."""
    stack = [(a, 0) for a in mul.args if isinstance(a, fx.Node)]
    while stack:
        n, d = stack.pop()
        if n.target == aten.rsqrt.default:
            return True
        if d < depth:
            stack.extend((a, d + 1) for a in n.all_input_nodes)
    return False


def _reason(node: fx.Node, info, tp: int) -> str:
    style = info.style or ""
    if style.startswith("replicate (not sharded: "):
        return "not sharded: " + style[len("replicate (not sharded: "):-1]
    if style == "replicate":
        return "the plan maps its module to 'replicate'"
    readers = _readers(node)
    targets = {r.target for r in readers}
    if targets & _NORMS or any(r.target == aten.mul.Tensor and _is_rms_scale(r) for r in readers):
        return "a norm's scale / shift: norms run on whole hidden vectors (sequence parallel shards their tokens, not it)"
    if aten.batch_norm.default in targets:
        return "a batch norm outside a channel-parallel conv pair: its channels are whole there"
    if style.startswith("rowwise"):
        return "a row-parallel bias: added once, after the all-reduce"
    if targets & _PROJ:
        if any(_feeds_topk(r) for r in readers if r.target in _PROJ):
            return "a router: every rank scores every expert (experts x hidden, small)"
        return "its projection is in no column / row-parallel pair the planner found (input and output whole on tp)"
    if aten.embedding.default in targets:
        return "a lookup table not summed with a vocab-parallel token embedding"
    if targets & {aten.add.Tensor, aten.cat.default, aten.sub.Tensor}:
        return "added to or concatenated with activations that are whole on tp"
    return "read by ops that run on whole (replicated) values on tp: " + \
        ", ".join(sorted(str(t) for t in targets)[:3])


def replicated_parameters(graphs: list[fx.GraphModule], mesh) -> list[ReplicatedInfo]:
    """Every nn.Parameter whole on the 'tp' mesh dim of `graphs`, tied weights once ([] without tp)."""
    if "tp" not in mesh.names or mesh.sizes[mesh.names.index("tp")] < 2:
        return []
    m = mesh.names.index("tp")
    tp = mesh.sizes[m]
    out, seen = [], set()
    for gm in graphs:
        for node in sorted((n for n in gm.graph.nodes if n.op == "get_attr"), key=lambda n: not n.users):
            info = get_info(node)
            if info is None or info.role != "param" or not isinstance(info.spec, TensorSpec):
                continue
            t = attr_of(gm, node.target)
            if not isinstance(t, nn.Parameter) or id(t) in seen:
                continue
            seen.add(id(t))
            if not info.spec.placements[m].is_replicate() or not node.users:
                continue
            fqn = info.param_fqn or str(node.target)
            out.append(ReplicatedInfo(fqn, tuple(int(s) for s in info.spec.shape), info.spec.nbytes(),
                                      _reason(node, info, tp)))
    return out


def replicated_lines(graphs: list[fx.GraphModule], mesh) -> list[str]:
    """explain()'s section: each replicated parameter, its bytes and why."""
    found = replicated_parameters(graphs, mesh)
    if not found:
        return []
    total = sum(r.nbytes for r in found)
    lines = [f"Replicated on tp ({len(found)} parameters, {fmt_bytes(total)} on every rank; why):"]
    lines.extend(f"  {r.fqn} {list(r.shape)}: {r.reason}" for r in found)
    return lines
