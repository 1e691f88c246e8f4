"""split_stages: cut this rank's graph into pipeline stages.

Requires: local_params. Provides: stages.

Runs last, on the graph tensor parallelism has already rewritten for this
rank, so a pp x tp pipeline is the composition of the two: each stage is a
slice of the local SPMD graph, with its collectives, and runs on every rank of
its tp group.

The number of stages S is the pp mesh size times the schedule's stages per
rank (`fxpar.core.stages.resolve_stages`), or the plan's cut points + 1. Cuts go

- at the plan's cut points (`Plan(pp=["layers.4", ...])`): a stage starts at
  the first node of each named module; or
- at the model's own `torch.distributed.pipelining.pipe_split()` markers, when the
  plan names no cut points (the markers are removed from the graph); or
- automatically: between blocks (the children of the model's layer lists,
  `layers.3` | `layers.4`, plus the ends of each list), balanced by the cost
  model in `fxpar/analysis/cost.py` (roofline time per node from symbolic shapes,
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
`fxpar.runtime.pipeline.PipelineModule` sums its gradients over the owners. Stages not
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

from fxpar._torch.aten import BATCH_NORM_TRAINING_FLAG
from fxpar._torch.fx import copy_codegen, pytree
from fxpar._torch.pipelining import PIPE_SPLIT
from fxpar.analysis.cost import DeviceModel, NodeCost, balance, evaluate, example_sizes, node_cost, value_bytes
from fxpar.analysis.precision import narrowed_parameters, warn_narrowed_parameters
from fxpar.core.dataflow import differentiable
from fxpar.core.errors import PlanError, ScheduleError, block_of, module_fqn_of
from fxpar.core.pass_api import PassContext, PassResult, fx_pass
from fxpar.core.spec import TensorSpec, get_info, set_info
from fxpar.core.stages import STAGES_KEY, PipelineSplitInfo, StageInfo, resolve_stages, stage_ranks
from fxpar.ops.collectives import COLLECTIVE_OPS
from fxpar.passes._graph import module_fqns
from fxpar.passes._stage_modules import (
    _build_stage_module,
    _collect,
    _input_free,
    _is_tensor,
    _param_bytes,
    _Stage,
    _substitute_sizes,
    _view_info,
)

log = logging.getLogger(__name__)
aten = torch.ops.aten

_COMPUTE = ("call_function", "call_module")


# --------------------------------------------------------------------------- graph facts


def _module(node: fx.Node) -> str:
    """The user module of a node; '' for the root and for export's private hook entries."""
    fqn = module_fqn_of(node)
    return "" if fqn.startswith("_") else fqn


def _size_names(placeholders: list[fx.Node]) -> dict:
    """Each input size symbol -> where it comes from ('input_ids.size(0)'), the first input that has it."""
    names: dict = {}
    for node in placeholders:
        val = node.meta.get("val")
        for d, s in enumerate(val.shape if isinstance(val, torch.Tensor) else ()):
            if isinstance(s, torch.SymInt) and len(s.node.expr.free_symbols) == 1:
                names.setdefault(str(next(iter(s.node.expr.free_symbols))), f"{node.name}.size({d})")
    return names


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


_BATCH_NORMS = BATCH_NORM_TRAINING_FLAG  # BatchNorm overload -> position of its `training` flag


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


def _batch_symbols(gm: fx.GraphModule) -> set:
    syms: set = set()
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor) and val.ndim and \
                isinstance(val.shape[0], torch.SymInt):
            syms |= val.shape[0].node.expr.free_symbols
    return syms


def _has_batch(val: Any, syms: set) -> bool:
    return isinstance(val, torch.Tensor) and any(
        isinstance(s, torch.SymInt) and s.node.expr.free_symbols & syms for s in val.shape)


def _check_batch_reductions(gm: fx.GraphModule, microbatches: int, *, allow: bool) -> None:
    """A differentiable value reduced over the batch dim (x - x.mean(0)) would be reduced per microbatch.

    Found by shape: an op whose tensor input has a size of the batch symbol and whose floating output
    has none, on a path that carries gradients (integer or no-grad counts, as an MoE router's token
    histogram, do not change per-example values and pass). Refused as BatchNorm is, or warned with
    batch_norm_per_microbatch=True.
    """
    syms = _batch_symbols(gm) if microbatches > 1 else set()
    if not syms:
        return
    grads = differentiable(gm)
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op != "call_function" or node not in grads or not isinstance(val, torch.Tensor) \
                or not val.dtype.is_floating_point or _has_batch(val, syms) \
                or not any(_has_batch(a.meta.get("val"), syms) for a in node.all_input_nodes):
            continue
        fqn = module_fqn_of(node) or "<root>"
        what = (f"{node.target} at %{node.name} in module '{fqn}' reduces over the batch dim in a pipeline with "
                f"{microbatches} microbatches: it would see each microbatch's rows only, not the whole batch as "
                "the unsplit model does")
        if allow:
            log.warning("%s; allowed by batch_norm_per_microbatch=True", what)
            continue
        raise PlanError(f"{what}. Ways out: reduce over other dims, use Plan(microbatches=1, schedule='gpipe'), "
                        "or accept per-microbatch values explicitly with parallelize(..., "
                        "batch_norm_per_microbatch=True)")


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


