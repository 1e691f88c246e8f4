"""Pipeline cut points under memory: blocks priced on the captured graph, cut by `min_max_partition`.

split_stages balances stages by time alone. Under 1F1B, stage k of S keeps min(M, S - k) of the M
microbatches' activations, so the first stages hold the most and a time-balanced cut can leave
stage 0 over the budget while the last stage has room. For a pipelined mesh (T = tp, D data ranks,
fsdp F), block b (`block_costs`, over the captured graph's nodes of that block) is priced

    t_b = sum_n FLOPs_n / (T D)                       its share of the work (relative: the max matters)
    w_b = P_b (2 e + 8) / (T F)                       parameters, gradients, AdamW's two float32 states
    a_b = sum_n bytes(n) / (T D) x kept               its activations (kept: the checkpointing fraction)

and the nodes outside every block (embeddings, the head) count on the first and the last stage.
`memory_aware_cuts` solves

    min over cuts max_k sum_{b in k} t_b   s.t.   sum_{b in k} w_b + min(M, S - k) / M sum_{b in k} a_b
                                                  + (outside nodes of k) <= budget   for every stage k

exactly (`fxpar.planner.solve.min_max_partition`) and returns the cut points as the module FQNs of
the blocks each stage starts at (`Plan(pp=[...])`).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxpar.analysis.cost import evaluate, example_sizes, node_cost, value_bytes
from fxpar.core.errors import PlanError, block_of
from fxpar.planner.solve import min_max_partition

__all__ = ["block_costs", "memory_aware_cuts"]


def _module_of(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def block_costs(captured: fx.GraphModule, blocks: list[str]) -> dict[str | None, list[float]]:
    """{block (None: outside every block): [FLOPs, activation bytes, parameter state bytes]}, global."""
    hints = example_sizes(captured)
    out: dict[str | None, list[float]] = {b: [0.0, 0.0, 0.0] for b in blocks}
    out[None] = [0.0, 0.0, 0.0]
    for node in captured.graph.nodes:
        val = node.meta.get("val")
        if node.op == "get_attr" and isinstance(val, torch.Tensor) and val.is_floating_point():
            b = block_of(str(node.target))
            out[b if b in out else None][2] += val.numel() * (2 * val.element_size() + 8)
        elif node.op == "call_function":
            b = block_of(_module_of(node))
            acc = out[b if b in out else None]
            acc[0] += evaluate(node_cost(node).flops, hints)
            if isinstance(val, torch.Tensor) and val.is_floating_point():
                acc[1] += evaluate(value_bytes(node), hints)
    return out


def memory_aware_cuts(costs: dict, blocks: list[str], mesh: dict, *, microbatches: int, budget_bytes: float,
                      kept: float = 1.0, calibrate_gib: float | None = None) -> list[str]:
    """The module FQNs each stage after the first starts at (module docstring), one stage per pp rank.

    Args:
        costs: `block_costs` of the captured graph.
        blocks: the model's blocks in order.
        mesh: {dim: size} with 'pp'.
        microbatches: M (1F1B).
        budget_bytes: memory per device.
        kept: the fraction of activations kept (1 without checkpointing).
        calibrate_gib: the full estimate's most loaded rank under the time-balanced cut; the block
            model is scaled to agree with it there (it counts fewer values than the compiled graphs
            hold), so a cut is only proposed where the estimate can fit.

    Raises:
        PlanError: no cut fits the budget.
    """
    stages = mesh["pp"]
    shard = mesh.get("tp", 1)
    data = mesh.get("dp", 1) * mesh.get("fsdp", 1) * mesh.get("ep", 1)  # ep borrows data ranks
    fsdp = mesh.get("fsdp", 1)
    t = [costs[b][0] / (shard * data) for b in blocks]
    a = [costs[b][1] / (shard * data) * kept for b in blocks]
    w = [costs[b][2] / (shard * fsdp) for b in blocks]
    out_flops, out_acts, out_state = costs[None]
    # the embedding (first stage) and the head (last) split what lies outside the blocks evenly
    extra = out_state / (shard * fsdp) / 2 + out_acts / (shard * data) * kept / 2

    pw, pa = [0.0], [0.0]
    for x, y in zip(w, a):
        pw.append(pw[-1] + x)
        pa.append(pa[-1] + y)

    def memory(i: int, j: int, k: int) -> float:
        inflight = min(microbatches, stages - k) / microbatches
        return pw[j] - pw[i] + inflight * (pa[j] - pa[i]) + (extra if k in (0, stages - 1) else 0.0)

    if stages > len(blocks):
        raise PlanError(f"{stages} pipeline stages of {len(blocks)} blocks: use at most {len(blocks)}")
    if calibrate_gib is not None:
        balanced, _ = min_max_partition(t, stages)
        bounds = [0, *balanced, len(blocks)]
        worst = max(memory(i, j, k) for k, (i, j) in enumerate(zip(bounds, bounds[1:])))
        if worst > 0:
            budget_bytes = budget_bytes * worst / (calibrate_gib * 2 ** 30)
    cuts, _ = min_max_partition(t, stages, memory=memory, budget=budget_bytes)
    return [blocks[j] for j in cuts]
