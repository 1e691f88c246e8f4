"""Explicit collectives as graph nodes, each with its gradient dual.

This is the only module that creates communication. Every collective is a
`torch.library.custom_op` in the `fxpar` namespace whose implementation calls
torch's functional collectives (`_c10d_functional.*` followed by
`wait_tensor`) on the process group named in its arguments, and whose
registered autograd formula is the dual from DESIGN.md:

    forward (mesh dim m)      op                      backward
    Partial   -> Replicate    all_reduce              identity
    Shard(d)  -> Replicate    all_gather(d)           local slice
    Replicate -> Shard(d)     shard (local slice)     all_gather(d)
    Partial   -> Shard(d)     reduce_scatter(d)       all_gather(d)
    Shard(a)  -> Shard(b)     all_to_all(a -> b)      all_to_all(b -> a)
    Replicate, consumed by    grad_all_reduce         all_reduce
      a non-Replicate op      (identity)
    FSDP parameter Shard(0)   fsdp_all_gather         reduce_scatter
      -> Replicate, used on   (all_gather then the
      batch-sharded data      f above, fused)

The graph is the same on every rank of a group: a rank's own index comes from
its process group at run time, never from a constant baked into the graph.

Importing `torch.distributed._functional_collectives` marks `wait_tensor`
side-effecting for dead-code elimination; fxpar's own ops are registered the
same way with `torch.fx.node.has_side_effect`, so DCE never drops a collective
whose result happens to be unused on some path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives  # noqa: F401  (marks wait_tensor side-effecting)
import torch.fx as fx
from torch import Tensor
from torch.distributed.tensor.placement_types import Partial, Placement, Replicate, Shard, _StridedShard

from fxpar.errors import ShardingError

__all__ = [
    "COLLECTIVE_OPS",
    "CommRecord",
    "count_comms",
    "transition_op",
    "transition_cost",
    "insert_transition",
    "insert_grad_all_reduce",
    "inference_graph_module",
]

_c10d = torch.ops._c10d_functional


# --------------------------------------------------------------------------- instrumentation


@dataclasses.dataclass(frozen=True)
class CommRecord:
    """One collective as it ran: op name, mesh dim, bytes each rank sent in."""

    op: str
    mesh_dim: str
    nbytes: int
    direction: str  # 'forward' or 'backward'


_counters: list[list[CommRecord]] = []


@contextlib.contextmanager
def count_comms() -> Iterator[list[CommRecord]]:
    """Records every fxpar collective run inside the block (forward and backward)."""
    records: list[CommRecord] = []
    _counters.append(records)
    try:
        yield records
    finally:
        _counters.remove(records)


def _record(op: str, mesh_dim: str, t: Tensor, direction: str) -> None:
    if _counters:
        rec = CommRecord(op, mesh_dim, t.numel() * t.element_size(), direction)
        for records in _counters:
            records.append(rec)


# --------------------------------------------------------------------------- eager kernels


def _group_rank(group_name: str) -> int:
    group = torch.distributed.distributed_c10d._resolve_process_group(group_name)
    return group.rank()


def _all_reduce(x: Tensor, group_name: str) -> Tensor:
    return _c10d.wait_tensor(_c10d.all_reduce(x.contiguous(), "sum", group_name))


def _all_gather(x: Tensor, dim: int, n: int, group_name: str, split_factor: int = 1) -> Tensor:
    out = _c10d.wait_tensor(_c10d.all_gather_into_tensor(x.contiguous(), n, group_name))
    if dim != 0:
        out = torch.cat(out.chunk(n, dim=0), dim=dim)
    if split_factor > 1:
        # gathered as rank-major [r0s0, r0s1, .., r1s0, ..]; the full tensor is section-major
        k = split_factor
        pieces = out.chunk(n * k, dim=dim)
        out = torch.cat([pieces[r * k + s] for s in range(k) for r in range(n)], dim=dim)
    return out


def _local_chunk(x: Tensor, dim: int, n: int, group_name: str, what: str, split_factor: int = 1) -> Tensor:
    if x.size(dim) % (n * split_factor):
        raise ShardingError(
            f"{what}: dim {dim} of size {x.size(dim)} does not divide by the mesh dim size {n}"
            f"{f' x {split_factor} sections' if split_factor > 1 else ''} at run time; "
            "use inputs whose size along that dim is a multiple of it"
        )
    r = _group_rank(group_name)
    if split_factor > 1:
        return torch.cat([sec.chunk(n, dim=dim)[r] for sec in x.chunk(split_factor, dim=dim)], dim=dim)
    return x.chunk(n, dim=dim)[r].clone(memory_format=torch.contiguous_format)  # never alias the input


def _reduce_scatter(x: Tensor, dim: int, n: int, group_name: str) -> Tensor:
    if x.size(dim) % n:
        raise ShardingError(
            f"reduce_scatter: dim {dim} of size {x.size(dim)} does not divide by the mesh dim size {n} at run time"
        )
    if dim != 0:
        x = torch.cat(x.chunk(n, dim=dim), dim=0)
    return _c10d.wait_tensor(_c10d.reduce_scatter_tensor(x.contiguous(), "sum", n, group_name))


def _all_to_all(x: Tensor, src_dim: int, dst_dim: int, n: int, group_name: str) -> Tensor:
    # Split the local tensor along dst_dim, exchange, and concatenate the received pieces along src_dim.
    pieces = torch.cat([c.contiguous() for c in x.chunk(n, dim=dst_dim)], dim=0)
    splits = [pieces.size(0) // n] * n
    out = _c10d.wait_tensor(_c10d.all_to_all_single(pieces, splits, splits, group_name))
    return torch.cat(out.chunk(n, dim=0), dim=src_dim)


# --------------------------------------------------------------------------- custom ops and duals


@torch.library.custom_op("fxpar::all_reduce", mutates_args=())
def all_reduce(x: Tensor, group_name: str, mesh_dim: str) -> Tensor:
    """Partial -> Replicate: sum over the group. Backward: identity."""
    _record("all_reduce", mesh_dim, x, "forward")
    return _all_reduce(x, group_name)


@all_reduce.register_fake
def _(x, group_name, mesh_dim):
    return torch.empty_like(x)


def _all_reduce_bwd(ctx, grad):
    return grad, None, None


all_reduce.register_autograd(_all_reduce_bwd)


@torch.library.custom_op("fxpar::grad_all_reduce", mutates_args=())
def grad_all_reduce(x: Tensor, group_name: str, mesh_dim: str) -> Tensor:
    """Identity forward (Megatron's f); its backward all-reduces the partial gradient."""
    return x.clone()


@grad_all_reduce.register_fake
def _(x, group_name, mesh_dim):
    return torch.empty_like(x)


def _grad_all_reduce_bwd(ctx, grad):
    _record("all_reduce", ctx.mesh_dim, grad, "backward")
    return _all_reduce(grad, ctx.group_name), None, None


def _save_group(ctx, inputs, output):
    ctx.group_name, ctx.mesh_dim = inputs[-2], inputs[-1]


grad_all_reduce.register_autograd(_grad_all_reduce_bwd, setup_context=_save_group)


@torch.library.custom_op("fxpar::all_gather", mutates_args=())
def all_gather(x: Tensor, dim: int, group_size: int, group_name: str, mesh_dim: str, split_factor: int = 1) -> Tensor:
    """Shard(dim) -> Replicate (section-wise for a strided shard). Backward: this rank's slice."""
    _record("all_gather", mesh_dim, x, "forward")
    return _all_gather(x, dim, group_size, group_name, split_factor)


@all_gather.register_fake
def _(x, dim, group_size, group_name, mesh_dim, split_factor=1):
    shape = list(x.shape)
    shape[dim] = shape[dim] * group_size
    return x.new_empty(shape)


def _save_shard_args(ctx, inputs, output):
    ctx.dim, ctx.group_size, ctx.group_name, ctx.mesh_dim = inputs[1:5]
    ctx.split_factor = inputs[5] if len(inputs) > 5 else 1


def _all_gather_bwd(ctx, grad):
    local = _local_chunk(grad, ctx.dim, ctx.group_size, ctx.group_name, "all_gather backward", ctx.split_factor)
    return local, None, None, None, None, None


all_gather.register_autograd(_all_gather_bwd, setup_context=_save_shard_args)


@torch.library.custom_op("fxpar::shard", mutates_args=())
def shard(x: Tensor, dim: int, group_size: int, group_name: str, mesh_dim: str, split_factor: int = 1) -> Tensor:
    """Replicate -> Shard(dim): keep this rank's chunk, no communication. Backward: all_gather."""
    return _local_chunk(x, dim, group_size, group_name, f"shard along mesh dim '{mesh_dim}'", split_factor)


@shard.register_fake
def _(x, dim, group_size, group_name, mesh_dim, split_factor=1):
    shape = list(x.shape)
    shape[dim] = shape[dim] // group_size
    return x.new_empty(shape)


def _shard_bwd(ctx, grad):
    _record("all_gather", ctx.mesh_dim, grad, "backward")
    return _all_gather(grad, ctx.dim, ctx.group_size, ctx.group_name, ctx.split_factor), None, None, None, None, None


shard.register_autograd(_shard_bwd, setup_context=_save_shard_args)


@torch.library.custom_op("fxpar::reduce_scatter", mutates_args=())
def reduce_scatter(x: Tensor, dim: int, group_size: int, group_name: str, mesh_dim: str) -> Tensor:
    """Partial -> Shard(dim). Backward: all_gather(dim)."""
    _record("reduce_scatter", mesh_dim, x, "forward")
    return _reduce_scatter(x, dim, group_size, group_name)


@reduce_scatter.register_fake
def _(x, dim, group_size, group_name, mesh_dim):
    shape = list(x.shape)
    shape[dim] = shape[dim] // group_size
    return x.new_empty(shape)


def _reduce_scatter_bwd(ctx, grad):
    _record("all_gather", ctx.mesh_dim, grad, "backward")
    return _all_gather(grad, ctx.dim, ctx.group_size, ctx.group_name), None, None, None, None


reduce_scatter.register_autograd(_reduce_scatter_bwd, setup_context=_save_shard_args)


@torch.library.custom_op("fxpar::all_to_all", mutates_args=())
def all_to_all(x: Tensor, src_dim: int, dst_dim: int, group_size: int, group_name: str, mesh_dim: str) -> Tensor:
    """Shard(src_dim) -> Shard(dst_dim). Backward: all_to_all(dst_dim -> src_dim)."""
    _record("all_to_all", mesh_dim, x, "forward")
    return _all_to_all(x, src_dim, dst_dim, group_size, group_name)


@all_to_all.register_fake
def _(x, src_dim, dst_dim, group_size, group_name, mesh_dim):
    shape = list(x.shape)
    shape[src_dim] = shape[src_dim] * group_size
    shape[dst_dim] = shape[dst_dim] // group_size
    return x.new_empty(shape)


def _save_a2a_args(ctx, inputs, output):
    ctx.src_dim, ctx.dst_dim, ctx.group_size, ctx.group_name, ctx.mesh_dim = inputs[1:6]


def _all_to_all_bwd(ctx, grad):
    _record("all_to_all", ctx.mesh_dim, grad, "backward")
    return _all_to_all(grad, ctx.dst_dim, ctx.src_dim, ctx.group_size, ctx.group_name), None, None, None, None, None


all_to_all.register_autograd(_all_to_all_bwd, setup_context=_save_a2a_args)


@torch.library.custom_op("fxpar::fsdp_all_gather", mutates_args=())
def fsdp_all_gather(x: Tensor, dim: int, group_size: int, group_name: str, mesh_dim: str) -> Tensor:
    """A parameter's FSDP shard -> the full parameter. Backward: reduce_scatter of its gradient.

    The fused form of all_gather followed by grad_all_reduce: the gathered parameter is used on
    batch-sharded activations, so its gradient is partial on every rank; summing and keeping this
    rank's slice is one reduce_scatter.
    """
    if _step_gathers:  # a pipeline step that gathers each parameter once (see StepGather)
        return _step_gathers[-1].gather(x, (dim, group_size, group_name, mesh_dim))
    bucket = fsdp_bucket_of(x)
    if bucket is not None:  # gathered with the rest of its block (fxpar.fsdp_buckets)
        out = bucket[0].gather(bucket[1])
        _note_gathered(out, x, (dim, group_size, group_name, mesh_dim))
        return out
    _record("all_gather", mesh_dim, x, "forward")
    out = _all_gather(x, dim, group_size, group_name)
    _note_gathered(out, x, (dim, group_size, group_name, mesh_dim))
    return out


@fsdp_all_gather.register_fake
def _(x, dim, group_size, group_name, mesh_dim):
    shape = list(x.shape)
    shape[dim] = shape[dim] * group_size
    return x.new_empty(shape)


def _fsdp_all_gather_bwd(ctx, grad):
    if _step_gathers:
        return _step_gathers[-1].accumulate(ctx, grad), None, None, None, None
    if ctx.bucket is not None:
        return ctx.bucket[0].reduce(ctx.bucket[1], grad), None, None, None, None
    _record("reduce_scatter", ctx.mesh_dim, grad, "backward")
    return _reduce_scatter(grad, ctx.dim, ctx.group_size, ctx.group_name), None, None, None, None


_step_gathers: list["StepGather"] = []


class StepGather:
    """FSDP over a whole pipeline step: each parameter gathered once, its gradient reduce-scattered once.

    A pipeline runs the stage graph once per microbatch, so the graph's
    `fsdp_all_gather` would gather every parameter M times and reduce-scatter
    its gradient M times. Inside `with StepGather() as sg:` the first gather
    of a shard communicates and later ones reuse the full parameter (kept for
    the step: FSDP2's reshard_after_forward=False); backwards add the full
    gradient into one buffer and give the shard zeros; `sg.reduce_scatter(params)`
    then reduce-scatters each buffer once and adds it into `.grad`.
    """

    def __init__(self) -> None:
        self._full: dict[tuple, Tensor] = {}
        self._grads: dict[tuple, Tensor] = {}
        self._args: dict[tuple, tuple] = {}

    @staticmethod
    def _key(shard: Tensor) -> tuple:
        return (shard.data_ptr(), tuple(shard.shape), shard.dtype)

    def __enter__(self) -> "StepGather":
        _step_gathers.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _step_gathers.remove(self)

    def gather(self, shard: Tensor, args: tuple) -> Tensor:
        key = self._key(shard)
        full = self._full.get(key)
        if full is None:
            dim, n, group_name, mesh_dim = args
            _record("all_gather", mesh_dim, shard, "forward")
            full = self._full[key] = _all_gather(shard, dim, n, group_name)
            self._args[key] = args
            _note_gathered(full, shard, args)
        return full.detach()  # a new tensor on the same storage: autograd gives each use its own history

    def accumulate(self, ctx, grad: Tensor) -> Tensor:
        shape = list(grad.shape)
        shape[ctx.dim] //= ctx.group_size
        key = (ctx.shard_key, tuple(shape), grad.dtype)
        acc = self._grads.get(key)
        if acc is None:
            self._grads[key] = grad.detach().clone()
        else:
            acc.add_(grad)
        return grad.new_zeros(shape)

    def reduce_scatter(self, params: list[Tensor]) -> None:
        """Reduce-scatters each gathered parameter's summed gradient once, in `params` order (the same on
        every rank of the group), into `.grad`; frees the gathered parameters."""
        for p in params:
            key = self._key(p)
            acc = self._grads.pop(key, None)
            if acc is None:
                continue
            dim, n, group_name, mesh_dim = self._args[key]
            _record("reduce_scatter", mesh_dim, acc, "backward")
            shard = _reduce_scatter(acc, dim, n, group_name)
            p.grad = shard if p.grad is None else p.grad.add_(shard)
        self._full.clear()


def _save_fsdp_args(ctx, inputs, output):
    _save_shard_args(ctx, inputs, output)
    ctx.shard_key = inputs[0].data_ptr()  # which parameter, for StepGather
    ctx.bucket = None if _step_gathers else fsdp_bucket_of(inputs[0])


# Shards whose gathers are coalesced per block (fxpar.fsdp_buckets): data_ptr -> (weakref(shard), bucket, index).
_fsdp_buckets: dict[int, tuple] = {}


def register_fsdp_bucket(shard: Tensor, bucket: Any, index: int) -> None:
    _fsdp_buckets[shard.data_ptr()] = (weakref.ref(shard), bucket, index)


def fsdp_bucket_of(shard: Tensor) -> tuple | None:
    """(bucket, index) of a registered FSDP shard, or None."""
    entry = _fsdp_buckets.get(shard.data_ptr()) if _fsdp_buckets else None
    if entry is None:
        return None
    ref, bucket, index = entry
    t = ref()
    if t is None or t.data_ptr() != shard.data_ptr() or tuple(t.shape) != tuple(shard.shape):
        return None
    return bucket, index


fsdp_all_gather.register_autograd(_fsdp_all_gather_bwd, setup_context=_save_fsdp_args)


# Gathered FSDP parameters alive right now, for the runtime's memory accounting and for re-gathering
# in the backward instead of keeping them (reshard_after_forward):
# id(full) -> (weakref(full), shard, (dim, group_size, group_name, mesh_dim)).
_gathered: dict[int, tuple] = {}


_peak = [0]


def _note_gathered(full: Tensor, shard: Tensor, args: tuple) -> None:
    import weakref

    key = id(full)
    _gathered[key] = (weakref.ref(full, lambda _: _gathered.pop(key, None)), shard, args)
    _peak[0] = max(_peak[0], gathered_param_bytes())


class _Regather:
    """What autograd keeps of a gathered FSDP parameter instead of the parameter itself."""

    def __init__(self, shard: Tensor, args: tuple) -> None:
        self.shard, self.args = shard, args
        self.bucket = fsdp_bucket_of(shard)  # re-gathered with its block (fxpar.fsdp_buckets)
        if self.bucket is not None:
            self.bucket[0].saved()

    def __del__(self) -> None:  # autograd freed the graph without unpacking this
        if self.bucket is not None:
            self.bucket[0].unsaved()

    def __call__(self) -> Tensor:
        dim, n, group_name, mesh_dim = self.args
        if self.bucket is not None:
            bucket, self.bucket = self.bucket, None
            full = bucket[0].regather(bucket[1])
            bucket[0].unsaved()
            _note_gathered(full, self.shard, self.args)
            return full
        _record("all_gather", mesh_dim, self.shard, "backward")
        full = _all_gather(self.shard, dim, n, group_name)
        _note_gathered(full, self.shard, self.args)
        return full


def pack_gathered(t: Tensor):
    """saved_tensors_hooks pack: a gathered FSDP parameter (or a view of it, e.g. linear's w.t())
    is saved as its shard and re-gathered in the backward."""
    base = t._base if t._base is not None else t
    entry = _gathered.get(id(base))
    if entry is not None and entry[0]() is base:
        view = (t.size(), t.stride(), t.storage_offset()) if base is not t else None
        return _Regather(entry[1], entry[2]), view
    return t


def unpack_gathered(x):
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], _Regather):
        full = x[0]()
        return full if x[1] is None else full.as_strided(*x[1])
    return x


