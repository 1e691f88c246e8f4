"""What a training step's forward keeps for its backward, read from the graph (no run).

Autograd keeps, for each differentiable op, the tensors its backward reads
(`SAVES`: linear keeps its input and weight, layer_norm its input, tanh its
output, add nothing). Views keep their base. A kept tensor is one of:

    activation    a value computed from the inputs: kept from its op to its gradient
    param copy    a parameter cast to mixed precision's param_dtype (`_to_copy` on a parameter's
                  chain), kept by the matmul that reads it: one param_dtype copy per use
    gathered      an FSDP gather's output: freed after the forward and gathered again
                  (reshard_after_forward), so counted by `fxpar.analysis.memory`, not here
    parameter     the local shard itself: already counted as parameters

With activation checkpointing (`gm.meta["activation_checkpointing"]`, regions of node names):

    full          a region keeps only its inputs from outside; its own saves are recomputed
    selective     a region also keeps the outputs of `SELECTIVE_SAVES` (matmuls, attention,
                  reducing collectives), as torch's selective checkpoint contexts do

and the backward of a region re-creates its saves: `recompute` = the largest region's saves
plus its own workspace, held while that region's backward runs (instead of the whole graph's
workspace: the peak is max(workspace, recompute) on top of what is kept).

    kept(gm)      = sum over distinct kept bases b of local_bytes(b)           (`saved_bytes`)
    workspace(gm) = 2 x the largest floating activation (a gradient in, a gradient out)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxpar.analysis.cost import VIEW_OPS
from fxpar.core.dataflow import differentiable
from fxpar.core.spec import TensorSpec, get_info
from fxpar.ops.collectives import COLLECTIVE_OPS

__all__ = ["SavedBytes", "saved_bytes", "SELECTIVE_SAVES"]

aten = torch.ops.aten
_INPUTS = "inputs"  # every floating tensor input
_OUTPUT = "output"  # the output
_NOTHING = "nothing"

# What each op's backward reads; ops not listed read all their floating inputs (an upper bound).
SAVES: dict = {
    aten.add.Tensor: _NOTHING, aten.sub.Tensor: _NOTHING, aten.neg.default: _NOTHING,
    aten.add.Scalar: _NOTHING, aten.sub.Scalar: _NOTHING, aten.mul.Scalar: _NOTHING, aten.div.Scalar: _NOTHING,
    aten._to_copy.default: _NOTHING, aten.to.dtype: _NOTHING, aten.to.dtype_layout: _NOTHING,
    aten.clone.default: _NOTHING, aten.cat.default: _NOTHING, aten.sum.dim_IntList: _NOTHING,
    aten.mean.dim: _NOTHING, aten.embedding.default: _NOTHING, aten.masked_fill.Scalar: _NOTHING,
    aten.tanh.default: _OUTPUT, aten.sigmoid.default: _OUTPUT, aten.exp.default: _OUTPUT,
    aten._softmax.default: _OUTPUT, aten.softmax.int: _OUTPUT, aten.relu.default: _OUTPUT,
    aten.scaled_dot_product_attention.default: "inputs+output",
}
"""Ops missing here keep all their floating inputs."""

SELECTIVE_SAVES = frozenset({
    aten.linear.default, aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
    aten.matmul.default, aten.scaled_dot_product_attention.default,
    torch.ops.fxpar.all_reduce.default, torch.ops.fxpar.reduce_scatter.default, torch.ops.fxpar.all_to_all.default,
})
"""Graph-level ops whose outputs selective checkpointing keeps (their aten kernels are the runtime's
`fxpar.runtime.checkpointing.SAVED_OPS`)."""

_PARAM_CHAIN = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, *COLLECTIVE_OPS} - {
    torch.ops.fxpar.fsdp_all_gather.default}
_GATHER = torch.ops.fxpar.fsdp_all_gather.default


@dataclass(frozen=True)
class SavedBytes:
    """Local bytes a forward keeps for the backward, by kind (see the module docstring)."""

    activations: int
    param_copies: int
    recompute: int
    workspace: int


def _bytes(node: fx.Node) -> int:
    info = get_info(node)
    spec = info.spec if info is not None else None
    if isinstance(spec, tuple):
        return sum(s.nbytes(local=True) for s in spec if isinstance(s, TensorSpec) and s.dtype.is_floating_point)
    if isinstance(spec, TensorSpec) and spec.dtype.is_floating_point:
        return spec.nbytes(local=True)
    return 0


def _base(node: fx.Node) -> fx.Node:
    """The node whose storage `node` views."""
    while node.op == "call_function" and node.target in VIEW_OPS and node.args \
            and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _kind(base: fx.Node) -> str:
    """'parameter', 'param_copy', 'gathered' or 'activation' (see the module docstring)."""
    if base.op == "get_attr":
        return "parameter"
    if base.op == "placeholder":
        return "input"
    if base.target is _GATHER:
        return "gathered"
    node = base
    while node.op == "call_function" and (node.target in _PARAM_CHAIN or node.target in VIEW_OPS) and node.args \
            and isinstance(node.args[0], fx.Node):
        node = node.args[0]
        if node.op == "get_attr":
            return "param_copy"
    return "activation"


def _saves(node: fx.Node) -> list[fx.Node]:
    """The values `node`'s backward reads."""
    how = SAVES.get(node.target, _INPUTS)
    if node.target is operator.getitem or node.target in VIEW_OPS or how == _NOTHING:
        return []
    if node.target is torch.ops.fxpar.sharded_dropout.default:  # its scale (output 1), as large as its input
        return [node]
    if node.target in COLLECTIVE_OPS:  # their duals read nothing
        return []
    ins = [a for a in node.all_input_nodes if _bytes(a)]
    if how == _OUTPUT:
        return [node]
    if how == "inputs+output":
        return ins + [node]
    return ins


