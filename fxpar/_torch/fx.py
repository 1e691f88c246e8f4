"""torch.fx internals: the pytree code generation of exported graphs, pytree helpers, higher-order ops."""

from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx
from torch._higher_order_ops import wrap as _wrap
from torch._ops import HigherOrderOperator
from torch.fx._pytree import tree_flatten_spec
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

__all__ = [
    "pytree",
    "tree_flatten_spec",
    "codegen_of",
    "copy_codegen",
    "flat_input_function",
    "out_spec_of",
    "is_higher_order",
    "wrap_set_grad_enabled",
    "CAPTURE_MODULES",
]

CAPTURE_MODULES = ("torch.export._trace", "torch._functorch.aot_autograd", "torch._functorch.partitioners", "networkx")
"""What fxpar's capture imports on its first call (torch.export's tracer, AOTAutograd, the partitioner and its
networkx): fxpar.testing preloads them once in the rank forkserver. Waits for: nothing public names them."""

# Waits for: torch.utils.pytree (public) in this torch version; `pytree` is torch.utils._pytree.
# tree_flatten_spec waits for the same.
wrap_set_grad_enabled = _wrap.wrap_with_set_grad_enabled
"""The higher-order op exported graphs use for `with torch.no_grad():` regions (bodies are submodules)."""


def codegen_of(graph: fx.Graph) -> Any:
    """The graph's code generator (exported graphs flatten inputs and unflatten outputs with pytrees).

    Waits for: a public accessor of fx.Graph's codegen."""
    return graph._codegen


def copy_codegen(src: fx.Graph, dst: fx.Graph) -> None:
    """Gives `dst` the input / output pytree handling of `src`."""
    dst._codegen = src._codegen


def flat_input_function(gm: fx.GraphModule) -> Callable[..., list]:
    """A function mapping forward's (*args, **kwargs) to the graph's flat placeholder values."""
    codegen = gm.graph._codegen
    if not isinstance(codegen, _PyTreeCodeGen):
        return lambda *args, **kwargs: [*args, *kwargs.values()]
    graph = fx.Graph()
    placeholders = [graph.placeholder(n.name) for n in gm.graph.nodes if n.op == "placeholder"]
    graph.output(tuple(placeholders))
    info = codegen.pytree_info
    graph._codegen = _PyTreeCodeGen(_PyTreeInfo(info.orig_args, info.in_spec, None))
    flat = fx.GraphModule({}, graph, class_name="FlattenInputs")
    flat._in_spec = info.in_spec
    return lambda *args, **kwargs: list(flat(*args, **kwargs))


def out_spec_of(gm: fx.GraphModule):
    """The pytree spec of an exported graph's outputs, or None."""
    codegen = gm.graph._codegen
    return codegen.pytree_info.out_spec if isinstance(codegen, _PyTreeCodeGen) else None


def in_spec_of(gm: fx.GraphModule):
    """The pytree spec of an exported graph's (args, kwargs), or None."""
    codegen = gm.graph._codegen
    return codegen.pytree_info.in_spec if isinstance(codegen, _PyTreeCodeGen) else None


def is_higher_order(target: Any) -> bool:
    """A higher-order operator (wrap_with_set_grad_enabled, cond, ...): its bodies are graph submodules.

    Waits for: torch.ops.higher_order's base class made public."""
    return isinstance(target, HigherOrderOperator)


tree_map = pytree.tree_map
wrap_with_autocast = _wrap.wrap_with_autocast
"""The higher-order op exported graphs use for autocast regions."""