def reset_peak_gathered_bytes() -> None:
    _peak[0] = gathered_param_bytes()


def peak_gathered_bytes() -> int:
    """The most bytes of gathered FSDP parameters alive at once since the last reset."""
    return _peak[0]


def gathered_param_bytes() -> int:
    """Bytes of FSDP-gathered parameters alive now (in this process)."""
    total = 0
    for ref, *_ in list(_gathered.values()):
        t = ref()
        if t is not None:
            total += t.numel() * t.element_size()
    return total


COLLECTIVE_OPS = {
    torch.ops.fxpar.all_reduce.default: "all_reduce",
    torch.ops.fxpar.all_gather.default: "all_gather",
    torch.ops.fxpar.shard.default: "shard",
    torch.ops.fxpar.reduce_scatter.default: "reduce_scatter",
    torch.ops.fxpar.all_to_all.default: "all_to_all",
    torch.ops.fxpar.grad_all_reduce.default: "grad_all_reduce",
    torch.ops.fxpar.fsdp_all_gather.default: "fsdp_all_gather",
}
"""Every fxpar communication op, by the name explain() prints."""

# What each op communicates, forward and backward, for explain() and the static checker.
BACKWARD_OF = {
    "all_reduce": None,
    "all_gather": None,
    "shard": "all_gather",
    "reduce_scatter": "all_gather",
    "all_to_all": "all_to_all",
    "grad_all_reduce": "all_reduce",
    "fsdp_all_gather": "reduce_scatter",
}

