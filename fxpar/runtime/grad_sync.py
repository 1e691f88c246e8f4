"""Bucketed, asynchronous gradient all-reduce for data-parallel parameters (the runtime half of
the `bucket_grad_sync` pass).

Each marked parameter gets a gradient hook that sees this backward's gradient
for it (summed over its uses, before accumulation into `.grad`). The hook
copies it into its bucket's flat buffer and sets aside the `.grad` of earlier
backwards, if any, so autograd stores this backward's local gradient there
(stealing the tensor: no zeros, no addition); when a bucket is full it is
all-reduced asynchronously on its data-parallel groups while the backward goes
on. A callback queued on the autograd engine waits for every bucket at the end
of the backward and sets `.grad` to the set-aside gradient plus the sum. So a
backward adds exactly the all-reduced gradient of this backward to `.grad`:
gradient accumulation over several backwards stays exact, as with the
per-parameter `grad_all_reduce` the pass replaced.

HSDP (dp x fsdp): a marked FSDP shard whose block is gathered and
reduce-scattered as one bucket (`fxpar.runtime.fsdp_buckets`) gets no gradient
from autograd; its real gradient is the block's reduce-scatter, which the FSDP
runtime hands here (`take_shard_grad`) when it lands instead of adding it into
`.grad`. That lands during the backward (or in the FSDP runtime's own end-of-
backward callback), so the bucket is all-reduced over dp as soon as its shards
are all in, and `_finish` runs once more at the end of the callbacks, after
the FSDP runtime's. A shard gathered on its own (`fsdp_unit="param"`, a block
of one parameter) gets its reduce-scattered gradient from autograd, as any
parameter.

Mixed precision (HSDP): a bucket sums in its parameters' `GradSyncInfo.dtype`,
the dtype their reduce-scatter over fsdp ran in (FSDP2's reduce_dtype, or
param_dtype without one), and each sum lands in its parameter's dtype: FSDP2's
HSDP reduces in reduce_dtype on both dims and casts once, at the end. A landed
shard's gradient arrives in that dtype already; one from autograd comes in the
parameter's dtype and is cast back (exact for float32 master weights: the
reduce-scatter's result was cast up from it).
"""

from __future__ import annotations

import weakref
from collections import defaultdict

import torch
import torch.distributed as dist

from fxpar._torch.c10d import queue_autograd_callback, resolve_process_group, run_post_accumulate_grad_hooks
from fxpar.ops.collectives import _record
from fxpar.ops.waiting import poll, polled_group
from fxpar.runtime.fsdp_state import fsdp_bucket_of

__all__ = ["GradSync", "sync_data_grads", "take_shard_grad"]

# Marked parameters of live GradSyncs, for the FSDP runtime's reduce-scatters, all weakly (a module
# dropped without `remove` keeps nothing alive): id(param) -> (weakref(param), weakref(GradSync),
# weakref(its _Bucket)).
_marked: dict[int, tuple] = {}


def take_shard_grad(shard: torch.Tensor, grad: torch.Tensor) -> bool:
    """The FSDP runtime's reduce-scatter of `shard`'s gradient landed: True if a GradSync sums it over its
    data-parallel dims first (and adds the sum into `.grad` at the end of the backward), False if the
    caller adds it into `.grad` itself."""
    entry = _marked.get(id(shard)) if _marked else None
    if entry is None or entry[0]() is not shard:
        return False
    sync, bucket = entry[1](), entry[2]()
    if sync is None or bucket is None:
        return False
    sync._land(bucket, shard, grad)
    return True


def wait_work(work: dist.Work, polled: bool) -> None:
    """Waits for a bucket's all-reduce: polled on a gloo group (`fxpar.ops.waiting`), else c10d's wait."""
    if polled:
        poll(work)
    else:
        work.wait()


