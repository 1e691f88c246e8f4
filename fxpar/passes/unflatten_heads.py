"""unflatten_heads: attention whose heads do not divide tp, sharded by whole heads (uneven).

Requires: param_placements. Provides: head_params.

`annotate_parameters` leaves a Megatron attention pair replicated when its
head count H does not divide tp: a flat (…, H*D) shard cut by torch.chunk's
rows would split a head. This pass makes the heads a dim of their own, so the
existing uneven shards (torch.chunk over that dim: ceil(H / tp) whole heads on
the first ranks, fewer or none on the last; GPT-2's 12 heads at tp=8 are
2, 2, 2, 2, 2, 2, 0, 0) carry the whole attention:

* each head projection's weight is stored as (H, D, C) (Conv1D: (C, H, D); a
  fused q/k/v: (k, H, D, C) or (C, k, H, D)) and its bias as ([k,] H, D), cut
  on the heads dim; the projection becomes an einsum whose output is the
  (…, [k,] H, D) tensor the attention reads (the (…, F) -> (…, H, D) view and
  the section split are bypassed);
* the output projection's weight is stored as (C, H, D) (Conv1D: (H, D, C)),
  cut on the same heads, and contracts the attention's (…, H, D) output
  directly (the merging reshape is bypassed): a Partial sum, one all-reduce.

Only the stored shape changes: `CaptureInfo.param_shapes` keeps each
reshaped parameter's own shape, and full state dicts / gradients are returned
in it. The rewritten graph computes the same function on one process.

Applies to automatic plans (modules the plan does not name), and to the
modules a saved plan names with a `HeadsStyle` ('colwise (uneven heads: …)'),
in pairs whose projections are used once. Grouped-query attention qualifies where each
rank's kv chunk is the kv heads of its q chunk (`consistent_heads`: 6 q and 3
kv heads at tp=4 hold 2, 2, 2, 0 and 1, 1, 1, 0); otherwise it keeps its
current layout.
Pipelines (pp > 1) keep the replicated attention.

Before:  %linear = aten.linear(%x, %q_weight)                    # q_weight (H*D, C): Replicate
         %view = aten.view(%linear, [B, T, -1, D])
After:   %linear = aten.einsum("abc,hdc->abhd", [%x, %q_weight])  # q_weight (H, D, C): Shard(0), uneven
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
import torch.nn as nn
from torch.distributed.tensor.placement_types import Replicate, Shard

from fxpar.analysis.plan_io import HeadsStyle
from fxpar.capture.export import capture_info
from fxpar.core.pass_api import PassContext, PassResult, fx_pass
from fxpar.core.spec import chunk_bounds, get_info, make_spec, set_info, shape_key, size_key
from fxpar.passes._graph import module_fqns
from fxpar.passes._megatron import Pair, find_pairs, proj_bias, proj_input, proj_weight

aten = torch.ops.aten

_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_LETTERS = "abefgijklmnpqrtuvwxyz"  # leading dims (not c, d, h, o, s: the weight's own letters)
_META_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node", "seq_nr")


@dataclasses.dataclass(frozen=True)
class _Head:
    """One head projection's rewrite: its node, the (…, [k,] H, D) views it feeds, k sections."""

    proj: fx.Node
    views: tuple[fx.Node, ...]  # one per section (k == 1: one); or the single (…, k, H, D) view
    k: int
    stacked: bool  # the output was viewed as (…, k, H, D) at once (qkv.view(B, T, 3, H, D))
    heads: int
    dim: int


def _one_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _leading_view(node: fx.Node) -> bool:
    """A view that only regroups leading dims (Conv1D's (N, F) <-> (B, T, F)): the last dim stays whole."""
    if node.target not in _VIEWS:
        return False
    i, o = node.args[0].meta["val"], node.meta["val"]
    return size_key(i.shape[-1]) == size_key(o.shape[-1])


def _split_heads(node: fx.Node, features) -> tuple[int, int, int] | None:
    """(k, H, D) if `node` views (…, features) as (…, H, D) (k = 1) or (…, k, H, D), else None."""
    if node.target not in _VIEWS:
        return None
    i, o = node.args[0].meta["val"], node.meta["val"]
    if size_key(i.shape[-1]) != size_key(features) or not all(isinstance(s, int) for s in o.shape[-2:]):
        return None
    if o.ndim == i.ndim + 1 and shape_key(i.shape[:-1]) == shape_key(o.shape[:-2]):
        return 1, o.shape[-2], o.shape[-1]
    if o.ndim == i.ndim + 2 and shape_key(i.shape[:-1]) == shape_key(o.shape[:-3]) and isinstance(o.shape[-3], int):
        return o.shape[-3], o.shape[-2], o.shape[-1]
    return None


