"""Coalesced FSDP communication: one all-gather and one reduce-scatter per block, not per parameter.

The graph keeps one `fsdp_all_gather` node per parameter (what passes and
checks reason about); `apply_fsdp` tags each with a bucket, the parameters of
one block (`h.3`, `layers.7`) in order of use, as FSDP2 wraps a block. At run
time a ParallelModule registers its buckets here, and the custom op's kernels
(fxpar/ops/collectives.py) hand a registered shard to its bucket:

    forward   the first gather of a bucket gathers all its shards as one flat
              buffer [n, local numel]; each parameter's node takes its full
              tensor out of it (contiguous, its own storage, so it is freed
              after its layer like a per-parameter gather)
    backward  each node's gradient is kept by the bucket and the node gives its
              shard none (`LANDS_IN_GRAD`: no zeros for autograd to fill and add);
              the last gradient of the bucket copies them
              into one flat buffer and reduce-scatters it once and adds each shard's part into
              `.grad`, or makes it `.grad`: a view of the reduce-scatter's output, as
              FSDP2's sharded gradients (a callback at the end of the backward flushes buckets
              some of whose parameters got no gradient)
    re-gather (reshard_after_forward) the first parameter autograd unpacks
              re-gathers the bucket's saved parameters at once; the rest come
              from that until the last one saved is unpacked. The root unit
              (`FSDP_ROOT_UNIT`: the parameters outside any block, apply_fsdp) is
              not re-gathered: autograd keeps its gathered parameters, as
              FSDP2's root (`keep`), and its one reduce-scatter runs when its
              last gradient is in

Overlap (`schedule_overlap` puts an `fsdp_prefetch` issue node for block
i+1 after block i's first gather): `prefetch` issues the bucket's gather and
its first `gather` waits on it. The backward is the dual: once half of
block i's gradients are in, the re-gather of block i-1 (`prev`) is issued
(not at block i's own re-gather: there, at the top of its backward, all of
block i's activations are alive and a second gathered block would raise the
step's peak), and a full bucket's reduce-scatter is issued without waiting; it is waited when
half of the next block's gradients are in, just before that prefetch (so its
input and receive buffers are freed before the gather's is allocated: the step's
peak on the dp section's GPT of 4 blocks, d=512, 4 ranks, went from 102.2 to 91.6
MiB, FSDP2's 104.1; the time of the overlap benchmark's step did not change,
0.999x over 20 pairs), else just before the next one is issued (one in flight,
as FSDP2) or at the end of the backward, and its result added into `.grad` in
issue order, so sums are bit-equal to the waiting path.

Uneven shards (a dim 0 that does not divide by fsdp) take their padded size
ceil(rows / fsdp) in the flat buffer on every rank, so the buffer has one
size on every rank (FSDP2's padded shards); gathering strips the padding,
reduce-scattering pads the gradient and keeps the rank's real rows.

Every rank runs the same graph, so buckets fill and fire in the same order on
every rank of the group. Bytes per step are those of per-parameter gathers;
collectives per step drop from one per parameter to one per block.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor

from fxpar._torch.c10d import (hold_post_accumulate_grad_hooks, queue_autograd_callback,
                               restore_post_accumulate_grad_hooks, run_post_accumulate_grad_hooks)
from fxpar.analysis.fsdp import bucket_groups
from fxpar.core.dataflow import attr_of
from fxpar.core.spec import FSDP_ROOT_UNIT
from fxpar.ops import collectives as C
from fxpar.ops.overlap import start_flat_all_gather, start_reduce_scatter, wait  # registers fxpar::fsdp_prefetch
from fxpar.ops.transitions import collective_args
from fxpar.runtime import fsdp_state
from fxpar.runtime.fsdp_state import count_overlap, register_fsdp_bucket
from fxpar.runtime.grad_sync import take_shard_grad

__all__ = ["FsdpBucket", "register_buckets", "drain", "begin_forward"]


class FsdpBucket:
    """The FSDP-sharded parameters of one block, gathered and reduce-scattered together."""

    def __init__(self, shards: list[Tensor], args: tuple, dtype: torch.dtype | None = None,
                 full_rows: list[int | None] | None = None) -> None:
        self._shards = [weakref.ref(s) for s in shards]
        self.dtype = dtype  # mixed precision: gather in this dtype (the cast shards, half the bytes for bf16)
        self.args = args  # (dim 0, group size, group name, mesh dim), the same for every shard
        n = args[1]
        # each shard's gathered rows (dim 0); an uneven one is padded to ceil(rows / n) in the flat buffer
        self.full_rows = [r if r is not None else s.shape[0] * n for r, s in zip(full_rows or [None] * len(shards),
                                                                                shards)]
        self.shapes = [tuple(s.shape) for s in shards]  # this rank's real rows
        self.padded = [(-(-r // n), *shape[1:]) for r, shape in zip(self.full_rows, self.shapes)]
        self.numels = [int(torch.Size(p).numel()) for p in self.padded]
        self.offsets = [sum(self.numels[:i]) for i in range(len(shards))]
        self.total = sum(self.numels)
        self.even = all(r == n * p[0] for r, p in zip(self.full_rows, self.padded))
        self._full: dict[int, tuple[Tensor, int]] = {}  # forward: gathered, not yet taken (with the shard's version)
        self._regathered: dict[int, Tensor] = {}
        self._regather_versions: tuple = ()
        self._saved = 0  # parameters autograd saved as shards and has not unpacked yet
        self._grads: dict[int, Tensor] | None = None  # this backward's full gradients so far, by index
        self._held_hooks: dict[int, dict] = {}  # post-accumulate-grad hooks held until the shard's gradient lands
        self._pending: tuple | None = None  # an issued gather: (direction, pending tensor, shard versions)
        self.prev: FsdpBucket | None = None  # the bucket before this one in the forward (backward prefetch)
        self.overlap = False  # the graph was scheduled for overlap: prefetch re-gathers, wait reduce-scatters late
        self._prefetch_prev = False  # re-gathered in this backward: prefetch `prev`'s re-gather (see `regather`)
        # the root unit (apply_fsdp, FSDP_ROOT_UNIT): autograd keeps its gathered parameters for the backward
        # (fsdp_state.pack_gathered leaves them), so it is never re-gathered, as FSDP2's root
        self.keep = False

    def shards(self) -> list[Tensor]:
        out = [r() for r in self._shards]
        if any(s is None for s in out):
            raise RuntimeError("an FSDP bucket's parameter was freed while the module is in use")
        return out

    def _versions(self) -> tuple:
        return tuple(s._version for s in self.shards())

    def _issue(self, direction: str) -> None:
        """Issues the bucket's gather (one flat buffer) without waiting for it."""
        _, n, group_name, mesh_dim = self.args
        shards = self.shards()
        pending = start_flat_all_gather([C._pad(s.detach(), 0, p[0]) for s, p in zip(shards, self.padded)], n,
                                        group_name, self.dtype)
        C._record("all_gather", mesh_dim, pending.narrow(0, 0, self.total), direction)
        self._pending = (direction, pending, tuple(s._version for s in shards))

    def _gather_all(self, direction: str) -> list[Tensor]:
        """Every full parameter of the bucket: the issued gather if it is still current, else a new one."""
        pending, self._pending = self._pending, None
        if pending is not None:
            done = wait(pending[1])  # an issued collective always completes, current or not
            if pending[0] != direction or pending[2] != self._versions():
                pending = None
                count_overlap("stale")
            else:
                count_overlap("hit")
        if pending is None:
            self._issue(direction)
            pending, self._pending = self._pending, None
            done = wait(pending[1])
        n = self.args[1]
        gathered = done.view(n, self.total)
        if self.even:  # one copy-out op for the block (FSDP2's split_with_sizes_copy), each its own storage
            full = [gathered.new_empty((n * shape[0], *shape[1:])) for shape in self.padded]
            torch.split_with_sizes_copy(gathered, self.numels, dim=1,
                                        out=[t.view(n, k) for t, k in zip(full, self.numels)])
            return full
        out = [gathered[:, o:o + k].reshape(n * shape[0], *shape[1:]) for o, k, shape in
               zip(self.offsets, self.numels, self.padded)]
        # each its own storage (autograd saves it as its shard, fsdp_state): an uneven one's real rows copied out
        return [t[:rows].clone() if rows != t.shape[0] else t.contiguous() for t, rows in zip(out, self.full_rows)]

    def prefetch(self) -> None:
        """Issues this forward's gather of the bucket (`fsdp_prefetch`); the first `gather` waits on it."""
        self._full = {}  # whatever an unfinished forward left: this forward takes the prefetched gather
        if self._pending is not None:
            wait(self._pending[1])
        self._issue("forward")
        count_overlap("prefetched forward")

    def begin_forward(self) -> None:
        """Forgets what a forward that did not finish left: its gathered parameters not taken and a gather
        in flight (waited: every issued collective completes). Their shards may have changed since without
        a version bump (`.data`)."""
        self._prefetch_prev = False
        if self._full:
            self._full = {}
            count_overlap("stale")
        if self._grads is not None:  # a backward that raised: its partial gradients are not this step's
            self._grads = None
            count_overlap("stale")
        for i, held in self._held_hooks.items():
            restore_post_accumulate_grad_hooks(self._shards[i](), held)
        self._held_hooks = {}
        if self._pending is not None:
            wait(self._pending[1])
            self._pending = None
            count_overlap("stale")

    def _prefetch_regather(self) -> None:
        if self._saved > 0 and not self._regathered and self._pending is None:
            self._issue("backward")
            count_overlap("prefetched backward")

    def gather(self, index: int) -> Tensor:
        """The full parameter `index`, from this forward's one gather of the bucket."""
        shard = self._shards[index]()
        hit = self._full.pop(index, None)
        if hit is not None and shard is not None and hit[1] == shard._version:
            return hit[0]
        # first use in this forward, or left from an unfinished one and updated since: gather the bucket
        versions = [s._version for s in self.shards()]
        if self._pending is not None and self._pending[0] == "backward":
            wait(self._pending[1])  # a re-gather prefetched for a backward that did not come
            self._pending = None
        self._full = {i: (t, v) for i, (t, v) in enumerate(zip(self._gather_all("forward"), versions))}
        return self._full.pop(index)[0]

    def saved(self) -> None:
        self._saved += 1

    def unsaved(self) -> None:
        self._saved -= 1
        if self._saved <= 0:
            self._saved, self._regathered = 0, {}

    def regather(self, index: int) -> Tensor:
        versions = tuple(s._version for s in self.shards())
        if index not in self._regathered or versions != self._regather_versions:
            self._regathered = dict(enumerate(self._gather_all("backward")))
            self._regather_versions = versions
            # the block the backward reaches next is gathered during this one, from when half of this block's
            # gradients are in (`reduce`): at the top of a block's backward its activations are all still alive,
            # and a second block gathered there raised the step's peak by a block (FSDP2 prefetches there)
            self._prefetch_prev = self.overlap and self.prev is not None
        return self._regathered[index]

    def reduce(self, index: int, grad: Tensor) -> str:
        """Takes parameter `index`'s full gradient; its shard's part lands in `.grad` when the bucket's
        reduce-scatter is waited (`_accumulate`), so autograd gets none (`C.LANDS_IN_GRAD`)."""
        if self._grads is None:
            self._grads = {}
            queue_autograd_callback(self._flush_and_drain)
        # Each gradient is kept as it comes and copied into the flat buffer at the flush: a buffer of the whole
        # block allocated at its first gradient held all of it through the block's backward, at the top of the
        # backward, where the activations peak (FSDP2 keeps per-parameter gradients until its copy-in too).
        prev = self._grads.get(index)
        self._grads[index] = grad.detach() if prev is None else prev + grad
        # autograd's AccumulateGrad for the shard, next, runs its post-accumulate-grad hooks with no gradient
        # in: they wait until the reduce-scattered one is (`_accumulate`)
        hold_post_accumulate_grad_hooks(self._shards[index](), self._held_hooks.setdefault(index, {}))
        if self._prefetch_prev and 2 * len(self._grads) >= len(self.numels):
            self._prefetch_prev = False
            _drain_late()  # the reduce-scatter in flight, before the re-gather's buffer is allocated (module docstring)
            self.prev._prefetch_regather()
        if len(self._grads) == len(self.numels):
            self.flush()
        return C.LANDS_IN_GRAD

    def flush(self) -> None:
        """Issues the reduce-scatter of the gradients gathered so far (zeros for the others), after waiting
        for the one issued before it and adding that into its shards' `.grad` (one in flight at a time)."""
        if self._grads is None:
            return
        grads, self._grads = self._grads, None
        self._prefetch_prev = False
        got = set(grads)
        _, n, group_name, mesh_dim = self.args
        _drain_late()  # one in flight at a time, as FSDP2: one block's gradient buffer, not two
        some = next(iter(grads.values()))
        flat = torch.cat([C._pad(grads.pop(i), 0, n * p[0]).reshape(n, k) if i in grads else some.new_zeros(n, k)
                          for i, (p, k) in enumerate(zip(self.padded, self.numels))], dim=1)  # [n, local numel]
        del grads, some
        C._record("reduce_scatter", mesh_dim, flat, "backward")
        _in_flight().append((self, start_reduce_scatter(flat.reshape(-1), n, group_name), got, flat))
        count_overlap("reduce_scatter issued")
        if not self.overlap:
            drain()

    def _flush_and_drain(self) -> None:
        """End of the backward: flush a bucket some of whose parameters got no gradient, wait for all, then
        run the post-accumulate-grad hooks of the shards whose gradients landed."""
        self.flush()
        drain()
        release_hooks()

    def _accumulate(self, local: Tensor, got: set[int]) -> None:
        for i, (shard, o, k) in enumerate(zip(self.shards(), self.offsets, self.numels)):
            if i not in got:
                continue
            held = self._held_hooks.pop(i, None)
            part = local[o:o + k].view(self.padded[i])[:self.shapes[i][0]]
            if take_shard_grad(shard, part):  # HSDP: runtime.grad_sync sums it over dp, then adds it into .grad
                _landed_hooks().append((shard, held, False))  # (and runs its hooks)
                continue
            if shard.grad is not None:
                shard.grad.add_(part)
            else:  # a view of the reduce-scatter's output, as FSDP2's sharded gradients: no copy
                shard.grad = part if part.dtype == shard.dtype else part.to(shard.dtype)
            _landed_hooks().append((shard, held, True))


