"""fxpar's tensor-parallel collectives in a form torch.compile traces: issue and wait as separate nodes.

Each `fxpar::*` collective (`fxpar.ops.collectives`) is one custom op that
waits inside itself; inductor sees it as an opaque kernel, runs it through
Python on every call, and can neither fuse around it nor move its wait.
`traceable_graph_module` returns a copy of a rank's graph whose collectives
call the functions below instead: `torch.autograd.Function`s whose forward
and backward are torch's functional collectives (`_c10d_functional.all_reduce`
/ `all_gather_into_tensor` / `reduce_scatter_tensor` / `all_to_all_single`,
each followed by its own `wait_tensor`). Dynamo traces them, AOT autograd puts
the duals into the backward graph, and inductor lowers the pairs to its
collective kernels, where its comm-reordering passes may issue early and wait
late. The duals are DESIGN.md's, the same as the custom ops':

    fxpar op          forward                           backward
    all_reduce        all_reduce + wait                 identity
    all_reduce_max    all_reduce(max) + wait            none
    grad_all_reduce   identity                          all_reduce + wait
    all_gather(d)     all_gather_into_tensor + wait     this rank's slice
    sp_all_gather(d)  all_gather_into_tensor + wait     reduce_scatter_tensor + wait
    shard(d)          this rank's slice                 all_gather_into_tensor + wait
    reduce_scatter(d) reduce_scatter_tensor + wait      all_gather_into_tensor + wait
    all_to_all(a->b)  all_to_all_single + wait          all_to_all_single(b->a) + wait
    replica_grad_sum  identity                          all_reduce + wait of the slot buffer, own slot

(On a gloo group each reduce_scatter_tensor + wait is all_to_all_single + wait and a sum of the blocks
received: gloo's reduce-scatter all-reduces the whole buffer, `fxpar.ops.waiting.start_reduce_scatter`.
On a gloo group of 2 the sum all_reduce and all_gather_into_tensor are an all_to_all_single that swaps the
ranks' buffers (`fxpar.ops.exchange`), + wait, and an add or a cat in rank order.)

(torch's own autograd formulas on `_c10d_functional` are the adjoints, e.g.
all_reduce's backward is an all_reduce: not Megatron's "g", so the ops run
under `autograd.Function`s, where those formulas never apply.)

The vocab-parallel lookup (`fxpar::vocab_parallel_embedding`, defined with its
sharding rule in `fxpar.rules.embedding`) is lowered too, to the plain torch
ops of its definition (shift, mask, lookup, zero the other ranks' rows), whose
autograd is the custom op's backward. As a custom op it runs eagerly inside
the compiled graph on every call (about ten ATen ops and a host sync for its id
check, twice per GPT forward: token and position tables); lowered, inductor
fuses it with the sum and the all-reduce's input into one kernel, and its id
check becomes an in-kernel assert (`assert_async`: out-of-range ids still fail,
as `aten.embedding` fails on them).

A collective this module does not lower keeps its custom op (exact, opaque):
uneven shards (`full_size` >= 0), strided shards (`split_factor` > 1), and
FSDP gathers, whose runtime (`FsdpRuntime`) buckets and re-gathers them.

The copy is per rank: a `shard` / `all_gather` backward slices this rank's
chunk (a `replica_grad_sum` backward keeps its kv head's slot), whose index
is read from the process group when the copy is made (a constant of that
rank's compiled graph; the graph module itself stays the same on every rank).
Comm counting (`count_comms`) does not see lowered collectives: they run
inside compiled code.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
from torch import Tensor

from fxpar._torch.aten import assert_async
from fxpar._torch.c10d import functional, group_rank, resolve_process_group
from fxpar._torch.fx import copy_codegen
from fxpar.ops.kv_replicas import REPLICA_GRAD_SUM
from fxpar.ops.exchange import swap_splits
from fxpar.ops.waiting import gloo_group, known_gloo, known_pair_rank

__all__ = ["traceable_graph_module", "LOWERED_OPS", "lowered_collectives", "reduce_scatter_flat"]

_c10d = functional  # importing fxpar._torch.c10d imports torch's functional collectives: wait_tensor is kept by DCE


# --------------------------------------------------------------------------- the collectives, issue + wait


def _swap(x: Tensor, group_name: str) -> tuple[Tensor, Tensor] | None:
    """On a gloo group of 2 (asked of c10d before tracing), (this rank's x, the other's) in rank order, swapped
    by one all-to-all as the eager kernels (`fxpar.ops.exchange`); else None."""
    rank = known_pair_rank(group_name) if x.device.type == "cpu" else None
    if rank is None:
        return None
    x = x.contiguous().view(-1) if x.dim() == 0 else x.contiguous()
    splits = swap_splits(rank, x.size(0))  # in rows of dim 0
    other = _c10d.wait_tensor(_c10d.all_to_all_single(x, splits, splits, group_name))
    return (x, other) if rank == 0 else (other, x)


def _all_reduce(x: Tensor, group_name: str, op: str = "sum") -> Tensor:
    pair = _swap(x, group_name) if op == "sum" else None
    if pair is not None:  # the same sum on both ranks: a + b and b + a are the same float
        return (pair[0] + pair[1]).view(x.shape)
    return _c10d.wait_tensor(_c10d.all_reduce(x.contiguous(), op, group_name))


def _all_gather(x: Tensor, dim: int, n: int, group_name: str) -> Tensor:
    pair = _swap(x, group_name) if x.dim() > 0 else None
    if pair is not None:
        return torch.cat(pair, dim=dim)
    out = _c10d.wait_tensor(_c10d.all_gather_into_tensor(x.contiguous(), n, group_name))
    if dim != 0:  # gathered rank-major along dim 0
        out = torch.cat(out.chunk(n, dim=0), dim=dim)
    return out


def reduce_scatter_flat(x: Tensor, n: int, group_name: str) -> Tensor:
    """The sum over the group of `x`'s block of dim 0 for this rank (n blocks), as traceable collectives.

    On a gloo group (its backend asked of c10d before tracing: `_lower_graph`, `traceable_fsdp_graph_module`)
    an all-to-all and the sum of the n blocks received, in rank order, as the eager kernels
    (`fxpar.ops.waiting.start_reduce_scatter`): gloo's own reduce-scatter all-reduces the whole buffer.
    Elsewhere torch's functional reduce-scatter."""
    x = x.contiguous()
    if x.device.type != "cpu" or not known_gloo(group_name):
        return _c10d.wait_tensor(_c10d.reduce_scatter_tensor(x, "sum", n, group_name))
    rows = x.size(0) // n
    blocks = _c10d.wait_tensor(_c10d.all_to_all_single(x, [rows] * n, [rows] * n, group_name))
    return blocks.view(n, rows, *x.shape[1:]).sum(0)


