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
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from fxpar._torch.c10d import queue_autograd_callback, resolve_process_group
from fxpar.ops.collectives import _record

__all__ = ["GradSync", "sync_data_grads"]


class _Bucket:
    def __init__(self, params: list[torch.nn.Parameter], dims: tuple[str, ...]) -> None:
        self.params, self.dims = params, dims
        self.offsets, total = {}, 0
        for p in params:
            self.offsets[p] = (total, p.numel())
            total += p.numel()
        self.numel = total
        self.flat: torch.Tensor | None = None
        self.got: set = set()
        self.before: dict = {}  # param -> its .grad from earlier backwards (accumulation)
        self.work = None


class GradSync:
    """Hooks the marked parameters of one ParallelModule."""

    def __init__(self, params: list[tuple[torch.nn.Parameter, tuple[str, ...], int]], mesh_info) -> None:
        self.mesh = mesh_info
        grouped: dict[tuple[int, tuple[str, ...]], list[torch.nn.Parameter]] = defaultdict(list)
        for p, dims, bucket in params:
            grouped[(bucket, dims)].append(p)
        self.buckets = [_Bucket(ps, dims) for (_, dims), ps in sorted(grouped.items(), key=lambda kv: kv[0])]
        self._queued = False
        self._handles = [p.register_hook(self._make_hook(b, p)) for b in self.buckets for p in b.params]

    def _make_hook(self, bucket: _Bucket, param: torch.nn.Parameter):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if not self._queued:
                self._queued = True
                queue_autograd_callback(self._finish)
            if bucket.flat is None:
                bucket.flat = grad.new_empty(bucket.numel)  # every slot is written before the all-reduce
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
        works = []
        for i, name in enumerate(bucket.dims):
            if i:  # a sum over several groups: one after the other
                works[-1].wait()
            _record("all_reduce", name, bucket.flat, "backward")
            group = resolve_process_group(self.mesh.group_name(self.mesh.index(name)))
            works.append(dist.all_reduce(bucket.flat, group=group, async_op=True))
        bucket.work = works[-1]

    def _finish(self) -> None:
        # Buckets some of whose parameters got no gradient in this backward go now (the same on every
        # rank: every rank runs the same graph).
        for bucket in self.buckets:
            if bucket.got:
                self._launch(bucket)
        for bucket in self.buckets:
            if bucket.work is None:
                continue
            bucket.work.wait()
            for p in bucket.got:
                start, n = bucket.offsets[p]
                reduced = bucket.flat[start:start + n].view_as(p)
                before = bucket.before.get(p)
                # one bucket's views share its buffer, which lives as long as any of them: it holds
                # exactly the bucket's gradients
                p.grad = reduced if before is None else before.add_(reduced)
            bucket.flat, bucket.got, bucket.before, bucket.work = None, set(), {}, None
        self._queued = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def sync_data_grads(data_synced: list, mesh_info) -> None:
    """Sums a pipeline step's gradients over the data-parallel dims, one flat all-reduce per bucket and dim.

    Args:
        data_synced: (parameter, data dim names, bucket index) for each data-replicated parameter.
        mesh_info: the mesh the dim names belong to.
    """
    buckets: dict[tuple[int, tuple[str, ...]], list[torch.nn.Parameter]] = {}
    for p, dims, bucket in data_synced:
        buckets.setdefault((bucket, dims), []).append(p)
    for (_, dims), params in sorted(buckets.items(), key=lambda kv: kv[0]):
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        for name in dims:
            _record("all_reduce", name, flat, "backward")
            dist.all_reduce(flat, group=resolve_process_group(mesh_info.group_name(mesh_info.index(name))))
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
