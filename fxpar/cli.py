"""The `fxpar` command line: explain a plan, verify it on local ranks, launch scripts.

    fxpar explain MODULE:FACTORY --mesh dp=8,pp=4,tp=8 [--svg graph.svg] [--save-plan plan.json]
    fxpar verify  MODULE:FACTORY --mesh tp=2
    fxpar run --nproc 4 train.py [script args]
    fxpar diff old.plan.json new.plan.json

MODULE is a dotted module name (found from the current directory) or a path
to a .py file; FACTORY a function in it, called without arguments, that
returns `(model, example_args)` or `(model, example_args, example_kwargs)`.
For `explain` the model may live on the meta device (a dry run reads no
values); `verify` needs real weights and calls the factory on every rank
after `torch.manual_seed(--seed)`, so every rank builds the same model.

Progress of the long steps (capture, passes, verification) goes to stderr,
results to stdout. Exit status: 0 success, 1 a failed plan, verification or
run, 2 a usage error.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import fxpar
from fxpar import viz
from fxpar._torch.fx import pytree
from fxpar.analysis.plan_io import fxpar_version
from fxpar.core.errors import FxparError
from fxpar.core.plan import PP_SCHEDULES
from fxpar.dryrun import parse_mesh
from fxpar.testing import RankError, run_ranks

__all__ = ["main", "load_target", "build_parser"]

_EXAMPLES = """examples:
  fxpar explain examples/gpt2_dryrun.py:gpt2_small --mesh dp=8,pp=4,tp=8
  fxpar explain mypkg.models:build --mesh tp=8 --svg graph.svg --memory-chart memory.png
  fxpar explain mypkg.models:build --mesh dp=2,tp=4 --save-plan plan.json
  fxpar verify examples/gpt2_dryrun.py:gpt2_tiny --mesh tp=2
  fxpar verify mypkg.models:build --mesh dp=2,tp=2 --plan plan.json
  fxpar run --nproc 4 train.py --lr 3e-4
  fxpar plan --auto --world 64 --device h100 examples/llama_dryrun.py:llama3_8b
  fxpar diff old.plan.json new.plan.json
