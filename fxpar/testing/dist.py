"""Multi-rank harness: run a picklable function on N gloo ranks (processes) of this machine.

Start method: ``forkserver``, with ``torch.distributed`` preloaded in the server.  Measured
on a 2-core CPU box, 4 ranks up to a finished ``init_process_group`` + ``all_reduce``:
fork 0.1 s; forkserver 1.1 s for the first pool of the interpreter (starting the server,
which imports torch once), then 0.04 s per pool or restart; spawn 2.8 s every time.
``fork`` is not safe: once the parent has run a multi-threaded torch op (libgomp OpenMP
pool), a forked child that uses more than one thread hangs forever -- and a pytest session
has usually run torch ops before it asks for a pool.  The forkserver never runs torch ops,
so its children start clean.  As with ``spawn``, a script that starts ranks needs an
``if __name__ == "__main__":`` guard (the server imports the main module once).
"""

from __future__ import annotations

import atexit
import faulthandler
import logging
import multiprocessing as mp
import multiprocessing.forkserver
import os
import pickle
import re
import signal
import sys
import tempfile
import time
import traceback
import weakref
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from fxpar._torch.fx import CAPTURE_MODULES, tree_map

__all__ = ["RankError", "RankPool", "describe_stack", "preload", "rank_pool", "run_ranks",
           "set_collective_timeout"]

logger = logging.getLogger(__name__)

DEADLINE_GRACE = 5.0  # seconds the driver waits past a run's timeout before giving up
FAILURE_GRACE = 3.0  # seconds the driver still waits for the other ranks once one failed
STACK_WAIT = 2.0  # seconds the driver waits for a busy rank's stack dump before killing it
_STACK_SIGNAL = signal.SIGUSR1  # a rank dumps its Python stacks on it (faulthandler): where it is stuck
_CTX = mp.get_context("forkserver")
# Keep '__main__' (the default) so functions defined in a demo script unpickle in the ranks.
# "torch.distributed" first: Python < 3.12 starts the server without the driver's sys.path,
# so this module may not be importable there; the ranks get the full sys.path again.
# Then what fxpar's capture imports on its first call (torch.export's tracer, AOTAutograd, the
# partitioner and its networkx): imported once in the server instead of once in every fresh rank.
_PRELOAD = ["__main__", "torch.distributed", __name__, *CAPTURE_MODULES]
_CTX.set_forkserver_preload(list(_PRELOAD))


def preload(*modules: str) -> None:
    """Adds modules that every rank process starts with, already imported.

    The forkserver imports them once and each rank it forks inherits them, where a fresh rank
    would otherwise import them itself (``transformers`` and a model family: seconds per rank,
    paid again by every new pool and every pool restarted after a failed run).  A module that is
    not installed is skipped.  Only imports: the server must not run torch ops (see the module
    docstring).

    Args:
        *modules: Module names, e.g. ``"transformers.models.gpt2.modeling_gpt2"``.

    Raises:
        RuntimeError: The forkserver of this process already runs (a pool was started): call
            ``preload`` first, e.g. in a ``conftest.py``.
    """
    if mp.forkserver._forkserver._forkserver_pid is not None:
        raise RuntimeError("fxpar.testing.preload() after a rank pool started has no effect; call it first")
    _PRELOAD.extend(m for m in modules if m not in _PRELOAD)
    _CTX.set_forkserver_preload(list(_PRELOAD))


class RankError(AssertionError):
    """A run failed on some rank(s), or some rank(s) did not answer in time.

    Attributes:
        failed_ranks: Ranks that raised (or died), in rank order.
        missing_ranks: Ranks that never answered and were killed.
    """

    def __init__(self, message: str, failed_ranks: Sequence[int] = (),
                 missing_ranks: Sequence[int] = ()):
        super().__init__(message)
        self.failed_ranks = list(failed_ranks)
        self.missing_ranks = list(missing_ranks)


