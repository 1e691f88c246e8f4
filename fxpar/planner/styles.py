"""Per-module tensor-parallel styles for one mesh, as an integer program (`fxpar.planner.solve`).

The units are read from the captured graph (`style_units`): every Megatron pair that the
automatic plan would shard at this tp (`fxpar.passes._megatron.find_pairs`: attention's q/k/v -> o,
the MLP's up/gate -> down) and every lone projection it would shard column-wise (the lm_head).
Each unit has two choices, sharded as the automatic plan shards it, or replicated, priced per rank
and step on the device (D data ranks, T = tp, F and B the device's effective FLOP/s and memory
bandwidth, o the per-op overhead, W the unit's parameter elements, A its activations):

    compute    c = 3 sum_n max(FLOPs_n / (D F), Mem_n / (D B)) + o            (/ T for the sharded
                                                                              choice's FLOPs and bytes)
    comm       sharded pair: an all-reduce of its output forward and of its input's gradient
               backward (Megatron's g and f); sharded lm_head: an all-gather of its output forward,
               an all-reduce of its input's gradient backward (`predict._collective_time` on tp's link)
    memory     W (2 b + 8) / (T fsdp) for parameters, gradients and AdamW's two float32 states (b:
               the parameter's element bytes; / T only when sharded), plus A / (D T) in flight

and neighbours meet at the residual stream, which every choice leaves replicated, so the resharding
terms between consecutive units are zero here (the program carries them for styles that do not,
such as a sequence-sharded stream). `choose_styles` solves min sum(c + comm) under the memory left
by everything else on the most loaded pipeline stage (units count on the stage of their block),
and `replicated_modules` names the modules to replicate: `Plan(tp={module: "replicate", ...},
auto_tp=True)` keeps the automatic plan for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fxpar.analysis.cost import evaluate, example_sizes, node_cost, value_bytes
from fxpar.core.errors import block_of
from fxpar.core.mesh import MeshInfo
from fxpar.passes._megatron import find_pairs, is_projection, proj_input, proj_weight
from fxpar.passes.annotate_parameters import _auto_styles
from fxpar.planner.devices import DeviceProfile
from fxpar.planner.predict import _collective_time, _intra, _mp_scale
from fxpar.planner.solve import Choice, Solution, Unit, solve_choices

__all__ = ["StyleUnit", "style_units", "style_program", "choose_styles", "replicated_modules"]

MEMORY_MARGIN = 0.95
"""Of the memory left to the units: the unit model is coarser than the full estimate."""


@dataclass(frozen=True)
class StyleUnit:
    """A unit of the style program: its modules, its nodes and the block it sits in."""

    name: str
    modules: tuple[str, ...]
    nodes: tuple[fx.Node, ...]
    inputs: tuple[fx.Node, ...]  # the values entering (their gradients are all-reduced when sharded)
    output: fx.Node
    gathers: bool  # a lone column-wise projection: its output is gathered
    block: str | None


def _module(proj: fx.Node) -> str | None:
    w = proj_weight(proj)
    return str(w.target).rpartition(".")[0] if w.op == "get_attr" else None


def style_units(captured: fx.GraphModule, tp: int) -> list[StyleUnit]:
    """The units the automatic plan shards at `tp`, in graph order (module docstring)."""
    auto = _auto_styles(captured, set(), tp)[0]
    units = []
    claimed = set()
    for pair in find_pairs(captured):
        mods = tuple(m for m in (*map(_module, pair.heads), _module(pair.sink)) if m)
        if not mods or any(m not in auto for m in mods):
            continue
        nodes = (*pair.heads, *pair.region, pair.sink)
        claimed |= set(mods)
        units.append(StyleUnit(_module(pair.sink), mods, nodes, (proj_input(pair.heads[0]),), pair.sink, False,
                               block_of(mods[-1])))
    for node in captured.graph.nodes:
        mod = _module(node) if is_projection(node) else None
        if mod and mod in auto and mod not in claimed:
            claimed.add(mod)
            units.append(StyleUnit(mod, (mod,), (node,), (proj_input(node),), node, True, block_of(mod)))
    return units


def _bytes(node: fx.Node, hints: dict) -> float:
    return evaluate(value_bytes(node), hints)


def _param_bytes(captured: fx.GraphModule) -> dict[str, float]:
    """Module -> bytes of its floating parameters, their gradients and AdamW's two float32 states."""
    out: dict[str, float] = {}
    for node in captured.graph.nodes:
        val = node.meta.get("val")
        if node.op == "get_attr" and isinstance(val, torch.Tensor) and val.is_floating_point():
            module = str(node.target).rpartition(".")[0]
            out[module] = out.get(module, 0.0) + val.numel() * (2 * val.element_size() + 8)
    return out


