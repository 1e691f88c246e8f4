"""Training utilities that sharded parameters need.

`clip_grad_norm_` computes the global gradient norm of the *unsplit* model
from local shards:

    ||g||^2 = sum over parameters p of sum over distinct shards of ||g_p,shard||^2

A parameter sharded on mesh dims M_p (Shard or strided) contributes its local
squared norm summed over the groups of M_p; on the other mesh dims it is
replicated, so summing there would count it several times. Parameters are
bucketed by M_p, one all-reduce per (bucket, mesh dim).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from fxpar._torch.c10d import resolve_process_group
from fxpar.ops.collectives import _all_reduce

__all__ = ["clip_grad_norm_", "grad_norm"]


def _sharded_dims(spec) -> tuple[int, ...]:
    if spec is None:
        return ()
    return tuple(m for m, p in enumerate(spec.placements) if not p.is_replicate())


def grad_norm(pm, norm_type: float = 2.0) -> torch.Tensor:
    """The global gradient norm of the unsplit model, the same on every rank."""
    specs = pm._param_specs()
    mesh = pm.mesh_info
    # A pipeline: this rank holds some stages; a tied weight counts on its first owner only, and the
    # stages' sums add up over the pipeline group.
    pp_group = getattr(pm, "pp_group", None)
    params = pm.counted_parameters() if hasattr(pm, "counted_parameters") else list(pm.parameters())
    if norm_type == math.inf:
        local = torch.zeros((), dtype=torch.float64)
        for p in params:
            if p.grad is not None:
                local = torch.maximum(local, p.grad.detach().abs().max().to(torch.float64))
        groups = [resolve_process_group(mesh.group_name(m))
                  for m in range(mesh.ndim)]
        for group in [*groups, *([pp_group] if pp_group is not None else [])]:
            torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX, group=group)
        return local
    buckets: dict[tuple[int, ...], torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
    for p in params:
        if p.grad is None:
            continue
        dims = _sharded_dims(specs.get(id(p)))
        buckets[dims] = buckets[dims] + p.grad.detach().to(torch.float64).abs().pow(norm_type).sum()
    total = torch.zeros((), dtype=torch.float64)
    for dims in sorted(buckets):  # the same order on every rank
        value = buckets[dims]
        for m in dims:
            value = _all_reduce(value.reshape(1), mesh.group_name(m)).reshape(())
        total = total + value
    if pp_group is not None:
        total = total.reshape(1)
        torch.distributed.all_reduce(total, group=pp_group)
        total = total.reshape(())
    return total.pow(1.0 / norm_type)


def clip_grad_norm_(pm, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Scales the local gradients so the unsplit model's gradient norm is at most `max_norm`.

    Args:
        pm: a ParallelModule (its `parameters()` are local shards).
        max_norm: the largest global norm allowed.
        norm_type: p of the p-norm (inf for the max norm).

    Returns:
        The global norm before clipping (float64 scalar, the same on every rank), as
        `torch.nn.utils.clip_grad_norm_` returns it for the unsplit model.
    """
    total = grad_norm(pm, norm_type)
    coef = max_norm / (total.item() + 1e-6)
    if coef < 1.0:
        for p in pm.parameters():
            if p.grad is not None:
                p.grad.detach().mul_(coef)
    return total
