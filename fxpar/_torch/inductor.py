"""inductor's scheduler: the comm / compute reordering pass fxpar's compiled graphs run.

inductor's own `reorder_compute_for_overlap` fills the time a collective is in
flight with compute only as long as its cost estimate says the collective is
still running; on CPU (and for extern matmuls) that estimate is 0, so it
overlaps nothing and pushes the weight-gradient matmuls of a tp backward to
the very end, behind the last all-reduce. `overlap_comms` runs the same pass
with a coarse relative cost (a collective outweighs a matmul, which outweighs
an elementwise kernel): each block's input-gradient all-reduce is then issued,
that block's weight-gradient matmuls run, and only then comes the wait.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

__all__ = ["overlap_comms", "collective_order", "ScheduledNode", "scheduled_nodes", "graph_role", "SWAP_OP"]

# Relative costs (arbitrary units): only their order matters to the greedy scheduler.
_COLLECTIVE, _GEMM, _OTHER = 1.0, 0.3, 0.01


def _estimate(snode) -> float:
    from torch._inductor import comms as _comms  # imported on first compile: inductor is heavy to import

    if _comms.contains_async_collective(snode):
        return _COLLECTIVE
    if _comms.contains_gemm_like(snode):
        return _GEMM
    return _OTHER


def overlap_comms(snodes: list) -> list:
    """A scheduler-node order that issues collectives early, waits late and runs independent compute between.

    An entry of inductor's `reorder_for_compute_comm_overlap_passes` (a torch.compile option); the cost
    estimate is patched for this pass only.

    Waits for: a public inductor scheduling hook with a pluggable cost model (torch._inductor.comms).
    """
    from torch._inductor import comms as _comms
    from torch._inductor import config as _config

    with _config.patch(estimate_op_runtime=_estimate):
        return _comms.reorder_compute_for_overlap(snodes)


@dataclass(frozen=True)
class ScheduledNode:
    """One kernel of inductor's final order, in plain terms (`scheduled_nodes`).

    Attributes:
        name: the scheduler node ('op12').
        kind: 'collective' (issued, not waited), 'wait' (a `wait_tensor`), 'compute' or 'nop' (no kernel: views).
        op: the kernel ('_c10d_functional.all_gather_into_tensor.default', 'extern_kernels.mm'; '' for a
            generated kernel).
        sizes: its inputs' sizes (a collective's: what it communicates).
        nbytes: its first input's bytes (a collective's payload per rank).
        args: its constant arguments, as text (a collective's group name is one).
        reads, writes: the buffers it reads and writes (a wait reads its collective's output).
        origins: the stack traces of the post-grad nodes it computes (what graph code it came from).
        modules: the module FQNs those nodes come from (their `nn_module_stack`, which dynamo carries over from
            the traced graph's nodes; in a backward graph, their forward node's), deepest first seen.
        cost: (FLOPs, memory bytes) of the kernel, from `scheduled_nodes`'s `cost` of its post-grad nodes;
            None where no cost was asked for or none could be given.
    """

    name: str
    kind: str
    op: str
    sizes: tuple
    nbytes: int
    args: tuple
    reads: frozenset
    writes: frozenset
    origins: tuple
    modules: tuple = ()
    cost: tuple[float, float] | None = None


def _module_of(node) -> str:
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
    values = list(stack.values()) if isinstance(stack, dict) else []
    return str(values[-1][0]) if values and isinstance(values[-1], tuple) else ""


def _size(ir) -> list | None:
    """An inductor IR node's size, or None where it has none (a multi-output kernel's MultiOutputLayout raises
    NotImplementedError: the fused MoE / tied-weight gathers' extern kernels, say)."""
    try:
        return list(ir.get_size())
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        return None


def _nbytes(ir) -> int:
    size = _size(ir)
    try:
        numel = 1
        for d in size or ():
            numel *= int(d)
        return numel * ir.get_dtype().itemsize if size is not None else 0
    except (AttributeError, TypeError, ValueError):  # a symbolic size, or no dtype
        return 0


def scheduled_nodes(snodes: list, cost: Optional[Callable[[Sequence], Optional[tuple[float, float]]]] = None
                    ) -> list[ScheduledNode]:
    """inductor's scheduler nodes, in the order given (a reordering pass's input or output), as ScheduledNodes.

    `cost`, if given, is called with each kernel's post-grad fx nodes (the nodes inductor fused into it, each
    with its FakeTensor in `meta["val"]`) and returns its (FLOPs, memory bytes), or None: the entry's `cost`.

    Waits for: a public view of inductor's scheduled nodes (torch._inductor.scheduler / comms).
    """
    from torch._inductor import comms as _comms
    from torch._inductor.utils import contains_wait

    def entry(name: str, subs: list, nop: bool) -> ScheduledNode:
        node = getattr(subs[0], "node", None) if len(subs) == 1 else None
        op = str(getattr(node, "python_kernel_name", "") or "").replace("torch.ops.", "")
        kind = "wait" if any(contains_wait(s) for s in subs) else \
            "collective" if any(_comms.contains_collective(s) for s in subs) else "nop" if nop else "compute"
        inputs = [i for i in getattr(node, "inputs", ()) if _size(i) is not None] if node is not None else []
        nodes = sorted((o for s in subs for o in (getattr(getattr(s, "node", None), "origins", None) or ())),
                       key=lambda o: o.name)
        origins = tuple(sorted({str(o.meta.get("stack_trace") or "") for o in nodes} - {""}))
        modules = tuple(m for m in dict.fromkeys(_module_of(o) for o in nodes) if m)
        op, args = _swap_named(op, tuple(str(a) for a in getattr(node, "constant_args", ()) or ()))
        return ScheduledNode(
            name, kind, op, tuple(tuple(str(d) for d in _size(i)) for i in inputs),
            _nbytes(inputs[0]) if inputs else 0, args,
            frozenset(d.name for s in subs for d in s.read_writes.reads),
            frozenset(b for s in subs for b in s.get_buffer_names()), origins, modules,
            cost(nodes) if cost is not None and nodes and kind == "compute" else None)

    out = []
    for snode in snodes:
        subs = list(snode.get_nodes())
        if len(subs) > 1 and any(_comms.contains_collective(s) or contains_wait(s) for s in subs):
            out.extend(entry(s.get_name(), [s], False) for s in subs)  # a group of collectives: each its own
        else:
            out.append(entry(snode.get_name(), subs, type(snode).__name__ == "NopKernelSchedulerNode"))
    return out


_A2A = "_c10d_functional.all_to_all_single.default"
SWAP_OP = "_c10d_functional.all_to_all_single(swap).default"
"""The name a schedule gives an all-to-all that swaps 2 ranks' buffers (`fxpar.ops.exchange`: a gloo group of 2's
all-reduce or all-gather): its split sizes, [0, N] on rank 0 and [N, 0] on rank 1, become ('swap', N)."""


def _swap_named(op: str, args: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """(op, constant args) of a kernel, an all-to-all swapping 2 ranks' buffers named the same on both ranks."""
    if op == _A2A and len(args) >= 4 and args[0] == args[2] and args[1] == args[3] and \
            "0" in (args[0], args[1]) and args[0] != args[1]:
        return SWAP_OP, ("swap", args[0] if args[0] != "0" else args[1], *args[4:])
    return op, args


def graph_role() -> str:
    """'forward', 'backward' or 'inference': the graph inductor is compiling now (call from inside a pass).

    Waits for: a public handle on the graph being compiled (torch._inductor.virtualized.V.graph).
    """
    from torch._inductor.virtualized import V

    graph = V.graph
    return "backward" if getattr(graph, "is_backward", False) else \
        "inference" if getattr(graph, "is_inference", False) else "forward"


def collective_order(snodes: list) -> list[tuple[str, tuple, tuple]]:
    """The collectives of a scheduler-node order (their waits left out), as (op, input sizes, constant args):
    what a rank issues, in the order inductor's reordering left them (`fxpar.verify.compiled_order`).
    """
    return [(n.op, n.sizes, n.args) for n in scheduled_nodes(snodes) if n.kind == "collective"]
