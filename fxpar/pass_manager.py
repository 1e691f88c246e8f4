"""Passes and the pass manager.

A pass is a callable `(gm, ctx) -> PassResult` with a `name` and the metadata
it `requires` and `provides` (plain strings such as "specs" or
"collectives"). A pass with options is a frozen dataclass with `__call__`;
a plain function becomes a pass with the `fx_pass` decorator.

The manager orders passes by those declarations (stable: the given order is
kept wherever it already satisfies them), then runs each one, and after each:
lints the graph and runs fxpar's invariant checks for what has been provided
so far (when checks are on: always in tests, FXPAR_CHECK=1), records (name,
seconds, check seconds, modified, graph code), and optionally dumps the graph
to a folder. Passes edit `gm.graph` and need not recompile: the manager
regenerates the Python code once at the end (and after each pass when it
keeps or dumps code). An error keeps its type and gains the pass name.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import torch.fx as fx

from fxpar import config
from fxpar.errors import FxparError, PlanError
from fxpar.mesh import MeshInfo

__all__ = ["Pass", "PassContext", "PassResult", "PassRecord", "PassManager", "fx_pass", "INITIAL_FACTS"]

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class PassRecord:
    """One entry of the pass history."""

    name: str
    seconds: float
    modified: bool
    num_nodes: int
    code: str | None
    check_seconds: float = 0.0  # lint and invariant checks after the pass, not counted in `seconds`


def _order(passes: list, initial: frozenset[str]) -> list:
    """Stable topological order: each pass runs after the providers of what it requires."""
    pending = list(passes)
    have = set(initial)
    ordered = []
    while pending:
        for i, p in enumerate(pending):
            if p.requires <= have:
                ordered.append(p)
                have |= p.provides
                del pending[i]
                break
        else:
            provided = set(initial).union(*(p.provides for p in passes))
            missing = {p.name: sorted(p.requires - provided) for p in pending if p.requires - provided}
            if missing:
                raise PlanError(
                    f"passes require metadata no pass provides: {missing}; add the passes that provide it "
                    "(see fxpar.default_passes())"
                )
            raise PlanError(f"passes {[p.name for p in pending]} require each other in a cycle")
    return ordered


class PassManager:
    """Runs passes in dependency order with checks, history and dumps."""

    def __init__(self, passes: list, *, check: bool | None = None, dump_dir: str | None = None,
                 keep_code: bool = False) -> None:
        for p in passes:
            if not isinstance(p, Pass):
                raise PlanError(f"{p!r} is not a pass: it needs name, requires, provides and __call__(gm, ctx)")
        cfg = config.from_env()
        self.passes = _order(list(passes), INITIAL_FACTS)
        self.check = cfg.check_invariants if check is None else check
        self.dump_dir = dump_dir or cfg.dump_dir
        self.keep_code = keep_code or self.dump_dir is not None
        self.history: list[PassRecord] = []

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        from fxpar.invariants import check_graph

        have = set(INITIAL_FACTS)
        for i, p in enumerate(self.passes):
            start = time.perf_counter()
            checked = start
            try:
                result = p(gm, ctx)
                gm = result.graph_module
                have |= p.provides
                checked = time.perf_counter()
                if self.check:
                    gm.graph.lint()
                    check_graph(gm, ctx.mesh, frozenset(have))
            except FxparError as e:
                if e.pass_name is None:
                    e.pass_name = p.name
                raise
            except Exception as e:
                e.add_note(f"raised in fxpar pass '{p.name}'")
                raise
            seconds, check_seconds = checked - start, time.perf_counter() - checked
            if self.keep_code:
                gm.recompile()
            code = gm.code if self.keep_code else None
            self.history.append(PassRecord(p.name, seconds, result.modified, len(gm.graph.nodes), code,
                                           check_seconds))
            if self.dump_dir:
                path = Path(self.dump_dir)
                path.mkdir(parents=True, exist_ok=True)
                (path / f"{i:02d}_{p.name}.py").write_text(code or gm.code)
            log.debug("pass %s: %.1f ms, %d nodes", p.name, seconds * 1e3, len(gm.graph.nodes))
        # Passes edit graphs; Python code is generated once, here (not after every pass).
        gm.recompile()
        return gm