def _reduce_scatter(x: Tensor, dim: int, n: int, group_name: str) -> Tensor:
    if dim != 0:
        x = torch.cat(x.chunk(n, dim=dim), dim=0)
    return reduce_scatter_flat(x, n, group_name)


def _chunk(x: Tensor, dim: int, n: int, rank: int) -> Tensor:
    size = x.size(dim) // n
    return x.narrow(dim, rank * size, size).contiguous()


def _all_to_all(x: Tensor, src_dim: int, dst_dim: int, n: int, group_name: str) -> Tensor:
    pieces = torch.cat([c.contiguous() for c in x.chunk(n, dim=dst_dim)], dim=0)
    splits = [pieces.size(0) // n] * n
    out = _c10d.wait_tensor(_c10d.all_to_all_single(pieces, splits, splits, group_name))
    return torch.cat(out.chunk(n, dim=0), dim=src_dim)


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group_name: str) -> Tensor:
        return _all_reduce(x, group_name)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _AllReduceMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group_name: str) -> Tensor:
        return _all_reduce(x, group_name, "max")

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, None  # the shift of a vocab-parallel log-softmax: detached in the graph


class _GradAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group_name: str) -> Tensor:
        ctx.group_name = group_name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_reduce(grad, ctx.group_name), None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, n: int, group_name: str, rank: int) -> Tensor:
        ctx.args = (dim, n, rank)
        return _all_gather(x, dim, n, group_name)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _chunk(grad, *ctx.args), None, None, None, None


class _SpAllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, n: int, group_name: str) -> Tensor:
        ctx.args = (dim, n, group_name)
        return _all_gather(x, dim, n, group_name)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _reduce_scatter(grad, *ctx.args), None, None, None


class _Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, n: int, group_name: str, rank: int) -> Tensor:
        ctx.args = (dim, n, group_name)
        return _chunk(x, dim, n, rank)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_gather(grad, *ctx.args), None, None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, n: int, group_name: str) -> Tensor:
        ctx.args = (dim, n, group_name)
        return _reduce_scatter(x, dim, n, group_name)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_gather(grad, *ctx.args), None, None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, src_dim: int, dst_dim: int, n: int, group_name: str) -> Tensor:
        ctx.args = (src_dim, dst_dim, n, group_name)
        return _all_to_all(x, src_dim, dst_dim, n, group_name)

    @staticmethod
    def backward(ctx, grad: Tensor):
        src, dst, n, group_name = ctx.args
        return _all_to_all(grad, dst, src, n, group_name), None, None, None, None


