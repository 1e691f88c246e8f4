"""A failed pipeline step: every rank raises, promptly, and the module stays usable.

A pipeline rank that raises inside torch's schedule (in the loss function or a
stage's forward) leaves its partners blocked in a recv until the process group
times out. Instead, the failing rank records the exception and goes on with
stand-in values (a zero loss tied to the output, zero stage outputs tied to the
stage's inputs and parameters), so the schedule's sends and recvs all complete;
then every rank of the mesh agrees on the outcome:

    code = global rank if this rank failed else NONE;  all_reduce(code, MIN) over every mesh dim
    if code != NONE: the failing rank's message, all_reduce(bytes, SUM) over every mesh dim; raise

Reducing over each dim of a Cartesian mesh in turn is the reduction over the
whole mesh. On success that is one 8-byte all-reduce per mesh dim per step.
The step's gradients are discarded on failure (`.grad` is what it was before
the step), so the next step is exact.
"""

from __future__ import annotations

import traceback
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from fxpar._torch.c10d import resolve_process_group

from fxpar.core.errors import ScheduleError

__all__ = ["StepFailure", "GuardedStage", "guard_loss", "mesh_groups"]

_NONE = 2**62
_MESSAGE_BYTES = 1024


class StepFailure:
    """The first exception this rank hit in a step, and the step-end agreement on failures."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.where = ""

    def record(self, error: BaseException, where: str) -> None:
        if self.error is None:
            self.error, self.where = error, where

    def reset(self) -> None:
        self.error, self.where = None, ""

    def agree(self, groups: Iterable[Any]) -> None:
        """Raises ScheduleError on every rank of `groups` (one per mesh dim) if any of them failed.

        Args:
            groups: the process groups of every mesh dim (pp included), each this rank's.

        Raises:
            ScheduleError: naming the failing rank, where, and the original exception (chained on
                the failing rank).
        """
        groups = list(groups)
        rank = dist.get_rank()
        code = torch.tensor([rank if self.error is not None else _NONE], dtype=torch.int64)
        for g in groups:
            dist.all_reduce(code, op=dist.ReduceOp.MIN, group=g)
        failed = int(code.item())
        if failed == _NONE:
            return
        text = torch.zeros(_MESSAGE_BYTES, dtype=torch.int64)
        if failed == rank:
            raw = f"{self.where}: {type(self.error).__name__}: {self.error}".encode()[:_MESSAGE_BYTES]
            text[: len(raw)] = torch.tensor(list(raw), dtype=torch.int64)
        for g in groups:
            dist.all_reduce(text, group=g)
        message = bytes(int(b) for b in text.tolist() if b).decode(errors="replace")
        error = self.error
        self.reset()
        summary = (f"pipeline step failed on rank {failed} ({message}); this step's gradients were discarded and "
                   "the module is ready for the next step")
        if error is not None and failed == rank:
            tb = "".join(traceback.format_exception(type(error), error, error.__traceback__, limit=-3))
            raise ScheduleError(f"{summary}\n{tb}") from error
        raise ScheduleError(summary)


def zero_like_output(output: Any) -> torch.Tensor:
    """A zero loss that depends on the output (so the backward runs and sends zero gradients)."""
    leaves = [t for t in (output if isinstance(output, (tuple, list)) else (output,))
              if isinstance(t, torch.Tensor) and t.requires_grad]
    zero = torch.zeros((), dtype=torch.float32)
    for t in leaves:
        zero = zero + (t * 0).sum().to(zero.dtype)
    return zero


class GuardedStage(nn.Module):
    """A stage module whose exceptions are recorded, replaced by zero outputs of the stage's shapes.

    The zero outputs depend on the stage's floating inputs and parameters (times zero), so torch's
    schedule runs the backward and sends zero input gradients as usual.
    """

    def __init__(self, stage: nn.Module, outputs: tuple, failure: StepFailure, index: int) -> None:
        super().__init__()
        self.stage = stage
        self.failure = failure
        self._outputs = outputs  # meta tensors: shape, dtype, requires_grad
        self.index = index

    def forward(self, *args: Any) -> Any:
        try:
            return self.stage(*args)
        except Exception as e:  # noqa: BLE001 - any error: recorded and raised on every rank after the step
            self.failure.record(e, f"stage {self.index} forward")
        tied = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        tied += [p for p in self.stage.parameters() if p.requires_grad]
        anchor = sum(((t * 0).sum() for t in tied), torch.zeros(()))
        outs = []
        for m in self._outputs:
            z = torch.zeros(m.shape, dtype=m.dtype)
            if m.requires_grad and m.is_floating_point():
                z = z + anchor.to(m.dtype)
            outs.append(z)
        return tuple(outs)  # stage modules return a tuple (split_stages)


def guard_loss(loss_fn: Callable, failure: StepFailure) -> Callable:
    """`loss_fn` whose exception is recorded and replaced by a zero loss tied to the output."""

    def guarded(output: Any, target: Any) -> torch.Tensor:
        try:
            return loss_fn(output, target)
        except Exception as e:  # noqa: BLE001 - recorded and raised on every rank after the step
            failure.record(e, "loss_fn")
            return zero_like_output(output)

    return guarded


def mesh_groups(pp_group: Any, mesh_info: Any) -> list:
    """The process group of every mesh dim this rank is on, pp first (for the step's failure flag)."""
    groups = [pp_group] if pp_group is not None else []
    names = range(len(mesh_info.names))
    return groups + [resolve_process_group(mesh_info.group_name(m)) for m in names if mesh_info.sizes[m] > 1]
