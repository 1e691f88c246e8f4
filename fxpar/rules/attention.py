"""Attention: scaled_dot_product_attention and the batched matmuls of eager attention.

q, k, v are (B, H, T, D). Heads are independent, so sharding the heads dim on
all three (and on the mask where it has a heads dim) computes each rank's
heads exactly; so does sharding the batch. Grouped-query attention keeps
KVH / n kv heads per rank, so the kv-to-q head ratio is unchanged. Heads
that do not divide (torch.chunk's whole heads, `unflatten_heads`) are exact
in every rule here: batch-like dims are cut alike on both operands, the
contracted dim's chunks sum.

    bmm (b, m, k) x (b, k, n):  S(0) S(0) -> S(0);  S(1) R -> S(1);  R S(2) -> S(2);  S(2) S(1) -> P
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxpar.core.spec import divides, size_key
from fxpar.ops.kv_replicas import REPLICA_GRAD_SUM
from fxpar.rules.registry import OpInfo, P, R, S, Strategy, register

aten = torch.ops.aten


def _mask_placement(mask, out, d: int):
    """The mask's placement when the output is sharded on dim d (R where it broadcasts)."""
    offset = out.ndim - mask.ndim
    j = d - offset
    if j < 0 or statically_known_true(mask.shape[j] == 1):
        return R
    return S(j)


def _chunks_agree(q_heads, kv_heads, n: int) -> bool:
    """torch.chunk's kv heads on each rank are the kv heads of its q heads: ceil(q/n) == ceil(kv/n) * q/kv."""
    if not isinstance(q_heads, int) or not isinstance(kv_heads, int) or q_heads % kv_heads:
        return False
    return -(-q_heads // n) == -(-kv_heads // n) * (q_heads // kv_heads)


@register(aten.scaled_dot_product_attention.default, uneven=True)
def sdpa(op: OpInfo, cur) -> list[Strategy]:
    """Uneven heads (torch.chunk's heads, `unflatten_heads`) are exact when q, k and v have the same
    head count, or fewer kv heads whose chunks are the kv heads of the q chunks (`_chunks_agree`)."""
    q = op.in_vals[0]
    n_tensors = len(op.in_vals)
    out: list[Strategy] = []
    for d in (1, 0):  # heads first: tensor parallel; then batch: data parallel
        sizes = [v.shape[d] for v in op.in_vals[:3]]
        if len({size_key(s) for s in sizes}) > 1 and any(divides(s, op.mesh_size) is False for s in sizes) \
                and not _chunks_agree(sizes[0], sizes[1], op.mesh_size):
            continue
        if any(c is not None and c.is_shard(d) for c in cur[:3]):
            ins = [S(d), S(d), S(d)]
            if n_tensors > 3:
                ins.append(_mask_placement(op.in_vals[3], q, d))
            out.append(Strategy(tuple(ins), S(d)))
    out.append(Strategy(tuple(R for _ in cur), R))
    return out


@register(aten.bmm.default, uneven=True)
def bmm(op: OpInfo, cur) -> list[Strategy]:
    ca, cb = cur
    out: list[Strategy] = []
    if (ca is not None and ca.is_shard(0)) or (cb is not None and cb.is_shard(0)):
        out.append(Strategy((S(0), S(0)), S(0)))
    if ca is not None and ca.is_shard(1):
        out.append(Strategy((S(1), R), S(1)))
    if cb is not None and cb.is_shard(2):
        out.append(Strategy((R, S(2)), S(2)))
    if (ca is not None and ca.is_shard(2)) or (cb is not None and cb.is_shard(1)):
        out.append(Strategy((S(2), S(1)), P))
    if ca is not None and ca.is_partial():
        out.append(Strategy((P, R), P))
    if cb is not None and cb.is_partial():
        out.append(Strategy((R, P), P))
    out.append(Strategy((R, R), R))
    return out


@register(aten.matmul.default, uneven=True)
def matmul(op: OpInfo, cur) -> list[Strategy]:
    """Batched matmul with broadcasting batch dims: (..., m, k) x (..., k, n), or (..., k) x (k, n)."""
    a, b = op.in_vals
    nd = op.out_val.ndim
    out: list[Strategy] = []
    ca, cb = cur
    if a.ndim == nd and b.ndim == nd:
        for d in range(nd - 2):  # batch-like dims (heads, batch): shard both
            if (ca is not None and ca.is_shard(d)) or (cb is not None and cb.is_shard(d)):
                # a size-1 dim broadcasts (Replicate) unless the output's is size 1 too: then it is the
                # dim itself (one head cut unevenly over tp: 1, 0, ...)
                single = statically_known_true(op.out_val.shape[d] == 1)
                pa = S(d) if single or not statically_known_true(a.shape[d] == 1) else R
                pb = S(d) if single or not statically_known_true(b.shape[d] == 1) else R
                out.append(Strategy((pa, pb), S(d)))
        if ca is not None and ca.is_shard(nd - 2):
            out.append(Strategy((S(nd - 2), R), S(nd - 2)))
        if cb is not None and cb.is_shard(nd - 1):
            out.append(Strategy((R, S(nd - 1)), S(nd - 1)))
        if (ca is not None and ca.is_shard(nd - 1)) or (cb is not None and cb.is_shard(nd - 2)):
            out.append(Strategy((S(nd - 1), S(nd - 2)), P))
    elif b.ndim == 2 and a.ndim > 2:  # x (..., k) @ W (k, n): a projection on a raw Parameter
        if cb is not None and cb.is_shard(1):
            out.append(Strategy((R, S(1)), S(nd - 1)))
        if (ca is not None and ca.is_shard(a.ndim - 1)) or (cb is not None and cb.is_shard(0)):
            out.append(Strategy((S(a.ndim - 1), S(0)), P))
        if ca is not None and ca.is_shard() and ca.dim < a.ndim - 1:
            out.append(Strategy((S(ca.dim), R), S(ca.dim)))
    if ca is not None and ca.is_partial():
        out.append(Strategy((P, R), P))
    if cb is not None and cb.is_partial():
        out.append(Strategy((R, P), P))
    out.append(Strategy((R, R), R))
    return out


@register(REPLICA_GRAD_SUM)
def replica_grad_sum(op: OpInfo, cur) -> list[Strategy]:
    """Identity forward (`replicate_kv_heads`' kv weight copies): the output is laid out as its input."""
    c = cur[0] if cur[0] is not None else R
    return [Strategy((c,), c)] + ([Strategy((R,), R)] if c != R else [])
