"""Finding Megatron's structure in a graph (not a pass; used by annotate_parameters).

An MLP is a linear A whose output reaches a linear B only through
elementwise ops (activations, gating products with another such linear,
dropout), with nothing else consuming the intermediate: A (and its gating
siblings) go column-parallel, B row-parallel, and the only communication is
one all-reduce of B's output. Found from the graph's dataflow, not from
module names.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxpar.rules import lookup
from fxpar.rules.pointwise import add, div, linear_unary, mul, nonlinear

aten = torch.ops.aten
_ELEMENTWISE = {nonlinear, linear_unary, mul, add, div}


def _elementwise(node: fx.Node) -> bool:
    return node.op == "call_function" and lookup(node.target) in _ELEMENTWISE


def _is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target == aten.linear.default


def find_mlp_pairs(gm: fx.GraphModule) -> list[tuple[list[fx.Node], fx.Node]]:
    """[(column-parallel linears, row-parallel linear)] in graph order."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    pairs = []
    claimed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if not _is_linear(node) or node in claimed:
            continue
        # Walk forward from A through elementwise ops; collect the region.
        region, frontier, heads, sink = {node}, [node], {node}, None
        ok = True
        while frontier and ok:
            cur = frontier.pop()
            for user in cur.users:
                if user in region:
                    continue
                if _is_linear(user) and user.args[0] is cur and sink in (None, user):
                    sink = user
                elif _elementwise(user):
                    region.add(user)
                    frontier.append(user)
                    # Other operands of a gating product must be linears of the same input, or constants.
                    for other in user.all_input_nodes:
                        if other in region:
                            continue
                        if _is_linear(other) and other.args[0] is node.args[0]:
                            region.add(other)
                            heads.add(other)
                            frontier.append(other)
                        elif other.op not in ("get_attr",) and other.meta.get("val") is not None \
                                and getattr(other.meta["val"], "ndim", 0) > 0:
                            ok = False
                else:
                    ok = False
        if ok and sink is not None and len(heads) <= 3:
            pairs.append((sorted(heads, key=order.__getitem__), sink))
            claimed |= heads | {sink}
    return pairs
