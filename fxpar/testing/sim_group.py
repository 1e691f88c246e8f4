"""The simulator's process group: every rank a thread of this process, collectives computed in memory.

`fxpar.testing.simulate.SimWorld` runs the ranks and detects deadlocks; this module is what each rank's
collectives go through.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
from torch.futures import Future

from fxpar._torch import c10d as torch_c10d
from fxpar._torch.dispatch import TorchDispatchMode, redispatch_cpu

_tls = threading.local()  # the simulated rank (and its world) running in this thread


def current_rank() -> int:
    """The global rank of the simulated rank running in this thread."""
    rank = getattr(_tls, "rank", None)
    if rank is None:
        raise RuntimeError("not inside a simulated rank: call this from a function run by SimWorld.run")
    return rank


def _done(result):
    fut = Future()
    fut.set_result(result)
    return torch_c10d.work_from_future(fut)


_REDUCE_OPS = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.AVG: "avg", dist.ReduceOp.MAX: "max",
               dist.ReduceOp.MIN: "min", dist.ReduceOp.PRODUCT: "product"}


class _Aborted(Exception):
    """Raised in a waiting rank when another rank failed; the driver reports the original failure."""


class SimProcessGroup(dist.ProcessGroup):
    """One simulated process group, shared by all its member threads.

    Only rank and size queries go through it (fxpar's kernels ask the group
    for the caller's index); collectives are caught one level lower, at the
    `_c10d_functional` ops, by the rank thread's dispatch mode.
    """

    def __init__(self, name: str, ranks: Sequence[int]) -> None:
        super().__init__(0, len(ranks))
        self._name = name
        self._ranks = tuple(ranks)

    def rank(self) -> int:  # called from Python (fxpar.ops.collectives._group_rank)
        return self._ranks.index(current_rank())

    def getRank(self) -> int:  # called from C++ through the pybind trampoline
        return self.rank()

    def size(self) -> int:
        return len(self._ranks)

    def getSize(self) -> int:
        return len(self._ranks)

    def getBackendName(self) -> str:
        return "fxsim"

    # The process-group API (dist.all_reduce(t, group=pg), ...) reaches these overrides through the
    # pybind trampoline; they meet the functional collectives in the same per-group sequence.

    def allreduce(self, tensors, opts=None):
        red = getattr(opts.reduceOp, "op", opts.reduceOp) if opts is not None else dist.ReduceOp.SUM
        op = next((name for k, name in _REDUCE_OPS.items() if red == k), None)
        if op is None:
            raise NotImplementedError(f"the simulated process group reduces with {sorted(_REDUCE_OPS.values())}, "
                                      f"not {opts.reduceOp}; run this on real ranks (fxpar.testing.rank_pool)")
        for t in tensors:
            t.copy_(_tls.world._collective(self._name, "all_reduce", t, (op,)))
        return _done(tensors)

    def broadcast(self, tensors, opts=None):
        src = opts.rootRank if opts is not None else 0
        for t in tensors:
            t.copy_(_tls.world._collective(self._name, "broadcast", t, (src,)))
        return _done(tensors)

    def allgather(self, output_lists, inputs, opts=None):
        for outs, t in zip(output_lists, inputs):
            full = _tls.world._collective(self._name, "all_gather_into_tensor", t.unsqueeze(0), ())
            for o, piece in zip(outs, full.unbind(0)):
                o.copy_(piece)
        return _done(output_lists)

    def barrier(self, opts=None):
        _tls.world._collective(self._name, "all_reduce", torch.zeros(1), ("sum",))
        return _done([])

    @property
    def group_name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"SimProcessGroup({self._name!r}, ranks={list(self._ranks)})"


@dataclass
class _Slot:
    """One collective call of a group, filled as its members arrive."""

    n: int
    calls: dict[int, tuple] = field(default_factory=dict)  # member index -> (op, signature, tensor)
    results: list | None = None
    error: str | None = None
    taken: int = 0

    @property
    def complete(self) -> bool:
        return self.results is not None or self.error is not None


@dataclass
class _Group:
    name: str
    dim: str
    ranks: tuple[int, ...]
    next_seq: list[int]
    slots: dict[int, _Slot] = field(default_factory=dict)


def _describe(op: str, sig: tuple) -> str:
    shape, dtype, extra = sig
    more = "".join(f", {e}" for e in extra)
    return f"{op}({list(shape)}, {str(dtype).replace('torch.', '')}{more})"


def _compute(op: str, inputs: list[torch.Tensor], extra: tuple) -> list[torch.Tensor]:
    """The result every member gets, from the tensors all members brought (in group order)."""
    n = len(inputs)
    if op == "all_reduce":
        (reduce_op,) = extra
        stacked = torch.stack(inputs)
        if reduce_op in ("sum", "avg"):
            out = stacked.sum(0)
            if reduce_op == "avg":
                out = out / n
        elif reduce_op in ("max", "min", "product"):
            out = {"max": stacked.amax, "min": stacked.amin, "product": stacked.prod}[reduce_op](0)
        else:
            raise NotImplementedError(f"simulated all_reduce with reduce op {reduce_op!r}")
        return [out.clone() for _ in range(n)]
    if op == "all_gather_into_tensor":
        out = torch.cat(inputs, dim=0)
        return [out.clone() for _ in range(n)]
    if op == "reduce_scatter_tensor":
        reduce_op, _ = extra
        total = torch.stack(inputs).sum(0)
        if reduce_op == "avg":
            total = total / n
        elif reduce_op != "sum":
            raise NotImplementedError(f"simulated reduce_scatter with reduce op {reduce_op!r}")
        return [c.clone() for c in total.chunk(n, dim=0)]
    if op == "all_to_all_single":
        out_splits, in_splits = extra
        pieces = [list(x.split(list(s) if s else [x.size(0) // n] * n, dim=0)) for x, s in zip(inputs, in_splits)]
        return [torch.cat([pieces[src][dst] for src in range(n)], dim=0) for dst in range(n)]
    if op == "broadcast":
        (src,) = extra
        return [inputs[src].clone() for _ in range(n)]
    raise NotImplementedError(f"simulated collective {op!r}")


class _SimMode(TorchDispatchMode):
    """Catches the functional collectives of one rank thread and sends them to its world."""

    def __init__(self, world: "SimWorld") -> None:
        super().__init__()
        self.world = world

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns = func.namespace
        if ns == "_c10d_functional":
            return self.world._functional(func, args, kwargs)
        if ns == "fxpar":
            # The mode is off while this handler runs; fxpar's kernels call functional collectives,
            # so run the kernel with the mode back on.
            with self:
                return redispatch_cpu(func, *args, **kwargs)
        if ns == "c10d":
            raise NotImplementedError(
                f"{func} talks to a process-group object; the simulator only carries functional collectives "
                "(use fxpar.testing.rank_pool for point-to-point and pipeline runs)")
        return func(*args, **kwargs)
