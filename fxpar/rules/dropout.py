"""Dropout: the same mask where the value is replicated, an independent one per shard.

A replicated value draws its mask from the default generator, which advances
identically on every rank (same seed, same program), so every replica drops
the same elements, as the unsplit model would. A sharded value must not reuse
that stream on every shard (each shard would get the same pattern), so its
dropout becomes `fxpar::sharded_dropout`: one draw from the default generator
(keeping the stream in step across ranks) seeds a private generator offset by
this rank's shard index, so shards are independent and the result is
reproducible for a given seed and mesh.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
from torch import Tensor

from fxpar._torch.c10d import resolve_process_group
from fxpar.core.spec import set_info
from fxpar.rules.pointwise import pointwise_strategies
from fxpar.rules.registry import OpInfo, P, R, S, Strategy, register

aten = torch.ops.aten


def _shard_index(group_names: str) -> int:
    index = 0
    for name in group_names.split(","):
        group = resolve_process_group(name)
        index = index * group.size() + group.rank()
    return index


@torch.library.custom_op("fxpar::sharded_dropout", mutates_args=())
def sharded_dropout(x: Tensor, p: float, train: bool, group_names: str) -> tuple[Tensor, Tensor]:
    """Dropout of one shard, with a mask independent of the other shards'. Returns (output, scale)."""
    if not train or p == 0.0:
        return x.clone(), torch.ones_like(x)
    seed = int(torch.randint(0, 2**62, (1,)).item())  # advances the shared stream identically on all ranks
    gen = torch.Generator(device=x.device).manual_seed((seed + 0x9E3779B97F4A7C15 * _shard_index(group_names)) % 2**62)
    scale = torch.empty_like(x).bernoulli_(1.0 - p, generator=gen) / (1.0 - p)
    return x * scale, scale


@sharded_dropout.register_fake
def _(x, p, train, group_names):
    return torch.empty_like(x), torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _backward(ctx, grad, _grad_scale):
    (scale,) = ctx.saved_tensors
    return grad * scale, None, None, None


sharded_dropout.register_autograd(_backward, setup_context=_setup)


def _localize_dropout(node: fx.Node, info, mesh) -> None:
    spec = info.spec
    if isinstance(spec, tuple) or spec is None:
        return
    dims = [m for m, p in enumerate(spec.placements) if not p.is_replicate() and not p.is_partial()]
    if not dims:
        return
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    groups = ",".join(mesh.group_names[m] if mesh.group_names else f"dryrun:{mesh.names[m]}" for m in dims)
    graph = node.graph
    with graph.inserting_before(node):
        new = graph.create_node("call_function", torch.ops.fxpar.sharded_dropout.default,
                                (node.args[0], float(p), bool(train), groups), name=f"{node.name}_sharded")
    new.meta.update({k: v for k, v in node.meta.items() if k != "fxpar"})
    new.meta["val"] = (node.meta["val"], node.meta["val"])
    set_info(new, dataclasses.replace(info, spec=(spec, spec), input_placements=info.input_placements))
    # the old node becomes the getitem that picks the output: its users and spec stay as they are
    node.target, node.args, node.kwargs = operator.getitem, (new, 0), {}
    set_info(node, dataclasses.replace(info, input_placements=None, role="view"))


@register(aten.dropout.default, localize=_localize_dropout)
def dropout(op: OpInfo, cur) -> list[Strategy]:
    # Elementwise; a Partial input is reduced first, so the mask multiplies the whole sum once.
    return pointwise_strategies(op, cur, linear=None)


@register(torch.ops.fxpar.sharded_dropout.default)
def sharded(op: OpInfo, cur) -> list[Strategy]:
    return pointwise_strategies(op, cur, linear=None)
