"""Pipeline parallelism: the runtime side of split stages.

`passes/split_stages.py` cuts this rank's (already tensor-parallel) graph into
stage GraphModules and records a `PipelineSplitInfo` in
`gm.meta["fxpar_stages"]`. This module turns that into a running pipeline:

- `PipelineModule` (a `ParallelModule`) wraps this rank's stage modules in
  torch.distributed.pipelining `PipelineStage`s on the `pp` process group of
  its mesh coordinate and runs torch's own schedules (`SCHEDULES`): `step()`
  trains with microbatches and a loss on the last stage, `forward()` runs a
  forward-only pipeline; both return the same full values on every rank.
- Weights used by several stages (tied embedding and lm_head) have one copy
  per owning rank; after backward their gradients are summed over exactly
  those ranks, once.
- `explain_stages()` is the stages section of `explain()`: cuts, cost and
  parameter bytes per stage, activation bytes crossing each cut, and the
  schedule's bubble fraction from a simulation of torch's own schedule IR.

Data parallelism (dp / fsdp mesh dims beside pp): every rank passes the full
batch; stage 0 keeps this rank's rows of each microbatch (shard_inputs' `shard`
nodes), the last stage's loss sees the matching rows of the target, and each
microbatch loss on each data shard is scaled by 1 / (microbatches x shards) for
a mean. Gradients of data-replicated parameters are summed over the data dims
once per step, after the schedule (one flat all-reduce per bucket and dim):
hooks per backward would reduce them once per microbatch. FSDP parameters are
gathered and their gradients reduce-scattered per microbatch by the graph
(reshard_after_forward=True, the default: least memory), or gathered once per
step, kept for it, and their summed gradients reduce-scattered once after the
schedule (reshard_after_forward=False: the analytical FSDP volume).

Gradient scaling: torch's schedules divide gradients by the number of
microbatches when `scale_grads=True`, which is right only for mean losses and
divides gradients accumulated before the step too. fxpar runs them with
`scale_grads=False` and scales each microbatch's loss instead (1/M for
`loss_reduction="mean"`, 1 for "sum"), so `.grad` accumulates exactly as
`loss.backward()` does on the unsplit model.

Limits: inputs, targets and outputs are split and merged along dim 0; `pm(...)`
is inference (no autograd through it: train with `step`). Each input shape
builds its own stages, whose microbatch shapes, dtypes and requires_grad come
from a FakeTensor run of the stages in order (`_stage_io`), given to torch as
static metadata: torch's dynamic metadata inference would run every stage for
real once more on the first step, on uninitialized tensors past stage 0
(integer ids crossing a cut index garbage, as T5's and BART's decoder ids
do), updating buffers (BatchNorm's running statistics) and drawing random
numbers. Transfers are dense: the metadata is contiguous, and input
gradients are made contiguous before they are sent (`_Stage`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping
from torch.distributed.tensor.placement_types import Shard
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from fxpar.collectives import _record
from fxpar.dataflow import attr_of
from fxpar.errors import PlanError, ScheduleError
from fxpar.mesh import MeshInfo
from fxpar.plan import Plan
from fxpar.runtime import ParallelModule
from fxpar.spec import TensorSpec, get_info

__all__ = [
    "ScheduleSpec",
    "SCHEDULES",
    "PipelineMeshInfo",
    "StageInfo",
    "PipelineSplitInfo",
    "STAGES_KEY",
    "resolve_stages",
    "split_pp_mesh",
    "stage_info",
    "bubble_fraction",
    "PipelineModule",
    "explain_stages",
]

log = logging.getLogger(__name__)

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
        flops, mem_bytes, comm_bytes, time: symbolic cost (see passes/_cost.py),
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
    """

    stages: tuple[StageInfo, ...]
    schedule: str
    pp_size: int
    microbatches: int
    balanced: bool
    tied: tuple[tuple[str, tuple[int, ...]], ...] = ()
    coordinate: int | None = None
    example_sizes: dict = field(default_factory=dict, compare=False)

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
    return generate_stage_to_rank_mapping(pp_size, num_stages, style=SCHEDULES[schedule].style)


# --------------------------------------------------------------------------- bubble fraction


