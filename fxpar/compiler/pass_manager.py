"""The pass manager (the pass protocol itself is `fxpar.core.pass_api`).

The manager orders passes by those declarations (stable: the given order is
kept wherever it already satisfies them), then runs each one, and after each:
lints the graph and runs the checks it was given (fxpar's invariant checks)
for what has been provided so far (when checks are on: always in tests, FXPAR_CHECK=1), records (name,
seconds, check seconds, modified, graph code), and optionally dumps the graph
to a folder. Passes edit `gm.graph` and need not recompile: the manager
regenerates the Python code once at the end (and after each pass when it
keeps or dumps code). An error keeps its type and gains the pass name.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch.fx as fx

from fxpar.core import config
from fxpar.core.errors import FxparError, PlanError
from fxpar.core.mesh import MeshInfo
from fxpar.core.pass_api import INITIAL_FACTS, Pass, PassContext, PassResult, fx_pass

__all__ = ["Pass", "PassContext", "PassResult", "PassRecord", "PassManager", "fx_pass", "INITIAL_FACTS", "GraphCheck"]

GraphCheck = Callable[[fx.GraphModule, MeshInfo, frozenset], None]
"""A check run after each pass: (graph module, mesh, metadata provided so far) -> None or raises."""

log = logging.getLogger(__name__)


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
                 keep_code: bool = False, checks: Iterable[GraphCheck] = ()) -> None:
        """Args:
            passes: the passes, in any order their declarations allow.
            check: run `checks` (and graph.lint) after every pass (default: FXPAR_CHECK).
            dump_dir: write the graph's code after every pass into this folder.
            keep_code: keep each pass's code in the history.
            checks: the invariant checks to run, injected by the caller (the compiler passes
                `fxpar.analysis.invariants.check_graph`), so the manager knows no analysis.
        """
        for p in passes:
            if not isinstance(p, Pass):
                raise PlanError(f"{p!r} is not a pass: it needs name, requires, provides and __call__(gm, ctx)")
        cfg = config.from_env()
        self.passes = _order(list(passes), INITIAL_FACTS)
        self.check = cfg.check_invariants if check is None else check
        self.dump_dir = dump_dir or cfg.dump_dir
        self.keep_code = keep_code or self.dump_dir is not None
        self.history: list[PassRecord] = []
        self.checks = tuple(checks)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
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
                    for check_fn in self.checks:
                        check_fn(gm, ctx.mesh, frozenset(have))
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
