"""The step time and memory of a compiled plan on a device, read from its graphs.

Everything is per rank, at the example inputs (the global batch), for one training step
(forward, backward, optimizer). For each pp rank r, over the compute nodes n of its graphs:

    t_fwd(r)   = sum_n max(FLOPs(n) / F_eff(dtype_n), Mem(n) / B_eff) + o    (`_compute`; o: per-op overhead)
    t_bwd(r)   = 2 t_fwd(r)                                                 backward = 2 x forward
    t_re(r)    = t_fwd(r) for "full" activation checkpointing, the non-matmul part of it for
                 "selective", 0 without                                     (recomputed forward)

with FLOPs and Mem from `fxpar.analysis.cost.node_cost`. Each collective node c of the graph costs

    t(c) = alpha(d) + moved(op, n, bytes) / beta(d)                         (`_collective_time`)

on its mesh dim d (n ranks): moved = 2 (n-1)/n B for all-reduce, (n-1)/n B for all-gather,
reduce-scatter and all-to-all, B the full tensor's bytes; alpha and beta are the link latency and
bandwidth, inside a node when the ranks of d and of every dim after it fit on one node (the last
mesh dim is the innermost), across nodes otherwise. Tensor-parallel collectives block compute,
and so do expert parallelism's token exchanges, which run inside each fused MoE node (`_moe_exchange`):
two all-to-alls (dispatch, combine) forward and two backward, each 2 alpha(ep) (ep-1) + S / beta(ep) per
pair with S = `fxpar.ops.moe.moe_all_to_all_bytes` (T local tokens, k slots, width H, balanced routing),
reported as ep_comm; a MoE node computes 2 T k 3 H I FLOPs (I its local expert width; node_cost).
FSDP gathers and their reduce-scatters are exposed by (1 - fsdp_overlap) (0 today: each gather
waits where it is issued); the data-parallel gradient all-reduce (bucketed, asynchronous in the
backward) is exposed by max(0, t_dp - dp_overlap t_bwd) without a pipeline, and whole after the
schedule with one. Without a pipeline

    step = t_fwd + t_bwd + t_re + t_tp + t_fsdp_exposed + t_dp_exposed + t_opt

With S stages, M microbatches and pp ranks, one unit u = max_r (t_fwd(r) + t_tp_fwd(r)) / (M v)
(v stages per rank; plus the per-op overhead and collective latencies each further microbatch pays
again) is a stage's forward of one microbatch; FSDP communication is paid per microbatch (M times)
when gathered parameters are freed after each forward; the schedule's compute order from
torch's own schedule, simulated with F = 1 and B = 2 (`fxpar.analysis.schedule`), takes a makespan
of K units, and

    step = K u (1 + t_re / t_fwd) + t_p2p + t_fsdp_exposed + t_dp + t_opt,
    t_p2p = 2 (S - 1) (alpha + X / (M beta)) + 2 (M - 1) alpha              the first microbatch across every
                                                                            cut, one latency each way after

(X the largest cut's activation bytes per step). The optimizer (AdamW) reads and writes about
7 float32 values per local parameter element: t_opt = 28 P_local / B_eff. Mixed precision (FSDP2's MixedPrecisionPolicy, param_dtype p, float32 reduce_dtype; `mp_dtype`,
`_mp_scale`): every float32 compute node runs at F_eff(p) on b_p / 4 of its bytes, activations take
b_p / 4 of their bytes, FSDP gathers and tensor-parallel activations (both ways) move b_p / 4 of
theirs, and parameters, gradients, optimizer state and the FSDP / data-parallel gradient reductions
stay float32. Memory per rank is
`fxpar.analysis.memory` (parameters, gradients, AdamW state, buffers) plus activations: every
floating-point value the forward's compute nodes produce, times the microbatches in flight per
stage (M for GPipe, min(M, S - k) for 1F1B's stage k, divided by M); with "full" checkpointing
only the values entering each block plus one block's, with "selective" also the matmul and
attention outputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from fxpar.analysis.cost import VIEW_OPS, evaluate, example_sizes, node_cost, size_expr
from fxpar.analysis.explain import collectives
from fxpar.analysis.memory import memory_per_rank, stage_graphs
from fxpar.analysis.schedule import schedule_order, simulate_schedule
from fxpar.core.errors import PlanError, block_of
from fxpar.core.fmt import fmt_bytes
from fxpar.core.mesh import MeshInfo
from fxpar.core.spec import FSDP_ROOT_UNIT, TensorSpec, get_info
from fxpar.core.stages import stage_info
from fxpar.dryrun import plan as dry_run
from fxpar.ops.moe import moe_all_to_all_bytes, moe_experts
from fxpar.planner.devices import DeviceProfile, device_profile

__all__ = ["Estimate", "estimate", "estimate_module", "ACTIVATION_CHECKPOINTING"]

ACTIVATION_CHECKPOINTING = (None, "selective", "full")
_MATMUL_NAMES = ("linear", "mm", "bmm", "addmm", "matmul", "scaled_dot_product", "convolution", "baddbmm")
_DATA_DIMS = ("dp", "fsdp")
MEMORY_EFFICIENCY = 0.8  # of the device's memory bandwidth, for memory-bound ops


@dataclass(frozen=True)
class Estimate:
    """A plan's predicted training step on a device.

    Attributes:
        step_s: seconds per training step (forward, backward, optimizer).
        memory_gib: memory of the most loaded rank (parameters, gradients, optimizer state, buffers,
            activations) in GiB.
        breakdown: the terms of the step and of memory (see the module docstring), seconds and bytes.
        mesh: the mesh, {dim: size}.
        device: the device profile's name.
    """

    step_s: float
    memory_gib: float
    breakdown: dict = field(default_factory=dict)
    mesh: dict = field(default_factory=dict)
    device: str = ""

    def explain(self) -> str:
        b = self.breakdown
        mesh = " x ".join(f"{k}{v}" for k, v in self.mesh.items()) or "1 rank"
        lines = [f"estimate on {self.device}, mesh {mesh}: step {self.step_s * 1e3:.2f} ms, "
                 f"memory {self.memory_gib:.2f} GiB (most loaded rank)"]
        terms = ("compute_s", "recompute_s", "tp_comm_s", "ep_comm_s", "fsdp_exposed_s", "dp_exposed_s", "p2p_s",
                 "optimizer_s")
        lines.append("  " + ", ".join(f"{k[:-2]} {b[k] * 1e3:.2f} ms" for k in terms if b.get(k)))
        if b.get("bubble") is not None:
            lines.append(f"  pipeline: schedule {b['schedule']}, {b['microbatches']} microbatches, "
                         f"bubble {b['bubble']:.3f}")
        lines.append(f"  memory: parameters {fmt_bytes(b['parameters'])}, gradients {fmt_bytes(b['gradients'])}, "
                     f"optimizer {fmt_bytes(b['optimizer'])}, activations {fmt_bytes(b['activations'])}"
                     + (f" (checkpointing: {b['activation_checkpointing']})" if b.get("activation_checkpointing")
                        else ""))
        if b.get("mp_dtype"):
            lines.append(f"  mixed precision: compute and activations in {b['mp_dtype']}, parameters, gradients "
                         "and optimizer state float32")
        lines.append(f"  communication per step: {fmt_bytes(b['comm_bytes'])}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()


def _intra(mesh: MeshInfo, dim: str, device: DeviceProfile) -> bool:
    """Whether the ranks of `dim` share a node: the dims from it to the innermost fit in one."""
    if dim not in mesh.names:
        return True
    inner = 1
    for name, size in zip(reversed(mesh.names), reversed(mesh.sizes)):
        inner *= size
        if name == dim:
            break
    return inner <= device.devices_per_node


def _moved(op: str, n: int, payload: float) -> float:
    """Bytes a rank sends for `op` with `payload` as explain() counts it (see `CollectiveInfo`)."""
    if n <= 1 or op in ("shard", "grad_all_reduce"):
        return 0.0
    if op == "all_reduce":
        return 2 * (n - 1) / n * payload
    if op == "all_gather":  # payload: this rank's shard
        return (n - 1) * payload
    return (n - 1) / n * payload  # reduce_scatter (payload: the full input), fsdp_all_gather, all_to_all


def _collective_time(op: str | None, n: int, payload: float, intra: bool, device: DeviceProfile) -> float:
    if op is None or not payload:
        return 0.0
    moved = _moved(op, n, payload)
    if not moved:
        return 0.0
    latency, bandwidth = device.link(intra)
    return latency * (n - 1) + moved / bandwidth


def _is_matmul(node: fx.Node) -> bool:
    name = str(getattr(node.target, "__name__", node.target))
    return any(k in name for k in _MATMUL_NAMES)


def _mp_scale(dtype: torch.dtype, mp: torch.dtype | None) -> tuple[torch.dtype, float]:
    """(the compute dtype, the factor on bytes) of a value of `dtype` under mixed precision in `mp`."""
    if mp is None or dtype != torch.float32 or mp == dtype:
        return dtype, 1.0
    return mp, mp.itemsize / dtype.itemsize


def _shape_key(node: Any) -> Any:
    info = get_info(node) if isinstance(node, fx.Node) else None
    spec = info.spec if info is not None else None
    if isinstance(spec, TensorSpec):
        return tuple(size_expr(s) for s in spec.local_shape), spec.dtype
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return (tuple(size_expr(s) for s in val.shape), val.dtype) if isinstance(val, torch.Tensor) else type(val).__name__


def _cost_key(node: fx.Node, shapes: dict) -> tuple:
    """What a node's FLOPs and bytes depend on: its op, its local shapes and dtypes. The module path with
    its block index dropped makes the repeated blocks of a model (and of its pipeline stages) share one
    evaluation of the symbolic cost. `shapes` keeps each node's shape key for the graph being priced (a
    node is an input of several others)."""
    info = get_info(node)
    fqn = info.module_fqn if info is not None else ""
    block = block_of(fqn)
    where = fqn[len(block):] if block else fqn
    inputs = tuple(_shape_key_of(a, shapes) for a in node.all_input_nodes)
    return node.target, where, _shape_key_of(node, shapes), inputs


def _shape_key_of(node: fx.Node, shapes: dict) -> Any:
    key = shapes.get(node)
    if key is None:
        key = shapes[node] = _shape_key(node)
    return key


def _node_values(node: fx.Node, hints: dict, memo: dict, shapes: dict) -> tuple[float, float]:
    key = _cost_key(node, shapes)
    hit = memo.get(key)
    if hit is None:
        cost = node_cost(node)
        hit = memo[key] = (evaluate(cost.flops, hints), evaluate(cost.mem_bytes, hints))
    return hit


def _compute(gm: fx.GraphModule, hints: dict, device: DeviceProfile,
             mp: torch.dtype | None = None, memo: dict | None = None) -> tuple[float, float, float, int]:
    """(forward seconds, the non-matmul part of it, forward FLOPs, ops counted) of one graph.

    With `mp` (mixed precision's param_dtype), float32 compute runs in `mp`: its FLOP rate, its bytes.
    `memo` keeps node costs by `_cost_key` across the graphs of one compiled module.
    """
    total = cheap = flops_total = 0.0
    count = 0
    mem_bw = device.memory_bandwidth * MEMORY_EFFICIENCY
    memo = {} if memo is None else memo
    shapes: dict = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        flops, mem = _node_values(node, hints, memo, shapes)
        if not flops and not mem:
            continue
        info = get_info(node)
        spec = info.spec if info is not None else None
        dtype, scale = _mp_scale(spec.dtype if isinstance(spec, TensorSpec) else torch.float32, mp)
        t = max(flops / device.flops(dtype), scale * mem / mem_bw) + device.op_overhead
        total += t
        count += 1
        flops_total += flops
        if not _is_matmul(node):
            cheap += t
    return total, cheap, flops_total, count


def _local(node: fx.Node) -> tuple:
    info = get_info(node)
    return info.spec.local_shape if info is not None and isinstance(info.spec, TensorSpec) else \
        tuple(node.meta["val"].shape)


def _moe_exchange(node: fx.Node, hints: dict, mp: torch.dtype | None) -> tuple[int, float]:
    """(ep, bytes this rank sends per forward) of a fused MoE node's token all-to-alls (dispatch and combine;
    the backward sends as much again): `fxpar.ops.moe.moe_all_to_all_bytes` under balanced routing."""
    ep = int(node.kwargs.get("ep_size", 1))
    if ep <= 1:
        return ep, 0.0
    x, idx = node.args[0], node.args[1]
    dtype, scale = _mp_scale(x.meta["val"].dtype, mp)
    tokens = evaluate(size_expr(_local(x)[0]), hints)
    hidden = evaluate(size_expr(_local(x)[1]), hints)
    return ep, scale * moe_all_to_all_bytes(tokens, int(idx.meta["val"].shape[1]), hidden,
                                            x.meta["val"].dtype.itemsize, ep)


def _activations(gm: fx.GraphModule, hints: dict, checkpointing: str | None, mp: torch.dtype | None = None) -> float:
    """Bytes of forward values autograd keeps, under a checkpointing mode (see the module docstring)."""
    per_block: dict[str | None, float] = {}
    kept = 0.0
    inputs: dict[str | None, float] = {}
    for node in gm.graph.nodes:
        info = get_info(node)
        if node.op != "call_function" or info is None or info.role != "compute" or node.target in VIEW_OPS:
            continue
        specs = info.spec if isinstance(info.spec, tuple) else (info.spec,)
        nbytes = sum(s.nbytes(local=True) * _mp_scale(s.dtype, mp)[1] for s in specs
                     if isinstance(s, TensorSpec) and s.dtype.is_floating_point)
        block = block_of(info.module_fqn)
        per_block[block] = per_block.get(block, 0.0) + nbytes
        if checkpointing == "selective" and _is_matmul(node):
            kept += nbytes
        for a in node.all_input_nodes:  # values entering the block from outside it
            ai = get_info(a)
            if a.op != "get_attr" and ai is not None and isinstance(ai.spec, TensorSpec) and \
                    ai.spec.dtype.is_floating_point and block is not None and block_of(ai.module_fqn) != block:
                inputs[block] = inputs.get(block, 0.0) + ai.spec.nbytes(local=True) * _mp_scale(ai.spec.dtype, mp)[1]
    if checkpointing is None:
        return sum(per_block.values())
    outside = per_block.pop(None, 0.0)  # embeddings, the head: not in a block, not checkpointed
    biggest = max(per_block.values(), default=0.0)
    return outside + sum(inputs.values()) + biggest + (kept if checkpointing == "selective" else 0.0)


@dataclass
class _GraphProfile:
    """What one graph costs, independent of microbatches, schedule and checkpointing."""

    fwd: float = 0.0
    nodes: int = 0
    cheap: float = 0.0
    flops: float = 0.0
    tp_fwd: float = 0.0
    tp_bwd: float = 0.0
    tp_alpha: float = 0.0  # the latency part of tp_fwd + tp_bwd: paid again by every microbatch
    ep: float = 0.0  # the part of tp_fwd + tp_bwd that is expert parallelism's token all-to-alls
    fsdp: float = 0.0
    comm_bytes: float = 0.0
    sync: dict = field(default_factory=dict)  # (bucket, dims) -> {parameter: local bytes}


def _profile(g: fx.GraphModule, hints: dict, device: DeviceProfile, mesh: MeshInfo, spmd: MeshInfo,
             reshard_after_forward: bool, mp: torch.dtype | None = None, memo: dict | None = None) -> _GraphProfile:
    prof = _GraphProfile()
    prof.fwd, prof.cheap, prof.flops, prof.nodes = _compute(g, hints, device, mp, memo)
    # FSDP gathers of one block run as one collective each way (fsdp_unit='block'): one latency
    buckets: dict[tuple, list] = {}
    units = {n.name: get_info(n).fsdp_bucket for n in g.graph.nodes if get_info(n) is not None}
    by_name = {n.name: n for n in g.graph.nodes} if mp else {}
    for coll in collectives(g, spmd):
        key = (coll.mesh_dim, coll.op, units.get(coll.node) or coll.node)
        acc = buckets.setdefault(key, [coll, 0.0, 0.0])
        acc[1] += coll.forward_bytes
        acc[2] += coll.backward_bytes
    for (dim, op, unit), (coll, fwd_bytes, bwd_bytes) in buckets.items():
        intra = _intra(mesh, dim, device)
        # mixed precision: gathers and activations move param_dtype; FSDP reduces gradients in float32
        scale = _mp_scale(torch.float32, mp)[1] if mp and _coll_dtype(by_name, coll.node) == torch.float32 else 1.0
        fwd_bytes, bwd_bytes = fwd_bytes * scale, bwd_bytes * (1.0 if dim in _DATA_DIMS else scale)
        tf = _collective_time(op, coll.group_size, fwd_bytes, intra, device)
        tb = _collective_time(coll.backward_op, coll.group_size, bwd_bytes, intra, device)
        prof.comm_bytes += _moved(op, coll.group_size, fwd_bytes) + \
            (_moved(coll.backward_op, coll.group_size, bwd_bytes) if coll.backward_op else 0.0)
        if dim in _DATA_DIMS:
            # the re-gather of the backward: not for the root unit, kept from the forward (apply_fsdp)
            regather = op == "fsdp_all_gather" and reshard_after_forward and unit != FSDP_ROOT_UNIT
            prof.fsdp += tf + tb + (tf if regather else 0.0)
        else:
            prof.tp_fwd += tf
            prof.tp_bwd += tb
            latency, _ = device.link(intra)
            prof.tp_alpha += latency * (coll.group_size - 1) * ((tf > 0) + (tb > 0))
    for node in g.graph.nodes:
        if node.target is moe_experts:  # the token exchange runs inside the node: blocking, both ways
            ep, sent = _moe_exchange(node, hints, mp)
            if sent:
                latency, bandwidth = device.link(_intra(mesh, "ep", device))
                t = 2 * latency * (ep - 1) + sent / bandwidth  # two exchanges, each as `_collective_time`
                prof.tp_fwd += t
                prof.tp_bwd += t
                prof.ep += 2 * t
                prof.tp_alpha += 4 * latency * (ep - 1)
                prof.comm_bytes += 2 * sent
        info = get_info(node)
        if node.op == "get_attr" and info is not None and info.grad_sync is not None:
            prof.sync.setdefault((info.grad_sync.bucket, info.grad_sync.dims), {})[node.target] = \
                info.grad_sync.nbytes(info.spec)
    return prof


def _coll_dtype(by_name: dict, name: str) -> torch.dtype | None:
    node = by_name.get(name)
    val = node.meta.get("val") if node is not None else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _in_flight(schedule: str, m: int, s: int, k: int) -> float:
    return min(m, s - k) / m if schedule == "1f1b" else 1.0


def estimate_module(pm: Any, mesh: MeshInfo, device: str | DeviceProfile = "h100", *,
                    microbatches: int | None = None, schedule: str | None = None,
                    activation_checkpointing: str | None = None, mp_dtype: torch.dtype | None = None,
                    dp_overlap: float = 0.8, fsdp_overlap: float = 0.0, reshard_after_forward: bool = True,
                    cache: dict | None = None) -> Estimate:
    """The estimate of a compiled module (a dry run's `report.module`, or a real rank's).

    Args:
        pm: the compiled module.
        mesh: the whole mesh, pp included (a dry run's `report.mesh`).
        device: a profile name or DeviceProfile.
        microbatches, schedule: override the pipeline's (the graphs do not depend on them).
        activation_checkpointing: None, 'selective' or 'full'.
        mp_dtype: price the module as if compiled with a MixedPrecisionPolicy of this param_dtype
            (float32 reduce_dtype): float32 compute and activations in it, FSDP gathers and
            tensor-parallel activations moved in it, parameters, gradients and optimizer state kept
            float32 (module docstring). A module already compiled with the policy needs no mp_dtype.
        dp_overlap, fsdp_overlap: the fraction of the backward that hides data-parallel gradient
            all-reduces, and of FSDP communication that overlaps compute.
        cache: a dict kept across calls on the same module (the planner prices many variants of
            one compiled mesh: graph costs are computed once).
    """
    cache = {} if cache is None else cache
    if activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise PlanError(f"activation_checkpointing={activation_checkpointing!r}: use one of {ACTIVATION_CHECKPOINTING}")
    device = device_profile(device)
    hints = example_sizes(pm.graph_module)
    split = stage_info(pm.graph_module)
    if split is not None and (microbatches or schedule):
        split = dataclasses.replace(split, microbatches=microbatches or split.microbatches,
                                    schedule=schedule or split.schedule)
    spmd = pm.mesh_info
    ranks = stage_graphs(pm)
    fwd, cheap, tp_fwd, tp_bwd, fsdp, comm_bytes, flops, acts, nodes = {}, {}, {}, {}, {}, {}, {}, {}, {}
    tp_alpha: dict = {}
    ep_comm: dict = {}
    sync: dict[tuple, dict] = {}  # (bucket, dims) -> {parameter: local bytes}
    for r, (stages, graphs) in ranks.items():
        fwd[r] = cheap[r] = tp_fwd[r] = tp_bwd[r] = fsdp[r] = comm_bytes[r] = flops[r] = acts[r] = nodes[r] = 0.0
        tp_alpha[r] = ep_comm[r] = 0.0
        for k, g in zip(stages or (None,) * len(graphs), graphs):
            prof = cache.get(("graph", id(g), mp_dtype))
            if prof is None:
                prof = cache[("graph", id(g), mp_dtype)] = _profile(g, hints, device, mesh, spmd,
                                                                    reshard_after_forward, mp_dtype,
                                                                    cache.setdefault("node_costs", {}))
            fwd[r] += prof.fwd
            nodes[r] += prof.nodes
            cheap[r] += prof.cheap
            flops[r] += prof.flops
            tp_fwd[r] += prof.tp_fwd
            tp_bwd[r] += prof.tp_bwd
            tp_alpha[r] += prof.tp_alpha
            ep_comm[r] += prof.ep
            fsdp[r] += prof.fsdp
            comm_bytes[r] += prof.comm_bytes
            for key, params in prof.sync.items():
                sync.setdefault(key, {}).update(params)
            key = ("acts", id(g), activation_checkpointing, mp_dtype)
            a = cache.get(key)
            if a is None:
                a = cache[key] = _activations(g, hints, activation_checkpointing, mp_dtype)
            acts[r] += a * (_in_flight(split.schedule, split.microbatches, split.num_stages, k) if split else 1.0)
    # data-parallel gradient all-reduce, per dim
    t_dp = 0.0
    dp_bytes = 0.0
    for (_, dims), params in sync.items():  # one flat all-reduce per bucket and dim
        nbytes = sum(params.values())
        for d in dims:
            n = mesh.size(d)
            t_dp += _collective_time("all_reduce", n, nbytes, _intra(mesh, d, device), device)
            dp_bytes += _moved("all_reduce", n, nbytes)
    memory = cache.get("memory")
    if memory is None:
        memory = cache["memory"] = memory_per_rank(pm, mesh)
    by_rank = {m.pp_rank: m for m in memory}
    params_local = max(m.parameters for m in memory)
    t_opt = 28 * params_local / 4 / (device.memory_bandwidth * MEMORY_EFFICIENCY)  # 7 fp32 values per element
    recompute = {r: (fwd[r] + tp_fwd[r] if activation_checkpointing == "full" else
                     cheap[r] if activation_checkpointing == "selective" else 0.0) for r in fwd}
    breakdown: dict[str, Any] = {"activation_checkpointing": activation_checkpointing,
                                 "mp_dtype": str(mp_dtype).replace("torch.", "") if mp_dtype else None}
    if split is None:
        r = next(iter(fwd))
        fsdp_exposed = (1 - fsdp_overlap) * fsdp[r]
        dp_exposed = max(0.0, t_dp - dp_overlap * 2 * fwd[r])
        step = 3 * fwd[r] + recompute[r] + tp_fwd[r] + tp_bwd[r] + fsdp_exposed + dp_exposed + t_opt
        breakdown.update(compute_s=3 * fwd[r], recompute_s=recompute[r],
                         tp_comm_s=tp_fwd[r] + tp_bwd[r] - ep_comm[r], ep_comm_s=ep_comm[r],
                         fsdp_exposed_s=fsdp_exposed, dp_exposed_s=dp_exposed, optimizer_s=t_opt, bubble=None)
    else:
        m, s = split.microbatches, split.num_stages
        per_rank = s // split.pp_size
        # every microbatch runs every node again: the per-op overhead is paid M times, the work once
        # every microbatch runs every node again: the per-op overhead and each collective's latency are
        # paid M times, the work and the bytes once
        unit = max((fwd[r] + tp_fwd[r] + (m - 1) * (nodes[r] * device.op_overhead + tp_alpha[r] / 3))
                   / (m * per_rank) for r in fwd)
        entries, bubble = simulate_schedule(schedule_order(split), s)
        makespan = max((e.end for e in entries), default=3.0 * (m + s - 1))
        slowest = max(fwd, key=lambda r: fwd[r] + tp_fwd[r])
        stretch = 1 + recompute[slowest] / fwd[slowest] if fwd[slowest] else 1.0
        cut = max((st.recv_bytes_value for st in split.stages), default=0.0)
        latency, bandwidth = device.link(_intra(mesh, "pp", device))
        t_p2p = (2 * (s - 1) * (latency + cut / m / bandwidth) + 2 * (m - 1) * latency) if s > 1 else 0.0
        # FSDP in a pipeline gathers (and reduce-scatters) per microbatch when resharding after forward
        fsdp_exposed = (1 - fsdp_overlap) * max(fsdp.values()) * (m if reshard_after_forward else 1)
        step = makespan * unit * stretch + t_p2p + fsdp_exposed + t_dp + t_opt
        breakdown.update(compute_s=makespan * unit, recompute_s=makespan * unit * (stretch - 1),
                         tp_comm_s=max(tp_fwd[r] + tp_bwd[r] - ep_comm[r] for r in fwd),
                         ep_comm_s=max(ep_comm.values()), fsdp_exposed_s=fsdp_exposed,
                         dp_exposed_s=t_dp, p2p_s=t_p2p, optimizer_s=t_opt, bubble=bubble,
                         schedule=split.schedule, microbatches=m)
    worst = max(fwd, key=lambda r: by_rank[r].total + acts[r] if r in by_rank else 0.0)
    rm = by_rank.get(worst, memory[0])
    breakdown.update(parameters=rm.parameters, gradients=rm.gradients, optimizer=rm.optimizer, buffers=rm.buffers,
                     activations=acts[worst], comm_bytes=max(comm_bytes.values()) + dp_bytes,
                     flops_per_step=3 * sum(flops.values()))
    memory_gib = (rm.total + acts[worst]) / 2 ** 30
    return Estimate(step, memory_gib, breakdown, dict(zip(mesh.names, mesh.sizes)), device.name)


def estimate(model: nn.Module, mesh_shape: Any, mesh_dim_names: Any = None, *, example_inputs: tuple = (),
             example_kwargs: dict | None = None, plan: Any = None, device: str | DeviceProfile = "h100",
             activation_checkpointing: str | None = None, mp_policy: Any = None,
             fsdp_overlap: float = 0.0) -> Estimate:
    """Predicts a plan's training step time and per-rank memory on a device, without running it.

    Args:
        model: the model (may live on the meta device); never modified.
        mesh_shape: sizes, e.g. (8, 8) with mesh_dim_names ('fsdp', 'tp'), or {'fsdp': 8, 'tp': 8}.
        mesh_dim_names: the names of `mesh_shape`'s dims (not needed for a dict).
        example_inputs, example_kwargs: the global batch of one step.
        plan: a fxpar.Plan or None (automatic), as for parallelize.
        device: 'h100', 'h200', 'a100', 'local' (measured) or a DeviceProfile.
        activation_checkpointing: None, 'selective' or 'full'.
        mp_policy: a torch.distributed.fsdp.MixedPrecisionPolicy (its param_dtype priced as
            `estimate_module`'s mp_dtype), or None.
        fsdp_overlap: the fraction of FSDP communication hidden behind compute (0: fxpar's runtime
            today, which waits for each gather; about 0.9 for FSDP2's prefetching).

    Returns:
        An Estimate: `.step_s`, `.memory_gib`, `.breakdown`, `.explain()`.
    """
    if mesh_dim_names is not None:
        sizes = tuple(mesh_shape) if not isinstance(mesh_shape, int) else (mesh_shape,)
        names = (mesh_dim_names,) if isinstance(mesh_dim_names, str) else tuple(mesh_dim_names)
        if len(sizes) != len(names):
            raise PlanError(f"mesh_shape {sizes} and mesh_dim_names {names} differ in length")
        mesh_shape = dict(zip(names, sizes))
    report = dry_run(model, mesh_shape, example_inputs=example_inputs, example_kwargs=example_kwargs, plan=plan,
                     check=False)
    return estimate_module(report.module, report.mesh, device, activation_checkpointing=activation_checkpointing,
                           mp_dtype=getattr(mp_policy, "param_dtype", None), fsdp_overlap=fsdp_overlap)
