"""replicate_kv_heads: grouped-query attention with more tp ranks than kv heads, kv heads replicated by group.

Requires: param_placements. Provides: kv_replicas.

With KV kv heads, H q heads and tp > KV (Qwen2.5-7B: H=28, KV=4 at tp=8), `annotate_parameters` shards
q_proj / o_proj by heads but must leave k_proj / v_proj replicated (KV does not divide by tp): every rank
computes all KV heads, slices its q heads' share after the kv repeat, and all-gathers that share's
gradient back. Megatron-LM and vLLM instead give each rank only the kv head its q heads attend to. Where
tp % KV == 0 and H % tp == 0 this pass does the same, with even placements only:

* the k / v weight (KV*D, C) is stored as (tp*D, C), kv head j repeated g = tp / KV times in a row
  (`fxpar.core.replicas.repeat_blocks`), Shard(0) over tp: rank r holds kv head r // g, D rows (a bias
  likewise). `CaptureInfo.param_repeats` records (KV, g); full state dicts, gradients and checkpoints
  give back the model's (KV*D, C).
* the k / v path to the attention now carries tp kv "slots" instead of KV heads: shape arguments naming
  KV heads become tp, and the kv repeat's expand (…, KV, H/KV, …) becomes (…, tp, H/tp, …). The merged
  (…, H, …) tensor the attention reads is value for value the model's (q head i reads slot i // (H/tp),
  which holds kv head i // (H/tp) // g = i // (H/KV)), and sharded Shard(heads) like q: attention and
  o_proj stay local, one all-reduce after o_proj as before. No forward collective for k / v.
* each stored weight (and bias) goes through `fxpar::replica_grad_sum` (identity forward; its dual sums
  the gradient over the g ranks that hold the same kv head; derivation in `fxpar.ops.kv_replicas`).
  The input gradient is the usual Megatron f at the attention's replicated input.

Exactness: the path from the projection to the attention is rewritten only when every op on it is known to
treat heads independently (views that keep the heads dim, transposes, rotary's pointwise ops with operands
broadcast over heads, slices off the heads dim, the kv repeat); anything else (an op mixing heads, a kv
tensor leaving the attention) leaves the pair as it is today. Applies to automatic plans, and to the k / v
modules a saved plan names 'colwise (kv heads replicated: ...)' (`HeadsStyle`), on meshes of tp (and dp)
only; pipelines, fsdp, ep and other explicit plans keep today's replicated k / v.

Before:  %k_w = get_attr[k_proj.weight]                          # (KV*D, C): Replicate
         %k = aten.linear(%x, %k_w); %kv = aten.view(%k, [B, T, KV, D]) ... expand [B, KV, H/KV, T, D]
After:   %k_w = get_attr[k_proj.weight]                          # (tp*D, C): Shard(0), kv heads repeated
         %k_w_sum = fxpar.replica_grad_sum(%k_w, g, tp, group, "tp")
         %k = aten.linear(%x, %k_w_sum); %kv = aten.view(%k, [B, T, tp, D]) ... expand [B, tp, H/tp, T, D]
"""

from __future__ import annotations

import dataclasses
import sys

import torch
import torch.fx as fx
import torch.nn as nn
from torch.distributed.tensor.placement_types import Shard

from fxpar.analysis.plan_io import HeadsStyle
from fxpar.capture.export import capture_info
from fxpar.core.pass_api import PassContext, PassResult, fx_pass
from fxpar.core.replicas import repeat_blocks
from fxpar.core.spec import NodeInfo, get_info, make_spec, set_info, shape_key
from fxpar.ops.kv_replicas import REPLICA_GRAD_SUM
from fxpar.passes._graph import module_fqns
from fxpar.passes._megatron import Pair, find_pairs, proj_bias, proj_weight

aten = torch.ops.aten

_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_SAME = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default, aten.neg.default,
         aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default,
         aten.view_as_complex.default, aten.view_as_real.default}
_BINARY = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor}
_SDPA = aten.scaled_dot_product_attention.default
_NO_OUTPUT = {aten._assert_tensor_metadata.default}


@dataclasses.dataclass
class _Step:
    """One node of a kv path, rewritten: its new args and value, where its heads dim is (None: flat KV*D)."""

    args: tuple
    val: object
    heads: int | None
    expanded: bool = False  # the kv repeat's expand: (…, tp, H/tp, …); its users must merge the two dims
    exit: bool = False  # its value is the model's (the merged heads, or the attention's output)


def _val(a, steps: dict[fx.Node, _Step]):
    if isinstance(a, fx.Node):
        return steps[a].val if a in steps else a.meta["val"]
    if isinstance(a, (list, tuple)):
        return type(a)(_val(x, steps) for x in a)
    return a


