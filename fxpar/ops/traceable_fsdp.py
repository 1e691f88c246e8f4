"""fxpar's FSDP gathers in a form torch.compile traces: one functional all-gather per block, its dual a reduce-scatter.

In eager mode an FSDP gather is one `fxpar::fsdp_all_gather` node per parameter
whose kernel hands the shard to the runtime (`fxpar.runtime.fsdp_buckets`: one
flat collective per block, re-gathered in the backward, prefetched one block
ahead). Inside a compiled graph that runtime cannot act: the op is an opaque
kernel, waited where it is issued, and its output is saved for the backward.
`traceable_fsdp_graph_module` returns a copy of a rank's graph where each FSDP
unit (the gathers `apply_fsdp` tagged with one block, as the eager runtime
buckets them) is one call of `fsdp_gather_unit`, an `autograd.Function` made of
torch's functional collectives, SimpleFSDP-style:

    forward   shards -> cast to param_dtype -> pad uneven rows -> one flat buffer
              -> all_gather_into_tensor -> wait_tensor -> each full parameter
    backward  full gradients -> cast to reduce_dtype -> pad -> one flat buffer
              -> reduce_scatter_tensor -> wait_tensor -> each shard's rows, in the shard's dtype
              (on a gloo group all_to_all_single -> wait_tensor -> the sum of the n blocks
              received, as the eager buckets: `fxpar.ops.traceable.reduce_scatter_flat`)

The same collective per block each way, the same bytes, the same sums as the
eager buckets (a reduce-scatter over the group, element by element).

Uneven shards (a dim 0 the group size does not divide: the last ranks hold fewer
rows, or none) enter the compiled graph padded, as FSDP2 stores them: the graph
reads each as a copy with zero rows appended up to ceil(rows / n), made eagerly
before each call (`padded_uneven_shards`), so every rank's graph has the same
shapes, the same collectives and the same partitioner decisions. Padding them
inside the graph instead gave rank 0 (whole rows) and rank 1 (a pad) different
graphs: AOT's partitioner re-gathered a block in one rank's backward and saved it
in the other's, and the two ranks waited in different collectives. The gather's
padding is stripped (`full[:f]`); the reduce-scatter's padding rows go back
through the eager pad, whose backward keeps the rank's real rows. Dynamo
traces it, AOT autograd puts the reduce-scatters into the backward graph, and
inductor sees issue and wait as separate nodes, so its comm reordering
(`fxpar._torch.inductor.overlap_comms`) can issue a block's gather while the
block before computes. The `fsdp_prefetch` issue nodes of `schedule_overlap`
are dropped from the copy: inside a compiled graph the scheduler decides.

Reshard after forward (FSDP's default): `reshard_fsdp_gathers` tags every
all-gather of parameters on an FSDP group, with what leads to it and what
unpacks it, MUST_RECOMPUTE in AOT autograd's joint graph (SimpleFSDP's
`annotate_fsdp_all_gather`), so the partitioner re-gathers the block in the
backward instead of saving the full parameters; they are freed after their last
use in the forward. The root unit (`FSDP_ROOT_UNIT`, apply_fsdp) is the
exception, in either mode: its gather is traced under an annotation and tagged
MUST_SAVE, kept for the backward as FSDP2 keeps its root.

Backward prefetch: inductor keeps the collectives in graph order, one in flight
at a time (each waits for the one before), and the partitioner puts block
i-1's re-gather after block i's reduce-scatter, so the re-gather would wait
where it is issued. `prefetch_fsdp_gathers` (a post-grad pass of the compile)
moves each re-gather ahead of the reduce-scatter before it: block i-1 is
gathered while block i's backward computes, and block i's reduce-scatter is in
flight during block i-1's, as FSDP2's backward prefetch.

Left as `fsdp_all_gather` custom ops (exact, opaque, their gathered parameters
saved for the backward): gathers along a dim other than 0 (apply_fsdp gathers
dim 0 only), gathers of a shard that is not a parameter of the graph itself (a
device copy under CPU offload), gathers of an uneven shard the graph also reads
elsewhere (that read's shape would differ per rank) and gathers inside subgraphs
(activation-checkpoint regions).
"""

from __future__ import annotations

import contextlib
import operator
from typing import Iterator

import torch
import torch.fx as fx
from torch import Tensor