def _head_of(proj: fx.Node, x: fx.Node) -> _Head | None:
    """How `proj`'s output reaches its heads: through leading views, then a (…, [k,] H, D) view, or a
    split / chunk into k equal sections each viewed as (…, H, D). The views must have x's leading dims."""
    out = proj.meta["val"]
    features = out.shape[-1]
    cur = proj
    while (u := _one_user(cur)) is not None and _leading_view(u) and _split_heads(u, features) is None:
        cur = u
    u = _one_user(cur)
    lead = shape_key(x.meta["val"].shape[:-1])
    if u is None:
        return None
    found = _split_heads(u, features)
    if found is not None:
        k, h, d = found
        if shape_key(u.meta["val"].shape[:len(lead)]) != lead or u.meta["val"].ndim != len(lead) + (3 if k > 1 else 2):
            return None
        return _Head(proj, (u,), k, k > 1, h, d)
    if u.target not in (aten.split.Tensor, aten.chunk.default):
        return None
    ndim = cur.meta["val"].ndim
    dim = u.args[2] if len(u.args) > 2 else u.kwargs.get("dim", 0)
    sections = u.meta["val"]
    if dim % ndim != ndim - 1 or len({size_key(s.shape[-1]) for s in sections}) != 1:
        return None
    getitems = sorted(u.users, key=lambda g: g.args[1])
    if len(getitems) != len(sections) or any(g.target is not operator.getitem for g in getitems):
        return None
    views, shape = [], None
    for g in getitems:
        v = _one_user(g)
        found = _split_heads(v, sections[0].shape[-1]) if v is not None else None
        if found is None or found[0] != 1 or shape_key(v.meta["val"].shape[:-2]) != lead:
            return None
        if shape not in (None, found):
            return None
        shape = found
        views.append(v)
    return _Head(proj, tuple(views), len(views), False, shape[1], shape[2])


def _merge_of(sink: fx.Node, heads: int, dim: int) -> fx.Node | None:
    """The view (…, H, D) -> (…, H*D) whose output (through leading views) is the sink's input."""
    cur = proj_input(sink)
    while cur.op == "call_function" and cur.target in _VIEWS:
        i, o = cur.args[0].meta["val"], cur.meta["val"]
        if i.ndim == o.ndim + 1 and i.shape[-2:] == (heads, dim) and shape_key(i.shape[:-2]) == shape_key(o.shape[:-1]):
            return cur
        if not _leading_view(cur):
            return None
        cur = cur.args[0]
    return None


def _fake(target, args):
    def val(a):
        if isinstance(a, fx.Node):
            return a.meta["val"]
        if isinstance(a, (list, tuple)):
            return type(a)(val(x) for x in a)
        return a

    return target(*val(args))


def _new(graph: fx.Graph, target, args: tuple, like: fx.Node, name: str) -> fx.Node:
    node = graph.create_node("call_function", target, args, name=name)  # made unique by the graph
    node.meta["val"] = _fake(target, args)
    for key in _META_KEYS:
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


def _weight_first(proj: fx.Node) -> bool:
    return proj.target == aten.linear.default


def _aliased(gm: fx.GraphModule) -> set[int]:
    seen: dict[int, int] = {}
    for _, t in gm.named_parameters(remove_duplicate=False):
        seen[id(t)] = seen.get(id(t), 0) + 1
    return {i for i, c in seen.items() if c > 1}