def _exc_info(exc: BaseException) -> tuple[str, str, str]:
    cls = type(exc)
    name = cls.__qualname__
    if cls.__module__ != "builtins":
        name = f"{cls.__module__}.{name}"
    text = str(exc)
    if "timed out" in text.lower() or "timeout" in text.lower():  # gloo does not say which collective
        frames = [{"file": f.filename, "line": str(f.lineno), "func": f.name}
                  for f in reversed(traceback.extract_tb(exc.__traceback__))]
        text += f" [{_describe_frames(frames)}]"
    return name, text, "".join(traceback.format_exception(exc))


def _to_cpu(obj: Any) -> Any:
    """Detached, compact CPU copies of the plain tensors inside a pytree."""
    plain = (torch.Tensor, torch.nn.Parameter)
    return tree_map(lambda x: x.detach().cpu().clone() if type(x) in plain else x, obj)


def _die_with_driver() -> None:
    """Makes this rank die with the driver even while it is busy in a run (Linux only).

    Every forkserver child inherits the write end of the server's "driver alive" pipe, which
    keeps the server alive after the driver dies.  Closing it lets the server exit with the
    driver, and PR_SET_PDEATHSIG then kills this rank with the server.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        server = mp.forkserver._forkserver
        if server._forkserver_alive_fd is not None:
            os.close(server._forkserver_alive_fd)
            server._forkserver_alive_fd = None
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 == PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        logger.debug("rank may outlive a killed driver", exc_info=True)


def set_collective_timeout(seconds: float) -> None:
    """In a rank: how long any collective waits for the other ranks, from now on (every group, new ones too).

    The pool sets it at the start of each run (``RankPool.run``'s ``collective_timeout``); a run that
    compiles first and then wants short waits sets it again itself.
    """
    c10d.default_pg_timeout = timedelta(seconds=seconds)  # new_group / DeviceMesh default
    if dist.is_initialized():
        for pg in list(c10d._world.pg_map):
            try:
                c10d._set_pg_timeout(timedelta(seconds=seconds), pg)
            except (ValueError, AssertionError):  # not a member, or a backend without a timeout to set
                logger.debug("collective timeout not set on %s", pg, exc_info=True)


def _worker_main(rank: int, world_size: int, backend: str, store_path: str,
                 timeout: float, threads: int, conn: Connection, stack_path: str = "") -> None:
    """Rank process body: join the process group, then serve runs until told to stop."""
    _die_with_driver()
    torch.set_num_threads(threads)
    if stack_path:  # the driver asks a rank that does not answer where it is (faulthandler works in C waits)
        stacks = open(stack_path, "w")  # noqa: SIM115 - open for the process's life
        faulthandler.register(_STACK_SIGNAL, file=stacks, all_threads=True, chain=False)

    def reply(msg: tuple) -> None:
        try:
            data = pickle.dumps(msg)
        except Exception as exc:  # unpicklable return value
            data = pickle.dumps(("err", *_exc_info(exc)))
        conn.send_bytes(data)

    try:
        set_collective_timeout(timeout)
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(backend, rank=rank, world_size=world_size, store=store,
                                timeout=timedelta(seconds=timeout))
        reply(("ready",))
    except BaseException as exc:
        reply(("err", *_exc_info(exc)))
        return
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):  # driver went away
            break
        if not data:  # shutdown request
            break
        _drop_subgroups()
        try:
            sys_path, collective_timeout, payload = pickle.loads(data)
            sys.path[:] = sys_path
            set_collective_timeout(collective_timeout)
            fn, args, kwargs = pickle.loads(payload)
            msg = ("ok", _to_cpu(fn(*args, **kwargs)))
        except BaseException as exc:
            msg = ("err", *_exc_info(exc))
        del data
        try:
            reply(msg)
        except OSError:
            break
    dist.destroy_process_group()


def _drop_subgroups() -> None:
    """Destroys the groups a previous run made (e.g. DeviceMesh dims), keeping the default.

    Gloo keeps threads and sockets per group, so they would pile up run after run.  Done
    when the next run arrives, i.e. once every rank has finished the previous one.
    """
    for pg in list(c10d._world.pg_map):
        if pg is not c10d.GroupMember.WORLD:
            try:
                dist.destroy_process_group(pg)
            except Exception:  # noqa: BLE001 - a stale group must not kill the rank
                logger.warning("could not destroy process group %s", pg, exc_info=True)


class RankPool:
    """``world_size`` warm rank processes in one gloo process group, reused across runs.

    Args:
        world_size: Number of ranks (processes).
        backend: ``torch.distributed`` backend of the default group.
        timeout: Seconds after which any collective fails (the process-group timeout),
            and default per-run timeout.
        threads_per_rank: ``torch.set_num_threads`` in each rank.

    A failed or timed-out run kills the ranks; the next :meth:`run` starts fresh ones.
    Process groups a run creates (DeviceMesh dimensions, ``new_group``) are destroyed when
    the next run starts, so build meshes inside ``fn``; the default group persists.
    """

    def __init__(self, world_size: int, *, backend: str = "gloo", timeout: float = 60.0,
                 threads_per_rank: int = 1):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.backend = backend
        self.timeout = timeout
        self.threads_per_rank = threads_per_rank
        self._tmp = tempfile.TemporaryDirectory(prefix="fxpar_ranks_")
        self._generation = 0
        self._procs: list[mp.process.BaseProcess] = []
        self._conns: list[Connection] = []
        self._closed = False
        _LIVE.add(self)
        self._start()

    def _start(self) -> None:
        self._generation += 1
        store = os.path.join(self._tmp.name, f"store{self._generation}")
        t0 = time.perf_counter()
        for rank in range(self.world_size):
            here, there = _CTX.Pipe()
            proc = _CTX.Process(target=_worker_main, name=f"fxpar-rank{rank}", daemon=True,
                                args=(rank, self.world_size, self.backend, store, self.timeout,
                                      self.threads_per_rank, there, self._stack_path(rank)))
            proc.start()
            there.close()
            self._procs.append(proc)
            self._conns.append(here)
        self._collect("pool startup", self.timeout + DEADLINE_GRACE, self.timeout)
        logger.debug("started %d ranks in %.2fs", self.world_size, time.perf_counter() - t0)

    def _stack_path(self, rank: int) -> str:
        return os.path.join(self._tmp.name, f"stacks{self._generation}_{rank}.txt")

    def _where(self, ranks: Sequence[int]) -> dict[int, str]:
        """Where each of these busy ranks is: its stack dumped (faulthandler, on a signal), summarised."""
        def size(r: int) -> int:
            path = self._stack_path(r)
            return os.path.getsize(path) if os.path.exists(path) else 0

        sizes = {}
        for r in ranks:
            sizes[r] = size(r)
            try:
                os.kill(self._procs[r].pid, _STACK_SIGNAL)
            except (OSError, TypeError):
                sizes.pop(r)
        dumps: dict[int, str] = {}
        end = time.monotonic() + STACK_WAIT
        while sizes and time.monotonic() < end:
            time.sleep(0.1)
            for r in list(sizes):
                if size(r) <= sizes[r]:
                    continue
                time.sleep(0.1)  # the dump is written in a few calls: let it finish
                with open(self._stack_path(r)) as f:
                    f.seek(sizes.pop(r))
                    dumps[r] = f.read()
        return {r: describe_stack(text) for r, text in dumps.items()}

    def _kill(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc, conn in zip(self._procs, self._conns):
            proc.join(5.0)
            conn.close()
        self._procs, self._conns = [], []

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None,
            collective_timeout: float | None = None, **kwargs: Any) -> list:
        """Runs ``fn(*args, **kwargs)`` on every rank.

        Args:
            fn: Picklable (module-level) function; it may use ``torch.distributed`` freely.
            *args: Positional arguments, pickled to every rank.
            timeout: Seconds the whole run may take (default: the pool's): the driver gives up
                ``DEADLINE_GRACE`` seconds after it and names the ranks still busy, each with
                where it is (the collective it waits in, when it waits in one).
            collective_timeout: Seconds one collective may wait for the other ranks (the
                process-group timeout; default: ``timeout``). A run that compiles for minutes
                needs a long ``timeout``; waits as long are safe (ranks compiling at different
                speeds wait for each other) but slow to fail: the driver's deadline then names
                the ranks, and the collectives they wait in, first.
            **kwargs: Keyword arguments, pickled to every rank.

        Returns:
            The return values ordered by rank (plain tensors come back as CPU copies).

        Raises:
            RankError: Some rank raised, died or did not answer in time.
        """
        if self._closed:
            raise RuntimeError("RankPool is closed")
        timeout = self.timeout if timeout is None else timeout
        if collective_timeout is None:
            collective_timeout = timeout
        payload = pickle.dumps((list(sys.path), collective_timeout, pickle.dumps((fn, args, kwargs))))
        if not self._procs:
            self._start()
        for conn in self._conns:
            try:
                conn.send_bytes(payload)
            except OSError:
                pass  # a dead rank shows up as EOF below
        what = f"run({getattr(fn, '__qualname__', fn)})"
        return self._collect(what, timeout + DEADLINE_GRACE, timeout)

    def _collect(self, what: str, budget: float, timeout: float) -> list:
        """Waits for one message per rank; on any failure kills the ranks and raises."""
        start = time.monotonic()
        results: dict[int, Any] = {}
        failures: dict[int, tuple[str, str, str]] = {}
        pending = dict(zip(self._conns, range(self.world_size)))
        first_failure = 0.0
        try:
            while pending:
                end = start + budget
                if failures:
                    end = min(end, first_failure + FAILURE_GRACE)
                ready = wait(list(pending), timeout=max(0.0, end - time.monotonic()))
                if not ready:
                    break
                for conn in ready:
                    rank = pending.pop(conn)
                    try:
                        msg = pickle.loads(conn.recv_bytes())
                    except (EOFError, OSError):
                        self._procs[rank].join(1.0)
                        code = self._procs[rank].exitcode
                        how = f"was killed by signal {signal.Signals(-code).name}" if code is not None and code < 0 \
                            else f"exited (exit code {code})"
                        msg = ("err", "WorkerDied", f"rank {rank} process {how}", "")
                    except Exception as exc:  # result does not unpickle here
                        msg = ("err", *_exc_info(exc))
                    if msg[0] == "err":
                        failures[rank] = msg[1:]
                        first_failure = first_failure or time.monotonic()
                    else:
                        results[rank] = msg[-1]
        except BaseException:
            self._kill()
            raise
        if not failures and not pending:
            return [results[r] for r in range(self.world_size)]
        missing = sorted(pending.values())
        where = self._where(missing) if missing else {}
        self._kill()
        lines = [f"{what} on {self.world_size} ranks failed:"]
        lines += [f"  rank {r}: {name}: {text}" for r, (name, text, _) in sorted(failures.items())]
        if missing:
            why = (f"within {FAILURE_GRACE:g}s after another rank failed" if failures
                   else f"-- timed out after {budget:g}s (timeout {timeout:g}s + grace)")
            lines.append(f"  ranks {missing} did not answer {why}")
            lines += [f"  rank {r} was {where[r]}" for r in missing if r in where]
        waited = any("timed out" in text.lower() for _, text, _ in failures.values()) \
            or any(w.startswith("waiting in collective") for w in where.values())
        if results and waited:  # a rank that returned while others waited in a collective never joined it
            done = sorted(results)
            lines.append(f"  ranks {done} returned normally: if the others waited in a collective, "
                         f"ranks {done} skipped it (a rank-dependent branch or step count?)")
        if failures:  # dicts keep arrival order: the first to fail is usually the cause
            rank, (_, _, tb) = next(iter(failures.items()))
            lines.append(f"\nRemote traceback of rank {rank} (the first to fail):\n{tb}")
        lines.append("The ranks were killed; the next run() starts fresh ones.")
        raise RankError("\n".join(lines), sorted(failures), missing)

    def close(self) -> None:
        """Stops the ranks (gracefully if they are idle, else by force). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for conn in self._conns:
            try:
                conn.send_bytes(b"")
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self._kill()
        self._tmp.cleanup()
        _LIVE.discard(self)

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._procs)} live"
        return f"RankPool(world_size={self.world_size}, backend={self.backend!r}, {state})"


