"""Memory per rank, read from the compiled graphs.

For each pp rank (all ranks of one pp coordinate hold the same shapes), local bytes:

    parameters  P = sum of local shards of the parameters its stages hold, by dtype, tied tensors once
    gradients   G = the trainable ones among them (same dtype and shards: FSDP2's sharded gradients)
    optimizer   O = s x itemsize x local elements of the trainable parameters, s = 2 by default
                    (AdamW's exp_avg and exp_avg_sq, in the parameter's dtype: float32 master weights
                    give 8 bytes per element; `optimizer_bytes_per_element` overrides)
    buffers     B
    state       P + G + O + B (`total`): what lives between steps

and what a training step holds on top of the state, at the example batch (`fxpar.analysis.activations`):

    activations A = the forward's saved values, microbatches in flight per the pipeline schedule
                    (1/M each: M with GPipe, min(M, S - s) for stage s of S with 1F1B), with activation
                    checkpointing only the regions' inputs (and selective's kept outputs)
    recompute   R = the largest checkpointed region's saves, re-created during its backward, and
                    2 x its largest value
    param copies C = mixed precision's param_dtype casts of non-FSDP parameters, saved for the backward
    gathered    F = FSDP's gathered parameters (param_dtype) and their unsharded gradients in flight:
                    2 x the largest gather bucket with reshard_after_forward, else all buckets + the largest;
                    the root unit (apply_fsdp) is held for the whole step either way: with reshard_after_forward
                    F = root + the largest other bucket + the largest bucket
    workspace   W = 2 x the largest value (a gradient in and a gradient out of one op)
    grad buckets B_g = the flat buffers of the data-parallel gradient all-reduce (bucket_grad_sync):
                    the bytes of the gradients it syncs, all buckets in flight at once (a tied weight
                    is synced if any of its names is)
    partial grads T = 2 x the largest gradient autograd sums over several uses (a tied wte / lm_head,
                    a gathered weight read twice): two partial gradients alive next to their sum
                    (`_partial_grads`)
    step peak   A + max(R, W) + C + F + G + B_g + T, an upper bound (the loss computed outside the graph, as
                pm.step(loss_fn=...) runs it, is not counted): it counts every gradient next to every
                activation, though gradients grow while activations are freed
    peak        P + O + B + step peak

With input_layout="local" the example inputs are one rank's shard while the graph's batch symbol
is the global batch: it is bound to the example size x the data-parallel shards (`_local_layout_bindings`).

With a CPUOffloadPolicy (`offload`), P, G and O live in host memory and the device holds
B + A + max(R, W) + C + F plus a device copy of one bucket's shards and gradient (`device_peak`, `host`).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx
import torch.nn as nn

from fxpar._torch.dispatch import storage_key
from fxpar.analysis.activations import saved_bytes
from fxpar.analysis.cost import VIEW_OPS
from fxpar.analysis.fsdp import bucket_groups
from fxpar.analysis.plan_io import full_mesh
from fxpar.core.dataflow import attr_of
from fxpar.core.fmt import fmt_bytes
from fxpar.core.mesh import MeshInfo
from fxpar.core.spec import FSDP_ROOT_UNIT, SIZE_BINDINGS, TensorSpec, get_info
from fxpar.core.stages import stage_info
from fxpar.ops.collectives import COLLECTIVE_OPS

aten = torch.ops.aten
_CHAIN = frozenset({*COLLECTIVE_OPS, *VIEW_OPS, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout})
"""Ops between a parameter and its compute uses: its gradient flows back through them whole."""

__all__ = ["ADAMW_BYTES_PER_ELEMENT", "ADAMW_STATES", "RankMemory", "stage_graphs", "memory_per_rank",
           "activation_bytes", "memory_lines", "grad_sync_lines"]

ADAMW_STATES = 2  # exp_avg + exp_avg_sq, each in the parameter's dtype
ADAMW_BYTES_PER_ELEMENT = 8  # ... for float32 parameters


@dataclass(frozen=True)
class RankMemory:
    """Memory of the ranks at one pp coordinate (or of every rank, without a pipeline), in bytes.

    Attributes:
        pp_rank: the pp coordinate, None without a pipeline.
        ranks: how many ranks hold this much (the other mesh dims).
        stages: the pipeline stages they run.
        parameters, gradients, optimizer, buffers: bytes (see the module docstring).
        activations: saved activations of one step (A); not in `total`.
        parameters_by_dtype: ((dtype name, bytes), ...) of the parameters.
        recompute, param_copies, gathered, workspace: R, C, F, W of the module docstring.
        offload: parameters, gradients and optimizer state live in host memory (CPUOffloadPolicy).
        offload_staging: device bytes of the shards (and gradients) copied in for one bucket.
        grad_buckets: flat buffers of the data-parallel gradient all-reduce (bucket_grad_sync), B_g.
        partial_grads: a multi-use parameter's partial gradients before autograd sums them, T.
    """

    pp_rank: int | None
    ranks: int
    stages: tuple[int, ...]
    parameters: int
    gradients: int
    optimizer: int
    buffers: int
    activations: int = 0
    parameters_by_dtype: tuple[tuple[str, int], ...] = ()
    recompute: int = 0
    param_copies: int = 0
    gathered: int = 0
    workspace: int = 0
    offload: bool = False
    offload_staging: int = 0
    grad_buckets: int = 0
    partial_grads: int = 0

    @property
    def total(self) -> int:
        """The state between steps: parameters, gradients, optimizer state, buffers."""
        return self.parameters + self.gradients + self.optimizer + self.buffers

    @property
    def step_peak(self) -> int:
        """What a training step adds to the parameters, optimizer state and buffers, at most."""
        return (self.activations + max(self.recompute, self.workspace) + self.param_copies + self.gathered
                + self.gradients + self.grad_buckets + self.partial_grads)

    @property
    def peak(self) -> int:
        """Parameters, optimizer state and buffers plus the step peak (device and host together)."""
        return self.parameters + self.optimizer + self.buffers + self.step_peak

    @property
    def host(self) -> int:
        """Host memory for the offloaded state (0 without offload)."""
        return self.parameters + self.gradients + self.optimizer if self.offload else 0

    @property
    def device_peak(self) -> int:
        """Device memory at the step's peak."""
        if not self.offload:
            return self.peak
        return self.buffers + self.step_peak - self.gradients + self.offload_staging

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
                    optimizer_bytes_per_element: int | None = None) -> list[RankMemory]:
    """Parameter, gradient, optimizer-state, buffer and training-step bytes per rank, one entry per pp rank.

    Args:
        pm: a ParallelModule (a dry run's or a real one).
        mesh: the whole mesh (default: pm's, with the pp dim put back), for the rank counts.
        optimizer_bytes_per_element: optimizer state bytes per trainable parameter element
            (default: AdamW, 2 x the parameter's itemsize: 8 for float32; SGD with momentum: 4).

    Returns:
        One RankMemory per pp rank (one for every rank without a pipeline).
    """
    token = SIZE_BINDINGS.set({**(SIZE_BINDINGS.get() or {}), **_local_layout_bindings(pm)})
    try:
        return _memory_per_rank(pm, mesh, optimizer_bytes_per_element)
    finally:
        SIZE_BINDINGS.reset(token)


