"""Mixture-of-Experts feed-forward as one graph node, and its expert-parallel token exchange.

`moe_experts(x, idx, weights, w_gate, w_up, w_down, ...)` is what `fuse_experts`
puts in place of a model's experts module (Hugging Face Mixtral / Qwen-MoE
experts, torchtitan-style grouped experts):

    out[t] = sum_j weights[t, j] * FFN_{idx[t, j]}(x[t])
    FFN_e(v) = (act(v W_gate[e]^T) * (v W_up[e]^T)) W_down[e]^T

with W_gate, W_up: (E, I, H) and W_down: (E, H, I). A fused gate-up weight
(E, 2 I, H), [gate; up] along dim 1, comes as `w_gate` with `w_up=None`.
Every token is computed on its own, so the node is exact on any batch shard;
its sharding rule (`fxpar.rules.moe`) lets the weights be

    tp  each expert column-parallel (W_gate, W_up dim 1), row-parallel (W_down dim 2):
        the output is a partial sum, one all-reduce after the combine
    ep  experts by index (dim 0): `ep_size` > 1, tokens go to their experts' ranks
        and come back with `all_to_all_single` (split sizes from the router's counts)

The exchange on ep is data-dependent (how many tokens go where), so it runs inside
this node rather than as a separate graph node; the node prints with its ep group and
mesh dim, and `count_comms` records each all-to-all ("moe_all_to_all"). Its autograd
dual is the reverse exchange (`_TokenExchange`).

What the node communicates is fixed by its arguments all the same, and `ep_exchanges`
describes it for the static checks, the collective-order fingerprint, explain() and
the timeline: per forward, on the ep group, in this order

    counts    all_to_all_single of the (E,) int64 tokens-per-expert, E/ep values to each rank
    dispatch  all_to_all_single of the (T k, H) routed rows, sorted by expert; split sizes: the
              rows for each rank's experts (from counts)
    combine   all_to_all_single of the (R, H) rows this rank computed back to their sources
              (the dispatch's splits swapped; R = rows received, T k under balanced routing)

and per backward the duals of combine then dispatch (counts carry no gradient).
Each rank's dispatch payload is exactly T k H itemsize (its rows for its own experts included);
the combine's R varies with the routing, but summed over the group it equals the dispatch's sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fxpar.ops import waiting
from fxpar.ops.collectives import record_comm

__all__ = ["moe_experts", "ACTIVATIONS", "moe_all_to_all_bytes", "EpExchange", "ep_exchanges"]

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}


def moe_all_to_all_bytes(tokens: int, top_k: int, hidden: int, itemsize: int, ep_size: int) -> float:
    """Bytes each rank sends per forward in the two exchanges (dispatch, combine) under balanced routing.

    Each of the tokens * top_k rows of `hidden` values leaves the rank with probability (n-1)/n.
    The backward sends the same again."""
    return 2 * (ep_size - 1) / ep_size * tokens * top_k * hidden * itemsize


@dataclass(frozen=True)
class EpExchange:
    """One all-to-all a `moe_experts` node issues on its ep group (see the module docstring).

    Attributes:
        direction: 'forward', or 'backward' for an exchange's dual.
        name: 'counts', 'dispatch' or 'combine'.
        shape: the tensor this rank sends in: sizes or size expressions; 'R' is the rows received
            in the dispatch (data-dependent).
        dtype: its dtype.
        splits: how its split sizes are made.
        nbytes: this rank's payload: exact for counts, for dispatch forward and for combine backward;
            for the others the balanced-routing expectation (R = T k), exact summed over the group.
    """

    direction: str
    name: str
    shape: tuple[Any, ...]
    dtype: torch.dtype
    splits: str
    nbytes: int


def ep_exchanges(num_experts: int, ep_size: int, rows: Any, hidden: Any, dtype: torch.dtype, *,
                 rows_hint: int | None = None, hidden_hint: int | None = None) -> list[EpExchange]:
    """The all-to-alls of one `moe_experts` node with ep_size > 1, forward in issue order, then backward in issue order.

    Args:
        num_experts: E. ep_size: ranks on the ep dim.
        rows: T k, this rank's routed rows (an int or a size expression). hidden: H.
        dtype: the tokens' dtype. rows_hint, hidden_hint: their example values, for the bytes.
    """
    t = int(rows_hint if rows_hint is not None else rows)
    h = int(hidden_hint if hidden_hint is not None else hidden)
    local, size = num_experts // ep_size, t * h * dtype.itemsize
    by_router = f"router counts: rows for each rank's {local} of {num_experts} experts"
    out = [EpExchange("forward", "counts", (num_experts,), torch.int64, f"equal: {local} counts to each of {ep_size}",
                      num_experts * torch.int64.itemsize),
           EpExchange("forward", "dispatch", (rows, hidden), dtype, by_router, size),
           EpExchange("forward", "combine", ("R", hidden), dtype, "the dispatch's, swapped", size)]
    if dtype.is_floating_point:
        out += [EpExchange("backward", "combine", (rows, hidden), dtype, "the dispatch's", size),
                EpExchange("backward", "dispatch", ("R", hidden), dtype, "the dispatch's, swapped", size)]
    return out


class _TokenExchange(torch.autograd.Function):
    """all_to_all_single with split sizes; backward: the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list, in_splits: list, group_name: str, mesh_dim: str) -> Tensor:
        ctx.splits = (out_splits, in_splits, group_name, mesh_dim)
        record_comm("moe_all_to_all", mesh_dim, x, "forward")
        return waiting.all_to_all_single(x, out_splits, in_splits, group_name)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits, group_name, mesh_dim = ctx.splits
        record_comm("moe_all_to_all", mesh_dim, grad, "backward")
        back = waiting.all_to_all_single(grad, in_splits, out_splits, group_name)
        return back, None, None, None, None


