"""DTensor placements that torch has not made public."""

from __future__ import annotations

from torch.distributed.tensor.placement_types import _StridedShard

__all__ = ["StridedShard"]

StridedShard = _StridedShard
"""Shard(d) of each of `split_factor` equal sections (a fused qkv projection sharded head-wise).
Waits for: a public strided placement in torch.distributed.tensor.placement_types."""