def bubble_fraction(pipeline_order: dict[int, list], num_stages: int) -> float | None:
    """Idle fraction of a schedule's compute actions, simulated with equal stage times.

    Every rank runs its actions in the schedule's order; an action starts when
    its rank is free and its inputs exist:

        F(s, i)       after F(s-1, i)
        B(s, i), I(s, i)  after F(s, i) and the B or I of (s+1, i)
        W(s, i)       after I(s, i)

    with durations F = I = W = 1 and B = I + W = 2 (backward costs twice the
    forward), overlapped F/B pairs taking the sum of their parts, and no
    communication time. Returns 1 - busy / (ranks * makespan), or None when
    the order cannot be simulated.
    """
    durations = {"F": 1.0, "I": 1.0, "W": 1.0, "B": 2.0}
    done: dict[tuple[str, int, int], float] = {}

    def parts(action) -> list:
        if action.sub_actions:
            return list(action.sub_actions)
        return [action]

    def deps(a) -> list[tuple[str, int, int]] | None:
        kind, s, i = a.computation_type.value, a.stage_index, a.microbatch_index
        if kind == "F":
            return [("F", s - 1, i)] if s > 0 else []
        if kind in ("B", "I"):
            out = [("F", s, i)]
            if s < num_stages - 1:
                out.append(("BI", s + 1, i))
            return out
        if kind == "W":
            return [("I", s, i)]
        return None

    queues = {r: [a for a in actions if a is not None] for r, actions in pipeline_order.items()}
    free = {r: 0.0 for r in queues}
    busy = 0.0
    progress = True
    while progress and any(queues.values()):
        progress = False
        for r, q in queues.items():
            while q:
                action = q[0]
                ready = free[r]
                dur = 0.0
                blocked = False
                for p in parts(action):
                    kind = p.computation_type.value
                    d = deps(p)
                    if d is None:  # REDUCE_GRAD and the like take no time here
                        continue
                    for key in d:
                        t = done.get(key) if key[0] != "BI" else done.get(("B", key[1], key[2]),
                                                                           done.get(("I", key[1], key[2])))
                        if t is None:
                            blocked = True
                            break
                        ready = max(ready, t)
                    if blocked:
                        break
                    dur += durations[kind]
                if blocked:
                    break
                finish = ready + dur
                for p in parts(action):
                    if p.computation_type.value in durations:
                        done[(p.computation_type.value, p.stage_index, p.microbatch_index)] = finish
                free[r] = finish
                busy += dur
                q.pop(0)
                progress = True
    if any(queues.values()) or not free:
        return None
    makespan = max(free.values())
    return 1.0 - busy / (len(free) * makespan) if makespan > 0 else 0.0


# --------------------------------------------------------------------------- runtime


def _flattener(gm: fx.GraphModule) -> Callable[..., list]:
    """A function mapping forward's (*args, **kwargs) to the graph's flat placeholder values."""
    codegen = gm.graph._codegen
    if not isinstance(codegen, _PyTreeCodeGen):
        return lambda *args, **kwargs: [*args, *kwargs.values()]
    graph = fx.Graph()
    placeholders = [graph.placeholder(n.name) for n in gm.graph.nodes if n.op == "placeholder"]
    graph.output(tuple(placeholders))
    info = codegen.pytree_info
    graph._codegen = _PyTreeCodeGen(_PyTreeInfo(info.orig_args, info.in_spec, None))
    flat = fx.GraphModule({}, graph, class_name="FlattenInputs")
    flat._in_spec = info.in_spec
    return lambda *args, **kwargs: list(flat(*args, **kwargs))


def _out_spec(gm: fx.GraphModule):
    codegen = gm.graph._codegen
    return codegen.pytree_info.out_spec if isinstance(codegen, _PyTreeCodeGen) else None


def _forward_actions_only(sched: Any) -> None:
    """Makes a V-shaped schedule run forward only: its own order with the backward actions left out.

    torch's V schedules (ZB-V, DualPipeV) list backward actions even without a
    loss and fail on them; the forward actions in the schedule's order,
    lowered with torch's own send/recv pass, are a valid forward pipeline.
    """
    from torch.distributed.pipelining.schedules import _add_send_recv, _ComputationType

    forward = {
        rank: [part for a in actions if a is not None for part in (a.sub_actions or (a,))
               if part.computation_type == _ComputationType.FORWARD]
        for rank, actions in sched.pipeline_order.items()
    }
    sched.pipeline_order_with_comms = _add_send_recv(
        forward, stage_to_rank=lambda s: sched.stage_index_to_group_rank[s], num_stages=sched._num_stages)


class _Loss:
    """The loss torch's schedule calls on the last stage: the user's loss on the model's output structure,
    scaled so that the summed microbatch losses are the global loss."""

    def __init__(self, out_spec, loss_fn: Callable, scale: float, cut: Callable | None = None) -> None:
        self.out_spec = out_spec
        self.loss_fn = loss_fn
        self.scale = scale
        self.cut = cut  # this rank's rows of a microbatch's target, when the data dims split the batch

    def __call__(self, output: Any, target: Any) -> torch.Tensor:
        flat = [output] if isinstance(output, torch.Tensor) else list(output)
        out = pytree.tree_unflatten(flat, self.out_spec) if self.out_spec is not None else \
            (flat[0] if len(flat) == 1 else tuple(flat))
        loss = self.loss_fn(out, self.cut(target) if self.cut is not None else target)
        return loss * self.scale if self.scale != 1.0 else loss


