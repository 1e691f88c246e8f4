"""The pass protocol: what a pass is, what it receives, what it returns.

A pass is a callable `(gm, ctx) -> PassResult` with a `name` and the metadata
it `requires` and `provides` (plain strings such as "specs" or
"collectives"). A pass with options is a frozen dataclass with `__call__`;
a plain function becomes a pass with the `fx_pass` decorator. The pass
manager (`fxpar.compiler.pass_manager`) orders and runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import torch.fx as fx

from fxpar.core.mesh import MeshInfo

__all__ = ["Pass", "PassContext", "PassResult", "fx_pass", "INITIAL_FACTS"]

INITIAL_FACTS = frozenset({"captured"})
"""What a freshly captured GraphModule provides before any pass runs."""


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the graph module (possibly new) and whether it changed."""

    graph_module: fx.GraphModule
    modified: bool


@dataclass(frozen=True)
class PassContext:
    """Read-only inputs every pass may use.

    Attributes:
        mesh: the mesh (names, sizes, this rank's coordinate and groups).
        plan: the validated plan (`fxpar.Plan`).
        device_mesh: the torch DeviceMesh, None for dry runs.
        options: free-form options passes may read (e.g. 'input_layout').
    """

    mesh: MeshInfo
    plan: Any
    device_mesh: Any = None
    options: dict = field(default_factory=dict)


@runtime_checkable
class Pass(Protocol):
    """The extension API: anything with these attributes and `__call__`."""

    name: str
    requires: frozenset[str]
    provides: frozenset[str]

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult: ...


def fx_pass(*, requires: Iterable[str] = (), provides: Iterable[str] = (), name: str | None = None):
    """Declares a function `(gm, ctx) -> PassResult` as a pass."""

    def deco(fn: Callable) -> Callable:
        fn.name = name or fn.__name__
        fn.requires = frozenset(requires)
        fn.provides = frozenset(provides)
        return fn

    return deco
