"""Matrix products: linear, mm, addmm, einsum.

For y = x @ W^T (+ b) with x (..., K), W (N, K), the exact strategies on one
mesh dim are Megatron's:

    x          W      b        y
    R          S(0)   S(0)     S(-1)     column parallel
    S(-1)      S(1)   none     P         row parallel (a bias is added after the reduce)
    S(k<last)  R      R        S(k)      batch / sequence sharded (data parallel)
    P          R      none     P         linear in x
    R          R      R        R

Row parallel with a bias has no local rule (the bias would be added n times);
the `split_linear_bias` pass turns those into linear + add first.
"""

from __future__ import annotations

import torch

from fxpar._torch.placements import StridedShard as _StridedShard
from fxpar.rules.registry import OpInfo, P, R, S, Strategy, register

aten = torch.ops.aten


@register(aten.linear.default, uneven=True)
def linear(op: OpInfo, cur) -> list[Strategy]:
    x_val = op.in_vals[0]
    has_bias = len(op.in_vals) == 3
    last_in, last_out = x_val.ndim - 1, op.out_val.ndim - 1
    cx, cw = cur[0], cur[1]
    out: list[Strategy] = []

    def strat(x, w, b, y):
        return Strategy((x, w, b) if has_bias else (x, w), y)

    if cw is not None and cw.is_shard(0):
        out.append(strat(R, S(0), S(0), S(last_out)))
    if isinstance(cw, _StridedShard) and cw.dim == 0:  # fused projection, sharded section by section
        k = cw.split_factor
        out.append(strat(R, cw, _StridedShard(0, split_factor=k), _StridedShard(last_out, split_factor=k)))
    if not has_bias and (cw is not None and cw.is_shard(1) or cx is not None and cx.is_shard(last_in)):
        out.append(strat(S(last_in), S(1), None, P))
    if cx is not None and cx.is_shard() and cx.dim < last_in:
        out.append(strat(S(cx.dim), R, R, S(cx.dim)))
    if cx is not None and cx.is_partial() and not has_bias:
        out.append(strat(P, R, None, P))
    out.append(strat(R, R, R, R))
    return out


@register(aten.mm.default, uneven=True)
def mm(op: OpInfo, cur) -> list[Strategy]:
    ca, cb = cur
    out: list[Strategy] = []
    if cb is not None and cb.is_shard(1):
        out.append(Strategy((R, S(1)), S(1)))
    if (ca is not None and ca.is_shard(1)) or (cb is not None and cb.is_shard(0)):
        out.append(Strategy((S(1), S(0)), P))
    if ca is not None and ca.is_shard(0):
        out.append(Strategy((S(0), R), S(0)))
    if ca is not None and ca.is_partial():
        out.append(Strategy((P, R), P))
    if cb is not None and cb.is_partial():
        out.append(Strategy((R, P), P))
    out.append(Strategy((R, R), R))
    return out


@register(aten.addmm.default, uneven=True)
def addmm(op: OpInfo, cur) -> list[Strategy]:
    bias_val = op.in_vals[0]
    _, ca, cb = cur

    def bias_for(d: int):
        # bias broadcasts against (M, N): sharded along d only if it has that dim at full size.
        offset = 2 - bias_val.ndim
        j = d - offset
        if j < 0 or (bias_val.shape[j] == 1 and op.out_val.shape[d] != 1):
            return R
        return S(j)

    out: list[Strategy] = []
    if cb is not None and cb.is_shard(1):
        out.append(Strategy((bias_for(1), R, S(1)), S(1)))
    if isinstance(cb, _StridedShard) and cb.dim == 1 and bias_val.ndim == 1:  # fused Conv1D (GPT-2 c_attn)
        k = cb.split_factor
        out.append(Strategy((_StridedShard(0, split_factor=k), R, cb), _StridedShard(1, split_factor=k)))
    if ca is not None and ca.is_shard(0):
        out.append(Strategy((bias_for(0), S(0), R), S(0)))
    out.append(Strategy((R, R, R), R))
    return out


def _einsum_subscripts(op: OpInfo) -> tuple[list[str], str] | None:
    """(input subscripts, output subscripts) of an explicit einsum without '...' or repeated letters."""
    eq = str(op.args[0]).replace(" ", "")
    if "->" not in eq or "..." in eq:
        return None
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != len(op.in_vals) or any(len(set(t)) != len(t) for t in [*ins, out]):
        return None
    if any(len(t) != v.ndim for t, v in zip(ins, op.in_vals)):
        return None
    return ins, out


@register(aten.einsum.default, uneven=True)
def einsum(op: OpInfo, cur) -> list[Strategy]:
    """einsum is multilinear: sharding a letter shards every operand that has it (the others
    Replicate); the output is sharded on that letter where it keeps it, Partial where it sums it
    away. One Partial operand (the others Replicate) gives a Partial output. Exact on uneven shards:
    every operand cuts the letter into the same torch.chunk pieces."""
    parsed = _einsum_subscripts(op)
    out: list[Strategy] = []
    if parsed is not None:
        ins, res = parsed
        letters = []
        for sub, c in zip(ins, cur):
            if c is not None and c.is_shard() and sub[c.dim] not in letters:
                letters.append(sub[c.dim])
        for L in letters:
            placed = tuple(S(sub.index(L)) if L in sub else R for sub in ins)
            out.append(Strategy(placed, S(res.index(L)) if L in res else P))
        partial = [i for i, c in enumerate(cur) if c is not None and c.is_partial()]
        if len(partial) == 1:
            out.append(Strategy(tuple(P if i == partial[0] else R for i in range(len(cur))), P))
    out.append(Strategy(tuple(R for _ in cur), R))
    return out
