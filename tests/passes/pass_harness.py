"""What every pass unit test in tests/passes/ does: capture, run the default passes up to one, read the graph.

`run_upto` builds the context as `fxpar.compiler.compile_model` does (the same options
keys and defaults) and runs the pass manager with checks on, so `graph.lint()` and
fxpar's invariant checks for whatever has been provided so far run after every pass.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn as nn

import fxpar
from fxpar.compiler import PassManager
from fxpar.core.mesh import MeshInfo
from fxpar.core.pass_api import PassContext
from fxpar.core.plan import as_plan
from fxpar.dryrun import dry_mesh


class Fn(nn.Module):
    """A plain function of one input `x` as a module, to capture it."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Fn2(Fn):
    """A plain function of two inputs `x`, `y`."""

    def forward(self, x, y):
        return self.fn(x, y)


def context(mesh: MeshInfo | dict, plan: Any = None, **options: Any) -> PassContext:
    """compile_model's PassContext: options 'input_layout', 'pp' and 'fsdp_unit' at their defaults."""
    mesh = mesh if isinstance(mesh, MeshInfo) else dry_mesh(mesh)
    opts = {"input_layout": "full", "pp": None, "fsdp_unit": "block", **options}
    return PassContext(mesh=mesh, plan=as_plan(plan), options=opts)


def passes_upto(name: str) -> list:
    """The default passes, in order, up to and including `name`."""
    passes = fxpar.default_passes()
    names = [p.name for p in passes]
    return passes[: names.index(name) + 1]


def run_upto(name: str, model: nn.Module, args: tuple, mesh: MeshInfo | dict, plan: Any = None, *,
             dynamic: bool = True, **options: Any) -> fx.GraphModule:
    """Captures `model` and runs the default passes up to and including `name`, checks on."""
    gm = fxpar.capture(model, args, dynamic=dynamic)
    return PassManager(passes_upto(name), check=True).run(gm, context(mesh, plan, **options))


def calls(gm: fx.GraphModule, target) -> list[fx.Node]:
    """The call_function nodes of exactly `target`, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def position(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def placeholder(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == name)


def param(gm: fx.GraphModule, fqn: str) -> fx.Node:
    """The get_attr node of a parameter or buffer, by FQN."""
    return next(n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target) == fqn)


def guard_calls(gm: fx.GraphModule) -> list[fx.Node]:
    """The capture's input-shape guard (`_guards_fn`) calls."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("_guards")]
