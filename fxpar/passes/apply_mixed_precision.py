"""apply_mixed_precision: FSDP2's MixedPrecisionPolicy as casts in the graph.

Requires: collectives (runs after insert_collectives, before localize_shapes). Provides: mixed_precision.

`options["mp_policy"]` is a `torch.distributed.fsdp.MixedPrecisionPolicy`; with
FSDP2's meaning:

- parameters stay in their own dtype (float32 master weights; the optimizer's
  state follows them); each floating parameter is cast to `param_dtype` where
  it is used: an FSDP parameter's `fsdp_all_gather` casts its shard before the
  gather (half the bytes for bfloat16) and its backward casts the gradient to
  `reduce_dtype` before the reduce_scatter and returns it in the shard's dtype;
  a parameter whose collectives only gather or slice it is cast right after its
  get_attr (those move param_dtype bytes); one behind a `grad_all_reduce`
  gets an `aten._to_copy` node after its chain of collectives, right before
  its compute users, so its gradient is summed (there, and in the
  data-parallel bucketed all-reduce of `.grad`) in the parameter's dtype;
- floating graph inputs are cast to `param_dtype` (`cast_forward_inputs`);
- graph outputs are cast to `output_dtype` if set;
- buffers are left alone (as FSDP2 does).

A parameter already in `param_dtype` is not touched, so a bfloat16 model runs as
before. Afterwards the dtypes of every downstream value (`meta["val"]` and the
spec's dtype) are re-derived, so explain(), the memory model and pipeline
buffers see the compute dtype.

Before:  %w = get_attr[target=up.weight]                         # float32
         %gradallreduce_w = fxpar.grad_all_reduce(%w, '1', 'tp')
         %linear = aten.linear(%x, %gradallreduce_w)
After:   %w = get_attr[target=up.weight]                         # float32
         %gradallreduce_w = fxpar.grad_all_reduce(%w, '1', 'tp')
         %cast_w = aten._to_copy(%gradallreduce_w, dtype=torch.bfloat16)
         %linear = aten.linear(%x_bf16, %cast_w)                 # bfloat16
FSDP:    %fsdpgather_w = fxpar.fsdp_all_gather(%w, 0, 2, '1', 'fsdp', torch.bfloat16, torch.float32)

Invariants kept: every new node has a `meta["val"]` and a spec with the same
placements as its input; the casts are dtype-only `_to_copy` nodes, which the
gradient-dual checks see through (a sum of gradients commutes with a cast).
"""

from __future__ import annotations

import dataclasses
import logging
import operator

import torch
import torch.fx as fx

from fxpar.core.pass_api import PassContext, PassResult, fx_pass
from fxpar.core.spec import NodeInfo, TensorSpec, get_info, set_info
from fxpar.ops.collectives import COLLECTIVE_OPS
from fxpar.ops.transitions import set_fsdp_precision

__all__ = ["apply_mixed_precision", "MP_POLICY_KEY"]

log = logging.getLogger(__name__)
aten = torch.ops.aten
_GATHER = torch.ops.fxpar.fsdp_all_gather.default
_REDUCING = {torch.ops.fxpar.grad_all_reduce.default}  # their backward sums gradients: keep those in float32

MP_POLICY_KEY = "mp_policy"
"""The key of `options` and of `gm.meta` holding the policy (explain() prints it)."""