def _regions(gm: fx.GraphModule) -> tuple[str | None, list[set[str]]]:
    plan = gm.meta.get("activation_checkpointing")
    if plan is None:
        return None, []
    return plan.mode, [set(r.nodes) for r in plan.regions]


def saved_bytes(gm: fx.GraphModule) -> SavedBytes:
    """What one forward of `gm` keeps for its backward, at the example sizes, with its checkpointing plan."""
    grad = differentiable(gm)
    mode, regions = _regions(gm)
    region_of = {name: k for k, names in enumerate(regions) for name in names}
    kept: dict[fx.Node, str] = {}
    inside: list[dict[fx.Node, int]] = [{} for _ in regions]
    largest_in = [0] * len(regions)
    largest = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target not in VIEW_OPS and _kind(node) == "activation":  # gathered weights: memory's F
            largest = max(largest, _bytes(node))
            if node.name in region_of:
                largest_in[region_of[node.name]] = max(largest_in[region_of[node.name]], _bytes(node))
        if node not in grad:
            continue
        k = region_of.get(node.name)
        for value in _saves(node):
            base = _base(value)
            if k is None:
                kept[base] = _kind(base)
                continue
            inside[k][base] = _bytes(base)
        if k is None:
            continue
        for value in node.all_input_nodes:  # the region's inputs from outside: kept by the checkpoint
            if value.name not in regions[k] and _bytes(value):
                kept[_base(value)] = _kind(_base(value))
        if mode == "selective" and node.target in SELECTIVE_SAVES:
            kept[node] = _kind(node)
    acts = sum(_bytes(b) for b, kind in kept.items() if kind == "activation")
    copies = sum(_bytes(b) for b, kind in kept.items() if kind == "param_copy")
    recompute = max((sum(v for b, v in saves.items() if b not in kept and _kind(b) == "activation")
                     + 2 * largest_in[k] for k, saves in enumerate(inside)), default=0)
    return SavedBytes(acts, copies, recompute, 2 * largest)
