"""Measured memory of a training step, counted from the tensors (not the allocator, not ru_maxrss).

    with LiveBytes() as mem:
        pm.step(ids, target=labels)
    mem.peak          # bytes of tensor storages created inside the block and alive at once

Counting storages is deterministic and per process: ru_maxrss of a spawned rank
includes pages of its parent, and the CPU allocator keeps freed blocks. What it
counts is what a device allocator would have to hold (without its rounding and
fragmentation): each storage once, views and `.data` aliases included once,
freed when its last Python or autograd reference goes. Tensors that existed
before the block (parameters, optimizer state) are not counted; `tensor_bytes`
adds them up.
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch

from fxpar._torch.dispatch import TorchDispatchMode
from fxpar._torch.fx import pytree

__all__ = ["LiveBytes", "tensor_bytes"]


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the block and alive at once, by device type.

    Attributes:
        peak: the peak over all devices (meta tensors excluded).
        peak_by_device: {device type: peak bytes of that device's storages}.
        now: bytes alive right now (0 again once everything created inside is freed).
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[str, int]] = {}
        self.now = self.peak = 0
        self._now_by: dict[str, int] = {}
        self.peak_by_device: dict[str, int] = {}

    def _free(self, key: int) -> None:
        device, n = self._live.pop(key, ("", 0))
        self.now -= n
        if device:
            self._now_by[device] -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output on an input's storage (a view, an in-place op) allocated nothing: counted already if
        # created inside the block, and not counted if it existed before (a parameter's `.t()` saved for
        # the backward, a `.grad` accumulated into).
        inputs = {id(t.untyped_storage()) for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key, n = id(st), st.nbytes()
            if key in self._live or key in inputs or not n:
                continue
            device = t.device.type
            self._live[key] = (device, n)
            self.now += n
            self._now_by[device] = self._now_by.get(device, 0) + n
            self.peak = max(self.peak, self.now)
            self.peak_by_device[device] = max(self.peak_by_device.get(device, 0), self._now_by[device])
            # Python storage objects live as long as their C++ storage (torch preserves them).
            weakref.finalize(st, self._free, key)
        return out


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct tensors among `tensors` (a tied weight counted once)."""
    seen: dict[tuple[int, int], int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
    return sum(seen.values())
