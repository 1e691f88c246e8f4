"""ParallelModule: runs this rank's rewritten GraphModule.

The runtime executes GraphModules directly: no DTensor dispatch, no graph
interpretation. It owns the process-group view of the mesh, the forward and
training step, and gathering full tensors for users; the graph owns all
communication of the computation itself.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.distributed.tensor.placement_types import Shard

from fxpar._torch.fx import pytree
from fxpar._torch.inductor import overlap_comms
from fxpar.analysis.compiled_schedule import add_schedule_recorder
from fxpar.analysis.explain import explain
from fxpar.analysis.fingerprint import exchange
from fxpar.analysis.plan_io import resolve_plan
from fxpar.capture import LOSS_TARGET, CaptureInfo
from fxpar.core.errors import PlanError
from fxpar.core.mesh import MeshInfo
from fxpar.core.replicas import unrepeat_blocks
from fxpar.core.spec import TensorSpec, get_info, get_spec, uncut_steps
from fxpar.ops.collectives import _all_gather
from fxpar.ops.traceable import traceable_graph_module
from fxpar.ops.traceable_fsdp import (fsdp_group_names, padded_uneven_shards, prefetch_fsdp_gathers,
                                      reshard_fsdp_gathers, traceable_fsdp_graph_module)
from fxpar.ops.transitions import inference_graph_module
from fxpar.runtime.checkpointing import checkpointed_graph_module
from fxpar.runtime.agreement import check_same_inputs
from fxpar.runtime.fsdp_buckets import begin_forward, register_buckets
from fxpar.runtime.state_dict import load_model_state_dict, model_state_dict
from fxpar.runtime.fsdp_state import pack_gathered, unpack_gathered
from fxpar.runtime.grad_sync import GradSync
from fxpar.runtime.init_weights import InitReport, init_weights
from fxpar.runtime.materialize import LocalTensor

__all__ = ["ParallelModule", "INDUCTOR_OPTIONS"]

INDUCTOR_OPTIONS = {"reorder_for_compute_comm_overlap": True,
                    "reorder_for_compute_comm_overlap_passes": ["sink_waits", "raise_comms", overlap_comms]}
"""inductor options of fxpar's compiled graphs (torch.compile's `options=`, this compile only, no global
config): its scheduler issues each collective as early and waits as late as the dependencies allow, and
runs independent compute between (`fxpar._torch.inductor.overlap_comms`: in a tp backward, each block's
weight-gradient matmuls run while its input gradient's all-reduce is in flight)."""


class _Resharded:
    """A compiled graph with FSDP units, compiled (on its first call, and on any recompile) with their
    gathers tagged for AOT autograd's partitioner: re-gathered in the backward (reshard_after_forward)
    or saved. Uneven shards are padded (eagerly, outside the compiled graph) before each call."""

    def __init__(self, compiled: Any, groups: set[str], reshard: bool, lowered: fx.GraphModule) -> None:
        self.compiled, self.groups, self.reshard, self.lowered = compiled, groups, reshard, lowered

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with padded_uneven_shards(self.lowered), reshard_fsdp_gathers(self.groups, reshard=self.reshard):
            return self.compiled(*args, **kwargs)


class ParallelModule(nn.Module):
    """A model compiled for one rank of a device mesh.

    Every rank passes the same full inputs and gets the same full outputs,
    equal to the original model's. `parameters()` yields this rank's local
    shards; any torch optimizer works on them.

    Attributes:
        graph_module: this rank's rewritten GraphModule.
        mesh: the torch DeviceMesh (None for dry runs).
        mesh_info: the mesh as passes saw it.
        plan: the resolved plan (`fxpar.analysis.plan_io.ResolvedPlan`): every module's style as the passes
            chose it, the mesh and the pipeline settings; save it with `fxpar.save_plan`.
        requested_plan: the plan as given to parallelize (validated).
        history: the pass manager's records (name, seconds, ...).
    """

    def __init__(self, graph_module: fx.GraphModule, *, mesh: Any, mesh_info: MeshInfo, plan: Any,
                 history: list, example_args: tuple = (), example_kwargs: dict | None = None,
                 input_layout: str = "full", reshard_after_forward: bool = True,
                 compile_backend: str | None = None, offload_policy: Any = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.mesh = mesh
        self.mesh_info = mesh_info
        self.requested_plan = plan
        self.history = history
        self._example = (example_args, example_kwargs or {})
        self._fingerprint_checked = False
        self.input_layout = input_layout
        self.reshard_after_forward = reshard_after_forward
        self.compile_backend = compile_backend  # torch.compile's backend for this rank's graphs, or None
        # torch.compile's options= for them (inductor only; read when a graph is first compiled)
        self.compile_options = dict(INDUCTOR_OPTIONS) if compile_backend == "inductor" else None
        self.offload_policy = offload_policy  # CPUOffloadPolicy: parameters on the host (passes/offload_parameters)
        self._grad_sync = self._hook_grad_sync()
        self._fsdp_buckets = self._register_fsdp_buckets()
        self.training = self.capture_info.training  # the mode the graph was captured in
        self.recompile_for_mode: Callable[[bool], fx.GraphModule] | None = None  # set by compile_model
        # With a captured loss: compiles the model alone, for forward (set by compile_model).
        self.compile_model_graph: Callable[[], fx.GraphModule] | None = None
        self.check_inputs = False  # compare the ranks' inputs on every run, not only the first (check=True)
        # The model's structure on meta (never a value): init_weights and fxpar.checkpoint run its code on it.
        self.__dict__["source_model"] = None
        self.__dict__["init_report"] = None
        self.local_device = next((t.device for t in graph_module.parameters()), torch.device("cpu"))

    # ------------------------------------------------------------------ values

    def init_weights(self, seed: int | None = None) -> InitReport:
        """Initializes the local shards as the model's own init would on one process after `manual_seed(seed)`.

        One full parameter at a time: see `fxpar.runtime.init_weights` (what is equal, and where it cannot be).
        """
        report = init_weights(self, seed)
        self.__dict__["init_report"] = report
        return report

    def set_source_model(self, skeleton: nn.Module | None) -> None:
        """Keeps the model's structure (parameters on meta), unregistered: not a submodule, no state."""
        self.__dict__["source_model"] = skeleton

    def gather_full(self, entry: LocalTensor) -> torch.Tensor:
        """The full tensor of one parameter or buffer (a collective over the dims that shard it)."""
        full = self._gather(entry.local, entry.spec)
        return unrepeat_blocks(full, *entry.repeats) if entry.repeats is not None else full

    # ------------------------------------------------------------------ running

    def _run_graph(self, args: tuple, kwargs: dict) -> Any:
        """This rank's graph on its inputs: outputs batch-sharded where the graph left them so."""
        if self.input_layout == "full" and self.mesh is not None and (self.check_inputs or not self._fingerprint_checked):
            check_same_inputs(args, kwargs, self.mesh_info)  # a loader seeded per rank: an error, not a wrong answer
        if not self._fingerprint_checked:
            # Ranks whose graphs would issue different collectives fail here, naming the first one.

            exchange(self.graph_module, self.mesh_info)
            self._fingerprint_checked = True
        begin_forward(self._fsdp_buckets)  # prefetches an earlier forward left untaken are not this one's
        if self.compile_backend is not None:  # saved-tensor hooks do not reach inside a compiled graph
            graph = self._training_graph() if torch.is_grad_enabled() else self._inference_graph()
            return self._compiled(graph)(*args, **kwargs)
        if self.reshard_after_forward and torch.is_grad_enabled():
            # Gathered FSDP parameters are not kept for the backward: it gathers them again.
            with torch.autograd.graph.saved_tensors_hooks(pack_gathered, unpack_gathered):
                return self._training_graph()(*args, **kwargs)
        if not torch.is_grad_enabled():
            return self._inference_graph()(*args, **kwargs)
        return self._training_graph()(*args, **kwargs)

    def _compiled(self, graph: fx.GraphModule) -> Any:
        """torch.compile of one of this rank's graphs, built once per graph (recompiled per input shape).

        What is compiled is the graph with its tp collectives lowered to torch's functional collectives
        (`traceable_graph_module`) and its FSDP gathers to one functional all-gather per unit
        (`traceable_fsdp_graph_module`): inductor sees each issue and its wait, fuses around them and may move
        them."""
        cache = self.__dict__.setdefault("_compiled_graphs", {})
        entry = cache.get(id(graph))
        if entry is None or entry[0] is not graph:
            lowered = traceable_fsdp_graph_module(traceable_graph_module(graph))
            groups = fsdp_group_names(lowered)
            options = dict(self.compile_options) if self.compile_options else None
            if groups and options is not None:  # each block's backward re-gather issued one block ahead
                options["post_grad_custom_post_pass"] = functools.partial(prefetch_fsdp_gathers, groups=groups)
            if options is not None:  # what inductor schedules, for explain()
                add_schedule_recorder(options, self, lowered)
            compiled = torch.compile(lowered, backend=self.compile_backend, dynamic=False, options=options)
            if groups:  # FSDP units (fxpar.ops.traceable_fsdp): re-gathered in the backward, not saved
                compiled = _Resharded(compiled, groups, self.reshard_after_forward, lowered)
            entry = cache[id(graph)] = (graph, compiled)
        return entry[1]

    def _training_graph(self) -> fx.GraphModule:
        """The graph with its activation-checkpoint regions outlined (`fxpar.runtime.checkpointing`),
        or the graph itself; rebuilt when the graph module is recompiled."""
        cached = self.__dict__.get("_training")
        if cached is None or cached[0] is not self.graph_module.code:
            cached = (self.graph_module.code, checkpointed_graph_module(self.graph_module) or self.graph_module)
            self.__dict__["_training"] = cached
        return cached[1]

    def _inference_graph(self) -> fx.GraphModule:
        """The graph without its backward-only markers (`inference_graph_module`), for no_grad runs.

        grad_all_reduce only copies its input when there is no backward. Kept out of the
        module's registration (no second set of state_dict keys) and rebuilt when the graph
        module is recompiled; it shares the graph module's parameter and buffer objects.
        """
        cached = self.__dict__.get("_inference")
        if cached is None or cached[0] is not self.graph_module.code:
            cached = (self.graph_module.code, inference_graph_module(self.graph_module))
            self.__dict__["_inference"] = cached
        return cached[1]

    def _hook_grad_sync(self):
        """Bucketed asynchronous gradient all-reduces for the parameters bucket_grad_sync marked."""
        gm = self.graph_module
        marked = []
        for node in gm.graph.nodes:
            info = get_info(node)
            sync = info.grad_sync if info is not None and node.op == "get_attr" else None
            if sync:
                mod, _, name = str(node.target).rpartition(".")
                marked.append((getattr(gm.get_submodule(mod), name), sync.dims, sync.bucket, sync.dtype))
        return GradSync(marked, self.mesh_info) if marked else None

    def _register_fsdp_buckets(self) -> list:
        """Groups the FSDP gathers apply_fsdp tagged with one block into one collective each way."""
        # A compiled graph traces the gathers' backward (plain reduce-scatters): no buckets to hand them to.
        # With CPU offload the gathers read device copies of the shards, gathered one by one.
        return register_buckets(self._stage_graphs()) if self.mesh is not None and self.compile_backend is None \
            and self.offload_policy is None else []

    def _stage_graphs(self) -> list[fx.GraphModule]:
        return [self.graph_module]

    def _data_dims(self) -> list[int]:
        info = self.mesh_info
        return [m for m, name in enumerate(info.names) if name in ("dp", "fsdp", "ep") and info.sizes[m] > 1]

    def _output_placements(self) -> list[tuple]:
        out = next(n for n in self.graph_module.graph.nodes if n.op == "output")
        info = get_info(out)
        return list(info.input_placements) if info is not None and info.input_placements else []

    def _gather_outputs(self, output: Any) -> Any:
        """Gathers batch-sharded outputs along the batch dim over the data-parallel dims."""
        data = self._data_dims()
        if not data or self.input_layout == "local":
            return output
        leaves, spec = pytree.tree_flatten(output)
        placements = iter(self._output_placements())
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor):
                continue
            places = next(placements, None)
            if places is None:
                continue
            for m in reversed(data):  # cut dp then fsdp: gather fsdp first
                if places[m] == Shard(0):
                    leaf = torch.ops.fxpar.all_gather(leaf, 0, self.mesh_info.sizes[m],
                                                      self.mesh_info.group_name(m), self.mesh_info.names[m])
            leaves[i] = leaf
        return pytree.tree_unflatten(leaves, spec)

    def _local_batch(self, value: Any) -> Any:
        """This rank's slice of a full batch (the target), as shard_inputs slices the inputs."""
        info = self.mesh_info

        def cut(t):
            if not isinstance(t, torch.Tensor) or t.ndim == 0:
                return t
            for m in self._data_dims():
                t = t.chunk(info.sizes[m], dim=0)[info.coordinate[m]]
            return t

        return pytree.tree_map(cut, value)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's output. With a captured loss, the model alone runs (its graph compiled on first
        use, sharing this module's parameters); `step` runs the loss graph."""
        if self.capture_info.loss:
            return self._run_model_graph(args, kwargs)
        return self._gather_outputs(self._run_graph(args, kwargs))

    def model_graph_module(self) -> fx.GraphModule:
        """With a captured loss, this rank's graph of the model alone (what forward runs), compiled on
        first use with the same plan and sharing this module's parameters; else `graph_module`."""
        if not self.capture_info.loss:
            return self.graph_module
        graphs = self.__dict__.setdefault("_model_graphs", {})
        gm = graphs.get(self.training)
        if gm is None:
            if self.compile_model_graph is None:
                raise PlanError(f"{type(self).__name__}: this module's graph ends in a captured loss and it cannot "
                                "compile the model alone; call pm.step(x, target=y) for the loss")
            gm = self.compile_model_graph()
            self._share_state(gm)
            graphs[self.training] = gm
        return gm

    def _run_model_graph(self, args: tuple, kwargs: dict) -> Any:
        gm = self.model_graph_module()
        loss_graph, checked = self.graph_module, self._fingerprint_checked
        self.graph_module, self._fingerprint_checked = gm, False
        try:
            return self._gather_outputs(self._run_graph(args, kwargs))
        finally:
            self.graph_module, self._fingerprint_checked = loss_graph, checked

    def _step_captured(self, inputs: tuple, target: Any, kwargs: dict) -> torch.Tensor:
        """A training step on the captured loss: the graph computes the unsplit model's loss exactly."""
        loss = self._run_graph(inputs, {**kwargs, LOSS_TARGET: target})
        loss.backward()
        return loss.detach()

    def step(self, *inputs: Any, target: Any, loss_fn: Callable | None = None, loss_reduction: str = "mean",
             **kwargs: Any) -> torch.Tensor:
        """One training forward and backward; returns the global loss.

        Gradients accumulate into the local parameters' `.grad` as
        `loss.backward()` does, so zero them between steps as usual.

        Args:
            inputs: the full inputs (every rank the same).
            target: the full target.
            loss_fn: `loss_fn(output, target) -> scalar tensor`; None with a loss captured by
                `parallelize(..., loss_fn=)`, which then computes exactly the unsplit model's loss
                (its own reduction; `loss_reduction` is not used).
            loss_reduction: 'mean' or 'sum': how per-shard losses combine (used
                when the batch is split across ranks or microbatches).
        """
        if loss_reduction not in ("mean", "sum"):
            raise PlanError(f"loss_reduction={loss_reduction!r}: use 'mean' or 'sum'")
        if loss_fn is None:
            if not self.capture_info.loss:
                raise PlanError("pm.step needs loss_fn=, or a loss captured with parallelize(..., loss_fn=fn, "
                                "example_target=t)")
            return self._step_captured(inputs, target, kwargs)
        data = self._data_dims()
        sharded = data and all(any(p[m] == Shard(0) for m in data) for p in self._output_placements())
        if not sharded:
            # Outputs are whole on every rank: the loss is the global loss already.
            loss = loss_fn(self(*inputs, **kwargs), target)
            loss.backward()
            return loss.detach()
        # Data parallel: the loss of this rank's batch shard; the gradient all-reduces in the graph sum
        # the shards, so a mean over equal shards is scaled by 1/shards here.
        output = self._run_graph(inputs, kwargs)
        local_target = target if self.input_layout == "local" else self._local_batch(target)
        local = loss_fn(output, local_target)
        del output  # what the loss saved stays; the outputs themselves (logits) are not held through the backward
        shards = 1
        for m in data:
            shards *= self.mesh_info.sizes[m]
        scale = 1.0 / shards if loss_reduction == "mean" else 1.0
        (local * scale).backward()
        total = local.detach() * scale
        for m in data:
            total = torch.ops.fxpar.all_reduce(total, self.mesh_info.group_name(m), self.mesh_info.names[m])
        return total

    # ------------------------------------------------------------------ train / eval

    def train(self, mode: bool = True) -> ParallelModule:
        """Switches to training or evaluation behaviour (dropout, batch norm), as on the original model.

        The graph holds the mode the model was captured in (its dropout and normalization ops, and
        any `if self.training` in the model's Python). The other mode's graph is compiled on first
        use, from the same model, example inputs, plan and passes (`recompile_for_mode`), and shares
        this module's parameters and buffers: optimizer state, gradients and running statistics
        carry over. `graph_module` is the graph of the current mode.

        Raises:
            PlanError: no way to compile the other mode (a pipeline, or a module built without
                compile_model), or the other mode's graph shards parameters differently.
        """
        mode = bool(mode)
        if mode != self.capture_info.training:
            self._use_graph_for(mode)
        self.training = mode  # not recursing: an exported GraphModule refuses train()
        return self

    def _use_graph_for(self, mode: bool) -> None:
        graphs = self.__dict__.setdefault("_graphs_by_mode", {})
        graphs[self.capture_info.training] = self.graph_module
        gm = graphs.get(mode)
        if gm is None:
            if self.recompile_for_mode is None:
                raise PlanError(
                    f"{type(self).__name__}.train({mode}): this module was compiled with the model in "
                    f"{'training' if not mode else 'eval'} mode and cannot compile the other mode; call "
                    f"model.{'train' if mode else 'eval'}() before fxpar.parallelize")
            gm = self.recompile_for_mode(mode)
            self._share_state(gm)
            graphs[mode] = gm
        self.graph_module = gm
        self._fingerprint_checked = False  # the other graph's collectives are checked at its first run
        if self._grad_sync is not None:
            self._grad_sync.remove()
        self._grad_sync = self._hook_grad_sync()

    def _share_state(self, gm: fx.GraphModule) -> None:
        """Points gm's parameters and buffers at this module's (same FQNs, same local shapes)."""
        own = dict(self.graph_module.named_parameters(remove_duplicate=False))
        own.update(self.graph_module.named_buffers(remove_duplicate=False))
        theirs = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
        for fqn, t in theirs:
            mine = own.get(fqn)
            if mine is None or mine.shape != t.shape:
                raise PlanError(
                    f"train/eval: the other mode's graph has {fqn} {tuple(t.shape)} where this one has "
                    f"{None if mine is None else tuple(mine.shape)}; pass an explicit plan to parallelize so "
                    "both modes shard the same way")
            mod, _, name = fqn.rpartition(".")
            setattr(gm.get_submodule(mod), name, mine)

    # ------------------------------------------------------------------ introspection

    def explain(self, *inputs: Any, **kwargs: Any) -> str:
        """The plan per module, every collective with bytes per step, memory per rank, fallbacks.

        Bytes are for the example inputs' sizes, or for the sizes of `inputs` if given
        (another batch size or sequence length: the graph is symbolic in them).
        """
        text = explain(self, *inputs, **kwargs)
        report = self.__dict__.get("init_report")
        return text if report is None else "\n".join([text, "", *report.lines()])

    @property
    def plan(self):
        """The resolved plan; reusable as `parallelize(..., plan=pm.plan)` on the same model and mesh."""
        return resolve_plan(self)

    @property
    def capture_info(self) -> CaptureInfo:
        return self.graph_module.meta["fxpar"]

    def _param_specs(self) -> dict[int, TensorSpec]:
        """Spec of each parameter / buffer tensor, by object id (tied FQNs share one tensor)."""
        gm = self.graph_module
        out = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                spec = get_spec(node)
                if spec is not None:
                    mod, _, name = str(node.target).rpartition(".")
                    out[id(getattr(gm.get_submodule(mod), name))] = spec
        return out

    def _gather(self, local: torch.Tensor, spec: TensorSpec | None) -> torch.Tensor:
        if spec is None or all(p.is_replicate() for p in spec.placements):
            return local.detach().clone()
        full = local.detach()
        # Shards were cut in shard_order (fsdp last); undo them in reverse, stripping uneven shards' padding.
        info = self.mesh_info
        for m, p, size in uncut_steps(spec.shape, spec.placements, info.sizes, info.coordinate, info.names):
            full = _all_gather(full, p.dim, info.sizes[m], info.group_name(m), getattr(p, "split_factor", 1),
                               full_size=size)
        return full

    def _full(self, grads: bool) -> dict[str, torch.Tensor]:
        specs = self._param_specs()
        aliases = self.capture_info.param_aliases
        out: dict[str, torch.Tensor] = {}
        for fqn, p in self.graph_module.named_parameters():
            t = p.grad if grads else p
            if t is None:
                continue
            full = self._gather(t, specs.get(id(p)))
            if fqn in self.capture_info.param_repeats:  # kv heads held by several ranks (replicate_kv_heads)
                full = unrepeat_blocks(full, *self.capture_info.param_repeats[fqn])
            if fqn in self.capture_info.param_shapes:  # stored by heads (unflatten_heads): the model's shape
                full = full.reshape(self.capture_info.param_shapes[fqn])
            for name in aliases.get(fqn, (fqn,)):
                out[name] = full
        if not grads:
            for fqn, b in self.graph_module.named_buffers():
                out[fqn] = self._gather(b, specs.get(id(b)))
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) parameters and buffers under the original FQNs, on every rank."""
        return self._full(grads=False)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> dict:
        """This rank's parameters and persistent buffers as DTensors under the original FQNs (torch's
        convention for sharded modules; see `fxpar.runtime.state_dict.model_state_dict`)."""
        out = destination if destination is not None else {}
        out.update({prefix + k: v for k, v in model_state_dict(self).items()})
        return out

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Loads DTensors (any mesh) or full tensors keyed by the original FQNs into the local shards."""
        return load_model_state_dict(self, state_dict, strict=strict)

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Full gradients under the original FQNs, on every rank (parameters without a grad left out)."""
        return self._full(grads=True)