# Reduce-scatters issued and not yet waited, oldest first: (bucket, pending, got, input buffer kept alive).
# Per thread: the in-process simulator runs each rank's backward on its own thread, and one rank draining
# another's queue added gradients into that rank's `.grad` after it had read them (found by test_property).
_local = threading.local()


def _in_flight() -> list[tuple]:
    queue = getattr(_local, "in_flight", None)
    if queue is None:
        queue = _local.in_flight = []
    return queue


def _landed_hooks() -> list:
    """Shards whose gradients landed in this backward, with the post-accumulate-grad hooks held from their
    AccumulateGrad (`reduce`) and whether to run them here (HSDP: `runtime.grad_sync` runs them after the sum over
    dp). They are put back and run in the end-of-backward callback (`release_hooks`), not as the gradient lands:
    a reduce-scatter drained inside a shard's own backward lands before that shard's AccumulateGrad, which
    would find them back and run them again."""
    hooks = getattr(_local, "landed_hooks", None)
    if hooks is None:
        hooks = _local.landed_hooks = []
    return hooks


def release_hooks(run: bool = True) -> None:
    """Puts back the held post-accumulate-grad hooks of the shards whose gradients landed and runs them (once
    each, with the gradient in `.grad`, as FSDP2 runs them after its reduce-scatter)."""
    hooks, _local.landed_hooks = _landed_hooks(), []
    for shard, held, own in hooks:
        restore_post_accumulate_grad_hooks(shard, held)
        if run and own:
            run_post_accumulate_grad_hooks(shard)


