"""A fast equivalence oracle: every rank of a mesh in one process, one thread each.

Real gloo ranks cost a process each and a few milliseconds per collective;
hypothesis wants hundreds of cases a minute. Here each rank of a mesh compiles
its own graph exactly as `fxpar.parallelize` would (same capture, same passes,
its own `MeshInfo` with a coordinate and group names), and runs it in its own
thread. The graphs are not interpreted: the rewritten GraphModules run as
they are, fxpar's collective kernels included. Only the bottom layer is
simulated: the `_c10d_functional` ops those kernels call (all_reduce,
all_gather_into_tensor, reduce_scatter_tensor, all_to_all_single, broadcast,
wait_tensor) are caught by a per-thread `TorchDispatchMode` and meet in a
`SimWorld`, which computes each collective from the tensors all members
brought. Rank queries (`group.rank()`) resolve through `SimProcessGroup`
objects registered under the simulated group names.

What the simulator adds over gloo: a collective whose members bring
different ops, shapes or dtypes fails at once with every member's call named
(gloo needs `TORCH_DISTRIBUTED_DEBUG=DETAIL` for that), and a deadlock (every
live rank waiting on a collective that can no longer complete) is reported as
soon as it happens, with what each rank waits on, instead of after a timeout.

What it does not cover: point-to-point transfers and torch's pipeline
schedules (they use process-group objects, not functional collectives), and
anything that reads a torch `DeviceMesh` (the simulated ranks have none; they
get `mesh=None` and a full `MeshInfo`). Pipelines and the runtime keep their
real multi-process tests (`fxpar.testing.rank_pool`).

    world = SimWorld({"tp": 4})
    pms = world.parallelize(model, example_inputs=(x,), plan=plan)
    reports = world.run(lambda rank: fxpar.verify(model, pms[rank], x, target=y, loss_fn=mse))

Cost, measured on the 2-core development box: a 2-block MLP on tp=4 verifies
(outputs and every gradient, all ranks) in about 30 ms once compiled;
compiling is capture once (about 70 ms for an MLP, about 1 s for GPT-2) plus
the passes per rank. Each rank thread runs under a dispatch mode, which costs
about 5x on small ops; a dispatch point in fxpar.ops.collectives would remove it.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from fxpar._torch import c10d as torch_c10d
from fxpar.analysis.module_checks import check_ranks
from fxpar.capture import capture
from fxpar.compiler import compile_model
from fxpar.core.errors import GraphInvariantError, PlanError
from fxpar.core.mesh import MeshInfo
from fxpar.core.plan import as_plan
from fxpar.testing.dist import RankError
from fxpar.testing.sim_group import (
    SimProcessGroup,
    _Aborted,
    _compute,
    _describe,
    _Group,
    _SimMode,
    _Slot,
    _tls,
    current_rank,
)
from fxpar.verify import verify

__all__ = ["SimWorld", "SimProcessGroup", "SimDeviceMesh", "sim_world", "simulate_parallelize", "check_equivalence"]

log = logging.getLogger(__name__)

_c10d = torch_c10d.functional
_world_ids = itertools.count()

POLL_SECONDS = 0.2  # how often a waiting rank re-checks for a deadlock it may have missed


class SimWorld:
    """All ranks of a device mesh as threads of this process, with simulated process groups.

    Ranks are numbered row-major over the mesh (as `init_device_mesh` does);
    each mesh dim gets one group per slice, named `fxsim<k>/<dim>/<slice>`,
    the same name on every member, as torch names a DeviceMesh's groups.

    Args:
        mesh: mesh dim sizes by name, in mesh order: `{"dp": 2, "tp": 2}`.
        timeout: seconds a rank may wait in one collective before the run is
            declared hung (deadlocks are found sooner, as they happen).

    Attributes:
        names, sizes: the mesh.
        world_size: the number of ranks.
    """

    def __init__(self, mesh: Mapping[str, int], *, timeout: float = 60.0) -> None:
        self.names = tuple(mesh)
        self.sizes = tuple(int(s) for s in mesh.values())
        MeshInfo(self.names, self.sizes)  # validates the names
        self.world_size = math.prod(self.sizes)
        self.timeout = timeout
        self._id = next(_world_ids)
        self._cond = threading.Condition()
        self._groups: dict[str, _Group] = {}
        self._pgs: list[SimProcessGroup] = []
        self._group_of: dict[tuple[int, int], str] = {}  # (rank, mesh dim) -> group name
        self._state: dict[int, Any] = {}
        self._failed: dict[int, BaseException] = {}
        self._abort: str | None = None
        self._closed = False
        for m, name in enumerate(self.names):
            for k, ranks in enumerate(self._slices(m)):
                gname = f"fxsim{self._id}/{name}/{k}"
                self._groups[gname] = _Group(gname, name, tuple(ranks), [0] * len(ranks))
                pg = SimProcessGroup(gname, ranks)
                torch_c10d.register_process_group(gname, pg)
                self._pgs.append(pg)
                for r in ranks:
                    self._group_of[(r, m)] = gname

    # ------------------------------------------------------------------ layout

    def coordinate(self, rank: int) -> tuple[int, ...]:
        coord = []
        for s in reversed(self.sizes):
            coord.append(rank % s)
            rank //= s
        return tuple(reversed(coord))

    def _slices(self, m: int) -> list[list[int]]:
        """The rank lists of mesh dim m's groups, each in coordinate order along m."""
        out: dict[tuple, list[int]] = {}
        for r in range(self.world_size):
            c = self.coordinate(r)
            out.setdefault(c[:m] + c[m + 1:], []).append(r)
        return list(out.values())

    def mesh_info(self, rank: int) -> MeshInfo:
        """What `MeshInfo.from_device_mesh` would give on `rank` of this mesh."""
        groups = tuple(self._group_of[(rank, m)] for m in range(len(self.names)))
        return MeshInfo(self.names, self.sizes, self.coordinate(rank), groups)

    def group_ranks(self, group_name: str) -> tuple[int, ...]:
        return self._groups[group_name].ranks

    def device_mesh(self, rank: int) -> "SimDeviceMesh":
        """A stand-in for rank `rank`'s DeviceMesh that `fxpar.parallelize` accepts."""
        return SimDeviceMesh(self, rank)

    # ------------------------------------------------------------------ compiling

    def parallelize(self, model: nn.Module, *, example_inputs: tuple = (), example_kwargs: dict | None = None,
                    plan: Any = None, passes: list | None = None, check: bool | None = None) -> list:
        """Compiles `model` for every rank of this mesh; one ParallelModule per rank, in rank order.

        Same path as `fxpar.parallelize`: the model is captured once (capture
        is deterministic, so every rank would get the same graph) and each rank
        runs the pass pipeline on its own copy with its own MeshInfo.
        """
        return simulate_parallelize(model, self, example_inputs=example_inputs, example_kwargs=example_kwargs,
                                    plan=plan, passes=passes, check=check)

    # ------------------------------------------------------------------ running

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list:
        """Runs `fn(rank, *args, **kwargs)` on every rank, each in its own thread.

        Returns:
            The return values in rank order.

        Raises:
            The first failing rank's own exception (its type kept, so
            `pytest.raises(fxpar.GraphInvariantError)` works), with the other
            ranks' failures added as notes; `RankError` if ranks hung.
        """
        if self._closed:
            raise RuntimeError("this SimWorld is closed")
        self._reset()
        results: list[Any] = [None] * self.world_size
        threads = [threading.Thread(target=self._rank_main, args=(r, fn, args, kwargs, results),
                                    name=f"fxsim-rank{r}", daemon=True) for r in range(self.world_size)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + self.timeout + 10.0
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, t in enumerate(threads) if t.is_alive()]
        if hung:
            with self._cond:
                self._abort = self._abort or f"ranks {hung} did not finish within {self.timeout:g}s"
                self._cond.notify_all()
            raise RankError(f"simulated run of {getattr(fn, '__qualname__', fn)} hung: {self._abort}",
                            sorted(self._failed), hung)
        real = {r: e for r, e in sorted(self._failed.items()) if not isinstance(e, _Aborted)}
        if real:
            rank, exc = next(iter(real.items()))
            others = [f"rank {r}: {type(e).__name__}: {e}" for r, e in real.items() if r != rank]
            exc.add_note(f"(raised on simulated rank {rank} of {self.world_size})")
            for line in others:
                exc.add_note(line)
            raise exc
        if self._failed:
            raise RankError(f"simulated run aborted: {self._abort}", sorted(self._failed))
        return results

    def _reset(self) -> None:
        with self._cond:
            for g in self._groups.values():
                g.next_seq = [0] * len(g.ranks)
                g.slots.clear()
            self._state = {r: "running" for r in range(self.world_size)}
            self._failed = {}
            self._abort = None

    def _rank_main(self, rank: int, fn: Callable, args: tuple, kwargs: dict, results: list) -> None:
        _tls.rank = rank
        _tls.world = self
        try:
            with torch.autograd.set_multithreading_enabled(False), _SimMode(self):
                results[rank] = fn(rank, *args, **kwargs)
            state = "done"
        except BaseException as e:  # noqa: BLE001 - reported by run() in the driver
            with self._cond:
                self._failed[rank] = e
            state = "failed"
        finally:
            _tls.rank = None
            _tls.world = None
        with self._cond:
            self._state[rank] = state
            self._cond.notify_all()

    # ------------------------------------------------------------------ collectives

    def _functional(self, func, args: tuple, kwargs: dict) -> Any:
        name = func._opname
        if name == "wait_tensor":
            return args[0]
        if name in ("all_reduce", "all_reduce_"):
            x, reduce_op, group = args
            out = self._collective(group, "all_reduce", x, (reduce_op,))
            if name == "all_reduce_":
                x.copy_(out)
                return x
            return out
        if name == "all_gather_into_tensor":
            x, group_size, group = args
            self._check_size(group, group_size, name)
            return self._collective(group, name, x, ())
        if name == "reduce_scatter_tensor":
            x, reduce_op, group_size, group = args
            self._check_size(group, group_size, name)
            return self._collective(group, name, x, (reduce_op, group_size))
        if name == "all_to_all_single":
            x, out_splits, in_splits, group = args
            return self._collective(group, name, x, (tuple(int(s) for s in out_splits),
                                                     tuple(int(s) for s in in_splits)))
        if name == "broadcast":
            x, src, group = args
            return self._collective(group, name, x, (src,))
        raise NotImplementedError(f"the simulator has no implementation of {func}")

    def _check_size(self, group: str, size: int, op: str) -> None:
        n = len(self._group(group).ranks)
        if size != n:
            raise GraphInvariantError(f"{op} on group {group!r} says group_size={size} but the group has {n} ranks")

    def _group(self, name: str) -> _Group:
        g = self._groups.get(name)
        if g is None:
            raise GraphInvariantError(
                f"collective on group {name!r}, which is not a group of this simulated mesh "
                f"({sorted(self._groups)}); a graph compiled for another mesh, or a dry run's group name")
        return g

    def _collective(self, group: str, op: str, x: torch.Tensor, extra: tuple) -> torch.Tensor:
        rank = current_rank()
        g = self._group(group)
        if rank not in g.ranks:
            raise GraphInvariantError(f"rank {rank} issued {op} on group {group!r} whose ranks are {list(g.ranks)}")
        i = g.ranks.index(rank)
        # all_to_all splits differ per rank by design; the output splits of one are the input splits of another.
        sig_extra = extra if op != "all_to_all_single" else ()
        sig = (tuple(x.shape), x.dtype, sig_extra)
        extra_per = extra
        with self._cond:
            seq = g.next_seq[i]
            g.next_seq[i] += 1
            slot = g.slots.setdefault(seq, _Slot(len(g.ranks)))
            slot.calls[i] = (op, sig, x.detach().clone(), extra_per)
            self._state[rank] = ("waiting", group, seq, op, sig)
            if len(slot.calls) == slot.n:
                self._complete(g, seq, slot)
                self._cond.notify_all()
            start = time.monotonic()
            while not slot.complete:
                if self._abort is None and any(not isinstance(e, _Aborted) for e in self._failed.values()):
                    # Another rank raised: this wait is a consequence, its error the cause.
                    self._abort = f"rank {min(self._failed)} failed"
                if self._abort is not None:
                    self._state[rank] = "failed"
                    raise _Aborted(self._abort)
                stuck = self._deadlock()
                if stuck is not None:
                    self._abort = stuck
                    self._cond.notify_all()
                    self._state[rank] = "failed"
                    raise GraphInvariantError(stuck)
                if time.monotonic() - start > self.timeout:
                    self._abort = (f"rank {rank} waited {self.timeout:g}s in {_describe(op, sig)} #{seq} on "
                                   f"group {group!r}")
                    self._cond.notify_all()
                    raise GraphInvariantError(self._abort)
                self._cond.wait(POLL_SECONDS)
            self._state[rank] = "running"
            slot.taken += 1
            if slot.taken == slot.n:
                del g.slots[seq]
            if slot.error is not None:
                raise GraphInvariantError(slot.error)
            return slot.results[i]

    def _complete(self, g: _Group, seq: int, slot: _Slot) -> None:
        calls = [slot.calls[i] for i in range(slot.n)]
        descs = {(op, sig) for op, sig, _, _ in calls}
        if len(descs) > 1:
            lines = [f"  rank {g.ranks[i]}: {_describe(op, sig)}" for i, (op, sig, _, _) in enumerate(calls)]
            slot.error = (f"collective #{seq} on group {g.name!r} (mesh dim '{g.dim}') differs across its ranks:\n"
                          + "\n".join(lines)
                          + "\nthe ranks' graphs issue different collectives here; compare their collective "
                            "schedules with fxpar.analysis.invariants.check_ranks")
            return
        op = calls[0][0]
        extra = calls[0][3]
        if op == "all_to_all_single":
            extra = (calls[0][3][0], [c[3][1] for c in calls])
        slot.results = _compute(op, [c[2] for c in calls], extra)

    def _deadlock(self) -> str | None:
        """A message if no rank can make progress any more, else None (call with the lock held)."""
        waiting = {}
        for r, s in self._state.items():
            if s == "running":
                return None
            if isinstance(s, tuple):
                _, group, seq, _, _ = s
                slot = self._groups[group].slots.get(seq)
                if slot is not None and slot.complete:
                    return None
                waiting[r] = s
        if not waiting:
            return None
        lines = []
        for r in range(self.world_size):
            s = self._state[r]
            if isinstance(s, tuple):
                _, group, seq, op, sig = s
                lines.append(f"  rank {r}: waits in {_describe(op, sig)} #{seq} on group {group!r}")
            else:
                lines.append(f"  rank {r}: {s}")
        return ("collective deadlock: every live rank waits on a collective that some member will never "
                "issue:\n" + "\n".join(lines))

    # ------------------------------------------------------------------ teardown

    def reregister(self) -> None:
        """Registers again any of this world's groups that torch forgot: destroying the default process
        group (a test's fake mesh teardown) unregisters every named group, the shared worlds' too."""
        for pg in self._pgs:
            try:
                torch_c10d.resolve_process_group(pg.group_name)
            except RuntimeError:
                torch_c10d.register_process_group(pg.group_name, pg)

    def close(self) -> None:
        """Unregisters the simulated groups. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for name in self._groups:
            try:
                torch_c10d.unregister_process_group(name)
            except Exception:  # noqa: BLE001 - already gone is fine
                log.debug("could not unregister %s", name, exc_info=True)

    def __enter__(self) -> "SimWorld":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mesh = ", ".join(f"{n}={s}" for n, s in zip(self.names, self.sizes))
        return f"SimWorld({mesh})"


_SHARED: dict[tuple, SimWorld] = {}


def sim_world(mesh: Mapping[str, int]) -> SimWorld:
    """A SimWorld for this mesh shared by the whole session (like `rank_pool`); do not close it."""
    key = tuple((n, int(s)) for n, s in mesh.items())
    world = _SHARED.get(key)
    if world is None or world._closed:
        world = _SHARED[key] = SimWorld(dict(key))
    world.reregister()
    return world


class SimDeviceMesh:
    """What `fxpar.parallelize` reads of a torch DeviceMesh, for one simulated rank.

    Lets a test run the public `fxpar.parallelize(model, world.device_mesh(rank), ...)`
    itself on a simulated rank (capture runs once per rank then; `SimWorld.parallelize`
    captures once for all).
    """

    simulated = True  # fxpar's runtime skips what needs every rank at once (the DDP-style broadcast)

    device_type = "cpu"

    def __init__(self, world: "SimWorld", rank: int) -> None:
        self._world, self._rank = world, rank
        self.mesh_dim_names = world.names
        self.shape = world.sizes
        self.ndim = len(world.sizes)

    def get_coordinate(self) -> list[int]:
        return list(self._world.coordinate(self._rank))

    def get_group(self, dim: int | str = 0) -> SimProcessGroup:
        m = self.mesh_dim_names.index(dim) if isinstance(dim, str) else dim
        name = self._world._group_of[(self._rank, m)]
        return next(pg for pg in self._world._pgs if pg.group_name == name)

    def size(self, dim: int | None = None) -> int:
        return math.prod(self.shape) if dim is None else self.shape[dim]

    def __repr__(self) -> str:
        return f"SimDeviceMesh(rank {self._rank} of {self._world})"


def simulate_parallelize(model: nn.Module, world: SimWorld, *, example_inputs: tuple = (),
                         example_kwargs: dict | None = None, plan: Any = None, passes: list | None = None,
                         check: bool | None = None, input_layout: str = "full",
                         reshard_after_forward: bool = True, loss_fn: Callable | None = None,
                         example_target: Any = None) -> list:
    """`fxpar.parallelize` for every rank of a simulated mesh, in this thread.

    Runs `fxpar.compiler.compile_model` for every rank (the same path as
    `parallelize`), with capture run once for all ranks: capture is
    deterministic, and it is most of the compile time.

    Returns:
        One ParallelModule per rank (mesh: a SimDeviceMesh; mesh_info with the
        simulated groups).

    Raises:
        PlanError: for pipelines (a pp dim > 1 or a plan with pp), which need
            real ranks (`fxpar.testing.rank_pool`); and as parallelize raises.
    """
    plan = as_plan(plan)
    if dict(zip(world.names, world.sizes)).get("pp", 1) > 1 or getattr(plan, "pp", None) is not None \
            or getattr(plan, "schedule", None) is not None:
        raise PlanError("the simulator runs tp / dp / fsdp meshes; pipelines (pp) need real ranks: "
                        "use fxpar.testing.rank_pool")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    captured = capture(model, example_inputs, example_kwargs, loss_fn=loss_fn, target=example_target)
    # Every pass's checks on rank 0; the other ranks' finished graphs are checked by check_ranks
    # (the graphs differ only in parameter shards and coordinates), which halves compile time.
    return [compile_model(model, SimDeviceMesh(world, rank), world.mesh_info(rank), example_inputs=example_inputs,
                          example_kwargs=example_kwargs, plan=plan, passes=passes, input_layout=input_layout,
                          reshard_after_forward=reshard_after_forward,
                          check=check if rank == 0 or check is not None else False, captured=captured,
                          loss_fn=loss_fn, example_target=example_target)
            for rank in range(world.world_size)]


def check_equivalence(model: nn.Module, mesh: Mapping[str, int], *inputs: Any, plan: Any = None,
                      target: Any = None, loss_fn: Callable | None = None, passes: list | None = None,
                      static: bool = True, world: SimWorld | None = None, **verify_kwargs: Any) -> list:
    """The oracle: compile `model` for every rank of `mesh`, check it statically, verify it numerically.

    Args:
        model: the original model.
        mesh: mesh dim sizes by name.
        inputs: full example inputs (also the inputs compared).
        plan, passes: as for `fxpar.parallelize`.
        target, loss_fn: with both, gradients are compared too.
        static: run `fxpar.analysis.invariants.check_ranks` on all ranks first.
        world: a SimWorld to reuse (default: the shared one for this mesh).
        verify_kwargs: passed to `fxpar.verify` (rtol, atol, optimizer, bisect, ...).

    Returns:
        One `VerifyReport` per rank.

    Raises:
        ShardingError, PlanError: from compiling, as `parallelize` raises them.
        GraphInvariantError: from the static checks or the simulated collectives.
    """
    world = world or sim_world(mesh)
    pms = world.parallelize(model, example_inputs=tuple(inputs), plan=plan, passes=passes)
    if static:
        check_ranks(pms)
    return world.run(lambda rank: verify(model, pms[rank], *inputs, target=target, loss_fn=loss_fn,
                                         **verify_kwargs))
