"""Measured node times of a rank's step, for the timeline (`rank_timeline(pm, profile=...)`).

`measure_profile(pm, *inputs, target=..., loss_fn=...)` runs the module's own
step (or forward) under a `torch.overrides.TorchFunctionMode` that watches the
ops the rank's graph calls. The graph's generated code calls one `OpOverload`
per call_function node, in graph order; the mode matches each call to the next
node with that target and output shape (calls the runtime makes around the
graph match nothing) and times it with `time.perf_counter`:

    profile[node.name]               seconds of the op's forward call (a blocking collective: until
                                     its result is there, waiting for the other ranks included)
    profile[node.name + '.backward'] seconds from the prehook of the autograd node the op created
                                     (`grad_fn.register_prehook`) to the next such prehook of another
                                     node (the last: to its own hook). A composite op (linear on 3-d
                                     input: view, addmm, view) creates several autograd nodes and only
                                     the last is its output's; the engine runs the others next (highest
                                     sequence number first), so the gap holds them all. The dual
                                     collective of a collective node is included; 0.0 for an op whose
                                     output needs no gradient

taking the median over `iters` runs after `warmup`. Issue nodes
(`fsdp_prefetch`) are left out: the call only starts a collective, its time
is not the collective's, and the timeline keeps the cost model's there.

Every rank of the mesh must call it together (it runs the step's collectives).
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode

from fxpar.core.errors import PlanError
from fxpar.core.stages import stage_info
from fxpar.ops.overlap import ISSUE_OPS

__all__ = ["measure_profile"]

log = logging.getLogger(__name__)


def _timed_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes the generated code runs as one op call each (OpOverloads), issue nodes aside."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and hasattr(n.target, "_schema")
            and n.target not in ISSUE_OPS]


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


def _shape(value: Any) -> tuple | None:
    t = _first_tensor(value)
    return tuple(t.shape) if t is not None else None


class _NodeTimer(TorchFunctionMode):
    """Times the graph's op calls (forward) and their autograd nodes (backward), matched to nodes in order."""

    def __init__(self, nodes: list[fx.Node]) -> None:
        super().__init__()
        self.nodes, self.next = nodes, 0
        self.times: dict[str, float] = {}
        self._events: list[tuple[float, str]] = []  # backward prehooks: (time, node)
        self._last: tuple[str, float] | None = None  # the latest hook: (node, time)
        self._watched: dict[int, Any] = {}  # id(grad_fn) -> grad_fn (kept alive, so ids stay unique)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        node = self.nodes[self.next] if self.next < len(self.nodes) else None
        if node is None or func is not node.target:
            return func(*args, **kwargs)
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        elapsed = time.perf_counter() - t0
        want = _shape(node.meta.get("val"))
        if want is not None and _shape(out) is not None and len(want) != len(_shape(out)):
            return out  # the same op called around the graph, not this node
        self.next += 1
        self.times[node.name] = elapsed
        t = _first_tensor(out)
        grad_fn = t.grad_fn if t is not None and t.requires_grad else None
        if grad_fn is None:
            self.times[f"{node.name}.backward"] = 0.0
        elif id(grad_fn) not in self._watched:  # an op that hands back its input shares its autograd node
            name = node.name
            grad_fn.register_prehook(lambda grads: self._events.append((time.perf_counter(), name)))
            grad_fn.register_hook(lambda gin, gout: setattr(self, "_last", (name, time.perf_counter())))
            self._watched[id(grad_fn)] = grad_fn
        return out

    def backward_times(self) -> None:
        """Each watched node's backward: from its prehook to the next one (the last: to its hook)."""
        events = sorted(self._events)
        for (t, name), (t_next, _) in zip(events, events[1:]):
            self.times[f"{name}.backward"] = t_next - t
        if events and self._last is not None and self._last[0] == events[-1][1]:
            self.times[f"{events[-1][1]}.backward"] = self._last[1] - events[-1][0]


def measure_profile(pm, *inputs: Any, target: Any = None, loss_fn: Callable | None = None, warmup: int = 1,
                    iters: int = 3, **kwargs: Any) -> dict[str, float]:
    """Measured seconds per node of this rank's graph, for `rank_timeline(pm, profile=...)`.

    Args:
        pm: a ParallelModule (not a pipeline, not compiled: their graphs do not run node by node).
        inputs, kwargs: the step's inputs, as `pm.step` / `pm(...)` take them.
        target, loss_fn: with a target, a training step (`pm.step(*inputs, target=, loss_fn=)`) is
            measured, forward and backward; without, the forward alone (grad enabled, as in training).
        warmup: runs before measuring (the first run also exchanges fingerprints and allocates).
        iters: measured runs; each time is the median over them.

    Returns:
        {node name: forward seconds, node name + '.backward': backward seconds} (module docstring).

    Raises:
        PlanError: for a pipeline, a compiled module, or a captured loss without `target`.
    """
    if stage_info(pm.graph_module) is not None:
        raise PlanError(f"measure_profile({type(pm).__name__}): a pipeline's stages run per microbatch under "
                        "torch's schedule; rank_timeline draws pipelines from the stage estimates")
    if getattr(pm, "compile_backend", None) is not None:
        raise PlanError(f"measure_profile({type(pm).__name__}): compiled graphs run as fused kernels, not node by "
                        "node; measure the module parallelized with compile=False")
    if target is None and getattr(getattr(pm, "capture_info", None), "loss", False):
        raise PlanError(f"measure_profile({type(pm).__name__}): this module's graph ends in its captured loss, and "
                        "its forward runs another graph (the model alone); pass target= to measure the step")
    nodes = _timed_nodes(pm.graph_module)
    runs: list[dict[str, float]] = []
    for i in range(warmup + iters):
        timer = _NodeTimer(nodes)
        with timer:
            if target is not None:
                pm.step(*inputs, target=target, loss_fn=loss_fn, **kwargs)
            else:
                pm(*inputs, **kwargs)
        timer.backward_times()
        if i >= warmup:
            runs.append(timer.times)
        if timer.next < len(nodes):
            log.warning("measure_profile: %d of %d nodes matched (stopped at %%%s); the rest stay estimated",
                        timer.next, len(nodes), nodes[timer.next].name)
    keys = set().union(*runs) if runs else set()
    return {k: statistics.median(r[k] for r in runs if k in r) for k in sorted(keys)}
