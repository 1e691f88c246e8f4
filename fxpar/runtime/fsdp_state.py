"""FSDP state at run time: per-block buckets, one gather per pipeline step, gathered-parameter accounting.

`fxpar.ops.collectives.fsdp_all_gather` is a plain collective with no state;
this module installs the runtime that may take its gathers over
(`set_fsdp_runtime`): a shard registered with a block's bucket
(`fxpar.runtime.fsdp_buckets`) is gathered with its block; inside a
`StepGather` (a pipeline step with reshard_after_forward=False) each shard is
gathered once per step; every gathered parameter is tracked (weakly) so that
autograd can save it as its shard and re-gather it in the backward
(`pack_gathered` / `unpack_gathered`, reshard_after_forward=True; the root
unit's are saved as they are, kept as FSDP2 keeps its root) and so that
tests can read the peak bytes of gathered parameters.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch import Tensor

from fxpar._torch.dispatch import is_fake
from fxpar.ops.collectives import LANDS_IN_GRAD, _all_gather, _record, _reduce_scatter, set_fsdp_runtime
from fxpar.ops.overlap import prefetch_shards, wait

__all__ = [
    "StepGather",
    "shard_ptr",
    "register_fsdp_bucket",
    "fsdp_bucket_of",
    "note_gathered",
    "pack_gathered",
    "unpack_gathered",
    "reset_peak_gathered_bytes",
    "peak_gathered_bytes",
    "gathered_param_bytes",
    "overlap_stats",
    "begin_forward",
]


_stats: dict[str, int] = {}


def count_overlap(what: str) -> None:
    _stats[what] = _stats.get(what, 0) + 1


def overlap_stats(reset: bool = False) -> dict[str, int]:
    """How issued collectives were used since the last reset: 'prefetched' gathers issued early
    ('forward' / 'backward'), 'hit' (waited by their use), 'stale' (the shards changed: gathered again)."""
    out = dict(_stats)
    if reset:
        _stats.clear()
    return out


_step_gathers: list["StepGather"] = []


def shard_ptr(shard: Tensor) -> int:
    """A key for a shard that the op's kernel sees too: its data pointer, or (an empty uneven shard, whose
    pointer is 0) minus its id: the kernel receives the parameter object itself."""
    return shard.data_ptr() or -id(shard)


class StepGather:
    """FSDP over a whole pipeline step: each parameter gathered once, its gradient reduce-scattered once.

    A pipeline runs the stage graph once per microbatch, so the graph's
    `fsdp_all_gather` would gather every parameter M times and reduce-scatter
    its gradient M times. Inside `with StepGather() as sg:` the first gather
    of a shard communicates and later ones reuse the full parameter (kept for
    the step: FSDP2's reshard_after_forward=False); backwards add the full
    gradient into one buffer and give the shard none; `sg.reduce_scatter(params)`
    then reduce-scatters each buffer once and adds it into `.grad`.
    """

    def __init__(self) -> None:
        self._full: dict[tuple, Tensor] = {}
        self._grads: dict[tuple, Tensor] = {}
        self._args: dict[tuple, tuple] = {}

    @staticmethod
    def _key(shard: Tensor) -> tuple:
        return (shard_ptr(shard), tuple(shard.shape), shard.dtype)

    def __enter__(self) -> "StepGather":
        _step_gathers.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _step_gathers.remove(self)

    def gather(self, shard: Tensor, args: tuple) -> Tensor:
        key = self._key(shard)
        full = self._full.get(key)
        if full is None:
            dim, n, group_name, mesh_dim, full_size = args
            _record("all_gather", mesh_dim, shard, "forward")
            full = self._full[key] = _all_gather(shard, dim, n, group_name, full_size=full_size)
            self._args[key] = args
            note_gathered(full, shard, args)
        return full.detach()  # a new tensor on the same storage: autograd gives each use its own history

    def accumulate(self, shard_key: int, ctx, grad: Tensor) -> str:
        shape = list(ctx.shard_shape)  # this rank's rows (fewer than grad.shape / n for an uneven shard)
        key = (shard_key, tuple(shape), grad.dtype)
        acc = self._grads.get(key)
        if acc is None:
            self._grads[key] = grad.detach().clone()
        else:
            acc.add_(grad)
        return LANDS_IN_GRAD  # `reduce_scatter` adds it into .grad

    def reduce_scatter(self, params: list[Tensor]) -> None:
        """Reduce-scatters each gathered parameter's summed gradient once, in `params` order (the same on
        every rank of the group), into `.grad`; frees the gathered parameters."""
        for p in params:
            key = self._key(p)
            acc = self._grads.pop(key, None)
            if acc is None:
                continue
            dim, n, group_name, mesh_dim, full_size = self._args[key]
            _record("reduce_scatter", mesh_dim, acc, "backward")
            shard = _reduce_scatter(acc, dim, n, group_name, local_size=None if full_size is None else p.size(dim))
            shard = shard.to(p.dtype)  # reduced in the gradient's dtype (mixed precision: reduce_dtype)
            p.grad = shard if p.grad is None else p.grad.add_(shard)  # (the pipeline runs its hooks after the step)
        self._full.clear()


# Shards whose gathers are coalesced per block (fxpar.runtime.fsdp_buckets): data_ptr -> (weakref(shard), bucket, index).
_fsdp_buckets: dict[int, tuple] = {}


def register_fsdp_bucket(shard: Tensor, bucket: Any, index: int) -> None:
    _fsdp_buckets[shard_ptr(shard)] = (weakref.ref(shard), bucket, index)


def fsdp_bucket_of(shard: Tensor) -> tuple | None:
    """(bucket, index) of a registered FSDP shard, or None."""
    entry = _fsdp_buckets.get(shard_ptr(shard)) if _fsdp_buckets else None
    if entry is None:
        return None
    ref, bucket, index = entry
    if ref() is not shard:  # another tensor at the registered shard's address (a view, a reuse of freed memory)
        return None
    return bucket, index


# Gathered FSDP parameters alive right now, for the runtime's memory accounting and for re-gathering
# in the backward instead of keeping them (reshard_after_forward):
# id(full) -> (weakref(full), shard, (dim, group_size, group_name, mesh_dim, uneven full size or None)).
_gathered: dict[int, tuple] = {}

# Their bytes, kept as they are noted and freed (a sum over `_gathered` at every note was quadratic in the
# parameters per step), and the most since `reset_peak_gathered_bytes`. A lock: the in-process simulator notes
# from one thread per rank.
_live = [0]
_peak = [0]
_lock = threading.Lock()


def note_gathered(full: Tensor, shard: Tensor, args: tuple, *, keep: bool = False) -> None:
    """Tracks a gathered parameter; with keep (the root unit) autograd saves it as it is (`pack_gathered`)."""
    key = id(full)
    old = _gathered.get(key)
    if old is not None and old[0]() is full:  # noted again: its weakref (whose callback un-counts it) stays
        _gathered[key] = (old[0], shard, args, keep)
        return
    nbytes = full.numel() * full.element_size()

    def freed(_, key=key, nbytes=nbytes) -> None:
        _gathered.pop(key, None)
        with _lock:
            _live[0] -= nbytes

    _gathered[key] = (weakref.ref(full, freed), shard, args, keep)
    with _lock:
        _live[0] += nbytes
        _peak[0] = max(_peak[0], _live[0])


class _Regather:
    """What autograd keeps of a gathered FSDP parameter instead of the parameter itself."""

    def __init__(self, shard: Tensor, args: tuple) -> None:
        self.shard, self.args = shard, args
        self.bucket = fsdp_bucket_of(shard)  # re-gathered with its block (fxpar.runtime.fsdp_buckets)
        if self.bucket is not None:
            self.bucket[0].saved()

    def __del__(self) -> None:  # autograd freed the graph without unpacking this
        if self.bucket is not None:
            self.bucket[0].unsaved()

    def __call__(self) -> Tensor:
        dim, n, group_name, mesh_dim, full_size = self.args
        if self.bucket is not None:
            bucket, self.bucket = self.bucket, None
            full = bucket[0].regather(bucket[1])
            bucket[0].unsaved()
            note_gathered(full, self.shard, self.args)
            return full
        _record("all_gather", mesh_dim, self.shard, "backward")
        full = _all_gather(self.shard, dim, n, group_name, full_size=full_size)
        note_gathered(full, self.shard, self.args)
        return full


def pack_gathered(t: Tensor):
    """saved_tensors_hooks pack: a gathered FSDP parameter (or a view of it, e.g. linear's w.t())
    is saved as its shard and re-gathered in the backward."""
    base = t._base if t._base is not None else t
    entry = _gathered.get(id(base))
    if entry is not None and entry[0]() is base and not entry[3]:  # the root unit is kept (FSDP2's root)
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
    return _live[0]


class _FsdpState:
    """The `FsdpRuntime` fxpar's runtime installs: buckets, step gathers and accounting above."""

    def __init__(self) -> None:
        # Per-parameter gathers issued by `fsdp_prefetch` and not yet waited on, per thread (the in-process
        # simulator runs each rank on its own thread): id(shard) -> (weakref(shard), pending, shard version,
        # args, param_dtype, shape). Keyed by the shard object, not its data pointer: another tensor at the
        # same address (a transposed view, a new tensor in a freed shard's memory) is not the shard that was
        # gathered.
        self._local = threading.local()

    def _pending(self) -> dict[int, tuple]:
        pending = getattr(self._local, "pending", None)
        if pending is None:
            pending = self._local.pending = {}
        return pending

    def begin_forward(self) -> None:
        """Drops (after waiting) the prefetches a forward left untaken: one that raised before its waits, or
        a prefetch issued outside a forward. Their shards may have changed without a version bump (`.data`)."""
        pending = self._pending()
        while pending:
            _, entry = pending.popitem()
            wait(entry[1])
            count_overlap("stale")

    def prefetch(self, shards: list[Tensor], args: tuple, param_dtype) -> None:
        """Issues the gather of one FSDP unit (`fxpar.ops.overlap.fsdp_prefetch`); its waits take it."""
        if _step_gathers or not shards or is_fake(shards[0]):  # a pipeline step gathers once per step
            return
        bucket = fsdp_bucket_of(shards[0])
        if bucket is not None:
            bucket[0].prefetch()
            return
        count_overlap("prefetched forward")
        table = self._pending()
        for s, (pending, version) in zip(shards, prefetch_shards(shards, args, param_dtype)):
            old = table.pop(id(s), None)
            if old is not None:  # prefetched twice without a wait between: the first completes unused
                wait(old[1])
                count_overlap("stale")
            table[id(s)] = (weakref.ref(s), pending, version, args, param_dtype, tuple(s.shape))

    def _take_pending(self, shard: Tensor, args: tuple) -> Tensor | None:
        table = self._pending()
        entry = table.pop(id(shard), None) if table else None
        if entry is None:
            return None
        ref, pending, version, pargs, param_dtype, shape = entry
        full = wait(pending)  # waited even when stale: every issued collective completes
        # args: (dim, n, group, mesh_dim, full_size); the prefetch's are the first four, and it is never uneven
        if ref() is not shard or version != shard._version or pargs != tuple(args[:4]) \
                or args[4:5] not in ((), (None,)) or shape != tuple(shard.shape):
            count_overlap("stale")  # another tensor, or the shard changed since the issue: the op gathers it again
            return None
        count_overlap("hit")
        dim, n = args[0], args[1]
        if dim != 0:
            full = torch.cat(full.chunk(n, dim=0), dim=dim)
        # re-gathered in the backward from what was gathered: the shard cast to param_dtype, as fsdp_all_gather
        note_gathered(full, shard if param_dtype is None else shard.to(param_dtype), args)
        return full

    def gather(self, shard: Tensor, args: tuple) -> Tensor | None:
        if _step_gathers:  # a pipeline step that gathers each parameter once (see StepGather)
            return _step_gathers[-1].gather(shard, args)
        full = self._take_pending(shard, args)
        if full is not None:
            return full
        bucket = fsdp_bucket_of(shard)
        if bucket is None:
            return None
        out = bucket[0].gather(bucket[1])  # gathered with the rest of its block (fxpar.runtime.fsdp_buckets)
        note_gathered(out, shard, args, keep=bucket[0].keep)
        return out

    def gathered(self, full: Tensor, shard: Tensor, args: tuple) -> None:
        note_gathered(full, shard, args)

    def saved(self, shard: Tensor) -> Any:
        if is_fake(shard):  # traced by torch.compile: the backward is traced as the op's own reduce-scatter
            return None
        return shard_ptr(shard), (None if _step_gathers else fsdp_bucket_of(shard))

    def backward(self, token: Any, ctx: Any, grad: Tensor) -> Tensor | None:
        shard_key, bucket = token
        if _step_gathers:
            return _step_gathers[-1].accumulate(shard_key, ctx, grad)
        if bucket is not None:
            return bucket[0].reduce(bucket[1], grad)
        return None


_state = _FsdpState()
set_fsdp_runtime(_state)


def begin_forward() -> None:
    """Called by the runtime as a forward starts: per-parameter prefetches left from before are dropped."""
    _state.begin_forward()
