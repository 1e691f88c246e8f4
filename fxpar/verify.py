"""verify(): is a ParallelModule numerically the original model?

Runs the original (a private deep copy, so the user's gradients are left
alone) and the parallel module on the same inputs, and compares outputs and,
given a loss, the loss and every parameter gradient by original FQN.

Tolerances come from the dtype: float64 compares to 1e-10 relative (the
design's bar; a wrong collective is off by O(1)), float32 and lower use
torch.testing's defaults for that dtype. `atol` is scaled by the largest
magnitude of the reference tensor so tiny gradients next to large ones do not
fail on rounding alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from fxpar.errors import FxparError

__all__ = ["TensorReport", "VerifyReport", "verify", "default_tolerances"]

_DEFAULT_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for a dtype."""
    return _DEFAULT_TOL.get(dtype, (0.0, 0.0))


@dataclass(frozen=True)
class TensorReport:
    """How far one tensor of the parallel run is from the original's."""

    name: str
    max_abs: float
    max_rel: float
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class VerifyReport:
    """The result of verify(): every compared tensor, worst first."""

    tensors: tuple[TensorReport, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tensors)

    @property
    def worst(self) -> tuple[TensorReport, ...]:
        """Failing tensors first, then by relative error; at most five."""
        return tuple(sorted(self.tensors, key=lambda t: (t.ok, -t.max_rel))[:5])

    def __str__(self) -> str:
        status = "OK" if self.ok else "MISMATCH"
        head = f"verify: {status}, {len(self.tensors)} tensors compared"
        rows = [f"  {'ok ' if t.ok else 'BAD'} {t.name}: max abs {t.max_abs:.3e}, max rel {t.max_rel:.3e}"
                f"{' ' + t.detail if t.detail else ''}" for t in self.worst]
        return "\n".join([head, *rows])


def _compare(name: str, got: Any, want: Any, rtol: float | None, atol: float | None) -> TensorReport:
    if got is None or want is None:
        ok = got is None and want is None
        return TensorReport(name, 0.0 if ok else float("inf"), 0.0 if ok else float("inf"), ok,
                            "" if ok else f"missing on the {'parallel' if got is None else 'original'} side")
    if not isinstance(want, torch.Tensor):
        ok = got == want
        return TensorReport(name, 0.0 if ok else float("inf"), 0.0 if ok else float("inf"), ok)
    if tuple(got.shape) != tuple(want.shape):
        return TensorReport(name, float("inf"), float("inf"), False,
                            f"shape {tuple(got.shape)} != {tuple(want.shape)}")
    d_rtol, d_atol = default_tolerances(want.dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    g, w = got.detach().to(torch.float64), want.detach().to(torch.float64)
    diff = (g - w).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(w.abs().max()) if w.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    ok = bool(torch.all(diff <= atol * max(scale, 1.0) + rtol * w.abs())) if diff.numel() else True
    return TensorReport(name, max_abs, max_rel, ok)


def verify(model: nn.Module, pm: nn.Module, *inputs: Any, target: Any = None, loss_fn: Callable | None = None,
           rtol: float | None = None, atol: float | None = None, strict: bool = False,
           loss_reduction: str = "mean", **kwargs: Any) -> VerifyReport:
    """Runs `model` and `pm` on the same inputs and compares outputs, loss and gradients.

    Args:
        model: the original model (not modified: a deep copy runs).
        pm: the ParallelModule from fxpar.parallelize.
        inputs: full inputs, the same on every rank.
        target, loss_fn: with both, one training step is compared (loss and every gradient).
        rtol, atol: override the dtype's tolerances.
        strict: raise FxparError when anything differs.
        kwargs: keyword inputs for both models.

    Returns:
        A VerifyReport; `report.ok`, `report.worst`.
    """
    ref = copy.deepcopy(model)
    reports: list[TensorReport] = []
    with torch.no_grad():
        want_out = ref(*inputs, **kwargs)
        got_out = pm(*inputs, **kwargs)
    for i, (g, w) in enumerate(zip(pytree.tree_leaves(got_out), pytree.tree_leaves(want_out))):
        reports.append(_compare(f"output[{i}]", g, w, rtol, atol))

    if loss_fn is not None:
        ref.zero_grad(set_to_none=True)
        pm.zero_grad(set_to_none=True)
        want_loss = loss_fn(ref(*inputs, **kwargs), target)
        want_loss.backward()
        got_loss = pm.step(*inputs, target=target, loss_fn=loss_fn, loss_reduction=loss_reduction, **kwargs)
        reports.append(_compare("loss", got_loss, want_loss.detach(), rtol, atol))
        got_grads = pm.full_grads()
        for fqn, p in ref.named_parameters(remove_duplicate=False):
            if not p.requires_grad:
                continue
            reports.append(_compare(f"grad {fqn}", got_grads.get(fqn), p.grad, rtol, atol))
        pm.zero_grad(set_to_none=True)

    report = VerifyReport(tuple(reports))
    if strict and not report.ok:
        raise FxparError(str(report))
    return report
