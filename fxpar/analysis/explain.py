"""explain(): a ParallelModule described for people.

Sections: the plan per module (styles and parameter placements), every
collective (op, mesh dim, group size, module, payload bytes per step forward
and of its backward dual, at the example inputs' sizes), parameter memory per
rank, every fallback, and for pipelines the stages (`fxpar.analysis.schedule.explain_stages`).
A pipelined module reports the stages this rank runs. Payload bytes are the bytes of the tensor each rank
puts into the collective; for ring algorithms on n ranks the traffic per rank
is 2(n-1)/n of that for all_reduce and (n-1)/n for gathers and scatters.
"""

from __future__ import annotations

import re
from collections import defaultdict

import sympy
import torch
import torch.fx as fx

from fxpar._torch.fx import pytree
from fxpar.analysis.collective_info import CollectiveInfo, collectives, moe_collectives
from fxpar.analysis.compiled_schedule import compiled_schedule_lines
from fxpar.analysis.fsdp import bucket_groups
from fxpar.analysis.overlap import overlap_lines
from fxpar.analysis.memory import grad_sync_lines, memory_lines, memory_per_rank, tensor_key
from fxpar.analysis.schedule import explain_stages, pipeline_order_of
from fxpar.analysis.timeline import Bar, rank_timeline
from fxpar.core.dataflow import attr_of
from fxpar.core.errors import block_of
from fxpar.analysis.plan_io import full_mesh
from fxpar.analysis.replicated import replicated_lines
from fxpar.core.fmt import fmt_bytes, natural_key
from fxpar.core.spec import FSDP_ROOT_UNIT, SIZE_BINDINGS, TensorSpec, get_info, placements_str
from fxpar.core.stages import stage_info
from fxpar.ops.collectives import COLLECTIVE_OPS
from fxpar.ops.moe import moe_experts

__all__ = ["CollectiveInfo", "collectives", "moe_collectives", "param_memory", "explain"]


def param_memory(gm: fx.GraphModule) -> tuple[int, int]:
    """(full bytes of all parameters, bytes this rank holds), tied tensors counted once."""
    full = local = 0
    seen = set()
    # a tied weight is one tensor under two FQNs; the get_attr of the name the graph no longer reads
    # may carry a stale (replicated) spec, so live nodes count first and the tensor decides its size
    for node in sorted((n for n in gm.graph.nodes if n.op == "get_attr"), key=lambda n: not n.users):
        info = get_info(node)
        if info is None or not isinstance(info.spec, TensorSpec) or info.role != "param":
            continue
        t = attr_of(gm, node.target)
        key = tensor_key(t) if isinstance(t, torch.Tensor) else (id(node),)
        if key in seen:
            continue
        seen.add(key)
        full += info.spec.nbytes()
        local += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else info.spec.nbytes(local=True)
    return full, local


def _graphs(pm) -> list[fx.GraphModule]:
    """The graphs this rank runs: its pipeline stages, or its one graph."""
    stages = getattr(pm, "stage_modules", None)
    return list(stages) if stages else [pm.graph_module]


def _model_memory(pm) -> tuple[int, int]:
    """(full bytes of the model's parameters, bytes this rank holds), each tensor counted once."""
    split = stage_info(pm.graph_module)
    if split is None:
        return param_memory(pm.graph_module)
    local_stages = set(split.local_stages)
    full = local = 0
    seen_full: set[str] = set()
    seen_local: set[str] = set()
    for k in range(split.num_stages):
        for node in pm.graph_module.get_submodule(f"stage_{k}").graph.nodes:
            info = get_info(node)
            if node.op != "get_attr" or info is None or not isinstance(info.spec, TensorSpec) or info.role != "param":
                continue
            if node.target not in seen_full:
                seen_full.add(node.target)
                full += info.spec.nbytes()
            if k in local_stages and node.target not in seen_local:
                seen_local.add(node.target)
                local += info.spec.nbytes(local=True)
    return full, local


