"""torch's dispatcher internals: fake tensors, dispatch modes and keys."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensor,
                                           FakeTensorMode)
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

__all__ = [
    "FakeTensorMode",
    "FakeTensor",
    "is_fake",
    "storage_key",
    "DataDependentOutputException",
    "DynamicOutputShapeException",
    "TorchDispatchMode",
    "disable_current_modes",
    "has_autograd_kernel",
    "redispatch_cpu",
]

# Waits for: torch.fake / public fake tensors (torch._subclasses), and torch.utils.python_dispatch.
disable_current_modes = _disable_current_modes


def has_autograd_kernel(op) -> bool:
    """Whether `op` (an OpOverload) has an Autograd kernel (a registered backward)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(op._schema.name, "Autograd")


def redispatch_cpu(func, *args, **kwargs):
    """Runs `func` with the CPU kernel, below any Python dispatch mode."""
    return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)


def storage_key(t: torch.Tensor) -> int:
    """An identity of `t`'s storage, shared by its views and `.data` (meta tensors included)."""
    # Waits for: a public storage identity (torch.UntypedStorage has none besides _cdata).
    return t.untyped_storage()._cdata


def is_fake(t: torch.Tensor) -> bool:
    """A FakeTensor or a functional wrapper (tracing under torch.compile / export): it has no data pointer.

    Waits for: a public predicate of traced tensors (torch._subclasses is private)."""
    if isinstance(t, FakeTensor):
        return True
    try:
        t.data_ptr()
    except RuntimeError:
        return True
    return False
