"""Explicit collectives as graph nodes, each with its gradient dual.

This is the only module that creates communication. Every collective is a
`torch.library.custom_op` in the `fxpar` namespace whose implementation calls
torch's functional collectives (`_c10d_functional.*` followed by
`wait_tensor`) on the process group named in its arguments, and whose
registered autograd formula is the dual from DESIGN.md:

    forward (mesh dim m)      op                      backward
    Partial   -> Replicate    all_reduce              identity
    Partial(max) -> Replicate all_reduce_max          none (a detached statistic: a softmax's shift)
    Shard(d)  -> Replicate    all_gather(d)           local slice
    Replicate -> Shard(d)     shard (local slice)     all_gather(d)
    Partial   -> Shard(d)     reduce_scatter(d)       all_gather(d)
    Shard(a)  -> Shard(b)     all_to_all(a -> b)      all_to_all(b -> a)
    Replicate, consumed by    grad_all_reduce         all_reduce
      a non-Replicate op      (identity)
    Shard(d) -> Replicate     sp_all_gather (all_gather reduce_scatter(d)
      for a sharded consumer   and f fused: Megatron-SP's g)
    FSDP parameter Shard(0)   fsdp_all_gather         reduce_scatter
      -> Replicate, used on   (all_gather then the
      batch-sharded data      f above, fused)

Under `compile=True` the tp ops are lowered to torch's functional collectives, issue and wait as
separate nodes, with the same duals (`fxpar.ops.traceable`), so inductor can schedule them.

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
from typing import Any, Iterator, Protocol

import torch
from torch import Tensor

from fxpar._torch.c10d import functional, resolve_process_group
from fxpar.ops import waiting
from fxpar.core.errors import ShardingError
from fxpar.core.spec import chunk, pad_to as _pad

__all__ = [
    "COLLECTIVE_OPS",
    "CommRecord",
    "count_comms",
    "record_comm",
]

_c10d = functional  # torch's functional collectives; importing them marks wait_tensor side-effecting


# --------------------------------------------------------------------------- instrumentation


@dataclasses.dataclass(frozen=True)
class CommRecord:
    """One collective as it ran: op name, mesh dim, bytes each rank sent in (and their dtype)."""

    op: str
    mesh_dim: str
    nbytes: int
    direction: str  # 'forward' or 'backward'
    dtype: torch.dtype | None = None  # what went on the wire (mixed precision: param_dtype / reduce_dtype)


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
        rec = CommRecord(op, mesh_dim, t.numel() * t.element_size(), direction, t.dtype)
        for records in _counters:
            records.append(rec)


def record_comm(op: str, mesh_dim: str, t: Tensor, direction: str) -> None:
    """Records a collective run outside this module's ops (the MoE token exchange, `fxpar.ops.moe`)."""
    _record(op, mesh_dim, t, direction)


# --------------------------------------------------------------------------- eager kernels


def _group_rank(group_name: str) -> int:
    group = resolve_process_group(group_name)
    return group.rank()


def _all_reduce(x: Tensor, group_name: str) -> Tensor:
    return waiting.all_reduce(x, "sum", group_name)