class _Bucket:
    def __init__(self, params: list[torch.nn.Parameter], dims: tuple[str, ...],
                 dtype: torch.dtype | None = None) -> None:
        self.params, self.dims = params, dims
        self.dtype = dtype  # the all-reduce's dtype (mixed precision: reduce_dtype), None: the parameters'
        self.offsets, total = {}, 0
        for p in params:
            self.offsets[p] = (total, p.numel())
            total += p.numel()
        self.numel = total
        self.flat: torch.Tensor | None = None
        self.got: set = set()
        self.before: dict = {}  # param -> its .grad from earlier backwards (accumulation)
        self.landed: set = set()  # params whose gradient the FSDP runtime handed over (`take_shard_grad`)
        self.late: list = []  # (param, gradient) landed after the bucket was issued: summed at the end
        self.work = None


class GradSync:
    """Hooks the marked parameters of one ParallelModule."""

    def __init__(self, params: list[tuple], mesh_info) -> None:
        """`params`: (parameter, data dim names, bucket index[, the all-reduce's dtype or None]) each."""
        self.mesh = mesh_info
        grouped: dict[tuple, list[torch.nn.Parameter]] = defaultdict(list)
        for p, dims, bucket, *dtype in params:
            grouped[(bucket, dims, dtype[0] if dtype else None)].append(p)
        self.buckets = [_Bucket(ps, dims, dtype) for (_, dims, dtype), ps in _in_order(grouped)]
        self._queued = False
        self._deferred = False  # `_finish` re-queued behind the FSDP runtime's callbacks in this backward
        self._handles = [p.register_hook(self._make_hook(b, p)) for b in self.buckets for p in b.params]
        for b in self.buckets:
            for p in b.params:
                key = id(p)
                _marked[key] = (weakref.ref(p, lambda _, k=key: _marked.pop(k, None)), weakref.ref(self),
                                weakref.ref(b))

    def _queue_finish(self) -> None:
        if not self._queued:
            self._queued = True
            queue_autograd_callback(self._finish)

    def _land(self, bucket: _Bucket, param: torch.nn.Parameter, grad: torch.Tensor) -> None:
        """An FSDP shard's reduce-scattered gradient (`take_shard_grad`): into its bucket; `.grad` untouched."""
        self._queue_finish()
        if bucket.work is not None:  # a second reduce-scatter of it after its bucket went: summed at the end
            bucket.late.append((param, grad.to(bucket.dtype or param.dtype, copy=True)))
            return
        if bucket.flat is None:  # in the reduce-scatter's dtype (mixed precision): no rounding before the sum
            bucket.flat = grad.new_empty(bucket.numel, dtype=bucket.dtype or param.dtype)
        start, n = bucket.offsets[param]
        slot = bucket.flat[start:start + n]
        if param in bucket.got:
            slot.add_(grad.reshape(-1))
        else:
            slot.copy_(grad.reshape(-1))
            bucket.got.add(param)
        bucket.landed.add(param)
        if len(bucket.got) == len(bucket.params):
            self._launch(bucket)

    def _make_hook(self, bucket: _Bucket, param: torch.nn.Parameter):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if fsdp_bucket_of(param) is not None:
                return None  # a bucketed shard's gradient lands in `_land`, not through autograd
            self._queue_finish()
            if bucket.flat is None:  # every slot is written before the all-reduce
                bucket.flat = grad.new_empty(bucket.numel, dtype=bucket.dtype or grad.dtype)
            start, n = bucket.offsets[param]
            bucket.flat[start:start + n].copy_(grad.reshape(-1))
            bucket.got.add(param)
            if param.grad is not None:
                bucket.before[param], param.grad = param.grad, None
            if len(bucket.got) == len(bucket.params):
                self._launch(bucket)
            return None  # autograd keeps this local gradient in .grad until _finish replaces it

        return hook

    def _launch(self, bucket: _Bucket) -> None:
        if bucket.work is not None or bucket.flat is None:
            return
        for p in bucket.params:  # parameters that got no gradient in this backward contribute zeros
            if p not in bucket.got:
                start, n = bucket.offsets[p]
                bucket.flat[start:start + n].zero_()
        work = None
        for name in bucket.dims:
            if work is not None:  # a sum over several groups: one after the other
                wait_work(*work)
            _record("all_reduce", name, bucket.flat, "backward")
            group_name = self.mesh.group_name(self.mesh.index(name))
            polled = polled_group(group_name, bucket.flat)
            group = polled if polled is not None else resolve_process_group(group_name)
            work = (dist.all_reduce(bucket.flat, group=group, async_op=True), polled is not None)
        bucket.work = work

    def _finish(self) -> None:
        # FSDP shards' gradients land in the FSDP runtime's end-of-backward callbacks, all queued during the
        # backward: run once more after them.
        if not self._deferred and any(fsdp_bucket_of(p) is not None for b in self.buckets for p in b.params):
            self._deferred = True
            queue_autograd_callback(self._finish)
            return
        self._deferred = False
        # Buckets some of whose parameters got no gradient in this backward go now (the same on every
        # rank: every rank runs the same graph).
        for bucket in self.buckets:
            if bucket.got:
                self._launch(bucket)
        for bucket in self.buckets:
            if bucket.work is None:
                continue
            wait_work(*bucket.work)
            for p in bucket.got:
                start, n = bucket.offsets[p]
                reduced = bucket.flat[start:start + n].view_as(p).to(p.dtype)  # mixed precision: cast once, here
                # a landed shard's .grad is its earlier backwards' gradient (autograd gave it none)
                before = p.grad if p in bucket.landed else bucket.before.get(p)
                # one bucket's views share its buffer, which lives as long as any of them: it holds
                # exactly the bucket's gradients
                p.grad = reduced if before is None else before.add_(reduced)
            for p, late in bucket.late:
                for name in bucket.dims:
                    _record("all_reduce", name, late, "backward")
                    dist.all_reduce(late, group=resolve_process_group(self.mesh.group_name(self.mesh.index(name))))
                late = late.to(p.dtype)
                p.grad = late if p.grad is None else p.grad.add_(late)
            for p in bucket.params:  # autograd gave a landed shard no gradient: its hooks run here, as FSDP2's
                if p in bucket.landed:
                    run_post_accumulate_grad_hooks(p)
            bucket.flat, bucket.got, bucket.before, bucket.work = None, set(), {}, None
            bucket.landed, bucket.late = set(), []
        self._queued = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for b in self.buckets:
            for p in b.params:
                entry = _marked.get(id(p))
                if entry is not None and entry[1]() is self:
                    del _marked[id(p)]


def sync_data_grads(data_synced: list, mesh_info) -> None:
    """Sums a pipeline step's gradients over the data-parallel dims, one flat all-reduce per bucket and dim.

    Args:
        data_synced: (parameter, data dim names, bucket index[, the all-reduce's dtype or None: the
            parameter's]) for each data-replicated parameter.
        mesh_info: the mesh the dim names belong to.
    """
    buckets: dict[tuple, list[torch.nn.Parameter]] = defaultdict(list)
    for p, dims, bucket, *dtype in data_synced:
        buckets[(bucket, dims, dtype[0] if dtype else None)].append(p)
    for (_, dims, dtype), params in _in_order(buckets):
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype or p.dtype)
                          for p in params])
        for name in dims:
            _record("all_reduce", name, flat, "backward")
            dist.all_reduce(flat, group=resolve_process_group(mesh_info.group_name(mesh_info.index(name))))
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype, copy=True)
            offset += p.numel()


def _in_order(buckets: dict[tuple, list]) -> list[tuple]:
    """(bucket, dims, dtype) groups in one order on every rank (the same graph on every rank: the same keys)."""
    return sorted(buckets.items(), key=lambda kv: (kv[0][0], kv[0][1], str(kv[0][2])))