for _op in COLLECTIVE_OPS:
    torch.fx.node.has_side_effect(_op)


# --------------------------------------------------------------------------- transitions


def transition_op(src: Placement, dst: Placement) -> str | None:
    """The op that moves a tensor from `src` to `dst` on one mesh dim (None: nothing to do).

    Raises:
        ShardingError: for transitions no rule may ask for (into Partial).
    """
    if src == dst:
        return None
    if isinstance(src, _StridedShard) and not isinstance(dst, Replicate) or isinstance(dst, _StridedShard) \
            and not isinstance(src, Replicate):
        raise ShardingError(f"no transition from {src} to {dst}: a strided shard only gathers or is cut from a replica")
    if isinstance(dst, Replicate):
        return "all_reduce" if isinstance(src, Partial) else "all_gather"
    if isinstance(dst, (Shard, _StridedShard)):
        if isinstance(src, Replicate):
            return "shard"
        if isinstance(src, Partial):
            return "reduce_scatter"
        return "all_to_all"
    raise ShardingError(f"no transition from {src} to {dst}: a Partial value can only come from an op's rule")


# Ring algorithms: all_reduce moves 2(n-1)/n of the tensor per rank, gathers and scatters (n-1)/n,
# all_to_all (n-1)/n of the local shard.
_FORWARD_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
                   "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n / n,
                   "shard": lambda n: 0.0, "grad_all_reduce": lambda n: 0.0,
                   "fsdp_all_gather": lambda n: (n - 1) / n}


