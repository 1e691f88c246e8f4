"""Parameters stored with blocks repeated: grouped-query attention's kv heads held by several tp ranks.

`fxpar.passes.replicate_kv_heads` stores a k / v projection weight (KV*D, C) as (tp*D, C): its dim 0 cut
into `blocks` (= KV heads) equal blocks, each repeated `copies` (= tp / KV) times in a row, so that an
even Shard(0) over tp gives rank r block r // copies. The model (state dicts, checkpoints, full
gradients) sees the tensor without the copies; these two functions map between the two forms.
"""

from __future__ import annotations

import torch

__all__ = ["repeat_blocks", "unrepeat_blocks"]


def repeat_blocks(t: torch.Tensor, blocks: int, copies: int) -> torch.Tensor:
    """The stored form of a model tensor: dim 0 as `blocks` blocks, each repeated `copies` times in a row."""
    return t.unflatten(0, (blocks, -1)).repeat_interleave(copies, dim=0).flatten(0, 1)


def unrepeat_blocks(t: torch.Tensor, blocks: int, copies: int) -> torch.Tensor:
    """The model's tensor from its stored form: the first copy of each block (the copies are equal)."""
    return t.unflatten(0, (blocks, copies, -1))[:, 0].flatten(0, 1).clone()
