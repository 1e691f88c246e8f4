"""How an eager collective waits on a CPU (gloo) group: optionally, it polls, yielding its core, before it sleeps.

c10d's `Work.wait()` on gloo sleeps on a condition variable until gloo's own
thread marks the collective done. When every rank is waiting, that leaves the
cores idle, and waking a thread on an idle core can take as long as the
collective itself: on this project's 2-core machine a 1 MiB all-reduce between
2 gloo ranks took 1.9-2.5 ms (mean of 40) when the waiting thread slept and
0.85-1.4 ms when it polled `Work.is_completed()` with `sched_yield` between
checks; spinning without yielding was worse than both (3.3 ms: gloo's thread
then runs only when the scheduler preempts the spinner).
`python -m benchmarks.waiting` measured it (it now compares fxpar's gloo swaps,
`ops.exchange`, with gloo's own collectives).

With polling on (`FXPAR_WAIT_SPIN_MS` > 0), fxpar's eager collectives on a
gloo group issue through c10d (`async_op=True`) and wait here: poll for at most
`spin_seconds()`, yielding
the core each time, then the ordinary blocking wait. The bound keeps
oversubscribed ranks (more ranks than cores, as in tests) from burning their
time slices: after it the wait is exactly c10d's. The values are the same bits
either way; only when the waiting thread notices completion changes.

Polling pays only while every rank has a core of its own: a rank that yields
hands its core to whatever else is runnable, which on an oversubscribed host
is another rank or another job, for a whole time slice. So, as MPI libraries
switch to yielding / blocking progress when oversubscribed, fxpar polls only
when the ranks on this host (`LOCAL_WORLD_SIZE`, set by torchrun; else the
world size) are no more than the cores this process may run on, and only
while the host is not busy with other work: each poll first reads the number
of runnable threads (`/proc/loadavg`, about 1 us from an open file) and
blocks at once when it exceeds the cores + 1 (measured with 4 other jobs on
the 2 cores: polling that yielded anyway made a 64 KiB all-reduce 1.5x slower).

Not polled, and kept on torch's functional collectives (issue + `wait_tensor`):
- groups that are not gloo, or tensors not on the CPU: NCCL's waits are stream
  syncs, not sleeps; in-process test groups (`fxpar.testing.simulate`) meet
  ranks in the functional ops;
- reduce-scatter: gloo's `reduce_scatter_tensor` Work never reports completion
  (`is_completed()` stays False after its wait; measured on torch 2.13). fxpar
  runs it on gloo as an all-to-all and a local sum (`start_reduce_scatter`),
  waited blocking.

On a gloo group of 2, the all-gather and the sum all-reduce are one all-to-all
that swaps the ranks' buffers (`ops.exchange`), polled or not as above.

`FXPAR_WAIT_SPIN_MS` sets the bound in milliseconds. It is OFF by default (0:
every collective waits as torch's functional ones do): in the overlap benchmark
(`python -m benchmarks --sections overlap`, GPT of 4 blocks on 2 gloo ranks,
20 interleaved pairs each, idle machine) the polled side against the same
module blocking was 1.029 (tp forward), 0.934 (tp train) and 0.981 (fsdp step)
in wall time, every band inside the A-vs-A noise, for 1.03-1.19x the CPU. The
single-collective gain (0.85-0.93x the mean time of gloo's ring all-reduce from
256 KiB to 4 MiB) does not show through a step's compute on this machine; set
10 to try it where ranks own their cores.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from torch import Tensor

from fxpar._torch.c10d import functional, register_work, resolve_process_group
from fxpar.core import config
from fxpar.ops import exchange

__all__ = ["SPIN_ENV", "spin_seconds", "polled_group", "poll", "all_reduce", "all_gather", "all_to_all_single",
           "start_all_gather", "start_all_reduce", "start_reduce_scatter", "reduce_scatter", "gloo_group",
           "known_gloo", "known_pair_rank", "track", "wait", "gather_rank_in_place"]

_c10d = functional

SPIN_ENV = config.WAIT_SPIN_ENV
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def spin_seconds() -> float:
    """How long a wait polls before it sleeps (`FXPAR_WAIT_SPIN_MS`, read on each call so tests can set it)."""
    return config.wait_spin_ms() / 1e3


_gloo_groups: dict[str, bool] = {}
"""Group name -> polled: a c10d gloo group whose ranks each have a core (`polled_group`)."""
_is_gloo: dict[str, bool] = {}
"""Group name -> whether it is a c10d gloo group (`gloo_group`)."""
_pair_rank: dict[str, int] = {}
"""Group name -> this rank's index in it, for the c10d gloo groups of 2 `gloo_group` has met."""


