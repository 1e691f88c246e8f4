"""Elementwise ops, with broadcasting.

Output placements are drawn from the inputs: Shard(d) where some input is
sharded on a dim that maps (right-aligned broadcasting) to output dim d,
Partial where the op is linear in its Partial inputs, Replicate always. For a
Shard(d) output each input is sharded on its matching dim, or Replicate where
it broadcasts along d.

Linearity decides Partial: sum(a_i) + sum(b_i) = sum(a_i + b_i) holds for
add/sub of two Partials, (sum a_i) * r for mul by a Replicate, but adding a
Replicate or a scalar to a Partial would add it n times (DESIGN.md pitfall), so
those ops must reduce first.
"""

from __future__ import annotations

import numbers

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxpar.core.spec import shape_key
from fxpar._torch.placements import StridedShard
from fxpar.rules.registry import OpInfo, P, R, S, Strategy, register, tensor_args

aten = torch.ops.aten

_NONLINEAR_UNARY = [
    aten.gelu.default, aten.relu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default,
    aten.exp.default, aten.log.default, aten.sqrt.default, aten.rsqrt.default, aten.abs.default,
    aten.sin.default, aten.cos.default, aten.erf.default, aten.pow.Tensor_Scalar, aten.reciprocal.default,
    aten.softplus.default, aten.leaky_relu.default, aten.hardtanh.default, aten.elu.default,
    aten.mish.default, aten.hardswish.default, aten.hardsigmoid.default, aten.relu6.default,
    aten.log1p.default, aten.expm1.default, aten.square.default, aten.sign.default,
    aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, aten.logical_not.default,
    aten.eq.Scalar, aten.ne.Scalar, aten.gt.Scalar, aten.lt.Scalar, aten.ge.Scalar, aten.le.Scalar,
    aten.masked_fill.Scalar, aten.bitwise_not.default, aten.isnan.default, aten.isinf.default,
    aten.add.Scalar, aten.sub.Scalar, aten.rsub.Scalar,
]
_LINEAR_UNARY = [
    aten.neg.default, aten.clone.default, aten.alias.default, aten.detach.default,
    aten.contiguous.default, aten.mul.Scalar, aten.div.Scalar,
    aten.native_dropout.default, aten.lift_fresh_copy.default, aten.positive.default,
]
# Casts: linear in exact arithmetic, but a dtype change rounds: rounding each partial sum and adding
# them is not rounding the sum (a float64 Llama's RMSNorm casts to float32 and lost 1e-7 that way).
_CASTS = [aten._to_copy.default, aten.to.dtype, aten.type_as.default]
_NONLINEAR_BINARY = [
    aten.maximum.default, aten.minimum.default, aten.pow.Tensor_Tensor, aten.eq.Tensor, aten.ne.Tensor,
    aten.gt.Tensor, aten.lt.Tensor, aten.ge.Tensor, aten.le.Tensor, aten.logical_and.default,
    aten.logical_or.default, aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.where.self,
    aten.masked_fill.Tensor, aten.atan2.default, aten.remainder.Tensor, aten.floor_divide.default,
]


_DIM_MAP_CACHE: dict[tuple, dict[int, int]] = {}


def _dim_map(in_val, out_val) -> dict[int, int]:
    """Input dim -> output dim under right-aligned broadcasting; broadcast dims are left out."""
    key = (shape_key(in_val.shape), shape_key(out_val.shape))
    if key not in _DIM_MAP_CACHE:
        _DIM_MAP_CACHE[key] = _compute_dim_map(in_val, out_val)
    return _DIM_MAP_CACHE[key]


def _compute_dim_map(in_val, out_val) -> dict[int, int]:
    offset = out_val.ndim - in_val.ndim
    out = {}
    for j in range(in_val.ndim):
        d = j + offset
        broadcast = statically_known_true(in_val.shape[j] == 1) and not statically_known_true(out_val.shape[d] == 1)
        if not broadcast:
            out[j] = d
    return out


def _has_scalar_operand(op: OpInfo) -> bool:
    """True if a number takes part in the arithmetic (alpha excepted)."""
    return any(isinstance(a, numbers.Number) and not isinstance(a, bool) for a in op.node.args[1:2])


