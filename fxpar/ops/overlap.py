"""Split collectives: an issue node early in the graph, its wait where the value is first needed.

An FSDP gather in the graph is one `fsdp_all_gather` node per parameter
(fxpar.ops.collectives), which gathers and waits inside itself. Overlap adds
the issue half as its own node:

    %prefetch_h_1 = fxpar.fsdp_prefetch([%h_1_w, %h_1_b, ..], 0, 2, '1', 'fsdp', None)   # issue
    ... block h.0 computes while h.1's gather is in flight ...
    %fsdpgather_h_1_w = fxpar.fsdp_all_gather(%h_1_w, 0, 2, '1', 'fsdp')               # wait

`fsdp_prefetch` starts the gather (torch's `_c10d_functional.all_gather_into_tensor`
without its `wait_tensor`) and hands the pending tensor to the FSDP runtime
(`FsdpRuntime.prefetch`); the parameter's `fsdp_all_gather` then waits on it
instead of gathering. The gradient duals stay on `fsdp_all_gather`: the
issue node has no output, so autograd never sees it. Without a runtime, or
when the runtime declines (a pipeline step that gathers once per step),
the issue node does nothing and the wait node gathers as before: the
values are the same either way, bit for bit.

The issue node is marked side-effecting (as `wait_tensor` is, by importing
`torch.distributed._functional_collectives`), so dead-code elimination never
drops it even though nothing uses its (empty) result.

`start_all_gather` / `start_flat_all_gather` / `wait` are the eager halves the
runtime uses, forward and backward (re-gathers prefetched, reduce-scatters
waited late).
"""

from __future__ import annotations

import functools

from typing import Optional

import torch
from torch import Tensor

from fxpar._torch.c10d import functional
from fxpar.ops import waiting
from fxpar.ops.collectives import _fsdp_runtime, _record

__all__ = ["ISSUE_OPS", "start_all_gather", "start_flat_all_gather", "start_reduce_scatter", "wait",
           "prefetch_shards"]

_c10d = functional


def start_all_gather(x: Tensor, n: int, group_name: str) -> Tensor:
    """Issues an all-gather along dim 0; the result is valid only after `wait` (polled on gloo: `ops.waiting`)."""
    return waiting.start_all_gather(x, n, group_name)


def start_flat_all_gather(pieces: list[Tensor], n: int, group_name: str,
                          dtype: torch.dtype | None = None) -> Tensor:
    """Issues the all-gather of `pieces`, flattened and concatenated into one buffer (in `dtype`): [n * numel]
    after `wait`. On a gloo group the pieces are concatenated straight into this rank's block of the output,
    which the exchange sends as it is (as FSDP2's all_gather_copy_in); elsewhere one functional collective
    (the in-process simulator meets ranks there)."""
    rank = waiting.gather_rank_in_place(group_name, pieces[0])
    if rank is None:
        flat = torch.cat([p.reshape(-1) for p in pieces])
        return start_all_gather(flat if dtype is None else flat.to(dtype), n, group_name)
    # gloo's exchange gathers around this rank's own block: concatenate (and cast) the pieces straight into it
    total = sum(p.numel() for p in pieces)
    out = pieces[0].new_empty(n * total, dtype=dtype or functools.reduce(torch.promote_types,
                                                                         (p.dtype for p in pieces)))
    own = torch.cat([p.reshape(-1) for p in pieces], out=out[rank * total:(rank + 1) * total])
    return waiting.start_all_gather(own, n, group_name, out=out)


def start_reduce_scatter(x: Tensor, n: int, group_name: str) -> Tensor:
    """Issues a sum reduce-scatter along dim 0; the result is valid only after `wait` (on gloo an all-to-all
    and a sum at the wait: `ops.waiting.start_reduce_scatter`)."""
    return waiting.start_reduce_scatter(x, n, group_name)


def wait(pending: Tensor) -> Tensor:
    """Waits for a collective `start_*` issued; returns its result."""
    return waiting.wait(pending)


@torch.library.custom_op("fxpar::fsdp_prefetch", mutates_args=())
def fsdp_prefetch(shards: list[Tensor], dim: int, group_size: int, group_name: str, mesh_dim: str,
                  param_dtype: Optional[torch.dtype] = None) -> None:
    """Issues the gather of `shards` (one FSDP unit); their `fsdp_all_gather` nodes wait on it."""
    runtime = _fsdp_runtime[0] if _fsdp_runtime else None
    prefetch = getattr(runtime, "prefetch", None)
    if prefetch is not None:
        # the shards themselves, not detached copies: the runtime finds an empty (uneven) shard by its object
        prefetch(list(shards), (dim, group_size, group_name, mesh_dim), param_dtype)


@fsdp_prefetch.register_fake
def _(shards, dim, group_size, group_name, mesh_dim, param_dtype=None):
    return None


def prefetch_shards(shards: list[Tensor], args: tuple, param_dtype: torch.dtype | None) -> list[tuple]:
    """Issues one gather per shard: [(pending, shard version), ...] for a runtime without buckets."""
    _, n, group_name, mesh_dim = args
    out = []
    for s in shards:
        src = s if param_dtype is None else s.to(param_dtype)
        _record("all_gather", mesh_dim, src, "forward")
        out.append((start_all_gather(src, n, group_name), s._version))
    return out


ISSUE_OPS = {torch.ops.fxpar.fsdp_prefetch.default: "fsdp_prefetch"}
"""Issue nodes: they start a collective whose wait is another node."""

for _op in ISSUE_OPS:
    torch.fx.node.has_side_effect(_op)
