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

and ties go to the rule's earlier strategy.

With `Plan(sequence_parallel=True)` (Megatron-SP), a residual add that meets a
Partial value (a row-parallel block output, a vocab-parallel embedding) on tp
is also offered sequence shards: every input Shard(-2) of its (..., T, C)
activation (a reduce-scatter of the Partial input, a local slice of a
Replicate one), and a Replicate output there is priced as the activation
memory it repeats on every rank, (n-1)/n x its bytes, so the shards win.
Norms, dropout and later adds follow the shards by their own rules; the next
column-parallel matmul gathers its input (all_gather), and a norm weight used
on sequence shards gets Megatron's f (its partial gradient all-reduced).

An op without a rule runs on
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
from fxpar.ops.collectives import COLLECTIVE_OPS
from fxpar.ops.transitions import insert_transition, op_cost, transition_cost
from fxpar.passes._embedding_sums import sum_root
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


_SP_SEEDS = (torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor)


def _sequence_strategy(node: fx.Node, op: OpInfo, cur: list) -> Strategy | None:
    """Megatron-SP's entry into sequence shards: a residual add meeting a Partial value."""
    out = op.out_val
    if node.target not in _SP_SEEDS or not isinstance(out, torch.Tensor) or out.ndim < 3 \
            or not out.dtype.is_floating_point or not any(c is not None and c.is_partial() for c in cur):
        return None
    if divides(out.shape[-2], op.mesh_size) is False:  # unknown: the shard and reduce_scatter check at run time
        return None
    seq = out.ndim - 2
    inputs = []
    for v in op.in_vals:
        d = seq - (out.ndim - v.ndim)  # right-aligned broadcasting
        broadcast = d < 0 or size_hint(v.shape[d]) == 1 != size_hint(out.shape[seq])
        inputs.append(Replicate() if broadcast else Shard(d))
    return Strategy(tuple(inputs), Shard(seq))


def _choose(node: fx.Node, in_nodes: list[fx.Node], mesh: MeshInfo,
            needs_grad: set[fx.Node], sp_dim: int | None = None) -> tuple[list[Strategy], bool]:
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
        seq = _sequence_strategy(node, op, cur) if m == sp_dim and node in needs_grad else None
        if seq is not None:
            options.insert(0, seq)
        if not options:
            options = [all_replicate(op)]

        def price(s: Strategy) -> float:
            cost = _price(s, cur, vals, node.meta["val"], mesh, m, cur_all, is_param, grads)
            if seq is not None and _out_is_replicate(s.output):
                cost += (mesh.sizes[m] - 1) / mesh.sizes[m] * _bytes(op.out_val, [None] * mesh.ndim, mesh, m)
            return cost

        best = min(options, key=price)
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

    def __init__(self, mesh: MeshInfo, needs_grad: set[fx.Node], sp_dim: int | None = None) -> None:
        self.mesh = mesh
        self.sp_dim = sp_dim
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
        chosen, fallback = _choose(node, in_nodes, self.mesh, self.needs_grad, self.sp_dim)
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
    # a node an earlier pass marked as standing for its parameter (replicate_kv_heads' replica sum) stays
    # one: its consumers pay the parameter's price for gathering it
    prev = get_info(node)
    param = prev is not None and prev.role == "param"
    set_info(node, NodeInfo(spec=spec, input_placements=inputs, module_fqn=module_fqn_of(node),
                            fallback=fallback, origin="propagate_sharding", note=note,
                            role="param" if param else "compute", param_fqn=prev.param_fqn if param else None))


def _reduce_lookup(graph: fx.Graph, node: fx.Node, mesh: MeshInfo, sp_dim: int | None) -> None:
    """A vocab-parallel lookup's Partial output is reduced right after it, as Megatron's
    VocabParallelEmbedding does: all_reduce, or with sequence parallel reduce_scatter into sequence
    shards. Left Partial, the residual stream would carry it into every block (each norm
    all-reducing it again)."""
    spec = get_info(node).spec
    for m, p in enumerate(spec.placements):
        if not p.is_partial():
            continue
        val = node.meta["val"]
        seq = val.ndim - 2
        dst = Shard(seq) if m == sp_dim and val.ndim >= 3 and divides(val.shape[seq], mesh.sizes[m]) is not False \
            else Replicate()
        placements = list(get_info(node).spec.placements)
        with graph.inserting_after(node):
            new = insert_transition(graph, node, p, dst, mesh_dim=m, mesh_dim_name=mesh.names[m],
                                    group_size=mesh.sizes[m], group_name=_group_name(mesh, m), label=node.name)
        node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        placements[m] = dst
        new.meta["val"] = val
        for key in ("nn_module_stack", "stack_trace"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
        set_info(new, NodeInfo(spec=make_spec(val, tuple(placements), mesh.sizes), module_fqn=module_fqn_of(node),
                               role="collective", origin="propagate_sharding"))
        node = new


def _group_name(mesh: MeshInfo, m: int) -> str:
    return mesh.group_names[m] if mesh.group_names else f"dryrun:{mesh.names[m]}"


def get_spec_or_none(node: fx.Node):
    info = get_info(node)
    return info.spec if info else None


@fx_pass(requires=("param_placements", "canonical", "input_placements"), provides=("specs",))
def propagate_sharding(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    mesh = ctx.mesh
    replicate = tuple(Replicate() for _ in mesh.names)
    sp_dim = mesh.names.index("tp") if ctx.plan.sequence_parallel and mesh.has("tp") else None
    memo = _Memo(mesh, differentiable(gm), sp_dim)
    sum_roots: set[fx.Node] = set()
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
                if node.target == torch.ops.aten.embedding.default or node in sum_roots:
                    # an embedding sum (wte + wpe) is reduced once, at its root: Partial + Partial
                    root = sum_root(node)
                    if root is node:
                        _reduce_lookup(gm.graph, node, mesh, sp_dim)
                    else:
                        sum_roots.add(root)
            elif lookup(node.target) is not None and tensor_args(node):
                # No tensor output, but it reads tensors: a buffer updated in place inside a no_grad block
                # (a router's tokens-per-expert counter). Its inputs come whole, as its rule runs it.
                set_info(node, NodeInfo(input_placements=tuple(replicate for _ in tensor_args(node)),
                                        module_fqn=module_fqn_of(node), origin="propagate_sharding",
                                        note="no tensor output: runs on replicated inputs"))
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