def pointwise_strategies(op: OpInfo, cur, *, linear: str | None) -> list[Strategy]:
    """Strategies for an elementwise op; `linear` is None, 'unary', 'add', 'mul' or 'div'."""
    out_val = op.out_val[0] if isinstance(op.out_val, (tuple, list)) else op.out_val
    n_out = len(op.out_val) if isinstance(op.out_val, (tuple, list)) else None
    maps = [_dim_map(v, out_val) for v in op.in_vals]
    strategies = []

    def wrap(p):
        return tuple(p for _ in range(n_out)) if n_out is not None else p

    seen = set()
    for i, c in enumerate(cur):
        if c is not None and c.is_shard() and c.dim in maps[i] and maps[i][c.dim] not in seen:
            d = maps[i][c.dim]
            seen.add(d)
            inputs = []
            for m in maps:
                src = [j for j, od in m.items() if od == d]
                inputs.append(S(src[0]) if src else R)
            strategies.append(Strategy(tuple(inputs), wrap(S(d))))

    if len(cur) == 1 and isinstance(cur[0], StridedShard):
        # elementwise on one tensor (a cast of a fused-section parameter): any layout carries through
        strategies.append(Strategy((cur[0],), wrap(cur[0])))

    partial_ins = [c is not None and c.is_partial() for c in cur]
    if any(partial_ins):
        ok = False
        if linear == "unary":
            ok = True
        elif linear == "add":
            ok = all(partial_ins) and not _has_scalar_operand(op)
        elif linear == "mul":
            ok = sum(partial_ins) == 1
        elif linear == "div":
            ok = partial_ins[0] and sum(partial_ins) == 1
        if ok:
            inputs = tuple(P if p else R for p in partial_ins)
            strategies.append(Strategy(inputs, wrap(P)))

    strategies.append(Strategy(tuple(R for _ in cur), wrap(R)))
    return strategies


@register(*_NONLINEAR_UNARY, *_NONLINEAR_BINARY, uneven=True)
def nonlinear(op: OpInfo, cur) -> list[Strategy]:
    return pointwise_strategies(op, cur, linear=None)


@register(*[op for op in _LINEAR_UNARY if op is not aten.native_dropout.default], uneven=True)
def linear_unary(op: OpInfo, cur) -> list[Strategy]:
    return pointwise_strategies(op, cur, linear="unary")


register(aten.native_dropout.default)(linear_unary)  # its random mask is drawn per chunk: even shards only


def cast_strategies(op: OpInfo, cur) -> list[Strategy]:
    """A cast that loses precision needs whole values: partial sums are added, then rounded; one that
    keeps or widens the dtype is linear (Partial passes)."""
    out_val = op.out_val[0] if isinstance(op.out_val, (tuple, list)) else op.out_val
    src, dst = getattr(op.in_vals[0], "dtype", None) if op.in_vals else None, getattr(out_val, "dtype", None)
    narrowing = src is not None and dst is not None and src != dst and (
        not dst.is_floating_point or not src.is_floating_point or torch.finfo(dst).eps > torch.finfo(src).eps)
    return pointwise_strategies(op, cur, linear=None if narrowing else "unary")


@register(*_CASTS, uneven=True)
def cast(op: OpInfo, cur) -> list[Strategy]:
    return cast_strategies(op, cur)


@register(aten.add.Tensor, aten.sub.Tensor, uneven=True)
def add(op: OpInfo, cur) -> list[Strategy]:
    return pointwise_strategies(op, cur, linear="add")


@register(aten.mul.Tensor, uneven=True)
def mul(op: OpInfo, cur) -> list[Strategy]:
    return pointwise_strategies(op, cur, linear="mul")


@register(aten.div.Tensor, uneven=True)
def div(op: OpInfo, cur) -> list[Strategy]:
    return pointwise_strategies(op, cur, linear="div")


@register(aten.div_.Tensor, aten.mul_.Tensor)
def inplace_div_mul(op: OpInfo, cur) -> list[Strategy]:
    """In-place x /= y, x *= y (a router normalizing its top-k weights): x keeps its placement.

    A strategy that moved x would mutate a copy while later readers of x see the old values, so
    only strategies that take x as it is are exact."""
    linear = "div" if op.node.target == aten.div_.Tensor else "mul"
    return [s for s in pointwise_strategies(op, cur, linear=linear)
            if cur[0] is not None and s.inputs[0] == cur[0] and s.output == cur[0]]


@register(aten.add_.Tensor)
def add_inplace(op: OpInfo, cur) -> list[Strategy]:
    """In place (BatchNorm's num_batches_tracked += 1): the result is `self`, so it keeps self's
    placement; a shard plus a scalar stays local, a Partial would add the scalar n times."""
    c = cur[0]
    out: list[Strategy] = []
    if len(cur) == 1 and c is not None and c.is_shard():
        out.append(Strategy((S(c.dim),), S(c.dim)))
    out.append(Strategy(tuple(R for _ in cur), R))
    return out