def gloo_group(group_name: str, t: Tensor) -> dist.ProcessGroup | None:
    """The group, if it is a c10d gloo group and `t` is on the CPU; else None (NCCL, an in-process test group)."""
    if t.device.type != "cpu":
        return None
    gloo = _is_gloo.get(group_name)
    if gloo is None:
        try:
            gloo = dist.get_backend(resolve_process_group(group_name)) == "gloo"
        except (RuntimeError, ValueError):  # a group c10d's world does not know (an in-process test group)
            gloo = False
        _is_gloo[group_name] = gloo
        if gloo and resolve_process_group(group_name).size() == 2:
            _pair_rank[group_name] = resolve_process_group(group_name).rank()
    return resolve_process_group(group_name) if gloo else None


def known_pair_rank(group_name: str) -> int | None:
    """This rank's index in the group if `gloo_group` has found it to be gloo with 2 ranks, else None (a dict
    read: traced code calls it as a constant)."""
    return _pair_rank.get(group_name)


def known_gloo(group_name: str) -> bool:
    """Whether `gloo_group` has found the group to be gloo (a dict read: traced code calls it as a constant)."""
    return _is_gloo.get(group_name, False)


def polled_group(group_name: str, t: Tensor) -> dist.ProcessGroup | None:
    """The group to issue on through c10d and poll, or None for torch's functional collectives."""
    if spin_seconds() <= 0:
        return None
    pg = gloo_group(group_name, t)
    if pg is None:
        return None
    if group_name not in _gloo_groups:
        _gloo_groups[group_name] = _own_cores()
    return pg if _gloo_groups[group_name] else None


def _own_cores() -> bool:
    """Whether each rank on this host has a core: local ranks <= the cores this process may use."""
    local = config.local_world_size() or dist.get_world_size()
    return local <= len(os.sched_getaffinity(0))


_loadavg: list[int] = []  # an open /proc/loadavg, or -1 where there is none