def _bindings(gm: fx.GraphModule, args: tuple, kwargs: dict) -> dict:
    """Symbol -> size, from the shapes of inputs given to explain() (placeholders in pytree order)."""

    leaves = pytree.tree_leaves((args, kwargs))
    out = {}
    for node, value in zip((n for n in gm.graph.nodes if n.op == "placeholder"), leaves):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and isinstance(value, torch.Tensor):
            for s, v in zip(val.shape, value.shape):
                if isinstance(s, torch.SymInt) and s.node.expr.is_symbol:
                    out[s.node.expr] = sympy.Integer(int(v))
    return out




def _per_block(colls: list[CollectiveInfo]) -> list[str]:
    """Collectives grouped by repeated block (the module FQN up to its first index: layers.3, h.11)."""
    blocks: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    order: list[str] = []
    for c in colls:
        block = block_of(c.module) or c.module or "<root>"
        if block not in blocks:
            order.append(block)
        if c.forward_bytes:
            blocks[block][f"fwd {c.op}"][0] += 1
            blocks[block][f"fwd {c.op}"][1] += c.forward_bytes
        if c.backward_op:
            blocks[block][f"bwd {c.backward_op}"][0] += 1
            blocks[block][f"bwd {c.backward_op}"][1] += c.backward_bytes
    lines = []
    for block in order:
        parts = [f"{k} x{n} {fmt_bytes(b)}" for k, (n, b) in sorted(blocks[block].items())]
        if parts:
            lines.append(f"  {block}: " + "; ".join(parts))
    return lines


def _fsdp_unit_lines(graphs: list[fx.GraphModule], *, keep_root: bool = True) -> list[str]:
    """How the FSDP gathers communicate: one collective per block (fxpar.runtime.fsdp_buckets), or per parameter."""
    groups = bucket_groups(graphs)
    params, units = sum(len(members) for _, members in groups), len(groups)
    if not params:
        return []
    root = [members for _, members in groups if _unit_of(members[0][1]) == FSDP_ROOT_UNIT]
    line = (f"FSDP: {params} parameter gathers run as {units} collective{'s' if units > 1 else ''} each way "
            f"(one per block, fxpar.runtime.fsdp_buckets; fsdp_unit='param' for one per parameter)"
            if units < params else f"FSDP: {params} parameter gathers, one collective each way per parameter")
    if root and keep_root:  # CPU offload gathers one device copy at a time: its root is re-gathered
        line += (f"; the root unit ({sum(len(m) for m in root)} parameters outside the blocks, {FSDP_ROOT_UNIT}) "
                 "is gathered once and kept for the backward, as FSDP2's root: not re-gathered")
    return [line]


def _unit_of(param: fx.Node) -> str | None:
    """The FSDP unit (fsdp_bucket) of a parameter's gather."""
    for user in param.users:
        if user.target is torch.ops.fxpar.fsdp_all_gather.default:
            return getattr(get_info(user), "fsdp_bucket", None)
    return None


def _dtype(d) -> str:
    return str(d).replace("torch.", "") if d is not None else "unchanged"


def _training_lines(gm, graphs) -> list[str]:
    """Mixed precision and activation checkpointing, as the passes recorded them on the graph."""
    out = []
    policy = next((g.meta["mp_policy"] for g in (gm, *graphs) if g.meta.get("mp_policy") is not None), None)
    if policy is not None:
        params = sorted({_dtype(n.meta["val"].dtype) for g in graphs for n in g.graph.nodes
                         if n.op == "get_attr" and isinstance(n.meta.get("val"), torch.Tensor)
                         and n.meta["val"].requires_grad})
        out.append(f"Mixed precision (FSDP2 MixedPrecisionPolicy): parameters and optimizer state stay "
                   f"{', '.join(params)}; compute in {_dtype(policy.param_dtype)} (FSDP gathers in it); "
                   f"gradients reduced in {_dtype(policy.reduce_dtype)}; outputs {_dtype(policy.output_dtype)}")
    ac = gm.meta.get("activation_checkpointing")
    if ac is not None:
        # a pipeline's stages hold their own regions (checkpoint_activations runs per stage)
        regions = [r for g in {id(x): x for x in (gm, *graphs)}.values()
                   for r in getattr(g.meta.get("activation_checkpointing"), "regions", ())]
        blocks = sorted({r.block for r in regions})
        what = "keeps each block's inputs, recomputes its forward (and its collectives) in the backward" \
            if ac.mode == "full" else "keeps matmul, attention and reducing-collective outputs, recomputes the rest"
        out.append(f"Activation checkpointing: {ac.mode}: {len(regions)} regions in {len(blocks)} blocks; {what}")
    return out


