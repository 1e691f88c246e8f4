"""propagate_sharding: choose a placement for every value, op by op.

Requires: param_placements, canonical. Provides: specs.

Walks the graph in order. Inputs carry the placements `shard_inputs` gave them
(batch-sharded on dp / fsdp, else Replicate); parameters carry the plan's. For each op and each mesh
dim, the op's rule lists exact strategies given the inputs' current
placements; the cheapest wins, where the price of a strategy is

    sum over inputs i of  bytes moved to bring input i to its required placement,
                          forward and backward (the duals in fxpar.ops.collectives)
    + for each Replicate input of an op whose output is not Replicate:
                          the backward all-reduce of its partial gradient
    + if the output is Replicate although an input arrives sharded:
                          2 (n-1)/n x output bytes (redundant compute, and the
                          reshard that usually follows)
    + 1e18 for gathering a sharded parameter (the plan is binding)

and ties go to the rule's earlier strategy. An op without a rule runs on
Replicate inputs (the always-correct fallback, marked for explain()). Every
output of the graph must be Replicate, except a batch-sharded output on the
data-parallel dims (the runtime gathers it, or computes the loss per shard).

After:   meta["fxpar"] = NodeInfo(spec=TensorSpec(placements, shape, local_shape, dtype),
                                  input_placements=<what the chosen strategy needs>)
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Placement, Replicate, Shard

from fxpar.core.errors import ShardingError, module_fqn_of, node_context
from fxpar.core.mesh import MeshInfo
from fxpar.core.pass_api import PassContext, PassResult, fx_pass
from fxpar.core.spec import NodeInfo, TensorSpec, divides, get_info, make_spec, set_info, size_hint, size_key
from fxpar.ops.collectives import COLLECTIVE_OPS, op_cost, transition_cost
from fxpar.passes._graph import differentiable, is_tensor
from fxpar.passes.shard_inputs import DATA_DIMS
from fxpar.rules import OpInfo, Strategy, all_replicate, allows_uneven, lookup, tensor_args


def _bytes(val, placements, mesh: MeshInfo, skip: int) -> float:
    """Bytes of the part of a tensor that mesh dim `skip` sees (other dims' shards divided out)."""
    numel = 1
    for s in val.shape:
        numel *= size_hint(s)
    for m, p in enumerate(placements):
        if m != skip and p is not None and p.is_shard():
            numel /= mesh.sizes[m]
    return numel * val.dtype.itemsize


def _feasible(strategy: Strategy, op: OpInfo, n: int, cur: tuple) -> bool:
    """False if a required shard does not divide (statically known), unless the op's rule is exact on
    uneven shards (`allows_uneven`: torch.chunk's rows) and each uneven input is already so sharded or
    replicated (cut locally): a Partial or other shard would need an uneven reduce_scatter / all_to_all."""
    vals = list(op.in_vals)
    places = list(strategy.inputs)
    outs = op.out_val if isinstance(op.out_val, (tuple, list)) else (op.out_val,)
    out_places = strategy.output if isinstance(strategy.output, tuple) else (strategy.output,)
    uneven_ok = None
    for i, (v, p) in enumerate([*zip(vals, places), *zip(outs, out_places)]):
        if isinstance(p, Shard) and isinstance(v, torch.Tensor):
            if p.dim >= v.ndim:
                return False
            if divides(v.shape[p.dim], n) is False:
                uneven_ok = allows_uneven(op.node.target) if uneven_ok is None else uneven_ok
                have = cur[i] if i < len(cur) else p
                if not uneven_ok or not isinstance(v.shape[p.dim], int) or have is None or \
                        not (have == p or have.is_replicate()):
                    return False
    return True


def _out_is_replicate(output) -> bool:
    outs = output if isinstance(output, tuple) else (output,)
    return all(o is None or o.is_replicate() for o in outs)


# Running an op replicated on inputs that arrive sharded repeats its work on every rank, and its
# replicated output usually has to be cut again downstream; price that at twice the output's share.
_REDUNDANT_COMPUTE_WEIGHT = 2.0

# Gathering a sharded parameter would undo the plan (memory and compute per rank grow by n);
# strategies that need it lose to any other, and win only over the replicated fallback.
_UNSHARD_PARAM_PENALTY = 1e18


def _price(strategy: Strategy, cur: list, vals: list, out_val, mesh: MeshInfo, m: int, cur_all: list,
           is_param: list[bool], grads: list[bool]) -> float:
    n = mesh.sizes[m]
    cost = 0.0
    out_r = _out_is_replicate(strategy.output)
    for i, (req, have) in enumerate(zip(strategy.inputs, cur)):
        if req is None or have is None:
            continue
        grad = grads[i]
        nbytes = _bytes(vals[i], cur_all[i], mesh, m)
        cost += transition_cost(have, req, n, nbytes, with_backward=grad)
        if is_param[i] and have.is_shard() and req != have:
            cost += _UNSHARD_PARAM_PENALTY
        # A parameter's gradient all-reduce on a data-parallel dim is paid once whatever its uses.
        data_param = is_param[i] and mesh.names[m] in DATA_DIMS
        if grad and req.is_replicate() and have.is_replicate() and not out_r and not data_param:
            cost += op_cost("grad_all_reduce", n, nbytes, with_backward=True)
    if out_r and any(h is not None and not h.is_replicate() and not h.is_partial() for h in cur):
        outs = out_val if isinstance(out_val, (tuple, list)) else (out_val,)
        out_bytes = sum(_bytes(v, [None] * mesh.ndim, mesh, m) for v in outs if isinstance(v, torch.Tensor))
        cost += _REDUNDANT_COMPUTE_WEIGHT * (n - 1) / n * out_bytes
    return cost


def _choose(node: fx.Node, in_nodes: list[fx.Node], mesh: MeshInfo,
            needs_grad: set[fx.Node]) -> tuple[list[Strategy], bool]:
    """One strategy per mesh dim, and whether the fallback was taken."""
    rule = lookup(node.target)
    vals = [a.meta["val"] for a in in_nodes]
    cur_all = [list(get_info(a).spec.placements) for a in in_nodes]
    is_param = [get_info(a).role == "param" for a in in_nodes]
    grads = [a in needs_grad for a in in_nodes]
    chosen = []
    for m in range(mesh.ndim):
        op = OpInfo(node, tuple(vals), node.meta["val"], mesh.sizes[m])
        if rule is None:
            chosen.append(all_replicate(op))
            continue
        cur = [c[m] for c in cur_all]
        options = [s for s in rule(op, tuple(cur)) if _feasible(s, op, mesh.sizes[m], tuple(cur))]
        if not options:
            options = [all_replicate(op)]
        best = min(options, key=lambda s: _price(s, cur, vals, node.meta["val"], mesh, m, cur_all, is_param, grads))
        chosen.append(best)
        # Later mesh dims see this dim's inputs as already redistributed.
        for i, req in enumerate(best.inputs):
            if req is not None:
                cur_all[i][m] = req
    return chosen, rule is None


def _specs(val, per_dim_outputs: list, mesh: MeshInfo):
    if isinstance(val, (tuple, list)):
        return tuple(
            make_spec(v, tuple(o[k] for o in per_dim_outputs), mesh.sizes) if isinstance(v, torch.Tensor) else None
            for k, v in enumerate(val)
        )
    return make_spec(val, tuple(per_dim_outputs), mesh.sizes)


# --------------------------------------------------------------------------- memo
#
# A model's blocks repeat the same ops on the same shapes and placements, so the decision for a
# node is looked up by everything that decides it: the op, its non-tensor arguments, and per
# tensor input its shape, dtype, placements, whether it is a parameter and whether it carries a
# gradient; and the output's shape and dtype. Rules read only those (`OpInfo`), and so do
# `_feasible` and `_price`. Symbolic sizes enter by their sympy expression: equal keys, equal sizes.


class _Unhashable(Exception):
    """A node's arguments hold something with no value key: decide it without the memo."""


def _size(s: Any) -> Any:
    return s if type(s) is int else ("sym", size_key(s))


def _val_key(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return (tuple(map(_size, v.shape)), v.dtype)
    if isinstance(v, (tuple, list)):
        return tuple(_val_key(x) for x in v)
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", v.node.expr)
    return (type(v), v)


_TENSOR_ARG = ("tensor",)  # a tensor input's position among the arguments; its features come apart
_PLAIN = (int, str, type(None))  # leaves that are their own key (bool and float are tagged: 1 == True == 1.0)


def _arg_key(a: Any, node_key) -> Any:
    t = type(a)
    if t in _PLAIN:
        return a
    if t is fx.Node:
        return _TENSOR_ARG if isinstance(a.meta.get("val"), torch.Tensor) else ("node", node_key(a))
    if isinstance(a, (list, tuple)):
        if all(type(x) is int for x in a):  # shape arguments
            return (t, tuple(a))
        return (t, tuple(_arg_key(x, node_key) for x in a))
    if isinstance(a, dict):
        return (dict, tuple((k, _arg_key(x, node_key)) for k, x in a.items()))
    if isinstance(a, fx.Node):
        return _TENSOR_ARG if isinstance(a.meta.get("val"), torch.Tensor) else ("node", node_key(a))
    if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", a.node.expr)
    if a.__hash__ is None:
        raise _Unhashable(t.__name__)
    return (t, a)


class _Memo:
    """The decisions and specs of one propagate_sharding run, by what determines them."""

    def __init__(self, mesh: MeshInfo, needs_grad: set[fx.Node]) -> None:
        self.mesh = mesh
        self.needs_grad = needs_grad
        self.val_keys: dict[fx.Node, Any] = {}
        self.decisions: dict[Any, tuple] = {}
        self.specs: dict[Any, Any] = {}

    def val_key(self, node: fx.Node) -> Any:
        key = self.val_keys.get(node)
        if key is None:
            key = self.val_keys[node] = _val_key(node.meta.get("val"))
        return key

    def spec(self, node: fx.Node, placements: tuple) -> TensorSpec:
        """make_spec for a single-tensor node, shared by nodes of equal shape, dtype and placements."""
        key = (self.val_key(node), placements)
        spec = self.specs.get(key)
        if spec is None:
            spec = self.specs[key] = make_spec(node.meta["val"], placements, self.mesh.sizes)
        return spec

    def decide(self, node: fx.Node, in_nodes: list[fx.Node]) -> tuple[tuple, Any, bool]:
        """(input placements per tensor input, output spec, fallback) for `node`."""
        features = []
        val_keys, val_key, needs_grad = self.val_keys, self.val_key, self.needs_grad
        for a in in_nodes:
            info = get_info(a)
            if info is None or info.spec is None:
                raise ShardingError(f"{node_context(node)}: input %{a.name} has no placement; "
                                    "run annotate_parameters and propagate_sharding on the whole graph")
            features.append((val_keys.get(a) or val_key(a), info.spec.placements, info.role == "param",
                             a in needs_grad))
        try:
            key = (node.target, _arg_key(node.args, val_key), _arg_key(node.kwargs, val_key) if node.kwargs else None,
                   tuple(features), val_key(node))
            hit = self.decisions.get(key)
        except (_Unhashable, TypeError):
            key, hit = None, None
        if hit is not None:
            return hit
        chosen, fallback = _choose(node, in_nodes, self.mesh, self.needs_grad)
        inputs = tuple(tuple(s.inputs[i] for s in chosen) for i in range(len(in_nodes)))
        outputs = [s.output for s in chosen]
        val = node.meta["val"]
        if isinstance(val, (tuple, list)):
            outputs = [o if isinstance(o, tuple) else tuple(o for _ in val) for o in outputs]
            spec = _specs(val, outputs, self.mesh)
        else:
            spec = self.spec(node, tuple(outputs))
        decision = (inputs, spec, fallback)
        if key is not None:
            self.decisions[key] = decision
        return decision


def _annotate_call(node: fx.Node, memo: _Memo) -> None:
    in_nodes = tensor_args(node)
    inputs, spec, fallback = memo.decide(node, in_nodes)
    note = None
    if fallback:
        note = f"no sharding rule for {node.target}: runs on replicated inputs"
    set_info(node, NodeInfo(spec=spec, input_placements=inputs, module_fqn=module_fqn_of(node),
                            fallback=fallback, origin="propagate_sharding", note=note))


def get_spec_or_none(node: fx.Node):
    info = get_info(node)
    return info.spec if info else None


@fx_pass(requires=("param_placements", "canonical", "input_placements"), provides=("specs",))
def propagate_sharding(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    mesh = ctx.mesh
    replicate = tuple(Replicate() for _ in mesh.names)
    memo = _Memo(mesh, differentiable(gm))
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if is_tensor(node) and get_info(node) is None:
                set_info(node, NodeInfo(spec=memo.spec(node, replicate), role="input",
                                        origin="propagate_sharding"))
        elif node.op == "get_attr":
            if is_tensor(node) and get_info(node) is None:
                set_info(node, NodeInfo(spec=memo.spec(node, replicate), role="param",
                                        param_fqn=str(node.target), origin="propagate_sharding"))
        elif node.op == "call_function":
            val = node.meta.get("val")
            if node.target in COLLECTIVE_OPS and get_info(node) is not None:
                continue  # placed by an earlier pass (shard_inputs, apply_fsdp)
            if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
                parent = get_info(node.args[0])
                if parent is not None and isinstance(parent.spec, tuple):
                    set_info(node, NodeInfo(spec=parent.spec[node.args[1]], module_fqn=module_fqn_of(node),
                                            role="view", origin="propagate_sharding"))
                continue
            tensors = isinstance(val, torch.Tensor) or (
                isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val))
            if tensors:
                _annotate_call(node, memo)
        elif node.op == "output":
            # Outputs are Replicate, except that a batch-sharded output stays sharded on the
            # data-parallel dims: the runtime gathers it for pm(...) and computes the loss per shard in step().
            needs = []
            for out in tensor_args(node):
                have = get_info(out).spec.placements
                needs.append(tuple(
                    have[m] if mesh.names[m] in DATA_DIMS and have[m] == Shard(0) else Replicate()
                    for m in range(mesh.ndim)))
            set_info(node, NodeInfo(input_placements=tuple(needs), role="output", origin="propagate_sharding"))
    return PassResult(gm, True)
