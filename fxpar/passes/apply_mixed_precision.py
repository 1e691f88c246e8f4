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
  its compute users; its data-parallel gradient sum (`bucket_grad_sync`) runs
  in reduce_dtype, or without one in param_dtype, as torch's `replicate`
  (an f left in the graph sums in the parameter's dtype);
- floating graph inputs are cast to `param_dtype` (`cast_forward_inputs`);
- graph outputs are cast to `output_dtype` if set;
- buffers are left alone (as FSDP2 does);
- the model's own casts to its capture dtype mean what they would in FSDP2's eager
  run on param_dtype parameters (`_retype`): a cast to the activations' dtype
  (`cos.to(x.dtype)`, RMSNorm's `.to(input_dtype)`) casts to `param_dtype`, a
  deliberate upcast (`hidden.to(torch.float32)`, `.float()` before a loss) stays.

Before:  %to_6 = aten.to.dtype(%embedding, torch.float32)      # RMSNorm upcast; also the residual
         %pow_1 = aten.pow(%to_6, 2) ... %mul_3 = aten.mul(%to_6, %rsqrt)
         %to_7 = aten.to.dtype(%mul_3, torch.float32)          # .to(input_dtype)
         %add_6 = aten.add(%to_6, %linear_3)                   # residual
After:   %to_6 = aten.to.dtype(%embedding, torch.float32)      # bfloat16 -> float32 statistics
         %to_7 = aten.to.dtype(%mul_3, torch.bfloat16)
         %add_6 = aten.add(%embedding, %linear_3)              # bfloat16, as in eager

A parameter already in `param_dtype` is not cast, so a bfloat16 model runs as
before; its FSDP gathers still reduce-scatter in a `reduce_dtype` that differs
(FSDP2 clamps only param_dtype to None there). Afterwards the dtypes of every
downstream value (`meta["val"]` and the spec's dtype) are re-derived, so
explain(), the memory model and pipeline buffers see the compute dtype.

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
import heapq
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


def _chain_gathers(node: fx.Node) -> list[fx.Node]:
    """The FSDP gathers on the chain of collectives that starts at `node`."""
    out, frontier = [], [node]
    while frontier:
        v = frontier.pop()
        for u in v.users:
            if u.op == "call_function" and u.target in COLLECTIVE_OPS:
                frontier.append(u)
                if u.target is _GATHER:
                    out.append(u)
    return out


def _cast_params(gm: fx.GraphModule, dtype: torch.dtype, reduce_dtype: torch.dtype | None) -> set[torch.dtype]:
    """Casts every floating parameter to `dtype` at its uses; returns the dtypes they had."""
    was: set[torch.dtype] = set()
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or not _floating(node) or not node.users:
            continue
        val = node.meta["val"]
        info = get_info(node)
        if not val.requires_grad or info is None or info.role != "param":
            continue  # a buffer (FSDP2 leaves buffers as they are)
        if val.dtype == dtype:  # already in the compute dtype: nothing to cast, but FSDP still reduces in
            if reduce_dtype is not None and reduce_dtype != dtype:  # reduce_dtype (FSDP2 clamps only param_dtype)
                for gather in _chain_gathers(node):
                    set_fsdp_precision(gather, param_dtype=None, reduce_dtype=reduce_dtype)
            continue
        uses = list(_compute_uses(node))
        chain = {u.target for v, _ in uses for u in v.users} | {v.target for v, _ in uses}
        if _GATHER not in chain and _REDUCING.isdisjoint(chain):
            # only gathers / slices on the way: cast first, so they move param_dtype bytes
            _insert_cast(gm, node, list(node.users), dtype, node.name)
            was.add(val.dtype)
            continue
        for v, users in uses:
            if v.op == "call_function" and v.target is _GATHER:
                set_fsdp_precision(v, param_dtype=dtype, reduce_dtype=reduce_dtype)
                v.meta["val"] = v.meta["val"].to(dtype)
                set_info(v, dataclasses.replace(get_info(v), spec=dataclasses.replace(get_info(v).spec, dtype=dtype)))
            else:
                _insert_cast(gm, v, users, dtype, node.name)
        was.add(val.dtype)
    return was


def _cast_inputs(gm: fx.GraphModule, dtype: torch.dtype) -> set[torch.dtype]:
    """Casts every floating graph input to `dtype`; returns the dtypes they had."""
    was: set[torch.dtype] = set()
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" and _floating(node) and node.meta["val"].dtype != dtype:
            was.add(node.meta["val"].dtype)
            # after its slices (shard_inputs): each rank casts only its batch shard
            for v, users in list(_compute_uses(node)):
                _insert_cast(gm, v, users, dtype, node.name)
    return was


def _cast_outputs(gm: fx.GraphModule, dtype: torch.dtype) -> None:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    for value in list(out.all_input_nodes):
        if _floating(value) and get_info(value) is not None and value.meta["val"].dtype != dtype:
            _insert_cast(gm, value, [out], dtype, f"out_{value.name}")


# The model's own casts: where their target dtype is (argument position, or keyword).
_MODEL_CASTS = {aten._to_copy.default: "dtype", aten.to.dtype: 1, aten.to.dtype_layout: "dtype", aten.to.device: 2}
_ASSERT = aten._assert_tensor_metadata.default  # export's check of a cast's *input* dtype


def _arg(node: fx.Node, key):
    if isinstance(key, str):
        return node.kwargs.get(key)
    return node.args[key] if len(node.args) > key else None


def _set_arg(node: fx.Node, key, value) -> None:
    if isinstance(key, str):
        node.kwargs = {**node.kwargs, key: value}
    else:
        node.args = (*node.args[:key], value, *node.args[key + 1:])


def _ours(node: fx.Node) -> bool:
    """A cast this pass made, or an FSDP gather it set to param_dtype: its dtype is final."""
    if node.op != "call_function":
        return False
    info = get_info(node)
    return node.target is _GATHER and len(node.args) > 5 and node.args[5] is not None or (
        info is not None and info.origin == "apply_mixed_precision")


def _derive_dtypes(gm: fx.GraphModule, follow: set[fx.Node], dtype: torch.dtype, prev: dict | None = None,
                   dirty: set[fx.Node] = frozenset()) -> dict:
    """Every node's value (`meta["val"]` with the dtype it has now) when the casts in `follow` cast
    to `dtype` and the other model casts keep the dtype they state.

    Runs each op whose input dtypes changed on the global FakeTensors of its inputs (collectives keep
    their input's dtype); the shapes do not change, only dtypes. Reads the graph, changes nothing.
    With `prev` (the values of the round before) only the `dirty` nodes (casts that follow now, users
    given another input) and what their dtype changes reach are run again.
    """
    vals, changed, moved = {}, set(), set()
    for node in gm.graph.nodes:
        old = node.meta.get("val")
        if prev is not None and node not in dirty and not any(a in moved for a in node.all_input_nodes):
            vals[node] = prev[node]
            if vals[node] is not old or _ours(node):
                changed.add(node)
            continue
        vals[node] = _derive_one(node, old, vals, changed, follow, dtype)
        if vals[node] is not old or _ours(node):  # (ours are made in param_dtype: changed since capture)
            changed.add(node)
        if prev is not None and _dtypes(vals[node]) != _dtypes(prev[node]):
            moved.add(node)
    return vals


def _derive_one(node: fx.Node, old, vals: dict, changed: set[fx.Node], follow: set[fx.Node], dtype: torch.dtype):
    """`node`'s value given its inputs' (`old`, the captured one, where its dtype does not change)."""
    if node.op != "call_function" or old is None or _ours(node):
        return old
    if node in follow:
        new = old.to(dtype)
    elif node.target in _MODEL_CASTS:
        return old  # a cast that keeps its meaning: its output dtype is what the model states
    elif node.target in COLLECTIVE_OPS:
        new = old.to(vals[node.args[0]].dtype) if isinstance(old, torch.Tensor) else old
    elif not any(a in changed for a in node.all_input_nodes):
        return old
    elif node.target is operator.getitem:
        src = vals[node.args[0]]
        new = src[node.args[1]] if isinstance(src, (tuple, list)) else old
    else:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: vals[a])
        try:
            new = node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - an op that does not run on global FakeTensors keeps its dtype
            log.debug("apply_mixed_precision: could not re-derive the dtype of %s", node.name, exc_info=True)
            return old
    if _dtypes(new) != _dtypes(old) and len(_dtypes(new)) == len(_dtypes(old)):
        return _with_dtypes(old, new)
    return old


def _meets_compute(cast: fx.Node, starts: list[fx.Node], vals: dict, dtype: torch.dtype, order: dict) -> bool:
    """Does the value of `cast`, used by `starts`, meet a value in the compute dtype (an op's other
    input) before it reaches another model cast? Walks in graph order, so an input's membership of
    the walked region is decided before the node that reads it."""
    region, heap = {cast}, [(order[u], u.name, u) for u in starts]
    heapq.heapify(heap)
    while heap:
        _, _, node = heapq.heappop(heap)
        if node in region or node.op != "call_function" or node.target in _MODEL_CASTS or not any(_dtypes(vals[node])):
            continue  # another cast (or the output) ends the walk; so does a size (sym_size feeds every view)
        for a in node.all_input_nodes:
            if a not in region and dtype in _dtypes(vals.get(a)):
                return True
        region.add(node)
        for u in node.users:
            heapq.heappush(heap, (order[u], u.name, u))
    return False


def _retype(gm: fx.GraphModule, dtype: torch.dtype, capture_dtypes: set[torch.dtype]) -> None:
    """Decides which of the model's casts follow the compute dtype, then re-derives every dtype.

    The graph was captured with the model's parameters in their own dtype (float32), so a cast the
    model wrote against an activation's dtype (`cos.to(x.dtype)` for rotary, RMSNorm's
    `.to(input_dtype)`, `softmax(..., dtype=float32).to(query.dtype)`) is recorded as a cast to
    float32, the same as a deliberate `.float()`. FSDP2 in eager mode runs the model on param_dtype
    parameters, where the first kind casts to param_dtype and the second still to float32. The graph
    tells them apart by where the value goes: a cast to the capture dtype whose value meets a value
    in the compute dtype (the other input of an op) before it reaches another model cast is a cast
    *to the compute dtype*, and follows it; one whose value only feeds its own computation up to the
    next cast (a norm's statistics, the rotary table, a loss on `logits.float()`) keeps its dtype.

    A cast that was a no-op at capture returned its input itself, so the tracer recorded every later
    use of that tensor as a use of the cast: RMSNorm's `hidden.to(torch.float32)` is also the
    residual branch's input. Such a cast's users are judged one by one: those that meet the compute
    dtype read the cast's input instead (the residual stays bfloat16, as in eager), the others keep
    the upcast; where all of them meet it, the cast follows the compute dtype.

    Found as a least fixed point (more casts following only ever makes more values bfloat16): a cast
    that follows can make another one meet the compute dtype (RMSNorm's `.to(input_dtype)` makes q
    bfloat16, which the rotary `cos.to(x.dtype)` then meets). A few rounds, whatever the depth.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    candidates = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _MODEL_CASTS
                  and not _ours(n) and _arg(n, _MODEL_CASTS[n.target]) in capture_dtypes]
    follow: set[fx.Node] = set()
    rewired = 0
    vals = _derive_dtypes(gm, follow, dtype)
    while True:
        dirty: set[fx.Node] = set()
        for c in candidates:
            if c in follow or not c.users:
                continue
            if _dtypes(c.args[0].meta.get("val")) == _dtypes(c.meta.get("val")):  # a no-op at capture
                meeting = [u for u in c.users if _meets_compute(c, [u], vals, dtype, order)]
                if meeting and len(meeting) == len(c.users):
                    follow.add(c)
                    dirty.add(c)
                else:
                    for u in meeting:
                        u.replace_input_with(c, c.args[0])
                    rewired += len(meeting)
                    dirty.update(meeting)
            elif _meets_compute(c, list(c.users), vals, dtype, order):
                follow.add(c)
                dirty.add(c)
        if not dirty:
            break
        vals = _derive_dtypes(gm, follow, dtype, vals, dirty)
    for c in follow:
        _set_arg(c, _MODEL_CASTS[c.target], dtype)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is _ASSERT and node.args:
            src = node.args[0]
            if node.kwargs.get("dtype") == _dtypes(src.meta.get("val"))[0] != _dtypes(vals[src])[0]:
                node.kwargs = {**node.kwargs, "dtype": _dtypes(vals[src])[0]}
    for node in gm.graph.nodes:
        if vals.get(node) is not node.meta.get("val") and not _ours(node):
            _set_dtypes(node, vals[node])
    log.debug("apply_mixed_precision: %d of %d model casts follow %s (%s); %d uses of no-op casts read their "
              "input", len(follow), len(candidates), dtype, sorted(c.name for c in follow), rewired)


def _dtypes(val) -> tuple:
    vals = val if isinstance(val, (tuple, list)) else (val,)
    return tuple(v.dtype if isinstance(v, torch.Tensor) else None for v in vals)


def _with_dtypes(old, new):
    """`old` (a FakeTensor or a tuple of them) with the dtypes of `new`."""
    if isinstance(old, torch.Tensor):
        return old.to(new.dtype)
    return type(old)(o.to(n.dtype) if isinstance(o, torch.Tensor) and isinstance(n, torch.Tensor) else o
                     for o, n in zip(old, new))


def _set_dtypes(node: fx.Node, val) -> None:
    """Sets `meta["val"]` and the spec's dtype(s)."""
    node.meta["val"] = val
    info = get_info(node)
    if info is None:
        return
    dts = _dtypes(val)
    if isinstance(info.spec, TensorSpec):
        spec = dataclasses.replace(info.spec, dtype=dts[0])
    elif isinstance(info.spec, tuple):
        spec = tuple(dataclasses.replace(s, dtype=d) if s is not None and d is not None else s
                     for s, d in zip(info.spec, dts))
    else:
        return
    set_info(node, dataclasses.replace(info, spec=spec))


@fx_pass(requires=("collectives",), provides=("mixed_precision",))
def apply_mixed_precision(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    policy = ctx.options.get(MP_POLICY_KEY)
    if policy is None or (policy.param_dtype is None and policy.output_dtype is None):
        return PassResult(gm, False)
    gm.meta[MP_POLICY_KEY] = policy
    if policy.param_dtype is not None:
        capture_dtypes = _cast_params(gm, policy.param_dtype, policy.reduce_dtype)
        if policy.cast_forward_inputs:
            capture_dtypes |= _cast_inputs(gm, policy.param_dtype)
        _retype(gm, policy.param_dtype, capture_dtypes)
    if policy.output_dtype is not None:
        _cast_outputs(gm, policy.output_dtype)
    return PassResult(gm, True)