def _rewritable(gm: fx.GraphModule, pair: Pair, tp: int, taken: set[str], aliased: set[int]
                ) -> tuple[list[_Head], fx.Node] | None:
    """The pair's heads and merge view if the pair is attention whose heads do not divide tp, else None."""
    projs = [*pair.heads, pair.sink]
    if any(p.target not in (aten.linear.default, aten.addmm.default) for p in projs):
        return None
    for p in projs:
        for t in (proj_weight(p), proj_bias(p)):
            if t is None:
                continue
            info = get_info(t)
            # the sink may have been given the lm_head's automatic colwise (it feeds the output): overridden
            if t.op != "get_attr" or len(t.users) != 1 or info is None or info.spec is None \
                    or (p is not pair.sink and not all(pl.is_replicate() for pl in info.spec.placements)) \
                    or str(t.target).rpartition(".")[0] in taken or id(_attr(gm, t)) in aliased:
                return None
    heads = []
    for h in pair.heads:
        x = proj_input(h)
        head = _head_of(h, _leading_source(x))
        if head is None:
            return None
        heads.append(head)
    n_heads, dim = max(hd.heads for hd in heads), heads[0].dim
    if n_heads % tp == 0 or any(hd.dim != dim or not consistent_heads(n_heads, hd.heads, tp) for hd in heads):
        return None  # heads divide (annotate_parameters shards them evenly), or kv chunks not the q chunks' kv
    merge = _merge_of(pair.sink, n_heads, dim)
    if merge is None:
        return None
    return heads, merge


