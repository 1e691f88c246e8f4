"""Checks of a whole compiled module, of its pipeline, and across all ranks of a mesh.

`check_module(pm)` runs the per-graph invariants (`fxpar.analysis.invariants`)
on a finished module's graphs, and for a pipeline `check_pipeline`.

Pipelines (`check_pipeline`, from any one rank): the split parent calls its
stages in stage order, each stage sits on the pp rank torch's schedule runs
it on, every activation crossing a cut has the same placements and local
shape on both sides (and the final outputs are whole), and every pp rank's
sends and recvs, derived from torch's schedule IR, pair up with the same
tensors and without a deadlock (`fxpar.analysis.p2p_check`). Gradients cross cuts as
they are, so the dual checks leave a stage's received inputs and sent
outputs to the unsplit graph's check.

Across the ranks of a mesh (`check_ranks(pms)`, e.g. from the simulator):
every group's members issue the same collectives (op, mesh dim, local shape,
dtype, and which node) in the same order, in the forward as the graph
orders them (issue nodes where they stand) and in the backward as the
runtime issues them (FSDP re-gathers and per-unit reduce-scatters, dp
buckets: `fxpar.analysis.timeline.backward_order`); every parameter has the
same placements on all its holders and each shard position of it has an owner.
"""

from __future__ import annotations

import math
import operator
from typing import Iterable, Sequence

import torch.fx as fx

from fxpar.analysis.fingerprint import collective_schedule, first_difference
from fxpar.analysis.invariants import (
    ALL_FACTS,
    _check_outputs_of,
    _is_shard,
    _same_shape,
    check_graph,
    local_fake_run,
)
from fxpar.analysis.local_run import _specs_of
from fxpar.analysis.p2p_check import check_p2p
from fxpar.analysis.timeline import backward_order
from fxpar.core.errors import GraphInvariantError, ScheduleError, node_context
from fxpar.core.fmt import fmt_bytes
from fxpar.core.mesh import MeshInfo
from fxpar.core.spec import TensorSpec, get_info, placements_str
from fxpar.core.stages import stage_ranks

__all__ = ["check_module", "check_pipeline", "check_ranks"]


def _graph_modules(pm) -> list[fx.GraphModule]:
    stages = getattr(pm, "stage_modules", None)
    if stages:
        return [getattr(s, "graph_module", s) for s in stages]
    return [pm.graph_module]


def _stage_boundaries(pm) -> dict[int, frozenset[str]]:
    """For a pipelined module: id(stage module) -> names of its placeholders fed by other stages."""
    if getattr(pm, "stage_modules", None) is None:
        return {}
    parent = pm.graph_module
    out = {}
    for call in parent.graph.nodes:
        if call.op != "call_module" or not str(call.target).startswith("stage_"):
            continue
        stage = parent.get_submodule(str(call.target))
        holders = [n for n in stage.graph.nodes if n.op == "placeholder"]
        fed = {h.name for h, a in zip(holders, call.args) if not (isinstance(a, fx.Node) and a.op == "placeholder")}
        out[id(stage)] = frozenset(fed)
    return out


def _local_signature(gm: fx.GraphModule, mesh: MeshInfo) -> tuple:
    """What the local-shape run depends on: the code (group names aside) and every spec."""
    code = gm.code
    for m, group in enumerate(mesh.group_names or ()):
        code = code.replace(repr(group), repr(mesh.names[m]))
    specs = []
    for n in gm.graph.nodes:
        for spec in _specs_of(get_info(n)):
            if spec is not None:
                specs.append((n.name, str(spec), str(spec.local_shape)))
    return code, tuple(specs)


def check_pipeline(pm) -> None:
    """Static checks of a pipelined module's stage structure (from any one rank).

    The split parent calls stage_0 .. stage_{S-1} in stage order, each stage
    runs on the pp coordinate torch's schedule places it on, the stages agree
    on each activation crossing a cut, and every pp rank's sends and recvs
    under the schedule pair up without a deadlock (`fxpar.analysis.p2p_check.check_p2p`).

    Raises:
        ScheduleError: naming the stage at fault (order, placement, a cut's placements).
        GraphInvariantError: naming the pp ranks and the first transfer that does not
            meet its partner, or the deadlock.
    """
    split = getattr(pm, "split", None)
    if split is None:
        return
    calls = [n for n in pm.graph_module.graph.nodes if n.op == "call_module" and str(n.target).startswith("stage_")]
    order = [int(str(n.target).rpartition("_")[2]) for n in calls]
    if order != list(range(split.num_stages)):
        first = next((n for n, k in zip(calls, order) if k != calls.index(n)), calls[0] if calls else None)
        where = f" (first out of place: %{first.name} calls {first.target})" if first is not None else ""
        raise ScheduleError(
            f"the pipeline's parent graph calls its stages in the order {order}, not 0..{split.num_stages - 1}"
            f"{where}: a swapped stage order feeds each stage another stage's activations; split_stages must "
            "emit the stage calls in stage order")
    try:
        placed = stage_ranks(split.schedule, split.num_stages, split.pp_size)
    except Exception:  # noqa: BLE001 - a schedule torch cannot place is split_stages' error to raise
        placed = None
    if placed is not None:
        for st in split.stages:
            if placed.get(st.index) != st.rank:
                raise ScheduleError(
                    f"stage {st.index} ({st.first_module}..{st.last_module}) is assigned to pp rank {st.rank}, but "
                    f"torch's '{split.schedule}' schedule runs it on pp rank {placed.get(st.index)}: the ranks would "
                    "send activations to a stage that is not there (deadlock)")
    _check_stage_edges(pm)

    check_p2p(pm)


