"""Ranks that must agree: the same starting parameters, and (input_layout='full') the same inputs.

Parameters: as DDP does, ranks whose models were initialized with different
seeds start from the mesh's first rank's values (`broadcast_state`), but
without DDP's cost of a broadcast of the whole model at set-up: the ranks
compare a fingerprint of every parameter and buffer first (the two sums below,
16 B per tensor, one all-reduce per mesh dim) and broadcast only the tensors
whose fingerprints differ: none when every rank built the same model, so
building a parallel module moves fingerprints, not weights.

Inputs: with input_layout='full' every rank must pass the same full inputs; a
loader seeded per rank silently gives another answer. `check_same_inputs`
compares two scalars per input tensor across the mesh in one small all-reduce
per mesh dim (on the first step, and on every step with check=True):

    s1 = sum(x),  s2 = sum(x * w)  with w = 1 + (i mod 7) over the flat index i
    all_reduce([s, -s], MAX) over each mesh dim in turn: max(s) == min(s) on every rank

`s2` catches permuted rows that leave the plain sum unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx

from fxpar._torch.c10d import resolve_process_group
from fxpar._torch.fx import pytree
from fxpar.core.errors import PlanError

__all__ = ["broadcast_state", "check_same_inputs", "input_fingerprint"]


def _groups(mesh_info: Any) -> list:
    return [resolve_process_group(mesh_info.group_name(m)) for m in range(len(mesh_info.names))
            if mesh_info.sizes[m] > 1]


def broadcast_state(gm: fx.GraphModule, mesh: Any) -> None:
    """Every parameter and buffer of `gm` set to the values of the mesh's first rank (in place), where they differ.

    Along each mesh dim in turn, from coordinate 0: the result is rank (0, ..., 0)'s values on every rank.
    Per dim, one all-reduce of the tensors' fingerprints (`_differ`) finds those that differ across the dim's
    ranks; only those are broadcast (their fingerprints recomputed for the next dim). Tensors on the meta
    device (a model built without values) are left alone.
    """
    tensors = [t for t in {id(t): t for t in [*gm.parameters(), *gm.buffers()]}.values() if t.device.type != "meta"]
    if not tensors or mesh is None or getattr(mesh, "simulated", False):
        return  # a simulated mesh (fxpar.testing.SimDeviceMesh) compiles one rank at a time, outside its world
    fp = input_fingerprint(tuple(tensors), {})
    for dim in range(mesh.ndim):
        group = mesh.get_group(dim)
        if group.size() == 1:
            continue
        for i in _differ(fp, group):
            with torch.no_grad():
                dist.broadcast(tensors[i].data, group_src=0, group=group)
            fp[2 * i:2 * i + 2] = input_fingerprint((tensors[i],), {})


def _spread(fp: torch.Tensor, groups: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, min) of each fingerprint scalar across `groups` (one all-reduce of [fp, -fp] under MAX per group,
    in turn: over the groups of every mesh dim, the whole mesh)."""
    both = torch.cat([fp, -fp])
    for g in groups:
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=g)
    n = fp.numel()
    return both[:n], -both[n:]


def _differ(fp: torch.Tensor, group: Any) -> list[int]:
    """The tensors (indices into a fingerprint of two scalars each) whose fingerprint differs across `group`;
    a NaN fingerprint counts as differing (NaN compares unequal to itself)."""
    high, low = _spread(fp, [group])
    return sorted({k // 2 for k in (high != low).nonzero().flatten().tolist()})


def input_fingerprint(args: tuple, kwargs: dict) -> torch.Tensor:
    """Two float64 scalars per tensor input (sum, index-weighted sum); non-tensors are skipped."""
    values = []
    for x in pytree.tree_leaves((args, kwargs)):
        if not isinstance(x, torch.Tensor) or x.device.type == "meta":
            continue
        flat = x.detach().reshape(-1).to(torch.float64)
        weights = torch.arange(flat.numel(), device=flat.device).remainder_(7).add_(1)
        values += [flat.sum(), (flat * weights).sum()]
    return torch.stack(values) if values else torch.zeros(0, dtype=torch.float64)


def check_same_inputs(args: tuple, kwargs: dict, mesh_info: Any, *, groups: list | None = None) -> None:
    """Raises PlanError if the ranks of the mesh did not pass the same inputs.

    Args:
        args, kwargs: this rank's inputs (a pipeline passes its flat inputs and the target).
        mesh_info: the mesh whose dims must agree.
        groups: the process groups to compare over instead of `mesh_info`'s (a pipeline adds its pp group).

    Raises:
        PlanError: naming the first input tensor (in flattened order) that differs.
    """
    groups = _groups(mesh_info) if groups is None else [g for g in groups if g.size() > 1]
    if not groups:
        return
    high, low = _spread(input_fingerprint(args, kwargs), groups)
    differ = (high != low).nonzero().flatten().tolist()
    if differ:
        which = differ[0] // 2
        raise PlanError(
            f"the ranks passed different inputs (tensor input {which} in flattened order differs: its sum ranges "
            f"over [{low[2 * which].item():.6g}, {high[2 * which].item():.6g}] "
            "across ranks); with input_layout='full' every rank passes the same full batch. Use the same seed "
            "for the data on every rank, or input_layout='local' if each rank loads its own batch shard")
