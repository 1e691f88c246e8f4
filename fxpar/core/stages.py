"""The pipeline stage layout as data: schedules, the pp mesh dim, stages and the split.

`split_stages` (a pass) cuts a rank's graph into stages and records a
`PipelineSplitInfo` in `gm.meta[STAGES_KEY]`; the runtime
(`fxpar.runtime.pipeline.PipelineModule`) builds torch pipeline stages from
it, and the analyses (explain, checks, dry runs) read it. Nothing here runs
a stage: it is the contract between the pass that splits and the code that
executes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch.distributed.pipelining import (
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)

from fxpar._torch.pipelining import stage_to_rank_mapping
from fxpar.core.errors import PlanError, ScheduleError
from fxpar.core.mesh import MeshInfo
from fxpar.core.plan import Plan

__all__ = [
    "STAGES_KEY",
    "ScheduleSpec",
    "SCHEDULES",
    "SPLIT_BACKWARD",
    "PipelineMeshInfo",
    "StageInfo",
    "PipelineSplitInfo",
    "stage_info",
    "resolve_stages",
    "split_pp_mesh",
    "stage_ranks",
]

STAGES_KEY = "fxpar_stages"
"""`gm.meta` key of the `PipelineSplitInfo` split_stages leaves on the parent GraphModule."""


# --------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class ScheduleSpec:
    """A torch pipeline schedule as fxpar uses it.

    Attributes:
        name: fxpar's name (Plan(schedule=...)).
        cls: the torch.distributed.pipelining class.
        stages_per_rank: the exact number of stages each rank holds, or None
            for 'two or more' (interleaved schedules).
        style: 'loop' (stage s on rank s % pp) or 'v' (rank r holds s = r and
            s = 2 pp - 1 - r).
    """

    name: str
    cls: type
    stages_per_rank: int | None
    style: str

    @property
    def multi(self) -> bool:
        return self.stages_per_rank != 1


SCHEDULES: dict[str, ScheduleSpec] = {
    s.name: s
    for s in (
        ScheduleSpec("gpipe", ScheduleGPipe, 1, "loop"),
        ScheduleSpec("1f1b", Schedule1F1B, 1, "loop"),
        ScheduleSpec("interleaved_1f1b", ScheduleInterleaved1F1B, None, "loop"),
        ScheduleSpec("looped_bfs", ScheduleLoopedBFS, None, "loop"),
        ScheduleSpec("interleaved_zb", ScheduleInterleavedZeroBubble, None, "loop"),
        ScheduleSpec("zbv", ScheduleZBVZeroBubble, 2, "v"),
        ScheduleSpec("dualpipev", ScheduleDualPipeV, 2, "v"),
    )
}


SPLIT_BACKWARD = ("zbv", "interleaved_zb", "dualpipev")
"""Schedules with separate input- and weight-gradient actions (zero bubble)."""


@dataclass(frozen=True)
class PipelineMeshInfo:
    """The `pp` mesh dim as split_stages sees it (passed in `PassContext.options["pp"]`).

    Attributes:
        size: ranks on the pp dim.
        coordinate: this rank's pp coordinate; None for dry runs (every stage local).
    """

    size: int
    coordinate: int | None = None


@dataclass(frozen=True)
class StageInfo:
    """One pipeline stage, as split_stages cut it.

    Attributes:
        index: stage index (0 = first).
        rank: the pp coordinate that runs it.
        cut_before: module FQN the stage starts at ('' for stage 0).
        first_module, last_module: the first and last module whose ops it runs.
        num_nodes: graph nodes in the stage.
        flops, mem_bytes, comm_bytes, time: symbolic cost (see fxpar/analysis/cost.py),
            sizes as sympy expressions of the input symbols.
        time_value, flops_value: the same at the example inputs.
        params: canonical FQNs of the parameters it holds (tied ones in every owner).
        param_bytes: bytes of those parameters on one rank (local shards).
        inputs: names of the values it receives from the previous stage.
        recv_bytes, recv_bytes_value: bytes received over the cut before it
            (per step at the example inputs, summed over microbatches).
    """

    index: int
    rank: int
    cut_before: str
    first_module: str
    last_module: str
    num_nodes: int
    flops: Any
    mem_bytes: Any
    comm_bytes: Any
    time: Any
    time_value: float
    flops_value: float
    params: tuple[str, ...]
    param_bytes: int
    inputs: tuple[str, ...]
    recv_bytes: Any
    recv_bytes_value: float


@dataclass(frozen=True)
class PipelineSplitInfo:
    """The whole split, identical on every rank (kept in `gm.meta[STAGES_KEY]`).

    Attributes:
        stages: one StageInfo per stage.
        schedule: the schedule name (a key of SCHEDULES).
        pp_size: ranks on the pp dim.
        microbatches: microbatches per step.
        balanced: cuts were chosen by the cost model (False: the plan's cut points).
        tied: (canonical parameter FQN, stage indices) for parameters several stages use.
        coordinate: this rank's pp coordinate (None for dry runs).
        example_sizes: the input symbols' example values the costs were evaluated at.
        size_names: the input symbols' readable names ('input_ids.size(0)'), for reports.
    """

    stages: tuple[StageInfo, ...]
    schedule: str
    pp_size: int
    microbatches: int
    balanced: bool
    tied: tuple[tuple[str, tuple[int, ...]], ...] = ()
    coordinate: int | None = None
    example_sizes: dict = field(default_factory=dict, compare=False)
    size_names: dict = field(default_factory=dict, compare=False)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def stages_per_rank(self) -> int:
        return self.num_stages // self.pp_size

    @property
    def local_stages(self) -> tuple[int, ...]:
        """Stage indices this rank runs (all of them in a dry run)."""
        if self.coordinate is None:
            return tuple(range(self.num_stages))
        return tuple(s.index for s in self.stages if s.rank == self.coordinate)

    @property
    def balance_ratio(self) -> float:
        """max stage time / mean stage time (1.0 is perfect balance)."""
        times = [s.time_value for s in self.stages]
        mean = sum(times) / len(times)
        return max(times) / mean if mean > 0 else 1.0


def stage_info(gm: fx.GraphModule) -> PipelineSplitInfo | None:
    """The split of a GraphModule made by split_stages, or None if it was not split."""
    info = gm.meta.get(STAGES_KEY)
    return info if isinstance(info, PipelineSplitInfo) else None


def resolve_stages(plan: Plan, pp: PipelineMeshInfo | None) -> tuple[ScheduleSpec, int, int, int] | None:
    """(schedule, number of stages S, pp size, microbatches) for a plan on a pp mesh dim.

    None when there is nothing to pipeline (no pp dim or size 1, and no pp in the plan).

    Raises:
        ScheduleError: stage counts that do not fit the schedule or the pp mesh dim, with the fix.
    """
    pp_size = pp.size if pp is not None else None
    if plan.pp is None and (pp_size is None or pp_size == 1) and plan.schedule is None:
        return None
    if isinstance(plan.pp, tuple):
        num_stages = len(plan.pp) + 1
    elif isinstance(plan.pp, int):
        num_stages = plan.pp
    else:
        num_stages = None
    name = plan.schedule
    if name is None:
        name = "interleaved_1f1b" if (num_stages and pp_size and num_stages > pp_size) else "1f1b"
    spec = SCHEDULES[name]
    if num_stages is None:
        num_stages = (pp_size or 1) * (spec.stages_per_rank or 2)
    if pp_size is None:  # dry run without a pp dim: as many ranks as the schedule wants
        per = spec.stages_per_rank or 2
        pp_size = num_stages // per if num_stages % per == 0 else num_stages
    where = f"pp={plan.pp!r}" if plan.pp is not None else "the mesh's pp dim"
    if num_stages % pp_size:
        cuts = " (n cut points make n + 1 stages)" if isinstance(plan.pp, tuple) else ""
        raise ScheduleError(f"{where} gives {num_stages} stages, which do not divide over {pp_size} pp ranks; "
                            f"use a multiple of {pp_size} stages{cuts}")
    per_rank = num_stages // pp_size
    if spec.stages_per_rank is not None and per_rank != spec.stages_per_rank:
        fix = (f"use {spec.stages_per_rank * pp_size} stages" if spec.stages_per_rank != 1 else
               f"use {pp_size} stages, or schedule='interleaved_1f1b' for {per_rank} stages per rank")
        raise ScheduleError(f"schedule '{name}' runs {spec.stages_per_rank} stage(s) per rank but {where} gives "
                            f"{num_stages} stages on {pp_size} pp ranks ({per_rank} per rank); {fix}")
    if spec.stages_per_rank is None and per_rank < 2:
        raise ScheduleError(f"schedule '{name}' interleaves two or more stages per rank but {where} gives "
                            f"{num_stages} stages on {pp_size} pp ranks; use {2 * pp_size} stages "
                            f"(Plan(pp={2 * pp_size})) or schedule='1f1b'")
    microbatches = plan.microbatches or num_stages
    if name == "1f1b" and microbatches < num_stages:
        raise ScheduleError(f"schedule '1f1b' needs at least as many microbatches as stages ({num_stages}), "
                            f"got microbatches={microbatches}; raise microbatches or use schedule='gpipe'")
    if name == "dualpipev" and microbatches < num_stages:
        raise ScheduleError(f"schedule 'dualpipev' needs at least as many microbatches as stages ({num_stages}), "
                            f"got microbatches={microbatches}")
    if name in ("interleaved_1f1b", "interleaved_zb"):
        rounds = max(1, microbatches // pp_size)
        if microbatches % rounds:
            raise ScheduleError(f"schedule '{name}' on {pp_size} pp ranks needs microbatches divisible by "
                                f"max(1, microbatches // {pp_size}) = {rounds}; got {microbatches}; "
                                f"use a multiple of {pp_size}")
    return spec, num_stages, pp_size, microbatches


def split_pp_mesh(mesh: Any, mesh_info: MeshInfo) -> tuple[Any, MeshInfo, PipelineMeshInfo]:
    """(the mesh without its pp dim, its MeshInfo, the pp dim) for compiling one stage.

    Placements are per stage: a value lives on one pp coordinate, so the
    passes see only the other dims (an empty mesh for a pp-only mesh).

    Raises:
        PlanError: a pipeline plan on a mesh without a 'pp' dim.
    """
    if not mesh_info.has("pp"):
        raise PlanError(f"the plan asks for a pipeline (pp, schedule) but the mesh {mesh_info} has no 'pp' dim; "
                        "add one to mesh_dim_names (size 1 runs every stage on each rank)")
    d = mesh_info.index("pp")
    others = tuple(n for n in mesh_info.names if n != "pp")
    if others:
        sub = mesh[others if len(others) > 1 else others[0]]
        info = MeshInfo.from_device_mesh(sub)
    else:
        sub, info = None, MeshInfo((), (), (), ())
    coordinate = mesh_info.coordinate[d] if mesh_info.coordinate is not None else None
    return sub, info, PipelineMeshInfo(mesh_info.sizes[d], coordinate)


def stage_ranks(schedule: str, num_stages: int, pp_size: int) -> dict[int, int]:
    """Stage index -> pp coordinate, as torch's schedule places them."""
    return stage_to_rank_mapping(pp_size, num_stages, style=SCHEDULES[schedule].style)
