"""ParallelModule: runs this rank's rewritten GraphModule.

The runtime executes GraphModules directly: no DTensor dispatch, no graph
interpretation. It owns the process-group view of the mesh, the forward and
training step, and gathering full tensors for users; the graph owns all
communication of the computation itself.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from fxpar.capture import CaptureInfo
from fxpar.collectives import _all_gather
from fxpar.errors import PlanError
from fxpar.mesh import MeshInfo
from fxpar.spec import TensorSpec, get_spec

__all__ = ["ParallelModule"]


class ParallelModule(nn.Module):
    """A model compiled for one rank of a device mesh.

    Every rank passes the same full inputs and gets the same full outputs,
    equal to the original model's. `parameters()` yields this rank's local
    shards; any torch optimizer works on them.

    Attributes:
        graph_module: this rank's rewritten GraphModule.
        mesh: the torch DeviceMesh (None for dry runs).
        mesh_info: the mesh as passes saw it.
        plan: the validated plan.
        history: the pass manager's records (name, seconds, ...).
    """

    def __init__(self, graph_module: fx.GraphModule, *, mesh: Any, mesh_info: MeshInfo, plan: Any,
                 history: list, example_args: tuple = (), example_kwargs: dict | None = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.mesh = mesh
        self.mesh_info = mesh_info
        self.plan = plan
        self.history = history
        self._example = (example_args, example_kwargs or {})

    # ------------------------------------------------------------------ running

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(*args, **kwargs)

    def step(self, *inputs: Any, target: Any, loss_fn: Callable, loss_reduction: str = "mean",
             **kwargs: Any) -> torch.Tensor:
        """One training forward and backward; returns the global loss.

        Gradients accumulate into the local parameters' `.grad` as
        `loss.backward()` does, so zero them between steps as usual.

        Args:
            inputs: the full inputs (every rank the same).
            target: the full target.
            loss_fn: `loss_fn(output, target) -> scalar tensor`.
            loss_reduction: 'mean' or 'sum': how per-shard losses combine (used
                when the batch is split across ranks or microbatches).
        """
        if loss_reduction not in ("mean", "sum"):
            raise PlanError(f"loss_reduction={loss_reduction!r}: use 'mean' or 'sum'")
        output = self(*inputs, **kwargs)
        loss = loss_fn(output, target)
        loss.backward()
        return loss.detach()

    # ------------------------------------------------------------------ introspection

    def explain(self) -> str:
        """The plan per module, every collective with bytes per step, memory per rank, fallbacks."""
        from fxpar.explain import explain

        return explain(self)

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
        # Shards were cut in mesh order; undo them innermost first.
        for m in reversed(range(self.mesh_info.ndim)):
            p = spec.placements[m]
            if not p.is_replicate():
                full = _all_gather(full, p.dim, self.mesh_info.sizes[m], self.mesh_info.group_name(m),
                                   getattr(p, "split_factor", 1))
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
            for name in aliases.get(fqn, (fqn,)):
                out[name] = full
        if not grads:
            for fqn, b in self.graph_module.named_buffers():
                out[fqn] = self._gather(b, specs.get(id(b)))
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) parameters and buffers under the original FQNs, on every rank."""
        return self._full(grads=False)

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Full gradients under the original FQNs, on every rank (parameters without a grad left out)."""
        return self._full(grads=True)