def consistent_heads(q_heads: int, kv_heads: int, tp: int) -> bool:
    """Whether torch.chunk's kv heads on each rank are the kv heads of its q heads (grouped-query
    attention, q_heads / kv_heads q heads per kv head): ceil(q / tp) == ceil(kv / tp) * group."""
    if q_heads % kv_heads:
        return False
    return -(-q_heads // tp) == -(-kv_heads // tp) * (q_heads // kv_heads)


def _leading_source(x: fx.Node) -> fx.Node:
    while x.op == "call_function" and _leading_view(x):
        x = x.args[0]
    return x


def _attr(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    mod, _, name = str(node.target).rpartition(".")
    return getattr(gm.get_submodule(mod), name)


def _reshape_param(gm: fx.GraphModule, node: fx.Node, shape: tuple[int, ...], shard_dim: int, tp_index: int,
                   mesh_sizes, style: str) -> None:
    """Stores the parameter of `node` as `shape`, sharded on `shard_dim` over the tp mesh dim."""
    mod, _, name = str(node.target).rpartition(".")
    sub = gm.get_submodule(mod)
    t = getattr(sub, name)
    local = t.detach().reshape(shape)
    setattr(sub, name, nn.Parameter(local, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else local)
    node.meta["val"] = node.meta["val"].reshape(shape)
    info = get_info(node)
    placements = list(info.spec.placements)
    placements[tp_index] = Shard(shard_dim)
    set_info(node, dataclasses.replace(info, spec=make_spec(node.meta["val"], tuple(placements), mesh_sizes),
                                       origin="unflatten_heads", style=style))


def _split(n_heads: int, tp: int) -> str:
    counts = [chunk_bounds(n_heads, tp, r)[1] for r in range(tp)]
    return f"uneven heads: {n_heads} heads of {'+'.join(map(str, counts))} over tp={tp}"


def _rewrite(gm: fx.GraphModule, pair: Pair, heads: list[_Head], merge: fx.Node, tp_index: int, mesh_sizes,
             shapes: dict[str, tuple[int, ...]]) -> None:
    graph = gm.graph
    tp = mesh_sizes[tp_index]
    n_heads, dim = max(hd.heads for hd in heads), heads[0].dim
    for hd in heads:
        why = _split(hd.heads, tp)
        h = hd.proj
        x = _leading_source(proj_input(h))
        w, b = proj_weight(h), proj_bias(h)
        lead = _LETTERS[:x.meta["val"].ndim - 1]
        sec = "s" if hd.k > 1 else ""
        kshape = (hd.k,) if hd.k > 1 else ()
        c = w.meta["val"].shape[1 if _weight_first(h) else 0]
        for t in (w, b):
            if t is not None:
                shapes[str(t.target)] = tuple(t.meta["val"].shape)
        if _weight_first(h):  # linear: (F, C) -> ([k,] H, D, C)
            _reshape_param(gm, w, (*kshape, hd.heads, dim, c), len(kshape), tp_index, mesh_sizes, f"colwise ({why})")
            eq = f"{lead}c,{sec}hdc->{lead}{sec}hd"
        else:  # Conv1D addmm: (C, F) -> (C, [k,] H, D)
            _reshape_param(gm, w, (c, *kshape, hd.heads, dim), 1 + len(kshape), tp_index, mesh_sizes,
                           f"colwise ({why})")
            eq = f"{lead}c,c{sec}hd->{lead}{sec}hd"
        if b is not None:
            _reshape_param(gm, b, (*kshape, hd.heads, dim), len(kshape), tp_index, mesh_sizes, f"colwise ({why})")
        first = hd.views[0]
        with graph.inserting_before(min(hd.views, key=_order(graph))):
            y = _new(graph, aten.einsum.default, (eq, [x, w]), h, f"{h.name}_heads")
            if b is not None:
                y = _new(graph, aten.add.Tensor, (y, b), h, f"{h.name}_heads_bias")
            if hd.k == 1 or hd.stacked:
                first.replace_all_uses_with(y)
            else:
                for i, v in enumerate(hd.views):
                    sel = _new(graph, aten.select.int, (y, len(lead), i), v, f"{v.name}_heads")
                    v.replace_all_uses_with(sel)
    why = _split(n_heads, tp)
    sink = pair.sink
    w = proj_weight(sink)
    b = proj_bias(sink)
    x4 = merge.args[0]
    lead = _LETTERS[:x4.meta["val"].ndim - 2]
    shapes[str(w.target)] = tuple(w.meta["val"].shape)
    if _weight_first(sink):  # linear: (O, H*D) -> (O, H, D)
        o = w.meta["val"].shape[0]
        _reshape_param(gm, w, (o, n_heads, dim), 1, tp_index, mesh_sizes, f"rowwise ({why})")
        eq = f"{lead}hd,ohd->{lead}o"
    else:  # Conv1D addmm: (H*D, O) -> (H, D, O)
        o = w.meta["val"].shape[1]
        _reshape_param(gm, w, (n_heads, dim, o), 0, tp_index, mesh_sizes, f"rowwise ({why})")
        eq = f"{lead}hd,hdo->{lead}o"
    if b is not None:  # added once, after the all-reduce
        info = get_info(b)
        spec = make_spec(b.meta["val"], tuple(Replicate() for _ in mesh_sizes), mesh_sizes)
        set_info(b, dataclasses.replace(info, spec=spec, origin="unflatten_heads", style=f"rowwise ({why})"))
    with graph.inserting_before(sink):
        y = _new(graph, aten.einsum.default, (eq, [x4, w]), sink, f"{sink.name}_heads")
        if sink.meta["val"].ndim != y.meta["val"].ndim:
            y = _new(graph, aten.flatten.using_ints, (y, 0, len(lead) - 1), sink, f"{sink.name}_flat")
        if b is not None:
            y = _new(graph, aten.add.Tensor, (y, b), sink, f"{sink.name}_bias")
    sink.replace_all_uses_with(y)
    graph.eliminate_dead_code()


def _module(proj: fx.Node) -> str:
    return str(proj_weight(proj).target).rpartition(".")[0]


def _order(graph: fx.Graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: index[n]


@fx_pass(requires=("param_placements",), provides=("head_params",))
def unflatten_heads(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    mesh = ctx.mesh
    pp = ctx.options.get("pp")  # a pipeline's passes see the mesh without its pp dim
    pipelined = (mesh.has("pp") and mesh.size("pp") > 1) or (pp is not None and pp.size > 1)
    named = ctx.plan.resolve_tp(module_fqns(gm)) if ctx.plan.tp else {}
    by_heads = {m for m, style in named.items() if isinstance(style, HeadsStyle)}  # a saved plan's choice
    if not (ctx.plan.auto_tp or by_heads) or not mesh.has("tp") or mesh.size("tp") == 1 or pipelined:
        return PassResult(gm, False)
    tp_index, tp = mesh.names.index("tp"), mesh.size("tp")
    taken = set(named) - by_heads
    aliased = _aliased(gm)
    shapes: dict[str, tuple[int, ...]] = {}
    for pair in find_pairs(gm):
        if not ctx.plan.auto_tp and not {_module(p) for p in [*pair.heads, pair.sink]} <= by_heads:
            continue  # an explicit plan cuts only the attention it names by heads
        found = _rewritable(gm, pair, tp, taken, aliased)
        if found is not None:
            _rewrite(gm, pair, *found, tp_index, mesh.sizes, shapes)
    if not shapes:
        return PassResult(gm, False)
    info = capture_info(gm)
    gm.meta["fxpar"] = dataclasses.replace(info, param_shapes={**info.param_shapes, **shapes})
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, True)
