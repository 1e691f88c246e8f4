"""fxpar.check: static checks of rewritten graphs, on one rank and across ranks (no collectives run).

The bug zoo (tests/bugzoo) plants one realistic bug per entry; these tests
cover the rest of the checker: it accepts every correct graph, and each
invariant rejects its own kind of break with a message naming the node, its
module, what was expected and found, and the fix.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

import fxpar
from fxpar.analysis.invariants import check_graph, local_fake_run
from fxpar.core.spec import get_info, set_info
from fxpar.testing.simulate import SimWorld
from fxpar.testing.strategies import BlockSpec, Case, ModelSpec, build_model, make_inputs
from models import Chain, Flattening, GatedMLP, MLPStack

fxpar_ops = torch.ops.fxpar
aten = torch.ops.aten
MEGATRON = {"layers.*.up": "colwise", "layers.*.down": "rowwise"}
ATTN = ModelSpec(8, (BlockSpec("rms_norm"), BlockSpec("attention", heads=4, kv_heads=2, causal=True),
                     BlockSpec("gated_mlp", hidden=16, bias=False)), vocab=16, head=16, tied=True)


def _compile(model, mesh=None, plan=None, x=None):
    world = SimWorld(mesh or {"tp": 2})
    x = torch.randn(4, 16) if x is None else x
    return world, world.parallelize(model, example_inputs=(x,), plan=plan), x


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


CORRECT = {
    "megatron": (lambda: MLPStack(depth=2), MEGATRON, None),
    "rowwise_first": (lambda: Chain([16, 16, 16]), {"layers.0": "rowwise", "layers.1": "colwise"}, None),
    "gated_auto": (lambda: nn.Sequential(GatedMLP(16, 32), GatedMLP(16, 32)), None, None),
    "views": (lambda: Flattening(16, 32), None, torch.randn(2, 3, 16)),
    "transformer_block": (lambda: build_model(ATTN), None, make_inputs(Case((("tp", 2),), ATTN, None))[0]),
}


@pytest.mark.parametrize("mesh", [{"tp": 2}, {"tp": 4}, {"dp": 2, "tp": 2}, {"fsdp": 2, "tp": 2}],
                         ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
@pytest.mark.parametrize("name", sorted(CORRECT))
def test_correct_graphs_pass_every_check_on_every_rank_and_across_ranks(name, mesh):
    factory, plan, x = CORRECT[name]
    world, pms, _ = _compile(factory(), mesh, plan, x)
    for pm in pms:
        fxpar.check(pm)
    fxpar.check(pms[0], ranks=pms)


def test_dry_run_graphs_check_too(make_fake_mesh):
    mesh = make_fake_mesh((8,), ("tp",))
    pm = fxpar.parallelize(MLPStack(dim=16, hidden=64), mesh, example_inputs=(torch.randn(2, 16),), plan=MEGATRON)
    fxpar.check(pm)
    pm(torch.randn(2, 16))  # the fingerprint exchange skips torch's fake backend


def test_a_shape_argument_left_global_fails_the_local_shape_run():
    world, pms, x = _compile(build_model(ATTN), plan=None, x=CORRECT["transformer_block"][2])
    gm = pms[0].graph_module
    view = next(n for n in gm.graph.nodes if n.target == aten.view.default
                and get_info(n).spec.local_shape != get_info(n).spec.shape)
    spec = get_info(view).spec
    view.args = (view.args[0], [a if not isinstance(a, int) else int(s) for a, s in zip(view.args[1], spec.shape)])
    gm.recompile()
    with pytest.raises(fxpar.GraphInvariantError) as e:
        fxpar.check(pms[0])
    msg = str(e.value)
    assert f"at %{view.name}" in msg and "does not run on this rank's local shapes" in msg
    assert "A shape argument still holds a global size" in msg


def test_a_spec_whose_local_shape_disagrees_with_what_the_op_computes_is_named():
    world, pms, x = _compile(MLPStack(depth=1), plan=MEGATRON)
    gm = pms[0].graph_module
    gelu = next(n for n in gm.graph.nodes if n.target == aten.gelu.default)
    info = get_info(gelu)
    wrong = dataclasses.replace(info.spec, local_shape=(info.spec.local_shape[0], 32))
    set_info(gelu, dataclasses.replace(info, spec=wrong))
    with pytest.raises(fxpar.GraphInvariantError, match=r"local shape .* does not match \[S\(1\)\]"):
        fxpar.check(pms[0])


def test_collective_on_another_ranks_group_is_caught():
    world, pms, x = _compile(MLPStack(depth=1), {"dp": 2, "tp": 2}, MEGATRON)
    gm = pms[0].graph_module
    ar = next(n for n in gm.graph.nodes if n.target == fxpar_ops.all_reduce.default)
    ar.args = (ar.args[0], pms[2].mesh_info.group_names[1], ar.args[2])  # rank 2's tp group
    gm.recompile()
    with pytest.raises(fxpar.GraphInvariantError, match=r"all_reduce on group 'fxsim\d+/tp/1' but this rank's group "
                                                        r"for mesh dim 'tp' is 'fxsim\d+/tp/0'"):
        fxpar.check(pms[0])


def test_collective_with_the_wrong_group_size_is_caught():
    world, pms, x = _compile(Chain([16, 16, 16]), {"tp": 2}, {"layers.0": "rowwise", "layers.1": "colwise"})
    gm = pms[0].graph_module
    gather = next(n for n in gm.graph.nodes if n.target == fxpar_ops.all_gather.default)
    gather.args = (gather.args[0], gather.args[1], 4, *gather.args[3:])
    with pytest.raises(fxpar.GraphInvariantError, match="all_gather says group_size=4 but mesh dim 'tp' has 2 ranks"):
        fxpar.check(pms[0])


def test_nonlinear_op_on_a_partial_value_is_caught_even_with_consistent_edges():
    """The all_reduce moved after the activation: every edge still matches its recorded need."""
    world, pms, x = _compile(Chain([16, 16, 16], act="relu", bias=False), {"tp": 2},
                             {"layers.0": "rowwise", "layers.1": "colwise"})
    gm = pms[0].graph_module
    relu = next(n for n in gm.graph.nodes if n.target == aten.relu.default)
    ar = relu.args[0]
    assert ar.target == fxpar_ops.all_reduce.default
    from torch.distributed.tensor.placement_types import Partial

    # relu(all_reduce(p)) -> all_reduce(relu(p)): relu now sees the partial sums
    users = list(relu.users)
    relu.args = (ar.args[0],)
    ar.args = (relu, *ar.args[1:])
    for u in users:
        u.replace_input_with(relu, ar)
    relu.append(ar)
    info = get_info(relu)
    set_info(relu, dataclasses.replace(info, input_placements=((Partial(),),),
                                       spec=dataclasses.replace(info.spec, placements=(Partial(),))))
    gm.graph.lint()
    gm.recompile()
    with pytest.raises(fxpar.GraphInvariantError, match=r"relu.default at %relu .*a Partial value \(%\w+\) reaches an "
                                                        r"op that is not linear in it on mesh dim 'tp'"):
        fxpar.check(pms[0])


def test_parameters_laid_out_differently_on_two_ranks_are_caught():
    world, pms, x = _compile(MLPStack(depth=1), {"tp": 2}, MEGATRON)
    from torch.distributed.tensor.placement_types import Replicate

    w = _node(pms[1].graph_module, "layers_0_up_weight")
    info = get_info(w)
    set_info(w, dataclasses.replace(info, spec=dataclasses.replace(info.spec, placements=(Replicate(),),
                                                                   local_shape=info.spec.shape)))
    with pytest.raises(fxpar.GraphInvariantError) as e:
        from fxpar.analysis.module_checks import _check_ownership

        _check_ownership(pms)
    assert "parameter 'layers.0.up.weight' is laid out differently" in str(e.value)
    assert "rank 0: [S(0)]" in str(e.value) and "rank 1: [R]" in str(e.value)


def test_check_graph_keeps_its_signature_for_the_pass_manager():
    world, pms, x = _compile(MLPStack(depth=1), {"tp": 2}, MEGATRON)
    check_graph(pms[0].graph_module, pms[0].mesh_info, frozenset({"specs", "collectives"}))
    assert local_fake_run(pms[0].graph_module) is True


def test_pipeline_stages_must_agree_on_the_activations_crossing_a_cut(make_fake_mesh):
    mesh = make_fake_mesh((2, 2), ("pp", "tp"))
    pm = fxpar.parallelize(MLPStack(depth=2), mesh, example_inputs=(torch.randn(4, 16),), plan=MEGATRON)
    fxpar.check(pm)
    stage1 = pm.graph_module.get_submodule("stage_1")
    holder = next(n for n in stage1.graph.nodes if n.op == "placeholder")
    info = get_info(holder)
    from torch.distributed.tensor.placement_types import Shard

    spec = dataclasses.replace(info.spec, placements=(Shard(1),),
                               local_shape=(info.spec.shape[0], info.spec.shape[1] // 2))
    set_info(holder, dataclasses.replace(info, spec=spec))
    with pytest.raises(fxpar.ScheduleError, match=r"stage_0 sends %\w+ as \[R\] local \[\w+, 16\] but stage_1 "
                                                  r"receives it as %\w+ \[S\(1\)\] local \[\w+, 8\]"):
        fxpar.check(pm)
