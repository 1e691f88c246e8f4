"""The pass manager: ordering by requires/provides, checks, history, dumps, errors."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import fxpar
from fxpar.core.mesh import MeshInfo
from fxpar.core.pass_api import PassContext, PassResult, fx_pass
from fxpar.compiler import PassManager
from fxpar.core.spec import update_info
from models import MLPStack


def _noop(name, requires=(), provides=()):
    @fx_pass(requires=requires, provides=provides, name=name)
    def p(gm, ctx):
        return PassResult(gm, False)

    return p


def _ctx(sizes=None):
    return PassContext(mesh=MeshInfo.from_sizes(sizes or {"tp": 2}), plan=fxpar.Plan(auto_tp=True))


def test_orders_by_requirements_keeping_given_order_otherwise():
    a = _noop("a", requires=("captured",), provides=("x",))
    b = _noop("b", requires=("x", "y"), provides=("z",))
    c = _noop("c", requires=("captured",), provides=("y",))
    d = _noop("d", requires=("captured",))
    pm = PassManager([b, d, a, c])
    assert [p.name for p in pm.passes] == ["d", "a", "c", "b"]


def test_missing_requirement_names_the_pass():
    with pytest.raises(fxpar.PlanError, match=r"'b': \['nowhere'\]"):
        PassManager([_noop("b", requires=("nowhere",))])


def test_rejects_non_passes():
    with pytest.raises(fxpar.PlanError, match="is not a pass"):
        PassManager([lambda gm, ctx: None])


def test_history_and_dump(tmp_path):
    gm = fxpar.capture(MLPStack(depth=1), (torch.randn(2, 16),))
    manager = PassManager(fxpar.default_passes(), dump_dir=str(tmp_path))
    manager.run(gm, _ctx())
    names = [r.name for r in manager.history]
    assert names == [p.name for p in fxpar.default_passes()]
    assert names.index("annotate_parameters") < names.index("propagate_sharding") < names.index("insert_collectives")
    assert all(r.seconds >= 0 and r.code for r in manager.history)
    dumped = sorted(p.name for p in tmp_path.iterdir())
    assert dumped[0] == f"00_{names[0]}.py" and len(dumped) == len(names)
    i = names.index("insert_collectives")
    assert "fxpar.all_reduce" in (tmp_path / f"{i:02d}_insert_collectives.py").read_text()


def test_invariant_check_after_each_pass_names_the_pass_and_node():
    @fx_pass(requires=("collectives",), provides=("broken",))
    def drop_allreduce(gm, ctx):
        for n in list(gm.graph.nodes):
            if n.target == torch.ops.fxpar.all_reduce.default:
                n.replace_all_uses_with(n.args[0])
                gm.graph.erase_node(n)
        gm.recompile()
        return PassResult(gm, True)

    gm = fxpar.capture(MLPStack(depth=1), (torch.randn(2, 16),))
    plan = fxpar.Plan(tp={"layers.*.up": "colwise", "layers.*.down": "rowwise"})
    ctx = PassContext(mesh=MeshInfo.from_sizes({"tp": 2}), plan=plan)
    manager = PassManager([*fxpar.default_passes(), drop_allreduce])
    with pytest.raises(fxpar.GraphInvariantError) as e:
        manager.run(gm, ctx)
    msg = str(e.value)
    assert msg.startswith("[drop_allreduce]")
    assert "is [P] but the op's strategy needs [R]" in msg and "layers.0.down" in msg


def test_missing_spec_is_caught():
    @fx_pass(requires=("specs",), provides=("extra",))
    def add_unannotated(gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            x = next(n for n in gm.graph.nodes if n.op == "placeholder")
            neg = gm.graph.call_function(torch.ops.aten.neg.default, (x,))
            neg.meta["val"] = x.meta["val"]
        return PassResult(gm, True)

    gm = fxpar.capture(MLPStack(depth=1), (torch.randn(2, 16),))
    with pytest.raises(fxpar.GraphInvariantError, match="tensor value without a placement spec"):
        upto = [p.name for p in fxpar.default_passes()].index("propagate_sharding") + 1
        PassManager([*fxpar.default_passes()[:upto], add_unannotated]).run(gm, _ctx())


def test_custom_pass_in_the_pipeline_keeps_a_module_replicated(make_fake_mesh):
    """A user pass that runs after annotate_parameters and pins one module to Replicate."""
    from torch.distributed.tensor.placement_types import Replicate

    from fxpar.core.spec import get_info, make_spec

    @fx_pass(requires=("param_placements",), provides=("pinned",))
    def pin_first_layer(gm, ctx):
        for n in gm.graph.nodes:
            info = get_info(n)
            if info is not None and info.role == "param" and info.module_fqn.startswith("layers.0"):
                spec = make_spec(n.meta["val"], (Replicate(),), ctx.mesh.sizes)
                update_info(n, spec=spec, style="replicate (pinned)")
        return PassResult(gm, True)

    mesh = make_fake_mesh((2,), ("tp",))
    passes = fxpar.default_passes()
    passes.insert(1, pin_first_layer)
    pm = fxpar.parallelize(MLPStack(depth=2), mesh, example_inputs=(torch.randn(2, 16),), passes=passes)
    text = pm.explain()
    assert "layers.0.up: replicate (pinned)" in text and "layers.1.up: colwise" in text
