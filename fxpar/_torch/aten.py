"""ATen ops whose names start with an underscore (torch's internal overloads that exported graphs contain)."""

from __future__ import annotations

import torch

__all__ = ["BATCH_NORM_TRAINING_FLAG", "assert_async"]

aten = torch.ops.aten

BATCH_NORM_TRAINING_FLAG = {
    aten.batch_norm.default: 5,
    aten.native_batch_norm.default: 5,
    aten._native_batch_norm_legit.default: 5,
    aten._native_batch_norm_legit.no_stats: 3,
    aten._native_batch_norm_legit_functional.default: 5,
    aten._batch_norm_with_update.default: None,
    aten._batch_norm_with_update_functional.default: None,
}
"""BatchNorm's overloads in exported graphs -> the position of their `training` argument (None: always
training). Waits for: a public decomposition-stable batch-norm op set (export picks among these by mode)."""


def assert_async(condition: torch.Tensor, message: str) -> None:
    """A device-side assert that does not synchronise with the host (as aten.embedding's kernel asserts).

    Waits for: a public torch.assert_async."""
    torch._assert_async(condition, message)
