"""torch.distributed internals: process groups by name, functional collective ops, autograd callbacks."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives  # noqa: F401  (marks wait_tensor side-effecting for DCE)
from torch._C._distributed_c10d import (_create_work_from_future, _register_process_group, _register_work,
                                        _unregister_process_group)
from torch.distributed.distributed_c10d import _resolve_process_group

__all__ = [
    "functional",
    "resolve_process_group",
    "group_rank",
    "register_process_group",
    "unregister_process_group",
    "work_from_future",
    "register_work",
    "queue_autograd_callback",
]

functional = torch.ops._c10d_functional
"""torch's functional collective ops (`all_reduce`, `all_gather_into_tensor`, ..., `wait_tensor`).
Waits for: a public op namespace (torch.distributed._functional_collectives wraps these privately)."""


def resolve_process_group(group_name: str) -> dist.ProcessGroup:
    """The ProcessGroup registered under `group_name` (a DeviceMesh dim's `_dim_group_names`).

    Waits for: a public lookup of a process group by name."""
    return _resolve_process_group(group_name)


def group_rank(group_name: str) -> int:
    """This process's rank in the named group."""
    return _resolve_process_group(group_name).rank()


def register_process_group(group_name: str, group: dist.ProcessGroup) -> None:
    """Registers `group` under `group_name` for functional collectives (used by the in-process simulator).

    Waits for: a public registry of named process groups."""
    _register_process_group(group_name, group)


def unregister_process_group(group_name: str) -> None:
    _unregister_process_group(group_name)


def work_from_future(future) -> dist.Work:
    """A c10d Work completed by `future` (a ProcessGroup implemented in Python returns these).

    Waits for: a public Work constructor."""
    return _create_work_from_future(future)


def register_work(tensor: torch.Tensor, work: dist.Work) -> None:
    """Makes `functional.wait_tensor(tensor)` wait on `work` (an `async_op=True` collective writing `tensor`).

    gloo's functional `all_reduce` on CPU does not return before the collective has mostly run; c10d's
    `all_reduce(async_op=True)` does, and this hands its Work to the functional wait.
    Waits for: a public way to wrap a Work as a functional collective's pending tensor."""
    _register_work(tensor, work)


def queue_autograd_callback(fn: Callable[[], None]) -> None:
    """Runs `fn` when the current backward pass finishes (as DDP and FSDP flush their buckets).

    Waits for: a public autograd end-of-backward hook (torch.autograd.graph has per-tensor hooks only)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)
