"""Demo: a custom pass that keeps chosen modules replicated, inserted into fxpar's pipeline.

A pass is a callable `(gm, ctx) -> PassResult` that declares the metadata it
`requires` and `provides`. This one runs right after `annotate_parameters`
(which provides "param_placements") and, for every parameter of a module
matching one of its globs, replaces the tensor-parallel placement with
Replicate. Everything downstream (propagation, collectives, local shapes,
sharding the weights) follows from the placements, so the pass itself is ten
lines: it only edits `node.meta["fxpar"]`.

The demo plans a stack of MLP blocks automatically (Megatron pairs), keeps
the first block replicated with the pass, prints what changed in explain(),
then runs it on local gloo ranks and verifies outputs and every gradient
against the original model. It also shows that `pm.plan` remembers the
pass's decision: the saved plan compiles to the same graph without the pass.

    python examples/custom_pass.py           # 2 ranks
    python examples/custom_pass.py --tp 4

See docs/custom_passes.md for the walk-through.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import fnmatch
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.placement_types import Replicate

import fxpar
from fxpar.ops.collectives import COLLECTIVE_OPS
from fxpar.core.spec import get_info, make_spec, set_info
from fxpar.testing import run_ranks


@dataclasses.dataclass(frozen=True)
class KeepReplicated:
    """Keeps the parameters of the modules matching `modules` replicated on the tp mesh dim.

    Requires: param_placements. Provides: pinned_replicated.

    Runs after annotate_parameters; the passes after it see Replicate placements
    for these modules and compute them redundantly on every tp rank (no
    collectives inside them; their neighbours get the transitions they need).

    Before:  %blocks_0_up_weight  [S(0)] local [H/tp, D]     (colwise, chosen by the automatic plan)
    After:   %blocks_0_up_weight  [R]    local [H, D]        style = 'replicate (not sharded: ...)'

    Raises:
        fxpar.PlanError: a glob that matches no module, with the nearest module FQNs.
    """

    modules: tuple[str, ...]
    name: str = "keep_replicated"
    requires: frozenset = frozenset({"param_placements"})
    provides: frozenset = frozenset({"pinned_replicated"})

    def __call__(self, gm: torch.fx.GraphModule, ctx: fxpar.PassContext) -> fxpar.PassResult:
        if not ctx.mesh.has("tp"):
            return fxpar.PassResult(gm, False)
        tp = ctx.mesh.index("tp")
        params = [n for n in gm.graph.nodes if n.op == "get_attr" and get_info(n) is not None]
        owners = sorted({get_info(n).module_fqn for n in params})
        for glob in self.modules:
            if not any(fnmatch.fnmatchcase(m, glob) for m in owners):
                near = difflib.get_close_matches(glob, owners, n=5, cutoff=0.4)
                raise fxpar.PlanError(f"[{self.name}] {glob!r} matches no module with parameters; nearest: {near}")
        modified = False
        for node in params:
            info = get_info(node)
            if not any(fnmatch.fnmatchcase(info.module_fqn, glob) for glob in self.modules):
                continue
            placements = list(info.spec.placements)
            placements[tp] = Replicate()
            spec = make_spec(node.meta["val"], tuple(placements), ctx.mesh.sizes)
            # The style text is what explain() prints and what pm.plan records for this module.
            style = f"replicate (not sharded: kept replicated by {self.name})"
            set_info(node, dataclasses.replace(info, spec=spec, style=style))
            modified = True
        return fxpar.PassResult(gm, modified)


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class MLPStack(nn.Module):
    def __init__(self, dim: int = 64, hidden: int = 256, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, hidden) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def build():
    """The model and example inputs (also a FACTORY for `fxpar explain examples/custom_pass.py:build`)."""
    return MLPStack(), (torch.randn(4, 8, 64),)


def passes_with_pin() -> list:
    """fxpar's pipeline with KeepReplicated right after annotate_parameters."""
    passes = fxpar.default_passes()
    at = [p.name for p in passes].index("annotate_parameters") + 1
    passes.insert(at, KeepReplicated(modules=("blocks.0.*",)))
    return passes


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


def run_rank() -> dict:
    torch.manual_seed(0)  # the same model and data on every rank
    model, (x,) = build()
    target = torch.randn_like(x)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), passes=passes_with_pin())
    fxpar.check(pm)
    report = fxpar.verify(model, pm, x, target=target, loss_fn=mse)
    # The resolved plan names blocks.0 'replicate': without the pass, it compiles to the same graph.
    again = fxpar.parallelize(model, mesh, example_inputs=(x,), plan=pm.plan)
    return {"ok": report.ok, "report": str(report), "explain": pm.explain(),
            "same_graph": again.graph_module.code == pm.graph_module.code,
            "plan": {k: str(v) for k, v in pm.plan.tp}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2, help="ranks on the tp mesh dim (default 2)")
    args = parser.parse_args()

    # 1. A dry run first: what the pass changes, without any process group.
    model, inputs = build()
    before = fxpar.plan(model, {"tp": args.tp}, example_inputs=inputs)
    after = fxpar.plan(model, {"tp": args.tp}, example_inputs=inputs, passes=passes_with_pin())
    print("automatic plan:      ", {k: str(v) for k, v in before.plan.tp if k.startswith("blocks.0")})
    print("with keep_replicated:", {k: str(v) for k, v in after.plan.tp if k.startswith("blocks.0")})
    count = lambda r: sum(n.target in COLLECTIVE_OPS for n in r.graph_module.graph.nodes)  # noqa: E731
    print(f"collective nodes: {count(before)} automatic, {count(after)} with keep_replicated")

    # 2. Run it on local ranks and compare with the original model.
    results = run_ranks(run_rank, args.tp, timeout=300.0)
    print()
    print(results[0]["report"])
    ok = all(r["ok"] for r in results)
    same = all(r["same_graph"] for r in results)
    print(f"pm.plan reproduces the graph without the pass: {same}")
    print()
    print("VERIFIED: keep_replicated kept blocks.0 replicated; outputs and every gradient match the original model"
          if ok and same else "MISMATCH: see the report above")
    return 0 if ok and same else 1


if __name__ == "__main__":
    sys.exit(main())