def _fake(node: fx.Node, args: tuple, steps: dict[fx.Node, _Step]):
    return node.target(*_val(args, steps), **_val(dict(node.kwargs), steps))


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _with(shape: list, i: int, value) -> list:
    out = list(shape)
    out[i] = value
    return out


def _step(node: fx.Node, on_path: list[fx.Node], steps: dict[fx.Node, _Step], kv: int, tp: int) -> _Step | None:
    """The rewrite of one node reading the kv path, or None where it is not known to keep heads apart."""
    t = node.target
    src = steps[on_path[0]]
    args = node.args
    h = src.heads
    if src.expanded and t not in _VIEWS:
        return None
    if t in _VIEWS:
        shape = list(args[1])
        i_val = node.args[0].meta["val"]
        o_val = node.meta["val"]
        if src.expanded:  # (…, tp, H/tp, …) merged into (…, H, …): the model's value again
            if o_val.ndim != i_val.ndim - 1 or shape_key(o_val.shape[:h]) != shape_key(i_val.shape[:h]) \
                    or shape_key(o_val.shape[h + 1:]) != shape_key(i_val.shape[h + 2:]):
                return None
            return _Step(args, _fake(node, args, steps), h, exit=True)
        if h is None:  # (…, KV*D) -> (…, KV, D)
            if o_val.ndim != i_val.ndim + 1 or shape_key(o_val.shape[:-2]) != shape_key(i_val.shape[:-1]):
                return None
            h = o_val.ndim - 2
        elif o_val.ndim < i_val.ndim or shape_key(o_val.shape[:h + 1]) != shape_key(i_val.shape[:h + 1]):
            return None  # only dims after the heads dim may be regrouped
        if shape[h] == kv:
            shape[h] = tp
        elif shape[h] != -1 or o_val.shape[h] != kv:
            return None
        new = (args[0], shape, *args[2:])
        return _Step(new, _fake(node, new, steps), h)
    if h is None:
        return None  # the flat projection output is only viewed into heads
    ndim = src.val.ndim
    if t is aten.transpose.int:
        a, b = _dim(args[1], ndim), _dim(args[2], ndim)
        return _Step(args, _fake(node, args, steps), b if h == a else a if h == b else h)
    if t is aten.permute.default:
        perm = [_dim(d, ndim) for d in args[1]]
        return _Step(args, _fake(node, args, steps), perm.index(h))
    if t is aten.unsqueeze.default:
        d = _dim(args[1], ndim + 1)
        return _Step(args, _fake(node, args, steps), h + 1 if d <= h else h)
    if t is aten.slice.Tensor:
        d = _dim(args[1] if len(args) > 1 else 0, ndim)
        whole = (args[2] if len(args) > 2 else 0) in (0, None) and (args[3] if len(args) > 3 else sys.maxsize) \
            >= sys.maxsize and (args[4] if len(args) > 4 else 1) == 1
        if d == h and not whole:
            return None
        return _Step(args, _fake(node, args, steps), h)
    if t is aten.select.int:
        d = _dim(args[1], ndim)
        if d == h:
            return None
        return _Step(args, _fake(node, args, steps), h - 1 if d < h else h)
    if t is aten.flatten.using_ints:
        start = _dim(args[1], ndim)
        if start <= h:
            return None
        return _Step(args, _fake(node, args, steps), h)
    if t in _SAME:
        if args[0] not in steps or (t is aten.view_as_complex.default and h == ndim - 1):
            return None
        return _Step(args, _fake(node, args, steps), h)
    if t in _BINARY:
        out = _fake(node, args, steps)
        for a in args[:2]:
            if isinstance(a, fx.Node):
                if a in steps and steps[a].exit:
                    return None
                if a in steps:
                    if steps[a].heads is None or out.ndim - steps[a].val.ndim + steps[a].heads != h:
                        return None
                else:  # another operand (rotary's cos / sin): must broadcast over heads
                    v = a.meta["val"]
                    j = h - (out.ndim - v.ndim)
                    if j >= 0 and not (isinstance(v.shape[j], int) and v.shape[j] == 1):
                        return None
        return _Step(args, out, out.ndim - ndim + h)
    if t is aten.cat.default:
        d = _dim(args[1] if len(args) > 1 else 0, ndim)
        parts = args[0]
        if d == h or not all(p in steps and steps[p].heads == h for p in parts):
            return None
        return _Step(args, _fake(node, args, steps), h)
    if t is aten.expand.default:  # the kv repeat: (…, KV, 1, …) -> (…, KV, H/KV, …)
        shape = list(args[1])
        i_val = src.val
        if h + 1 >= len(shape) or i_val.ndim != len(shape) or i_val.shape[h + 1] != 1 \
                or shape[h] not in (kv, -1) or not isinstance(shape[h + 1], int) or (shape[h + 1] * kv) % tp:
            return None
        new_shape = _with(_with(shape, h, tp), h + 1, shape[h + 1] * kv // tp)
        new = (args[0], new_shape, *args[2:])
        return _Step(new, _fake(node, new, steps), h, expanded=True)
    if t is _SDPA and node.kwargs.get("enable_gqa", False) and args[0] not in steps and h == 1:
        return _Step(args, _fake(node, args, steps), h, exit=True)  # k / v of tp slots read by H q heads
    return None


def _plan_path(proj: fx.Node, kv: int, tp: int, order: dict[fx.Node, int], nodes: list[fx.Node]
               ) -> dict[fx.Node, _Step] | None:
    """The rewrite of every node from the projection to where its value is the model's again, or None.

    Walks the nodes after `proj` in graph order (inputs before users) up to the last user of a node still
    on the path; a node reading the path must be one `_step` knows, and every branch must end in an exit."""
    out = proj.meta["val"]
    steps = {proj: _Step(proj.args, out.new_empty((*out.shape[:-1], out.shape[-1] * tp // kv)), None)}
    horizon = max(order[u] for u in proj.users)
    for node in nodes[order[proj] + 1:]:
        if order[node] > horizon:
            break
        on_path = [a for a in node.all_input_nodes if a in steps and not steps[a].exit]
        if not on_path or node.target in _NO_OUTPUT:
            continue
        if node.op != "call_function":
            return None
        try:
            step = _step(node, on_path, steps, kv, tp)
        except Exception:  # a shape the rewritten path cannot take: keep the pair as it is
            return None
        if step is None:
            return None
        if step.exit and shape_key(step.val.shape) != shape_key(node.meta["val"].shape):
            return None
        steps[node] = step
        if not step.exit:
            if not node.users:
                return None
            horizon = max(horizon, *(order[u] for u in node.users))
    del steps[proj]
    return steps if any(s.exit for s in steps.values()) else None


def _module(proj: fx.Node) -> str:
    return str(proj_weight(proj).target).rpartition(".")[0]


def _attr(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, str]:
    mod, _, name = str(node.target).rpartition(".")
    return gm.get_submodule(mod), name


def _aliased(gm: fx.GraphModule) -> set[int]:
    seen: dict[int, int] = {}
    for _, t in gm.named_parameters(remove_duplicate=False):
        seen[id(t)] = seen.get(id(t), 0) + 1
    return {i for i, c in seen.items() if c > 1}


def _heads(node: fx.Node) -> tuple[int, int] | None:
    """(heads, head dim) of a projection whose output is viewed once as (…, heads, D)."""
    users = list(node.users)
    if len(users) != 1 or users[0].target not in _VIEWS:
        return None
    i, o = node.meta["val"], users[0].meta["val"]
    if o.ndim != i.ndim + 1 or not isinstance(o.shape[-2], int) or not isinstance(o.shape[-1], int):
        return None
    return o.shape[-2], o.shape[-1]


def _candidate(gm: fx.GraphModule, pair: Pair, tp_index: int, tp: int, aliased: set[int], order: dict,
               nodes: list):
    """(q heads, kv heads, [(kv projection, planned path)]) if the pair is GQA this pass rewrites, else None."""
    projs = [p for p in pair.heads if p.target == aten.linear.default]
    if len(projs) != len(pair.heads) or len(projs) != 3:
        return None
    found = [_heads(p) for p in projs]
    if any(f is None for f in found):
        return None
    q_heads = max(f[0] for f in found)
    dims = {f[1] for f in found}
    kv_projs = [p for p, f in zip(projs, found) if f[0] != q_heads]
    if len(dims) != 1 or len(kv_projs) != 2:
        return None
    kv = found[projs.index(kv_projs[0])][0]
    if any(f[0] not in (q_heads, kv) for f in found) or not (kv < tp and tp % kv == 0 and q_heads % tp == 0
                                                                and q_heads % kv == 0):
        return None
    q = next(p for p in projs if p not in kv_projs)
    q_info = get_info(proj_weight(q))
    if q_info is None or q_info.spec is None or q_info.spec.placements[tp_index] != Shard(0):
        return None  # q is not cut by heads (an explicit plan, another pass): nothing to agree with
    planned = []
    for p in kv_projs:
        for t in (proj_weight(p), proj_bias(p)):
            if t is None:
                continue
            info = get_info(t)
            if t.op != "get_attr" or len(t.users) != 1 or info is None or info.spec is None \
                    or not all(pl.is_replicate() for pl in info.spec.placements) \
                    or id(getattr(*_attr(gm, t))) in aliased:
                return None
        steps = _plan_path(p, kv, tp, order, nodes)
        if steps is None:
            return None
        planned.append((p, steps))
    return q_heads, kv, planned


def _store(gm: fx.GraphModule, node: fx.Node, kv: int, copies: int, tp_index: int, mesh_sizes, style: str) -> None:
    """Stores the parameter of `node` with its kv heads repeated, Shard(0) over tp."""
    sub, name = _attr(gm, node)
    t = getattr(sub, name)
    stored = repeat_blocks(t.detach(), kv, copies)
    setattr(sub, name, nn.Parameter(stored, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else stored)
    val = node.meta["val"]
    # requires_grad kept: insert_collectives gives a parameter read on a data-parallel shard its f by it
    node.meta["val"] = val.new_empty((val.shape[0] * copies, *val.shape[1:])).requires_grad_(val.requires_grad)
    info = get_info(node)
    placements = list(info.spec.placements)
    placements[tp_index] = Shard(0)
    set_info(node, dataclasses.replace(info, spec=make_spec(node.meta["val"], tuple(placements), mesh_sizes),
                                       origin="replicate_kv_heads", style=style))


def _rewrite(gm: fx.GraphModule, proj: fx.Node, steps: dict[fx.Node, _Step], kv: int, tp: int, tp_index: int,
             mesh, repeats: dict) -> None:
    copies = tp // kv
    style = f"colwise (kv heads replicated: {kv} kv heads over tp={tp}, each on {copies} ranks)"
    group = mesh.group_names[tp_index] if mesh.group_names else "dryrun:tp"
    for t in (proj_weight(proj), proj_bias(proj)):
        if t is None:
            continue
        repeats[str(t.target)] = (kv, copies)
        _store(gm, t, kv, copies, tp_index, mesh.sizes, style)
        with gm.graph.inserting_after(t):
            summed = gm.graph.create_node("call_function", REPLICA_GRAD_SUM,
                                          (t, copies, tp, group, "tp"), name=f"replicagradsum_{t.name}")
        summed.meta["val"] = t.meta["val"]
        info = get_info(t)  # the parameter, for propagate_sharding: its shard is not to be gathered
        set_info(summed, NodeInfo(spec=info.spec, module_fqn=info.module_fqn, role="param",
                                  param_fqn=info.param_fqn, origin="replicate_kv_heads"))
        for key in ("nn_module_stack", "stack_trace"):
            if key in proj.meta:
                summed.meta[key] = proj.meta[key]
        proj.replace_input_with(t, summed)
    proj.meta["val"] = proj.target(*_val(proj.args, {}), **_val(dict(proj.kwargs), {}))
    for node, step in steps.items():
        node.args = step.args
        node.meta["val"] = step.val


@fx_pass(requires=("param_placements",), provides=("kv_replicas",))
def replicate_kv_heads(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    mesh = ctx.mesh
    pp = ctx.options.get("pp")
    pipelined = (mesh.has("pp") and mesh.size("pp") > 1) or (pp is not None and pp.size > 1)
    others = [n for n, s in zip(mesh.names, mesh.sizes) if s > 1 and n not in ("tp", "dp")]
    named = ctx.plan.resolve_tp(module_fqns(gm)) if ctx.plan.tp else {}
    saved = {m for m, style in named.items() if isinstance(style, HeadsStyle) and style.kv_replicated}
    if not (ctx.plan.auto_tp or saved) or not mesh.has("tp") or mesh.size("tp") == 1 or pipelined or others:
        return PassResult(gm, False)
    tp_index, tp = mesh.names.index("tp"), mesh.size("tp")
    aliased = _aliased(gm)
    repeats: dict[str, tuple[int, int]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    for pair in find_pairs(gm):
        found = _candidate(gm, pair, tp_index, tp, aliased, order, nodes)
        if found is None:
            continue
        _, kv, planned = found
        if not ctx.plan.auto_tp and not {_module(p) for p, _ in planned} <= saved:
            continue  # an explicit plan replicates the kv heads it names so (a saved plan)
        for proj, steps in planned:
            for t in (proj_weight(proj), proj_bias(proj)):
                if t is not None:
                    shapes[str(t.target)] = tuple(t.meta["val"].shape)
            _rewrite(gm, proj, steps, kv, tp, tp_index, mesh, repeats)
    if not repeats:
        return PassResult(gm, False)
    info = capture_info(gm)
    gm.meta["fxpar"] = dataclasses.replace(info, param_shapes={**info.param_shapes, **shapes},
                                           param_repeats={**info.param_repeats, **repeats})
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, True)


__all__ = ["replicate_kv_heads"]