def _host_has_a_free_core() -> bool:
    """Whether the host's runnable threads (this one included) are at most its cores + 1, now."""
    if not _loadavg:
        try:
            _loadavg.append(os.open("/proc/loadavg", os.O_RDONLY))
        except OSError:
            _loadavg.append(-1)
    if _loadavg[0] < 0:
        return True
    try:  # "0.52 0.40 0.33 3/190 14764": the 4th field is running / total
        running = int(os.pread(_loadavg[0], 64, 0).split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return True
    return running <= (os.cpu_count() or 1) + 1


def poll(work: dist.Work) -> None:
    """Waits for `work`: polls its completion, yielding the core, for at most `spin_seconds()`, then blocks.
    An error or a timeout is c10d's own: `work.wait()` raises it (it names the collective and the group)."""
    if not work.is_completed() and _host_has_a_free_core():
        deadline = time.perf_counter() + spin_seconds()
        while not work.is_completed() and time.perf_counter() < deadline:
            os.sched_yield()
    work.wait()


# --------------------------------------------------------------------------- collectives waited at once


def all_reduce(x: Tensor, op: str, group_name: str) -> Tensor:
    """The reduction of `x` over the group (a new tensor), waited."""
    pg = gloo_group(group_name, x)
    if pg is not None and op == "sum" and pg.size() == 2:  # one swap, no ring (`ops.exchange`)
        x = x.contiguous()
        work, parts = exchange.all_reduce_pair(x, pg)
        poll(work) if polled_group(group_name, x) is not None else work.wait()
        return exchange.sum_blocks(parts, torch.empty_like(x))
    pg = polled_group(group_name, x)
    if pg is None:
        return _c10d.wait_tensor(_c10d.all_reduce(x.contiguous(), op, group_name))
    out = x.clone(memory_format=torch.contiguous_format)
    poll(dist.all_reduce(out, op=_REDUCE_OPS[op], group=pg, async_op=True))
    return out


def all_gather(x: Tensor, n: int, group_name: str) -> Tensor:
    """The ranks' `x` concatenated along dim 0 (rank order), waited."""
    return wait(start_all_gather(x, n, group_name))


def all_to_all_single(x: Tensor, out_splits: list[int], in_splits: list[int], group_name: str) -> Tensor:
    """`x`'s rows split by `in_splits` sent rank by rank; the received rows (`out_splits`) concatenated."""
    pg = polled_group(group_name, x)
    if pg is None:
        return _c10d.wait_tensor(_c10d.all_to_all_single(x.contiguous(), out_splits, in_splits, group_name))
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    poll(dist.all_to_all_single(out, x, list(out_splits), list(in_splits), group=pg, async_op=True))
    return out


# --------------------------------------------------------------------------- issued now, waited later

_issued: dict[int, dist.Work] = {}
"""Works issued through c10d and not yet waited, by their output's storage address."""


def track(out: Tensor, work: dist.Work) -> Tensor:
    """Registers an `async_op=True` collective writing `out`: `wait(out)` polls it, and torch's `wait_tensor(out)`
    (a compiled graph's, an fx node's) waits on it too."""
    register_work(out, work)
    _issued[out.untyped_storage().data_ptr()] = work
    return out


def start_all_gather(x: Tensor, n: int, group_name: str, out: Tensor | None = None) -> Tensor:
    """Issues an all-gather along dim 0; the result is valid only after `wait`. `out`: a contiguous buffer of
    the gathered shape to gather into (a view of a tensor the caller returns), through c10d."""
    x = x.contiguous()
    pg = polled_group(group_name, x)
    if gather_rank_in_place(group_name, x) is not None:  # gloo, 2 ranks: one swap, no copy-out (`ops.exchange`)
        if out is None:
            out = x.new_empty((n * x.size(0), *x.shape[1:]))
        work = exchange.all_gather_pair(out, x, resolve_process_group(group_name))
        if pg is not None:
            return track(out, work)
        register_work(out, work)
        return out
    if pg is None and out is None:
        return _c10d.all_gather_into_tensor(x, n, group_name)
    if out is None:
        out = x.new_empty((n * x.size(0), *x.shape[1:]))
    if pg is None:
        register_work(out, dist.all_gather_single(out, x, group=resolve_process_group(group_name),
                                                       async_op=True))
        return out
    return track(out, dist.all_gather_single(out, x, group=pg, async_op=True))


def gather_rank_in_place(group_name: str, t: Tensor) -> int | None:
    """This rank's block index where `start_all_gather(.., out=)` gathers around a block the caller fills in
    place (a gloo group of 2: `ops.exchange`); None where the gather copies its input anyway."""
    pg = gloo_group(group_name, t)
    return None if pg is None or pg.size() != 2 else pg.rank()


def start_all_reduce(x: Tensor, group_name: str) -> Tensor:
    """Issues a sum all-reduce of a copy of `x`; the result is valid only after `wait`."""
    out = x.clone(memory_format=torch.contiguous_format)
    pg = polled_group(group_name, out)
    if pg is None:  # c10d's async_op, not the functional op: gloo's functional all_reduce runs before it returns
        register_work(out, dist.all_reduce(out, group=resolve_process_group(group_name), async_op=True))
        return out
    return track(out, dist.all_reduce(out, group=pg, async_op=True))


_summing: dict[int, tuple[dist.Work, list[Tensor] | Tensor]] = {}
"""Reduce-scatters issued as an all-to-all (`start_reduce_scatter`) and not yet waited, by their result's
storage address: the all-to-all's Work and what `exchange.sum_blocks` adds: this rank's two blocks in rank
order (a group of 2) or the [n, block] blocks received."""


def start_reduce_scatter(x: Tensor, n: int, group_name: str) -> Tensor:
    """Issues a sum reduce-scatter along dim 0 of `x` (n blocks of rows, block r to rank r); the result is valid
    only after `wait`.

    On gloo it runs as an all-to-all (block r of every rank to rank r) and `wait` sums the n blocks received,
    in rank order (`exchange.sum_blocks`): gloo's own reduce-scatter all-reduces the whole tensor and keeps a
    block, and its Work never reports completion (module docstring); `python -m benchmarks.waiting` compares
    them. Elsewhere torch's functional reduce-scatter."""
    x = x.contiguous()
    pg = gloo_group(group_name, x)
    if pg is None:
        return _c10d.reduce_scatter_tensor(x, "sum", n, group_name)
    out = x.new_empty((x.size(0) // n, *x.shape[1:]))
    if x.numel() == 0:  # every rank has this shape: none sends anything
        return out
    if pg.size() == 2:  # one swap of the other rank's block (`ops.exchange`)
        _summing[out.untyped_storage().data_ptr()] = exchange.reduce_scatter_pair(x, pg)
        return out
    blocks = torch.empty_like(x)
    _summing[out.untyped_storage().data_ptr()] = (dist.all_to_all_single(blocks, x, group=pg, async_op=True),
                                                  blocks.view(n, -1))
    return out


def reduce_scatter(x: Tensor, n: int, group_name: str) -> Tensor:
    """The sum over the group of `x`'s block of dim 0 for this rank (n blocks), waited (`start_reduce_scatter`)."""
    return wait(start_reduce_scatter(x, n, group_name))


def wait(pending: Tensor) -> Tensor:
    """Waits for a collective issued by a `start_*` (here or a functional one); returns its result."""
    if _summing:
        entry = _summing.pop(pending.untyped_storage().data_ptr(), None)
        if entry is not None:
            work, parts = entry
            work.wait()
            with torch.no_grad():  # fills the issued buffer, as the collective itself does (its autograd: the issue's)
                exchange.sum_blocks(parts, pending.detach())
            return pending
    if _issued:
        work = _issued.pop(pending.untyped_storage().data_ptr(), None)
        if work is not None:
            poll(work)
    return _c10d.wait_tensor(pending)