def _local_layout_bindings(pm) -> dict:
    """With input_layout='local' the example inputs are one rank's batch shard, but the graph's batch
    symbol is the global batch: bind it to the example size x the data-parallel shards."""
    if getattr(pm, "input_layout", "full") != "local":
        return {}
    out: dict = {}
    for _, graphs in stage_graphs(pm).values():
        for g in graphs:
            for node in g.graph.nodes:
                info = get_info(node)
                if node.op != "placeholder" or info is None or not isinstance(info.spec, TensorSpec):
                    continue
                factor: dict[int, int] = {}
                for m, p in enumerate(info.spec.placements):
                    if p.is_shard():
                        factor[p.dim] = factor.get(p.dim, 1) * pm.mesh_info.sizes[m]
                for d, n in factor.items():
                    size = info.spec.shape[d]
                    if isinstance(size, torch.SymInt) and size.node.expr.is_symbol and size.node.hint is not None:
                        out[size.node.expr] = sympy.Integer(int(size.node.hint) * n)
    return out


def _memory_per_rank(pm, mesh: MeshInfo | None, optimizer_bytes_per_element: int | None) -> list[RankMemory]:
    sizes = dict(zip(mesh.names, mesh.sizes)) if mesh is not None else dict(full_mesh(pm))
    others = 1
    for name, s in sizes.items():
        others *= 1 if name == "pp" else s
    reshard = getattr(pm, "reshard_after_forward", True)
    offload = getattr(pm, "offload_policy", None) is not None
    out = []
    for pp_rank, (stages, graphs) in stage_graphs(pm).items():
        params = grads = opt = buffers = synced = 0
        by_dtype: dict[str, int] = {}
        seen: set[tuple] = set()
        largest_shards = 0
        synced_keys = {tensor_key(attr_of(g, node.target)) for g in graphs for node in g.graph.nodes
                       if node.op == "get_attr" and get_info(node) is not None and get_info(node).grad_sync}
        for g in graphs:
            for node in g.graph.nodes:
                info = get_info(node)
                if node.op != "get_attr" or info is None or not isinstance(info.spec, TensorSpec):
                    continue
                t = attr_of(g, node.target)
                key = tensor_key(t)
                if key in seen:  # a tied weight (two FQNs, or two stages of one rank) is one tensor
                    continue
                seen.add(key)
                # the tensor's own size: a tied weight's get_attr may carry the spec of another use
                local = t.numel() * t.element_size() if isinstance(t, torch.Tensor) else info.spec.nbytes(local=True)
                if not isinstance(t, nn.Parameter):
                    buffers += local
                    continue
                params += local
                dtype = str(t.dtype).replace("torch.", "")
                by_dtype[dtype] = by_dtype.get(dtype, 0) + local
                largest_shards = max(largest_shards, local)
                if t.requires_grad:
                    grads += local
                    # bucket_grad_sync marks the tied weight on one of its names, maybe not this one
                    synced += local if key in synced_keys else 0
                    per = optimizer_bytes_per_element if optimizer_bytes_per_element is not None \
                        else ADAMW_STATES * t.element_size()
                    opt += t.numel() * per
        saved = _saved(pm, stages, graphs)
        gathered, staging = _gathered(graphs, reshard, offload)
        out.append(RankMemory(pp_rank, others, stages, params, grads, opt, buffers, saved[0],
                              tuple(sorted(by_dtype.items())), saved[1], saved[2], gathered, saved[3],
                              offload, 2 * staging if offload else 0, synced, _partial_grads(graphs)))
    return out


