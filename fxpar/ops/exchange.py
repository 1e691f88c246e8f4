"""Collectives on a gloo group of 2 as one all-to-all that sends each rank's whole buffer to the other.

gloo's all-gather (`all_gather_into_tensor`, c10d's `_allgather_base` alike)
gathers into a buffer of its own and then copies every rank's block out of it,
two copies of the gathered block per call on its thread here (torch 2.13);
its all-reduce runs a ring, two rounds of half the buffer. On 2 ranks both are
one swap: an all-to-all whose split sizes send this rank's whole buffer to the
other rank and nothing to itself (`swap_splits`), received straight into its
place: the peer's block of the gathered output, or a buffer added to this
rank's own. The same bytes on the wire, no copy, one round, and gloo's own
all-to-all, which reports completion and times out as its collectives do. The
reduce-scatter (`waiting.start_reduce_scatter`) swaps only the other rank's
block, where an all-to-all of the whole buffer also copies this rank's own.

`python -m benchmarks.waiting` measures each against gloo's (README.md has one
run's figures). A swap through gloo's point-to-point send / recv instead was as
fast at the median, but its 90th percentile was 2.8-3.5 ms from 64 KiB to 1 MiB
against 0.35-1.4 ms for the all-to-all (100 calls each, 2 ranks).

The sum adds this rank's buffer and the other's in rank order, so both ranks
hold the same bits (a + b and b + a are the same float). Beyond 2 ranks gloo's
collectives are used (an all-gather through an all-to-all would send n - 1
copies of the input).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["swap_splits", "all_gather_pair", "all_reduce_pair", "reduce_scatter_pair", "sum_blocks"]


def swap_splits(rank: int, numel: int) -> list[int]:
    """An all-to-all's split sizes (the same for input and output) on 2 ranks that swap `numel` elements."""
    return [0, numel] if rank == 0 else [numel, 0]


def all_gather_pair(out: Tensor, x: Tensor, pg: dist.ProcessGroup) -> dist.Work:
    """Issues the gather of both ranks' `x` into `out` (contiguous, twice `x`'s elements, rank order) on a group
    of 2: this rank's block is copied in unless `x` already is it; the other's arrives in place."""
    rank = pg.rank()
    blocks = out.view(2, -1)
    src = x.reshape(-1)
    if src.data_ptr() != blocks[rank].data_ptr():
        blocks[rank].copy_(src)
    splits = swap_splits(rank, blocks.shape[1])
    # sends its own block of `out` (in out's dtype), not `x`, which the caller may change before the wait
    return dist.all_to_all_single(blocks[1 - rank], blocks[rank], splits, splits, group=pg, async_op=True)


def all_reduce_pair(x: Tensor, pg: dist.ProcessGroup) -> tuple[dist.Work, list[Tensor]]:
    """Issues the swap of a sum all-reduce of `x` (contiguous) on a group of 2. Returns the Work and both ranks'
    buffers in rank order, for `sum_blocks` once it is waited."""
    rank = pg.rank()
    received = torch.empty_like(x)
    splits = swap_splits(rank, x.numel())
    work = dist.all_to_all_single(received.view(-1), x.view(-1), splits, splits, group=pg, async_op=True)
    return work, ([x, received] if rank == 0 else [received, x])


def reduce_scatter_pair(x: Tensor, pg: dist.ProcessGroup) -> tuple[dist.Work, list[Tensor]]:
    """Issues the swap of a sum reduce-scatter of `x` (contiguous, 2 blocks along dim 0, block r for rank r) on a
    group of 2: this rank sends only the other's block and receives only its own from the other (an all-to-all
    of the whole buffer would also copy its own block to itself). Returns the Work and this rank's two blocks
    in rank order, for `sum_blocks` once it is waited; `x` must not change before then."""
    rank = pg.rank()
    blocks = x.view(2, -1)
    received = torch.empty_like(blocks[0])
    splits = swap_splits(rank, received.numel())
    work = dist.all_to_all_single(received, blocks[1 - rank], splits, splits, group=pg, async_op=True)
    return work, ([blocks[0], received] if rank == 0 else [received, blocks[1]])


def sum_blocks(parts: list[Tensor] | Tensor, out: Tensor) -> Tensor:
    """`out` = the sum of `parts`: 2 tensors of out's elements (any shape) added in rank order, or one tensor
    of n blocks along dim 0 summed over it (torch.sum: bf16 accumulated in float32)."""
    flat = out.view(-1)
    if isinstance(parts, Tensor):
        torch.sum(parts.view(parts.shape[0], -1), dim=0, out=flat)
        return out
    torch.add(parts[0].reshape(-1), parts[1].reshape(-1), out=flat)
    return out
