"""What torch's pipeline stages are built from: the loss on the last stage, and each stage's input and output metadata."""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from fxpar._torch.dispatch import FakeTensorMode
from fxpar._torch.fx import pytree
from fxpar.runtime.checkpointing import stage_for_run

__all__ = ["Loss", "stage_io", "stage_for_run"]

log = logging.getLogger(__name__)


class Loss:
    """The loss torch's schedule calls on the last stage: the user's loss on the model's output structure,
    scaled so that the summed microbatch losses are the global loss."""

    def __init__(self, out_spec, loss_fn: Callable, scale: float, cut: Callable | None = None,
                 nones: tuple[bool, ...] = ()) -> None:
        self.out_spec = out_spec
        self.nones = nones  # where the model returns None (`output_nones`)
        self.loss_fn = loss_fn
        self.scale = scale
        self.cut = cut  # this rank's rows of a microbatch's target, when the data dims split the batch

    def __call__(self, output: Any, target: Any) -> torch.Tensor:
        flat = with_nones([output] if isinstance(output, torch.Tensor) else list(output), self.nones)
        out = pytree.tree_unflatten(flat, self.out_spec) if self.out_spec is not None else \
            (flat[0] if len(flat) == 1 else tuple(flat))
        loss = self.loss_fn(out, self.cut(target) if self.cut is not None else target)
        return loss * self.scale if self.scale != 1.0 else loss


def output_nones(graph_module: fx.GraphModule) -> tuple[bool, ...]:
    """For each flat output of the model, whether it is a None constant (the stages send only tensors)."""
    out = next(n for n in graph_module.graph.nodes if n.op == "output")
    return tuple(a is None for a in pytree.tree_leaves(out.args[0]))


def with_nones(values: list, nones: tuple[bool, ...]) -> list:
    """The model's flat outputs: the tensors the last stage returned, None where the model returns None."""
    if not any(nones):
        return list(values)
    tensors = iter(values)
    return [None if none else next(tensors) for none in nones]


def stage_io(graph_module: fx.GraphModule, num_stages: int, microbatches: int, flat: list[torch.Tensor], *,
             train: bool) -> dict[int, tuple[tuple, tuple]] | None:
    """Every stage's inputs and outputs for one microbatch, as contiguous meta tensors.

    The stages run in order on FakeTensors (no data, no communication, no buffer update, no
    random draw), stage k on stage k-1's outputs as torch's schedule feeds them, so integer
    inputs of later stages need no values. None if a stage cannot run on FakeTensors (a
    data-dependent shape): torch then infers the metadata by running the stages.
    """
    m = microbatches

    def leaf(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
        t = t.detach()
        return t.requires_grad_(requires_grad) if requires_grad and t.is_floating_point() else t

    def meta(t: torch.Tensor) -> torch.Tensor:  # p2p buffers are dense: contiguous strides
        out = torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")
        return out.requires_grad_(True) if t.requires_grad and t.is_floating_point() else out

    # Parameters and buffers go in as FakeTensors too: under allow_non_fake_inputs an in-place op
    # (num_batches_tracked += 1) would update the real buffer.
    mode = FakeTensorMode()
    fakes: dict[int, torch.Tensor] = {}

    def state(stage: nn.Module) -> dict[str, torch.Tensor]:
        named = [*stage.named_parameters(remove_duplicate=False), *stage.named_buffers(remove_duplicate=False)]
        return {n: fakes.setdefault(id(t), mode.from_tensor(t)) for n, t in named}

    io: dict[int, tuple[tuple, tuple]] = {}
    try:
        args = [mode.from_tensor(x.detach()[: x.shape[0] // m]) for x in flat]
        args = [leaf(a, x.requires_grad) for a, x in zip(args, flat)]
        with mode, torch.set_grad_enabled(train):
            for k in range(num_stages):
                stage = graph_module.get_submodule(f"stage_{k}")
                outs = torch.func.functional_call(stage, state(stage), tuple(args))
                outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
                io[k] = (tuple(meta(a) for a in args), tuple(meta(o) for o in outs))
                args = [leaf(o, o.requires_grad) for o in outs]
    except Exception:  # noqa: BLE001 - data-dependent ops: fall back to torch's own inference
        log.debug("stage metadata: a stage does not run on FakeTensors; torch infers it", exc_info=True)
        return None
    return io
