"""The sharding rule table and its registry: one small function per op family, registered here.

A rule answers, for one node and one mesh dim: given the placements its tensor
inputs have now, which (input placements -> output placement) strategies can
compute it exactly? The propagation pass prices each strategy by the
communication needed to bring the inputs to it (forward and backward) and
picks the cheapest, earlier strategies winning ties. Rules only *follow*
placements that already exist (on inputs or parameters); they never invent a
new sharding of an activation, which keeps plans predictable (Megatron's
layouts fall out of the parameter placements).

Rules are registered against `OpOverload`s here and nowhere else:

    @register(aten.gelu.default, aten.relu.default)
    def _unary(op: OpInfo, cur: Placements) -> list[Strategy]: ...

An op with no rule takes the fallback: all inputs Replicate, output Replicate.
Some ops also need their non-tensor arguments rewritten for local shapes (a
view's target shape); those register a `localize` function with the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Partial, Placement, Replicate, Shard

__all__ = [
    "OpInfo",
    "Strategy",
    "RuleFn",
    "LocalizeFn",
    "register",
    "allows_uneven",
    "lookup",
    "lookup_localize",
    "tensor_args",
    "replace_tensor_args",
    "has_rule",
]


@dataclass(frozen=True)
class Strategy:
    """One way to compute a node on one mesh dim.

    Attributes:
        inputs: the placement each tensor input needs (positional, see tensor_args).
        output: the output placement (a tuple for multi-output ops).
    """

    inputs: tuple[Placement, ...]
    output: Placement | tuple[Placement | None, ...]


@dataclass(frozen=True)
class OpInfo:
    """What a rule may look at.

    Attributes:
        node: the node.
        in_vals: the global FakeTensor of each tensor input (positional).
        out_val: the node's global FakeTensor (or tuple of them).
        mesh_size: the size of the mesh dim being decided.
    """

    node: fx.Node
    in_vals: tuple[Any, ...]
    out_val: Any
    mesh_size: int

    @property
    def args(self) -> tuple:
        return self.node.args

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Positional argument i, or keyword `name`, or the default."""
        if len(self.node.args) > i:
            return self.node.args[i]
        return self.node.kwargs.get(name, default)


Placements = tuple[Placement | None, ...]
RuleFn = Callable[[OpInfo, Placements], list[Strategy]]
LocalizeFn = Callable[[fx.Node, Any, Any], None]
"""localize(node, info: NodeInfo, mesh: MeshInfo): rewrite node's non-tensor args for local shapes."""

_RULES: dict[Any, RuleFn] = {}
_LOCALIZERS: dict[Any, LocalizeFn] = {}
_UNEVEN: set[Any] = set()


def register(*ops: Any, localize: LocalizeFn | None = None, uneven: bool = False) -> Callable[[RuleFn], RuleFn]:
    """Registers `fn` as the rule of every op in `ops` (OpOverloads).

    `uneven=True`: the rule's strategies stay exact on uneven shards (torch.chunk's rows, a dim that does
    not divide by the mesh dim): ops that compute element by element or contract over the sharded dim,
    with no shape arguments and no arithmetic on chunk sizes or offsets (pointwise, linear, mm). Other ops
    never see an uneven shard: propagate_sharding gathers it first.
    """

    def deco(fn: RuleFn) -> RuleFn:
        for op in ops:
            if op in _RULES:
                raise KeyError(f"{op} already has a sharding rule ({_RULES[op].__name__})")
            _RULES[op] = fn
            if localize is not None:
                _LOCALIZERS[op] = localize
            if uneven:
                _UNEVEN.add(op)
        return fn

    return deco


def allows_uneven(target: Any) -> bool:
    """Whether `target`'s rule is exact on uneven shards (`register(..., uneven=True)`)."""
    return target in _UNEVEN




def lookup(target: Any) -> RuleFn | None:
    return _RULES.get(target)


def lookup_localize(target: Any) -> LocalizeFn | None:
    return _LOCALIZERS.get(target)


def has_rule(target: Any) -> bool:
    return lookup(target) is not None


def _is_tensor_node(a: Any) -> bool:
    return isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)


def _flat(items: Any, out: list) -> None:
    # pytree's order for args/kwargs (lists, tuples, dict values), without its generality's cost;
    # a loop over the items (not a call per leaf): shape lists of ints are common and long
    for y in items:
        if isinstance(y, fx.Node):
            if isinstance(y.meta.get("val"), torch.Tensor):
                out.append(y)
        elif isinstance(y, (list, tuple)):
            _flat(y, out)
        elif isinstance(y, dict):
            _flat(y.values(), out)


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The tensor-valued node arguments of `node`, positionally (args, then kwargs)."""
    out: list[fx.Node] = []
    _flat(node.args, out)
    if node.kwargs:
        _flat(node.kwargs.values(), out)
    return out


def _replaced(x: Any, it) -> Any:
    # tensor_args' walk, rebuilding only the containers that hold a replaced node
    if isinstance(x, (list, tuple)):
        items = [_replaced(y, it) for y in x]
        if all(a is b for a, b in zip(items, x)):
            return x
        return items if isinstance(x, list) else tuple(items)
    if isinstance(x, dict):
        items = {k: _replaced(y, it) for k, y in x.items()}
        if all(items[k] is y for k, y in x.items()):
            return x
        return items
    return next(it) if _is_tensor_node(x) else x


def replace_tensor_args(node: fx.Node, new: Sequence[fx.Node]) -> None:
    """Replaces the tensor arguments of `node`, positionally, with `new`."""
    it = iter(new)
    args, kwargs = _replaced(node.args, it), _replaced(node.kwargs, it)
    # each assignment re-walks args and kwargs to update users: assign only what changed
    if args is not node.args:
        node.args = tuple(args)
    if kwargs is not node.kwargs:
        node.kwargs = dict(kwargs)


# --------------------------------------------------------------------------- shared helpers for rules

R = Replicate()
P = Partial()


def S(d: int) -> Shard:
    return Shard(d)


def norm_dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def all_replicate(op: OpInfo) -> Strategy:
    n_out = len(op.out_val) if isinstance(op.out_val, (tuple, list)) else None
    out = tuple(R for _ in range(n_out)) if n_out is not None else R
    return Strategy(tuple(R for _ in op.in_vals), out)