_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')
_COLLECTIVE_FUNCS = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                     "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "broadcast", "barrier",
                     "send", "recv", "gather", "scatter", "all_gather_object", "broadcast_object_list",
                     "wait", "wait_tensor", "batch_isend_irecv", "monitored_barrier"}


def _compiled_collective(path: str, line: int) -> str | None:
    """The functional collective at `line` of an inductor output file (a wait: the collective it waits for)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    text = lines[line - 1].strip() if 0 < line <= len(lines) else ""
    m = re.search(r"_c10d_functional\.(\w+)\.default\((.*)\)", text)
    if m is None:
        return None
    op, args = m.groups()
    if op == "wait_tensor":  # name what it waits for: the issue `bufN = ..._c10d_functional.op(...)`
        issue = re.compile(rf"^\s*{re.escape(args.strip())} = .*_c10d_functional\.(\w+)\.default\((.*)\)")
        for prev in reversed(lines[:line - 1]):
            found = issue.match(prev)
            if found:
                return f"wait_tensor of {found.group(1)}({found.group(2)})"
    return f"{op}({args})"


def describe_stack(dump: str) -> str:
    """One line for a faulthandler dump of a rank: the collective it waits in (if any) and the caller.

    The dump holds every thread; the rank's own is the one that runs ``_worker_main``. Frames are most
    recent first: the first in a collective (torch.distributed's functions, a functional collective in
    a compiled graph's code) names it, the first of fxpar or the test outside torch says from where.
    """
    blocks = [b for b in dump.split("\n\n") if "_worker_main" in b]
    if not blocks:
        return "busy (no stack dump)"
    return _describe_frames([m.groupdict() for m in map(_FRAME.match, blocks[-1].splitlines()) if m])


def _describe_frames(frames: list[dict]) -> str:
    """`describe_stack` of frames (file, line, func), most recent first."""
    collective = None
    for fr in frames:
        f, func = fr["file"], fr["func"]
        if "torchinductor" in f or "/_inductor/" in f and func == "call":
            collective = _compiled_collective(f, int(fr["line"]))
            if collective:
                collective += f" in a compiled graph ({f}:{fr['line']})"
                break
        if func in _COLLECTIVE_FUNCS and ("torch/distributed" in f or "fxpar" in f):
            collective = f"{func} ({f}:{fr['line']})"
            break
    caller = next((fr for fr in frames if "site-packages/torch" not in fr["file"]
                   and "/multiprocessing/" not in fr["file"] and not fr["file"].endswith("testing/dist.py")
                   and "torchinductor" not in fr["file"]), None)
    here = f"{caller['func']} ({caller['file']}:{caller['line']})" if caller else "?"
    if collective:
        return f"waiting in collective {collective}, called from {here}"
    innermost = frames[0] if frames else None
    inner = f"{innermost['func']} ({innermost['file']}:{innermost['line']})" if innermost else "?"
    return f"not in a collective: in {inner}, called from {here}"


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
              timeout: float = 60.0, **kwargs: Any) -> list:
    """One-shot :meth:`RankPool.run`: start a pool, run ``fn`` once, close the pool."""
    with RankPool(world_size, backend=backend, timeout=timeout) as pool:
        return pool.run(fn, *args, **kwargs)


_LIVE: weakref.WeakSet[RankPool] = weakref.WeakSet()
_SHARED: dict[int, RankPool] = {}


def rank_pool(world_size: int) -> RankPool:
    """A warm gloo pool of ``world_size`` ranks shared by the whole (test) session.

    It is closed at interpreter exit; do not close it yourself.
    """
    pool = _SHARED.get(world_size)
    if pool is None or pool._closed:
        pool = _SHARED[world_size] = RankPool(world_size)
    return pool


@atexit.register
def _close_all() -> None:
    for pool in list(_LIVE):
        pool.close()