def _all_gather(x: Tensor, dim: int, n: int, group_name: str, split_factor: int = 1,
                full_size: int | None = None) -> Tensor:
    """Shards along `dim` -> the full tensor. `full_size`: an uneven shard (`fxpar.core.spec.chunk_bounds`):
    each rank's chunk is padded to ceil(full_size / n) for the gather and the padding stripped after."""
    if full_size is not None and split_factor == 1:
        padded = -(-full_size // n)
        if padded * n != full_size or x.size(dim) != padded:
            out = _all_gather(_pad(x, dim, padded), dim, n, group_name)
            return out.narrow(dim, 0, full_size).clone()  # its own storage: saved / freed as a whole (fsdp_state)
    out = waiting.all_gather(x, n, group_name)
    if dim != 0:
        out = torch.cat(out.chunk(n, dim=0), dim=dim)
    if split_factor > 1:
        # gathered as rank-major [r0s0, r0s1, .., r1s0, ..]; the full tensor is section-major
        k = split_factor
        pieces = out.chunk(n * k, dim=dim)
        out = torch.cat([pieces[r * k + s] for s in range(k) for r in range(n)], dim=dim)
    return out


def _local_chunk(x: Tensor, dim: int, n: int, group_name: str, what: str, split_factor: int = 1,
                 uneven: bool = False) -> Tensor:
    if uneven and split_factor == 1:  # this rank's torch.chunk rows (fxpar.core.spec.chunk_bounds), maybe none
        return chunk(x, n, dim, _group_rank(group_name)).clone(memory_format=torch.contiguous_format)
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


def check_divides(x: Tensor, dim: int, n: int, op: str) -> None:
    """Raises ShardingError unless dim `dim` of `x` divides by the group size `n` (checked at run time)."""
    if x.size(dim) % n:
        raise ShardingError(f"{op}: dim {dim} of size {x.size(dim)} does not divide by the mesh dim size {n} "
                            "at run time")


RS_CHUNK_BYTES = 4 * 1024 * 1024
"""Reduce-scatters of CPU tensors larger than this go in chunks of about this size (`_reduce_scatter`)."""


def _reduce_scatter(x: Tensor, dim: int, n: int, group_name: str, local_size: int | None = None) -> Tensor:
    """Sum over the group, this rank's chunk along `dim`. `local_size`: this rank's rows of an uneven shard
    (`fxpar.core.spec.chunk_bounds`): `x` is padded to n x ceil(size / n) and the padding dropped after."""
    if local_size is not None and (x.size(dim) % n or local_size != x.size(dim) // n):
        padded = -(-x.size(dim) // n)
        out = _reduce_scatter(_pad(x, dim, padded * n), dim, n, group_name)
        return out.narrow(dim, 0, local_size)
    check_divides(x, dim, n, "reduce_scatter")
    if dim != 0:
        x = torch.cat(x.chunk(n, dim=dim), dim=0)
    x = x.contiguous()
    rows = x.size(0) // n
    pieces = -(-x.numel() * x.element_size() // RS_CHUNK_BYTES) if x.device.type == "cpu" else 1
    if pieces <= 1 or rows < 2:
        return waiting.reduce_scatter(x, n, group_name)
    # gloo (the CPU backend) reduce-scatters through a full-size temporary (fxpar's all-to-all receives
    # into one, waiting.start_reduce_scatter): a large gradient (a tied embedding's, gathered over fsdp)
    # goes in row chunks, each rank's rows j0:j1 at once, so the temporary is one chunk. Every element is
    # summed over the same ranks as in one call.
    step = -(-rows // pieces)
    grouped = x.view(n, rows, *x.shape[1:])
    out = x.new_empty(rows, *x.shape[1:])
    for j in range(0, rows, step):
        piece = grouped[:, j:j + step].reshape(-1, *x.shape[1:])
        out[j:j + step].copy_(waiting.reduce_scatter(piece, n, group_name))
    return out


def _all_to_all(x: Tensor, src_dim: int, dst_dim: int, n: int, group_name: str) -> Tensor:
    # Split the local tensor along dst_dim, exchange, and concatenate the received pieces along src_dim.
    pieces = torch.cat([c.contiguous() for c in x.chunk(n, dim=dst_dim)], dim=0)
    splits = [pieces.size(0) // n] * n
    out = waiting.all_to_all_single(pieces, splits, splits, group_name)
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


@torch.library.custom_op("fxpar::all_reduce_max", mutates_args=())
def all_reduce_max(x: Tensor, group_name: str, mesh_dim: str) -> Tensor:
    """Partial(max) -> Replicate: the elementwise max over the group. Not differentiable: it computes
    the shift of a vocab-parallel log-softmax, whose value the result does not depend on."""
    _record("all_reduce", mesh_dim, x, "forward")
    return waiting.all_reduce(x, "max", group_name)


all_reduce_max.register_fake(lambda x, group_name, mesh_dim: torch.empty_like(x))
# the shift carries no gradient (its input is detached in the graph)
all_reduce_max.register_autograd(lambda ctx, grad: (None, None, None))


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
def all_gather(x: Tensor, dim: int, group_size: int, group_name: str, mesh_dim: str, split_factor: int = 1,
               full_size: int = -1) -> Tensor:
    """Shard(dim) -> Replicate (section-wise for a strided shard). Backward: this rank's slice.

    `full_size` >= 0: an uneven shard (torch.chunk's rows, `fxpar.core.spec.chunk_bounds`) of a dim of
    that size: padded for the collective, the padding stripped after."""
    _record("all_gather", mesh_dim, _pad(x, dim, -(-full_size // group_size)) if full_size >= 0 else x, "forward")
    return _all_gather(x, dim, group_size, group_name, split_factor, full_size=None if full_size < 0 else full_size)


@all_gather.register_fake
def _(x, dim, group_size, group_name, mesh_dim, split_factor=1, full_size=-1):
    shape = list(x.shape)
    shape[dim] = full_size if full_size >= 0 else shape[dim] * group_size
    return x.new_empty(shape)


def _save_shard_args(ctx, inputs, output):
    ctx.dim, ctx.group_size, ctx.group_name, ctx.mesh_dim = inputs[1:5]
    ctx.split_factor = inputs[5] if len(inputs) > 5 else 1
    ctx.uneven = len(inputs) > 6 and inputs[6] >= 0
    ctx.full_size = inputs[6] if ctx.uneven else None


def _all_gather_bwd(ctx, grad):
    local = _local_chunk(grad, ctx.dim, ctx.group_size, ctx.group_name, "all_gather backward", ctx.split_factor,
                         uneven=ctx.uneven)
    return local, None, None, None, None, None, None


all_gather.register_autograd(_all_gather_bwd, setup_context=_save_shard_args)


@torch.library.custom_op("fxpar::sp_all_gather", mutates_args=())
def sp_all_gather(x: Tensor, dim: int, group_size: int, group_name: str, mesh_dim: str) -> Tensor:
    """Shard(dim) -> Replicate for a sharded consumer (a column-parallel matmul on sequence shards):
    its gradient is partial, so the backward reduce-scatters it (half all_reduce-then-slice's bytes)."""
    _record("all_gather", mesh_dim, x, "forward")
    return _all_gather(x, dim, group_size, group_name)


@sp_all_gather.register_fake
def _(x, dim, group_size, group_name, mesh_dim):
    shape = list(x.shape)
    shape[dim] = shape[dim] * group_size
    return x.new_empty(shape)


def _sp_all_gather_bwd(ctx, grad):
    _record("reduce_scatter", ctx.mesh_dim, grad, "backward")
    return _reduce_scatter(grad, ctx.dim, ctx.group_size, ctx.group_name), None, None, None, None


sp_all_gather.register_autograd(_sp_all_gather_bwd, setup_context=_save_shard_args)


@torch.library.custom_op("fxpar::shard", mutates_args=())
def shard(x: Tensor, dim: int, group_size: int, group_name: str, mesh_dim: str, split_factor: int = 1,
          full_size: int = -1) -> Tensor:
    """Replicate -> Shard(dim): keep this rank's chunk (torch.chunk's rows if `full_size` >= 0: uneven), no
    communication. Backward: all_gather (padded if uneven)."""
    return _local_chunk(x, dim, group_size, group_name, f"shard along mesh dim '{mesh_dim}'", split_factor,
                        uneven=full_size >= 0)


@shard.register_fake
def _(x, dim, group_size, group_name, mesh_dim, split_factor=1, full_size=-1):
    shape = list(x.shape)
    shape[dim] = -(-shape[dim] // group_size)  # an uneven chunk's spec is its padded size
    return x.new_empty(shape)


def _shard_bwd(ctx, grad):
    full = ctx.full_size if ctx.uneven else None
    _record("all_gather", ctx.mesh_dim, grad, "backward")
    out = _all_gather(grad, ctx.dim, ctx.group_size, ctx.group_name, ctx.split_factor, full_size=full)
    return out, None, None, None, None, None, None


shard.register_autograd(_shard_bwd, setup_context=_save_shard_args)


@torch.library.custom_op("fxpar::reduce_scatter", mutates_args=())
def reduce_scatter(x: Tensor, dim: int, group_size: int, group_name: str, mesh_dim: str) -> Tensor:
    """Partial -> Shard(dim). Backward: all_gather(dim)."""
    _record("reduce_scatter", mesh_dim, x, "forward")
    return _reduce_scatter(x, dim, group_size, group_name)


@reduce_scatter.register_fake
def _reduce_scatter_fake(x, dim, group_size, group_name, mesh_dim):
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
def fsdp_all_gather(x: Tensor, dim: int, group_size: int, group_name: str, mesh_dim: str,
                    param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None,
                    full_size: int = -1) -> Tensor:
    """A parameter's FSDP shard -> the full parameter. Backward: reduce_scatter of its gradient.

    The fused form of all_gather followed by grad_all_reduce: the gathered parameter is used on
    batch-sharded activations, so its gradient is partial on every rank; summing and keeping this
    rank's slice is one reduce_scatter. The runtime may take a gather over (one collective per
    block, one gather per pipeline step): see `FsdpRuntime`.

    Mixed precision (FSDP2's MixedPrecisionPolicy, set by `apply_mixed_precision`): with
    `param_dtype` the shard is cast before the gather (half the bytes for bfloat16) and the full
    parameter comes out in it; with `reduce_dtype` the gradient is cast to it before the
    reduce_scatter; the shard's gradient comes back in the shard's own dtype (float32 master weights).

    Uneven shards (`full_size` >= 0, the gathered size of `dim`, which does not divide by the group):
    each rank holds its `chunk_bounds` rows, padded to ceil(full_size / group_size) for the gather, the
    padding stripped after; the backward pads the gradient and keeps this rank's real rows, as FSDP2.
    """
    args = (dim, group_size, group_name, mesh_dim, None if full_size < 0 else full_size)
    runtime = _fsdp_runtime[0] if _fsdp_runtime else None
    out = runtime.gather(x, args) if runtime is not None else None
    if out is None:
        src = x if param_dtype is None else x.to(param_dtype)
        _record("all_gather", mesh_dim, _pad(src, dim, -(-full_size // group_size)) if full_size >= 0 else src,
                "forward")
        out = _all_gather(src, dim, group_size, group_name, full_size=args[4])
        if runtime is not None:
            runtime.gathered(out, src, args)  # re-gathered from the cast shard (reshard_after_forward)
    return out if param_dtype is None else out.to(param_dtype)


@fsdp_all_gather.register_fake
def _(x, dim, group_size, group_name, mesh_dim, param_dtype=None, reduce_dtype=None, full_size=-1):
    shape = list(x.shape)
    shape[dim] = full_size if full_size >= 0 else shape[dim] * group_size
    return x.new_empty(shape, dtype=param_dtype or x.dtype)


def _save_fsdp_args(ctx, inputs, output):
    ctx.dim, ctx.group_size, ctx.group_name, ctx.mesh_dim = inputs[1:5]
    ctx.reduce_dtype = inputs[6] if len(inputs) > 6 else None
    ctx.uneven = len(inputs) > 7 and inputs[7] >= 0
    ctx.shard_shape = tuple(inputs[0].shape)
    ctx.shard_dtype = inputs[0].dtype
    runtime = _fsdp_runtime[0] if _fsdp_runtime else None
    ctx.fsdp = runtime.saved(inputs[0]) if runtime is not None else None


def _fsdp_all_gather_bwd(ctx, grad):
    if ctx.reduce_dtype is not None:
        grad = grad.to(ctx.reduce_dtype)
    runtime = _fsdp_runtime[0] if _fsdp_runtime else None
    out = runtime.backward(ctx.fsdp, ctx, grad) if runtime is not None and ctx.fsdp is not None else None
    if out is LANDS_IN_GRAD:  # the runtime adds the reduce-scattered shard into `.grad`: autograd adds nothing
        return None, None, None, None, None, None, None, None
    if out is None:
        local = ctx.shard_shape[ctx.dim] if ctx.uneven else None  # this rank's real rows of an uneven shard
        _record("reduce_scatter", ctx.mesh_dim,
                _pad(grad, ctx.dim, -(-grad.size(ctx.dim) // ctx.group_size) * ctx.group_size) if ctx.uneven else grad,
                "backward")
        out = _reduce_scatter(grad, ctx.dim, ctx.group_size, ctx.group_name, local_size=local)
    return out.to(ctx.shard_dtype), None, None, None, None, None, None, None


fsdp_all_gather.register_autograd(_fsdp_all_gather_bwd, setup_context=_save_fsdp_args)


class FsdpRuntime(Protocol):
    """What the runtime may do with an FSDP gather instead of the op's plain collective.

    The op knows no runtime state: `fxpar.runtime.fsdp_state` implements this
    (per-block buckets, one gather per pipeline step, memory accounting) and
    installs itself with `set_fsdp_runtime`.
    """

    def gather(self, shard: Tensor, args: tuple) -> Tensor | None:
        """The full parameter, or None to let the op gather it (args: dim, group size, group, mesh dim,
        the gathered size of an uneven shard or None)."""

    def gathered(self, full: Tensor, shard: Tensor, args: tuple) -> None:
        """Told of every full parameter the op gathered itself."""

    def saved(self, shard: Tensor) -> Any:
        """A token for the backward (None: the op reduce-scatters the gradient itself)."""

    def backward(self, token: Any, ctx: Any, grad: Tensor) -> Any:
        """The shard's gradient; `LANDS_IN_GRAD` when the runtime took `grad` and adds the shard's part into
        `.grad` itself (autograd then adds nothing: no zeros to fill and accumulate); or None to let the op
        reduce-scatter `grad`."""


# `FsdpRuntime.backward`'s answer for a gradient it took: the shard gets no gradient from autograd.
LANDS_IN_GRAD = "fxpar: lands in .grad"


_fsdp_runtime: list[FsdpRuntime] = []


def set_fsdp_runtime(runtime: FsdpRuntime | None) -> None:
    """Installs the runtime that handles FSDP gathers (fxpar.runtime.fsdp_state does, on import)."""
    _fsdp_runtime[:] = [runtime] if runtime is not None else []


COLLECTIVE_OPS = {
    torch.ops.fxpar.all_reduce.default: "all_reduce",
    torch.ops.fxpar.all_reduce_max.default: "all_reduce_max",
    torch.ops.fxpar.all_gather.default: "all_gather",
    torch.ops.fxpar.shard.default: "shard",
    torch.ops.fxpar.reduce_scatter.default: "reduce_scatter",
    torch.ops.fxpar.all_to_all.default: "all_to_all",
    torch.ops.fxpar.grad_all_reduce.default: "grad_all_reduce",
    torch.ops.fxpar.fsdp_all_gather.default: "fsdp_all_gather",
    torch.ops.fxpar.sp_all_gather.default: "sp_all_gather",
}
"""Every fxpar communication op, by the name explain() prints."""

# What each op communicates, forward and backward, for explain() and the static checker.
BACKWARD_OF = {
    "all_reduce": None,
    "all_reduce_max": None,
    "all_gather": None,
    "shard": "all_gather",
    "reduce_scatter": "all_gather",
    "all_to_all": "all_to_all",
    "grad_all_reduce": "all_reduce",
    "fsdp_all_gather": "reduce_scatter",
    "sp_all_gather": "reduce_scatter",
}

for _op in COLLECTIVE_OPS:
    torch.fx.node.has_side_effect(_op)