def op_cost(op: str, n: int, nbytes: float, *, with_backward: bool) -> float:
    """Bytes per rank that `op` on a global tensor of `nbytes` moves, forward (+ backward)."""
    cost = _FORWARD_FACTOR[op](n) * nbytes
    if with_backward and BACKWARD_OF[op]:
        cost += _FORWARD_FACTOR[BACKWARD_OF[op]](n) * nbytes
    return cost


def transition_cost(src: Placement, dst: Placement, n: int, nbytes: float, *, with_backward: bool) -> float:
    """The cost of one transition; infinite where no transition exists."""
    try:
        op = transition_op(src, dst)
    except ShardingError:
        return float("inf")
    return 0.0 if op is None else op_cost(op, n, nbytes, with_backward=with_backward)


def _make_node(graph: fx.Graph, op: str, x: fx.Node, args: tuple, name: str) -> fx.Node:
    target = getattr(torch.ops.fxpar, op).default
    return graph.create_node("call_function", target, (x, *args), name=name)


def insert_transition(
    graph: fx.Graph,
    x: fx.Node,
    src: Placement,
    dst: Placement,
    *,
    mesh_dim: int,
    mesh_dim_name: str,
    group_size: int,
    group_name: str,
    label: str,
) -> fx.Node | None:
    """Inserts the node that moves `x` from `src` to `dst` (at the graph's insert point)."""
    op = transition_op(src, dst)
    if op is None:
        return None
    if op == "all_reduce":
        return _make_node(graph, op, x, (group_name, mesh_dim_name), f"allreduce_{label}")
    if op == "all_to_all":
        return _make_node(graph, op, x, (src.dim, dst.dim, group_size, group_name, mesh_dim_name), f"alltoall_{label}")
    strided = src if op == "all_gather" else dst
    dim = strided.dim
    prefix = {"all_gather": "allgather", "shard": "shard", "reduce_scatter": "reducescatter"}[op]
    args = (dim, group_size, group_name, mesh_dim_name)
    if isinstance(strided, _StridedShard):
        args = (*args, strided.split_factor)
    return _make_node(graph, op, x, args, f"{prefix}_{label}")


