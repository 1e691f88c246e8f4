"""DTensor placements that torch has not made public."""

from __future__ import annotations

from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

__all__ = ["StridedShard", "local_shape_and_offset"]

StridedShard = _StridedShard
"""Shard(d) of each of `split_factor` equal sections (a fused qkv projection sharded head-wise).
Waits for: a public strided placement in torch.distributed.tensor.placement_types."""


def local_shape_and_offset(global_shape, mesh, placements):
    """(local shape, global offset) of this rank's block of a DTensor with these placements, as DCP computes it.

    Waits for: a public block-of-a-DTensor helper (DTensor's own is in torch.distributed.tensor._utils)."""
    return compute_local_shape_and_global_offset(global_shape, mesh, placements)
