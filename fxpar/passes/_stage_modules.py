"""Building the stage GraphModules of split_stages: what each stage computes, receives and owns."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from fxpar.core.dataflow import attr_of
from fxpar.core.errors import ScheduleError
from fxpar.core.spec import NodeInfo, TensorSpec, get_info, set_info
from fxpar.ops.collectives import COLLECTIVE_OPS

aten = torch.ops.aten


def _is_tensor(node: fx.Node) -> bool:
    """Whether a node's value is one tensor (sendable); tuples, SymInts and None are not."""
    val = node.meta.get("val")
    if val is None:
        # fxpar passes that forget `val` still make tensors, except shape arithmetic.
        return node.op != "call_function" or getattr(node.target, "__module__", "") not in ("_operator", "operator")
    return isinstance(val, torch.Tensor)


# --------------------------------------------------------------------------- building stages


class _Stage:
    """The pieces of one stage while it is built."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.nodes: list[fx.Node] = []
        self.defined: set[fx.Node] = set()
        self.attrs: dict[fx.Node, None] = {}
        self.direct: dict[fx.Node, None] = {}  # tensors from earlier stages its nodes use
        self.remat: dict[fx.Node, None] = {}  # symbolic values it recomputes
        self.remat_deps: dict[fx.Node, list[fx.Node]] = {}  # remat node -> tensors it reads
        self.substitute: dict[fx.Node, tuple[fx.Node, int]] = {}  # sym_size node -> (live tensor, dim)
        self.inputs: list[fx.Node] = []
        self.outputs: list[Any] = []


_SCALAR_VALUES = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)


def _seeded(target: Any) -> bool:
    return torch.Tag.nondeterministic_seeded in getattr(target, "tags", ())


def _input_free(gm: fx.GraphModule) -> set[fx.Node]:
    """Tensors computed from buffers, constants and sizes only: no input value, no parameter, no randomness.

    A later stage recomputes them (rotary tables, causal masks, position ids)
    instead of receiving them: fewer bytes over every cut, and nothing to send
    back in the backward (they need no gradient). Higher-order ops (a rotary
    table under `torch.no_grad`) count when their subgraph draws no random numbers.
    """
    free: set[fx.Node] = set()
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if n.op == "get_attr":
            obj = attr_of(gm, n.target)
            if isinstance(obj, torch.Tensor) and not obj.requires_grad:
                free.add(n)
            elif isinstance(obj, fx.GraphModule) and not any(_seeded(m.target) for m in obj.graph.nodes):
                free.add(n)  # a higher-order op's subgraph
            continue
        values = val if isinstance(val, (tuple, list)) else (val,)
        if n.op != "call_function" or not values \
                or not all(isinstance(v, torch.Tensor) and not v.requires_grad for v in values) \
                or n.target in COLLECTIVE_OPS or _seeded(n.target):
            continue
        ok = True
        for a in n.all_input_nodes:
            a_val = a.meta.get("val")
            if a in free or (a.op != "placeholder" and isinstance(a_val, _SCALAR_VALUES)):
                continue
            ok = False
            break
        if ok:
            free.add(n)
    return free


def _collect(stage: _Stage, uses: list[fx.Node], input_free: set[fx.Node] = frozenset()) -> None:
    """Direct tensor inputs, parameters and values to recompute (sizes; tensors in `input_free`)."""

    def visit(a: fx.Node, remat_owner: fx.Node | None) -> None:
        if a.op == "get_attr":
            stage.attrs[a] = None
        elif a in stage.defined:
            return
        elif a in input_free:
            if a in stage.remat:
                return
            stage.remat[a] = None
            for b in a.all_input_nodes:
                visit(b, a)
        elif _is_tensor(a):
            if remat_owner is None:
                stage.direct[a] = None
            else:
                stage.remat_deps.setdefault(remat_owner, []).append(a)
        else:
            if a.op == "placeholder":
                raise ScheduleError(f"input '{a.name}' is not a tensor but stage {stage.index} uses it; "
                                    "pipelined models take tensor inputs only")
            if a in stage.remat:
                return
            stage.remat[a] = None
            for b in a.all_input_nodes:
                visit(b, a)

    for n in uses:
        for a in n.all_input_nodes:
            visit(a, None)


def _sym_expr(node: fx.Node) -> Any:
    val = node.meta.get("val")
    return val.node.expr if isinstance(val, torch.SymInt) else None


def _local_size(node: fx.Node, dim: int) -> str:
    """The size of dim `dim` this rank holds of a tensor node, as text (its spec's local shape)."""
    info = get_info(node)
    if info is not None and isinstance(info.spec, TensorSpec):
        return str(info.spec.local_shape[dim])
    return str(node.meta["val"].shape[dim])


def _substitute_sizes(stage: _Stage, live: list[fx.Node]) -> list[fx.Node]:
    """Reads symbolic sizes off tensors the stage receives anyway; returns tensors it must receive besides.

    `sym_size(x, d)` may read dim j of a received tensor y instead when both
    the global size (the graph's symbol) and the local size (what the read
    returns at run time on a sharded dim) are the same.
    """
    extra: list[fx.Node] = []
    for r in stage.remat:
        deps = stage.remat_deps.get(r, [])
        if not deps:
            continue
        found = None
        if r.target == aten.sym_size.int and _sym_expr(r) is not None:
            want, want_local = _sym_expr(r), _local_size(r.args[0], r.args[1])
            found = next(((y, j) for y in live for j, size in enumerate(y.meta["val"].shape)
                          if isinstance(size, torch.SymInt) and size.node.expr == want
                          and _local_size(y, j) == want_local), None)
        if found:
            stage.substitute[r] = found
        else:
            extra.extend(d for d in deps if d not in extra)
    return extra


def _placeholder_meta(v: fx.Node) -> dict:
    meta = {"val": v.meta.get("val")}
    info = get_info(v)
    if info is not None and isinstance(info.spec, TensorSpec):
        meta["fxpar"] = NodeInfo(spec=info.spec, module_fqn=info.module_fqn, role="input", origin="split_stages")
    return meta


def _view_info(v: fx.Node) -> NodeInfo | None:
    info = get_info(v)
    if info is None or not isinstance(info.spec, TensorSpec):
        return None
    return NodeInfo(spec=info.spec, module_fqn=info.module_fqn, role="view", origin="split_stages")


def _stand_in(obj: Any, cache: dict[int, Any]) -> Any:
    """A storage-free stand-in for another rank's parameter or buffer (tied ones stay one object).

    One zero expanded to the full shape: no memory, the same device and dtype,
    so the parent graph still runs on FakeTensors (the invariant checks do
    that); it is never run for real on this rank.
    """
    if id(obj) in cache:
        return cache[id(obj)]
    if isinstance(obj, torch.Tensor):
        empty = torch.zeros((), dtype=obj.dtype, device=obj.device).expand(obj.shape)
        out = nn.Parameter(empty, requires_grad=obj.requires_grad) if isinstance(obj, nn.Parameter) else empty
    else:
        out = obj
    cache[id(obj)] = out
    return out


def _build_stage_module(gm: fx.GraphModule, stage: _Stage, last: bool, out_flat: list,
                        local: bool, meta_cache: dict[int, Any]) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for v in stage.inputs:
        p = g.placeholder(v.name)
        p.meta.update(_placeholder_meta(v))
        env[v] = p
    root: dict[str, Any] = {}
    for a in stage.attrs:
        env[a] = g.node_copy(a)
        obj = attr_of(gm, a.target)
        root[a.target] = obj if local else _stand_in(obj, meta_cache)
    for r in stage.remat:
        if r in stage.substitute:
            y, j = stage.substitute[r]
            new = g.create_node("call_function", aten.sym_size.int, (env[y], j), name=r.name)
            new.meta.update(r.meta)
            env[r] = new
        else:
            env[r] = g.node_copy(r, lambda x: env[x])
    for n in stage.nodes:
        if n.op == "call_module":
            root[n.target] = gm.get_submodule(n.target)
        env[n] = g.node_copy(n, lambda x: env[x])
    if last:
        outs = [env[v] for v in out_flat]
        g.output(tuple(outs))
    else:
        outs = []
        for v in stage.outputs:
            x = env[v]
            if x.op != "placeholder":
                # Point-to-point sends need dense buffers; contiguous() is a no-op when x already is.
                c = g.create_node("call_function", aten.contiguous.default, (x,), name=f"contiguous_{v.name}")
                c.meta["val"] = v.meta.get("val")
                info = _view_info(v)
                if info is not None:
                    set_info(c, info)
                x = c
            outs.append(x)
        out = g.output(tuple(outs))
        specs = [get_info(v).spec if get_info(v) is not None else None for v in stage.outputs]
        if all(isinstance(s, TensorSpec) for s in specs):
            set_info(out, NodeInfo(input_placements=tuple(tuple(s.placements) for s in specs), role="output",
                                   origin="split_stages"))
    sub = fx.GraphModule(root, g, class_name=f"Stage{stage.index}")
    sub.meta["fxpar"] = gm.meta.get("fxpar")
    return sub


def _param_bytes(gm: fx.GraphModule, stage: _Stage) -> tuple[tuple[str, ...], int]:
    names, total, seen = [], 0, set()
    for a in stage.attrs:
        obj = attr_of(gm, a.target)
        if isinstance(obj, nn.Parameter):
            names.append(a.target)
            if id(obj) not in seen:
                seen.add(id(obj))
                total += obj.numel() * obj.element_size()
    return tuple(sorted(names)), total