"""


class UsageError(Exception):
    """A command line that cannot run (reported with exit status 2)."""


# --------------------------------------------------------------------------- progress


class _Progress:
    """Names each long step on stderr and says how long it took; ticks the seconds on a terminal."""

    LABELS = {"capture": "capturing the model (torch.export)", "passes": "planning and rewriting (passes)"}

    def __init__(self, enabled: bool = True, stream=None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.live = enabled and getattr(self.stream, "isatty", lambda: False)()
        self._label: str | None = None
        self._start = 0.0
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __call__(self, step: str) -> None:
        self._end()
        if step != "done":
            self._begin(self.LABELS.get(step, step))

    def _begin(self, label: str) -> None:
        if not self.enabled:
            return
        self._label, self._start = label, time.perf_counter()
        if self.live:
            self._stop.clear()
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()
        else:
            print(f"fxpar: {label} ...", file=self.stream, flush=True)

    def _tick(self) -> None:
        while not self._stop.wait(0.25):
            print(f"\rfxpar: {self._label} ... {time.perf_counter() - self._start:.0f} s", end="",
                  file=self.stream, flush=True)

    def _end(self, outcome: str = "done in") -> None:
        if not self.enabled or self._label is None:
            return
        if self._ticker is not None:
            self._stop.set()
            self._ticker.join()
            self._ticker = None
        took = time.perf_counter() - self._start
        prefix = "\r" if self.live else ""
        print(f"{prefix}fxpar: {self._label} ... {outcome} {took:.1f} s", file=self.stream, flush=True)
        self._label = None

    def finish(self, ok: bool = True) -> None:
        self._end("done in" if ok else "failed after")


# --------------------------------------------------------------------------- targets


def _import_module(name: str):
    if name.endswith(".py") or os.sep in name or "/" in name:
        path = Path(name).resolve()
        if not path.is_file():
            raise UsageError(f"{name}: no such file")
        mod_name = "fxpar_target_" + "".join(c if c.isalnum() else "_" for c in str(path))
        if mod_name in sys.modules:
            return sys.modules[mod_name]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        # The file's own folder first, as `python file.py` would have it.
        sys.path.insert(0, str(path.parent))
        spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # last: a folder named like an installed package must not shadow it
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise UsageError(f"cannot import module {name!r} ({e}); run from the folder that contains it, or give "
                         "a path to a .py file") from e


def load_target(target: str) -> tuple[Any, tuple, dict]:
    """Calls MODULE:FACTORY and returns (model, example_args, example_kwargs).

    Raises:
        UsageError: a malformed target, a module or factory that does not exist, or a
            factory that returns something else.
    """
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"target {target!r}: use MODULE:FACTORY, e.g. mypkg.models:build or models.py:build")
    module = _import_module(module_name)
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            names = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise UsageError(f"{module_name} has no {attr!r}; callables there: {names[:12]}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise UsageError(f"{target}: {attr} is not callable; FACTORY is a function returning (model, args)")
    built = factory()
    import torch.nn as nn

    if not isinstance(built, tuple) or len(built) not in (2, 3) or not isinstance(built[0], nn.Module):
        raise UsageError(f"{target} returned {type(built).__name__}; a factory returns (model, example_args) or "
                         "(model, example_args, example_kwargs)")
    model, args = built[0], built[1]
    kwargs = built[2] if len(built) == 3 else {}
    if not isinstance(args, tuple):
        args = (args,)
    return model, args, dict(kwargs or {})


# --------------------------------------------------------------------------- explain


def _cmd_explain(ns: argparse.Namespace) -> int:

    mesh = parse_mesh(ns.mesh)
    plan = _plan_from_args(ns)
    progress = _Progress(not ns.quiet)
    try:
        progress(f"building the model ({ns.target})")
        model, args, kwargs = load_target(ns.target)
        report = fxpar.plan(model, mesh, example_inputs=args, example_kwargs=kwargs, plan=plan, progress=progress)
    except BaseException:
        progress.finish(ok=False)
        raise
    progress.finish()
    print(report.explain())
    written = []
    if ns.save_plan:
        written.append(str(fxpar.save_plan(report.plan, ns.save_plan)))
    if ns.svg:
        viz.graph_svg(report, ns.svg, engine=ns.engine)
        written.append(ns.svg)
    if ns.html:
        viz.graph_html(report, ns.html)
        written.append(ns.html)
    if ns.memory_chart:
        written.append(str(viz.memory_chart(report, ns.memory_chart)))
    if ns.schedule_chart:
        written.append(str(viz.schedule_chart(report, ns.schedule_chart)))
    if written and not ns.quiet:
        print(f"fxpar: wrote {', '.join(written)}", file=sys.stderr)
    return 0


def _plan_from_args(ns: argparse.Namespace):

    pipeline = {k: v for k, v in (("pp", ns.pp_stages), ("schedule", ns.schedule),
                                  ("microbatches", ns.microbatches)) if v is not None}
    if ns.plan:
        if pipeline:
            raise UsageError("--plan gives the whole plan; drop --pp-stages / --schedule / --microbatches")
        return fxpar.load_plan(ns.plan, any_mesh=ns.any_mesh)
    if pipeline:
        return fxpar.Plan(auto_tp=True, **pipeline)
    return None


# --------------------------------------------------------------------------- verify


def _sum_of_squares(output: Any, target: Any) -> Any:
    """A loss that touches every floating-point output, so every gradient is compared."""
    import torch

    leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum((t.float() ** 2).mean() for t in leaves)


def _verify_rank(target: str, mesh: dict, plan_path: str | None, loss: str, seed: int, bisect: bool) -> dict:
    """One rank of `fxpar verify`: build, parallelize, check, verify."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh


    torch.manual_seed(seed)
    model, args, kwargs = load_target(target)
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if meta:
        raise fxpar.FxparError(f"verify needs real weights, but {target} builds {meta[0]!r} (and {len(meta) - 1} "
                               "more) on the meta device; use a factory that builds the model on cpu")
    device_mesh = init_device_mesh("cpu", tuple(mesh.values()), mesh_dim_names=tuple(mesh))
    plan = fxpar.load_plan(plan_path) if plan_path else None
    pm = fxpar.parallelize(model, device_mesh, example_inputs=args, example_kwargs=kwargs or None, plan=plan)
    fxpar.check(pm)
    loss_fn = _sum_of_squares if loss == "sumsq" else None
    report = fxpar.verify(model, pm, *args, target=None, loss_fn=loss_fn, bisect=bisect, **kwargs)
    return {"rank": dist.get_rank(), "ok": report.ok, "text": str(report)}