def _measure(unit: StyleUnit, captured: fx.GraphModule, hints: dict, memo: dict) -> tuple[float, ...]:
    """(FLOPs, bytes touched, activation bytes, output bytes, input bytes, state bytes) of a unit, global."""
    key = ("unit", unit.modules)
    if key not in memo:
        if "params" not in memo:
            memo["params"] = _param_bytes(captured)
        flops = mem = acts = 0.0
        for n in unit.nodes:
            cost = node_cost(n)
            flops += evaluate(cost.flops, hints)
            mem += evaluate(cost.mem_bytes, hints)
            if n.op == "call_function" and n.meta.get("val") is not None:
                acts += _bytes(n, hints)
        memo[key] = (flops, mem, acts, _bytes(unit.output, hints), sum(_bytes(i, hints) for i in unit.inputs),
                     sum(memo["params"].get(m, 0.0) for m in unit.modules))
    return memo[key]


def _price(unit: StyleUnit, captured: fx.GraphModule, hints: dict, mesh: MeshInfo, device: DeviceProfile,
           data: int, fsdp: int, activations: float, mp: torch.dtype | None, memo: dict) -> tuple[Choice, Choice]:
    tp = mesh.size("tp")
    intra = _intra(mesh, "tp", device)
    flops, mem, acts, out_b, in_b, params = _measure(unit, captured, hints, memo)
    dtype, scale = _mp_scale(unit.output.meta["val"].dtype, mp)
    flops, mem, acts = flops / data, mem / data * scale, acts / data * scale
    out_b, in_b, params = out_b / data * scale, in_b / data * scale, params / fsdp
    f_eff = device.flops(dtype)
    b_eff = device.memory_bandwidth * 0.8

    def compute(shards: int) -> float:
        return 3 * (max(flops / shards / f_eff, mem / shards / b_eff) + device.op_overhead * len(unit.nodes))

    fwd = _collective_time("all_gather", tp, out_b / tp, intra, device) if unit.gathers else \
        _collective_time("all_reduce", tp, out_b, intra, device)
    comm = fwd + _collective_time("all_reduce", tp, in_b, intra, device)
    sharded = Choice("sharded", compute(tp) + comm, params / tp + activations * acts / tp)
    whole = Choice("replicate", compute(1), params + activations * acts)
    return sharded, whole


def style_program(captured: fx.GraphModule, mesh: MeshInfo, device: DeviceProfile, *, budget_bytes: float,
                  total_bytes: float, activations: float = 1.0, mp_dtype: torch.dtype | None = None,
                  blocks: list[str] | None = None, memo: dict | None = None
                  ) -> tuple[list[StyleUnit], list[Unit], dict] | None:
    """The integer program of the styles of one mesh: (units, their priced choices, memory per group).

    Args:
        captured: the model's capture (global shapes).
        mesh: the candidate mesh (with a 'tp' dim).
        device: the device profile.
        budget_bytes: memory per device.
        total_bytes: what the most loaded rank holds with every unit sharded (the automatic plan's estimate).
        activations: the fraction of each unit's activations kept (1 without checkpointing).
        mp_dtype: mixed precision's param_dtype, as `fxpar.planner.estimate_module` takes it.
        blocks: the model's blocks in order (units count on the pipeline stage of their block).
        memo: a dict kept across the meshes of one search (units per tp, unit measurements).

    Returns:
        None without a tp dim or units.
    """
    if not mesh.has("tp") or mesh.size("tp") <= 1:
        return None
    memo = {} if memo is None else memo
    tp = mesh.size("tp")
    if ("units", tp) not in memo:
        memo[("units", tp)] = style_units(captured, tp)
    units = memo[("units", tp)]
    if not units:
        return None
    if "hints" not in memo:
        memo["hints"] = example_sizes(captured)
    hints = memo["hints"]
    data = 1
    for d in ("dp", "fsdp", "ep"):  # the dims that split the batch (ep borrows data ranks)
        data *= mesh.size(d) if mesh.has(d) else 1
    fsdp = mesh.size("fsdp") if mesh.has("fsdp") else 1
    pp = mesh.size("pp") if mesh.has("pp") else 1
    order = {b: i for i, b in enumerate(blocks or [])}
    program = []
    for u in units:
        stage = order[u.block] * pp // len(order) if pp > 1 and u.block in order else 0
        program.append(Unit(u.name, _price(u, captured, hints, mesh, device, data, fsdp, activations, mp_dtype, memo), stage))
    sharded: dict[int, float] = {}
    for p in program:
        sharded[p.group] = sharded.get(p.group, 0.0) + p.choices[0].memory
    worst = max(sharded.values())
    left = {g: MEMORY_MARGIN * budget_bytes - (total_bytes - worst) for g in sharded}
    return units, program, left


def choose_styles(captured: fx.GraphModule, mesh: MeshInfo, device: DeviceProfile, **kwargs
                  ) -> tuple[list[StyleUnit], Solution] | None:
    """The per-unit choice minimizing predicted time under memory (`style_program`'s arguments).

    Returns:
        (units, solution), or None without a tp dim or units.

    Raises:
        PlanError: no choice fits the memory left.
    """
    found = style_program(captured, mesh, device, **kwargs)
    if found is None:
        return None
    units, program, left = found
    return units, solve_choices(program, None, left)


def replicated_modules(units: list[StyleUnit], solution: Solution) -> tuple[str, ...]:
    """The modules of the units the solution replicates (the rest keep the automatic plan's styles)."""
    return tuple(m for u, k in zip(units, solution.picks) if k == 1 for m in u.modules)
