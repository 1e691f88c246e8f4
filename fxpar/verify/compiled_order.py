"""Under compile=True, inductor reorders collectives: the order it compiled must be the same on every rank.

fxpar's graphs reach inductor with their tp collectives as torch's functional
collectives (`fxpar.ops.traceable`), and inductor's scheduler moves issues and
waits (`reorder_for_compute_comm_overlap_passes`, `fxpar._torch.inductor.overlap_comms`).
The graph-level checks (`fxpar.check`, the run-time fingerprint) see the order
before that. Every compile of a ParallelModule records inductor's final kernel
order (`fxpar.analysis.compiled_schedule.ScheduleRecorder`, appended to the
reordering passes; it changes nothing, and explain() describes the same record).
`check_compiled_order(pm, *inputs, ...)` compiles this rank's graphs again,
runs one step (or forward), and exchanges each group's recorded collectives
among the group's ranks (`all_gather_object`): every member must issue the same
collectives (op, input sizes, arguments) in the same order, per compiled graph
(forward, then the backward compiled when it first runs).

Every rank of the mesh must call it together.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.distributed as dist

from fxpar.analysis.compiled_schedule import compiled_schedules
from fxpar.core.errors import GraphInvariantError, PlanError

__all__ = ["check_compiled_order", "compare_orders"]


def _on_group(orders: list[list[tuple]], group: str) -> list[tuple]:
    """The recorded collectives that run on `group` (its name is one of their arguments), graph by graph."""
    return [(g, *entry) for g, order in enumerate(orders) for entry in order if group in entry[2]]


def compare_orders(by_rank: Sequence[list[tuple]], *, group: str, dim: str, ranks: Sequence[int]) -> None:
    """Raises if the members of one group recorded different compiled orders (the first difference named).

    Args:
        by_rank: each member's entries on the group, as `_on_group` lists them: (graph, op, sizes, args).
        group, dim, ranks: the group's name, mesh dim and global ranks (for the message).
    """
    base = list(by_rank[0])
    for r, seq in zip(ranks[1:], by_rank[1:]):
        seq = list(seq)
        if seq == base:
            continue
        i = next((k for k, (a, b) in enumerate(zip(base, seq)) if a != b), min(len(base), len(seq)))

        def show(s: list) -> str:
            if i >= len(s):
                return "(none: its compiled graphs end here)"
            g, op, sizes, args = s[i]
            return f"compiled graph {g}: {op} of {[list(x) for x in sizes]} ({', '.join(args)})"

        raise GraphInvariantError(
            f"inductor compiled a different collective order on the ranks of group {group!r} (mesh dim {dim!r}, "
            f"ranks {list(ranks)}): first difference at compiled collective #{i}:\n  rank {ranks[0]}: {show(base)}\n"
            f"  rank {r}: {show(seq)}\nthese ranks would hang or combine unrelated tensors; inductor's reordering "
            "must not depend on the rank (a rank-dependent compile option, cost estimate or graph?): compile with "
            "the same options on every rank, or parallelize with compile=False")


def check_compiled_order(pm, *inputs: Any, target: Any = None, loss_fn: Callable | None = None,
                         **kwargs: Any) -> list[list[tuple]]:
    """Compiles `pm`'s graphs again (each compile records its schedule), runs one step (with `target`) or forward, and checks
    every group's members compiled the same collective order.

    Returns:
        This rank's recorded orders, one list per compiled graph: (op, input sizes, constant args).

    Raises:
        PlanError: `pm` is not compiled with inductor.
        GraphInvariantError: naming the group, its ranks and the first differing compiled collective.
    """
    options = getattr(pm, "compile_options", None)
    if getattr(pm, "compile_backend", None) != "inductor" or options is None:
        raise PlanError(f"check_compiled_order({type(pm).__name__}): the module is not compiled with inductor; "
                        "parallelize(..., compile=True)")
    schedules = compiled_schedules(pm)
    schedules.clear()
    pm.__dict__.pop("_compiled_graphs", None)  # compiled again: inductor's scheduler runs, and records
    if target is not None:
        pm.step(*inputs, target=target, loss_fn=loss_fn, **kwargs)
    else:
        pm(*inputs, **kwargs)
    orders = [list(schedules[r].order) for r in ("forward", "backward", "inference") if r in schedules]
    mesh = pm.mesh
    for dim, size in zip(pm.mesh_info.names, pm.mesh_info.sizes):
        if size == 1:
            continue
        group = mesh.get_group(dim)
        mine = _on_group(orders, group.group_name)
        gathered: list = [None] * size
        dist.all_gather_object(gathered, mine, group=group)
        compare_orders(gathered, group=group.group_name, dim=dim, ranks=dist.get_process_group_ranks(group))
    return orders
