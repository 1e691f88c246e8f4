"""split_stages: cut this rank's graph into pipeline stages.

Requires: local_params. Provides: stages.

Runs last, on the graph tensor parallelism has already rewritten for this
rank, so a pp x tp pipeline is the composition of the two: each stage is a
slice of the local SPMD graph, with its collectives, and runs on every rank of
its tp group.

The number of stages S is the pp mesh size times the schedule's stages per
rank (`fxpar.pipeline.resolve_stages`), or the plan's cut points + 1. Cuts go

- at the plan's cut points (`Plan(pp=["layers.4", ...])`): a stage starts at
  the first node of each named module; or
- automatically: between blocks (the children of the model's layer lists,
  `layers.3` | `layers.4`, plus the ends of each list), balanced by the cost
  model in `passes/_cost.py` (roofline time per node from symbolic shapes,
  plus the bytes crossing each cut).

Every compute node gets the stage of its position in graph order, so stages
can never form a cycle, and root-module nodes (masks, rotary tables, the
activations between layers) land where dataflow puts them. Values a later
stage needs are passed through the stages in between (the schedules only
connect neighbours). Symbolic sizes (`sym_size`, shape arithmetic) are not
sent: each stage recomputes them, from a tensor it already receives when one
has that size; nor are tensors computed from buffers, constants and sizes
alone (rotary tables, causal masks, position ids: `_input_free`), which each
stage that uses them recomputes, so cuts carry only the activations. Parameters are owned: each stage GraphModule holds exactly the
parameters its nodes use, under their original FQNs; a weight used by several
stages (tied embedding and lm_head) is held by each, and
`fxpar.pipeline.PipelineModule` sums its gradients over the owners. Stages not
run by this rank hold storage-free stand-ins (one zero expanded to the
shape), so no rank holds another stage's weights.

Invariants: every node of the input graph is in exactly one stage (get_attr
and recomputed symbolic sizes may appear in several); a stage's inputs are
exactly the previous stage's outputs, in the same order; stage outputs are
contiguous (`aten.contiguous`, a no-op when they already are) because
point-to-point sends need dense buffers; the parent's outputs are the input
graph's outputs. Node meta (`val`, `meta["fxpar"]`, module stacks) is kept.

Before (one graph; GPT-2 with 4 blocks, 2 stages):
    %add_11 = aten.add.Tensor(%add_8, %dropout_4)          # transformer.h.1
    %layer_norm_4 = aten.layer_norm(%add_11, ...)           # transformer.h.2
After (the parent; stage_0 and stage_1 are GraphModules):
    %stage_0 = call_module[stage_0](%input_ids)
    %expand_2 = getitem(%stage_0, 0)                        # the attention mask
    %add_11 = getitem(%stage_0, 1)                          # the residual stream
    %stage_1 = call_module[stage_1](%expand_2, %add_11)
    %linear = getitem(%stage_1, 0)
    return (linear,)

Raises ScheduleError for more stages than blocks, a schedule that does not
fit the stage count, or an input whose batch dim capture made static;
PlanError for a cut point that names no module, or a BatchNorm in training
mode with more than one microbatch (per-microbatch statistics) unless
`options["batch_norm_per_microbatch"]` accepts them.
"""

from __future__ import annotations

import bisect
import difflib
import logging
import operator
from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.nn as nn

from fxpar.collectives import COLLECTIVE_OPS
from fxpar.dataflow import attr_of
from fxpar.errors import PlanError, ScheduleError, block_of, module_fqn_of
from fxpar.pass_manager import PassContext, PassResult, fx_pass
from fxpar.pipeline import (
    STAGES_KEY,
    PipelineSplitInfo,
    StageInfo,
    resolve_stages,
    stage_ranks,
)
from fxpar.spec import NodeInfo, TensorSpec, get_info, set_info

from fxpar.passes._cost import DeviceModel, balance, evaluate, node_cost, value_bytes
from fxpar.passes._graph import module_fqns

log = logging.getLogger(__name__)
aten = torch.ops.aten

_COMPUTE = ("call_function", "call_module")


# --------------------------------------------------------------------------- graph facts


def _module(node: fx.Node) -> str:
    """The user module of a node; '' for the root and for export's private hook entries."""
    fqn = module_fqn_of(node)
    return "" if fqn.startswith("_") else fqn


