"""Graph queries the passes, the runtime and the checks share: which values can carry a gradient, and
the tensor a get_attr node names."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from fxpar._torch.fx import is_higher_order

__all__ = ["differentiable", "attr_of", "computes_no_value"]


def attr_of(gm: torch.nn.Module, target: str) -> Any:
    """The object a get_attr target names on `gm` (a parameter, a buffer, a subgraph)."""
    mod, _, name = str(target).rpartition(".")
    return getattr(gm.get_submodule(mod) if mod else gm, name)


def computes_no_value(node: fx.Node) -> bool:
    """A call whose result is None (`aten._assert_tensor_metadata`): no value, so no gradient flows through it."""
    return node.op == "call_function" and "val" in node.meta and node.meta["val"] is None


def differentiable(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value may carry a gradient at run time.

    Float inputs may (the caller can pass requires_grad tensors), parameters do
    when they require grad, an op's output does if any tensor input does and it
    is floating point; a no-grad region (`wrap_with_set_grad_enabled(False, ...)`)
    produces none, and neither does `aten.detach`.
    """
    out: set[fx.Node] = set()
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        floating = isinstance(val, torch.Tensor) and val.dtype.is_floating_point
        if node.op == "placeholder":
            if floating:
                out.add(node)
        elif node.op == "get_attr":
            if floating and val.requires_grad:
                out.add(node)
        elif node.op == "call_function":
            if is_higher_order(node.target) and node.args and node.args[0] is False:
                continue
            if node.target is torch.ops.aten.detach.default:
                continue  # cut from the autograd graph (a softmax's shift, fxpar.passes.decompose_loss)
            if node.target is operator.getitem:
                if node.args[0] in out and floating:
                    out.add(node)
                continue
            if any(a in out for a in node.all_input_nodes) and (
                    floating or isinstance(val, (tuple, list))):
                out.add(node)
    return out