def _floating(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def _insert_cast(gm: fx.GraphModule, value: fx.Node, users: list[fx.Node], dtype: torch.dtype, label: str) -> None:
    """`value` -> `_to_copy(value, dtype)` for `users`, inserted right after `value`."""
    info = get_info(value)
    with gm.graph.inserting_after(value):
        cast = gm.graph.create_node("call_function", aten._to_copy.default, (value,), {"dtype": dtype},
                                    name=f"cast_{label}")
    cast.meta["val"] = value.meta["val"].to(dtype)
    spec = dataclasses.replace(info.spec, dtype=dtype)
    set_info(cast, NodeInfo(spec=spec, input_placements=(info.spec.placements,), module_fqn=info.module_fqn,
                            origin="apply_mixed_precision", note=f"mixed precision: cast to {dtype}"))
    for u in users:
        u.replace_input_with(value, cast)


def _compute_uses(node: fx.Node):
    """(value, its non-collective users) along the chain of collectives that starts at `node`."""
    frontier = [node]
    while frontier:
        v = frontier.pop()
        compute = [u for u in v.users if not (u.op == "call_function" and u.target in COLLECTIVE_OPS)]
        if compute:
            yield v, compute
        frontier.extend(u for u in v.users if u.op == "call_function" and u.target in COLLECTIVE_OPS)


def _cast_params(gm: fx.GraphModule, dtype: torch.dtype, reduce_dtype: torch.dtype | None) -> int:
    casts = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or not _floating(node) or not node.users:
            continue
        val = node.meta["val"]
        info = get_info(node)
        if val.dtype == dtype or not val.requires_grad or info is None or info.role != "param":
            continue  # already in the compute dtype, or a buffer (FSDP2 leaves buffers as they are)
        uses = list(_compute_uses(node))
        chain = {u.target for v, _ in uses for u in v.users} | {v.target for v, _ in uses}
        if _GATHER not in chain and _REDUCING.isdisjoint(chain):
            # only gathers / slices on the way: cast first, so they move param_dtype bytes
            _insert_cast(gm, node, list(node.users), dtype, node.name)
            casts += 1
            continue
        for v, users in uses:
            if v.op == "call_function" and v.target is _GATHER:
                set_fsdp_precision(v, param_dtype=dtype, reduce_dtype=reduce_dtype)
                v.meta["val"] = v.meta["val"].to(dtype)
                set_info(v, dataclasses.replace(get_info(v), spec=dataclasses.replace(get_info(v).spec, dtype=dtype)))
            else:
                _insert_cast(gm, v, users, dtype, node.name)
            casts += 1
    return casts


def _cast_inputs(gm: fx.GraphModule, dtype: torch.dtype) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" and _floating(node) and node.meta["val"].dtype != dtype:
            # after its slices (shard_inputs): each rank casts only its batch shard
            for v, users in list(_compute_uses(node)):
                _insert_cast(gm, v, users, dtype, node.name)


def _cast_outputs(gm: fx.GraphModule, dtype: torch.dtype) -> None:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    for value in list(out.all_input_nodes):
        if _floating(value) and get_info(value) is not None and value.meta["val"].dtype != dtype:
            _insert_cast(gm, value, [out], dtype, f"out_{value.name}")


# The model's own casts, captured with the dtype the model had at capture: `.to(value.dtype)`,
# `.type_as(...)`, export's dtype assertions. Target dtype = argument position, or keyword.
_MODEL_CASTS = {aten._to_copy.default: "dtype", aten.to.dtype: 1, aten.to.dtype_layout: "dtype",
                aten._assert_tensor_metadata.default: "dtype"}


def _follow_compute_dtype(node: fx.Node, retyped: set[fx.Node], was: dict) -> None:
    """A model cast to the dtype its input had at capture (`x.to(value.dtype)`, a float32 model's
    `.float()`) now casts to the input's new (compute) dtype: the capture baked the model's dtype in,
    FSDP2 in eager mode would have seen the compute dtype."""
    src = node.args[0] if node.args else None
    if src not in retyped:
        return
    key = _MODEL_CASTS[node.target]
    target = node.kwargs.get(key) if isinstance(key, str) else (node.args[key] if len(node.args) > key else None)
    old, new = was.get(src), src.meta["val"].dtype
    if target is None or target != old or old == new:
        return
    if isinstance(key, str):
        node.kwargs = {**node.kwargs, key: new}
    else:
        node.args = (*node.args[:key], new, *node.args[key + 1:])


def _refresh_dtypes(gm: fx.GraphModule, retyped: set[fx.Node], was: dict) -> None:
    """Re-derives `meta["val"]` (and the spec's dtype) of every node downstream of a changed dtype.

    Runs each op on the global FakeTensors of its inputs (collectives keep their input's dtype, or
    cast to their param_dtype); the shapes do not change, only dtypes.
    """
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _MODEL_CASTS:
            _follow_compute_dtype(node, retyped, was)
        if node.op != "call_function" or node.meta.get("val") is None:
            continue
        if node.target is _GATHER or get_info(node) is not None and get_info(node).origin == "apply_mixed_precision":
            continue  # dtype set where the cast was made
        old = node.meta["val"]
        if node.target in COLLECTIVE_OPS:
            new = old.to(node.args[0].meta["val"].dtype) if isinstance(old, torch.Tensor) else old
        elif node.target is operator.getitem:
            src = node.args[0].meta.get("val")
            new = src[node.args[1]] if isinstance(src, (tuple, list)) else old
        else:
            changed = any(a in retyped for a in node.all_input_nodes)
            if not changed:
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: a.meta.get("val"))
            try:
                new = node.target(*args, **kwargs)
            except Exception:  # noqa: BLE001 - an op that does not run on global FakeTensors keeps its dtype
                log.debug("apply_mixed_precision: could not re-derive the dtype of %s", node.name, exc_info=True)
                continue
        if _set_dtypes(node, old, new):
            retyped.add(node)
            was[node] = old.dtype if isinstance(old, torch.Tensor) else None


def _dtypes(val) -> tuple:
    vals = val if isinstance(val, (tuple, list)) else (val,)
    return tuple(v.dtype if isinstance(v, torch.Tensor) else None for v in vals)


def _set_dtypes(node: fx.Node, old, new) -> bool:
    if _dtypes(old) == _dtypes(new) or len(_dtypes(old)) != len(_dtypes(new)):
        return False
    if isinstance(old, torch.Tensor):
        node.meta["val"] = old.to(new.dtype)
    else:
        node.meta["val"] = type(old)(o.to(n.dtype) if isinstance(o, torch.Tensor) and isinstance(n, torch.Tensor)
                                     else o for o, n in zip(old, new))
    info = get_info(node)
    if info is None:
        return True
    dts = _dtypes(node.meta["val"])
    if isinstance(info.spec, TensorSpec):
        spec = dataclasses.replace(info.spec, dtype=dts[0])
    elif isinstance(info.spec, tuple):
        spec = tuple(dataclasses.replace(s, dtype=d) if s is not None and d is not None else s
                     for s, d in zip(info.spec, dts))
    else:
        return True
    set_info(node, dataclasses.replace(info, spec=spec))
    return True


@fx_pass(requires=("collectives",), provides=("mixed_precision",))
def apply_mixed_precision(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    policy = ctx.options.get(MP_POLICY_KEY)
    if policy is None or (policy.param_dtype is None and policy.output_dtype is None):
        return PassResult(gm, False)
    gm.meta[MP_POLICY_KEY] = policy
    if policy.param_dtype is not None:
        _cast_params(gm, policy.param_dtype, policy.reduce_dtype)
        if policy.cast_forward_inputs:
            _cast_inputs(gm, policy.param_dtype)
    retyped = {n for n in gm.graph.nodes if n.op == "call_function" and (
        n.target is _GATHER and len(n.args) > 5 or get_info(n) is not None and get_info(n).origin == "apply_mixed_precision")}
    was = {n: n.args[0].meta["val"].dtype for n in retyped}
    _refresh_dtypes(gm, retyped, was)
    if policy.output_dtype is not None:
        _cast_outputs(gm, policy.output_dtype)
    return PassResult(gm, True)
