"""How the FSDP gathers of compiled graphs group into per-block collectives (shared by the runtime and explain)."""

from __future__ import annotations

from typing import Any

import torch

from fxpar.ops.transitions import collective_args

__all__ = ["bucket_groups"]


def bucket_groups(graphs: list) -> list[tuple[tuple, list[tuple[Any, Any]]]]:
    """The collectives the FSDP gathers of `graphs` run as: (args, [(graph module, get_attr node), ...]).

    Consecutive gathers tagged with one block (`fsdp_bucket`, apply_fsdp) on one group form a
    group; an untagged gather (fsdp_unit='param') is a group of its own. Each parameter appears once.
    """
    gather = torch.ops.fxpar.fsdp_all_gather.default
    groups: list[tuple[tuple, list]] = []
    last = None
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.target is not gather:
                continue
            info = node.meta.get("fxpar")
            key = info.fsdp_bucket if info is not None else None
            a = collective_args(node)
            args = (a["dim"], a["group_size"], a["group_name"], a["mesh_dim"])
            here = (id(gm), key, args, a.get("param_dtype"))  # one bucket gathers in one dtype
            members = groups[-1][1] if groups else []
            if key is not None and here == last and all(p.target != node.args[0].target for _, p in members):
                members.append((gm, node.args[0]))
            else:
                groups.append((args, [(gm, node.args[0])]))
            last = here
    return groups