def _stage_value(stage: fx.GraphModule, index: int) -> fx.Node | None:
    """The node a stage returns at flat output position `index`."""
    out = next((n for n in stage.graph.nodes if n.op == "output"), None)
    if out is None:
        return None
    flat = [a for a in (out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],))]
    return flat[index] if index < len(flat) and isinstance(flat[index], fx.Node) else None


def _check_stage_edges(pm) -> None:
    """Every activation crossing a cut has the same placements and local shape on both sides."""
    parent = pm.graph_module
    mesh = pm.mesh_info
    for call in parent.graph.nodes:
        if call.op != "call_module" or not str(call.target).startswith("stage_"):
            continue
        consumer = parent.get_submodule(str(call.target))
        holders = [n for n in consumer.graph.nodes if n.op == "placeholder"]
        for holder, arg in zip(holders, call.args):
            if not (isinstance(arg, fx.Node) and arg.target is operator.getitem
                    and arg.args[0].op == "call_module"):
                continue
            producer = parent.get_submodule(str(arg.args[0].target))
            sent = _stage_value(producer, arg.args[1])
            a, b = (get_info(sent) if sent is not None else None), get_info(holder)
            if a is None or b is None or not isinstance(a.spec, TensorSpec) or not isinstance(b.spec, TensorSpec):
                continue
            if tuple(a.spec.placements) != tuple(b.spec.placements) or \
                    not _same_shape(a.spec.local_shape, b.spec.local_shape):
                raise ScheduleError(
                    f"{arg.args[0].target} sends %{sent.name} as {placements_str(a.spec.placements)} local "
                    f"{list(a.spec.local_shape)} but {call.target} receives it as %{holder.name} "
                    f"{placements_str(b.spec.placements)} local {list(b.spec.local_shape)}: the stages disagree on "
                    "an activation crossing the cut")
    out = next((n for n in parent.graph.nodes if n.op == "output"), None)
    for arg in (out.all_input_nodes if out is not None else ()):
        if arg.target is operator.getitem and arg.args[0].op == "call_module":
            sent = _stage_value(parent.get_submodule(str(arg.args[0].target)), arg.args[1])
            if sent is not None:
                _check_outputs_of([sent], mesh)


def check_module(pm, *, _seen: set | None = None) -> None:
    """Every single-rank check on a ParallelModule (what `fxpar.check(pm)` runs).

    Raises:
        GraphInvariantError: naming the first node that breaks an invariant, or a
            pipeline's first send or recv that does not meet its partner.
        ScheduleError: for a pipeline whose stages do not fit together.
    """
    check_pipeline(pm)
    boundaries = _stage_boundaries(pm)
    for gm in _graph_modules(pm):
        check_graph(gm, pm.mesh_info, ALL_FACTS, boundary=boundaries.get(id(gm)))
        if _seen is not None:
            # Ranks whose graphs differ only in group names and parameter values share one local run.
            key = _local_signature(gm, pm.mesh_info)
            if key in _seen:
                continue
            _seen.add(key)
        local_fake_run(gm)


# --------------------------------------------------------------------------- across ranks