class _Stage(PipelineStage):
    """torch's PipelineStage, sending input gradients as contiguous tensors.

    Autograd may return a strided gradient (through a transpose or an expand, as in
    nn.Transformer's decoder); point-to-point transfers need dense buffers, and the previous
    stage's receive buffer is contiguous. (`bwd_cache` is torch's per-microbatch store of the
    input gradients get_bwd_send_ops sends; no public hook exists for it.)
    """

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list:
        grads = self.bwd_cache.get(bwd_chunk_id)
        if grads is not None:
            self.bwd_cache[bwd_chunk_id] = tuple(
                g.contiguous() if isinstance(g, torch.Tensor) else g for g in grads)
        return super().get_bwd_send_ops(bwd_chunk_id)


class PipelineModule(ParallelModule):
    """A model compiled for one rank of a mesh with a `pp` dim: this rank's pipeline stages.

    Every rank passes the same full inputs and gets the same full outputs.
    `parameters()` yields the parameters of this rank's stages only (tensor
    parallel shards where a tp dim shards them); a tied weight held by
    several ranks appears on each of them, with equal values and gradients.

    Attributes:
        graph_module: the split GraphModule: a parent calling `stage_0 ...
            stage_{S-1}` (stages of other ranks hold storage-free stand-ins).
        stage_modules: this rank's stage GraphModules, in stage order.
        split: the PipelineSplitInfo.
        mesh_info: the mesh without its pp dim (the one placements refer to).
    """

    def __init__(self, graph_module: fx.GraphModule, *, mesh: Any, mesh_info: MeshInfo, plan: Any,
                 history: list, pp_dim: int, example_args: tuple = (),
                 example_kwargs: dict | None = None, reshard_after_forward: bool = True) -> None:
        split = stage_info(graph_module)
        if split is None:
            raise ScheduleError("the mesh has a pp dim but no pass split the graph into stages; keep "
                                "fxpar.passes.split_stages in the pass list (see fxpar.default_passes())")
        if split.schedule in SPLIT_BACKWARD and mesh_info.size("fsdp") > 1:
            # Their weight-gradient pass finds a stage's weights through autograd's graph, and an FSDP
            # gather between a parameter and its use hides it: gradients went missing or wrong.
            raise ScheduleError(f"schedule '{split.schedule}' splits the backward into input and weight "
                                "gradients, which fxpar does not support with fsdp yet; use schedule='1f1b', "
                                "'interleaved_1f1b', 'looped_bfs' or 'gpipe' with fsdp, or 'dp' instead of fsdp")
        super().__init__(graph_module, mesh=mesh, mesh_info=mesh_info, plan=plan, history=history,
                         example_args=example_args, example_kwargs=example_kwargs,
                         reshard_after_forward=reshard_after_forward)
        # The parent holds other ranks' stages as stand-ins: keep it out of parameters().
        del self._modules["graph_module"]
        object.__setattr__(self, "graph_module", graph_module)
        self.stage_modules = nn.ModuleList([graph_module.get_submodule(f"stage_{k}") for k in split.local_stages])
        self.split = split
        self._pp_dim = pp_dim
        self._pp_group = mesh.get_group(pp_dim) if mesh is not None else None
        self._flatten = _flattener(graph_module)
        self._out_spec = _out_spec(graph_module)
        self._schedules: dict[tuple, Any] = {}
        self._broadcast_meta: dict[tuple, list] = {}
        self._tied_groups = self._make_tied_groups()
        self._device = self._pick_device()
        self._data_synced = self._data_synced_params()
        self._fsdp_buckets = self._register_fsdp_buckets()  # now that the stages are known
        self._fsdp_sharded = self._fsdp_params()

    def _stage_graphs(self) -> list[fx.GraphModule]:
        return list(getattr(self, "stage_modules", ()))

    def _hook_grad_sync(self):
        # A pipeline runs one backward per microbatch: per-backward hooks would all-reduce every
        # gradient once per microbatch. `_sync_data_grads` reduces the step's sum once instead.
        return None

    # ------------------------------------------------------------------ set-up

    def _pick_device(self) -> torch.device:
        for p in self.stage_modules.parameters():
            return p.device
        if self.mesh is not None and self.mesh.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _data_synced_params(self) -> list[tuple[nn.Parameter, tuple[str, ...], int]]:
        """This rank's parameters whose gradients the data-parallel dims sum (marked by bucket_grad_sync),
        with their dims and bucket, each once."""
        out, seen = [], set()
        for gm in self.stage_modules:
            for node in gm.graph.nodes:
                info = get_info(node) if node.op == "get_attr" else None
                sync = info.extra.get("grad_sync") if info is not None else None
                if not sync:
                    continue
                t = attr_of(gm, node.target)
                if isinstance(t, nn.Parameter) and id(t) not in seen:
                    seen.add(id(t))
                    out.append((t, tuple(sync["dims"]), int(sync["bucket"])))
        return out

    def _pp_ranks_table(self) -> torch.Tensor:
        """Global ranks as a (others, pp) table: row = every other mesh coordinate, column = pp coordinate."""
        ranks = self.mesh.mesh.movedim(self._pp_dim, -1)
        return ranks.reshape(-1, ranks.shape[-1])

    def _make_tied_groups(self) -> dict[str, Any]:
        """A process group over exactly the ranks holding each tied weight (one per owner set).

        Every rank creates every group in the same order (new_group is collective
        over the world), and keeps the ones it belongs to.
        """
        groups: dict[str, Any] = {}
        if self.mesh is None:
            return groups
        ranks = stage_ranks(self.split.schedule, self.split.num_stages, self.split.pp_size)
        me = dist.get_rank()
        by_owners: dict[tuple[int, ...], list[str]] = {}
        for fqn, stages in self.split.tied:
            owners = tuple(sorted({ranks[s] for s in stages}))
            if len(owners) > 1:
                by_owners.setdefault(owners, []).append(fqn)
        table = self._pp_ranks_table()
        for owners, fqns in sorted(by_owners.items()):
            for row in table.tolist():
                members = [row[c] for c in owners]
                group = dist.new_group(members)
                if me in members:
                    for fqn in fqns:
                        groups[fqn] = group
        return groups

    def _local_stage(self, index: int) -> fx.GraphModule:
        return self.graph_module.get_submodule(f"stage_{index}")

    def _schedule(self, kind: str, loss: _Loss | None, shapes: tuple, flat: list | None = None) -> Any:
        """torch's schedule for this rank's stages, built once per (kind, input shapes, loss scale).

        Stages infer their microbatch shapes at the first run, so other input
        shapes get their own stages and schedule.
        """
        # The loss function itself is swapped per call (see step), so it is not part of the key.
        key = (kind, shapes, None if loss is None else loss.scale)
        if key not in self._schedules:
            self._schedules[key] = self._build_schedule(kind, loss, flat)
        return self._schedules[key]

    def _build_schedule(self, kind: str, loss: _Loss | None, flat: list[torch.Tensor] | None = None) -> Any:
        split = self.split
        spec = SCHEDULES[split.schedule]
        io = self._stage_io(flat, train=kind == "train") if flat is not None else None
        stages = [_Stage(self._local_stage(k), k, split.num_stages, self._device, group=self._pp_group,
                         **({"input_args": io[k][0], "output_args": io[k][1]} if io else {}))
                  for k in split.local_stages]
        if kind == "forward" and spec.multi:
            sched = spec.cls(stages, split.microbatches, loss_fn=None, scale_grads=False)
            if spec.style == "v":
                _forward_actions_only(sched)
        elif kind == "forward":
            sched = ScheduleGPipe(stages[0], split.microbatches, loss_fn=None, scale_grads=False)
        elif spec.multi:
            sched = spec.cls(stages, split.microbatches, loss_fn=loss, scale_grads=False)
        else:
            sched = spec.cls(stages[0], split.microbatches, loss_fn=loss, scale_grads=False)
        return sched

    def _stage_io(self, flat: list[torch.Tensor], *, train: bool) -> dict[int, tuple[tuple, tuple]] | None:
        """Every stage's inputs and outputs for one microbatch, as contiguous meta tensors.

        The stages run in order on FakeTensors (no data, no communication, no buffer update, no
        random draw), stage k on stage k-1's outputs as torch's schedule feeds them, so integer
        inputs of later stages need no values. None if a stage cannot run on FakeTensors (a
        data-dependent shape): torch then infers the metadata by running the stages.
        """
        from torch._subclasses.fake_tensor import FakeTensorMode

        m = self.split.microbatches

        def leaf(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
            t = t.detach()
            return t.requires_grad_(requires_grad) if requires_grad and t.is_floating_point() else t

        def meta(t: torch.Tensor) -> torch.Tensor:  # p2p buffers are dense: contiguous strides
            out = torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")
            return out.requires_grad_(True) if t.requires_grad and t.is_floating_point() else out

        # Parameters and buffers go in as FakeTensors too: under allow_non_fake_inputs an in-place op
        # (num_batches_tracked += 1) would update the real buffer.
        mode = FakeTensorMode()
        fakes: dict[int, torch.Tensor] = {}

        def state(stage: nn.Module) -> dict[str, torch.Tensor]:
            named = [*stage.named_parameters(remove_duplicate=False), *stage.named_buffers(remove_duplicate=False)]
            return {n: fakes.setdefault(id(t), mode.from_tensor(t)) for n, t in named}

        io: dict[int, tuple[tuple, tuple]] = {}
        try:
            args = [mode.from_tensor(x.detach()[: x.shape[0] // m]) for x in flat]
            args = [leaf(a, x.requires_grad) for a, x in zip(args, flat)]
            with mode, torch.set_grad_enabled(train):
                for k in range(self.split.num_stages):
                    stage = self.graph_module.get_submodule(f"stage_{k}")
                    outs = torch.func.functional_call(stage, state(stage), tuple(args))
                    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
                    io[k] = (tuple(meta(a) for a in args), tuple(meta(o) for o in outs))
                    args = [leaf(o, o.requires_grad) for o in outs]
        except Exception:  # noqa: BLE001 - data-dependent ops: fall back to torch's own inference
            log.debug("stage metadata: a stage does not run on FakeTensors; torch infers it", exc_info=True)
            return None
        return io

    def pipeline_order(self) -> dict[int, list]:
        """torch's compute actions per pp rank for a training step (the schedule IR; no communication)."""
        for (kind, *_), sched in self._schedules.items():
            if kind == "train":
                break
        else:
            sched = self._build_schedule("train", _Loss(self._out_spec, lambda out, target: out, 1.0))
        order = getattr(sched, "pipeline_order", None)
        return order if order else sched._get_pipeline_order()

    # ------------------------------------------------------------------ running

    def _flat_inputs(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        flat = self._flatten(*args, **kwargs)
        for i, x in enumerate(flat):
            if not isinstance(x, torch.Tensor):
                raise ScheduleError(f"pipelined input {i} is a {type(x).__name__}; a pipeline splits tensor "
                                    "inputs into microbatches along dim 0, so pass tensors only")
        return flat

    def _data_shards(self) -> int:
        n = 1
        for m in self._data_dims():
            n *= self.mesh_info.sizes[m]
        return n

    def _check_batch(self, flat: list[torch.Tensor], target: Any = None) -> None:
        m = self.split.microbatches
        shards = self._data_shards()
        for i, x in enumerate(flat):
            if x.ndim == 0 or x.shape[0] % m:
                size = "a scalar" if x.ndim == 0 else f"batch size {x.shape[0]}"
                raise ScheduleError(f"input {i} has {size}, which does not split into {m} equal microbatches "
                                    f"along dim 0; pass a batch that is a multiple of {m} or set "
                                    f"Plan(microbatches=...) to a divisor of it")
            if shards > 1 and x.shape[0] % (m * shards):
                dims = " x ".join(f"{self.mesh_info.names[d]}={self.mesh_info.sizes[d]}" for d in self._data_dims())
                raise ScheduleError(f"input {i} has batch size {x.shape[0]}: {m} microbatches of "
                                    f"{x.shape[0] // m} rows do not divide over the data-parallel ranks ({dims}); "
                                    f"use a batch that is a multiple of microbatches x data ranks = {m * shards}")
        for t in pytree.tree_leaves(target):
            if isinstance(t, torch.Tensor) and (t.ndim == 0 or t.shape[0] % m):
                raise ScheduleError(f"the target has batch size {t.shape[0] if t.ndim else 'none (a scalar)'}, "
                                    f"which does not split into {m} microbatches along dim 0; give a "
                                    f"target with one row per example")

    def _is_first(self) -> bool:
        return 0 in self.split.local_stages

    def _is_last(self) -> bool:
        return self.split.num_stages - 1 in self.split.local_stages

    def _last_rank(self) -> int:
        """The pp coordinate of the last stage."""
        return self.split.stages[-1].rank

    def _broadcast_from_last(self, values: list[torch.Tensor] | None, key: tuple) -> list[torch.Tensor]:
        """The last stage's tensors on every rank of this pp group (shapes first, then the data).

        Shapes and dtypes are exchanged once per `key` (the input shapes): a pickled object
        broadcast costs milliseconds, the tensors themselves far less.
        """
        meta = self._broadcast_meta.get(key)
        if meta is None:
            box = [[(tuple(v.shape), v.dtype) for v in values] if values is not None else None]
            dist.broadcast_object_list(box, group_src=self._last_rank(), group=self._pp_group, device=self._device)
            meta = self._broadcast_meta[key] = box[0]
        out = []
        for i, (shape, dtype) in enumerate(meta):
            t = values[i].detach().contiguous() if values is not None else \
                torch.empty(shape, dtype=dtype, device=self._device)
            dist.broadcast(t, group_src=self._last_rank(), group=self._pp_group)
            out.append(t)
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The forward-only pipeline; every rank returns the full outputs."""
        flat = self._flat_inputs(args, kwargs)
        self._check_batch(flat)
        self._check_fingerprint()
        sched = self._schedule("forward", None, tuple(tuple(x.shape) for x in flat), flat)
        with torch.no_grad():
            out = sched.step(*flat) if self._is_first() else sched.step()
        values = None
        if self._is_last():
            values = [out] if isinstance(out, torch.Tensor) else list(out)
        shapes = tuple(tuple(x.shape) for x in flat)
        values = self._gather_microbatched(self._broadcast_from_last(values, ("forward", shapes)))
        return pytree.tree_unflatten(values, self._out_spec) if self._out_spec is not None else \
            (values[0] if len(values) == 1 else tuple(values))

    def _check_fingerprint(self) -> None:
        """Compares each local stage's collective schedule within its groups, once (see fxpar.fingerprint)."""
        if self._fingerprint_checked:
            return
        from fxpar.fingerprint import exchange

        for gm in self.stage_modules:  # the same stages on every rank of a tp / dp / fsdp group
            exchange(gm, self.mesh_info)
        self._fingerprint_checked = True

    def _gather_microbatched(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Full outputs from this rank's rows of every microbatch, gathered over the data-parallel dims.

        The schedule concatenates the last stage's microbatch outputs, so a rank
        holds [its rows of microbatch 0, its rows of microbatch 1, ...]: gathered
        over the data ranks that is (rank, microbatch, row), reordered here to
        (microbatch, rank, row), the rows of the full batch.
        """
        data = self._data_dims()
        if not data:
            return values
        placements = self._output_placements()
        out = []
        for i, v in enumerate(values):
            places = placements[i] if i < len(placements) else None
            dims = [d for d in data if places is not None and places[d] == Shard(0)]
            shards = 1
            for d in reversed(dims):  # cut dp then fsdp: gather fsdp first
                v = torch.ops.fxpar.all_gather(v.contiguous(), 0, self.mesh_info.sizes[d],
                                               self.mesh_info.group_name(d), self.mesh_info.names[d])
                shards *= self.mesh_info.sizes[d]
            if shards > 1:
                rest = tuple(v.shape[1:])
                v = v.reshape(shards, self.split.microbatches, -1, *rest).transpose(0, 1).reshape(-1, *rest)
            out.append(v)
        return out

    def _stash_grads(self) -> list[tuple[nn.Parameter, torch.Tensor | None]]:
        """Sets aside the `.grad` of parameters whose step gradient is summed over ranks (data-parallel and
        tied ones), so the sums see this step's gradient only; `step` adds them back."""
        out, seen = [], set()
        for p in [p for p, _, _ in self._data_synced] + [p for _, p in self._tied_params()]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append((p, p.grad))
                p.grad = None
        return out

    def _sync_data_grads(self) -> None:
        """Sums this step's gradients over the data-parallel dims, one flat all-reduce per bucket and dim."""
        buckets: dict[tuple[int, tuple[str, ...]], list[nn.Parameter]] = {}
        for p, dims, bucket in self._data_synced:
            buckets.setdefault((bucket, dims), []).append(p)
        for (_, dims), params in sorted(buckets.items(), key=lambda kv: kv[0]):
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            for name in dims:
                _record("all_reduce", name, flat, "backward")
                dist.all_reduce(flat, group=_resolve_process_group(self.mesh_info.group_name(self.mesh_info.index(name))))
            offset = 0
            for p in params:
                p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()

    def step(self, *inputs: Any, target: Any, loss_fn: Callable, loss_reduction: str = "mean",
             **kwargs: Any) -> torch.Tensor:
        """One pipelined training step: microbatches through torch's schedule, the loss on the last stage.

        Gradients accumulate into `.grad` of this rank's parameters as
        `loss.backward()` on the whole batch would; tied weights' gradients are
        summed over their owning ranks.

        Args:
            inputs: the full inputs (every rank the same).
            target: the full target, split into microbatches along dim 0 like the inputs.
            loss_fn: `loss_fn(output, target) -> scalar`, called per microbatch on the last stage.
            loss_reduction: 'mean' (the global loss is the mean of the microbatch
                losses) or 'sum' (their sum).

        Returns:
            The global loss, the same on every rank.

        Raises:
            ScheduleError: a batch that does not split into the plan's microbatches.
        """
        if loss_reduction not in ("mean", "sum"):
            raise PlanError(f"loss_reduction={loss_reduction!r}: use 'mean' or 'sum'")
        flat = self._flat_inputs(inputs, kwargs)
        self._check_batch(flat, target)
        self._check_fingerprint()
        data = self._data_dims()
        if data and not all(any(p[m] == Shard(0) for m in data) for p in self._output_placements()):
            raise PlanError(f"the model's outputs do not keep the batch dim split over the data-parallel dims "
                            f"{[self.mesh_info.names[m] for m in data]}, so a pipeline cannot compute the loss per "
                            "data shard; return per-example outputs (logits, not a reduced loss) from the model")
        # Every microbatch's loss on every data shard is a part of the global loss: the parts add up to it.
        shards = self._data_shards()
        scale = 1.0 / (self.split.microbatches * shards) if loss_reduction == "mean" else 1.0
        loss_wrapper = _Loss(self._out_spec, loss_fn, scale, cut=self._local_batch if data else None)
        sched = self._schedule("train", loss_wrapper, tuple(tuple(x.shape) for x in flat), flat)
        # The schedule keeps its loss object; point it at this call's loss function.
        sched._loss_fn.loss_fn = loss_fn
        # The sums over ranks reduce this step's gradients only: earlier ones (accumulation) wait aside.
        stashed = self._stash_grads()
        inputs_before = [x.grad.detach().clone() if x.grad is not None else None for x in flat]
        losses: list[torch.Tensor] = []
        first = flat if self._is_first() else ()
        with self._fsdp_context() as step_gather:
            sched.step(*first, target=target if self._is_last() else None, losses=losses,
                       return_outputs=False)
        if step_gather is not None:
            step_gather.reduce_scatter(self._fsdp_sharded)
        self._sum_tied_grads()
        self._sync_data_grads()
        for p, prev in stashed:
            if prev is not None:
                p.grad = prev if p.grad is None else prev.add_(p.grad)
        self._share_input_grads(flat, inputs_before)
        total = None
        if self._is_last():
            total = torch.stack([x.detach() for x in losses]).sum()
            for m in data:  # the last stage's ranks of each data group hold the other shards' parts
                total = torch.ops.fxpar.all_reduce(total, self.mesh_info.group_name(m), self.mesh_info.names[m])
            total = [total]
        return self._broadcast_from_last(total, ("train", tuple(tuple(x.shape) for x in flat)))[0]

    @contextlib.contextmanager
    def _fsdp_context(self):
        """How a step runs the graph's FSDP gathers.

        reshard_after_forward=True: every microbatch gathers the parameters, autograd
        saves them as shards and the backward gathers again (least memory; each
        microbatch reduce-scatters its gradients). False: each parameter is gathered
        once per step and kept for it, its gradient reduce-scattered once after the
        schedule (`fxpar.collectives.StepGather`; least communication). Yields the
        StepGather, or None.
        """
        from fxpar.collectives import StepGather, pack_gathered, unpack_gathered

        if self.mesh_info.size("fsdp") <= 1:
            yield None
        elif self.reshard_after_forward:
            with torch.autograd.graph.saved_tensors_hooks(pack_gathered, unpack_gathered):
                yield None
        else:
            with StepGather() as step_gather:
                yield step_gather

    def _fsdp_params(self) -> list[nn.Parameter]:
        """This rank's FSDP-sharded parameters, in stage and graph order (the same on every rank of a group)."""
        out, seen = [], set()
        gather = torch.ops.fxpar.fsdp_all_gather.default
        for gm in self.stage_modules:
            for node in gm.graph.nodes:
                if node.op == "get_attr" and any(u.target is gather for u in node.users):
                    t = attr_of(gm, node.target)
                    if id(t) not in seen:
                        seen.add(id(t))
                        out.append(t)
        return out

    def _share_input_grads(self, flat: list[torch.Tensor], before: list[torch.Tensor | None]) -> None:
        """Gives every rank the gradients of inputs that require them, as the first stage computed them."""
        first_rank = self.split.stages[0].rank
        for x, prev in zip(flat, before):
            if not x.requires_grad:
                continue
            if self._is_first():
                delta = x.grad.detach() if x.grad is not None else torch.zeros_like(x)
                delta = (delta - prev if prev is not None else delta).contiguous()
            else:
                delta = torch.empty_like(x)
            dist.broadcast(delta, group_src=first_rank, group=self._pp_group)
            if not self._is_first():
                x.grad = delta if x.grad is None else x.grad + delta

    def _tied_params(self) -> list[tuple[str, nn.Parameter]]:
        out, seen = [], set()
        for fqn in sorted(self._tied_groups):
            for k in self.split.local_stages:
                try:
                    p = self._local_stage(k).get_parameter(fqn)
                except AttributeError:
                    continue
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((fqn, p))
                break
        return out

    def _sum_tied_grads(self) -> None:
        """Sums this step's gradient of each tied weight over its owning ranks, once (earlier steps'
        gradients are set aside during the step, so accumulation does not sum them again)."""
        for fqn, p in self._tied_params():
            grad = p.grad.detach().contiguous() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad, group=self._tied_groups[fqn])
            p.grad = grad

    # ------------------------------------------------------------------ parameters and introspection

    @property
    def pp_group(self) -> Any:
        """The process group of this rank's pipeline (its coordinates on every other mesh dim)."""
        return self._pp_group

    def counted_parameters(self) -> list[nn.Parameter]:
        """This rank's parameters, a tied weight only on the first rank that holds it.

        Sums over the pp group (a global gradient norm) count each weight once
        with these; `parameters()` yields every copy, for optimizers.
        """
        ranks = stage_ranks(self.split.schedule, self.split.num_stages, self.split.pp_size)
        coordinate = self.split.coordinate
        skip = {fqn for fqn, stages in self.split.tied if min(ranks[s] for s in stages) != coordinate}
        out, seen = [], set()
        for gm in self.stage_modules:
            for fqn, p in gm.named_parameters():
                if fqn not in skip and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _param_specs(self) -> dict[int, TensorSpec]:
        out = {}
        for gm in self.stage_modules:
            for node in gm.graph.nodes:
                if node.op == "get_attr":
                    info = get_info(node)
                    if info is not None and isinstance(info.spec, TensorSpec):
                        out[id(gm.get_parameter(node.target) if _is_param(gm, node.target)
                               else attr_of(gm, node.target))] = info.spec
        return out

    def _full(self, grads: bool) -> dict[str, torch.Tensor]:
        specs = self._param_specs()
        # Tied weights: the graph names one of their FQNs (not always capture's canonical one).
        aliases = {name: names for names in self.capture_info.param_aliases.values() for name in names}
        local: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        named = [(fqn, t) for gm in self.stage_modules for fqn, t in gm.named_parameters()]
        if not grads:
            named += [(fqn, t) for gm in self.stage_modules for fqn, t in gm.named_buffers()]
        # Gather tensor-parallel shards in one order on every rank of the tp group.
        for fqn, t in sorted(named, key=lambda x: x[0]):
            if id(t) in seen:
                continue
            seen.add(id(t))
            value = t.grad if grads else t
            if value is None:
                continue
            local[fqn] = self._gather(value, specs.get(id(t))).cpu()
        gathered: list[Any] = [None] * self.split.pp_size
        dist.all_gather_object(gathered, local, group=self._pp_group)
        out: dict[str, torch.Tensor] = {}
        for part in gathered:
            for fqn, value in part.items():
                for name in aliases.get(fqn, (fqn,)):
                    out.setdefault(name, value)
        return out

    def explain(self) -> str:
        from fxpar.explain import explain

        return explain(self)


def _is_param(gm: nn.Module, target: str) -> bool:
    mod, _, name = target.rpartition(".")
    return name in gm.get_submodule(mod)._parameters


# --------------------------------------------------------------------------- explain


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def _fmt_flops(n: float) -> str:
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000 or unit == "P":
            return f"{n:.3g} {unit}FLOP"
        n /= 1000
    return f"{n} FLOP"


def explain_stages(split: PipelineSplitInfo, *, pipeline_order: dict | None = None) -> list[str]:
    """The stages section of explain(): cuts, cost and parameters per stage, bytes per cut, bubble."""
    how = "balanced by the cost model" if split.balanced else "at the plan's cut points"
    sizes = ", ".join(f"{k}={v}" for k, v in sorted(split.example_sizes.items()))
    lines = [f"Pipeline: {split.num_stages} stages on pp={split.pp_size} ({split.stages_per_rank} per rank), "
             f"schedule '{split.schedule}', {split.microbatches} microbatches; cuts {how}"
             + (f"; costs at {sizes}" if sizes else "")]
    total_time = sum(s.time_value for s in split.stages) or 1.0
    for s in split.stages:
        start = f"cut before '{s.cut_before}'" if s.cut_before else "start"
        lines.append(
            f"  stage {s.index} (pp rank {s.rank}): {start}; modules {s.first_module or '<root>'} .. "
            f"{s.last_module or '<root>'}; {s.num_nodes} nodes; {_fmt_flops(s.flops_value)} "
            f"(flops = {s.flops}); time share {s.time_value / total_time:.3f}; "
            f"params {_fmt_bytes(s.param_bytes)} ({len(s.params)} tensors)")
    for s in split.stages[1:]:
        lines.append(f"  cut {s.index - 1}->{s.index} before '{s.cut_before}': {_fmt_bytes(s.recv_bytes_value)} "
                     f"of activations per step (bytes = {s.recv_bytes}; {', '.join(s.inputs) or 'nothing'})")
    lines.append(f"  balance: max / mean stage time = {split.balance_ratio:.3f}")
    for fqn, stages in split.tied:
        lines.append(f"  tied weight '{fqn}' held by stages {list(stages)}: gradients summed over its owners")
    p, m, v = split.pp_size, split.microbatches, split.stages_per_rank
    bubble = bubble_fraction(pipeline_order, split.num_stages) if pipeline_order else None
    if bubble is not None:
        lines.append(f"  expected bubble fraction: {bubble:.3f} (torch's '{split.schedule}' order simulated with "
                     "equal stage times, backward = 2 x forward)")
    else:
        formula = (p - 1) / (v * m + p - 1)
        lines.append(f"  expected bubble fraction: {formula:.3f} ((p-1)/(v*m+p-1), p={p}, v={v}, m={m})")
    return lines


def pipeline_order_of(pm: Any) -> dict | None:
    """torch's compute-action order of a pipelined module's schedule, or None (not a pipeline, no process group)."""
    if not isinstance(pm, PipelineModule) or pm.mesh is None:
        return None
    return pm.pipeline_order()
