"""Dry runs: the plan parallelize would make, for any mesh, without a process group.

    report = fxpar.plan(model, mesh_shape={"dp": 8, "pp": 4, "tp": 8}, example_inputs=(ids,))
    print(report.explain())            # placements, collectives, memory per rank, stages, fallbacks
    fxpar.save_plan(report.plan, "plan.json")

A dry run compiles the model with the same code path as `parallelize`
(`fxpar.compiler.compile_model`) on a `MeshInfo` built from sizes: this rank is
rank 0 (coordinate 0 on every dim), groups are named 'dryrun:<dim>', so every
pass runs as on a real rank 0 and inserts its collectives, which never run.
The plan is therefore the one parallelize makes, by construction, at any
mesh size (64 to 1024 ranks cost the same as 8). Models may live on the meta
device: nothing reads a value, parameters are sliced as meta tensors.

With a pp dim, the passes see the mesh without it and every stage is compiled
here (no pp coordinate), as `fxpar.core.stages.split_pp_mesh` does for a real
mesh; torch's schedule order is computed with stand-in stages (no process
group) and simulated for the bubble fraction and the timeline.

Memory per rank: `fxpar.analysis.memory`; the schedule simulation: `fxpar.analysis.schedule`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch.fx as fx
import torch.nn as nn

from fxpar.analysis.explain import explain
from fxpar.analysis.memory import RankMemory, memory_per_rank
from fxpar.analysis.schedule import TimelineEntry, schedule_lines, schedule_order, simulate_schedule
from fxpar.compiler import compile_model
from fxpar.core.errors import PlanError
from fxpar.core.mesh import MeshInfo
from fxpar.core.stages import PipelineMeshInfo, split_pp_mesh, stage_info

__all__ = ["DryRunReport", "plan", "parse_mesh", "dry_mesh"]


# --------------------------------------------------------------------------- the mesh


def parse_mesh(mesh_shape: Any) -> dict[str, int]:
    """{'dp': 2, 'tp': 4} from a dict, a 'dp=2,tp=4' string, (name, size) pairs, a MeshInfo or a DeviceMesh.

    Raises:
        PlanError: a malformed entry or a size that is not a positive int.
    """
    if isinstance(mesh_shape, MeshInfo):
        return dict(zip(mesh_shape.names, mesh_shape.sizes))
    if hasattr(mesh_shape, "mesh_dim_names") and hasattr(mesh_shape, "mesh_shape"):  # an AutoPlan
        return dict(zip(mesh_shape.mesh_dim_names, mesh_shape.mesh_shape))
    if hasattr(mesh_shape, "mesh_dim_names") and hasattr(mesh_shape, "shape"):  # a DeviceMesh: its sizes
        info = MeshInfo.from_device_mesh(mesh_shape)
        return dict(zip(info.names, info.sizes))
    if isinstance(mesh_shape, str):
        pairs = []
        for part in (p.strip() for p in mesh_shape.split(",") if p.strip()):
            name, sep, size = part.partition("=")
            if not sep or not size.strip().isdigit():
                raise PlanError(f"mesh {mesh_shape!r}: each dim is name=size, e.g. 'dp=2,tp=4' (got {part!r})")
            pairs.append((name.strip(), int(size)))
    elif isinstance(mesh_shape, Mapping):
        pairs = list(mesh_shape.items())
    else:
        pairs = list(mesh_shape or ())
    if not pairs:
        raise PlanError("the mesh is empty; give its dims and sizes, e.g. {'dp': 2, 'tp': 4} or 'dp=2,tp=4'")
    out: dict[str, int] = {}
    for name, size in pairs:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise PlanError(f"mesh dim {name!r} has size {size!r}; sizes are positive ints")
        if name in out:
            raise PlanError(f"mesh dim {name!r} is given twice")
        out[str(name)] = size
    return out


def dry_mesh(mesh_shape: Any) -> MeshInfo:
    """The MeshInfo of rank 0 on a mesh of these sizes: coordinate 0 everywhere, groups 'dryrun:<dim>'."""
    sizes = parse_mesh(mesh_shape)
    names = tuple(sizes)
    return MeshInfo(names, tuple(sizes.values()), (0,) * len(names), tuple(f"dryrun:{n}" for n in names))


def _split_pp_dry(mesh: Any, mesh_info: MeshInfo):
    """`fxpar.core.stages.split_pp_mesh` without a DeviceMesh: the other dims at coordinate 0, every stage here."""
    if not mesh_info.has("pp"):
        return split_pp_mesh(None, mesh_info)  # raises its PlanError: a pipeline plan needs a pp dim
    d = mesh_info.index("pp")
    keep = [m for m in range(mesh_info.ndim) if m != d]
    info = MeshInfo(tuple(mesh_info.names[m] for m in keep), tuple(mesh_info.sizes[m] for m in keep),
                    tuple(mesh_info.coordinate[m] for m in keep), tuple(mesh_info.group_names[m] for m in keep))
    return None, info, PipelineMeshInfo(mesh_info.sizes[d], None)


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True, eq=False)
class DryRunReport:
    """What `fxpar.plan` returns: the compiled rank-0 module and what it means for every rank.

    Attributes:
        module: the rank-0 ParallelModule (PipelineModule with a pp dim, every
            stage local); it has no process group and cannot run.
        mesh: the whole mesh, pp included.
        seconds: wall time of 'capture', 'passes' and 'total'.
        notes: what parallelize refuses today on this mesh, if anything.
    """

    module: nn.Module
    mesh: MeshInfo
    seconds: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def plan(self):
        """The resolved plan (`fxpar.analysis.plan_io.ResolvedPlan`), as `pm.plan` of a real run."""
        return self.module.plan

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.module.graph_module

    @property
    def world_size(self) -> int:
        n = 1
        for s in self.mesh.sizes:
            n *= s
        return n

    def memory(self, *, optimizer_bytes_per_element: int | None = None) -> list[RankMemory]:
        """Memory per pp rank (`fxpar.analysis.memory`); optimizer state AdamW's unless given."""
        return memory_per_rank(self.module, self.mesh, optimizer_bytes_per_element=optimizer_bytes_per_element)

    def timeline(self) -> list[TimelineEntry]:
        """The pipeline schedule simulated with equal stage times ([] without a pipeline)."""
        split = stage_info(self.graph_module)
        if split is None:
            return []
        return simulate_schedule(schedule_order(split), split.num_stages)[0]

    def explain(self) -> str:
        """explain() of the rank-0 module, with memory per rank, gradient sync and the simulated schedule."""
        others = [n for n in self.mesh.names if n != "pp"]
        what = ["no process group"]
        if others:
            what.append(f"shapes of the ranks at coordinate 0 of {', '.join(others)}")
        if self.mesh.size("pp") > 1:
            what.append("every pipeline stage")
        head = [f"fxpar dry run on mesh {self.mesh} = {self.world_size} ranks ({'; '.join(what)})"]
        if self.seconds:
            head.append("  " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        head += [f"  note: {n}" for n in self.notes]
        body = explain(self.module)
        if self.mesh.size("pp") > 1:
            # explain() counts every stage as local in a dry run; per pp rank figures follow below.
            body = "\n".join(line.replace("Parameter memory per rank:", "Parameter memory of all stages:", 1)
                             for line in body.splitlines())
        tail = schedule_lines(self.module)  # memory per rank and gradient sync are in explain()
        return "\n".join(head + ["", body] + tail)

    def __str__(self) -> str:
        return self.explain()


def _has_meta(model: nn.Module) -> bool:
    return any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])


