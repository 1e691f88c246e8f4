"""schedule_overlap: issue each FSDP unit's gather one unit early, so it runs under the unit before.

Requires: local_params (after apply_fsdp, which inserts the gathers). Provides: overlap.

The FSDP gathers `apply_fsdp` inserted wait where their parameter is first
used. This pass groups them into units (consecutive gathers of one block on
one group and dtype, the collective the runtime coalesces them into; one
parameter each with fsdp_unit='param') and, for every unit after the first,
inserts an `fsdp_prefetch` issue node right after the first gather of the
unit before it: block i+1's gather is in flight while block i computes, and
at most two units are gathered at once (FSDP2's default forward prefetch).
The backward is the dual and needs no graph: the runtime re-gathers block
i-1 while block i's backward runs and waits each reduce-scatter one unit
late (`fxpar.runtime.fsdp_buckets`). The root unit (apply_fsdp's "<root>",
usually the first unit: it is gathered before the embedding) is prefetched
like any other when a unit comes before it; the first block's prefetch is
issued after the root's first gather. The backward never re-gathers the root
(it is kept), so no block prefetches it.

Before:  %fsdpgather_h_0_w = fxpar.fsdp_all_gather(%h_0_w, 0, 2, '1', 'fsdp')
         ... block h.0 ...
         %fsdpgather_h_1_w = fxpar.fsdp_all_gather(%h_1_w, 0, 2, '1', 'fsdp')
After:   %fsdpgather_h_0_w = fxpar.fsdp_all_gather(%h_0_w, 0, 2, '1', 'fsdp')
         %prefetch_h_1 = fxpar.fsdp_prefetch([%h_1_w, ..], 0, 2, '1', 'fsdp', None)   # issue
         ... block h.0 ...
         %fsdpgather_h_1_w = fxpar.fsdp_all_gather(%h_1_w, 0, 2, '1', 'fsdp')         # wait

Invariants kept: no node changes its value (the issue node has no output), the
order of every other collective is unchanged, and every rank inserts the same
issue nodes at the same places (the graph is the same on every rank).

Not scheduled: pipelines (a pipeline step gathers each parameter once per step,
`StepGather`) and graphs with activation checkpointing (a recomputed region
would issue its prefetch again).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxpar.core.pass_api import PassContext, PassResult, fx_pass
from fxpar.core.spec import NodeInfo, get_info, set_info
from fxpar.ops.transitions import collective_args
from fxpar.ops.overlap import ISSUE_OPS  # noqa: F401  (registers fxpar::fsdp_prefetch)

__all__ = ["schedule_overlap", "fsdp_units"]

_GATHER = torch.ops.fxpar.fsdp_all_gather.default
_PREFETCH = torch.ops.fxpar.fsdp_prefetch.default


def fsdp_units(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """The FSDP gather nodes of `gm` grouped as the runtime communicates them, in graph order."""
    units: list[list[fx.Node]] = []
    last = None
    for node in gm.graph.nodes:
        if node.target is not _GATHER:
            continue
        info = get_info(node)
        bucket = info.fsdp_bucket if info is not None else None
        a = collective_args(node)
        here = (bucket, a["dim"], a["group_size"], a["group_name"], a["mesh_dim"], a.get("param_dtype"))
        if bucket is not None and here == last and all(g.args[0].target != node.args[0].target for g in units[-1]):
            units[-1].append(node)
        else:
            units.append([node])
        last = here
    return units


@fx_pass(requires=("local_params",), provides=("overlap",))
def schedule_overlap(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if not ctx.options.get("overlap", True) or ctx.options.get("pp") is not None \
            or ctx.options.get("activation_checkpointing") or ctx.options.get("offload_policy") is not None:
        return PassResult(gm, False)
    if any(n.target is _PREFETCH for n in gm.graph.nodes):
        return PassResult(gm, False)  # already scheduled
    units = fsdp_units(gm)
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    for before, unit in zip(units, units[1:]):
        a = collective_args(unit[0])
        if _uneven(unit):
            continue  # not prefetched: a per-parameter prefetch gathers equal shards only
        shards = [g.args[0] for g in unit]
        if any(sum(u.target is _GATHER for u in s.users) > 1 for s in shards):
            continue  # a weight gathered once per use (tied, apply_fsdp): one prefetch has one wait
        anchor = point = before[0]
        for s in shards:  # get_attr nodes have no inputs: move those that come later up to the issue point
            if order[s] > order[anchor]:
                point.append(s)
                point = s
        with graph.inserting_after(point):
            issue = graph.create_node(
                "call_function", _PREFETCH,
                (shards, a["dim"], a["group_size"], a["group_name"], a["mesh_dim"], a.get("param_dtype")),
                name=f"prefetch_{_unit_label(unit)}")
        issue.meta["val"] = None
        info = get_info(anchor)
        set_info(issue, NodeInfo(module_fqn=info.module_fqn if info is not None else "", role="collective",
                                 origin="schedule_overlap", fsdp_bucket=_unit_name(unit)))
    gm.recompile()
    return PassResult(gm, len(units) > 1)


def _uneven(unit: list[fx.Node]) -> bool:
    """A unit with an uneven (padded) shard. The runtime may gather a unit per parameter (no bucket
    registered for it), where shards of different sizes would mismatch across ranks."""
    return any(collective_args(g).get("full_size", -1) not in (None, -1) for g in unit)


def _unit_name(unit: list[fx.Node]) -> str:
    info = get_info(unit[0])
    return info.fsdp_bucket if info is not None and info.fsdp_bucket else str(unit[0].args[0].target)


def _unit_label(unit: list[fx.Node]) -> str:
    return _unit_name(unit).replace(".", "_")
