"""torch.distributed internals: process groups by name, functional collective ops, autograd callbacks."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives  # noqa: F401  (marks wait_tensor side-effecting for DCE)
from torch._C._distributed_c10d import (_create_work_from_future, _register_process_group, _register_work,
                                        _unregister_process_group)
from torch.distributed.distributed_c10d import _resolve_process_group

__all__ = [
    "functional",
    "hold_post_accumulate_grad_hooks",
    "post_accumulate_grad_hooks_held",
    "restore_post_accumulate_grad_hooks",
    "run_post_accumulate_grad_hooks",
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


def hold_post_accumulate_grad_hooks(param: torch.Tensor, held: dict) -> None:
    """Moves `param`'s post-accumulate-grad hooks (`Tensor.register_post_accumulate_grad_hook`) into `held`, so
    that autograd's AccumulateGrad, which runs them even for a gradient it did not get, finds none;
    `restore_post_accumulate_grad_hooks` puts them back, and `run_post_accumulate_grad_hooks` runs them once
    `.grad` holds the real gradient (a handle removed while they are held comes back with them).

    Waits for: a public way to run them (torch keeps them in `Tensor._post_accumulate_grad_hooks`, the dict its
    C++ hook reads; emptied and refilled in place, so handles still remove them)."""
    hooks = getattr(param, "_post_accumulate_grad_hooks", None)
    if hooks:
        held.update(hooks)
        hooks.clear()


def restore_post_accumulate_grad_hooks(param: torch.Tensor, held: dict | None) -> None:
    """Puts back the hooks `hold_post_accumulate_grad_hooks` moved into `held`."""
    if held:
        hooks = getattr(param, "_post_accumulate_grad_hooks", None)
        if hooks is not None:
            hooks.update(held)
        held.clear()


def run_post_accumulate_grad_hooks(param: torch.Tensor) -> None:
    """Runs `param`'s post-accumulate-grad hooks: its `.grad` holds a gradient autograd did not accumulate (a
    reduce-scatter's; FSDP2 runs them after its own the same way)."""
    hooks = list((getattr(param, "_post_accumulate_grad_hooks", None) or {}).values())
    if hooks:
        with torch.no_grad():  # as autograd runs them (an optimizer step in a hook updates the leaf in place)
            for hook in hooks:
                hook(param)


@contextlib.contextmanager
def post_accumulate_grad_hooks_held(params: Iterable[torch.Tensor]) -> Iterator[set[int]]:
    """Inside the block, autograd runs none of `params`' post-accumulate-grad hooks; on leaving it they are put
    back (also on an exception) and, when it completes, run for each parameter whose id the block added to the
    set it yields (those that got a gradient): once per step with the gradient the step leaves, not once per
    microbatch backward with a partial sum."""
    held = [(p, {}) for p in params]
    for p, hooks in held:
        hold_post_accumulate_grad_hooks(p, hooks)
    got: set[int] = set()
    try:
        yield got
    finally:
        for p, hooks in held:
            restore_post_accumulate_grad_hooks(p, hooks)
    for p, _ in held:
        if id(p) in got:
            run_post_accumulate_grad_hooks(p)


def queue_autograd_callback(fn: Callable[[], None]) -> None:
    """Runs `fn` when the current backward pass finishes (as DDP and FSDP flush their buckets).

    Waits for: a public autograd end-of-backward hook (torch.autograd.graph has per-tensor hooks only)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)