from fxpar._torch.c10d import functional
from fxpar._torch.functorch import annotate_traced, joint_graph_pass, tag_recompute, traced_annotation
from fxpar._torch.fx import copy_codegen
from fxpar.core.spec import FSDP_ROOT_UNIT, get_info
from fxpar.ops.traceable import reduce_scatter_flat
from fxpar.ops.waiting import gloo_group

__all__ = ["fsdp_gather_unit", "traceable_fsdp_graph_module", "fsdp_units_of", "fsdp_group_names",
           "padded_uneven_shards", "reshard_fsdp_gathers", "recompute_fsdp_gathers",
           "prefetch_fsdp_gathers"]

_c10d = functional  # importing fxpar._torch.c10d imports torch's functional collectives: wait_tensor is kept by DCE
_GATHER = torch.ops.fxpar.fsdp_all_gather.default
_PREFETCH = "fxpar.fsdp_prefetch.default"  # by name: the op is registered by fxpar.ops.overlap
_PADDED = "fxpar_fsdp_padded"  # gm.meta: (padded attribute, shard's target, padded rows) per uneven shard
_PADDED_PREFIX = "_fxpar_padded_"
_KEEP = "fxpar_fsdp_keep"  # the annotation of the root unit's gather in traced graphs


# --------------------------------------------------------------------------- the collective pair


