"""Mixture-of-Experts: the fused experts node (`fxpar.ops.moe.moe_experts`).

Tensor inputs, positionally: x (T, H), idx (T, k), weights (T, k), then the
expert weights W_gate (E, I, H) or fused (E, 2I, H), W_up (E, I, H) if not
fused, W_down (E, H, I). Each token is computed on its own, so on one mesh dim:

    x, idx, weights   W_gate / W_up          W_down    out
    S(0)              S(0)                   S(0)      S(0)   expert parallel: experts by index,
                                                              tokens exchanged with all-to-all (ep)
    R                 S(1) (fused: S(1)x2)   S(2)      P      each expert column / row parallel (tp)
    S(0)              R                      R         S(0)   tokens split, experts replicated (dp)
    R                 R                      R         R

The expert-parallel strategy needs the node to know its group: `localize` adds
`ep_size`, `ep_group` and `ep_mesh_dim` from the mesh dim whose experts are
split by index (at most one).
"""

from __future__ import annotations

from fxpar._torch.placements import StridedShard as _StridedShard
from fxpar.core.errors import ShardingError, node_context
from fxpar.ops.moe import moe_experts
from fxpar.rules.registry import OpInfo, P, R, S, Strategy, register


def _tp_weights(ws, fused: bool):
    """The per-expert column / row split if the weights already have it, else None."""
    want = [_StridedShard(1, split_factor=2) if fused else S(1)] + ([] if fused else [S(1)]) + [S(2)]
    return tuple(want) if all(w is not None and w == v for w, v in zip(ws, want)) else None


def _localize(node, info, mesh) -> None:
    places = info.input_placements
    down = places[-1]  # W_down's placements per mesh dim
    ep = [m for m in range(mesh.ndim) if down[m] is not None and down[m] == S(0)]
    if len(ep) > 1:
        raise ShardingError(f"{node_context(node)}: experts split by index over several mesh dims "
                            f"{[mesh.names[m] for m in ep]}; split them over one dim named 'ep'")
    if not ep:
        return
    m = ep[0]
    group = mesh.group_names[m] if mesh.group_names else f"dryrun:{mesh.names[m]}"
    node.kwargs = {**node.kwargs, "ep_size": mesh.sizes[m], "ep_group": group, "ep_mesh_dim": mesh.names[m]}


@register(moe_experts, localize=_localize)
def experts(op: OpInfo, cur) -> list[Strategy]:
    ws = cur[3:]
    fused = len(ws) == 2
    out: list[Strategy] = []
    if all(w is not None and w == S(0) for w in ws):
        out.append(Strategy((S(0), S(0), S(0), *ws), S(0)))
    tp = _tp_weights(ws, fused)
    if tp is not None:
        out.append(Strategy((R, R, R, *tp), P))
    if cur[0] is not None and cur[0] == S(0):
        out.append(Strategy((S(0), S(0), S(0), *(R for _ in ws)), S(0)))
    out.append(Strategy(tuple(R for _ in cur), R))
    return out
