"""Measurement tools shared by every section: interleaved timing, byte counting, tensor memory, statistics.

Timing protocol (inside the rank processes, see `interleave`): every variant
of a comparison lives in the same rank processes; after warm-up, each
iteration runs every variant once, the order rotated by one per iteration so
that each variant takes each position equally often. Each run starts after a
barrier; a rank records its wall time (perf_counter) and its process CPU time
(all threads, so gloo's own threads count). The driver takes, per iteration,
the slowest rank's wall time (the step ends when the last rank ends) and the
sum of CPU seconds over ranks, then compares variants pair by pair within the
same iteration (`pair_stats`), so slow phases of a shared machine hit both
sides of a pair alike. One variant is run twice under two names (A and A') to
measure the noise band of the machine with the same method.

Byte counting (`CommBytesMode`): torch's `CommDebugMode` counts collectives
but not their sizes; the subclass here records, for every collective it sees,
the bytes the rank puts in (the payload: all_reduce's input, all_gather's
local shard, reduce_scatter's full input, a send's tensor), and the bytes it
sends on the wire under ring algorithms (`models.ring_bytes`). fxpar's custom
collective ops are recognised too, so the same counter measures both sides;
fxpar's own `fxpar.count_comms()` is read alongside as a cross-check.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.models import ring_bytes

# CommDebugMode's module tracker hooks every module, including the `_guards_fn` submodule of exported
# graphs (which returns None) and graphs whose inputs need no gradient: torch warns once per such module
# and rank. Nothing is wrong.
warnings.filterwarnings("ignore", message="For backward hooks to be called")
warnings.filterwarnings("ignore", message="Full backward hook is firing")

__all__ = [
    "Variant",
    "Phases",
    "interleave",
    "aggregate",
    "pair_stats",
    "CommBytesMode",
    "CollectiveRecord",
    "summarize_comms",
    "fxpar_comms",
    "tensor_bytes",
    "optimizer_bytes",
    "percentile",
]


# --------------------------------------------------------------------------- interleaved timing


@dataclass
class Variant:
    """One side of a comparison: `run()` is timed; `prepare()` (untimed) runs just before it."""

    name: str
    run: Callable[[], Any]
    prepare: Callable[[], Any] | None = None


def interleave(variants: list[Variant], *, warmup: int, iters: int) -> dict[str, list[tuple[float, float]]]:
    """Runs the variants interleaved on this rank; returns {name: [(wall s, cpu s), ...]} per iteration.

    Every rank must call this with the same variants in the same order (each
    run is collective).
    """
    for _ in range(warmup):
        for v in variants:
            if v.prepare:
                v.prepare()
            v.run()
    out: dict[str, list[tuple[float, float]]] = {v.name: [] for v in variants}
    gc.collect()
    gc.disable()  # a collection inside one timed run and not its pair's would read as a speed difference
    try:
        for i in range(iters):
            k = i % len(variants)
            for v in variants[k:] + variants[:k]:
                if v.prepare:
                    v.prepare()
                dist.barrier()
                c0, t0 = time.process_time(), time.perf_counter()
                v.run()
                t1, c1 = time.perf_counter(), time.process_time()
                out[v.name].append((t1 - t0, c1 - c0))
            gc.collect(1)  # young generations only: a full collection costs ~0.5 s with torch loaded
    finally:
        gc.enable()
    return out


def aggregate(per_rank: list[dict[str, list[tuple[float, float]]]]) -> dict[str, dict[str, list[float]]]:
    """Per iteration: wall = the slowest rank's, cpu = the sum over ranks."""
    out = {}
    for name in per_rank[0]:
        n = len(per_rank[0][name])
        out[name] = {
            "wall": [max(r[name][i][0] for r in per_rank) for i in range(n)],
            "cpu": [sum(r[name][i][1] for r in per_rank) for i in range(n)],
        }
    return out


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100])."""
    s = sorted(xs)
    if not s:
        return math.nan
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def pair_stats(times: dict[str, dict[str, list[float]]], a: str, b: str) -> dict[str, float]:
    """Median times of a and b, and the median and 10-90 % band of the per-iteration ratios a / b."""
    out: dict[str, float] = {}
    for kind in ("wall", "cpu"):
        xa, xb = times[a][kind], times[b][kind]
        ratios = [x / y for x, y in zip(xa, xb) if y > 0]
        out[f"{kind}_a"] = statistics.median(xa)
        out[f"{kind}_b"] = statistics.median(xb)
        out[f"{kind}_ratio"] = statistics.median(ratios) if ratios else math.nan
        out[f"{kind}_p10"] = percentile(ratios, 10)
        out[f"{kind}_p90"] = percentile(ratios, 90)
    out["n"] = len(times[a]["wall"])
    return out


class Phases:
    """Wall seconds of a section's phases on this rank (`mark(name)` closes the phase named)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._t
        self._t = now


