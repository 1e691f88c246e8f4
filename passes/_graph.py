"""Small graph queries the passes share (not a pass)."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxpar.errors import module_fqn_of

aten = torch.ops.aten


def param_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """get_attr nodes of tensors (parameters and buffers)."""
    return [n for n in gm.graph.nodes if n.op == "get_attr" and isinstance(n.meta.get("val"), torch.Tensor)]


def module_fqns(gm: fx.GraphModule) -> list[str]:
    """Every module FQN of the captured model, from the module tree and the graph."""
    names = {name for name, _ in gm.named_modules() if name and not name.startswith("_guards")}
    for n in gm.graph.nodes:
        fqn = module_fqn_of(n)
        while fqn:
            names.add(fqn)
            fqn = fqn.rpartition(".")[0]
    return sorted(names)


def uses_as(node: fx.Node) -> set[tuple[object, int]]:
    """(op target, argument position) for every use of `node`."""
    out = set()
    for user in node.users:
        for i, a in enumerate(user.args):
            if a is node:
                out.add((user.target, i))
    return out


def is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def differentiable(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value may carry a gradient at run time.

    Float inputs may (the caller can pass requires_grad tensors), parameters do
    when they require grad, an op's output does if any tensor input does and it
    is floating point; a no-grad region (`wrap_with_set_grad_enabled(False, ...)`)
    produces none.
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
            if isinstance(node.target, torch._ops.HigherOrderOperator) and node.args and node.args[0] is False:
                continue
            if node.target is operator.getitem:
                if node.args[0] in out and floating:
                    out.add(node)
                continue
            if any(a in out for a in node.all_input_nodes) and (
                    floating or isinstance(val, (tuple, list))):
                out.add(node)
    return out