def plan(model: nn.Module, mesh_shape: Any, *, example_inputs: tuple = (), example_kwargs: dict | None = None,
         plan: Any = None, passes: list | None = None, input_layout: str = "full", check: bool | None = None,
         progress: Callable[[str], None] | None = None, mp_policy: Any = None,
         activation_checkpointing: str | None = None, reshard_after_forward: bool = True,
         fsdp_unit: str = "block", offload_policy: Any = None) -> DryRunReport:
    """Plans `model` for a mesh of the given sizes without a process group (a dry run).

    Runs the same capture and passes as `fxpar.parallelize` for rank 0 of the
    mesh; collectives are inserted but never run. Works for any mesh size and
    for models on the meta device (example inputs on meta, or real integer
    tensors such as token ids).

    Args:
        model: the model; never modified. May live on the meta device.
        mesh_shape: {'dp': 8, 'pp': 4, 'tp': 8}, 'dp=8,pp=4,tp=8', a MeshInfo, a DeviceMesh (its sizes), or an
            AutoPlan (its mesh, and its plan unless `plan` is given).
        example_inputs, example_kwargs: example inputs, as for parallelize.
        plan: a fxpar.Plan, {glob: style} dict, a saved plan (`fxpar.load_plan`), or None (automatic).
        passes: the pass list (default: fxpar.default_passes()).
        input_layout: as for parallelize.
        check: run the invariant checks after every pass (default: as parallelize, but off for
            meta-device models, whose checks run on CPU fake tensors).
        progress: called with 'capture', 'passes' and 'done' as each step starts.
        mp_policy, activation_checkpointing, reshard_after_forward, fsdp_unit, offload_policy: as for
            parallelize; the memory per rank (`.memory()`, explain()) shows their effect.

    Returns:
        A DryRunReport: `.explain()`, `.plan` (the resolved plan), `.memory()`,
        `.timeline()`, `.module` (the rank-0 ParallelModule).

    Raises:
        PlanError, ShardingError, ScheduleError, CaptureError: as parallelize would.
    """
    if input_layout not in ("full", "local"):
        raise PlanError(f"input_layout={input_layout!r}: use 'full' (every rank passes the same full inputs) "
                        "or 'local' (each rank passes its own batch shard)")
    if plan is None and hasattr(mesh_shape, "mesh_shape") and hasattr(mesh_shape, "plan"):  # an AutoPlan
        plan = mesh_shape.plan
    mesh_info = dry_mesh(mesh_shape)
    if check is None and _has_meta(model):
        check = False
    seconds: dict[str, float] = {}
    marks: list[tuple[str, float]] = []

    def step(name: str) -> None:
        marks.append((name, time.perf_counter()))
        if progress is not None:
            progress(name)

    start = time.perf_counter()
    module = compile_model(model, None, mesh_info, example_inputs=example_inputs, example_kwargs=example_kwargs,
                           plan=plan, passes=passes, input_layout=input_layout, check=check,
                           split_pp=_split_pp_dry, progress=step, mp_policy=mp_policy,
                           activation_checkpointing=activation_checkpointing,
                           reshard_after_forward=reshard_after_forward, fsdp_unit=fsdp_unit,
                           offload_policy=offload_policy)
    step("done")
    for (name, t0), (_, t1) in zip(marks, marks[1:]):
        seconds[name] = t1 - t0
    seconds["total"] = time.perf_counter() - start
    return DryRunReport(module, mesh_info, seconds, ())