def tensor_key(t: torch.Tensor) -> tuple:
    """One key per tensor, shared by tied names (one storage) and by one object under two names."""
    try:
        return storage_key(t), t.storage_offset(), t.numel()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (meta / fake / functional)
        return (id(t),)


def _partial_grads(graphs: list[fx.GraphModule]) -> int:
    """T of the module docstring: 2 x the largest gradient summed over several uses.

    Autograd adds a value's gradients from its uses out of place: at each addition the running sum,
    the new partial gradient and their sum are alive, the sum being the gradient counted elsewhere
    (G, or F for a gathered weight). A parameter's uses are those of all its names (a tied weight);
    a value on its chain (an FSDP gather, a cast, a view, a collective) read twice sums at its size.
    """
    uses: dict[tuple, list[int]] = {}
    largest = 0
    for g in graphs:
        for node in g.graph.nodes:
            if node.op != "get_attr":
                continue
            t = attr_of(g, node.target)
            if not isinstance(t, nn.Parameter) or not t.requires_grad:
                continue
            entry = uses.setdefault(tensor_key(t), [0, t.numel() * t.element_size()])
            entry[0] += len(node.users)
            frontier, seen = list(node.users), set()
            while frontier:
                u = frontier.pop()
                if u in seen or u.op != "call_function" or u.target not in _CHAIN:
                    continue
                seen.add(u)
                info = get_info(u)
                if len(u.users) > 1 and info is not None and isinstance(info.spec, TensorSpec):
                    largest = max(largest, info.spec.nbytes(local=True))
                frontier.extend(u.users)
    largest = max([largest] + [nbytes for n, nbytes in uses.values() if n > 1])
    return 2 * largest


def _gathered(graphs: list[fx.GraphModule], reshard: bool, offload: bool) -> tuple[int, int]:
    """(F of the module docstring, the largest bucket's local shard bytes); with offload, one parameter a bucket."""
    buckets = []
    groups = bucket_groups(graphs)
    if offload:  # the runtime gathers the device copies one by one (fxpar.passes.offload_parameters)
        groups = [(args, [m]) for args, members in groups for m in members]
    kept = 0  # the root unit (apply_fsdp): gathered for the whole step, as FSDP2's root
    for _, members in groups:
        full = shard = 0
        for g, param in members:
            gather = next(u for u in param.users if u.target is torch.ops.fxpar.fsdp_all_gather.default)
            full += get_info(gather).spec.nbytes(local=True)
            shard += get_info(param).spec.nbytes(local=True)
            root = get_info(gather).fsdp_bucket == FSDP_ROOT_UNIT
        if root and not offload:
            kept += full
        buckets.append((full, shard, root and not offload))
    if not buckets:
        return 0, 0
    largest = max(f for f, _, _ in buckets)
    held = kept + max((f for f, _, k in buckets if not k), default=0) if reshard else sum(f for f, _, _ in buckets)
    return held + largest, max(s for _, s, _ in buckets)