class _ReplicaGradSum(torch.autograd.Function):
    """`fxpar::replica_grad_sum` (`fxpar.ops.kv_replicas`): this rank's gradient in its kv head's slot of a
    zero buffer of `slots`, all-reduced, its slot kept (the sum over the ranks holding the same kv head)."""

    @staticmethod
    def forward(ctx, x: Tensor, slots: int, slot: int, group_name: str) -> Tensor:
        ctx.args = (slots, slot, group_name)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        slots, slot, group_name = ctx.args
        zeros = torch.zeros_like(grad)
        buf = torch.stack([grad if j == slot else zeros for j in range(slots)])
        return _all_reduce(buf, group_name)[slot], None, None, None


# --------------------------------------------------------------------------- graph-level entry points
# One plain function per fxpar op, called by the lowered graph's nodes (their printed names say what they do).


def tp_all_reduce(x: Tensor, group_name: str, mesh_dim: str) -> Tensor:
    return _AllReduce.apply(x, group_name)


def tp_all_reduce_max(x: Tensor, group_name: str, mesh_dim: str) -> Tensor:
    return _AllReduceMax.apply(x, group_name)


def tp_grad_all_reduce(x: Tensor, group_name: str, mesh_dim: str) -> Tensor:
    return _GradAllReduce.apply(x, group_name)


def tp_all_gather(x: Tensor, dim: int, n: int, group_name: str, mesh_dim: str, rank: int) -> Tensor:
    return _AllGather.apply(x, dim, n, group_name, rank)


def tp_sp_all_gather(x: Tensor, dim: int, n: int, group_name: str, mesh_dim: str) -> Tensor:
    return _SpAllGather.apply(x, dim, n, group_name)


def tp_shard(x: Tensor, dim: int, n: int, group_name: str, mesh_dim: str, rank: int) -> Tensor:
    return _Shard.apply(x, dim, n, group_name, rank)


def tp_reduce_scatter(x: Tensor, dim: int, n: int, group_name: str, mesh_dim: str) -> Tensor:
    return _ReduceScatter.apply(x, dim, n, group_name)


def tp_all_to_all(x: Tensor, src_dim: int, dst_dim: int, n: int, group_name: str, mesh_dim: str) -> Tensor:
    return _AllToAll.apply(x, src_dim, dst_dim, n, group_name)


