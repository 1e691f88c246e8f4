"""fxpar.testing.strategies: what is drawn follows the capabilities; specs build the models they describe."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import find, given, settings

import fxpar
from fxpar.testing.strategies import (
    SIM_DIMS,
    BlockSpec,
    Case,
    ModelSpec,
    build_model,
    capabilities,
    cases,
    make_inputs,
    meshes,
    model_specs,
)

ONLY_TP_MLP = frozenset({"mesh:tp", "mlp"})
ALL = frozenset({"mesh:dp", "mesh:fsdp", "mesh:pp", "mesh:tp", "mlp", "gated_mlp", "linear", "layer_norm",
                 "rms_norm", "attention", "eager_attention", "gqa", "parallel_mlps", "embedding"})


def test_capabilities_follow_the_rule_table_and_the_supported_mesh_dims():
    caps = capabilities()
    assert {f"mesh:{d}" for d in fxpar.compiler.compile._SUPPORTED_DIMS} <= caps
    assert {"mlp", "linear", "layer_norm"} <= caps
    from fxpar.rules import has_rule

    assert ("attention" in caps) == has_rule(torch.ops.aten.scaled_dot_product_attention.default)
    assert ("embedding" in caps) == has_rule(torch.ops.aten.embedding.default)


@settings(max_examples=30)
@given(cases(capabilities=ONLY_TP_MLP))
def test_gated_capabilities_are_never_drawn(case):
    assert [n for n, _ in case.mesh] == ["tp"]
    assert {b.kind for b in case.model.blocks} == {"mlp"} and case.model.vocab == 0


def test_meshes_grow_to_three_dims_when_the_dims_are_supported():
    mesh = find(meshes(caps=ALL), lambda m: len(m) == 3)
    assert len(mesh) == 3 and [n for n, _ in mesh] == sorted((n for n, _ in mesh), key=("dp", "fsdp", "pp", "tp").index)
    assert all(s > 1 for _, s in mesh) and torch.tensor([s for _, s in mesh]).prod() <= 8
    with pytest.raises(Exception):
        find(meshes(caps=ONLY_TP_MLP), lambda m: len(m) > 1)


def test_the_grammar_reaches_attention_gqa_embeddings_and_tied_heads():
    spec = find(model_specs(caps=ALL), lambda s: any(b.kind == "attention" and b.kv_heads < b.heads for b in s.blocks)
                and s.tied)
    model = build_model(spec)
    assert model.head.weight is model.embed.weight
    x, target = make_inputs(Case((("tp", 2),), spec, None, True, (2, 3), 0))
    assert model(x).shape == target.shape


@settings(max_examples=25)
@given(model_specs(caps=ALL))
def test_module_names_are_the_ones_plans_use(spec):
    model = build_model(spec)
    linears = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    want = spec.linears()
    if spec.tied:
        linears.pop("head")
    assert linears == want


@settings(max_examples=25)
@given(cases(mesh_dims=SIM_DIMS))
def test_cases_are_plain_picklable_data(case):
    assert pickle.loads(pickle.dumps(case)) == case
    if case.plan is not None:
        assert "tp" in case.mesh_dict  # a tp plan on a mesh without tp is a PlanError by design


@pytest.mark.parametrize("style, widths, tp, error", [
    ("colwise", (8, 6), 4, None),  # a width tp does not divide: uneven (torch.chunk) shards, no error
    ("rowwise", (6, 8), 4, None),
    ("colwise", (8, 8), 4, None),
    ("replicate", (5, 7), 4, None),
])
def test_expected_error_agrees_with_parallelize(make_fake_mesh, style, widths, tp, error):
    spec = ModelSpec(widths[0], (BlockSpec("mlp", hidden=widths[1], residual=False),))
    fqn = "blocks.0.up"
    case = Case((("tp", tp),), spec, ((fqn, style),), False, (2,), 0)
    assert case.expected_error == error
    mesh = make_fake_mesh((tp,), ("tp",))
    x, _ = make_inputs(case)
    if error:
        with pytest.raises(fxpar.ShardingError, match=error):
            fxpar.parallelize(build_model(spec), mesh, example_inputs=(x,), plan=case.fxpar_plan())
    else:
        fxpar.parallelize(build_model(spec), mesh, example_inputs=(x,), plan=case.fxpar_plan())
