"""Dry runs: the plan parallelize would make, for any mesh, without a process group.

    report = fxpar.plan(model, mesh_shape={"dp": 8, "pp": 4, "tp": 8}, example_inputs=(ids,))
    print(report.explain())            # placements, collectives, memory per rank, stages, fallbacks
    fxpar.save_plan(report.plan, "plan.json")

A dry run compiles the model with the same code path as `parallelize`
(`fxpar.api.compile_model`) on a `MeshInfo` built from sizes: this rank is
rank 0 (coordinate 0 on every dim), groups are named 'dryrun:<dim>', so every
pass runs as on a real rank 0 and inserts its collectives, which never run.
The plan is therefore the one parallelize makes, by construction, at any
mesh size (64 to 1024 ranks cost the same as 8). Models may live on the meta
device: nothing reads a value, parameters are sliced as meta tensors.

With a pp dim, the passes see the mesh without it and every stage is compiled
here (no pp coordinate), as `fxpar.pipeline.split_pp_mesh` does for a real
mesh; torch's schedule order is computed with stand-in stages (no process
group) and simulated for the bubble fraction and the timeline.

Memory per rank (`memory_per_rank`), for each pp rank (all ranks of one pp
coordinate hold the same shapes):

    parameters  P = sum of local shard bytes of the parameters its stages hold
    gradients   G = bytes of the trainable ones among them (same dtype and shards)
    optimizer   O = 2 x 4 bytes x local elements of the trainable parameters
                    (AdamW's exp_avg and exp_avg_sq in float32; `optimizer_bytes_per_element`)
    total       P + G + O + buffers; activations and FSDP's gathered parameters in flight are not counted

and, beside the total, a peak activation estimate A: the local bytes of every
floating-point value a compute node produces in the forward (an upper bound
on what autograd saves), per stage at the example batch; with a pipeline a
stage holds 1/M of that per microbatch in flight: M with GPipe, min(M, S - s)
for stage s of S with 1F1B, and M (the bound) for the other schedules.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch.fx as fx
import torch.nn as nn

from fxpar.dataflow import attr_of
from fxpar.errors import PlanError
from fxpar.mesh import MeshInfo
from fxpar.spec import TensorSpec, get_info

__all__ = [
    "DryRunReport",
    "RankMemory",
    "TimelineEntry",
    "plan",
    "parse_mesh",
    "dry_mesh",
    "memory_per_rank",
    "memory_lines",
    "grad_sync_lines",
    "schedule_order",
    "simulate_schedule",
    "schedule_lines",
]

ADAMW_BYTES_PER_ELEMENT = 8  # exp_avg + exp_avg_sq, float32 each


# --------------------------------------------------------------------------- the mesh


def parse_mesh(mesh_shape: Any) -> dict[str, int]:
    """{'dp': 2, 'tp': 4} from a dict, a 'dp=2,tp=4' string, (name, size) pairs, a MeshInfo or a DeviceMesh.

    Raises:
        PlanError: a malformed entry or a size that is not a positive int.
    """
    if isinstance(mesh_shape, MeshInfo):
        return dict(zip(mesh_shape.names, mesh_shape.sizes))
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
    """`fxpar.pipeline.split_pp_mesh` without a DeviceMesh: the other dims at coordinate 0, every stage here."""
    from fxpar.pipeline import PipelineMeshInfo, split_pp_mesh

    if not mesh_info.has("pp"):
        return split_pp_mesh(None, mesh_info)  # raises its PlanError: a pipeline plan needs a pp dim
    d = mesh_info.index("pp")
    keep = [m for m in range(mesh_info.ndim) if m != d]
    info = MeshInfo(tuple(mesh_info.names[m] for m in keep), tuple(mesh_info.sizes[m] for m in keep),
                    tuple(mesh_info.coordinate[m] for m in keep), tuple(mesh_info.group_names[m] for m in keep))
    return None, info, PipelineMeshInfo(mesh_info.sizes[d], None)


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class RankMemory:
    """Memory of the ranks at one pp coordinate (or of every rank, without a pipeline), in bytes.

    Attributes:
        pp_rank: the pp coordinate, None without a pipeline.
        ranks: how many ranks hold this much (the other mesh dims).
        stages: the pipeline stages they run.
        parameters, gradients, optimizer, buffers: bytes (see the module docstring).
        activations: peak activation estimate in bytes (see `activation_bytes`); not in `total`.
    """

    pp_rank: int | None
    ranks: int
    stages: tuple[int, ...]
    parameters: int
    gradients: int
    optimizer: int
    buffers: int
    activations: int = 0

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.buffers

    @property
    def label(self) -> str:
        return "every rank" if self.pp_rank is None else f"pp rank {self.pp_rank}"


@dataclass(frozen=True)
class TimelineEntry:
    """One compute action of a simulated pipeline schedule.

    Attributes:
        rank: the pp rank running it.
        kind: 'F' forward, 'B' full backward, 'I' input backward, 'W' weight backward.
        stage: the stage index.
        microbatch: the microbatch index.
        start, end: simulated time, in units of one stage forward.
    """

    rank: int
    kind: str
    stage: int
    microbatch: int
    start: float
    end: float


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
        """The resolved plan (`fxpar.plan_io.ResolvedPlan`), as `pm.plan` of a real run."""
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

    def memory(self, *, optimizer_bytes_per_element: int = ADAMW_BYTES_PER_ELEMENT) -> list[RankMemory]:
        return memory_per_rank(self.module, self.mesh, optimizer_bytes_per_element=optimizer_bytes_per_element)

    def timeline(self) -> list[TimelineEntry]:
        """The pipeline schedule simulated with equal stage times ([] without a pipeline)."""
        from fxpar.pipeline import stage_info

        split = stage_info(self.graph_module)
        if split is None:
            return []
        return simulate_schedule(schedule_order(split), split.num_stages)[0]

    def explain(self) -> str:
        """explain() of the rank-0 module, with memory per rank, gradient sync and the simulated schedule."""
        from fxpar.explain import explain

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
         progress: Callable[[str], None] | None = None) -> DryRunReport:
    """Plans `model` for a mesh of the given sizes without a process group (a dry run).

    Runs the same capture and passes as `fxpar.parallelize` for rank 0 of the
    mesh; collectives are inserted but never run. Works for any mesh size and
    for models on the meta device (example inputs on meta, or real integer
    tensors such as token ids).

    Args:
        model: the model; never modified. May live on the meta device.
        mesh_shape: {'dp': 8, 'pp': 4, 'tp': 8}, 'dp=8,pp=4,tp=8', a MeshInfo, or a DeviceMesh (its sizes).
        example_inputs, example_kwargs: example inputs, as for parallelize.
        plan: a fxpar.Plan, {glob: style} dict, a saved plan (`fxpar.load_plan`), or None (automatic).
        passes: the pass list (default: fxpar.default_passes()).
        input_layout: as for parallelize.
        check: run the invariant checks after every pass (default: as parallelize, but off for
            meta-device models, whose checks run on CPU fake tensors).
        progress: called with 'capture', 'passes' and 'done' as each step starts.

    Returns:
        A DryRunReport: `.explain()`, `.plan` (the resolved plan), `.memory()`,
        `.timeline()`, `.module` (the rank-0 ParallelModule).

    Raises:
        PlanError, ShardingError, ScheduleError, CaptureError: as parallelize would.
    """
    from fxpar.api import compile_model

    if input_layout not in ("full", "local"):
        raise PlanError(f"input_layout={input_layout!r}: use 'full' (every rank passes the same full inputs) "
                        "or 'local' (each rank passes its own batch shard)")
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
                           split_pp=_split_pp_dry, progress=step)
    step("done")
    for (name, t0), (_, t1) in zip(marks, marks[1:]):
        seconds[name] = t1 - t0
    seconds["total"] = time.perf_counter() - start
    return DryRunReport(module, mesh_info, seconds, ())


# --------------------------------------------------------------------------- memory


def _stage_graphs(pm) -> dict[int | None, tuple[tuple[int, ...], list[fx.GraphModule]]]:
    """pp rank -> (its stages, their graphs); {None: ((), [graph])} without a pipeline."""
    from fxpar.pipeline import stage_info

    gm = pm.graph_module
    split = stage_info(gm)
    if split is None:
        return {None: ((), [gm])}
    out: dict[int | None, tuple[tuple[int, ...], list[fx.GraphModule]]] = {}
    for r in range(split.pp_size):
        stages = tuple(s.index for s in split.stages if s.rank == r)
        out[r] = (stages, [gm.get_submodule(f"stage_{k}") for k in stages])
    return out


def memory_per_rank(pm, mesh: MeshInfo | None = None, *,
                    optimizer_bytes_per_element: int = ADAMW_BYTES_PER_ELEMENT) -> list[RankMemory]:
    """Parameter, gradient, optimizer-state and buffer bytes per rank, one entry per pp rank.

    Args:
        pm: a ParallelModule (a dry run's or a real one).
        mesh: the whole mesh (default: pm's, with the pp dim put back), for the rank counts.
        optimizer_bytes_per_element: optimizer state bytes per trainable
            parameter element (AdamW in float32: 8; SGD with momentum: 4).

    Returns:
        One RankMemory per pp rank (one for every rank without a pipeline).
    """
    from fxpar.plan_io import _full_mesh

    sizes = dict(zip(mesh.names, mesh.sizes)) if mesh is not None else dict(_full_mesh(pm))
    others = 1
    for name, s in sizes.items():
        others *= 1 if name == "pp" else s
    out = []
    for pp_rank, (stages, graphs) in _stage_graphs(pm).items():
        params = grads = opt = buffers = 0
        seen: set[str] = set()
        for g in graphs:
            for node in g.graph.nodes:
                info = get_info(node)
                if node.op != "get_attr" or info is None or not isinstance(info.spec, TensorSpec):
                    continue
                if node.target in seen:  # a tied weight in two stages of one rank is one tensor
                    continue
                seen.add(node.target)
                t = attr_of(g, node.target)
                local = info.spec.nbytes(local=True)
                if not isinstance(t, nn.Parameter):
                    buffers += local
                    continue
                params += local
                if t.requires_grad:
                    grads += local
                    opt += local // info.spec.dtype.itemsize * optimizer_bytes_per_element
        out.append(RankMemory(pp_rank, others, stages, params, grads, opt, buffers,
                              _peak_activations(pm, stages, graphs)))
    return out


def activation_bytes(gm: fx.GraphModule) -> int:
    """Local bytes of the floating-point values the compute nodes of `gm` produce (views excluded)."""
    from fxpar.passes._cost import VIEW_OPS  # the cost model's list of ops that allocate nothing

    total = 0
    for node in gm.graph.nodes:
        info = get_info(node)
        if node.op != "call_function" or info is None or info.role != "compute" or node.target in VIEW_OPS:
            continue
        specs = info.spec if isinstance(info.spec, tuple) else (info.spec,)
        for spec in specs:
            if isinstance(spec, TensorSpec) and spec.dtype.is_floating_point:
                total += spec.nbytes(local=True)
    return total


def _peak_activations(pm, stages: tuple[int, ...], graphs: list[fx.GraphModule]) -> int:
    from fxpar.pipeline import stage_info

    split = stage_info(pm.graph_module)
    if split is None:
        return sum(activation_bytes(g) for g in graphs)
    m, s = split.microbatches, split.num_stages
    total = 0
    for k, g in zip(stages, graphs):
        in_flight = min(m, s - k) if split.schedule == "1f1b" else m
        total += activation_bytes(g) * in_flight // m
    return total


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def memory_lines(memory: list[RankMemory]) -> list[str]:
    """The 'memory per rank' section of a dry run's explain()."""
    lines = ["Memory per rank (parameters, gradients, optimizer state assuming AdamW: 2 float32 values per "
             "trainable parameter element; FSDP's gathered parameters in flight not counted; activations: every "
             "forward value of the compute nodes, microbatches in flight per the schedule, not in the total):"]
    for m in memory:
        stages = f", stages {list(m.stages)}" if m.stages else ""
        lines.append(f"  {m.label} ({m.ranks} rank{'s' if m.ranks > 1 else ''}{stages}): parameters {_fmt(m.parameters)}, gradients "
                     f"{_fmt(m.gradients)}, optimizer {_fmt(m.optimizer)}"
                     + (f", buffers {_fmt(m.buffers)}" if m.buffers else "") + f"; total {_fmt(m.total)}"
                     + f"; peak activations ~{_fmt(m.activations)}")
    if len(memory) > 1:
        worst = max(memory, key=lambda m: m.total)
        lines.append(f"  most loaded: {worst.label}, {_fmt(worst.total)}")
    return lines


def grad_sync_lines(pm) -> list[str]:
    """Data-parallel gradient all-reduces of bucket_grad_sync (hooks at run time, so not graph nodes)."""
    buckets: dict[tuple[int, tuple[str, ...]], int] = {}
    graphs = [g for _, gs in _stage_graphs(pm).values() for g in gs]
    seen: set[str] = set()
    for g in graphs:
        for node in g.graph.nodes:
            info = get_info(node)
            sync = info.extra.get("grad_sync") if info is not None and node.op == "get_attr" else None
            if not sync or node.target in seen or not isinstance(info.spec, TensorSpec):
                continue
            seen.add(node.target)
            key = (sync["bucket"], tuple(sync["dims"]))
            buckets[key] = buckets.get(key, 0) + info.spec.nbytes(local=True)
    if not buckets:
        return []
    total = sum(buckets.values())
    dims = sorted({d for _, ds in buckets for d in ds})
    from fxpar.pipeline import stage_info

    when = ("once per step after the pipeline schedule" if stage_info(pm.graph_module) is not None
            else "asynchronous in the backward")
    return [f"Data-parallel gradient all-reduce (bucketed, {when}; all stages): "
            f"{len(buckets)} bucket{'s' if len(buckets) > 1 else ''}, {_fmt(total)} per step over {', '.join(dims)}"]


# --------------------------------------------------------------------------- schedules


class _StandInStage:
    """What torch's schedule constructors read from a PipelineStage, without a process group."""

    def __init__(self, index: int, num_stages: int, pp_size: int, rank: int) -> None:
        self.stage_index = index
        self.num_stages = num_stages
        self.group_size = pp_size
        self.group_rank = rank
        self.is_first = index == 0
        self.is_last = index == num_stages - 1
        self.stage_index_to_group_rank: dict[int, int] = {}
        self.submod = nn.Module()


def _single_stage_order(name: str, pp: int, m: int) -> dict[int, list]:
    """GPipe and 1F1B as torch's schedules run them (their own `_get_pipeline_order` is a sketch)."""
    from torch.distributed.pipelining.schedules import _Action, _ComputationType

    F, B = _ComputationType.FORWARD, _ComputationType.FULL_BACKWARD
    order = {}
    for r in range(pp):
        if name == "gpipe":
            actions = [_Action(r, F, i) for i in range(m)] + [_Action(r, B, i) for i in range(m)]
        else:  # Schedule1F1B._step_microbatches: min(m, S - s) forwards, then B/F pairs, then the rest
            warmup = min(m, pp - r)
            actions = [_Action(r, F, i) for i in range(warmup)]
            f, b = warmup, 0
            while b < m:
                actions.append(_Action(r, B, b))
                b += 1
                if f < m:
                    actions.append(_Action(r, F, f))
                    f += 1
        order[r] = actions
    return order


def schedule_order(split) -> dict[int, list]:
    """torch's compute actions per pp rank for a training step of this split, without a process group.

    Args:
        split: the PipelineSplitInfo of a compiled module.

    Returns:
        {pp rank: [torch _Action or None, ...]} as torch's schedule orders them.
    """
    from fxpar.pipeline import SCHEDULES, stage_ranks

    spec = SCHEDULES[split.schedule]
    if not spec.multi:
        return _single_stage_order(split.schedule, split.pp_size, split.microbatches)
    ranks = stage_ranks(split.schedule, split.num_stages, split.pp_size)
    stages = [_StandInStage(k, split.num_stages, split.pp_size, 0) for k in range(split.num_stages)
              if ranks[k] == 0]
    sched = spec.cls(stages, split.microbatches, loss_fn=lambda out, target: out, scale_grads=False)
    return dict(sched.pipeline_order)


def simulate_schedule(order: dict[int, list], num_stages: int) -> tuple[list[TimelineEntry], float | None]:
    """Start and end of every compute action, with equal stage times: the timeline and its bubble fraction.

    The rules are those of `fxpar.pipeline.bubble_fraction`: F(s, i) after
    F(s-1, i); B or I(s, i) after F(s, i) and the B or I of (s+1, i); W after
    I; F = I = W = 1, B = 2, an overlapped action takes the sum of its parts;
    each rank runs its actions in order.

    Returns:
        (entries, 1 - busy / (ranks x makespan)); ([], None) if the order cannot be simulated.
    """
    durations = {"F": 1.0, "I": 1.0, "W": 1.0, "B": 2.0}
    done: dict[tuple[str, int, int], float] = {}
    queues = {r: [a for a in actions if a is not None] for r, actions in order.items()}
    free = {r: 0.0 for r in queues}
    entries: list[TimelineEntry] = []

    def deps(kind: str, s: int, i: int) -> list[tuple[str, int, int]] | None:
        if kind == "F":
            return [("F", s - 1, i)] if s > 0 else []
        if kind in ("B", "I"):
            return [("F", s, i)] + ([("BI", s + 1, i)] if s < num_stages - 1 else [])
        if kind == "W":
            return [("I", s, i)]
        return None

    def finished(key: tuple[str, int, int]) -> float | None:
        if key[0] == "BI":
            return done.get(("B", key[1], key[2]), done.get(("I", key[1], key[2])))
        return done.get(key)

    progress = True
    while progress and any(queues.values()):
        progress = False
        for r, q in queues.items():
            while q:
                parts = list(q[0].sub_actions) if q[0].sub_actions else [q[0]]
                ready, blocked, work = free[r], False, []
                for p in parts:
                    kind = p.computation_type.value
                    d = deps(kind, p.stage_index, p.microbatch_index)
                    if d is None:  # REDUCE_GRAD and the like take no time here
                        continue
                    times = [finished(k) for k in d]
                    if any(t is None for t in times):
                        blocked = True
                        break
                    ready = max([ready, *times])
                    work.append(p)
                if blocked:
                    break
                t = ready
                for p in work:
                    kind = p.computation_type.value
                    entries.append(TimelineEntry(r, kind, p.stage_index, p.microbatch_index, t, t + durations[kind]))
                    t += durations[kind]
                    done[(kind, p.stage_index, p.microbatch_index)] = t
                free[r] = t
                q.pop(0)
                progress = True
    if any(queues.values()) or not free:
        return [], None
    makespan = max(free.values())
    busy = sum(e.end - e.start for e in entries)
    return entries, (1.0 - busy / (len(free) * makespan) if makespan > 0 else 0.0)


def schedule_lines(pm) -> list[str]:
    """The simulated schedule of a pipelined module, for explain()."""
    from fxpar.pipeline import stage_info

    split = stage_info(pm.graph_module)
    if split is None:
        return []
    entries, bubble = simulate_schedule(schedule_order(split), split.num_stages)
    if bubble is None:
        return []
    makespan = max(e.end for e in entries)
    return ["", f"Schedule '{split.schedule}' simulated from torch's own action order ({split.pp_size} pp ranks, "
            f"{split.microbatches} microbatches, equal stage times, backward = 2 x forward): bubble fraction "
            f"{bubble:.3f}, step = {makespan:g} forward-stage times"]
