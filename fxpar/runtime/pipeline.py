"""Pipeline parallelism: the runtime side of split stages.

`fxpar/passes/split_stages.py` cuts this rank's (already tensor-parallel) graph into
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
from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
from torch.distributed.pipelining import ScheduleGPipe
from torch.distributed.tensor.placement_types import Shard

from fxpar._torch import pipelining as torch_pp
from fxpar._torch.c10d import post_accumulate_grad_hooks_held
from fxpar._torch.pipelining import ContiguousGradStage
from fxpar._torch.fx import flat_input_function, out_spec_of, pytree
from fxpar.analysis.explain import explain
from fxpar.analysis.fingerprint import exchange
from fxpar.core.dataflow import attr_of
from fxpar.core.errors import PlanError, ScheduleError
from fxpar.core.mesh import MeshInfo
from fxpar.core.spec import TensorSpec, get_info
from fxpar.core.stages import SCHEDULES, SPLIT_BACKWARD, stage_info, stage_ranks
from fxpar.runtime.fsdp_state import StepGather, pack_gathered, unpack_gathered
from fxpar.runtime.agreement import check_same_inputs
from fxpar.runtime.parallel_module import ParallelModule
from fxpar.runtime.stages import Loss, output_nones, stage_for_run, stage_io, with_nones
from fxpar.runtime.grad_sync import sync_data_grads
from fxpar.runtime.step_failure import GuardedStage, StepFailure, guard_loss, mesh_groups

__all__ = ["PipelineModule", "MAX_SCHEDULES"]

MAX_SCHEDULES = 4
"""Schedules (with their stages and buffers) kept per input shape, least recently used dropped first."""

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- runtime


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
        self._flatten = flat_input_function(graph_module)
        self._out_spec = out_spec_of(graph_module)
        self._out_nones = output_nones(graph_module)
        self._schedules: OrderedDict[tuple, Any] = OrderedDict()  # least recently used first
        self._failure = StepFailure()
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
        # gradient once per microbatch. `step` reduces the step's sum once instead (`sync_data_grads`).
        return None

    # ------------------------------------------------------------------ set-up

    def _pick_device(self) -> torch.device:
        for p in self.stage_modules.parameters():
            return p.device
        if self.mesh is not None and self.mesh.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _data_synced_params(self) -> list[tuple]:
        """This rank's parameters whose gradients the data-parallel dims sum (marked by bucket_grad_sync),
        with their dims and bucket, each once."""
        out, seen = [], set()
        for gm in self.stage_modules:
            for node in gm.graph.nodes:
                info = get_info(node) if node.op == "get_attr" else None
                sync = info.grad_sync if info is not None else None
                if not sync:
                    continue
                t = attr_of(gm, node.target)
                if isinstance(t, nn.Parameter) and id(t) not in seen:
                    seen.add(id(t))
                    out.append((t, sync.dims, sync.bucket, sync.dtype))
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

    def _local_stage(self, index: int, train: bool = False) -> fx.GraphModule:  # train: checkpoint regions outlined
        return stage_for_run(self.graph_module.get_submodule(f"stage_{index}"), train)

    def _schedule(self, kind: str, loss: Loss | None, shapes: tuple, flat: list | None = None) -> Any:
        """torch's schedule for this rank's stages, built once per (kind, input shapes, loss scale).

        Stages infer their microbatch shapes at the first run, so other input
        shapes get their own stages and schedule.
        """
        # The loss function itself is swapped per call (see step), so it is not part of the key.
        key = (kind, shapes, None if loss is None else loss.scale)
        if key not in self._schedules:
            self._schedules[key] = self._build_schedule(kind, loss, flat)
            while len(self._schedules) > MAX_SCHEDULES:  # each holds its stages' buffers: bounded
                self._schedules.popitem(last=False)
        self._schedules.move_to_end(key)
        return self._schedules[key]

    def _build_schedule(self, kind: str, loss: Loss | None, flat: list[torch.Tensor] | None = None) -> Any:
        split = self.split
        spec = SCHEDULES[split.schedule]
        io = stage_io(self.graph_module, split.num_stages, split.microbatches, flat, train=kind == "train") \
            if flat is not None else None
        # With static metadata a failing stage can stand in zeros and let the schedule finish (step_failure).
        stages = [ContiguousGradStage(GuardedStage(self._local_stage(k, kind == "train"), io[k][1], self._failure, k)
                                      if io else self._local_stage(k, kind == "train"), k, split.num_stages, self._device, group=self._pp_group,
                                      **({"input_args": io[k][0], "output_args": io[k][1]} if io else {}))
                  for k in split.local_stages]
        if kind == "forward" and spec.multi:
            sched = spec.cls(stages, split.microbatches, loss_fn=None, scale_grads=False)
            if spec.style == "v":
                torch_pp.forward_actions_only(sched)
        elif kind == "forward":
            sched = ScheduleGPipe(stages[0], split.microbatches, loss_fn=None, scale_grads=False)
        elif spec.multi:
            sched = spec.cls(stages, split.microbatches, loss_fn=loss, scale_grads=False)
        else:
            sched = spec.cls(stages[0], split.microbatches, loss_fn=loss, scale_grads=False)
        return sched

    def pipeline_order(self) -> dict[int, list]:
        """torch's compute actions per pp rank for a training step (the schedule IR; no communication)."""
        for (kind, *_), sched in self._schedules.items():
            if kind == "train":
                break
        else:
            sched = self._build_schedule("train", Loss(self._out_spec, lambda out, target: out, 1.0))
        return torch_pp.pipeline_order(sched)

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
        if self.mesh is not None and (self.check_inputs or not self._fingerprint_checked):  # first run, check=True
            check_same_inputs((flat, target), {}, self.mesh_info, groups=mesh_groups(self._pp_group, self.mesh_info))

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
        self._failure.agree(mesh_groups(self._pp_group, self.mesh_info))
        values = None
        if self._is_last():
            values = [out] if isinstance(out, torch.Tensor) else list(out)
        shapes = tuple(tuple(x.shape) for x in flat)
        values = with_nones(self._gather_microbatched(self._broadcast_from_last(values, ("forward", shapes))),
                            self._out_nones)
        return pytree.tree_unflatten(values, self._out_spec) if self._out_spec is not None else \
            (values[0] if len(values) == 1 else tuple(values))

    def _check_fingerprint(self) -> None:
        """Compares each local stage's collective schedule within its groups, once (see fxpar.analysis.fingerprint)."""
        if self._fingerprint_checked:
            return
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
        """Sets aside every parameter's `.grad`, so sums over ranks (data-parallel and tied parameters) see
        this step's gradient only and a failed step can be undone; `step` adds them back."""
        out, seen = [], set()
        for p in self.parameters():  # all of them: a failed step restores them (step_failure)
            if id(p) not in seen:
                seen.add(id(p))
                out.append((p, p.grad))
                p.grad = None
        return out

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
        guarded = guard_loss(loss_fn, self._failure)  # an exception fails every rank after the schedule
        loss_wrapper = Loss(self._out_spec, guarded, scale, cut=self._local_batch if data else None,
                            nones=self._out_nones)
        sched = self._schedule("train", loss_wrapper, tuple(tuple(x.shape) for x in flat), flat)
        # The schedule keeps its loss object; point it at this call's loss function.
        torch_pp.set_loss_fn(sched, guarded)
        # The sums over ranks reduce this step's gradients only: earlier ones (accumulation) wait aside.
        stashed = self._stash_grads()
        inputs_before = [x.grad.detach().clone() if x.grad is not None else None for x in flat]
        losses: list[torch.Tensor] = []
        first = flat if self._is_first() else ()
        # post-accumulate-grad hooks (optimizer-in-backward) run once, with the step's gradient
        with post_accumulate_grad_hooks_held([p for p, _ in stashed]) as got:
            with self._fsdp_context() as step_gather:
                sched.step(*first, target=target if self._is_last() else None, losses=losses,
                           return_outputs=False)
            try:
                self._failure.agree(mesh_groups(self._pp_group, self.mesh_info))
            except ScheduleError:
                for p, prev in stashed:  # the failed step leaves no gradient behind
                    p.grad = prev
                raise
            if step_gather is not None:
                step_gather.reduce_scatter(self._fsdp_sharded)
            self._sum_tied_grads()
            sync_data_grads(self._data_synced, self.mesh_info)  # one flat all-reduce per bucket and dp dim
            got.update(id(p) for p, _ in stashed if p.grad is not None)  # this step's gradients (hooks run)
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
        schedule (`fxpar.runtime.fsdp_state.StepGather`; least communication). Yields the
        StepGather, or None.
        """
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
        return explain(self)


def _is_param(gm: nn.Module, target: str) -> bool:
    mod, _, name = target.rpartition(".")
    return name in gm.get_submodule(mod)._parameters