def _is_tensor(node: fx.Node) -> bool:
    """Whether a node's value is one tensor (sendable); tuples, SymInts and None are not."""
    val = node.meta.get("val")
    if val is None:
        # fxpar passes that forget `val` still make tensors, except shape arithmetic.
        return node.op != "call_function" or getattr(node.target, "__module__", "") not in ("_operator", "operator")
    return isinstance(val, torch.Tensor)


def _example_sizes(gm: fx.GraphModule) -> dict:
    """Symbol -> example value for every size symbol of the graph's inputs."""
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor):
            for s in val.shape:
                if isinstance(s, torch.SymInt):
                    env = s.node.shape_env
                    return dict(getattr(env, "backed_var_to_val", None) or env.var_to_val)
    return {}


def _check_batch_dims(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op != "placeholder" or not isinstance(val, torch.Tensor):
            continue
        if val.ndim == 0 or not isinstance(val.shape[0], torch.SymInt):
            size = "is a scalar" if val.ndim == 0 else f"has a static batch size {val.shape[0]}"
            raise ScheduleError(
                f"input '{node.name}' {size} in the captured graph, so it cannot be split into microbatches "
                "along dim 0; capture with a batch of 2 or more and keep the model's code free of branches "
                "on the batch size, so torch.export keeps that dim symbolic")


# BatchNorm's training-mode overloads and the position of their `training` flag (None: always training).
_BATCH_NORMS = {
    torch.ops.aten.batch_norm.default: 5,
    torch.ops.aten.native_batch_norm.default: 5,
    torch.ops.aten._native_batch_norm_legit.default: 5,
    torch.ops.aten._native_batch_norm_legit.no_stats: 3,
    torch.ops.aten._native_batch_norm_legit_functional.default: 5,
    torch.ops.aten._batch_norm_with_update.default: None,
    torch.ops.aten._batch_norm_with_update_functional.default: None,
}


def _check_batch_coupled(gm: fx.GraphModule, microbatches: int, *, allow: bool) -> None:
    """BatchNorm in training mode would compute its statistics per microbatch: refuse, or warn if allowed.

    Its output (and so every gradient) depends on which rows share a batch; the unsplit model's
    statistics are over the whole batch, a pipeline's over each microbatch (torch.distributed.pipelining
    does the same, silently). Data parallelism alone is exact: batch_norm has no sharding rule, so it
    runs on the gathered batch.
    """
    if microbatches <= 1:
        return
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _BATCH_NORMS:
            continue
        flag = _BATCH_NORMS[node.target]
        if flag is not None and not (node.args[flag] if len(node.args) > flag else node.kwargs.get("training")):
            continue
        fqn = module_fqn_of(node) or "<root>"
        what = (f"BatchNorm '{fqn}' ({node.target}) is in training mode in a pipeline with {microbatches} "
                "microbatches: it would normalize each microbatch by its own statistics (and update its running "
                "statistics once per microbatch), not by the whole batch's as the unsplit model does")
        if allow:
            log.warning("%s; allowed by batch_norm_per_microbatch=True", what)
            continue
        raise PlanError(f"{what}. Ways out: put the norm in eval mode (model.eval(), or just "
                        f"model.get_submodule({fqn!r}).eval()) before parallelize; use microbatches=1 in the "
                        "plan; replace it with a per-sample norm (LayerNorm, GroupNorm); or accept per-microbatch "
                        "statistics explicitly with parallelize(..., batch_norm_per_microbatch=True)")


# --------------------------------------------------------------------------- where to cut


def _crossings(seq: list[fx.Node], pos: dict[fx.Node, int], placeholders: list[fx.Node],
               hints: dict) -> tuple[list[float], set[int]]:
    """Bytes crossing a cut before each position, and the positions a Partial value crosses.

    A tensor defined at d and last used at u crosses every cut p with d < p <= u.
    """
    n = len(seq)
    diff = [0.0] * (n + 2)
    partial = [0] * (n + 2)
    for v in [*placeholders, *seq]:
        if not _is_tensor(v):
            continue
        d = pos.get(v, -1)
        uses = [pos[u] if u.op != "output" else n for u in v.users if u in pos or u.op == "output"]
        if not uses:
            continue
        u = max(uses)
        if u <= d:
            continue
        b = evaluate(value_bytes(v), hints)
        diff[d + 1] += b
        diff[u + 1] -= b
        info = get_info(v)
        if info is not None and isinstance(info.spec, TensorSpec) and any(p.is_partial() for p in info.spec.placements):
            partial[d + 1] += 1
            partial[u + 1] -= 1
    cross, running, count, partial_at = [], 0.0, 0, set()
    for p in range(n + 1):
        running += diff[p]
        count += partial[p]
        cross.append(running)
        if count:
            partial_at.add(p)
    return cross, partial_at


def _blocks(fqns: list[str], weight: list[bool]) -> tuple[dict[str, tuple[int, int]], list[list[str]]]:
    """Blocks (first, last position of their delimiting nodes, `weight`) and their lists, in graph order.

    Blocks are the children of layer lists (module FQNs ending in an index)
    with at least two children; a model without lists uses its top-level
    modules.
    """
    span: dict[str, tuple[int, int]] = {}
    for i, f in enumerate(fqns):
        b = block_of(f) if f and weight[i] else None
        if b is not None:
            first, _ = span.get(b, (i, i))
            span[b] = (first, i)
    lists: dict[str, list[str]] = {}
    for b in sorted(span, key=lambda b: span[b][0]):
        lists.setdefault(b.rpartition(".")[0], []).append(b)
    groups = [bs for bs in lists.values() if len(bs) >= 2]
    if not groups:
        span = {}
        for i, f in enumerate(fqns):
            if f and weight[i]:
                top = f.split(".")[0]
                first, _ = span.get(top, (i, i))
                span[top] = (first, i)
        groups = [sorted(span, key=lambda b: span[b][0])] if span else []
    kept = {b for bs in groups for b in bs}
    return {b: s for b, s in span.items() if b in kept}, groups


def _past_partial(p: int, partial_at: set[int], limit: int) -> int:
    """The first cut position at or after p where no Partial value crosses (sums are reduced before a send)."""
    while p in partial_at and p < limit:
        p += 1
    return p


def _delimits(node: fx.Node) -> bool:
    """Whether a node marks where its module's ops are: not a collective or a value-less assert.

    A collective reducing the previous block's output, or a shape assert, may
    sit between two blocks whatever module it names.
    """
    return node.target not in COLLECTIVE_OPS and node.meta.get("val") is not None


def _auto_cuts(seq: list[fx.Node], fqns: list[str], times: list[float], cross: list[float],
               partial_at: set[int], num_stages: int) -> list[int]:
    weight = [_delimits(n) for n in seq]
    span, groups = _blocks(fqns, weight)
    if num_stages > len(span):
        names = [g[0].rpartition(".")[0] or "<root>" for g in groups]
        raise ScheduleError(
            f"cannot split the model into {num_stages} pipeline stages automatically: it has only {len(span)} "
            f"blocks{(' (children of ' + ', '.join(repr(n) for n in names) + ')') if names else ''}, and stages are "
            f"cut between blocks; use at most {len(span)} stages (pp mesh size x stages per rank), or give cut "
            "points in the plan (Plan(pp=[module FQNs]))")
    n = len(seq)
    candidates = set()
    for bs in groups:
        for b in bs:
            candidates.add(_past_partial(span[b][0], partial_at, span[b][1]))
        candidates.add(_past_partial(span[bs[-1]][1] + 1, partial_at, n))
    # A cut must not split a block: no block may have computing nodes on both sides.
    straddled = set()
    for first, last in span.values():
        straddled.update(range(first + 1, last + 1))
    candidates = sorted(p for p in candidates if 0 < p < n and p not in partial_at and p not in straddled)
    bounds = [0, *candidates, n]
    units = [sum(times[a:b]) for a, b in zip(bounds, bounds[1:])]
    cut_bytes = [0.0, *(cross[p] for p in candidates), 0.0]
    try:
        chosen = balance(units, cut_bytes, num_stages)
    except ValueError as e:
        raise ScheduleError(f"cannot cut the model into {num_stages} stages between blocks: {e}; "
                            "give cut points in the plan (Plan(pp=[module FQNs]))") from e
    return [bounds[j] for j in chosen]


def _user_cuts(gm: fx.GraphModule, seq: list[fx.Node], fqns: list[str],
               cuts: tuple[str, ...], partial_at: set[int]) -> dict[int, str]:
    """Position -> cut point name for the plan's cut points (a stage starts at each module's first node)."""
    weight = [_delimits(n) for n in seq]
    known = [f for f in module_fqns(gm) if not f.startswith("_")]
    positions: dict[int, str] = {}
    for cut in cuts:
        if cut not in known:
            near = difflib.get_close_matches(cut, known, n=5, cutoff=0.4)
            hint = f"; nearest module FQNs: {near}" if near else f"; module FQNs look like {known[:5]}"
            raise PlanError(f"pipeline cut point {cut!r} names no module of the model{hint}")
        mine = [i for i, f in enumerate(fqns) if f == cut or f.startswith(cut + ".")]
        # A stage starts at the module's first delimiting node (shape asserts may come before it).
        p = next((i for i in mine if weight[i]), mine[0] if mine else None)
        if p is None:
            raise PlanError(f"pipeline cut point {cut!r} names a module that runs no op in the captured graph; "
                            "cut before a module that forward calls")
        # Partial sums must be reduced before they leave a stage: cut after the reducing collective.
        p = _past_partial(p, partial_at, len(seq) - 1)
        if p in positions:
            raise PlanError(f"pipeline cut points {positions[p]!r} and {cut!r} start at the same node; give one")
        positions[p] = cut
    ordered = sorted(positions)
    for k, (a, b) in enumerate(zip([0, *ordered], [*ordered, len(seq)])):
        if not any(f and w for f, w in zip(fqns[a:b], weight[a:b])):
            at = f"before {positions[b]!r}" if b in positions else "at the end"
            raise PlanError(f"pipeline stage {k} ({at}) would run no module's ops; remove or move the cut point "
                            f"{positions.get(b, positions.get(a))!r}")
    return {p: positions[p] for p in ordered}


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


def _display(fqn: str) -> str:
    return block_of(fqn) or fqn


@fx_pass(requires=("local_params",), provides=("stages",))
def split_stages(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    resolved = resolve_stages(ctx.plan, ctx.options.get("pp"))
    if resolved is None:
        return PassResult(gm, False)
    spec, num_stages, pp_size, microbatches = resolved
    pp = ctx.options.get("pp")
    coordinate = pp.coordinate if pp is not None else None
    _check_batch_dims(gm)
    _check_batch_coupled(gm, microbatches, allow=bool(ctx.options.get("batch_norm_per_microbatch", False)))

    # ---- where to cut
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    seq = [n for n in gm.graph.nodes if n.op in _COMPUTE]
    pos = {n: i for i, n in enumerate(seq)}
    fqns = [_module(n) for n in seq]
    hints = _example_sizes(gm)
    device = DeviceModel()
    costs = [node_cost(n) for n in seq]
    times_sym = [device.time(c) for c in costs]
    times = [evaluate(t, hints) for t in times_sym]
    cross, partial_at = _crossings(seq, pos, placeholders, hints)
    if isinstance(ctx.plan.pp, tuple):
        by_pos = _user_cuts(gm, seq, fqns, ctx.plan.pp, partial_at)
        bounds = sorted(by_pos)
        balanced = False
    else:
        bounds = _auto_cuts(seq, fqns, times, cross, partial_at, num_stages)
        by_pos = {p: _display(fqns[p]) or seq[p].name for p in bounds}
        balanced = True

    # ---- assign nodes: by position; a tuple's getitems go with the tuple
    stages = [_Stage(k) for k in range(num_stages)]
    stage_of: dict[fx.Node, int] = {}
    for i, n in enumerate(seq):
        k = bisect.bisect_right(bounds, i)
        if n.target is operator.getitem and isinstance(n.args[0], fx.Node) and n.args[0] in stage_of \
                and not _is_tensor(n.args[0]):
            k = stage_of[n.args[0]]
        stage_of[n] = k
        stages[k].nodes.append(n)
        stages[k].defined.add(n)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    out_tree = output.args[0]
    out_flat = [a for a in torch.utils._pytree.tree_leaves(out_tree) if isinstance(a, fx.Node)]
    if len(out_flat) != len(torch.utils._pytree.tree_leaves(out_tree)):
        raise ScheduleError("the model returns non-tensor values besides tensors; a pipelined model's outputs "
                            "must all be tensors (return None-free outputs)")
    input_free = _input_free(gm)
    for k, st in enumerate(stages):
        _collect(st, st.nodes + ([output] if k == num_stages - 1 else []), input_free)

    # ---- what flows between stages, from the last stage back
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    needed_later: list[fx.Node] = []
    for k in range(num_stages - 1, -1, -1):
        st = stages[k]
        st.outputs = out_flat if k == num_stages - 1 else list(needed_later)
        live = dict.fromkeys([*st.direct, *(v for v in needed_later if v not in st.defined)])
        extra = _substitute_sizes(st, sorted(live, key=order.__getitem__))
        live.update(dict.fromkeys(extra))
        st.inputs = sorted(live, key=order.__getitem__)
        st.remat = dict.fromkeys(sorted(st.remat, key=order.__getitem__))  # recomputed in graph order
        needed_later = st.inputs
    if stages[0].inputs and any(v.op != "placeholder" for v in stages[0].inputs):
        bad = [v.name for v in stages[0].inputs if v.op != "placeholder"]
        raise ScheduleError(f"stage 0 would need values {bad} no stage computes before it (an fxpar bug)")
    # The first stage receives the model's inputs, in the graph's order.
    stages[0].inputs = placeholders

    # ---- the stage modules and the parent that calls them in order
    ranks = stage_ranks(spec.name, num_stages, pp_size)
    meta_cache: dict[int, Any] = {}
    modules: dict[str, fx.GraphModule] = {}
    for k, st in enumerate(stages):
        local = coordinate is None or ranks[k] == coordinate
        modules[f"stage_{k}"] = _build_stage_module(gm, st, k == num_stages - 1, out_flat, local, meta_cache)
    parent = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for p in placeholders:
        env[p] = parent.node_copy(p)
    for k, st in enumerate(stages):
        call = parent.call_module(f"stage_{k}", tuple(env[v] for v in st.inputs))
        for i, v in enumerate(st.outputs):
            gi = parent.create_node("call_function", operator.getitem, (call, i), name=v.name)
            gi.meta["val"] = v.meta.get("val")
            info = _view_info(v)
            if info is not None:
                set_info(gi, info)
            if k < num_stages - 1:
                env[v] = gi
            else:
                env.setdefault(("out", i), gi)
    out_map = {}
    for i, v in enumerate(out_flat):
        out_map.setdefault(v, env[("out", i)])
    new_out = parent.output(fx.node.map_arg(out_tree, lambda x: out_map[x]))
    new_out.meta.update(output.meta)
    parent._codegen = gm.graph._codegen
    result = fx.GraphModule(modules, parent, class_name=type(gm).__name__)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(result, attr, getattr(gm, attr))
    result.meta.update(gm.meta)

    # ---- what explain() and the runtime need to know
    infos = []
    uses: dict[str, list[int]] = {}
    for k, st in enumerate(stages):
        # sympy.Add(*terms) is linear in the number of terms; repeated + is quadratic.
        flops = sympy.Add(*(costs[pos[n]].flops for n in st.nodes))
        time = sympy.Add(*(times_sym[pos[n]] for n in st.nodes))
        params, pbytes = _param_bytes(gm, st)
        for name in params:
            uses.setdefault(name, []).append(k)
        recv = sympy.Add(*(value_bytes(v) for v in st.inputs)) if k else sympy.Integer(0)
        mods = [f for f in (fqns[pos[n]] for n in st.nodes) if f]
        start = bounds[k - 1] if k else None
        infos.append(StageInfo(
            index=k, rank=ranks[k], cut_before=by_pos.get(start, "") if k else "",
            first_module=_display(mods[0]) if mods else "", last_module=_display(mods[-1]) if mods else "",
            num_nodes=len(st.nodes), flops=flops, mem_bytes=sympy.Add(*(costs[pos[n]].mem_bytes for n in st.nodes)),
            comm_bytes=sympy.Add(*(costs[pos[n]].comm_bytes for n in st.nodes)), time=time,
            time_value=sum(times[pos[n]] for n in st.nodes),
            flops_value=evaluate(flops, hints), params=params, param_bytes=pbytes,
            inputs=tuple(v.name for v in st.inputs) if k else (), recv_bytes=recv,
            recv_bytes_value=evaluate(recv, hints)))
    tied = tuple((name, tuple(ks)) for name, ks in sorted(uses.items()) if len(ks) > 1)
    sizes = {str(s): int(v) for s, v in hints.items()
             if any(str(s) in str(info.flops) or str(s) in str(info.recv_bytes) for info in infos)}
    result.meta[STAGES_KEY] = PipelineSplitInfo(
        stages=tuple(infos), schedule=spec.name, pp_size=pp_size, microbatches=microbatches,
        balanced=balanced, tied=tied, coordinate=coordinate, example_sizes=sizes)
    log.debug("split into %d stages at %s", num_stages, [by_pos.get(b) for b in bounds])
    return PassResult(result, True)