def _saved(pm, stages: tuple[int, ...], graphs: list[fx.GraphModule]) -> tuple[int, int, int, int]:
    """(A, R, C, W) of the module docstring, microbatches in flight per the schedule."""
    split = stage_info(pm.graph_module)
    acts = recompute = copies = workspace = 0
    for k, g in zip(stages or (None,), graphs):
        s = saved_bytes(g)
        if split is None:
            in_flight, m = 1, 1
        else:
            m = split.microbatches
            in_flight = min(m, split.num_stages - k) if split.schedule == "1f1b" else m
        acts += s.activations * in_flight // m
        copies += s.param_copies * in_flight // m
        recompute = max(recompute, s.recompute // m)
        workspace = max(workspace, s.workspace // m)
    return acts, recompute, copies, workspace


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


def memory_lines(memory: list[RankMemory]) -> list[str]:
    """The 'memory per rank' section of explain() (fxpar.analysis.memory's model, at the example batch)."""
    lines = ["Memory per rank (state: parameters, gradients, optimizer state assuming AdamW: 2 values per trainable "
             "element in the parameter's dtype; a training step adds the saved activations, checkpoint recompute, "
             "mixed-precision parameter copies, FSDP's gathered parameters and gradients in flight and a workspace; "
             "peak = state + step, an upper bound):"]
    for m in memory:
        stages = f", stages {list(m.stages)}" if m.stages else ""
        dtypes = ", ".join(f"{d} {fmt_bytes(b)}" for d, b in m.parameters_by_dtype)
        lines.append(f"  {m.label} ({m.ranks} rank{'s' if m.ranks > 1 else ''}{stages}): parameters {fmt_bytes(m.parameters)}"
                     + (f" ({dtypes})" if len(m.parameters_by_dtype) > 1 else "")
                     + f", gradients {fmt_bytes(m.gradients)}, optimizer {fmt_bytes(m.optimizer)}"
                     + (f", buffers {fmt_bytes(m.buffers)}" if m.buffers else "") + f"; state {fmt_bytes(m.total)}")
        step = [f"activations {fmt_bytes(m.activations)}"]
        for what, n in (("recompute", m.recompute), ("parameter copies (param_dtype casts, kv replica sums)", m.param_copies),
                        ("FSDP gathered", m.gathered), ("gradient all-reduce buckets", m.grad_buckets),
                        ("partial gradients of multi-use parameters", m.partial_grads),
                        ("workspace", m.workspace)):
            if n:
                step.append(f"{what} {fmt_bytes(n)}")
        lines.append(f"    training step: {', '.join(step)}; peak ~{fmt_bytes(m.peak)}")
        if m.offload:
            lines.append(f"    CPU offload: host {fmt_bytes(m.host)} (parameters, gradients, optimizer state); "
                         f"device peak ~{fmt_bytes(m.device_peak)} (buffers, the step, one bucket's shards copied in)")
    if len(memory) > 1:
        worst = max(memory, key=lambda m: m.peak)
        lines.append(f"  most loaded: {worst.label}, state {fmt_bytes(worst.total)}, peak ~{fmt_bytes(worst.peak)}")
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
            buckets[key] = buckets.get(key, 0) + sync.nbytes(info.spec)
    if not buckets:
        return []
    total = sum(buckets.values())
    dims = sorted({d for _, ds in buckets for d in ds})
    when = ("once per step after the pipeline schedule" if stage_info(pm.graph_module) is not None
            else "asynchronous in the backward")
    return [f"{'Data-parallel' if set(dims) - {'tp'} else 'Sequence-parallel'} gradient all-reduce (bucketed, {when}; all stages): "
            f"{len(buckets)} bucket{'s' if len(buckets) > 1 else ''}, {fmt_bytes(total)} per step over {', '.join(dims)}"]
