"""Memory per rank, read from the compiled graphs.

For each pp rank (all ranks of one pp coordinate hold the same shapes):

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

from dataclasses import dataclass

import torch.fx as fx
import torch.nn as nn

from fxpar.analysis.cost import VIEW_OPS
from fxpar.analysis.plan_io import full_mesh
from fxpar.core.dataflow import attr_of
from fxpar.core.fmt import fmt_bytes
from fxpar.core.mesh import MeshInfo
from fxpar.core.spec import TensorSpec, get_info
from fxpar.core.stages import stage_info

__all__ = ["ADAMW_BYTES_PER_ELEMENT", "RankMemory", "stage_graphs", "memory_per_rank", "activation_bytes", "memory_lines",
           "grad_sync_lines"]

ADAMW_BYTES_PER_ELEMENT = 8  # exp_avg + exp_avg_sq, float32 each


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




def stage_graphs(pm) -> dict[int | None, tuple[tuple[int, ...], list[fx.GraphModule]]]:
    """pp rank -> (its stages, their graphs); {None: ((), [graph])} without a pipeline."""
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
    sizes = dict(zip(mesh.names, mesh.sizes)) if mesh is not None else dict(full_mesh(pm))
    others = 1
    for name, s in sizes.items():
        others *= 1 if name == "pp" else s
    out = []
    for pp_rank, (stages, graphs) in stage_graphs(pm).items():
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
    split = stage_info(pm.graph_module)
    if split is None:
        return sum(activation_bytes(g) for g in graphs)
    m, s = split.microbatches, split.num_stages
    total = 0
    for k, g in zip(stages, graphs):
        in_flight = min(m, s - k) if split.schedule == "1f1b" else m
        total += activation_bytes(g) * in_flight // m
    return total


def memory_lines(memory: list[RankMemory]) -> list[str]:
    """The 'memory per rank' section of a dry run's explain()."""
    lines = ["Memory per rank (parameters, gradients, optimizer state assuming AdamW: 2 float32 values per "
             "trainable parameter element; FSDP's gathered parameters in flight not counted; activations: every "
             "forward value of the compute nodes, microbatches in flight per the schedule, not in the total):"]
    for m in memory:
        stages = f", stages {list(m.stages)}" if m.stages else ""
        lines.append(f"  {m.label} ({m.ranks} rank{'s' if m.ranks > 1 else ''}{stages}): parameters {fmt_bytes(m.parameters)}, gradients "
                     f"{fmt_bytes(m.gradients)}, optimizer {fmt_bytes(m.optimizer)}"
                     + (f", buffers {fmt_bytes(m.buffers)}" if m.buffers else "") + f"; total {fmt_bytes(m.total)}"
                     + f"; peak activations ~{fmt_bytes(m.activations)}")
    if len(memory) > 1:
        worst = max(memory, key=lambda m: m.total)
        lines.append(f"  most loaded: {worst.label}, {fmt_bytes(worst.total)}")
    return lines


def grad_sync_lines(pm) -> list[str]:
    """Data-parallel gradient all-reduces of bucket_grad_sync (hooks at run time, so not graph nodes)."""
    buckets: dict[tuple[int, tuple[str, ...]], int] = {}
    graphs = [g for _, gs in stage_graphs(pm).values() for g in gs]
    seen: set[str] = set()
    for g in graphs:
        for node in g.graph.nodes:
            info = get_info(node)
            sync = info.grad_sync if info is not None and node.op == "get_attr" else None
            if not sync or node.target in seen or not isinstance(info.spec, TensorSpec):
                continue
            seen.add(node.target)
            key = (sync.bucket, sync.dims)
            buckets[key] = buckets.get(key, 0) + info.spec.nbytes(local=True)
    if not buckets:
        return []
    total = sum(buckets.values())
    dims = sorted({d for _, ds in buckets for d in ds})
    when = ("once per step after the pipeline schedule" if stage_info(pm.graph_module) is not None
            else "asynchronous in the backward")
    return [f"Data-parallel gradient all-reduce (bucketed, {when}; all stages): "
            f"{len(buckets)} bucket{'s' if len(buckets) > 1 else ''}, {fmt_bytes(total)} per step over {', '.join(dims)}"]