def tp_replica_grad_sum(x: Tensor, replicas: int, group_size: int, group_name: str, mesh_dim: str,
                        slot: int) -> Tensor:
    return _ReplicaGradSum.apply(x, group_size // replicas, slot, group_name)


def tp_vocab_parallel_embedding(weight: Tensor, indices: Tensor, padding_idx: int, group_name: str, rank: int,
                                n: int) -> Tensor:
    """`fxpar::vocab_parallel_embedding` in traceable ops: this rank's rows looked up, zeros for the others' ids.

    The same values as the custom op, and (through torch's autograd of these ops) the same gradient: the
    lookup's backward scatters the masked gradient into this rank's rows, skipping its padding row."""
    rows = weight.size(0)
    start = rank * rows
    assert_async(((indices >= 0) & (indices < rows * n)).all(),
                 f"vocab-parallel embedding: index out of range in self (ids must be in [0, {rows * n}))")
    shifted = indices - start
    mask = (shifted >= 0) & (shifted < rows)
    local_pad = padding_idx - start if 0 <= padding_idx - start < rows else -1
    out = torch.embedding(weight, torch.where(mask, shifted, 0), local_pad)
    return out * mask.unsqueeze(-1).to(out.dtype)


def _even(args: tuple, split_at: int = 5) -> bool:
    """No strided sections (split_factor == 1) and an even shard (full_size < 0)."""
    rest = args[split_at:]
    return (len(rest) < 1 or rest[0] == 1) and (len(rest) < 2 or rest[1] < 0)


def _with_rank(args: tuple) -> tuple:
    """(x, dim, n, group, mesh_dim[, 1, -1]) -> (x, dim, n, group, mesh_dim, this rank's index in group)."""
    return (*args[:5], group_rank(args[3]))


def _with_slot(args: tuple) -> tuple:
    """(x, replicas, n, group, mesh_dim) -> (..., this rank's kv head slot: its index in group // replicas)."""
    return (*args, group_rank(args[3]) // args[1])


_fxpar = torch.ops.fxpar
LOWERED_OPS: dict[object, tuple[Callable, Callable[[tuple], bool], Callable[[tuple], tuple]]] = {
    # fxpar op: (lowered function, which calls it lowers, their arguments)
    _fxpar.all_reduce.default: (tp_all_reduce, lambda a: True, lambda a: a),
    _fxpar.all_reduce_max.default: (tp_all_reduce_max, lambda a: True, lambda a: a),
    _fxpar.grad_all_reduce.default: (tp_grad_all_reduce, lambda a: True, lambda a: a),
    _fxpar.all_gather.default: (tp_all_gather, _even, _with_rank),
    _fxpar.sp_all_gather.default: (tp_sp_all_gather, lambda a: True, lambda a: a),
    _fxpar.shard.default: (tp_shard, _even, _with_rank),
    _fxpar.reduce_scatter.default: (tp_reduce_scatter, lambda a: True, lambda a: a),
    _fxpar.all_to_all.default: (tp_all_to_all, lambda a: True, lambda a: a),
    REPLICA_GRAD_SUM: (tp_replica_grad_sum, lambda a: True, _with_slot),
}
"""The fxpar collectives `traceable_graph_module` lowers, and on which arguments."""


def _with_rank_and_size(args: tuple) -> tuple:
    """(weight, ids, padding_idx, group) -> (..., this rank's index in group, the group's size)."""
    group = resolve_process_group(args[3])
    return (*args, group.rank(), group.size())


_LOWERED_BY_NAME: dict[str, tuple[Callable, Callable[[tuple], bool], Callable[[tuple], tuple]]] = {
    # ops defined above this layer (looked up by name: they may not be registered when this module loads)
    "fxpar.vocab_parallel_embedding.default": (tp_vocab_parallel_embedding, lambda a: True, _with_rank_and_size),
}


def _entry(node: fx.Node) -> tuple | None:
    """How `node` lowers: its LOWERED_OPS / by-name entry, or None (kept as it is)."""
    if node.op != "call_function":
        return None
    entry = LOWERED_OPS.get(node.target)
    return entry if entry is not None else _LOWERED_BY_NAME.get(str(node.target))


def _args(node: fx.Node) -> tuple:
    """The node's arguments, keywords folded in by the op's schema (defaults left out)."""
    schema = node.target._schema
    out = list(node.args)
    for arg in schema.arguments[len(out):]:
        if arg.name not in node.kwargs:
            break
        out.append(node.kwargs[arg.name])
    return tuple(out)


def lowered_collectives(gm: fx.GraphModule) -> list[fx.Node]:
    """The collective nodes of `gm` (and of its subgraphs) that `traceable_graph_module` lowers."""
    out = []
    for mod in gm.modules():
        if isinstance(mod, fx.GraphModule):
            for node in mod.graph.nodes:
                entry = LOWERED_OPS.get(node.target) if node.op == "call_function" else None
                if entry is not None and entry[1](_args(node)):
                    out.append(node)
    return out


def _lowers(gm: fx.GraphModule) -> bool:
    """Whether `traceable_graph_module` changes a node of `gm` or of its subgraphs."""
    return any(_entry(node) is not None and _entry(node)[1](_args(node))
               for mod in gm.modules() if isinstance(mod, fx.GraphModule) for node in mod.graph.nodes)


def _lower_graph(graph: fx.Graph) -> fx.Graph:
    out = fx.Graph(owning_module=None, tracer_cls=graph._tracer_cls)
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        entry = _entry(node)
        args = _args(node) if entry is not None else ()
        if entry is not None and entry[1](args):
            fn, _, convert = entry
            names = [a.name for a in node.target._schema.arguments]
            group = args[names.index("group_name")] if "group_name" in names[:len(args)] else None
            if isinstance(group, str):  # the backend, asked of c10d now: dynamo traces the collectives later
                gloo_group(group, torch.empty(0))
            # named as the inserting pass named it (allreduce_attn_out, ...)
            new = out.create_node("call_function", fn, fx.node.map_arg(convert(args), lambda a: env[a]), {},
                                  name=node.name)
            new.meta = dict(node.meta)
            env[node] = new
            continue
        env[node] = out.node_copy(node, lambda a: env[a])
    copy_codegen(graph, out)  # the capture's pytree in/out handling
    return out


def traceable_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of this rank's `gm` whose tp collectives are functional collectives torch.compile traces.

    Parameters and buffers are `gm`'s own tensor objects (shared, so optimizer
    steps and `load_state_dict` reach the copy); subgraphs (activation-checkpoint
    regions, higher-order ops' bodies) are lowered too. The same collectives run
    in the same order on every rank, with the same values and gradients as `gm`.
    """
    out = fx.GraphModule(gm, _lower_graph(gm.graph), class_name=type(gm).__name__)
    for name, mod in list(out.named_children()):
        if isinstance(mod, fx.GraphModule) and _lowers(mod):
            setattr(out, name, traceable_graph_module(mod))
    out.meta.update(gm.meta)
    return out

for _fn in (tp_all_reduce, tp_all_reduce_max, tp_grad_all_reduce, tp_all_gather, tp_sp_all_gather, tp_shard,
            tp_reduce_scatter, tp_all_to_all, tp_replica_grad_sum):
    torch.fx.node.has_side_effect(_fn)  # as the custom ops they replace: DCE never drops a collective
