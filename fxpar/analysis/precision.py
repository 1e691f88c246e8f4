"""Parameters cast to a lower precision: where their gradients are rounded per part of the batch.

A model that casts a trainable parameter down (`w.bfloat16()` for torch._grouped_mm, a router's
`weight.float()` in a float64 model) receives that parameter's gradient in the narrow dtype. When
the batch is split (a pipeline's microbatches, data-parallel shards), each part's gradient is
rounded to the narrow dtype and the parts are then summed in the parameter's dtype:

    unsplit:  g = widen(round(sum over the batch))
    split:    g = sum over parts of widen(round(sum over the part))

No schedule can round the whole batch's sum once (torch.distributed.pipelining, DDP and FSDP do the
same), so fxpar keeps torch's behaviour and says so: one warning per kind of cast, naming how many
parameters and the first few with their casts and modules. The difference is of the narrow dtype's
precision (bf16: up to about 4e-3 of the largest gradient; float32: about 1e-7).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.fx as fx

from fxpar.core.errors import module_fqn_of
from fxpar.core.spec import get_spec

__all__ = ["narrowed_parameters", "warn_narrowed_parameters", "batch_split_narrowings"]

log = logging.getLogger(__name__)


def narrowed_parameters(gm: fx.GraphModule) -> list[tuple[fx.Node, str]]:
    """Casts that narrow a trainable parameter (float64 -> bfloat16), each with the parameter's name.

    A parameter reaches its cast through ops of that one input only (views, transposes, selects,
    an FSDP gather).
    """
    derived: dict[fx.Node, str] = {}
    found = []
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "get_attr" and isinstance(val, torch.Tensor) and val.requires_grad:
            derived[node] = str(node.target)
        elif node.op == "call_function" and len(node.all_input_nodes) == 1 and node.all_input_nodes[0] in derived:
            src = node.all_input_nodes[0].meta.get("val")
            derived[node] = derived[node.all_input_nodes[0]]
            if isinstance(val, torch.Tensor) and isinstance(src, torch.Tensor) and val.dtype.is_floating_point \
                    and src.dtype.is_floating_point and torch.finfo(val.dtype).eps > torch.finfo(src.dtype).eps:
                found.append((node, derived[node]))
    return found


def batch_split_narrowings(gm: fx.GraphModule, data_dims: Sequence[int]) -> list[tuple[fx.Node, str]]:
    """The narrowed parameters whose narrow value meets a batch sharded on one of `data_dims`.

    A user of the cast whose output is sharded on a data-parallel mesh dim computes the narrow
    gradient from this rank's rows only.
    """
    def sharded(node: fx.Node) -> bool:
        placements = getattr(get_spec(node), "placements", None)
        return bool(placements) and any(placements[d].is_shard() for d in data_dims if d < len(placements))

    out = []
    for node, param in narrowed_parameters(gm):
        users, seen = list(node.users), set()
        while users:  # through ops of the narrow value alone (views, the gradient all-reduce marker)
            user = users.pop()
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_function" and len(user.all_input_nodes) == 1 and not sharded(user):
                users.extend(user.users)
            elif sharded(user):
                out.append((node, param))
                break
    return out


_NAMED = 3  # parameters named in a warning; the rest are counted (all of them at DEBUG)


def warn_narrowed_parameters(found: list[tuple[fx.Node, str]], split: str) -> None:
    """One warning per kind of cast (source dtype -> narrow dtype) in `found`, not one per parameter.

    Each warning names how many parameters are cast that way and the first few (with the cast node and
    module); the full list goes to DEBUG. A bf16 mixed-precision Llama casts every weight, which used to
    print one warning per parameter per rank. `split` says how the batch is split ('2 microbatches').
    """
    kinds: dict[tuple[torch.dtype, torch.dtype], dict[str, fx.Node]] = {}
    for node, param in found:
        src, dst = node.all_input_nodes[0].meta["val"].dtype, node.meta["val"].dtype
        kinds.setdefault((src, dst), {}).setdefault(param, node)
    for (src, dst), params in kinds.items():
        named = ", ".join(f"'{param}' at %{node.name} in module '{module_fqn_of(node) or '<root>'}'"
                          for param, node in list(params.items())[:_NAMED])
        more = f" and {len(params) - _NAMED} more" if len(params) > _NAMED else ""
        count = f"{len(params)} parameter{'s' if len(params) > 1 else ''}"
        log.warning("%s cast from %s to %s (%s%s): with the batch split into %s each one's gradient is rounded to "
                    "%s once per part, then summed, not rounded once over the whole batch as in the unsplit model "
                    "(a difference of %s's precision). For gradients equal to the unsplit model compute in the "
                    "parameters' dtype%s", count, src, dst, named, more, split, dst, dst,
                    ", or use Plan(microbatches=1, schedule='gpipe')" if "microbatch" in split else "")
        log.debug("all %s cast from %s to %s with the batch split into %s: %s", count, src, dst, split,
                  ", ".join(params))