def _layout(shape: tuple, full_rows: int, n: int) -> tuple[int, int]:
    """(padded rows per rank, elements per rank in the flat buffer) of one parameter."""
    rows = -(-full_rows // n)
    rest = 1
    for s in shape[1:]:
        rest *= s
    return rows, rows * rest


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    if x.size(0) == rows:
        return x
    return torch.cat([x, x.new_zeros(rows - x.size(0), *x.shape[1:])])


class _GatherUnit(torch.autograd.Function):
    """Shards of one FSDP unit -> their full parameters; backward: one reduce-scatter of their gradients."""

    @staticmethod
    def forward(ctx, n: int, group_name: str, param_dtype, reduce_dtype, full_rows: tuple, keep: bool,
                *shards: Tensor):
        ctx.args = (n, group_name, reduce_dtype, full_rows)
        ctx.shapes = tuple(tuple(s.shape) for s in shards)
        ctx.dtypes = tuple(s.dtype for s in shards)
        layouts = [_layout(s.shape, f, n) for s, f in zip(shards, full_rows)]
        flat = torch.cat([_pad_rows(s if param_dtype is None else s.to(param_dtype), rows).reshape(-1)
                          for s, (rows, _) in zip(shards, layouts)])
        with annotate_traced(_KEEP) if keep else contextlib.nullcontext():  # the root unit: saved, not re-gathered
            gathered = _c10d.wait_tensor(_c10d.all_gather_into_tensor(flat, n, group_name))
        gathered = gathered.view(n, -1)  # rank-major: [rank, this unit's padded elements]
        out, offset = [], 0
        for s, f, (rows, numel) in zip(shards, full_rows, layouts):
            full = gathered[:, offset:offset + numel].reshape(n * rows, *s.shape[1:])
            out.append(full if n * rows == f else full[:f])  # an uneven parameter: the padding stripped
            offset += numel
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        n, group_name, reduce_dtype, full_rows = ctx.args
        layouts = [_layout(shape, f, n) for shape, f in zip(ctx.shapes, full_rows)]
        pieces = []
        for g, (rows, numel) in zip(grads, layouts):
            g = g if reduce_dtype is None else g.to(reduce_dtype)
            pieces.append(_pad_rows(g, n * rows).reshape(n, numel))
        flat = torch.cat(pieces, dim=1).reshape(-1)  # rank-major, as the gather's buffer
        reduced = reduce_scatter_flat(flat, n, group_name)
        out, offset = [], 0
        for shape, dtype, (rows, numel) in zip(ctx.shapes, ctx.dtypes, layouts):
            piece = reduced[offset:offset + numel].view(rows, *shape[1:])
            out.append(piece[:shape[0]].to(dtype))  # this rank's real rows, in the shard's dtype
            offset += numel
        return (None, None, None, None, None, None, *out)


def fsdp_gather_unit(n: int, group_name: str, mesh_dim: str, param_dtype, reduce_dtype, full_rows: tuple,
                     *shards: Tensor, keep: bool = False) -> tuple:
    """The full parameters of one FSDP unit (one all-gather); their gradients reduce-scattered as one.

    Args:
        n, group_name, mesh_dim: the fsdp group (its size and registered name) and its mesh dim's name.
        param_dtype, reduce_dtype: mixed precision (FSDP2's meaning), or None.
        full_rows: each parameter's gathered dim 0 (an uneven one is padded to ceil(rows / n) per rank).
        shards: this rank's shards (dim 0 cut over the group, torch.chunk's rows).
        keep: the root unit (`FSDP_ROOT_UNIT`): its gather is saved for the backward, never re-gathered
            (`recompute_fsdp_gathers`), as FSDP2 keeps its root gathered.
    """
    return _GatherUnit.apply(n, group_name, param_dtype, reduce_dtype, tuple(full_rows), keep, *shards)


torch.fx.node.has_side_effect(fsdp_gather_unit)  # as the custom ops it replaces: DCE never drops a collective


# --------------------------------------------------------------------------- the graph rewrite


def _fsdp_args(node: fx.Node) -> dict:
    """fsdp_all_gather's arguments by name, keywords and defaults included."""
    out = {}
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        else:
            out[a.name] = a.default_value
    return out


def _key(node: fx.Node) -> tuple:
    a = _fsdp_args(node)
    info = get_info(node)
    return (info.fsdp_bucket if info is not None else None, a["group_size"], a["group_name"], a["mesh_dim"],
            a["param_dtype"], a["reduce_dtype"])


def fsdp_units_of(graph: fx.Graph) -> list[list[fx.Node]]:
    """The lowerable FSDP gathers of `graph` by unit, in graph order.

    A unit is a run of consecutive gathers of one block (`fsdp_bucket`) on one group with one
    dtype policy, each of another shard: what the eager runtime coalesces into one collective
    (`fxpar.passes.schedule_overlap.fsdp_units`). A gather without a bucket is a unit of its own.
    """
    units: list[list[fx.Node]] = []
    last = None
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not _GATHER or _fsdp_args(node)["dim"] != 0 \
                or node.args[0].op != "get_attr" \
                or _fsdp_args(node)["full_size"] >= 0 and len(node.args[0].users) != 1:  # CPU offload's copied
            continue  # shard; an uneven shard read elsewhere too (that read's shape differs per rank): left to the op
        here = _key(node)
        if here[0] is not None and here == last and all(g.args[0] is not node.args[0] for g in units[-1]):
            units[-1].append(node)
        else:
            units.append([node])
        last = here
    return units


def fsdp_group_names(gm: fx.GraphModule) -> set[str]:
    """The process groups of the FSDP gathers `traceable_fsdp_graph_module` lowered in `gm`."""
    return set(gm.meta.get("fxpar_fsdp_groups", ()))


def traceable_fsdp_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of this rank's `gm` whose FSDP gathers are one `fsdp_gather_unit` per unit (`gm` itself if none).

    Each unit is gathered where its first parameter is first used; its parameters' former
    gather nodes become items of the unit's result. Parameters and buffers are `gm`'s own
    tensor objects, so optimizer steps reach the copy; uneven shards are read as padded
    copies: call the copy inside `padded_uneven_shards(copy)`. The issue nodes of `schedule_overlap`
    are dropped. The same collectives run in the same order on every rank (the graph is the
    same on every rank), with the same values and gradients as `gm` in eager mode.
    """
    units = fsdp_units_of(gm.graph)
    if not units:
        return gm
    first = {unit[0]: unit for unit in units}
    lowered = {g for unit in units for g in unit}
    graph = gm.graph
    out = fx.Graph(owning_module=None, tracer_cls=graph._tracer_cls)
    env: dict[fx.Node, fx.Node] = {}
    uneven = {g.args[0] for g in lowered if _fsdp_args(g)["full_size"] >= 0}  # their gather is their only user
    padded: list[tuple[fx.Node, int]] = []  # uneven shards: (their read in `out`, padded rows)
    for node in graph.nodes:
        if node.op == "call_function" and str(node.target) == _PREFETCH:
            continue  # inside a compiled graph the scheduler prefetches
        if node in lowered:
            unit = first.get(node)
            if unit is not None:
                _emit_unit(out, unit, env, gm, padded)
            continue
        if node in env or node in uneven:  # a shard's get_attr, emitted early by the unit that gathers it,
            continue  # or an uneven shard's, read padded by its unit
        env[node] = out.node_copy(node, lambda a: env[a])
    copy_codegen(graph, out)  # the capture's pytree in/out handling
    new = fx.GraphModule(gm, out, class_name=type(gm).__name__)
    new.meta.update(gm.meta)
    new.meta["fxpar_fsdp_groups"] = sorted({_fsdp_args(g)["group_name"] for g in lowered})
    for group in new.meta["fxpar_fsdp_groups"]:  # the backend, asked of c10d now: dynamo traces the units later
        gloo_group(group, torch.empty(0))
    if padded:  # each uneven shard's read becomes a read of its padded copy (padded_uneven_shards)
        new.meta[_PADDED] = []
        for read, rows in padded:
            shard = str(read.target)
            read.target = _PADDED_PREFIX + shard.replace(".", "_")
            new.meta[_PADDED].append((read.target, shard, rows))
        new.recompile()
    return new


@contextlib.contextmanager
def padded_uneven_shards(gm: fx.GraphModule) -> Iterator[None]:
    """Inside: the padded copies of the uneven shards that `gm` (from `traceable_fsdp_graph_module`) reads.

    Call (the compiled) `gm` inside it, in eager mode: each copy is its shard with zero rows appended up
    to ceil(rows / n), made anew on entry (the same shape and kind on every rank, so every rank compiles
    the same graph; a plain attribute, which dynamo reads as an input: no recompile per call) and
    differentiable (its gradient's padding rows are dropped on the way to the shard's own gradient).
    They are removed on exit: a call outside fails on the missing attribute instead of reading shards
    of an earlier step.
    """
    entries = gm.meta.get(_PADDED, ())
    for padded, shard_target, rows in entries:
        shard = _attr(gm, shard_target)
        setattr(gm, padded, torch.cat([shard, shard.new_zeros(rows - shard.size(0), *shard.shape[1:])]))
    try:
        yield
    finally:
        for padded, _, _ in entries:
            gm.__dict__.pop(padded, None)


def _attr(gm: fx.GraphModule, target: str) -> Tensor:
    mod, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(mod), name)


def _emit_unit(out: fx.Graph, unit: list[fx.Node], env: dict, gm: fx.GraphModule, padded: list) -> None:
    a = _fsdp_args(unit[0])
    n = a["group_size"]
    shards = []
    for g in unit:
        s = g.args[0]
        full = _fsdp_args(g)["full_size"]
        if s in env:
            pass
        elif full >= 0:  # uneven: read as its padded copy (pad_uneven_shards), the same shape on every rank
            env[s] = out.get_attr(str(s.target))
            padded.append((env[s], -(-full // n)))
        else:  # a later parameter's get_attr: no inputs, so it may move up to the unit's gather
            env[s] = out.node_copy(s, lambda x: env[x])
        shards.append(env[s])
    # each parameter's gathered rows: an uneven one's are in the node, an even one's n x this rank's shard
    full_rows = tuple(_fsdp_args(g)["full_size"] if _fsdp_args(g)["full_size"] >= 0
                      else _attr(gm, str(g.args[0].target)).shape[0] * n for g in unit)
    info = get_info(unit[0])
    label = (info.fsdp_bucket if info is not None and info.fsdp_bucket else unit[0].name).replace(".", "_")
    label = label.replace("<", "").replace(">", "")  # the root unit: a valid node name
    keep = info is not None and info.fsdp_bucket == FSDP_ROOT_UNIT
    call = out.create_node("call_function", fsdp_gather_unit,
                           (n, a["group_name"], a["mesh_dim"], a["param_dtype"], a["reduce_dtype"], full_rows,
                            *shards), {"keep": True} if keep else {}, name=f"fsdpgather_unit_{label}")
    call.meta = {k: v for k, v in unit[0].meta.items() if k != "val"}
    for i, g in enumerate(unit):
        item = out.create_node("call_function", operator.getitem, (call, i), {}, name=g.name)
        item.meta = dict(g.meta)
        env[g] = item


# --------------------------------------------------------------------------- reshard after forward


def _is_gather(node: fx.Node, groups: set[str]) -> bool:
    return (node.op == "call_function" and node.target is _c10d.all_gather_into_tensor.default
            and node.args[2] in groups)


def recompute_fsdp_gathers(joint: fx.GraphModule, groups: set[str], *, save: bool = False) -> int:
    """Tags the FSDP parameter gathers of an AOT joint graph for the partitioner; returns how many.

    A gather on one of `groups` whose inputs come from the graph's primal inputs only (the shards,
    cast and padded) is an FSDP gather; it, its wait, the nodes that lead to it from the primals
    and the nodes that unpack its result (slices, views, the strip of uneven padding, as long as
    they read nothing but parameters) are tagged MUST_RECOMPUTE (MUST_SAVE with save=True:
    reshard_after_forward=False). The root unit's gather (`fsdp_gather_unit(keep=True)`) is always
    MUST_SAVE: kept from the forward to the backward, as FSDP2's root and the eager runtime.
    Gathers of the backward (inputs from tangents) are left alone.
    """
    graph = joint.graph
    # nodes computed from the primal inputs alone
    params_only: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name.startswith("primals"):
                params_only.add(node)
        elif node.op == "call_function" and node.all_input_nodes \
                and all(i in params_only for i in node.all_input_nodes):
            params_only.add(node)
    tagged = 0
    for node in graph.nodes:
        if node not in params_only or not _is_gather(node, groups):
            continue
        tagged += 1
        keep = save or traced_annotation(node, _KEEP)
        todo = [node]  # upstream: what feeds the gather from the primals
        while todo:
            m = todo.pop()
            if m.op == "placeholder" or m.meta.get("recompute") is not None and m is not node:
                continue
            tag_recompute(m, save=keep)
            todo.extend(m.all_input_nodes)
        todo = list(node.users)  # downstream: the wait and the unpacking, while parameters only
        while todo:
            m = todo.pop()
            if m not in params_only or m.meta.get("recompute") is not None:
                continue
            tag_recompute(m, save=keep)
            todo.extend(m.users)
    return tagged


@contextlib.contextmanager
def reshard_fsdp_gathers(groups: set[str], *, reshard: bool = True) -> Iterator[None]:
    """Compiles inside the block re-gather FSDP parameters in the backward (reshard=True) or keep them."""
    with joint_graph_pass(lambda joint: recompute_fsdp_gathers(joint, groups, save=not reshard)):
        yield


def _is_reduce_scatter(node: fx.Node, groups: set[str]) -> bool:
    # on gloo a unit's reduce-scatter is an all-to-all of equal blocks (`reduce_scatter_flat`; a swap on a
    # group of 2, `traceable._swap`, has a 0 split); both take the group 4th
    if node.op != "call_function" or node.target not in (_c10d.reduce_scatter_tensor.default,
                                                         _c10d.all_to_all_single.default):
        return False
    if node.args[3] not in groups:
        return False
    return node.target is _c10d.reduce_scatter_tensor.default or len(set(node.args[1])) == 1


def _is_collective(node: fx.Node) -> bool:
    target = getattr(node, "target", None)
    return node.op == "call_function" and getattr(target, "namespace", None) == "_c10d_functional"


def prefetch_fsdp_gathers(graph: fx.Graph, groups: set[str]) -> int:
    """Moves each FSDP gather that follows a reduce-scatter on its group ahead of it; returns how many moved.

    A post-grad pass (inductor's `post_grad_custom_post_pass`) on the forward and backward graphs:
    in the backward, block i-1's re-gather comes right after block i's reduce-scatter; it moves, with
    the cast / pad / concatenation of shards feeding it (none of which reads anything computed after
    the reduce-scatter's inputs), right before it. Values do not change; every rank's graph is the
    same, so every rank moves the same gathers and issues the same collectives in the same order.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    moved = 0
    last_rs = None
    for node in list(graph.nodes):
        if _is_reduce_scatter(node, groups):
            last_rs = node
            continue
        if not _is_gather(node, groups):
            if _is_collective(node) and node.target is not _c10d.wait_tensor.default:
                last_rs = None  # another collective between: keep the order
            continue
        if last_rs is not None:
            chain, todo, ok = set(), [node], True
            while todo and ok:
                m = todo.pop()
                for i in m.all_input_nodes:
                    if order[i] < order[last_rs] or i in chain:
                        continue
                    if i is last_rs or _is_collective(i) or i.op == "placeholder":
                        ok = False  # reads the reduce-scatter or another collective: stays
                        break
                    chain.add(i)
                    todo.append(i)
            if ok:
                for m in sorted(chain, key=order.__getitem__):
                    last_rs.prepend(m)
                last_rs.prepend(node)
                moved += 1
        last_rs = None
    return moved