# --------------------------------------------------------------------------- communication bytes


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective as a rank issued it."""

    op: str  # all_reduce, all_gather, reduce_scatter, all_to_all, broadcast, scatter, send, recv
    payload: int  # bytes this rank put in (see the module docstring)
    sent: float  # bytes this rank sends with ring algorithms
    group_size: int
    direction: str  # forward or backward


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(y) for y in x)
    return 0


def _group_size(group: Any) -> int:
    try:
        if isinstance(group, str):
            return dist.distributed_c10d._resolve_process_group(group).size()
        return int(group.size())
    except Exception:  # noqa: BLE001 - an unknown group form: assume the world
        return dist.get_world_size()


_c10d = torch.ops.c10d
_funcol = torch.ops._c10d_functional

# (op name, index of the payload argument, index of the group argument)
_FUNCOL = {
    _funcol.all_reduce: ("all_reduce", 0, 2),
    _funcol.all_reduce_: ("all_reduce", 0, 2),
    _funcol.all_reduce_coalesced: ("all_reduce", 0, 2),
    _funcol.all_gather_into_tensor: ("all_gather", 0, 2),
    _funcol.all_gather_into_tensor_coalesced: ("all_gather", 0, 2),
    _funcol.reduce_scatter_tensor: ("reduce_scatter", 0, 3),
    _funcol.reduce_scatter_tensor_coalesced: ("reduce_scatter", 0, 3),
    _funcol.all_to_all_single: ("all_to_all", 0, 3),
    _funcol.broadcast: ("broadcast", 0, 2),
}
_C10D = {
    _c10d.allreduce_: ("all_reduce", 0, 1),
    _c10d.allreduce_coalesced_: ("all_reduce", 0, 1),
    _c10d._allgather_base_: ("all_gather", 1, 2),
    _c10d.allgather_: ("all_gather", 1, 2),
    _c10d.allgather_into_tensor_coalesced_: ("all_gather", 1, 2),
    _c10d.allgather_coalesced_: ("all_gather", 1, 2),
    _c10d._reduce_scatter_base_: ("reduce_scatter", 1, 2),
    _c10d.reduce_scatter_: ("reduce_scatter", 1, 2),
    _c10d.reduce_scatter_tensor_coalesced_: ("reduce_scatter", 1, 2),
    _c10d.alltoall_base_: ("all_to_all", 1, 2),
    _c10d.alltoall_: ("all_to_all", 1, 2),
    _c10d.broadcast_: ("broadcast", 0, 1),
    _c10d.scatter_: ("scatter", 1, 2),
    _c10d.gather_: ("gather", 1, 2),
    _c10d.reduce_: ("reduce", 0, 1),
    _c10d.send: ("send", 0, 1),
    _c10d.recv_: ("recv", 0, 1),
}


def _fxpar_ops() -> dict:
    """fxpar's collective custom ops (forward side): op -> (name, payload arg, group-size arg or None)."""
    try:
        from fxpar.ops.collectives import COLLECTIVE_OPS
    except ImportError:
        return {}
    table = {}
    for op, name in COLLECTIVE_OPS.items():
        if name in ("shard", "grad_all_reduce"):
            continue  # no forward communication; their backward runs torch collectives, seen directly
        kind = {"fsdp_all_gather": "all_gather"}.get(name, name)
        table[op._overloadpacket] = kind
    return table


