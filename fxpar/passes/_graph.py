"""Small graph queries the passes share (not a pass)."""

from __future__ import annotations

import torch
import torch.fx as fx

from fxpar.core.dataflow import differentiable  # noqa: F401  (the passes import it from here)
from fxpar.core.errors import module_fqn_of

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