def _expert_lines(graphs: list[fx.GraphModule]) -> list[str]:
    """Each fused experts node: its expert sharding and, on ep, the token all-to-all bytes."""
    lines = []
    for g in graphs:
        for n in g.graph.nodes:
            if n.target is not moe_experts:
                continue
            down = n.args[5]
            info, ep = get_info(down), n.kwargs.get("ep_size", 1)
            where = info.style if info is not None and info.style else "experts: see the parameters above"
            if ep > 1:
                parts = moe_collectives(n)
                fwd, bwd = sum(c.forward_bytes for c in parts), sum(c.backward_bytes for c in parts)
                comm = (f"all_to_all({n.kwargs['ep_mesh_dim']}, n={ep}) dispatch + combine (+ counts) inside the "
                        f"node: {fmt_bytes(fwd)} fwd, {fmt_bytes(bwd)} bwd (combine at balanced routing; the real "
                        "split follows the router)")
            else:
                comm = "no token exchange"
            lines.append(f"  %{n.name} [{get_info(n).module_fqn if get_info(n) else ''}]: {where}; {comm}")
    return ["", "Experts (fused MoE nodes):", *lines] if lines else []


def _bucket_overlap_lines(gm: fx.GraphModule) -> list[str]:
    """Each data-parallel gradient bucket and the backward it runs under: the ops before its parameters'
    first use in graph order, whose backward runs after the bucket's last gradient is produced."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    fill: dict[tuple, list] = {}  # bucket -> [first use of its earliest parameter, bytes]
    for node in nodes:
        info = get_info(node)
        sync = info.grad_sync if info is not None and node.op == "get_attr" else None
        if not sync or not node.users or not isinstance(info.spec, TensorSpec):
            continue
        entry = fill.setdefault((sync.bucket, sync.dims), [len(nodes), 0])
        entry[0] = min(entry[0], min(order[u] for u in node.users))
        entry[1] += sync.nbytes(info.spec)
    out = []
    for (bucket, dims), (first, nbytes) in sorted(fill.items()):
        under = [n for n in nodes[:first] if n.op == "call_function" and n.target not in COLLECTIVE_OPS
                 and isinstance(n.meta.get("val"), torch.Tensor)]
        modules = list(dict.fromkeys((get_info(n).module_fqn if get_info(n) else "") or "<root>" for n in under))
        shown = ", ".join(modules[:4]) + (f", ... ({len(modules)} modules)" if len(modules) > 4 else "")
        what = f"overlaps the backward of {len(under)} ops of {shown}" if under else \
            "overlaps nothing: the step waits for it at the end of the backward"
        out.append(f"  grad all_reduce({', '.join(dims)}) bucket {bucket} ({fmt_bytes(nbytes)}): issued after the "
                   f"backward of %{nodes[first].name}; {what}")
    return ["", "Overlap of the data-parallel gradient buckets (backward, fxpar.runtime.grad_sync):", *out] \
        if out else []


_FSDP_BAR = re.compile(r"^(all_gather|reduce_scatter)\((\w+)\) of (\S+) \((re-gather|dual)\)$")


def _fsdp_backward_lines(pm) -> list[str]:
    """Each FSDP unit's backward, as the runtime runs it (`fxpar.analysis.timeline`'s replay of
    fxpar.runtime.fsdp_buckets): its re-gather's issue and wait, its reduce-scatter's issue and wait, and the
    backward ops that run between each issue and its wait."""
    if not bucket_groups([pm.graph_module]):
        return []
    t = rank_timeline(pm)
    backward = [b for b in t.bars[t.backward_from:] if b.lane == "compute" and b.kind == "backward"]
    windows = {o.collective: o for o in t.overlaps}
    units: dict[str, dict[str, Bar]] = {}  # unit -> {'re-gather' / 'dual': its bar}, in backward order
    for b in sorted((b for b in t.bars[t.backward_from:] if b.lane == "comm"), key=lambda b: b.start):
        m = _FSDP_BAR.match(b.label)
        if m:
            units.setdefault(m.group(3), {}).setdefault(m.group(4), b)

    def after(at: float) -> str:  # the backward op that ran last before `at`
        done = [b for b in backward if b.end <= at + 1e-15]
        return f"the backward of %{done[-1].node}" if done else "the start of the backward"

    def before(at: float) -> str:  # the backward op that runs first after `at`
        return next((f"the backward of %{b.node}" for b in backward if b.start >= at - 1e-15), "the end of the step")

    def part(name: str, bar: Bar | None, unit: str = "") -> str:
        if bar is None:
            if name == "re-gather" and unit == FSDP_ROOT_UNIT:
                return "no re-gather (the root unit: kept gathered from the forward, as FSDP2's root)"
            return f"no {name} (" + ("kept gathered from the forward: reshard_after_forward=False)"
                                     if not getattr(pm, "reshard_after_forward", True) and name == "re-gather"
                                     else "no backward op needs it)")
        o = windows.get(bar.label)
        if o is None:  # blocking: nothing runs while it is in flight
            return f"{name} ({fmt_bytes(bar.nbytes)}) blocking, " + (
                f"before {before(bar.end)}" if name == "re-gather" else f"after {after(bar.start)}")
        issued = o.wait.endswith(("reduce-scatter", "re-gather"))  # waited as the runtime issues that one
        wait = f"before {o.wait.replace(' (backward)', '').replace('%', 'the backward of %')}" \
            if o.wait.startswith("%") else f"when {o.wait} is issued" if issued else f"at {o.wait}"
        shown = ", ".join(o.modules[:4]) + (f", ... ({len(o.modules)} modules)" if len(o.modules) > 4 else "")
        under = f"under it {len(o.ops)} backward ops of {shown}" if o.ops else "no compute under it"
        return f"{name} ({fmt_bytes(bar.nbytes)}) issued after {after(o.start)} ({o.issue}), waited {wait}: {under}"

    out = ["", f"FSDP backward per unit (as fxpar.runtime.fsdp_buckets runs it; {len(units)} units, last first):"]
    for unit, bars in units.items():
        out.append(f"  {unit}: {part('re-gather', bars.get('re-gather'), unit)}; "
                   f"{part('reduce-scatter', bars.get('dual'))}")
    return out


def _loss_lines(pm, graphs: list[fx.GraphModule]) -> list[str]:
    """Whether the loss is captured and runs on vocab shards, and whether sequence parallel is on."""
    out = []
    if getattr(pm.graph_module.meta["fxpar"], "loss", False):
        vocab = any(n.target is torch.ops.fxpar.vocab_parallel_gather.default for g in graphs for n in g.graph.nodes)
        out.append("Loss: captured; " + ("cross-entropy on vocab shards (loss parallel: (N, 1) statistics "
                                         "all-reduced, logits never gathered)" if vocab else "computed on whole logits"))
    if getattr(getattr(pm, "requested_plan", None), "sequence_parallel", False):
        out.append("Sequence parallel: on (tp): norms, dropout and residual adds on sequence shards")
    return out


def explain(pm, *inputs, **kwargs) -> str:
    """The report behind `ParallelModule.explain()`; with inputs, bytes are for their sizes."""
    if inputs or kwargs:
        token = SIZE_BINDINGS.set(_bindings(pm.graph_module, inputs, kwargs))
        try:
            return explain(pm)
        finally:
            SIZE_BINDINGS.reset(token)
    gm = pm.graph_module
    graphs = _graphs(pm)
    mesh = pm.mesh_info
    split = stage_info(gm)
    whole = ", ".join(f"{name}={size}" for name, size in full_mesh(pm))  # pp included
    lines = [f"fxpar plan for {gm.meta['fxpar'].model_class} on mesh ({whole})"]
    lines.extend(_training_lines(gm, graphs))
    lines.extend(f"Note: {note}" for note in getattr(gm.meta["fxpar"], "notes", ()))
    lines.extend(_loss_lines(pm, graphs))

    lines.append("")
    lines.append("Parameters (module: style; tensor placements local shape):")
    by_module: dict[str, list[str]] = defaultdict(list)
    styles: dict[str, dict[str, str]] = defaultdict(dict)  # module -> parameter name -> style
    seen: set[tuple[str, str]] = set()  # a tied weight held by several stages is one parameter
    for node in (n for g in graphs for n in g.graph.nodes):
        info = get_info(node)
        if node.op == "get_attr" and info is not None and isinstance(info.spec, TensorSpec) and node.users \
                and (info.module_fqn, str(node.target)) not in seen:
            seen.add((info.module_fqn, str(node.target)))
            name = str(node.target).rpartition(".")[2]
            by_module[info.module_fqn].append(
                f"{name} {placements_str(info.spec.placements)} {list(info.spec.local_shape)}")
            styles[info.module_fqn][name] = info.style or "replicate (default)"
    for module in sorted(by_module, key=natural_key):
        distinct = list(dict.fromkeys(styles[module].values()))
        # a custom module's raw Parameters may play different parts (x @ self.w_up ... @ self.w_down)
        style = distinct[-1] if len(distinct) == 1 else \
            ", ".join(f"{name} {st}" for name, st in styles[module].items())
        lines.append(f"  {module or '<root>'}: {style}; " + ", ".join(by_module[module]))

    colls = [c for g in graphs for c in collectives(g, mesh, moe=True)]
    lines.append("")
    inside = sum(bool(c.note) for c in colls)
    inside = f", {inside} all_to_all inside MoE nodes" if inside else ""
    lines.append(f"Collectives ({len(colls) - sum(bool(c.note) for c in colls)} nodes{inside}; bytes are each rank's "
                 "payload per step at the example sizes):")
    fwd_total = bwd_total = 0
    for c in colls:
        fwd = f"fwd {c.op}({c.mesh_dim}, n={c.group_size}) {fmt_bytes(c.forward_bytes)}" if c.forward_bytes \
            else f"fwd {c.op} (no communication)"
        bwd = f"bwd {c.backward_op} {fmt_bytes(c.backward_bytes)}" if c.backward_op else "bwd none"
        inside = f" (inside the node: {c.note})" if c.note else ""
        lines.append(f"  %{c.node} [{c.module or '<root>'}]{inside}: {fwd}; {bwd}")
        fwd_total += c.forward_bytes
        bwd_total += c.backward_bytes
    counts = defaultdict(int)
    for c in colls:
        if c.forward_bytes:
            counts[f"fwd {c.op}"] += 1
        if c.backward_op:
            counts[f"bwd {c.backward_op}"] += 1
    lines.append(f"  total: forward {fmt_bytes(fwd_total)}, backward {fmt_bytes(bwd_total)}; "
                 + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    lines.extend(_expert_lines(graphs))
    lines.append("")
    lines.append("Collectives per block (count and payload per step):")
    lines.extend(_per_block(colls))

    full, local = _model_memory(pm)
    lines.append("")
    ratio = local / full if full else 1.0
    lines.append(f"Parameter memory per rank: {fmt_bytes(local)} of {fmt_bytes(full)} total ({ratio:.3f} of the model)")
    lines.extend(replicated_lines(graphs, mesh))
    lines.extend(memory_lines(memory_per_rank(pm)))
    lines.extend(grad_sync_lines(pm))
    if split is None:
        lines.extend(_bucket_overlap_lines(gm))
    lines.extend(_fsdp_unit_lines(graphs, keep_root=getattr(pm, "offload_policy", None) is None))
    if getattr(pm, "compile_backend", None) is not None:  # the eager runtime's prefetch is not what runs
        lines.extend(compiled_schedule_lines(pm))
    else:
        for g in graphs:
            lines.extend(overlap_lines(g))
        if split is None:
            lines.extend(_fsdp_backward_lines(pm))

    fallbacks = [(n, get_info(n)) for g in graphs for n in g.graph.nodes
                 if get_info(n) is not None and get_info(n).fallback]
    lines.append("")
    lines.append(f"Fallbacks (ops without a sharding rule, run replicated): {len(fallbacks)}")
    for n, info in fallbacks:
        lines.append(f"  %{n.name} {n.target} in '{info.module_fqn or '<root>'}'")

    if split is not None:
        lines.append("")
        lines.extend(explain_stages(split, pipeline_order=pipeline_order_of(pm)))

    if pm.history:
        lines.append("")
        lines.append("Passes: " + ", ".join(f"{r.name} {r.seconds * 1e3:.1f} ms" for r in pm.history))
    return "\n".join(lines)