class CommBytesMode(CommDebugMode):
    """torch's CommDebugMode, also recording each collective's bytes (`self.records`).

    Collectives issued in a backward pass (inside the autograd engine) are
    marked 'backward'. Use like CommDebugMode: `with CommBytesMode() as m: ...`.

    Args:
        track_modules: enter CommDebugMode's module tracker (per-module counts).
            Off around `fxpar.parallelize`: the tracker's hooks put an
            `aten.view_as` at every module boundary of a graph torch.export
            captures under it, and fxpar's automatic plan then shards nothing.
    """

    def __init__(self, *, track_modules: bool = True) -> None:
        super().__init__()
        self.records: list[CollectiveRecord] = []
        self._fxpar = _fxpar_ops()
        self._track_modules = track_modules

    def __enter__(self):
        if self._track_modules:
            return super().__enter__()
        self.comm_counts.clear()
        TorchDispatchMode.__enter__(self)
        return self

    def __exit__(self, *args):
        if self._track_modules:
            return super().__exit__(*args)
        return TorchDispatchMode.__exit__(self, *args)

    def _note(self, op: str, payload: int, n: int) -> None:
        direction = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
        sent = 0.0 if op == "recv" else ring_bytes(op, payload, n)
        self.records.append(CollectiveRecord(op, payload, sent, n, direction))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if isinstance(func, torch._ops.HigherOrderOperator) and not self._track_modules:
            return func(*args, **(kwargs or {}))
        if not isinstance(func, torch._ops.HigherOrderOperator) and not any(t == DTensor for t in types):
            packet = func._overloadpacket
            spec = _FUNCOL.get(packet) or _C10D.get(packet)
            if spec is not None:
                op, arg, garg = spec
                n = _group_size(args[garg]) if len(args) > garg else dist.get_world_size()
                self._note(op, _nbytes(args[arg]), n)
            elif packet in self._fxpar:
                # fxpar::all_gather(x, dim, group_size, group_name, mesh_dim, ...), all_reduce(x, group_name, ...)
                op = self._fxpar[packet]
                n = args[2] if op in ("all_gather", "reduce_scatter") else (
                    args[3] if op == "all_to_all" else _group_size(args[1]))
                self._note(op, _nbytes(args[0]), int(n))
        if self._track_modules:
            return super().__torch_dispatch__(func, types, args, kwargs)
        if any(t == DTensor for t in types):
            return NotImplemented  # let DTensor lower itself to plain collectives, which come back here
        return func(*args, **(kwargs or {}))


def summarize_comms(records: Iterable[Any]) -> dict[str, Any]:
    """Totals of a list of CollectiveRecord: count, payload and sent bytes, by direction and op."""
    records = list(records)
    out: dict[str, Any] = {"count": 0, "payload": 0, "sent": 0.0, "by_op": {}}
    for r in records:
        if r.op == "recv":
            continue
        out["count"] += 1
        out["payload"] += r.payload
        out["sent"] += r.sent
        key = f"{r.direction} {r.op}"
        d = out["by_op"].setdefault(key, {"count": 0, "payload": 0, "sent": 0.0})
        d["count"] += 1
        d["payload"] += r.payload
        d["sent"] += r.sent
    return out


def fxpar_comms(records: Iterable[Any], n: int) -> list[CollectiveRecord]:
    """fxpar's own counter's records (fxpar.count_comms) as CollectiveRecord, all on groups of n ranks."""
    return [CollectiveRecord(r.op, r.nbytes, ring_bytes(r.op, r.nbytes, n), n, r.direction) for r in records]


# --------------------------------------------------------------------------- memory from the tensors


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct tensors given (DTensors counted by their local shard; tied tensors once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = _local(t)
        key = id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of an optimizer's state tensors (Adam: exp_avg and exp_avg_sq; the step counters)."""
    return tensor_bytes(v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor))


class StepLiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive during a step above its start, sampled after every op.

    Tracked: every tensor an op returns inside the block, and tensors alive at the start whose storage is
    empty (FSDP2's unsharded parameters, whose storage it resizes to full and back to 0 without an op).
    Storages are counted once however many views share them. A mode does not see inside the custom ops
    that handle it, so `inside()` names tensors they hold (fxpar's FSDP buckets: gathers in flight,
    gathered blocks, reduce-scatter buffers).
    """

    def __init__(self, inside=None) -> None:
        super().__init__()
        self.inside = inside or (lambda: [])

    def __enter__(self):
        import gc

        self.refs = [weakref.ref(o) for o in gc.get_objects()
                     if isinstance(o, torch.Tensor) and o.untyped_storage().nbytes() == 0]
        self.peak = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.refs.append(weakref.ref(t))
        seen, alive = {}, []
        for t in self.inside():
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        for r in self.refs:
            t = r()
            if t is not None:
                alive.append(r)
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
        self.refs = alive
        self.peak = max(self.peak, sum(seen.values()))
        return out


def fsdp_bucket_tensors(pm):
    """What fxpar's FSDP runtime holds inside its ops (see `StepLiveBytes`)."""
    from fxpar.runtime import fsdp_buckets

    def inside():
        out = []
        for b in pm._fsdp_buckets:
            out += [b._pending[1]] if b._pending else []
            out += [t for t, _ in b._full.values()] + list(b._regathered.values())
            out += list(b._grads.values()) if b._grads else []
        for _, pending, _, grads in fsdp_buckets._in_flight():
            out += [pending, grads]
        return out
    return inside