def _cmd_verify(ns: argparse.Namespace) -> int:

    mesh = parse_mesh(ns.mesh)
    world = 1
    for s in mesh.values():
        world *= s
    module_name, _, attr = ns.target.rpartition(":")
    if module_name.endswith(".py") or "/" in module_name:
        # Ranks start in their own processes: give them the file, wherever they start.
        ns.target = f"{Path(module_name).resolve()}:{attr}"
    plan_path = str(Path(ns.plan).resolve()) if ns.plan else None
    progress = _Progress(not ns.quiet)
    progress(f"verifying on {world} local gloo ranks (capture, passes, both models forward and backward)")
    try:
        results = run_ranks(_verify_rank, world, ns.target, mesh, plan_path, ns.loss, ns.seed, ns.bisect,
                            timeout=ns.timeout)
    except RankError as e:
        progress.finish(ok=False)
        print(f"fxpar verify: the ranks failed before comparing anything:\n{e}", file=sys.stderr)
        return 1
    except BaseException:
        progress.finish(ok=False)
        raise
    progress.finish()
    bad = [r for r in results if not r["ok"]]
    shown = bad[0] if bad else results[0]
    print(f"rank {shown['rank']}: {shown['text']}")
    print(f"fxpar verify: {'OK' if not bad else 'MISMATCH'} on {world} ranks, mesh "
          + ",".join(f"{k}={v}" for k, v in mesh.items()) + (f"; ranks {[r['rank'] for r in bad]} differ" if bad
                                                             else ""))
    return 0 if not bad else 1


# --------------------------------------------------------------------------- run


def torchrun_args(ns: argparse.Namespace) -> list[str]:
    """torchrun's arguments for `fxpar run`."""
    argv = [f"--nproc-per-node={ns.nproc}"]
    if ns.nnodes == "1" and ns.master_addr is None:
        argv.insert(0, "--standalone")
    else:
        argv += [f"--nnodes={ns.nnodes}", f"--node-rank={ns.node_rank}"]
        if ns.master_addr is not None:
            argv.append(f"--master-addr={ns.master_addr}")
        argv.append(f"--master-port={ns.master_port}")
    # The script runs through fxpar.launch, which records an exception in torchrun's error file.
    return argv + ["--module", "fxpar.launch", ns.script, *ns.script_args]


def describe_failure(failures: dict) -> str:
    """The rank that failed first (torchrun's ChildFailedError.failures), how it ended and its root cause.

    First: a rank that raised (it wrote an error file; the earliest file), then one that ended
    otherwise (an exit code, a signal), then one that ended by SIGTERM (torchrun stops the others so).
    """
    def order(item):
        rank, f = item
        recorded = os.path.isfile(f.error_file)
        return (not recorded, f.exitcode == -signal.SIGTERM,
                os.path.getmtime(f.error_file) if recorded else f.timestamp, rank)

    rank, f = min(failures.items(), key=order)
    if f.exitcode < 0:
        how = f"killed by signal {f.signal_name()} ({-f.exitcode})"
    else:
        how = f"exit code {f.exitcode}"
    message = f.message
    if isinstance(message, dict):  # an error file written by torch.distributed.elastic's record
        trace = str(message.get("extraInfo", {}).get("py_callstack", "")).rstrip()
        message = str(message.get("message", "")) + ("\n" + trace if trace else "")
    others = sorted(r for r in failures if r != rank)
    also = f"; ranks {others} ended after it" if others else ""
    return f"rank {rank} failed first ({how}){also}:\n{message}"