def _finish_oldest() -> None:
    bucket, pending, got, _ = _in_flight().pop(0)
    bucket._accumulate(wait(pending), got)


def _drain_late() -> None:
    """`drain`, for reduce-scatters that had (part of) the next block's backward to complete under."""
    for _ in range(len(_in_flight())):
        count_overlap("reduce_scatter waited late")
    drain()


def drain() -> None:
    """Waits for every reduce-scatter in flight on this thread and adds it into `.grad` (in issue order)."""
    while _in_flight():
        _finish_oldest()


def begin_forward(buckets: list[FsdpBucket]) -> None:
    """A module's forward starts: nothing a forward before it issued or gathered and left is taken by it."""
    fsdp_state.begin_forward()
    release_hooks(run=False)  # left by a backward that raised before its end
    for bucket in buckets:
        bucket.begin_forward()


def _gather_arg(param: "torch.fx.Node", name: str):
    """An argument of a parameter's fsdp_all_gather (param_dtype: apply_mixed_precision's; full_size: an
    uneven shard's gathered rows, -1 when even), or None."""
    for user in param.users:
        if user.target is torch.ops.fxpar.fsdp_all_gather.default:
            return collective_args(user).get(name)
    return None


def _full_rows(param: "torch.fx.Node") -> int | None:
    rows = _gather_arg(param, "full_size")
    return None if rows is None or rows < 0 else rows


