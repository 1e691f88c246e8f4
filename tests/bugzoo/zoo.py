"""Shared set-up of the bug zoo: correct rewritten graphs on a simulated mesh, and graph-edit helpers.

Each zoo entry compiles a correct model for every rank (fxpar.testing.simulate),
plants one realistic bug by editing the rewritten graph(s) as a faulty pass
would, and asserts that fxpar.check / check_ranks (statically) or
fxpar.verify (numerically) catches it with the right message.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxpar.core.spec import get_info, set_info
from fxpar.testing.simulate import SimWorld

fxpar_ops = torch.ops.fxpar
aten = torch.ops.aten
MEGATRON = {"layers.*.up": "colwise", "layers.*.down": "rowwise"}


class Block(nn.Module):
    def __init__(self, d: int = 8, h: int = 16) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x))) + x


class Stack(nn.Module):
    """Megatron MLP blocks with residuals: one forward all_reduce and one f per block."""

    def __init__(self, depth: int = 2, d: int = 8, h: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(d, h) for _ in range(depth)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class TwoBranches(nn.Module):
    """Two independent Megatron MLPs on one input, combined asymmetrically: two same-shape all_reduces."""

    def __init__(self, d: int = 8, h: int = 16) -> None:
        super().__init__()
        self.a, self.b = Block(d, h), Block(d, h)

    def forward(self, x):
        return self.a(x) - 0.5 * self.b(x)


def mse(out, target):
    return ((out - target) ** 2).mean()


def compiled(model: nn.Module, tp: int = 2, plan=None, batch=(4,), d: int = 8, seed: int = 0):
    """(world, per-rank ParallelModules, input, target) for a float64 model on a simulated tp mesh."""
    torch.manual_seed(seed)
    model = model.double()
    x = torch.randn(*batch, d, dtype=torch.float64)
    target = torch.randn(*batch, d, dtype=torch.float64)
    world = SimWorld({"tp": tp})
    pms = world.parallelize(model, example_inputs=(x,), plan=plan)
    return world, pms, x, target


def nodes(gm: fx.GraphModule, target) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def recompile(*pms) -> None:
    for pm in pms:
        pm.graph_module.graph.lint()
        pm.graph_module.recompile()


def copy_info(dst: fx.Node, src: fx.Node, **changes) -> None:
    """Gives a planted node the spec of another (as a careless pass would)."""
    import dataclasses

    info = get_info(src)
    set_info(dst, dataclasses.replace(info, **changes) if changes else info)
    dst.meta["val"] = src.meta["val"]
    for key in ("nn_module_stack", "stack_trace"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]