def _take_pipe_splits(gm: fx.GraphModule) -> list[fx.Node]:
    """Removes the model's `pipe_split()` markers; returns the node after each (a stage starts there)."""
    starts = []
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target is PIPE_SPLIT:
            nxt = n.next
            while nxt.op not in _COMPUTE and nxt.op != "output":
                nxt = nxt.next
            starts.append(nxt)
            gm.graph.erase_node(n)
    return starts


def _marker_cuts(starts: list[fx.Node], pos: dict[fx.Node, int], partial_at: set[int], num_stages: int,
                 n: int) -> dict[int, str]:
    """Position -> name for cuts at the model's pipe_split() markers (torch.distributed.pipelining's own)."""
    if len(starts) + 1 != num_stages:
        raise PlanError(f"the model has {len(starts)} pipe_split() markers ({len(starts) + 1} stages) but the mesh "
                        f"and plan ask for {num_stages} stages; give pp x stages per rank = {len(starts) + 1}, or "
                        "cut points in the plan (Plan(pp=[module FQNs]), which take precedence over the markers)")
    positions: dict[int, str] = {}
    for k, node in enumerate(starts):
        p = _past_partial(pos[node], partial_at, n - 1) if node in pos else n
        if p == 0 or p >= n or p in positions:
            raise PlanError(f"pipe_split() marker {k} leaves a pipeline stage without ops; move or remove it")
        positions[p] = f"pipe_split() {k}"
    return dict(sorted(positions.items()))


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
    _check_batch_reductions(gm, microbatches, allow=bool(ctx.options.get("batch_norm_per_microbatch", False)))
    if microbatches > 1:  # each microbatch's gradient of a parameter cast down is rounded on its own
        warn_narrowed_parameters(narrowed_parameters(gm), f"{microbatches} microbatches")

    # ---- where to cut
    marker_starts = _take_pipe_splits(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    seq = [n for n in gm.graph.nodes if n.op in _COMPUTE]
    pos = {n: i for i, n in enumerate(seq)}
    fqns = [_module(n) for n in seq]
    hints = example_sizes(gm)
    device = DeviceModel()
    costs = [node_cost(n) for n in seq]
    times = [device.time_value(c, hints) for c in costs]
    cross, partial_at = _crossings(seq, pos, placeholders, hints)
    if isinstance(ctx.plan.pp, tuple):
        by_pos = _user_cuts(gm, seq, fqns, ctx.plan.pp, partial_at)
        bounds = sorted(by_pos)
        balanced = False
    elif marker_starts:
        by_pos = _marker_cuts(marker_starts, pos, partial_at, num_stages, len(seq))
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
    out_flat = [a for a in pytree.tree_leaves(out_tree) if isinstance(a, fx.Node)]
    # None outputs (HF's unused ModelOutput fields, `return x, None`) stay constants of the output tree.
    if len(out_flat) != len([a for a in pytree.tree_leaves(out_tree) if a is not None]):
        raise ScheduleError("the model returns non-tensor values besides tensors; a pipelined model's outputs "
                            "must all be tensors or None")
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
    copy_codegen(gm.graph, parent)
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
        total = NodeCost(flops, sympy.Add(*(costs[pos[n]].mem_bytes for n in st.nodes)),
                         sympy.Add(*(costs[pos[n]].comm_bytes for n in st.nodes)))
        time = device.time(total)  # the stage's roofline, symbolic (time_value sums the nodes' own)
        params, pbytes = _param_bytes(gm, st)
        for name in params:
            uses.setdefault(name, []).append(k)
        recv = sympy.Add(*(value_bytes(v) for v in st.inputs)) if k else sympy.Integer(0)
        mods = [f for f in (fqns[pos[n]] for n in st.nodes) if f]
        start = bounds[k - 1] if k else None
        infos.append(StageInfo(
            index=k, rank=ranks[k], cut_before=by_pos.get(start, "") if k else "",
            first_module=_display(mods[0]) if mods else "", last_module=_display(mods[-1]) if mods else "",
            num_nodes=len(st.nodes), flops=flops, mem_bytes=total.mem_bytes, comm_bytes=total.comm_bytes, time=time,
            time_value=sum(times[pos[n]] for n in st.nodes),
            flops_value=evaluate(flops, hints), params=params, param_bytes=pbytes,
            inputs=tuple(v.name for v in st.inputs) if k else (), recv_bytes=recv,
            recv_bytes_value=evaluate(recv, hints)))
    tied = tuple((name, tuple(ks)) for name, ks in sorted(uses.items()) if len(ks) > 1)
    sizes = {str(s): int(v) for s, v in hints.items()
             if any(str(s) in str(info.flops) or str(s) in str(info.recv_bytes) for info in infos)}
    result.meta[STAGES_KEY] = PipelineSplitInfo(
        stages=tuple(infos), schedule=spec.name, pp_size=pp_size, microbatches=microbatches,
        balanced=balanced, tied=tied, coordinate=coordinate, example_sizes=sizes,
        size_names=_size_names(placeholders))
    log.debug("split into %d stages at %s", num_stages, [by_pos.get(b) for b in bounds])
    return PassResult(result, True)