def check_ranks(pms: Sequence) -> None:
    """Checks the ParallelModules of all ranks of one mesh together (rank order).

    Runs `check_module` on each, then: every group's members issue the same
    collectives in the same order; every parameter has the same placements
    on every rank that holds it and each of its shard positions has an
    owner. (A pipeline's sends and recvs are checked by `check_module`: every
    rank sees every stage.)

    Raises:
        GraphInvariantError: naming the first differing collective, with every
            member's version of it, or the parameter and ranks at fault.
    """
    seen: set = set()
    for pm in pms:
        check_module(pm, _seen=seen)
    meshes = [pm.mesh_info for pm in pms]
    if any(m.coordinate is None or m.group_names is None for m in meshes):
        raise GraphInvariantError("check_ranks needs every rank's ParallelModule with its coordinate and groups "
                                  "(a dry-run mesh has neither)")
    schedules = []
    for pm in pms:
        sched = []
        for gm in _graph_modules(pm):
            sched.extend(collective_schedule(gm, pm.mesh_info))
        schedules.append(sched)
    backwards = [backward_order(pm) for pm in pms]
    mesh0 = meshes[0]
    for m, dim in enumerate(mesh0.names):
        members: dict[str, list[int]] = {}
        for r, mi in enumerate(meshes):
            members.setdefault(mi.group_names[m], []).append(r)
        for group, ranks in members.items():
            seqs = {r: [s for s in schedules[r] if s.mesh_dim == dim] for r in ranks}
            base = ranks[0]
            for r in ranks[1:]:
                diff = first_difference(seqs[base], seqs[r])
                if diff is None:
                    continue
                i, a, b = diff
                raise GraphInvariantError(
                    f"the ranks of group {group!r} (mesh dim {dim!r}, ranks {ranks}) issue different collectives: "
                    f"first difference at collective #{i} on that group:\n"
                    f"  rank {base}: {a if a is not None else '(none: its schedule ends here)'}\n"
                    f"  rank {r}: {b if b is not None else '(none: its schedule ends here)'}\n"
                    "at run time these ranks would hang or silently combine unrelated tensors; every rank of a "
                    "group must run the same graph (a pass made a rank-dependent edit?)")
            _check_backward_order(group, dim, ranks, backwards)
    _check_ownership(pms)


def _check_backward_order(group: str, dim: str, ranks: list[int], backwards: list[list]) -> None:
    """The members of one group issue the same backward collectives on `dim` in the same order at run time."""
    seqs = {r: [(label, nbytes) for dims, label, nbytes in backwards[r] if dim in dims] for r in ranks}
    base = ranks[0]
    for r in ranks[1:]:
        if seqs[r] == seqs[base]:
            continue
        i = next((k for k, (a, b) in enumerate(zip(seqs[base], seqs[r])) if a != b), min(len(seqs[base]), len(seqs[r])))
        show = lambda s: f"{s[i][0]} ({fmt_bytes(s[i][1])})" if i < len(s) else "(none: its backward ends here)"  # noqa: E731
        raise GraphInvariantError(
            f"the ranks of group {group!r} (mesh dim {dim!r}, ranks {ranks}) issue different collectives in the "
            f"backward, as the runtime runs it (fxpar.analysis.timeline.backward_order): first difference at "
            f"backward collective #{i} on that group:\n  rank {base}: {show(seqs[base])}\n  rank {r}: {show(seqs[r])}\n"
            "at run time these ranks would hang or reduce unrelated gradients together; FSDP units come from the "
            "graph's fsdp_bucket tags (apply_fsdp) and dp buckets from bucket_grad_sync: every rank must tag "
            "alike (a rank-dependent pass or graph edit?)")


def _check_ownership(pms: Sequence) -> None:
    """Every parameter: the same placements on all holders, every shard position owned."""
    holders: dict[str, dict[int, tuple]] = {}
    for r, pm in enumerate(pms):
        for gm in _graph_modules(pm):
            for node in gm.graph.nodes:
                info = get_info(node)
                if node.op != "get_attr" or info is None or not isinstance(info.spec, TensorSpec):
                    continue
                if not node.users:
                    continue
                holders.setdefault(str(node.target), {})[r] = (tuple(info.spec.placements), node)
    mesh = pms[0].mesh_info
    for fqn, by_rank in holders.items():
        layouts = {pl for pl, _ in by_rank.values()}
        if len(layouts) > 1:
            lines = [f"  rank {r}: {placements_str(pl)}" for r, (pl, _) in sorted(by_rank.items())]
            raise GraphInvariantError(f"parameter {fqn!r} is laid out differently on the ranks that hold it:\n"
                                      + "\n".join(lines)
                                      + "\nits shards would not fit together; all ranks must plan it alike")
        (placements,) = layouts
        sharding = [m for m, p in enumerate(placements) if _is_shard(p)]
        if not sharding:
            continue
        owned = {tuple(pms[r].mesh_info.coordinate[m] for m in sharding) for r in by_rank}
        need = math.prod(mesh.sizes[m] for m in sharding)
        if len(owned) != need:
            node = next(iter(by_rank.values()))[1]
            missing = sorted(set(_grid([mesh.sizes[m] for m in sharding])) - owned)
            raise GraphInvariantError(
                f"{node_context(node)}: parameter {fqn!r} ({placements_str(placements)}) has shard positions "
                f"{missing} on mesh dims {[mesh.names[m] for m in sharding]} that no rank owns")


def _grid(sizes: Sequence[int]) -> Iterable[tuple[int, ...]]:
    if not sizes:
        yield ()
        return
    for i in range(sizes[0]):
        for rest in _grid(sizes[1:]):
            yield (i, *rest)
