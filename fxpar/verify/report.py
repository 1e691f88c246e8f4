"""What fxpar.verify reports: per-tensor comparisons, the verdict, the bisected first wrong node, default tolerances."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxpar.core.spec import size_hint

__all__ = ["TensorReport", "VerifyReport", "BisectResult", "default_tolerances", "fan_in", "working_dtype"]

_DEFAULT_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}


def default_tolerances(dtype: torch.dtype, fan_in: int = 1) -> tuple[float, float]:
    """(rtol, atol) for a dtype and the largest reduction fan-in F (see the module docstring).

    `atol` is relative to the reference's largest magnitude.
    """
    base_rtol, base_atol = _DEFAULT_TOL.get(dtype, (0.0, 0.0))
    if not dtype.is_floating_point:
        return base_rtol, base_atol
    rounding = 8 * torch.finfo(dtype).eps / 2 * math.sqrt(max(fan_in, 1))
    return max(base_rtol, rounding), max(base_atol, rounding)


_COMPLEX_PART = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}


def working_dtype(gm: fx.GraphModule) -> torch.dtype | None:
    """The least precise floating-point (or complex) dtype any value of `gm` is computed in.

    A float64 model that keeps a complex64 buffer (rotary tables) computes
    part of its values at float32 precision; its float64 outputs can only be
    held to float32's tolerances.
    """
    worst = None
    for node in gm.graph.nodes:
        vals = node.meta.get("val")
        for v in vals if isinstance(vals, (tuple, list)) else (vals,):
            if not isinstance(v, torch.Tensor):
                continue
            dt = _COMPLEX_PART.get(v.dtype, v.dtype)
            if dt.is_floating_point and (worst is None or torch.finfo(dt).eps > torch.finfo(worst).eps):
                worst = dt
    return worst


def _numel(shape) -> int:
    return math.prod(size_hint(s) for s in shape)


def fan_in(gm: fx.GraphModule) -> int:
    """The largest number of terms any reduction of `gm` sums (forward or weight gradient).

    Counts linear / matmul contractions (K), the batch a weight gradient sums
    over (numel / K of the activation), and sum / mean reductions.
    """
    aten = torch.ops.aten
    best = 1
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        vals = [a.meta.get("val") for a in node.all_input_nodes]
        x = vals[0] if vals else None
        if not isinstance(x, torch.Tensor) or x.ndim == 0:
            continue
        if node.target in (aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default,
                           aten.addmm.default):
            a = vals[1] if node.target == aten.addmm.default else x
            k = size_hint(a.shape[-1])
            best = max(best, k, _numel(a.shape) // max(k, 1))
        elif node.target in (aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default):
            out = node.meta.get("val")
            if isinstance(out, torch.Tensor):
                best = max(best, _numel(x.shape) // max(_numel(out.shape), 1))
    return best


@dataclass(frozen=True)
class TensorReport:
    """How far one tensor of the parallel run is from the original's.

    Attributes:
        name: what was compared ('output[0]', 'grad layers.0.up.weight', ...).
        max_abs: the largest absolute difference.
        max_rel: max_abs over the reference's largest magnitude (or over the absolute tolerance, where
            the reference is smaller: a zero gradient is compared absolutely).
        ok: within tolerance.
        detail: why it failed (missing, shape) or where it is worst.
    """

    name: str
    max_abs: float
    max_rel: float
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class BisectResult:
    """The first node of the rewritten graph whose value (or gradient) differs from the original's.

    Attributes:
        node: its name in the rewritten graph (None: nothing diverged).
        direction: 'forward' (its value differs) or 'backward' (the gradient
            reaching it differs: the fault is in the backward of one of `users`).
        target: its op.
        placements: its placements, e.g. '[S(1)]' (for 'backward', the
            gradient's placements as compared).
        local_shape, shape: its local and global shapes.
        origin: the pass that produced or last rewrote it (`meta["fxpar"].origin`).
        module: the user module it belongs to.
        source: the user's source line, where known.
        max_abs, max_rel: how far it is off.
        inputs: its inputs with their placements (all of which still agree).
        users: the nodes that consume it.
        compared: how many values were compared.
    """

    node: str | None
    direction: str = "forward"
    target: str = ""
    placements: str = ""
    local_shape: tuple = ()
    shape: tuple = ()
    origin: str | None = None
    module: str = ""
    source: str | None = None
    max_abs: float = 0.0
    max_rel: float = 0.0
    inputs: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    compared: int = 0

    def __str__(self) -> str:
        if self.node is None:
            return f"bisect: no node diverges ({self.compared} values compared)"
        what = "value" if self.direction == "forward" else "gradient"
        where = f" ({self.source})" if self.source else ""
        lines = [f"bisect: first diverging {what}: %{self.node} = {self.target}{where} in module "
                 f"'{self.module or '<root>'}', placements {self.placements}, local {list(self.local_shape)} of "
                 f"{list(self.shape)}, produced by pass {self.origin or 'capture'}; max abs {self.max_abs:.3e}, "
                 f"max rel {self.max_rel:.3e}"]
        if self.inputs:
            lines.append(f"  its inputs agree: {', '.join(self.inputs)}")
        if self.direction == "backward" and self.users:
            lines.append(f"  the gradient comes from the backward of: {', '.join(self.users)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class VerifyReport:
    """The result of verify(): every compared tensor, and the bisection if asked for.

    Attributes:
        tensors: every comparison, in the order made.
        bisect: with `bisect=True`, where the rewritten graph first diverges.
        fan_in: the reduction fan-in the default tolerances were derived from.
    """

    tensors: tuple[TensorReport, ...] = field(default_factory=tuple)
    bisect: BisectResult | None = None
    fan_in: int = 1

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tensors)

    @property
    def failed(self) -> tuple[TensorReport, ...]:
        return tuple(t for t in self.tensors if not t.ok)

    @property
    def worst(self) -> tuple[TensorReport, ...]:
        """Failing tensors first, then by relative error; at most five."""
        return tuple(sorted(self.tensors, key=lambda t: (t.ok, -t.max_rel))[:5])

    def __getitem__(self, name: str) -> TensorReport:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def __str__(self) -> str:
        status = "OK" if self.ok else f"MISMATCH ({len(self.failed)} of {len(self.tensors)} differ)"
        head = f"verify: {status}, {len(self.tensors)} tensors compared"
        rows = [f"  {'ok ' if t.ok else 'BAD'} {t.name}: max abs {t.max_abs:.3e}, max rel {t.max_rel:.3e}"
                f"{' ' + t.detail if t.detail else ''}" for t in self.worst]
        tail = [str(self.bisect)] if self.bisect is not None else []
        return "\n".join([head, *rows, *tail])


def _compare(name: str, got: Any, want: Any, rtol: float | None, atol: float | None,
             fan: int = 1, working: torch.dtype | None = None) -> TensorReport:
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
    if want.is_complex():  # compare real and imaginary parts, at the real dtype's tolerance
        got, want = torch.view_as_real(got.detach().resolve_conj()), torch.view_as_real(want.detach().resolve_conj())
    dtype = want.dtype
    if working is not None and dtype.is_floating_point and torch.finfo(working).eps > torch.finfo(dtype).eps:
        dtype = working  # computed at lower precision than it is stored in
    d_rtol, d_atol = default_tolerances(dtype, fan)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    g, w = got.detach().to(torch.float64), want.detach().to(torch.float64)
    diff = (g - w).abs()
    if diff.numel() == 0:
        return TensorReport(name, 0.0, 0.0, True)
    diff = torch.where(torch.isnan(g) & torch.isnan(w), torch.zeros_like(diff), diff.nan_to_num(float("inf")))
    max_abs = float(diff.max())
    scale = float(w.abs().nan_to_num(0.0).max())
    # Relative to the reference, but never to less than the absolute tolerance: a reference of zeros
    # (or values below atol) is compared absolutely, and its "relative" error must say so, not 1.46.
    floor = max(scale, atol)
    max_rel = max_abs / floor if floor > 0 else max_abs
    ok = bool(torch.all(diff <= atol * max(scale, 1.0) + rtol * w.abs()))
    detail = ""
    if not ok:
        flat = int(diff.argmax())
        idx = list(torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.ndim else []
        at = "[" + ", ".join(str(int(i)) for i in idx) + "]"
        detail = f"worst at {at}: {float(g.reshape(-1)[flat]):.6g} vs {float(w.reshape(-1)[flat]):.6g}"
        ratio = _ratio(g, w)
        if ratio is not None:
            detail += f" (parallel = {ratio:.6g} x original throughout)"
    return TensorReport(name, max_abs, max_rel, ok, detail)


def _ratio(g: torch.Tensor, w: torch.Tensor) -> float | None:
    """The constant c with g == c * w, if there is one (a scaled gradient), else None."""
    mask = w.abs() > 1e-6 * float(w.abs().max())
    if int(mask.sum()) < 2:
        return None
    r = g[mask] / w[mask]
    c = float(r.median())
    if c == 0 or abs(c - 1) < 1e-3 or not torch.allclose(r, torch.full_like(r, c), rtol=1e-4, atol=0):
        return None
    return c