def _cmd_run(ns: argparse.Namespace) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    argv = torchrun_args(ns)
    if not ns.quiet:
        print("fxpar: torchrun " + " ".join(argv), file=sys.stderr, flush=True)
    if ns.print_only:
        return 0
    try:
        torchrun(argv)
    except ChildFailedError as e:
        print(f"fxpar run: {e.name} failed: {describe_failure(e.failures)}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- diff


def _cmd_diff(ns: argparse.Namespace) -> int:

    a, b = fxpar.load_plan(ns.old), fxpar.load_plan(ns.new)
    lines = []
    if dict(a.mesh) != dict(b.mesh):
        lines.append(f"mesh: {dict(a.mesh)} -> {dict(b.mesh)}")
    sa, sb = {k: str(v) for k, v in a.tp}, {k: str(v) for k, v in b.tp}
    for key in [*sa, *(k for k in sb if k not in sa)]:
        if sa.get(key) != sb.get(key):
            lines.append(f"tp {key}: {sa.get(key, '(none)')} -> {sb.get(key, '(none)')}")
    for field in ("pp", "schedule", "microbatches", "dp", "auto_tp"):
        if getattr(a, field) != getattr(b, field):
            lines.append(f"{field}: {getattr(a, field)!r} -> {getattr(b, field)!r}")
    if (a.model and a.model.digest) != (b.model and b.model.digest):
        changes = a.model.differences(b.model) if a.model and b.model else ["one plan has no model fingerprint"]
        lines.append(f"model: {len(changes)} structural changes: " + "; ".join(changes[:5]))
    print("\n".join(lines) if lines else "the plans are the same")
    return 0 if not lines else 1


# --------------------------------------------------------------------------- plan


def _cmd_plan(ns: argparse.Namespace) -> int:
    model, args, kwargs = load_target(ns.target)
    ap = fxpar.autoplan(model, ns.world, example_inputs=args, example_kwargs=kwargs or None, device=ns.device,
                        memory_gib=ns.memory_gib, global_batch=ns.global_batch,
                        mixed_precision=not ns.no_mixed_precision)
    print(ap.explain(top=ns.top))
    mesh = ",".join(f"{k}={v}" for k, v in zip(ap.mesh_dim_names, ap.mesh_shape))
    print(f"\nmesh: {mesh}" + (f"; activation_checkpointing={ap.activation_checkpointing!r}"
                                if ap.activation_checkpointing else "")
          + (f"; mp_policy: param_dtype={ap.mp_policy.param_dtype}, reduce_dtype={ap.mp_policy.reduce_dtype}"
             if ap.mp_policy is not None else ""))
    if ns.save_plan:
        print(f"wrote {fxpar.save_plan(ap.plan, ns.save_plan)}")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(
        prog="fxpar", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EXAMPLES,
        description="Plan, inspect, verify and launch parallel PyTorch models compiled by fxpar.")
    parser.add_argument("--version", action="version", version=f"fxpar {fxpar_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def target_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("target", metavar="MODULE:FACTORY",
                       help="a function returning (model, example_args[, example_kwargs]); MODULE is a dotted name "
                            "or a path to a .py file")
        p.add_argument("--mesh", required=True, metavar="DIM=N,...",
                       help="mesh dims and sizes, from dp, fsdp, pp, tp (e.g. dp=8,pp=4,tp=8)")
        p.add_argument("--plan", metavar="FILE", help="use a plan saved with --save-plan / fxpar.save_plan")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")

    ex = sub.add_parser(
        "explain", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="dry-run the plan for a mesh (no process group, any size) and explain it",
        description="Compile the model for rank 0 of the mesh without a process group (a dry run, any mesh\n"
                    "size) and print explain(): placements per module, collectives with bytes per step,\n"
                    "memory per rank, pipeline stages and bubble, fallbacks. The model may live on the meta\n"
                    "device.",
        epilog="examples:\n  fxpar explain examples/gpt2_dryrun.py:gpt2_small --mesh dp=8,pp=4,tp=8\n"
               "  fxpar explain mypkg.models:build --mesh tp=8 --svg graph.svg --save-plan plan.json\n")
    target_args(ex)
    ex.add_argument("--any-mesh", action="store_true", help="with --plan: use its styles on this mesh anyway")
    ex.add_argument("--pp-stages", type=int, metavar="N", help="pipeline stages (default: one per pp rank)")
    ex.add_argument("--schedule", choices=PP_SCHEDULES, help="pipeline schedule (default: 1f1b)")
    ex.add_argument("--microbatches", type=int, metavar="N", help="microbatches per step (default: stages)")
    ex.add_argument("--save-plan", metavar="FILE", help="write the resolved plan as JSON")
    ex.add_argument("--svg", metavar="FILE", help="draw the rewritten graph as SVG")
    ex.add_argument("--engine", choices=("auto", "dot", "python"), default="auto",
                    help="SVG layout: Graphviz's dot if installed (auto), or the pure-Python one")
    ex.add_argument("--html", metavar="FILE", help="a self-contained HTML view of the graph and explain()")
    ex.add_argument("--memory-chart", metavar="FILE", help="memory per rank as a bar chart (.png, .svg, .pdf)")
    ex.add_argument("--schedule-chart", metavar="FILE", help="the pipeline schedule as a timeline (.png, .svg)")
    ex.set_defaults(func=_cmd_explain)

    ve = sub.add_parser(
        "verify", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run the plan on local gloo ranks and compare with the original model",
        description="Start one local process per rank of the mesh (gloo, CPU), compile the model on each,\n"
                    "run fxpar.check and fxpar.verify: outputs and, with a loss, every parameter gradient\n"
                    "against the unsplit model.",
        epilog="examples:\n  fxpar verify examples/gpt2_dryrun.py:gpt2_tiny --mesh tp=2\n"
               "  fxpar verify mypkg.models:build --mesh dp=2,tp=2 --plan plan.json --loss none\n")
    target_args(ve)
    ve.add_argument("--loss", choices=("sumsq", "none"), default="sumsq",
                    help="sumsq: also compare gradients of the mean of squared outputs (default); none: outputs only")
    ve.add_argument("--seed", type=int, default=0, help="torch.manual_seed before the factory on every rank")
    ve.add_argument("--bisect", action="store_true", help="on a mismatch, find the first diverging node")
    ve.add_argument("--timeout", type=float, default=600.0, metavar="S", help="seconds before the ranks give up")
    ve.set_defaults(func=_cmd_verify)

    ru = sub.add_parser(
        "run", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="launch a script on local ranks (a thin wrapper over torchrun)",
        description="Launch SCRIPT on N local ranks with torch.distributed.run (torchrun --standalone);\n"
                    "with --nnodes > 1, join a multi-node rendezvous at --master-addr.",
        epilog="examples:\n  fxpar run --nproc 4 train.py --lr 3e-4\n"
               "  fxpar run --nproc 8 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 train.py\n")
    ru.add_argument("--nproc", "--nproc-per-node", dest="nproc", default="1", metavar="N",
                    help="processes on this machine (torchrun's --nproc-per-node; also 'auto', 'cpu', 'gpu')")
    ru.add_argument("--nnodes", default="1", help="machines (default 1)")
    ru.add_argument("--node-rank", type=int, default=0, help="this machine's index (multi-node)")
    ru.add_argument("--master-addr", default=None, help="address of node 0 (multi-node)")
    ru.add_argument("--master-port", type=int, default=29500, help="port on node 0 (multi-node)")
    ru.add_argument("--print-only", action="store_true", help="print the torchrun command, do not run it")
    ru.add_argument("-q", "--quiet", action="store_true", help="do not print the torchrun command")
    ru.add_argument("script", help="the Python script every rank runs")
    ru.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    ru.set_defaults(func=_cmd_run)

    pl = sub.add_parser(
        "plan", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="choose the mesh and plan for a number of devices (--auto) and predict its step and memory",
        description="Search the meshes of --world devices (dp x fsdp x pp x tp), pipeline schedules and\n"
                    "microbatches, and memory savers, price each on the compiled graph for --device, and\n"
                    "print the best candidates side by side (fxpar.autoplan). The model may live on meta.",
        epilog="examples:\n  fxpar plan --auto --world 64 --device h100 examples/llama_dryrun.py:llama3_8b\n"
               "  fxpar plan --auto --world 4 --device local mypkg.models:build --save-plan plan.json\n")
    pl.add_argument("target", metavar="MODULE:FACTORY",
                    help="a function returning (model, example_args[, example_kwargs]); dim 0 of the inputs is "
                         "the global batch")
    pl.add_argument("--auto", action="store_true", required=True, help="search the mesh and plan (required)")
    pl.add_argument("--world", type=int, required=True, metavar="N", help="number of devices")
    pl.add_argument("--device", default="local", help="h100, h200, a100 or local (measured; default)")
    pl.add_argument("--memory-gib", type=float, metavar="GIB", help="memory per device (default: the device's)")
    pl.add_argument("--global-batch", type=int, metavar="N", help="sequences per step (default: the example's)")
    pl.add_argument("--no-mixed-precision", action="store_true",
                    help="keep a float32 model's numerics: do not consider bfloat16 compute")
    pl.add_argument("--save-plan", metavar="FILE", help="write the chosen plan as JSON")
    pl.add_argument("--top", type=int, default=8, metavar="K", help="candidates to show (default 8)")
    pl.set_defaults(func=_cmd_plan)

    di = sub.add_parser("diff", help="compare two saved plans, entry by entry",
                        description="Show what changed between two plans saved with fxpar.save_plan (exit 1 if "
                                    "they differ), like diff(1).")
    di.add_argument("old", metavar="OLD.json")
    di.add_argument("new", metavar="NEW.json")
    di.set_defaults(func=_cmd_diff)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The `fxpar` command; returns the exit status."""

    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except UsageError as e:
        parser.exit(2, f"fxpar {ns.command}: error: {e}\n")
    except FxparError as e:
        print(f"fxpar {ns.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fxpar: interrupted", file=sys.stderr)
        return 130
    return 0