def _ffn(xs: Tensor, counts: Sequence[int], w_gate: Tensor, w_up: Tensor | None, w_down: Tensor,
         act: str) -> Tensor:
    """Rows of xs sorted by (local) expert, `counts[e]` rows for expert e -> FFN_e of each row."""
    fn = ACTIVATIONS[act]
    outs, start = [], 0
    for e, c in enumerate(counts):
        v = xs[start:start + c]
        start += c
        if w_up is None:
            g, u = F.linear(v, w_gate[e]).chunk(2, dim=-1)
        else:
            g, u = F.linear(v, w_gate[e]), F.linear(v, w_up[e])
        outs.append(F.linear(fn(g) * u, w_down[e]))  # every expert runs (empty ones too): grads are zeros, not None
    return torch.cat(outs) if outs else xs.new_zeros(0, w_down.shape[1])


def _exchange_ffn(xs: Tensor, counts: Tensor, w_gate: Tensor, w_up: Tensor | None, w_down: Tensor, act: str,
                  ep_size: int, group_name: str, mesh_dim: str) -> Tensor:
    """Expert parallel: rows sorted by global expert go to the rank holding it, are computed, come back."""
    n, local = ep_size, w_gate.shape[0]
    # counts: (E,) rows of this rank per expert; rank r holds experts [r L, (r+1) L)
    recv = waiting.all_to_all_single(counts, [local] * n, [local] * n, group_name)
    record_comm("moe_all_to_all", mesh_dim, counts, "forward")
    send_splits = counts.view(n, local).sum(1).tolist()
    recv = recv.view(n, local)  # [source rank, local expert]
    recv_splits = recv.sum(1).tolist()
    xr = _TokenExchange.apply(xs, recv_splits, send_splits, group_name, mesh_dim)  # (source, expert) blocks
    # Regroup the received rows by local expert (expert-major), as the grouped FFN wants them.
    starts = torch.cumsum(recv.reshape(-1), 0) - recv.reshape(-1)
    sizes = recv.reshape(-1).tolist()
    perm = [torch.arange(int(starts[s * local + e]), int(starts[s * local + e]) + sizes[s * local + e])
            for e in range(local) for s in range(n)]
    perm = torch.cat(perm).to(xs.device) if perm else torch.zeros(0, dtype=torch.long, device=xs.device)
    yl = _ffn(xr.index_select(0, perm), recv.sum(0).tolist(), w_gate, w_up, w_down, act)
    yr = yl.index_select(0, torch.argsort(perm))  # back to (source, expert) blocks
    return _TokenExchange.apply(yr, send_splits, recv_splits, group_name, mesh_dim)


def moe_experts(x: Tensor, idx: Tensor, weights: Tensor, w_gate: Tensor, w_up: Tensor | None, w_down: Tensor,
                num_experts: int, act: str = "silu", ep_size: int = 1, ep_group: str = "",
                ep_mesh_dim: str = "ep") -> Tensor:
    """The routed experts of one MoE layer on this rank's tokens (see the module docstring).

    Args:
        x: (T, H) tokens. idx: (T, k) expert of each token's slots. weights: (T, k) routing weights.
        w_gate, w_up, w_down: this rank's expert weights (E / ep experts; I / tp features).
        num_experts: E, all experts. act: the activation's name (`ACTIVATIONS`).
        ep_size, ep_group, ep_mesh_dim: the expert-parallel group (ep_size 1: no exchange).

    Returns:
        (T, H) in x's dtype: a partial sum over tp when the features are sharded.
    """
    t, k = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    xs = x.index_select(0, order // k)  # (T k, H), sorted by expert
    counts = torch.bincount(flat, minlength=num_experts)
    if ep_size > 1:
        ys = _exchange_ffn(xs, counts, w_gate, w_up, w_down, act, ep_size, ep_group, ep_mesh_dim)
    else:
        ys = _ffn(xs, counts.tolist(), w_gate, w_up, w_down, act)
    out = ys.index_select(0, torch.argsort(order)) * weights.reshape(-1, 1)  # (T k, H), slot order
    return out.view(t, k, -1).sum(dim=1).to(x.dtype)