def _is_root(param: "torch.fx.Node") -> bool:
    """The parameter is gathered with the root unit (apply_fsdp): kept from the forward to the backward."""
    for user in param.users:
        if user.target is torch.ops.fxpar.fsdp_all_gather.default:
            info = user.meta.get("fxpar")
            return info is not None and info.fsdp_bucket == FSDP_ROOT_UNIT
    return False


def register_buckets(graphs: list) -> list[FsdpBucket]:
    """Registers the block groups of a module's graphs: their fsdp_all_gathers go through them from now on.

    The root unit is registered even with one parameter: the bucket is what keeps it gathered."""
    out = []
    overlap = any(n.target is torch.ops.fxpar.fsdp_prefetch.default for gm in graphs for n in gm.graph.nodes)
    prev = None
    for args, members in bucket_groups(graphs):
        keep = _is_root(members[0][1])
        if len(members) < 2 and not keep:
            continue  # a bucket of one is the plain per-parameter path
        shards = [attr_of(gm, node.target) for gm, node in members]
        bucket = FsdpBucket(shards, args, _gather_arg(members[0][1], "param_dtype"),
                            [_full_rows(node) for _, node in members])
        for i, s in enumerate(shards):
            register_fsdp_bucket(s, bucket, i)
        bucket.keep = keep
        bucket.prev = prev  # the backward prefetches the re-gather of the block before; the root is kept
        prev = prev if keep else bucket
        bucket.overlap = overlap
        out.append(bucket)
    return out