def insert_grad_all_reduce(graph: fx.Graph, x: fx.Node, *, mesh_dim_name: str, group_name: str, label: str) -> fx.Node:
    """Inserts Megatron's f: identity forward, all-reduce of the gradient backward."""
    return _make_node(graph, "grad_all_reduce", x, (group_name, mesh_dim_name), f"gradallreduce_{label}")


def insert_fsdp_all_gather(graph: fx.Graph, param: fx.Node, *, dim: int, mesh_dim_name: str, group_size: int,
                           group_name: str) -> fx.Node:
    """Inserts the gather of an FSDP-sharded parameter (reduce-scatter of its gradient backward)."""
    return _make_node(graph, "fsdp_all_gather", param, (dim, group_size, group_name, mesh_dim_name),
                      f"fsdpgather_{param.name}")


def collective_args(node: fx.Node) -> dict:
    """The named arguments of an fxpar collective node."""
    schema = node.target._schema
    return {a.name: v for a, v in zip(schema.arguments, node.args)}


# --------------------------------------------------------------------------- inference


_GRAD_ONLY = (torch.ops.fxpar.grad_all_reduce.default,)
"""Collectives that are the identity forward: they exist for their backward only."""


def inference_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` to run without autograd: the backward-only markers bypassed.

    `grad_all_reduce` is the identity forward, but a custom op may not return its
    input, so it copies it; without a backward (under `torch.no_grad()`) that copy
    is all it does. The copy's graph uses the marker's input directly; every other
    node, collectives included, is kept, so every rank still issues the same
    collectives in the same order. Parameters and buffers are the same tensor
    objects as `gm`'s (updated in place by optimizers and `load_state_dict`, so
    they stay shared); node and module metadata are shallow copies.

    Use it only where no gradient is needed: its outputs carry no Megatron "f",
    so their gradients would be partial on each rank.
    """
    graph = fx.Graph(owning_module=None, tracer_cls=gm.graph._tracer_cls)
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _GRAD_ONLY:
            env[node] = env[node.args[0]]
            continue
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph._codegen = gm.graph._codegen  # the capture's pytree in/out handling
    out = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    out.meta.update(gm.meta)
    return out
